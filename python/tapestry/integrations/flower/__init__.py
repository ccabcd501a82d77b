"""Flower strategies that aggregate with any Tapestry rule, for both of Flower's APIs.

    from tapestry.integrations.flower import TapestryStrategy           # message API (flwr >= 1.42)
    strategy = TapestryStrategy("krum", num_malicious_nodes=2)          # was: Krum(num_malicious_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=5)

    from tapestry.integrations.flower import TapestryFedAvg             # Strategy API (NumPyClient)
    strategy = TapestryFedAvg("trimmed_mean", beta=0.2)                 # was: FedTrimmedAvg(beta=0.2)

Both are Flower's own ``FedAvg`` (sampling, messages, metric aggregation, the server loop) with the
training aggregation replaced: the results equal Flower's ``FedAvg``, ``FedTrimmedAvg``,
``FedMedian``, ``Krum`` and ``MultiKrum`` for the matching rule, and any other Tapestry rule is one
argument away. Every array keeps its shape and dtype (integer and boolean ones included), rounds the
rule cannot take are skipped (or aggregated by a fallback rule), and each round's selected,
rejected, non-finite and dropped nodes are in the round's metrics. See docs/flower.md.

Compressed updates: a client may reply with :func:`compress_update` (its delta from the global
model, encoded by :mod:`tapestry.compression` with error feedback, one ``uint8`` array under the key
``"tapestry-payload"``); the message-API strategy aggregates the payloads with the same rule.
Server optimizers (``server_optimizer="fedadam"``, any name of :mod:`tapestry.optim`): the rule
aggregates the deltas from the global model and the optimizer moves it (message API).
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("tapestry.integrations.flower needs the flwr package (pip install 'flwr>=1.42')") from exc

from .core import ALIASES, RoundResult
from .legacy import TapestryFedAvg
from .message import PAYLOAD_KEY, TapestryStrategy, compress_update

__all__ = ["TapestryStrategy", "TapestryFedAvg", "compress_update", "PAYLOAD_KEY", "RoundResult", "ALIASES"]
