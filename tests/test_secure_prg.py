"""ChaCha20 keystream and fused masking on every backend: RFC 8439 vectors, OpenSSL at random
offsets, one large call = many small calls, the 2^32 - 1 block-counter edge, and masking against
the reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tapestry import _native, ops
from tapestry.secure import chacha20_keystream, chacha20_mask

LAST_WORD = 16 << 32  # one past the last word of a stream
RFC_KEY = bytes(range(32))


def _backend_params():
    params = [pytest.param(("reference", None), id="reference")]
    for isa in ("portable", "avx2", "avx512"):
        params.append(pytest.param(("cpu", isa), id=f"cpu-{isa}"))
    params.append(pytest.param(("triton", None), id="triton"))
    params.append(pytest.param(("cuda", None), id="cuda", marks=pytest.mark.gpu))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """(backend name, device) with the backend forced; CPU SIMD paths forced one at a time."""
    name, isa = request.param
    reason = ops.unavailable_reason(name)
    if name in ("reference", "cpu") and reason is not None:
        pytest.fail(f"{name} backend must be available: {reason}")
    if reason is not None:
        pytest.skip(reason)
    C = _native.require("_C")
    if isa is not None:
        got = C.set_isa(isa)
        if got != isa:
            C.set_isa("best")
            pytest.skip(f"this CPU lacks {isa} (best path: {got})")
    device = "cuda" if name == "cuda" else "cpu"
    with ops.backend(name):
        yield name, device
    C.set_isa("best")


def openssl_words(key: bytes, nonce: bytes, offset: int, count: int) -> np.ndarray:
    """The same words from OpenSSL: its 16-byte IV is the 4-byte LE block counter + the nonce."""
    b0 = offset // 16
    nblocks = (offset + count - 1) // 16 - b0 + 1 if count else 0
    enc = Cipher(algorithms.ChaCha20(key, b0.to_bytes(4, "little") + nonce), None).encryptor()
    words = np.frombuffer(enc.update(bytes(64 * nblocks)), dtype="<u4")
    return words[offset - 16 * b0 : offset - 16 * b0 + count].astype(np.uint32)


def ks(key, nonce, offset, count, device) -> np.ndarray:
    out = chacha20_keystream(key, nonce, offset, count, device=device)
    assert out.dtype == torch.uint32 and out.shape == (count,)
    return out.cpu().numpy()


def _small(name: str) -> bool:
    return name == "triton"  # the interpreter is slow: fewer and smaller calls


def test_rfc8439_block_function(backend):
    """RFC 8439 2.3.2: block counter 1, nonce 00 00 00 09 00 00 00 4a 00 00 00 00."""
    _, device = backend
    want = bytes.fromhex("10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
                         "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
    got = ks(RFC_KEY, bytes.fromhex("000000090000004a00000000"), 16, 16, device)
    assert got.astype("<u4").tobytes() == want


def test_rfc8439_encryption(backend):
    """RFC 8439 2.4.2: the 114-byte plaintext XOR keystream from block 1 is the RFC ciphertext."""
    _, device = backend
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
          b"sunscreen would be it.")
    want = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0bf91b65c5524733ab8f593dabcd62b357"
        "1639d624e65152ab8f530c359f0861d807ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d")
    stream = ks(RFC_KEY, bytes.fromhex("000000000000004a00000000"), 16, 29, device).astype("<u4").tobytes()
    assert bytes(a ^ b for a, b in zip(pt, stream)) == want


def test_equals_openssl_at_random_offsets(backend):
    name, device = backend
    rng = np.random.default_rng(1)
    trials, top = (4, 600) if _small(name) else (25, 5000)
    for _ in range(trials):
        key, nonce = rng.bytes(32), rng.bytes(12)
        offset = int(rng.integers(0, LAST_WORD - top)) if rng.random() < 0.5 else int(rng.integers(0, 100))
        count = int(rng.integers(1, top))
        got, want = ks(key, nonce, offset, count, device), openssl_words(key, nonce, offset, count)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"offset={offset} count={count}: first mismatch at word {bad[:1]} of {bad.size}"


def test_large_call_equals_many_small_calls(backend):
    name, device = backend
    rng = np.random.default_rng(2)
    key, nonce = rng.bytes(32), rng.bytes(12)
    offset, count = 12345, (900 if _small(name) else 70001)  # the CPU path parallelises at >= 32768 words
    whole = ks(key, nonce, offset, count, device)
    cuts = np.sort(rng.choice(np.arange(1, count), size=5 if _small(name) else 40, replace=False))
    bounds = [0, *cuts.tolist(), count]
    parts = [ks(key, nonce, offset + a, b - a, device) for a, b in zip(bounds[:-1], bounds[1:])]
    assert np.array_equal(np.concatenate(parts), whole)
    assert np.array_equal(whole, openssl_words(key, nonce, offset, count))


def test_block_counter_edge(backend):
    """Words up to the end of block 2^32 - 1 are fine (and equal OpenSSL's); one more is refused."""
    name, device = backend
    key, nonce = os.urandom(32), os.urandom(12)
    count = 40 if _small(name) else 1000
    got = ks(key, nonce, LAST_WORD - count, count, device)
    assert np.array_equal(got, openssl_words(key, nonce, LAST_WORD - count, count))
    assert ks(key, nonce, LAST_WORD, 0, device).size == 0
    for offset, n in ((LAST_WORD - count, count + 1), (LAST_WORD, 1), (LAST_WORD - 3, 17)):
        with pytest.raises(ValueError, match="would wrap"):
            chacha20_keystream(key, nonce, offset, n, device=device)
    x = torch.zeros(5, dtype=torch.uint32, device=device)
    with pytest.raises(ValueError, match="would wrap"):
        chacha20_mask(x, [key], [1], offset=LAST_WORD - 4)


@pytest.mark.parametrize("d", [1, 7, 1000, 1000003])
def test_mask_equals_reference(backend, d):
    """x + sum_j sign_j PRG(seed_j) mod 2^32, fused, against the reference and in place."""
    name, device = backend
    if (_small(name) or name == "reference") and d > 1000:
        d = 2051  # the interpreter and the NumPy reference are slow; still no multiple of any block
    rng = np.random.default_rng(d)
    seeds = [rng.bytes(32) for _ in range(3 if _small(name) else 9)]
    signs = [int(s) for s in rng.choice([-1, 1], size=len(seeds))]
    offset = int(rng.integers(0, 1000))
    x = torch.from_numpy(rng.integers(0, 1 << 32, size=d, dtype=np.uint64).astype(np.uint32)).to(device)
    want = x.cpu().numpy().astype(np.uint64)
    for s, sign in zip(seeds, signs):  # the math, independently: OpenSSL words, uint64 then mod 2^32
        w = openssl_words(s, b"tapestry-msk", offset, d).astype(np.uint64)
        want = (want + w if sign > 0 else want + (1 << 32) - w) % (1 << 32)
    got = chacha20_mask(x, seeds, signs, offset=offset)
    assert got.dtype == torch.uint32
    assert np.array_equal(got.cpu().numpy(), want.astype(np.uint32))
    y = x.clone()
    chacha20_mask(y, seeds, signs, offset=offset, out=y)
    assert torch.equal(y, got)
    assert torch.equal(chacha20_mask(x.view(torch.int32), seeds, signs, offset=offset).view(torch.uint32), got)


def test_masks_cancel(backend):
    """+PRG(s) then -PRG(s) is the identity, on all bits."""
    name, device = backend
    d = 300 if _small(name) else 100003
    x = torch.arange(d, dtype=torch.int32, device=device)
    s = os.urandom(32)
    masked = chacha20_mask(x, [s], [1])
    assert not torch.equal(masked, x)
    assert torch.equal(chacha20_mask(masked, [s], [-1]), x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        chacha20_keystream(b"short", bytes(12), 0, 4)
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        chacha20_keystream(bytes(32), bytes(16), 0, 4)
    with pytest.raises(ValueError, match=">= 0"):
        chacha20_keystream(bytes(32), bytes(12), -1, 4)
    with pytest.raises(TypeError, match="offset must be an int"):
        chacha20_keystream(bytes(32), bytes(12), 1.5, 4)
    with pytest.raises(TypeError, match="key must be bytes"):
        chacha20_keystream("a" * 32, bytes(12), 0, 4)
    x = torch.zeros(4, dtype=torch.uint32)
    with pytest.raises(ValueError, match="signs must be"):
        chacha20_mask(x, [bytes(32)], [2])
    with pytest.raises(ValueError, match="seed 0 must be 32 bytes"):
        chacha20_mask(x, [bytes(31)], [1])
    with pytest.raises(TypeError, match="1-D"):
        chacha20_mask(torch.zeros(4), [bytes(32)], [1])
