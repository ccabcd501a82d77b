// ChaCha20 keystream (RFC 8439) and fused secure-sum masking on CUDA: host-side launchers.
// Pointers are device pointers; key / keys / nonce hold little-endian words; launches go on `stream`.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace tapestry {
namespace cuda {

// Keystream words offset .. offset+count-1 (word k = word k mod 16 of block k div 16).
cudaError_t chacha20_keystream(uint32_t* out, const uint32_t* key, const uint32_t* nonce, uint64_t offset,
                               int64_t count, cudaStream_t stream);

// out[i] = x[i] + sum_j signs[j] * keystream(keys[j])[offset + i] mod 2^32 (x may equal out).
cudaError_t chacha20_mask(uint32_t* out, const uint32_t* x, int64_t count, const uint32_t* keys,
                          const int8_t* signs, int64_t nkeys, const uint32_t* nonce, uint64_t offset,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace tapestry
