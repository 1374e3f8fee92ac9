"""`gputally agent`: the daemon of every GPU node, and its one-shot and key commands.

Only what the parser needs is imported here: the daemon imports the rest when it runs, and
the agent's resident memory is a target of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gputally.cli.options import count, fail, optional_address, positive
from gputally.v1.accounting import MAX_SUMMARY_WINDOW_S

from .attribution import KUBELET_SOCKET
from .padding import DEFAULT_BURN_PATTERNS, PaddingRules

if TYPE_CHECKING:
    from gputally.cli.tls import ClientFiles

    from .sampler import Sampler

DEFAULT_COLLECTOR = "127.0.0.1:9471"


# -- options the agent shares with the simulations (gputally.agent.sim.cli) ------------------


def add_collector_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--collector",
        default=DEFAULT_COLLECTOR,
        metavar="HOST:PORT",
        help="collector gRPC address (default: %(default)s)",
    )
    group = parser.add_argument_group("TLS to the collector")
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the collector's certificate against the system's CAs "
        "(implied by --tls-ca) (default: plaintext)",
    )
    group.add_argument(
        "--tls-ca",
        default="",
        metavar="PEM",
        help="the CA that signed the collector's certificate (`gputally ca init` makes one)",
    )
    group.add_argument(
        "--tls-cert",
        default="",
        metavar="PEM",
        help="mutual TLS: this node's client certificate (`gputally ca issue --node NAME`), "
        "read again at every connection",
    )
    group.add_argument("--tls-key", default="", metavar="PEM", help="the key of --tls-cert")
    group.add_argument(
        "--tls-server-name",
        default="",
        metavar="NAME",
        help="the name the collector's certificate must carry, when it is not the host of "
        "--collector (default: that host)",
    )


def client_tls(args: argparse.Namespace) -> ClientFiles | None:
    """The TLS files the options name, checked now (a one-line UsageError), or None."""
    from gputally.cli.tls import ClientFiles, TlsError

    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        if args.tls_server_name:
            raise UsageError("--tls-server-name needs TLS (--tls or --tls-ca)")
        return None
    files = ClientFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    try:
        files.credentials()
    except TlsError as error:
        raise UsageError(str(error)) from None
    return files


def add_duration_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=positive,
        metavar="SECONDS",
        help="stop after this long (default: run until interrupted)",
    )


def add_scenario_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        metavar="FILE",
        help="scenario TOML for the mock (default: the built-in 4x8 H100 example)",
    )


def summary_window(text: str) -> float:
    """--summary-window: positive, and no longer than a collector records (one hour)."""
    value = positive(text)
    if value > MAX_SUMMARY_WINDOW_S:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_SUMMARY_WINDOW_S:g} s (collectors refuse longer windows), got {text}"
        )
    return value


def add_summary_options(
    parser: argparse.ArgumentParser, window_default: str = "%(default)s"
) -> None:
    """The options of what goes into the signed summaries. `window_default` says in the help
    what an unset --summary-window means, for commands whose default depends on a mode."""
    parser.add_argument(
        "--summary-window",
        type=summary_window,
        default=300.0 if window_default == "%(default)s" else None,
        metavar="SECONDS",
        help="length of the per-window summaries the collector records "
        f"(default: {window_default})",
    )
    parser.add_argument(
        "--padding-sustain",
        type=positive,
        default=300.0,
        metavar="SECONDS",
        help="how long busy-without-work or a flat line must last before it is flagged as padding (default: %(default)s)",
    )
    parser.add_argument(
        "--burn-patterns",
        default=",".join(DEFAULT_BURN_PATTERNS),
        metavar="REGEX,...",
        help="comma-separated regular expressions: a process whose command line matches one is a burn "
        "tool, flagged as padding at once (default: %(default)s)",
    )


class UsageError(ValueError):
    """An option value the parser could not refuse by itself; the message says which."""


def add_report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report-every",
        type=positive,
        metavar="SECONDS",
        help="send a report every SECONDS, each carrying the exact totals of every sample in it, "
        "so that no second is lost (e.g. 10 at 100,000 GPUs, to spare the collector; default: "
        "every sample)",
    )


def report_every(args: argparse.Namespace, interval: float, window: float) -> float | None:
    """--report-every, checked against the sampling interval and the summary window."""
    value: float | None = args.report_every
    if value is None:
        return None
    if value < interval:
        raise UsageError(
            f"--report-every {value:g}: reports cannot come more often than samples "
            f"(--interval {interval:g})"
        )
    if value > window:
        raise UsageError(
            f"--report-every {value:g}: at most the summary window ({window:g} s), which a "
            "report carries one of at a time"
        )
    return value


def padding_rules(args: argparse.Namespace) -> PaddingRules:
    patterns = tuple(p.strip() for p in args.burn_patterns.split(",") if p.strip())
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise UsageError(
                f"--burn-patterns: {pattern!r} is not a regular expression: {error}"
            ) from None
    return PaddingRules(sustain_seconds=args.padding_sustain, burn_patterns=patterns)


# -- the agent command -----------------------------------------------------------------------


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    agent = sub.add_parser(
        "agent",
        help="sample this node's GPUs and stream to a collector",
        description="Sample this node's GPUs every --interval seconds through NVML (or the mock) and "
        "stream the readings to the collector. Sampling never waits for the network: reports queue in "
        "a bounded outbox (--buffer-reports) while the collector is away.",
    )
    agent.add_argument(
        "--backend",
        choices=["nvml", "mock"],
        default="nvml",
        help="nvml: real GPUs; mock: a simulated node (default: %(default)s)",
    )
    add_scenario_option(agent)
    agent.add_argument(
        "--mock-node",
        type=int,
        default=0,
        metavar="N",
        help="which node of the scenario the mock plays (default: %(default)s)",
    )
    agent.add_argument(
        "--node",
        help="node name sent to the collector (default: the hostname; with the mock, the scenario's node name)",
    )
    agent.add_argument(
        "--state-dir",
        default=os.environ.get("STATE_DIRECTORY")
        or str(Path.home() / ".local" / "state" / "gputally"),
        metavar="DIR",
        help="where the node's signing key and summary chain live, in <DIR>/<node>/ "
        "(default: systemd's $STATE_DIRECTORY, else %(default)s)",
    )
    agent.add_argument(
        "--print-public-key",
        action="store_true",
        help="print this node's public key (base64, for `gputally enroll`) and exit; creates the key if needed",
    )
    add_collector_option(agent)
    agent.add_argument(
        "--interval",
        type=positive,
        default=1.0,
        metavar="SECONDS",
        help="sampling interval (default: %(default)s)",
    )
    add_report_option(agent)
    agent.add_argument(
        "--buffer-reports",
        type=count,
        default=3600,
        metavar="N",
        help="reports kept while the collector is unreachable (default: %(default)s)",
    )
    agent.add_argument(
        "--job-map",
        metavar="FILE",
        help="static attribution of GPUs to tenant/job: TOML [gpus] table keyed by GPU UUID or index",
    )
    agent.add_argument(
        "--slurm-gpu-dir",
        metavar="DIR",
        help="Slurm job mapping written by a prolog: one file per GPU (named by index or UUID) holding JOBID [USER]",
    )
    agent.add_argument(
        "--kubelet-socket",
        default=KUBELET_SOCKET,
        metavar="PATH",
        help="the kubelet's pod resources socket: a GPU allocated to a pod is attributed to its "
        "namespace (tenant) and name (job); used when it exists, empty to never ask "
        "(default: %(default)s)",
    )
    add_duration_option(agent)
    agent.add_argument(
        "--metrics-listen",
        type=optional_address,
        default="",
        metavar="HOST:PORT",
        help="also serve this node's per-GPU metrics on HOST:PORT/metrics, e.g. 0.0.0.0:9472 (default: off)",
    )
    agent.add_argument(
        "--web-config-file",
        default="",
        metavar="YAML",
        help="TLS and basic auth for --metrics-listen, in the Prometheus exporter-toolkit format "
        "(tls_server_config, basic_auth_users), read again when it changes (default: plain HTTP)",
    )
    agent.add_argument(
        "--once",
        action="store_true",
        help="read every GPU once, print the readings and exit (no collector needed)",
    )
    agent.add_argument("--json", action="store_true", help="with --once: print JSON")
    add_summary_options(agent)
    agent.set_defaults(handler=run_agent)
    return {"agent": agent}


def run_agent(args: argparse.Namespace) -> int:
    from .nvml import NvmlUnavailableError

    try:
        sampler = _sampler(args)
    except UsageError as error:
        return fail("agent", str(error))
    if args.print_public_key:
        from gputally.v1.signing import encode_public_key

        print(encode_public_key(sampler.signer.public_key))
        return 0
    try:
        sampler.open()
    except NvmlUnavailableError as error:
        return fail("agent", str(error))
    try:
        return _once(args, sampler) if args.once else _daemon(args, sampler)
    finally:
        sampler.close()


def _sampler(args: argparse.Namespace) -> Sampler:
    """This node's sampler, as the options say: its backend (NVML, or a scenario's node in
    the mock), its attribution and its signing key. UsageError when an option is unusable."""
    from gputally.v1.signing import KeyFileError, load_or_create_private_key

    from .attribution import Attributor, JobMapError, ProcessInspector
    from .backend import NvmlBackend
    from .chain import KEY_FILE, ChainStateError, SummarySigner
    from .sampler import Sampler

    node = args.node
    processes: ProcessInspector | None = None  # this host's, unless simulated
    if args.backend == "mock":
        from .sim.mock import MockNVML
        from .sim.scenario import ScenarioError, load_scenario

        try:
            sc = load_scenario(args.scenario)
        except ScenarioError as error:
            raise UsageError(str(error)) from None
        if not 0 <= args.mock_node < sc.nodes:
            raise UsageError(
                f"--mock-node {args.mock_node}: the scenario has nodes 0..{sc.nodes - 1}"
            )
        mock = MockNVML(sc, args.mock_node, time.time)
        backend, processes = NvmlBackend(mock), mock.processes
        node = node or sc.node_name(args.mock_node)
    elif args.scenario:
        raise UsageError("--scenario only applies to --backend mock")
    else:
        backend = NvmlBackend()
    try:
        attributor = Attributor(
            args.job_map, args.slurm_gpu_dir, args.kubelet_socket or None, processes=processes
        )
    except JobMapError as error:
        raise UsageError(f"--job-map: {error}") from None
    node = node or socket.gethostname()
    try:
        key_dir = Path(args.state_dir) / node
        signer = SummarySigner(load_or_create_private_key(key_dir / KEY_FILE), node, key_dir)
    except (KeyFileError, ChainStateError, OSError) as error:
        raise UsageError(f"--state-dir: {error}") from None
    return Sampler(
        backend,
        attributor=attributor,
        node=node,
        interval=args.interval,
        report_every=report_every(args, args.interval, args.summary_window),
        summary_window=args.summary_window,
        padding=padding_rules(args),
        signer=signer,
    )


def _once(args: argparse.Namespace, sampler: Sampler) -> int:
    """`--once`: one complete snapshot of the node, printed."""
    from .sampler import snapshot

    time.sleep(min(args.interval, 1.0))  # GPM and utilization need a short span to average over
    data = {
        "node": sampler.node,
        "backend": args.backend,
        "driver_version": sampler.backend.driver_version,
        **snapshot(sampler.inventory, sampler.read()),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for gpu in data["gpus"]:
            print(" ".join(f"{k}={v}" for k, v in gpu.items()))
    return 0


def _daemon(args: argparse.Namespace, sampler: Sampler) -> int:
    """The agent proper: sample, summarise, sign, send, until stopped."""
    from .node import NodeAgent

    try:
        tls = client_tls(args)
    except UsageError as error:
        return fail("agent", str(error))
    exporter = None
    if args.metrics_listen is not None:
        from prometheus_client import make_wsgi_app

        from gputally.cli.web import WebConfigError, serve_http

        from .exporter import NodeExporter, make_registry

        exporter = NodeExporter(sampler.hello(0, args.backend))
        listen = args.metrics_listen
        try:
            serve_http(
                make_wsgi_app(make_registry(exporter)),
                listen,
                args.web_config_file,
                name="gputally-agent-http",
            )
        except WebConfigError as error:
            return fail("agent", str(error))
        except (OSError, ValueError) as error:
            return fail("agent", f"--metrics-listen {listen}: {error}")
    elif args.web_config_file:
        return fail("agent", "--web-config-file applies to --metrics-listen, which is off")
    agent = NodeAgent(
        sampler,
        args.collector,
        backend_name=args.backend,
        sample_in_thread=args.backend == "nvml",
        sender_options={"max_buffer": args.buffer_reports, "tls": tls},
        on_report=exporter.update if exporter else None,
    )
    if exporter is not None:
        exporter.sender_stats = lambda: agent.sender.stats
    logging.getLogger("gputally.agent").info(
        "agent started",
        extra={
            "kv": {
                "node": sampler.node,
                "gpus": len(sampler.inventory),
                "collector": args.collector,
            }
        },
    )
    asyncio.run(agent.run(duration=args.duration))
    return 0
