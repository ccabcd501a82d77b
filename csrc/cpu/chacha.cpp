// ChaCha20 keystream (RFC 8439 section 2.3) and fused secure-sum masking.
//
// Layout (docs/spec.md): keystream word k of (key, nonce) is word k mod 16 of the block with counter
// k div 16, so any slice can be produced independently. The SIMD paths compute 16 (AVX-512) or 8
// (AVX2) consecutive blocks at once, one block per vector lane ("vertical" layout: vector w holds
// state word w of every block), then transpose lanes back into block order before the store, where
// the masking arithmetic (store, add or subtract mod 2^32) is fused. Work is split into
// block-aligned chunks of CHUNK words so that, when several keystreams are combined into one
// update, the update's chunk stays in L1/L2 while every key is applied to it.
#include "chacha.h"
#include "simd.h"

#include <immintrin.h>
// gcc 12 warns inside its own _mm512_set1 intrinsics
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <omp.h>

#include <algorithm>
#include <cstring>

namespace tapestry {
namespace {

constexpr uint32_t kSigma[4] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u};  // "expand 32-byte k"
constexpr int64_t kChunk = 4096;  // words per parallel work item (16 KiB), a multiple of 16

enum Mode { kStore = 0, kAdd = 1, kSub = 2 };
using simd::kAvx2;
using simd::kAvx512;

inline uint32_t rotl(uint32_t v, int c) { return (v << c) | (v >> (32 - c)); }

#define QR_SCALAR(a, b, c, d)                   \
    a += b; d ^= a; d = rotl(d, 16);            \
    c += d; b ^= c; b = rotl(b, 12);            \
    a += b; d ^= a; d = rotl(d, 8);             \
    c += d; b ^= c; b = rotl(b, 7);

// One 64-byte block: the RFC 8439 block function.
void block_scalar(const uint32_t* key, const uint32_t* nonce, uint32_t counter, uint32_t out[16]) {
    uint32_t in[16] = {kSigma[0], kSigma[1], kSigma[2], kSigma[3], key[0], key[1], key[2], key[3],
                       key[4],    key[5],    key[6],    key[7],    counter, nonce[0], nonce[1], nonce[2]};
    uint32_t x[16];
    std::memcpy(x, in, sizeof x);
    for (int i = 0; i < 10; ++i) {  // 10 double rounds = 20 rounds
        QR_SCALAR(x[0], x[4], x[8], x[12]) QR_SCALAR(x[1], x[5], x[9], x[13])
        QR_SCALAR(x[2], x[6], x[10], x[14]) QR_SCALAR(x[3], x[7], x[11], x[15])
        QR_SCALAR(x[0], x[5], x[10], x[15]) QR_SCALAR(x[1], x[6], x[11], x[12])
        QR_SCALAR(x[2], x[7], x[8], x[13]) QR_SCALAR(x[3], x[4], x[9], x[14])
    }
    for (int i = 0; i < 16; ++i) out[i] = x[i] + in[i];
}

template <int MODE>
inline void apply_words(uint32_t* dst, const uint32_t* ks, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        if (MODE == kStore) dst[i] = ks[i];
        else if (MODE == kAdd) dst[i] += ks[i];
        else dst[i] -= ks[i];
    }
}

template <int MODE>
int64_t blocks_scalar(uint32_t* dst, const uint32_t* key, const uint32_t* nonce, uint32_t b, int64_t nb) {
    uint32_t ks[16];
    for (int64_t i = 0; i < nb; ++i) {
        block_scalar(key, nonce, b + (uint32_t)i, ks);
        apply_words<MODE>(dst + 16 * i, ks, 16);
    }
    return nb;
}

// ---------------------------------------------------------------------------------------------
// AVX2: 8 blocks per iteration

#define ROTV2(v, c) _mm256_or_si256(_mm256_slli_epi32(v, c), _mm256_srli_epi32(v, 32 - (c)))
#define QR_AVX2(a, b, c, d)                                                         \
    a = _mm256_add_epi32(a, b); d = _mm256_shuffle_epi8(_mm256_xor_si256(d, a), r16); \
    c = _mm256_add_epi32(c, d); b = _mm256_xor_si256(b, c); b = ROTV2(b, 12);        \
    a = _mm256_add_epi32(a, b); d = _mm256_shuffle_epi8(_mm256_xor_si256(d, a), r8);  \
    c = _mm256_add_epi32(c, d); b = _mm256_xor_si256(b, c); b = ROTV2(b, 7);

template <int MODE>
TAPESTRY_AVX2 inline void put8(uint32_t* p, __m256i v) {
    __m256i* q = reinterpret_cast<__m256i*>(p);
    if (MODE == kStore) _mm256_storeu_si256(q, v);
    else if (MODE == kAdd) _mm256_storeu_si256(q, _mm256_add_epi32(_mm256_loadu_si256(q), v));
    else _mm256_storeu_si256(q, _mm256_sub_epi32(_mm256_loadu_si256(q), v));
}

template <int MODE>
TAPESTRY_AVX2 int64_t blocks_avx2(uint32_t* dst, const uint32_t* key, const uint32_t* nonce,
                                                    uint32_t b, int64_t nb) {
    // byte shuffles that rotate each 32-bit lane left by 16 and by 8
    const __m256i r16 = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
                                         2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    const __m256i r8 = _mm256_setr_epi8(3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14,
                                        3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t done = 0;
    for (; done + 8 <= nb; done += 8) {
        __m256i in[16], x[16];
        for (int i = 0; i < 4; ++i) in[i] = _mm256_set1_epi32((int)kSigma[i]);
        for (int i = 0; i < 8; ++i) in[4 + i] = _mm256_set1_epi32((int)key[i]);
        in[12] = _mm256_add_epi32(_mm256_set1_epi32((int)(b + (uint32_t)done)), lane);  // never wraps (checked in Python)
        for (int i = 0; i < 3; ++i) in[13 + i] = _mm256_set1_epi32((int)nonce[i]);
        for (int i = 0; i < 16; ++i) x[i] = in[i];
        for (int i = 0; i < 10; ++i) {
            QR_AVX2(x[0], x[4], x[8], x[12]) QR_AVX2(x[1], x[5], x[9], x[13])
            QR_AVX2(x[2], x[6], x[10], x[14]) QR_AVX2(x[3], x[7], x[11], x[15])
            QR_AVX2(x[0], x[5], x[10], x[15]) QR_AVX2(x[1], x[6], x[11], x[12])
            QR_AVX2(x[2], x[7], x[8], x[13]) QR_AVX2(x[3], x[4], x[9], x[14])
        }
        for (int i = 0; i < 16; ++i) x[i] = _mm256_add_epi32(x[i], in[i]);
        // Transpose: after the two unpack stages, t[4j+r] holds words 4j..4j+3 of block r (low
        // 128 bits) and of block 4+r (high 128 bits); permute2x128 joins the halves.
        __m256i a[16], t[16];
        for (int i = 0; i < 8; ++i) {
            a[2 * i] = _mm256_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
            a[2 * i + 1] = _mm256_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
        }
        for (int j = 0; j < 4; ++j) {
            t[4 * j + 0] = _mm256_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
            t[4 * j + 1] = _mm256_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
            t[4 * j + 2] = _mm256_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
            t[4 * j + 3] = _mm256_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
        }
        uint32_t* p = dst + 16 * done;
        for (int r = 0; r < 4; ++r) {
            put8<MODE>(p + 16 * r, _mm256_permute2x128_si256(t[r], t[4 + r], 0x20));
            put8<MODE>(p + 16 * r + 8, _mm256_permute2x128_si256(t[8 + r], t[12 + r], 0x20));
            put8<MODE>(p + 16 * (4 + r), _mm256_permute2x128_si256(t[r], t[4 + r], 0x31));
            put8<MODE>(p + 16 * (4 + r) + 8, _mm256_permute2x128_si256(t[8 + r], t[12 + r], 0x31));
        }
    }
    return done + blocks_scalar<MODE>(dst + 16 * done, key, nonce, b + (uint32_t)done, nb - done);
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 blocks per iteration, native 32-bit rotates

#define QR_AVX512(a, b, c, d)                                                                  \
    a = _mm512_add_epi32(a, b); d = _mm512_rol_epi32(_mm512_xor_si512(d, a), 16);              \
    c = _mm512_add_epi32(c, d); b = _mm512_rol_epi32(_mm512_xor_si512(b, c), 12);              \
    a = _mm512_add_epi32(a, b); d = _mm512_rol_epi32(_mm512_xor_si512(d, a), 8);               \
    c = _mm512_add_epi32(c, d); b = _mm512_rol_epi32(_mm512_xor_si512(b, c), 7);

template <int MODE>
TAPESTRY_AVX512 inline void put16(uint32_t* p, __m512i v) {
    if (MODE == kStore) _mm512_storeu_si512(p, v);
    else if (MODE == kAdd) _mm512_storeu_si512(p, _mm512_add_epi32(_mm512_loadu_si512(p), v));
    else _mm512_storeu_si512(p, _mm512_sub_epi32(_mm512_loadu_si512(p), v));
}

template <int MODE>
TAPESTRY_AVX512 int64_t blocks_avx512(uint32_t* dst, const uint32_t* key,
                                                              const uint32_t* nonce, uint32_t b, int64_t nb) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t done = 0;
    for (; done + 16 <= nb; done += 16) {
        __m512i x[16];
        for (int i = 0; i < 4; ++i) x[i] = _mm512_set1_epi32((int)kSigma[i]);
        for (int i = 0; i < 8; ++i) x[4 + i] = _mm512_set1_epi32((int)key[i]);
        const __m512i ctr = _mm512_add_epi32(_mm512_set1_epi32((int)(b + (uint32_t)done)), lane);
        x[12] = ctr;
        for (int i = 0; i < 3; ++i) x[13 + i] = _mm512_set1_epi32((int)nonce[i]);
#pragma GCC unroll 10
        for (int i = 0; i < 10; ++i) {
            QR_AVX512(x[0], x[4], x[8], x[12]) QR_AVX512(x[1], x[5], x[9], x[13])
            QR_AVX512(x[2], x[6], x[10], x[14]) QR_AVX512(x[3], x[7], x[11], x[15])
            QR_AVX512(x[0], x[5], x[10], x[15]) QR_AVX512(x[1], x[6], x[11], x[12])
            QR_AVX512(x[2], x[7], x[8], x[13]) QR_AVX512(x[3], x[4], x[9], x[14])
        }
        // add the input state back (broadcasts are recomputed: cheaper than 16 more registers)
        for (int i = 0; i < 4; ++i) x[i] = _mm512_add_epi32(x[i], _mm512_set1_epi32((int)kSigma[i]));
        for (int i = 0; i < 8; ++i) x[4 + i] = _mm512_add_epi32(x[4 + i], _mm512_set1_epi32((int)key[i]));
        x[12] = _mm512_add_epi32(x[12], ctr);
        for (int i = 0; i < 3; ++i) x[13 + i] = _mm512_add_epi32(x[13 + i], _mm512_set1_epi32((int)nonce[i]));
        // 16 x 16 transpose: unpack 32- then 64-bit elements inside 128-bit lanes, so t[4j+r]'s
        // 128-bit lane k is words 4j..4j+3 of block 4k+r; then a 4 x 4 transpose of 128-bit lanes.
        __m512i a[16], t[16];
        for (int i = 0; i < 8; ++i) {
            a[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
        }
        for (int j = 0; j < 4; ++j) {
            t[4 * j + 0] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
            t[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
            t[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
            t[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
        }
        uint32_t* p = dst + 16 * done;
        for (int r = 0; r < 4; ++r) {
            const __m512i c0 = _mm512_shuffle_i32x4(t[r], t[4 + r], 0x44);
            const __m512i c1 = _mm512_shuffle_i32x4(t[r], t[4 + r], 0xEE);
            const __m512i c2 = _mm512_shuffle_i32x4(t[8 + r], t[12 + r], 0x44);
            const __m512i c3 = _mm512_shuffle_i32x4(t[8 + r], t[12 + r], 0xEE);
            put16<MODE>(p + 16 * r, _mm512_shuffle_i32x4(c0, c2, 0x88));
            put16<MODE>(p + 16 * (4 + r), _mm512_shuffle_i32x4(c0, c2, 0xDD));
            put16<MODE>(p + 16 * (8 + r), _mm512_shuffle_i32x4(c1, c3, 0x88));
            put16<MODE>(p + 16 * (12 + r), _mm512_shuffle_i32x4(c1, c3, 0xDD));
        }
    }
    return done + blocks_avx2<MODE>(dst + 16 * done, key, nonce, b + (uint32_t)done, nb - done);
}

// ---------------------------------------------------------------------------------------------

template <int MODE>
void blocks(int isa, uint32_t* dst, const uint32_t* key, const uint32_t* nonce, uint32_t b, int64_t nb) {
    if (isa == kAvx512) blocks_avx512<MODE>(dst, key, nonce, b, nb);
    else if (isa == kAvx2) blocks_avx2<MODE>(dst, key, nonce, b, nb);
    else blocks_scalar<MODE>(dst, key, nonce, b, nb);
}

// Apply keystream words [w0, w1) of one key to dst (dst[0] is word w0): partial first and last
// blocks go through a scalar block, whole blocks through the SIMD path.
template <int MODE>
void apply_range(int isa, uint32_t* dst, const uint32_t* key, const uint32_t* nonce, uint64_t w0, uint64_t w1) {
    uint32_t ks[16];
    uint64_t w = w0;
    if (w % 16 != 0) {
        const uint64_t end = std::min<uint64_t>(w1, (w / 16 + 1) * 16);
        block_scalar(key, nonce, (uint32_t)(w / 16), ks);
        apply_words<MODE>(dst, ks + w % 16, (int64_t)(end - w));
        dst += end - w;
        w = end;
    }
    const int64_t nb = (int64_t)((w1 - w) / 16);
    if (nb > 0) {
        blocks<MODE>(isa, dst, key, nonce, (uint32_t)(w / 16), nb);
        dst += 16 * nb;
        w += 16 * (uint64_t)nb;
    }
    if (w < w1) {
        block_scalar(key, nonce, (uint32_t)(w / 16), ks);
        apply_words<MODE>(dst, ks, (int64_t)(w1 - w));
    }
}

// Run body(w0, w1) over block-aligned chunks of [offset, offset + count), in parallel when large.
template <class Body>
void for_chunks(uint64_t offset, int64_t count, Body body) {
    const uint64_t end = offset + (uint64_t)count;
    const uint64_t first = offset / kChunk;
    const int64_t nchunks = (int64_t)((end + kChunk - 1) / kChunk - first);
    // dynamic: on a busy machine a descheduled thread's chunks are taken by the others
#pragma omp parallel for schedule(dynamic, 2) if (count >= 8 * kChunk)
    for (int64_t c = 0; c < nchunks; ++c) {
        const uint64_t w0 = std::max<uint64_t>(offset, (first + c) * kChunk);
        const uint64_t w1 = std::min<uint64_t>(end, (first + c + 1) * kChunk);
        body(w0, w1);
    }
}

}  // namespace

void chacha20_keystream(uint32_t* out, const uint32_t* key, const uint32_t* nonce, uint64_t offset, int64_t count) {
    if (count <= 0) return;
    const int isa = simd::active();
    for_chunks(offset, count, [&](uint64_t w0, uint64_t w1) {
        apply_range<kStore>(isa, out + (w0 - offset), key, nonce, w0, w1);
    });
}

void chacha20_mask(uint32_t* out, const uint32_t* in, int64_t count, const uint32_t* keys, const int8_t* signs,
                   int64_t m, const uint32_t* nonce, uint64_t offset) {
    if (count <= 0) return;
    const int isa = simd::active();
    for_chunks(offset, count, [&](uint64_t w0, uint64_t w1) {
        uint32_t* dst = out + (w0 - offset);
        const size_t bytes = (size_t)(w1 - w0) * sizeof(uint32_t);
        if (in == nullptr) std::memset(dst, 0, bytes);
        else if (in != out) std::memcpy(dst, in + (w0 - offset), bytes);
        // every key on this chunk while it is hot in cache
        for (int64_t j = 0; j < m; ++j) {
            if (signs[j] >= 0) apply_range<kAdd>(isa, dst, keys + 8 * j, nonce, w0, w1);
            else apply_range<kSub>(isa, dst, keys + 8 * j, nonce, w0, w1);
        }
    });
}

}  // namespace tapestry
