// Quantised rows as the fused decode-and-aggregate kernels read them (select.cpp, mean.cpp): n
// clients' int8 codes or packed int4 nibbles, each with one float32 scale per block (quant.h).
// decode_row writes value j as float(code_j) * scale exactly as the dequantize kernels do, so an
// op on decoded rows gives the same bits fused or not.
#pragma once
#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace tapestry {

struct QuantRows {
    const void* const* codes;    // per client: int8 codes (bits 8) or packed nibbles, low one first (bits 4)
    const float* const* scales;  // per client: one scale per block
    int bits;
    int64_t block;  // even
};

// Values j0 .. j0 + w - 1 of client i into dst[0 .. w) (j0 even for bits 4). Inlined into each
// ISA's wrapper, where the compiler vectorises the runs of one scale.
template <int BITS>
TAPESTRY_INLINE void decode_row(const QuantRows& q, int64_t i, int64_t j0, int64_t w, float* dst) {
    const float* sc = q.scales[i];
    const int64_t j1 = j0 + w;
    for (int64_t a = j0; a < j1;) {  // runs of one scale
        const int64_t b = std::min(j1, (a / q.block + 1) * q.block);
        const float s = sc[a / q.block];
        if (BITS == 8) {
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

// Ask for client i's codes of columns j .. j + w - 1 (n rows are n streams, more than the hardware
// prefetcher follows); a prefetch past the end never faults.
TAPESTRY_INLINE void prefetch_row(const QuantRows& q, int64_t i, int64_t j, int64_t w) {
    const char* c = static_cast<const char*>(q.codes[i]) + (q.bits == 8 ? j : j / 2);
    const int64_t bytes = q.bits == 8 ? w : w / 2;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

}  // namespace tapestry
