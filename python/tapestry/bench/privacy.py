"""``tapestry bench --family privacy``: the transform, the exact samplers and the fused client path,
each beside a same-run baseline, on one core.

* ``copy`` (baseline): ``torch.clone`` of ``D = 2^24`` float32 (``D = d`` rounded up with ``--quick``);
  ``fwht``: the cache-blocked randomized Hadamard transform of x into y (signs fused), one core.
* ``chacha20_words`` (baseline): the keystream the samplers consume, as many words as they used;
  ``discrete_gaussian`` / ``skellam`` rows: 2^20 exact draws on one core (the name gives words per
  draw; draws per second = 2^20 / time).
* ``client_path``: clip, rotate, conditional stochastic rounding, discrete Gaussian noise, reduce
  mod 2^20 and mask with k = 8 pairwise keystreams, fused, one core, for ``2^20`` coordinates;
  its baselines are the copy and the sampler at the same size (``client_path_vs_sampler``).
On a GPU (``--device cuda``): the transform on every backend that implements it (Triton) against a
device copy of the same size.
GB/s counts float32 bytes read for the transform and the client path, int64 bytes written for samplers.
"""

from __future__ import annotations

import math
import os

import torch

from .. import _native, ops
from .harness import Case, Config, backends_for, one_thread, with_backend


def cases(cfg: Config) -> list[Case]:
    if cfg.device != "cpu":
        return _device_cases(cfg)
    from ..secure.prg import chacha20_keystream
    from ..privacy.distributed import DistributedDP, plan
    from ..privacy.rotation import padded, sign_words
    from ..privacy.samplers import sample_discrete_gaussian, sample_skellam

    C = _native.require("_C")
    D = padded(cfg.d) if cfg.quick else 1 << 24
    x = torch.randn(D)
    y = torch.empty_like(x)
    signs = sign_words(1, D)
    out = [Case("privacy", f"copy_{D}", one_thread(lambda: y.copy_(x)), 4 * D, is_baseline=True)]

    def fwht():  # out of place, like the copy: reads x, writes y
        C.dp_fwht(y.data_ptr(), x.data_ptr(), D, signs.data_ptr(), 1 / math.sqrt(D))
    out.append(Case("privacy", "fwht", one_thread(fwht), 4 * D, "cpu", baseline=f"copy_{D}"))
    n = 1 << (16 if cfg.quick else 20)
    _, words = sample_discrete_gaussian(100.0, n, seed=0, return_words=True)
    key, nonce = os.urandom(32), os.urandom(12)
    out.append(Case("privacy", "chacha20_words", one_thread(lambda: chacha20_keystream(key, nonce, 0, words)), 8 * n,
                    "cpu", "int64", is_baseline=True))
    out.append(Case("privacy", f"discrete_gaussian_s2=100[{words / n:.2f} words/draw]", one_thread(
        lambda: sample_discrete_gaussian(100.0, n, seed=0)), 8 * n, "cpu", "int64", baseline="chacha20_words"))
    _, sw = sample_skellam(2.0, n // 4, seed=0, return_words=True)
    out.append(Case("privacy", f"skellam_mu=2_quarter[{4 * sw / n:.2f} words/draw]", one_thread(
        lambda: sample_skellam(2.0, n // 4, seed=0)), 2 * n, "cpu", "int64", baseline="chacha20_words"))
    dc = n  # client path size (2^20; 2^16 with --quick)
    p = plan(n=100, d=dc, clip=1.0, noise_multiplier=1.0, bits=20)
    dp = DistributedDP(p, seed=0)
    u = torch.randn(dc)
    seeds, sg = [os.urandom(32) for _ in range(9)], [1] + [1 if i % 2 else -1 for i in range(8)]
    xc, yc = torch.randn(dc), torch.empty(dc)
    out.append(Case("privacy", f"copy_{dc}", one_thread(lambda: yc.copy_(xc)), 4 * dc, is_baseline=True))
    out.append(Case("privacy", "dg_sampler_client_size", one_thread(
        lambda: sample_discrete_gaussian(p.local_var, p.D, seed=1)), 4 * dc, "cpu", "int64", is_baseline=True))
    out.append(Case("privacy", "client_path_k8", one_thread(
        lambda: dp.encode(u, client=0, rnd=1, mask_seeds=seeds, mask_signs=sg)), 4 * dc, "cpu",
        baseline=f"copy_{dc}"))
    out.append(Case("privacy", "client_path_k8_vs_sampler", one_thread(
        lambda: dp.encode(u, client=0, rnd=1, mask_seeds=seeds, mask_signs=sg)), 4 * dc, "cpu",
        baseline="dg_sampler_client_size"))
    return out


def _device_cases(cfg: Config) -> list[Case]:
    """On a GPU: the transform (every backend that implements it) against a device copy."""
    from ..privacy.rotation import padded, sign_words

    D = padded(cfg.d) if cfg.quick else 1 << 24
    x = torch.randn(D, device=cfg.device)
    y = torch.empty_like(x)
    signs = sign_words(1, D, cfg.device)
    out = [Case("privacy", f"copy_{D}", lambda: y.copy_(x), 4 * D, is_baseline=True)]
    for b in backends_for(cfg.device, "fwht"):
        out.append(Case("privacy", "fwht", with_backend(b, lambda: ops.call("fwht", x, signs, 1 / math.sqrt(D), y)),
                        4 * D, b, baseline=f"copy_{D}"))
    return out
