"""The auditor's checks: everything re-verified from the ledger file and the public keys alone.

Nothing here trusts the collector's live state or its computed figures. `verify` walks every
entry in log order and checks, in this order, so that the first problem named is the first bad
entry:

1. the stored leaf hash is the hash of the stored bytes;
2. the summary is signed by the key enrolled for its node, and names that node;
3. the node's chain continues: numbers 1, 2, 3, ... and each summary carries the hash of the
   previous one (a deletion shows as a gap, a replay or a reorder as a number out of turn);

4. the summary is physically possible (accounting.summary_problem: window length, seconds
   within the window, energy a GPU can draw);
5. no GPU's window overlaps an earlier one of the same GPU, from any node (figures.Screen):
   an overlap is a second counted twice, or, across nodes, one card with two identities;

then checks every checkpoint: signed by the collector's key, for the log's origin, and its
root equal to the root of the first `size` entries, recomputed here.

Every problem is a finding of a named kind (KINDS). Integrity findings (signature, chain gap,
rewrite, checkpoint) mean the ledger cannot be trusted, and `audit report` refuses it.
Plausibility findings (overlap, duplicate identity, implausible value) name summaries a
collector should have refused: a report is still made, without them (never silently summed),
and lists them.

Signatures are most of the cost. A full verification can leave a *receipt*: the log's size
and Merkle root, and a digest of the key directory, as they were when every signature held.
A later run given the receipt (`audit report --receipt`) skips the Ed25519 checks of the
entries the receipt covers, for nodes with a single key, and of nothing else: it still
recomputes every leaf hash and the root at the receipt's size, so the receipt vouches only
for bytes identical to those it was made from, under the same keys; a root, size or key
directory that differs makes the run verify everything. Chains and checkpoints are always
checked in full.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import summary_problem
from gputally.v1.signing import chain_hash, key_fingerprint, verify_summary, write_file

from ..record import merkle
from ..record.keys import KeyStore
from ..record.ledger import (
    COLLECTOR_KEY_FILE,
    LEGACY_KEY_FILE,
    CheckpointError,
    checkpoint_text,
    open_note,
    read_collector_key,
    split_note,
)
from ..record.merkle import Frontier, leaf_hash
from ..record.store import Record
from ..record.witnessing import (
    TIMESTAMP_SLACK,
    checkpoint_size,
    claimed_time,
    open_cosignature,
    witness_key_text,
)
from .enrolment import (
    ENROLLED_LATE,
    GPU_NOT_ENROLLED,
    GPU_NOT_SEEN,
    NOT_ENROLLED,
    RECORD_INVALID,
    Enrolment,
)
from .figures import GpuWindows as _Windows
from .figures import Rollup, Screen, countable, gpu_numbers, windows_of

# The kinds of finding, in the order `audit verify` lists them.
SIGNATURE = "signature"  # not signed by the node's enrolled key (or no key, another node's)
CHAIN_GAP = "chain gap"  # a node's summaries missing: deleted, or lost before recording
REWRITE = "rewrite"  # bytes altered, a summary replayed, reordered or not chained
OVERLAP = "overlap"  # a GPU's window overlapping an earlier one of the same node
DUPLICATE_IDENTITY = "duplicate identity"  # one card (UUID) in two nodes' windows at once
IMPLAUSIBLE = "implausible value"  # a summary no GPU could produce
CHECKPOINT = "checkpoint"  # a checkpoint that does not verify or contradicts the entries
# The ledger is shorter than a checkpoint signed before (one kept by the auditor, a witness's,
# a receipt's, or a cosignature the ledger itself keeps): entries were removed after it.
ROLLBACK = "rollback"
FORK = "fork"
# A summary a witness cosigned before its window ended: proof that it was written in
# advance. (By the collector's own checkpoint times, only a claim that contradicts itself:
# counted in the recording figures, recording["early"], and a caveat on every verdict.)
EARLY_WITNESSED = "witnessed before its window ended"  # the ledger's first entries are not those such a checkpoint signed
WITNESS = "witness"  # a cosignature that does not verify, or fewer witnesses than required
# Against the auditor's enrolment records (audit/enrolment.py, docs/enrolment.md): a key that
# signed summaries with no record for its node, and a record that does not verify, mean the
# ledger's authors are not those enrolled; a key or GPU enrolled after the period began, or a
# GPU no record lists, is reported beside the figures.
KINDS = (
    SIGNATURE,
    CHAIN_GAP,
    REWRITE,
    OVERLAP,
    DUPLICATE_IDENTITY,
    IMPLAUSIBLE,
    CHECKPOINT,
    ROLLBACK,
    FORK,
    WITNESS,
    EARLY_WITNESSED,
    NOT_ENROLLED,
    RECORD_INVALID,
    ENROLLED_LATE,
    GPU_NOT_ENROLLED,
    GPU_NOT_SEEN,
)
# Findings after which the ledger's figures cannot be trusted at all.
INTEGRITY = frozenset(
    {
        SIGNATURE,
        CHAIN_GAP,
        REWRITE,
        CHECKPOINT,
        ROLLBACK,
        FORK,
        WITNESS,
        EARLY_WITNESSED,
        NOT_ENROLLED,
        RECORD_INVALID,
    }
)
# Findings the figures count, and that a verdict must not pass over ("Yes, but"): what the
# report says of each.
CAVEATS = {
    GPU_NOT_ENROLLED: "GPU windows of GPUs no enrolment record lists",
    ENROLLED_LATE: "keys or GPUs enrolled after the period began",
}
# Findings whose summaries (or GPUs' windows) are left out of every figure.
UNCOUNTED = frozenset({OVERLAP, DUPLICATE_IDENTITY, IMPLAUSIBLE})
# A summary first recorded (witnessed, else checkpointed) this long after its window ended
# is "late": history written after the fact looks like this (audit verify --late-after).
LATE_AFTER = 6 * 3600.0
EARLY_BEFORE = 300.0


@dataclass(slots=True)
class Problem:
    entry: int | None  # the ledger entry (id) at fault; None for a checkpoint or the whole log
    message: str
    kind: str = REWRITE


@dataclass(slots=True)
class Verification:
    entries: int = 0
    checkpoints: int = 0
    nodes: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    root: bytes = b""  # of all the entries, as recomputed
    keys_digest: str = ""
    origin: str = ""
    trusted: int = 0  # entries whose signatures a receipt vouched for instead of this run
    receipt_note: str = ""  # why a receipt given was not used, if it was not
    # The evidence to cite, beside the figures (audit report's evidence section):
    checkpoint_note: str = ""  # the newest checkpoint, the signed note in full
    # each witness cosignature of the newest cosigned checkpoint: {"witness": name,
    # "key": verifier key, "size": checkpoint size, "time": unix seconds it was cosigned}
    cosignatures: list[dict[str, object]] = field(default_factory=list)
    # how long after their windows the summaries were recorded, see recording_delays()
    recording: dict[str, object] = field(default_factory=dict)
    # node -> fingerprints (signing.key_fingerprint) of the keys that signed its summaries
    signers: dict[str, list[str]] = field(default_factory=dict)
    # entries covered by a checkpoint that at least min_witnesses of the given witnesses
    # cosigned (0 without witness keys); the entries after it rest on the collector alone
    witnessed: int = 0
    # node -> raw public keys that signed its summaries, and node -> GPU UUIDs seen under it
    # (for the enrolment check)
    keys_used: dict[str, set[bytes]] = field(default_factory=dict)
    gpus_seen: dict[str, set[str]] = field(default_factory=dict)
    cosignature_rows: int = 0  # cosignatures the ledger keeps, checked or not
    witness_keys: list[str] = field(default_factory=list)  # the verifier keys given
    # the --against checkpoint: {"size", "root" (base64), "cosigned_at" (newest cosignature
    # by a given witness, 0 if none), "witnesses" (how many given witnesses cosigned it)}
    against: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def trustworthy(self) -> bool:
        """No integrity finding: figures can be computed (without the implausible parts)."""
        return not any(p.kind in INTEGRITY for p in self.problems)

    def by_kind(self) -> dict[str, list[Problem]]:
        """The findings of each kind that occurs, in KINDS order."""
        out: dict[str, list[Problem]] = {}
        for kind in KINDS:
            found = [p for p in self.problems if p.kind == kind]
            if found:
                out[kind] = found
        return out

    def findings(self, examples: int = 3) -> dict[str, object]:
        """Counts and the first examples of each kind, for `--json` and the report."""
        return {
            kind: {
                "count": len(found),
                "examples": [{"entry": p.entry, "message": p.message} for p in found[:examples]],
            }
            for kind, found in self.by_kind().items()
        }


class ReceiptError(ValueError):
    pass


def _size(value: object) -> int:
    """A receipt's size: a whole number of entries, 1 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"size {value!r} is not a number of entries")
    return value


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a full, successful verification saw (see the module's docstring)."""

    origin: str
    size: int
    root: bytes
    keys_digest: str
    verified_at: str

    def dumps(self) -> str:
        return json.dumps(
            {
                "gputally_receipt": 1,
                "origin": self.origin,
                "size": self.size,
                "root": self.root.hex(),
                "keys_digest": self.keys_digest,
                "verified_at": self.verified_at,
            },
            indent=2,
        )

    def write(self, path: Path) -> None:
        write_file(path, (self.dumps() + "\n").encode(), mode=0o644)

    @classmethod
    def load(cls, path: Path) -> Receipt:
        try:
            data = json.loads(path.read_text())
            if data.get("gputally_receipt") != 1:
                raise ValueError("not a gputally receipt (format 1)")
            return cls(
                str(data["origin"]),
                _size(data["size"]),
                bytes.fromhex(data["root"]),
                str(data["keys_digest"]),
                str(data.get("verified_at", "")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as error:
            raise ReceiptError(f"{path}: not a usable receipt ({error})") from None

    @classmethod
    def of(cls, verification: Verification, when: str) -> Receipt:
        if not verification.ok or verification.trusted:
            raise ReceiptError("a receipt is made only by a full verification that holds")
        return cls(
            verification.origin,
            verification.entries,
            verification.root,
            verification.keys_digest,
            when,
        )


def keys_digest(keys: Path) -> str:
    """SHA-256 over the key directory's key files (names and contents): a receipt holds only
    for the keys it was made with."""
    digest = hashlib.sha256()
    for path in sorted([*keys.glob("*.pub"), keys / COLLECTOR_KEY_FILE, keys / LEGACY_KEY_FILE]):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# Entries per batch handed to a worker process; below this many in all, no pool is worth it.
_CHUNK = 20_000


# start, end, expected GPUs, phases: what a Rollup adds up (Rollup.period_of)
Period = tuple[float, float, int, tuple[tuple[str, float, float], ...]]
Entry = tuple[int, str, bytes, bytes]  # (id, node, stored bytes, stored leaf hash)


class Checked(NamedTuple):
    """The order-free checks of one entry, for the in-order checks (chain, tree) to use."""

    problem: str | None
    node: str  # the node the body names
    chain_seq: int
    prev_hash: bytes
    body_hash: bytes
    leaf: bytes  # the leaf hash of the stored bytes, recomputed
    signer: int  # which of the node's keys signed it (oldest first)
    kind: str = REWRITE  # the problem's kind
    # the window (ns) and (card, covered seconds) of each GPU of a summary without problems,
    # screened in log order
    window: tuple[int, int] = (0, 0)
    uuids: tuple[tuple[str, float, float, str], ...] = ()


def _interned(table: dict[_Windows, _Windows], key: _Windows) -> _Windows:
    return table.setdefault(key, key)


def _unreadable(problem: str, leaf: bytes) -> Checked:
    return Checked(problem, "", 0, b"", b"", leaf, 0)


def _opened(
    entries: list[Entry],
    keys: dict[str, list[bytes]],
    period: Period | None = None,
    trusted: int = 0,
) -> tuple[list[Checked], Rollup | None]:
    """The order-free part of the checks (hashing, parsing, signatures), for a batch of
    entries; runs in worker processes.

    With a period, the batch's figures are also added up here, while every summary is parsed
    anyway: sums do not depend on order, so the workers each roll up their share of the log
    and the main process only merges one partial rollup per batch.

    The first `trusted` entries of the batch are covered by a receipt: their signatures are
    not checked again where the node has one key (see the module's docstring)."""
    out: list[Checked] = []
    rollup = Rollup(*period) if period is not None else None
    # A node's GPUs are the same in all its summaries: one tuple each, which pickling back to
    # the main process then sends once per batch, not once per entry.
    uuids: dict[_Windows, _Windows] = {}
    for position, (_, node, stored, leaf) in enumerate(entries):
        computed = leaf_hash(stored)
        if leaf != computed:
            out.append(_unreadable("its stored leaf hash is not the hash of its bytes", computed))
            continue
        try:
            signed = pb.SignedSummary.FromString(stored)
            summary = pb.Summary.FromString(signed.body)
        except DecodeError:
            out.append(_unreadable("not a signed summary", computed))
            continue
        node_keys = keys.get(node) or []
        signer: int | None
        if position < trusted and len(node_keys) == 1:
            signer = 0  # verified with this very key over these very bytes (the receipt)
        else:
            # Oldest first: a node's entries before a rotation are most of its history.
            signer = next(
                (
                    i
                    for i, key in enumerate(node_keys)
                    if verify_summary(key, signed.body, signed.signature)
                ),
                None,
            )
        kind = SIGNATURE
        if not node_keys:
            problem: str | None = f"node {node} has no enrolled key"
        elif signer is None:
            problem = f"the signature of node {node} does not verify"
        elif summary.node != node:
            problem = f"it is filed under node {node} but names node {summary.node}"
        else:
            problem = summary_problem(summary) or None
            kind = IMPLAUSIBLE
        out.append(
            Checked(
                problem,
                summary.node,
                summary.chain_seq,
                summary.prev_hash,
                chain_hash(signed.body),
                computed,
                signer or 0,
                kind,
                (summary.window_start_unix_nano, summary.window_end_unix_nano),
                _interned(uuids, windows_of(summary)) if problem is None else (),
            )
        )
        if rollup is not None and problem is None:
            window = (summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9)
            rollup.add(node, window, gpu_numbers(node, summary), summary.backend)
    return out, rollup


def _batches(record: Record) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for row in record.entries():
        batch.append(row)
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _opened_in_order(
    record: Record,
    enrolled: dict[str, list[bytes]],
    pool: ProcessPoolExecutor | None,
    workers: int,
    period: Period | None,
    trusted: int = 0,
) -> Iterator[tuple[list[Entry], tuple[list[Checked], Rollup | None]]]:
    """(batch, its results) in log order, with at most two batches per worker in flight, so
    a ledger of any size is never held in memory at once."""
    pending: deque[tuple[list[Entry], Future[tuple[list[Checked], Rollup | None]]]] = deque()
    offset = 0
    for batch in _batches(record):
        covered = max(0, min(len(batch), trusted - offset))
        offset += len(batch)
        if pool is None:
            yield batch, _opened(batch, enrolled, period, covered)
            continue
        pending.append((batch, pool.submit(_opened, batch, enrolled, period, covered)))
        if len(pending) >= 2 * workers:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


@dataclass(frozen=True, slots=True)
class Anchors:
    """What the ledger is checked against beyond its own checkpoints: the witnesses' keys
    (name, key), how many of them must have cosigned, and a checkpoint kept outside the
    ledger (`--against`: a witness's latest, or one the auditor or a tenant kept), as text."""

    witness_keys: tuple[tuple[str, bytes], ...] = ()
    min_witnesses: int = 0
    against: str | None = None  # None: not given
    late_after: float = LATE_AFTER
    # the auditor's enrolment records, and when the period began for "enrolled late" (default:
    # the report's --from; none for `audit verify` without --enrolled-by)
    enrolment: Enrolment | None = None
    enrolled_by: float | None = None
    # the --against checkpoint's newest cosignature by a given witness must be this recent
    # (seconds before `now`): a stale checkpoint replayed to the auditor is a witness finding
    max_age: float | None = None
    now: float = 0.0


class AnchorError(ValueError):
    """An --against checkpoint or a witness key that cannot be used; the message says why."""


def verify_ledger(
    ledger: str | Path,
    keys_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    rollup: Rollup | None = None,
    receipt: Receipt | None = None,
    anchors: Anchors = Anchors(),
) -> Verification:
    """Verify the ledger (a SQLite file, or a PostgreSQL URL: the same checks, trusting the
    database no more than the file); with `rollup`, also add up every verified entry's figures
    into it, in the same pass (a report needs both, and reading the ledger once is what keeps
    it fast).
    With `receipt`, the signatures it vouches for are not checked again, if it holds for this
    ledger and these keys; when the ledger turns out not to be the one it was made from, the
    whole verification is run again without trusting it, and the mismatch is a finding (a
    receipt is also an anchor: a ledger shorter than it, or with other first entries, fails).
    `anchors` adds witnesses and an outside checkpoint (see Anchors)."""
    result = _verify(ledger, keys_dir, progress, workers, rollup, receipt, anchors, trust=True)
    if result.trusted and result.root == b"":  # the receipt's root did not come out
        if rollup is not None:
            rollup.clear()
        result = _verify(ledger, keys_dir, progress, workers, rollup, receipt, anchors, trust=False)
        result.receipt_note = (
            "the ledger's first entries are not those the receipt was made from: "
            "every signature was checked"
        )
    return result


class _Claims:
    """When each entry was first recorded, by someone's word: for entry i (0-based), the
    earliest time of a checkpoint (size, time) with size > i."""

    def __init__(self, claims: list[tuple[int, float]]):
        claims = sorted(claims)
        self.sizes = [size for size, _ in claims]
        self.times = [t for _, t in claims]
        for i in range(len(self.times) - 2, -1, -1):  # suffix minimum
            self.times[i] = min(self.times[i], self.times[i + 1])

    def at(self, index: int) -> float | None:
        i = bisect.bisect_right(self.sizes, index)
        return self.times[i] if i < len(self.times) else None


def _verify(
    ledger: str | Path,
    keys_dir: Path,
    progress: Callable[[int], None] | None,
    workers: int | None,
    rollup: Rollup | None,
    receipt: Receipt | None,
    anchors: Anchors,
    *,
    trust: bool,
) -> Verification:
    result = Verification()
    keys = KeyStore(keys_dir)
    name, collector_key = read_collector_key(keys_dir)
    result.origin, result.keys_digest = name, keys_digest(keys_dir)
    record = Record(ledger, readonly=True)
    # node -> (last chain_seq, hash of its body, index of the key that signed it)
    chains: dict[str, tuple[int, bytes, int]] = {}
    frontier = Frontier()
    roots: dict[int, bytes] = {}
    screen = Screen()
    excluded: dict[int, set[str]] = {}  # entry -> GPUs whose windows overlap earlier ones
    signed_with: dict[str, set[int]] = {}  # node -> which of its keys signed its summaries
    checkpoints = record.checkpoints()
    wanted = {size for _, size, _, _ in checkpoints}
    enrolled = {path.stem: keys.keys(path.stem) for path in keys_dir.glob("*.pub")}
    count = record.count()
    # Cosignatures: those the ledger keeps, and those on the --against checkpoint.
    against_or_fork = (
        _against(anchors.against, name, collector_key) if anchors.against is not None else None
    )
    against = against_or_fork if not isinstance(against_or_fork, Problem) else None
    if isinstance(against_or_fork, Problem):
        result.problems.append(against_or_fork)
    cosignatures = record.cosignatures()
    result.cosignature_rows = len(cosignatures)
    if against is not None:
        cosignatures += [(against[1], "", line) for line in against[3]]
    wanted.update(size for size, _, _ in cosignatures)
    if against is not None:
        wanted.add(against[1])
    if receipt is not None:
        wanted.add(receipt.size)
        result.receipt_note = _receipt_unusable(receipt, result, count)
        if not result.receipt_note and trust:
            result.trusted = receipt.size
    # When each entry was recorded: by the witnesses' word (their cosignatures' times), else
    # by the collector's (its checkpoints' times, a claim of its own clock).
    witnessed_times = _Claims(
        [
            (size, float(t))
            for size, _, line in cosignatures
            for witness, key in anchors.witness_keys
            if (t := claimed_time(line, witness, key)) is not None
        ]
    )
    created = record.checkpoint_times()
    claimed_times = _Claims(list(created.items()))
    period = rollup.period_of() if rollup is not None else None
    delays = array("d")
    sources = {"witnessed": 0, "collector": 0, "none": 0}
    workers = workers if workers is not None else (os.cpu_count() or 1)
    pool = ProcessPoolExecutor(workers) if workers > 1 and count > _CHUNK else None
    try:
        # Signatures are checked out of order, in parallel; chains and the tree, in order, here.
        for batch, (results, partial) in _opened_in_order(
            record, enrolled, pool, workers, period, result.trusted
        ):
            if rollup is not None and partial is not None:
                rollup.merge(partial)
            for (entry, node, _, _), checked in zip(batch, results, strict=True):
                index = result.entries
                result.entries += 1
                if progress is not None and result.entries % 100_000 == 0:
                    progress(result.entries)
                if checked.problem is not None and checked.kind == IMPLAUSIBLE:
                    # signed and chained, but impossible: a finding, counted nowhere
                    result.problems.append(Problem(entry, checked.problem, IMPLAUSIBLE))
                    checked = checked._replace(problem=None)
                problem = _chain(entry, node, checked, chains)
                if checked.problem is None:
                    signed_with.setdefault(node, set()).add(checked.signer)
                    seen = result.gpus_seen.setdefault(node, set())
                    seen.update(uuid for *_, uuid in checked.uuids)
                    start_ns, end_ns = checked.window
                    when = witnessed_times.at(index)
                    source = "witnessed"
                    if when is None:
                        when, source = claimed_times.at(index), "collector"
                    if (
                        when is not None
                        and source == "witnessed"
                        and when < end_ns / 1e9 - EARLY_BEFORE
                    ):
                        # the collector's own times saying so are a claim that contradicts
                        # itself (recording["early"]: a caveat); a witness's, a proof
                        result.problems.append(_early(entry, node, when, end_ns))
                    if period is None or (end_ns > period[0] * 1e9 and start_ns < period[1] * 1e9):
                        if when is None:
                            sources["none"] += 1
                        else:
                            sources[source] += 1
                            delays.append(when - end_ns / 1e9)
                if problem is not None:
                    result.problems.append(problem)
                if checked.problem is None:
                    for key, holder, end, uuid in screen.overlapping(
                        node, *checked.window, checked.uuids
                    ):
                        result.problems.append(_overlap(entry, node, uuid, holder, end))
                        excluded.setdefault(entry, set()).add(key)
                result.nodes.add(node)
                frontier.append(checked.leaf)
                if frontier.size in wanted:
                    roots[frontier.size] = frontier.root()
        if result.trusted and (receipt is None or roots.get(result.trusted) != receipt.root):
            return result  # root left empty: verify_ledger runs again, trusting nothing
        result.root = frontier.root()
        if excluded and rollup is not None:
            _add_up_again(record, rollup, excluded)
        result.problems += _check_checkpoints(
            checkpoints, roots, frontier.size, name, collector_key
        )
        result.checkpoints = len(checkpoints)
        result.checkpoint_note = checkpoints[-1][3] if checkpoints else ""
        result.signers = {
            node: [key_fingerprint(enrolled[node][i]) for i in sorted(used)]
            for node, used in sorted(signed_with.items())
        }
        result.keys_used = {
            node: {enrolled[node][i] for i in used} for node, used in signed_with.items()
        }
        if receipt is not None:
            result.problems += _check_receipt(receipt, roots, result)
        if against is not None:
            result.problems += _check_against(against, roots, result.entries)
        result.problems += _check_witnesses(
            cosignatures,
            roots,
            {size: note for _, size, _, note in checkpoints},
            against,
            anchors,
            result,
        )
        result.recording = _recording(delays, sources, anchors.late_after)
        if anchors.enrolment is not None:
            began = anchors.enrolled_by
            if began is None and rollup is not None:
                began = rollup.start
            result.problems += [
                Problem(None, finding.message, finding.kind)
                for finding in anchors.enrolment.check(result.keys_used, result.gpus_seen, began)
            ]
    finally:
        record.close()
        if pool is not None:
            pool.shutdown()
    result.problems.sort(key=lambda p: (p.entry is None, p.entry or 0))
    return result


Against = tuple[str, int, bytes, list[str]]  # origin, size, root, its other signature lines


def _against(note: str, name: str, collector_key: bytes) -> Against | Problem:
    """The --against checkpoint: this log's, signed by its collector key. A signed note that
    is not (another origin, another key: the log the checkpoint's holder knows is not this
    one) is a fork finding; text that is no signed checkpoint at all, an AnchorError."""
    try:
        text, lines = split_note(note)
        checkpoint_size(text)
    except CheckpointError as error:
        raise AnchorError(f"--against: not a signed checkpoint ({error})") from None
    try:
        origin, size, root = open_note(note, name, collector_key)
    except CheckpointError as error:
        first = text.split("\n", 1)[0][:100]
        return Problem(
            None,
            f"the checkpoint given (--against), of {first!r}, is not signed by this ledger's "
            f"collector key for {name} ({error}): it is another log's, or this one's key or "
            "origin was replaced (a fork)",
            FORK,
        )
    prefix = f"\u2014 {name} "
    return origin, size, root, [line + "\n" for line in lines if not line.startswith(prefix)]


def _early(entry: int, node: str, when: float, end_ns: int) -> Problem:
    """A summary a witness cosigned before its window ended: history prepared in advance."""
    ahead = end_ns / 1e9 - when
    return Problem(
        entry,
        f"node {node}'s summary was witnessed {ahead:,.0f} s before its window ended "
        f"({_utc(when)} < {_utc(end_ns / 1e9)}): written in advance, not measured",
        EARLY_WITNESSED,
    )


def _check_receipt(
    receipt: Receipt, roots: dict[int, bytes], result: Verification
) -> list[Problem]:
    if receipt.origin != result.origin:
        return [
            Problem(
                None,
                f"the receipt (verified {receipt.verified_at or 'at an unknown time'}) is for the "
                f"log {receipt.origin}, this ledger is {result.origin}: the log the receipt "
                "vouched for is not this one (a fork, or a renamed origin)",
                FORK,
            )
        ]
    made = f"the receipt (verified {receipt.verified_at or 'at an unknown time'})"
    if receipt.size > result.entries:
        return [
            Problem(
                None,
                f"{made} covers {receipt.size:,} entries, the ledger holds {result.entries:,}: "
                "entries were removed after it was made (a rollback)",
                ROLLBACK,
            )
        ]
    if roots.get(receipt.size) != receipt.root:
        return [
            Problem(
                None,
                f"the ledger's first {receipt.size:,} entries are not those {made} was made "
                "from: they were changed or replaced (a fork)",
                FORK,
            )
        ]
    return []


def _check_against(against: Against, roots: dict[int, bytes], entries: int) -> list[Problem]:
    _, size, root, _ = against
    if size > entries:
        return [
            Problem(
                None,
                f"the checkpoint given (--against) signs {size:,} entries, the ledger holds "
                f"{entries:,}: entries were removed after it was signed (a rollback)",
                ROLLBACK,
            )
        ]
    if roots.get(size) != root:
        return [
            Problem(
                None,
                f"the ledger's first {size:,} entries do not give the root of the checkpoint "
                "given (--against): the log was changed or is another history (a fork)",
                FORK,
            )
        ]
    return []


def _check_witnesses(
    cosignatures: list[tuple[int, str, str]],
    roots: dict[int, bytes],
    notes: dict[int, str],
    against: Against | None,
    anchors: Anchors,
    result: Verification,
) -> list[Problem]:
    """Every cosignature by a given witness key verifies over this log's checkpoint of its
    size (as the entries give it, else as the ledger or --against keeps it); one of more
    entries than the ledger holds is a rollback; and enough witnesses cosigned.

    `cosignatures` are (size, source, line): source "" for a line of the --against
    checkpoint, else the witness name the ledger filed it under (not trusted)."""
    problems: list[Problem] = []
    best: dict[str, tuple[int, int]] = {}  # witness -> (largest size cosigned, its time)
    against_ok: set[str] = set()
    against_newest = 0  # the newest cosignature on the --against checkpoint by a given witness
    for size, source, line in cosignatures:
        for witness, key in anchors.witness_keys:
            claimed = claimed_time(line, witness, key)
            if claimed is None:
                continue
            if source == "" and against is not None:
                text: str | None = checkpoint_text(result.origin, against[1], against[2])
            elif 0 < size <= result.entries and size in roots:
                text = checkpoint_text(result.origin, size, roots[size])
            elif size < 1:
                problems.append(
                    Problem(
                        None,
                        f"the ledger keeps a cosignature by witness {witness} filed under size "
                        f"{size}, which no checkpoint can have: the row was altered",
                        WITNESS,
                    )
                )
                continue
            else:
                text = split_note(notes[size])[0] if size in notes else None
            if text is None:
                problems.append(
                    Problem(
                        None,
                        f"the ledger keeps a cosignature by witness {witness} of a checkpoint of "
                        f"{size:,} entries (at {_utc(claimed)}) but holds {result.entries:,} "
                        "entries and no checkpoint of that size: entries were removed after it "
                        "was witnessed (a rollback)",
                        ROLLBACK,
                    )
                )
                continue
            try:
                timestamp = open_cosignature(line, text, witness, key)
            except CheckpointError:
                problems.append(
                    Problem(
                        None,
                        f"witness {witness}'s cosignature on the checkpoint given (--against) "
                        "does not verify",
                        WITNESS,
                    )
                    if source == ""
                    else Problem(
                        None,
                        f"witness {witness}'s cosignature of size {size:,} is not over the tree "
                        "the ledger's entries give: they were changed after it was witnessed, "
                        "or the line is not the witness's (a fork)",
                        FORK,
                    )
                )
                continue
            if timestamp is None:
                continue
            if anchors.now and timestamp > anchors.now + TIMESTAMP_SLACK:
                problems.append(
                    Problem(
                        None,
                        f"witness {witness}'s cosignature of size {size:,} is dated "
                        f"{_utc(timestamp)}, in the future: its clock is wrong, and no time it "
                        "signs can bound anything (nor pass --max-age)",
                        WITNESS,
                    )
                )
                continue
            if size > result.entries and source != "":
                problems.append(
                    Problem(
                        None,
                        f"witness {witness} cosigned a checkpoint of {size:,} entries (at "
                        f"{_utc(timestamp)}), the ledger holds {result.entries:,}: entries were "
                        "removed after it was witnessed (a rollback)",
                        ROLLBACK,
                    )
                )
            if source == "":
                against_ok.add(witness)
                against_newest = max(against_newest, timestamp)
            held = best.get(witness)
            if held is None or size > held[0]:
                best[witness] = (size, timestamp)
    keys = dict(anchors.witness_keys)
    result.cosignatures = [
        {
            "witness": witness,
            "key": witness_key_text(witness, keys[witness]),
            "size": size,
            "time": timestamp,
        }
        for witness, (size, timestamp) in sorted(best.items())
    ]
    need = anchors.min_witnesses or (1 if anchors.witness_keys else 0)
    sizes = sorted((size for size, _ in best.values()), reverse=True)
    result.witnessed = min(result.entries, sizes[need - 1]) if need and len(sizes) >= need else 0
    result.witness_keys = [witness_key_text(name, key) for name, key in anchors.witness_keys]
    if against is not None:
        result.against = {
            "size": against[1],
            "root": base64.b64encode(against[2]).decode(),
            "cosigned_at": against_newest,
            "witnesses": len(against_ok),
        }
    if anchors.max_age is not None and against is not None:
        age = anchors.now - against_newest
        if not against_ok or age > anchors.max_age:
            when = f"last cosigned {_utc(against_newest)}" if against_ok else "cosigned by none"
            problems.append(
                Problem(
                    None,
                    f"the checkpoint given (--against) was {when} of the given witnesses, more "
                    f"than --max-age ({anchors.max_age:,.0f} s) ago: a stale checkpoint says "
                    "nothing of what came after it",
                    WITNESS,
                )
            )
    if need and anchors.against is not None and len(against_ok) < need:
        problems.append(
            Problem(
                None,
                f"the checkpoint given (--against) is cosigned by {len(against_ok)} of the given "
                f"witnesses; {need} are required (--min-witnesses)",
                WITNESS,
            )
        )
    elif need and len(sizes) < need:
        problems.append(
            Problem(
                None,
                f"{len(sizes)} of the given witnesses cosigned a checkpoint of this ledger; "
                f"{need} are required (--min-witnesses)",
                WITNESS,
            )
        )
    return problems


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _recording(
    delays: array[float], sources: dict[str, int], late_after: float
) -> dict[str, object]:
    """How long after their windows ended the summaries were recorded (see _verify)."""
    ordered = sorted(delays)
    n = len(ordered)

    def quantile(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] if n else 0.0

    if not n:
        source = "none"
    elif sources["collector"] == 0:
        source = "witnessed"
    elif sources["witnessed"] == 0:
        source = "collector"
    else:
        source = "mixed"
    return {
        "source": source,
        "summaries": n,
        "witnessed": sources["witnessed"],
        "claimed": sources["collector"],
        "unrecorded": sources["none"],
        "late_after_s": late_after,
        "late": sum(1 for d in ordered if d > late_after),
        # recorded before its window ended, by more than the collector's default --max-skew:
        # a window stamped in the future, or a recording time set back
        "early": sum(1 for d in ordered if d < -EARLY_BEFORE),
        "median_delay_s": quantile(0.5),
        "p99_delay_s": quantile(0.99),
        "max_delay_s": ordered[-1] if n else 0.0,
    }


def _overlap(entry: int, node: str, uuid: str, holder: str, end: int) -> Problem:
    if holder == node:
        return Problem(
            entry,
            f"node {node}'s window for GPU {uuid} overlaps its earlier one (to {end / 1e9:.0f}): "
            "those seconds would count twice; not added up",
            OVERLAP,
        )
    return Problem(
        entry,
        f"GPU {uuid} is in node {node}'s window and in node {holder}'s (to {end / 1e9:.0f}) at "
        "the same time: one card, two identities; counted once, for the node first recorded",
        DUPLICATE_IDENTITY,
    )


def _add_up_again(record: Record, rollup: Rollup, excluded: dict[int, set[str]]) -> None:
    """The period's figures again, without the GPU summaries that overlap earlier ones: the
    workers added everything up before the overlaps (found in log order) were known. Runs
    only on a ledger with overlaps, which an honest collector never writes."""
    sums = Rollup(*rollup.period_of())
    for entry, node, stored, leaf in record.entries():
        if leaf_hash(stored) != leaf:
            continue
        try:
            summary = pb.Summary.FromString(pb.SignedSummary.FromString(stored).body)
        except DecodeError:
            continue
        skipped = excluded.get(entry, set())
        window = (summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9)
        rollup_numbers = countable(node, summary, [(key, "", 0, "") for key in skipped])
        sums.add(node, window, rollup_numbers, summary.backend)
    rollup.clear()
    rollup.merge(sums)


def _receipt_unusable(receipt: Receipt, result: Verification, count: int) -> str:
    """Why `receipt` cannot vouch for this ledger and these keys; "" when it can."""
    if receipt.origin != result.origin:
        return f"the receipt is for the log {receipt.origin}, not {result.origin}"
    if receipt.keys_digest != result.keys_digest:
        return "the key directory is not the one the receipt was made with"
    if receipt.size > count:
        return f"the receipt covers {receipt.size:,} entries, the ledger holds {count:,}"
    return ""


def _check_checkpoints(
    checkpoints: list[tuple[int, int, bytes, str]],
    roots: dict[int, bytes],
    size: int,
    name: str,
    collector_key: bytes,
) -> list[Problem]:
    """Every checkpoint signed by the collector's key, for this log, growing, and signing the
    root its first `size` entries give (`roots`, recomputed); and none of the log's `size`
    entries left uncovered."""
    problems: list[Problem] = []
    last_size = 0
    for checkpoint_id, signed_for, _, note in checkpoints:
        where = f"checkpoint {checkpoint_id} (size {signed_for})"
        try:
            origin, signed_size, signed_root = open_note(note, name, collector_key)
        except CheckpointError as error:
            problems.append(Problem(None, f"{where}: {error}", CHECKPOINT))
            continue
        if origin != name or signed_size != signed_for:
            problem = f"the note says {origin} size {signed_size}"
        elif signed_for < last_size:
            problem = f"smaller than an earlier checkpoint ({last_size})"
        elif signed_for not in roots:
            problem = f"the ledger has only {size} entries"
        elif roots[signed_for] != signed_root:
            problem = "the entries do not give the signed root: the log was altered"
        else:
            problem = ""
        if problem:
            problems.append(Problem(None, f"{where}: {problem}", CHECKPOINT))
        last_size = max(last_size, signed_for)
    if size > last_size:
        problems.append(
            Problem(
                None,
                f"{size - last_size} entries after the last signed checkpoint are not covered by one",
                CHECKPOINT,
            )
        )
    return problems


def _chain(
    entry: int, node: str, checked: Checked, chains: dict[str, tuple[int, bytes, int]]
) -> Problem | None:
    if checked.problem is not None:
        return Problem(entry, checked.problem, checked.kind)
    signer, seq = checked.signer, checked.chain_seq
    last_seq, last_hash, last_signer = chains.get(node, (0, b"", 0))
    if signer < last_signer:
        return Problem(
            entry,
            f"node {node}'s summary is signed with a key it had retired (key {signer + 1})",
            SIGNATURE,
        )
    if signer > last_signer:  # the node's key was rotated: its new key starts a new chain
        last_seq, last_hash = 0, b""
    chains[node] = (max(seq, last_seq), checked.body_hash if seq > last_seq else last_hash, signer)
    if seq <= last_seq:
        return Problem(
            entry, f"node {node}'s summary {seq} comes after {last_seq}: replayed or reordered"
        )
    if seq != last_seq + 1:
        missing = f"{last_seq + 1}" if seq == last_seq + 2 else f"{last_seq + 1}..{seq - 1}"
        return Problem(
            entry, f"node {node}'s summaries {missing} are missing before {seq}", CHAIN_GAP
        )
    if checked.prev_hash != last_hash:
        return Problem(entry, f"node {node}'s summary {seq} does not chain to summary {last_seq}")
    return None


class ProofRequestError(ValueError):
    """A proof that cannot be given for this ledger; the message says why."""


class ProofRefusedError(ProofRequestError):
    """The ledger does not hold what the checkpoint signs: the answer is no (exit 1)."""


def prove(
    ledger: str | Path,
    keys_dir: Path,
    *,
    entry: int | None = None,
    since: int | None = None,
    checkpoint: str = "",
    node: str = "",
) -> dict[str, object]:
    """RFC 9162 proofs against a signed checkpoint: the ledger's newest, or `checkpoint` (a
    signed note of this log that someone holds: a tenant, a witness's latest), that entry
    `entry` is in the log (inclusion), that every entry of `node` is (inclusions), and that the
    log of `since` entries is a prefix of it (consistency).

    Leaf hashes are recomputed from the entries' bytes, the checkpoint's signature and root
    checked first, and each proof verified before it is given, so that whoever holds the
    checkpoint (or an earlier one, of `since` entries) can check the answer with any RFC 9162
    implementation. Hashes are in base64, as in the checkpoint."""
    name, collector_key = read_collector_key(keys_dir)
    record = Record(ledger, readonly=True)
    try:
        if checkpoint:
            note = checkpoint
        else:
            checkpoints = record.checkpoints()
            if not checkpoints:
                raise ProofRequestError("the ledger has no signed checkpoint to prove against")
            note = checkpoints[-1][3]
        try:
            _, size, root = open_note(note, name, collector_key)
        except CheckpointError as error:
            which = "--checkpoint" if checkpoint else "the newest checkpoint"
            raise ProofRequestError(f"{which}: {error}") from None
        ids: list[int] = []
        nodes: list[str] = []
        leaves: list[bytes] = []
        for row_id, _, stored, _ in record.entries():
            if len(leaves) == size:
                break
            ids.append(row_id)
            nodes.append(_signed_node(stored))  # the node the signed body names
            leaves.append(leaf_hash(stored))
    finally:
        record.close()
    if len(leaves) < size:
        raise ProofRefusedError(
            f"the checkpoint signs {size:,} entries, the ledger holds {len(leaves):,}: it was "
            "rolled back (run `audit verify --against` with this checkpoint)"
        )
    if merkle.root(leaves) != root:
        raise ProofRefusedError(
            f"the ledger's entries do not give the root signed at size {size}: run `audit verify`"
        )
    out: dict[str, object] = {"checkpoint": note, "size": size, "root": _b64(root)}

    def inclusion(index: int) -> dict[str, object]:
        path = merkle.inclusion_proof(leaves, index)
        merkle.verify_inclusion(leaves[index], index, size, path, root)
        return {
            "entry": ids[index],
            "index": index,
            "leaf_hash": _b64(leaves[index]),
            "proof": [_b64(h) for h in path],
        }

    if entry is not None:
        if entry not in ids:
            raise ProofRequestError(f"entry {entry} is not among the {size:,} the checkpoint signs")
        out["inclusion"] = inclusion(ids.index(entry))
    if node:
        mine = [i for i, held in enumerate(nodes) if held == node]
        if not mine:
            raise ProofRequestError(f"node {node} has no entry among the {size:,} signed")
        out["inclusions"] = [inclusion(i) for i in mine]
    if since is not None:
        if not 0 < since <= size:
            raise ProofRequestError(f"--since {since}: the checkpoint signs 1..{size:,} entries")
        older = merkle.root(leaves[:since])
        path = merkle.consistency_proof(leaves, since)
        merkle.verify_consistency(since, size, older, root, path)
        out["consistency"] = {
            "size": since,
            "root": _b64(older),
            "proof": [_b64(h) for h in path],
        }
    return out


def _signed_node(stored: bytes) -> str:
    """The node a stored entry's signed body names ("" when it is no summary): the record's
    node column is no part of the signature."""
    try:
        return pb.Summary.FromString(pb.SignedSummary.FromString(stored).body).node
    except DecodeError:
        return ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
