"""The reference backend: readable PyTorch for every op, the executable form of ``docs/spec.md``.

Every other backend is tested against these functions, evaluated on float64 copies of the inputs.
They run on any device and any float dtype, accumulate in float64 and return float32 (float64
for float64 input). Speed and memory are not their concern; clarity is.

Ranking convention shared by every per-coordinate op (docs/spec.md, "Non-finite inputs"): values are
ordered -Inf < finite < +Inf < NaN, which is exactly the order of ``torch.sort`` (NaN last).
"""

from __future__ import annotations

import torch


def unavailable() -> str | None:
    return None


def rejects(op: str, device: torch.device, args: tuple = ()) -> str | None:
    return None


def _result(X: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return r if X.dtype == torch.float64 else r.to(torch.float32)


def _sorted(X: torch.Tensor) -> torch.Tensor:
    """Columns sorted ascending in float64, -Inf first and NaN last."""
    return torch.sort(X.to(torch.float64), dim=0, stable=True).values


# ---------------------------------------------------------------------------------------------
# robust aggregation


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_i`` over the rows with ``w_i != 0`` (zero-weight rows are never read, so
    their non-finite values cannot reach the result). ``w`` is already normalised."""
    acc = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for i in torch.nonzero(w != 0).flatten().tolist():  # row by row: the same sum whatever the blocking
        acc += float(w[i]) * X[i].to(torch.float64)
    return _result(X, acc)


def trimmed_mean(X: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate: drop the ``f`` smallest and ``f`` largest values, average the rest."""
    n = X.shape[0]
    return _result(X, _sorted(X)[f : n - f].mean(0))


def coord_median(X: torch.Tensor) -> torch.Tensor:
    """Per coordinate median; for even ``n`` the mean of the two middle values (NumPy's rule)."""
    n = X.shape[0]
    S = _sorted(X)
    if n % 2:
        return _result(X, S[n // 2])
    return _result(X, (S[n // 2 - 1] + S[n // 2]) / 2)


def mean_around_median(X: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Bulyan's coordinate stage: per coordinate, among the values of ``rows``, the mean of the
    ``k`` values closest to their median, a window ``S[s:s+k]`` of the sorted column: sliding it
    right by one swaps ``S[j]`` for ``S[j+k]`` and pays when ``S[j+k]`` is strictly nearer, so
    ``s = 1 +`` the last ``j`` where it pays (0 if none; ties go to the smaller values). A value
    equal to the median is at distance 0 (also an infinite one: ``inf - inf`` would be NaN); a NaN
    distance is never nearer."""
    sub = X.index_select(0, rows.to(X.device))
    S = _sorted(sub)
    m = S.shape[0]
    med = coord_median(S).to(torch.float64)
    dist = torch.where(S == med, 0.0, (S - med).abs())
    j = torch.arange(1, m - k + 1, device=S.device)[:, None]
    start = torch.where(dist[k:] < dist[: m - k], j, 0).amax(0) if k < m else torch.zeros_like(med, dtype=torch.long)
    window = start[None, :] + torch.arange(k, device=S.device)[:, None]
    return _result(X, torch.gather(S, 0, window).mean(0))


def anchor_dots(X: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float64 ``(n, 3)``: per row, ``sum_j (x_ij - z_j)^2``, ``x_i . z`` and ``|x_i|^2``, from the
    values and ``z`` (float32) in float64 (differences and products exact; only the sums round)."""
    X64, z64 = X.to(torch.float64), z.to(device=X.device, dtype=torch.float32).to(torch.float64)
    return torch.stack([((X64 - z64) ** 2).sum(1), X64 @ z64, (X64 ** 2).sum(1)], dim=1)


def gram(X: torch.Tensor) -> torch.Tensor:
    """float64 Gram matrix of the rows after subtracting the mean of the finite rows.

    Any common per-coordinate shift leaves ``|x_i - x_j|^2 = G_ii + G_jj - 2 G_ij`` unchanged;
    centring keeps it accurate when the updates share a large common component. A row with a
    non-finite entry has non-finite entries in its own row and column of ``G`` only."""
    X64 = X.to(torch.float64)
    finite = torch.isfinite(X64).all(dim=1)
    shift = X64[finite].mean(0) if bool(finite.any()) else torch.zeros_like(X64[0])
    C = X64 - shift
    return C @ C.T


# ---------------------------------------------------------------------------------------------
# compression (see tapestry.compression)
#
# Blockwise symmetric absmax quantisation, written in float32 steps that every backend repeats
# exactly (so quantised bytes are bit-identical across backends), not in float64:
#   scale_b = absmax_b / qmax  (qmax 127 for int8, 7 for int4; 0 when absmax_b < 2^-96)
#   q_j = clamp(floor(x_j * (1 / scale_b) + u_j), -qmax, qmax),  decode = q_j * scale_b
#   u_j = 0.5 (round to nearest) or uniform(key, j) in [0, 1) (stochastic: E[decode] = x).
# A block holding NaN/Inf gets that value as its scale and q = 0 (the codec refuses to send it).

_M32 = 0xFFFFFFFF
_TINY = 2.0 ** -96


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32), without overflowing int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def quant_uniform(j: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """The counter-based generator: float32 ``u`` in [0, 1) for element indices ``j``: 16 random
    bits, the low (even ``j``) or high (odd ``j``) half of ``mix32((j >> 1) ^ k0) ^ k1`` (one
    hash round), so one hash serves two elements; any backend computes any element's number
    alone. The rounding it drives is unbiased up to 2^-16 of a step."""
    k0, k1 = key
    j = j & _M32
    r = _mix32((j >> 1) ^ k0) ^ k1
    return ((r >> ((j & 1) * 16)) & 0xFFFF).to(torch.float32) * 2.0 ** -16


def _quantize(x: torch.Tensor, block: int, key, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.numel()
    nb = -(-m // block)
    xf = x.reshape(-1).to(torch.float32)
    pad = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    pad[:m] = xf
    bits = pad.view(torch.int32) & 0x7FFFFFFF
    absbits = bits.view(nb, block).amax(dim=1)
    absmax = absbits.view(torch.float32)
    bad = absbits >= 0x7F800000
    tiny = absmax < _TINY
    scale = torch.where(bad, absmax, torch.where(tiny, torch.zeros_like(absmax), absmax / qmax))
    inv = torch.where(bad | tiny, torch.zeros_like(absmax), 1.0 / torch.where(bad | tiny, torch.ones_like(scale), scale))
    if key is None:
        u = torch.full((m,), 0.5, dtype=torch.float32, device=x.device)
    else:
        u = quant_uniform(torch.arange(m, dtype=torch.int64, device=x.device), key)
    inv_e = inv.repeat_interleave(block)[:m]
    t = torch.floor(xf * inv_e + u).clamp(-qmax, qmax)
    t = torch.where(bad.repeat_interleave(block)[:m], torch.zeros_like(t), t)
    return t.to(torch.int32), scale


def _filled(out, q: torch.Tensor, scale: torch.Tensor):
    if out is None:
        return q, scale
    out[0].copy_(q)
    out[1].copy_(scale)
    return out


def quantize_int8(x: torch.Tensor, block: int, key: tuple[int, int] | None, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: int8 ``(m,)`` and float32 ``(ceil(m / block),)`` for a 1-D float ``x``;
    ``key`` is the generator key for stochastic rounding, None for round to nearest. ``out``:
    optional preallocated ``(q, scales)`` to write."""
    q, scale = _quantize(x, block, key, 127.0)
    return _filled(out, q.to(torch.int8), scale)


def quantize_int4(x: torch.Tensor, block: int, key: tuple[int, int] | None, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scales)``: uint8 ``(ceil(m / 2),)`` with nibble ``q + 8`` (element ``2p`` in the
    low nibble of byte ``p``, ``2p + 1`` in the high one; a missing last element is q = 0)."""
    q, scale = _quantize(x, block, key, 7.0)
    m = q.numel()
    nib = torch.full((m + (m & 1),), 8, dtype=torch.int32, device=x.device)
    nib[:m] = q + 8
    packed = nib[0::2] | (nib[1::2] << 4)
    return _filled(out, packed.to(torch.uint8), scale)


def _dequantize(values: torch.Tensor, scale: torch.Tensor, block: int, out: torch.Tensor) -> None:
    m = out.numel()
    out.copy_(values[:m].to(torch.float32) * scale.to(torch.float32).repeat_interleave(block)[:m])


def dequantize_int8(qs: list, scales: list, block: int, outs: list, start: int = 0) -> list:
    """For each row ``i``: ``outs[i][j] = qs[i][start + j] * scales[i][(start + j) // block]``
    (float32, written in place; ``m = outs[i].numel()`` values; ``start`` is a multiple of
    ``block``, so the fused decoder reads any aligned column block without slicing)."""
    for q, s, o in zip(qs, scales, outs):
        _dequantize(q.view(torch.int8)[start:], s[start // block :], block, o)
    return outs


def _dequantized(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    """The ``(n, d)`` float32 rows that decoding n payloads of ``codec`` gives."""
    X = torch.empty(len(qs), d, dtype=torch.float32)
    if codec in ("fp16", "bf16"):
        for q, x in zip(qs, X):
            x.copy_(q.view(torch.float16 if codec == "fp16" else torch.bfloat16)[:d])
    else:
        (dequantize_int8 if codec == "int8" else dequantize_int4)(qs, scales, block, list(X.unbind(0)))
    return X


def weighted_mean_encoded(qs: list, scales: list, codec: str, block: int, d: int, w: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_mean` of the ``(n, d)`` rows that decoding n payloads of ``codec`` gives:
    int8 codes or packed int4 (``qs``) with float32 ``scales`` per ``block`` (as
    :func:`dequantize_int8` / :func:`dequantize_int4` decode them), or float16/bfloat16 values
    (codec "fp16"/"bf16", ``scales`` unused)."""
    return weighted_mean(_dequantized(qs, scales, codec, block, d), w)


def gram_encoded(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    """:func:`gram` of the decoded rows (see :func:`weighted_mean_encoded`)."""
    return gram(_dequantized(qs, scales, codec, block, d))


def trimmed_mean_encoded(qs: list, scales: list, codec: str, block: int, d: int, f: int) -> torch.Tensor:
    """:func:`trimmed_mean` of the decoded rows (see :func:`weighted_mean_encoded`)."""
    return trimmed_mean(_dequantized(qs, scales, codec, block, d), f)


def coord_median_encoded(qs: list, scales: list, codec: str, block: int, d: int) -> torch.Tensor:
    """:func:`coord_median` of the decoded rows (see :func:`weighted_mean_encoded`)."""
    return coord_median(_dequantized(qs, scales, codec, block, d))


def mean_around_median_encoded(qs: list, scales: list, codec: str, block: int, d: int, rows: torch.Tensor,
                                 k: int) -> torch.Tensor:
    """:func:`mean_around_median` of the decoded rows (see :func:`weighted_mean_encoded`)."""
    return mean_around_median(_dequantized(qs, scales, codec, block, d), rows, k)


def dequantize_int4(qs: list, scales: list, block: int, outs: list, start: int = 0) -> list:
    """As :func:`dequantize_int8` for packed int4 (value ``j`` in byte ``j // 2``; ``start`` even)."""
    for q, s, o in zip(qs, scales, outs):
        s = s[start // block :]
        b = q[start // 2 :].to(torch.int32)
        vals = torch.stack([(b & 15) - 8, (b >> 4) - 8], dim=1).reshape(-1)
        _dequantize(vals, s, block, o)
    return outs



# ---------------------------------------------------------------------------------------------
# secure sum (see tapestry.secure)

_CHACHA_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


def _chacha20_blocks(key, nonce, first: int, nblocks: int):
    """RFC 8439 section 2.3 block function on ``nblocks`` consecutive counters, vectorised over
    blocks with NumPy uint32 (whose arithmetic wraps mod 2^32). Returns (nblocks, 16) uint32."""
    import numpy as np

    def rotl(v, c):
        return (v << np.uint32(c)) | (v >> np.uint32(32 - c))

    def quarter(x, a, b, c, d):
        x[a] += x[b]; x[d] ^= x[a]; x[d] = rotl(x[d], 16)
        x[c] += x[d]; x[b] ^= x[c]; x[b] = rotl(x[b], 12)
        x[a] += x[b]; x[d] ^= x[a]; x[d] = rotl(x[d], 8)
        x[c] += x[d]; x[b] ^= x[c]; x[b] = rotl(x[b], 7)

    state = np.empty((16, nblocks), dtype=np.uint32)
    state[0:4] = np.array(_CHACHA_SIGMA, dtype=np.uint32)[:, None]
    state[4:12] = np.asarray(key, dtype=np.uint32)[:, None]
    state[12] = np.arange(first, first + nblocks, dtype=np.uint64).astype(np.uint32)
    state[13:16] = np.asarray(nonce, dtype=np.uint32)[:, None]
    x = state.copy()
    with np.errstate(over="ignore"):
        for _ in range(10):  # a column round and a diagonal round
            for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                               (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
                quarter(x, a, b, c, d)
        x += state
    return x.T


def _chacha_words(t: torch.Tensor):
    return t.detach().cpu().numpy().astype("uint32")


def chacha20_keystream(key: torch.Tensor, nonce: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """ChaCha20 keystream words ``offset .. offset+count-1`` as int32 bit patterns: word ``k`` is
    word ``k mod 16`` of the block with counter ``k div 16`` (key: 8 words, nonce: 3 words,
    little-endian, as RFC 8439 reads them). The caller checked that no counter passes 2^32 - 1."""
    import numpy as np

    if count == 0:
        return torch.empty(0, dtype=torch.int32, device=key.device)
    first, last = offset // 16, (offset + count - 1) // 16
    ks = _chacha20_blocks(_chacha_words(key), _chacha_words(nonce), first, last - first + 1).reshape(-1)
    start = offset - 16 * first
    out = np.ascontiguousarray(ks[start : start + count]).view(np.int32)
    return torch.from_numpy(out).to(key.device)


def chacha20_mask(x: torch.Tensor, keys: torch.Tensor, signs: torch.Tensor, nonce: torch.Tensor, offset: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + sum_j signs[j] * keystream(keys[j])[offset : offset + d]`` mod 2^32, on int32 bit
    patterns of uint32 ring elements (x: (d,), keys: (m, 8), signs: (m,) of +1/-1)."""
    import numpy as np

    acc = _chacha_words(x).astype(np.uint64)
    for key, sign in zip(keys, signs.tolist()):
        ks = chacha20_keystream(key, nonce, offset, x.numel()).cpu().numpy().view(np.uint32).astype(np.uint64)
        acc = acc + ks if sign > 0 else acc + (np.uint64(1 << 32) - ks)
    res = torch.from_numpy((acc & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)).to(x.device)
    if out is None:
        return res
    out.copy_(res)
    return out


# ---------------------------------------------------------------------------------------------
# differential privacy (see tapestry.privacy)


def sign_flips(signs: torch.Tensor, D: int) -> torch.Tensor:
    """``+-1.0`` per value: ``-1`` where bit ``i % 32`` of sign word ``i // 32`` is set."""
    w = signs.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(1) >> torch.arange(32, device=w.device)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:D].to(torch.float32)


def fwht(x: torch.Tensor, signs: torch.Tensor | None, scale: float, out: torch.Tensor | None = None, *,
         signs_after: bool = False) -> torch.Tensor:
    """``scale * H diag(signs) x`` for float32 ``x`` of a power-of-two length ``D`` (``H`` the
    Walsh-Hadamard matrix; ``signs_after``: ``diag(signs) scale H x``), stage by stage with
    ``h = 1, 2, 4, ...``, each ``(a, b) -> (a + b, a - b)``: the floats every kernel repeats."""
    D = x.numel()
    flips = None if signs is None else sign_flips(signs, D)
    y = x * flips if flips is not None and not signs_after else x.clone()
    h = 1
    while h < D:
        v = y.view(-1, 2, h)
        a, b = v[:, 0, :].clone(), v[:, 1, :].clone()
        v[:, 0, :] = a + b
        v[:, 1, :] = a - b
        h *= 2
    if scale != 1.0:
        y = y * torch.tensor(scale, dtype=torch.float32)
    if flips is not None and signs_after:
        y = y * flips
    if out is None:
        return y
    out.copy_(y)
    return out
