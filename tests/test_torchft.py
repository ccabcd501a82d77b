"""tapestry.integrations.torchft end to end: torchft's own Lighthouse, Manager and DiLoCo, replica
groups as threads on 127.0.0.1 with torchft's gloo process group (as torchft's integration tests run
them), the outer step aggregated by a Tapestry rule."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

import torchft  # noqa: F401  (a test dependency: fail loudly when missing)

import torch.distributed as dist  # noqa: E402
from torch.distributed import ReduceOp  # noqa: E402
from torchft._torchft import LighthouseServer  # noqa: E402
from torchft.local_sgd import DiLoCo  # noqa: E402
from torchft.process_group import ProcessGroupGloo  # noqa: E402

import tapestry as tp  # noqa: E402
from tapestry.integrations import torchft as tft  # noqa: E402

TIMEOUT = timedelta(seconds=20)   # bounds every wait: a hang fails the test instead of blocking CI
SYNC_EVERY = 2


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


class _Recording(tft.TapestryManager):
    """The integration's manager, recording what it sent and got; ``scale`` != 1 makes the replica
    group Byzantine (its pseudo-gradient multiplied by ``scale`` before it is sent)."""

    def __init__(self, *args, scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale, self.rounds = scale, []

    def allreduce(self, tensor, should_quantize=False, reduce_op=ReduceOp.AVG):
        tensor.mul_(self.scale)
        return super().allreduce(tensor, should_quantize, reduce_op)

    def _flush(self) -> None:
        works, step = list(self._tp_pending), self.current_step()
        sent = [w.tensor.detach().flatten().clone() for w in works]
        super()._flush()
        if works:
            self.rounds.append({"step": step, "sent": torch.cat(sent), "got": torch.cat([w.tensor.flatten() for w in works]),
                                "replicas": list(self.last_replicas), "quorum": self._tp_pg.size(),
                                "ok": all(w.ok for w in works), "error": str(self.errored())})


def _replica(lighthouse: str, name: str, init: dict, *, steps: int, rule: str, seed: int, scale: float = 1.0,
             fail_at: int | None = None, on_step=None, diloco_args: dict | None = None, **manager_args) -> dict:
    """One replica group (one rank): torchft DiLoCo on a small regression task until the manager
    has committed ``steps`` outer steps. ``fail_at``: raise (the group dies) once it reached that
    step. ``on_step(step)`` runs before each inner step."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    model = _model()
    model.load_state_dict(init)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    manager = _Recording(
        pg=ProcessGroupGloo(timeout=TIMEOUT), min_replica_size=2, use_async_quorum=False,
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), inner.load_state_dict(sd["inner"])),
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        replica_id=name, store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=lighthouse, hostname="127.0.0.1", port=0, init_sync=False,
        timeout=TIMEOUT, quorum_timeout=TIMEOUT, connect_timeout=TIMEOUT,
        rule=rule, scale=scale, **manager_args)
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(3, 5, generator=gen)
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=SYNC_EVERY, **(diloco_args or {})):
            while manager.current_step() < steps:
                if fail_at is not None and manager.current_step() >= fail_at:
                    raise RuntimeError(f"{name} killed at step {manager.current_step()}")
                if on_step is not None:
                    on_step(manager.current_step())
                x = torch.randn(16, 5, generator=gen)
                loss = torch.nn.functional.mse_loss(model(x), x @ w_true.T)
                inner.zero_grad()
                loss.backward()
                inner.step()                   # DiLoCo's hook syncs every SYNC_EVERY inner steps
        return {"model": copy.deepcopy(model.state_dict()), "outer": copy.deepcopy(outer.state_dict()),
                "step": manager.current_step(), "rounds": manager.rounds}
    except Exception as exc:
        exc.rounds, exc.model = manager.rounds, copy.deepcopy(model.state_dict())
        raise
    finally:
        manager.shutdown(wait=False)


def _lighthouse(min_replicas: int) -> LighthouseServer:
    # A quorum forms as soon as every live (heartbeating) replica group has asked for it; the join
    # timeout only matters when a live group is late, so a long one keeps a slow thread on a busy
    # machine from being left out (and healed) by accident. A dead group stops heartbeating and is
    # dropped after heartbeat_timeout_ms.
    return LighthouseServer(bind="127.0.0.1:0", min_replicas=min_replicas, join_timeout_ms=5000,
                            quorum_tick_ms=20, heartbeat_timeout_ms=1000)


def _assert_same_global_state(results: list[dict]) -> None:
    for r in results[1:]:
        for k, v in results[0]["model"].items():
            assert torch.equal(r["model"][k], v), f"model parameter {k} differs between replica groups"
        for k, v in results[0]["outer"]["state"].items():
            assert torch.equal(r["outer"]["state"][k]["momentum_buffer"], v["momentum_buffer"]), "outer momentum differs"


def test_byzantine_replica_group_is_outvoted_by_the_median(monkeypatch):
    calls = []                                 # spy: every step goes through the sharded all-reduce
    sharded = tft._all_reduce
    monkeypatch.setattr(tft, "_all_reduce", lambda *a, **k: (calls.append(k["group"].rank()), sharded(*a, **k))[1])
    torch.manual_seed(0)
    init = _model().state_dict()
    lighthouse = _lighthouse(3)
    try:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_replica, lighthouse.address(), f"r{i}", init, steps=3, rule="median", seed=i,
                                scale=-10.0 if i == 2 else 1.0) for i in range(3)]
            results = [f.result(timeout=60) for f in futs]
    finally:
        lighthouse.shutdown()

    _assert_same_global_state(results)
    assert sorted(calls) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    steps = [[r["step"] for r in res["rounds"]] for res in results]
    assert steps[0] == steps[1] == steps[2] == [0, 1, 2], steps
    for k in range(3):
        rounds = [res["rounds"][k] for res in results]
        assert all(r["ok"] and r["replicas"] == [0, 1, 2] for r in rounds)
        X = torch.stack([r["sent"] for r in rounds])
        want = tp.median(X)
        for r in rounds:                       # every group got the rule on all three pseudo-gradients
            assert torch.equal(r["got"], want)
        honest = X[:2]
        # the flipped, scaled group drags torchft's plain average away from the honest groups; the
        # median stays inside their range, coordinate by coordinate
        centre = honest.mean(0)
        assert (X.mean(0) - centre).norm() > 2 * (want - centre).norm()
        assert torch.all(want >= honest.min(0).values) and torch.all(want <= honest.max(0).values)


def _run(n: int, min_replicas: int, **kwargs) -> list:
    torch.manual_seed(2)
    init = _model().state_dict()
    lighthouse = _lighthouse(min_replicas)
    try:
        with ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(_replica, lighthouse.address(), f"r{i}", init, seed=i, **kwargs) for i in range(n)]
            return [f.exception(timeout=60) or f.result() for f in futs], init
    finally:
        lighthouse.shutdown()


def test_compressed_outer_step():
    # DiLoCo's bucketized path too: the pseudo-gradient in one flat buffer, copied back to the
    # parameters' gradients by a callback on the work's future. (Keep torchft's default bucket
    # cap: with buckets smaller than the model torchft 0.2.0 skips the tensors that do not fit.)
    results, _ = _run(3, 3, steps=2, rule="trimmed_mean", rule_params={"f": 1}, codec="int8",
                      diloco_args={"use_bucketization": True})
    _assert_same_global_state(results)
    for k in range(2):
        rounds = [res["rounds"][k] for res in results]
        assert all(r["ok"] and r["replicas"] == [0, 1, 2] for r in rounds)
        X = torch.stack([r["sent"] for r in rounds])
        exact = tp.trimmed_mean(X, f=1)
        # int8 with blocks of 256: each value moves by at most one step of its block's scale
        # (absmax / 127) on each of the two encoded transfers
        bound = 2 * X.abs().max() / 127
        for r in rounds:
            assert torch.equal(r["got"], rounds[0]["got"])
            assert (r["got"] - exact).abs().max() <= bound
        assert not torch.equal(rounds[0]["got"], exact)   # the codec really was on the wire


def test_failed_robust_step_is_not_committed():
    # trimmed mean with f=1 needs 3 replica groups; with 2 every robust all-reduce fails, the error
    # goes to the manager, no group commits, DiLoCo restores the last global model (here the
    # initial one), and torchft's max_retries ends the run
    results, init = _run(2, 2, steps=3, rule="trimmed_mean", rule_params={"f": 1}, max_retries=1)
    for exc in results:
        assert isinstance(exc, RuntimeError) and "should_commit failed 2 times" in str(exc), exc
        assert len(exc.rounds) == 2
        assert all(not r["ok"] and "trimmed_mean needs 2f < n, got n=2" in r["error"] for r in exc.rounds), exc.rounds
        for k, v in init.items():
            assert torch.equal(exc.model[k], v)


def test_killed_replica_group_rejoins_and_recovers_the_model():
    # Three replica groups, lighthouse min_replicas=2. r2 dies after two outer steps; the survivors
    # commit at least two steps without it; then r2 comes back as a fresh process with a random
    # model, heals from a survivor in its first quorum and trains on with the others.
    # No sleeps: threading events order the phases, torchft's quorum does the rest.
    torch.manual_seed(1)
    init = _model().state_dict()
    steps = 10
    started = threading.Barrier(3, timeout=TIMEOUT.total_seconds())
    died, moved_on, reborn_started = threading.Event(), threading.Event(), threading.Event()
    lighthouse = _lighthouse(2)

    def survivor(step: int, seen: dict) -> None:
        if not seen:
            seen["up"] = True
            started.wait()                     # all three managers exist before the first quorum
        if died.is_set():
            first = seen.setdefault("died_at", step)
            if step >= first + 2:              # two steps committed without r2
                moved_on.set()
                assert reborn_started.wait(TIMEOUT.total_seconds()), "r2 did not come back"

    def doomed_then_reborn() -> dict:
        with pytest.raises(RuntimeError, match="r2 killed at step"):
            _replica(lighthouse.address(), "r2", init, steps=steps, rule="median", seed=2, fail_at=2,
                     on_step=lambda step, seen={}: seen or (seen.setdefault("up", True), started.wait()))
        died.set()
        assert moved_on.wait(TIMEOUT.total_seconds()), "the survivors did not continue without r2"
        fresh = {k: torch.randn_like(v) for k, v in init.items()}   # a new process knows nothing
        return _replica(lighthouse.address(), "r2", fresh, steps=steps, rule="median", seed=3,
                        on_step=lambda step: reborn_started.set())

    try:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_replica, lighthouse.address(), f"r{i}", init, steps=steps, rule="median", seed=i,
                                on_step=lambda step, seen={}: survivor(step, seen)) for i in range(2)]
            futs.append(pool.submit(doomed_then_reborn))
            results = [f.result(timeout=90) for f in futs]
    finally:
        lighthouse.shutdown()

    assert [r["step"] for r in results] == [steps] * 3
    _assert_same_global_state(results)        # the reborn group holds the current model
    for res in results[:2]:
        assert all(r["ok"] for r in res["rounds"])
        alone = [r for r in res["rounds"] if r["quorum"] == 2]
        assert len(alone) >= 2 and all(r["replicas"] == [0, 1] for r in alone), "survivors alone"
    # the reborn group healed in its first quorum (its pseudo-gradient there is its source's: left
    # out), then took part in every later step
    reborn = results[2]["rounds"]
    assert reborn[0]["quorum"] == 3 and len(reborn[0]["replicas"]) == 2 and reborn[0]["ok"]
    assert len(reborn) >= 2 and all(r["ok"] and r["replicas"] == [0, 1, 2] for r in reborn[1:])
