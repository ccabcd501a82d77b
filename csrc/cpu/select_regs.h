// The register-resident path of the selection kernels for n <= kRegMax rows: the whole sorting
// network unrolled over vector registers (one register per wire), for sorting a tile and for the
// trimmed mean straight from the rows (select.cpp picks these functions per n and ISA).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "networks.h"
#include "select_job.h"
#include "simd.h"

namespace tapestry {
namespace select_kernels {

using namespace networks;

// ---- register-resident networks for n <= kRegMax: the whole network unrolled at compile time,
// one vector register per wire (16 float32 keys or 32 float16/bfloat16 keys on AVX-512), so a
// comparator is two instructions instead of loads and stores through the tile.
#ifndef TAPESTRY_REG_MAX  // smaller only in the AddressSanitizer harness, to keep its build short
#define TAPESTRY_REG_MAX 32
#endif
constexpr int kRegMax = TAPESTRY_REG_MAX;

// Sort the n x kTileW tile of keys K, one vector of BYTES bytes per wire at a time.
template <class K, int n, int BYTES>
TAPESTRY_INLINE void sort_tile_regs(K* t) {
    typedef K V __attribute__((vector_size(BYTES)));
    constexpr int lanes = BYTES / sizeof(K);
    constexpr int W = kTileW<K>;
    for (int g = 0; g < W; g += lanes) {
        V v[n];
        for (int r = 0; r < n; ++r) std::memcpy(&v[r], t + r * W + g, BYTES);
        run_network<V, n>(v, std::make_index_sequence<Batcher<n>::count>{});
        for (int r = 0; r < n; ++r) std::memcpy(t + r * W + g, &v[r], BYTES);
    }
}

using SortFn = void (*)(void*);

template <class K, int n>
TAPESTRY_AVX512 void sort_regs_avx512(void* t) {
    sort_tile_regs<K, n, 64>(static_cast<K*>(t));
}
template <class K, int n>
TAPESTRY_AVX2 void sort_regs_avx2(void* t) {
    sort_tile_regs<K, n, 32>(static_cast<K*>(t));
}
template <class K, int n>
void sort_regs_portable(void* t) {
    sort_tile_regs<K, n, 16>(static_cast<K*>(t));
}

template <class K, size_t... I>
SortFn reg_sorter(Isa isa, int n, std::index_sequence<I...>) {
    static constexpr SortFn avx512[] = {sort_regs_avx512<K, int(I) + 1>...};
    static constexpr SortFn avx2[] = {sort_regs_avx2<K, int(I) + 1>...};
    static constexpr SortFn portable[] = {sort_regs_portable<K, int(I) + 1>...};
    return (isa == kAvx512 ? avx512 : isa == kAvx2 ? avx2 : portable)[n - 1];
}

// ---- trimmed mean for m <= kRegMax without a tile: each group of lanes (one register per row) goes
// from the rows straight into registers (raw -> key there), through the unrolled network, and only
// the group's n keys (2 KiB at most, L1-resident) go through memory for the float64 sums. The
// 32 KiB tile of select_tile, stored and reloaded twice per tile, filled L1 and cost more than
// the network. The per-lane arithmetic depends only on the column's values and on m and f (never
// on the ISA, lane or group), and every column of a call with m <= kRegMax goes through here.
template <bool PREFETCH, class V, class R, class K, size_t... I>
TAPESTRY_INLINE void load_keys(V* v, const R* const* src, int g, K nan_above, std::index_sequence<I...>) {
    constexpr int W = kTileW<K>;
    constexpr int kBits = 8 * static_cast<int>(sizeof(K));
    constexpr K kMag = static_cast<K>(~(K(1) << (kBits - 1)));  // 0x7fff / 0x7fffffff
    const V mag = V{} + kMag;
    const V nan = V{} + nan_above;
    ((void)[&] {
        if constexpr (PREFETCH) __builtin_prefetch(src[I] + kPrefetchTiles * W + g, 0, 2);
        V s;
        std::memcpy(&s, src[I] + g, sizeof(V));
        V k = s ^ ((s >> (kBits - 1)) & mag);
        v[I] = (s & mag) > nan ? mag : k;
    }(), ...);
}

template <class V, class K, size_t... I>
TAPESTRY_INLINE void store_wires(const V* v, K* buf, std::index_sequence<I...>) {
    constexpr int lanes = sizeof(V) / sizeof(K);
    ((void)std::memcpy(buf + I * lanes, &v[I], sizeof(V)), ...);
}

// float16 keys -> float32 values through the F16C conversion (GCC does not vectorise _Float16
// conversions itself); portable: simd.h's exact software conversion, which gives the same bits.
using HalfKeysFn = void (*)(const int16_t* keys, int count, float* out);

#pragma GCC diagnostic push  // GCC's _mm512_cvtph_ps starts from an "undefined" vector
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
TAPESTRY_AVX512 inline void half_keys_avx512(const int16_t* k, int count, float* out) {
    for (int i = 0; i < count; i += 16) {
        const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + i));
        const __m256i raw = _mm256_xor_si256(s, _mm256_and_si256(_mm256_srai_epi16(s, 15), _mm256_set1_epi16(0x7fff)));
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(raw));
    }
}
#pragma GCC diagnostic pop
TAPESTRY_AVX2 inline void half_keys_avx2(const int16_t* k, int count, float* out) {
    for (int i = 0; i < count; i += 8) {
        const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i));
        const __m128i raw = _mm_xor_si128(s, _mm_and_si128(_mm_srai_epi16(s, 15), _mm_set1_epi16(0x7fff)));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(raw));
    }
}
inline void half_keys_portable(const int16_t* k, int count, float* out) {
    for (int i = 0; i < count; ++i) out[i] = F16::value_f(k[i]);
}
inline HalfKeysFn half_keys(Isa isa) {
    return isa == kAvx512 ? half_keys_avx512 : isa == kAvx2 ? half_keys_avx2 : half_keys_portable;
}

// The summands: 16-bit keys through part_f / part_d, or float16 values already converted.
template <class T>
TAPESTRY_INLINE float summand_f(typename T::Key k) {
    return part_f<T>(k);
}
template <class T>
TAPESTRY_INLINE float summand_f(float v) {
    return v;
}
template <class T>
TAPESTRY_INLINE double summand_d(typename T::Key k) {
    return part_d<T>(k);
}
template <class T>
TAPESTRY_INLINE double summand_d(float v) {
    return v;
}

// The lanes columns from g (of w) of the n rows at src, as keys in one register per row, sorted
// by the unrolled network; in the last, partial group the lanes past w hold raw 0 (key 0) and are
// never stored by the callers.
template <class T, int n, class V>
TAPESTRY_INLINE void sorted_group(const SelectJob& J, const typename T::Raw* const* src, int g, int w, V* v) {
    using R = typename T::Raw;
    constexpr int lanes = static_cast<int>(sizeof(V) / sizeof(typename T::Key));
    if (g + lanes <= w && J.prefetch) {
        load_keys<true>(v, src, g, nan_above<T>(), std::make_index_sequence<n>{});
    } else if (g + lanes <= w) {
        load_keys<false>(v, src, g, nan_above<T>(), std::make_index_sequence<n>{});
    } else {
        alignas(64) R tmp[n * lanes] = {};
        const R* tsrc[n];
        for (int r = 0; r < n; ++r) {
            std::memcpy(tmp + r * lanes, src[r] + g, static_cast<size_t>(w - g) * sizeof(R));
            tsrc[r] = tmp + r * lanes;
        }
        load_keys<false>(v, tsrc, 0, nan_above<T>(), std::make_index_sequence<n>{});
    }
    run_network<V, n>(v, std::make_index_sequence<Batcher<n>::count>{});
}

// (GCC cannot see that store_wires writes every row of buf that the sums read)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <class T, int n, int BYTES>
TAPESTRY_INLINE void trimmed_tile_regs(const SelectJob& J, int64_t j0) {
    using K = typename T::Key;
    using R = typename T::Raw;
    typedef K V __attribute__((vector_size(BYTES)));
    constexpr int lanes = BYTES / static_cast<int>(sizeof(K));
    constexpr int W = kTileW<K>;
    static_assert(sizeof(R) == sizeof(K), "raw and key widths");
    const int w = static_cast<int>(std::min<int64_t>(W, J.d - j0));
    const int f = J.param;
    const R* src[n];
    for (int r = 0; r < n; ++r) src[r] = reinterpret_cast<const R*>(J.base + J.row_off[r]) + j0;
    alignas(64) K buf[n * lanes];
    float* out = J.out + j0;
    for (int g = 0; g < w; g += lanes) {
        V v[n];
        sorted_group<T, n>(J, src, g, w, v);
        store_wires<V>(v, buf, std::make_index_sequence<n>{});
        // float16: the kept ranks converted in one call (F16C), the sums then read floats
        constexpr bool half = std::is_same<T, F16>::value;
        using S = std::conditional_t<half, float, K>;
        alignas(64) float conv[half ? n * lanes : 1];
        const S* sb;
        if constexpr (half) {
            J.half_keys(buf + f * lanes, (n - 2 * f) * lanes, conv + f * lanes);
            sb = conv;
        } else {
            sb = buf;
        }
        double a[lanes];
        for (int l = 0; l < lanes; ++l) a[l] = 0.0;
        int r = f;
        if constexpr (sizeof(K) == 2) {
            // 16-bit inputs: four ranks are summed in float32 first, as (x0 + x1) + (x2 + x3), for a
            // quarter of the float64 conversions and adds. That is exact unless the four exponents
            // span more than 11 (float16: 11 + 2 bits of sum + 11 <= 24) or 14 (bfloat16) binades;
            // then the coordinate's range is at least (1 - 2^-11) max|x_i|, and the three roundings
            // (each at most 2^-24 of a partial sum, |partials| <= 2, 2, 4 max|x_i|) cost at most
            // 8 * 2^-24 max|x_i| per four ranks: at most 1.2e-7 of the range in the mean. A remaining
            // pair is summed the same way (select_tile's pairs).
            for (; r + 3 < n - f; r += 4) {
                const S* x0 = sb + r * lanes;
                const S* x1 = sb + (r + 1) * lanes;
                const S* x2 = sb + (r + 2) * lanes;
                const S* x3 = sb + (r + 3) * lanes;
                for (int l = 0; l < lanes; ++l)
                    a[l] += static_cast<double>((summand_f<T>(x0[l]) + summand_f<T>(x1[l])) +
                                                (summand_f<T>(x2[l]) + summand_f<T>(x3[l])));
            }
            for (; r + 1 < n - f; r += 2) {
                const S* x = sb + r * lanes;
                const S* y = sb + (r + 1) * lanes;
                for (int l = 0; l < lanes; ++l) a[l] += static_cast<double>(summand_f<T>(x[l]) + summand_f<T>(y[l]));
            }
        }
        for (; r < n - f; ++r) {
            const S* x = sb + r * lanes;
            for (int l = 0; l < lanes; ++l) a[l] += summand_d<T>(x[l]);
        }
        const double cnt = static_cast<double>(n - 2 * f);
        const int wl = std::min(lanes, w - g);
        for (int l = 0; l < wl; ++l) out[g + l] = static_cast<float>(unscale<T>(a[l]) / cnt);
    }
}

// Mean around the median from W sorted columns (row r of the sorted tile at t + r * W; columns
// past w are computed but not written): the k values nearest the median (ties to the smaller
// value) are the window [s, s+k) of the sorted column with s = 1 + the last t at which S[t+k] is
// strictly nearer than S[t] (0 if none): left of s every window loses to its right neighbour,
// from s on none does. A value equal to the median is at distance 0 (an infinite one too: inf - inf
// is NaN); NaN distances compare false, so NaN is never nearer. Every condition is a select of
// bits (kept_or_zero, masks), which GCC vectorises; the arithmetic of a lane depends only on its
// column, so the tile and register paths give the same bits.
template <class T, int W>
TAPESTRY_INLINE void around_median_sorted(const typename T::Key* t, int m, int k, int w, float* out) {
    using K = typename T::Key;
    auto row = [&](int r) { return t + static_cast<size_t>(r) * W; };
    alignas(64) double med[W], acc[W];
    alignas(64) int64_t s0[W];  // s per lane, 64-bit like the distances: one vector width throughout
    {
        const K* hi = row(m / 2);
        const K* lo = row(m % 2 ? m / 2 : m / 2 - 1);
        for (int l = 0; l < W; ++l) med[l] = m % 2 ? T::value(hi[l]) : (T::value(lo[l]) + T::value(hi[l])) * 0.5;
    }
    const int lo = m - k;  // the window starts at some s in [0, lo]: ranks lo .. k-1 are always in it
    for (int l = 0; l < W; ++l) s0[l] = 0;
    for (int r = 0; r < lo; ++r) {
        const K* a = row(r);
        const K* b = row(r + k);
        for (int l = 0; l < W; ++l) {
            const double va = T::value(a[l]), vb = T::value(b[l]);
            const double da = kept_or_zero(std::fabs(va - med[l]), va != med[l]);
            const double db = kept_or_zero(std::fabs(vb - med[l]), vb != med[l]);
            const int64_t nearer = -static_cast<int64_t>(da > db);
            s0[l] = (s0[l] & ~nearer) | ((r + 1) & nearer);
        }
    }
    // the window's float64 sum, rank by rank in order; a rank outside the window adds 0.0, which
    // changes nothing (the sum starts at +0.0 and so is never -0.0)
    for (int l = 0; l < W; ++l) acc[l] = 0.0;
    for (int r = 0; r < m; ++r) {
        const K* x = row(r);
        if (r >= lo && r < k) {
            for (int l = 0; l < W; ++l) acc[l] += T::value(x[l]);
        } else {
            for (int l = 0; l < W; ++l)
                acc[l] += kept_or_zero(T::value(x[l]), static_cast<uint64_t>(r - s0[l]) < static_cast<uint64_t>(k));
        }
    }
    const double cnt = static_cast<double>(k);
    for (int l = 0; l < w; ++l) out[l] = static_cast<float>(acc[l] / cnt);
}

// ---- mean around the median for m <= kRegMax, like trimmed_tile_regs: each group of lanes from the
// rows into registers and through the network; the sorted groups fill an L1 tile (never the raw
// keys first, as select_tile does), which around_median_sorted then reads W columns at a time.
template <class T, int n, int BYTES>
TAPESTRY_INLINE void around_tile_regs(const SelectJob& J, int64_t j0) {
    using K = typename T::Key;
    using R = typename T::Raw;
    typedef K V __attribute__((vector_size(BYTES)));
    constexpr int lanes = BYTES / static_cast<int>(sizeof(K));
    constexpr int W = kTileW<K>;
    const int w = static_cast<int>(std::min<int64_t>(W, J.d - j0));
    const R* src[n];
    for (int r = 0; r < n; ++r) src[r] = reinterpret_cast<const R*>(J.base + J.row_off[r]) + j0;
    alignas(64) K tile[n * W];
    for (int g = 0; g < w; g += lanes) {
        V v[n];
        sorted_group<T, n>(J, src, g, w, v);
        for (int r = 0; r < n; ++r) std::memcpy(tile + r * W + g, &v[r], sizeof(V));
    }
    for (int g = (w + lanes - 1) / lanes * lanes; g < W; g += lanes)  // columns past d: defined keys
        for (int r = 0; r < n; ++r) std::memset(tile + r * W + g, 0, sizeof(V));
    around_median_sorted<T, W>(tile, n, J.param, w, J.out + j0);
}

#pragma GCC diagnostic pop

using TrimFn = void (*)(const SelectJob&, int64_t);

template <class T, int n, bool AROUND>
TAPESTRY_AVX512 void trim_regs_avx512(const SelectJob& J, int64_t j0) {
    if constexpr (AROUND) around_tile_regs<T, n, 64>(J, j0); else trimmed_tile_regs<T, n, 64>(J, j0);
}
template <class T, int n, bool AROUND>
TAPESTRY_AVX2 void trim_regs_avx2(const SelectJob& J, int64_t j0) {
    if constexpr (AROUND) around_tile_regs<T, n, 32>(J, j0); else trimmed_tile_regs<T, n, 32>(J, j0);
}
template <class T, int n, bool AROUND>
void trim_regs_portable(const SelectJob& J, int64_t j0) {
    if constexpr (AROUND) around_tile_regs<T, n, 16>(J, j0); else trimmed_tile_regs<T, n, 16>(J, j0);
}

// The register path of the trimmed mean (AROUND false) or the mean around the median (true).
template <class T, bool AROUND, size_t... I>
TrimFn reg_trimmer(Isa isa, int n, std::index_sequence<I...>) {
    static constexpr TrimFn avx512[] = {trim_regs_avx512<T, int(I) + 1, AROUND>...};
    static constexpr TrimFn avx2[] = {trim_regs_avx2<T, int(I) + 1, AROUND>...};
    static constexpr TrimFn portable[] = {trim_regs_portable<T, int(I) + 1, AROUND>...};
    return (isa == kAvx512 ? avx512 : isa == kAvx2 ? avx2 : portable)[n - 1];
}

}  // namespace select_kernels
}  // namespace tapestry
