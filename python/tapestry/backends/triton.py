"""Triton backend: kernels in the top-level package ``tapestry_kernels``.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import os

import torch

from . import check_encoded, check_trim, no_kernel_for


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton not importable ({exc})"
    if not _interpret() and not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


def rejects(op: str, device: torch.device, args: tuple = ()) -> str | None:
    if not (device.type == "cuda" or (device.type == "cpu" and _interpret())):
        return f"takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
    return no_kernel_for(op, args)


# ---------------------------------------------------------------------------------------------
# robust aggregation (tapestry_kernels/select.py, gram.py, mean.py)


def _on_device(X):
    """Launch on the GPU of X (a tensor or stacked payload rows; Triton launches on the current
    device), nothing for CPU tensors."""
    import contextlib

    X = getattr(X, "X", X)
    return torch.cuda.device(X.device) if X.is_cuda else contextlib.nullcontext()


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from tapestry_kernels import mean

    with _on_device(X):
        return mean.weighted_mean(X, w)


def trimmed_mean(X: torch.Tensor, f: int) -> torch.Tensor:
    from tapestry_kernels import select

    with _on_device(X):
        return select.trimmed_mean(X, f)


def coord_median(X: torch.Tensor) -> torch.Tensor:
    from tapestry_kernels import select

    with _on_device(X):
        return select.coord_median(X)


def mean_around_median(X: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    from tapestry_kernels import select

    with _on_device(X):
        return select.mean_around_median(X, rows, k)


def gram(X: torch.Tensor) -> torch.Tensor:
    from tapestry_kernels import gram as kernels

    with _on_device(X):
        return kernels.gram(X)


# Fused decode-and-aggregate: the payload rows, stacked, are decoded inside the kernels above
# (tapestry_kernels/decode.py), so int8/int4 codes cross to the GPU instead of float32 values.


def _stacked(op: str, qs: list, scales: list, codec: str, block: int, d: int):
    from tapestry_kernels import decode

    check_encoded(op, qs, scales, codec, block, d, qs[0].device if qs else torch.device("cpu"))
    return decode.stacked(qs, scales, codec, block, d)


def weighted_mean_encoded(qs: list, scales: list, codec: str, block: int, d: int, w) -> torch.Tensor:
    E = _stacked("weighted_mean_encoded", qs, scales, codec, block, d)
    return weighted_mean(E, torch.as_tensor(w, dtype=torch.float64))


def gram_encoded(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    return gram(_stacked("gram_encoded", qs, scales, codec, block, d))


def trimmed_mean_encoded(qs: list, scales: list, codec: str, block: int, d: int, f: int) -> torch.Tensor:
    check_trim(len(qs), f)
    return trimmed_mean(_stacked("trimmed_mean_encoded", qs, scales, codec, block, d), f)


def coord_median_encoded(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    return coord_median(_stacked("coord_median_encoded", qs, scales, codec, block, d))


def mean_around_median_encoded(qs: list, scales: list, codec: str, block: int, d: int, rows, k: int) -> torch.Tensor:
    return mean_around_median(_stacked("mean_around_median_encoded", qs, scales, codec, block, d),
                              torch.as_tensor(rows), k)


# ---------------------------------------------------------------------------------------------
# compression (tapestry_kernels/quant.py)


def quantize_int8(x: torch.Tensor, block: int, key, out=None):
    from tapestry_kernels import quant

    with _on_device(x):
        return quant.quantize_int8(x, block, key, out)


def quantize_int4(x: torch.Tensor, block: int, key, out=None):
    from tapestry_kernels import quant

    with _on_device(x):
        return quant.quantize_int4(x, block, key, out)


def dequantize_int8(qs, scales, block: int, outs, start: int = 0):
    from tapestry_kernels import quant

    with _on_device(outs[0]) if outs else _on_device(torch.empty(0)):
        return quant.dequantize_int8([q[start:] for q in qs], [s[start // block :] for s in scales], block, outs)


def dequantize_int4(qs, scales, block: int, outs, start: int = 0):
    from tapestry_kernels import quant

    with _on_device(outs[0]) if outs else _on_device(torch.empty(0)):
        return quant.dequantize_int4([q[start // 2 :] for q in qs], [s[start // block :] for s in scales], block, outs)


# ---------------------------------------------------------------------------------------------
# secure sum (tapestry_kernels/chacha.py)


def chacha20_keystream(key: torch.Tensor, nonce: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    from tapestry_kernels import chacha

    with _on_device(key):
        return chacha.chacha20_keystream(key.contiguous(), nonce.contiguous(), offset, count)


def chacha20_mask(x: torch.Tensor, keys: torch.Tensor, signs: torch.Tensor, nonce: torch.Tensor, offset: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    from tapestry_kernels import chacha

    with _on_device(x):
        return chacha.chacha20_mask(x.contiguous(), keys.contiguous(), signs.to(torch.int8).contiguous(),
                                    nonce.contiguous(), offset, out=out)


# ---------------------------------------------------------------------------------------------
# differential privacy (tapestry_kernels/hadamard.py)


def fwht(x: torch.Tensor, signs: torch.Tensor | None, scale: float, out: torch.Tensor | None = None, *,
         signs_after: bool = False) -> torch.Tensor:
    from tapestry_kernels import hadamard

    with _on_device(x):
        return hadamard.fwht(x, signs, scale, out, signs_after=signs_after)
