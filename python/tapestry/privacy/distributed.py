"""Distributed DP inside secure sum: distributed discrete Gaussian (Kairouz, Liu, Steinke 2021) and
Skellam (Agarwal, Kairouz, Liu 2021). No party, the server included, sees a noiseless sum.

Client ``u`` (:meth:`DistributedDP.encode`): clip to L2 norm ``c``; rotate (:func:`rotate`, one seed
per round shared by all); multiply by the scale ``s``; round stochastically to integers, redrawing
the rounding until ``||round||_2 <= Delta_2`` (conditional rounding); add integer noise of variance
``sigma_s^2`` (discrete Gaussian, or Skellam with ``mu = sigma_s^2 / 2``); reduce mod ``2^b``. The
ring vectors then go through :func:`tapestry.secure.simulate_round` (masks in ``Z_2^32``, whose sums
reduce exactly to ``Z_2^b`` since ``2^b`` divides ``2^32``). The server (:meth:`decode`) reduces
the sum mod ``2^b``, reads it as signed, divides by ``s`` and un-rotates.

Parameters (:func:`plan`, docs/privacy.md has the derivations), from ``(n, c, z, b)``:

* ``Delta_2 = min(s c + sqrt(D), sqrt(s^2 c^2 + D/4 + sqrt(2 ln(1/beta)) (s c + sqrt(D)/2)))``, the
  norm bound of a rounded vector (Kairouz et al., conditional rounding with ``beta = exp(-1/2)``);
* ``sigma_s = z Delta_2 / sqrt(n)``: the ``n`` clients' noise sums to a Gaussian-like noise of
  multiplier ``z`` over the sum's sensitivity ``Delta_2``;
* wrap-around: a coordinate of the ring sum is ``s (R v)_i + rounding + noise`` with ``||v|| <= n c``
  (adversarial inputs all aligned); each part is sub-Gaussian (variance proxies ``s^2 n^2 c^2 / D``,
  ``n / 4``, ``n sigma_s^2``, times ``cosh 1`` for Skellam's), so
  ``P(any |coordinate| >= 2^(b-1)) <= 2 D exp(-2^(2b-2) / (2 V))``. ``s`` is the largest scale with
  that bound at most ``wrap_prob``; none existing is an error naming the inequality.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..secure.prg import chacha20_keystream
from .rotation import padded, rotate, sign_words, unrotate
from .samplers import (CHUNK, DEN_BITS, PURPOSE_DG, PURPOSE_SK, _kernel, quantize, sample_discrete_gaussian,
                       sample_skellam)

log = logging.getLogger("tapestry.privacy")
MECHANISMS = ("dgauss", "skellam")
BETA = math.exp(-0.5)
NONCE_ROUND = b"tapestry-drd"
MAX_ROUNDING_TRIES = 1000
SKELLAM_MAX_MU = 4096  # the exact Skellam sampler sums O(mu) Poisson pieces per draw


def _delta2(s: float, c: float, D: int, beta: float = BETA) -> float:
    a = s * c + math.sqrt(D)
    b = math.sqrt((s * c) ** 2 + D / 4 + math.sqrt(2 * math.log(1 / beta)) * (s * c + math.sqrt(D) / 2))
    return min(a, b)


@dataclass(frozen=True)
class Plan:
    n: int                 # clients whose noise is in every sum (the minimum that answer)
    d: int
    D: int                 # rotated length, a power of two
    clip: float
    noise_multiplier: float
    bits: int
    mechanism: str
    wrap_prob: float
    scale: float           # s
    delta2: float          # rounded-vector norm bound (the sum's sensitivity in ring units)
    local_var: float       # sigma_s^2 as sampled (rounded up to a multiple of 2^-8)
    wrap_bound: float      # the proved bound on P(wrap-around in a round), <= wrap_prob
    tau: float             # Kairouz et al.'s discrete-vs-continuous term (dgauss), reported

    @property
    def effective_noise_multiplier(self) -> float:
        """sqrt(n sigma_s^2) / Delta_2: what the accountant composes (>= the requested one)."""
        return math.sqrt(self.n * self.local_var) / self.delta2

    @property
    def ring_bits(self) -> int:
        return 32

    @property
    def bound2(self) -> int:
        """Conditional rounding keeps ``sum q_i^2 <= floor(Delta_2^2)`` (exact integers)."""
        return math.floor(self.delta2 ** 2)


def _variance_proxy(s: float, n: int, c: float, D: int, z: float, mech: str) -> float:
    noise = z ** 2 * _delta2(s, c, D) ** 2  # n sigma_s^2
    return s * s * (n * c) ** 2 / D + n / 4 + noise * (math.cosh(1.0) if mech == "skellam" else 1.0)


def plan(*, n: int, d: int, clip: float, noise_multiplier: float, bits: int = 20, mechanism: str = "dgauss",
         wrap_prob: float = 1e-6) -> Plan:
    """Choose the scale for ``n`` clients, L2 clip ``clip``, noise multiplier ``z``, ring ``Z_2^bits``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be finite and > 0, got {clip}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier z must be finite and > 0 (z = 0 gives no privacy), got {noise_multiplier}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ValueError(f"bits must be an int in [2, 32] (the secure sum's Z_2^32 ring), got {bits!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if not 0 < wrap_prob < 1:
        raise ValueError(f"wrap_prob must be in (0, 1), got {wrap_prob}")
    D = padded(d)
    T = 2.0 ** (bits - 1)
    # the local variance is rounded up to a multiple of 2^-8 (up to twice that for Skellam's mu): leave room
    vmax = T * T / (2 * math.log(2 * D / wrap_prob)) - 2 * n * math.cosh(1.0) / 2 ** DEN_BITS
    v0 = _variance_proxy(0.0, n, clip, D, noise_multiplier, mechanism)
    if v0 >= vmax:
        raise ValueError(
            f"{bits} bits cannot hold {n} clients at d={d} without likely wrap-around: even at scale -> 0 the sum's "
            f"variance proxy n/4 + z^2 Delta_2^2 = {v0:.4g} must be < 2^(2b-2) / (2 ln(2D/p)) = {vmax:.4g} "
            f"(p = wrap_prob = {wrap_prob:g}); use more bits or fewer clients")
    lo, hi = 0.0, 1.0
    while _variance_proxy(hi, n, clip, D, noise_multiplier, mechanism) < vmax:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _variance_proxy(mid, n, clip, D, noise_multiplier, mechanism) < vmax else (lo, mid)
    s = lo
    delta2 = _delta2(s, clip, D)
    sigma2 = (noise_multiplier * delta2) ** 2 / n
    if mechanism == "skellam" and sigma2 / 2 > SKELLAM_MAX_MU:
        raise ValueError(f"Skellam's exact sampler costs O(mu) per draw: mu = sigma_s^2 / 2 = {sigma2 / 2:.4g} > "
                         f"{SKELLAM_MAX_MU} at {bits} bits; use fewer bits or the dgauss mechanism")
    if sigma2 > 2.0 ** 40:
        raise ValueError(f"local noise variance sigma_s^2 = {sigma2:.4g} > 2^40, the exact sampler's limit, at {bits} bits: "
                         f"use fewer bits")
    q = quantize(sigma2 if mechanism == "dgauss" else sigma2 / 2, "local noise variance", 2.0 ** 40)
    local_var = q / 2 ** DEN_BITS * (1 if mechanism == "dgauss" else 2)
    V = s * s * (n * clip) ** 2 / D + n / 4 + n * local_var * (math.cosh(1.0) if mechanism == "skellam" else 1.0)
    if mechanism == "skellam" and T / V > 1:  # Skellam's cosh bound holds for Chernoff parameters <= 1
        raise ValueError(f"Skellam's tail bound needs 2^(b-1) / V <= 1, got {T / V:.3g}: use the dgauss mechanism")
    bound = 2 * D * math.exp(-T * T / (2 * V))
    if bound > wrap_prob:
        raise ValueError(f"wrap-around bound 2D exp(-2^(2b-2)/(2V)) = {bound:.3g} > wrap_prob {wrap_prob:g}")
    if (delta2 + math.sqrt(D)) ** 2 >= 2.0 ** 62:
        raise ValueError(f"the rounded vectors' squared norm (Delta_2 + sqrt(D))^2 = {(delta2 + math.sqrt(D)) ** 2:.3g} "
                         f"must stay below 2^62 (exact int64 norms): use fewer bits")
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * local_var * k / (k + 1)) for k in range(1, min(n, 10_000)))
    if mechanism == "dgauss" and tau > 1e-4:
        raise ValueError(f"local discrete Gaussian variance {local_var:.3g} is too small for the Gaussian "
                         f"accounting: tau = 10 sum_k exp(-2 pi^2 sigma^2 k/(k+1)) = {tau:.3g} > 1e-4")
    if s * clip < math.sqrt(D):
        log.warning("distributed DP: scale x clip = %.3g < sqrt(D) = %.3g: rounding noise dominates the signal; "
                    "use more bits", s * clip, math.sqrt(D))
    return Plan(n, d, D, clip, noise_multiplier, bits, mechanism, wrap_prob, s, delta2, local_var, bound, tau)


def _seed(*parts) -> bytes:
    return hashlib.sha256(b"tapestry.privacy.distributed " + repr(parts).encode()).digest()


class DistributedDP:
    """Client and server halves of the mechanism under ``plan``; ``seed`` is the run's seed (the
    rotation's, shared by all). ``secret``: the key of the clients' rounding and noise; None derives
    it from ``seed`` (one process simulating every client); a client that is its own process (a
    rank of ``tapestry train --dp distributed``) passes its own random bytes, so that no one else
    can recompute, and subtract, its noise."""

    def __init__(self, plan_: Plan, seed: int = 0, secret: bytes | None = None):
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError("secret must be bytes of at least 16 (random) bytes, or None")
        self.plan, self.seed, self.secret = plan_, seed, secret

    def rotation_seed(self, rnd: int) -> bytes:
        return _seed(self.seed, rnd, "rotation")

    def _client_seed(self, rnd: int, client: int, purpose: str) -> bytes:
        return _seed(self.seed if self.secret is None else self.secret, rnd, client, purpose)

    def encode(self, x: torch.Tensor, *, client: int, rnd: int, noise: bool = True, reference: bool = False,
               mask_seeds=(), mask_signs=()) -> np.ndarray:
        """Client ``client``'s ring vector for round ``rnd`` (NumPy uint32). float32 input takes the
        fused C++ path (``dp_client_encode``) when built; ``reference=True`` the step-by-step
        composition below (the same bits). ``mask_seeds``/``mask_signs``: optional pairwise masks
        (``chacha20_mask``) fused at the end, as a client of the secure protocol would add them."""
        p = self.plan
        x = torch.as_tensor(x).detach().reshape(-1).cpu()  # the client path runs on the CPU
        if x.numel() != p.d:
            raise ValueError(f"client {client}: {x.numel()} parameters, the plan has d={p.d}")
        x64 = x.to(torch.float64)
        if not bool(torch.isfinite(x64).all()):
            raise ValueError(f"client {client}: non-finite update cannot be clipped")
        norm = float(torch.linalg.vector_norm(x64))
        factor = p.clip / norm if norm > p.clip else 1.0
        C = None if reference or x.dtype != torch.float32 or not noise else _kernel()
        C = C if C is not None and hasattr(C, "dp_client_encode") else None
        if C is not None:
            return self._fused(C, x.contiguous(), factor, client, rnd, mask_seeds, mask_signs)
        x = x64 * factor if factor != 1.0 else x64
        y = rotate(x.to(torch.float32), seed=self.rotation_seed(rnd)).to(torch.float64) * p.scale
        q = self.round(y, client=client, rnd=rnd)
        if noise:
            q = q + self.noise(client=client, rnd=rnd)
        ring = self.to_ring(q)
        if mask_seeds:
            from ..secure import chacha20_mask
            ring = chacha20_mask(torch.from_numpy(ring).view(torch.int32), list(mask_seeds), list(mask_signs)) \
                .view(torch.int32).numpy().view(np.uint32)
        return ring

    def _fused(self, C, x, factor, client, rnd, mask_seeds, mask_signs) -> np.ndarray:
        from ..secure.prg import NONCE_MASK, _words, seeds_to_keys
        p = self.plan
        out = torch.empty(p.D, dtype=torch.int32)
        work = torch.empty(p.D, dtype=torch.float32)
        signs = sign_words(self.rotation_seed(rnd), p.D)
        rkey = _words(self._client_seed(rnd, client, "rounding"), 8, "key", "cpu")
        rnon = _words(NONCE_ROUND, 3, "nonce", "cpu")
        nkey = _words(self._client_seed(rnd, client, "noise"), 8, "key", "cpu")
        sk = p.mechanism == "skellam"
        q8 = quantize(p.local_var / 2 if sk else p.local_var, "local noise variance", 2.0 ** 40)
        purpose = int.from_bytes(PURPOSE_SK if sk else PURPOSE_DG, "little")
        mk = seeds_to_keys(list(mask_seeds), "cpu")
        ms = torch.tensor(list(mask_signs), dtype=torch.int8)
        mn = _words(NONCE_MASK, 3, "nonce", "cpu")
        tries = C.dp_client_encode(out.data_ptr(), work.data_ptr(), x.data_ptr(), p.d, p.D, factor, signs.data_ptr(),
                                   float(np.float32(1.0 / math.sqrt(p.D))), p.scale, rkey.data_ptr(), rnon.data_ptr(),
                                   p.bound2, MAX_ROUNDING_TRIES, q8, sk, nkey.data_ptr(), purpose, CHUNK, p.bits,
                                   mk.data_ptr(), ms.data_ptr(), len(mask_seeds), mn.data_ptr())
        if tries < 0:
            raise RuntimeError(f"client {client}: conditional rounding failed {MAX_ROUNDING_TRIES} times")
        return out.numpy().view(np.uint32)

    def round(self, y: torch.Tensor, *, client: int, rnd: int) -> torch.Tensor:
        """Stochastic rounding, redrawn until ``||q||_2 <= Delta_2`` (conditional rounding)."""
        p = self.plan
        key = self._client_seed(rnd, client, "rounding")
        lo = torch.floor(y)
        frac = (y - lo).numpy()
        for attempt in range(MAX_ROUNDING_TRIES):
            u = chacha20_keystream(key, NONCE_ROUND, attempt * p.D, p.D).view(torch.int32).numpy().view(np.uint32)
            q = (lo + torch.from_numpy((u / 2.0 ** 32 < frac).astype(np.float64))).to(torch.int64)
            if int((q * q).sum()) <= p.bound2:  # exact: the plan keeps these squares below 2^62
                return q
        raise RuntimeError(f"client {client}: conditional rounding failed {MAX_ROUNDING_TRIES} times "
                           f"(norm bound {p.delta2:.4g}); the plan is inconsistent")

    def noise(self, *, client: int, rnd: int) -> torch.Tensor:
        p = self.plan
        key = self._client_seed(rnd, client, "noise")
        if p.mechanism == "dgauss":
            return sample_discrete_gaussian(p.local_var, p.D, seed=key)
        return sample_skellam(p.local_var / 2, p.D, seed=key)

    def to_ring(self, q: torch.Tensor) -> np.ndarray:
        p = self.plan
        mask = (1 << p.bits) - 1
        v = q.numpy().astype(np.int64)
        if p.bits < 64:
            v = v & np.int64(mask)
        return v.astype(np.uint64).astype(np.uint32 if p.ring_bits == 32 else np.uint64)

    def signed(self, total: np.ndarray) -> np.ndarray:
        """The ring sum reduced mod ``2^b`` and read as a signed integer in ``[-2^(b-1), 2^(b-1))``."""
        b = self.plan.bits
        v = np.asarray(total).astype(np.uint64)
        if b < 64:
            v = v & np.uint64((1 << b) - 1)
            i = v.astype(np.int64)
            return np.where(i >= (1 << (b - 1)), i - (1 << b), i)
        return v.view(np.int64)

    def decode(self, total: np.ndarray, *, rnd: int) -> torch.Tensor:
        """The float64 sum of the clients' (clipped, noised) updates from the ring sum."""
        ints = torch.from_numpy(self.signed(total).astype(np.float64))
        return unrotate((ints / self.plan.scale).to(torch.float32), seed=self.rotation_seed(rnd),
                        d=self.plan.d).to(torch.float64)

    def secure_sum(self, updates, *, rnd: int, dropouts=(), threshold: int | None = None,
                   neighbours: int | None = None, return_info: bool = False):
        """Encode every client's update, run the secure-sum protocol on the ring vectors, decode.
        Dropped clients' noise is missing from the sum: the plan's ``n`` must count only those
        that answer (the loop plans with the answering count)."""
        from ..secure import simulate_round

        rows = list(updates)
        ring = [self.encode(r, client=i, rnd=rnd) for i, r in enumerate(rows)]
        if threshold is None:
            holders = len(rows) if neighbours is None else neighbours + 1
            threshold = holders // 2 + 1
        total, info = simulate_round(ring, threshold=threshold, neighbours=neighbours, dropouts=dropouts,
                                     seed=rnd, round_id=rnd, return_info=True)
        out = self.decode(total, rnd=rnd)
        return (out, info) if return_info else out
