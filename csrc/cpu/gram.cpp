// gram: G = C C^T (float64, n x n) for C = X - shift, with a per-column shift computed in two steps
// on each cache tile: s1_j = the first finite value of column j, then s2_j = the float32 mean of the
// finite (x_ij - s1_j); c_ij = (x_ij - s1_j) - s2_j.
//
// Any per-coordinate shift leaves |x_a - x_b|^2 = G_aa + G_bb - 2 G_ab unchanged. Subtracting a
// value of the column itself removes a common component exactly (Sterbenz: x - y is exact when
// y/2 <= x <= 2y), so distances keep their accuracy when the updates share a component much larger
// than their spread; the second step centres the rows on their mean (as the reference does), so
// one far-away row does not inflate every |c_a|^2 against the float32 products. A non-finite x_aj
// only reaches row and column a of G (both shifts use finite values only), and G_aa becomes
// non-finite.
//
// Work: the columns are cut into chunks of CH coordinates, each giving its own partial G; partial
// Gs are added in chunk order at the end, so the result does not depend on the thread count.
// Inside a chunk, tiles of TW columns are converted and shifted into an L2-resident float32 tile;
// each pair of row blocks (RI x RJ rows, register-blocked, upper triangle only) runs float32 FMAs
// over runs of 32 vectors per lane, and every run is added into float64 lane accumulators; the lanes
// are added in a fixed order once per tile. Payload rows (quant_rows.h) are decoded straight into
// the tile, so the Gram matrix of n payloads equals that of their decoded rows, bit for bit.
// float32 multiply-adds fuse where the ISA has FMA (fewer roundings; gram needs no cross-ISA
// bit-equality, only determinism per machine and thread count). Set for the whole file so that
// every inlined helper shares it.
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"  // vector values only cross always-inline calls
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "quant_rows.h"
#include "simd.h"

namespace tapestry {
namespace {

using namespace simd;

template <int VL>
struct Vec;
template <>
struct Vec<16> {
    typedef float F __attribute__((vector_size(64)));
    typedef double D __attribute__((vector_size(128)));
};
template <>
struct Vec<8> {
    typedef float F __attribute__((vector_size(32)));
    typedef double D __attribute__((vector_size(64)));
};
template <>
struct Vec<4> {
    typedef float F __attribute__((vector_size(16)));
    typedef double D __attribute__((vector_size(32)));
};

template <class VF>
TAPESTRY_INLINE VF madd(VF a, VF b, VF c) {
    return a * b + c;  // one FMA on AVX2/AVX-512 (fp-contract above)
}

constexpr int RI = 4;  // rows per register block (n is padded with zero rows to a multiple of RI)
constexpr int64_t RUN_VECTORS = 32;  // float32 FMAs per lane between float64 flushes

struct GramJob {
    const char* base;
    int64_t n, np, d, row_bytes, TW;
    int dtype;
    const QuantRows* q;  // payload rows instead of base (then dtype is float32), or null

    // where row i's value at column j lives, and the bytes of w values (for prefetches)
    const char* at(int64_t i, int64_t j, int64_t es) const { return q ? row_at(*q, i, j) : base + i * row_bytes + j * es; }
    int64_t bytes(int64_t w, int64_t es) const { return q ? tapestry::row_bytes(*q, w) : w * es; }
};

struct GramScratch {
    float* tile;      // np x TW
    float* shift;     // TW
    uint32_t* found;  // TW
    float* count;     // TW
    void* dacc;       // RI * RJ float64 lane vectors
};

// row[l] = src[l] as float for l < tw (in place when src is row), and each column's first finite value
template <class T, class S>
TAPESTRY_INLINE void fill_row(const S* src, float* row, int64_t tw, float* shift, uint32_t* found) {
    for (int64_t l = 0; l < tw; ++l) {
        float v;
        if constexpr (std::is_same<S, float>::value)
            v = src[l];
        else
            v = T::to_float(src[l]);
        uint32_t fin = (bits_from_f32(v) & 0x7f800000u) != 0x7f800000u;
        row[l] = v;
        shift[l] = (fin & ~found[l]) ? v : shift[l];
        found[l] |= fin;
    }
}

template <class T, int VL, int RJ>
TAPESTRY_INLINE void gram_chunk(const GramJob& J, int64_t c0, int64_t c1, const GramScratch& S, double* Gp) {
    using VF = typename Vec<VL>::F;
    using VD = typename Vec<VL>::D;
    using R = typename T::Raw;
    constexpr int64_t RUN = RUN_VECTORS * VL;
    const int64_t n = J.n, np = J.np, TW = J.TW;
    float* tile = S.tile;
    float* shift = S.shift;
    uint32_t* found = S.found;
    VD* dacc = static_cast<VD*>(S.dacc);
    for (int64_t s0 = c0; s0 < c1; s0 += TW) {
        const int64_t tw = std::min(TW, c1 - s0);
        for (int64_t l = 0; l < TW; ++l) {
            shift[l] = 0.0f;
            found[l] = 0;
        }
        for (int64_t i = 0; i < n; ++i) {
            float* row = tile + i * TW;
            bool decoded = false;
            if constexpr (std::is_same<T, F32>::value) {
                if (J.q) {  // decoded into the row, then read back as floats
                    switch (J.q->codec) {
                        case kRowsInt8: decode_row<kRowsInt8>(*J.q, i, s0, tw, row); break;
                        case kRowsInt4: decode_row<kRowsInt4>(*J.q, i, s0, tw, row); break;
                        case kRowsFloat16: decode_row<kRowsFloat16>(*J.q, i, s0, tw, row); break;
                        default: decode_row<kRowsBFloat16>(*J.q, i, s0, tw, row); break;
                    }
                    fill_row<T>(row, row, tw, shift, found);
                    decoded = true;
                }
            }
            if (!decoded) fill_row<T>(reinterpret_cast<const R*>(J.base + i * J.row_bytes) + s0, row, tw, shift, found);
            for (int64_t l = tw; l < TW; ++l) row[l] = 0.0f;
        }
        for (int64_t i = n; i < np; ++i)
            for (int64_t l = 0; l < TW; ++l) tile[i * TW + l] = 0.0f;
        float* mean = reinterpret_cast<float*>(found);  // found is done with: reuse it
        float* count = S.count;
        for (int64_t l = 0; l < TW; ++l) mean[l] = count[l] = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
            float* row = tile + i * TW;
            for (int64_t l = 0; l < tw; ++l) {
                float v = row[l] - shift[l];
                bool fin = (bits_from_f32(v) & 0x7f800000u) != 0x7f800000u;
                row[l] = v;
                mean[l] += fin ? v : 0.0f;
                count[l] += fin ? 1.0f : 0.0f;
            }
        }
        for (int64_t l = 0; l < tw; ++l) mean[l] = count[l] > 0.0f ? mean[l] / count[l] : 0.0f;
        for (int64_t i = 0; i < n; ++i) {
            float* row = tile + i * TW;
            for (int64_t l = 0; l < tw; ++l) row[l] -= mean[l];
        }
        // While this tile is multiplied, pull the next one's rows into L2, a few lines per block
        // pair, so that the next conversion pass does not wait on memory.
        const int64_t s1 = s0 + TW;
        const int64_t next_bytes = s1 < c1 ? J.bytes(std::min(TW, c1 - s1), sizeof(R)) : 0;
        const int64_t lines_per_row = (next_bytes + 63) / 64;
        int64_t npairs = 0;
        for (int64_t I = 0; I < np; I += RI) npairs += (np - I) / RJ;
        const int64_t per_pair = (n * lines_per_row + npairs - 1) / npairs;
        int64_t pf_row = 0, pf_line = 0;
        const int64_t nrun = (tw + RUN - 1) / RUN;  // TW is a multiple of RUN: runs past tw read zeros
        for (int64_t I = 0; I < np; I += RI) {
            for (int64_t Jb = I; Jb < np; Jb += RJ) {
                for (int64_t q = 0; q < per_pair && pf_row < n; ++q) {
                    __builtin_prefetch(J.at(pf_row, s1, sizeof(R)) + pf_line * 64, 0, 2);
                    if (++pf_line == lines_per_row) {
                        pf_line = 0;
                        ++pf_row;
                    }
                }
                for (int q = 0; q < RI * RJ; ++q) dacc[q] = VD{};
                for (int64_t run = 0; run < nrun; ++run) {
                    const float* base = tile + run * RUN;
                    VF acc[RI][RJ];
#pragma GCC unroll 16
                    for (int q = 0; q < RI * RJ; ++q) acc[q / RJ][q % RJ] = VF{};
                    for (int64_t c = 0; c < RUN; c += VL) {
                        VF a[RI], b[RJ];
#pragma GCC unroll 4
                        for (int i = 0; i < RI; ++i) a[i] = *reinterpret_cast<const VF*>(base + (I + i) * TW + c);
#pragma GCC unroll 4
                        for (int j = 0; j < RJ; ++j) b[j] = *reinterpret_cast<const VF*>(base + (Jb + j) * TW + c);
#pragma GCC unroll 16
                        for (int q = 0; q < RI * RJ; ++q) acc[q / RJ][q % RJ] = madd(a[q / RJ], b[q % RJ], acc[q / RJ][q % RJ]);
                    }
#pragma GCC unroll 16
                    for (int q = 0; q < RI * RJ; ++q) dacc[q] += __builtin_convertvector(acc[q / RJ][q % RJ], VD);
                }
                for (int q = 0; q < RI * RJ; ++q) {
                    double s = 0.0;
                    for (int l = 0; l < VL; ++l) s += dacc[q][l];
                    Gp[(I + q / RJ) * np + Jb + q % RJ] += s;
                }
            }
        }
    }
}

using ChunkFn = void (*)(const GramJob&, int64_t, int64_t, const GramScratch&, double*);

#define TAPESTRY_GRAM_CHUNK_FN(NAME, ATTR, VL, RJ)                                                 \
    ATTR void NAME(const GramJob& J, int64_t c0, int64_t c1, const GramScratch& S, double* Gp) { \
        if (J.dtype == kFloat32)                                                                   \
            gram_chunk<F32, VL, RJ>(J, c0, c1, S, Gp);                                             \
        else if (J.dtype == kFloat16)                                                              \
            gram_chunk<F16, VL, RJ>(J, c0, c1, S, Gp);                                             \
        else                                                                                       \
            gram_chunk<BF16, VL, RJ>(J, c0, c1, S, Gp);                                            \
    }

TAPESTRY_GRAM_CHUNK_FN(gram_chunk_avx512, TAPESTRY_AVX512, 16, 4)
TAPESTRY_GRAM_CHUNK_FN(gram_chunk_avx2, TAPESTRY_AVX2, 8, 2)
TAPESTRY_GRAM_CHUNK_FN(gram_chunk_portable, , 4, 2)

void run_gram(GramJob J, double* G) {
    const int64_t n = J.n, d = J.d;
    std::fill(G, G + n * n, 0.0);
    if (d <= 0 || n <= 0) return;
    const int64_t np = (n + RI - 1) / RI * RI;
    const int64_t step = RUN_VECTORS * 16;  // a multiple of every ISA's run
    const int64_t TW = std::clamp<int64_t>((65536 / np) / step * step, step, 4 * step);  // tile <= 256 KiB (+ the next in L2)
    // chunks: fixed by n and d only (never by the thread count); partial Gs capped at 64 MiB
    int64_t CH = std::max<int64_t>(65536, TW);
    const int64_t max_parts = std::max<int64_t>(1, (int64_t(64) << 20) / (np * np * 8));
    if ((d + CH - 1) / CH > max_parts) CH = ((d + max_parts - 1) / max_parts + TW - 1) / TW * TW;
    const int64_t P = (d + CH - 1) / CH;
    std::vector<double> parts(static_cast<size_t>(P * np * np), 0.0);
    J.np = np;
    J.TW = TW;
    const Isa isa = active();
    const ChunkFn fn = isa == kAvx512 ? gram_chunk_avx512 : isa == kAvx2 ? gram_chunk_avx2 : gram_chunk_portable;
#pragma omp parallel if (P > 1)
    {
        Scratch<float> tile(static_cast<size_t>(np * TW)), shift(TW), count(TW);
        Scratch<uint32_t> found(TW);
        Scratch<double> dacc(RI * 4 * 16);
        GramScratch S{tile.p, shift.p, found.p, count.p, dacc.p};
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < P; ++p) fn(J, p * CH, std::min(d, (p + 1) * CH), S, parts.data() + p * np * np);
    }
    for (int64_t a = 0; a < n; ++a)
        for (int64_t b = a; b < n; ++b) {
            double s = 0.0;
            for (int64_t p = 0; p < P; ++p) s += parts[p * np * np + a * np + b];
            G[a * n + b] = s;
            G[b * n + a] = s;
        }
}

}  // namespace

void gram(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, double* G) {
    const int64_t es = dtype == kFloat32 ? 4 : 2;
    run_gram({static_cast<const char*>(X), n, 0, d, stride * es, 0, dtype, nullptr}, G);
}

void gram_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n, int64_t d,
                    double* G) {
    const QuantRows q{codes, scales, codec, block};
    run_gram({nullptr, n, 0, d, 0, 0, kFloat32, &q}, G);
}

}  // namespace tapestry
