"""``tapestry bench --family compression``: encode, decode and fused decode-aggregate beside
same-run baselines.

* ``copy`` (baseline): ``dst.copy_(x)`` of one float32 update into a preallocated buffer. GB/s in
  this family counts bytes read plus bytes written (copy: 8 d), so a row's ``bw%`` is its fraction
  of the machine's copy bandwidth. The single-update rows use ``d = max(--d, LLC bytes)`` values,
  so every float32 array is at least 4x the last-level cache (STREAM's rule): model-sized updates
  stream from DRAM, and a copy that sits in cache would overstate the machine's bandwidth.
* ``quantize_*`` / ``dequantize_*``: the kernels on preallocated outputs (the codec's own speed).
* ``encode_<codec>`` / ``decode_<codec>``: the public calls; each returns new memory (a payload,
  a tensor), and first-touch page faults of fresh memory cost as much as the codec on some
  machines (VMs above all; tapestry asks for huge pages, see ``tapestry._pages``): ``clone`` (a
  copy into fresh memory allocated the same way) shows that cost on its own, and
  ``decode_<codec>_into`` decodes into a reused buffer (``decode_flat(out=)``).
* ``fused_<codec>_<rule>`` vs ``<rule>_f32`` (baseline): ``compression.aggregate`` over ``n``
  payloads against the same rule on the already-decoded ``(n, d)`` float32 updates (``--d``).
"""

from __future__ import annotations

import torch

import tapestry as tp

from .. import _pages, ops
from ..compression.codecs import decode, decode_flat, encode, seed_key
from ..compression.fused import aggregate
from .harness import Case, Config, backends_for, last_level_cache_bytes, with_backend


def cases(cfg: Config) -> list[Case]:
    if cfg.device != "cpu":
        return []  # payloads are host bytes; GPU kernels are timed through the op table elsewhere
    d, n, f = cfg.d, cfg.n, cfg.f
    g = torch.Generator().manual_seed(cfg.seed)
    d1 = d if cfg.quick else max(d, last_level_cache_bytes())
    x = torch.randn(d1, generator=g)
    dst = torch.empty_like(x)
    out: list[Case] = [Case("compression", "copy", lambda: dst.copy_(x), 8 * d1, is_baseline=True),
                       Case("compression", "clone", lambda: _pages.empty(d1).copy_(x), 8 * d1, baseline="copy")]
    key = seed_key(1)
    payloads = {c: encode(x, c, seed=1) for c in ("int8", "int4", "fp16")}
    q8, s8 = torch.empty(d1, dtype=torch.int8), torch.empty(-(-d1 // 256))
    q4 = torch.empty((d1 + 1) // 2, dtype=torch.uint8)
    for b in backends_for("cpu"):
        def kernel(name, *args, **kw):
            return with_backend(b, lambda: ops.call(name, *args, device="cpu", **kw))

        out += [
            Case("compression", "quantize_int8", kernel("quantize_int8", x, 256, key, out=(q8, s8)), 5 * d1, b,
                 baseline="copy"),
            Case("compression", "quantize_int8_nearest", kernel("quantize_int8", x, 256, None, out=(q8, s8)), 5 * d1,
                 b, baseline="copy"),
            Case("compression", "dequantize_int8", kernel("dequantize_int8", [q8], [s8], 256, [dst]), 5 * d1, b,
                 baseline="copy"),
            Case("compression", "quantize_int4", kernel("quantize_int4", x, 256, key, out=(q4, s8)), 4 * d1 + d1 // 2,
                 b, baseline="copy"),
            Case("compression", "dequantize_int4", kernel("dequantize_int4", [q4], [s8], 256, [dst]), 4 * d1 + d1 // 2,
                 b, baseline="copy"),
        ]
    for codec, nbytes in (("int8", 5 * d1), ("int4", 4 * d1 + d1 // 2), ("fp16", 6 * d1)):
        p = payloads[codec]
        out += [
            Case("compression", f"encode_{codec}", lambda c=codec: encode(x, c, seed=1), nbytes, baseline="copy"),
            Case("compression", f"decode_{codec}", lambda p=p: decode(p), nbytes, baseline="copy"),
            Case("compression", f"decode_{codec}_into", lambda p=p: decode_flat(p, out=dst), nbytes, baseline="copy"),
        ]
    del payloads

    X = torch.randn(n, d, generator=g)
    payloads8 = [encode(X[i], "int8", seed=i) for i in range(n)]
    payloads4 = [encode(X[i], "int4", seed=i) for i in range(n)]
    payloads16 = [encode(X[i], "fp16") for i in range(n)]
    dense = torch.stack([decode(p) for p in payloads8])
    nbytes = 4 * n * d
    for b in backends_for("cpu"):
        out += [
            Case("compression", "trimmed_mean_f32", with_backend(b, lambda: tp.trimmed_mean(dense, f=f)), nbytes, b,
                 is_baseline=True),
            Case("compression", "fused_int8_trimmed_mean", with_backend(b, lambda: aggregate(payloads8, tp.TrimmedMean(f=f))),
                 n * d, b, "int8", baseline="trimmed_mean_f32"),
            Case("compression", "fused_int4_trimmed_mean", with_backend(b, lambda: aggregate(payloads4, tp.TrimmedMean(f=f))),
                 n * d // 2, b, "int4", baseline="trimmed_mean_f32"),
            Case("compression", "fused_fp16_trimmed_mean", with_backend(b, lambda: aggregate(payloads16, tp.TrimmedMean(f=f))),
                 2 * n * d, b, "float16", baseline="trimmed_mean_f32"),
            Case("compression", "mean_f32", with_backend(b, lambda: tp.mean(dense)), nbytes, b, is_baseline=True),
            Case("compression", "fused_int8_mean", with_backend(b, lambda: aggregate(payloads8, tp.Mean())), n * d, b, "int8",
                 baseline="mean_f32"),
            Case("compression", "median_f32", with_backend(b, lambda: tp.median(dense)), nbytes, b, is_baseline=True),
            Case("compression", "fused_int8_median", with_backend(b, lambda: aggregate(payloads8, tp.Median())), n * d, b,
                 "int8", baseline="median_f32"),
            Case("compression", "krum_f32", with_backend(b, lambda: tp.krum(dense, f=f)), nbytes, b, is_baseline=True),
            Case("compression", "fused_int8_krum", with_backend(b, lambda: aggregate(payloads8, tp.Krum(f=f))), n * d, b,
                 "int8", baseline="krum_f32"),
        ]
    return out
