"""The ``gputally`` command.

Subcommands are plugged in through the ``gputally.commands`` entry-point group (see
pyproject.toml), so the agent's and the collector's commands live with their own code and
neither package imports the other (the agent's own commands skip the discovery: see
``OWN_COMMANDS``). This module also gives every subcommand the same
configuration rules and logging:

* configuration: a flag beats an environment variable (``GPUTALLY_<COMMAND>_<OPTION>``), which
  beats the TOML file given by ``--config`` (keys as the long option names, at top level or in a
  ``[<command>]`` table), which beats the built-in default; ``--print-config`` shows the result;
* logging: structured (logfmt or JSON lines) on stderr, quiet (warnings) by default.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .attribution import KUBELET_SOCKET
from .padding import DEFAULT_BURN_PATTERNS, PaddingRules

log = logging.getLogger("gputally.agent")

DEFAULT_COLLECTOR = "127.0.0.1:9471"
Handler = Callable[[argparse.Namespace], int]

# -- logging ---------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    def __init__(self, style: str):
        super().__init__()
        self.style_name = style

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "kv", {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.style_name == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())


def _logfmt(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\n'):
        return text
    return json.dumps(text)


def setup_logging(level: str, style: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(style))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- configuration ---------------------------------------------------------------------------

# Not configuration: what the command line alone says (the file to read, what to print).
# The logging options are configuration like any other (flag, environment, file).
_COMMON = {"help", "config", "print_config", "handler"}


class ConfigError(ValueError):
    pass


def _convert(action: argparse.Action, raw: Any, source: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}: expected true or false, got {raw!r}")
    value = raw
    if action.type is not None and not (
        isinstance(raw, int | float) and action.type in (int, float)
    ):
        try:
            value = action.type(raw)  # type: ignore[operator]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ConfigError(f"{source}: {error}") from None
    elif isinstance(raw, int | float) and action.type is float:
        value = float(raw)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(
            f"{source}: {value!r} is not one of {', '.join(map(str, action.choices))}"
        )
    return value


def config_defaults(
    parser: argparse.ArgumentParser, command: str, config: str | None
) -> dict[str, Any]:
    """Defaults for one subcommand from its TOML file and the environment."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _COMMON}
    values: dict[str, Any] = {}
    if config:
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--config {path}: not valid TOML: {error}") from None
        table = data.get(command, data) if isinstance(data.get(command), dict) else data
        for key, raw in table.items():
            if isinstance(raw, dict):
                continue  # another command's table
            dest = key.replace("-", "_")
            if dest not in actions:
                raise ConfigError(
                    f"{path}: unknown key {key!r} for `gputally {command}`; see `gputally {command} --help`"
                )
            values[dest] = _convert(actions[dest], raw, f"{path}: {key}")
    prefix = f"GPUTALLY_{command.upper()}_"
    for dest, action in actions.items():
        name = prefix + dest.upper()
        if name in os.environ:
            values[dest] = _convert(action, os.environ[name], name)
    return values


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration and logging")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of option values (keys as the long option names)",
    )
    group.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML and exit",
    )
    group.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="default: %(default)s",
    )
    group.add_argument(
        "--log-format", default="logfmt", choices=["logfmt", "json"], help="default: %(default)s"
    )


def _print_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for action in parser._actions:
        if not action.option_strings or action.dest in _COMMON:
            continue
        value = getattr(args, action.dest, None)
        key = action.option_strings[-1].lstrip("-")
        if value is None:
            print(f"# {key} = (not set)")
        elif isinstance(value, bool):
            print(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            print(f"{key} = {value}")
        else:
            print(f"{key} = {json.dumps(str(value))}")


# The commands `register` below defines. For these (the agent daemon runs on every node), the
# parser is built without the entry-point discovery, whose imports (importlib.metadata and the
# collector's modules) would cost the daemon megabytes that it keeps for its whole life.
OWN_COMMANDS = ("agent", "simulate", "demo")


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `gputally` parser with every plugged-in command, or only this module's own when
    `command` is one of them."""
    parser = argparse.ArgumentParser(
        prog="gputally",
        description="Real, auditable GPU cluster utilization. Agents sample NVML on every node and "
        "stream to a collector that exposes Prometheus metrics.",
        epilog="Run `gputally COMMAND --help` for a command's options. Start with `gputally demo`.",
    )
    parser.add_argument("--version", action="version", version=f"gputally {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}
    if command in OWN_COMMANDS:
        commands.update(register(sub))
    else:
        from importlib.metadata import entry_points

        for entry in sorted(entry_points(group="gputally.commands"), key=lambda e: e.name):
            plugin: Callable[[Any], dict[str, argparse.ArgumentParser]] = entry.load()
            commands.update(plugin(sub))
    for command_parser in commands.values():
        _add_common(command_parser)
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    command_parser = commands[args.command]
    try:
        command_parser.set_defaults(**config_defaults(command_parser, args.command, args.config))
    except ConfigError as error:
        parser.exit(2, f"gputally {args.command}: configuration error: {error}\n")
    args = parser.parse_args(argv)
    if args.print_config:
        _print_config(command_parser, args)
        return 0
    setup_logging(args.log_level, args.log_format)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


# -- the agent's own commands ----------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_summary_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--summary-window",
        type=_positive,
        default=300.0,
        metavar="SECONDS",
        help="length of the per-window summaries the collector records (default: %(default)s)",
    )
    parser.add_argument(
        "--padding-sustain",
        type=_positive,
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


def _padding_rules(args: argparse.Namespace) -> PaddingRules:
    patterns = tuple(p.strip() for p in args.burn_patterns.split(",") if p.strip())
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise SystemExit(
                f"gputally: --burn-patterns: {pattern!r} is not a regular expression: {error}"
            ) from None
    return PaddingRules(sustain_seconds=args.padding_sustain, burn_patterns=patterns)


def _add_mock_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        metavar="FILE",
        help="scenario TOML for the mock (default: the built-in 4x8 H100 example)",
    )


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
    _add_mock_options(agent)
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
    agent.add_argument(
        "--collector",
        default=DEFAULT_COLLECTOR,
        metavar="HOST:PORT",
        help="collector gRPC address (default: %(default)s)",
    )
    agent.add_argument(
        "--interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="sampling interval (default: %(default)s)",
    )
    agent.add_argument(
        "--buffer-reports",
        type=int,
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
    agent.add_argument(
        "--duration",
        type=_positive,
        metavar="SECONDS",
        help="stop after this long (default: run until interrupted)",
    )
    agent.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="also serve this node's per-GPU metrics on HOST:PORT/metrics, e.g. 0.0.0.0:9472 (default: off)",
    )
    agent.add_argument(
        "--once",
        action="store_true",
        help="read every GPU once, print the readings and exit (no collector needed)",
    )
    agent.add_argument("--json", action="store_true", help="with --once: print JSON")
    _add_summary_options(agent)
    agent.set_defaults(handler=_run_agent)

    simulate = sub.add_parser(
        "simulate",
        help="run a whole simulated fleet of mock agents against a collector",
        description="Run every node of a scenario as a mock agent in one process, each node with its own "
        "stream to the collector, exactly as real agents would.",
    )
    _add_mock_options(simulate)
    simulate.add_argument(
        "--fast",
        action="store_true",
        help="run on a virtual clock from --start for --days, as fast as possible, into a ledger (--ledger, --keys-out)",
    )
    simulate.add_argument(
        "--start",
        metavar="DATE",
        help="with --fast: when the simulated period starts (UTC), e.g. 2025-03-01",
    )
    simulate.add_argument(
        "--days", type=_positive, metavar="N", help="with --fast: how many days to simulate"
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
        type=int,
        metavar="N",
        help="with --fast: the declared inventory (default: the scenario's GPUs)",
    )
    simulate.add_argument(
        "--collector",
        default=DEFAULT_COLLECTOR,
        metavar="HOST:PORT",
        help="collector gRPC address (default: %(default)s)",
    )
    simulate.add_argument(
        "--duration",
        type=_positive,
        metavar="SECONDS",
        help="stop after this long (default: run until interrupted)",
    )
    simulate.add_argument(
        "--interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="sampling interval (default: %(default)s)",
    )
    _add_summary_options(simulate)
    simulate.set_defaults(handler=_run_simulate)

    demo = sub.add_parser(
        "demo",
        help="start a collector and a simulated cluster, and show live utilization",
        description="Start a local collector and a simulated cluster, then show the cluster's utilization "
        "live in the terminal, read from the collector's /metrics exactly as Prometheus would.",
    )
    _add_mock_options(demo)
    demo.add_argument(
        "--duration",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: until Ctrl-C)",
    )
    demo.add_argument(
        "--window",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="the collector's live window (default: %(default)s)",
    )
    demo.add_argument(
        "--expected-gpus",
        type=int,
        metavar="N",
        help="declared inventory (default: the scenario's GPU count)",
    )
    demo.add_argument(
        "--grpc-port", type=int, default=0, help="collector gRPC port (default: a free port)"
    )
    demo.add_argument(
        "--metrics-port", type=int, default=0, help="collector /metrics port (default: a free port)"
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print a line per update instead of redrawing the screen",
    )
    demo.set_defaults(handler=_run_demo)
    return {"agent": agent, "simulate": simulate, "demo": demo}


def _load_scenario(path: str | None) -> Any:
    from . import scenario

    return scenario.load(path) if path else scenario.default()


def _fail(message: str) -> int:
    print(f"gputally: {message}", file=sys.stderr)
    return 2


def _run_agent(args: argparse.Namespace) -> int:
    from .attribution import Attributor, JobMapError
    from .mock import MockNVML
    from .node import NodeAgent
    from .nvml import NvmlBackend, NvmlUnavailableError
    from .sampler import Sampler, snapshot
    from .scenario import ScenarioError
    from .signing import KEY_FILE, KeyFileError, SummarySigner, load_or_create_key

    try:
        attributor = Attributor(args.job_map, args.slurm_gpu_dir, args.kubelet_socket or None)
    except JobMapError as error:
        return _fail(f"--job-map: {error}")
    node = args.node
    if args.backend == "mock":
        try:
            sc = _load_scenario(args.scenario)
        except ScenarioError as error:
            return _fail(str(error))
        if not 0 <= args.mock_node < sc.nodes:
            return _fail(f"--mock-node {args.mock_node}: the scenario has nodes 0..{sc.nodes - 1}")
        backend = NvmlBackend(MockNVML(sc, args.mock_node, time.time), attributor=attributor)
        node = node or sc.node_name(args.mock_node)
    else:
        if args.scenario:
            return _fail("--scenario only applies to --backend mock")
        backend = NvmlBackend(attributor=attributor)
    node = node or socket.gethostname()
    try:
        key_dir = Path(args.state_dir) / node
        key = load_or_create_key(key_dir / KEY_FILE)
        signer = SummarySigner(key, node, key_dir)
    except (KeyFileError, OSError) as error:
        return _fail(f"--state-dir: {error}")
    if args.print_public_key:
        print(base64.b64encode(signer.public_key).decode())
        return 0
    sampler = Sampler(
        backend,
        node=node,
        interval=args.interval,
        summary_window=args.summary_window,
        padding=_padding_rules(args),
        signer=signer,
    )
    try:
        inventory = sampler.open()
    except NvmlUnavailableError as error:
        return _fail(str(error))
    try:
        if args.once:
            time.sleep(
                min(args.interval, 1.0)
            )  # GPM and utilization need a short span to average over
            readings = backend.read()
            data = {
                "node": sampler.node,
                "backend": args.backend,
                "driver_version": backend.driver_version,
                **snapshot(inventory, readings),
            }
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                for gpu in data["gpus"]:
                    print(" ".join(f"{k}={v}" for k, v in gpu.items()))
            return 0
        exporter = None
        if args.metrics_listen:
            from prometheus_client import start_http_server

            from .exporter import NodeExporter, make_registry

            host, _, port = args.metrics_listen.rpartition(":")
            exporter = NodeExporter(sampler.hello(0, args.backend))
            try:
                start_http_server(
                    int(port), addr=host.strip("[]") or "0.0.0.0", registry=make_registry(exporter)
                )
            except (OSError, ValueError) as error:
                return _fail(f"--metrics-listen {args.metrics_listen}: {error}")
        agent = NodeAgent(
            sampler,
            args.collector,
            backend_name=args.backend,
            sample_in_thread=args.backend == "nvml",
            sender_options={"max_buffer": args.buffer_reports},
            on_report=exporter.update if exporter else None,
        )
        if exporter is not None:
            exporter.sender_stats = lambda: agent.sender.stats
        log.info(
            "agent started",
            extra={
                "kv": {"node": sampler.node, "gpus": len(inventory), "collector": args.collector}
            },
        )
        asyncio.run(agent.run(duration=args.duration))
        return 0
    finally:
        sampler.close()


def _run_simulate(args: argparse.Namespace) -> int:
    from .scenario import ScenarioError
    from .simulate import run_fleet

    try:
        sc = _load_scenario(args.scenario)
    except ScenarioError as error:
        return _fail(str(error))
    if args.fast:
        return _run_fast(sc, args)
    print(
        f"simulating {sc.nodes} nodes x {sc.gpus_per_node} GPUs ({sc.gpu_model}) -> {args.collector}",
        file=sys.stderr,
    )
    stats = asyncio.run(
        run_fleet(
            sc,
            args.collector,
            duration=args.duration,
            interval=args.interval,
            summary_window=args.summary_window,
            padding=_padding_rules(args),
        )
    )
    print(
        f"sent {stats.reports} reports from {stats.nodes} nodes; acknowledged {stats.acked}, dropped {stats.dropped}",
        file=sys.stderr,
    )
    return 0


def _run_fast(sc: Any, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from .demo import simulate_ledger

    if not args.start or not args.days:
        return _fail("--fast needs --start DATE and --days N")
    try:
        moment = datetime.fromisoformat(args.start.replace("Z", "+00:00"))
    except ValueError:
        return _fail(f"--start {args.start!r}: not a date, e.g. 2025-03-01")
    start = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    ledger, keys = Path(args.ledger), Path(args.keys_out)
    if ledger.exists():
        return _fail(f"--ledger {ledger} exists: a simulation writes a new ledger")
    # One-second sampling over months would take hours: --fast samples every 5 minutes unless
    # told otherwise (the mock's integrals stay exact) and summarises per hour.
    interval = args.interval if args.interval != 1.0 else 300.0
    window = args.summary_window if args.summary_window != 300.0 else 3600.0
    return simulate_ledger(
        sc,
        start=start,
        days=args.days,
        ledger=ledger,
        keys=keys,
        interval=interval,
        summary_window=window,
        expected_gpus=args.expected_gpus or sc.total_gpus,
    )


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .scenario import ScenarioError

    try:
        sc = _load_scenario(args.scenario)
    except ScenarioError as error:
        return _fail(str(error))
    return run_demo(sc, args)
