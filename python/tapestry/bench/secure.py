"""``tapestry bench --family secure``: keystream and masking beside same-run baselines.

* ``openssl_chacha20`` (baseline): OpenSSL's ChaCha20 through ``cryptography``, encrypting zeros
  into a preallocated buffer, one core; ``chacha20_keystream`` rows run our kernel on one core
  (``threads=1``) into a preallocated buffer, and through the public API.
* ``flower_randomstate`` (baseline): Flower's SecAgg+ mask generator, ``RandomState(seed).randint``
  for ``k + 1`` seeds of ``d`` words (k = 8); ``chacha20_mask`` rows mask one update of ``d``
  words with the same ``k + 1`` keystreams, fused (on one core, then on every core).
* ``round_n100_k8``: a whole in-process round, n = 100, k = 8, 10% dropouts after masking, at
  ``d // 4`` parameters.

GB/s counts keystream bytes produced (plus the update read and written for masking).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .. import _native, ops
from .harness import Case, Config, backends_for, one_thread, with_backend

K = 8


def cases(cfg: Config) -> list[Case]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from ..secure.prg import NONCE_MASK, _words, chacha20_keystream, chacha20_mask
    from ..secure.simulate import simulate_round

    d = cfg.d
    rng = np.random.default_rng(cfg.seed)
    key, nonce = rng.bytes(32), rng.bytes(12)
    zeros, sink = bytes(4 * d), bytearray(4 * d + 16)

    def openssl():
        enc = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), None).encryptor()
        return enc.update_into(zeros, sink)

    out = [Case("secure", "openssl_chacha20", openssl, 4 * d, "openssl", "uint32", is_baseline=True)]
    seeds = [rng.bytes(32) for _ in range(K + 1)]
    signs = [1] + [1 if i % 2 else -1 for i in range(K)]
    flower_seeds = [int(np.frombuffer(s, "<u4").view(np.uint32)[0]) for s in seeds]

    def flower():  # flwr.common.secure_aggregation.crypto: RandomState(seed32).randint(0, num_range - 1, dims)
        return [np.random.RandomState(s).randint(0, 2**32 - 1, size=d) for s in flower_seeds]

    out.append(Case("secure", "flower_randomstate", flower, 4 * d * (K + 1), "numpy", "uint32", is_baseline=True))
    x = torch.from_numpy(rng.integers(0, 2**32, size=d, dtype=np.uint64).astype(np.uint32).view(np.int32))
    mask_bytes = 4 * d * (K + 1) + 8 * d
    if cfg.device == "cpu" and ops.unavailable_reason("cpu") is None:
        C = _native.require("_C")
        buf = torch.empty(d, dtype=torch.int32)
        kw, nw = _words(key, 8, "key", "cpu"), _words(nonce, 3, "nonce", "cpu")
        out.append(Case("secure", f"chacha20_keystream[{C.isa()}]", one_thread(
            lambda: C.chacha20_keystream(buf.data_ptr(), kw.data_ptr(), nw.data_ptr(), 0, d)), 4 * d, "cpu", "uint32",
            baseline="openssl_chacha20"))
        out.append(Case("secure", "chacha20_keystream_api", one_thread(with_backend(
            "cpu", lambda: chacha20_keystream(key, nonce, 0, d))), 4 * d, "cpu", "uint32", baseline="openssl_chacha20"))
        out.append(Case("secure", "chacha20_mask_k8_1thread", one_thread(with_backend(
            "cpu", lambda: chacha20_mask(x, seeds, signs, nonce=NONCE_MASK))), mask_bytes, "cpu", "uint32",
            baseline="flower_randomstate"))
    xd = x.to(cfg.device)
    for b in backends_for(cfg.device):
        out.append(Case("secure", "chacha20_mask_k8", with_backend(b, lambda: chacha20_mask(xd, seeds, signs)),
                        mask_bytes, b, "uint32", baseline="flower_randomstate"))
        out.append(Case("secure", "chacha20_keystream", with_backend(
            b, lambda: chacha20_keystream(key, nonce, 0, d, device=cfg.device)), 4 * d, b, "uint32",
            baseline="openssl_chacha20"))
    if cfg.device == "cpu" and os.environ.get("TAPESTRY_BENCH_SECURE_ROUND", "1") == "1":
        n, dr = 100, max(1, d // 4)
        X = torch.from_numpy(rng.standard_normal((n, dr), dtype=np.float32) * 0.01)
        drop = list(range(0, n, 10))
        out.append(Case("secure", "round_n100_k8_drop10", lambda: simulate_round(
            X, threshold=5, neighbours=K, dropouts=drop, seed=cfg.seed), 4 * n * dr, "cpu", "float32"))
    return out
