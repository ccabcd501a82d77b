"""TapestryStrategy as a drop-in for Flower's strategies (message API): any array dtype
and shape, Flower's parameter names, weights where Flower weights, rounds the rule cannot take,
the decisions in the round's metrics; and a BatchNorm CNN and a 20-round dropout run through
Flower's own server loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402
from test_flower import LocalGrid, _regression_app, _replies, server_identity  # noqa: E402,F401 (a fixture)

import tapestry as tp  # noqa: E402
from tapestry.integrations.flower import TapestryStrategy  # noqa: E402


def _run(strategy, updates, examples=None):
    arrays, metrics = strategy.aggregate_train(1, _replies(updates, examples))
    return (None if arrays is None else {k: arrays[k].numpy() for k in arrays.keys()}), metrics


def _same(a: dict, b: dict, **tol):
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (k, a[k].shape, a[k].dtype, b[k].shape, b[k].dtype)
        np.testing.assert_allclose(a[k], b[k], **tol)


def _model(n, seed=0):
    """Replies of a BatchNorm-like model: float weights, a 0-dim float, an int64 counter, a bool mask."""
    rng = np.random.default_rng(seed)
    return [{"w": rng.standard_normal((4, 3)).astype(np.float32), "scale": np.array(rng.standard_normal(), np.float32),
             "num_batches_tracked": np.array(rng.integers(0, 100), np.int64),
             "mask": rng.random(5) > 0.5, "ids": rng.integers(0, 9, (2, 2)).astype(np.int32)} for _ in range(n)]


# -- 1, 2: shapes and dtypes -------------------------------------------------------------------------

def test_zero_dim_arrays_keep_their_shape_in_every_input_form():
    vals = [1.0, 3.0, 2.0]
    forms = {
        "numpy arrays": [[np.array(v, np.float32), np.full(2, v, np.float32)] for v in vals],
        "read-only float64": [[np.array(v), np.full(2, v)] for v in vals],
        "state_dict": [{"s": torch.tensor(v), "v": torch.full((2,), v)} for v in vals],
        "numpy state_dict": [{"s": np.array(v, np.float32), "v": np.full(2, v, np.float32)} for v in vals],
    }
    for arrs in forms["read-only float64"]:
        for a in arrs:
            a.flags.writeable = False
    for name, updates in forms.items():
        out = tp.median(updates)
        first = list(out.values())[0] if isinstance(out, dict) else out[0]
        assert tuple(first.shape) == (), name
        assert float(first) == 2.0, name
        sent = updates[0]["s"] if isinstance(updates[0], dict) else updates[0][0]
        assert str(first.dtype).split(".")[-1] == str(sent.dtype).split(".")[-1], name


@pytest.mark.parametrize("n", [1, 3, 8])
def test_integer_and_boolean_arrays_under_mean_are_flowers_fedavg(n):
    updates = _model(n, n)
    examples = np.random.default_rng(n).integers(1, 50, n)
    ours, _ = _run(TapestryStrategy("mean"), updates, examples)
    theirs, _ = _run(FedAvg(), updates, examples)
    _same(ours, theirs, rtol=1e-6, atol=1e-7)
    assert ours["scale"].shape == ()


@pytest.mark.parametrize("rule,params", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("multi_krum", {"f": 1, "m": 4}),
                                         ("geometric_median", {}), ("bulyan", {"f": 1}), ("nnm+trimmed_mean", {"f": 1})])
def test_integer_arrays_under_robust_rules_keep_dtype_and_take_the_kept_replies_lower_median(rule, params):
    updates = _model(7, 3)
    s = TapestryStrategy(rule, **params)
    out, metrics = _run(s, updates)
    kept = [n - 100 for n in metrics["tapestry-selected"]]
    for k in ("num_batches_tracked", "mask", "ids"):
        assert out[k].dtype == updates[0][k].dtype and out[k].shape == updates[0][k].shape
        rows = np.sort(np.stack([updates[i][k] for i in kept]), axis=0)
        np.testing.assert_array_equal(out[k], rows[(len(kept) - 1) // 2])
    assert out["scale"].shape == () and out["scale"].dtype == np.float32


def test_krum_returns_the_selected_reply_exactly_in_every_dtype():
    updates = _model(7, 5)
    updates[0] = {k: (np.asarray(v * 1e3) if v.dtype.kind == "f" else v) for k, v in updates[0].items()}  # an outlier
    float64 = [{k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in u.items()} for u in updates]
    for ups in (updates, float64):
        ours, metrics = _run(TapestryStrategy("krum", num_malicious_nodes=2), ups)
        best = tp.krum([np.concatenate([u["w"].ravel(), u["scale"].ravel()]) for u in ups], f=2, return_info=True)[1].selected[0]
        assert metrics["tapestry-selected"] == [100 + best] and best != 0
        _same(ours, ups[best], rtol=0, atol=0)
        # Flower's Krum (whose selection fails on 0-dim and integer arrays) picks the same reply
        theirs, _ = _run(Krum(num_malicious_nodes=2), [{"w": u["w"], "scale": u["scale"].reshape(1)} for u in ups])
        np.testing.assert_array_equal(theirs["w"], ours["w"])


# -- 3: weights --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,f,m", [(5, 1, 3), (9, 2, 5), (10, 3, 7)])
def test_multi_krum_weights_by_examples_like_flowers(n, f, m):
    rng = np.random.default_rng(n)
    updates = [{"w": rng.standard_normal(30).astype(np.float32)} for _ in range(n)]
    examples = rng.integers(1, 1000, n)
    ours, metrics = _run(TapestryStrategy("multi_krum", num_malicious_nodes=f, num_nodes_to_select=m), updates, examples)
    theirs, _ = _run(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), updates, examples)
    _same(ours, theirs, rtol=1e-5, atol=1e-6)
    unweighted, _ = _run(TapestryStrategy("multi_krum", f=f, m=m, weighted=False), updates, examples)
    sel = [i - 100 for i in metrics["tapestry-selected"]]
    np.testing.assert_allclose(unweighted["w"], np.mean([updates[i]["w"] for i in sel], axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(unweighted["w"], ours["w"], rtol=1e-3)


def test_weighted_true_for_a_rule_without_weights_is_refused():
    with pytest.raises(ValueError, match="weighted=True: rule 'median' takes no weights"):
        TapestryStrategy("median", weighted=True)


# -- 4: rounds the rule cannot take -------------------------------------------------------------------

def test_an_unmet_requirement_skips_the_round_or_falls_back(caplog):
    updates = _model(10, 1)
    s = TapestryStrategy("krum", num_malicious_nodes=4)
    arrays, metrics = _run(s, updates)
    assert arrays is None and metrics["tapestry-skipped"] == 1
    assert "round 1: krum needs n >= 2f+3, got n=10, f=4; round skipped" in caplog.text
    fb = TapestryStrategy("krum", num_malicious_nodes=4, on_unmet="median")
    arrays, metrics = _run(fb, updates)
    theirs, _ = _run(FedMedian(), [{"w": u["w"]} for u in updates])
    np.testing.assert_allclose(arrays["w"], theirs["w"], rtol=1e-6)
    assert metrics["tapestry-skipped"] == 0 and "aggregating with Median() instead" in caplog.text


def test_start_reports_an_f_the_sampled_count_never_satisfies(caplog):
    app = ClientApp()

    @app.train()
    def train(msg, context):
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    s = TapestryStrategy("bulyan", num_malicious_nodes=2, fraction_evaluate=0.0, min_available_nodes=6)
    initial = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    result = s.start(grid=LocalGrid(app, 6), initial_arrays=initial, num_rounds=2)
    assert "bulyan needs n >= 4f+3, got n=6, f=2: with 6 sampled nodes every round will be skipped" in caplog.text
    assert [result.train_metrics_clientapp[r]["tapestry-skipped"] for r in (1, 2)] == [1, 1]
    assert "w" not in result.arrays  # Flower's Result holds arrays from aggregated rounds only


# -- 5, 6: decisions visible; Flower's names ---------------------------------------------------------

def test_decisions_are_in_the_metrics_and_an_info_line(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    updates = _model(9, 2)
    updates[3]["w"] = updates[3]["w"] * 1e4
    updates[6]["w"] = np.full_like(updates[6]["w"], np.inf)
    _, metrics = _run(TapestryStrategy("multi_krum", f=2, m=5), updates)
    assert 103 in metrics["tapestry-rejected"] and 106 in metrics["tapestry-rejected"]
    assert metrics["tapestry-nonfinite"] == [106] and len(metrics["tapestry-selected"]) == 5
    assert sorted(metrics["tapestry-selected"] + metrics["tapestry-rejected"]) == list(range(100, 109))
    assert (f"round 1: multi_krum kept nodes {metrics['tapestry-selected']}, rejected {metrics['tapestry-rejected']}, "
            f"non-finite [106], dropped []") in caplog.text


@pytest.mark.parametrize("ours,theirs", [
    (lambda: TapestryStrategy("krum", num_malicious_nodes=2), lambda: Krum(num_malicious_nodes=2)),
    (lambda: TapestryStrategy("multi_krum", num_malicious_nodes=1, num_nodes_to_select=3),
     lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3)),
    (lambda: TapestryStrategy("trimmed_mean", beta=0.3), lambda: FedTrimmedAvg(beta=0.3)),
])
def test_flowers_parameter_names_are_a_one_line_change(ours, theirs):
    updates = [{"w": u["w"]} for u in _model(9, 4)]
    _same(_run(ours(), updates)[0], _run(theirs(), updates)[0], rtol=1e-6, atol=1e-7)


def test_unknown_names_are_refused_at_construction_listing_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unknown parameter 'num_malicous_nodes' for rule 'krum'; accepted: .*f, "
                                        r".*num_malicious_nodes.*weighted"):
        TapestryStrategy("krum", num_malicous_nodes=2)
    with pytest.raises(TypeError, match="unknown parameter 'beta' for rule 'median'"):
        TapestryStrategy("median", beta=0.2)
    with pytest.raises(ValueError, match="unknown rule 'fedfoo'"):
        TapestryStrategy("fedfoo", on_unmet="median")
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        TapestryStrategy("median", on_unmet="nope")
    with pytest.raises(TypeError, match=r"rule 'krum' needs f \(Flower's name: num_malicious_nodes or num_malicious_clients\)"):
        TapestryStrategy("krum")
    with pytest.raises(TypeError, match="repeats rule parameter 'f'"):
        TapestryStrategy("krum", f=1, num_malicious_nodes=2)


# -- how well: a BatchNorm CNN; 20 rounds of Krum with a node dropping out each round ---------------

class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _images(index, n=64):
    g = torch.Generator().manual_seed(index)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[:, :, 2:6, 2:6] += (2 * y - 1).float()[:, None, None, None]  # the label is the centre's sign
    return x, y


class DropoutGrid(LocalGrid):
    """Node ``round % nodes`` never replies in that round (Flower's grid returns what arrived)."""

    def push_messages(self, messages):
        messages = list(messages)
        if not messages:
            return []
        rnd = int(messages[0].content["config"]["server-round"])
        kept = [m for m in messages if self.contexts[m.metadata.dst_node_id].node_config["index"] != rnd % len(self.contexts)]
        return super().push_messages(kept)


def _cnn_app():
    app = ClientApp()

    @app.train()
    def train(msg, context):
        index = context.node_config["index"]
        torch.manual_seed(index)
        model = _CNN()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _images(index)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})}),
                       reply_to=msg)

    return app


def _accuracy(arrays: ArrayRecord) -> float:
    model = _CNN()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    x, y = _images(999, 400)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture
def one_thread():
    """Clients sharing this process train with one torch thread each (as in Flower's simulation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rule,params", [("mean", {}), ("trimmed_mean", {"beta": 0.2})])
def test_a_batchnorm_cnn_trains_through_the_strategy(rule, params, one_thread):
    torch.manual_seed(0)
    initial = ArrayRecord(_CNN().state_dict())
    s = TapestryStrategy(rule, fraction_evaluate=0.0, min_available_nodes=5, **params)
    result = s.start(grid=LocalGrid(_cnn_app(), 5), initial_arrays=initial, num_rounds=4)
    assert _accuracy(result.arrays) > 0.9 > _accuracy(initial) + 0.2
    assert int(result.arrays["bn.num_batches_tracked"].numpy()) == 12  # 4 rounds x 3 steps, every node alike
    assert result.arrays["bn.num_batches_tracked"].numpy().shape == ()


def test_twenty_rounds_of_krum_with_one_node_dropping_out_each_round():
    initial = ArrayRecord({"w": Array(np.zeros(8, np.float32))})
    app, error = _regression_app(attacker=None, codec=None)
    s = TapestryStrategy("krum", num_malicious_nodes=1, fraction_evaluate=0.0, min_available_nodes=7)
    result = s.start(grid=DropoutGrid(app, 7), initial_arrays=initial, num_rounds=20)
    assert sorted(result.train_metrics_clientapp) == list(range(1, 21))
    for r in range(1, 21):  # 6 replies a round meet Krum's n >= 2f+3 = 5; the dropped node is not among them
        m = result.train_metrics_clientapp[r]
        assert len(m["tapestry-selected"]) == 1 and len(m["tapestry-rejected"]) == 5 and m["tapestry-skipped"] == 0
        assert 1000 + r % 7 not in m["tapestry-selected"] + m["tapestry-rejected"]
    assert error(result.arrays) < 0.01 * error(initial)


def test_openmp_threads_spin_briefly_unless_the_user_chose():
    import os
    import subprocess
    import sys

    code = "import os, tapestry, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "10000"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "active"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "None"


def test_small_model_benchmark_runs_with_its_own_background_load():
    from tapestry.bench.flower import SHAPES, run

    assert sum(int(np.prod(s)) for s in SHAPES.values()) == 4810
    rows = {r["strategy"]: r for r in run(calls=3, load=True, warmup=1)}
    assert rows["tapestry mean"]["vs"] == "flower FedAvg" and rows["tapestry krum"]["vs"] == "flower FedMedian"
    assert all(r["calls"] == 3 and r["load"] and r["median_ms"] > 0 for r in rows.values())
