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
// Results are summed in float64, rank by rank, per lane: the same arithmetic in every lane, ISA
// and tile, so any column blocking gives bit-identical results.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "simd.h"

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
constexpr int kRegMax = 32;

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

template <class T, int OP>
TAPESTRY_INLINE void select_tile(const SelectJob& J, int64_t j0, void* scratch, double* acc, double* med,
                                 int32_t* start) {
    using K = typename T::Key;
    using R = typename T::Raw;
    K* t = static_cast<K*>(scratch);
    constexpr int W = kTileW<K>;
    const int m = J.m;
    const int w = static_cast<int>(std::min<int64_t>(W, J.d - j0));
    for (int r = 0; r < m; ++r) {
        const R* src = reinterpret_cast<const R*>(J.base + J.row_off[r]) + j0;
        K* dst = t + static_cast<size_t>(r) * W;
        // n rows are n separate streams, more than the hardware prefetcher follows: ask for this
        // row's lines kPrefetchTiles tiles ahead (a prefetch past the end never faults).
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
                    for (int l = 0; l < 32; ++l) a[l] += static_cast<double>(T::value_f(x[l]) + T::value_f(y[l]));
                }
            }
            for (; r < m - f; ++r) {
                const K* x = row(r) + l0;
                for (int l = 0; l < 32; ++l) a[l] += T::value(x[l]);
            }
            for (int l = 0; l < 32; ++l) acc[l0 + l] = a[l];
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

void run_select(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const int64_t* rows, int64_t m,
                int op, int param, const std::vector<char>& wires, float* out) {
    if (d <= 0 || m <= 0) return;
    const size_t es = dtype == kFloat32 ? 4 : 2;
    std::vector<int64_t> off(m);
    for (int64_t i = 0; i < m; ++i) off[i] = (rows ? rows[i] : i) * stride * static_cast<int64_t>(es);
    (void)n;
    std::vector<int32_t> ca, cb;
    prune(oddeven_merge_sort(static_cast<int>(m)), wires, ca, cb);
    const Isa isa = active();
    SortFn reg = nullptr;
    if (m <= kRegMax)
        reg = dtype == kFloat32 ? reg_sorter<int32_t>(isa, static_cast<int>(m), std::make_index_sequence<kRegMax>{})
                                : reg_sorter<int16_t>(isa, static_cast<int>(m), std::make_index_sequence<kRegMax>{});
    SelectJob J{static_cast<const char*>(X), off.data(), static_cast<int>(m), d, dtype, op, param,
                ca.data(), cb.data(), static_cast<int>(ca.size()), out, reg};
    const TileFn fn = isa == kAvx512 ? select_tiles_avx512 : isa == kAvx2 ? select_tiles_avx2 : select_tiles_portable;
    const int64_t W = dtype == kFloat32 ? kTileW<int32_t> : kTileW<int16_t>;
    const int64_t ntiles = (d + W - 1) / W;
#pragma omp parallel if (ntiles > 1)
    {
        Scratch<char> t(static_cast<size_t>(m) * W * es);
        Scratch<double> acc(kMaxW), med(kMaxW);
        Scratch<int32_t> s(kMaxW);
#pragma omp for schedule(dynamic, 16)  // each tile writes only its own outputs: any order is exact
        for (int64_t i = 0; i < ntiles; ++i) fn(J, i * W, t.p, acc.p, med.p, s.p);
    }
}

}  // namespace

void trimmed_mean(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, int64_t f, float* out) {
    std::vector<char> wires(n, 0);
    for (int64_t r = f; r < n - f; ++r) wires[r] = 1;
    run_select(X, n, d, stride, dtype, nullptr, n, kTrimmed, static_cast<int>(f), wires, out);
}

void coord_median(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, float* out) {
    std::vector<char> wires(n, 0);
    wires[n / 2] = 1;
    if (n % 2 == 0) wires[n / 2 - 1] = 1;
    run_select(X, n, d, stride, dtype, nullptr, n, kMedian, 0, wires, out);
}

void mean_around_median(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const int64_t* rows,
                        int64_t m, int64_t k, float* out) {
    std::vector<char> wires(m, 2);  // the window can sit anywhere: every rank, in order
    run_select(X, n, d, stride, dtype, rows, m, kAroundMedian, static_cast<int>(k), wires, out);
}

}  // namespace tapestry
