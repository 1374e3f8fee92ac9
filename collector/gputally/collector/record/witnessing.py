"""Witnesses: outside parties that cosign the ledger's checkpoints, so that the log the centre
runs cannot be rolled back or forked without it showing.

Two C2SP specifications, written from their text:

* tlog-cosignature: a witness's cosignature is a signed-note signature line over the
  checkpoint's text, `— <witness name> base64(key id || timestamp || Ed25519 signature)`,
  the key id being SHA-256(name, newline, 0x04, key)[:4] and the signed message
  `cosignature/v1\\ntime <timestamp>\\n` followed by the checkpoint's text. It says: at that
  time, the largest consistent tree this witness had seen of the log had this root.
* tlog-witness: the log asks for a cosignature with `POST <prefix>/add-checkpoint`, a body of
  `old <size>`, the consistency proof from that size (one base64 hash per line), an empty line,
  and the signed checkpoint. `old` must be the size the witness last cosigned (409 and that
  size otherwise); a proof that does not verify is a 422.

This module holds the rules both sides share (the witness daemon in `..witness`, the auditor in
`..audit.verify`) and the collector's client, `Witnesses`, which sends each new checkpoint to
every configured witness with a proof from the size that witness last cosigned, and keeps the
cosignatures in the ledger (table `cosignatures`) for auditors.
"""

from __future__ import annotations

import base64
import logging
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gputally.v1 import __version__
from gputally.v1.signing import public_bytes

from .ledger import CheckpointError, key_id, parse_verifier_key, split_note, verifier_key
from .store import Record, RecordError

log = logging.getLogger("gputally.collector.witness")

COSIGNATURE = b"\x04"  # the signed-note algorithm byte of an Ed25519 cosignature (v1)
COSIGNATURE_HEADER = "cosignature/v1\n"
MAX_PROOF_LINES = 63  # tlog-witness: a client never sends more
SIZE_CONTENT_TYPE = "text/x.tlog.size"  # a 409's body: the witness's latest size
MAX_REQUEST_BYTES = 64 * 1024  # an add-checkpoint body: 63 hashes and a note fit many times
# How far a cosignature's time may be from when it was asked for (clocks differ a little).
TIMESTAMP_SLACK = 300


# What Witnesses needs of the ledger: the consistency proof from one size to a larger one
# (Ledger.consistency).
ConsistencyProver = Callable[[int, int], list[bytes]]


class WitnessConfigError(ValueError):
    """A --witnesses file that cannot be used; the message says which line and why."""


class RequestError(ValueError):
    """An add-checkpoint body that is not one (a 400); the message says why."""


# -- cosignatures (C2SP tlog-cosignature v1, Ed25519) -----------------------------------------


def witness_key_text(name: str, public_key: bytes) -> str:
    """The witness's verifier key line, `<name>+<key id>+base64(0x04 || key)`."""
    return verifier_key(name, public_key, COSIGNATURE)


def parse_witness_key(text: str) -> tuple[str, bytes]:
    """(name, key) of a witness verifier key line, or of a file holding one; ValueError."""
    text = text.strip()
    if "+" not in text and Path(text).is_file():
        text = Path(text).read_text().strip()
    return parse_verifier_key(text, COSIGNATURE)


def cosigned_message(text: str, timestamp: int) -> bytes:
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{text}".encode()


def cosign(text: str, name: str, key: Ed25519PrivateKey, timestamp: int) -> str:
    """The cosignature line (with its newline) of a checkpoint's text at `timestamp`."""
    if not 0 <= timestamp < 1 << 63:
        raise ValueError("a cosignature's timestamp is 0 .. 2^63 - 1")
    signature = key.sign(cosigned_message(text, timestamp))
    blob = key_id(name, public_bytes(key), COSIGNATURE) + struct.pack(">Q", timestamp) + signature
    return f"\u2014 {name} {base64.b64encode(blob).decode()}\n"


def _claimed(line: str, name: str, public_key: bytes) -> tuple[bytes, str] | None:
    """(signature blob, its base64) of a line that names this witness key (its name and key
    id); None for another key's line."""
    line = line.rstrip("\n")
    prefix = f"\u2014 {name} "
    if not line.startswith(prefix):
        return None
    encoded = line[len(prefix) :]
    try:
        blob = base64.b64decode(encoded, validate=True)
    except ValueError:
        return None
    if blob[:4] != key_id(name, public_key, COSIGNATURE):
        return None
    return blob, encoded


def claimed_time(line: str, name: str, public_key: bytes) -> int | None:
    """The timestamp a line claims, if it is shaped as this witness key's cosignature; not
    verified (open_cosignature does that)."""
    claimed = _claimed(line, name, public_key)
    if claimed is None or len(claimed[0]) != 4 + 8 + 64:
        return None
    return int(struct.unpack(">Q", claimed[0][4:12])[0])


def open_cosignature(line: str, text: str, name: str, public_key: bytes) -> int | None:
    """The timestamp of `line` when it is a valid cosignature of `text` by this witness key;
    None when the line is another key's (to be ignored, as the spec says); CheckpointError
    when it claims this key (its name and key id) but does not verify."""
    claimed = _claimed(line, name, public_key)
    if claimed is None:
        return None
    blob, encoded = claimed
    if len(blob) != 4 + 8 + 64 or base64.b64encode(blob).decode() != encoded:
        raise CheckpointError(f"the cosignature of {name} is malformed")
    (timestamp,) = struct.unpack(">Q", blob[4:12])
    if timestamp >= 1 << 63:
        raise CheckpointError(f"the cosignature of {name} has an impossible timestamp")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            blob[12:], cosigned_message(text, timestamp)
        )
    except InvalidSignature:
        raise CheckpointError(f"the cosignature of {name} does not verify") from None
    return int(timestamp)


def checkpoint_size(text: str) -> int:
    """The size line of a checkpoint's text (its second line)."""
    lines = text.split("\n")
    if len(lines) < 4 or not lines[1].isdigit() or str(int(lines[1])) != lines[1]:
        raise CheckpointError("a checkpoint's second line is its size, in decimal")
    return int(lines[1])


# -- the add-checkpoint request (C2SP tlog-witness) -------------------------------------------


def add_checkpoint_body(old: int, proof: Sequence[bytes], note: str) -> bytes:
    lines = [f"old {old}\n", *(base64.b64encode(h).decode() + "\n" for h in proof), "\n"]
    return ("".join(lines) + note).encode()


def parse_add_checkpoint(body: bytes) -> tuple[int, list[bytes], str]:
    """(old size, proof, signed checkpoint) of an add-checkpoint body; RequestError."""
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(f"the request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise RequestError("the request is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise RequestError("no empty line between the old size and proof, and the checkpoint")
    lines = head.split("\n")
    first = lines[0]
    number = first[4:]
    if not first.startswith("old ") or not number.isdigit() or str(int(number)) != number:
        raise RequestError("the first line is `old <size>`, in decimal without leading zeroes")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise RequestError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof: list[bytes] = []
    for line in lines[1:]:
        try:
            digest = base64.b64decode(line, validate=True)
        except ValueError:
            raise RequestError("a proof line is not base64") from None
        if len(digest) != 32 or base64.b64encode(digest).decode() != line:
            raise RequestError("a proof line is not a SHA-256 hash in canonical base64")
        proof.append(digest)
    return int(number), proof, note


# -- the collector's client --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Witness:
    name: str
    key: bytes
    url: str  # the submission prefix: add-checkpoint is <url>/add-checkpoint


def read_witnesses(path: Path) -> list[Witness]:
    """The witnesses of a --witnesses file: one per line, `<verifier key> <URL>`, the key as
    the witness publishes it (gputally witness init prints it); # comments. ValueError."""
    try:
        text = path.read_text()
    except OSError as error:
        raise WitnessConfigError(f"--witnesses {path}: {error.strerror or error}") from None
    out: list[Witness] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith(("http://", "https://")):
            raise WitnessConfigError(
                f"--witnesses {path}: line {number}: `<witness verifier key> <http(s) URL>`"
            )
        try:
            name, key = parse_verifier_key(parts[0], COSIGNATURE)
        except ValueError as error:
            raise WitnessConfigError(f"--witnesses {path}: line {number}: {error}") from None
        if any(w.name == name for w in out):
            raise WitnessConfigError(
                f"--witnesses {path}: line {number}: witness {name} named twice"
            )
        out.append(Witness(name, key, parts[1].rstrip("/")))
    return out


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: the answer (3xx) is the witness's, and a failure."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _read_by(answer: object, deadline: float) -> bytes:
    """At most MAX_REQUEST_BYTES of an answer, read before `deadline` (monotonic): a witness
    that trickles its answer byte by byte gets the time of one request, not of each byte."""
    chunks: list[bytes] = []
    got = 0
    read = getattr(answer, "read1", None) or getattr(answer, "read")  # noqa: B009
    while got < MAX_REQUEST_BYTES:
        if time.monotonic() > deadline:
            raise TimeoutError("the witness took longer than --witness-timeout to answer")
        chunk = read(min(4096, MAX_REQUEST_BYTES - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@dataclass(slots=True)
class WitnessStatus:
    """What the collector knows of one witness, for its metrics."""

    size: int = 0  # the largest size it cosigned for us
    cosigned_at: int = 0  # the timestamp of that cosignature
    cosignatures: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count


class Witnesses:
    """Sends each new checkpoint to every witness, concurrently, and keeps the cosignatures.

    A witness that has cosigned a smaller tree of ours answers 409 with its size; the proof is
    made again from there (once). A witness that says it cosigned a LARGER tree than ours has
    seen another history of this log: that is logged as an error and counted, never ignored."""

    def __init__(
        self,
        witnesses: Sequence[Witness],
        record: Record,
        *,
        timeout: float = 10.0,
        ca_file: str = "",
        clock: Callable[[], float] = time.time,
    ):
        self.witnesses = list(witnesses)
        self.record = record
        self.timeout = timeout
        self.clock = clock  # what a cosignature's time is checked against
        self.context = ssl.create_default_context(cafile=ca_file or None)
        self.status = {w.name: WitnessStatus() for w in self.witnesses}
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # witnesses with a request in flight
        # no redirects: a witness's answer comes from the witness (urllib would turn the POST
        # into a GET to wherever it points, and read that answer whole)
        self._opener = urllib.request.build_opener(
            NoRedirect(), urllib.request.HTTPSHandler(context=self.context)
        )
        for size, name, _ in record.cosignatures():
            held = self.status.get(name)
            if held is not None and size > held.size:
                held.size = size

    def behind(self, size: int) -> bool:
        """Whether some witness has not cosigned `size` entries yet."""
        with self._lock:
            return any(held.size < size for held in self.status.values())

    def submit(self, note: str, prove: ConsistencyProver, wait: float | None = None) -> None:
        """Ask every witness that is behind to cosign `note` (the collector's newest
        checkpoint), each on a daemon thread of its own, and wait at most `wait` seconds for
        them (None: until they are done, at most twice the timeout each; 0: not at all).

        A witness whose previous request is still running is not asked again: a slow or
        hostile witness delays only itself, never the checkpoints, the other witnesses, or
        the collector's shutdown."""
        size = checkpoint_size(split_note(note)[0])
        started: list[threading.Thread] = []
        with self._lock:
            for witness in self.witnesses:
                # only those behind: a witness that cosigned this size already is not asked
                if self.status[witness.name].size >= size or witness.name in self._busy:
                    continue
                self._busy.add(witness.name)
                thread = threading.Thread(
                    target=self._submit_logged,
                    args=(witness, note, prove),
                    name=f"witness {witness.name}",
                    daemon=True,
                )
                started.append(thread)
        for thread in started:
            thread.start()
        deadline = time.monotonic() + (2 * self.timeout + 1 if wait is None else wait)
        for thread in started:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _submit_logged(self, witness: Witness, note: str, prove: ConsistencyProver) -> None:
        try:
            self._submit(witness, note, prove)
        except Exception as error:  # a witness's failure must never stop the collector
            self._failed(witness, "error", str(error))
        finally:
            with self._lock:
                self._busy.discard(witness.name)

    def _failed(self, witness: Witness, reason: str, detail: str) -> None:
        with self._lock:
            failures = self.status[witness.name].failures
            failures[reason] = failures.get(reason, 0) + 1
        level = logging.ERROR if reason == "conflict" else logging.WARNING
        log.log(
            level,
            "witness did not cosign",
            extra={"kv": {"witness": witness.name, "reason": reason, "detail": detail}},
        )

    def _submit(self, witness: Witness, note: str, prove: ConsistencyProver) -> None:
        text, _ = split_note(note)
        size = checkpoint_size(text)
        old = min(self.status[witness.name].size, size)
        asked = self.clock()
        for attempt in range(2):
            try:
                proof = prove(old, size)
            except ValueError as error:
                self._failed(witness, "proof", str(error))
                return
            status, body, content_type = self._post(witness, add_checkpoint_body(old, proof, note))
            if status == 200:
                self._keep(witness, text, size, body, asked)
                return
            if status == 409 and content_type.startswith(SIZE_CONTENT_TYPE) and attempt == 0:
                said = body.decode(errors="replace").strip()
                if not (said.isdigit() and str(int(said)) == said and int(said) < 1 << 63):
                    self._failed(witness, "protocol", "a 409 without a size a tree can have")
                    return
                theirs = int(said)
                if theirs > size:
                    self._failed(
                        witness,
                        "conflict",
                        f"the witness cosigned {theirs:,} entries of this log, the ledger signs "
                        f"{size:,}: it has seen another history (a rollback or fork of this log)",
                    )
                    return
                if theirs != old:
                    old = theirs
                    continue
            reason = {409: "conflict", 422: "conflict", 403: "refused", 404: "refused"}
            detail = body.decode(errors="replace").strip()[:200]
            self._failed(witness, reason.get(status, "http"), f"HTTP {status}: {detail}")
            return

    def _post(self, witness: Witness, body: bytes) -> tuple[int, bytes, str]:
        request = urllib.request.Request(
            f"{witness.url}/add-checkpoint",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain", "User-Agent": f"gputally/{__version__}"},
        )
        deadline = time.monotonic() + self.timeout
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                return (
                    answer.status,
                    _read_by(answer, deadline),
                    answer.headers.get("Content-Type", ""),
                )
        except urllib.error.HTTPError as error:
            content_type = error.headers.get("Content-Type", "") if error.headers else ""
            return error.code, _read_by(error, deadline), content_type
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            return 0, str(reason).encode(), ""

    def _keep(self, witness: Witness, text: str, size: int, body: bytes, asked: float) -> None:
        """Keep the first line of the answer that is this witness's valid cosignature, made
        while we asked (its time within TIMESTAMP_SLACK of the request): a time the witness
        could not have signed at (far ahead, or before we asked) would mislead every
        recording delay computed from it."""
        kept = 0
        for line in body.decode(errors="replace").splitlines():
            try:
                timestamp = open_cosignature(line, text, witness.name, witness.key)
            except CheckpointError as error:
                self._failed(witness, "protocol", str(error))
                continue
            if timestamp is None:
                continue  # another key's line: ignored, as the spec says
            if not asked - TIMESTAMP_SLACK <= timestamp <= self.clock() + TIMESTAMP_SLACK:
                self._failed(
                    witness,
                    "protocol",
                    f"a cosignature timestamped {timestamp}, not when it was asked for "
                    f"({int(asked)}): the witness's clock is wrong",
                )
                continue
            if kept:
                continue  # one cosignature per checkpoint and witness is all it can say
            try:
                self.record.add_cosignature(size, witness.name, line + "\n", timestamp)
            except RecordError as error:
                self._failed(witness, "record", str(error))
                return
            kept += 1
            with self._lock:
                held = self.status[witness.name]
                held.cosignatures += 1
                if size >= held.size:
                    held.size, held.cosigned_at = size, timestamp
        if not kept:
            self._failed(witness, "protocol", "a 200 without a valid cosignature by its key")
        else:
            log.info(
                "checkpoint cosigned",
                extra={"kv": {"witness": witness.name, "size": size, "at": int(time.time())}},
            )
