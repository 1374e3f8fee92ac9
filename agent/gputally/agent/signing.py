"""The node's key and the chain of its signed summaries (docs/audit.md).

Each agent holds an Ed25519 key. Every summary names its node, carries the next number of the
node's chain and the SHA-256 of the previous summary's body, and is signed as serialized. A
deleted, reordered, replayed or altered summary then breaks a signature or the chain.

The chain's position is saved (atomically) before a summary is handed to the sender: if the
agent dies after that, the summary is lost and the chain shows a gap, which is the truth. It is
never numbered twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.v1 import telemetry_pb2 as pb

DOMAIN = b"gputally summary v1\n"  # signatures over summaries cannot be replayed as anything else
KEY_FILE = "agent.key"
CHAIN_FILE = "chain.json"


class KeyFileError(RuntimeError):
    """A key file that cannot be used; the message says why."""


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The node key at `path`, created (mode 0600) on first use."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise KeyFileError(
                f"{path}: the private key is readable by others; run `chmod 600 {path}`"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as error:
            raise KeyFileError(f"{path}: not a PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(path, pem)
    return key


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SummarySigner:
    """Numbers, chains and signs a node's summaries; `state_dir` None keeps the chain in memory."""

    def __init__(self, key: Ed25519PrivateKey, node: str, state_dir: Path | None = None):
        self.key = key
        self.node = node
        self.public_key = public_bytes(key)
        self._state = None if state_dir is None else state_dir / CHAIN_FILE
        self.chain_seq = 0
        self.prev_hash = b""
        if self._state is not None and self._state.exists():
            try:
                saved = json.loads(self._state.read_text())
                if saved.get("node") == node and saved.get("public_key") == self.public_key.hex():
                    self.chain_seq = int(saved["chain_seq"])
                    self.prev_hash = bytes.fromhex(saved["prev_hash"])
            except (ValueError, KeyError) as error:
                raise KeyFileError(
                    f"{self._state}: unreadable chain state ({error}); move it away to start a new chain"
                ) from None

    def sign(self, summary: pb.Summary) -> pb.SignedSummary:
        summary.node = self.node
        summary.chain_seq = self.chain_seq + 1
        summary.prev_hash = self.prev_hash
        body = summary.SerializeToString(deterministic=True)
        signed = pb.SignedSummary(body=body, signature=self.key.sign(DOMAIN + body))
        self.chain_seq += 1
        self.prev_hash = hashlib.sha256(body).digest()
        if self._state is not None:
            state = {
                "node": self.node,
                "public_key": self.public_key.hex(),
                "chain_seq": self.chain_seq,
                "prev_hash": self.prev_hash.hex(),
            }
            _write_private(self._state, json.dumps(state).encode())
        return signed
