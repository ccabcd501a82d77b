// The cache-blocked fast Walsh-Hadamard transform (privacy.h: dp_fwht, dp_apply_signs).
//
// Every path runs the stages h = 1, 2, 4, ... in ascending order with the same butterflies
// (a + b, a - b) as tapestry.reference.fwht (python/tapestry/reference.py), so all give the same floats.
// Two passes over memory: pass 1 runs the stages h < kBlock inside each block of kBlock floats
// (reading the source, writing the destination); pass 2 the stages h >= kBlock, on strips of kStrip
// columns of the (n / kBlock) x kBlock matrix through an L2-resident buffer. The vector path keeps
// 8 vectors in registers and runs three stages per load and store (radix 8); the first three
// stages act inside a vector.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "privacy.h"
#include "simd.h"

namespace tapestry {
namespace {

constexpr int64_t kBlock = int64_t(1) << 14;  // 64 KiB of floats: pass 1's block stays in L2
constexpr int64_t kStrip = 64;                // columns per strip in pass 2 (rows x 256 B in L2)
constexpr int64_t kStreamFrom = int64_t(1) << 22;  // 16 MiB: pass 1 streams its output from here

// -- portable: one stage at a time ---------------------------------------------------------------
void negate_flagged(float* x, int64_t n, const uint32_t* signs, int64_t first) {
    for (int64_t j = 0; j < n; ++j) {
        int64_t i = first + j;
        if ((signs[i >> 5] >> (i & 31)) & 1u) x[j] = -x[j];
    }
}

void stages_portable(float* x, int64_t n, int64_t h0, const uint32_t* signs, int64_t first, float scale) {
    if (signs) negate_flagged(x, n, signs, first);
    for (int64_t h = h0; h < n; h <<= 1)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; ++j) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    if (scale != 1.0f)
        for (int64_t j = 0; j < n; ++j) x[j] *= scale;
}

// -- AVX2, also run at the AVX-512 level (after register blocking the transform is bound by
// memory): 16 ymm registers hold a radix-8 group ------------------------------------------------
// One in-vector stage as one FMA: partner + v * (+1 or -1) is a + b in lanes whose bit h is clear
// (v = a) and a - b in the others (v = b); the product is exact, so the floats are a + b, a - b.
TAPESTRY_AVX2 TAPESTRY_INLINE __m256 lane_stages(__m256 v) {  // h = 1, 2, 4
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1),
                 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
    v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
    return _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));
}

// x[i] negated where sign bit i is set (`flags`: 8 bits of the sign words, lane j = bit j).
TAPESTRY_AVX2 TAPESTRY_INLINE __m256 flip(__m256 v, uint8_t flags) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(flags), lane_bit), lane_bit);
    return _mm256_xor_ps(v, _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(-0.0f)));
}

template <int R>  // log2(R) stages between R vectors: v[j] and v[j + s] for s = 1, 2, ..., R / 2
TAPESTRY_AVX2 TAPESTRY_INLINE void vector_stages(__m256* v) {
#pragma GCC unroll 3
    for (int s = 1; s < R; s <<= 1)
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j)
            if (!(j & s)) {
                __m256 a = v[j], b = v[j + s];
                v[j] = _mm256_add_ps(a, b);
                v[j + s] = _mm256_sub_ps(a, b);
            }
}

TAPESTRY_AVX2 TAPESTRY_INLINE __m256 scaled(__m256 v, float scale) {
    return scale == 1.0f ? v : _mm256_mul_ps(v, _mm256_set1_ps(scale));
}

TAPESTRY_AVX2 TAPESTRY_INLINE void store(float* p, __m256 v, bool stream) {
    if (stream) _mm256_stream_ps(p, v);
    else _mm256_storeu_ps(p, v);
}

// Rows of a matrix `width` floats wide (a multiple of 8), row r at p + r * stride. Stage h of a
// flat array is stage h / width between its rows, so one radix pass serves both transform passes.
struct Rows {
    float* p;
    int64_t stride;
    TAPESTRY_INLINE float* row(int64_t r) const { return p + r * stride; }
};

// out = the stages between rows r and r + h, r + 2h, ..., r + (R/2) h of in (in may be out), scaled.
template <int R>
TAPESTRY_AVX2 void radix_rows(Rows out, Rows in, int64_t rows, int64_t width, int64_t h, float scale, bool stream) {
    for (int64_t base = 0; base < rows; base += R * h)
        for (int64_t r = base; r < base + h; ++r)
            for (int64_t c = 0; c < width; c += 8) {
                __m256 v[R];
#pragma GCC unroll 8
                for (int j = 0; j < R; ++j) v[j] = _mm256_loadu_ps(in.row(r + j * h) + c);
                vector_stages<R>(v);
#pragma GCC unroll 8
                for (int j = 0; j < R; ++j) store(out.row(r + j * h) + c, scaled(v[j], scale), stream);
            }
}

// The stages between rows h0 <= h < rows, three per pass (the last pass fewer): the first pass reads
// in, the last writes out (scaled; streaming stores when `stream`: out 32-byte aligned and not read
// again soon), the passes between work in `work` (rows x width floats, or in itself).
TAPESTRY_AVX2 void row_passes(Rows out, Rows in, Rows work, int64_t rows, int64_t width, int64_t h0, float scale,
                              bool stream) {
    Rows from = in;
    for (int64_t h = h0; h < rows;) {
        const int64_t left = rows / h;  // 2^(stages left)
        const bool last = left <= 8;
        const Rows to = last ? out : work;
        const float sc = last ? scale : 1.0f;
        if (left >= 8) radix_rows<8>(to, from, rows, width, h, sc, last && stream), h *= 8;
        else if (left == 4) radix_rows<4>(to, from, rows, width, h, sc, last && stream), h *= 4;
        else radix_rows<2>(to, from, rows, width, h, sc, last && stream), h *= 2;
        from = to;
    }
}

// All stages of a block (n >= 128, a power of two), read from src and written to dst through work
// (n floats; may be dst): signs and h = 1..32 on 8 loaded vectors (three stages inside each, three
// between them), then the rest.
TAPESTRY_AVX2 void block_avx2(float* dst, const float* src, float* work, int64_t n, const uint32_t* signs,
                             int64_t first, float scale, bool stream) {
    const uint8_t* flags = reinterpret_cast<const uint8_t*>(signs);  // little-endian: bit i of the words
    for (int64_t g = 0; g < n; g += 64) {
        __m256 v[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
            v[j] = _mm256_loadu_ps(src + g + 8 * j);
            if (signs) v[j] = flip(v[j], flags[(first + g) / 8 + j]);
            v[j] = lane_stages(v[j]);
        }
        vector_stages<8>(v);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(work + g + 8 * j, v[j]);
    }
    row_passes(Rows{dst, 8}, Rows{work, 8}, Rows{work, 8}, n / 8, 8, 8, scale, stream);
}

TAPESTRY_AVX2 void apply_signs_avx2(float* x, int64_t n, const uint32_t* signs, int64_t first) {
    const uint8_t* flags = reinterpret_cast<const uint8_t*>(signs);
    for (int64_t j = 0; j < n; j += 8) _mm256_storeu_ps(x + j, flip(_mm256_loadu_ps(x + j), flags[(first + j) / 8]));
}

// dst = all stages of the block src[0..n) (signs first when given, src[j] being element first + j),
// then the scale; src may be dst; work: n floats of scratch, or null to work in dst.
void block_stages(float* dst, const float* src, float* work, int64_t n, const uint32_t* signs, int64_t first,
                  float scale, bool stream) {
    if (simd::active() >= simd::kAvx2 && n >= 128)
        return block_avx2(dst, src, work ? work : dst, n, signs, first, scale, stream && work);
    if (src != dst) std::memcpy(dst, src, size_t(n) * sizeof(float));
    stages_portable(dst, n, 1, signs, first, scale);
}

// The stages between the rows of a strip (rows x width floats at x, row stride `stride`), in place,
// then the scale, passing through buf (rows x width floats).
void strip_stages(float* x, int64_t stride, float* buf, int64_t rows, int64_t width, float scale) {
    if (simd::active() >= simd::kAvx2)
        return row_passes(Rows{x, stride}, Rows{x, stride}, Rows{buf, width}, rows, width, 1, scale, false);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(buf + r * width, x + r * stride, width * sizeof(float));
    stages_portable(buf, rows * width, width, nullptr, 0, scale);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(x + r * stride, buf + r * width, width * sizeof(float));
}

void apply_signs(float* x, int64_t n, const uint32_t* signs, int64_t first) {
    if (simd::active() >= simd::kAvx2 && n % 8 == 0 && first % 8 == 0) return apply_signs_avx2(x, n, signs, first);
    negate_flagged(x, n, signs, first);
}

}  // namespace

void dp_apply_signs(float* x, int64_t n, const uint32_t* signs) {
#pragma omp parallel for schedule(static) if (n >= 4 * kBlock)
    for (int64_t b = 0; b < n; b += kBlock) apply_signs(x + b, std::min(kBlock, n - b), signs, b);
}

void dp_fwht(float* dst, const float* src, int64_t n, const uint32_t* signs, float scale) {
    const int64_t block = std::min(n, kBlock), rows = n / block;
    // Pass 1: signs and every stage h < block, one block at a time (scaled here when it is the last),
    // in an L2-resident scratch block when dst is too large to stay cached for pass 2: its last
    // stage then streams to dst, which skips reading dst's lines before writing them.
    const bool stream = n >= kStreamFrom && reinterpret_cast<uintptr_t>(dst) % 32 == 0;
#pragma omp parallel if (n >= 4 * kBlock)
    {
        simd::Scratch<float> work(size_t(stream ? block : 0));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n; b += block)
            block_stages(dst + b, src + b, stream ? work.p : nullptr, block, signs, b, rows == 1 ? scale : 1.0f,
                         stream);
    }
    if (stream) _mm_sfence();
    if (rows == 1) return;
    // Pass 2: stage h = r * block pairs rows r apart of the (rows x block) matrix; a strip of kStrip
    // columns goes through all of them with an L2-resident buffer between its first and last pass.
    const int64_t strip = std::min(kStrip, block);
#pragma omp parallel
    {
        simd::Scratch<float> buf(size_t(rows * strip));
#pragma omp for schedule(static)
        for (int64_t c = 0; c < block; c += strip) strip_stages(dst + c, block, buf.p, rows, strip, scale);
    }
}

}  // namespace tapestry
