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

// dst = the Walsh-Hadamard transform of src[0..n), n a power of two (src may be dst), with optional
// sign flips first (signs: keystream words, bit i of word i/32 set = negate src[i]; null = none) and
// the result multiplied by `scale` (1/sqrt(n) for the orthonormal transform, times any extra factor).
// Cache-blocked (hadamard.cpp): one pass over blocks of 2^14, one over column strips for the rest.
void dp_fwht(float* dst, const float* src, int64_t n, const uint32_t* signs, float scale);

// signs after the transform (the inverse rotation: H then D).
void dp_apply_signs(float* x, int64_t n, const uint32_t* signs);

// The fused distributed-DP client path (python/tapestry/privacy/distributed.py, DistributedDP.encode):
//   work[0..D) = float(x * factor) zero-padded; signs; orthonormal WHT (scale rot_scale);
//   y = double(work) * scale; q = floor(y) + [u < frac(y)], u = keystream(round_key, round_nonce)
//   word (attempt * D + i) / 2^32, redrawn (attempt + 1) until sum q^2 <= bound2;
//   out = (q + noise) mod 2^bits (noise: discrete Gaussian sigma2_q8 / 2^8, or Skellam mu_q8 / 2^8
//   when skellam, from noise_key in chunks of `chunk` draws, as dp_discrete_gaussian / dp_skellam);
//   then out += sum_j mask_signs[j] keystream(mask_keys[j], mask_nonce) (mod 2^32) when nmask > 0.
// Returns the rounding attempts used, or -1 when max_tries were not enough.
int64_t dp_client_encode(uint32_t* out, float* work, const float* x, int64_t d, int64_t D, double factor,
                         const uint32_t* sign_words, float rot_scale, double scale, const uint32_t* round_key,
                         const uint32_t* round_nonce, int64_t bound2, int64_t max_tries, uint64_t noise_q8,
                         bool skellam, const uint32_t* noise_key, uint32_t noise_purpose, int64_t chunk, int bits,
                         const uint32_t* mask_keys, const int8_t* mask_signs, int64_t nmask, const uint32_t* mask_nonce);

}  // namespace tapestry
