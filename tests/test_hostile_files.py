"""Hostile input files for `tapestry aggregate`: clean errors naming the file, bounded
memory, no hangs, no signals, no temporary files left behind."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import tapestry as tp
from hostile import MiB, ROOT, peak_growth
from tapestry.cli import main
from tapestry.compression import encode
from tapestry.distributed.formats import InputError, open_input

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))


def _clients(tmp_path, n=3, d=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    paths, sds = [], []
    for i in range(n):
        sd = {"w": torch.randn(d, generator=g)}
        p = str(tmp_path / f"c{i}.safetensors")
        save_file(sd, p)
        paths.append(p)
        sds.append(sd)
    return paths, sds


def _header_file(path, raw: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_fifo_input_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe.safetensors")
    os.mkfifo(fifo)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("exc", _raises(lambda: open_input(fifo))), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert isinstance(box["exc"], InputError) and "not a regular file" in str(box["exc"]) and fifo in str(box["exc"])


def _raises(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def test_non_unicode_key_is_refused(tmp_path, capsys):
    paths, _ = _clients(tmp_path, n=2, d=4)
    bad = _header_file(tmp_path / "k.safetensors", b'{"\\ud800":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(16))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["aggregate", "--rule", "mean", bad, *paths, "-o", str(out / "g.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "k.safetensors" in err and "not valid Unicode" in err
    assert os.listdir(out) == []


def test_zero_stride_pt_file_is_refused_within_memory(tmp_path):
    pt = str(tmp_path / "z.pt")
    torch.save({"w": torch.zeros(1).expand(50_000_000)}, pt)  # a few KB describing 200 MB
    assert os.path.getsize(pt) < 10_000
    r = peak_growth("from tapestry.cli import main", f"result = main(['aggregate', '--rule', 'mean', {pt!r}, {pt!r}, "
                    f"'-o', {str(tmp_path / 'g.safetensors')!r}, '--no-progress'])")
    assert r["result"] == 2 and r["error"] is None
    assert r["growth"] <= 4 * os.path.getsize(pt) + 64 * MiB, r["growth"] / MiB


def _pt_with(path, pickle=None, compress=zipfile.ZIP_STORED, extra=0) -> str:
    """A torch.save archive with its data.pkl replaced by ``pickle``, stored with ``compress``,
    plus ``extra`` empty entries."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    src = zipfile.ZipFile(buf)
    with zipfile.ZipFile(path, "w") as zf:
        for info in src.infolist():
            is_pkl = info.filename.endswith("/data.pkl")
            zf.writestr(info.filename, pickle if is_pkl and pickle is not None else src.read(info),
                        compress_type=compress if is_pkl else zipfile.ZIP_STORED)
        for i in range(extra):
            zf.writestr(f"archive/x{i:x}", b"")
    return str(path)


LISTS = b"\x80\x02(" + b"]" * 2_000_000 + b"l."  # 2 MB of pickle that unpickles to ~130 MB of empty lists


@pytest.mark.parametrize("case, why", [
    ("deflated", "is compressed"),        # 3 KB on disk: torch.load would inflate and unpickle it all
    ("stored", "may allocate more than"),
    ("entries", "zip directory is"),      # 300,000 entries: zipfile keeps ~12 bytes per directory byte
])
def test_hostile_pt_archive_is_refused_within_memory(tmp_path, case, why):
    path = _pt_with(tmp_path / "h.pt", pickle=LISTS if case != "entries" else None,
                    compress=zipfile.ZIP_DEFLATED if case == "deflated" else zipfile.ZIP_STORED,
                    extra=300_000 if case == "entries" else 0)
    r = peak_growth("from tapestry.distributed.formats import open_input", f"result = len(open_input({path!r}).keys)")
    assert r["growth"] <= 4 * os.path.getsize(path) + 64 * MiB, r["growth"] / MiB
    assert r["error"] is not None and r["error"][0] == "InputError", r
    assert "h.pt" in r["error"][1] and why in r["error"][1], r["error"]


def test_pt_archive_with_a_small_pickle_still_opens(tmp_path):
    path = _pt_with(tmp_path / "ok.pt", extra=10)  # extra entries alone are harmless
    f = open_input(path)
    assert [k.name for k in f.keys] == ["w"]


def test_pt_inputs_are_read_by_offset(tmp_path):
    g = torch.Generator().manual_seed(1)
    sds = []
    for i in range(3):
        base = torch.randn(40, generator=g)
        sd = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g).half(), "tied": base[10:30],
              "whole": base, "empty": torch.zeros(0, 3)}
        torch.save(sd, tmp_path / f"p{i}.pt")
        sds.append(sd)
    out = tmp_path / "g.safetensors"
    assert main(["aggregate", "--rule", "median", *[str(tmp_path / f"p{i}.pt") for i in range(3)], "-o", str(out),
                 "--no-progress"]) == 0
    got, want = load_file(str(out)), tp.median([{k: v.clone() for k, v in sd.items()} for sd in sds])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_metadata_and_many_keys_stay_within_4x_plus_64mib(tmp_path):
    meta = json.dumps({f"{i:x}": "" for i in range(400_000)}, separators=(",", ":"))
    keys = ",".join(f'"{i:x}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(50_000))
    path = _header_file(tmp_path / "m.safetensors", ('{"__metadata__":' + meta + "," + keys + "}").encode())
    size = os.path.getsize(path)
    r = peak_growth("from tapestry.distributed.formats import open_input", f"result = len(open_input({path!r}).keys)")
    assert r["error"] is None and r["result"] == 50_000
    assert r["growth"] <= 4 * size + 64 * MiB, (r["growth"] / MiB, size / MiB)


def test_payload_file_that_shrinks_is_an_error_not_sigbus(tmp_path):
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))
    paths = []
    for i in range(3):
        p = tmp_path / f"c{i}.tpz"
        p.write_bytes(encode(x + i, "int8", seed=i))
        paths.append(str(p))
    out = tmp_path / "out"
    out.mkdir()
    # the files shrink after they were validated, before they are read
    code = f"""
import os, sys
from tapestry.distributed import job
from tapestry.distributed.job import Job, run_job
import tapestry as tp
real = job.open_input
def opened_then_truncated(path):
    f = real(path)
    os.truncate(path, 4096)
    return f
job.open_input = opened_then_truncated
try:
    run_job(Job({paths!r}, {str(out / 'g.safetensors')!r}, tp.Median(), 1 << 30, progress=False))
except ValueError as exc:
    print("ValueError:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-1000:])  # -7 was SIGBUS
    assert "c0.tpz" in proc.stdout and "ended while reading" in proc.stdout
    assert os.listdir(out) == []


def test_more_inputs_than_the_open_file_limit(tmp_path):
    paths, sds = _clients(tmp_path, n=70, d=300)
    out = tmp_path / "g.safetensors"
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from tapestry.cli import main
sys.exit(main(["aggregate", "--rule", "trimmed_mean", "--f", "3", *{paths!r}, "-o", {str(out)!r}, "--no-progress",
               "--memory-budget", "1M"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert torch.equal(load_file(str(out))["w"], tp.trimmed_mean(sds, f=3)["w"])


def test_sigterm_removes_the_temporary_output(tmp_path):
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({"w": torch.randn(3_000_000, generator=g)}, paths[-1])
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tapestry", "aggregate", "--rule", "geometric_median",
                             "--no-progress", *paths, "-o", str(out / "g.safetensors")], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(n.endswith(".tmp") for n in os.listdir(out)):
        time.sleep(0.05)
    assert any(n.endswith(".tmp") for n in os.listdir(out)), "the run never created its temporary file"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-1000:]
    assert "terminated" in err
    assert os.listdir(out) == []
