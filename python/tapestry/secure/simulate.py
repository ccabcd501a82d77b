"""The in-process driver: a whole round between :class:`Client` and :class:`Server` objects, with
every message serialised to bytes on the way, dropouts at any stage, and per-phase timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .crypto import ProtocolError, identity_public
from .fixedpoint import FixedPoint, clip_norm
from .client import Client
from .protocol import check_parameters
from .server import Server

STAGES = ("advertise", "share", "mask", "unmask")  # a dropout at stage S sends nothing from S on
PHASES = ("advertise", "share", "mask", "consistency", "unmask")  # what ``intercept`` sees


@dataclass
class RoundInfo:
    survivors: list[int]            # clients whose input is in the sum
    dropped: dict[int, str]         # client -> stage it dropped at
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall time
    bytes_sent: dict[str, int] = field(default_factory=dict)  # phase -> bytes of all messages
    fixed_point: FixedPoint | None = None
    excluded: dict[int, str] = field(default_factory=dict)   # client -> why the server excluded it
    accused: dict[int, list[int]] = field(default_factory=dict)  # client -> peers whose shares from it failed
    rejected: list[str] = field(default_factory=list)       # messages discarded unauthenticated (claimed sender)
    failed: dict[int, str] = field(default_factory=dict)     # client -> why it stopped (a bad message to it)


def _dropouts(dropouts, n: int) -> dict[int, str]:
    items = dropouts.items() if isinstance(dropouts, dict) else ((u, "mask") for u in dropouts)
    out = {}
    for u, stage in items:
        if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or not 0 <= u < n:
            raise ValueError(f"dropout {u!r} is not a client index in 0..{n - 1}")
        if stage not in STAGES:
            raise ValueError(f"dropout stage of client {u} must be one of {STAGES}, got {stage!r}")
        out[int(u)] = stage
    return out


def _rows(updates) -> list:
    if isinstance(updates, torch.Tensor):
        if updates.dim() != 2:
            raise ValueError(f"stacked updates must be (n, d), got shape {tuple(updates.shape)}")
        return list(updates)
    rows = list(updates)
    if not rows:
        raise ValueError("no updates")
    return rows


def _is_ring(x) -> bool:
    return (isinstance(x, np.ndarray) and x.dtype in (np.uint32, np.uint64)) or (
        isinstance(x, torch.Tensor) and x.dtype == torch.uint32)


def simulate_round(updates, *, threshold: int, neighbours: int | None = None, dropouts=(), seed: int = 0,
                   clip: float = 1.0, bits: int = 32, rounding: str = "nearest", round_id: int = 0,
                   return_info: bool = False, active: bool = False, intercept=None):
    """Securely sum ``updates`` (n float vectors, or n uint32/uint64 ring vectors) in one round.

    ``dropouts``: client indices that never deliver their masked input, or ``{index: stage}`` with
    stage in ``advertise`` (before key sharing), ``share``, ``mask`` (after sharing, before the
    masked input) or ``unmask`` (sent the input, silent while unmasking). ``seed`` drives the
    public SecAgg+ graph and stochastic rounding; key material always comes from ``os.urandom``.

    ``active``: the active-adversary setting (each client gets a long-term Ed25519 key; signed
    advertisements and the consistency round). ``intercept(phase, client, data)`` (phase in
    :data:`PHASES`, ``client`` the :class:`Client`) returns the messages the server receives in
    place of that client's ``data`` (a list of bytes): a hook to play hostile clients. A message the server refuses is
    recorded (``RoundInfo.excluded`` / ``rejected``) and the round goes on.

    Returns the survivors' sum: float32 (values clipped to ``[-clip, clip]`` and fixed-point
    encoded, :class:`FixedPoint`) for float input, the exact ring sum for ring input; with
    ``return_info`` also a :class:`RoundInfo`. Fewer than ``threshold`` clients at any stage
    raises :class:`ProtocolError` and reveals nothing.
    """
    rows = _rows(updates)
    n = len(rows)
    check_parameters(n, threshold, neighbours)
    drop = _dropouts(dropouts, n)
    ring = _is_ring(rows[0])
    d = int(np.asarray(rows[0]).size if not isinstance(rows[0], torch.Tensor) else rows[0].numel())
    fp = None
    t0 = time.perf_counter()
    if ring:
        vals = [r.numpy() if isinstance(r, torch.Tensor) else r for r in rows]
        dt = vals[0].dtype
        for i, v in enumerate(vals):
            if v.dtype != dt or v.ndim != 1 or v.size != d:
                raise ValueError(f"client {i}: ring vector {v.dtype} x {v.shape}, expected {dt} x ({d},)")
        bits = 8 * dt.itemsize
    else:
        fp = FixedPoint(n=n, clip=clip, bits=bits, rounding=rounding)
        vals = []
        for i, r in enumerate(rows):
            r = torch.as_tensor(r).reshape(-1)
            if r.numel() != d:
                raise ValueError(f"client {i}: {r.numel()} parameters, client 0 has {d}")
            sr = np.random.default_rng([seed, i]).bytes(32) if rounding == "stochastic" else None
            vals.append(fp.encode(r, seed=sr))
    info = RoundInfo(survivors=[], dropped=drop, fixed_point=fp)
    info.seconds["encode"] = time.perf_counter() - t0

    ident = {i: Ed25519PrivateKey.generate() for i in range(n)} if active else {}
    pubs = {i: identity_public(k) for i, k in ident.items()} if active else None
    clients = [Client(i, vals[i], round_id=round_id, identity=ident.get(i), identities=pubs) for i in range(n)]
    server = Server(threshold=threshold, d=d, bits=bits, neighbours=neighbours, round_id=round_id, graph_seed=seed,
                    clients=range(n), identities=pubs)

    def phase(name, stage, inbox_for, hook):
        t = time.perf_counter()
        sent = 0
        for c in clients:
            if drop.get(c.id) in STAGES[: STAGES.index(stage) + 1] or c.id in info.failed:
                continue
            try:
                msg = inbox_for(c)
            except ProtocolError as exc:  # a bad message to this client: it stops, like a dropout
                info.failed[c.id] = str(exc)
                continue
            if msg is None:
                continue
            for m in (intercept(hook, c, msg) if intercept else [msg]):
                sent += len(m)
                try:
                    server.receive(m)
                except ProtocolError:
                    pass  # recorded by the server (excluded / rejected); the round goes on
        info.seconds[name] = time.perf_counter() - t
        info.bytes_sent[name] = sent

    try:
        phase("advertise", "advertise", lambda c: c.advertise(), "advertise")
        t = time.perf_counter()
        rosters = server.close_advertise()
        info.seconds["server_roster"] = time.perf_counter() - t
        phase("share_keys", "share", lambda c: c.share_keys(rosters[c.id]) if c.id in rosters else None, "share")
        forwards = server.close_share()
        phase("masked_input", "mask", lambda c: c.masked_input(forwards[c.id]) if c.id in forwards else None, "mask")
        t = time.perf_counter()
        requests = server.close_masked()
        info.seconds["server_sum"] = time.perf_counter() - t
        if active:
            phase("consistency", "mask", lambda c: c.consistency(requests[c.id]) if c.id in requests else None,
                  "consistency")
            requests = server.close_consistency()
        phase("unmask", "unmask", lambda c: c.unmask(requests[c.id]) if c.id in requests else None, "unmask")
        t = time.perf_counter()
        total = server.finish()
        info.seconds["server_unmask"] = time.perf_counter() - t
    finally:
        info.excluded, info.accused, info.rejected = server.excluded, server.accused, server.rejected
    info.survivors = list(server.u3)
    result = total if ring else torch.from_numpy(fp.decode(total).astype(np.float32))
    return (result, info) if return_info else result


def secure_sum(updates, *, threshold: int | None = None, neighbours: int | None = None, clip: float = 1.0,
               norm_clip: float | None = None, dropouts=(), seed: int = 0, bits: int = 32,
               rounding: str = "nearest", return_info: bool = False):
    """The training loop's entry point: the sum of float client updates under secure aggregation.

    Each client first scales its update to L2 norm at most ``norm_clip`` (when given; the one
    robustness measure a server can still enforce), then clips coordinates to ``clip`` and encodes
    them in fixed point. ``threshold`` defaults to the smallest valid one (a strict majority of the
    holders). Returns a float32 ``(d,)`` tensor (and :class:`RoundInfo` with ``return_info``);
    divide by ``len(info.survivors)`` for the mean.
    """
    rows = _rows(updates)
    n = len(rows)
    if threshold is None:
        holders = n if neighbours is None else neighbours + 1
        threshold = holders // 2 + 1
    flat = [torch.as_tensor(r).reshape(-1).to(torch.float64) for r in rows]
    if norm_clip is not None:
        if not norm_clip > 0:
            raise ValueError(f"norm_clip must be > 0, got {norm_clip}")
        flat = [clip_norm(r, norm_clip) for r in flat]
    return simulate_round(flat, threshold=threshold, neighbours=neighbours, dropouts=dropouts, seed=seed, clip=clip,
                          bits=bits, rounding=rounding, return_info=return_info)
