// Per-coordinate selection: trimmed_mean, coord_median, mean_around_median.
//
// The n values of W neighbouring coordinates (256 for float32, 512 for 16-bit floats: 1 KiB of
// each row) are loaded into a tile (row r, lane l) as
// integer total-order keys (simd.h: -Inf < finite < +Inf < NaN); float32 gives 32-bit keys,
// float16/bfloat16 16-bit keys (twice the lanes per register, and no float32 copy of the input).
// One sorting network then sorts every column of the tile at once:
// * n <= 32: Batcher's odd-even merge sort unrolled at compile time, one vector register per
//   wire, so each comparator is one vector min and one vector max;
// * 32 < n <= 64, trimmed mean and median: two register-sorted runs and their co-ranks
//   (select_runs.h);
// * float32 median from n = 512 and trimmed mean from n = 1024: no network, a quickselect per
//   column (select_wide.h);
// * otherwise (and mean around the median for any n > 32): the same network built at run time for
//   the next power of two (comparators touching the +Inf padding left out), applied row pair by
//   row pair over the tile, and pruned backwards to what the op reads: trimmed mean only needs the
//   multiset of ranks f .. n-f-1, so a comparator between two wires that only feed that sum is
//   dropped too.
// Results are summed in float64, rank by rank, per lane (16-bit inputs: a few ranks in float32
// first, see trimmed_tile_regs): the same arithmetic in every lane, ISA and tile, so any column
// blocking gives bit-identical results. Trimmed mean with n <= 32 skips the tile altogether
// (trimmed_tile_regs): rows -> registers -> network -> sums, one register-wide group at a time;
// mean around the median with n <= 32 fills the tile from the sorted registers (around_tile_regs).
//
// Payload rows (quant_rows.h: int8 codes or packed int4 nibbles with one float32 scale per block,
// or float16/bfloat16 values) are decoded tile by tile into an L1-resident float32 tile, exactly
// as decoding the payload gives them, and that tile goes through the float32 path: the same
// results, bit for bit, as decoding every row first, without the n dense rows.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "quant_rows.h"
#include "select_job.h"
#include "select_regs.h"
#include "select_runs.h"
#include "select_wide.h"
#include "simd.h"
#include "threads.h"

namespace tapestry {
namespace {

using namespace select_kernels;

template <class T, int OP, bool AVX512>
TAPESTRY_INLINE void select_tile(const SelectJob& J, int64_t j0, void* scratch, double* acc, double* med,
                                 int32_t* start) {
    using K = typename T::Key;
    if constexpr (OP != kAroundMedian) {
        if (J.wide) {
            select_tile_wide<T, OP, AVX512>(J, j0, scratch, start);
            return;
        }
    }
    if constexpr (OP != kMedian) {
        if (J.reg_trim) {
            J.reg_trim(J, j0);
            return;
        }
    }
    K* t = static_cast<K*>(scratch);
    constexpr int W = kTileW<K>;
    const int m = J.m;
    const int w = static_cast<int>(std::min<int64_t>(W, J.d - j0));
    load_key_tile<T>(J, j0, W, w, t);
    if constexpr (OP != kAroundMedian) {
        if (J.reg_sort_b) return select_tile_runs<T, OP>(J, j0, t, w, start);  // two sorted runs
    }
    if (J.reg_sort) {
        J.reg_sort(t);
    } else {
        for (int c = 0; c < J.nc; ++c) {
            K* __restrict x = t + static_cast<size_t>(J.ca[c]) * W;
            K* __restrict y = t + static_cast<size_t>(J.cb[c]) * W;
            for (int l = 0; l < W; ++l) {
                K u = x[l], v = y[l];
                x[l] = u < v ? u : v;
                y[l] = u < v ? v : u;
            }
        }
    }
    auto row = [&](int r) { return t + static_cast<size_t>(r) * W; };
    float* out = J.out + j0;
    if (OP == kTrimmed) {
        const int f = J.param;
        // 32 lanes at a time, their float64 sums in registers across the ranks
        for (int l0 = 0; l0 < W; l0 += 32) {
            double a[32];
            for (int l = 0; l < 32; ++l) a[l] = 0.0;
            int r = f;
            if constexpr (sizeof(K) == 2) {
                // 16-bit inputs: two ranks are added in float32 first, which is exact unless
                // their exponents differ by more than 12 (float16) or 15 (bfloat16) binades; then
                // the coordinate's range is at least the larger value, and the one rounding costs
                // at most 2^-23 of the range: far inside the 1e-6 budget, for half the float64
                // conversions.
                for (; r + 1 < m - f; r += 2) {
                    const K* x = row(r) + l0;
                    const K* y = row(r + 1) + l0;
                    for (int l = 0; l < 32; ++l) a[l] += static_cast<double>(part_f<T>(x[l]) + part_f<T>(y[l]));
                }
            }
            for (; r < m - f; ++r) {
                const K* x = row(r) + l0;
                for (int l = 0; l < 32; ++l) a[l] += part_d<T>(x[l]);
            }
            for (int l = 0; l < 32; ++l) acc[l0 + l] = unscale<T>(a[l]);
        }
        const double cnt = static_cast<double>(m - 2 * f);
        for (int l = 0; l < w; ++l) out[l] = static_cast<float>(acc[l] / cnt);
        return;
    }
    if (OP == kAroundMedian) return around_median_sorted<T, W>(t, m, J.param, w, out);
    // median (float64): the middle rank, or the mean of the two middle ranks for even m
    const K* hi = row(m / 2);
    if (m % 2) {
        for (int l = 0; l < W; ++l) med[l] = T::value(hi[l]);
    } else {
        const K* lo = row(m / 2 - 1);
        for (int l = 0; l < W; ++l) med[l] = (T::value(lo[l]) + T::value(hi[l])) * 0.5;
    }
    for (int l = 0; l < w; ++l) out[l] = static_cast<float>(med[l]);
}

template <int OP, bool AVX512>
TAPESTRY_INLINE void select_tile_any(const SelectJob& J, int64_t j0, void* t, double* acc, double* med, int32_t* s) {
    if (J.dtype == kFloat32)
        select_tile<F32, OP, AVX512>(J, j0, t, acc, med, s);
    else if (J.dtype == kFloat16)
        select_tile<F16, OP, AVX512>(J, j0, t, acc, med, s);
    else
        select_tile<BF16, OP, AVX512>(J, j0, t, acc, med, s);
}

using TileFn = void (*)(const SelectJob&, int64_t, void*, double*, double*, int32_t*);

#define TAPESTRY_SELECT_TILE_FN(NAME, ATTR, AVX512)                                                  \
    ATTR void NAME(const SelectJob& J, int64_t j0, void* t, double* acc, double* med, int32_t* s) { \
        if (J.op == kTrimmed)                                                                        \
            select_tile_any<kTrimmed, AVX512>(J, j0, t, acc, med, s);                                \
        else if (J.op == kMedian)                                                                    \
            select_tile_any<kMedian, AVX512>(J, j0, t, acc, med, s);                                 \
        else                                                                                         \
            select_tile_any<kAroundMedian, AVX512>(J, j0, t, acc, med, s);                           \
    }

TAPESTRY_SELECT_TILE_FN(select_tiles_avx512, TAPESTRY_AVX512, true)
TAPESTRY_SELECT_TILE_FN(select_tiles_avx2, TAPESTRY_AVX2, false)
TAPESTRY_SELECT_TILE_FN(select_tiles_portable, , false)

// ---- payload rows: decode a tile of the m rows read into float32 (row r at t + r * kTileW)
template <int CODEC>
TAPESTRY_INLINE void decode_tile(const QuantRows& q, const int64_t* rows, int m, int64_t j0, int w, float* t) {
    constexpr int W = kTileW<int32_t>;
    for (int r = 0; r < m; ++r) {
        const int64_t i = rows ? rows[r] : r;
        prefetch_row(q, i, j0 + kPrefetchTiles * W, W);
        decode_row<CODEC>(q, i, j0, w, t + static_cast<size_t>(r) * W);
    }
}

using DecodeFn = void (*)(const QuantRows&, const int64_t*, int, int64_t, int, float*);

// (a switch, not a generic lambda: a lambda would not inherit the wrapper's target ISA)
#define TAPESTRY_DECODE_TILE_FN(NAME, ATTR)                                                        \
    ATTR void NAME(const QuantRows& q, const int64_t* rows, int m, int64_t j0, int w, float* t) {  \
        switch (q.codec) {                                                                         \
            case kRowsInt8: return decode_tile<kRowsInt8>(q, rows, m, j0, w, t);                   \
            case kRowsInt4: return decode_tile<kRowsInt4>(q, rows, m, j0, w, t);                   \
            case kRowsFloat16: return decode_tile<kRowsFloat16>(q, rows, m, j0, w, t);             \
            default: return decode_tile<kRowsBFloat16>(q, rows, m, j0, w, t);                      \
        }                                                                                          \
    }

TAPESTRY_DECODE_TILE_FN(decode_tile_avx512, TAPESTRY_AVX512)
TAPESTRY_DECODE_TILE_FN(decode_tile_avx2, TAPESTRY_AVX2)
TAPESTRY_DECODE_TILE_FN(decode_tile_portable, )

// X (row stride `stride` elements of `dtype`), or quantised rows q (then X, stride and dtype are unused).
void run_select(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const QuantRows* q,
                const int64_t* rows, int64_t m, int op, int param, const std::vector<char>& wires, float* out) {
    if (d <= 0 || m <= 0) return;
    if (q) dtype = kFloat32;  // what the decoded tile holds
    const size_t es = dtype == kFloat32 ? 4 : 2;
    std::vector<int64_t> off(m);
    for (int64_t i = 0; i < m; ++i)  // a decoded tile holds row r (rows[r], when given) at r * kTileW
        off[i] = q ? i * kTileW<int32_t> * 4 : (rows ? rows[i] : i) * stride * static_cast<int64_t>(es);
    (void)n;
    // many float32 rows: trimmed mean and median by partitioning (select_wide.h), in narrower
    // tiles, from where it beat the network on this project's machine (2-core Zen 4, d n = 128 Mi:
    // median 2.9x a torch mean against 3.3x at n = 512, trimmed mean 4.0x against 5.3x at n = 1024;
    // 16-bit keys pack twice the lanes per network comparator, and the network stays ahead there)
    const bool wide = dtype == kFloat32 && (op == kMedian ? m >= 512 : op == kTrimmed && m >= 1024);
    std::vector<int32_t> ca, cb;
    // up to 2 kRegMax rows: trimmed mean and median from two register-sorted runs (select_runs.h)
    const bool runs = !wide && op != kAroundMedian && m > kRegMax && m <= 2 * kRegMax;
    if (!wide && !runs) prune(oddeven_merge_sort(static_cast<int>(m)), wires, ca, cb);
    const Isa isa = active();
    auto sorter = [&](int rows) {
        const auto seq = std::make_index_sequence<kRegMax>{};
        return dtype == kFloat32 ? reg_sorter<int32_t>(isa, rows, seq) : reg_sorter<int16_t>(isa, rows, seq);
    };
    const SortFn reg = m <= kRegMax ? sorter(static_cast<int>(m)) : runs ? sorter(kRegMax) : nullptr;
    const SortFn reg_b = runs ? sorter(static_cast<int>(m) - kRegMax) : nullptr;
    TrimFn trim = nullptr;
    if (m <= kRegMax && op == kTrimmed) {
        const auto seq = std::make_index_sequence<kRegMax>{};
        trim = dtype == kFloat32   ? reg_trimmer<F32, false>(isa, static_cast<int>(m), seq)
               : dtype == kFloat16 ? reg_trimmer<F16, false>(isa, static_cast<int>(m), seq)
                                   : reg_trimmer<BF16, false>(isa, static_cast<int>(m), seq);
    } else if (m <= kRegMax && op == kAroundMedian) {
        const auto seq = std::make_index_sequence<kRegMax>{};
        trim = dtype == kFloat32   ? reg_trimmer<F32, true>(isa, static_cast<int>(m), seq)
               : dtype == kFloat16 ? reg_trimmer<F16, true>(isa, static_cast<int>(m), seq)
                                   : reg_trimmer<BF16, true>(isa, static_cast<int>(m), seq);
    }
    const int full_w = dtype == kFloat32 ? kTileW<int32_t> : kTileW<int16_t>;
    const int64_t W = wide ? wide_tile_cols(static_cast<int>(m), full_w) : full_w;
    SelectJob J{static_cast<const char*>(X), off.data(), static_cast<int>(m), d, dtype, op, param,
                ca.data(), cb.data(), static_cast<int>(ca.size()), out, reg, reg_b, trim, half_keys(isa), q == nullptr, wide,
                static_cast<int>(W)};
    const TileFn fn = isa == kAvx512 ? select_tiles_avx512 : isa == kAvx2 ? select_tiles_avx2 : select_tiles_portable;
    const int64_t ntiles = (d + W - 1) / W;
    const DecodeFn decode = isa == kAvx512 ? decode_tile_avx512 : isa == kAvx2 ? decode_tile_avx2 : decode_tile_portable;
    // bytes read: 128 KiB per thread (sorting networks cost more per byte than a mean)
    const int T = ntiles > 1 ? threads_for(m * d * static_cast<int64_t>(es), 128 << 10) : 1;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        // (two runs of float16: the values of the key tile follow it, select_runs.h)
        Scratch<char> t(static_cast<size_t>(m) * W * (runs && dtype == kFloat16 ? es + 4 : es));
        Scratch<float> qt(q ? static_cast<size_t>(m) * kTileW<int32_t> : 0);
        Scratch<double> acc(kMaxW), med(kMaxW);
        Scratch<int32_t> s(wide ? 18 * static_cast<size_t>(m) : 2 * kMaxW);  // wide: select_tile_wide's columns
#pragma omp for schedule(dynamic, 16)  // each tile writes only its own outputs: any order is exact
        for (int64_t i = 0; i < ntiles; ++i) {
            if (!q) {
                fn(J, i * W, t.p, acc.p, med.p, s.p);
                continue;
            }
            // the decoded tile is a float32 matrix of m rows and w columns at qt (written as float,
            // read as key bits by fn: both are opaque calls through pointers, nothing is reordered)
            const int w = static_cast<int>(std::min<int64_t>(W, d - i * W));
            decode(*q, rows, static_cast<int>(m), i * W, w, qt.p);
            SelectJob Jt = J;
            Jt.base = reinterpret_cast<const char*>(qt.p);
            Jt.d = w;
            Jt.out = out + i * W;
            fn(Jt, 0, t.p, acc.p, med.p, s.p);
        }
    }
}

}  // namespace

void trimmed_mean(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, int64_t f, float* out) {
    std::vector<char> wires(n, 0);
    for (int64_t r = f; r < n - f; ++r) wires[r] = 1;
    run_select(X, n, d, stride, dtype, nullptr, nullptr, n, kTrimmed, static_cast<int>(f), wires, out);
}

void coord_median(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, float* out) {
    std::vector<char> wires(n, 0);
    wires[n / 2] = 1;
    if (n % 2 == 0) wires[n / 2 - 1] = 1;
    run_select(X, n, d, stride, dtype, nullptr, nullptr, n, kMedian, 0, wires, out);
}

void mean_around_median(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const int64_t* rows,
                        int64_t m, int64_t k, float* out) {
    std::vector<char> wires(m, 2);  // the window can sit anywhere: every rank, in order
    run_select(X, n, d, stride, dtype, nullptr, rows, m, kAroundMedian, static_cast<int>(k), wires, out);
}

// The same three ops on n payload rows of d values (codes[i], scales[i]; codec: RowCodec).
void trimmed_mean_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                            int64_t d, int64_t f, float* out) {
    std::vector<char> wires(n, 0);
    for (int64_t r = f; r < n - f; ++r) wires[r] = 1;
    const QuantRows q{codes, scales, codec, block};
    run_select(nullptr, n, d, 0, kFloat32, &q, nullptr, n, kTrimmed, static_cast<int>(f), wires, out);
}

void coord_median_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                            int64_t d, float* out) {
    std::vector<char> wires(n, 0);
    wires[n / 2] = 1;
    if (n % 2 == 0) wires[n / 2 - 1] = 1;
    const QuantRows q{codes, scales, codec, block};
    run_select(nullptr, n, d, 0, kFloat32, &q, nullptr, n, kMedian, 0, wires, out);
}

void mean_around_median_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block,
                                  int64_t n, int64_t d, const int64_t* rows, int64_t m, int64_t k, float* out) {
    std::vector<char> wires(m, 2);
    const QuantRows q{codes, scales, codec, block};
    run_select(nullptr, n, d, 0, kFloat32, &q, rows, m, kAroundMedian, static_cast<int>(k), wires, out);
}

}  // namespace tapestry
