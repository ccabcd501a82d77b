// ChaCha20 keystream (RFC 8439 section 2.3) and fused secure-sum masking on CUDA.
//
// One thread computes one 64-byte block in 16 registers: the 20 rounds are 960 integer
// operations (add, xor, and one funnel shift per rotate), so the kernel is bound by the integer
// ALUs, not by memory (about 15 operations per keystream byte; ~1.1 TB/s on an H100). Rotations
// use __funnelshift_l (one SHF); loads of the key are warp-uniform (broadcast). The thread block
// then transposes its blocks through shared memory so that global loads and stores are
// contiguous 16-byte accesses across the warp (a thread's own 64 bytes would be strided).
// Masking fuses every key: the 16 words accumulate sign_j * keystream_j in registers, and x is
// read and out written once.
#include "chacha.cuh"

namespace tapestry {
namespace cuda {
namespace {

constexpr int kThreads = 256;           // blocks (of 16 words) per thread block
constexpr int kPitch = 16 + 4;          // shared-memory row pitch in words: 16-byte aligned, fewer bank conflicts

__device__ __forceinline__ uint32_t rotl(uint32_t v, int c) { return __funnelshift_l(v, v, c); }

#define QR(a, b, c, d)                      \
    a += b; d = rotl(d ^ a, 16);            \
    c += d; b = rotl(b ^ c, 12);            \
    a += b; d = rotl(d ^ a, 8);             \
    c += d; b = rotl(b ^ c, 7);

// The 16 words of the block with counter `ctr`, added into acc with multiplier m (1 or 2^32 - 1).
__device__ __forceinline__ void chacha20_block(const uint32_t* __restrict__ key, const uint32_t* __restrict__ nonce,
                                               uint32_t ctr, uint32_t m, uint32_t acc[16]) {
    uint32_t in[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                       __ldg(key + 0), __ldg(key + 1), __ldg(key + 2), __ldg(key + 3),
                       __ldg(key + 4), __ldg(key + 5), __ldg(key + 6), __ldg(key + 7),
                       ctr, __ldg(nonce + 0), __ldg(nonce + 1), __ldg(nonce + 2)};
    uint32_t x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = in[i];
#pragma unroll 2
    for (int i = 0; i < 10; ++i) {
        QR(x[0], x[4], x[8], x[12]) QR(x[1], x[5], x[9], x[13]) QR(x[2], x[6], x[10], x[14]) QR(x[3], x[7], x[11], x[15])
        QR(x[0], x[5], x[10], x[15]) QR(x[1], x[6], x[11], x[12]) QR(x[2], x[7], x[8], x[13]) QR(x[3], x[4], x[9], x[14])
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] += m * (x[i] + in[i]);
}

// Shared body of both kernels: thread t of thread block g owns block first + g*kThreads + t.
template <bool HAS_X>
__device__ __forceinline__ void keystream_blocks(uint32_t* __restrict__ out, const uint32_t* x, const uint32_t* keys,
                                                 const int8_t* signs, int nkeys, const uint32_t* nonce,
                                                 uint64_t offset, int64_t count) {
    __shared__ __align__(16) uint32_t tile[kThreads * kPitch];
    const uint64_t first_block = offset / 16 + (uint64_t)blockIdx.x * kThreads;
    const uint64_t blk = first_block + threadIdx.x;
    uint32_t acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0;
    for (int j = 0; j < nkeys; ++j) {
        const uint32_t m = signs == nullptr ? 1u : (uint32_t)(int32_t)signs[j];  // -1 -> 2^32 - 1
        chacha20_block(keys + 8 * j, nonce, (uint32_t)blk, m, acc);  // lanes past 2^32 - 1 are never stored
    }
    uint4* row = reinterpret_cast<uint4*>(tile + threadIdx.x * kPitch);
#pragma unroll
    for (int q = 0; q < 4; ++q) row[q] = make_uint4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
    __syncthreads();
    // Coalesced write-out: consecutive threads take consecutive words of the tile's range.
    const int64_t base = (int64_t)(first_block * 16 - offset);  // output index of the tile's word 0 (may be < 0)
    for (int i = threadIdx.x; i < kThreads * 16; i += kThreads) {
        const int64_t o = base + i;
        if (o < 0 || o >= count) continue;
        uint32_t v = tile[(i / 16) * kPitch + (i % 16)];
        if (HAS_X) v += x[o];
        out[o] = v;
    }
}

}  // namespace

__global__ void __launch_bounds__(kThreads) chacha20_keystream(uint32_t* out, const uint32_t* key,
                                                               const uint32_t* nonce, uint64_t offset, int64_t count) {
    keystream_blocks<false>(out, nullptr, key, nullptr, 1, nonce, offset, count);
}

__global__ void __launch_bounds__(kThreads) chacha20_mask(uint32_t* out, const uint32_t* x, const uint32_t* keys,
                                                          const int8_t* signs, int nkeys, const uint32_t* nonce,
                                                          uint64_t offset, int64_t count) {
    keystream_blocks<true>(out, x, keys, signs, nkeys, nonce, offset, count);
}

static unsigned grid_for(uint64_t offset, int64_t count) {
    const uint64_t nblocks = (offset + count - 1) / 16 - offset / 16 + 1;
    return (unsigned)((nblocks + kThreads - 1) / kThreads);
}

cudaError_t chacha20_keystream(uint32_t* out, const uint32_t* key, const uint32_t* nonce, uint64_t offset,
                               int64_t count, cudaStream_t stream) {
    if (count <= 0) return cudaSuccess;
    chacha20_keystream<<<grid_for(offset, count), kThreads, 0, stream>>>(out, key, nonce, offset, count);
    return cudaGetLastError();
}

cudaError_t chacha20_mask(uint32_t* out, const uint32_t* x, int64_t count, const uint32_t* keys, const int8_t* signs,
                          int64_t nkeys, const uint32_t* nonce, uint64_t offset, cudaStream_t stream) {
    if (count <= 0) return cudaSuccess;
    chacha20_mask<<<grid_for(offset, count), kThreads, 0, stream>>>(out, x, keys, signs, (int)nkeys, nonce, offset,
                                                                    count);
    return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tapestry
