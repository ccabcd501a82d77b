"""Rules anchored at one reference point: MoNNA (a trusted client's update), FLTrust (the server's
own update from its root data) and Meamed (the coordinate-wise median).

MoNNA and FLTrust need, per client, one number against the anchor (a distance, or a dot product
and a norm): one pass of the ``anchor_dots`` op over column chunks (float64 sums of exact
differences and products), then one ``weighted_mean``. Meamed is the ``mean_around_median`` op
over every client. All three read the updates through
:class:`~tapestry.aggregators.columns.Columns`, so they run in memory, on compressed payloads, from
files and sharded alike (a shard's partial sums are reduced over ranks).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import ops
from .base import AggregationInfo, Rule, _sub_chunks, apply, check_f, indices, nonfinite_rows, require
from .columns import Columns


def _norm2(z: torch.Tensor) -> float:
    """``|z|^2`` in float64 (inf or NaN when ``z`` holds a non-finite value); on the CPU in NumPy,
    one thread (see base._numpy_ok)."""
    if z.device.type == "cpu":
        v = z.detach().numpy().astype(np.float64)
        return float(np.dot(v, v))
    return float(torch.sum(z.to(torch.float64) ** 2))


def _anchor_pass(src: Columns, z: torch.Tensor, *, dots: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over ``src`` against the vector ``z`` (this shard's part): per client, float64 on
    the CPU, ``|x_i - z|^2`` (``dots=False``) or ``x_i . z`` (``dots=True``), ``|x_i|^2``, and
    whether the client holds a non-finite value: the ``anchor_dots`` op (float64 sums of exact
    differences and products) over chunks of ``CHUNK`` columns."""
    n = src.n
    first = torch.zeros(n, dtype=torch.float64, device=src.device)
    norms = torch.zeros(n, dtype=torch.float64, device=src.device)
    bad = torch.zeros(n, dtype=torch.float64, device=src.device)
    z = z.to(device=src.device, dtype=torch.float32)
    for a, b in _sub_chunks(src):
        part = ops.call("anchor_dots", src.read(a, b), z[a:b]).to(src.device)
        first += part[:, 1] if dots else part[:, 0]
        norms += part[:, 2]
    bad += (~torch.isfinite(norms)).to(torch.float64)
    out = src.reduce(torch.stack([first, norms, bad])).cpu()
    return out[0], out[1], out[2] > 0


def _row(src: Columns, i: int) -> torch.Tensor:
    """Client ``i``'s update (this shard's part) as float32."""
    w = torch.zeros(src.n, dtype=torch.float64)
    w[i] = 1.0
    return apply("weighted_mean", src, w)[0]


class MoNNA(Rule):
    """MoNNA (Farhadkhani et al. 2023): the mean of the ``n - f`` updates nearest to the update of
    client ``idx`` (itself included), the client trusted to be correct in peer-to-peer learning.

    Ties in distance go to the lowest index (ByzFL's ``argpartition`` leaves them unspecified). A
    client with a non-finite value is at infinite distance: chosen last, and only when fewer than
    ``n - f`` clients are finite. Needs ``n > 2f`` (as ByzFL) and ``0 <= idx < n``; a non-finite
    trusted update is an error. Cost: two passes over the data (distances, then the mean).
    """

    name = "monna"

    def __init__(self, f: int, idx: int = 0):
        self.f = check_f(f, self.name)
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"monna: idx must be an int, got {type(idx).__name__}")
        require(idx >= 0, f"monna needs idx >= 0, got idx={idx}")
        self.idx = idx

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n > 2 * f, f"monna needs n > 2f, got n={n}, f={f}")
        require(self.idx < n, f"monna needs idx < n, got idx={self.idx}, n={n}")
        z = _row(src, self.idx)
        dist, _, bad = _anchor_pass(src, z, dots=False)
        require(not bool(bad[self.idx]), f"monna: the trusted client idx={self.idx} sent non-finite values")
        dist[bad] = float("inf")
        dist[self.idx] = 0.0
        order = torch.sort(dist, stable=True).indices
        chosen = sorted(order[: n - f].tolist())
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = 1.0 / (n - f)
        agg, backend = apply("weighted_mean", src, w)
        info = AggregationInfo(self.name, n, f=f, selected=chosen, rejected=sorted(order[n - f:].tolist()),
                               scores=dist, nonfinite=indices(bad), backend=backend)
        return agg, info


class Meamed(Rule):
    """Mean around the median (Xie et al. 2018): per coordinate, the mean of the ``n - f`` values
    closest to the coordinate's median (for even ``n`` the mean of the two middle values, as
    NumPy and ByzFL). Ties in distance go to the smaller value, so the chosen values are always a
    contiguous window of the sorted column (ByzFL's ``argpartition`` leaves ties unspecified).

    This is exactly the ``mean_around_median`` op over every client with ``k = n - f`` (Bulyan's
    coordinate stage). Non-finite values rank as in TrimmedMean (NaN is never nearer than a finite
    value); with at most ``f`` of them in a coordinate, the result there is finite. Needs
    ``n > 2f``.
    """

    name = "meamed"

    def __init__(self, f: int):
        self.f = check_f(f, self.name)

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n > 2 * f, f"meamed needs n > 2f, got n={n}, f={f}")
        agg, backend = apply("mean_around_median", src, torch.arange(n, dtype=torch.int64), n - f)
        info = AggregationInfo(self.name, n, f=f, backend=backend)
        if want_info:
            info.nonfinite = indices(nonfinite_rows(src))
        return agg, info


class FLTrust(Rule):
    """FLTrust (Cao et al., NDSS 2021): the server trains on a small clean root dataset and sends
    its own update ``g0`` along; each client gets the trust score ``TS_i = ReLU(cos(x_i, g0))``,
    its update is rescaled to ``|g0|``, and the result is ``sum_i TS_i |g0| / |x_i| x_i / sum_i TS_i``.

    Call it with the server update: ``rule(updates, server_update=g0)`` or
    ``tp.fltrust(updates, g0)``. A client with a non-finite value or a zero update scores 0 (it
    contributes nothing); when every score is 0 the result is zero (no client is trusted), as in
    the authors' code. ``info.scores`` holds the trust scores. One pass for the dot products and
    norms, one ``weighted_mean``. Sharded, ``server_update`` is this shard's part of ``g0``.
    """

    name = "fltrust"

    def aggregate(self, src, *, want_info, server_update=None):
        if server_update is None:
            raise TypeError("fltrust needs the server's update from its root data: rule(updates, server_update=g0) "
                            "or tp.fltrust(updates, g0)")
        from ..updates import as_matrix

        g0, _ = as_matrix([server_update]) if not isinstance(server_update, torch.Tensor) else \
            (server_update.detach().reshape(1, -1), None)
        g0 = g0.reshape(-1)
        require(g0.numel() == src.d, f"fltrust: server_update has {g0.numel()} values, updates have d={src.d}")
        g0_sq = _norm2(g0)
        require(math.isfinite(g0_sq), "fltrust: server_update holds non-finite values")
        n = src.n
        dots, norms, bad = _anchor_pass(src, g0, dots=True)
        g0_norm = float(src.reduce(torch.tensor([g0_sq], dtype=torch.float64, device=src.device)).item()) ** 0.5
        ok = ~bad & (norms > 0)
        cos = torch.zeros(n, dtype=torch.float64)
        if g0_norm > 0:
            cos[ok] = dots[ok] / (norms[ok].sqrt() * g0_norm)
        ts = cos.clamp(min=0.0)
        w = torch.zeros(n, dtype=torch.float64)
        total = float(ts.sum())
        if total > 0:
            w[ok] = ts[ok] * g0_norm / norms[ok].sqrt() / total
            agg, backend = apply("weighted_mean", src, w)
        else:
            agg, backend = torch.zeros(src.d, dtype=torch.float32, device=src.device), None
        chosen = indices(ts > 0)
        info = AggregationInfo(self.name, n, selected=chosen, rejected=[i for i in range(n) if i not in chosen],
                               scores=ts, nonfinite=indices(bad), backend=backend)
        return agg, info


def monna(updates, f: int, idx: int = 0, *, return_info: bool = False):
    """MoNNA; see :class:`MoNNA`."""
    return MoNNA(f, idx)(updates, return_info=return_info)


def meamed(updates, f: int, *, return_info: bool = False):
    """Mean around the median; see :class:`Meamed`."""
    return Meamed(f)(updates, return_info=return_info)


def fltrust(updates, server_update, *, return_info: bool = False):
    """FLTrust with the server's update ``server_update``; see :class:`FLTrust`."""
    return FLTrust()(updates, server_update=server_update, return_info=return_info)
