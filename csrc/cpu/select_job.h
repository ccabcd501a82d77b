// What the per-coordinate selection kernels (select.cpp, select_regs.h) share: the tile geometry,
// the job a call hands to its tiles, and the conversions from order keys to values and sums.
#pragma once
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace tapestry {
namespace select_kernels {

using namespace simd;

// coordinates per tile: 1 KiB runs of each row (the reads stay sequential enough per DRAM page)
template <class K>
constexpr int kTileW = 1024 / static_cast<int>(sizeof(K));
constexpr int kMaxW = 512;
constexpr int kPrefetchTiles = 4;

enum SelectOp : int { kTrimmed = 0, kMedian = 1, kAroundMedian = 2 };

struct SelectJob {
    const char* base;        // X.data_ptr()
    const int64_t* row_off;  // byte offset of each of the m rows read
    int m;                   // rows read
    int64_t d;
    int dtype;
    int op;
    int param;  // trimmed: f; around median: k
    const int32_t* ca;  // comparator c puts min(t[ca], t[cb]) in row ca and the max in row cb
    const int32_t* cb;
    int nc;
    float* out;
    void (*reg_sort)(void*);  // an unrolled full sort for small m (then ca/cb are unused), or null
    void (*reg_sort_b)(void*);  // two runs (select_runs.h): sorts rows [kRegMax, m); reg_sort rows [0, kRegMax)
    void (*reg_trim)(const SelectJob&, int64_t);  // trimmed mean / mean around the median, m <= kRegMax, or null
    void (*half_keys)(const int16_t*, int, float*);  // float16 keys -> values (select_regs.h)
    bool prefetch;  // ask for the rows' next tiles (not when the rows are a decoded tile in L1)
    bool wide;      // trimmed mean / median by partitioning (select_wide.h), for many rows
    int tile_w;     // columns per tile
};

template <class T>
constexpr typename T::Key nan_above() {
    if constexpr (std::is_same<T, F32>::value)
        return 0x7f800000;
    else if constexpr (std::is_same<T, F16>::value)
        return 0x7c00;
    else
        return 0x7f80;
}

// The tile of keys of the m rows' columns [j0, j0 + w) (row stride W; lanes w .. W-1 hold key 0).
// The m rows are m separate streams, more than the hardware prefetcher follows: each row's lines
// kPrefetchTiles tiles ahead are asked for here (a prefetch past the end never faults).
template <class T>
TAPESTRY_INLINE void load_key_tile(const SelectJob& J, int64_t j0, int W, int w, typename T::Key* t) {
    using R = typename T::Raw;
    for (int r = 0; r < J.m; ++r) {
        const R* src = reinterpret_cast<const R*>(J.base + J.row_off[r]) + j0;
        typename T::Key* dst = t + static_cast<size_t>(r) * W;
        if (J.prefetch)
            for (int l = 0; l < W; l += 64 / static_cast<int>(sizeof(R)))
                __builtin_prefetch(src + kPrefetchTiles * W + l, 0, 2);
        for (int l = 0; l < w; ++l) dst[l] = T::key(src[l]);
        for (int l = w; l < W; ++l) dst[l] = 0;
    }
}

// The float32 partial sums of 16-bit ranks below (two or four ranks) are taken on values scaled by
// 2^-2 for bfloat16, whose largest finite values would otherwise overflow float32 when added
// (float16 needs no scaling); the float64 total is scaled back. Both scalings are exact: bfloat16
// values are multiples of 2^-133, so their quarters (multiples of 2^-135) and every sum of them
// are float32-representable down to the subnormals, and |sum of four quarters| <= the largest
// bfloat16 < FLT_MAX.
template <class T>
TAPESTRY_INLINE float part_f(typename T::Key k) {
    if constexpr (std::is_same<T, BF16>::value)
        return T::value_f(k) * 0.25f;
    else
        return T::value_f(k);
}
template <class T>
TAPESTRY_INLINE double part_d(typename T::Key k) {
    if constexpr (std::is_same<T, BF16>::value)
        return T::value(k) * 0.25;
    else
        return T::value(k);
}
template <class T>
TAPESTRY_INLINE double unscale(double a) {
    if constexpr (std::is_same<T, BF16>::value)
        return a * 4.0;
    else
        return a;
}

// one register per row, every index a constant (the loads, keys and prefetches fully unrolled, so
// the wires stay in registers); n rows are n separate streams, more than the hardware prefetcher
// follows: each row's line kPrefetchTiles tiles ahead is asked for here (never faults past the end).
// The keys are simd.h's key16 / key32, lane-wise.

}  // namespace select_kernels
}  // namespace tapestry
