// weighted_mean: out_j = sum_i w_i x_ij, accumulated in float64 in row order.
//
// Columns are cut into blocks of B coordinates whose float64 accumulators stay in L1; each block
// streams the rows with w_i != 0 (the others are never read, so their NaN cannot propagate).
// Multiply then add, never fused (-ffp-contract=off): every ISA and every lane does the same
// arithmetic, so any column blocking gives bit-identical results. Payload rows (quant_rows.h) are
// decoded a block of one row at a time into L1 and summed the same way.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "quant_rows.h"
#include "simd.h"
#include "threads.h"

namespace tapestry {
namespace {

using namespace simd;

constexpr int64_t B = 2048;  // coordinates per block: 16 KiB of float64 accumulators

struct MeanJob {
    const char* base;
    const int64_t* row_off;  // byte offsets of the rows with w != 0 (payload rows: their indices)
    const double* w;         // their weights
    int64_t m, d;
    int dtype;
    float* out;
    const QuantRows* q;  // payload rows instead of base, or null
};

template <class T>
TAPESTRY_INLINE void mean_block(const MeanJob& J, int64_t j0, double* acc) {
    using R = typename T::Raw;
    const int64_t b = std::min(B, J.d - j0);
    for (int64_t l = 0; l < b; ++l) acc[l] = 0.0;
    for (int64_t i = 0; i < J.m; ++i) {
        const R* src = reinterpret_cast<const R*>(J.base + J.row_off[i]) + j0;
        const double wi = J.w[i];
        if (i + 1 < J.m) {  // the next row's part of this block, into L2, while this row is summed
            const char* next = J.base + J.row_off[i + 1] + j0 * static_cast<int64_t>(sizeof(R));
            for (int64_t byte = 0; byte < b * static_cast<int64_t>(sizeof(R)); byte += 64) __builtin_prefetch(next + byte, 0, 2);
        }
        for (int64_t l = 0; l < b; ++l) acc[l] += wi * static_cast<double>(T::to_float(src[l]));
    }
    for (int64_t l = 0; l < b; ++l) J.out[j0 + l] = static_cast<float>(acc[l]);
}

template <int CODEC>
TAPESTRY_INLINE void mean_block_quantized(const MeanJob& J, int64_t j0, double* acc, float* v) {
    const int64_t b = std::min(B, J.d - j0);
    for (int64_t l = 0; l < b; ++l) acc[l] = 0.0;
    for (int64_t r = 0; r < J.m; ++r) {
        const int64_t i = J.row_off[r];
        if (r + 1 < J.m) prefetch_row(*J.q, J.row_off[r + 1], j0, b);
        decode_row<CODEC>(*J.q, i, j0, b, v);
        const double wi = J.w[r];
        for (int64_t l = 0; l < b; ++l) acc[l] += wi * static_cast<double>(v[l]);
    }
    for (int64_t l = 0; l < b; ++l) J.out[j0 + l] = static_cast<float>(acc[l]);
}

using BlockFn = void (*)(const MeanJob&, int64_t, double*, float*);

#define TAPESTRY_MEAN_BLOCK_FN(NAME, ATTR)                                          \
    ATTR void NAME(const MeanJob& J, int64_t j0, double* acc, float* v) {           \
        if (!J.q) {                                                                 \
            if (J.dtype == kFloat32)                                                \
                mean_block<F32>(J, j0, acc);                                        \
            else if (J.dtype == kFloat16)                                           \
                mean_block<F16>(J, j0, acc);                                        \
            else                                                                    \
                mean_block<BF16>(J, j0, acc);                                       \
            return;                                                                 \
        }                                                                           \
        switch (J.q->codec) {                                                       \
            case kRowsInt8: return mean_block_quantized<kRowsInt8>(J, j0, acc, v);  \
            case kRowsInt4: return mean_block_quantized<kRowsInt4>(J, j0, acc, v);  \
            case kRowsFloat16: return mean_block_quantized<kRowsFloat16>(J, j0, acc, v); \
            default: return mean_block_quantized<kRowsBFloat16>(J, j0, acc, v);     \
        }                                                                           \
    }

TAPESTRY_MEAN_BLOCK_FN(mean_block_avx512, TAPESTRY_AVX512)
TAPESTRY_MEAN_BLOCK_FN(mean_block_avx2, TAPESTRY_AVX2)
TAPESTRY_MEAN_BLOCK_FN(mean_block_portable, )

void run_mean(MeanJob J) {
    const Isa isa = active();
    const BlockFn fn = isa == kAvx512 ? mean_block_avx512 : isa == kAvx2 ? mean_block_avx2 : mean_block_portable;
    const int64_t nblocks = (J.d + B - 1) / B;
    // bytes read: 512 KiB per thread (a single core sums that in tens of microseconds)
    const int T = nblocks > 1 ? threads_for(J.m * J.d * (J.q ? 1 : (J.dtype == kFloat32 ? 4 : 2)), 512 << 10) : 1;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        Scratch<double> acc(B);
        Scratch<float> v(J.q ? B : 0);
#pragma omp for schedule(dynamic, 2)  // blocks are independent: balances a busy machine
        for (int64_t i = 0; i < nblocks; ++i) fn(J, i * B, acc.p, v.p);
    }
}

}  // namespace

void weighted_mean(const void* X, int64_t n, int64_t d, int64_t stride, int dtype, const double* w, float* out) {
    if (d <= 0) return;
    const int64_t es = dtype == kFloat32 ? 4 : 2;
    std::vector<int64_t> off;
    std::vector<double> wk;
    for (int64_t i = 0; i < n; ++i)
        if (w[i] != 0.0) {
            off.push_back(i * stride * es);
            wk.push_back(w[i]);
        }
    run_mean({static_cast<const char*>(X), off.data(), wk.data(), static_cast<int64_t>(off.size()), d, dtype, out,
              nullptr});
}

void weighted_mean_encoded(const void* const* codes, const float* const* scales, int codec, int64_t block, int64_t n,
                             int64_t d, const double* w, float* out) {
    if (d <= 0) return;
    std::vector<int64_t> rows;
    std::vector<double> wk;
    for (int64_t i = 0; i < n; ++i)
        if (w[i] != 0.0) {
            rows.push_back(i);
            wk.push_back(w[i]);
        }
    const QuantRows q{codes, scales, codec, block};
    run_mean({nullptr, rows.data(), wk.data(), static_cast<int64_t>(rows.size()), d, kFloat32, out, &q});
}

}  // namespace tapestry
