"""Client-side compression with error feedback (Seide et al. 2014; Karimireddy et al. 2019).

Each round: ``delta = local - global + residual``; ``payload = encode(delta)``;
``residual = delta - decode(payload)``. What compression drops this round is sent in later
rounds, so the sum of decoded updates tracks the sum of true deltas (the residual stays bounded).
"""

from __future__ import annotations

from typing import Any

import torch

from .codecs import CODECS, decode_flat, encode_flat, flatten


class Compressor:
    """Keeps one client's error-feedback residual across rounds.

    ``Compressor("int4", block=256, seed=7)``; ``payload = comp.compress(local, global_model)``
    (or ``comp.encode(delta)`` with the delta already formed). Stochastic rounding draws round
    ``r``'s seed from ``(seed, r)``, so a client's whole run is reproducible from ``seed``.
    ``error_feedback=False`` turns the residual off. ``codec_options`` go to :func:`encode`
    (``block``, ``rounding``, ``k``, ``ratio``).
    """

    def __init__(self, codec: str, *, seed: int | None = None, error_feedback: bool = True, **codec_options: Any):
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; valid: {', '.join(CODECS)}")
        unknown = set(codec_options) - {"block", "rounding", "k", "ratio"}
        if unknown:
            raise TypeError(f"Compressor: unknown options {sorted(unknown)}")
        import secrets

        self.codec, self.options, self.error_feedback = codec, codec_options, error_feedback
        self.seed = secrets.randbits(32) if seed is None else seed
        self.round = 0
        self.residual: torch.Tensor | None = None

    def encode(self, delta: Any) -> bytes:
        """Encode ``delta`` plus the residual; keep what was lost as the next residual."""
        flat, spec = flatten(delta)
        return self._encode(flat, spec)

    def _encode(self, flat: torch.Tensor, spec) -> bytes:
        if self.residual is not None and self.error_feedback:
            if self.residual.numel() != flat.numel():
                raise ValueError(f"Compressor: update has {flat.numel()} values, the residual {self.residual.numel()}")
            flat = flat + self.residual
        seed = (self.seed * 0x9E3779B97F4A7C15 + self.round) % 2**64
        payload = encode_flat(flat, spec, self.codec, seed=seed, **self.options)
        if self.error_feedback:
            decoded, _ = decode_flat(payload)
            self.residual = flat - decoded
        self.round += 1
        return payload

    def compress(self, local: Any, global_model: Any) -> bytes:
        """``encode(local - global_model)`` for tensors, arrays or parameter sets of one form."""
        lf, spec = flatten(local)
        gf, gspec = flatten(global_model)
        if gf.numel() != lf.numel():
            raise ValueError(f"Compressor: local model has {lf.numel()} values, global model {gf.numel()}")
        return self._encode(lf - gf, spec)

    def reset(self) -> None:
        self.residual, self.round = None, 0
