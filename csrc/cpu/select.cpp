// Per-coordinate selection: trimmed_mean, coord_median, mean_around_median.
//
// The n values of W neighbouring coordinates (256 for float32, 512 for 16-bit floats: 1 KiB of
// each row) are loaded into a tile (row r, lane l) as
// integer total-order keys (simd.h: -Inf < finite < +Inf < NaN); float32 gives 32-bit keys,
// float16/bfloat16 16-bit keys (twice the lanes per register, and no float32 copy of the input).
// One sorting network then sorts every column of the tile at once:
// * n <= 32: Batcher's odd-even merge sort unrolled at compile time, one vector register per
//   wire, so each comparator is one vector min and one vector max;
// * n > 32: the same network built at run time for the next power of two (comparators touching the
//   +Inf padding left out), applied row pair by row pair over the tile, and pruned backwards to what
//   the op reads: trimmed mean only needs the multiset of ranks f .. n-f-1, so a comparator between
//   two wires that only feed that sum is dropped too.
// Results are summed in float64, rank by rank, per lane (16-bit inputs: a few ranks in float32
// first, see trimmed_tile_regs): the same arithmetic in every lane, ISA and tile, so any column
// blocking gives bit-identical results. Trimmed mean with n <= 32 skips the tile altogether
// (trimmed_tile_regs): rows -> registers -> network -> sums, one register-wide group at a time.
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

#include "quant_api.h"
#include "quant_rows.h"
#include "simd.h"
#include "threads.h"

namespace tapestry {
namespace {

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
    void (*reg_trim)(const SelectJob&, int64_t);  // trimmed mean, small m: a whole tile in registers, or null
    bool prefetch;  // ask for the rows' next tiles (not when the rows are a decoded tile in L1)
};

// Batcher's odd-even merge sort on N = 2^p wires, in its iterative form; comparators touching
// wires >= n would compare against +Inf padding and are no-ops, so they are left out.
std::vector<std::pair<int, int>> oddeven_merge_sort(int n) {
    std::vector<std::pair<int, int>> net;
    int N = 1;
    while (N < n) N <<= 1;
    for (int p = 1; p < N; p <<= 1)
        for (int k = p; k >= 1; k >>= 1)
            for (int j = k % p; j + k < N; j += 2 * k)
                for (int i = 0; i < std::min(k, N - j - k); ++i)
                    if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n) net.emplace_back(i + j, i + j + k);
    return net;
}

// Keep only comparators that can change what the op reads. Wire states, walking backwards:
// 0 = never read, 1 = read only as a member of a final symmetric sum, 2 = compared later.
void prune(const std::vector<std::pair<int, int>>& net, std::vector<char> state, std::vector<int32_t>& ca,
           std::vector<int32_t>& cb) {
    std::vector<std::pair<int, int>> kept;
    for (auto it = net.rbegin(); it != net.rend(); ++it) {
        char& sa = state[it->first];
        char& sb = state[it->second];
        if ((sa == 0 && sb == 0) || (sa == 1 && sb == 1)) continue;
        sa = sb = 2;
        kept.push_back(*it);
    }
    ca.clear();
    cb.clear();
    for (auto it = kept.rbegin(); it != kept.rend(); ++it) {
        ca.push_back(it->first);
        cb.push_back(it->second);
    }
}

// ---- register-resident networks for n <= kRegMax: the whole network unrolled at compile time,
// one vector register per wire (16 float32 keys or 32 float16/bfloat16 keys on AVX-512), so a
// comparator is two instructions instead of loads and stores through the tile.
#ifndef TAPESTRY_REG_MAX  // smaller only in the AddressSanitizer harness, to keep its build short
#define TAPESTRY_REG_MAX 32
#endif
constexpr int kRegMax = TAPESTRY_REG_MAX;

constexpr int batcher_count(int n) {
    int N = 1, c = 0;
    while (N < n) N <<= 1;
    for (int p = 1; p < N; p <<= 1)
        for (int k = p; k >= 1; k >>= 1)
            for (int j = k % p; j + k < N; j += 2 * k)
                for (int i = 0; i < (k < N - j - k ? k : N - j - k); ++i)
                    if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n) ++c;
    return c;
}

template <int n>
struct Batcher {
    static constexpr int count = batcher_count(n);
    struct Pairs {
        int a[count > 0 ? count : 1], b[count > 0 ? count : 1];
    };
    static constexpr Pairs make() {  // the same loops as oddeven_merge_sort, at compile time
        Pairs P{};
        int N = 1, c = 0;
        while (N < n) N <<= 1;
        for (int p = 1; p < N; p <<= 1)
            for (int k = p; k >= 1; k >>= 1)
                for (int j = k % p; j + k < N; j += 2 * k)
                    for (int i = 0; i < (k < N - j - k ? k : N - j - k); ++i)
                        if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n) {
                            P.a[c] = i + j;
                            P.b[c] = i + j + k;
                            ++c;
                        }
        return P;
    }
    static constexpr Pairs pairs = make();
};

template <class V, int n, size_t... C>
TAPESTRY_INLINE void run_network(V* v, std::index_sequence<C...>) {
    ((void)[&] {
        V x = v[Batcher<n>::pairs.a[C]], y = v[Batcher<n>::pairs.b[C]];
        v[Batcher<n>::pairs.a[C]] = x < y ? x : y;
        v[Batcher<n>::pairs.b[C]] = x < y ? y : x;
    }(), ...);
}

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
template <class T>
constexpr typename T::Key nan_above() {
    if constexpr (std::is_same<T, F32>::value)
        return 0x7f800000;
    else if constexpr (std::is_same<T, F16>::value)
        return 0x7c00;
    else
        return 0x7f80;
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

template <class T, int OP>
TAPESTRY_INLINE void select_tile(const SelectJob& J, int64_t j0, void* scratch, double* acc, double* med,
                                 int32_t* start) {
    using K = typename T::Key;
    using R = typename T::Raw;
    if constexpr (OP == kTrimmed) {
        if (J.reg_trim) {
            J.reg_trim(J, j0);
            return;
        }
    }
    K* t = static_cast<K*>(scratch);
    constexpr int W = kTileW<K>;
    const int m = J.m;
    const int w = static_cast<int>(std::min<int64_t>(W, J.d - j0));
    for (int r = 0; r < m; ++r) {
        const R* src = reinterpret_cast<const R*>(J.base + J.row_off[r]) + j0;
        K* dst = t + static_cast<size_t>(r) * W;
        // n rows are n separate streams, more than the hardware prefetcher follows: ask for this
        // row's lines kPrefetchTiles tiles ahead (a prefetch past the end never faults).
        if (J.prefetch)
            for (int l = 0; l < W; l += 64 / static_cast<int>(sizeof(R)))
                __builtin_prefetch(src + kPrefetchTiles * W + l, 0, 2);
        if (w == W) {
            for (int l = 0; l < W; ++l) dst[l] = T::key(src[l]);
        } else {  // the last tile: lanes past d hold key 0 and are never stored
            for (int l = 0; l < w; ++l) dst[l] = T::key(src[l]);
            for (int l = w; l < W; ++l) dst[l] = 0;
        }
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
    // median (float64): the middle rank, or the mean of the two middle ranks for even m
    {
        const K* hi = row(m / 2);
        if (m % 2) {
            for (int l = 0; l < W; ++l) med[l] = T::value(hi[l]);
        } else {
            const K* lo = row(m / 2 - 1);
            for (int l = 0; l < W; ++l) med[l] = (T::value(lo[l]) + T::value(hi[l])) * 0.5;
        }
    }
    if (OP == kMedian) {
        for (int l = 0; l < w; ++l) out[l] = static_cast<float>(med[l]);
        return;
    }
    // around median: the k values nearest the median (ties to the smaller value) are the window
    // [s, s+k) of the sorted column with s = 1 + the last t at which S[t+k] is strictly nearer
    // than S[t] (0 if none): left of s every window loses to its right neighbour, from s on none
    // does. NaN distances compare false, so NaN is never nearer.
    const int k = J.param;
    for (int l = 0; l < W; ++l) start[l] = 0;
    for (int r = 0; r + k < m; ++r) {
        const K* a = row(r);
        const K* b = row(r + k);
        for (int l = 0; l < W; ++l) {
            double da = std::fabs(T::value(a[l]) - med[l]);
            double db = std::fabs(T::value(b[l]) - med[l]);
            start[l] = da > db ? r + 1 : start[l];
        }
    }
    for (int l = 0; l < W; ++l) acc[l] = 0.0;
    for (int r = 0; r < m; ++r) {
        const K* x = row(r);
        for (int l = 0; l < W; ++l) {
            double v = T::value(x[l]);
            acc[l] = (r >= start[l] && r < start[l] + k) ? acc[l] + v : acc[l];
        }
    }
    const double cnt = static_cast<double>(k);
    for (int l = 0; l < w; ++l) out[l] = static_cast<float>(acc[l] / cnt);
}

template <int OP>
TAPESTRY_INLINE void select_tile_any(const SelectJob& J, int64_t j0, void* t, double* acc, double* med, int32_t* s) {
    if (J.dtype == kFloat32)
        select_tile<F32, OP>(J, j0, t, acc, med, s);
    else if (J.dtype == kFloat16)
        select_tile<F16, OP>(J, j0, t, acc, med, s);
    else
        select_tile<BF16, OP>(J, j0, t, acc, med, s);
}

using TileFn = void (*)(const SelectJob&, int64_t, void*, double*, double*, int32_t*);

#define TAPESTRY_SELECT_TILE_FN(NAME, ATTR)                                                          \
    ATTR void NAME(const SelectJob& J, int64_t j0, void* t, double* acc, double* med, int32_t* s) { \
        if (J.op == kTrimmed)                                                                        \
            select_tile_any<kTrimmed>(J, j0, t, acc, med, s);                                        \
        else if (J.op == kMedian)                                                                    \
            select_tile_any<kMedian>(J, j0, t, acc, med, s);                                         \
        else                                                                                         \
            select_tile_any<kAroundMedian>(J, j0, t, acc, med, s);                                   \
    }

TAPESTRY_SELECT_TILE_FN(select_tiles_avx512, TAPESTRY_AVX512)
TAPESTRY_SELECT_TILE_FN(select_tiles_avx2, TAPESTRY_AVX2)
TAPESTRY_SELECT_TILE_FN(select_tiles_portable, )

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
    std::vector<int32_t> ca, cb;
    prune(oddeven_merge_sort(static_cast<int>(m)), wires, ca, cb);
    const Isa isa = active();
    SortFn reg = nullptr;
    if (m <= kRegMax)
        reg = dtype == kFloat32 ? reg_sorter<int32_t>(isa, static_cast<int>(m), std::make_index_sequence<kRegMax>{})
                                : reg_sorter<int16_t>(isa, static_cast<int>(m), std::make_index_sequence<kRegMax>{});
    TrimFn trim = nullptr;
    if (m <= kRegMax && op == kTrimmed) {
        const auto seq = std::make_index_sequence<kRegMax>{};
        trim = dtype == kFloat32   ? reg_trimmer<F32>(isa, static_cast<int>(m), seq)
               : dtype == kFloat16 ? reg_trimmer<F16>(isa, static_cast<int>(m), seq)
                                   : reg_trimmer<BF16>(isa, static_cast<int>(m), seq);
    }
    SelectJob J{static_cast<const char*>(X), off.data(), static_cast<int>(m), d, dtype, op, param,
                ca.data(), cb.data(), static_cast<int>(ca.size()), out, reg, trim, q == nullptr};
    const TileFn fn = isa == kAvx512 ? select_tiles_avx512 : isa == kAvx2 ? select_tiles_avx2 : select_tiles_portable;
    const int64_t W = dtype == kFloat32 ? kTileW<int32_t> : kTileW<int16_t>;
    const int64_t ntiles = (d + W - 1) / W;
    const DecodeFn decode = isa == kAvx512 ? decode_tile_avx512 : isa == kAvx2 ? decode_tile_avx2 : decode_tile_portable;
    // bytes read: 128 KiB per thread (sorting networks cost more per byte than a mean)
    const int T = ntiles > 1 ? threads_for(m * d * static_cast<int64_t>(es), 128 << 10) : 1;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        Scratch<char> t(static_cast<size_t>(m) * W * es);
        Scratch<float> qt(q ? static_cast<size_t>(m) * W : 0);
        Scratch<double> acc(kMaxW), med(kMaxW);
        Scratch<int32_t> s(kMaxW);
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
void trimmed_mean_quantized(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                            int64_t d, int64_t f, float* out) {
    std::vector<char> wires(n, 0);
    for (int64_t r = f; r < n - f; ++r) wires[r] = 1;
    const QuantRows q{codes, scales, codec, block};
    run_select(nullptr, n, d, 0, kFloat32, &q, nullptr, n, kTrimmed, static_cast<int>(f), wires, out);
}

void coord_median_quantized(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                            int64_t d, float* out) {
    std::vector<char> wires(n, 0);
    wires[n / 2] = 1;
    if (n % 2 == 0) wires[n / 2 - 1] = 1;
    const QuantRows q{codes, scales, codec, block};
    run_select(nullptr, n, d, 0, kFloat32, &q, nullptr, n, kMedian, 0, wires, out);
}

void mean_around_median_quantized(const void* const* codes, const float* const* scales, int codec, int64_t block,
                                  int64_t n, int64_t d, const int64_t* rows, int64_t m, int64_t k, float* out) {
    std::vector<char> wires(m, 2);
    const QuantRows q{codes, scales, codec, block};
    run_select(nullptr, n, d, 0, kFloat32, &q, rows, m, kAroundMedian, static_cast<int>(k), wires, out);
}

}  // namespace tapestry
