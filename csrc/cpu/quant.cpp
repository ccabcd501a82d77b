// Blockwise int8/int4 quantisation (see quant.h for the math).
//
// Work is split into chunks of whole blocks, run in parallel with OpenMP. The float32 quantize paths
// (the hot ones) have AVX-512 and AVX2 versions picked at run time (simd::active(): CPUID, capped by
// tapestry._C.set_isa; no -march=native); everything else is portable scalar code the compiler
// vectorises where it can. The SIMD code does exactly the scalar float32 operations lane by lane, so
// every path gives identical bytes.
#include "quant.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

// gcc 12 warns inside its own AVX-512 intrinsics (their _mm512_undefined_* operands)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "../common.h"
#include "simd.h"

namespace tapestry {
namespace {

using quant::block_scale;
using quant::uniform;

// block <= kMaxBlock and even (checked in Python), so a block fits the scratch and int4 pairs never
// straddle blocks.
constexpr int64_t kMaxBlock = 4096;

inline float load(const float* x, int64_t j) { return x[j]; }
inline float load(const uint16_t* x, int64_t j) {  // bfloat16: the high half of a float32
    uint32_t b = uint32_t(x[j]) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline float load(const _Float16* x, int64_t j) { return float(x[j]); }

inline uint32_t abs_bits(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return b & 0x7fffffffu;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(TAPESTRY_PORTABLE_ONLY)
#define TP_HAVE_AVX2_PATH 1
bool has_avx2() { return simd::active() >= simd::kAvx2; }
bool has_avx512() { return simd::active() >= simd::kAvx512; }


// u for the 32 elements j .. j + 31 (j even): 16 hashes r = mix32(pair ^ k0) ^ k1 of the pairs
// j/2 .. j/2 + 15 (see quant::uniform). Read as 32 16-bit lanes the hashes are already in element
// order (low half: even element, high half: odd), so a zero-extension gives the 16-bit integers of
// elements j .. j + 15 and j + 16 .. j + 31.
TAPESTRY_AVX512 TAPESTRY_INLINE void uniform_x32(uint32_t j, uint32_t k0, __m512i vk0, __m512i vk1, __m512* ua, __m512* ub) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint32_t base = j >> 1;
    const __m512i pair = _mm512_add_epi32(_mm512_set1_epi32(int32_t(base)), iota);
    __m512i h;
    if ((base & 0xffffu) <= 0xfff0u) {
        // no lane carries into bit 16, so (pair ^ k0) >> 16 is the same scalar in every lane and the
        // first `x ^= x >> 16` of mix32 folds into the key: one xor instead of xor, shift, xor
        h = _mm512_xor_si512(pair, _mm512_set1_epi32(int32_t(k0 ^ (base >> 16) ^ (k0 >> 16))));
    } else {
        h = _mm512_xor_si512(pair, vk0);
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    }
    // the rest of mix32(pair ^ k0); its last `x ^= x >> 16` and the `^ k1` are one three-way xor
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int32_t(0x846ca68bu)));
    const __m512i r = _mm512_ternarylogic_epi32(h, _mm512_srli_epi32(h, 16), vk1, 0x96);  // a ^ b ^ c
    const __m512 scale = _mm512_set1_ps(1.52587890625e-05f);
    *ua = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r))), scale);
    *ub = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1))), scale);
}

// floor(x * inv + u) for 16 values as int32 (masked-off lanes read as 0): the conversion rounds
// toward -Inf itself. |x * inv + u| stays below 129 for a finite block (|x| <= absmax), far inside
// int32; the clamp to [-qmax, qmax] comes after packing (see codes_x64).
TAPESTRY_AVX512 TAPESTRY_INLINE __m512i floor_x16(const float* x, __mmask16 k, __m512 u, __m512 inv) {
    // Two roundings, as in the scalar code. gcc contracts _mm512_add_ps(_mm512_mul_ps(..)) into an FMA
    // (AVX-512F has one, and -std=c++17 does not turn fp-contract off for C++); the explicit-rounding
    // forms are opaque builtins that it never fuses.
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m512 t = _mm512_add_round_ps(_mm512_mul_round_ps(_mm512_maskz_loadu_ps(k, x), inv, kNearest), u, kNearest);
    return _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}

TAPESTRY_AVX512 TAPESTRY_INLINE __mmask16 mask16(int64_t n) {  // the first min(max(n, 0), 16) lanes
    return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// 64 codes (elements j .. j + 63 of the block, the first `n` of them real) as bytes in order.
// Saturating packs clamp floor(s) to [-128, 127], a byte max / min then to [-qmax, qmax]: the same
// as the scalar clamp(floor(s)), since every bound is an integer.
template <bool Int4>
TAPESTRY_AVX512 TAPESTRY_INLINE __m512i codes_x64(const float* xb, int64_t j, int64_t n, uint32_t pos, bool stochastic,
                                      uint32_t k0, __m512i vk0, __m512i vk1, __m512 vinv) {
    __m512 u0 = _mm512_set1_ps(0.5f), u1 = u0, u2 = u0, u3 = u0;
    if (stochastic) {
        uniform_x32(pos, k0, vk0, vk1, &u0, &u1);
        uniform_x32(pos + 32u, k0, vk0, vk1, &u2, &u3);
    }
    __m512i a = floor_x16(xb + j, mask16(n), u0, vinv);
    __m512i b = floor_x16(xb + j + 16, mask16(n - 16), u1, vinv);
    __m512i c = floor_x16(xb + j + 32, mask16(n - 32), u2, vinv);
    __m512i d = floor_x16(xb + j + 48, mask16(n - 48), u3, vinv);
    // packs work per 128-bit lane (lane L holds a, b, c, d [4L .. 4L + 3]); the permute restores order
    __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    p = _mm512_permutexvar_epi32(order, p);
    if (Int4) return _mm512_min_epi8(_mm512_max_epi8(p, _mm512_set1_epi8(-7)), _mm512_set1_epi8(7));
    return _mm512_max_epi8(p, _mm512_set1_epi8(-127));
}

// Codes j .. j + n - 1 (n <= 64) of a block: int8 bytes, or nibble pairs (j even).
template <bool Int4>
TAPESTRY_AVX512 TAPESTRY_INLINE void store_codes(uint8_t* out, int64_t j, int64_t n, __m512i q) {
    if (Int4) {
        __m512i w = _mm512_add_epi8(q, _mm512_set1_epi8(8));  // 16-bit lane p: nibble 2p low byte, 2p + 1 high
        __m256i packed = _mm512_cvtepi16_epi8(_mm512_or_si512(w, _mm512_srli_epi16(w, 4)));
        if (n == 64)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j / 2), packed);
        else
            _mm256_mask_storeu_epi8(out + j / 2, __mmask32((1ull << ((n + 1) / 2)) - 1), packed);
    } else {
        if (n == 64)
            _mm512_storeu_si512(out + j, q);
        else
            _mm512_mask_storeu_epi8(out + j, __mmask64((1ull << n) - 1), q);
    }
}

// One block of float32 values with AVX-512: its scale, and its codes written straight to the output,
// int8 bytes at out (int4 = false) or packed nibbles at out (int4 = true: byte p holds elements 2p,
// 2p + 1; an odd last element gets the code 0 as its partner, which is what a masked-off lane
// computes: floor(0 * inv + u) = 0 for u in [0, 1)).
template <bool Int4>
TAPESTRY_AVX512 void quantize_block_avx512(const float* x, int64_t start, int64_t len, bool stochastic, uint32_t k0,
                                        uint32_t k1, uint8_t* out, float* scale_out) {
    const float qmax = Int4 ? 7.0f : 127.0f;
    const float* xb = x + start;
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
    int64_t j = 0;
    for (; j + 64 <= len; j += 64) {
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(xb + j), absmask));
        m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(xb + j + 16), absmask));
        m2 = _mm512_max_epu32(m2, _mm512_and_si512(_mm512_loadu_si512(xb + j + 32), absmask));
        m3 = _mm512_max_epu32(m3, _mm512_and_si512(_mm512_loadu_si512(xb + j + 48), absmask));
    }
    for (; j < len; j += 16)
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(mask16(len - j), xb + j), absmask));
    const uint32_t m = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3)));
    float scale, inv;
    block_scale(m, qmax, &scale, &inv);
    *scale_out = scale;
    const int64_t nbytes = Int4 ? (len + 1) / 2 : len;
    if (m >= quant::kInfBits) {
        if (Int4)
            std::memset(out, 0x88, size_t(nbytes));  // nibbles 8: code 0
        else
            std::memset(out, 0, size_t(nbytes));
        return;
    }
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vk0 = _mm512_set1_epi32(int32_t(k0)), vk1 = _mm512_set1_epi32(int32_t(k1));
    // start is a multiple of the (even) block, so start + j is even
    for (j = 0; j + 64 <= len; j += 64)
        store_codes<Int4>(out, j, 64, codes_x64<Int4>(xb, j, 64, uint32_t(start + j), stochastic, k0, vk0, vk1, vinv));
    if (j < len)
        store_codes<Int4>(out, j, len - j,
                          codes_x64<Int4>(xb, j, len - j, uint32_t(start + j), stochastic, k0, vk0, vk1, vinv));
}

TAPESTRY_AVX2 inline __m256i mix32_x8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x846ca68bu)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// u for the 16 elements j .. j + 15 (j even): 8 hashes mix32(pair ^ k0) ^ k1 of the pairs j/2 .. j/2 + 7,
// low halves to even elements and high halves to odd ones (see quant::uniform).
TAPESTRY_AVX2 inline void uniform_x16(uint32_t j, __m256i k0, __m256i k1, __m256* ua, __m256* ub) {
    __m256i pair = _mm256_add_epi32(_mm256_set1_epi32(int32_t(j >> 1)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i r = _mm256_xor_si256(mix32_x8(_mm256_xor_si256(pair, k0)), k1);
    __m256i even = _mm256_and_si256(r, _mm256_set1_epi32(0xffff)), odd = _mm256_srli_epi32(r, 16);
    __m256i lo = _mm256_unpacklo_epi32(even, odd), hi = _mm256_unpackhi_epi32(even, odd);  // per 128-bit lane
    const __m256 scale = _mm256_set1_ps(1.52587890625e-05f);
    *ua = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20)), scale);
    *ub = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x31)), scale);
}

// q for 8 consecutive values (int32 lanes).
TAPESTRY_AVX2 inline __m256i quant_x8(const float* x, __m256 u, __m256 inv, __m256 qmax) {
    __m256 t = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), u));  // no FMA: matches scalar
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_sub_ps(_mm256_setzero_ps(), qmax)), qmax);
    return _mm256_cvttps_epi32(t);
}

// One block of float32 values with AVX2: its scale and `len` codes in [-qmax, qmax] at qb (int8
// codes, or int4 codes before packing); a non-finite block gets codes 0.
TAPESTRY_AVX2 void quantize_block_avx2(const float* x, int64_t start, int64_t len, float qmax,
                                                         bool stochastic, uint32_t k0, uint32_t k1, int8_t* qb,
                                                         float* scale_out) {
    const float* xb = x + start;
    __m256i mx = _mm256_setzero_si256();
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
    int64_t j = 0;
    for (; j + 8 <= len; j += 8)
        mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j)), absmask));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), mx);
    uint32_t m = 0;
    for (int l = 0; l < 8; ++l) m = std::max(m, lanes[l]);
    for (; j < len; ++j) m = std::max(m, abs_bits(xb[j]));
    float scale, inv;
    block_scale(m, qmax, &scale, &inv);
    *scale_out = scale;
    if (m >= quant::kInfBits) {
        std::memset(qb, 0, size_t(len));
        return;
    }
    const __m256 vinv = _mm256_set1_ps(inv), vq = _mm256_set1_ps(qmax);
    const __m256i vk0 = _mm256_set1_epi32(int32_t(k0)), vk1 = _mm256_set1_epi32(int32_t(k1));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    j = 0;
    for (; j + 32 <= len; j += 32) {
        __m256 u0 = _mm256_set1_ps(0.5f), u1 = u0, u2 = u0, u3 = u0;
        if (stochastic) {  // start is a multiple of the (even) block, so start + j is even
            uniform_x16(uint32_t(start + j), vk0, vk1, &u0, &u1);
            uniform_x16(uint32_t(start + j + 16), vk0, vk1, &u2, &u3);
        }
        __m256i a = quant_x8(xb + j, u0, vinv, vq);
        __m256i b = quant_x8(xb + j + 8, u1, vinv, vq);
        __m256i c = quant_x8(xb + j + 16, u2, vinv, vq);
        __m256i d = quant_x8(xb + j + 24, u3, vinv, vq);
        // packs work per 128-bit lane; the permute restores element order
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + j), _mm256_permutevar8x32_epi32(p, order));
    }
    for (; j < len; ++j) {
        float u = stochastic ? uniform(uint32_t(start + j), k0, k1) : 0.5f;
        float t = std::floor(xb[j] * inv + u);
        qb[j] = int8_t(int32_t(std::min(std::max(t, -qmax), qmax)));
    }
}

TAPESTRY_AVX2 void dequantize_int8_avx2(const int8_t* q, const float* scales, int64_t j0,
                                                          int64_t j1, int64_t block, float* out) {
    for (int64_t start = j0; start < j1; start += block) {
        const float s = scales[start / block];
        const __m256 vs = _mm256_set1_ps(s);
        const int64_t len = std::min(block, j1 - start);
        const int8_t* qb = q + start;
        float* o = out + start;
        int64_t j = 0;
        for (; j + 8 <= len; j += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + j)));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vs));
        }
        for (; j < len; ++j) o[j] = float(qb[j]) * s;
    }
}
#endif

// q for one block of `len` values; u = 0.5 (nearest) or the counter-based uniform.
template <typename T>
inline void quantize_block(const T* x, int64_t start, int64_t len, float qmax, bool stochastic, uint32_t k0,
                           uint32_t k1, float* v, float* scale_out) {
    uint32_t m = 0;
    for (int64_t j = 0; j < len; ++j) m = std::max(m, abs_bits(load(x, start + j)));
    float scale, inv;
    block_scale(m, qmax, &scale, &inv);
    *scale_out = scale;
    if (m >= quant::kInfBits) {
        for (int64_t j = 0; j < len; ++j) v[j] = 0.0f;
        return;
    }
    for (int64_t j = 0; j < len; ++j) {
        float u = stochastic ? uniform(uint32_t(start + j), k0, k1) : 0.5f;
        float t = std::floor(load(x, start + j) * inv + u);
        v[j] = std::min(std::max(t, -qmax), qmax);
    }
}

template <typename T>
void quantize_int8_chunk(const T* x, int64_t b0, int64_t b1, int64_t m, int64_t block, bool stochastic,
                         uint32_t k0, uint32_t k1, int8_t* q, float* scales) {
#ifdef TP_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float>) {
        if (has_avx512()) {
            for (int64_t b = b0; b < b1; ++b)
                quantize_block_avx512<false>(x, b * block, std::min(block, m - b * block), stochastic, k0, k1,
                                             reinterpret_cast<uint8_t*>(q + b * block), &scales[b]);
            return;
        }
        if (has_avx2()) {
            for (int64_t b = b0; b < b1; ++b)
                quantize_block_avx2(x, b * block, std::min(block, m - b * block), 127.0f, stochastic, k0, k1,
                                    q + b * block, &scales[b]);
            return;
        }
    }
#endif
    alignas(64) float v[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
        int64_t start = b * block, len = std::min(block, m - start);
        quantize_block(x, start, len, 127.0f, stochastic, k0, k1, v, &scales[b]);
        for (int64_t j = 0; j < len; ++j) q[start + j] = int8_t(int32_t(v[j]));
    }
}

template <typename T>
void quantize_int4_chunk(const T* x, int64_t b0, int64_t b1, int64_t m, int64_t block, bool stochastic,
                         uint32_t k0, uint32_t k1, uint8_t* packed, float* scales) {
#ifdef TP_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float>) {
        if (has_avx512()) {
            for (int64_t b = b0; b < b1; ++b)  // b * block is even, so its byte is b * block / 2
                quantize_block_avx512<true>(x, b * block, std::min(block, m - b * block), stochastic, k0, k1,
                                            packed + b * block / 2, &scales[b]);
            return;
        }
        if (has_avx2()) {
            alignas(64) int8_t c[kMaxBlock];
            for (int64_t b = b0; b < b1; ++b) {
                const int64_t start = b * block, len = std::min(block, m - start), pairs = len / 2;
                quantize_block_avx2(x, start, len, 7.0f, stochastic, k0, k1, c, &scales[b]);
                uint8_t* pb = packed + start / 2;
                for (int64_t p = 0; p < pairs; ++p) pb[p] = uint8_t((c[2 * p] + 8) | ((c[2 * p + 1] + 8) << 4));
                if (len & 1) pb[pairs] = uint8_t((c[len - 1] + 8) | (8 << 4));
            }
            return;
        }
    }
#endif
    alignas(64) float v[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
        int64_t start = b * block, len = std::min(block, m - start);
        quantize_block(x, start, len, 7.0f, stochastic, k0, k1, v, &scales[b]);
        int64_t pairs = len / 2;
        for (int64_t p = 0; p < pairs; ++p)  // nibble = q + 8; element 2p low, 2p+1 high
            packed[start / 2 + p] = uint8_t((int32_t(v[2 * p]) + 8) | ((int32_t(v[2 * p + 1]) + 8) << 4));
        if (len & 1) packed[start / 2 + pairs] = uint8_t(int32_t(v[len - 1]) + 8) | uint8_t(8 << 4);
    }
}

void dequantize_int8_chunk(const int8_t* q, const float* scales, int64_t j0, int64_t j1, int64_t block, float* out) {
#ifdef TP_HAVE_AVX2_PATH
    if (has_avx2()) return dequantize_int8_avx2(q, scales, j0, j1, block, out);
#endif
    for (int64_t start = j0; start < j1; start += block) {
        const float s = scales[start / block];
        const int64_t len = std::min(block, j1 - start);
        for (int64_t j = 0; j < len; ++j) out[start + j] = float(q[start + j]) * s;
    }
}

void dequantize_int4_chunk(const uint8_t* packed, const float* scales, int64_t j0, int64_t j1,
                                     int64_t block, float* out) {
    for (int64_t start = j0; start < j1; start += block) {  // start is even
        const float s = scales[start / block];
        const int64_t len = std::min(block, j1 - start), pairs = len / 2;
        const uint8_t* p = packed + start / 2;
        float* o = out + start;
        for (int64_t k = 0; k < pairs; ++k) {
            o[2 * k] = float(int32_t(p[k] & 15) - 8) * s;
            o[2 * k + 1] = float(int32_t(p[k] >> 4) - 8) * s;
        }
        if (len & 1) o[len - 1] = float(int32_t(p[pairs] & 15) - 8) * s;
    }
}

// Blocks per parallel work item: about 16 Ki values, never less than one block.
int64_t blocks_per_chunk(int64_t block) { return std::max<int64_t>(1, 16384 / block); }

template <typename T>
void quantize_impl(bool int4, const T* x, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   void* q, float* scales) {
    const int64_t nb = (m + block - 1) / block, per = blocks_per_chunk(block);
    const int64_t chunks = (nb + per - 1) / per;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t b0 = c * per, b1 = std::min(nb, b0 + per);
        if (int4)
            quantize_int4_chunk(x, b0, b1, m, block, stochastic, k0, k1, static_cast<uint8_t*>(q), scales);
        else
            quantize_int8_chunk(x, b0, b1, m, block, stochastic, k0, k1, static_cast<int8_t*>(q), scales);
    }
}

void quantize_any(bool int4, const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0,
                  uint32_t k1, void* q, float* scales) {
    switch (dtype) {
        case kFloat16: quantize_impl(int4, static_cast<const _Float16*>(x), m, block, stochastic, k0, k1, q, scales); break;
        case kBFloat16: quantize_impl(int4, static_cast<const uint16_t*>(x), m, block, stochastic, k0, k1, q, scales); break;
        default: quantize_impl(int4, static_cast<const float*>(x), m, block, stochastic, k0, k1, q, scales); break;
    }
}

template <typename F>
void dequantize_rows(int64_t n, int64_t m, int64_t block, F&& row_chunk) {
    const int64_t per = blocks_per_chunk(block) * block;
    const int64_t chunks = (m + per - 1) / per, items = n * chunks;
#pragma omp parallel for schedule(static) if (items > 1)
    for (int64_t it = 0; it < items; ++it) {
        int64_t i = it / chunks, j0 = (it % chunks) * per;
        row_chunk(i, j0, std::min(m, j0 + per));
    }
}

}  // namespace

void quantize_int8(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   int8_t* q, float* scales) {
    quantize_any(false, x, dtype, m, block, stochastic, k0, k1, q, scales);
}

void quantize_int4(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
                   uint8_t* packed, float* scales) {
    quantize_any(true, x, dtype, m, block, stochastic, k0, k1, packed, scales);
}

// n rows at once (one call per column block in the fused decode-aggregate): row i reads q[i],
// scales[i] and writes m floats to out[i].
void dequantize_int8(const int8_t* const* q, const float* const* scales, int64_t n, int64_t m, int64_t block,
                     float* const* out) {
    dequantize_rows(n, m, block, [&](int64_t i, int64_t j0, int64_t j1) {
        dequantize_int8_chunk(q[i], scales[i], j0, j1, block, out[i]);
    });
}

void dequantize_int4(const uint8_t* const* packed, const float* const* scales, int64_t n, int64_t m, int64_t block,
                     float* const* out) {
    dequantize_rows(n, m, block, [&](int64_t i, int64_t j0, int64_t j1) {
        dequantize_int4_chunk(packed[i], scales[i], j0, j1, block, out[i]);
    });
}

}  // namespace tapestry
