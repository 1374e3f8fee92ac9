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

On a shared record (PostgreSQL, several collectors appending as shards of one cluster) one
shard at a time signs (Record.signer), under the key and origin they all hold; every other
one follows the log: it checks each checkpoint the signer stores against its own tree of the
entries, so that the shard that takes the role when the signer dies goes on from a tree it
has checked, and signs only checkpoints that extend every one stored before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import Window, card, next_window
from gputally.v1.signing import KeyFileError, decode_public_key, public_bytes, write_file

from .merkle import Frontier, consistency_proof, consistency_proof_extending, leaf_hash
from .store import Record, RecordError, RecordUnavailableError, SigningLostError

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


def key_id(name: str, public_key: bytes, algorithm: bytes = ED25519) -> bytes:
    """The signed-note key id: the first 4 bytes of SHA-256(name, newline, algorithm, key)."""
    return hashlib.sha256(name.encode() + b"\n" + algorithm + public_key).digest()[:4]


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def sign_note(text: str, name: str, key: Ed25519PrivateKey) -> str:
    signature = key.sign(text.encode())
    blob = key_id(name, public_bytes(key)) + signature
    return f"{text}\n\u2014 {name} {base64.b64encode(blob).decode()}\n"


class NoSignatureError(CheckpointError):
    """A signed note that carries no signature by the key asked for."""


def split_note(note: str) -> tuple[str, list[str]]:
    """(text, signature lines) of a signed note. The signatures follow the LAST blank line
    (the signed-note spec): a text may hold blank lines of its own, signature lines never do."""
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise CheckpointError(
            "not a signed note: a text, a blank line, signature lines each ending in a newline"
        )
    return text + "\n", signatures[:-1].split("\n")


def open_signed_text(note: str, name: str, public_key: bytes) -> str:
    """The text of a C2SP signed note that `name`'s Ed25519 key signed (a checkpoint, an
    enrolment record); NoSignatureError when it carries no signature by that key,
    CheckpointError when one claims to be and does not verify. Other signers' lines are
    left alone (cosignatures, other keys), as the spec says."""
    text, lines = split_note(note)
    prefix = f"\u2014 {name} "
    # Strict parsing: lines end in "\n" only, and base64 must be canonical, so that no
    # changed byte can leave a note meaning the same.
    for line in lines:
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
        return text
    raise NoSignatureError(f"no signature by {name} with this key")


def open_note(note: str, name: str, public_key: bytes) -> tuple[str, int, bytes]:
    """(origin, size, root) of a checkpoint note signed by `name`'s key; CheckpointError otherwise."""
    lines = open_signed_text(note, name, public_key).split("\n")
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


def verifier_key(name: str, public_key: bytes, algorithm: bytes = ED25519) -> str:
    """The C2SP signed-note verifier key of `name`'s Ed25519 key (`algorithm` 0x04 for a
    witness's cosigning key, C2SP tlog-cosignature)."""
    check_origin(name)
    blob = base64.b64encode(algorithm + public_key).decode()
    return f"{name}+{key_id(name, public_key, algorithm).hex()}+{blob}"


def parse_verifier_key(text: str, algorithm: bytes = ED25519) -> tuple[str, bytes]:
    """(name, public key) of a verifier key line of `algorithm`; ValueError saying why it is
    not one."""
    parts = text.strip().split("+", 2)  # the base64 key may hold "+" of its own
    if len(parts) != 3:
        raise ValueError("a verifier key is <name>+<key id>+<key>")
    name, hash_hex, encoded = parts
    check_origin(name)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError("the key is not base64") from None
    if len(raw) != 33 or raw[:1] != algorithm:
        what = "a witness's Ed25519 cosigning key" if algorithm != ED25519 else "an Ed25519 key"
        raise ValueError(f"not {what} (0x{algorithm.hex()} and 32 bytes)")
    if len(hash_hex) != 8 or hash_hex != key_id(name, raw[1:], algorithm).hex():
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
            held = path.read_text() if path.exists() else None
            # the same key, whatever the line ending a person who copied it in left
            if held is None or held.strip() != text.strip():
                # whole or not at all: a shard starting beside another reads one key or the
                # other, never an empty file
                part = path.with_name(f".{path.name}.{os.getpid()}")
                try:
                    part.write_text(text)
                    os.replace(part, path)
                except OSError:
                    part.unlink(missing_ok=True)
                    raise
                if held is not None and directory == keys:
                    # another ledger's (or a rotated) key: whoever checks the older
                    # checkpoints needs it, and should hold it out of band already
                    log.warning(
                        "replaced a published checkpoint key that named another key",
                        extra={"kv": {"path": str(path), "was": held.strip()}},
                    )
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


# meta: where this ledger's checkpoint state file was written; on a shared ledger, one mark
# per shard (its host and file), since each shard remembers its own
STATE_KEY = "checkpoint_state"


class LedgerStartError(RuntimeError):
    """The collector must not run on this ledger (it would fork or forget the log); the
    message says why in one line, and what to restore."""


class Remembered(NamedTuple):
    """The latest signed checkpoint, as remembered outside the ledger."""

    origin: str
    size: int
    root: bytes
    note: str
    last_id: int  # the id of the checkpoint's last entry; 0 when not known (older files)
    peaks: list[bytes]  # the tree's frontier at `size` (merkle.Frontier); [] when not known
    acknowledged: int  # the id of the newest entry acknowledged to an agent (0: not known)


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
            int(data.get("last_id", 0)),
            [base64.b64decode(p, validate=True) for p in data.get("peaks", [])],
            int(data.get("acknowledged", data.get("last_id", 0))),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise LedgerStartError(
            f"{path}: the latest checkpoint cannot be read ({error}); restore it from a backup "
            "(it is what proves the ledger has not been rolled back)"
        ) from None


def _remember(origin: str, frontier: Frontier, last_id: int, note: str) -> Remembered:
    """What is remembered of a checkpoint just signed over `frontier`."""
    return Remembered(
        origin, frontier.size, frontier.root(), note, last_id, frontier.peaks(), last_id
    )


def write_latest(path: Path, state: Remembered) -> None:
    """Remember a signed checkpoint outside the ledger, synced, before anyone can see it:
    its note, the tree's frontier, from which the next start goes on, and the newest entry
    acknowledged to an agent, which the ledger must still hold at the next start."""
    data = {
        "gputally_checkpoint_state": 1,
        "origin": state.origin,
        "size": state.size,
        "root": base64.b64encode(state.root).decode(),
        "note": state.note,
        "last_id": state.last_id,
        "peaks": [base64.b64encode(p).decode() for p in state.peaks],
        "acknowledged": state.acknowledged,
    }
    write_file(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)


def _windows(body: bytes) -> tuple[str, pb.Summary] | None:
    """(node, summary) of a stored entry, for the GPU window index."""
    try:
        summary = pb.Summary.FromString(pb.SignedSummary.FromString(body).body)
    except DecodeError:
        return None
    return summary.node, summary


class Ledger:
    """The record as a Merkle log whose checkpoints the collector signs.

    At start it checks the record against the latest checkpoint remembered outside it
    (`latest`, a file): a ledger that is shorter than that checkpoint, lacks its last entry,
    or whose entries do not give its root is refused (LedgerStartError), since going on would
    sign a second, incompatible log under the same key, or forget acknowledged entries.

    Entries' bytes are rehashed (never the stored leaf column: a changed byte must change the
    leaf). With `full_check` (and always without a remembered frontier) every entry is, before
    the collector starts. Otherwise the tree goes on from the remembered frontier, only the
    entries after the checkpoint are rehashed at start, and `check_history` rehashes the rest
    while the collector runs: a start in seconds whatever the ledger's size, and new
    checkpoints can only extend the remembered one, whatever happened to older bytes.

    Damage it can run beside (an entry altered, a checkpoint in the record that its entries
    do not give, a write that failed) sets `broken`: no checkpoint is signed and no summary
    acknowledged until a person looks. A database that cannot be reached for a while (a
    shared record's server) is no damage: checkpoints wait for it.

    On a shared record, `signing` says whether this collector signs now (taken or lost at
    each `checkpoint`). Whoever signs, the frontier is the tree at the newest checkpoint
    stored (the anchor), and only the signer grows it past that, to sign: a shard that read
    entries beyond it and then lost the role starts again from it, since the next signer's
    checkpoint may cover fewer entries than it read."""

    def __init__(
        self,
        record: Record,
        key: Ed25519PrivateKey,
        origin: str,
        latest: Path | None = None,
        *,
        full_check: bool = True,
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
        self._last_leaf = b""  # the leaf hash of entry _last_id, as rehashed ("": not known)
        self._lock = threading.Lock()
        self.broken = ""  # why signing and recording are refused, when they are
        self.history: Remembered | None = None  # what check_history has still to rehash
        self.history_checked = 0  # entries check_history has rehashed so far
        self.signing = not record.shared  # whether this collector signs the checkpoints now
        self._state_key = (
            f"{STATE_KEY} {socket.gethostname()} {latest.absolute()}"
            if record.shared and latest is not None
            else STATE_KEY
        )
        self._pin_origin()
        checkpoints = record.checkpoints()
        if record.shared and checkpoints:
            self._same_key(checkpoints[-1][3])
        self.last_size = checkpoints[-1][1] if checkpoints else 0  # the newest one stored
        self._newest_note = checkpoints[-1][3] if checkpoints else ""
        remembered = read_latest(latest) if latest is not None else None
        self.state = remembered  # what the checkpoint state file holds now
        mark = record.meta(self._state_key)
        if latest is not None and remembered is None and mark is not None:
            clear = record.command(f"DELETE FROM meta WHERE key = '{self._state_key}'")
            raise LedgerStartError(
                f"{latest}: missing, but this ledger's latest checkpoint was remembered in "
                f"{mark}: restore that file (without it a rolled-back or cut-short ledger "
                "cannot be told from a whole one); if it is truly lost and the ledger is "
                f"complete, clear the mark: {clear}"
            )
        if remembered is not None:
            self._open_remembered(remembered)
        incremental = (
            not full_check and remembered is not None and remembered.peaks and remembered.last_id
        )
        if incremental:
            assert remembered is not None
            try:
                self.frontier = Frontier.resume(remembered.size, remembered.peaks)
            except ValueError as error:
                raise LedgerStartError(f"{self._where()}: a damaged frontier ({error})") from None
            if self.frontier.root() != remembered.root:
                # going on from it would sign checkpoints no earlier one is a prefix of
                raise LedgerStartError(
                    f"{self._where()}: the remembered frontier does not give the signed root"
                )
            self._last_id = remembered.last_id
            self.history = remembered
        # the newest checkpoint known: the one stored last, or the one remembered
        self._anchor = self._here()
        anchor = max(self.last_size, remembered.size if remembered is not None else 0)
        done = self._rehash(
            checkpoints,
            remembered.size if remembered and incremental else 0,
            remembered.size if remembered and not incremental else None,
            anchor,
        )
        if remembered is not None and remembered.size and not incremental:
            self._check_root(remembered, done)
        if remembered is not None and remembered.size and not record.shared:
            self._restore_checkpoint(remembered, checkpoints)
        elif checkpoints and latest is not None and not self.broken:
            # first start with a state file: remember the record's latest checkpoint
            _, size, _, note = checkpoints[-1]
            if size == self.frontier.size:
                self.state = _remember(origin, self.frontier, self._last_id, note)
                self._write_state(self.state)
        # checkpoints stored from now on are checked as they come (_follow)
        self._seen = checkpoints[-1][0] if checkpoints else None
        if record.shared:
            self._reset()  # a follower's tree stops at the newest checkpoint
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
            first = checkpoints[-1][3].split("\n", 1)[0] if checkpoints else self.origin
            self.record.set_meta("origin", first)
            pinned = self.record.meta("origin")  # another shard's, if it was first
        if pinned != self.origin:
            raise LedgerStartError(
                f"{self.record.where}: this ledger's origin is {pinned!r}, not --origin "
                f"{self.origin!r}; an origin cannot change (start a new ledger for a new log)"
            )

    def _same_key(self, note: str) -> None:
        """Every shard of a shared ledger signs with the log's one key: a shard given another
        would sign checkpoints no auditor can verify with the key they hold."""
        try:
            open_note(note, self.name, public_bytes(self.key))
        except CheckpointError as error:
            raise LedgerStartError(
                f"{self.record.where}: the ledger's newest checkpoint is not signed by this "
                f"collector's key ({error}): every shard holds the same --collector-key"
            ) from None

    def _where(self) -> str:
        return f"{self.record.where} (checkpoint state {self.latest})"

    def _open_remembered(self, remembered: Remembered) -> None:
        """The remembered checkpoint must be ours, and the record must still reach it."""
        if remembered.size == 0:  # no checkpoint yet: only what was acknowledged
            self._check_acknowledged(remembered)
            return
        try:
            signed = open_note(remembered.note, self.name, public_bytes(self.key))
        except CheckpointError as error:
            raise LedgerStartError(
                f"{self._where()}: the remembered checkpoint is not signed by this collector's "
                f"key for {self.origin!r} ({error})"
            ) from None
        if signed != (self.origin, remembered.size, remembered.root):
            raise LedgerStartError(
                f"{self._where()}: the remembered checkpoint does not match its note"
            )
        lost = (
            not self.record.has_entry(remembered.last_id)
            if remembered.last_id
            else self.record.count() < remembered.size
        )
        if lost:
            self._lost(self.record.count(), remembered.size)
        self._check_acknowledged(remembered)

    def _check_acknowledged(self, remembered: Remembered) -> None:
        if remembered.acknowledged > remembered.last_id and not self.record.has_entry(
            remembered.acknowledged
        ):
            raise LedgerStartError(
                f"{self._where()}: entry {remembered.acknowledged} was acknowledged to its agent "
                "but the ledger no longer holds it: entries recorded after the last checkpoint "
                "were lost (a WAL file dropped or cut); restore the complete ledger"
            )

    def _lost(self, count: int, size: int) -> None:
        raise LedgerStartError(
            f"{self._where()}: the ledger holds {count:,} entries but a checkpoint of "
            f"{size:,} was signed: entries were lost (a WAL file dropped or cut, "
            "an old copy restored); restore the complete ledger, never start a new one"
        )

    def _rehash(
        self,
        checkpoints: list[tuple[int, int, bytes, str]],
        above: int,
        need: int | None,
        anchor: int,
    ) -> dict[int, bytes]:
        """Rehash the entries after the frontier's, checking every stored checkpoint of a size
        above `above` on the way, and keeping the tree at `anchor` entries as the anchor;
        (size -> root) at the checkpointed sizes and at `need`."""
        wanted = {size: root for _, size, root, _ in checkpoints if size > above}
        roots: dict[int, bytes] = {}
        if self.frontier.size == anchor:
            self._anchor = self._here()
        # a ledger from before the GPU window index: fill it on the way (card -> node, window)
        index: dict[str, tuple[str, Window]] | None = {} if not self.record.indexed() else None
        for row_id, _, body, leaf in self.record.entries(self._last_id or None):
            computed = leaf_hash(body)
            if computed != leaf and not self.broken:
                self.broken = f"entry {row_id}'s bytes no longer give its leaf hash: it was altered"
            self.frontier.append(computed)
            self._last_id, self._last_leaf = row_id, computed
            if self.frontier.size == anchor:
                self._anchor = self._here()
            root = wanted.pop(self.frontier.size, None)
            if root is not None:
                roots[self.frontier.size] = self.frontier.root()
                if root != roots[self.frontier.size] and not self.broken:
                    self.broken = (
                        f"the entries no longer give the root signed at size {self.frontier.size}"
                    )
            if self.frontier.size == need:
                roots[need] = self.frontier.root()
            if index is not None:
                opened = _windows(body)
                if opened is not None:
                    node, summary = opened
                    start, end = summary.window_start_unix_nano, summary.window_end_unix_nano
                    for gpu in summary.gpus:
                        key = card(gpu.uuid)
                        held = index.get(key)
                        covered = gpu.present_seconds + gpu.lost_seconds
                        window = next_window(
                            held[1] if held else None, start, end, covered, gpu.energy_joules
                        )
                        if window is not None:  # an overlap is the auditor's finding
                            index[key] = (node, window)
        if index:
            self.record.index_windows(
                [(key, node, *window) for key, (node, window) in index.items()]
            )
        wanted.pop(0, None)
        if wanted and not self.broken:
            self.broken = f"checkpoints sign sizes the record does not reach: {sorted(wanted)}"
        return roots

    def _check_root(self, remembered: Remembered, roots: dict[int, bytes]) -> None:
        if self.frontier.size < remembered.size:
            self._lost(self.frontier.size, remembered.size)
        if roots.get(remembered.size) != remembered.root:
            raise LedgerStartError(
                f"{self._where()}: the ledger's first {remembered.size:,} entries do not give "
                "the root signed for them: it was altered or replaced; restore the original ledger"
            )

    def _restore_checkpoint(
        self, remembered: Remembered, checkpoints: list[tuple[int, int, bytes, str]]
    ) -> None:
        if remembered.note not in {note for *_, note in checkpoints}:
            # signed and remembered, but the ledger lost it (the crash came between the two
            # writes, or with the WAL): it goes back in, so that auditors see it too
            self.record.add_checkpoint(
                remembered.size, remembered.root, remembered.note, time.time()
            )
            self.last_size = max(self.last_size, remembered.size)
            self._newest_note = remembered.note

    def check_history(self, stop: threading.Event | None = None) -> bool:
        """Rehash the entries the start took on trust (those under the remembered checkpoint),
        on a connection of its own, while the collector runs; damage found stops intake as at
        start. True when the whole history held (or there was none to check)."""
        history = self.history
        if history is None:
            return True
        try:
            reader = self.record.reader()
        except RecordError as error:
            return self._history_unchecked(error)
        frontier = Frontier()
        try:
            wanted = {s: root for _, s, root, _ in reader.checkpoints() if s <= history.size}
            wanted[history.size] = history.root
            for row_id, _, body, leaf in reader.entries():
                if row_id > history.last_id or (stop is not None and stop.is_set()):
                    break
                computed = leaf_hash(body)
                if computed != leaf:
                    self.fail(
                        f"entry {row_id}'s bytes no longer give its leaf hash: it was altered"
                    )
                    return False
                frontier.append(computed)
                self.history_checked = frontier.size
                root = wanted.get(frontier.size)
                if root is not None and root != frontier.root():
                    self.fail(f"the entries no longer give the root signed at size {frontier.size}")
                    return False
        except RecordError as error:
            return self._history_unchecked(error)
        finally:
            reader.close()
        if stop is not None and stop.is_set():
            return True  # stopped before the end: nothing found, nothing concluded
        if frontier.size != history.size:
            self.fail(
                f"the ledger holds {frontier.size:,} entries up to entry {history.last_id}, "
                f"the checkpoint signed {history.size:,}: entries were removed"
            )
            return False
        self.history = None
        log.info("ledger history rehashed", extra={"kv": {"entries": frontier.size}})
        return True

    def _history_unchecked(self, error: RecordError) -> bool:
        """The history check stopped on `error`: damage stops intake; a database out of
        reach only leaves the history unchecked (said, and checked at the next start)."""
        if isinstance(error, RecordUnavailableError):
            log.error("ledger history not rehashed", extra={"kv": {"error": str(error)}})
        else:
            self.fail(str(error))
        return False

    def _write_state(self, state: Remembered) -> None:
        """Write the checkpoint state file; the first time, the ledger notes that it has one,
        so that a start that finds it gone is refused instead of starting without it."""
        assert self.latest is not None
        write_latest(self.latest, state)
        if self.record.meta(self._state_key) is None:
            self.record.set_meta(self._state_key, str(self.latest))

    def acknowledge(self, last_id: int) -> None:
        """Entries up to `last_id` are about to be acknowledged: remember that outside the
        ledger (synced), so that a start without them (a lost WAL) is refused rather than
        forgetting what agents were told is safe. A no-op when already remembered."""
        if self.latest is None or (self.state is not None and last_id <= self.state.acknowledged):
            return
        # before the first checkpoint: a state of size 0 that remembers only this
        state = (self.state or Remembered(self.origin, 0, b"", "", 0, [], 0))._replace(
            acknowledged=last_id
        )
        try:
            self._write_state(state)
        except OSError as error:
            self.fail(f"{self.latest}: cannot remember what was acknowledged ({error.strerror})")
            return
        self.state = state

    def fail(self, why: str) -> None:
        """Stop signing (and so recording): the ledger cannot be extended consistently."""
        if not self.broken:
            self.broken = why
            log.error(
                "ledger damaged: no checkpoint is signed and no summary acknowledged",
                extra={"kv": {"why": why}},
            )

    @property
    def last_note(self) -> str:
        """The newest checkpoint, for the witnesses: "" on a shard that does not sign now
        (the signer gives them each checkpoint, once)."""
        return self._newest_note if self.signing else ""

    def _here(self) -> tuple[Frontier, int, bytes]:
        return self.frontier.copy(), self._last_id, self._last_leaf

    def _reset(self) -> None:
        """Back to the tree at the newest checkpoint known."""
        frontier, self._last_id, self._last_leaf = self._anchor
        self.frontier = frontier.copy()

    def _extend(self, size: int | None = None) -> None:
        """Add the entries after the frontier's last to it (up to `size` entries in all),
        rehashing their bytes."""
        if size is not None and self.frontier.size >= size:
            return
        # ids are gap-free: the entry after the one before ours is ours, unless it is gone
        if self._last_leaf and self.record.leaves(self._last_id - 1, 1) != [self._last_leaf]:
            self.fail(
                f"entry {self._last_id}, which the log's tree covers, is gone from the ledger "
                "or was replaced: it was rolled back or rewritten"
            )
            return
        for row_id, _, body, leaf in self.record.entries(self._last_id or None):
            computed = leaf_hash(body)
            if computed != leaf:
                self.fail(f"entry {row_id}'s bytes no longer give its leaf hash")
            self.frontier.append(computed)
            self._last_id, self._last_leaf = row_id, computed
            if self.frontier.size == size:
                return

    def _keep(self, note: str) -> None:
        """Remember the checkpoint `note` of the tree at the frontier outside the ledger
        (synced), with what was acknowledged; OSError when it cannot be written."""
        if self.latest is None:
            return
        state = _remember(self.origin, self.frontier, self._last_id, note)
        if self.state is not None:
            state = state._replace(acknowledged=max(state.acknowledged, self.state.acknowledged))
        self._write_state(state)
        self.state = state

    def _follow(self) -> None:
        """Check each checkpoint stored since the last one seen (another shard's, on a shared
        ledger) against the tree of the entries, and take it as the anchor: its note must be
        this log's, signed by its key, and give the root of the first `size` entries. The
        newest is remembered outside the ledger, as if signed here: a shard that never signs
        still refuses, at its next start, a ledger rolled back below what it saw (and starts
        from that checkpoint's frontier, not from the first entry)."""
        checked = ""  # the newest checkpoint checked here, at the frontier
        for row_id, size, root, note in self.record.checkpoints(self._seen):
            self._seen = row_id
            if size < self.frontier.size:
                self._reset()
            if size < self.frontier.size:
                self.fail(
                    f"a checkpoint of {size:,} entries was stored after one of "
                    f"{self.frontier.size:,}: signed out of turn"
                )
                return
            try:
                signed = open_note(note, self.name, public_bytes(self.key))
            except CheckpointError as error:
                self.fail(f"the checkpoint stored for size {size} is not this log's ({error})")
                return
            self._extend(size)
            if self.broken:
                return
            if self.frontier.size < size:
                self.fail(f"a checkpoint signs {size:,} entries, the record holds fewer")
                return
            if signed != (self.origin, size, root) or self.frontier.root() != root:
                self.fail(f"the entries no longer give the root signed at size {size}")
                return
            self._anchor = self._here()
            self.last_size, self._newest_note = size, note
            checked = note
        if checked and (self.state is None or self.state.size < self.frontier.size):
            try:
                self._keep(checked)
            except OSError as error:
                self.fail(f"{self.latest}: cannot remember the checkpoint ({error.strerror})")

    def checkpoint(self, now: float) -> bool:
        """Sign a checkpoint if the log grew, remember it outside the ledger (synced), then
        store it. Never signs an inconsistent one. On a shared ledger, first take (or keep)
        the signing role, and check the checkpoints other shards stored; a shard that does
        not sign only checks them (and returns False)."""
        with self._lock:
            signing = self.record.signer()
            if self.signing and not signing:
                log.warning("no longer signing the ledger's checkpoints: another shard may")
                self._reset()
            self.signing = signing
            try:
                self._follow()
                if signing and not self.broken:
                    self._extend()
            except RecordUnavailableError as error:
                raise CheckpointError(str(error)) from None
            except RecordError as error:
                self.fail(str(error))
            if self.broken:
                raise CheckpointError(self.broken)
            if not signing or self.frontier.size <= self.last_size:
                return False
            root = self.frontier.root()
            note = sign_note(
                checkpoint_text(self.origin, self.frontier.size, root), self.name, self.key
            )
            try:
                self._keep(note)
            except OSError as error:
                # not remembered, so not given: an unremembered checkpoint is a fork waiting
                raise CheckpointError(
                    f"{self.latest}: cannot remember the checkpoint ({error.strerror})"
                ) from None
            try:
                self.record.add_checkpoint(self.frontier.size, root, note, now)
                self.record.add_frontier(self.frontier.size, self._last_id, self.frontier.peaks())
            except SigningLostError as error:
                # remembered but (perhaps) not stored: the next signer's checkpoints cover at
                # least its entries, and _follow checks them (or it, if it was stored)
                self.signing = False
                self._reset()
                raise CheckpointError(str(error)) from None
            except RecordError as error:
                self.fail(str(error))
                raise CheckpointError(str(error)) from None
            self.last_size, self._newest_note = self.frontier.size, note
            self._anchor = self._here()
            self.record.sync()
            return True

    def consistency(self, old: int, new: int) -> list[bytes]:
        """The RFC 9162 consistency proof from the log's first `old` entries to its first
        `new` (both checkpointed sizes, old <= new), for a witness. From the frontier kept at
        `old`, it reads only the entries added since; for a size checkpointed before frontiers
        were kept, every leaf up to `new`. Leaf hashes are the stored ones, which every
        checkpoint rehashed before signing. ValueError when the log does not reach `new`."""
        if old == 0 or old == new:
            return []
        kept = self.record.frontier_at(old)
        if kept is not None:
            last_id, peaks = kept
            added = self.record.leaves(last_id, new - old)
            if len(added) != new - old:
                raise ValueError(f"the ledger does not reach {new:,} entries")
            return consistency_proof_extending(old, peaks, added)
        leaves = self.record.leaves(0, new)
        if len(leaves) != new:
            raise ValueError(f"the ledger does not reach {new:,} entries")
        return consistency_proof(leaves, old)
