// AddressSanitizer/UBSan harness for the C++ quant kernels and the fused decode-and-select ops (built and run by
// tests/test_compression_fuzz.py; not part of the package).
//
// stdin: records produced by the Python decoder from fuzzed payloads that passed validation, i.e.
// exactly the (codes, scales, m, block) the decoder hands to the kernels:
//   u8 op (1 = dequantize_int8, 2 = dequantize_int4), u64 m, u64 block,
//   u64 qlen, qlen bytes, u64 nscales, nscales float32
// Each buffer is copied into a heap allocation of exactly its size, so any read past the end is
// an ASan error. Then random quantize/dequantize round trips over hostile float bit patterns
// (NaN, Inf, subnormals) with exact-size buffers. Prints "ok <records> <random cases>".
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"

static bool read_exact(void* dst, size_t n) { return fread(dst, 1, n, stdin) == n; }

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static uint64_t rnd() {  // splitmix64
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int main() {
    long records = 0;
    uint8_t op;
    while (read_exact(&op, 1)) {
        uint64_t m, block, qlen, nscales;
        if (!read_exact(&m, 8) || !read_exact(&block, 8) || !read_exact(&qlen, 8)) return 2;
        uint8_t* q = new uint8_t[qlen ? qlen : 1];
        if (!read_exact(q, qlen) || !read_exact(&nscales, 8)) return 2;
        float* s = new float[nscales ? nscales : 1];
        if (!read_exact(s, nscales * 4)) return 2;
        const uint64_t want_q = op == 1 ? m : (m + 1) / 2;
        if (block < 2 || qlen != want_q || nscales != (m + block - 1) / block) {
            fprintf(stderr, "inconsistent record: op %d m %llu block %llu qlen %llu nscales %llu\n", op,
                    (unsigned long long)m, (unsigned long long)block, (unsigned long long)qlen,
                    (unsigned long long)nscales);
            return 3;
        }
        float* out = new float[m ? m : 1];
        const float* sp = s;
        if (op == 1) {
            const int8_t* qp = reinterpret_cast<const int8_t*>(q);
            tapestry::dequantize_int8(&qp, &sp, 1, int64_t(m), int64_t(block), &out);
        } else {
            const uint8_t* qp = q;
            tapestry::dequantize_int4(&qp, &sp, 1, int64_t(m), int64_t(block), &out);
        }
        volatile float sink = 0;
        for (uint64_t j = 0; j < m; ++j) sink = sink + out[j];
        // the fused decode-and-select ops over the same exact-size buffers: 3 rows (register path)
        // and 6 rows (two sorted runs, and the tile path for the mean around the median: the harness
        // is built with TAPESTRY_REG_MAX=4)
        // (codec 0/1: int8/int4 as recorded; codec 2/3: the same bytes read as qlen / 2 float16 /
        // bfloat16 values, whatever bit patterns they hold)
        const void* codes[6] = {q, q, q, q, q, q};
        const float* scales6[6] = {s, s, s, s, s, s};
        const int64_t rows[3] = {2, 0, 5};
        const double w[6] = {0.5, 0.0, 0.25, 0.25, 0.0, 0.0};
        for (int codec : {op == 1 ? 0 : 1, 2, 3}) {
            const int64_t mv = codec >= 2 ? int64_t(qlen / 2) : int64_t(m);
            for (int64_t n : {3, 6}) {
                tapestry::weighted_mean_encoded(codes, scales6, codec, int64_t(block), n, mv, w, out);
                double G[36];
                tapestry::gram_encoded(codes, scales6, codec, int64_t(block), n, mv, G);
                tapestry::trimmed_mean_encoded(codes, scales6, codec, int64_t(block), n, mv, 1, out);
                tapestry::coord_median_encoded(codes, scales6, codec, int64_t(block), n, mv, out);
                tapestry::mean_around_median_encoded(codes, scales6, codec, int64_t(block), n, mv, rows, n / 2, 1,
                                                       out);
                for (int64_t j = 0; j < mv; ++j) sink = sink + out[j];
            }
            if (records < 8) {  // 1030 rows: the float32 partitioning path (select_wide.h)
                std::vector<const void*> many_codes(1030, q);
                std::vector<const float*> many_scales(1030, s);
                tapestry::trimmed_mean_encoded(many_codes.data(), many_scales.data(), codec, int64_t(block), 1030, mv,
                                                 257, out);
                tapestry::coord_median_encoded(many_codes.data(), many_scales.data(), codec, int64_t(block), 1030, mv,
                                                 out);
                for (int64_t j = 0; j < mv; ++j) sink = sink + out[j];
            }
        }
        delete[] out;
        delete[] s;
        delete[] q;
        ++records;
    }
    long cases = 0;
    for (int it = 0; it < 300; ++it) {
        const int64_t m = int64_t(rnd() % 3000);
        const int64_t block = 2 * int64_t(1 + rnd() % 2048);
        const int dtype = int(rnd() % 3);
        const size_t esize = dtype == 0 ? 4 : 2;
        uint8_t* x = new uint8_t[m * esize + 1];
        for (int64_t j = 0; j < int64_t(m * esize); ++j) x[j] = uint8_t(rnd());
        if (rnd() % 2) {  // mostly finite values: zero the exponent's top bit in most elements
            for (int64_t j = 0; j < m; ++j)
                if (rnd() % 16) x[j * esize + esize - 1] &= 0x3f;
        }
        const int64_t nb = (m + block - 1) / block;
        float* scales = new float[nb ? nb : 1];
        float* out = new float[m ? m : 1];
        const float* sp = scales;
        const bool stochastic = rnd() % 2;
        int8_t* q8 = new int8_t[m ? m : 1];
        tapestry::quantize_int8(x, dtype, m, block, stochastic, uint32_t(rnd()), uint32_t(rnd()), q8, scales);
        const int8_t* q8p = q8;
        tapestry::dequantize_int8(&q8p, &sp, 1, m, block, &out);
        uint8_t* q4 = new uint8_t[(m + 1) / 2 ? (m + 1) / 2 : 1];
        tapestry::quantize_int4(x, dtype, m, block, stochastic, uint32_t(rnd()), uint32_t(rnd()), q4, scales);
        const uint8_t* q4p = q4;
        tapestry::dequantize_int4(&q4p, &sp, 1, m, block, &out);
        delete[] q4;
        delete[] q8;
        delete[] out;
        delete[] scales;
        delete[] x;
        ++cases;
    }
    printf("ok %ld %ld\n", records, cases);
    return 0;
}
