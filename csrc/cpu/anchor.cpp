// anchor_dots: per row i of X, against one vector z: sum_j (x_ij - z_j)^2, sum_j x_ij z_j and
// sum_j x_ij^2, in float64 (MoNNA's distances to the trusted update, FLTrust's cosines).
//
// One pass over X. Every float32/16-bit value and z_j are exact in float64, so the difference and
// the products are exact and only the sums round: sixteen lane sums per quantity over each block of
// B coordinates, the lanes added in a fixed order, the blocks' sums added in block order after the
// parallel loop. The arithmetic therefore depends on neither the ISA nor the thread count.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"
#include "threads.h"

namespace tapestry {
namespace {

using namespace simd;

constexpr int64_t B = 8192;  // coordinates per block
constexpr int L = 8;         // doubles per vector (one AVX-512 register)
typedef double D8 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));

struct AnchorJob {
    const char* X;
    int64_t n, d, stride;  // stride in elements
    int dtype;
    const float* z;
    double* part;  // (nblocks, n, 3)
};

// 2 L lane sums per quantity (two independent chains of vector adds), over float32 values at v.
TAPESTRY_INLINE void anchor_row(const float* v, const float* z, int64_t b, double* s) {
    D8 dd[2] = {}, xz[2] = {}, xx[2] = {};
    int64_t j = 0;
    for (; j + 2 * L <= b; j += 2 * L)
        for (int h = 0; h < 2; ++h) {
            F8 uf, wf;
            std::memcpy(&uf, v + j + h * L, sizeof(F8));
            std::memcpy(&wf, z + j + h * L, sizeof(F8));
            const D8 u = __builtin_convertvector(uf, D8), w = __builtin_convertvector(wf, D8), e = u - w;
            dd[h] += e * e;
            xz[h] += u * w;
            xx[h] += u * u;
        }
    for (int l = 0; j + l < b; ++l) {  // the tail, in lane l
        const double u = v[j + l], w = z[j + l], e = u - w;
        dd[l / L][l % L] += e * e;
        xz[l / L][l % L] += u * w;
        xx[l / L][l % L] += u * u;
    }
    s[0] = s[1] = s[2] = 0.0;
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < L; ++l) {
            s[0] += dd[h][l];
            s[1] += xz[h][l];
            s[2] += xx[h][l];
        }
}

template <class T>
TAPESTRY_INLINE void anchor_block(const AnchorJob& J, int64_t blk, float* v) {
    using R = typename T::Raw;
    const int64_t j0 = blk * B, b = std::min(B, J.d - j0);
    for (int64_t i = 0; i < J.n; ++i) {
        const R* x = reinterpret_cast<const R*>(J.X) + i * J.stride + j0;
        const float* row = reinterpret_cast<const float*>(x);
        if constexpr (!std::is_same<T, F32>::value) {  // 16-bit rows: converted first (no branches below)
            for (int64_t j = 0; j < b; ++j) v[j] = T::to_float(x[j]);
            row = v;
        }
        anchor_row(row, J.z + j0, b, J.part + (blk * J.n + i) * 3);
    }
}

using AnchorFn = void (*)(const AnchorJob&, int64_t, float*);

#define TAPESTRY_ANCHOR_FN(NAME, ATTR)                          \
    ATTR void NAME(const AnchorJob& J, int64_t blk, float* v) { \
        if (J.dtype == kFloat32)                                \
            anchor_block<F32>(J, blk, v);                       \
        else if (J.dtype == kFloat16)                           \
            anchor_block<F16>(J, blk, v);                       \
        else                                                    \
            anchor_block<BF16>(J, blk, v);                      \
    }

TAPESTRY_ANCHOR_FN(anchor_avx512, TAPESTRY_AVX512)
TAPESTRY_ANCHOR_FN(anchor_avx2, TAPESTRY_AVX2)
TAPESTRY_ANCHOR_FN(anchor_portable, )

}  // namespace

void anchor_dots(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const float* z, double* out) {
    std::fill(out, out + n * 3, 0.0);
    if (d <= 0 || n <= 0) return;
    const int64_t nblocks = (d + B - 1) / B;
    std::vector<double> part(static_cast<size_t>(nblocks * n * 3));
    const AnchorJob J{static_cast<const char*>(X), n, d, stride, dtype, z, part.data()};
    const Isa isa = active();
    const AnchorFn fn = isa == kAvx512 ? anchor_avx512 : isa == kAvx2 ? anchor_avx2 : anchor_portable;
    // bytes read: 512 KiB per thread, as weighted_mean
    const int T = nblocks > 1 ? threads_for(n * d * (dtype == kFloat32 ? 4 : 2), 512 << 10) : 1;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        Scratch<float> v(B);  // a row's block as float32
#pragma omp for schedule(dynamic, 2)
        for (int64_t blk = 0; blk < nblocks; ++blk) fn(J, blk, v.p);
    }
    for (int64_t blk = 0; blk < nblocks; ++blk)  // block order: the same sums for any thread count
        for (int64_t k = 0; k < n * 3; ++k) out[k] += part[blk * n * 3 + k];
}

}  // namespace tapestry
