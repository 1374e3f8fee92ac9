"""Benchmark: how long a collector takes to start on a big ledger, and how that grows.

At start the collector's Ledger rehashes every entry's bytes (the RFC 9162 leaf hash over the
stored body), rebuilds the Merkle frontier, checks every stored checkpoint and the latest one
remembered outside the ledger, and only then serves. This builds one ledger with the project's
own signing (SummarySigner), record (bulk-loaded) and ledger code (a checkpoint signed after
every summary window), grows it through the sizes given by --entries, and at each size times

  start     Ledger(Record(path), key, origin, latest): what the collector runs before serving,
            on a fresh SQLite connection (the operating system's page cache is warm: the file
            was just written, so this is the cold-ish best case of a restart);
  baseline  plain sqlite3 reading every body in log order and hashing it with
            hashlib.sha256 (the same 0x00-prefixed leaf hash), in the same run: the floor
            that any start which rehashes every entry pays on this machine.

Entries are what real agents send: the signed Summary of a node of 8 GPUs over one window,
with identities, every measure, padding totals (a flagged rule on some GPUs, the union of all
rules on every GPU) and a Kubernetes attribution. The table is followed by a linear
extrapolation to 10,000 GPUs over 90 days (1,250 nodes of 8 GPUs): 32.4 million entries with
300 s summary windows, 2.7 million with 3,600 s windows.

    .venv/bin/python benchmarks/ledger_start.py [--entries 20k,100k,300k] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.collector.record.ledger import Ledger
from gputally.collector.record.store import Record
from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb

START = 1_740_787_200  # 2025-03-01T00:00:00Z
ORIGIN = "gputally.example.org/bench"
MODEL = "NVIDIA H100 80GB HBM3"
IDLE_WATTS, LIMIT_WATTS = 70.0, 700.0
TARGET_NODES, TARGET_GPUS_PER_NODE, TARGET_DAYS = 1_250, 8, 90
Row = tuple[str, int, int, int, int, float, bytes]


def count(text: str) -> int:
    """20000, 20_000, 20k or 2.5M."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    value = int(float(text[:-1] if scale > 1 else text) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of entries above 0")
    return value


def sizes(text: str) -> list[int]:
    values = [count(part) for part in text.split(",") if part.strip()]
    if not values or values != sorted(set(values)):
        raise argparse.ArgumentTypeError("sizes in increasing order, e.g. 20k,100k,300k")
    return values


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Node:
    """One simulated agent: its key and chain, its GPUs' identities, their current tenants."""

    def __init__(self, number: int, gpus: int, rng: random.Random):
        self.signer = SummarySigner(Ed25519PrivateKey.generate(), f"gpu-node-{number:04d}")
        self.instance = rng.getrandbits(64)
        self.rng = rng
        self.identities = [
            (
                "GPU-%08x-%04x-%04x-%04x-%012x"  # noqa: UP031 (the NVML UUID layout)
                % tuple(rng.getrandbits(bits) for bits in (32, 16, 16, 16, 48)),
                f"{rng.randrange(10**12, 10**13)}",
            )
            for _ in range(gpus)
        ]
        self.jobs: list[pb.Attribution | None] = [self._job() for _ in range(gpus)]

    def _job(self) -> pb.Attribution | None:
        rng = self.rng
        if rng.random() < 0.08:
            return None  # unallocated
        team = rng.choice(("ml-research", "inference-prod", "vision", "speech", "platform-ci"))
        pod = f"{team}-train-{rng.getrandbits(24):06x}-worker-{rng.randrange(64)}"
        return pb.Attribution(source="kubernetes", tenant=f"team-{team}", job=pod)

    def row(self, number: int, window: int) -> Row:
        rng = self.rng
        t0 = START + number * window
        summary = pb.Summary(
            window_start_unix_nano=t0 * 10**9, window_end_unix_nano=(t0 + window) * 10**9
        )
        for index, (uuid, serial) in enumerate(self.identities):
            if rng.random() < window / 14_400:  # jobs last about four hours
                self.jobs[index] = self._job()
            job = self.jobs[index]
            gpu = summary.gpus.add(index=index, uuid=uuid, serial=serial, model=MODEL)
            gpu.present_seconds = gpu.sm_measured_seconds = float(window)
            gpu.flagged.rule = accounting.ANY_RULE
            if job is None:
                gpu.energy_joules = window * rng.uniform(IDLE_WATTS - 5, IDLE_WATTS + 5)
                continue
            busy = rng.uniform(0.55, 1.0)
            sm = busy * rng.uniform(0.3, 0.9)
            gpu.allocated_seconds = float(window)
            gpu.busy_seconds = busy * window
            gpu.sm_active_seconds = gpu.effective_seconds = sm * window
            gpu.energy_joules = window * (IDLE_WATTS + (LIMIT_WATTS - IDLE_WATTS) * sm)
            gpu.attribution.CopyFrom(job)
            if rng.random() < 0.25:  # a padding rule flagged part of the window
                flagged = rng.uniform(0.1, 1.0) * window
                gpu.padding.add(rule=accounting.BUSY_WITHOUT_WORK, seconds=flagged)
                gpu.flagged.seconds = gpu.flagged.allocated_seconds = flagged
                gpu.flagged.busy_seconds = flagged * rng.uniform(0.9, 1.0)
                gpu.flagged.sm_active_seconds = gpu.flagged.effective_seconds = flagged * 0.05
        signed = self.signer.sign(summary)
        return (
            self.signer.node,
            self.instance,
            (number + 1) * window,  # the report that closed the window (one a second)
            summary.window_start_unix_nano,
            summary.window_end_unix_nano,
            float(t0 + window) + rng.uniform(0.5, 3.0),
            signed.SerializeToString(),
        )


def windows(nodes: list[Node], window: int) -> Iterator[list[Row]]:
    """Every node's summary of window 0, then of window 1, ..."""
    number = 0
    while True:
        yield [node.row(number, window) for node in nodes]
        number += 1


def index_of(rows: list[Row]) -> list[tuple[str, str, int, int, float, float]]:
    """The GPU window index rows of a window's summaries (what the collector keeps)."""
    out = []
    for node, _, _, start, end, _, body in rows:
        summary = pb.Summary.FromString(pb.SignedSummary.FromString(body).body)
        out += [
            (
                accounting.card(g.uuid),
                node,
                start,
                end,
                g.present_seconds + g.lost_seconds,
                g.energy_joules,
            )
            for g in summary.gpus
        ]
    return out


def grow(
    ledger: Ledger, source: Iterator[list[Row]], pending: list[Row], target: int, window: int
) -> tuple[list[Row], int]:
    """Append summaries up to `target` entries, a checkpoint signed after each window; the
    rows of the window cut short (for the next size) and the checkpoints signed."""
    record, have, signed = ledger.record, ledger.frontier.size, 0
    first = have
    began, shown = time.perf_counter(), time.perf_counter()
    last: list[Row] = []
    while have < target:
        rows = pending or next(source)
        take, pending = rows[: target - have], rows[target - have :]
        record.append_many(take)
        have += len(take)
        last = take
        end = take[-1][4] / 1e9
        if ledger.checkpoint(end + 5.0):
            signed += 1
        if time.perf_counter() - shown > 10:
            shown = time.perf_counter()
            log(
                f"  {have:,}/{target:,} entries "
                f"({(have - first) / (shown - began):,.0f} summaries/s generated)"
            )
    if last:
        # the collector keeps each GPU's latest window in an index as it records; bulk loads
        # skip it, so fill it here (else the start would take the path of a ledger written
        # before the index existed, and fill it from every entry)
        record.index_windows(index_of(last))
    return pending, signed


def ledger_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def baseline(db: Path) -> tuple[float, int]:
    """Seconds to read every body with plain sqlite3 and SHA-256 it, and the bytes read."""
    gc.collect()
    began = time.perf_counter()
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    total = 0
    sha256 = hashlib.sha256
    for (body,) in connection.execute("SELECT body FROM summaries ORDER BY id"):
        sha256(b"\x00" + body).digest()
        total += len(body)
    connection.close()
    return time.perf_counter() - began, total


def start(db: Path, key: Ed25519PrivateKey, latest: Path, entries: int) -> tuple[float, Ledger]:
    """Seconds the collector's ledger takes to start on `db`, and the started ledger."""
    gc.collect()
    began = time.perf_counter()
    ledger = Ledger(Record(db), key, ORIGIN, latest)
    elapsed = time.perf_counter() - began
    if ledger.broken or ledger.frontier.size != entries:
        raise SystemExit(
            f"the ledger did not start cleanly: {ledger.broken or ledger.frontier.size}"
        )
    return elapsed, ledger


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--entries",
        type=sizes,
        default=sizes("20k,100k,300k"),
        metavar="N,N,...",
        help="ledger sizes to time the start at, increasing (default: 20k,100k,300k)",
    )
    parser.add_argument(
        "--nodes", type=int, default=TARGET_NODES, help="nodes sending (default: %(default)s)"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=TARGET_GPUS_PER_NODE,
        help="GPUs in each summary (default: %(default)s)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=300,
        metavar="SECONDS",
        help="summary window of the generated ledger (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="of the simulated measures (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="keep the ledger here (default: a temporary directory, removed)",
    )
    args = parser.parse_args()
    if args.nodes <= 0 or args.gpus_per_node <= 0 or args.window <= 0:
        parser.error("--nodes, --gpus-per-node and --window are above 0")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gputally-ledger-start-"))
    out.mkdir(parents=True, exist_ok=True)
    db, latest = out / "ledger.db", out / "ledger.db.checkpoint"
    if db.exists():
        parser.error(f"{db} exists: --out wants an empty directory")
    try:
        rng = random.Random(args.seed)
        key = Ed25519PrivateKey.generate()
        log(f"keys for {args.nodes:,} nodes of {args.gpus_per_node} GPUs ...")
        nodes = [Node(n, args.gpus_per_node, rng) for n in range(args.nodes)]
        source = windows(nodes, args.window)
        pending: list[Row] = []
        ledger = Ledger(Record(db), key, ORIGIN, latest)
        results = []
        checkpoints = 0
        for target in args.entries:
            log(f"growing the ledger to {target:,} entries ...")
            began = time.perf_counter()
            pending, signed = grow(ledger, source, pending, target, args.window)
            checkpoints += signed
            ledger.record.close()
            size = ledger_bytes(db)
            log(
                f"  {target:,} entries, {size / 2**20:,.1f} MiB, {checkpoints:,} checkpoints, "
                f"in {time.perf_counter() - began:.0f} s; timing ..."
            )
            base_s, body_bytes = baseline(db)
            start_s, ledger = start(db, key, latest, target)
            log(f"  start {start_s:.2f} s, baseline {base_s:.2f} s")
            results.append((target, size, start_s, base_s, body_bytes, checkpoints))
        ledger.record.close()

        entries, size, start_s, base_s, body_bytes, checkpoints = results[-1]
        print(
            f"ledger start ({args.nodes:,} nodes x {args.gpus_per_node} GPUs, "
            f"{args.window} s windows, a checkpoint signed per window; "
            f"mean signed summary {body_bytes / entries:,.0f} B, "
            f"{size / entries:,.0f} B per entry on disk)"
        )
        header = (
            f"{'entries':>9} {'ledger MiB':>10} {'start s':>8} {'entries/s':>10} "
            f"{'MiB/s':>7} {'baseline s':>10} {'ratio':>6}"
        )
        print(header)
        print("-" * len(header))
        for entries, size, start_s, base_s, _, _ in results:
            mib = size / 2**20
            print(
                f"{entries:>9,} {mib:>10,.1f} {start_s:>8.2f} {entries / start_s:>10,.0f} "
                f"{mib / start_s:>7.1f} {base_s:>10.2f} {start_s / base_s:>5.1f}x"
            )
        entries, size, start_s, base_s, _, _ = results[-1]
        per_entry_s, per_entry_b, per_base_s = start_s / entries, size / entries, base_s / entries
        print(
            f"\nprojected linearly from {entries:,} entries "
            f"({per_entry_s * 1e6:.1f} us and {per_entry_b:,.0f} B per entry; "
            f"baseline {per_base_s * 1e6:.1f} us):"
        )
        gpus = TARGET_NODES * TARGET_GPUS_PER_NODE
        for window in (300, 3600):
            n = TARGET_NODES * (86_400 // window) * TARGET_DAYS
            print(
                f"  {gpus:,} GPUs x {TARGET_DAYS} days, {window:>5,} s windows: {n:>10,} entries, "
                f"ledger {n * per_entry_b / 2**30:6.1f} GiB, start {duration(n * per_entry_s):>8} "
                f"(baseline {duration(n * per_base_s)})"
            )
        print(
            f"  (the page cache was warm: from a disk reading under {size / 2**20 / start_s:,.0f} "
            "MiB/s, the disk sets the pace instead)"
        )
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
