"""The ServerApp: Tapestry's rule in place of Flower's FedAvg, accuracy on the test images."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from tapestry.integrations.flower import TapestryStrategy

from .task import evaluate, make_model

app = ServerApp()


def run(grid: Grid, context: Context):
    cfg = context.run_config
    rule = str(cfg["rule"])
    params = {"num_malicious_nodes": int(cfg["num-malicious-nodes"])} if rule not in ("mean", "median") else {}
    strategy = TapestryStrategy(rule, fraction_evaluate=0.0, **params)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(evaluate(model))

    return strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                          num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=central)


app.main()(run)
