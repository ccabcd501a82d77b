// Per-coordinate selection kernels: trimmed mean, coordinate median, Bulyan's mean around the
// median. Math in select.cuh. Each thread owns V coordinates (strided by the block size, so
// every row is read by a warp as one coalesced segment) and keeps each coordinate's n values as
// NP ordered keys in registers (NP = n rounded up to a power of two, padding keys rank last),
// sorts them with an odd-even merge network and averages a window of ranks in float64.
// n > 64 takes a shared-memory bitonic sort per column instead (slower, same results).
#include <algorithm>

#include "dtype.cuh"
#include "robust.cuh"
#include "select.cuh"

namespace tapestry {
namespace {

constexpr int kThreads = 128;

// Row r of the selection: r itself, or rows[r] when a row list is given.
__device__ __forceinline__ int64_t source_row(const int64_t* rows, int r) { return rows ? rows[r] : r; }

// Load the keys of coordinate c (< d) for the n rows into a[NP]; padding gets kTopKey.
template <typename T, int NP>
__device__ __forceinline__ void load_keys(uint32_t (&a)[NP], const T* X, const int64_t* rows, int n, int64_t stride,
                                          int64_t c) {
#pragma unroll
    for (int r = 0; r < NP; ++r)
        a[r] = r < n ? float_key(to_float(X[source_row(rows, r) * stride + c])) : kTopKey;
}

// trimmed_mean and coord_median: the window of ranks [lo, lo + count) of every column.
template <typename T, int NP, int V>
__device__ __forceinline__ void rank_window(const T* X, int n, int64_t d, int64_t stride, int lo, int count,
                                            float* out) {
    const int64_t base = (int64_t)blockIdx.x * kThreads * V + threadIdx.x;
    uint32_t a[V][NP];
#pragma unroll
    for (int v = 0; v < V; ++v) {  // all loads of all V columns issued before the first sort
        const int64_t c = base + (int64_t)v * kThreads;
        if (c < d) load_keys<T, NP>(a[v], X, nullptr, n, stride, c);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
        const int64_t c = base + (int64_t)v * kThreads;
        if (c < d) {
            sort_network<NP>(a[v]);
            out[c] = window_mean<NP>(a[v], lo, count);
        }
    }
}

template <typename T, int NP, int V>
__global__ void __launch_bounds__(kThreads) trimmed_mean_kernel(const T* X, int n, int64_t d, int64_t stride, int f,
                                                                float* out) {
    rank_window<T, NP, V>(X, n, d, stride, f, n - 2 * f, out);
}

template <typename T, int NP, int V>
__global__ void __launch_bounds__(kThreads) coord_median_kernel(const T* X, int n, int64_t d, int64_t stride,
                                                                float* out) {
    rank_window<T, NP, V>(X, n, d, stride, (n - 1) / 2, n % 2 ? 1 : 2, out);
}

template <typename T, int NP>
__global__ void __launch_bounds__(kThreads) mean_around_median_kernel(const T* X, const int64_t* rows, int m,
                                                                      int64_t d, int64_t stride, int k, float* out) {
    const int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x;
    if (c >= d) return;
    uint32_t a[NP];
    load_keys<T, NP>(a, X, rows, m, stride, c);
    sort_network<NP>(a);
    out[c] = median_window_mean<NP>(a, m, k);
}

// n > 64: C columns per block, their NP keys in shared memory as keys[r * C + c], bitonic-sorted
// along r by the whole block, then one thread per column takes the window (mode 0: ranks
// [lo, lo+count); mode 1: the k values around the median, as in median_window_mean).
constexpr int kLargeThreads = 256;
constexpr int kLargeKeys = 8192;  // 32 KiB of keys per block

template <typename T>
__global__ void __launch_bounds__(kLargeThreads) select_large_kernel(const T* X, const int64_t* rows, int n, int NP,
                                                                     int C, int64_t d, int64_t stride, int mode,
                                                                     int lo, int count, float* out) {
    __shared__ uint32_t keys[kLargeKeys];
    const int64_t c0 = (int64_t)blockIdx.x * C;
    for (int e = threadIdx.x; e < NP * C; e += kLargeThreads) {
        const int r = e / C, c = e % C;
        keys[e] = (r < n && c0 + c < d) ? float_key(to_float(X[source_row(rows, r) * stride + c0 + c])) : kTopKey;
    }
    __syncthreads();
    for (int kk = 2; kk <= NP; kk <<= 1) {
        for (int j = kk >> 1; j > 0; j >>= 1) {
            for (int p = threadIdx.x; p < NP / 2 * C; p += kLargeThreads) {
                const int c = p % C, q = p / C;
                const int r = ((q & ~(j - 1)) << 1) | (q & (j - 1));  // r has bit j clear; partner r | j
                uint32_t x = keys[r * C + c], y = keys[(r | j) * C + c];
                const bool up = (r & kk) == 0;
                if ((x > y) == up) {
                    keys[r * C + c] = y;
                    keys[(r | j) * C + c] = x;
                }
            }
            __syncthreads();
        }
    }
    const int c = threadIdx.x;
    if (c >= C || c0 + c >= d) return;
    int start = lo;
    if (mode == 1) {  // count = k: median_window_mean's rule (select.cuh)
        const double med =
            ((double)key_float(keys[((n - 1) / 2) * C + c]) + (double)key_float(keys[(n / 2) * C + c])) * 0.5;
        start = 0;
        for (int j = 0; j + count < n; ++j) {
            const double ahead = key_float(keys[(j + count) * C + c]), here = key_float(keys[j * C + c]);
            if (median_distance(ahead, med) < median_distance(here, med)) start = j + 1;
        }
    }
    double s = 0.0;
    for (int r = start; r < start + count; ++r) s += (double)key_float(keys[r * C + c]);
    out[c0 + c] = (float)(s / count);
}

template <typename T>
cudaError_t launch_large(const T* X, const int64_t* rows, int64_t n, int64_t d, int64_t stride, int mode, int lo,
                         int count, float* out, cudaStream_t stream) {
    int NP = 1;
    while (NP < n) NP <<= 1;
    const int C = std::max(1, std::min(64, kLargeKeys / NP));
    const int64_t blocks = (d + C - 1) / C;
    select_large_kernel<T><<<(unsigned)blocks, kLargeThreads, 0, stream>>>(X, rows, (int)n, NP, C, d, stride, mode, lo,
                                                                           count, out);
    return cudaGetLastError();
}

inline unsigned blocks_for(int64_t d, int per_block) { return (unsigned)((d + per_block - 1) / per_block); }

// Registers per thread ~ V * NP keys: 4 columns up to NP = 16, 2 at 32, 1 at 64.
template <typename T, int NP>
cudaError_t launch_window(const T* X, int64_t n, int64_t d, int64_t stride, bool median, int f, float* out,
                          cudaStream_t stream) {
    constexpr int V = NP <= 16 ? 4 : (NP == 32 ? 2 : 1);
    const unsigned blocks = blocks_for(d, kThreads * V);
    if (median)
        coord_median_kernel<T, NP, V><<<blocks, kThreads, 0, stream>>>(X, (int)n, d, stride, out);
    else
        trimmed_mean_kernel<T, NP, V><<<blocks, kThreads, 0, stream>>>(X, (int)n, d, stride, f, out);
    return cudaGetLastError();
}

template <typename T>
cudaError_t window(const T* X, int64_t n, int64_t d, int64_t stride, bool median, int64_t f, float* out,
                   cudaStream_t stream) {
    if (d <= 0) return cudaSuccess;
    if (n <= 1) return launch_window<T, 1>(X, n, d, stride, median, (int)f, out, stream);
    if (n <= 2) return launch_window<T, 2>(X, n, d, stride, median, (int)f, out, stream);
    if (n <= 4) return launch_window<T, 4>(X, n, d, stride, median, (int)f, out, stream);
    if (n <= 8) return launch_window<T, 8>(X, n, d, stride, median, (int)f, out, stream);
    if (n <= 16) return launch_window<T, 16>(X, n, d, stride, median, (int)f, out, stream);
    if (n <= 32) return launch_window<T, 32>(X, n, d, stride, median, (int)f, out, stream);
    if (n <= 64) return launch_window<T, 64>(X, n, d, stride, median, (int)f, out, stream);
    if (n > kMaxSelectRows) return cudaErrorInvalidValue;
    if (median) return launch_large<T>(X, nullptr, n, d, stride, 0, (int)((n - 1) / 2), n % 2 ? 1 : 2, out, stream);
    return launch_large<T>(X, nullptr, n, d, stride, 0, (int)f, (int)(n - 2 * f), out, stream);
}

template <typename T, int NP>
cudaError_t launch_around(const T* X, const int64_t* rows, int64_t m, int64_t d, int64_t stride, int64_t k, float* out,
                          cudaStream_t stream) {
    mean_around_median_kernel<T, NP><<<blocks_for(d, kThreads), kThreads, 0, stream>>>(X, rows, (int)m, d, stride,
                                                                                      (int)k, out);
    return cudaGetLastError();
}

}  // namespace

cudaError_t trimmed_mean(const void* X, int dtype, int64_t n, int64_t d, int64_t stride, int64_t f, float* out,
                         cudaStream_t stream) {
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        return window<T>(static_cast<const T*>(X), n, d, stride, false, f, out, stream);
    });
}

cudaError_t coord_median(const void* X, int dtype, int64_t n, int64_t d, int64_t stride, float* out,
                         cudaStream_t stream) {
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        return window<T>(static_cast<const T*>(X), n, d, stride, true, 0, out, stream);
    });
}

cudaError_t mean_around_median(const void* X, int dtype, int64_t d, int64_t stride, const int64_t* rows, int64_t m,
                               int64_t k, float* out, cudaStream_t stream) {
    if (d <= 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const T* x = static_cast<const T*>(X);
        if (m <= 1) return launch_around<T, 1>(x, rows, m, d, stride, k, out, stream);
        if (m <= 2) return launch_around<T, 2>(x, rows, m, d, stride, k, out, stream);
        if (m <= 4) return launch_around<T, 4>(x, rows, m, d, stride, k, out, stream);
        if (m <= 8) return launch_around<T, 8>(x, rows, m, d, stride, k, out, stream);
        if (m <= 16) return launch_around<T, 16>(x, rows, m, d, stride, k, out, stream);
        if (m <= 32) return launch_around<T, 32>(x, rows, m, d, stride, k, out, stream);
        if (m <= 64) return launch_around<T, 64>(x, rows, m, d, stride, k, out, stream);
        if (m > kMaxSelectRows) return cudaErrorInvalidValue;
        return launch_large<T>(x, rows, m, d, stride, 1, 0, (int)k, out, stream);
    });
}

}  // namespace tapestry
