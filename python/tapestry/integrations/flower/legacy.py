"""``TapestryFedAvg``: the same strategy for Flower's older ``Strategy`` API (``start_server`` /
``ServerAppComponents``, ``NumPyClient``; ``aggregate_fit`` and ``aggregate_evaluate``)."""

from __future__ import annotations

import inspect
import json
from logging import INFO, WARNING
from typing import Any

from flwr.common import FitRes, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from ...aggregators import Rule
from .core import RoundAggregator, RoundResult, build_rule, split_kwargs

_FEDAVG_PARAMS = [p for p in inspect.signature(FedAvg.__init__).parameters if p != "self"]  # inplace: accepted, no effect


class TapestryFedAvg(FedAvg):
    """Flower's (Strategy API) ``FedAvg`` whose ``aggregate_fit`` is a Tapestry rule.

    Arguments as :class:`~tapestry.integrations.flower.TapestryStrategy` (rule, Flower's parameter
    names such as ``num_malicious_clients``/``num_clients_to_keep``/``beta``, ``weighted``,
    ``on_unmet``), the others Flower ``FedAvg``'s. ``aggregate_fit`` returns what Flower's
    ``FedAvg``, ``FedMedian``, ``FedTrimmedAvg`` and ``Krum`` return for the matching rule, with
    the round's decisions added to the metrics as JSON lists of client ids (``tapestry-selected``,
    ``-rejected``, ``-nonfinite``, ``-dropped``; this API's metrics hold scalars only) and
    ``tapestry-skipped`` (0/1). ``aggregate_evaluate`` is ``FedAvg``'s (weighted mean loss).
    """

    def __init__(self, rule: str | Rule = "mean", *, rule_params: dict | None = None, weighted: bool | None = None,
                 on_unmet: str | Rule = "skip", **kwargs: Any) -> None:
        rule_kw, fedavg_kw = split_kwargs(rule, kwargs, _FEDAVG_PARAMS, "TapestryFedAvg")
        super().__init__(**fedavg_kw)
        self.rule = build_rule(rule, {**(rule_params or {}), **rule_kw})
        self.core = RoundAggregator(self.rule, weighted=weighted, on_unmet=on_unmet)
        self.last_round: RoundResult | None = None
        self._reported = False

    def __repr__(self) -> str:
        return f"TapestryFedAvg(rule={self.rule!r}, weighted={self.core.weighted}, on_unmet={self.core.on_unmet!r})"

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        if not self._reported:  # once, when the run starts: a configured f no sampled round can meet
            self._reported = True
            available = client_manager.num_available()
            sampled, _ = self.num_fit_clients(available)
            plan = self.core.plan(sampled)
            if plan:
                log(WARNING, "TapestryFedAvg: %s (fraction_fit=%s of %s available, min_fit_clients=%s)", plan,
                    self.fraction_fit, available, self.min_fit_clients)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        nodes = [c if isinstance(c := getattr(proxy, "cid", None), str) else str(i) for i, (proxy, _) in enumerate(results)]
        arrays = [dict(enumerate(parameters_to_ndarrays(res.parameters))) for _, res in results]
        weights = [float(res.num_examples) for _, res in results]
        result = self.last_round = self.core.aggregate(server_round, nodes, arrays, weights)
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn and not result.skipped:
            metrics = dict(self.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results]))
        elif server_round == 1 and not self.fit_metrics_aggregation_fn:
            log(INFO, "No fit_metrics_aggregation_fn provided")
        for k, v in result.metrics().items():
            metrics[k] = json.dumps(v) if isinstance(v, list) else v
        if result.arrays is None:
            return None, metrics
        return ndarrays_to_parameters([result.arrays[i] for i in sorted(result.arrays)]), metrics
