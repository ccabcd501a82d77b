// The selection path for many float32 rows (select.cpp's run_select says from which n): trimmed
// mean and median by partitioning, not by sorting networks. A network sorts a column with
// O(n log^2 n) comparators, about 19 per value at n = 512; quickselect visits each value about 3
// times, 16 at a time, but pays per column (pivots, recursion, the last few keys), so it only
// wins for long columns.
//
// Per block of 16 columns: the n rows' keys (simd.h's total order, widened to int32 for 16-bit
// inputs) are transposed into 16 contiguous columns (an in-register 16 x 16 transpose on AVX-512).
// Per column, the two ranks the op reads (f and n-f-1, or the middle one or two) are found by a
// three-way quickselect that ping-pongs between two scratch columns (AVX-512: compress-stores
// 16 keys per step), with the pivot the one of three keys nearest the targets' quantile; at most
// 16 keys are ranked by counting (AVX-512) or sorted, and so is a column past a depth bound (a
// crafted column costs O(n log n), never more).
// The trimmed sum is then taken in a fixed order that does not depend on how the ranks were found:
// the column's values strictly between the two rank keys, in row order into 32 interleaved
// float64 partial sums combined as a fixed tree, plus the copies of the two rank keys that fall inside the
// kept ranks (counted). Every ISA therefore gives the same bits, and any tiling does too.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "select_job.h"
#include "simd.h"

// (GCC's own intrinsics start several results from an "undefined" vector and then warn about it)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace tapestry {
namespace select_kernels {

constexpr int kBlockCols = 16;

// ---- the m keys of 16 columns of a row-major key tile (row stride W) into c, column l at c + l * m
template <class K>
void transpose_cols_scalar(const K* t, int W, int m, int w, int32_t* c) {
    for (int r = 0; r < m; ++r)
        for (int l = 0; l < w; ++l) c[static_cast<size_t>(l) * m + r] = t[static_cast<size_t>(r) * W + l];
}

// 16 x 16 int32 transpose in registers: v[i] holds row i on entry and column i on return.
TAPESTRY_AVX512 inline void transpose16(__m512i* v) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    // per 128-bit lane q: u[g + c] holds element 4q + c of rows g .. g+3
    for (int g = 0; g < 16; g += 4) {
        u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of rows 0-3, 4-7
        __m512i b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);  // lanes 1, 3
        __m512i x = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        __m512i y = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
        v[c] = _mm512_shuffle_i32x4(a, x, 0x88);
        v[8 + c] = _mm512_shuffle_i32x4(a, x, 0xdd);
        v[4 + c] = _mm512_shuffle_i32x4(b, y, 0x88);
        v[12 + c] = _mm512_shuffle_i32x4(b, y, 0xdd);
    }
}
template <class K>
TAPESTRY_AVX512 void transpose_cols_avx512(const K* t, int W, int m, int w, int32_t* c) {
    int r = 0;
    for (; r + 16 <= m; r += 16) {
        __m512i v[16];
        for (int i = 0; i < 16; ++i) {
            const K* row = t + static_cast<size_t>(r + i) * W;
            if constexpr (sizeof(K) == 4)
                v[i] = _mm512_loadu_si512(row);
            else
                v[i] = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
        }
        transpose16(v);
        for (int l = 0; l < w; ++l) _mm512_storeu_si512(c + static_cast<size_t>(l) * m + r, v[l]);
    }
    for (; r < m; ++r)
        for (int l = 0; l < w; ++l) c[static_cast<size_t>(l) * m + r] = t[static_cast<size_t>(r) * W + l];
}

// ---- three-way partition of src[0, m) around p into dst: keys < p at [0, *lt), keys > p at
// [m - *gt, m) (the keys equal to p are counted by what is left over; their slots are not written).
TAPESTRY_INLINE void partition_scalar(const int32_t* src, int64_t m, int32_t p, int32_t* dst, int64_t* lt,
                                      int64_t* gt) {
    int64_t a = 0, b = 0;
    for (int64_t i = 0; i < m; ++i) {
        const int32_t x = src[i];
        // branch-free: both slots are free (a + b <= i < m), so both stores are safe; the counts
        // decide which one is kept
        dst[m - 1 - b] = x;
        dst[a] = x;
        a += x < p;
        b += x > p;
    }
    *lt = a;
    *gt = b;
}

TAPESTRY_AVX512 inline void partition_avx512(const int32_t* src, int64_t m, int32_t p, int32_t* dst, int64_t* lt,
                                             int64_t* gt) {
    const __m512i P = _mm512_set1_epi32(p);
    int64_t a = 0, hi = m;
    for (int64_t i = 0; i < m; i += 16) {
        const __mmask16 in = static_cast<__mmask16>(m - i >= 16 ? 0xffff : (1u << (m - i)) - 1);
        const __m512i x = _mm512_maskz_loadu_epi32(in, src + i);
        const __mmask16 l = _mm512_mask_cmplt_epi32_mask(in, x, P);
        const __mmask16 g = _mm512_mask_cmpgt_epi32_mask(in, x, P);
        const int nl = __builtin_popcount(l), ng = __builtin_popcount(g);
        _mm512_mask_storeu_epi32(dst + a, static_cast<__mmask16>((1u << nl) - 1), _mm512_maskz_compress_epi32(l, x));
        hi -= ng;
        _mm512_mask_storeu_epi32(dst + hi, static_cast<__mmask16>((1u << ng) - 1), _mm512_maskz_compress_epi32(g, x));
        a += nl;
    }
    *lt = a;
    *gt = m - hi;
}

template <bool AVX512>
TAPESTRY_INLINE void partition(const int32_t* src, int64_t m, int32_t p, int32_t* dst, int64_t* lt, int64_t* gt) {
    if constexpr (AVX512)
        partition_avx512(src, m, p, dst, lt, gt);
    else
        partition_scalar(src, m, p, dst, lt, gt);
}

// The keys of ranks k1 <= k2 of at most 16 keys: AVX-512 counts, per key, the keys at or below it
// (rank k's key is the smallest key with more than k keys at or below it); else a sort.
TAPESTRY_AVX512 inline void select_few_avx512(const int32_t* src, int64_t m, int64_t k1, int64_t k2, int32_t* v1,
                                              int32_t* v2) {
    const __mmask16 in = static_cast<__mmask16>(m >= 16 ? 0xffff : (1u << m) - 1);
    const __m512i x = _mm512_maskz_loadu_epi32(in, src);
    __m512i le = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t j = 0; j < m; ++j)
        le = _mm512_mask_add_epi32(le, _mm512_cmple_epi32_mask(_mm512_set1_epi32(src[j]), x), le, one);
    *v1 = _mm512_mask_reduce_min_epi32(in & _mm512_cmpgt_epi32_mask(le, _mm512_set1_epi32(static_cast<int>(k1))), x);
    *v2 = _mm512_mask_reduce_min_epi32(in & _mm512_cmpgt_epi32_mask(le, _mm512_set1_epi32(static_cast<int>(k2))), x);
}

template <bool AVX512>
TAPESTRY_INLINE void select_few(const int32_t* src, int32_t* tmp, int64_t m, int64_t k1, int64_t k2, int32_t* v1,
                                int32_t* v2) {
    if (AVX512 && m <= 16) return select_few_avx512(src, m, k1, k2, v1, v2);
    std::memcpy(tmp, src, static_cast<size_t>(m) * sizeof(int32_t));
    std::sort(tmp, tmp + m);
    *v1 = tmp[k1];
    *v2 = tmp[k2];
}

// The keys of ranks k1 <= k2 (0-based) of src[0, m). Partitions src into dst; the next level
// partitions dst into alt (within the same index range), the one after into dst again, so src is
// only read. Both ranks' ranges stay disjoint when they split. Pivot: of three keys at m/4, m/2
// and 3m/4, the one nearest the targets' quantile; a column built against that rule runs out of
// depth and is sorted, so no column costs more than O(m log m).
template <bool AVX512>
void select_two(const int32_t* src, int32_t* dst, int32_t* alt, int64_t m, int64_t k1, int64_t k2, int32_t* v1,
                int32_t* v2, int depth) {
    if (m <= 16 || depth == 0) return select_few<AVX512>(src, dst, m, k1, k2, v1, v2);
    int32_t a = src[m / 4], b = src[m / 2], c = src[m - 1 - m / 4];
    if (a > b) std::swap(a, b);
    if (b > c) std::swap(b, c);
    if (a > b) std::swap(a, b);
    const int64_t q2 = k1 + k2 + 1;  // twice the targets' middle rank, plus one
    const int32_t p = 3 * q2 < 2 * m ? a : 3 * q2 > 4 * m ? c : b;
    int64_t lt, gt;
    partition<AVX512>(src, m, p, dst, &lt, &gt);
    const int64_t ge = m - gt;  // ranks [lt, ge) hold p
    auto side = [&](int64_t k) { return k < lt ? 0 : k < ge ? 1 : 2; };
    const int s1 = side(k1), s2 = side(k2);
    if (s1 == 1) *v1 = p;
    if (s2 == 1) *v2 = p;
    int32_t unused;
    if (s1 == 0 && s2 == 0) return select_two<AVX512>(dst, alt, dst, lt, k1, k2, v1, v2, depth - 1);
    if (s1 == 2 && s2 == 2)
        return select_two<AVX512>(dst + ge, alt + ge, dst + ge, gt, k1 - ge, k2 - ge, v1, v2, depth - 1);
    if (s1 == 0) select_two<AVX512>(dst, alt, dst, lt, k1, k1, v1, &unused, depth - 1);
    if (s2 == 2) select_two<AVX512>(dst + ge, alt + ge, dst + ge, gt, k2 - ge, k2 - ge, v2, &unused, depth - 1);
}

// ---- the trimmed sum from the rank keys lo = S[f] < hi = S[m-f-1]: the column's values strictly
// between them in row order (key r into partial sum r % kSums), and how many keys are <= lo and >= hi.
constexpr int kSums = 32;
template <class T>
TAPESTRY_INLINE double key_value(int32_t k) {
    return T::value(static_cast<typename T::Key>(k));
}

template <class T>
TAPESTRY_INLINE void inner_sum_scalar(const int32_t* col, int m, int32_t lo, int32_t hi, double* acc, int64_t* nle,
                                      int64_t* nge) {
    int64_t a = 0, b = 0;
    for (int r = 0; r < m; ++r) {
        const int32_t k = col[r];
        acc[r % kSums] += kept_or_zero(key_value<T>(k), (k > lo) & (k < hi));
        a += k <= lo;
        b += k >= hi;
    }
    *nle = a;
    *nge = b;
}

// the same, 32 keys at a time in four accumulators of 8 lanes (key r into lane r % 32, the
// scalar order)
template <class T>
TAPESTRY_AVX512 inline __m512 values16(__m512i k) {
    if constexpr (std::is_same<T, F32>::value) {  // unkey32
        return _mm512_castsi512_ps(_mm512_xor_si512(k, _mm512_and_si512(_mm512_srai_epi32(k, 31), _mm512_set1_epi32(0x7fffffff))));
    } else {  // unkey16 on the sign-extended key leaves the raw bits in the low half
        const __m512i raw = _mm512_xor_si512(k, _mm512_and_si512(_mm512_srai_epi32(k, 31), _mm512_set1_epi32(0x7fff)));
        if constexpr (std::is_same<T, BF16>::value)
            return _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
        else  // float16: the hardware conversion
            return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
    }
}

template <class T>
TAPESTRY_AVX512 void inner_sum_avx512(const int32_t* col, int m, int32_t lo, int32_t hi, double* acc, int64_t* nle,
                                      int64_t* nge) {
    const __m512i L = _mm512_set1_epi32(lo), H = _mm512_set1_epi32(hi);
    __m512d s[4];
    for (int i = 0; i < 4; ++i) s[i] = _mm512_loadu_pd(acc + 8 * i);
    int64_t a = 0, b = 0;
    for (int r = 0; r < m; r += 32) {
        for (int h = 0; h < 2; ++h) {
            const int64_t left = m - r - 16 * h;
            const __mmask16 in = static_cast<__mmask16>(left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1);
            const __m512i k = _mm512_maskz_loadu_epi32(in, col + r + 16 * h);
            const __mmask16 mid = _mm512_mask_cmpgt_epi32_mask(in, k, L) & _mm512_cmplt_epi32_mask(k, H);
            a += __builtin_popcount(_mm512_mask_cmple_epi32_mask(in, k, L));
            b += __builtin_popcount(_mm512_mask_cmpge_epi32_mask(in, k, H));
            const __m512 v = values16<T>(k);
            const __m256 hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
            s[2 * h] = _mm512_mask_add_pd(s[2 * h], static_cast<__mmask8>(mid), s[2 * h],
                                          _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            s[2 * h + 1] = _mm512_mask_add_pd(s[2 * h + 1], static_cast<__mmask8>(mid >> 8), s[2 * h + 1],
                                              _mm512_cvtps_pd(hi8));
        }
    }
    for (int i = 0; i < 4; ++i) _mm512_storeu_pd(acc + 8 * i, s[i]);
    *nle = a;
    *nge = b;
}

template <class T, bool AVX512>
TAPESTRY_INLINE float trimmed_from_ranks(const int32_t* col, int m, int f, int32_t lo, int32_t hi) {
    if (lo == hi) return static_cast<float>(key_value<T>(lo));
    alignas(64) double acc[kSums] = {};
    int64_t nle, nge;
    if constexpr (AVX512)
        inner_sum_avx512<T>(col, m, lo, hi, acc, &nle, &nge);
    else
        inner_sum_scalar<T>(col, m, lo, hi, acc, &nle, &nge);
    for (int w = kSums / 2; w > 0; w /= 2)  // a fixed tree: lane i + w into lane i
        for (int i = 0; i < w; ++i) acc[i] += acc[i + w];
    const double inner = acc[0];
    // copies of lo among the kept ranks [f, m-f): those of ranks f .. nle-1; of hi: m-nge .. m-f-1
    const double sum = inner + static_cast<double>(nle - f) * key_value<T>(lo) +
                       static_cast<double>(nge - f) * key_value<T>(hi);
    return static_cast<float>(sum / static_cast<double>(m - 2 * f));
}

// Columns per tile of this path: 64 KiB of keys per 16 columns at most (L2-resident with the
// transposed block), so every row is still read in runs of 256 B to 1 KiB.
inline int wide_tile_cols(int m, int W) {
    return std::clamp(65536 / m / kBlockCols * kBlockCols, kBlockCols, W);
}

// The trimmed mean or median of the columns [j0, j0 + J.tile_w) through the partitioning path.
// tile: the m x tile_w row-major keys; scratch: 18 m int32.
template <class T, int OP, bool AVX512>
TAPESTRY_INLINE void select_tile_wide(const SelectJob& J, int64_t j0, void* tile, int32_t* scratch) {
    using K = typename T::Key;
    const int m = J.m;
    const int W = J.tile_w;
    const int wt = static_cast<int>(std::min<int64_t>(W, J.d - j0));
    K* t = static_cast<K*>(tile);
    load_key_tile<T>(J, j0, W, wt, t);
    int32_t* c = scratch;
    int32_t* A = c + static_cast<size_t>(kBlockCols) * m;
    int32_t* B = A + m;
    int depth = 8;
    for (int x = m; x > 1; x >>= 1) depth += 2;
    const int64_t k1 = OP == kTrimmed ? J.param : (m - 1) / 2;
    const int64_t k2 = OP == kTrimmed ? m - 1 - J.param : m / 2;
    for (int b = 0; b < wt; b += kBlockCols) {
        const int w = std::min(kBlockCols, wt - b);
        if constexpr (AVX512)
            transpose_cols_avx512<K>(t + b, W, m, w, c);
        else
            transpose_cols_scalar<K>(t + b, W, m, w, c);
        for (int l = 0; l < w; ++l) {
            const int32_t* col = c + static_cast<size_t>(l) * m;
            int32_t lo, hi;
            select_two<AVX512>(col, A, B, m, k1, k2, &lo, &hi, depth);
            float& o = J.out[j0 + b + l];
            if (OP == kTrimmed)
                o = trimmed_from_ranks<T, AVX512>(col, m, static_cast<int>(J.param), lo, hi);
            else  // median: the middle rank, or the mean of the two middle ranks for even m
                o = static_cast<float>(m % 2 ? key_value<T>(hi) : (key_value<T>(lo) + key_value<T>(hi)) * 0.5);
        }
    }
}

}  // namespace select_kernels
}  // namespace tapestry

#pragma GCC diagnostic pop
