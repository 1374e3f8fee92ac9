"""The collector's commands, plugged into ``gputally`` through the ``gputally.commands``
entry-point group."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from . import server as ingest
from .metrics import make_app, make_registry, serve_http
from .state import ClusterState

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


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    collector = sub.add_parser(
        "collector",
        help="receive agent streams and expose cluster utilization to Prometheus",
        description="Receive agent streams over gRPC, aggregate cluster utilization with the declared "
        "inventory as the denominator, and expose it on /metrics.",
    )
    add_collector_arguments(collector)
    collector.set_defaults(handler=run)
    return {"collector": collector}


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    state = ClusterState(
        expected_gpus=args.expected_gpus,
        window=args.window,
        lag=args.lag,
        stale_after=args.stale_after,
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
    try:
        await stop.wait()
    finally:
        await server.stop(args.grace)
        http.shutdown()
        http.server_close()


def run(args: argparse.Namespace) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    try:
        asyncio.run(main())
    except OSError as error:
        print(f"gputally collector: {error}", file=sys.stderr)
        return 2
    return 0
