"""What validating hostile input costs in a secure-sum round (the bar: at most 10% of a round,
n = 100, d = 10^6, k = 8).

Runs whole in-process rounds (``simulate_round``, 10% dropouts after sharing) and times every
piece of work that exists only to stop hostile participants, by wrapping it:

* server: the Poly1305 tag check of each message, the per-stage field checks (lengths, ring,
  neighbourhood, requested shares, share commitments, advertised keys), the extra-share
  polynomial check in Shamir decoding;
* clients: computing tags, committing to their shares and checking the shares they receive
  against the dealers' commitments.

Prints the round's wall time by phase, the validation time (server and clients) and its fraction.

    python bench/bench_secure_validation.py [--n 100] [--d 1000000] [--k 8] [--repeats 3] [--active]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tapestry.secure import client as client_mod
from tapestry.secure import server as server_mod
from tapestry.secure import shamir, simulate_round

SPENT = {"server": 0.0, "clients": 0.0}
PIECES: dict[str, float] = {}


def timed(fn, side, name=None):
    name = name or getattr(fn, "__name__", "?")

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            dt = time.perf_counter() - t
            SPENT[side] += dt
            PIECES[f"{side}:{name}"] = PIECES.get(f"{side}:{name}", 0.0) + dt
    return wrapper


def install():
    server_mod.tag_ok = timed(server_mod.tag_ok, "server")
    for name in ("advertise", "share", "masked", "consistency", "unmask"):
        meth = "_check_" + name
        setattr(server_mod.Server, meth, timed(getattr(server_mod.Server, meth), "server"))
    shamir._off = timed(shamir._off, "server")
    tagger = client_mod.tagger
    client_mod.tagger = lambda key, rnd: timed(tagger(key, rnd), "clients", "tag")
    client_mod.commit = timed(client_mod.commit, "clients")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--active", action="store_true")
    a = ap.parse_args(argv)
    install()
    X = torch.from_numpy(np.random.default_rng(0).standard_normal((a.n, a.d), dtype=np.float32) * 0.01)
    drop = list(range(0, a.n, 10))
    t = (a.k + 1) // 2 + 1
    print(f"n={a.n} d={a.d} k={a.k} t={t} active={a.active}, {len(drop)} dropouts after sharing")
    for r in range(a.repeats):
        SPENT.update(server=0.0, clients=0.0)
        PIECES.clear()
        t0 = time.perf_counter()
        _, info = simulate_round(X, threshold=t, neighbours=a.k, dropouts=drop, seed=r, active=a.active,
                                 return_info=True)
        wall = time.perf_counter() - t0
        v = SPENT["server"] + SPENT["clients"]
        phases = ", ".join(f"{k} {s:.2f}" for k, s in info.seconds.items())
        print(f"run {r}: round {wall:.2f} s ({phases}); validation: server {SPENT['server'] * 1e3:.0f} ms, "
              f"clients {SPENT['clients'] * 1e3:.0f} ms, total {v * 1e3:.0f} ms = {100 * v / wall:.1f}% of the round "
              f"(server side {100 * SPENT['server'] / wall:.1f}%)")
        print("   by piece (ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(PIECES.items())))


if __name__ == "__main__":
    main()
