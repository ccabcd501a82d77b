"""Pairwise-masked sum over the ranks of a torch.distributed group: every rank is one client of a
secure sum whose "server" is the group itself (``tapestry train --dp distributed``). Every rank
must take part in every round (no dropout recovery, unlike :mod:`.server`'s protocol).

One round (:class:`MaskedSum`):

1. **Key agreement** (:meth:`MaskedSum.agree`): each rank draws a fresh X25519 key pair, and the
   32-byte public keys (plus one flag byte each) are all-gathered; ranks ``u`` and ``v`` derive the
   same seed ``s_uv`` (:func:`.crypto.pair_seed`: HKDF-SHA256 of their shared secret, salted with
   the round). The private keys never leave the rank and are dropped after the round.
2. **Masking**: rank ``u`` adds ``sum_v sign(v - u) PRG(s_uv)`` to its vector in ``Z_2^32``
   (:func:`.prg.chacha20_mask`, or fused into ``DistributedDP.encode``); the masks cancel in the
   sum over all ranks, and any one masked vector is uniform to a rank that lacks one of its seeds.
3. **Sum** (:meth:`MaskedSum.sum`): reduce-scatter, then all-gather, over ``int32`` words (the
   bytes of a float32 ring all-reduce): rank ``j`` receives shard ``j`` of every masked vector
   (one alltoall), adds them as int64 (exact: ``n`` values below ``2^32``), reduces mod ``2^32``,
   and the summed shards are all-gathered. No rank ever holds another rank's unmasked vector,
   only shards of masked ones and the total. Not gloo's int64 SUM all-reduce: that sends twice
   the bytes and has no per-wait deadline.
"""

from __future__ import annotations

import numpy as np
import torch

from ..distributed.allreduce import Comm
from .crypto import check_public_key, new_keypair, pair_seed, public_bytes
from .prg import chacha20_mask

RING = 1 << 32


class MaskedSum:
    """Masked sums over ``group`` (None: the default group); every collective waits at most
    ``timeout`` seconds; :attr:`bytes_sent` counts what this rank sent."""

    def __init__(self, group=None, timeout: float = 60.0):
        self.comm = Comm(group, timeout)
        if not self.comm.p2p:
            raise ValueError(f"a masked sum needs a plain torch.distributed process group (gloo or NCCL), got "
                             f"{type(self.comm.pg).__name__}: its masks cancel only when every rank contributes, "
                             f"and a torchft replica group can lose members within a step (no dropout recovery)")
        self.rank, self.size = self.comm.rank, self.comm.size

    @property
    def bytes_sent(self) -> int:
        return self.comm.bytes_sent

    def agree(self, round_id: int, flag: bool = False) -> tuple[list[bytes], list[int], list[bool]]:
        """``(seeds, signs, flags)``: this rank's pairwise mask seeds and signs for the round, and
        every rank's ``flag`` (a bit each rank may announce with its key, e.g. "my update was
        not finite"), the same list on every rank."""
        sk = new_keypair()
        mine = torch.frombuffer(bytearray(public_bytes(sk) + bytes([int(flag)])), dtype=torch.uint8)
        every = torch.empty(self.size * 33, dtype=torch.uint8)
        self.comm.allgather(every, mine, "public key exchange")
        rows = every.view(self.size, 33)
        seeds, signs = [], []
        for v in range(self.size):
            if v == self.rank:
                continue
            pk = bytes(rows[v, :32].tolist())
            check_public_key(pk, f"rank {v}", sk)
            seeds.append(pair_seed(sk, pk, round_id, self.rank, v))
            signs.append(1 if v > self.rank else -1)
        return seeds, signs, [bool(f) for f in rows[:, 32].tolist()]

    @staticmethod
    def mask(x: torch.Tensor, seeds: list[bytes], signs: list[int]) -> torch.Tensor:
        """``x`` (int32 words of ``Z_2^32``) plus this rank's masks."""
        return chacha20_mask(x.view(torch.int32), seeds, signs)

    def sum(self, masked: torch.Tensor) -> torch.Tensor:
        """The sum mod ``2^32`` of every rank's ``masked`` (1-D, int32 or uint32 words of the same
        length on every rank), as int64 values in ``[0, 2^32)``, the same on every rank."""
        n, d = self.size, masked.numel()
        shard = -(-d // n)
        words = torch.zeros(n * shard, dtype=torch.int32)  # zero padding: the last shard may be short
        words[:d] = masked.reshape(-1).view(torch.int32)
        got = torch.empty(n * shard, dtype=torch.int32)
        self.comm.alltoall(got, words, [shard] * n, [shard] * n, "reduce-scatter of the masked vectors")
        part = got.view(n, shard).to(torch.int64).sum(0) % RING
        part = torch.where(part >= RING // 2, part - RING, part).to(torch.int32)  # the same word, as int32
        total = torch.empty(n * shard, dtype=torch.int32)
        self.comm.allgather(total, part, "all-gather of the summed shards")
        return total[:d].to(torch.int64) % RING


def ring_words(ring: np.ndarray) -> torch.Tensor:
    """A NumPy uint32 ring vector as the int32 tensor of the same words (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(ring, dtype=np.uint32).view(np.int32))


__all__ = ["MaskedSum", "ring_words"]
