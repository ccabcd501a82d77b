"""How deltas travel from clients to the rule: dense, compressed (tapestry.compression) or
masked (tapestry.secure). The loop calls :meth:`Transport.aggregate` once per round.

* dense: the ``(n, d)`` deltas go straight to the rule;
* ``codec``: each client encodes its delta to a payload; honest clients keep an error-feedback
  residual (a :class:`tapestry.compression.Compressor` each); the server aggregates the payloads
  (fused decode + aggregate) with the rule;
* ``secure``: each client masks its delta; the server learns only the sum of those that deliver
  (clients that drop out after masking are recovered by the protocol) and divides by their count:
  FedAvg with unit weights, the only rule a sum allows.
"""

from __future__ import annotations

import importlib

import torch


def _module(name: str):
    """tapestry.compression / tapestry.secure, or None while that part is not in this build."""
    try:
        mod = importlib.import_module(f"tapestry.{name}")
    except ImportError:
        return None
    return mod


def codecs() -> list[str]:
    """Codec names the loop accepts (empty while tapestry.compression is not in this build)."""
    comp = _module("compression")
    names = getattr(comp, "CODECS", None) if comp else None
    return list(names) if names else []


def check(config) -> None:
    """Refuse a codec or secure setting that cannot run, listing what can."""
    if config.codec not in (None, "none"):
        valid = codecs()
        if not valid:
            raise ValueError(f"codec {config.codec!r}: tapestry.compression is not available in this build "
                             f"(use no codec)")
        if config.codec not in valid:
            raise ValueError(f"unknown codec {config.codec!r}; valid: {', '.join(valid)}")
    if config.secure:
        sec = _module("secure")
        if sec is None or not hasattr(sec, "secure_sum"):
            raise ValueError("--secure: tapestry.secure is not available in this build")
        if config.rule != "mean":
            raise ValueError(f"--secure reveals only the sum of the updates, so it works with rule 'mean' "
                             f"(FedAvg), not {config.rule!r}")
        if config.codec not in (None, "none"):
            raise ValueError("--secure and --codec cannot be combined (masking works on the dense fixed-point deltas)")
        threshold = config.per_round // 2 + 1  # secure_sum's default: a strict majority
        if config.answering < threshold:
            raise ValueError(f"--secure needs at least {threshold} of {config.per_round} clients to answer each round "
                             f"(a strict majority), --dropout {config.dropout} leaves {config.answering}")


class Transport:
    """Per-run client/server state of the chosen transport (error-feedback residuals)."""

    def __init__(self, config):
        self.config = config
        self.codec = None if config.codec in (None, "none") else config.codec
        self.secure = bool(config.secure)
        # With secure sum, clients that drop out have already masked: the protocol recovers them.
        self.masks_dropouts = self.secure
        self._compressors: dict[int, object] = {}

    def aggregate(self, rule, deltas: torch.Tensor, clients: list[int], dropped: list[int],
                  byzantine: set[int], rnd: int) -> torch.Tensor:
        if self.secure:
            return self._secure(deltas, clients, dropped, rnd)
        if self.codec:
            return self._compressed(rule, deltas, clients, byzantine, rnd)
        return rule(deltas)

    # -- compression --------------------------------------------------------------------------
    def _compressed(self, rule, deltas, clients, byzantine, rnd):
        comp = _module("compression")
        payloads, forged = [], {}
        for row, c in enumerate(clients):
            if not bool(torch.isfinite(deltas[row]).all()):
                # The encoder refuses NaN/Inf: the row of a NaN/Inf sender (or of an honest client
                # whose model a NaN aggregate already destroyed) stands for a forged payload (NaN
                # scales) and joins the decoded rows below.
                forged[row] = deltas[row]
                continue
            if c in byzantine:  # attackers send their crafted update as it is, no error feedback
                payloads.append(comp.encode(deltas[row], self.codec, seed=self._seed(rnd, c)))
                continue
            if c not in self._compressors:
                self._compressors[c] = comp.Compressor(self.codec, seed=self._seed(0, c))
            payloads.append(self._compressors[c].encode(deltas[row]))
        if not forged:  # the fused path: no dense (n, d) copy of the decoded updates
            return torch.as_tensor(comp.aggregate(payloads, rule)).reshape(-1).float()
        if not payloads:
            return rule(torch.stack([forged[i] for i in range(len(clients))])).reshape(-1).float()
        decoded = iter(torch.as_tensor(comp.decode(p)).reshape(-1).float() for p in payloads)
        rows = [forged[i] if i in forged else next(decoded) for i in range(len(clients))]
        return rule(torch.stack(rows)).reshape(-1).float()

    def _seed(self, rnd: int, client: int) -> int:
        return ((self.config.seed * 1_000_003 + rnd) * 65_537 + client) % 2**63

    # -- secure sum ---------------------------------------------------------------------------
    def _secure(self, deltas, clients, dropped, rnd):
        sec = _module("secure")
        drop_rows = [i for i, c in enumerate(clients) if c in dropped]
        # clip: per-coordinate range of the fixed-point encoding (deltas beyond it are clipped).
        total, info = sec.secure_sum(deltas, dropouts=drop_rows, seed=self._seed(rnd, 0),
                                     clip=self.config.extra.get("secure_clip", 8.0), return_info=True)
        return torch.as_tensor(total).reshape(-1).float() / len(info.survivors)
