// Sorting networks for the per-coordinate selection kernels (select.cpp): Batcher's odd-even
// merge sort, generated once (batcher_comparators) and used both at run time (a comparator list,
// pruned to what an op reads) and at compile time (unrolled over vector registers).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "simd.h"

namespace tapestry {
namespace networks {

// Batcher's odd-even merge sort on N = 2^p wires, in its iterative form: emit(a, b) for each
// comparator in order. Comparators touching wires >= n would compare against +Inf padding and are
// no-ops, so they are left out. The one generator: used at run time (oddeven_merge_sort) and at
// compile time (the unrolled register networks below).
template <class Emit>
constexpr void batcher_comparators(int n, Emit&& emit) {
    int N = 1;
    while (N < n) N <<= 1;
    for (int p = 1; p < N; p <<= 1)
        for (int k = p; k >= 1; k >>= 1)
            for (int j = k % p; j + k < N; j += 2 * k)
                for (int i = 0; i < (k < N - j - k ? k : N - j - k); ++i)
                    if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n) emit(i + j, i + j + k);
}

inline std::vector<std::pair<int, int>> oddeven_merge_sort(int n) {
    std::vector<std::pair<int, int>> net;
    batcher_comparators(n, [&](int a, int b) { net.emplace_back(a, b); });
    return net;
}

// Keep only comparators that can change what the op reads. Wire states, walking backwards:
// 0 = never read, 1 = read only as a member of a final symmetric sum, 2 = compared later.
inline void prune(const std::vector<std::pair<int, int>>& net, std::vector<char> state, std::vector<int32_t>& ca,
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

// ---- the network unrolled at compile time (select.cpp's register-resident path)
constexpr int batcher_count(int n) {
    int c = 0;
    batcher_comparators(n, [&](int, int) { ++c; });
    return c;
}

template <int n>
struct Batcher {
    static constexpr int count = batcher_count(n);
    struct Pairs {
        int a[count > 0 ? count : 1], b[count > 0 ? count : 1];
    };
    static constexpr Pairs make() {
        Pairs P{};
        int c = 0;
        batcher_comparators(n, [&](int a, int b) {
            P.a[c] = a;
            P.b[c] = b;
            ++c;
        });
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

}  // namespace networks
}  // namespace tapestry
