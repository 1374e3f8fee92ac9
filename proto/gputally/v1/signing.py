"""Signing domains and key files (docs/audit.md): one home for both sides.

An agent signs each serialized Summary with its node's Ed25519 key over ``SUMMARY_DOMAIN +
body``; the collector and the auditor verify the same bytes the same way. At the start of each
stream it proves it holds that key by signing the collector's fresh nonce under
``STREAM_DOMAIN``. The domains keep a signature over one thing from ever being taken for a
signature over another (the collector's checkpoints are signed notes, a third domain).

Private keys (an agent's node key, the collector's checkpoint key) are PKCS#8 PEM files
readable by their owner only, written whole or not at all. Public keys travel as the base64
of their 32 raw bytes: what ``gputally agent --print-public-key`` prints, ``gputally enroll``
takes, and a node's ``.pub`` file holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SUMMARY_DOMAIN = b"gputally summary v1\n"
STREAM_DOMAIN = b"gputally stream v1\n"
PUBLIC_KEY_BYTES = 32  # an Ed25519 public key, raw
NONCE_BYTES = 32  # a Challenge's nonce


class KeyFileError(ValueError):
    """A key, or a key file, that cannot be used; the message says which and why."""


def sign_summary(key: Ed25519PrivateKey, body: bytes) -> bytes:
    return key.sign(SUMMARY_DOMAIN + body)


def verify_summary(public_key: bytes, body: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, SUMMARY_DOMAIN + body)
    except (InvalidSignature, ValueError):
        return False
    return True


def stream_proof_message(nonce: bytes, node: str, instance_id: int, public_key: bytes) -> bytes:
    """What a stream's Proof signs: its own domain (never a summary's), the collector's fresh
    nonce (so a proof seen on one stream opens no other), and what the Hello claims: the node,
    the agent instance whose sequence numbers the stream carries, and the key. Each part has a
    fixed length or a length prefix, so no two claims give the same bytes."""
    name = node.encode()
    return b"".join(
        (
            STREAM_DOMAIN,
            len(nonce).to_bytes(2, "big"),
            nonce,
            len(name).to_bytes(2, "big"),
            name,
            instance_id.to_bytes(8, "big"),
            public_key,
        )
    )


def sign_stream(key: Ed25519PrivateKey, nonce: bytes, node: str, instance_id: int) -> bytes:
    return key.sign(stream_proof_message(nonce, node, instance_id, public_bytes(key)))


def verify_stream(
    public_key: bytes, signature: bytes, nonce: bytes, node: str, instance_id: int
) -> bool:
    message = stream_proof_message(nonce, node, instance_id, public_key)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def chain_hash(body: bytes) -> bytes:
    """What the next summary of a node's chain carries as prev_hash: the SHA-256 of this
    summary's serialized body (the one numbered chain_seq - 1 before it)."""
    return hashlib.sha256(body).digest()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(raw: bytes) -> str:
    """How a key is named to people (enrolment records, reports): `SHA256:` and the hex SHA-256
    of its 32 raw bytes, the same from every tool that reads the key."""
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def encode_public_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def decode_public_key(text: str, where: str) -> bytes:
    """A public key from its base64 text; `where` names it in the error."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise KeyFileError(f"{where}: not base64") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise KeyFileError(
            f"{where}: an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, this has {len(raw)}"
        )
    return raw


def write_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write a file atomically and durably: a crash leaves the old file or the new one, never
    half of one, and no temporary file behind. Mode 0600 (the default) for private keys."""
    private = not mode & 0o077
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    # a short fixed prefix: a name of up to 255 bytes must still leave room for the temporary
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gputally-", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself is durable once the directory is.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key at `path`, created (mode 0600) on first use. A key file others can
    read is refused: whoever can read it can sign as its owner."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise KeyFileError(
                f"{path}: the private key is readable by others; run `chmod 600 {path}`"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as error:
            raise KeyFileError(f"{path}: {error.strerror or error}") from None
        except (ValueError, TypeError) as error:
            raise KeyFileError(f"{path}: not a PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_file(path, pem)
    return key
