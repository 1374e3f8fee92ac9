"""Benchmark: `gputally audit verify` and `audit report` on a ledger of 10,000 GPUs over 90 days.

Generates the ledger with the project's own signing (SummarySigner), record (bulk-loaded) and
ledger (checkpoints signed once per simulated day) code: 1,250 nodes of 8 GPUs, one signed
summary per node per hour, 2.7 million entries. Then times the two auditor commands as a
person runs them (`audit verify --receipt`, then `audit report --receipt`, which rechecks
every hash, chain and checkpoint but not the signatures the verify just checked), and prints
each with its rate next to the bare Ed25519 verification rate of this machine, measured in
the same run. --full-report also times a report that checks every signature itself. --ledger-url copies
the ledger, row for row, into a PostgreSQL database (a schema of its own, dropped at the end)
and times the same commands on it, beside the SQLite figures.

    .venv/bin/python benchmarks/audit_scale.py [--gpus 10000] [--days 90] [--out DIR] [--full-report]
        [--ledger-url postgresql://USER@HOST/DB]

Target (issue 5): verify and report together under 10 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import COLLECTOR_KEY_FILE, Ledger, collector_key_text
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import public_bytes

START = 1_740_787_200  # 2025-03-01T00:00:00Z
HOUR = 3600


def gputally() -> list[str]:
    script = Path(sys.executable).with_name("gputally")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gputally.cli"]


def bare_verify_rate(seconds: float = 3.0) -> float:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    message = b"x" * 600
    signature = key.sign(message)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(500):
            public.verify(signature, message)
        count += 500
    return count / (time.perf_counter() - began)


def generate(out: Path, gpus: int, days: int, per_node: int = 8) -> tuple[Path, Path, int]:
    nodes = gpus // per_node
    db, keys = out / "ledger.db", out / "keys"
    keys.mkdir(parents=True)
    store = KeyStore(keys)
    record = Record(db)
    collector_key = Ed25519PrivateKey.generate()
    ledger = Ledger(record, collector_key, "gputally/bench")
    (keys / COLLECTOR_KEY_FILE).write_text(
        collector_key_text("gputally/bench", public_bytes(collector_key))
    )
    signers = []
    for n in range(nodes):
        signer = SummarySigner(Ed25519PrivateKey.generate(), f"node-{n:04d}")
        store.enroll(signer.node, signer.public_key)
        signers.append(signer)
    template = pb.Summary()
    for i in range(per_node):
        gpu = template.gpus.add(index=i, model="NVIDIA H100 80GB HBM3", serial=f"{i:013d}")
        gpu.present_seconds = HOUR
        gpu.sm_measured_seconds = HOUR
    began = time.perf_counter()
    for day in range(days):
        rows = []
        for hour in range(24):
            t0 = START + (day * 24 + hour) * HOUR
            for n, signer in enumerate(signers):
                summary = pb.Summary()
                summary.CopyFrom(template)
                summary.window_start_unix_nano = t0 * 10**9
                summary.window_end_unix_nano = (t0 + HOUR) * 10**9
                busy = 0.85 if day < 30 else (1.0 if n % 2 else 0.0)  # the acceptance story
                for i, gpu in enumerate(summary.gpus):
                    gpu.uuid = f"GPU-{n:04d}-{i}"
                    gpu.allocated_seconds = HOUR * (busy > 0)
                    gpu.busy_seconds = busy * HOUR
                    gpu.sm_active_seconds = gpu.effective_seconds = 0.6 * busy * HOUR
                    gpu.energy_joules = (70 + 500 * busy) * HOUR
                signed = signer.sign(summary)
                rows.append(
                    (
                        signer.node,
                        1,
                        day * 24 + hour + 1,
                        summary.window_start_unix_nano,
                        summary.window_end_unix_nano,
                        float(t0 + HOUR),
                        signed.SerializeToString(),
                    )
                )
        record.append_many(rows)
        ledger.checkpoint(float(START + (day + 1) * 86400))
        if (day + 1) % 10 == 0 or day + 1 == days:
            print(
                f"  generated day {day + 1}/{days} ({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    entries = record.count()
    record.close()
    return db, keys, entries


# The record's tables with their columns, in the order both engines declare them.
TABLES = {
    "summaries": "id, node, instance, seq, window_start_ns, window_end_ns, received, body, leaf",
    "checkpoints": "id, size, root, note, created",
    "inventory": "since, expected",
    "cosignatures": "id, size, witness, line, timestamp",
    "frontiers": "size, last_id, peaks",
    "meta": "key, value",
    "gpu_windows": "uuid, node, start_ns, end_ns, covered, joules",
}


def copy_to_postgres(db: Path, url: str, schema: str) -> str:
    """The SQLite ledger's rows, as they are, into a new schema of the PostgreSQL database at
    `url` (COPY, the bulk load PostgreSQL has); the URL of the copy."""
    import psycopg

    from gputally.collector.record.postgres import PostgresRecord

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in url else "?"
    copy = f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"
    PostgresRecord(copy).close()  # the tables
    source = sqlite3.connect(db)
    with psycopg.connect(copy) as target, target.cursor() as cursor:
        for table, columns in TABLES.items():
            with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as rows:
                for row in source.execute(f"SELECT {columns} FROM {table}"):
                    rows.write_row(row)
        for table in ("checkpoints", "cosignatures"):  # identities go on after the copied ids
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
            )
        cursor.execute("ANALYZE")
    source.close()
    return copy


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def timed(command: list[str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return elapsed, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument(
        "--out", help="keep the ledger here (default: a temporary directory, removed)"
    )
    parser.add_argument(
        "--full-report",
        action="store_true",
        help="also time `audit report` without the receipt, as a self-standing report runs",
    )
    parser.add_argument(
        "--ledger-url",
        metavar="URL",
        help="also copy the ledger into this PostgreSQL database and time the commands on it",
    )
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gputally-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    schema = f"bench_audit_{os.getpid()}"
    try:
        rate = bare_verify_rate()
        print(f"bare Ed25519 verify on this machine (one core): {rate:,.0f}/s")
        began = time.perf_counter()
        db, keys, entries = generate(out, args.gpus, args.days)
        generation = time.perf_counter() - began
        size = db.stat().st_size / 2**20
        print(
            f"generated {entries:,} signed summaries ({args.gpus:,} GPUs x {args.days} days, hourly) "
            f"in {generation:.0f} s; ledger {size:,.0f} MiB"
        )
        ledgers = [("sqlite", str(db))]
        if args.ledger_url:
            began = time.perf_counter()
            ledgers.append(("postgresql", copy_to_postgres(db, args.ledger_url, schema)))
            print(f"copied into PostgreSQL in {time.perf_counter() - began:.0f} s")
        totals = {}
        for engine, ledger in ledgers:
            totals[engine] = audit(engine, ledger, keys, out, entries, rate, args)
        if len(totals) == 2:
            sqlite_s, postgres_s = totals["sqlite"], totals["postgresql"]
            print(
                f"verify + report: SQLite {sqlite_s:.0f} s, PostgreSQL {postgres_s:.0f} s "
                f"({postgres_s / sqlite_s:.2f}x)"
            )
    finally:
        if args.ledger_url:
            drop_schema(args.ledger_url, schema)
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def audit(
    engine: str,
    ledger: str,
    keys: Path,
    out: Path,
    entries: int,
    rate: float,
    args: argparse.Namespace,
) -> float:
    """Time `audit verify --receipt`, then `audit report --receipt` (and without, with
    --full-report) on one ledger; the seconds of the two."""
    receipt = out / f"receipt-{engine}.json"
    verify_s, verify_out = timed(
        [
            *gputally(),
            "audit",
            "verify",
            f"--ledger={ledger}",
            f"--keys={keys}",
            f"--receipt={receipt}",
        ]
    )
    print(
        f"[{engine}] audit verify: {verify_s:.1f} s, {entries / verify_s:,.0f} entries/s "
        f"= {entries / verify_s / rate:.2f}x the one-core bare verify rate"
    )
    print("  " + verify_out.strip().replace("\n", "\n  "))
    end = time.strftime("%Y-%m-%d", time.gmtime(START + args.days * 86400))
    report = [
        *gputally(),
        "audit",
        "report",
        f"--ledger={ledger}",
        f"--keys={keys}",
        "--from=2025-03-01",
        f"--to={end}",
        f"--expected-gpus={args.gpus}",
        "--claim=0.85",
        f"--out={out / f'report-{engine}'}",
    ]
    report_s, report_out = timed([*report, f"--receipt={receipt}"])
    print(
        f"[{engine}] audit report --receipt: {report_s:.1f} s (every hash, chain and checkpoint "
        "again; the signatures by the receipt of the verify above)"
    )
    print("  " + report_out.strip().splitlines()[0])
    total = verify_s + report_s
    print(f"[{engine}] verify + report: {total:.0f} s = {total / 600:.2f} of the 10-minute target")
    if args.full_report:
        full_s, _ = timed(report)
        print(
            f"[{engine}] audit report without a receipt (checks every signature itself): "
            f"{full_s:.1f} s"
        )
    return total


if __name__ == "__main__":
    sys.exit(main())
