"""The collector's commands, plugged into ``gputally`` through the ``gputally.commands``
entry-point group."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only what the argument parsers need is imported here: every `gputally` command, the agent
# included, builds these parsers, and the agent's resident memory is a target of its own. Each
# command imports the rest when it runs.
from .figures import MEASURES
from .keys import KeyStore, KeyStoreError, read_public_key

if TYPE_CHECKING:
    from .audit import Receipt, Verification

log = logging.getLogger("gputally.collector")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_collector_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grpc-listen",
        default="0.0.0.0:9471",
        metavar="HOST:PORT",
        help="where agents connect (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        default="0.0.0.0:9470",
        metavar="HOST:PORT",
        help="/metrics, /healthz, /readyz (default: %(default)s)",
    )
    parser.add_argument(
        "--expected-gpus",
        type=_count,
        metavar="N",
        help="declared GPU inventory, the denominator of every cluster ratio; without it the denominator is "
        "the GPUs seen so far, and a GPU never seen cannot lower the figure (default: not declared)",
    )
    parser.add_argument(
        "--window",
        type=_positive,
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
        type=_positive,
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
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="how often to sign a checkpoint when the log grew (default: %(default)s)",
    )


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    collector = sub.add_parser(
        "collector",
        help="receive agent streams and expose cluster utilization to Prometheus",
        description="Receive agent streams over gRPC, aggregate cluster utilization with the declared "
        "inventory as the denominator, and expose it on /metrics.",
    )
    add_collector_arguments(collector)
    collector.set_defaults(handler=run)

    query = sub.add_parser(
        "query",
        help="utilization figures, bounds and a verdict for any past period, from the collector's record",
        description="Compute every utilization measure for a period from the collector's record "
        "(docs/utilization.md): the figure, its lower and upper bounds, coverage, energy, padding, "
        "breakdowns, and the verdict on a claim.",
        epilog="Times: YYYY-MM-DD, an ISO 8601 date-time (UTC unless it has an offset), unix seconds, "
        "'now', or a duration before now such as -1h, -30m, -7d (write it --from=-1h: a bare -1h looks "
        "like an option).",
    )
    query.add_argument(
        "--db",
        default="gputally.db",
        metavar="PATH",
        help="the collector's record (default: %(default)s)",
    )
    query.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="period start (default: the start of the record)",
    )
    query.add_argument(
        "--to",
        dest="end",
        metavar="TIME",
        help="period end, excluded (default: the end of the record)",
    )
    query.add_argument(
        "--measure",
        default="busy",
        choices=list(MEASURES),
        help="the measure the claim is about (default: %(default)s)",
    )
    query.add_argument(
        "--claim", type=_fraction, metavar="RATIO", help="claimed ratio in [0, 1], e.g. 0.85"
    )
    query.add_argument(
        "--expected-gpus",
        type=_count,
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

    enroll = sub.add_parser(
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

    audit = sub.add_parser(
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
    _ledger_arguments(check)
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
    )
    _ledger_arguments(report)
    _receipt_argument(report)
    report.add_argument(
        "--from", dest="start", required=True, metavar="DATE", help="period start (UTC)"
    )
    report.add_argument(
        "--to", dest="end", required=True, metavar="DATE", help="period end, excluded (UTC)"
    )
    report.add_argument(
        "--expected-gpus",
        type=_count,
        required=True,
        metavar="N",
        help="the inventory the claim is about",
    )
    report.add_argument(
        "--measure", default="busy", choices=list(MEASURES), help="default: %(default)s"
    )
    report.add_argument(
        "--claim", type=_fraction, metavar="RATIO", help="claimed ratio in [0, 1], e.g. 0.85"
    )
    report.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    report.set_defaults(handler=run_audit_report)
    census = audit_sub.add_parser(
        "census",
        help="the inventory the ledger saw: cards per model, serials, duplicate identities, peak throughput",
        description="Verify the ledger, then list the cards it saw in the period: per model, with serials "
        "and UUIDs, duplicate identities (one card reported by two nodes), and the theoretical peak dense "
        "BF16 throughput per model and in total, to set against a claimed capacity.",
    )
    _ledger_arguments(census)
    _receipt_argument(census)
    census.add_argument(
        "--from",
        dest="start",
        metavar="DATE",
        help="period start (default: the start of the ledger)",
    )
    census.add_argument(
        "--to", dest="end", metavar="DATE", help="period end (default: the end of the ledger)"
    )
    census.add_argument("--json", action="store_true", help="print JSON, with the full card list")
    census.set_defaults(handler=run_audit_census)
    return {"collector": collector, "query": query, "enroll": enroll, "audit": audit}


def run_audit_report(args: argparse.Namespace) -> int:
    from . import report as report_module
    from .audit import verify_ledger
    from .figures import Rollup
    from .record import RecordError

    def say(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    try:
        start, end = parse_time(args.start, time.time()), parse_time(args.end, time.time())
    except ValueError as error:
        return _fail(str(error))
    if end <= start:
        return _fail("--to must be after --from")
    receipt = _load_receipt(args, "report")
    say("verifying the ledger and adding up its figures ...")
    rollup = Rollup(start, end, args.expected_gpus)
    try:
        verification = verify_ledger(
            Path(args.ledger),
            Path(args.keys),
            progress=lambda n: say(f"{n:,} entries checked"),
            rollup=rollup,
            receipt=receipt,
        )
    except (RecordError, KeyStoreError) as error:
        print(f"gputally audit report: {error}", file=sys.stderr)
        return 2
    _say_receipt(verification, receipt, args)
    if not verification.ok:
        first = verification.problems[0]
        where = f"entry {first.entry}" if first.entry is not None else "log"
        print(
            f"gputally audit report: the ledger does not verify (at {where}: {first.message}); no report written"
        )
        return 1
    say(f"verified {verification.entries:,} entries; writing the report ...")
    answer = report_module.build(
        rollup,
        args.measure,
        args.claim,
        verification,
        receipt.verified_at if receipt is not None and verification.trusted else "",
    )
    paths = report_module.write(answer, Path(args.out), args.measure)
    verdict = f", claim {args.claim:.2%}: {answer['verdict']}" if args.claim is not None else ""
    print(
        f"{args.measure} {answer['figure']:.2%} [{answer['lower']:.2%}, {answer['upper']:.2%}], "
        f"coverage {answer['coverage']:.1%}{verdict}"
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def run_audit_census(args: argparse.Namespace) -> int:
    from . import census as census_module
    from .audit import verify_ledger
    from .record import Record, RecordError

    receipt = _load_receipt(args, "census")
    try:
        verification = verify_ledger(Path(args.ledger), Path(args.keys), receipt=receipt)
    except (RecordError, KeyStoreError) as error:
        print(f"gputally audit census: {error}", file=sys.stderr)
        return 2
    _say_receipt(verification, receipt, args)
    if not verification.ok:
        print(
            f"gputally audit census: the ledger does not verify ({verification.problems[0].message})"
        )
        return 1
    record = Record(args.ledger, readonly=True)
    try:
        span = record.span() or (0, 0)
        now = time.time()
        try:
            start = parse_time(args.start, now) if args.start else span[0] / 1e9
            end = parse_time(args.end, now) if args.end else span[1] / 1e9
        except ValueError as error:
            return _fail(str(error))
        result = census_module.census(census_module.take(record, start, end))
    finally:
        record.close()
    print(json.dumps(result, indent=2) if args.json else census_module.render(result))
    return 0


def run_audit_verify(args: argparse.Namespace) -> int:
    from .audit import Receipt, verify_ledger
    from .record import RecordError

    def progress(entries: int) -> None:
        print(f"  ... {entries:,} entries checked", file=sys.stderr, flush=True)

    try:
        result = verify_ledger(Path(args.ledger), Path(args.keys), progress=progress)
    except (RecordError, KeyStoreError) as error:
        print(f"gputally audit verify: {error}", file=sys.stderr)
        return 2
    print(
        f"ledger {args.ledger}: {result.entries:,} entries from {len(result.nodes)} nodes, {result.checkpoints} checkpoints"
    )
    if result.ok:
        print("verified: every signature, every chain and every checkpoint holds")
        if args.receipt:
            when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            path = Path(args.receipt)
            try:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(Receipt.of(result, when).dumps() + "\n")
                tmp.replace(path)
            except OSError as error:
                print(f"gputally audit verify: --receipt: {error}", file=sys.stderr)
                return 2
            print(f"receipt: {path} (size {result.entries:,}, root {result.root.hex()[:16]}...)")
        return 0
    first = result.problems[0]
    where = f"entry {first.entry}" if first.entry is not None else "log"
    print(f"FAILED at {where}: {first.message}")
    if len(result.problems) > 1:
        print(f"({len(result.problems) - 1} more problems after it)")
    return 1


def _ledger_arguments(parser: argparse.ArgumentParser) -> None:
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


def _receipt_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--receipt",
        metavar="FILE",
        help="a receipt from `audit verify --receipt`: the signatures it covers are not checked again "
        "(every hash, chain and checkpoint still is; a ledger or key directory that differs from the "
        "receipt's is verified in full)",
    )


def _load_receipt(args: argparse.Namespace, command: str) -> Receipt | None:
    """The receipt named by --receipt (None without one); exits with a message when unusable."""
    from .audit import Receipt, ReceiptError

    if not args.receipt:
        return None
    try:
        return Receipt.load(Path(args.receipt))
    except ReceiptError as error:
        raise SystemExit(f"gputally audit {command}: {error}") from None


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


def run_enroll(args: argparse.Namespace) -> int:
    try:
        key = read_public_key(args.public_key, "PUBLIC_KEY")
        Path(args.keys).mkdir(parents=True, exist_ok=True)
        path = KeyStore(args.keys).enroll(args.node, key, rotate=args.rotate)
    except (KeyStoreError, OSError) as error:
        print(f"gputally enroll: {error}", file=sys.stderr)
        return 2
    print(f"enrolled {args.node}: {path}")
    return 0


def _publish_checkpoint_key(text: str, keys: Path, fallback: Path) -> None:
    """Put the checkpoint key's public half (collector.ckey) beside the agents' keys, where
    auditors read it (and should also check it out of band). A read-only key directory (a
    Kubernetes ConfigMap, /etc under systemd's ProtectSystem=strict) gets it beside the
    collector's private key instead, and the log says where."""
    from .ledger import COLLECTOR_KEY_FILE

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


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from . import server as ingest
    from .ledger import CheckpointError, Ledger
    from .ledger import load_or_create_key as load_or_create_ledger_key
    from .ledger import public_bytes as ledger_public_bytes
    from .metrics import make_app, make_registry, serve_http
    from .record import Record
    from .state import ClusterState

    record = Record(args.db) if args.db else None
    keys = KeyStore(args.keys, trust_on_first_use=args.trust_on_first_use) if args.keys else None
    if record is not None and keys is None:
        log.warning("no --keys: summaries cannot be verified, so none is recorded in %s", args.db)
    ledger = None
    if record is not None and keys is not None:
        key_path = Path(args.collector_key or f"{args.db}.key")
        key = load_or_create_ledger_key(key_path)
        ledger = Ledger(record, key, args.origin)
        _publish_checkpoint_key(
            f"{args.origin}\n{base64.b64encode(ledger_public_bytes(key)).decode()}\n",
            Path(args.keys),
            key_path.parent,
        )
    state = ClusterState(
        expected_gpus=args.expected_gpus,
        window=args.window,
        lag=args.lag,
        stale_after=args.stale_after,
        record=record,
        keys=keys,
    )
    server, grpc_port = await ingest.start(state, args.grpc_listen)
    http, _ = serve_http(
        make_app(make_registry(state), ready=lambda: not stop.is_set()), args.metrics_listen
    )
    host = args.metrics_listen.rpartition(":")[0] or "0.0.0.0"
    print(
        f"gputally collector: gRPC on {args.grpc_listen.rpartition(':')[0]}:{grpc_port}, "
        f"metrics on http://{host}:{http.server_port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    if args.expected_gpus is None:
        log.warning(
            "no --expected-gpus: ratios use the GPUs seen as the denominator, so GPUs that never report cannot lower them"
        )

    async def checkpoints() -> None:
        while ledger is not None:
            try:
                await asyncio.to_thread(ledger.checkpoint, time.time())
            except CheckpointError as error:
                log.error("checkpoint refused", extra={"kv": {"error": str(error)}})
            await asyncio.sleep(args.checkpoint_interval)

    signer = asyncio.ensure_future(checkpoints())
    try:
        await stop.wait()
    finally:
        signer.cancel()
        await server.stop(args.grace)
        if ledger is not None:
            with contextlib.suppress(CheckpointError):
                ledger.checkpoint(time.time())  # cover everything recorded before the stop
        http.shutdown()
        http.server_close()
        if record is not None:
            record.close()


def run(args: argparse.Namespace) -> int:
    from .record import RecordError

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    try:
        asyncio.run(main())
    except (OSError, RecordError, KeyStoreError) as error:
        print(f"gputally collector: {error}", file=sys.stderr)
        return 2
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a ratio in [0, 1], got {text} (write 85% as 0.85)"
        )
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float) -> float:
    """A point in time as unix seconds, from the forms the --from/--to help lists."""
    text = text.strip()
    if text == "now":
        return now
    if text.startswith("-") and text[-1:] in _UNITS:
        try:
            return now - float(text[1:-1]) * _UNITS[text[-1]]
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time; try 2026-03-01, 2026-03-01T08:00:00Z, -1h or now"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _fail(message: str) -> int:
    print(f"gputally: {message}", file=sys.stderr)
    return 2


def run_query(args: argparse.Namespace) -> int:
    from .figures import as_dict, compute
    from .record import Record, RecordError

    try:
        record = Record(args.db, readonly=True)
    except RecordError as error:
        return _fail(str(error))
    try:
        span = record.span()
        now = time.time()
        try:
            start = parse_time(args.start, now) if args.start else (span[0] / 1e9 if span else None)
            end = parse_time(args.end, now) if args.end else (span[1] / 1e9 if span else None)
        except ValueError as error:
            return _fail(str(error))
        if start is None or end is None:
            return _fail(f"{args.db} holds no summary yet; give --from and --to")
        if end <= start:
            return _fail("--to must be after --from")
        expected = args.expected_gpus or record.inventory_at(start)
        if expected is None:
            return _fail(
                "the record declares no inventory (the collector ran without --expected-gpus): give --expected-gpus"
            )
        start_ns, end_ns = int(start * 1e9), int(end * 1e9)
        figures = compute(record.summaries(start_ns, end_ns), start, end, expected)
    finally:
        record.close()
    answer = as_dict(figures, args.measure, args.claim)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render(answer, [name for name in args.by.split(",") if name]))
    return 0


# `query --by` choices: the breakdowns of figures.as_dict, and what each is over.
BREAKDOWNS = ("node", "model", "tenant", "job")
_OVER = {
    "node": "over the node's GPUs seen x the period",
    "model": "over the model's GPUs seen x the period",
    "tenant": "over the GPU-hours the tenant held; a shared MIG GPU by its slices",
    "job": "over the GPU-hours the job held; a shared MIG GPU by its slices",
}


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


def render(answer: dict[str, Any], by: Sequence[str] = ()) -> str:
    """The answer for a person: the claim's measure first, every other measure after, then
    the breakdowns asked for."""
    days = answer["seconds"] / 86400
    lines = [
        f"period      {answer['from']} .. {answer['to']} ({days:.2f} days)",
        f"inventory   {answer['expected_gpus']} GPUs declared, {answer['seen_gpus']} seen; "
        f"coverage {answer['coverage']:.1%}",
        "",
        f"{'measure':<12}{'figure':>9}{'lower':>9}{'upper':>9}   without padding",
    ]
    for name, b in answer["measures"].items():
        clean = answer["measures_without_padding"][name]
        mark = "  <" if name == answer["measure"] else ""
        lines.append(
            f"{name:<12}{b['figure']:>9.2%}{b['lower']:>9.2%}{b['upper']:>9.2%}   {clean['figure']:.2%}{mark}"
        )
    if answer["claim"] is not None:
        lines += [
            "",
            f"claim       {answer['measure']} >= {answer['claim']:.2%}: {answer['verdict'].upper()}"
            f"  (without flagged padding: {answer['without_padding']['verdict']})",
        ]
    lines += [
        "",
        f"energy      {answer['energy_kwh']:.3f} kWh",
        f"padding     {answer['padding_gpu_hours']:.2f} GPU-hours flagged"
        + "".join(
            f", {rule} {hours:.2f}" for rule, hours in answer["padding_gpu_hours_by_rule"].items()
        ),
    ]
    for warning in answer["warnings"]:
        lines.append(f"warning     {warning}")
    measures = list(answer["measures"])
    for name in by:
        rows = answer[f"by_{name}"]
        width = max([len(name), *(len(str(row["name"])) for row in rows)])
        lines += [
            "",
            f"by {name} ({_OVER[name]})",
            f"{name:<{width}}{'GPUs':>7}{'GPU-h':>10}"
            + "".join(f"{m:>11}" for m in measures)
            + f"{'kWh':>10}",
        ]
        for row in rows:
            lines.append(
                f"{row['name']:<{width}}{row['gpus']:>7}{row['gpu_hours']:>10.1f}"
                + "".join(f"{row[m]:>11.2%}" for m in measures)
                + f"{row['energy_kwh']:>10.2f}"
            )
        if not rows:
            lines.append("(none in this period)")
    return "\n".join(lines)
