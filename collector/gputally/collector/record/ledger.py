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
import json
import logging
import threading
import time
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import KeyFileError, decode_public_key, public_bytes, write_file

from .merkle import Frontier, leaf_hash
from .store import Record, RecordError

log = logging.getLogger("gputally.collector.ledger")

ED25519 = b"\x01"  # the signed-note algorithm byte for Ed25519
# The checkpoint key's public half, beside the agents' <node>.pub files, for auditors: a C2SP
# signed-note verifier key, `<name>+<key id, 8 hex digits>+<base64 of 0x01 and the key>`, the
# line golang.org/x/mod/sumdb/note.NewVerifier (and every tlog tool) reads.
COLLECTOR_KEY_FILE = "collector.vkey"
# What collectors before the standard format wrote: the name on one line, the key in base64 on
# the next. Still read, never written.
LEGACY_KEY_FILE = "collector.ckey"
MAX_ORIGIN = 255


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message says why."""


def check_origin(origin: str) -> str:
    """The origin (also the checkpoints' key name), or ValueError saying why it is not one.

    The signed-note spec forbids spaces and "+" in key names (the verifier key is split at
    "+", signature lines at spaces), and the checkpoint's first line is the origin, so no
    newline either: one printable ASCII word, e.g. "gputally.example.org/cluster-a"."""
    if not origin:
        raise ValueError("the origin is empty")
    if len(origin) > MAX_ORIGIN:
        raise ValueError(f"the origin is longer than {MAX_ORIGIN} characters")
    bad = sorted({c for c in origin if not ("!" <= c <= "~") or c == "+"})
    if bad:
        raise ValueError(
            f"the origin {origin[:60]!r} contains {''.join(bad)!r}: a checkpoint origin (and "
            "signed-note key name) is printable ASCII without spaces or '+', e.g. "
            "example.org/gputally"
        )
    return origin


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
    # The signatures follow the LAST blank line (the signed-note spec): a text may hold blank
    # lines of its own, signature lines never do.
    text, sep, signatures = note.rpartition("\n\n")
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


def verifier_key(name: str, public_key: bytes) -> str:
    """The C2SP signed-note verifier key of `name`'s Ed25519 key."""
    check_origin(name)
    return (
        f"{name}+{key_id(name, public_key).hex()}+{base64.b64encode(ED25519 + public_key).decode()}"
    )


def parse_verifier_key(text: str) -> tuple[str, bytes]:
    """(name, public key) of a verifier key line; ValueError saying why it is not one."""
    parts = text.strip().split("+", 2)  # the base64 key may hold "+" of its own
    if len(parts) != 3:
        raise ValueError("a verifier key is <name>+<key id>+<key>")
    name, hash_hex, encoded = parts
    check_origin(name)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError("the key is not base64") from None
    if len(raw) != 33 or raw[:1] != ED25519:
        raise ValueError("not an Ed25519 key (0x01 and 32 bytes)")
    if len(hash_hex) != 8 or hash_hex != key_id(name, raw[1:]).hex():
        raise ValueError("the key id does not match the name and key")
    return name, raw[1:]


def collector_key_text(origin: str, public_key: bytes) -> str:
    """The collector.vkey file: the verifier key on one line."""
    return verifier_key(origin, public_key) + "\n"


def read_collector_key(keys: Path) -> tuple[str, bytes]:
    """(name, public key) from a key directory's collector.vkey (or, from older collectors,
    collector.ckey: the name, then the key in base64)."""
    path = keys / COLLECTOR_KEY_FILE
    legacy = keys / LEGACY_KEY_FILE
    try:
        if path.exists() or not legacy.exists():
            return parse_verifier_key(path.read_text())
        path = legacy
        name, key = legacy.read_text().split("\n")[:2]
        return name.strip(), decode_public_key(key, str(legacy))
    except (OSError, ValueError) as error:
        raise KeyFileError(
            f"{path}: the collector's public key is missing or malformed ({error})"
        ) from None


def publish_collector_key(ledger: Ledger, keys: Path, fallback: Path) -> None:
    """Put the checkpoint key's public half (collector.vkey) beside the agents' keys, where
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


class LedgerStartError(RuntimeError):
    """The collector must not run on this ledger (it would fork or forget the log); the
    message says why in one line, and what to restore."""


class Remembered(NamedTuple):
    origin: str
    size: int
    root: bytes
    note: str


def read_latest(path: Path) -> Remembered | None:
    """The latest signed checkpoint as the collector remembered it outside the ledger (its
    `--checkpoint-state` file); None when there is none. LedgerStartError when unreadable."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("gputally_checkpoint_state") != 1:
            raise ValueError("not a gputally checkpoint state (format 1)")
        return Remembered(
            str(data["origin"]),
            int(data["size"]),
            base64.b64decode(data["root"], validate=True),
            str(data["note"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise LedgerStartError(
            f"{path}: the latest checkpoint cannot be read ({error}); restore it from a backup "
            "(it is what proves the ledger has not been rolled back)"
        ) from None


def write_latest(path: Path, origin: str, size: int, root: bytes, note: str) -> None:
    """Remember a signed checkpoint outside the ledger, synced, before anyone can see it."""
    state = {
        "gputally_checkpoint_state": 1,
        "origin": origin,
        "size": size,
        "root": base64.b64encode(root).decode(),
        "note": note,
    }
    write_file(path, (json.dumps(state, indent=2) + "\n").encode(), mode=0o644)


def _windows(body: bytes) -> tuple[str, list[str], int] | None:
    """(node, GPU UUIDs, window end) of a stored entry, for the GPU window index."""
    try:
        summary = pb.Summary.FromString(pb.SignedSummary.FromString(body).body)
    except DecodeError:
        return None
    return summary.node, [g.uuid for g in summary.gpus if g.uuid], summary.window_end_unix_nano


class Ledger:
    """The record as a Merkle log whose checkpoints the collector signs.

    At start it rehashes every entry's bytes (not the stored leaf column: a changed byte must
    change the leaf), recomputes the tree, and checks it against every checkpoint in the
    record and against the latest checkpoint remembered outside it (`latest`, a file): a
    ledger shorter than or inconsistent with that one is refused (LedgerStartError), since
    going on would sign a second, incompatible log under the same key. Damage it can run
    beside (an entry after the last checkpoint altered, a checkpoint in the record that its
    entries do not give, a write that failed) sets `broken`: no checkpoint is signed and no
    summary is acknowledged until a person looks."""

    def __init__(
        self,
        record: Record,
        key: Ed25519PrivateKey,
        origin: str,
        latest: Path | None = None,
    ):
        try:
            check_origin(origin)
        except ValueError as error:
            raise LedgerStartError(f"--origin: {error}") from None
        self.record = record
        self.key = key
        self.origin = origin
        self.name = origin  # the signed note's key name
        self.latest = latest
        self.frontier = Frontier()
        self._last_id = 0
        self._lock = threading.Lock()
        self.broken = ""  # why signing and recording are refused, when they are
        self._pin_origin()
        checkpoints = record.checkpoints()
        self.last_size = checkpoints[-1][1] if checkpoints else 0
        remembered = read_latest(latest) if latest is not None else None
        wanted = {size: root for _, size, root, _ in checkpoints}
        wanted.pop(0, None)
        roots: dict[int, bytes] = {}
        if remembered is not None:
            roots[remembered.size] = b""
        # a ledger from before the GPU window index: fill it on the way
        index: list[tuple[str, str, int]] | None = [] if not record.indexed() else None
        for row_id, _, body, leaf in record.entries():
            computed = leaf_hash(body)
            if computed != leaf and not self.broken:
                self.broken = f"entry {row_id}'s bytes no longer give its leaf hash: it was altered"
            self.frontier.append(computed)
            self._last_id = row_id
            if self.frontier.size in roots:
                roots[self.frontier.size] = self.frontier.root()
            root = wanted.pop(self.frontier.size, None)
            if root is not None and root != self.frontier.root() and not self.broken:
                self.broken = (
                    f"the entries no longer give the root signed at size {self.frontier.size}"
                )
            if index is not None:
                windows = _windows(body)
                if windows is not None:
                    node, uuids, end = windows
                    index += [(uuid, node, end) for uuid in uuids]
        if index:
            record.index_windows(index)
        if wanted and not self.broken:
            self.broken = f"checkpoints sign sizes the record does not reach: {sorted(wanted)}"
        if remembered is not None:
            self._check_remembered(remembered, roots, {note for *_, note in checkpoints})
        elif checkpoints and latest is not None and not self.broken:
            _, size, root, note = checkpoints[-1]
            write_latest(latest, origin, size, root, note)  # first start with a state file
        if self.broken:
            log.error(
                "ledger damaged: no checkpoint is signed and no summary acknowledged",
                extra={"kv": {"why": self.broken}},
            )

    def _pin_origin(self) -> None:
        """The origin is fixed at the ledger's creation: checkpoints under another name would
        not verify with the key auditors hold, nor continue the log they know."""
        pinned = self.record.meta("origin")
        if pinned is None:
            checkpoints = self.record.checkpoints()
            # a ledger from before the pin: its checkpoints name its origin
            pinned = checkpoints[-1][3].split("\n", 1)[0] if checkpoints else self.origin
            self.record.set_meta("origin", pinned)
        if pinned != self.origin:
            raise LedgerStartError(
                f"{self.record.path}: this ledger's origin is {pinned!r}, not --origin "
                f"{self.origin!r}; an origin cannot change (start a new ledger for a new log)"
            )

    def _check_remembered(
        self, remembered: Remembered, roots: dict[int, bytes], notes: set[str]
    ) -> None:
        _, size, root, note = remembered
        where = f"{self.record.path} (checkpoint state {self.latest})"
        try:
            origin, signed_size, signed_root = open_note(note, self.name, public_bytes(self.key))
        except CheckpointError as error:
            raise LedgerStartError(
                f"{where}: the remembered checkpoint is not signed by this collector's key "
                f"for {self.origin!r} ({error})"
            ) from None
        if (origin, signed_size, signed_root) != (self.origin, size, root):
            raise LedgerStartError(f"{where}: the remembered checkpoint does not match its note")
        if self.frontier.size < size:
            raise LedgerStartError(
                f"{where}: the ledger holds {self.frontier.size:,} entries but a checkpoint of "
                f"{size:,} was signed: entries were lost (a WAL file dropped or cut, an old "
                "copy restored); restore the complete ledger, never start a new one"
            )
        if roots.get(size) != root:
            raise LedgerStartError(
                f"{where}: the ledger's first {size:,} entries do not give the root signed for "
                "them: it was altered or replaced; restore the original ledger"
            )
        if note not in notes:
            # signed and remembered, but the ledger lost it (the crash came between the two
            # writes, or with the WAL): it goes back in, so that auditors see it too
            self.record.add_checkpoint(size, root, note, time.time())
            self.last_size = max(self.last_size, size)

    def fail(self, why: str) -> None:
        """Stop signing (and so recording): the ledger cannot be extended consistently."""
        if not self.broken:
            self.broken = why
            log.error(
                "ledger damaged: no checkpoint is signed and no summary acknowledged",
                extra={"kv": {"why": why}},
            )

    def checkpoint(self, now: float) -> bool:
        """Sign a checkpoint if the log grew, remember it outside the ledger (synced), then
        store it. Never signs an inconsistent one."""
        with self._lock:
            try:
                for row_id, _, body, leaf in self.record.entries(self._last_id):
                    computed = leaf_hash(body)
                    if computed != leaf:
                        self.fail(f"entry {row_id}'s bytes no longer give its leaf hash")
                    self.frontier.append(computed)
                    self._last_id = row_id
            except RecordError as error:
                self.fail(str(error))
            if self.broken:
                raise CheckpointError(self.broken)
            if self.frontier.size <= self.last_size:
                return False
            root = self.frontier.root()
            note = sign_note(
                checkpoint_text(self.origin, self.frontier.size, root), self.name, self.key
            )
            if self.latest is not None:
                try:
                    write_latest(self.latest, self.origin, self.frontier.size, root, note)
                except OSError as error:
                    # not remembered, so not given: an unremembered checkpoint is a fork waiting
                    raise CheckpointError(
                        f"{self.latest}: cannot remember the checkpoint ({error.strerror})"
                    ) from None
            try:
                self.record.add_checkpoint(self.frontier.size, root, note, now)
            except RecordError as error:
                self.fail(str(error))
                raise CheckpointError(str(error)) from None
            self.last_size = self.frontier.size
            self.record.sync()
            return True
