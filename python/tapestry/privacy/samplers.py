"""Exact integer noise driven by ChaCha20: discrete Gaussian (Canonne, Kamath, Steinke 2020) and
Skellam (a difference of two Poissons, Agarwal, Kairouz, Liu 2021).

Exactness: every random decision is a Bernoulli with a *rational* probability, decided by comparing
uniform random bits with the binary expansion of that rational (integer arithmetic only), or a
uniform integer by Lemire's rejection method. No floating-point number touches the distribution.
The parameters themselves are rationals with denominator ``2^8``: ``sigma2`` and ``mu`` are
rounded *up* to the next multiple of 1/256 (more noise, never less), and the sampler is exact for
that value (:func:`quantize`).

Randomness: output is cut into chunks of :data:`CHUNK` draws; chunk ``j`` reads, in order, the
32-bit words of the ChaCha20 stream with the caller's 32-byte key and the nonce
``purpose (4 bytes) || j (8 bytes, little-endian)``. A chunk's words are consumed by one rule, the
same in the C++ kernel (csrc/cpu/privacy.cpp) and in this file's pure-Python reference:

* ``word()``: the next keystream word;
* ``bit()``: the next bit of a 32-bit buffer (least significant first), refilled with ``word()``;
* ``uniform(n)``, ``n <= 2^32``: Lemire: ``m = word() * n``; while ``m mod 2^32 < (2^32 - n) mod n``
  draw again; return ``m >> 32``;
* ``bern(a, b)`` (probability ``a / b``, ``0 <= a < b``): compare ``bit()``s with the digits of
  ``a / b``; the first difference decides;
* ``bern_exp(a, b)`` (probability ``exp(-a/b)``): ``floor(a/b)`` times ``bern_exp(1, 1)`` (stop at the
  first failure), then the fractional part by the CKS series: count ``K`` while ``bern(a, b K)``
  succeeds; success iff ``K`` is odd.

The discrete Gaussian is CKS Algorithm 3 with ``t = floor(sigma) + 1``: a discrete Laplace proposal
(``U = uniform(t)``, keep with ``bern_exp(U, t)``; ``V`` counts successes of ``bern_exp(1, 1)``;
sign ``bit()``, rejecting ``-0``), accepted with probability
``exp(-(|Y| - sigma2/t)^2 / (2 sigma2))``. Poisson(mu) is a sum of Poisson pieces of at most 1/2,
each drawn by counting successes of ``bern(lam, k)`` for ``k = 1, 2, ...`` (``P(K >= k) = lam^k/k!``)
and accepting ``K`` with probability ``(1 - lam)(K + 1) / (K + 1 - lam)``; its cost grows with mu.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import torch

from .. import _native
from ..secure.prg import chacha20_keystream

CHUNK = 4096                 # draws per keystream chunk (parallel and reproducible)
DEN_BITS = 8                 # parameters are multiples of 2^-8
MAX_SIGMA2 = 2.0 ** 40       # sigma <= 2^20: every intermediate fits in 128 bits
MAX_MU = 2.0 ** 24           # Skellam's cost grows with mu
Y_LIMIT = 1 << 30            # a proposal beyond 1024 sigma (probability < e^-500) is rejected
PURPOSE_DG = b"tdg\x00"
PURPOSE_SK = b"tsk\x00"


def quantize(value: float, name: str, limit: float) -> int:
    """``value`` as the integer numerator over ``2^DEN_BITS``, rounded up; errors name the bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating, Fraction)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0 (zero noise gives no privacy), got {value}")
    if value > limit:
        raise ValueError(f"{name} = {value:g} exceeds the sampler's limit {limit:g}")
    return math.ceil(Fraction(value) * (1 << DEN_BITS))


def key_of(seed) -> bytes:
    """A 32-byte ChaCha20 key: ``seed`` itself when bytes, else SHA-256 of the integer seed."""
    if isinstance(seed, (bytes, bytearray)):
        if len(seed) != 32:
            raise ValueError(f"a bytes seed must be 32 bytes, got {len(seed)}")
        return bytes(seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or 32 bytes, got {type(seed).__name__}")
    return hashlib.sha256(b"tapestry.privacy seed " + str(int(seed)).encode()).digest()


def _count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    return int(count)


def nonce(purpose: bytes, chunk: int) -> bytes:
    return purpose + int(chunk).to_bytes(8, "little")


# -- the pure-Python reference (the contract the C++ kernel matches bit for bit) -----------------
class Stream:
    """One chunk's randomness, consumed by the rules in the module docstring. Counts its words."""

    def __init__(self, key: bytes, nonce_: bytes):
        self.key, self.nonce, self.pos, self.buf, self.nbits, self.words = key, nonce_, 0, [], 0, 0
        self.bits, self.bitbuf = 0, 0

    def word(self) -> int:
        if self.pos == len(self.buf):
            self.buf = chacha20_keystream(self.key, self.nonce, self.words, 256).view(torch.int32).numpy().view(
                np.uint32).tolist()
            self.pos = 0
            self.words += 256
        self.pos += 1
        return self.buf[self.pos - 1]

    def bit(self) -> int:
        if self.bits == 0:
            self.bitbuf, self.bits = self.word(), 32
        b = self.bitbuf & 1
        self.bitbuf >>= 1
        self.bits -= 1
        return b

    def uniform(self, n: int) -> int:
        m = self.word() * n
        threshold = ((1 << 32) - n) % n
        while (m & 0xFFFFFFFF) < threshold:
            m = self.word() * n
        return m >> 32

    def bern(self, a: int, b: int) -> int:
        if a == 0:
            return 0
        r = a
        while True:
            r <<= 1
            digit = 1 if r >= b else 0
            if digit:
                r -= b
            u = self.bit()
            if u != digit:
                return 1 if u < digit else 0

    def bern_exp(self, a: int, b: int) -> int:
        while a >= b:
            if not self._exp_frac(1, 1):
                return 0
            a -= b
        return self._exp_frac(a, b)

    def _exp_frac(self, a: int, b: int) -> int:
        # exp(-a/b) for 0 <= a <= b: P(K >= k) = (a/b)^(k-1)/(k-1)!, and P(K odd) = exp(-a/b).
        k = 1
        while (self.bern(a, b * k) if a < b * k else 1):
            k += 1
        return k & 1


def _dg_one(s: Stream, S: int, t: int) -> int:
    Q = 1 << DEN_BITS
    while True:
        u = s.uniform(t)
        if not s.bern_exp(u, t):
            continue
        v = 0
        while s._exp_frac(1, 1):
            v += 1
        sign = s.bit()
        x = u + t * v
        if sign and x == 0:
            continue
        if x >= Y_LIMIT:
            continue
        num = (x * Q * t - S) ** 2
        if s.bern_exp(num, 2 * S * Q * t * t):
            return -x if sign else x


def _poisson_piece(s: Stream, a: int, b: int) -> int:
    # Poisson(a/b) with a/b <= 1/2: K with P(K >= k) = lam^k / k!, kept w.p. (1-lam)(K+1)/(K+1-lam).
    while True:
        k = 0
        while s.bern(a, b * (k + 1)):
            k += 1
        if s.bern((b - a) * (k + 1), (k + 1) * b - a):
            return k


def _poisson(s: Stream, M: int) -> int:
    Q = 1 << DEN_BITS
    halves, rest = divmod(M, Q // 2)
    total = sum(_poisson_piece(s, Q // 2, Q) for _ in range(halves))
    return total + (_poisson_piece(s, rest, Q) if rest else 0)


def _sigma_t(S: int) -> int:
    return math.isqrt(S >> DEN_BITS) + 1  # floor(sqrt(S / 2^8)) + 1


def reference_discrete_gaussian(sigma2: float, count: int, *, seed) -> tuple[torch.Tensor, int]:
    """The pure-Python sampler (slow; the contract): draws and the keystream words consumed."""
    S, key = quantize(sigma2, "sigma2", MAX_SIGMA2), key_of(seed)
    t, out, words = _sigma_t(S), [], 0
    for c0 in range(0, _count(count), CHUNK):
        s = Stream(key, nonce(PURPOSE_DG, c0 // CHUNK))
        out += [_dg_one(s, S, t) for _ in range(min(CHUNK, count - c0))]
        words += s.words - len(s.buf) + s.pos
    return torch.tensor(out, dtype=torch.int64), words


def reference_skellam(mu: float, count: int, *, seed) -> tuple[torch.Tensor, int]:
    M, key = quantize(mu, "mu", MAX_MU), key_of(seed)
    out, words = [], 0
    for c0 in range(0, _count(count), CHUNK):
        s = Stream(key, nonce(PURPOSE_SK, c0 // CHUNK))
        out += [_poisson(s, M) - _poisson(s, M) for _ in range(min(CHUNK, count - c0))]
        words += s.words - len(s.buf) + s.pos
    return torch.tensor(out, dtype=torch.int64), words


# -- public entry points (the C++ kernel when built, else the reference) -------------------------
def _kernel():
    C = _native.load("_C")
    return None if isinstance(C, Exception) or not hasattr(C, "dp_discrete_gaussian") else C


def _key_words(key: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(key, dtype="<u4").astype(np.uint32).view(np.int32).copy())


def _native_draw(fn_name: str, param: int, count: int, key: bytes, purpose: bytes):
    C = _kernel()
    if C is None:
        return None
    out = torch.empty(count, dtype=torch.int64)
    kw = _key_words(key)
    pw = int.from_bytes(purpose, "little")
    words = getattr(C, fn_name)(out.data_ptr(), count, param, kw.data_ptr(), pw, CHUNK)
    return out, int(words)


def sample_discrete_gaussian(sigma2: float, count: int, *, seed, return_words: bool = False):
    """``count`` independent draws with ``P(k) ~ exp(-k^2 / (2 sigma2))`` as an int64 tensor.

    ``seed``: an int or a 32-byte key; the same seed gives the same draws on every backend.
    ``sigma2`` is rounded up to a multiple of 2^-8 (the sampler is exact for that value).
    ``return_words``: also the number of ChaCha20 words consumed (the honest cost)."""
    S, key, count = quantize(sigma2, "sigma2", MAX_SIGMA2), key_of(seed), _count(count)
    got = _native_draw("dp_discrete_gaussian", S, count, key, PURPOSE_DG)
    if got is None:
        got = reference_discrete_gaussian(sigma2, count, seed=seed)
    return got if return_words else got[0]


def sample_skellam(mu: float, count: int, *, seed, return_words: bool = False):
    """``count`` draws of Poisson(mu) - Poisson(mu) (variance ``2 mu``) as an int64 tensor; ``mu``
    rounded up to a multiple of 2^-8. Cost grows linearly with ``mu`` (documented in docs/privacy.md)."""
    M, key, count = quantize(mu, "mu", MAX_MU), key_of(seed), _count(count)
    got = _native_draw("dp_skellam", M, count, key, PURPOSE_SK)
    if got is None:
        got = reference_skellam(mu, count, seed=seed)
    return got if return_words else got[0]


def discrete_gaussian_pmf(sigma2: float, support: np.ndarray) -> np.ndarray:
    """The exact pmf on ``support`` (float64, normalised over +-(40 sigma + 40)) for the quantized sigma2."""
    s2 = quantize(sigma2, "sigma2", MAX_SIGMA2) / (1 << DEN_BITS)
    r = int(40 * math.sqrt(s2)) + 40
    ks = np.arange(-r, r + 1, dtype=np.float64)
    z = np.exp(-ks ** 2 / (2 * s2)).sum()
    return np.exp(-np.asarray(support, dtype=np.float64) ** 2 / (2 * s2)) / z
