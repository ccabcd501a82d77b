"""TapestryStrategy against Flower's own strategies, and a few rounds through Flower's objects.

The end-to-end test drives ``Strategy.start`` (Flower's own server loop) with a real ``ClientApp``
per node through a small in-process ``Grid``: Flower's simulation engine needs Ray, which this
project does not install (a heavy, multi-process dependency for a few rounds of a test).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402

import tapestry as tp  # noqa: E402
from tapestry.integrations.flower import PAYLOAD_KEY, TapestryStrategy, compress_update  # noqa: E402

SHAPES = {"w": (7, 3), "b": (1,), "head": (5,)}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp process (run, node and task ids)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the SuperLink's node id
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _arrays(n, seed=0, spread=1.0, common=0.0):
    rng = np.random.default_rng(seed)
    return [{k: (common + spread * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(n)]


def _replies(updates, examples=None):
    """Reply messages as Flower's grid hands them to ``aggregate_train`` (fresh objects: Flower's
    FedMedian and FedTrimmedAvg pop the arrays they read)."""
    out = []
    for i, u in enumerate(updates):
        ins = Message(RecordDict(), dst_node_id=100 + i, message_type=MessageType.TRAIN)
        ins.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in u.items()}),
                              "metrics": MetricRecord({"num-examples": int(examples[i]) if examples is not None else 10})})
        out.append(Message(content, reply_to=ins))
    return out


def _numpy(record: ArrayRecord) -> dict:
    return {k: record[k].numpy() for k in record.keys()}


def _compare(ours, theirs, updates, examples=None, **tol):
    a, _ = ours.aggregate_train(1, _replies(updates, examples))
    b, _ = theirs.aggregate_train(1, _replies(updates, examples))
    a, b = _numpy(a), _numpy(b)
    assert list(a) == list(b) == list(SHAPES)
    for k in SHAPES:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        np.testing.assert_allclose(a[k], b[k], **tol)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_mean_is_flowers_fedavg_weighted_by_examples(n):
    examples = np.random.default_rng(n).integers(1, 500, n)
    _compare(TapestryStrategy("mean"), FedAvg(), _arrays(n, n), examples, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,beta", [(5, 0.2), (10, 0.2), (11, 0.3), (4, 0.0)])
def test_trimmed_mean_is_flowers_fedtrimmedavg(n, beta):
    _compare(TapestryStrategy("trimmed_mean", rule_params={"beta": beta}), FedTrimmedAvg(beta=beta),
             _arrays(n, n), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_is_flowers_fedmedian(n):
    _compare(TapestryStrategy("median"), FedMedian(), _arrays(n, n), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,f", [(5, 1), (9, 2), (12, 3)])
def test_krum_and_multikrum_are_flowers(n, f):
    updates = _arrays(n, n)
    for i in range(f):  # outliers that Krum must skip
        updates[i] = {k: v * 30 for k, v in updates[i].items()}
    _compare(TapestryStrategy("krum", rule_params={"f": f}), Krum(num_malicious_nodes=f), updates, rtol=0, atol=0)
    # Flower's MultiKrum averages the selected updates weighted by examples: equal counts here
    _compare(TapestryStrategy("multi_krum", rule_params={"f": f, "m": n - f}),
             MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f), updates, rtol=1e-6, atol=1e-7)


def _krum_float64(updates, f):
    """Krum by direct float64 distances (no Gram matrix): the index it selects."""
    X = np.stack([np.concatenate([u[k].ravel() for k in SHAPES]) for u in updates]).astype(np.float64)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    m = len(X) - f - 2
    scores = [np.sort(np.delete(D[i], i))[:m].sum() for i in range(len(X))]
    return int(np.argmin(scores))


def test_large_common_component_and_nan_senders():
    # Updates sharing a component 1e6 times their spread: Flower's float32 Gram-trick distances
    # cannot rank them reliably; Tapestry (centred, float64 accumulation) picks float64's choice.
    updates = _arrays(9, 3, spread=1e-3, common=1e3)
    ours = TapestryStrategy("krum", rule_params={"f": 2})
    arrays, _ = ours.aggregate_train(1, _replies(updates))
    best = _krum_float64(updates, 2)
    assert ours.last_info.selected == [best]
    for k in SHAPES:
        np.testing.assert_array_equal(arrays[k].numpy(), updates[best][k])
    updates[4] = {k: np.full_like(v, np.nan) for k, v in updates[4].items()}
    for rule, params in [("median", {}), ("trimmed_mean", {"f": 2}), ("krum", {"f": 2})]:
        s = TapestryStrategy(rule, rule_params=params)
        arrays, _ = s.aggregate_train(1, _replies(updates))
        assert all(np.isfinite(arrays[k].numpy()).all() for k in SHAPES), rule
        assert s.last_info.nonfinite == [4]
        assert s.last_round.nonfinite == [104]


def test_mismatched_replies_are_dropped_and_named(caplog):
    updates = _arrays(4)
    updates[2]["head"] = np.zeros(6, np.float32)
    updates[3]["b"] = updates[3]["b"].astype(np.float64)
    s = TapestryStrategy("median")
    arrays, metrics = s.aggregate_train(1, _replies(updates))
    assert metrics["tapestry-dropped"] == [102, 103]
    assert "node 102 dropped: array 'head': float32[6], the others float32[5]" in caplog.text
    assert "node 103 dropped: array 'b': float64[1], the others float32[1]" in caplog.text
    expect = tp.median([list(u.values()) for u in updates[:2]])
    for k, e in zip(SHAPES, expect):
        np.testing.assert_allclose(arrays[k].numpy(), e, rtol=1e-6)


def test_bad_rule_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: mean, trimmed_mean"):
        TapestryStrategy("fedfoo")


def test_compressed_replies_equal_dense_aggregation_of_their_decodings():
    from tapestry import compression as comp
    glob = ArrayRecord({k: Array(v) for k, v in _arrays(1, 9)[0].items()})
    locals_ = _arrays(7, 4)
    packed = [compress_update(ArrayRecord({k: Array(v) for k, v in u.items()}), glob, comp.Compressor("int8", seed=i))
              for i, u in enumerate(locals_)]
    msgs = []
    for i, rec in enumerate(packed):
        ins = Message(RecordDict(), dst_node_id=100 + i, message_type=MessageType.TRAIN)
        ins.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        msgs.append(Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 5})}), reply_to=ins))
    s = TapestryStrategy("trimmed_mean", rule_params={"f": 2})
    s._global = glob  # what configure_train records
    arrays, _ = s.aggregate_train(1, msgs)
    deltas = [comp.decode(r[PAYLOAD_KEY].numpy().tobytes()) for r in packed]
    expect = tp.trimmed_mean([[np.asarray(d[k]) for k in SHAPES] for d in deltas], f=2)
    for k, e in zip(SHAPES, expect):
        np.testing.assert_allclose(arrays[k].numpy(), glob[k].numpy() + e, rtol=1e-6, atol=1e-6)
        # and close to the uncompressed aggregate (int8: 1/127 of each block's range)
        dense = tp.trimmed_mean([(u[k] - glob[k].numpy()).ravel() for u in locals_], f=2).reshape(SHAPES[k])
        np.testing.assert_allclose(arrays[k].numpy() - glob[k].numpy(), dense, atol=0.1)


# -- a few rounds through Flower's own server loop and ClientApps --------------------------------

class LocalGrid(Grid):
    """Delivers each message to ``app`` in this process, one ``Context`` per node."""

    def __init__(self, app: ClientApp, nodes: int):
        self.app = app
        self.contexts = {i + 1000: Context(run_id=1, node_id=i + 1000, node_config={"index": i}, state=RecordDict(),
                                           run_config={}) for i in range(nodes)}
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            self._replies[mid] = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _regression_app(attacker: int | None, codec: str | None):
    """Each node fits y = X w* on its own data by a few gradient steps; ``attacker`` sends NaN."""
    w_true = np.linspace(-1, 1, 8).astype(np.float32)
    app = ClientApp()
    compressors = {}

    def data(index):
        rng = np.random.default_rng(index)
        X = rng.standard_normal((40, 8)).astype(np.float32)
        return X, X @ w_true

    @app.train()
    def train(msg: Message, context: Context):
        glob = msg.content["arrays"]
        index = context.node_config["index"]
        X, y = data(index)
        w = glob["w"].numpy().copy()
        for _ in range(5):
            w -= 0.3 * X.T @ (X @ w - y) / len(y)
        if index == attacker:
            w = np.full_like(w, np.nan)
        local = ArrayRecord({"w": Array(w)})
        if codec is not None and index != attacker:
            from tapestry.compression import Compressor

            comp = compressors.setdefault(index, Compressor(codec, seed=index))
            local = compress_update(local, glob, comp)
        return Message(RecordDict({"arrays": local, "metrics": MetricRecord({"num-examples": len(y)})}), reply_to=msg)

    def error(arrays):
        return float(np.abs(arrays["w"].numpy() - w_true).max())

    return app, error


@pytest.mark.parametrize("codec", [None, "int8"])
def test_rounds_end_to_end_in_flowers_loop(codec):
    initial = ArrayRecord({"w": Array(np.zeros(8, np.float32))})
    app, error = _regression_app(attacker=None, codec=codec)
    strategy = TapestryStrategy("median", fraction_evaluate=0.0, min_available_nodes=6)
    result = strategy.start(grid=LocalGrid(app, 6), initial_arrays=initial, num_rounds=4)
    assert error(result.arrays) < 0.1 * error(initial)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]


def test_robust_rule_survives_a_nan_node_where_fedavg_does_not():
    initial = ArrayRecord({"w": Array(np.zeros(8, np.float32))})
    app, error = _regression_app(attacker=2, codec=None)
    robust = TapestryStrategy("trimmed_mean", rule_params={"f": 1}, fraction_evaluate=0.0, min_available_nodes=6)
    result = robust.start(grid=LocalGrid(app, 6), initial_arrays=initial, num_rounds=3)
    assert error(result.arrays) < 0.2 * error(initial)
    assert robust.last_round.nonfinite == [1002]  # node index 2
    assert all(result.train_metrics_clientapp[r]["tapestry-nonfinite"] == [1002] for r in (1, 2, 3))
    fedavg = FedAvg(fraction_evaluate=0.0, min_available_nodes=6).start(
        grid=LocalGrid(app, 6), initial_arrays=initial, num_rounds=1)
    assert np.isnan(fedavg.arrays["w"].numpy()).all()


def test_import_tapestry_does_not_import_flower():
    import subprocess
    import sys

    code = "import sys, tapestry, tapestry.integrations; assert 'flwr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
