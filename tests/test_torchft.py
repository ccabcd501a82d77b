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

pytest.importorskip("torchft")

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
             fail_at: int | None = None, on_step=None, **manager_args) -> dict:
    """One replica group (one rank): torchft DiLoCo on a small regression task until the manager
    has committed ``steps`` outer steps. ``fail_at``: raise (the group dies) at that step."""
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
        with DiLoCo(manager, [model], inner, outer, sync_every=SYNC_EVERY):
            while manager.current_step() < steps:
                if manager.current_step() == fail_at:
                    raise RuntimeError(f"{name} killed at step {fail_at}")
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
    return LighthouseServer(bind="127.0.0.1:0", min_replicas=min_replicas, join_timeout_ms=200,
                            quorum_tick_ms=20, heartbeat_timeout_ms=1000)


def _assert_same_global_state(results: list[dict]) -> None:
    for r in results[1:]:
        for k, v in results[0]["model"].items():
            assert torch.equal(r["model"][k], v), f"model parameter {k} differs between replica groups"
        for k, v in results[0]["outer"]["state"].items():
            assert torch.equal(r["outer"]["state"][k]["momentum_buffer"], v["momentum_buffer"]), "outer momentum differs"


def test_byzantine_replica_group_is_outvoted_by_the_median():
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
    results, _ = _run(3, 3, steps=2, rule="trimmed_mean", rule_params={"f": 1}, codec="int8")
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
    torch.manual_seed(1)
    init = _model().state_dict()
    survivors_moved_on = threading.Event()
    lighthouse = _lighthouse(2)

    def watch(step: int) -> None:              # replica r0 tells the test the run went on without r2
        if step >= 3:
            survivors_moved_on.set()

    def doomed_then_reborn() -> dict:
        with pytest.raises(RuntimeError, match="killed at step 2"):
            _replica(lighthouse.address(), "r2", init, steps=8, rule="median", seed=2, fail_at=2)
        assert survivors_moved_on.wait(TIMEOUT.total_seconds()), "the survivors did not continue without r2"
        fresh = {k: torch.randn_like(v) for k, v in init.items()}   # a new process knows nothing
        return _replica(lighthouse.address(), "r2", fresh, steps=8, rule="median", seed=3)

    try:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_replica, lighthouse.address(), f"r{i}", init, steps=8, rule="median", seed=i,
                                on_step=watch if i == 0 else None) for i in range(2)]
            futs.append(pool.submit(doomed_then_reborn))
            results = [f.result(timeout=90) for f in futs]
    finally:
        lighthouse.shutdown()

    assert [r["step"] for r in results] == [8, 8, 8]
    _assert_same_global_state(results)        # the reborn group holds the current model
    r0 = {r["step"]: r for r in results[0]["rounds"]}
    assert all(r["ok"] for r in r0.values()) and sorted(r0) == list(range(8))
    assert r0[2]["quorum"] == 2 and r0[2]["replicas"] == [0, 1], "the survivors committed step 2 without r2"
    # the reborn group healed in its first quorum (its pseudo-gradient there is its source's: left
    # out), then took part in every later step
    reborn = results[2]["rounds"]
    assert reborn[0]["quorum"] == 3 and len(reborn[0]["replicas"]) == 2 and reborn[0]["ok"]
    assert len(reborn) >= 2 and all(r["ok"] and r["replicas"] == [0, 1, 2] for r in reborn[1:])
