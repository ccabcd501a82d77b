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

import torch

from .. import compression, secure


def check(config) -> None:
    """Refuse a codec or secure setting that cannot run, listing what can."""
    if config.codec not in (None, "none") and config.codec not in compression.CODECS:
        raise ValueError(f"unknown codec {config.codec!r}; valid: {', '.join(compression.CODECS)}")
    if config.secure:
        if config.rule != "mean":
            raise ValueError(f"--secure reveals only the sum of the updates, so it works with rule 'mean' "
                             f"(FedAvg), not {config.rule!r}")
        if config.codec not in (None, "none"):
            raise ValueError("--secure and --codec cannot be combined (masking works on the dense fixed-point deltas)")
        if config.dp == "central":
            raise ValueError("--dp central clips each update on the server, which --secure hides from it: use "
                             "--dp distributed (noise added by the clients inside the secure sum)")
        threshold = config.per_round // 2 + 1  # secure_sum's default: a strict majority
        if config.answering < threshold:
            raise ValueError(f"--secure needs at least {threshold} of {config.per_round} clients to answer each round "
                             f"(a strict majority), --dropout {config.dropout} leaves {config.answering}")


def check_dp(config) -> None:
    """Refuse a DP setting that cannot run or cannot be accounted, before any training."""
    if not config.dp:
        return
    if config.dp not in ("central", "distributed"):
        raise ValueError(f"--dp must be 'central' or 'distributed', got {config.dp!r}")
    if config.rule != "mean":
        raise ValueError(f"--dp {config.dp} privatizes the mean (FedAvg), not rule {config.rule!r}")
    if config.codec not in (None, "none"):
        raise ValueError("--dp and --codec cannot be combined")
    if config.dp == "distributed" and config.dp_sampling != "fixed":
        raise ValueError("--dp distributed sizes each client's noise share for a known number of clients: "
                         "use --dp-sampling fixed")
    _dp_engine(config)  # the accountant's calibration: unreachable targets fail here


def _dp_schedule(config):
    from ..privacy import Schedule
    return Schedule(population=config.clients, per_round=config.per_round, rounds=config.rounds,
                    sampling=config.dp_sampling, accountant=config.dp_accountant)


def _dp_engine(config):
    """CentralDP for --dp central; for --dp distributed the calibrated noise multiplier (or None: inf)."""
    import math

    from ..privacy import CentralDP, noise_for_epsilon
    if config.dp == "central":
        return CentralDP(_dp_schedule(config), delta=config.dp_delta, epsilon=config.dp_epsilon, clip=config.dp_clip,
                         adaptive=config.dp_adaptive, seed=config.seed)
    if not config.dp_epsilon > 0:
        raise ValueError(f"--epsilon must be > 0, got {config.dp_epsilon}")
    if math.isinf(config.dp_epsilon):
        return None
    return noise_for_epsilon(config.dp_epsilon, delta=config.dp_delta, schedule=_dp_schedule(config))


class Transport:
    """Per-run client/server state of the chosen transport (error-feedback residuals)."""

    def __init__(self, config):
        self.config = config
        self.codec = None if config.codec in (None, "none") else config.codec
        self.secure = bool(config.secure)
        # With secure sum, clients that drop out have already masked: the protocol recovers them.
        self.masks_dropouts = self.secure
        self._compressors: dict[int, object] = {}
        self.dp = config.dp
        self._central = self._distributed = self._z = None
        self._eps: list[float] = []

    def start(self, d: int) -> None:
        """Set up what needs the model size: the distributed-DP plan (refused here, before training)."""
        if not self.dp:
            return
        check_dp(self.config)
        engine = _dp_engine(self.config)
        if self.dp == "central":
            self._central = engine
        elif engine is not None:
            from ..privacy import Accountant, DistributedDP, plan
            cfg = self.config
            # fixed-size sampling is accounted under replace-one neighbours: sensitivity 2 Delta_2, as centrally
            two = 2.0 if cfg.dp_sampling == "fixed" and cfg.per_round < cfg.clients else 1.0
            self._plan = plan(n=cfg.answering, d=d, clip=cfg.dp_clip, noise_multiplier=two * engine, bits=cfg.dp_bits,
                              mechanism=cfg.dp_mechanism)
            self._distributed = DistributedDP(self._plan, seed=cfg.seed)
            self._z = engine
            self._accountant = Accountant(_dp_schedule(cfg), self._plan.effective_noise_multiplier / two, cfg.dp_delta)
        self.masks_dropouts = self._distributed is not None

    def privacy(self) -> dict | None:
        """What results.json records about privacy (None without --dp)."""
        if not self.dp:
            return None
        if self._central is not None:
            return self._central.summary()
        cfg = self.config
        out = {"mechanism": self.dp, "target_epsilon": cfg.dp_epsilon if cfg.dp_epsilon != float("inf") else None,
               "delta": cfg.dp_delta, "sampling": cfg.dp_sampling, "accountant": cfg.dp_accountant}
        if self._distributed is not None:
            p = self._plan
            out.update(noise_multiplier=self._z, effective_noise_multiplier=self._accountant.z,
                       epsilon=self._eps, bits=p.bits, scale=p.scale, delta2=p.delta2, local_variance=p.local_var,
                       wrap_bound=p.wrap_bound, dg_mechanism=p.mechanism)
        else:
            out.update(epsilon=None, note="epsilon = inf: the non-private run")
        return out

    def aggregate(self, rule, deltas: torch.Tensor, clients: list[int], dropped: list[int],
                  byzantine: set[int], rnd: int) -> torch.Tensor:
        if self._central is not None and self._central.private:
            return self._central.aggregate(deltas, rnd).reshape(-1).float()
        if self._distributed is not None:
            drop_rows = [i for i, c in enumerate(clients) if c in dropped]
            total, info = self._distributed.secure_sum(deltas, rnd=rnd, dropouts=drop_rows, return_info=True)
            self._eps.append(self._accountant.step())
            return (total / len(info.survivors)).float()
        if self.secure:
            return self._secure(deltas, clients, dropped, rnd)
        if self.codec:
            return self._compressed(rule, deltas, clients, byzantine, rnd)
        return rule(deltas)

    # -- compression --------------------------------------------------------------------------
    def _compressed(self, rule, deltas, clients, byzantine, rnd):
        payloads, forged = [], {}
        for row, c in enumerate(clients):
            if not bool(torch.isfinite(deltas[row]).all()):
                # The encoder refuses NaN/Inf: the row of a NaN/Inf sender (or of an honest client
                # whose model a NaN aggregate already destroyed) stands for a forged payload (NaN
                # scales) and joins the decoded rows below.
                forged[row] = deltas[row]
                continue
            if c in byzantine:  # attackers send their crafted update as it is, no error feedback
                payloads.append(compression.encode(deltas[row], self.codec, seed=self._seed(rnd, c)))
                continue
            if c not in self._compressors:
                self._compressors[c] = compression.Compressor(self.codec, seed=self._seed(0, c))
            payloads.append(self._compressors[c].encode(deltas[row]))
        if not forged:  # the fused path: no dense (n, d) copy of the decoded updates
            return torch.as_tensor(compression.aggregate(payloads, rule)).reshape(-1).float()
        if not payloads:
            return rule(torch.stack([forged[i] for i in range(len(clients))])).reshape(-1).float()
        decoded = iter(torch.as_tensor(compression.decode(p)).reshape(-1).float() for p in payloads)
        rows = [forged[i] if i in forged else next(decoded) for i in range(len(clients))]
        return rule(torch.stack(rows)).reshape(-1).float()

    def _seed(self, rnd: int, client: int) -> int:
        return ((self.config.seed * 1_000_003 + rnd) * 65_537 + client) % 2**63

    # -- secure sum ---------------------------------------------------------------------------
    def _secure(self, deltas, clients, dropped, rnd):
        drop_rows = [i for i, c in enumerate(clients) if c in dropped]
        # clip: per-coordinate range of the fixed-point encoding (deltas beyond it are clipped).
        total, info = secure.secure_sum(deltas, dropouts=drop_rows, seed=self._seed(rnd, 0),
                                     clip=self.config.extra.get("secure_clip", 8.0), return_info=True)
        return torch.as_tensor(total).reshape(-1).float() / len(info.survivors)
