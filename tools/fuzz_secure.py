"""Offline fuzzing of the secure-sum state machines (``make fuzz``; not part of the test suite).

Two loops, both seeded:

* ``messages``: every genuine message of a small round (client -> server and server -> client,
  basic, SecAgg+ and active settings) is mutated (byte flips, cuts, inserted bytes, length
  fields, reordered blobs) and, half of the time, re-tagged with the sender's key so that it
  gets past authentication into the field checks. It is delivered to the state machine waiting
  for it, whose state is restored afterwards. Failure: any exception but ProtocolError.
* ``rounds``: whole rounds with one client whose messages are mutated and re-tagged at a random
  stage. Failure: an exception other than ProtocolError, or a sum that is not the exact sum of the
  reported survivors' inputs (unless the hostile client's own masked input bytes or advertised keys
  changed: then its contribution is whatever it chose, as with any input).

    python tools/fuzz_secure.py --messages 100000 --rounds 200 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tapestry.secure import Client, ProtocolError, Server, simulate_round
from tapestry.secure.crypto import identity_public, tagger
from tapestry.secure.messages import TAG_BYTES, parse


def mutate(data: bytes, rng) -> bytes:
    b = bytearray(data)
    op = rng.integers(6)
    if op == 0 and b:  # flip a few bytes
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
    elif op == 1:  # cut
        b = b[: int(rng.integers(len(b) + 1))]
    elif op == 2:  # insert
        i = int(rng.integers(len(b) + 1))
        b[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif op == 3 and len(b) >= 32:  # a length or count field in the fixed header
        off = int(rng.choice([6, 24, 28]))
        b[off : off + 2 if off == 6 else off + 4] = rng.bytes(2 if off == 6 else 4)
    elif op == 4 and len(b) >= 8:  # a byte inside the JSON header, to a JSON-ish character
        hl = int.from_bytes(b[24:28], "little") if len(b) >= 32 else 0
        if 0 < hl <= len(b) - 32:
            b[32 + int(rng.integers(hl))] = ord(rng.choice(list('{}[]",:0123456789$bn-e ')))
    else:  # a byte inside the last quarter (blobs)
        if b:
            b[len(b) - 1 - int(rng.integers(max(1, len(b) // 4)))] ^= 0xFF
    return bytes(b)


def retag(data: bytes, client: Client | None) -> bytes:
    """The sender's tag on the mutated body: a hostile client can always do this."""
    if client is None or getattr(client, "mac", None) is None or len(data) < 32 + TAG_BYTES:
        return data
    kind = {3: "shares", 5: "masked", 7: "unmask_response", 9: "consistency_response"}.get(data[5])
    if kind is None or int.from_bytes(data[6:8], "little") != TAG_BYTES:
        return data
    body = data[:-TAG_BYTES]
    return body + tagger(client.mac, client.round)(kind, body)


def record_round(n, t, k, active, rng):
    """A full honest round, returning every stage's state machines and messages."""
    vals = [rng.integers(0, 2**32, size=24, dtype=np.uint64).astype(np.uint32) for _ in range(n)]
    keys = {i: Ed25519PrivateKey.generate() for i in range(n)} if active else {}
    pubs = {i: identity_public(k_) for i, k_ in keys.items()} if active else None
    clients = [Client(i, vals[i], identity=keys.get(i), identities=pubs) for i in range(n)]
    server = Server(threshold=t, d=24, neighbours=k, identities=pubs, clients=range(n))
    stages = []  # (server snapshot, {client id: message to the server}, client method name, {id: server msg})

    def to_server(msgs):
        snap = copy.copy(server.__dict__)
        for name in ("inbox", "seen", "excluded", "keys_seen", "mac", "accused"):
            snap[name] = dict(snap[name])
        stages.append(("server", snap, msgs))
        for m in msgs.values():
            server.receive(m)

    def to_clients(method, msgs):
        stages.append(("client", {c.id: copy.copy(c.__dict__) for c in clients}, method, msgs))
        return {c.id: getattr(c, method)(msgs[c.id]) for c in clients if c.id in msgs}

    to_server({c.id: c.advertise() for c in clients})
    to_server(to_clients("share_keys", server.close_advertise()))
    to_server(to_clients("masked_input", server.close_share()))
    req = server.close_masked()
    if active:
        to_server(to_clients("consistency", req))
        req = server.close_consistency()
    to_server(to_clients("unmask", req))
    return clients, server, stages


OUTCOMES: dict[str, int] = {}


def _outcome(why: str) -> None:
    OUTCOMES[why] = OUTCOMES.get(why, 0) + 1


def fuzz_messages(count: int, rng) -> int:
    failures = 0
    done = 0
    configs = [(6, 4, None, False), (8, 3, 4, False), (7, 5, None, True), (10, 4, 6, True)]
    while done < count:
        n, t, k, active = configs[int(rng.integers(len(configs)))]
        clients, server, stages = record_round(n, t, k, active, rng)
        for _ in range(min(2000, count - done)):
            st = stages[int(rng.integers(len(stages)))]
            if st[0] == "server":
                _, snap, msgs = st
                sender = int(rng.choice(list(msgs)))
                data = mutate(msgs[sender], rng)
                if rng.random() < 0.5:
                    data = retag(data, clients[sender])
                saved = copy.copy(server.__dict__)
                server.__dict__.update({name: dict(v) if isinstance(v, dict) else v for name, v in snap.items()})
                server.rejected = []
                target = lambda: server.receive(data)  # noqa: E731
            else:
                _, snaps, method, msgs = st
                cid = int(rng.choice(list(msgs)))
                data = mutate(msgs[cid], rng)
                c = clients[cid]
                saved = copy.copy(c.__dict__)
                c.__dict__.update(copy.copy(snaps[cid]))
                target = lambda: getattr(c, method)(data)  # noqa: E731
            try:
                target()
                _outcome("accepted")
            except ProtocolError as exc:
                msg = str(exc)
                _outcome("excluded (authenticated, failed a check)" if exc.client is not None and "excluded" in msg
                         else "discarded before authentication" if "discarded" in msg else "refused by a client"
                         if st[0] == "client" else "other ProtocolError")
            except Exception:  # noqa: BLE001 - the finding
                failures += 1
                print(f"FAIL ({st[0]} stage, {'active' if active else 'basic'}, k={k}):", file=sys.stderr)
                traceback.print_exc()
            finally:
                (server if st[0] == "server" else c).__dict__.update(saved)
            done += 1
    return failures


def fuzz_rounds(count: int, rng) -> int:
    failures = 0
    phases = ["advertise", "share", "mask", "consistency", "unmask"]
    for r in range(count):
        n, k, active = 10, (None, 4)[r % 2], r % 3 == 0
        t = 6 if k is None else 3
        vals = [rng.integers(0, 2**32, size=40, dtype=np.uint64).astype(np.uint32) for _ in range(n)]
        bad, phase = int(rng.integers(n)), phases[int(rng.integers(len(phases)))]
        changed = []

        def hook(ph, c, data):
            if c.id != bad or ph != phase:
                return [data]
            out = retag(mutate(data, rng), c)
            # its masked input bytes, or the mask key it advertises (which it then does not hold), chosen
            # differently: the hostile client's contribution is its own choice, not a protocol failure
            fields = {"mask": ("data",), "advertise": ("c_pk", "s_pk")}.get(ph, ())
            try:
                a, b = parse(out).fields, parse(data).fields
                if any(bytes(a[f]) != bytes(b[f]) for f in fields):
                    changed.append(True)
            except ProtocolError:
                pass
            return [out] if rng.random() < 0.8 else [out, data]
        try:
            total, info = simulate_round(vals, threshold=t, neighbours=k, active=active, return_info=True,
                                         intercept=hook, seed=r)
        except ProtocolError:
            continue
        except Exception:  # noqa: BLE001
            failures += 1
            traceback.print_exc()
            continue
        if changed:
            continue  # the hostile client chose a different input: any sum including it is legitimate
        want = np.zeros(40, np.uint32)
        for u in info.survivors:
            want += vals[u]
        if not np.array_equal(total, want):
            failures += 1
            print(f"FAIL: round {r} (client {bad} at {phase}, k={k}, active={active}) gave a wrong sum; "
                  f"survivors {info.survivors}, excluded {info.excluded}", file=sys.stderr)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    f1 = fuzz_messages(a.messages, rng)
    t1 = time.perf_counter()
    f2 = fuzz_rounds(a.rounds, rng)
    t2 = time.perf_counter()
    print("message outcomes:", ", ".join(f"{k}: {v}" for k, v in sorted(OUTCOMES.items())))
    print(f"fuzz_secure: {a.messages} mutated messages, {f1} failures ({t1 - t0:.1f} s); "
          f"{a.rounds} hostile rounds, {f2} failures ({t2 - t1:.1f} s)")
    return 1 if f1 or f2 else 0


if __name__ == "__main__":
    sys.exit(main())
