// Blockwise int8/int4 quantisation on the GPU (math in csrc/cpu/quant.h, shared with the C++
// kernels; tapestry.reference is the spec). One thread block quantises one quantisation block:
// a max over |x| bits (NaN > Inf > finite) reduced through shared memory, then each thread rounds
// its elements. Float ops use the _rn intrinsics so nvcc never contracts them into FMAs: the
// bytes equal the CPU's.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../cpu/quant.h"
#include "dtype.cuh"

namespace tapestry {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float uniform_dev(uint32_t j, uint32_t k0, uint32_t k1) {
    const uint32_t r = quant::mix32((j >> 1) ^ k0) ^ k1;  // as quant::uniform
    return __fmul_rn(float((r >> ((j & 1u) * 16u)) & 0xffffu), 1.52587890625e-05f);
}

__device__ __forceinline__ float round_q(float x, uint32_t j, float inv, float qmax, bool stochastic, uint32_t k0,
                                         uint32_t k1) {
    float u = stochastic ? uniform_dev(j, k0, k1) : 0.5f;
    float t = floorf(__fadd_rn(__fmul_rn(x, inv), u));
    return fminf(fmaxf(t, -qmax), qmax);
}

// absmax bits of block b reduced over the thread block; every thread gets the result.
template <typename T>
__device__ uint32_t block_absbits(const T* x, int64_t start, int64_t len) {
    __shared__ uint32_t red[kThreads / 32];
    uint32_t m = 0;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) m = max(m, __float_as_uint(to_float(x[start + j])) & 0x7fffffffu);
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0;
        for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (threadIdx.x == 0) red[0] = m;
    }
    __syncthreads();
    return red[0];
}

__device__ __forceinline__ void scale_of(uint32_t mb, float qmax, float* scale, float* inv) {
    float a = __uint_as_float(mb);
    if (mb >= quant::kInfBits) {
        *scale = a;
        *inv = 0.0f;
    } else if (a < quant::kTiny) {
        *scale = 0.0f;
        *inv = 0.0f;
    } else {
        *scale = __fdiv_rn(a, qmax);
        *inv = __fdiv_rn(1.0f, *scale);
    }
}

template <typename T>
__global__ void quantize_int8_kernel(const T* x, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                                     int8_t* q, float* scales) {
    const int64_t b = blockIdx.x, start = b * block, len = min(block, m - start);
    const uint32_t mb = block_absbits(x, start, len);
    float scale, inv;
    scale_of(mb, 127.0f, &scale, &inv);
    const bool bad = mb >= quant::kInfBits;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
        float t = bad ? 0.0f : round_q(to_float(x[start + j]), uint32_t(start + j), inv, 127.0f, stochastic, k0, k1);
        q[start + j] = int8_t(int(t));
    }
    if (threadIdx.x == 0) scales[b] = scale;
}

template <typename T>
__global__ void quantize_int4_kernel(const T* x, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                                     uint8_t* packed, float* scales) {
    const int64_t b = blockIdx.x, start = b * block, len = min(block, m - start);
    const uint32_t mb = block_absbits(x, start, len);
    float scale, inv;
    scale_of(mb, 7.0f, &scale, &inv);
    const bool bad = mb >= quant::kInfBits;
    for (int64_t p = threadIdx.x; 2 * p < len; p += blockDim.x) {  // block is even: pairs stay inside
        const int64_t j = start + 2 * p;
        float lo = bad ? 0.0f : round_q(to_float(x[j]), uint32_t(j), inv, 7.0f, stochastic, k0, k1);
        float hi = (bad || 2 * p + 1 >= len) ? 0.0f : round_q(to_float(x[j + 1]), uint32_t(j + 1), inv, 7.0f, stochastic, k0, k1);
        packed[j / 2] = uint8_t((int(lo) + 8) | ((int(hi) + 8) << 4));
    }
    if (threadIdx.x == 0) scales[b] = scale;
}

__global__ void dequantize_int8_kernel(const int8_t* q, const float* scales, int64_t m, int64_t block, float* out) {
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += int64_t(gridDim.x) * blockDim.x)
        out[j] = __fmul_rn(float(q[j]), scales[j / block]);
}

__global__ void dequantize_int4_kernel(const uint8_t* packed, const float* scales, int64_t m, int64_t block,
                                       float* out) {
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += int64_t(gridDim.x) * blockDim.x) {
        const uint32_t byte = packed[j / 2];
        const int nib = (j & 1) ? int(byte >> 4) : int(byte & 15);
        out[j] = __fmul_rn(float(nib - 8), scales[j / block]);
    }
}

int grid_for(int64_t m) { return int(std::min<int64_t>((m + kThreads - 1) / kThreads, 65535 * 8)); }

}  // namespace

cudaError_t quantize_int8_cuda(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0,
                               uint32_t k1, int8_t* q, float* scales, cudaStream_t stream) {
    const int64_t nb = (m + block - 1) / block;
    if (nb == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        quantize_int8_kernel<T><<<unsigned(nb), kThreads, 0, stream>>>(static_cast<const T*>(x), m, block, stochastic,
                                                                         k0, k1, q, scales);
        return cudaGetLastError();
    });
}

cudaError_t quantize_int4_cuda(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0,
                               uint32_t k1, uint8_t* packed, float* scales, cudaStream_t stream) {
    const int64_t nb = (m + block - 1) / block;
    if (nb == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        quantize_int4_kernel<T><<<unsigned(nb), kThreads, 0, stream>>>(static_cast<const T*>(x), m, block, stochastic,
                                                                         k0, k1, packed, scales);
        return cudaGetLastError();
    });
}

cudaError_t dequantize_int8_cuda(const int8_t* const* q, const float* const* scales, int64_t n, int64_t m,
                                 int64_t block, float* const* out, cudaStream_t stream) {
    for (int64_t i = 0; i < n && m > 0; ++i)
        dequantize_int8_kernel<<<grid_for(m), kThreads, 0, stream>>>(q[i], scales[i], m, block, out[i]);
    return cudaGetLastError();
}

cudaError_t dequantize_int4_cuda(const uint8_t* const* packed, const float* const* scales, int64_t n, int64_t m,
                                 int64_t block, float* const* out, cudaStream_t stream) {
    for (int64_t i = 0; i < n && m > 0; ++i)
        dequantize_int4_kernel<<<grid_for(m), kThreads, 0, stream>>>(packed[i], scales[i], m, block, out[i]);
    return cudaGetLastError();
}

}  // namespace tapestry
