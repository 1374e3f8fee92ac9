"""The ledger: the record's entries as an RFC 9162 Merkle log, with signed checkpoints.

Every summary the collector records is an entry; the log's tree covers the entries in the
order they were appended. Now and then the collector signs a checkpoint, a C2SP
tlog-checkpoint signed note naming the origin, the number of entries and the root:

    <origin>
    <size>
    <root, base64>

    — <key name> <base64 of key id (4 bytes) and Ed25519 signature (64 bytes)>

It never signs a checkpoint inconsistent with one it signed before: at start it recomputes the
tree over the stored entries and checks every earlier checkpoint's root; if one differs, the
record was altered, and it refuses to sign anything until a person looks.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gputally.v1.signing import KeyFileError, decode_public_key, encode_public_key, public_bytes

from .merkle import Frontier
from .store import Record

log = logging.getLogger("gputally.collector.ledger")

ED25519 = b"\x01"  # the signed-note algorithm byte for Ed25519
COLLECTOR_KEY_FILE = "collector.ckey"  # beside the agents' <node>.pub files, for auditors


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message says why."""


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ED25519 + public_key).digest()[:4]


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def sign_note(text: str, name: str, key: Ed25519PrivateKey) -> str:
    signature = key.sign(text.encode())
    blob = key_id(name, public_bytes(key)) + signature
    return f"{text}\n\u2014 {name} {base64.b64encode(blob).decode()}\n"


def open_note(note: str, name: str, public_key: bytes) -> tuple[str, int, bytes]:
    """(origin, size, root) of a checkpoint note signed by `name`'s key; CheckpointError otherwise."""
    text, sep, signatures = note.partition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise CheckpointError(
            "not a signed note: a text, a blank line, signature lines each ending in a newline"
        )
    text += "\n"
    prefix = f"\u2014 {name} "
    # Strict parsing: lines end in "\n" only, and base64 must be canonical, so that no
    # changed byte can leave a note meaning the same.
    for line in signatures[:-1].split("\n"):
        if not line.startswith(prefix):
            continue
        encoded = line[len(prefix) :]
        try:
            blob = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise CheckpointError("signature line is not base64") from None
        if base64.b64encode(blob).decode() != encoded:
            raise CheckpointError("signature is not in canonical base64")
        if blob[:4] != key_id(name, public_key) or len(blob) != 68:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(blob[4:], text.encode())
        except (InvalidSignature, ValueError):
            raise CheckpointError(f"the signature of {name} does not verify") from None
        lines = text.split("\n")
        if len(lines) < 4:
            raise CheckpointError("a checkpoint has an origin, a size and a root")
        try:
            root = base64.b64decode(lines[2], validate=True)
        except ValueError:
            raise CheckpointError("malformed checkpoint root") from None
        if (
            not lines[1].isdigit()
            or str(int(lines[1])) != lines[1]
            or base64.b64encode(root).decode() != lines[2]
        ):
            raise CheckpointError("malformed checkpoint size or root")
        return lines[0], int(lines[1]), root
    raise CheckpointError(f"no signature by {name} with this key")


def collector_key_text(origin: str, public_key: bytes) -> str:
    """The collector.ckey file: the checkpoints' key name (the origin) on one line, then the
    key in base64."""
    return f"{origin}\n{encode_public_key(public_key)}\n"


def read_collector_key(keys: Path) -> tuple[str, bytes]:
    """(name, public key) from a key directory's collector.ckey."""
    path = keys / COLLECTOR_KEY_FILE
    try:
        name, key = path.read_text().split("\n")[:2]
        raw = decode_public_key(key, str(path))
    except (OSError, ValueError) as error:
        raise KeyFileError(
            f"{path}: the collector's public key is missing or malformed ({error})"
        ) from None
    return name.strip(), raw


def publish_collector_key(ledger: Ledger, keys: Path, fallback: Path) -> None:
    """Put the checkpoint key's public half (collector.ckey) beside the agents' keys, where
    auditors read it (and should also check it out of band). A read-only key directory (a
    Kubernetes ConfigMap, /etc under systemd's ProtectSystem=strict) gets it beside the
    collector's private key instead, and the log says where."""
    text = collector_key_text(ledger.origin, public_bytes(ledger.key))
    for directory in (keys, fallback):
        path = directory / COLLECTOR_KEY_FILE
        try:
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        except OSError as error:
            log.info(
                "cannot publish the checkpoint key here",
                extra={"kv": {"path": str(path), "error": error.strerror}},
            )
            continue
        if directory != keys:
            log.warning(
                "the key directory is read-only: copy the checkpoint key into it for auditors",
                extra={"kv": {"path": str(path), "keys": str(keys)}},
            )
        return


class Ledger:
    def __init__(self, record: Record, key: Ed25519PrivateKey, origin: str):
        self.record = record
        self.key = key
        self.origin = origin
        self.name = origin  # the signed note's key name
        self.frontier = Frontier()
        self._last_id = 0
        self._lock = threading.Lock()
        self.broken = ""  # why signing is refused, when it is
        checkpoints = record.checkpoints()
        self.last_size = checkpoints[-1][1] if checkpoints else 0
        wanted = {size: root for _, size, root, _ in checkpoints}
        if 0 in wanted:
            wanted.pop(0)
        for row_id, leaf in record.leaves_after(0):
            self.frontier.append(leaf)
            self._last_id = row_id
            root = wanted.pop(self.frontier.size, None)
            if root is not None and root != self.frontier.root():
                self.broken = (
                    f"the entries no longer give the root signed at size {self.frontier.size}"
                )
        if wanted:
            self.broken = f"checkpoints sign sizes the record does not reach: {sorted(wanted)}"
        if self.broken:
            log.error(
                "ledger inconsistent: refusing to sign checkpoints",
                extra={"kv": {"why": self.broken}},
            )

    def checkpoint(self, now: float) -> bool:
        """Sign a checkpoint if the log grew. Never signs an inconsistent one."""
        with self._lock:
            for row_id, leaf in self.record.leaves_after(self._last_id):
                self.frontier.append(leaf)
                self._last_id = row_id
            if self.broken:
                raise CheckpointError(self.broken)
            if self.frontier.size <= self.last_size:
                return False
            root = self.frontier.root()
            note = sign_note(
                checkpoint_text(self.origin, self.frontier.size, root), self.name, self.key
            )
            self.record.add_checkpoint(self.frontier.size, root, note, now)
            self.last_size = self.frontier.size
            return True
