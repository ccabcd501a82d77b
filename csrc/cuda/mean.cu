// Weighted mean: out[j] = sum_{t<m} weights[t] * X[rows[t], j], the rows being the clients with a
// non-zero weight (the others are never read). One pass over the bytes: each thread owns V
// consecutive columns read as one 16-byte vector per row (4 float32 or 8 half/bfloat16), rows
// walked in a fixed order four at a time so that several loads are in flight, accumulation in
// float64 (each product w * x is exact up to one rounding; the sum of <= n such terms is far
// inside SPEC's 1e-6). Deterministic: every column's sum has the same order on every launch.
#include "dtype.cuh"
#include "robust.cuh"

namespace tapestry {
namespace {

constexpr int kThreads = 256;

template <typename T, int V, bool VECTOR>
__global__ void __launch_bounds__(kThreads) weighted_mean_kernel(const T* __restrict__ X, int64_t d, int64_t stride,
                                                                 const int64_t* __restrict__ rows,
                                                                 const double* __restrict__ weights, int64_t m,
                                                                 float* __restrict__ out) {
    const int64_t c0 = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * V;
    if (c0 >= d) return;
    const bool full = VECTOR && c0 + V <= d;
    double acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.0;
    constexpr int U = 4;  // rows in flight per thread
    for (int64_t t0 = 0; t0 < m; t0 += U) {
        alignas(16) T x[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (t0 + u < m) {
                const T* p = X + __ldg(rows + t0 + u) * stride + c0;
                if constexpr (VECTOR) {
                    if (full) {
                        *reinterpret_cast<uint4*>(x[u]) = __ldg(reinterpret_cast<const uint4*>(p));
                        continue;
                    }
                }
                {
#pragma unroll
                    for (int v = 0; v < V; ++v) x[u][v] = c0 + v < d ? p[v] : T(0.0f);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (t0 + u < m) {
                const double w = __ldg(weights + t0 + u);
#pragma unroll
                for (int v = 0; v < V; ++v) acc[v] += w * (double)to_float(x[u][v]);
            }
        }
    }
    if (full) {
#pragma unroll
        for (int v = 0; v < V; ++v) out[c0 + v] = (float)acc[v];
    } else {
#pragma unroll
        for (int v = 0; v < V; ++v)
            if (c0 + v < d) out[c0 + v] = (float)acc[v];
    }
}

template <typename T>
cudaError_t launch(const T* X, int64_t d, int64_t stride, const int64_t* rows, const double* weights, int64_t m,
                   float* out, cudaStream_t stream) {
    constexpr int V = 16 / sizeof(T);
    // 16-byte vectors need every row start 16-byte aligned; otherwise one element per load
    const bool aligned = reinterpret_cast<uintptr_t>(X) % 16 == 0 && (stride * (int64_t)sizeof(T)) % 16 == 0;
    if (aligned) {
        const int64_t blocks = (d + (int64_t)kThreads * V - 1) / ((int64_t)kThreads * V);
        weighted_mean_kernel<T, V, true><<<(unsigned)blocks, kThreads, 0, stream>>>(X, d, stride, rows, weights, m, out);
    } else {
        const int64_t blocks = (d + kThreads - 1) / kThreads;
        weighted_mean_kernel<T, 1, false><<<(unsigned)blocks, kThreads, 0, stream>>>(X, d, stride, rows, weights, m, out);
    }
    return cudaGetLastError();
}

}  // namespace

cudaError_t weighted_mean(const void* X, int dtype, int64_t d, int64_t stride, const int64_t* rows,
                          const double* weights, int64_t m, float* out, cudaStream_t stream) {
    if (d <= 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        return launch<T>(static_cast<const T*>(X), d, stride, rows, weights, m, out, stream);
    });
}

}  // namespace tapestry
