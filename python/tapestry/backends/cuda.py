"""CUDA backend: ``tapestry._cuda`` (csrc/cuda, raw device pointers and the current stream).

The extension imports on machines without a GPU driver and reports itself unavailable.
"""

from __future__ import annotations

import logging

import torch

from .. import _native
from . import no_kernel_for

log = logging.getLogger("tapestry.ops")


def unavailable() -> str | None:
    reason = _native.missing_reason("_cuda")
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        count, error = _native.require("_cuda").device_count()
        return f"no CUDA GPU visible to torch (tapestry._cuda sees {count}: {error or 'no error'})"
    return None


ROW_LIMITED = {"trimmed_mean": 0, "coord_median": 0, "mean_around_median": 1}  # op -> argument holding the rows


def rejects(op: str, device: torch.device, args: tuple = ()) -> str | None:
    if device.type != "cuda":
        return f"takes CUDA tensors, got {device}"
    reason = no_kernel_for(op, args)
    if reason is None and op in ROW_LIMITED and len(args) > ROW_LIMITED[op]:
        n, limit = len(args[ROW_LIMITED[op]]), _native.require("_cuda").MAX_SELECT_ROWS
        if n > limit:
            return f"{n} rows, above the selection kernels' limit of {limit}"
    return reason


# ---------------------------------------------------------------------------------------------
# robust aggregation (csrc/cuda/select.cu, mean.cu; gram: see gram() below)


def _robust_input(X: torch.Tensor, op: str) -> tuple[torch.Tensor, int]:
    """X with unit stride along columns (the kernels' layout) and its dtype code."""
    from .cpu import DTYPE_CODES

    if X.dtype not in DTYPE_CODES:
        raise TypeError(f"cuda {op}: updates must be float32, float16 or bfloat16, got {X.dtype}")
    if X.dim() != 2:
        raise ValueError(f"cuda {op}: expected a 2-D (n, d) tensor, got shape {tuple(X.shape)}")
    if X.shape[1] > 1 and X.stride(1) != 1:
        X = X.contiguous()
    return X, DTYPE_CODES[X.dtype]


def _launch(X: torch.Tensor) -> tuple[int, int]:
    """The last two arguments of every tapestry._cuda call: X's current stream and its device (the
    binding makes that device current for the launch and restores the caller's after)."""
    return torch.cuda.current_stream(X.device).cuda_stream, X.device.index


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    X, code = _robust_input(X, "weighted_mean")
    d = X.shape[1]
    w = w.detach().to(torch.float64).cpu()
    keep = torch.nonzero(w != 0).flatten()  # zero-weight clients are never read
    rows = keep.to(X.device)
    weights = w[keep].to(X.device)
    out = torch.empty(d, dtype=torch.float32, device=X.device)
    _native.require("_cuda").weighted_mean(X.data_ptr(), code, d, X.stride(0), rows.data_ptr(), weights.data_ptr(),
                                           keep.numel(), out.data_ptr(), *_launch(X))
    return out


def trimmed_mean(X: torch.Tensor, f: int) -> torch.Tensor:
    X, code = _robust_input(X, "trimmed_mean")
    n, d = X.shape
    out = torch.empty(d, dtype=torch.float32, device=X.device)
    _native.require("_cuda").trimmed_mean(X.data_ptr(), code, n, d, X.stride(0), f, out.data_ptr(), *_launch(X))
    return out


def coord_median(X: torch.Tensor) -> torch.Tensor:
    X, code = _robust_input(X, "coord_median")
    n, d = X.shape
    out = torch.empty(d, dtype=torch.float32, device=X.device)
    _native.require("_cuda").coord_median(X.data_ptr(), code, n, d, X.stride(0), out.data_ptr(), *_launch(X))
    return out


def mean_around_median(X: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    X, code = _robust_input(X, "mean_around_median")
    d = X.shape[1]
    rows = rows.to(device=X.device, dtype=torch.int64).contiguous()
    out = torch.empty(d, dtype=torch.float32, device=X.device)
    _native.require("_cuda").mean_around_median(X.data_ptr(), code, d, X.stride(0), rows.data_ptr(), rows.numel(), k,
                                                out.data_ptr(), *_launch(X))
    return out


def gram(X: torch.Tensor) -> torch.Tensor:
    """The centred Gram matrix (see tapestry_kernels/gram.py). The product runs in the Triton
    kernel (one pass, centring fused, tensor cores in tf32x3, float64 partial sums); without
    Triton, a cuBLAS path through torch: per block of columns, shift by the finite column mean,
    then a float64 product of the centred block (float64 keeps it accurate whatever torch's TF32
    setting; it reads the block twice and is slower)."""
    try:
        from tapestry_kernels import gram as kernels
    except Exception:  # triton missing or broken
        kernels = None
    if kernels is not None:
        with torch.cuda.device(X.device):
            return kernels.gram(X)
    log.warning("cuda gram: triton is not importable, running the cuBLAS float64 path (slower)")
    n, d = X.shape
    G = torch.zeros(n, n, dtype=torch.float64, device=X.device)
    for a in range(0, d, 1 << 18):
        C = X[:, a : a + (1 << 18)].to(torch.float64)
        ok = torch.isfinite(C)
        count = ok.sum(0)
        shift = torch.where(ok, C, 0.0).sum(0) / count.clamp(min=1)
        C -= shift
        G += C @ C.T
    return G


# ---------------------------------------------------------------------------------------------
# compression (csrc/cuda/quant.cu)


def _quantize_cuda(name: str, x: torch.Tensor, block: int, key, nbytes: int, out=None):
    from .cpu import DTYPE_CODES

    m = x.numel()
    if out is not None:
        q, scales = out
    else:
        q = torch.empty(nbytes, dtype=torch.int8 if name == "quantize_int8" else torch.uint8, device=x.device)
        scales = torch.empty(-(-m // block), dtype=torch.float32, device=x.device)
    k0, k1 = key if key is not None else (0, 0)
    getattr(_native.require("_cuda"), name)(x.data_ptr(), DTYPE_CODES[x.dtype], m, block, key is not None, k0, k1,
                                            q.data_ptr(), scales.data_ptr(), *_launch(x))
    return q, scales


def quantize_int8(x: torch.Tensor, block: int, key, out=None):
    return _quantize_cuda("quantize_int8", x, block, key, x.numel(), out)


def quantize_int4(x: torch.Tensor, block: int, key, out=None):
    return _quantize_cuda("quantize_int4", x, block, key, (x.numel() + 1) // 2, out)


def _dequantize_cuda(name: str, qs, scales, block: int, outs, start: int, qoff: int):
    if not outs:
        return outs
    soff = 4 * (start // block)
    getattr(_native.require("_cuda"), name)([q.data_ptr() + qoff for q in qs], [s.data_ptr() + soff for s in scales],
                                            outs[0].numel(), block, [o.data_ptr() for o in outs],
                                            *_launch(outs[0]))
    return outs


def dequantize_int8(qs, scales, block: int, outs, start: int = 0):
    return _dequantize_cuda("dequantize_int8", qs, scales, block, outs, start, start)


def dequantize_int4(qs, scales, block: int, outs, start: int = 0):
    return _dequantize_cuda("dequantize_int4", qs, scales, block, outs, start, start // 2)


# ---------------------------------------------------------------------------------------------
# secure sum (csrc/cuda/chacha.cu)


def chacha20_keystream(key: torch.Tensor, nonce: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    out = torch.empty(count, dtype=torch.int32, device=key.device)
    key, nonce = key.contiguous(), nonce.contiguous()
    _native.require("_cuda").chacha20_keystream(out.data_ptr(), key.data_ptr(), nonce.data_ptr(), offset, count,
                                                *_launch(key))
    return out


def chacha20_mask(x: torch.Tensor, keys: torch.Tensor, signs: torch.Tensor, nonce: torch.Tensor, offset: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    keys, signs, nonce = keys.contiguous(), signs.to(torch.int8).contiguous(), nonce.contiguous()
    _native.require("_cuda").chacha20_mask(out.data_ptr(), x.data_ptr(), x.numel(), keys.data_ptr(), signs.data_ptr(),
                                           keys.shape[0], nonce.data_ptr(), offset, *_launch(x))
    return out
