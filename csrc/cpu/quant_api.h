// The CPU quantisation kernels' entry points (defined in quant.cpp), declared once for the
// bindings and the AddressSanitizer test harness.
#pragma once
#include <cstdint>

namespace tapestry {
void quantize_int8(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   int8_t* q, float* scales);
void quantize_int4(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   uint8_t* packed, float* scales);
void dequantize_int8(const int8_t* const* q, const float* const* scales, int64_t n, int64_t m, int64_t block,
                     float* const* out);
void dequantize_int4(const uint8_t* const* packed, const float* const* scales, int64_t n, int64_t m, int64_t block,
                     float* const* out);
}  // namespace tapestry
