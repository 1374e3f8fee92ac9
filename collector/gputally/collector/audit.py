"""The auditor's checks: everything re-verified from the ledger file and the public keys alone.

Nothing here trusts the collector's live state or its computed figures. `verify` walks every
entry in log order and checks, in this order, so that the first problem named is the first bad
entry:

1. the stored leaf hash is the hash of the stored bytes;
2. the summary is signed by the key enrolled for its node, and names that node;
3. the node's chain continues: numbers 1, 2, 3, ... and each summary carries the hash of the
   previous one (a deletion shows as a gap, a replay or a reorder as a number out of turn);

then checks every checkpoint: signed by the collector's key, for the log's origin, and its
root equal to the root of the first `size` entries, recomputed here.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb

from .figures import Rollup, gpu_numbers
from .keys import KeyStore, KeyStoreError, verify
from .ledger import COLLECTOR_KEY_FILE, CheckpointError, open_note
from .merkle import Frontier, leaf_hash
from .record import Record


@dataclass(slots=True)
class Problem:
    entry: int | None  # the ledger entry (id) at fault; None for a checkpoint or the whole log
    message: str


@dataclass(slots=True)
class Verification:
    entries: int = 0
    checkpoints: int = 0
    nodes: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_collector_key(keys: Path) -> tuple[str, bytes]:
    """(name, public key) from the key directory's collector.ckey: the name on one line, then
    the key in base64."""
    path = keys / COLLECTOR_KEY_FILE
    try:
        name, key = path.read_text().split("\n")[:2]
        raw = base64.b64decode(key.strip(), validate=True)
    except (OSError, ValueError) as error:
        raise KeyStoreError(
            f"{path}: the collector's public key is missing or malformed ({error})"
        ) from None
    if len(raw) != 32:
        raise KeyStoreError(f"{path}: not a 32-byte Ed25519 key")
    return name.strip(), raw


# Entries per batch handed to a worker process; below this many in all, no pool is worth it.
_CHUNK = 20_000


Period = tuple[float, float, int]  # start, end, expected GPUs: what a Rollup adds up


def _opened(
    entries: list[tuple[int, str, bytes, bytes]],
    keys: dict[str, list[bytes]],
    period: Period | None = None,
) -> tuple[list[tuple[object, ...]], Rollup | None]:
    """The order-free part of the checks (hashing, parsing, signatures), for a batch of
    entries; runs in worker processes. Per entry: (problem or None, node in body, chain_seq,
    prev_hash, body hash, leaf hash of the stored bytes, which of the node's keys signed it).

    With a period, the batch's figures are also added up here, while every summary is parsed
    anyway: sums do not depend on order, so the workers each roll up their share of the log
    and the main process only merges one partial rollup per batch."""
    out: list[tuple[object, ...]] = []
    rollup = Rollup(*period) if period is not None else None
    for _, node, stored, leaf in entries:
        computed = leaf_hash(stored)
        if leaf != computed:
            out.append(
                (
                    "its stored leaf hash is not the hash of its bytes",
                    "",
                    0,
                    b"",
                    b"",
                    computed,
                    0,
                )
            )
            continue
        try:
            signed = pb.SignedSummary.FromString(stored)
            summary = pb.Summary.FromString(signed.body)
        except DecodeError:
            out.append(("not a signed summary", "", 0, b"", b"", computed, 0))
            continue
        node_keys = keys.get(node) or []
        # Oldest first: a node's entries before a rotation are most of its history.
        signer = next(
            (i for i, key in enumerate(node_keys) if verify(key, signed.body, signed.signature)),
            None,
        )
        if not node_keys:
            problem: str | None = f"node {node} has no enrolled key"
        elif signer is None:
            problem = f"the signature of node {node} does not verify"
        elif summary.node != node:
            problem = f"it is filed under node {node} but names node {summary.node}"
        else:
            problem = None
        out.append(
            (
                problem,
                summary.node,
                summary.chain_seq,
                summary.prev_hash,
                hashlib.sha256(signed.body).digest(),
                computed,
                signer or 0,
            )
        )
        if rollup is not None and problem is None:
            rollup.add(
                node,
                (summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9),
                gpu_numbers(node, summary),
            )
    return out, rollup


def _batches(record: Record) -> Iterator[list[tuple[int, str, bytes, bytes]]]:
    batch: list[tuple[int, str, bytes, bytes]] = []
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
) -> Iterator[
    tuple[list[tuple[int, str, bytes, bytes]], tuple[list[tuple[object, ...]], Rollup | None]]
]:
    """(batch, its results) in log order, with at most two batches per worker in flight, so
    a ledger of any size is never held in memory at once."""
    pending: deque[
        tuple[
            list[tuple[int, str, bytes, bytes]],
            Future[tuple[list[tuple[object, ...]], Rollup | None]],
        ]
    ] = deque()
    for batch in _batches(record):
        if pool is None:
            yield batch, _opened(batch, enrolled, period)
            continue
        pending.append((batch, pool.submit(_opened, batch, enrolled, period)))
        if len(pending) >= 2 * workers:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def verify_ledger(
    ledger: Path,
    keys_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    rollup: Rollup | None = None,
) -> Verification:
    """Verify the ledger; with `rollup`, also add up every verified entry's figures into it,
    in the same pass (a report needs both, and reading the ledger once is what keeps it fast)."""
    result = Verification()
    keys = KeyStore(keys_dir)
    name, collector_key = read_collector_key(keys_dir)
    record = Record(ledger, readonly=True)
    # node -> (last chain_seq, hash of its body, index of the key that signed it)
    chains: dict[str, tuple[int, bytes, int]] = {}
    frontier = Frontier()
    roots: dict[int, bytes] = {}
    checkpoints = record.checkpoints()
    wanted = {size for _, size, _, _ in checkpoints}
    enrolled = {path.stem: keys.keys(path.stem) for path in keys_dir.glob("*.pub")}
    workers = workers if workers is not None else (os.cpu_count() or 1)
    pool = ProcessPoolExecutor(workers) if workers > 1 and record.count() > _CHUNK else None
    try:
        # Signatures are checked out of order, in parallel; chains and the tree, in order, here.
        period = (rollup.start, rollup.end, rollup.expected) if rollup is not None else None
        for batch, (results, partial) in _opened_in_order(record, enrolled, pool, workers, period):
            if rollup is not None and partial is not None:
                rollup.merge(partial)
            for (entry, node, _, _), checked in zip(batch, results, strict=True):
                result.entries += 1
                if progress is not None and result.entries % 100_000 == 0:
                    progress(result.entries)
                problem = _chain(entry, node, checked, chains)
                if problem is not None:
                    result.problems.append(problem)
                result.nodes.add(node)
                frontier.append(checked[5])  # type: ignore[arg-type]
                if frontier.size in wanted:
                    roots[frontier.size] = frontier.root()
        last_size = 0
        for checkpoint_id, size, _, note in checkpoints:
            result.checkpoints += 1
            where = f"checkpoint {checkpoint_id} (size {size})"
            try:
                origin, signed_size, signed_root = open_note(note, name, collector_key)
            except CheckpointError as error:
                result.problems.append(Problem(None, f"{where}: {error}"))
                continue
            if origin != name or signed_size != size:
                result.problems.append(
                    Problem(None, f"{where}: the note says {origin} size {signed_size}")
                )
            elif size < last_size:
                result.problems.append(
                    Problem(None, f"{where}: smaller than an earlier checkpoint ({last_size})")
                )
            elif size not in roots:
                result.problems.append(
                    Problem(None, f"{where}: the ledger has only {frontier.size} entries")
                )
            elif roots[size] != signed_root:
                result.problems.append(
                    Problem(
                        None,
                        f"{where}: the entries do not give the signed root: the log was altered",
                    )
                )
            last_size = max(last_size, size)
        if frontier.size > last_size:
            result.problems.append(
                Problem(
                    None,
                    f"{frontier.size - last_size} entries after the last signed checkpoint are not covered by one",
                )
            )
    finally:
        record.close()
        if pool is not None:
            pool.shutdown()
    result.problems.sort(key=lambda p: (p.entry is None, p.entry or 0))
    return result


def _chain(
    entry: int, node: str, checked: tuple[object, ...], chains: dict[str, tuple[int, bytes, int]]
) -> Problem | None:
    problem, _, seq_value, prev_hash, body_hash, _, signer = checked[:7]
    if problem is not None:
        return Problem(entry, str(problem))
    assert (
        isinstance(seq_value, int)
        and isinstance(prev_hash, bytes)
        and isinstance(body_hash, bytes)
        and isinstance(signer, int)
    )
    last_seq, last_hash, last_signer = chains.get(node, (0, b"", 0))
    if signer < last_signer:
        return Problem(
            entry, f"node {node}'s summary is signed with a key it had retired (key {signer + 1})"
        )
    if signer > last_signer:  # the node's key was rotated: its new key starts a new chain
        last_seq, last_hash = 0, b""
    seq = seq_value
    chains[node] = (max(seq, last_seq), body_hash if seq > last_seq else last_hash, signer)
    if seq <= last_seq:
        return Problem(
            entry, f"node {node}'s summary {seq} comes after {last_seq}: replayed or reordered"
        )
    if seq != last_seq + 1:
        missing = f"{last_seq + 1}" if seq == last_seq + 2 else f"{last_seq + 1}..{seq - 1}"
        return Problem(entry, f"node {node}'s summaries {missing} are missing before {seq}")
    if prev_hash != last_hash:
        return Problem(entry, f"node {node}'s summary {seq} does not chain to summary {last_seq}")
    return None
