// Host launchers of the robust-aggregation CUDA kernels (csrc/cuda/select.cu, mean.cu), called by
// csrc/bindings/cuda_robust.cpp. Raw device pointers, sizes, the row stride (in elements, unit
// stride along columns), a dtype code (csrc/common.h) and a stream; no torch headers. Each
// returns the launch error (cudaSuccess when fine); parameters were checked in Python.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace tapestry {

// out[j] = sum_{t<m} weights[t] * X[rows[t], j]   (float64 accumulation, rows/weights on device)
cudaError_t weighted_mean(const void* X, int dtype, int64_t d, int64_t stride, const int64_t* rows,
                          const double* weights, int64_t m, float* out, cudaStream_t stream);

// out[j] = mean of the values ranked f .. n-f-1 in column j (-Inf < finite < +Inf < NaN)
cudaError_t trimmed_mean(const void* X, int dtype, int64_t n, int64_t d, int64_t stride, int64_t f, float* out,
                         cudaStream_t stream);

// out[j] = median of column j (mean of the two middle values for even n)
cudaError_t coord_median(const void* X, int dtype, int64_t n, int64_t d, int64_t stride, float* out,
                         cudaStream_t stream);

// out[j] = mean of the k values of column j over rows[0..m) closest to their median (ties: smaller)
cudaError_t mean_around_median(const void* X, int dtype, int64_t d, int64_t stride, const int64_t* rows, int64_t m,
                               int64_t k, float* out, cudaStream_t stream);

// Largest n (or m) the selection kernels take; the register networks cover n <= 64, a
// shared-memory bitonic sort the rest.
constexpr int64_t kMaxSelectRows = 8192;

}  // namespace tapestry
