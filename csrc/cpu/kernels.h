// Every entry point of the CPU aggregation and codec kernels, declared once for the bindings and
// the AddressSanitizer test harness: the robust ops on an (n, d) matrix (select.cpp, mean.cpp,
// gram.cpp), the codec kernels (quant.cpp) and the same robust ops on n encoded payload rows,
// decoded as they go.
#pragma once
#include <cstdint>

namespace tapestry {
// X: n rows of d values of `dtype` (common.h) with a row stride of `stride` elements
void weighted_mean(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const double* w, float* out);
void trimmed_mean(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, int64_t f, float* out);
void coord_median(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, float* out);
void mean_around_median(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const int64_t* rows,
                        int64_t m, int64_t k, float* out);
void gram(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, double* G);
// out (n, 3) float64: per row, sum (x - z)^2, sum x z, sum x^2 (anchor.cpp)
void anchor_dots(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const float* z, double* out);

void quantize_int8(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   int8_t* q, float* scales);
void quantize_int4(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   uint8_t* packed, float* scales);
void dequantize_int8(const int8_t* const* q, const float* const* scales, int64_t n, int64_t m, int64_t block,
                     float* const* out);
void dequantize_int4(const uint8_t* const* packed, const float* const* scales, int64_t n, int64_t m, int64_t block,
                     float* const* out);

// n payload rows of d values: codes[i] and scales[i] in the format codec (quant_rows.h's RowCodec:
// int8 codes, packed int4 nibbles, float16 or bfloat16 values; scales only for int8/int4)
void weighted_mean_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                             int64_t d, const double* w, float* out);  // mean.cpp
void gram_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n, int64_t d,
                    double* G);  // gram.cpp
void trimmed_mean_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                            int64_t d, int64_t f, float* out);
void coord_median_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                            int64_t d, float* out);
void mean_around_median_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block,
                                  int64_t n, int64_t d, const int64_t* rows, int64_t m, int64_t k, float* out);
}  // namespace tapestry
