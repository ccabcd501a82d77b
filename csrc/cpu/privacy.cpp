// Exact discrete Gaussian / Skellam samplers on ChaCha20, and the fused distributed-DP client path
// (the Walsh-Hadamard transform it calls is in hadamard.cpp). The samplers follow
// python/tapestry/privacy/samplers.py word for word (that file's docstring is the contract: which
// keystream word or bit each decision reads), so both produce the same draws. Every probability is
// a rational decided with integer arithmetic (128-bit where the discrete Gaussian's acceptance
// exponent needs it): Canonne, Kamath, Steinke 2020, Algorithm 3.
#include "privacy.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "chacha.h"

namespace tapestry {
namespace {

using u128 = unsigned __int128;
constexpr int kQBits = 8;                 // parameters are integers over 2^8
constexpr uint64_t kYLimit = 1ull << 30;  // proposals past 1024 sigma are rejected (p < e^-500)

class Stream {
  public:
    Stream(const uint32_t* key, uint32_t purpose, uint64_t chunk) {
        std::memcpy(key_, key, 32);
        nonce_[0] = purpose;
        nonce_[1] = uint32_t(chunk);
        nonce_[2] = uint32_t(chunk >> 32);
    }
    __attribute__((always_inline)) uint32_t word() {
        if (pos_ == kBuf) {
            chacha20_keystream(buf_, key_, nonce_, produced_, kBuf);
            produced_ += kBuf;
            pos_ = 0;
        }
        ++used_;
        return buf_[pos_++];
    }
    __attribute__((always_inline)) uint32_t bit() {
        if (nbits_ == 0) refill_bits();
        uint32_t b = bits_ >> 31;
        consume(1);
        return b;
    }
    // Lemire's unbiased multiply-and-reject, n <= 2^32.
    uint64_t uniform(uint64_t n) {
        uint64_t m = uint64_t(word()) * n;
        if ((m & 0xFFFFFFFFull) < n) {  // the division only where a rejection is possible
            uint64_t threshold = ((uint64_t(1) << 32) - n) % n;
            while ((m & 0xFFFFFFFFull) < threshold) m = uint64_t(word()) * n;
        }
        return m >> 32;
    }
    // Bernoulli(a / b), 0 <= a <= b < 2^127: random bits against the binary digits of a / b, the
    // first that differ deciding (digit 1, bit 0: true). Below 2^63, the digits that meet the
    // buffered bits come from one division (as many as 64 - bitlen(b)) and one compare: the
    // bit-at-a-time loop mispredicts a branch per bit.
    bool bern(u128 a, u128 b) {
        if (a == 0) return false;
        if (b >> 63) return bern_bitwise(a, b);
        uint64_t r = uint64_t(a);
        const uint64_t d = uint64_t(b);
        const int room = __builtin_clzll(d);  // r <= d, so r << room fits in 64 bits
        for (;;) {
            if (nbits_ == 0) refill_bits();
            const int k = std::min(nbits_, room);
            uint64_t digits = (uint64_t(1) << k) - 1;  // a / b = 1 = 0.111...: all ones, r stays
            if (r < d) {
                digits = (r << k) / d;  // the next k digits, the first on top
                r = (r << k) - digits * d;
            }
            const uint32_t top = uint32_t(digits << (32 - k));
            const uint32_t diff = (top ^ bits_) & ~(~0u >> (k - 1) >> 1);  // the top k bits only
            if (diff) {
                const int m = __builtin_clz(diff);
                consume(m + 1);
                return (top >> (31 - m)) & 1u;
            }
            consume(k);
        }
    }
    bool bern_bitwise(u128 a, u128 b) {
        u128 r = a;
        for (;;) {
            r <<= 1;
            uint32_t digit = r >= b;
            if (digit) r -= b;
            uint32_t u = bit();
            if (u != digit) return u < digit;
        }
    }
    // exp(-a/b) for a <= b: count K while Bernoulli(a / (b K)); P(K odd) = exp(-a/b).
    bool exp_frac(u128 a, u128 b) {
        u128 k = 1;
        while (a >= b * k ? true : bern(a, b * k)) ++k;
        return k & 1;
    }
    bool bern_exp(u128 a, u128 b) {
        while (a >= b) {
            if (!exp_frac(1, 1)) return false;
            a -= b;
        }
        return exp_frac(a, b);
    }
    int64_t used() const { return used_; }

  private:
    // bits_ holds the unread bits of the last word taken for bits, the next one on top: the word
    // reversed, as the reference reads a word's bits from its least significant one.
    void refill_bits() {
        uint32_t x = word();
        x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
        x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
        x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
        bits_ = __builtin_bswap32(x);
        nbits_ = 32;
    }
    __attribute__((always_inline)) void consume(int j) {  // 1 <= j <= nbits_
        bits_ = uint32_t(uint64_t(bits_) << j);
        nbits_ -= j;
    }

    static constexpr int64_t kBuf = 256;
    uint32_t key_[8], nonce_[3], buf_[kBuf], bits_ = 0;
    int64_t pos_ = kBuf, produced_ = 0, used_ = 0;
    int nbits_ = 0;
};

uint64_t isqrt(uint64_t v) {
    uint64_t r = uint64_t(std::sqrt(double(v)));
    while (r * r > v) --r;
    while ((r + 1) * (r + 1) <= v) ++r;
    return r;
}

int64_t dg_one(Stream& s, uint64_t S, uint64_t t) {
    const u128 Q = u128(1) << kQBits;
    for (;;) {
        uint64_t u = s.uniform(t);
        if (!s.bern_exp(u, t)) continue;
        uint64_t v = 0;
        while (s.exp_frac(1, 1)) ++v;
        uint32_t sign = s.bit();
        uint64_t x = u + t * v;
        if (sign && x == 0) continue;
        if (x >= kYLimit) continue;
        // exp(-(x - sigma2/t)^2 / (2 sigma2)) with sigma2 = S / Q: (x Q t - S)^2 / (2 S Q t^2)
        u128 xq = u128(x) * Q * t;
        u128 diff = xq >= S ? xq - S : u128(S) - xq;
        if (s.bern_exp(diff * diff, u128(2) * S * Q * t * t)) return sign ? -int64_t(x) : int64_t(x);
    }
}

// Poisson(a / b), a / b <= 1/2: K with P(K >= k) = lam^k / k!, kept w.p. (1 - lam)(K+1) / (K+1 - lam).
int64_t poisson_piece(Stream& s, uint64_t a, uint64_t b) {
    for (;;) {
        uint64_t k = 0;
        while (s.bern(a, u128(b) * (k + 1))) ++k;
        if (s.bern(u128(b - a) * (k + 1), u128(k + 1) * b - a)) return int64_t(k);
    }
}

int64_t poisson(Stream& s, uint64_t M) {
    const uint64_t Q = uint64_t(1) << kQBits;
    uint64_t halves = M / (Q / 2), rest = M % (Q / 2);
    int64_t total = 0;
    for (uint64_t i = 0; i < halves; ++i) total += poisson_piece(s, Q / 2, Q);
    if (rest) total += poisson_piece(s, rest, Q);
    return total;
}

template <class Draw>
int64_t run_chunks(int64_t* out, int64_t count, const uint32_t* key, uint32_t purpose, int64_t chunk, Draw draw) {
    int64_t nchunks = (count + chunk - 1) / chunk, words = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : words) if (nchunks > 1)
    for (int64_t c = 0; c < nchunks; ++c) {
        Stream s(key, purpose, uint64_t(c));
        int64_t end = std::min(count, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) out[i] = draw(s);
        words += s.used();
    }
    return words;
}

}  // namespace

int64_t dp_discrete_gaussian(int64_t* out, int64_t count, uint64_t S, const uint32_t* key, uint32_t purpose,
                             int64_t chunk) {
    uint64_t t = isqrt(S >> kQBits) + 1;
    return run_chunks(out, count, key, purpose, chunk, [S, t](Stream& s) { return dg_one(s, S, t); });
}

int64_t dp_skellam(int64_t* out, int64_t count, uint64_t M, const uint32_t* key, uint32_t purpose, int64_t chunk) {
    return run_chunks(out, count, key, purpose, chunk, [M](Stream& s) { return poisson(s, M) - poisson(s, M); });
}

int64_t dp_client_encode(uint32_t* out, float* work, const float* x, int64_t d, int64_t D, double factor,
                         const uint32_t* sign_words, float rot_scale, double scale, const uint32_t* round_key,
                         const uint32_t* round_nonce, int64_t bound2, int64_t max_tries, uint64_t noise_q8,
                         bool skellam, const uint32_t* noise_key, uint32_t noise_purpose, int64_t chunk, int bits,
                         const uint32_t* mask_keys, const int8_t* mask_signs, int64_t nmask, const uint32_t* mask_nonce) {
    constexpr int64_t kTile = 4096;  // keystream words per rounding tile (a multiple of 16)
#pragma omp parallel for schedule(static) if (D >= 4 * kTile)
    for (int64_t i = 0; i < D; ++i) work[i] = i < d ? float(double(x[i]) * factor) : 0.0f;
    dp_fwht(work, work, D, sign_words, rot_scale);
    int32_t* q = reinterpret_cast<int32_t*>(out);  // |q| < 2^31 (the plan bounds it); rounded in place
    int64_t attempt = 0;
    for (; attempt < max_tries; ++attempt) {
        __int128 sumsq = 0;
        int64_t ntiles = (D + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (ntiles >= 4)
        for (int64_t t = 0; t < ntiles; ++t) {
            uint32_t u[kTile];
            int64_t lo = t * kTile, n = std::min(kTile, D - lo);
            chacha20_keystream(u, round_key, round_nonce, uint64_t(attempt * D + lo), n);
            __int128 part = 0;
            for (int64_t j = 0; j < n; ++j) {
                double y = double(work[lo + j]) * scale, f = std::floor(y);
                int64_t v = int64_t(f) + (double(u[j]) / 4294967296.0 < y - f ? 1 : 0);
                q[lo + j] = int32_t(v);
                part += __int128(v) * v;
            }
#pragma omp critical
            sumsq += part;
        }
        if (sumsq <= bound2) break;
    }
    if (attempt == max_tries) return -1;
    const uint64_t S = noise_q8;
    const uint64_t t = isqrt(S >> kQBits) + 1;
    const uint32_t ring = bits >= 32 ? 0xFFFFFFFFu : ((1u << bits) - 1u);
    int64_t nchunks = (D + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) if (nchunks > 1)
    for (int64_t c = 0; c < nchunks; ++c) {
        Stream s(noise_key, noise_purpose, uint64_t(c));
        int64_t end = std::min(D, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) {
            int64_t z = skellam ? poisson(s, S) - poisson(s, S) : dg_one(s, S, t);
            out[i] = uint32_t(int64_t(q[i]) + z) & ring;
        }
    }
    if (nmask > 0) chacha20_mask(out, out, D, mask_keys, mask_signs, nmask, mask_nonce, 0);
    return attempt + 1;
}

}  // namespace tapestry
