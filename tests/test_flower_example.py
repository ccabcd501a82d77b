"""examples/flower_digits: the app a user runs with ``flwr run``, here in-process (no Ray): its
ServerApp's own function drives its ClientApp over 10 nodes through a local Grid."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict  # noqa: E402
from test_flower import LocalGrid, server_identity  # noqa: E402,F401 (a fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower_digits"
sys.path.insert(0, str(EXAMPLE))

from flower_digits import client_app, server_app  # noqa: E402

CONFIG = {"num-server-rounds": 6, "num-malicious-nodes": 1, "attackers": "0", "attack-scale": 10.0,
          "local-steps": 20, "lr": 0.1}


class SimGrid(LocalGrid):
    """Ten nodes with the node_config Flower's simulation engine gives them."""

    def __init__(self, app, nodes, run_config):
        super().__init__(app, nodes)
        for i, node in enumerate(self.contexts):
            self.contexts[node] = Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": nodes},
                                          state=RecordDict(), run_config=run_config)


@pytest.fixture(autouse=True)
def one_thread():
    """Ten clients share this process (as they share a machine in Flower's simulation): one torch
    thread each, so a busy machine's scheduler does not stall every small op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(rule):
    run_config = {**CONFIG, "rule": rule}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    return server_app.run(SimGrid(client_app.app, 10, run_config), ctx)


def test_the_example_app_resists_its_attacker_where_fedavg_does_not():
    robust = _run("multi_krum")
    rounds = CONFIG["num-server-rounds"]
    accuracy = robust.evaluate_metrics_serverapp[rounds]["accuracy"]
    assert accuracy > 0.8, accuracy
    # node 1000 is partition 0, the attacker: Multi-Krum leaves it out every round
    assert all(robust.train_metrics_clientapp[r]["tapestry-rejected"] == [1000] for r in range(1, rounds + 1))
    mean = _run("mean")
    assert mean.evaluate_metrics_serverapp[rounds]["accuracy"] < accuracy - 0.3


def test_the_example_config_is_what_the_app_reads():
    import tomllib

    cfg = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]
    assert set(cfg["app"]["config"]) == {"num-server-rounds", "rule", *CONFIG}
    assert cfg["app"]["components"] == {"serverapp": "flower_digits.server_app:app",
                                        "clientapp": "flower_digits.client_app:app"}
    assert cfg["federations"]["local-simulation"]["options"]["num-supernodes"] == 10
