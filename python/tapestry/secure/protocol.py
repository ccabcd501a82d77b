"""Secure aggregation as message-passing state machines (Bonawitz et al. 2017, double masking;
Bell et al. 2020, SecAgg+ with ``k`` neighbours on a random regular graph).

Stages (every message is bytes, see :mod:`.messages`)::

    client                                   server
    advertise()          -- advertise -->    U1 = senders;  roster to U1 (>= t)
    share_keys(roster)   -- shares    -->    U2 = senders;  forward each client its shares (>= t)
    masked_input(fwd)    -- masked    -->    U3 = senders less the accused;  request: survivors U3,
                                             dropped U2 \\ U3, each restricted to the client's holdings (>= t)
    [consistency(req)    -- signature -->    active setting: signatures on U3 go out with the requests]
    unmask(request)      -- response  -->    U4 = senders;  reconstruct b_u (u in U3), s_u (u dropped)

Each client ``u`` holds two X25519 key pairs (``c`` for the share channel, ``s`` for masks) and a
self-mask seed ``b_u``; it Shamir-shares ``b_u`` and its mask private key among its holders (its
neighbours and itself; everyone in U1 without SecAgg+) with threshold ``t``, each share encrypted
with ChaCha20-Poly1305 under the (u, v) channel key, bound to the round, sender and receiver. The
masked input is ``y_u = q_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` over the
neighbours ``v`` in U2. A client answers one unmasking request per round and refuses one that
names a peer both as survivor and as dropped, or names itself as dropped: so, with ``t`` above
half the holders, no server obtains both ``b_u`` and ``s_u`` of one client.

Requirements checked when the round is set up: ``holders/2 < t <= holders``, where holders is
``n`` (all clients) or ``k + 1`` (SecAgg+), ``1 <= k <= n - 1`` and ``n k`` even.

Hostile participants (docs/secure-sum.md, "Threat model"): every client message after
``advertise`` carries a Poly1305 tag under a key only that client and the server share; every
message is size-limited before parsing and checked against the round on arrival; a client whose
message fails is excluded and named, and the round goes on while ``t`` clients remain. Shares are
committed (SHA-256) by their dealer, so a wrong share is caught and its sender named. With
``identities`` (long-term Ed25519 keys) advertisements are signed and a consistency-check round
makes every client see one set of survivors (the active-adversary setting of Bonawitz et al.).

The state machines live in :mod:`.client` and :mod:`.server`; this module holds what both use.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from . import shamir
from .crypto import ProtocolError
from .fixedpoint import RING_DTYPES
from .graph import check_neighbours
from .prg import NONCE_MASK, chacha20_keystream, chacha20_mask

SHARE_HEAD = struct.Struct("<II")
PLAIN_BYTES = SHARE_HEAD.size + 2 * shamir.SHARE_BYTES  # (dealer, holder) | b share | s share
BOX_BYTES = 12 + PLAIN_BYTES + 16                         # nonce | ciphertext | Poly1305 tag
COMMIT_BYTES = 64                                         # SHA-256 of the b share | of the s share
SLACK = 4096                                              # fixed header, JSON header, scalar fields


def check_parameters(n: int, threshold: int, neighbours: int | None) -> int:
    """The number of holders of each client's shares; ValueError naming the violated inequality."""
    if n < 2:
        raise ValueError(f"secure aggregation needs n >= 2 clients, got n={n}")
    if neighbours is not None:
        check_neighbours(n, neighbours)
        holders, what = neighbours + 1, f"k+1={neighbours + 1}"
    else:
        holders, what = n, f"n={n}"
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold must be an int, got {type(threshold).__name__}")
    if not (2 * threshold > holders and threshold <= holders):
        raise ValueError(f"threshold needs holders/2 < t <= holders with holders = {what}, got t={threshold}")
    return holders


def mask_words(seeds: list[bytes], signs: list[int], q: np.ndarray) -> np.ndarray:
    """``q + sum_j signs_j PRG(seeds_j)`` in q's ring (uint32: one keystream word per element,
    fused kernel; uint64: two consecutive words per element, little-endian)."""
    if q.dtype == np.uint32:
        x = torch.from_numpy(q.view(np.int32))
        return chacha20_mask(x, seeds, signs, nonce=NONCE_MASK).numpy().view(np.uint32)
    acc = q.copy()
    for s, sign in zip(seeds, signs):
        ks = chacha20_keystream(s, NONCE_MASK, 0, 2 * q.size).numpy().view(np.uint64)
        acc = acc + ks if sign > 0 else acc - ks  # uint64 arithmetic wraps mod 2^64
    return acc


def ring_view(bits: int, d: int, data, who: str) -> np.ndarray:
    dtype = np.dtype(RING_DTYPES[bits]).newbyteorder("<")
    if memoryview(data).nbytes != d * dtype.itemsize:
        raise ProtocolError(f"{who}: masked input has {memoryview(data).nbytes} bytes, expected {d} x {dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).astype(RING_DTYPES[bits], copy=False)
