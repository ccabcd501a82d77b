// ChaCha20 keystream (RFC 8439) and the fused secure-sum masking built on it.
#pragma once
#include <cstdint>

namespace tapestry {

// Keystream words offset .. offset+count-1 of (key, nonce): word k is word k mod 16 of the block
// with counter k div 16. The caller guarantees that no block past 2^32 - 1 is needed.
void chacha20_keystream(uint32_t* out, const uint32_t* key, const uint32_t* nonce, uint64_t offset,
                        int64_t count);

// out[i] = in[i] + sum_j signs[j] * keystream(keys[j])[offset + i]  (mod 2^32), i < count.
// keys is m x 8 words, signs are +1 / -1; in may be null (zeros) or equal to out (in place).
void chacha20_mask(uint32_t* out, const uint32_t* in, int64_t count, const uint32_t* keys,
                   const int8_t* signs, int64_t m, const uint32_t* nonce, uint64_t offset);

}  // namespace tapestry
