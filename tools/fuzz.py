"""Offline fuzzing of Tapestry's decoders (`make fuzz`; not part of CI).

    python tools/fuzz.py [--count 1000000] [--seed 0] [--target payloads ...]

Each target pushes ``count`` mutated inputs through a decoder and counts failures: any exception
other than the documented one (``PayloadError`` for payloads), and any decoded value outside what
the format allows. Targets are the ``fuzz_*`` functions in TARGETS: a new decoder (protocol
messages, ...) adds ``def fuzz_<name>(rng, count) -> (count, failures)`` and one line there.
Exit status 1 when any target failed; the first few failures are printed with their inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
import traceback
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import torch  # noqa: E402

from tapestry.compression import PayloadError, aggregate, decode, decode_flat, encode  # noqa: E402
from tapestry.compression.wire import HEADER, _pad8  # noqa: E402


def _respec(p: bytes, spec: bytes) -> bytes:
    n = struct.unpack_from("<I", p, 20)[0] if len(p) >= 24 else 0
    data = p[HEADER.size + n + _pad8(n):]
    head = bytearray(p[:HEADER.size].ljust(HEADER.size, b"\0"))
    struct.pack_into("<I", head, 20, len(spec))
    struct.pack_into("<I", head, 32, zlib.crc32(spec, zlib.crc32(bytes(head[:32]))))
    return bytes(head) + spec + bytes(_pad8(len(spec))) + data


SPECS = [
    b'{"form":"tensor","numpy":false,"shape":[%d],"dtype":"float32"}',
    b'{"form":"state_dict","numpy":false,"entries":[["a",[%d],"float16"]]}',
    b'{"form":"arrays","numpy":true,"entries":[[0,[%d],"bfloat16"]]}',
    b'{"form":"tensor","numpy":false,"shape":[0,%d,4294967295],"dtype":"float64"}',
    b'{"form":"state_dict","numpy":false,"entries":[["\\ud800",[%d],"float32"]]}',
    b'{"form":"tensor","numpy":false,"shape":[%d],"dtype":["float32"]}',
]


def _mutate(rng: random.Random, p: bytes) -> bytes:
    b = bytearray(p)
    kind = rng.randrange(6)
    if kind == 0 and b:  # bit flips anywhere (mostly caught by the CRC or the length)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation or extension
        b = b[: rng.randrange(len(b) + 1)] if rng.random() < 0.7 else b + bytes(rng.randrange(1, 64))
    elif kind == 2:  # a header field rewritten, CRC fixed
        field = rng.choice([(6, "B"), (7, "B"), (8, "Q"), (16, "I"), (24, "Q")])
        v = rng.choice([0, 1, 2, 3, 5, 255, 4094, 4096, 2**31, 2**32 - 1, rng.randrange(2**16)])
        struct.pack_into("<" + field[1], b, field[0], v % (256 if field[1] == "B" else 2**32))
        n = struct.unpack_from("<I", b, 20)[0]
        spec = bytes(b[40: 40 + n])
        b = bytearray(_respec(bytes(b), spec))
    elif kind == 3:  # a spec rewritten, CRC fixed
        spec = rng.choice(SPECS) % rng.choice([0, 1, 63, 64, 65, 2**32 - 1])
        if rng.random() < 0.3:
            spec = spec[: rng.randrange(len(spec))]
        b = bytearray(_respec(bytes(b), spec))
    else:  # data bytes only: the CRC stays valid, every value must still decode in range
        for _ in range(rng.randint(1, 16)):
            if len(b) > 40:
                b[rng.randrange(40, len(b))] = rng.randrange(256)
    return bytes(b)


def fuzz_payloads(rng: random.Random, count: int) -> tuple[int, list]:
    """Mutated compression payloads through decode() and, when they decode, aggregate()."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(64, generator=g)
    seeds = [encode(x, "fp16"), encode(x, "bf16"), encode(x, "int8", block=8), encode(x, "int4", block=6),
             encode(x, "topk", k=5), encode({"a": x[:30], "b": x[30:].double()}, "int8", block=4094),
             encode([x[:10].numpy(), x[10:].numpy()], "int4", block=2)]
    failures = []
    for _ in range(count):
        p = _mutate(rng, rng.choice(seeds))
        try:
            decode(p)  # the caller's form (shapes, dtypes, NumPy) must build
            flat, _ = decode_flat(p)
            if p[6] in (3, 4) and flat.numel() and not bool(torch.isfinite(flat).all()):
                raise AssertionError("an int8/int4 payload decoded to a non-finite value")
            if rng.random() < 0.05:
                aggregate([p, p], "median")
        except PayloadError:
            pass
        except Exception as exc:  # noqa: BLE001 - any other exception is what we look for
            failures.append((p.hex(), f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)))
    return count, failures


TARGETS = {"payloads": fuzz_payloads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000, help="inputs per target (default 1000000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", choices=list(TARGETS), help="only these targets (repeatable)")
    args = ap.parse_args(argv)
    failed = False
    for name in args.target or list(TARGETS):
        t0 = time.perf_counter()
        n, failures = TARGETS[name](random.Random(f"{args.seed}/{name}"), args.count)
        dt = time.perf_counter() - t0
        print(json.dumps({"target": name, "inputs": n, "failures": len(failures), "seconds": round(dt, 1),
                          "seed": args.seed}))
        for hexed, what, tb in failures[:5]:
            print(f"  {what}\n  input: {hexed[:400]}\n{tb}")
        failed |= bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
