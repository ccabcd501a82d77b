"""``tapestry bench --family compression``: encode, decode and fused decode-aggregate beside
same-run baselines.

* ``copy`` (baseline): ``dst.copy_(x)`` of one float32 update of ``d`` values into a preallocated
  buffer. GB/s in this family counts bytes read plus bytes written (copy: 8 d), so a codec row's
  GB/s over the copy row's is its fraction of the machine's copy bandwidth.
* ``encode_<codec>`` / ``decode_<codec>``: the public ``encode`` (payload bytes out, stochastic
  rounding unless ``_nearest``) and ``decode`` (float32 tensor out) of one update;
  ``quantize_int8``/``dequantize_int8`` rows time the kernels alone on preallocated outputs.
* ``fused_<codec>_<rule>`` vs ``<rule>_f32`` (baseline): ``compression.aggregate`` over ``n``
  payloads against the same rule on the already-decoded ``(n, d)`` float32 updates.
"""

from __future__ import annotations

import torch

import tapestry as tp

from .. import ops
from ..bench import Case, Config, _backends_for, with_backend
from .codecs import decode, encode, seed_key
from .fused import aggregate


def cases(cfg: Config) -> list[Case]:
    if cfg.device != "cpu":
        return []  # payloads are host bytes; GPU kernels are timed through the op table elsewhere
    d, n, f = cfg.d, cfg.n, cfg.f
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(d, generator=g)
    dst = torch.empty_like(x)
    out: list[Case] = [Case("compression", "copy", lambda: dst.copy_(x), 8 * d, is_baseline=True)]
    p8 = encode(x, "int8", seed=1)
    p4 = encode(x, "int4", seed=1)
    p16 = encode(x, "fp16")
    for b in _backends_for("cpu"):
        key = seed_key(1)
        q, s = ops.resolve("quantize_int8", "cpu")[1](x, 256, key)
        out += [
            Case("compression", "quantize_int8", with_backend(b, lambda: ops.call("quantize_int8", x, 256, key)), 5 * d, b,
                 baseline="copy"),
            Case("compression", "dequantize_int8",
                 with_backend(b, lambda: ops.call("dequantize_int8", [q], [s], 256, [dst], device="cpu")), 5 * d, b,
                 baseline="copy"),
            Case("compression", "encode_int8", with_backend(b, lambda: encode(x, "int8", seed=1)), 5 * d, b, baseline="copy"),
            Case("compression", "encode_int8_nearest", with_backend(b, lambda: encode(x, "int8", rounding="nearest")), 5 * d, b,
                 baseline="copy"),
            Case("compression", "decode_int8", with_backend(b, lambda: decode(p8)), 5 * d, b, baseline="copy"),
            Case("compression", "encode_int4", with_backend(b, lambda: encode(x, "int4", seed=1)), 4 * d + d // 2, b,
                 baseline="copy"),
            Case("compression", "decode_int4", with_backend(b, lambda: decode(p4)), 4 * d + d // 2, b, baseline="copy"),
        ]
    out += [
        Case("compression", "encode_fp16", lambda: encode(x, "fp16"), 6 * d, baseline="copy"),
        Case("compression", "decode_fp16", lambda: decode(p16), 6 * d, baseline="copy"),
    ]

    X = torch.randn(n, d, generator=g)
    payloads8 = [encode(X[i], "int8", seed=i) for i in range(n)]
    payloads4 = [encode(X[i], "int4", seed=i) for i in range(n)]
    dense = torch.stack([decode(p) for p in payloads8])
    nbytes = 4 * n * d
    for b in _backends_for("cpu"):
        out += [
            Case("compression", "trimmed_mean_f32", with_backend(b, lambda: tp.trimmed_mean(dense, f=f)), nbytes, b,
                 is_baseline=True),
            Case("compression", "fused_int8_trimmed_mean", with_backend(b, lambda: aggregate(payloads8, tp.TrimmedMean(f=f))),
                 n * d, b, "int8", baseline="trimmed_mean_f32"),
            Case("compression", "fused_int4_trimmed_mean", with_backend(b, lambda: aggregate(payloads4, tp.TrimmedMean(f=f))),
                 n * d // 2, b, "int4", baseline="trimmed_mean_f32"),
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
