// Blockwise symmetric absmax quantisation: the per-element math shared by the C++ and CUDA kernels
// (and the AddressSanitizer harness in tests/). tapestry.reference.quantize_int8 is the spec.
//
//   scale_b = absmax_b / qmax        (qmax = 127 for int8, 7 for int4; 0 when absmax_b < 2^-96)
//   q_j     = clamp(floor(x_j * (1 / scale_b) + u_j), -qmax, qmax)
//   u_j     = 0.5 (round to nearest), or uniform(seed, j) in [0, 1) (stochastic, unbiased to 2^-16 step)
//   decode  = q_j * scale_b
//
// Every step is one IEEE float32 operation (no FMA contraction), so all backends agree bit for bit.
// A block holding NaN/Inf gets that value as its scale and q = 0: Python refuses to send it.
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define TP_HD __host__ __device__ __forceinline__
#else
#define TP_HD inline
#endif

namespace tapestry {
namespace quant {

constexpr float kTiny = 1.2621774483536189e-29f;  // 2^-96: smaller absmax -> scale 0 (1/scale stays finite)
constexpr uint32_t kInfBits = 0x7f800000u;

// lowbias32 (C. Wellons): a 32-bit integer hash with full avalanche; one round keyed by the seed
// (key k0 before it, k1 after) gives the counter-based generator: element j's random number depends
// only on (seed, j).
TP_HD uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// u in [0, 1) with 16 random bits of r = mix32((j >> 1) ^ k0) ^ k1: one hash of the pair j / 2 serves
// elements j and j + 1 (low and high half), which halves the cost of the generator. 16 bits leave a rounding bias of at most
// 2^-16 of a step, below float32's own resolution of x / scale near qmax.
TP_HD float uniform(uint32_t j, uint32_t k0, uint32_t k1) {
    const uint32_t r = mix32((j >> 1) ^ k0) ^ k1;
    return float((r >> ((j & 1u) * 16u)) & 0xffffu) * 1.52587890625e-05f;
}

// (scale, 1/scale) of a block from the bits of its absmax (|x| bits: integer order = float order,
// NaN above Inf above every finite value, so the max of the bits propagates NaN).
TP_HD void block_scale(uint32_t absbits, float qmax, float* scale, float* inv) {
    float a;
    std::memcpy(&a, &absbits, 4);
    if (absbits >= kInfBits) {
        *scale = a;
        *inv = 0.0f;
    } else if (a < kTiny) {
        *scale = 0.0f;
        *inv = 0.0f;
    } else {
        *scale = a / qmax;
        *inv = 1.0f / *scale;
    }
}

}  // namespace quant
}  // namespace tapestry
