"""`gputally simulate` and `gputally demo`: whole simulated clusters, no GPU needed."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from gputally.cli.options import FAILED, TIMES, count, fail, parse_time, port, positive

from ..cli import (
    UsageError,
    add_collector_option,
    add_duration_option,
    add_report_option,
    add_scenario_option,
    add_summary_options,
    client_tls,
    padding_rules,
    report_every,
)

# --fast samples every 5 minutes and summarises per hour unless told otherwise: one-second
# sampling over months would take hours, and the mock's integrals are exact at any interval.
FAST_INTERVAL_S = 300.0
FAST_SUMMARY_WINDOW_S = 3600.0


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    simulate = sub.add_parser(
        "simulate",
        help="run a whole simulated fleet of mock agents against a collector",
        description="Run every node of a scenario as a mock agent in one process, each node with its own "
        "stream to the collector, exactly as real agents would.",
        epilog=TIMES,
    )
    add_scenario_option(simulate)
    simulate.add_argument(
        "--fast",
        action="store_true",
        help="run on a virtual clock from --start for --days, as fast as possible, into a ledger (--ledger, --keys-out)",
    )
    simulate.add_argument(
        "--start",
        metavar="DATE",
        help="with --fast: when the simulated period starts, e.g. 2025-03-01 (UTC)",
    )
    simulate.add_argument(
        "--days", type=positive, metavar="N", help="with --fast: how many days to simulate"
    )
    simulate.add_argument(
        "--ledger",
        default="gputally-sim.db",
        metavar="PATH",
        help="with --fast: the ledger to write (default: %(default)s)",
    )
    simulate.add_argument(
        "--keys-out",
        default="gputally-sim-keys",
        metavar="DIR",
        help="with --fast: where the keys go (default: %(default)s)",
    )
    simulate.add_argument(
        "--expected-gpus",
        type=count,
        metavar="N",
        help="with --fast: the declared inventory (default: the scenario's GPUs)",
    )
    add_collector_option(simulate)
    simulate.add_argument(
        "--state-dir",
        default="gputally-sim-state",
        metavar="DIR",
        help="each simulated node's key, summary chain and spool, in DIR/<node>/, so that a "
        "fleet restarted continues where it stopped (a collector that enrolled its keys still "
        "knows it); empty for fresh keys every run (default: %(default)s)",
    )
    add_duration_option(simulate)
    simulate.add_argument(
        "--interval",
        type=positive,
        metavar="SECONDS",
        help=f"sampling interval (default: 1; with --fast: {FAST_INTERVAL_S:g})",
    )
    add_report_option(simulate)
    add_summary_options(simulate, window_default=f"300; with --fast: {FAST_SUMMARY_WINDOW_S:g}")
    simulate.set_defaults(handler=run_simulate)

    demo = sub.add_parser(
        "demo",
        help="start a collector and a simulated cluster, and show live utilization",
        description="Start a local collector and a simulated cluster, then show the cluster's utilization "
        "live in the terminal, read from the collector's /metrics exactly as Prometheus would.",
    )
    add_scenario_option(demo)
    demo.add_argument(
        "--duration",
        type=positive,
        metavar="SECONDS",
        help="stop after this long (default: until Ctrl-C)",
    )
    demo.add_argument(
        "--window",
        type=positive,
        default=10.0,
        metavar="SECONDS",
        help="the collector's live window (default: %(default)s)",
    )
    demo.add_argument(
        "--expected-gpus",
        type=count,
        metavar="N",
        help="declared inventory (default: the scenario's GPU count)",
    )
    demo.add_argument(
        "--grpc-port", type=port, default=0, help="collector gRPC port (default: a free port)"
    )
    demo.add_argument(
        "--metrics-port",
        type=port,
        default=0,
        help="collector /metrics port (default: a free port)",
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print a line per update instead of redrawing the screen",
    )
    demo.set_defaults(handler=run_demo)
    return {"simulate": simulate, "demo": demo}


def run_simulate(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError

    from ..chain import ChainStateError
    from .fleet import run_fleet
    from .scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(args.scenario)
        padding = padding_rules(args)
        tls = client_tls(args)
        every = report_every(
            args,
            args.interval or (FAST_INTERVAL_S if args.fast else 1.0),
            args.summary_window or (FAST_SUMMARY_WINDOW_S if args.fast else 300.0),
        )
    except (ScenarioError, UsageError) as error:
        return fail("simulate", str(error))
    if args.fast:
        return _run_fast(sc, args, padding)
    print(
        f"simulating {sc.nodes} nodes x {sc.gpus_per_node} GPUs ({sc.gpu_model}) -> {args.collector}",
        file=sys.stderr,
    )
    try:
        stats = asyncio.run(
            run_fleet(
                sc,
                args.collector,
                duration=args.duration,
                interval=args.interval or 1.0,
                report_every=every,
                summary_window=args.summary_window or 300.0,
                padding=padding,
                state_dir=Path(args.state_dir) if args.state_dir else None,
                sender_options={"tls": tls},
            )
        )
    except (KeyFileError, ChainStateError, OSError) as error:
        return fail("simulate", f"--state-dir {args.state_dir}: {error}")
    print(
        f"sent {stats.reports} reports from {stats.nodes} nodes; acknowledged {stats.acked}, dropped {stats.dropped}",
        file=sys.stderr,
    )
    if stats.refused:
        return fail(
            "simulate",
            f"the collector refused {stats.refused} of {stats.nodes} nodes: {stats.refusal}",
            FAILED,
        )
    return 0


def _run_fast(sc: Any, args: argparse.Namespace, padding: Any) -> int:
    from .demo import simulate_ledger

    if not args.start or not args.days:
        return fail("simulate", "--fast needs --start DATE and --days N")
    try:
        start = parse_time(args.start, time.time())
    except ValueError as error:
        return fail("simulate", f"--start: {error}")
    ledger, keys = Path(args.ledger), Path(args.keys_out)
    if ledger.exists():
        return fail("simulate", f"--ledger {ledger} exists: a simulation writes a new ledger")
    if not ledger.absolute().parent.is_dir():
        return fail("simulate", f"--ledger {ledger}: no such directory {ledger.parent}")
    return simulate_ledger(
        sc,
        start=start,
        days=args.days,
        ledger=ledger,
        keys=keys,
        interval=args.interval or FAST_INTERVAL_S,
        summary_window=args.summary_window or FAST_SUMMARY_WINDOW_S,
        expected_gpus=args.expected_gpus or sc.total_gpus,
        padding=padding,
    )


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo
    from .scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(args.scenario)
    except ScenarioError as error:
        return fail("demo", str(error))
    return demo(sc, args)
