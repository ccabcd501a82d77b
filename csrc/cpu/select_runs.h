// Trimmed mean and median for kRegMax < n <= 2 kRegMax rows: two sorted runs and their co-ranks,
// instead of a network for the next power of two that no longer fits in registers.
//
// The tile's rows [0, 32) and [32, n) are sorted per lane by the unrolled register networks
// (select_regs.h), which keep every wire in a register. The key of rank k of the union of the two
// runs A and B then follows per lane from the co-rank: the number i of A's keys among the k+1
// smallest (the first i with A[i] > B[k-i], counted row against row); it is max(A[i-1], B[k-i]).
// The co-ranks of f - 1 and n - f - 1 also say which rows of each run hold the kept ranks of a
// trimmed mean, so only those are summed.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "select_job.h"
#include "select_regs.h"
#include "simd.h"

namespace tapestry {
namespace select_kernels {

// The co-rank of k in every lane of the runs A = rows [0, a) and B = rows [a, a + b) of a tile (row
// stride W, W lanes) into out: how many of the k+1 smallest keys A gives, A's keys first among
// equal keys. That is the first i in [lo, hi) with A[i] > B[k-i] (or hi); since A[i] <= B[k-i]
// holds for a prefix of the i, it is lo plus the number of i for which it holds: whole rows
// compared lane-wise, no search and no gathers.
template <class K>
TAPESTRY_INLINE void corank_lanes(const K* t, int W, int a, int b, int k, int32_t* out) {
    const int lo = std::max(0, k + 1 - b), hi = std::min(k + 1, a);
    for (int l = 0; l < W; ++l) out[l] = lo;
    for (int i = lo; i < hi; ++i) {
        const K* x = t + static_cast<size_t>(i) * W;
        const K* y = t + static_cast<size_t>(a + k - i) * W;
        for (int l = 0; l < W; ++l) out[l] += x[l] <= y[l];
    }
}

// Rank k's key in lane l, from its co-rank i: the larger of A's i-th and B's (k+1-i)-th keys.
template <class K>
TAPESTRY_INLINE K rank_key(const K* t, int W, int a, int k, int i, int l) {
    if (i == 0) return t[(a + k) * W + l];
    if (i == k + 1) return t[(i - 1) * W + l];
    return std::max(t[(i - 1) * W + l], t[(a + k - i) * W + l]);
}

// Trimmed mean per lane from the co-ranks c1 of f - 1 (0 for f = 0) and c2 of m - f - 1: the kept
// ranks are A's rows [c1, c2) and B's rows [f - c1, m - f - c2), summed in float64 in that order
// (sorted runs: the order depends only on the values). Only the rows some lane keeps are read.
// float16: `values` holds the tile's keys already converted (F16C), read in their place.
template <class T>
TAPESTRY_INLINE void trimmed_from_coranks(const typename T::Key* t, const float* values, int W, int a, int m, int f,
                                          const int32_t* c1, const int32_t* c2, int w, float* out) {
    constexpr bool half = std::is_same<T, F16>::value;
    for (int l0 = 0; l0 < W; l0 += 32) {
        double acc[32];
        int32_t a0[32], a1[32], b0[32], b1[32];
        int ra0 = a, ra1 = 0, rb0 = m - a, rb1 = 0;
        for (int l = 0; l < 32; ++l) {
            acc[l] = 0.0;
            a0[l] = c1[l0 + l], a1[l] = c2[l0 + l], b0[l] = f - a0[l], b1[l] = m - f - a1[l];
            ra0 = std::min(ra0, a0[l]), ra1 = std::max(ra1, a1[l]), rb0 = std::min(rb0, b0[l]), rb1 = std::max(rb1, b1[l]);
        }
        auto add_rows = [&](int row0, int lo, int hi, const int32_t* keep0, const int32_t* keep1) {
            for (int r = lo; r < hi; ++r) {
                const size_t off = static_cast<size_t>(row0 + r) * W + l0;
                for (int l = 0; l < 32; ++l) {
                    double v;
                    if constexpr (half)
                        v = values[off + l];
                    else
                        v = T::value(t[off + l]);
                    acc[l] += kept_or_zero(v, (r >= keep0[l]) & (r < keep1[l]));
                }
            }
        };
        add_rows(0, ra0, ra1, a0, a1);
        add_rows(a, rb0, rb1, b0, b1);
        for (int l = 0; l < 32 && l0 + l < w; ++l) out[l0 + l] = static_cast<float>(acc[l] / static_cast<double>(m - 2 * f));
    }
}

// The trimmed mean or median of the tile's w columns (keys loaded, row stride kTileW) through the
// two runs; scratch: 2 kMaxW int32 for the co-ranks.
template <class T, int OP>
TAPESTRY_INLINE void select_tile_runs(const SelectJob& J, int64_t j0, typename T::Key* t, int w, int32_t* scratch) {
    constexpr int W = kTileW<typename T::Key>;
    J.reg_sort(t);
    J.reg_sort_b(t + static_cast<size_t>(kRegMax) * W);
    int32_t* c1 = scratch;
    int32_t* c2 = scratch + kMaxW;
    const int m = J.m, a = kRegMax, b = m - kRegMax, f = J.param;
    float* out = J.out + j0;
    if (OP == kTrimmed) {
        if (f == 0)
            std::fill(c1, c1 + W, 0);
        else
            corank_lanes(t, W, a, b, f - 1, c1);
        corank_lanes(t, W, a, b, m - f - 1, c2);
        float* values = nullptr;  // float16: the tile converted once (F16C) after the key tile
        if constexpr (std::is_same<T, F16>::value) {
            values = reinterpret_cast<float*>(t + static_cast<size_t>(m) * W);
            J.half_keys(t, m * W, values);
        }
        return trimmed_from_coranks<T>(t, values, W, a, m, f, c1, c2, w, out);
    }
    // median: the middle rank, or the mean of the two middle ranks
    corank_lanes(t, W, a, b, m / 2, c2);
    if (m % 2 == 0) corank_lanes(t, W, a, b, m / 2 - 1, c1);
    for (int l = 0; l < w; ++l) {
        const double hi = T::value(rank_key(t, W, a, m / 2, c2[l], l));
        out[l] = static_cast<float>(m % 2 ? hi : (T::value(rank_key(t, W, a, m / 2 - 1, c1[l], l)) + hi) * 0.5);
    }
}

}  // namespace select_kernels
}  // namespace tapestry

