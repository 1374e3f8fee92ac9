"""Shared test fixtures: an in-process collector on loopback, a PostgreSQL server of the
session's own, and the CI rule for binaries."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
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


def postgres_binary(name: str) -> str:
    """Path of one of PostgreSQL's server programs (initdb, postgres): Debian keeps them off
    PATH, under their major version (15 in bookworm; the newest installed wins). Missing: a
    failure in CI, a skip elsewhere."""
    installed = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    return str(installed[-1]) if installed else require_binary(name, "postgresql")


class PostgresServer:
    """A real PostgreSQL server of its own in a temporary directory, listening only on
    127.0.0.1 (and a Unix socket in that directory), password authentication over TCP.

    PostgreSQL refuses to run as root, and tests run as root here and in CI: then it runs as
    the `postgres` user (which `apt-get install postgresql` creates), owning its directory."""

    USER, PASSWORD = "gputally", "gputally-test-password"

    def __init__(self) -> None:
        initdb, postgres = postgres_binary("initdb"), postgres_binary("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="gputally-pg-"))
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                message = "PostgreSQL will not run as root and there is no `postgres` user"
                if IN_CI:
                    pytest.fail(f"{message}; CI must have one, see .ci/run")
                pytest.skip(message)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        password = self.dir / "password"
        password.write_text(self.PASSWORD + "\n")
        if as_user:
            os.chown(password, as_user["user"], as_user["group"])
        subprocess.run(
            [initdb, f"--pgdata={self.dir / 'data'}", f"--username={self.USER}",
             f"--pwfile={password}", "--auth-host=scram-sha-256", "--auth-local=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=120, cwd=self.dir, **as_user,
        )  # fmt: skip
        self.port = free_port()
        self.log = (self.dir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [postgres, "-D", str(self.dir / "data"), "-c", "listen_addresses=127.0.0.1",
             "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.dir}",
             "-c", "max_connections=60", "-c", "shared_buffers=32MB"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, **as_user,
        )  # fmt: skip
        self._databases = itertools.count(1)
        self._wait_ready(30.0)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        secret = self.PASSWORD if password is None else password
        return f"postgresql://{self.USER}:{secret}@127.0.0.1:{self.port}/{database}"

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        "PostgreSQL did not start: " + (self.dir / "server.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"ledger_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: no waiting for clients
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (starting one takes a few seconds)."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh database of the session's server, for one test."""
    return postgres_server.create_database()


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
