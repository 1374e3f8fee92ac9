"""The collector's commands: `collector`, `query` and `enroll` (the auditor's are in
audit/cli.py).

Only what the parsers need is imported here; each command imports the rest when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

from gputally.cli.options import (
    LEDGER,
    PADDING_DECIDES,
    TIMES,
    UNAVAILABLE,
    address,
    count,
    fail,
    fraction,
    non_negative,
    parse_time,
    positive,
)
from gputally.v1.accounting import RECORDED_MEASURES

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
        default="127.0.0.1:9471",
        metavar="HOST:PORT",
        help="where agents connect; on any address but loopback, only with --tls-cert (or "
        "--insecure), e.g. 0.0.0.0:9471 (default: %(default)s)",
    )
    parser.add_argument(
        "--share-port",
        action="store_true",
        help="let other collectors of this user listen on the same --grpc-listen port, the "
        "kernel spreading the agents' connections over them (SO_REUSEPORT): shards of one "
        "cluster on one machine, on one postgresql:// --db or without a record (default: a "
        "second collector on the port is refused)",
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
        type=non_negative,
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
        "--metrics-refresh",
        type=non_negative,
        default=5.0,
        metavar="SECONDS",
        help="while /metrics is scraped, render it this often and serve that render: a scrape "
        "then costs a copy, not a render (about half a second at 10,000 GPUs); 0 renders at "
        "every scrape (default: %(default)s)",
    )
    parser.add_argument(
        "--node-metrics",
        choices=("all", "none"),
        default="all",
        help="each node's own series on /metrics (about 32 a node), or none: the cluster's "
        "figures only, for clusters of 100,000 GPUs whose agents' own /metrics are scraped for "
        "per-node detail; the node alerts and dashboard panels need them (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=non_negative,
        default=5.0,
        metavar="SECONDS",
        help="on shutdown, time given to open streams (default: %(default)s)",
    )
    parser.add_argument(
        "--db",
        default="gputally.db",
        metavar="PATH|URL",
        help="the durable record of every summary, read by `gputally query`: a SQLite file "
        "(WAL), or a PostgreSQL database that the collector's shards share, "
        "postgresql://USER@HOST/DB (then give --collector-key and --checkpoint-state; keep the "
        "password in PGPASSFILE rather than in the URL); empty to keep none "
        "(default: %(default)s)",
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
        help="the collector's Ed25519 key that signs checkpoints, created on first use; every "
        "shard of a PostgreSQL --db holds the same one (default: <db>.key; required with a URL)",
    )
    parser.add_argument(
        "--origin",
        default=f"gputally/{socket.gethostname()}",
        help="the log's name in its checkpoints and the key name auditors verify them with: "
        "printable ASCII without spaces or '+', fixed when the ledger is created "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-state",
        default="",
        metavar="PATH",
        help="where the latest signed checkpoint is remembered, outside the ledger, so that a "
        "ledger rolled back, cut short or replaced is refused at start; keep it with the "
        "collector's key, off the ledger's disk if you can; each shard of a PostgreSQL --db "
        "has its own (default: <db>.checkpoint; required with a URL)",
    )
    parser.add_argument(
        "--startup-check",
        choices=("incremental", "full"),
        default="incremental",
        help="incremental: at start, rehash only the entries after the remembered checkpoint and "
        "go on from its frontier, rehashing the older ones while running (damage found then stops "
        "intake); full: rehash every entry before listening (minutes on a 90-day ledger of 10,000 "
        "GPUs, see benchmarks/ledger_start.py) (default: %(default)s)",
    )
    parser.add_argument(
        "--horizon",
        type=positive,
        default=7 * 86400.0,
        metavar="SECONDS",
        help="reports and summaries older than this are refused (an agent's spool after a "
        "collector outage must fit in it) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-skew",
        type=non_negative,
        default=300.0,
        metavar="SECONDS",
        help="how far ahead of the collector's clock an agent's report or summary may end "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--live-backlog",
        type=non_negative,
        default=3600.0,
        metavar="SECONDS",
        help="how many seconds a node's live reports may run ahead of the time the collector "
        "has seen pass since its first report: the backlog an agent's outbox brings after an "
        "outage; beyond, they are clipped (the record still gets the signed summaries) "
        "(default: %(default)s)",
    )
    _add_security_options(parser)
    _add_limit_options(parser)
    parser.add_argument(
        "--record-retry",
        type=positive,
        default=5.0,
        metavar="SECONDS",
        help="how often a ledger whose server is out of reach (a postgresql:// --db) is tried "
        "again; recording waits meanwhile and /readyz says why (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=positive,
        default=60.0,
        metavar="SECONDS",
        help="how often to sign a checkpoint when the log grew (default: %(default)s)",
    )
    group = parser.add_argument_group(
        "witnesses", "outside parties that cosign the checkpoints (gputally witness; docs/audit.md)"
    )
    group.add_argument(
        "--witnesses",
        default="",
        metavar="FILE",
        help="the witnesses to send each new checkpoint to, with a consistency proof: one per line, "
        "`<witness verifier key> <URL>` (the key `gputally witness init` printed); their "
        "cosignatures are kept in the ledger (default: none)",
    )
    group.add_argument(
        "--witness-ca",
        default="",
        metavar="PEM",
        help="CA certificates for https:// witnesses (default: the system's)",
    )
    group.add_argument(
        "--witness-timeout",
        type=positive,
        default=10.0,
        metavar="SECONDS",
        help="how long one witness may take to answer (default: %(default)s)",
    )


def _add_security_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and authentication")
    group.add_argument(
        "--tls-cert",
        default="",
        metavar="PEM",
        help="the gRPC listener's certificate (chain), read again when it changes; "
        "`gputally ca` makes one (default: none, plaintext)",
    )
    group.add_argument("--tls-key", default="", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        default="",
        metavar="PEM",
        help="mutual TLS: accept only agents whose client certificate this CA signed, and "
        "whose certificate names the node they speak for (default: no client certificate)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext gRPC on a non-loopback --grpc-listen: anyone on the network "
        "can read the stream (and, without --keys, send reports) (default: refused)",
    )
    group.add_argument(
        "--web-config-file",
        default="",
        metavar="YAML",
        help="TLS and basic auth for /metrics, /healthz and /readyz, in the Prometheus "
        "exporter-toolkit format (tls_server_config, basic_auth_users with bcrypt hashes: "
        "`gputally web-password`), read again when it changes (default: plain HTTP)",
    )


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    from .live.validate import Limits

    group = parser.add_argument_group(
        "limits", "what one agent may send and the collector keeps (docs/reliability.md)"
    )
    for flag, kind, metavar, text in (
        (
            "--max-message-bytes",
            count,
            "BYTES",
            "largest message accepted (RESOURCE_EXHAUSTED beyond)",
        ),
        ("--max-batch-reports", count, "N", "reports in one batch"),
        ("--max-gpus", count, "N", "GPUs in one Hello"),
        ("--max-string", count, "BYTES", "longest text kept: versions, tenants, jobs"),
        ("--max-items", count, "N", "entries of a list in one GPU sample (processes, XIDs, MIG)"),
        ("--max-streams", count, "N", "agent streams speaking for a node, in total"),
        (
            "--max-pending-streams",
            count,
            "N",
            "streams opened that have not yet proven a node's key (their own budget)",
        ),
        ("--max-streams-per-peer", count, "N", "open agent streams from one IP address"),
        ("--max-nodes", count, "N", "nodes in the live state (new ones refused beyond)"),
        ("--evict-after", positive, "SECONDS", "forget a node without stream or report this long"),
        (
            "--hello-timeout",
            positive,
            "SECONDS",
            "time a new stream has to send its Hello and Proof",
        ),
        (
            "--max-refusals-per-peer",
            count,
            "N",
            "streams refused from one IP address in 10 s before its next ones are refused at "
            "once, unread and unlogged",
        ),
        ("--max-models", count, "N", 'GPU models shown by name; others are "(other)"'),
        ("--max-xid-codes", count, "N", 'XID codes shown per node; others are "other"'),
    ):
        default = getattr(Limits(), flag.removeprefix("--").replace("-", "_"))
        group.add_argument(
            flag,
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{text} (default: %(default)s)",
        )


def add_period_options(
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


def add_claim_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--measure",
        default="busy",
        choices=list(RECORDED_MEASURES),
        help="the measure the claim is about (default: %(default)s)",
    )
    parser.add_argument(
        "--claim", type=fraction, metavar="RATIO", help="claimed ratio in [0, 1], e.g. 0.85"
    )


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    collector = sub.add_parser(
        "collector",
        help="receive agent streams and expose cluster utilization to Prometheus",
        description="Receive agent streams over gRPC, aggregate cluster utilization with the declared "
        "inventory as the denominator, and expose it on /metrics.",
        epilog=f"Exit status {LEDGER} when the ledger is refused at start (missing, shorter than or "
        "inconsistent with the latest checkpoint remembered in --checkpoint-state, or another "
        "--origin): restore it, never start a new one under the same key. Status 2 for bad "
        f"options or unreadable files; {UNAVAILABLE} when a PostgreSQL --db cannot be reached.",
    )
    _add_collector_options(collector)
    collector.set_defaults(handler=run_collector)

    return {"collector": collector, "query": _register_query(sub), "enroll": _register_enroll(sub)}


# The exit status of a claim's verdict, for the --help of `query` and `audit report`.
VERDICT_EXITS = (
    f"Exit status {PADDING_DECIDES} where flagged padding decides the claim's verdict (it differs "
    "without flagged padding, e.g. 'supported only by flagged padding; refuted without it'): "
    "never a pass. Any other verdict is an answer, status 0; bad input is status 2."
)


def _register_query(sub: Any) -> argparse.ArgumentParser:
    query: argparse.ArgumentParser = sub.add_parser(
        "query",
        help="utilization figures, bounds and a verdict for any past period, from the collector's record",
        description="Compute every utilization measure for a period from the collector's record "
        "(docs/utilization.md): the figure, its lower and upper bounds, coverage, energy, padding, "
        "breakdowns, and the verdict on a claim.",
        epilog=f"{VERDICT_EXITS} {TIMES}",
    )
    query.add_argument(
        "--db",
        default="gputally.db",
        metavar="PATH|URL",
        help="the collector's record: its --db file or PostgreSQL URL (default: %(default)s)",
    )
    add_period_options(query, required=False)
    add_claim_options(query)
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

    from gputally.cli.tls import TlsError
    from gputally.cli.web import WebConfigError
    from gputally.v1.signing import KeyFileError

    from .live.server import Settings, serve
    from .record.ledger import LedgerStartError
    from .record.store import RecordError, is_url
    from .record.witnessing import WitnessConfigError

    if args.share_port and args.db and not is_url(args.db):
        # each shard would sign a log of its own in its own file, every node's chain split
        return fail(
            "collector",
            "--share-port: collectors sharing a port are shards of one cluster: give them one "
            "postgresql:// --db (a SQLite ledger has one writer), or no record",
        )
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
    except LedgerStartError as error:
        return fail("collector", str(error), LEDGER)
    except RecordError as error:
        return fail("collector", str(error), error.exit_code)
    except (
        OSError,
        KeyFileError,
        TlsError,
        WebConfigError,
        WitnessConfigError,
    ) as error:
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
    from google.protobuf.message import DecodeError

    from .audit.figures import as_dict, compute, render_text
    from .record.store import Record, RecordError

    try:
        record = Record(args.db, readonly=True)
    except RecordError as error:
        return fail("query", str(error), error.exit_code)
    try:
        span = record.span()
        now = time.time()
        try:
            start = parse_time(args.start, now) if args.start else (span[0] / 1e9 if span else None)
            end = parse_time(args.end, now) if args.end else (span[1] / 1e9 if span else None)
        except ValueError as error:
            return fail("query", str(error))
        if start is None or end is None:
            return fail("query", f"{record.where} holds no summary yet; give --from and --to")
        if end <= start:
            return fail("query", "--to must be after --from")
        expected = args.expected_gpus or record.inventory_at(start)
        if expected is None:
            return fail(
                "query",
                "the record declares no inventory (the collector ran without --expected-gpus): give --expected-gpus",
            )
        try:
            figures = compute(
                record.summaries(int(start * 1e9), int(end * 1e9)), start, end, expected
            )
        except DecodeError:
            return fail(
                "query",
                f"{record.where} holds an entry that is not a summary: the record is damaged; "
                "`gputally audit verify` names it",
            )
    except RecordError as error:  # a damaged page, a server gone in the middle
        return fail("query", str(error), error.exit_code)
    finally:
        record.close()
    answer = as_dict(figures, args.measure, args.claim)
    # Where the denominator came from: the inventory row the collector wrote is its operator's
    # --expected-gpus, which nothing signs; and query reads the record without verifying it.
    answer["inventory_source"] = (
        "given (--expected-gpus)"
        if args.expected_gpus
        else "the collector's --expected-gpus, an unsigned row of the record"
    )
    answer["verified"] = False
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render_text(answer, [name for name in args.by.split(",") if name]))
        if not args.expected_gpus:
            print(
                "note        the inventory is the collector's --expected-gpus (an unsigned row of "
                "the record): give --expected-gpus for the inventory a claim is about"
            )
        print(
            "note        read from the record as it is, unverified: `gputally audit report` "
            "checks every signature, chain and checkpoint first"
        )
    # A verdict that flagged padding changes is never a pass (docs/utilization.md §8).
    return PADDING_DECIDES if answer["padding_decides"] else 0
