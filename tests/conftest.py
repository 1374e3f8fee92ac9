"""Shared test fixtures: an in-process collector on loopback, and the CI rule for binaries."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gputally.cli.options import address
from gputally.cli.web import serve_http
from gputally.collector.live import server as ingest
from gputally.collector.live.metrics import make_app, make_registry
from gputally.collector.live.state import ClusterState
from gputally.collector.live.validate import TimeLimits

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-messages",
        type=int,
        default=100_000,
        help="mutated messages the in-process fuzz run sends (tests/test_fuzz.py)",
    )


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """A command run in-process (main([...])) installs its log handler on the root logger,
    writing to that test's captured stderr: put the root logger back, so that no later test
    logs into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def require_binary(name: str, package: str = "prometheus") -> str:
    """Path of a binary a test needs. Missing: a failure in CI, a skip elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: apt-get install {package})"
    if IN_CI:
        pytest.fail(f"{message}; CI must have it, see .ci/run")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Collector:
    """A real collector (grpc.aio ingest + HTTP exposition) on loopback, on its own thread."""

    def __init__(self, *, tls: ingest.Tls | None = None, **state_options: Any):
        self.tls = tls or ingest.Tls()
        # Most tests replay fixed 2026 times on virtual clocks: no horizon, no skew limit,
        # unless a test sets its own (the limits have tests of their own).
        state_options.setdefault(
            "limits", TimeLimits(horizon=math.inf, skew=math.inf, backlog=math.inf)
        )
        self.state = ClusterState(**state_options)  # record=Record(...) keeps a durable record
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("collector did not start")
        self.http, _ = serve_http(
            make_app(make_registry(self.state), ready=lambda: ""), address("127.0.0.1:0")
        )
        self.metrics_url = f"http://127.0.0.1:{self.http.server_port}/metrics"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self.server, port, self.service = await ingest.start(
                self.state, "127.0.0.1:0", self.tls
            )
            self.target = f"127.0.0.1:{port}"

        self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()

    def call(self, fn: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(15)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return  # already stopped
        self.call(lambda: self.server.stop(0.5))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(**options: Any) -> Collector:
        collector = Collector(**options)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.stop()
