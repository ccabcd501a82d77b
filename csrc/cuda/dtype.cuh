// Reading float32 / float16 / bfloat16 natively and widening to float in registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace tapestry {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Dispatch a templated launcher on the dtype code: F is called with a null pointer of the type.
template <typename F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
    switch (dtype) {
        case kFloat32: return f(static_cast<const float*>(nullptr));
        case kFloat16: return f(static_cast<const __half*>(nullptr));
        case kBFloat16: return f(static_cast<const __nv_bfloat16*>(nullptr));
        default: return cudaErrorInvalidValue;
    }
}

// V consecutive elements as one aligned vector load (V * sizeof(T) in {2, 4, 8, 16} bytes).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
    T v[V];
};

}  // namespace tapestry
