// The register-resident path of the selection kernels for n <= kRegMax rows: the whole sorting
// network unrolled over vector registers (one register per wire), for sorting a tile and for the
// trimmed mean straight from the rows (select.cpp picks these functions per n and ISA).
#pragma once
#include <cstdint>
#include <cstring>
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
        if (g + lanes <= w && J.prefetch) {
            load_keys<true>(v, src, g, nan_above<T>(), std::make_index_sequence<n>{});
        } else if (g + lanes <= w) {
            load_keys<false>(v, src, g, nan_above<T>(), std::make_index_sequence<n>{});
        } else {  // the last group: lanes past d hold raw 0 (key 0) and are never stored
            alignas(64) R tmp[n * lanes] = {};
            const R* tsrc[n];
            for (int r = 0; r < n; ++r) {
                std::memcpy(tmp + r * lanes, src[r] + g, static_cast<size_t>(w - g) * sizeof(R));
                tsrc[r] = tmp + r * lanes;
            }
            load_keys<false>(v, tsrc, 0, nan_above<T>(), std::make_index_sequence<n>{});
        }
        run_network<V, n>(v, std::make_index_sequence<Batcher<n>::count>{});
        store_wires<V>(v, buf, std::make_index_sequence<n>{});
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
                const K* x0 = buf + r * lanes;
                const K* x1 = buf + (r + 1) * lanes;
                const K* x2 = buf + (r + 2) * lanes;
                const K* x3 = buf + (r + 3) * lanes;
                for (int l = 0; l < lanes; ++l)
                    a[l] += static_cast<double>((part_f<T>(x0[l]) + part_f<T>(x1[l])) +
                                                (part_f<T>(x2[l]) + part_f<T>(x3[l])));
            }
            for (; r + 1 < n - f; r += 2) {
                const K* x = buf + r * lanes;
                const K* y = buf + (r + 1) * lanes;
                for (int l = 0; l < lanes; ++l) a[l] += static_cast<double>(part_f<T>(x[l]) + part_f<T>(y[l]));
            }
        }
        for (; r < n - f; ++r) {
            const K* x = buf + r * lanes;
            for (int l = 0; l < lanes; ++l) a[l] += part_d<T>(x[l]);
        }
        const double cnt = static_cast<double>(n - 2 * f);
        const int wl = std::min(lanes, w - g);
        for (int l = 0; l < wl; ++l) out[g + l] = static_cast<float>(unscale<T>(a[l]) / cnt);
    }
}

#pragma GCC diagnostic pop

using TrimFn = void (*)(const SelectJob&, int64_t);

template <class T, int n>
TAPESTRY_AVX512 void trim_regs_avx512(const SelectJob& J, int64_t j0) {
    trimmed_tile_regs<T, n, 64>(J, j0);
}
template <class T, int n>
TAPESTRY_AVX2 void trim_regs_avx2(const SelectJob& J, int64_t j0) {
    trimmed_tile_regs<T, n, 32>(J, j0);
}
template <class T, int n>
void trim_regs_portable(const SelectJob& J, int64_t j0) {
    trimmed_tile_regs<T, n, 16>(J, j0);
}

template <class T, size_t... I>
TrimFn reg_trimmer(Isa isa, int n, std::index_sequence<I...>) {
    static constexpr TrimFn avx512[] = {trim_regs_avx512<T, int(I) + 1>...};
    static constexpr TrimFn avx2[] = {trim_regs_avx2<T, int(I) + 1>...};
    static constexpr TrimFn portable[] = {trim_regs_portable<T, int(I) + 1>...};
    return (isa == kAvx512 ? avx512 : isa == kAvx2 ? avx2 : portable)[n - 1];
}

}  // namespace select_kernels
}  // namespace tapestry
