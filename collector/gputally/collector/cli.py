"""The collector's commands: `collector`, `query`, `enroll`, and the auditor's `audit verify`,
`audit report` and `audit census`.

Only what the parsers need is imported here; each command imports the rest when it runs, so
that an auditor's command loads neither the live path nor gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gputally.cli.options import (
    FAILED,
    TIMES,
    address,
    count,
    fail,
    fraction,
    parse_time,
    positive,
)
from gputally.v1.accounting import RECORDED_MEASURES

if TYPE_CHECKING:
    from .audit.figures import Rollup
    from .audit.verify import Receipt, Verification

# `query --by` choices (audit.figures.BREAKDOWNS, which the parser must not import).
BREAKDOWNS = ("node", "model", "tenant", "job")


def _breakdowns(text: str) -> str:
    """`--by`: a comma-separated list of BREAKDOWNS, checked, each once (kept as text, so
    that a config file and the environment give it the same way)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BREAKDOWNS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, unknown))}: the breakdowns are {', '.join(BREAKDOWNS)}"
        )
    return ",".join(dict.fromkeys(names))


def _add_collector_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grpc-listen",
        type=address,
        default="0.0.0.0:9471",
        metavar="HOST:PORT",
        help="where agents connect (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=address,
        default="0.0.0.0:9470",
        metavar="HOST:PORT",
        help="/metrics, /healthz, /readyz (default: %(default)s)",
    )
    parser.add_argument(
        "--expected-gpus",
        type=count,
        metavar="N",
        help="declared GPU inventory, the denominator of every cluster ratio; without it the denominator is "
        "the GPUs seen so far, and a GPU never seen cannot lower the figure (default: not declared)",
    )
    parser.add_argument(
        "--window",
        type=positive,
        default=30.0,
        metavar="SECONDS",
        help="live window of the _ratio gauges (default: %(default)s)",
    )
    parser.add_argument(
        "--lag",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="the live window ends this long ago, so the newest reports have arrived (default: %(default)s)",
    )
    parser.add_argument(
        "--stale-after",
        type=positive,
        default=15.0,
        metavar="SECONDS",
        help="a node with no report for this long is not reporting (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on shutdown, time given to open streams (default: %(default)s)",
    )
    parser.add_argument(
        "--db",
        default="gputally.db",
        metavar="PATH",
        help="the durable record of every summary (SQLite, WAL), read by `gputally query`; "
        "empty to keep none (default: %(default)s)",
    )
    parser.add_argument(
        "--keys",
        default="",
        metavar="DIR",
        help="enrolled agent keys, one <node>.pub per node: only summaries signed by them are recorded "
        "(default: none, and then nothing is recorded)",
    )
    parser.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="for labs: enrol the first key each node presents into --keys (default: off)",
    )
    parser.add_argument(
        "--collector-key",
        default="",
        metavar="PATH",
        help="the collector's Ed25519 key that signs checkpoints, created on first use (default: <db>.key)",
    )
    parser.add_argument(
        "--origin",
        default=f"gputally/{socket.gethostname()}",
        help="the log's name in its checkpoints (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=positive,
        default=60.0,
        metavar="SECONDS",
        help="how often to sign a checkpoint when the log grew (default: %(default)s)",
    )


def _add_period_options(
    parser: argparse.ArgumentParser, *, required: bool, what: str = "the record"
) -> None:
    parser.add_argument(
        "--from",
        dest="start",
        required=required,
        metavar="TIME",
        help="period start" + ("" if required else f" (default: the start of {what})"),
    )
    parser.add_argument(
        "--to",
        dest="end",
        required=required,
        metavar="TIME",
        help="period end, excluded" + ("" if required else f" (default: the end of {what})"),
    )


def _add_claim_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--measure",
        default="busy",
        choices=list(RECORDED_MEASURES),
        help="the measure the claim is about (default: %(default)s)",
    )
    parser.add_argument(
        "--claim", type=fraction, metavar="RATIO", help="claimed ratio in [0, 1], e.g. 0.85"
    )


def _add_ledger_options(parser: argparse.ArgumentParser, *, receipt: bool) -> None:
    """What every auditor's command reads: the ledger and the public keys, nothing else."""
    parser.add_argument(
        "--ledger", required=True, metavar="PATH", help="the collector's record (its --db file)"
    )
    parser.add_argument(
        "--keys",
        required=True,
        metavar="DIR",
        help="the agents' <node>.pub files and the collector's collector.ckey",
    )
    if receipt:
        parser.add_argument(
            "--receipt",
            metavar="FILE",
            help="a receipt from `audit verify --receipt`: the signatures it covers are not checked again "
            "(every hash, chain and checkpoint still is; a ledger or key directory that differs from the "
            "receipt's is verified in full)",
        )


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    collector = sub.add_parser(
        "collector",
        help="receive agent streams and expose cluster utilization to Prometheus",
        description="Receive agent streams over gRPC, aggregate cluster utilization with the declared "
        "inventory as the denominator, and expose it on /metrics.",
    )
    _add_collector_options(collector)
    collector.set_defaults(handler=run_collector)

    query, enroll = _register_query(sub), _register_enroll(sub)
    audit = _register_audit(sub)
    return {"collector": collector, "query": query, "enroll": enroll, "audit": audit}


def _register_audit(sub: Any) -> argparse.ArgumentParser:
    audit: argparse.ArgumentParser = sub.add_parser(
        "audit",
        help="verify the ledger and report on utilization claims, from the ledger and public keys alone",
        description="Auditor's commands. They read only the ledger file and the public keys.",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)
    check = audit_sub.add_parser(
        "verify",
        help="check every signature, every node's chain and every checkpoint",
        description="Check every summary's signature against the enrolled keys, every node's chain "
        "(gaps, reorders, duplicates), and the Merkle tree against the signed checkpoints. Exits 0 only "
        "when all holds; otherwise names the first bad entry and exits 1.",
    )
    _add_ledger_options(check, receipt=False)
    check.add_argument(
        "--receipt",
        metavar="FILE",
        help="when all holds, write a receipt here: the log's size and root and the keys' digest, "
        "so that `audit report --receipt FILE` need not check these signatures again",
    )
    check.set_defaults(handler=run_audit_verify)
    report = audit_sub.add_parser(
        "report",
        help="verify, then write report.html (plots), report.json and CSV tables for a period",
        description="Verify the ledger (as `audit verify`), then recompute every figure for the period from "
        "its summaries and write a self-contained report.html, report.json and CSV tables into --out.",
        epilog=TIMES,
    )
    _add_ledger_options(report, receipt=True)
    _add_period_options(report, required=True)
    report.add_argument(
        "--expected-gpus",
        type=count,
        required=True,
        metavar="N",
        help="the inventory the claim is about",
    )
    _add_claim_options(report)
    report.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    report.set_defaults(handler=run_audit_report)
    census = audit_sub.add_parser(
        "census",
        help="the inventory the ledger saw: cards per model, serials, duplicate identities, peak throughput",
        description="Verify the ledger, then list the cards it saw in the period: per model, with serials "
        "and UUIDs, duplicate identities (one card reported by two nodes), and the theoretical peak dense "
        "BF16 throughput per model and in total, to set against a claimed capacity.",
        epilog=TIMES,
    )
    _add_ledger_options(census, receipt=True)
    _add_period_options(census, required=False, what="the ledger")
    census.add_argument("--json", action="store_true", help="print JSON, with the full card list")
    census.set_defaults(handler=run_audit_census)
    prove = audit_sub.add_parser(
        "prove",
        help="RFC 9162 inclusion and consistency proofs against the newest signed checkpoint",
        description="Print, as JSON, the newest signed checkpoint and the proofs asked for: that an "
        "entry is in the log (--entry), and that the log as it was at an earlier size is a prefix of "
        "it (--since, e.g. the size of a checkpoint you kept). Each proof is checked before it is "
        "printed; check it again with any RFC 9162 implementation.",
    )
    _add_ledger_options(prove, receipt=False)
    prove.add_argument("--entry", type=count, metavar="ID", help="the entry (its id) to prove")
    prove.add_argument(
        "--since", type=count, metavar="SIZE", help="the earlier size to prove consistency from"
    )
    prove.set_defaults(handler=run_audit_prove)
    return audit


def _register_query(sub: Any) -> argparse.ArgumentParser:
    query: argparse.ArgumentParser = sub.add_parser(
        "query",
        help="utilization figures, bounds and a verdict for any past period, from the collector's record",
        description="Compute every utilization measure for a period from the collector's record "
        "(docs/utilization.md): the figure, its lower and upper bounds, coverage, energy, padding, "
        "breakdowns, and the verdict on a claim.",
        epilog=TIMES,
    )
    query.add_argument(
        "--db",
        default="gputally.db",
        metavar="PATH",
        help="the collector's record (default: %(default)s)",
    )
    _add_period_options(query, required=False)
    _add_claim_options(query)
    query.add_argument(
        "--expected-gpus",
        type=count,
        metavar="N",
        help="inventory (default: the one the collector declared)",
    )
    query.add_argument(
        "--by",
        type=_breakdowns,
        default="",
        metavar="LIST",
        help="also print the figures per node, model, tenant and/or job, the 50 largest, "
        "e.g. --by tenant,model (the JSON always holds every breakdown)",
    )
    query.add_argument("--json", action="store_true", help="print JSON")
    query.set_defaults(handler=run_query)

    return query


def _register_enroll(sub: Any) -> argparse.ArgumentParser:
    enroll: argparse.ArgumentParser = sub.add_parser(
        "enroll",
        help="enrol an agent's public key for a node",
        description="Write <node>.pub into the key directory, so the collector records that node's "
        "signed summaries. Get the key on the node with `gputally agent --print-public-key`.",
    )
    enroll.add_argument(
        "--keys", required=True, metavar="DIR", help="the collector's key directory"
    )
    enroll.add_argument("--node", required=True, help="the node name the agent reports as")
    enroll.add_argument(
        "--rotate",
        action="store_true",
        help="the node has a key already (e.g. it was reinstalled): make this one its current key; "
        "the old one stays, to verify what it signed, and no longer speaks for the node",
    )
    enroll.add_argument(
        "public_key", metavar="PUBLIC_KEY", help="base64 of the 32-byte Ed25519 key"
    )
    enroll.set_defaults(handler=run_enroll)

    return enroll


# -- collector and enroll --------------------------------------------------------------------


def run_collector(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from gputally.v1.signing import KeyFileError

    from .live.server import Settings, serve
    from .record.store import RecordError

    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(main())
    except (OSError, RecordError, KeyFileError) as error:
        return fail("collector", str(error))
    return 0


def run_enroll(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError, decode_public_key

    from .record.keys import KeyStore

    try:
        key = decode_public_key(args.public_key, "PUBLIC_KEY")
        Path(args.keys).mkdir(parents=True, exist_ok=True)
        path = KeyStore(args.keys).enroll(args.node, key, rotate=args.rotate)
    except (KeyFileError, OSError) as error:
        return fail("enroll", str(error))
    print(f"enrolled {args.node}: {path}")
    return 0


# -- query -----------------------------------------------------------------------------------


def run_query(args: argparse.Namespace) -> int:
    from .audit.figures import as_dict, compute, render_text
    from .record.store import Record, RecordError

    try:
        record = Record(args.db, readonly=True)
    except RecordError as error:
        return fail("query", str(error))
    try:
        span = record.span()
        now = time.time()
        try:
            start = parse_time(args.start, now) if args.start else (span[0] / 1e9 if span else None)
            end = parse_time(args.end, now) if args.end else (span[1] / 1e9 if span else None)
        except ValueError as error:
            return fail("query", str(error))
        if start is None or end is None:
            return fail("query", f"{args.db} holds no summary yet; give --from and --to")
        if end <= start:
            return fail("query", "--to must be after --from")
        expected = args.expected_gpus or record.inventory_at(start)
        if expected is None:
            return fail(
                "query",
                "the record declares no inventory (the collector ran without --expected-gpus): give --expected-gpus",
            )
        figures = compute(record.summaries(int(start * 1e9), int(end * 1e9)), start, end, expected)
    finally:
        record.close()
    answer = as_dict(figures, args.measure, args.claim)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render_text(answer, [name for name in args.by.split(",") if name]))
    return 0


# -- audit -----------------------------------------------------------------------------------


def _load_receipt(args: argparse.Namespace) -> Receipt | None:
    """The receipt named by --receipt (None without one); ReceiptError when unusable."""
    from .audit.verify import Receipt

    return Receipt.load(Path(args.receipt)) if args.receipt else None


def _say_receipt(
    verification: Verification, receipt: Receipt | None, args: argparse.Namespace
) -> None:
    if verification.trusted and receipt is not None:
        print(
            f"  signatures of the first {verification.trusted:,} entries: by the receipt "
            f"{args.receipt} (verified {receipt.verified_at})",
            file=sys.stderr,
        )
    elif receipt is not None:
        print(f"  receipt not used: {verification.receipt_note}", file=sys.stderr)


def _verified(
    args: argparse.Namespace, command: str, *, rollup: Rollup | None = None
) -> tuple[Verification, Receipt | None] | int:
    """Verify the ledger as `audit verify` does (adding its figures into `rollup` on the way),
    with the --receipt given. The verification when it holds; else the exit code, said."""
    from gputally.v1.signing import KeyFileError

    from .audit.verify import ReceiptError, verify_ledger
    from .record.store import RecordError

    try:
        receipt = _load_receipt(args)
        verification = verify_ledger(
            Path(args.ledger),
            Path(args.keys),
            progress=lambda n: print(f"  {n:,} entries checked", file=sys.stderr, flush=True),
            rollup=rollup,
            receipt=receipt,
        )
    except (RecordError, KeyFileError, ReceiptError) as error:
        return fail(command, str(error))
    _say_receipt(verification, receipt, args)
    if not verification.ok:
        print(f"gputally {command}: the ledger does not verify ({_failed_at(verification)})")
        return FAILED
    return verification, receipt


def _failed_at(verification: Verification) -> str:
    first = verification.problems[0]
    where = f"entry {first.entry}" if first.entry is not None else "log"
    return f"at {where}: {first.message}"


def run_audit_verify(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError

    from .audit.verify import Receipt, verify_ledger
    from .record.store import RecordError

    def progress(entries: int) -> None:
        print(f"  ... {entries:,} entries checked", file=sys.stderr, flush=True)

    try:
        result = verify_ledger(Path(args.ledger), Path(args.keys), progress=progress)
    except (RecordError, KeyFileError) as error:
        return fail("audit verify", str(error))
    print(
        f"ledger {args.ledger}: {result.entries:,} entries from {len(result.nodes)} nodes, {result.checkpoints} checkpoints"
    )
    if not result.ok:
        print(f"FAILED {_failed_at(result)}")
        if len(result.problems) > 1:
            print(f"({len(result.problems) - 1} more problems after it)")
        return FAILED
    print("verified: every signature, every chain and every checkpoint holds")
    if args.receipt:
        receipt = Receipt.of(result, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        try:
            receipt.write(Path(args.receipt))
        except OSError as error:
            return fail("audit verify", f"--receipt: {error}")
        print(
            f"receipt: {args.receipt} (size {result.entries:,}, root {result.root.hex()[:16]}...)"
        )
    return 0


def run_audit_report(args: argparse.Namespace) -> int:
    from .audit import report as report_module
    from .audit.figures import Rollup

    def say(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    try:
        start, end = parse_time(args.start, time.time()), parse_time(args.end, time.time())
    except ValueError as error:
        return fail("audit report", str(error))
    if end <= start:
        return fail("audit report", "--to must be after --from")
    say("verifying the ledger and adding up its figures ...")
    rollup = Rollup(start, end, args.expected_gpus)
    verified = _verified(args, "audit report", rollup=rollup)
    if isinstance(verified, int):
        return verified
    verification, receipt = verified
    say(f"verified {verification.entries:,} entries; writing the report ...")
    answer = report_module.build(
        rollup,
        args.measure,
        args.claim,
        verification,
        receipt.verified_at if receipt is not None and verification.trusted else "",
    )
    try:
        paths = report_module.write(answer, Path(args.out), args.measure)
    except OSError as error:
        return fail("audit report", f"--out {args.out}: {error}")
    verdict = f", claim {args.claim:.2%}: {answer['verdict']}" if args.claim is not None else ""
    print(
        f"{args.measure} {answer['figure']:.2%} [{answer['lower']:.2%}, {answer['upper']:.2%}], "
        f"coverage {answer['coverage']:.1%}{verdict}"
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def run_audit_prove(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError

    from .audit.verify import ProofRequestError, prove
    from .record.store import RecordError

    if args.entry is None and args.since is None:
        return fail("audit prove", "give --entry ID, --since SIZE, or both")
    try:
        answer = prove(Path(args.ledger), Path(args.keys), entry=args.entry, since=args.since)
    except (RecordError, KeyFileError, ProofRequestError) as error:
        return fail("audit prove", str(error))
    print(json.dumps(answer, indent=2))
    return 0


def run_audit_census(args: argparse.Namespace) -> int:
    from .audit import census as census_module
    from .record.store import Record

    verified = _verified(args, "audit census")
    if isinstance(verified, int):
        return verified
    record = Record(args.ledger, readonly=True)
    try:
        span = record.span() or (0, 0)
        now = time.time()
        try:
            start = parse_time(args.start, now) if args.start else span[0] / 1e9
            end = parse_time(args.end, now) if args.end else span[1] / 1e9
        except ValueError as error:
            return fail("audit census", str(error))
        result = census_module.census(census_module.take(record, start, end))
    finally:
        record.close()
    print(json.dumps(result, indent=2) if args.json else census_module.render(result))
    return 0
