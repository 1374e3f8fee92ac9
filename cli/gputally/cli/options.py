"""Argument types and exit codes every command shares: one parser per kind of value."""

from __future__ import annotations

import argparse
import math
import sys
from datetime import UTC, datetime
from typing import NamedTuple

# Exit codes, the same for every command.
OK = 0
FAILED = 1  # the command ran and its answer is "no": a ledger that does not verify
USAGE = 2  # bad input: an option, a file, a configuration; nothing was changed
PADDING_DECIDES = 3  # a claim's verdict turns on flagged padding: never a pass (query, report)
LEDGER = 4  # the collector refuses its ledger: running would fork or forget the log (collector)
UNAVAILABLE = 5  # the ledger's database server cannot be reached or refused us: try again later
INTERRUPTED = 130


def fail(command: str, message: str, code: int = USAGE) -> int:
    """Say what is wrong on one line of stderr, and give the exit code to return."""
    print(f"gputally {command}: {message}", file=sys.stderr)
    return code


def _number(text: str, kind: type[float] | type[int]) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def port(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), got {text}")
    return value


def positive(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def count(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a ratio in [0, 1], got {text} (write 85% as 0.85)"
        )
    return value


class Address(NamedTuple):
    """Where to listen: a host (empty: every interface) and a port (0: any free one)."""

    host: str
    port: int

    def __str__(self) -> str:  # what gRPC takes, and what --print-config prints
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def bind_host(self) -> str:
        return self.host or "0.0.0.0"


def address(text: str) -> Address:
    """HOST:PORT, [IPv6]:PORT or :PORT (every interface)."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:9470, got {text!r}")
    if host.startswith("[") != host.endswith("]"):
        raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    if ":" in host and not str(text).strip().startswith("["):
        raise argparse.ArgumentTypeError(f"write an IPv6 address in brackets: [{host}]:{port}")
    return Address(host, int(port))


def optional_address(text: str) -> Address | None:
    """An address, or an empty value for "off"."""
    return address(text) if str(text).strip() else None


TIMES = (
    "Times: YYYY-MM-DD, an ISO 8601 date-time (UTC unless it has an offset), unix seconds, "
    "'now', or a duration before now such as -1h, -30m, -7d (write it --from=-1h: a bare -1h "
    "looks like an option)."
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # what dates can name


def parse_time(text: str, now: float) -> float:
    """A point in time as unix seconds, from the forms TIMES lists, between 1970 and the
    year 9999; ValueError otherwise."""
    moment = _parse_time(text.strip(), now)
    if not 0 <= moment <= _LATEST:
        raise ValueError(f"{text.strip()!r} is not a time between 1970 and the year 9999")
    return moment


def _parse_time(text: str, now: float) -> float:
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
