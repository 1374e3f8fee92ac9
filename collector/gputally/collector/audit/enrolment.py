"""Enrolment records: which key and which GPUs the auditor saw on each node, and when.

A node's `.pub` file says which key speaks for it, but the operator writes that file, and it
carries no date: an auditor who arrives after acceptance inherits whatever keys it holds. An
enrolment record is the auditor's own statement, made at acceptance (docs/enrolment.md), one
per node and key: a C2SP signed note, signed by an enrolment key the auditor keeps offline,

    gputally enrolment v1
    node <node>
    key <base64 of the node's 32-byte Ed25519 public key>
    fingerprint SHA256:<hex SHA-256 of the key>
    enrolled <RFC 3339 UTC time, in seconds>
    gpu <uuid> <serial, or "-" when the GPU has none>      (one line per GPU, sorted by uuid)

    — <enrolment key name> <base64 of key id and Ed25519 signature>

in a directory of its own (`enrolment/`, beside the ledger), one file per record, named
`<node>.<first 16 hex digits of the fingerprint>.<date, YYYYMMDDTHHMMSSZ>.enrol`. A node keeps
every record it ever had (a rotated key, a replaced GPU: a new record, the old one stays).
Parsing is strict: a record is read only when writing it again gives back the same bytes.

`audit verify --enrolment DIR --enrolment-key VKEY` checks every key that signed summaries,
and every GPU they name, against these records (`Enrolment.check`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.cli.options import FAILED, TIMES, fail, parse_time
from gputally.v1.accounting import card, uuid_problem
from gputally.v1.signing import (
    PUBLIC_KEY_BYTES,
    KeyFileError,
    decode_public_key,
    encode_public_key,
    key_fingerprint,
    load_or_create_private_key,
    public_bytes,
    write_file,
)

from ..record.keys import read_public_keys
from ..record.ledger import (
    CheckpointError,
    NoSignatureError,
    check_origin,
    open_signed_text,
    parse_verifier_key,
    sign_note,
    verifier_key,
)

HEADER = "gputally enrolment v1"
SUFFIX = ".enrol"
NO_SERIAL = "-"  # a GPU that reports no serial
MAX_NODE_NAME = 250  # as the collector accepts (live/validate.py): <node>.pub must be a file name
SHORT_HEX = 16  # fingerprint digits in file names and findings: 64 bits, unambiguous in practice

# What Enrolment.check reports, gravest first.
NOT_ENROLLED = "not enrolled"
RECORD_INVALID = "record invalid"
ENROLLED_LATE = "enrolled late"
GPU_NOT_ENROLLED = "gpu not enrolled"
# An enrolled GPU that no summary of its node names: gone, replaced (perhaps by one that is
# `gpu not enrolled`), or its node never reported.
GPU_NOT_SEEN = "enrolled gpu not seen"
KINDS = (NOT_ENROLLED, RECORD_INVALID, ENROLLED_LATE, GPU_NOT_ENROLLED, GPU_NOT_SEEN)

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_EARLIEST, _LATEST = 0, int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())


class EnrolmentError(ValueError):
    """An enrolment directory, key or input that cannot be used; the message (one line) says why."""


class InvalidRecordError(EnrolmentError):
    """A record that does not parse, is not canonical, or does not verify."""


# -- the record ------------------------------------------------------------------------------


def node_problem(node: str) -> str:
    """Why `node` cannot name an enrolled node ("" when it can): what the collector accepts
    in a hello, and what can name a `<node>.pub` file."""
    if not node:
        return "the node name is empty"
    if (
        len(node.encode()) > MAX_NODE_NAME
        or not node.isprintable()
        or any(c.isspace() for c in node)
        or "/" in node
        or node.startswith(".")
    ):
        return (
            f"the node name {node[:40]!r} is not a printable name without spaces or '/', not "
            f"starting with '.', of at most {MAX_NODE_NAME} bytes"
        )
    return ""


def format_time(moment: float) -> str:
    """RFC 3339, UTC, whole seconds (rounded down): 2026-03-01T08:00:00Z."""
    try:
        d = datetime.fromtimestamp(int(moment // 1), UTC)
    except (OverflowError, OSError, ValueError):  # beyond what a date can name
        return f"{moment:.0f} (unix seconds)"
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}Z"


def short_fingerprint(public_key: bytes) -> str:
    """`SHA256:` and the fingerprint's first 16 hex digits: how findings name a key."""
    return key_fingerprint(public_key)[: len("SHA256:") + SHORT_HEX]


@dataclass(frozen=True, slots=True)
class EnrolledGpu:
    uuid: str
    serial: str | None  # None: the GPU reported no serial

    def __post_init__(self) -> None:
        problem = uuid_problem(self.uuid)
        if problem:
            raise InvalidRecordError(f"a GPU {problem}")
        if self.serial is not None and (
            self.serial == NO_SERIAL or not self.serial or uuid_problem(self.serial)
        ):
            raise InvalidRecordError(
                f"GPU {self.uuid}: the serial {self.serial[:40]!r} is not one (printable, "
                f"no spaces, not {NO_SERIAL!r})"
            )


@dataclass(frozen=True, slots=True)
class EnrolmentRecord:
    """One node's key and GPUs as the auditor enrolled them. Construct with `create`, which
    sorts; the constructor itself accepts only the canonical form."""

    node: str
    public_key: bytes
    enrolled: int  # unix seconds, UTC
    gpus: tuple[EnrolledGpu, ...]  # sorted by uuid, no card twice

    def __post_init__(self) -> None:
        problem = node_problem(self.node)
        if problem:
            raise InvalidRecordError(problem)
        if len(self.public_key) != PUBLIC_KEY_BYTES:
            raise InvalidRecordError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes")
        if not _EARLIEST <= self.enrolled <= _LATEST:
            raise InvalidRecordError("the enrolment date is not between 1970 and the year 9999")
        uuids = [gpu.uuid for gpu in self.gpus]
        if uuids != sorted(uuids):
            raise InvalidRecordError("the GPUs are not sorted by UUID")
        cards = [card(uuid) for uuid in uuids]
        if len(set(cards)) != len(cards):
            raise InvalidRecordError("a GPU UUID is listed twice")
        serials = [card(gpu.serial) for gpu in self.gpus if gpu.serial is not None]
        if len(set(serials)) != len(serials):
            raise InvalidRecordError("a GPU serial is listed twice")

    @classmethod
    def create(
        cls,
        node: str,
        public_key: bytes,
        enrolled: float,
        gpus: Iterable[tuple[str, str | None]],
    ) -> EnrolmentRecord:
        """A record from (uuid, serial) pairs in any order (a serial "", "-" or None: none),
        the time rounded down to the second; InvalidRecordError when it cannot be one."""
        listed = [
            EnrolledGpu(uuid, serial if serial and serial != NO_SERIAL else None)
            for uuid, serial in gpus
        ]
        listed.sort(key=lambda gpu: gpu.uuid)
        return cls(node, public_key, int(enrolled // 1), tuple(listed))

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    @property
    def file_name(self) -> str:
        digits = self.fingerprint.removeprefix("SHA256:")[:SHORT_HEX]
        date = format_time(self.enrolled).replace("-", "").replace(":", "")
        return f"{self.node}.{digits}.{date}{SUFFIX}"


def serialise_record(record: EnrolmentRecord) -> str:
    """The record's text, the part of the note that is signed."""
    lines = [
        HEADER,
        f"node {record.node}",
        f"key {encode_public_key(record.public_key)}",
        f"fingerprint {record.fingerprint}",
        f"enrolled {format_time(record.enrolled)}",
        *(f"gpu {gpu.uuid} {gpu.serial or NO_SERIAL}" for gpu in record.gpus),
    ]
    return "".join(line + "\n" for line in lines)


def _field(lines: list[str], number: int, word: str) -> str:
    if len(lines) < number:
        raise InvalidRecordError(f"line {number}: missing, expected '{word} ...'")
    line = lines[number - 1]
    value = line.removeprefix(word + " ")
    if value == line or not value or " " in value:
        raise InvalidRecordError(f"line {number}: expected '{word} <one word>', got {line[:60]!r}")
    return value


def parse_record(text: str) -> EnrolmentRecord:
    """The record a note's text states; InvalidRecordError saying why when it is not one in
    canonical form (the text must be exactly what `serialise_record` gives)."""
    if not text.endswith("\n"):
        raise InvalidRecordError("the text does not end in a newline")
    lines = text[:-1].split("\n")
    if lines[0] != HEADER:
        raise InvalidRecordError(f"line 1: not {HEADER!r}")
    node = _field(lines, 2, "node")
    key_text = _field(lines, 3, "key")
    try:
        public_key = decode_public_key(key_text, "line 3")
    except KeyFileError as error:
        raise InvalidRecordError(str(error)) from None
    if _field(lines, 4, "fingerprint") != key_fingerprint(public_key):
        raise InvalidRecordError("line 4: the fingerprint is not the key's")
    date = _field(lines, 5, "enrolled")
    if not _DATE.fullmatch(date):
        raise InvalidRecordError(
            f"line 5: {date[:40]!r} is not an RFC 3339 UTC time like 2026-03-01T08:00:00Z"
        )
    try:
        enrolled = datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRecordError(f"line 5: {date!r} is not a date") from None
    gpus: list[EnrolledGpu] = []
    for number, line in enumerate(lines[5:], 6):
        words = line.split(" ")
        if len(words) != 3 or words[0] != "gpu":
            raise InvalidRecordError(
                f"line {number}: expected 'gpu <uuid> <serial or ->', got {line[:60]!r}"
            )
        gpus.append(EnrolledGpu(words[1], None if words[2] == NO_SERIAL else words[2]))
    record = EnrolmentRecord(node, public_key, int(enrolled.timestamp()), tuple(gpus))
    if serialise_record(record) != text:
        raise InvalidRecordError("not in canonical form (written again, it would differ)")
    return record


# -- signed notes ----------------------------------------------------------------------------


def open_signed_note(note: str, name: str, public_key: bytes) -> str:
    """The text of a signed note that the enrolment key `name` signed (ledger.open_signed_text,
    the one home of the signed-note rules); InvalidRecordError otherwise."""
    try:
        return open_signed_text(note, name, public_key)
    except NoSignatureError:
        raise InvalidRecordError(f"no signature by the enrolment key {name}") from None
    except CheckpointError as error:
        raise InvalidRecordError(str(error)) from None


def sign_record(record: EnrolmentRecord, name: str, key: Ed25519PrivateKey) -> str:
    """The record as a signed note, signed by the enrolment key `name`."""
    return sign_note(serialise_record(record), check_origin(name), key)


def open_record(note: str, name: str, public_key: bytes) -> EnrolmentRecord:
    """The record in a signed note, verified; InvalidRecordError saying why otherwise. Only
    the enrolment key's signature may be on it, so that no byte can change unnoticed."""
    record = parse_record(open_signed_note(note, name, public_key))
    if note.rpartition("\n\n")[2].count("\n") != 1:
        raise InvalidRecordError("a record carries one signature, the enrolment key's")
    return record


# -- the directory ---------------------------------------------------------------------------


def read_verifier(verifier: str | Path) -> tuple[str, bytes]:
    """(name, public key) of the enrolment key: a C2SP verifier key line, or a file holding
    one; EnrolmentError otherwise."""
    text = str(verifier).strip()
    try:
        return parse_verifier_key(text)
    except ValueError as line_error:
        path = Path(verifier)
        try:
            content = path.read_text()
        except (OSError, UnicodeDecodeError):
            raise EnrolmentError(
                f"enrolment key {text[:80]}: neither a verifier key ({line_error}) nor a "
                "readable file holding one"
            ) from None
    try:
        return parse_verifier_key(content)
    except ValueError as error:
        raise EnrolmentError(f"{path}: not an enrolment verifier key: {error}") from None


def _node_of(file_name: str) -> str:
    """The node a record's file is named for ("" when its name has not the shape)."""
    parts = file_name.removesuffix(SUFFIX).rsplit(".", 2)
    return parts[0] if len(parts) == 3 and file_name.endswith(SUFFIX) else ""


@dataclass(frozen=True, slots=True)
class EnrolmentFinding:
    kind: str  # one of KINDS
    node: str  # "" when not known (a record whose file name names no node)
    message: str  # one line, naming the node


class Enrolment:
    """The records of an enrolment directory that verify with the enrolment key, and why the
    others do not."""

    def __init__(
        self,
        name: str,
        public_key: bytes,
        records: list[EnrolmentRecord],
        invalid: list[tuple[str, str]] | None = None,
    ):
        self.name = name
        self.public_key = public_key
        self.records = sorted(records, key=lambda r: (r.node, r.enrolled, r.fingerprint))
        self._invalid = list(invalid or [])  # (node from the file name, problem)

    @property
    def problems(self) -> list[str]:
        """One line per record that does not verify or parse, each naming its file."""
        return [problem for _, problem in self._invalid]

    def records_for(self, node: str) -> list[EnrolmentRecord]:
        return [r for r in self.records if r.node == node]

    def check(
        self,
        used: dict[str, set[bytes]],
        gpus: dict[str, set[str]],
        period_start: float | None,
    ) -> list[EnrolmentFinding]:
        """What the ledger's summaries did that the enrolment does not vouch for: `used` maps
        each node to the raw public keys that signed its summaries, `gpus` to the GPU UUIDs
        they name; `period_start` (unix seconds), when given, is when the audited period
        began. Findings come gravest kind first, then by node."""
        first_key: dict[tuple[str, bytes], int] = {}  # (node, key) -> earliest record
        key_nodes: dict[bytes, set[str]] = {}
        first_gpu: dict[tuple[str, str], int] = {}  # (node, card) -> earliest record
        card_nodes: dict[str, set[str]] = {}
        for r in self.records:
            k = (r.node, r.public_key)
            first_key[k] = min(first_key.get(k, r.enrolled), r.enrolled)
            key_nodes.setdefault(r.public_key, set()).add(r.node)
            for gpu in r.gpus:
                g = (r.node, card(gpu.uuid))
                first_gpu[g] = min(first_gpu.get(g, r.enrolled), r.enrolled)
                card_nodes.setdefault(card(gpu.uuid), set()).add(r.node)
        began = "" if period_start is None else format_time(period_start)

        findings: list[EnrolmentFinding] = []
        for node, keys in used.items():
            for key in keys:
                fp = short_fingerprint(key)
                enrolled = first_key.get((node, key))
                if enrolled is None:
                    others = sorted(key_nodes.get(key, set()) - {node})
                    where = f" (it is enrolled for {', '.join(others)})" if others else ""
                    findings.append(
                        EnrolmentFinding(
                            NOT_ENROLLED,
                            node,
                            f"node {node}: key {fp} signed summaries, and no enrolment record "
                            f"of {node} holds it{where}",
                        )
                    )
                elif period_start is not None and enrolled > period_start:
                    findings.append(
                        EnrolmentFinding(
                            ENROLLED_LATE,
                            node,
                            f"node {node}: key {fp} was enrolled {format_time(enrolled)}, "
                            f"after the period began {began}",
                        )
                    )
        for node, uuids in gpus.items():
            for uuid in uuids:
                enrolled = first_gpu.get((node, card(uuid)))
                if enrolled is None:
                    others = sorted(card_nodes.get(card(uuid), set()) - {node})
                    where = f" (it is enrolled for {', '.join(others)})" if others else ""
                    findings.append(
                        EnrolmentFinding(
                            GPU_NOT_ENROLLED,
                            node,
                            f"node {node}: GPU {uuid} appears in its summaries, and no "
                            f"enrolment record of {node} lists it{where}",
                        )
                    )
                elif period_start is not None and enrolled > period_start:
                    findings.append(
                        EnrolmentFinding(
                            ENROLLED_LATE,
                            node,
                            f"node {node}: GPU {uuid} was first enrolled "
                            f"{format_time(enrolled)}, after the period began {began}",
                        )
                    )
        seen_cards = {(node, card(uuid)) for node, uuids in gpus.items() for uuid in uuids}
        shown: set[tuple[str, str]] = set()
        for r in self.records:
            for gpu in r.gpus:
                g = (r.node, card(gpu.uuid))
                if g not in seen_cards and g not in shown:
                    shown.add(g)
                    findings.append(
                        EnrolmentFinding(
                            GPU_NOT_SEEN,
                            r.node,
                            f"node {r.node}: GPU {gpu.uuid}, enrolled {format_time(first_gpu[g])}, "
                            "appears in none of its summaries",
                        )
                    )
        findings.extend(EnrolmentFinding(RECORD_INVALID, n, p) for n, p in self._invalid)
        findings.sort(key=lambda f: (KINDS.index(f.kind), f.node, f.message))
        return findings


def read_record_file(path: Path, name: str, public_key: bytes) -> EnrolmentRecord:
    """One record file, verified and named for its record; InvalidRecordError naming the file."""
    try:
        note = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise InvalidRecordError(f"{path}: cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise InvalidRecordError(f"{path}: not UTF-8 text") from None
    try:
        record = open_record(note, name, public_key)
    except InvalidRecordError as error:
        raise InvalidRecordError(f"{path}: {error}") from None
    if path.name != record.file_name:
        raise InvalidRecordError(
            f"{path}: the record it holds is named {record.file_name} (node {record.node}, "
            f"key {short_fingerprint(record.public_key)})"
        )
    return record


def load_enrolment(directory: Path, verifier: str | Path) -> Enrolment:
    """Every `*.enrol` record in `directory`, verified with the enrolment key (`verifier`: a
    verifier key line, or a file holding one). A record that does not verify or parse is a
    problem of the result, not an error; EnrolmentError when the key or the directory cannot
    be used (missing, unreadable, no record at all)."""
    name, public_key = read_verifier(verifier)
    directory = Path(directory)
    if not directory.is_dir():
        raise EnrolmentError(f"{directory}: no such enrolment directory")
    try:
        paths = sorted(directory.glob("*" + SUFFIX))
    except OSError as error:
        raise EnrolmentError(f"{directory}: cannot be read ({error.strerror or error})") from None
    if not paths:
        raise EnrolmentError(f"{directory}: no enrolment record (*{SUFFIX}) in it")
    records: list[EnrolmentRecord] = []
    invalid: list[tuple[str, str]] = []
    for path in paths:
        try:
            records.append(read_record_file(path, name, public_key))
        except InvalidRecordError as error:
            invalid.append((_node_of(path.name), str(error)))
    return Enrolment(name, public_key, records, invalid)


def write_record(directory: Path, note: str, record: EnrolmentRecord) -> Path:
    """Write a signed record into `directory` (created if need be); never over another."""
    path = Path(directory) / record.file_name
    if path.exists():
        raise EnrolmentError(f"{path}: exists already (one record per node, key and second)")
    write_file(path, note.encode(), mode=0o644)
    return path


# -- reading what the auditor collected ------------------------------------------------------


def read_inventory(text: str, where: str) -> tuple[str, list[tuple[str, str | None]], str]:
    """(node, [(uuid, serial)], backend) from what `gputally agent --once --json` printed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise EnrolmentError(f"{where}: not JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("node"), str):
        raise EnrolmentError(f"{where}: not what `gputally agent --once --json` prints (no node)")
    listed = data.get("gpus")
    if not isinstance(listed, list):
        raise EnrolmentError(f"{where}: not what `gputally agent --once --json` prints (no gpus)")
    gpus: list[tuple[str, str | None]] = []
    for i, gpu in enumerate(listed):
        if not (
            isinstance(gpu, dict)
            and isinstance(gpu.get("uuid"), str)
            and isinstance(gpu.get("serial", ""), str)
        ):
            raise EnrolmentError(f"{where}: gpus[{i}] has no uuid and serial")
        gpus.append((gpu["uuid"], gpu.get("serial") or None))
    return data["node"], gpus, str(data.get("backend", ""))


def read_node_key(value: str) -> bytes:
    """A node's public key: a `<node>.pub` file (its last line, the current key) or base64."""
    path = Path(value)
    if path.is_file():
        try:
            return read_public_keys(path.read_text(), str(path))[-1]
        except (OSError, UnicodeDecodeError) as error:
            raise EnrolmentError(f"--public-key {path}: cannot be read ({error})") from None
        except KeyFileError as error:
            raise EnrolmentError(f"--public-key {error}") from None
    try:
        return decode_public_key(value, "--public-key")
    except KeyFileError as error:
        raise EnrolmentError(f"{error}, and no file of that name") from None


def _gpu_option(text: str) -> tuple[str, str | None]:
    uuid, _, serial = text.partition(":")
    return uuid, serial or None


# -- commands --------------------------------------------------------------------------------

PROCEDURE = (
    "Enrolment is a witnessed act: the auditor holds the enrolment key (offline), and at "
    "acceptance, before the audited period, signs one record per node of the key and the GPUs "
    "seen on it (`gputally agent --once --json` and the node's .pub, collected with the "
    "operator). `audit verify --enrolment DIR --enrolment-key VKEY` then reports every key and "
    "GPU the ledger holds that no record vouches for, or that was enrolled after the period "
    "began. See docs/enrolment.md."
)


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    enrolment: argparse.ArgumentParser = sub.add_parser(
        "enrolment",
        help="the auditor's signed enrolment records: each node's key and GPUs, and when",
        description=PROCEDURE,
    )
    commands = enrolment.add_subparsers(
        dest="enrolment_command", metavar="ENROLMENT_COMMAND", required=True
    )
    init = commands.add_parser(
        "init",
        help="create the auditor's enrolment key and its verifier key",
        description="Create the enrolment key (an Ed25519 private key, PKCS#8 PEM, mode 0600) "
        "and write its C2SP verifier key to FILE.vkey and stdout. The auditor keeps FILE offline "
        "and gives the verifier key to the funder. An existing key is never overwritten. "
        + PROCEDURE,
    )
    init.add_argument("--key", required=True, metavar="FILE", help="the private key to create")
    init.add_argument(
        "--name",
        required=True,
        metavar="NAME",
        help="the key's name in signatures: printable ASCII without spaces or '+', "
        "e.g. auditor.example.org/enrolment",
    )
    init.set_defaults(handler=run_init)

    sign = commands.add_parser(
        "sign",
        help="sign one node's enrolment record: its key, its GPUs, the date",
        description="Sign and write one enrolment record: the node's current public key, its "
        "GPUs (UUID and serial) and the date, into DIR as <node>.<fingerprint>.<date>.enrol. "
        "Do it at acceptance, before the period, with what you saw collected on the node. "
        + PROCEDURE,
        epilog=TIMES,
    )
    sign.add_argument("--key", required=True, metavar="FILE", help="the enrolment key (from init)")
    sign.add_argument(
        "--name",
        metavar="NAME",
        help="the enrolment key's name (default: the name in FILE.vkey; given, it must match it)",
    )
    sign.add_argument("--dir", required=True, metavar="DIR", help="the enrolment directory")
    sign.add_argument(
        "--public-key",
        required=True,
        metavar="PATH_OR_BASE64",
        help="the node's key: its <node>.pub file (the last line, its current key) or the "
        "base64 that `gputally agent --print-public-key` prints",
    )
    source = sign.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--inventory",
        metavar="JSON",
        help="a file holding what `gputally agent --once --json` printed on the node ('-': "
        "stdin): the node's name, GPU UUIDs and serials",
    )
    source.add_argument("--node", metavar="NODE", help="the node, its GPUs given by --gpu")
    sign.add_argument(
        "--gpu",
        action="append",
        default=[],
        type=_gpu_option,
        metavar="UUID[:SERIAL]",
        help="with --node: one of its GPUs (repeat for each)",
    )
    sign.add_argument(
        "--at",
        default="now",
        metavar="TIME",
        help="the enrolment date (default: now); RFC 3339 or as below",
    )
    sign.set_defaults(handler=run_sign)

    show = commands.add_parser(
        "show",
        help="list and verify every enrolment record",
        description="List every record of an enrolment directory (node, key fingerprint, date, "
        "GPUs), each verified with the enrolment key. Exits 1 when any record does not verify "
        "or parse. " + PROCEDURE,
    )
    show.add_argument("--dir", required=True, metavar="DIR", help="the enrolment directory")
    show.add_argument(
        "--enrolment-key",
        required=True,
        metavar="VKEY",
        help="the enrolment key's C2SP verifier key, or a file holding it (its FILE.vkey)",
    )
    show.add_argument("--json", action="store_true", help="print JSON, for machines")
    show.set_defaults(handler=run_show)
    return {"enrolment": enrolment}


def _vkey_path(key: Path) -> Path:
    return key.with_name(key.name + ".vkey")


def run_init(args: argparse.Namespace) -> int:
    key_path = Path(args.key)
    try:
        name = check_origin(args.name)
    except ValueError as error:
        return fail("enrolment init", f"--name: {error}")
    if key_path.exists():
        return fail(
            "enrolment init", f"{key_path}: exists already; an enrolment key is never replaced"
        )
    try:
        key = load_or_create_private_key(key_path)
        line = verifier_key(name, public_bytes(key))
        write_file(_vkey_path(key_path), (line + "\n").encode(), mode=0o644)
    except (OSError, KeyFileError) as error:
        return fail("enrolment init", str(error))
    print(line)
    print(
        f"enrolment key: {key_path} (keep it offline); verifier key: {_vkey_path(key_path)}",
        file=sys.stderr,
    )
    return 0


def _signing_key(args: argparse.Namespace) -> tuple[str, Ed25519PrivateKey]:
    key_path = Path(args.key)
    if not key_path.is_file():
        raise EnrolmentError(
            f"--key {key_path}: no such key; create it with `gputally enrolment init`"
        )
    try:
        key = load_or_create_private_key(key_path)
    except (OSError, KeyFileError) as error:
        raise EnrolmentError(str(error)) from None
    vkey = _vkey_path(key_path)
    published: tuple[str, bytes] | None = None
    if vkey.exists():
        published = read_verifier(vkey)
        if published[1] != public_bytes(key):
            raise EnrolmentError(f"{vkey}: the verifier key of another key than {key_path}")
    if args.name is not None:
        name = args.name
    elif published is not None:
        name = published[0]
    else:
        raise EnrolmentError(f"give --name: there is no {vkey} to read the key's name from")
    try:
        check_origin(name)
    except ValueError as error:
        raise EnrolmentError(f"--name: {error}") from None
    if published is not None and name != published[0]:
        raise EnrolmentError(f"--name {name}: {vkey} names this key {published[0]}")
    return name, key


def run_sign(args: argparse.Namespace) -> int:
    command = "enrolment sign"
    try:
        name, key = _signing_key(args)
        public_key = read_node_key(args.public_key)
        if args.inventory is not None:
            if args.gpu:
                raise EnrolmentError("--gpu goes with --node; --inventory lists the GPUs")
            where = "--inventory -" if args.inventory == "-" else f"--inventory {args.inventory}"
            try:
                text = (
                    sys.stdin.read() if args.inventory == "-" else Path(args.inventory).read_text()
                )
            except (OSError, UnicodeDecodeError) as error:
                raise EnrolmentError(f"{where}: cannot be read ({error})") from None
            node, gpus, backend = read_inventory(text, where)
            if backend == "mock":
                print(
                    f"gputally {command}: warning: {where} was read with --backend mock, a "
                    "simulation, not from the node's GPUs",
                    file=sys.stderr,
                )
        else:
            node, gpus = args.node, list(args.gpu)
        source = Path(args.public_key)
        if source.suffix == ".pub" and source.stem != node and source.is_file():
            print(
                f"gputally {command}: warning: --public-key {source} is named for node "
                f"{source.stem}, not {node}",
                file=sys.stderr,
            )
        try:
            at = parse_time(args.at, time.time())
        except ValueError as error:
            raise EnrolmentError(f"--at: {error}") from None
        record = EnrolmentRecord.create(node, public_key, at, gpus)
        path = write_record(Path(args.dir), sign_record(record, name, key), record)
    except EnrolmentError as error:
        return fail(command, str(error))
    except OSError as error:
        return fail(command, f"{args.dir}: {error.strerror or error}")
    if not record.gpus:
        print(
            f"gputally {command}: warning: no GPU listed for {record.node}: every GPU its "
            "summaries name will be a finding",
            file=sys.stderr,
        )
    print(
        f"{record.node} {record.fingerprint} {format_time(record.enrolled)} {len(record.gpus)} GPUs"
    )
    print(path)
    return 0


def run_show(args: argparse.Namespace) -> int:
    try:
        enrolment = load_enrolment(Path(args.dir), args.enrolment_key)
    except EnrolmentError as error:
        return fail("enrolment show", str(error))
    if args.json:
        out = {
            "enrolment_key": verifier_key(enrolment.name, enrolment.public_key),
            "records": [
                {
                    "node": r.node,
                    "fingerprint": r.fingerprint,
                    "key": encode_public_key(r.public_key),
                    "enrolled": format_time(r.enrolled),
                    "gpus": [{"uuid": g.uuid, "serial": g.serial} for g in r.gpus],
                    "file": r.file_name,
                }
                for r in enrolment.records
            ],
            "problems": enrolment.problems,
        }
        print(json.dumps(out, indent=2))
    else:
        for r in enrolment.records:
            print(
                f"{r.node}  {short_fingerprint(r.public_key)}  {format_time(r.enrolled)}  {len(r.gpus)} GPUs"
            )
            for gpu in r.gpus:
                print(f"    {gpu.uuid}  {gpu.serial or NO_SERIAL}")
        for problem in enrolment.problems:
            print(f"INVALID {problem}")
        nodes = len({r.node for r in enrolment.records})
        print(
            f"{len(enrolment.records)} records for {nodes} nodes verify with {enrolment.name}; "
            f"{len(enrolment.problems)} do not"
        )
    return FAILED if enrolment.problems else 0
