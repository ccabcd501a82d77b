// Differential privacy kernels: exact integer noise from ChaCha20, the randomized Hadamard
// rotation, and the fused distributed-DP client path (python/tapestry/privacy/ is the contract).
#pragma once
#include <cstdint>

namespace tapestry {

// count draws into out; param is sigma2 (resp. mu) times 2^8, an integer. Chunk j of `chunk` draws
// reads the ChaCha20 stream (key, nonce = purpose || j). Returns the keystream words consumed.
int64_t dp_discrete_gaussian(int64_t* out, int64_t count, uint64_t sigma2_q8, const uint32_t* key,
                             uint32_t purpose, int64_t chunk);
int64_t dp_skellam(int64_t* out, int64_t count, uint64_t mu_q8, const uint32_t* key, uint32_t purpose,
                   int64_t chunk);

// In-place orthonormal Walsh-Hadamard transform of x[0..n), n a power of two, with optional sign
// flips first (signs: keystream words, bit i of word i/32 set = negate x[i]; null = none) and the
// result multiplied by `scale` (1/sqrt(n) for the orthonormal transform, times any extra factor).
// Cache-blocked: one pass over blocks of 2^14, one pass over column strips for the larger stages.
void dp_fwht(float* x, int64_t n, const uint32_t* signs, float scale);

// signs after the transform (the inverse rotation: H then D).
void dp_apply_signs(float* x, int64_t n, const uint32_t* signs);

}  // namespace tapestry
