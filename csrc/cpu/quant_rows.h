// Payload rows as the fused decode-and-aggregate kernels read them (select.cpp, mean.cpp,
// gram.cpp): n clients' values in one codec's format, int8 codes or packed int4 nibbles with one
// float32 scale per block (quant.h), or float16 / bfloat16 values. decode_row writes each value as
// the float32 that decoding the payload gives (q * scale exactly as the dequantize kernels compute
// it; 16-bit values converted exactly), so an op on these rows gives the same bits fused or not.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace tapestry {

// must match tapestry.backends.cpu.ROW_CODECS
enum RowCodec : int { kRowsInt8 = 0, kRowsInt4 = 1, kRowsFloat16 = 2, kRowsBFloat16 = 3 };

struct QuantRows {
    const void* const* codes;    // per client: int8 codes, packed nibbles (low one first), or 16-bit values
    const float* const* scales;  // per client: one scale per block (int8/int4; unused otherwise)
    int codec;                   // RowCodec
    int64_t block;               // even (int8/int4)
};

// Values j0 .. j0 + w - 1 of client i into dst[0 .. w) (j0 even for int4). Inlined into each
// ISA's wrapper, where the compiler vectorises the loops.
template <int CODEC>
TAPESTRY_INLINE void decode_row(const QuantRows& q, int64_t i, int64_t j0, int64_t w, float* dst) {
    const int64_t j1 = j0 + w;
    if constexpr (CODEC == kRowsFloat16 || CODEC == kRowsBFloat16) {
        using T = typename std::conditional<CODEC == kRowsFloat16, simd::F16, simd::BF16>::type;
        const uint16_t* c = static_cast<const uint16_t*>(q.codes[i]);
        for (int64_t j = j0; j < j1; ++j) dst[j - j0] = T::to_float(c[j]);
        return;
    }
    const float* sc = q.scales[i];
    for (int64_t a = j0; a < j1;) {  // runs of one scale
        const int64_t b = std::min(j1, (a / q.block + 1) * q.block);
        const float s = sc[a / q.block];
        if (CODEC == kRowsInt8) {
            const int8_t* c = static_cast<const int8_t*>(q.codes[i]);
            for (int64_t j = a; j < b; ++j) dst[j - j0] = static_cast<float>(c[j]) * s;
        } else {  // a and b are even (block boundaries), except b = an odd d: then half a byte ends the run
            const uint8_t* c = static_cast<const uint8_t*>(q.codes[i]);
            for (int64_t p = a / 2; p < b / 2; ++p) {
                dst[2 * p - j0] = static_cast<float>(static_cast<int>(c[p] & 15) - 8) * s;
                dst[2 * p + 1 - j0] = static_cast<float>(static_cast<int>(c[p] >> 4) - 8) * s;
            }
            if (b & 1) dst[b - 1 - j0] = static_cast<float>(static_cast<int>(c[b / 2] & 15) - 8) * s;
        }
        a = b;
    }
}

// Where client i's value j starts, and the bytes of w values from there (for prefetches).
TAPESTRY_INLINE const char* row_at(const QuantRows& q, int64_t i, int64_t j) {
    const char* c = static_cast<const char*>(q.codes[i]);
    return q.codec == kRowsInt8 ? c + j : q.codec == kRowsInt4 ? c + j / 2 : c + 2 * j;
}
TAPESTRY_INLINE int64_t row_bytes(const QuantRows& q, int64_t w) {
    return q.codec == kRowsInt8 ? w : q.codec == kRowsInt4 ? (w + 1) / 2 : 2 * w;
}

// Ask for client i's values of columns j .. j + w - 1 (n rows are n streams, more than the
// hardware prefetcher follows); a prefetch past the end never faults.
TAPESTRY_INLINE void prefetch_row(const QuantRows& q, int64_t i, int64_t j, int64_t w) {
    const char* c = row_at(q, i, j);
    const int64_t bytes = row_bytes(q, w);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

}  // namespace tapestry
