"""Benchmark: the ledger's appends and checkpoint signing, SQLite against PostgreSQL.

Each run appends --entries signed 8-GPU summaries one by one through Record.append, as the
collector's intake does (one durable transaction each, with the GPU window check), then signs
a checkpoint over all of them (Ledger.checkpoint: every body read and rehashed, the frontier
grown, the note signed and stored), then appends --batch more and signs again (the
steady state: a checkpoint over one interval's entries). Engines:

  sqlite      one file, WAL, synchronous=FULL (the embedded default);
  postgresql  the database --url names, synchronous_commit on, one process appending;
  shards      --writers processes appending to that database at once, as collector shards
              do (their appends are serialised by the ledger's advisory lock).

Each PostgreSQL run uses a fresh schema of that database, dropped afterwards. Both engines
write to this machine's disk, so the figures compare the engines, and each commit pays a
disk flush: on a machine whose disk flushes faster, both rise.

    .venv/bin/python benchmarks/ledger_engines.py --url postgresql://USER@127.0.0.1/DB \\
        [--entries 2000] [--batch 200] [--writers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.collector.record.ledger import Ledger
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb

START = 1_740_787_200  # 2025-03-01T00:00:00Z
WINDOW = 300
ORIGIN = "gputally/bench"


def summaries(
    node: str, count: int
) -> list[tuple[int, bytes, list[tuple[str, int, int, float, float]]]]:
    """(seq, signed bytes, card windows) of `count` 300 s windows of an 8-GPU node."""
    signer = SummarySigner(Ed25519PrivateKey.generate(), node)
    out = []
    for k in range(count):
        t0 = START + k * WINDOW
        s = pb.Summary(
            window_start_unix_nano=t0 * 10**9, window_end_unix_nano=(t0 + WINDOW) * 10**9
        )
        for i in range(8):
            s.gpus.add(
                index=i, uuid=f"GPU-{node}-{i}", model="NVIDIA H100 80GB HBM3", serial=f"{i:013d}",
                present_seconds=WINDOW, allocated_seconds=WINDOW, busy_seconds=0.8 * WINDOW,
                sm_measured_seconds=WINDOW, sm_active_seconds=0.5 * WINDOW,
                effective_seconds=0.5 * WINDOW, energy_joules=500.0 * WINDOW,
            )  # fmt: skip
        bounds = (t0 * 10**9, (t0 + WINDOW) * 10**9)
        windows = [(g.uuid.casefold(), *bounds, float(WINDOW), g.energy_joules) for g in s.gpus]
        out.append((k + 1, signer.sign(s).SerializeToString(), windows))
    return out


def append(location: str, node: str, count: int, ready: object = None) -> float:
    """Append `count` summaries of `node` one by one; the seconds it took."""
    made = summaries(node, count)  # signed before the clock starts: the engine is measured
    record = Record(location)
    if ready is not None:
        ready.wait()  # type: ignore[attr-defined]
    began = time.perf_counter()
    for seq, body, windows in made:
        t0, t1 = windows[0][1], windows[0][2]
        assert record.append(node, 1, seq, t0, t1, time.time(), body, windows)
    elapsed = time.perf_counter() - began
    record.close()
    return elapsed


def _shard(location: str, node: str, count: int, ready: object, results: object) -> None:
    results.put(append(location, node, count, ready))  # type: ignore[attr-defined]


def run(location: str, entries: int, batch: int, writers: int) -> dict[str, float]:
    """Appends/s and checkpoint times on one (empty) ledger, whose signer is running while
    the entries come in (as a collector's ledger is)."""
    record = Record(location)  # also the tables, before the shards race for them
    ledger = Ledger(record, Ed25519PrivateKey.generate(), ORIGIN)
    if writers == 1:
        elapsed = append(location, "node-0", entries)
    else:
        context = multiprocessing.get_context("spawn")
        ready, results = context.Event(), context.Queue()
        procs = [
            context.Process(target=_shard, args=(location, f"node-{w}", entries // writers, ready, results))
            for w in range(writers)
        ]  # fmt: skip
        for proc in procs:
            proc.start()
        time.sleep(2 + writers)  # each has signed its summaries and connected
        began = time.perf_counter()
        ready.set()
        for proc in procs:
            proc.join()
        elapsed = time.perf_counter() - began
        assert all(p.exitcode == 0 for p in procs)
    count = record.count()
    began = time.perf_counter()
    assert ledger.checkpoint(time.time())
    first = time.perf_counter() - began
    for seq, body, windows in summaries("node-late", batch):
        assert record.append("node-late", 1, seq, windows[0][1], windows[0][2], 0.0, body, windows)
    began = time.perf_counter()
    assert ledger.checkpoint(time.time())
    steady = time.perf_counter() - began
    record.close()
    return {
        "entries": count,
        "appends_per_s": count / elapsed,
        "append_ms": elapsed / count * 1e3 * max(writers, 1),
        "checkpoint_all_s": first,
        "checkpoint_batch_s": steady,
    }


def schema_url(url: str, schema: str) -> str:
    """`url` with its tables in `schema` (made here, dropped by the caller)."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"


def drop(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="a PostgreSQL database to run in")
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=200, help="entries of the second checkpoint")
    parser.add_argument("--writers", type=int, default=2, help="shards appending at once")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    directory = Path(tempfile.mkdtemp(prefix="gputally-engines-"))
    try:
        results["sqlite"] = run(str(directory / "ledger.db"), args.entries, args.batch, 1)
        for name, writers in (("postgresql", 1), ("shards", args.writers)):
            schema = f"bench_{os.getpid()}_{name}"
            try:
                results[name] = run(schema_url(args.url, schema), args.entries, args.batch, writers)
            finally:
                drop(args.url, schema)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    signs = f"sign {args.batch}"
    print(
        f"{'engine':<12} {'entries':>8} {'appends/s':>10} {'ms/append':>10} {'sign all':>9} "
        f"{signs:>9}"
    )
    for name, r in results.items():
        label = f"{name} x{args.writers}" if name == "shards" else name
        print(
            f"{label:<12} {r['entries']:>8,.0f} {r['appends_per_s']:>10,.0f} {r['append_ms']:>10.2f} "
            f"{r['checkpoint_all_s']:>8.2f}s {r['checkpoint_batch_s']:>8.3f}s"
        )
    print("(ms/append: the time one writer waits for each of its appends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
