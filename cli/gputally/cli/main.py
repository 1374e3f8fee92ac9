"""``gputally``: the parser, the configuration rules and the logging of every subcommand.

* Commands live with their code: each module in ``COMMANDS`` has a ``register(sub)`` that adds
  its commands (each with a ``handler``) and returns their parsers. Only the module of the
  command being run is imported, so the agent daemon never carries the collector's modules,
  nor the auditor's commands the agent's.
* Configuration: a flag beats an environment variable (``GPUTALLY_<COMMAND>_<OPTION>``), which
  beats the TOML file given by ``--config`` (keys as the long option names, at top level or in a
  ``[<command>]`` table), which beats the built-in default; ``--print-config`` shows the result.
* Logging: structured (logfmt or JSON lines) on stderr, quiet (warnings) by default.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gputally.v1 import __version__

from .options import INTERRUPTED, USAGE

Handler = Callable[[argparse.Namespace], int]
Register = Callable[[Any], dict[str, argparse.ArgumentParser]]

# Every command, and the module whose `register` defines it, in the order `--help` lists them.
COMMANDS = {
    "agent": "gputally.agent.cli",
    "collector": "gputally.collector.cli",
    "query": "gputally.collector.cli",
    "enroll": "gputally.collector.cli",
    "ca": "gputally.cli.ca",
    "witness": "gputally.collector.witness",
    "audit": "gputally.collector.audit.cli",
    "enrolment": "gputally.collector.audit.enrolment",
    "simulate": "gputally.agent.sim.cli",
    "demo": "gputally.agent.sim.cli",
    "web-password": "gputally.cli.web",
}

# -- logging ---------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    """One record per line: ts, level, logger, msg, then the record's `kv` fields."""

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
    parser: argparse.ArgumentParser, command: str | Sequence[str], config: str | None
) -> dict[str, Any]:
    """Defaults for one subcommand from its TOML file and the environment. A command of
    several words (`witness serve`) reads the table [witness.serve] (or [witness], or the top
    level) and the variables GPUTALLY_WITNESS_SERVE_<OPTION>."""
    words = [command] if isinstance(command, str) else list(command)
    command = " ".join(words)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _COMMON}
    values: dict[str, Any] = {}
    if config:
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except OSError as error:
            raise ConfigError(f"--config {path}: {error.strerror or error}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"--config {path}: not valid TOML: {error}") from None
        table = data
        for part in words:
            if not isinstance(table.get(part), dict):
                break
            table = table[part]
        for key, raw in table.items():
            if isinstance(raw, dict):
                continue  # another command's table
            dest = key.replace("-", "_")
            if dest not in actions:
                raise ConfigError(
                    f"{path}: unknown key {key!r} for `gputally {command}`; see `gputally {command} --help`"
                )
            values[dest] = _convert(actions[dest], raw, f"{path}: {key}")
    prefix = "GPUTALLY_" + "_".join(words).upper().replace("-", "_") + "_"
    for dest, action in actions.items():
        name = prefix + dest.upper()
        if name in os.environ:
            values[dest] = _convert(action, os.environ[name], name)
    return values


def _add_common(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """The configuration and logging options. A command of several words (`witness serve`)
    takes them after every word: the inner ones leave unset what the outer one set
    (argparse.SUPPRESS), so `witness --log-level info serve` and `witness serve --log-level
    info` mean the same."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if nested else value

    group = parser.add_argument_group("configuration and logging")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help="TOML file of option values (keys as the long option names; a command of several "
        "words also reads its [<word>.<word>] table)",
    )
    group.add_argument(
        "--print-config",
        action="store_true",
        default=default(False),
        help="print the effective configuration as TOML and exit",
    )
    group.add_argument(
        "--log-level",
        default=default("warning"),
        choices=["debug", "info", "warning", "error"],
        help="default: warning",
    )
    group.add_argument(
        "--log-format",
        default=default("logfmt"),
        choices=["logfmt", "json"],
        help="default: logfmt",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for inner in dict.fromkeys(action.choices.values()):
                _add_common(inner, nested=True)


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


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `gputally` parser with every command, or only the commands of the module that
    defines `command` when it names one."""
    parser = argparse.ArgumentParser(
        prog="gputally",
        description="Real, auditable GPU cluster utilization. Agents sample NVML on every node and "
        "stream to a collector that exposes Prometheus metrics and keeps a signed record.",
        epilog="Run `gputally COMMAND --help` for a command's options. Start with `gputally demo`.",
    )
    parser.add_argument("--version", action="version", version=f"gputally {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    commands: dict[str, argparse.ArgumentParser] = {}
    for name in modules:
        register: Register = importlib.import_module(name).register
        commands.update(register(sub))
    for command_parser in commands.values():
        _add_common(command_parser)
    return parser, commands


def _innermost(
    parser: argparse.ArgumentParser, args: argparse.Namespace, path: list[str]
) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the command being run, for a command of several words (`audit verify`,
    `witness serve`), and those words."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _innermost(action.choices[chosen], args, [*path, chosen])
    return parser, path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    command_parser, path = _innermost(commands[args.command], args, [args.command])
    try:
        command_parser.set_defaults(**config_defaults(command_parser, path, args.config))
    except ConfigError as error:
        parser.exit(USAGE, f"gputally {args.command}: configuration error: {error}\n")
    args = parser.parse_args(argv)
    if args.print_config:
        _print_config(command_parser, args)
        return 0
    setup_logging(args.log_level, args.log_format)
    # grpc's C core logs every failed TLS handshake (a port scan, a plaintext client) at
    # INFO on stderr, outside our structured log: keep it to errors unless asked otherwise.
    # Read when grpc first loads, which no command has done by now.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return INTERRUPTED
