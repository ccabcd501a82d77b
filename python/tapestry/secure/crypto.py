"""Key agreement and authenticated channels (``cryptography``): X25519 + HKDF-SHA256 for pairwise
mask seeds and for the pairwise keys that encrypt Shamir shares with ChaCha20-Poly1305; a
client-server key (X25519 with the server's round key) whose Poly1305 tags bind every client
message to its sender; SHA-256 commitments to Shamir shares; Ed25519 signatures for the
active-adversary setting."""

from __future__ import annotations

import hmac as _hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, poly1305
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


class ProtocolError(ValueError):
    """A message is malformed, replayed, tampered with, out of order, or asks for what must not be
    revealed; or the round cannot complete (too few clients). The message names who and why;
    ``client`` is the id of the client at fault when one is known (else None)."""

    def __init__(self, message: str, client: int | None = None):
        super().__init__(message)
        self.client = client


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
        shared = sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_pk)))
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


def check_public_key(pk: bytes, who: str, sk: X25519PrivateKey | None = None) -> None:
    """A 32-byte X25519 key that is not of low order (a low-order point makes every shared secret
    zero, for every private key: one exchange with any key, ``sk`` or a throwaway one, tells)."""
    if len(pk) != 32:
        raise ProtocolError(f"{who}: public key has {len(pk)} bytes, expected 32")
    try:
        (sk or X25519PrivateKey.generate()).exchange(X25519PublicKey.from_public_bytes(bytes(pk)))
    except ValueError:
        raise ProtocolError(f"{who}: public key is a low-order point") from None


def mac_key(sk, peer_pk: bytes, round_id: int, client: int) -> bytes:
    """The key of the client-server link of ``client``: the client's ``c`` key with the server's
    round key; no other client can compute it."""
    return _derive(sk, peer_pk, round_id, client, 0xFFFFFFFF, b"client-server-mac")


def tagger(key: bytes, round_id: int):
    """``tag(kind, body)``: Poly1305 under a one-time key per (round, kind): each client sends one
    message of each kind per round."""
    def tag(kind: str, body) -> bytes:
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(kind.encode() + struct.pack("<Q", round_id))
        return poly1305.Poly1305.generate_tag(h.finalize(), body)
    return tag


def tag_ok(key: bytes, round_id: int, kind: str, body, tag: bytes | None) -> bool:
    return tag is not None and _hmac.compare_digest(tagger(key, round_id)(kind, body), bytes(tag))


def commit(round_id: int, dealer: int, holder: int, kind: bytes, share: bytes) -> bytes:
    """SHA-256 commitment to one Shamir share (a share is a uniform field element of at least
    256 bits of entropy to whoever holds fewer than ``t`` of its kind, so it hides without salt)."""
    h = hashes.Hash(hashes.SHA256())
    h.update(b"tapestry/secagg/commit/" + kind + struct.pack("<QII", round_id, dealer, holder) + bytes(share))
    return h.finalize()


def _ad_sig(what: bytes, round_id: int, client: int, *parts: bytes) -> bytes:
    return b"tapestry/secagg/" + what + struct.pack("<QI", round_id, client) + b"".join(
        struct.pack("<I", len(p)) + bytes(p) for p in parts)


def sign(identity: Ed25519PrivateKey, what: bytes, round_id: int, client: int, *parts: bytes) -> bytes:
    return identity.sign(_ad_sig(what, round_id, client, *parts))


def verify(public: bytes, sig: bytes, what: bytes, round_id: int, client: int, *parts: bytes) -> bool:
    """True when ``sig`` is ``client``'s Ed25519 signature (long-term key ``public``) on the parts."""
    from cryptography.exceptions import InvalidSignature
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(sig), _ad_sig(what, round_id, client, *parts))
        return True
    except (InvalidSignature, ValueError):
        return False


def identity_public(identity: Ed25519PrivateKey) -> bytes:
    return identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
