"""CPU backend: ``tapestry._C`` (C++17, OpenMP, AVX2/AVX-512 with a portable fallback).

Kernels receive raw data pointers (``tensor.data_ptr()``), sizes, strides and a dtype code from
:data:`DTYPE_CODES`; outputs are allocated here. The GIL is released inside every kernel.
"""

from __future__ import annotations

import torch

from .. import _native
from . import check_encoded, check_trim, no_kernel_for

# dtype codes shared with csrc/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def unavailable() -> str | None:
    return _native.missing_reason("_C")


def rejects(op: str, device: torch.device, args: tuple = ()) -> str | None:
    if device.type != "cpu":
        return f"takes CPU tensors, got {device}"
    return no_kernel_for(op, args)


def _C():
    return _native.require("_C")


# ---------------------------------------------------------------------------------------------
# robust aggregation (csrc/cpu/select.cpp, gram.cpp, mean.cpp)
#
# The kernels read X in place (any row stride, unit stride along d; float16/bfloat16 without a
# float32 copy) and write a float32 result allocated here. float64 input has no kernel: rejects()
# says so and dispatch runs the reference (exact, and float64 is what the contract returns).


def _matrix(X: torch.Tensor, op: str) -> tuple[torch.Tensor, int, int]:
    """``(X, row stride in elements, dtype code)`` for a kernel; checks what a kernel cannot."""
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"{op}: X must be a 2-D (n, d) tensor, got {getattr(X, 'shape', type(X).__name__)}")
    if X.device.type != "cpu":
        raise ValueError(f"{op}: the cpu backend takes CPU tensors, got {X.device}")
    if X.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: X must be float32, float16 or bfloat16, got {X.dtype}")
    if X.shape[1] > 1 and X.stride(1) != 1:
        X = X.contiguous()
    return X, X.stride(0), DTYPE_CODES[X.dtype]


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    X, stride, code = _matrix(X, "weighted_mean")
    n, d = X.shape
    w = _weights(w, n)
    out = torch.empty(d, dtype=torch.float32)
    _C().weighted_mean(X.data_ptr(), n, d, stride, code, w.data_ptr(), out.data_ptr())
    return out


def _weights(w, n: int) -> torch.Tensor:
    w = torch.as_tensor(w).to(device="cpu", dtype=torch.float64).contiguous().reshape(-1)
    if w.numel() != n:
        raise ValueError(f"weighted_mean: {w.numel()} weights for n={n} rows")
    return w


def trimmed_mean(X: torch.Tensor, f: int) -> torch.Tensor:
    X, stride, code = _matrix(X, "trimmed_mean")
    n, d = X.shape
    check_trim(n, f)
    out = torch.empty(d, dtype=torch.float32)
    _C().trimmed_mean(X.data_ptr(), n, d, stride, code, int(f), out.data_ptr())
    return out


def coord_median(X: torch.Tensor) -> torch.Tensor:
    X, stride, code = _matrix(X, "coord_median")
    n, d = X.shape
    if n < 1:
        raise ValueError("coord_median needs n >= 1, got n=0")
    out = torch.empty(d, dtype=torch.float32)
    _C().coord_median(X.data_ptr(), n, d, stride, code, out.data_ptr())
    return out


def mean_around_median(X: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    X, stride, code = _matrix(X, "mean_around_median")
    n, d = X.shape
    rows = _rows(rows, n, k)
    out = torch.empty(d, dtype=torch.float32)
    _C().mean_around_median(X.data_ptr(), n, d, stride, code, rows.data_ptr(), rows.numel(), int(k), out.data_ptr())
    return out


def _rows(rows, n: int, k: int) -> torch.Tensor:
    """mean_around_median's ``rows`` as a contiguous int64 CPU tensor, checked against ``n`` and ``k``."""
    rows = torch.as_tensor(rows).to(device="cpu", dtype=torch.int64).contiguous().reshape(-1)
    m = rows.numel()
    if m < 1 or not (0 <= int(rows.min()) and int(rows.max()) < n):
        raise ValueError(f"mean_around_median: rows must be {m} >= 1 indices in [0, {n}), got {rows.tolist()}")
    if not 1 <= k <= m:
        raise ValueError(f"mean_around_median needs 1 <= k <= m, got k={k}, m={m}")
    return rows


def anchor_dots(X: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    X, stride, code = _matrix(X, "anchor_dots")
    n, d = X.shape
    z = z.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
    if z.numel() != d:
        raise ValueError(f"anchor_dots: z has {z.numel()} values, the rows d={d}")
    out = torch.empty(n, 3, dtype=torch.float64)
    _C().anchor_dots(X.data_ptr(), n, d, stride, code, z.data_ptr(), out.data_ptr())
    return out


def gram(X: torch.Tensor) -> torch.Tensor:
    X, stride, code = _matrix(X, "gram")
    n, d = X.shape
    G = torch.empty(n, n, dtype=torch.float64)
    _C().gram(X.data_ptr(), n, d, stride, code, G.data_ptr())
    return G


# Fused decode-and-aggregate: the kernels decode a tile of every row at a time (csrc/cpu/quant_rows.h).

_ROW_CODE = {"int8": 0, "int4": 1, "fp16": 2, "bf16": 3}  # csrc/cpu/quant_rows.h RowCodec


def _encoded_rows(op: str, qs: list, scales: list, codec: str, block: int, d: int) -> tuple[list[int], list[int], int]:
    """Pointers to each row's values and scales, and the codec's code, after check_encoded."""
    check_encoded(op, qs, scales, codec, block, d, torch.device("cpu"))
    sp = [s.data_ptr() for s in scales] if codec in ("int8", "int4") else [0] * len(qs)
    return [q.data_ptr() for q in qs], sp, _ROW_CODE[codec]


def weighted_mean_encoded(qs: list, scales: list, codec: str, block: int, d: int, w) -> torch.Tensor:
    cp, sp, c = _encoded_rows("weighted_mean_encoded", qs, scales, codec, block, d)
    w = _weights(w, len(qs))
    out = torch.empty(d, dtype=torch.float32)
    _C().weighted_mean_encoded(cp, sp, c, block, d, w.data_ptr(), out.data_ptr())
    return out


def gram_encoded(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    cp, sp, c = _encoded_rows("gram_encoded", qs, scales, codec, block, d)
    G = torch.empty(len(qs), len(qs), dtype=torch.float64)
    _C().gram_encoded(cp, sp, c, block, d, G.data_ptr())
    return G


def trimmed_mean_encoded(qs: list, scales: list, codec: str, block: int, d: int, f: int) -> torch.Tensor:
    cp, sp, c = _encoded_rows("trimmed_mean_encoded", qs, scales, codec, block, d)
    check_trim(len(qs), f)
    out = torch.empty(d, dtype=torch.float32)
    _C().trimmed_mean_encoded(cp, sp, c, block, d, int(f), out.data_ptr())
    return out


def coord_median_encoded(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    cp, sp, c = _encoded_rows("coord_median_encoded", qs, scales, codec, block, d)
    out = torch.empty(d, dtype=torch.float32)
    _C().coord_median_encoded(cp, sp, c, block, d, out.data_ptr())
    return out


def mean_around_median_encoded(qs: list, scales: list, codec: str, block: int, d: int, rows, k: int) -> torch.Tensor:
    cp, sp, c = _encoded_rows("mean_around_median_encoded", qs, scales, codec, block, d)
    rows = _rows(rows, len(qs), k)
    out = torch.empty(d, dtype=torch.float32)
    _C().mean_around_median_encoded(cp, sp, c, block, d, rows.data_ptr(), rows.numel(), int(k), out.data_ptr())
    return out


# ---------------------------------------------------------------------------------------------
# compression (csrc/cpu/quant.cpp)


def _quantize(name: str, x: torch.Tensor, block: int, key, nbytes: int, out=None):
    m = x.numel()
    if out is not None:
        q, scales = out
    else:
        q = torch.empty(nbytes, dtype=torch.int8 if name == "quantize_int8" else torch.uint8)
        scales = torch.empty(-(-m // block), dtype=torch.float32)
    k0, k1 = key if key is not None else (0, 0)
    getattr(_C(), name)(x.data_ptr(), DTYPE_CODES[x.dtype], m, block, key is not None, k0, k1, q.data_ptr(),
                        scales.data_ptr())
    return q, scales


def quantize_int8(x: torch.Tensor, block: int, key, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize("quantize_int8", x, block, key, x.numel(), out)


def quantize_int4(x: torch.Tensor, block: int, key, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize("quantize_int4", x, block, key, (x.numel() + 1) // 2, out)


def _dequantize(name: str, qs, scales, block: int, outs, start: int, qoff: int):
    m = outs[0].numel() if outs else 0
    soff = 4 * (start // block)
    getattr(_C(), name)([q.data_ptr() + qoff for q in qs], [s.data_ptr() + soff for s in scales], m, block,
                        [o.data_ptr() for o in outs])
    return outs


def dequantize_int8(qs, scales, block: int, outs, start: int = 0):
    return _dequantize("dequantize_int8", qs, scales, block, outs, start, start)


def dequantize_int4(qs, scales, block: int, outs, start: int = 0):
    return _dequantize("dequantize_int4", qs, scales, block, outs, start, start // 2)


# ---------------------------------------------------------------------------------------------
# secure sum (csrc/cpu/chacha.cpp)


def chacha20_keystream(key: torch.Tensor, nonce: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    out = torch.empty(count, dtype=torch.int32)
    key, nonce = key.contiguous(), nonce.contiguous()
    _C().chacha20_keystream(out.data_ptr(), key.data_ptr(), nonce.data_ptr(), offset, count)
    return out


def chacha20_mask(x: torch.Tensor, keys: torch.Tensor, signs: torch.Tensor, nonce: torch.Tensor, offset: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    keys, signs, nonce = keys.contiguous(), signs.to(torch.int8).contiguous(), nonce.contiguous()
    _C().chacha20_mask(out.data_ptr(), x.data_ptr(), x.numel(), keys.data_ptr(), signs.data_ptr(), keys.shape[0],
                       nonce.data_ptr(), offset)
    return out


# ---------------------------------------------------------------------------------------------
# differential privacy (csrc/cpu/hadamard.cpp)


def fwht(x: torch.Tensor, signs: torch.Tensor | None, scale: float, out: torch.Tensor | None = None, *,
         signs_after: bool = False) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out
    D, C = x.numel(), _C()
    first = 0 if signs is None or signs_after else signs.data_ptr()
    C.dp_fwht(out.data_ptr(), x.data_ptr(), D, first, scale)
    if signs is not None and signs_after:
        C.dp_apply_signs(out.data_ptr(), D, signs.data_ptr())
    return out
