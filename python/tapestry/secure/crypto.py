"""Key agreement and authenticated channels (``cryptography``): X25519 + HKDF-SHA256 for pairwise
mask seeds and for the pairwise keys that encrypt Shamir shares with ChaCha20-Poly1305."""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


class ProtocolError(ValueError):
    """A message is malformed, replayed, tampered with, out of order, or asks for what must not be
    revealed; or the round cannot complete (too few clients). The message names who and why."""


def new_keypair() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive(sk: X25519PrivateKey | bytes, peer_pk: bytes, round_id: int, u: int, v: int, purpose: bytes) -> bytes:
    if isinstance(sk, bytes):
        sk = X25519PrivateKey.from_private_bytes(sk)
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise ProtocolError(f"key agreement between clients {u} and {v} failed: {exc}") from exc
    a, b = min(u, v), max(u, v)
    info = b"tapestry/secagg/" + purpose + struct.pack("<II", a, b)
    return HKDF(hashes.SHA256(), 32, salt=struct.pack("<Q", round_id), info=info).derive(shared)


def pair_seed(sk, peer_pk: bytes, round_id: int, u: int, v: int) -> bytes:
    """The 32-byte mask seed ``s_uv = s_vu`` of clients ``u`` and ``v`` for this round."""
    return _derive(sk, peer_pk, round_id, u, v, b"mask-seed")


def channel_key(sk, peer_pk: bytes, round_id: int, u: int, v: int) -> bytes:
    """The AEAD key of the (u, v) channel that carries Shamir shares (same both ways)."""
    return _derive(sk, peer_pk, round_id, u, v, b"share-channel")


def _ad(round_id: int, sender: int, receiver: int) -> bytes:
    return b"tapestry/secagg/share" + struct.pack("<QII", round_id, sender, receiver)


def seal(key: bytes, round_id: int, sender: int, receiver: int, plaintext: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(plaintext)``, bound to (round, sender, receiver)."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _ad(round_id, sender, receiver))


def open_sealed(key: bytes, round_id: int, sender: int, receiver: int, box: bytes) -> bytes:
    if len(box) < 12 + 16:
        raise ProtocolError(f"share ciphertext from client {sender} to {receiver} is truncated ({len(box)} bytes)")
    try:
        return ChaCha20Poly1305(key).decrypt(box[:12], box[12:], _ad(round_id, sender, receiver))
    except InvalidTag:
        raise ProtocolError(f"share ciphertext from client {sender} to {receiver} failed authentication "
                            f"(tampered, replayed from another round, or misaddressed)") from None
