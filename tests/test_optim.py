"""Server optimizers against their peers: Flower's FedAdam, FedYogi, FedAdagrad and FedAvgM (driven
through Flower's own server loop), torch.optim.SGD, exact resume, and refusals of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tapestry as tp
from tapestry.optim import DEFAULTS, SERVER_OPTIMIZERS, ServerOptimizer, server_optimizer

SHAPES = {"w": (7, 3), "b": (1,), "head": (5,)}
ROUNDS = 5


def _reply_noise(rnd: int, node: int) -> dict:
    """What node ``node`` adds to the global model in round ``rnd`` (its update), fixed per (rnd, node)."""
    rng = np.random.default_rng(1000 * rnd + node)
    scale = 0.1 * (1 + node)
    return {k: (scale * rng.standard_normal(s) + 0.05 * node).astype(np.float32) for k, s in SHAPES.items()}


def _examples(node: int) -> int:
    return 10 + 7 * node


# -- Flower as the oracle: its strategies run 5 rounds of its own loop over in-process nodes ------

def _local_grid(app, nodes: int):
    """A Flower Grid delivering each message to ``app`` in this process (Flower's simulation
    engine needs Ray, which this project does not install)."""
    import uuid

    from flwr.app import Context, Message, RecordDict
    from flwr.serverapp import Grid

    class LocalGrid(Grid):
        def __init__(self):
            self.contexts = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"index": i},
                                               state=RecordDict(), run_config={}) for i in range(nodes)}
            self.replies: dict = {}

        run = property(lambda self: None)

        def set_run(self, run):
            pass

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self):
            return list(self.contexts)

        def push_messages(self, messages):
            ids = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
                self.replies[mid] = app(msg, self.contexts[msg.metadata.dst_node_id])
                ids.append(mid)
            return ids

        def pull_messages(self, message_ids):
            return [self.replies.pop(i) for i in message_ids if i in self.replies]

        def send_and_receive(self, messages, *, timeout=None):
            return self.pull_messages(self.push_messages(messages))

    return LocalGrid()


def _flower_run(strategy, initial: dict, nodes: int, codec: str | None = None) -> list[dict]:
    """The global models after each of ROUNDS rounds of ``strategy.start`` (replies: global + noise,
    compressed by tapestry with ``codec``)."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    rounds: dict = {}
    compressors: dict = {}

    @app.train()
    def train(msg: Message, context: Context):
        node = context.node_config["index"]
        rnd = rounds[node] = rounds.get(node, 0) + 1
        glob = msg.content["arrays"]
        noise = _reply_noise(rnd, node)
        local = ArrayRecord({k: Array((glob[k].numpy() + noise[k]).astype(np.float32)) for k in SHAPES})
        if codec is not None:
            from tapestry.compression import Compressor
            from tapestry.integrations.flower import compress_update

            local = compress_update(local, glob, compressors.setdefault(node, Compressor(codec, seed=node)))
        return Message(RecordDict({"arrays": local,
                                   "metrics": MetricRecord({"num-examples": _examples(node)})}), reply_to=msg)

    seen = []
    result = strategy.start(grid=_local_grid(app, nodes), initial_arrays=ArrayRecord(
        {k: Array(v.copy()) for k, v in initial.items()}), num_rounds=ROUNDS,
        evaluate_fn=lambda rnd, arrays: seen.append({k: arrays[k].numpy().copy() for k in SHAPES}) or None)
    assert len(seen) == ROUNDS + 1  # the initial model, then one per round
    assert all(np.array_equal(seen[-1][k], result.arrays[k].numpy()) for k in SHAPES)
    return seen[1:]


def _ours(name: str, hparams: dict, initial: dict, nodes: int) -> list[dict]:
    """The same rounds with tapestry: replies = global + noise, aggregate = weighted mean of
    (reply - global), then one server-optimizer step on a state_dict of float32 tensors."""
    params = {k: torch.from_numpy(v.copy()) for k, v in initial.items()}
    opt = server_optimizer(name, params, **hparams)
    out = []
    for rnd in range(1, ROUNDS + 1):
        deltas = []
        for node in range(nodes):
            noise = _reply_noise(rnd, node)
            reply = {k: params[k] + torch.from_numpy(noise[k]) for k in SHAPES}
            deltas.append({k: reply[k] - params[k] for k in SHAPES})
        agg = tp.mean(deltas, weights=[_examples(i) for i in range(nodes)])
        opt.step(agg)
        out.append({k: v.numpy().copy() for k, v in params.items()})
    return out


def _assert_close_to_largest(ours: list[dict], theirs: list[dict], rel: float = 1e-5) -> None:
    for rnd, (a, b) in enumerate(zip(ours, theirs), 1):
        big = max(float(np.abs(b[k]).max()) for k in SHAPES)
        err = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in SHAPES)
        assert err <= rel * big, f"round {rnd}: max |ours - Flower| = {err:.3g} > {rel} x {big:.3g}"


def _initial(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


FLOWER_CASES = [
    ("fedadam", {}, "FedAdam", {}),
    ("fedadam", {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}, "FedAdam",
     {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
    ("fedyogi", {}, "FedYogi", {}),
    ("fedyogi", {"eta": 0.1, "beta_1": 0.8, "tau": 1e-4}, "FedYogi", {"eta": 0.1, "beta_1": 0.8, "tau": 1e-4}),
    ("fedadagrad", {}, "FedAdagrad", {}),
    ("fedadagrad", {"lr": 0.3, "tau": 1e-1}, "FedAdagrad", {"eta": 0.3, "tau": 1e-1}),
    ("fedavgm", {}, "FedAvgM", {"server_momentum": 0.9}),
    ("fedavgm", {"server_learning_rate": 0.5, "momentum": 0.7}, "FedAvgM",
     {"server_learning_rate": 0.5, "server_momentum": 0.7}),
]


@pytest.mark.parametrize("name,hparams,flower_name,flower_kwargs", FLOWER_CASES)
def test_equals_flowers_strategy_over_five_rounds(name, hparams, flower_name, flower_kwargs, monkeypatch):
    import flwr.serverapp.strategy as fs
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    nodes, initial = 4, _initial()
    theirs = _flower_run(getattr(fs, flower_name)(fraction_evaluate=0.0, min_available_nodes=nodes, **flower_kwargs),
                         initial, nodes)
    ours = _ours(name, hparams, initial, nodes)
    _assert_close_to_largest(ours, theirs)
    # and the run moved the model well beyond the tolerance (the comparison can fail)
    assert max(float(np.abs(ours[-1][k] - initial[k]).max()) for k in SHAPES) > 1e-3


# -- torch.optim.SGD, bit for bit ------------------------------------------------------------------

def _aggs(d: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * (1 + i) for i in range(steps)]


@pytest.mark.parametrize("d", [1, 7, 1000, 4099])
@pytest.mark.parametrize("hparams", [{}, {"lr": 0.35, "momentum": 0.5}])
def test_nesterov_is_torch_sgd_on_the_pseudo_gradient_bit_for_bit(d, hparams):
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(d))
    ours = x0.clone()
    opt = server_optimizer("nesterov", ours, **hparams)
    ref = x0.clone().requires_grad_(True)
    lr, momentum = hparams.get("lr", 0.7), hparams.get("momentum", 0.9)
    sgd = torch.optim.SGD([ref], lr=lr, momentum=momentum, nesterov=True)
    for agg in _aggs(d, 6):
        opt.step(agg)
        ref.grad = -agg
        sgd.step()
        assert torch.equal(ours, ref.detach())
    assert not torch.equal(ours, x0)


@pytest.mark.parametrize("d", [1, 7, 1000, 4099])
def test_fedavg_lr1_is_plain_addition_bit_for_bit(d):
    """The simulate loop's former ``w = w + agg``, including vector tails of every length."""
    w = torch.randn(d, generator=torch.Generator().manual_seed(d)) * 1e3
    expected = w.clone()
    opt = server_optimizer("fedavg", w)
    for agg in _aggs(d, 4, seed=d):
        opt.step(agg)
        expected = expected + agg
        assert torch.equal(w, expected)


def test_fedavg_lr_and_fedavgm_against_float64_recursion():
    d, lr, mom = 333, 0.3, 0.6
    x0 = torch.randn(d, dtype=torch.float64)
    a, b = x0.float(), x0.float()
    fa, fm = server_optimizer("fedavg", a, lr=lr), server_optimizer("fedavgm", b, lr=lr, momentum=mom)
    xa, xb, buf = x0.clone(), x0.clone(), None
    for agg in _aggs(d, 5):
        fa.step(agg)
        fm.step(agg)
        g = -agg.double()
        buf = g if buf is None else mom * buf + g  # Flower's FedAvgM: momentum on the pseudo-gradient
        xa, xb = xa + lr * agg.double(), xb - lr * buf
        for got, want in ((a, xa), (b, xb)):
            assert float((got.double() - want).abs().max()) <= 4e-6 * float(want.abs().max())
    assert float((a - b).abs().max()) > 0.1  # momentum made a difference


# -- forms of params and aggregates ------------------------------------------------------------

def test_forms_of_params_and_aggregate_give_the_same_steps():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    flat = torch.cat([v.reshape(-1) for v in sd.values()])
    arrays = [v.numpy().copy() for v in sd.values()]
    aggs = _aggs(flat.numel(), 3, seed=5)
    opts = [server_optimizer("fedadam", model.parameters()), server_optimizer("fedadam", sd),
            server_optimizer("fedadam", flat), server_optimizer("fedadam", arrays)]
    for agg in aggs:
        parts = list(torch.split(agg, [v.numel() for v in sd.values()]))
        opts[0].step([p.reshape(v.shape).numpy() for p, v in zip(parts, sd.values())])  # list of NumPy arrays
        opts[1].step({k: p.reshape(v.shape) for (k, v), p in zip(sd.items(), parts)})  # state_dict
        opts[2].step(agg)  # flat tensor
        opts[3].step(agg.numpy())  # flat array onto NumPy params
    want = flat
    got_model = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    got_sd = torch.cat([v.reshape(-1) for v in sd.values()])
    got_np = torch.cat([torch.from_numpy(a).reshape(-1) for a in arrays])
    assert torch.equal(got_model, want) and torch.equal(got_sd, want) and torch.equal(got_np, want)
    assert all(p.grad is None for p in model.parameters())  # the caller's gradients untouched


def test_step_leaves_the_aggregate_unmodified_and_casts_its_dtype():
    x = torch.zeros(10)
    agg = torch.linspace(-1, 1, 10, dtype=torch.float64)
    keep = agg.clone()
    for name in SERVER_OPTIMIZERS:
        server_optimizer(name, x).step(agg)
        assert torch.equal(agg, keep), name
    assert x.dtype == torch.float32


# -- resume bit for bit --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_dict_resume_is_bit_identical(name, tmp_path):
    d = 513
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(3))
    aggs = _aggs(d, 7, seed=9)
    straight = x0.clone()
    opt = server_optimizer(name, straight)
    for agg in aggs:
        opt.step(agg)

    first = x0.clone()
    opt1 = server_optimizer(name, first)
    for agg in aggs[:3]:
        opt1.step(agg)
    torch.save({"x": first, "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")
    for agg in aggs[3:5]:  # the run goes on (and must not change what was saved)
        opt1.step(agg)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = ckpt["x"].clone()
    opt2 = server_optimizer(name, resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 3
    for agg in aggs[3:]:
        opt2.step(agg)
    assert torch.equal(resumed, straight)
    # an in-memory state is a copy too: loading it twice gives the same steps
    state = opt2.state_dict()
    y1, y2 = straight.clone(), straight.clone()
    o1, o2 = server_optimizer(name, y1), server_optimizer(name, y2)
    o1.load_state_dict(state)
    o1.step(aggs[0])
    o2.load_state_dict(state)
    o2.step(aggs[0])
    assert torch.equal(y1, y2)


def test_load_state_dict_refuses_another_optimizer_or_shape():
    a = server_optimizer("fedadam", {"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    a.step({"w": torch.ones(3, 2), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="'fedadam', this one is 'fedyogi'"):
        server_optimizer("fedyogi", {"w": torch.zeros(3, 2), "b": torch.zeros(2)}).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"parameter 'w': the state's shape \(3, 2\), this optimizer's \(2, 3\)"):
        server_optimizer("fedadam", {"w": torch.zeros(2, 3), "b": torch.zeros(2)}).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="state's key 'b', this optimizer's 'bias'"):
        server_optimizer("fedadam", {"w": torch.zeros(3, 2), "bias": torch.zeros(2)}).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="holds 2 parameters, this optimizer 1"):
        server_optimizer("fedadam", torch.zeros(8)).load_state_dict(a.state_dict())


# -- refusals ------------------------------------------------------------------------------------

def test_bad_names_and_hyperparameters_say_what_is_valid():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown server optimizer 'adam'; valid: fedavg, fedavgm, nesterov"):
        server_optimizer("adam", x)
    with pytest.raises(ValueError, match="fedavg takes no hyperparameter 'momentum'; valid: lr"):
        server_optimizer("fedavg", x, momentum=0.9)
    with pytest.raises(ValueError, match="lr must be > 0, got 0.0"):
        server_optimizer("fedadam", x, lr=0)
    with pytest.raises(ValueError, match="eta must be > 0, got -1.0"):
        server_optimizer("fedyogi", x, eta=-1)
    with pytest.raises(ValueError, match=r"0 <= momentum < 1, got 1.0"):
        server_optimizer("fedavgm", x, momentum=1.0)
    with pytest.raises(ValueError, match=r"0 < momentum < 1, got 0.0"):
        server_optimizer("nesterov", x, momentum=0.0)
    with pytest.raises(ValueError, match=r"0 <= beta_2 < 1, got 1.5"):
        server_optimizer("fedadam", x, beta_2=1.5)
    with pytest.raises(ValueError, match="tau must be > 0, got 0.0"):
        server_optimizer("fedadagrad", x, tau=0.0)
    with pytest.raises(ValueError, match="lr must be finite, got nan"):
        server_optimizer("fedavg", x, lr=math.nan)
    with pytest.raises(ValueError, match="'eta' and 'lr' both set lr"):
        server_optimizer("fedadam", x, eta=0.1, lr=0.2)
    with pytest.raises(ValueError, match="eta_l is Flower's client learning rate"):
        server_optimizer("fedadam", x, eta_l=0.1)
    with pytest.raises(TypeError, match="lr must be a number"):
        server_optimizer("fedavg", x, lr="0.1")
    assert ServerOptimizer.names == SERVER_OPTIMIZERS == tuple(DEFAULTS)


def test_bad_params_and_aggregates_name_key_and_shapes():
    with pytest.raises(TypeError, match=r"params\['n'\]: dtype torch.int64 is not a floating type"):
        server_optimizer("fedavg", {"w": torch.zeros(2), "n": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(ValueError, match="params is empty"):
        server_optimizer("fedavg", [])
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(3, np.float32)
        ro.flags.writeable = False
        server_optimizer("fedavg", [ro])
    opt = server_optimizer("fedadam", {"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"aggregate has shape \(7,\); expected a flat \(8,\) vector"):
        opt.step(torch.zeros(7))
    with pytest.raises(ValueError, match=r"aggregate\['w'\] has shape \(2, 3\), the parameter \(3, 2\)"):
        opt.step({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['bias'\]"):
        opt.step({"w": torch.zeros(3, 2), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="aggregate has 1 arrays, the parameters 2"):
        opt.step([np.zeros((3, 2), np.float32)])
    with pytest.raises(TypeError, match="not a floating type"):
        opt.step(torch.zeros(8, dtype=torch.int32))
    assert opt.steps == 0


def test_nonfinite_aggregate_is_refused_unless_allowed():
    x = torch.ones(6)
    opt = server_optimizer("nesterov", {"a": x[:3], "b": x[3:]})
    bad = torch.tensor([0.0, 1.0, 2.0, 3.0, math.nan, math.inf])
    with pytest.raises(ValueError, match=r"2 NaN/Inf value\(s\) in 'b'; parameters left unchanged"):
        opt.step(bad)
    assert torch.equal(x, torch.ones(6)) and opt.steps == 0
    with pytest.raises(ValueError, match="NaN/Inf"):  # finite in float64, Inf once cast to the parameters' float32
        server_optimizer("fedavg", torch.zeros(1)).step(torch.tensor([1e300], dtype=torch.float64))
    opt.step(bad, allow_nonfinite=True)
    assert torch.isfinite(x[:4]).all() and not torch.isfinite(x[4:]).any()


# -- TapestryStrategy(server_optimizer=...) is Flower's FedOpt strategies, in Flower's loop ------

STRATEGY_CASES = [("fedadam", "FedAdam", {}), (("fedyogi", {"eta": 0.05}), "FedYogi", {"eta": 0.05}),
                  ({"name": "fedadagrad", "tau": 0.01}, "FedAdagrad", {"tau": 0.01}),
                  ("fedavgm", "FedAvgM", {"server_momentum": 0.9})]


@pytest.mark.parametrize("spec,flower_name,flower_kwargs", STRATEGY_CASES)
def test_tapestry_strategy_with_server_optimizer_is_flowers(spec, flower_name, flower_kwargs, monkeypatch):
    import flwr.serverapp.strategy as fs
    from flwr.supercore.task_identity import TaskIdentity

    from tapestry.integrations.flower import TapestryStrategy

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    nodes, initial = 5, _initial(1)
    theirs = _flower_run(getattr(fs, flower_name)(fraction_evaluate=0.0, min_available_nodes=nodes, **flower_kwargs),
                         initial, nodes)
    strategy = TapestryStrategy("mean", server_optimizer=spec, fraction_evaluate=0.0, min_available_nodes=nodes)
    ours = _flower_run(strategy, initial, nodes)
    _assert_close_to_largest(ours, theirs)
    assert strategy.outer_optimizer.steps == ROUNDS
    assert max(float(np.abs(ours[-1][k] - initial[k]).max()) for k in SHAPES) > 1e-3


def test_tapestry_strategy_robust_rule_with_nesterov(monkeypatch):
    """Median of the deltas, then DiLoCo's outer step, against the same computed by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    from tapestry.integrations.flower import TapestryStrategy

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    nodes, initial = 5, _initial(2)
    strategy = TapestryStrategy("median", server_optimizer=("nesterov", {"lr": 0.5}), fraction_evaluate=0.0,
                                min_available_nodes=nodes)
    ours = _flower_run(strategy, initial, nodes)
    params = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in initial.items()}
    sgd = torch.optim.SGD(list(params.values()), lr=0.5, momentum=0.9, nesterov=True)
    for rnd in range(1, ROUNDS + 1):
        with torch.no_grad():
            deltas = [{k: (params[k] + torch.from_numpy(_reply_noise(rnd, i)[k])) - params[k] for k in SHAPES}
                      for i in range(nodes)]
        agg = tp.median(deltas)
        for k, p in params.items():
            p.grad = -agg[k]
        sgd.step()
        for k in SHAPES:
            assert np.array_equal(ours[rnd - 1][k], params[k].detach().numpy()), (rnd, k)


def test_tapestry_strategy_compressed_replies_reach_the_server_optimizer(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from tapestry.integrations.flower import TapestryStrategy

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    nodes, initial = 4, _initial(3)
    runs = {}
    for codec in (None, "fp16"):
        strategy = TapestryStrategy("trimmed_mean", rule_params={"f": 1}, server_optimizer="fedadam",
                                    fraction_evaluate=0.0, min_available_nodes=nodes)
        runs[codec] = _flower_run(strategy, initial, nodes, codec)
        assert strategy.outer_optimizer.steps == ROUNDS
    _assert_close_to_largest(runs["fp16"], runs[None], rel=2e-3)  # fp16 rounding of the deltas only
    plain = _flower_run(TapestryStrategy("trimmed_mean", rule_params={"f": 1}, fraction_evaluate=0.0,
                                         min_available_nodes=nodes), initial, nodes)
    assert max(float(np.abs(plain[-1][k] - runs["fp16"][-1][k]).max()) for k in SHAPES) > 0.1


def test_tapestry_strategy_refuses_bad_server_optimizers():
    from tapestry.integrations.flower import TapestryStrategy

    with pytest.raises(ValueError, match="unknown server optimizer 'adam'"):
        TapestryStrategy("mean", server_optimizer="adam")
    with pytest.raises(ValueError, match="fedadam takes no hyperparameter 'momentum'"):
        TapestryStrategy("mean", server_optimizer=("fedadam", {"momentum": 0.9}))
    with pytest.raises(TypeError, match="server_optimizer must be a name"):
        TapestryStrategy("mean", server_optimizer=3)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_bfloat16_parameters_follow_the_float32_run(name):
    """Low-precision parameters: adaptive state stays float32; the trajectory tracks float32's."""
    x0 = torch.randn(300, generator=torch.Generator().manual_seed(4))
    lo, hi = x0.bfloat16(), x0.clone()
    a, b = server_optimizer(name, lo), server_optimizer(name, hi)
    for agg in _aggs(300, 4, seed=2):
        a.step(agg)
        b.step(agg)
    assert lo.dtype == torch.bfloat16
    assert float((lo.float() - hi).abs().max()) <= 0.05 * float(hi.abs().max())
    assert all(t.dtype == (torch.float32 if name in ("fedadam", "fedyogi") else torch.bfloat16)
               for ts in a.state_dict()["state"].values() for t in ts)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_cuda_parameters_from_a_cpu_aggregate(name):
    """CUDA parameters (torch.optim takes its foreach path there), aggregates sent from the CPU:
    nesterov stays torch's SGD bit for bit; every optimizer tracks its CPU run."""
    x0 = torch.randn(5000, generator=torch.Generator().manual_seed(6))
    gpu, cpu = x0.cuda(), x0.clone()
    a, b = server_optimizer(name, [gpu]), server_optimizer(name, [cpu])
    ref = x0.cuda().requires_grad_(True)
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for agg in _aggs(5000, 4, seed=7):
        a.step(agg)
        b.step(agg)
        ref.grad = -agg.cuda()
        sgd.step()
    if name == "nesterov":
        assert torch.equal(gpu, ref.detach())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
