"""TapestryFedAvg (Flower's older Strategy API) against Flower's FedAvg, FedMedian, FedTrimmedAvg,
Krum and Multi-Krum on the same FitRes lists; and the cases of Flower's own strategy tests (both
APIs), their inputs run through Tapestry and through Flower's strategies side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import strategy as legacy  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.serverapp import strategy as modern  # noqa: E402
from test_flower import _replies, server_identity  # noqa: E402,F401 (a fixture)

from tapestry.integrations.flower import TapestryFedAvg, TapestryStrategy  # noqa: E402


class Proxy(ClientProxy):
    """A client as the Strategy API's server sees it (only its cid is read)."""

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def _results(updates, examples=None):
    return [(Proxy(str(i)), FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(u),
                                   int(examples[i]) if examples is not None else 5, {}))
            for i, u in enumerate(updates)]


def _fit(strategy, updates, examples=None):
    params, metrics = strategy.aggregate_fit(1, _results(updates, examples), [])
    return (None if params is None else parameters_to_ndarrays(params)), metrics


def _updates(n, seed, outliers=0):
    rng = np.random.default_rng(seed)
    ups = [[rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)] for _ in range(n)]
    for i in range(outliers):
        ups[i] = [a * 40 for a in ups[i]]
    return ups


CASES = [  # (ours, Flower's, outliers)
    (lambda: TapestryFedAvg("mean"), lambda: legacy.FedAvg(), 0),
    (lambda: TapestryFedAvg("median"), lambda: legacy.FedMedian(), 0),
    (lambda: TapestryFedAvg("trimmed_mean", beta=0.2), lambda: legacy.FedTrimmedAvg(beta=0.2), 1),
    (lambda: TapestryFedAvg("krum", num_malicious_clients=2), lambda: legacy.Krum(num_malicious_clients=2), 2),
    (lambda: TapestryFedAvg("krum", num_malicious_clients=2, num_clients_to_keep=4),
     lambda: legacy.Krum(num_malicious_clients=2, num_clients_to_keep=4), 2),
]


@pytest.mark.parametrize("ours,theirs,outliers", CASES)
@pytest.mark.parametrize("n", [7, 10])
def test_aggregate_fit_returns_what_flowers_strategy_returns(ours, theirs, outliers, n):
    updates = _updates(n, n, outliers)
    examples = np.random.default_rng(n + 1).integers(1, 100, n)
    a, metrics = _fit(ours(), updates, examples)
    b, _ = _fit(theirs(), updates, examples)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    selected, rejected = json.loads(metrics["tapestry-selected"]), json.loads(metrics["tapestry-rejected"])
    assert sorted(selected + rejected) == [str(i) for i in range(n)]
    if rejected:  # rules that select whole replies leave the outliers out
        assert not set(selected) & {str(i) for i in range(outliers)}
    else:  # per-coordinate rules keep every reply
        assert len(selected) == n


def test_integer_arrays_skipped_rounds_and_refused_names():
    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal(4).astype(np.float32), np.array(rng.integers(0, 9), np.int64)] for _ in range(6)]
    out, _ = _fit(TapestryFedAvg("median"), updates)
    assert out[1].dtype == np.int64 and out[1].shape == ()
    assert out[1] == np.sort([u[1] for u in updates])[2]
    out, metrics = _fit(TapestryFedAvg("krum", num_malicious_clients=2), updates)
    assert out is None and metrics["tapestry-skipped"] == 1  # 6 < 2f+3
    with pytest.raises(TypeError, match="unknown parameter 'num_malicious_nodez'"):
        TapestryFedAvg("krum", num_malicious_nodez=1)
    unlike = _updates(5, 1) + [[np.zeros((3, 4), np.float32)]]
    out, metrics = _fit(TapestryFedAvg("median"), unlike)
    assert json.loads(metrics["tapestry-dropped"]) == ["5"] and len(out) == 2


# -- Flower's own strategy tests (flwr/server/strategy/*_test.py, flwr/serverapp/strategy/*_test.py):
# the same inputs through Tapestry and through the Flower strategy each test names. Differences of
# convention are asserted as such (docs/flower.md lists them with the reasons).

def _f32(*rows):
    return [[np.array(r, dtype=np.float32)] for r in rows]


def test_flower_legacy_fedmedian_and_fedavg_cases():
    rows = _f32([0.2] * 4, [1.0] * 4, [0.5] * 4)
    for ours, theirs in [(TapestryFedAvg("median"), legacy.FedMedian()), (TapestryFedAvg("mean"), legacy.FedAvg())]:
        np.testing.assert_array_equal(_fit(ours, rows)[0][0], _fit(theirs, rows)[0][0])
    for available in (9, 10, 19, 20):  # Flower's num_fit_clients / num_evaluation_clients cases
        assert TapestryFedAvg("median").num_fit_clients(available) == legacy.FedMedian().num_fit_clients(available)
        assert (TapestryFedAvg("median", fraction_evaluate=0.05).num_evaluation_clients(available * 2)
                == legacy.FedMedian(fraction_evaluate=0.05).num_evaluation_clients(available * 2))


def test_flower_legacy_multikrum_case_is_equal():
    rows = _f32([0.2] * 4, [0.5] * 4, [1.0] * 4)  # n = 3, f = 1, keep 2
    ours = TapestryFedAvg("krum", num_malicious_clients=1, num_clients_to_keep=2, on_unmet="skip")
    assert _fit(ours, rows)[0] is None  # convention: Tapestry's Krum needs n >= 2f + 3 = 5
    # with f = 0 (n >= 3) the same selection of 2 of 3, and Flower's exact float32 result
    a = _fit(TapestryFedAvg("krum", num_malicious_clients=0, num_clients_to_keep=2), rows)[0][0]
    b = _fit(legacy.Krum(num_malicious_clients=0, num_clients_to_keep=2), rows)[0][0]
    np.testing.assert_array_equal(a, b)


def test_flower_message_api_cases():
    def replies(rows, examples):
        return _replies([{"0": np.asarray(r)} for r in rows], examples)

    def agg(strategy, rows, examples=(5, 5, 5, 5)):
        arrays, _ = strategy.aggregate_train(1, replies(rows, examples[:len(rows)]))
        return None if arrays is None else arrays["0"].numpy()

    # fedmedian_test, fedtrimmedavg_test: float64 rows and 0-dim scalars, compared exactly
    med = [np.array([1.0, 0.2, 0.5, 1.0]), np.array([0.2, 0.5, 1.0, 0.2]), np.array([0.5, 1.0, 0.2, 0.5])]
    trim = [np.array([0.5] * 4)] + med
    for rows in (med, [np.array(1.0), np.array(3.0), np.array(2.0)]):
        a, b = agg(TapestryStrategy("median"), rows, (5, 2, 9)), agg(modern.FedMedian(), rows, (5, 2, 9))
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for rows in (trim, [np.array(0.5), np.array(1.0), np.array(2.0), np.array(100.0)]):
        a, b = agg(TapestryStrategy("trimmed_mean", beta=0.25), rows), agg(modern.FedTrimmedAvg(beta=0.25), rows)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # multikrum_test: n = 3 with f = 1 is below Tapestry's n >= 2f + 3 (a convention): skipped
    rows = [np.array([0.2] * 4), np.array([0.5] * 4), np.array([1.0] * 4)]
    assert agg(TapestryStrategy("multi_krum", num_malicious_nodes=1, num_nodes_to_select=2), rows) is None
    assert agg(TapestryStrategy("krum", num_malicious_nodes=1), rows) is None
    # with f = 0 the same selections; Krum is exact, Multi-Krum's float64 mean is float32-rounded
    k = agg(TapestryStrategy("krum", num_malicious_nodes=0), rows)
    np.testing.assert_array_equal(k, agg(modern.Krum(num_malicious_nodes=0), rows))
    a = agg(TapestryStrategy("multi_krum", num_malicious_nodes=0, num_nodes_to_select=2), rows)
    b = agg(modern.MultiKrum(num_malicious_nodes=0, num_nodes_to_select=2), rows)
    assert a.dtype == b.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-7)
    assert ArrayRecord([k]).object_id == ArrayRecord([agg(modern.Krum(num_malicious_nodes=0), rows)]).object_id


def test_the_first_round_reports_an_f_the_sampled_count_never_satisfies(caplog):
    from flwr.server.client_manager import SimpleClientManager

    manager = SimpleClientManager()
    for i in range(6):
        manager.register(Proxy(str(i)))
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    s = TapestryFedAvg("krum", num_malicious_clients=2, on_unmet="median")
    assert len(s.configure_fit(1, params, manager)) == 6
    assert "krum needs n >= 2f+3, got n=6, f=2: with 6 sampled nodes every round falls back to Median()" in caplog.text
    caplog.clear()
    s.configure_fit(2, params, manager)
    assert "sampled nodes" not in caplog.text  # once per run
    ok = TapestryFedAvg("krum", num_malicious_clients=1)
    ok.configure_fit(1, params, manager)
    assert "sampled nodes" not in caplog.text
