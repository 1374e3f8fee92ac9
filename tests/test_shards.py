"""Collectors sharded on one PostgreSQL ledger: a simulated cluster split across two real
`gputally collector` processes, one node moved from one shard to the other midway, the
signing shard killed with SIGKILL and its role taken over by the other; the audit of the
shared ledger matches a single collector's run of the same scenario, figure for figure.

The fleet runs on a virtual clock (as `gputally simulate --fast` does): the same scenario
from the same start gives the same summaries, whoever records them. Agents are "behind one
address" as gRPC lets a target be: a list of addresses (`ipv4:A,B`), tried in order, so that
the agents of a shard that dies reconnect to the other one by themselves."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from gputally.agent.chain import KEY_FILE
from gputally.agent.node import NodeAgent
from gputally.agent.sim import scenario
from gputally.agent.sim.demo import scrape
from gputally.agent.sim.fleet import build_fleet
from gputally.agent.sim.mock import ManualClock
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.postgres import SIGNER_LOCK
from gputally.v1.signing import load_or_create_private_key, public_bytes

from .conftest import PostgresServer, free_port
from .factories import gputally_command

pytestmark = pytest.mark.slow

ORIGIN = "example.org/gputally-shards"
INTERVAL, SUMMARY_WINDOW, TICKS = 30.0, 300.0, 120  # one virtual hour, 12 windows a node
MOVE_AT, KILL_AT = 40, 80  # node-01 moves from shard A to B; shard A (the signer) is killed
# Reconnect fast; and plain gRPC channels, whose pick_first takes a target's addresses in
# the order given: each node starts on the shard the test puts it on (the agent's own options
# shuffle them, to spread real agents over the shards).
FAST: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.5, "channel_options": ()}
Event = Callable[[list[NodeAgent], dict[int, "asyncio.Task[None]"]], Awaitable[None]]


class Shard:
    """One `gputally collector` process."""

    def __init__(self, db: str, directory: Path, name: str, *, keys: Path):
        self.grpc, self.metrics = free_port(), free_port()
        self.process = subprocess.Popen(
            [*gputally_command(), "collector", f"--db={db}", f"--keys={keys}",
             f"--collector-key={directory / 'collector.key'}",
             f"--checkpoint-state={directory / f'{name}.checkpoint'}", f"--origin={ORIGIN}",
             f"--grpc-listen=127.0.0.1:{self.grpc}", f"--metrics-listen=127.0.0.1:{self.metrics}",
             "--checkpoint-interval=0.5", "--expected-gpus=32"],
            stderr=(directory / f"{name}.log").open("w"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/readyz", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((directory / f"{name}.log").read_text()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # it signs a last checkpoint as it stops
            self.process.wait(30)


@contextmanager
def shards(*made: Shard) -> Iterator[None]:
    try:
        yield
    finally:
        for shard in made:
            if shard.process.poll() is None:
                shard.process.kill()
                shard.process.wait(10)


def enrol(state_dir: Path, keys: Path) -> None:
    """Each simulated node's key, made in its state directory and enrolled beforehand: two
    collectors must not both enrol on first use into one key directory."""
    keys.mkdir(parents=True)
    store = KeyStore(keys)
    for node in range(scenario.default().nodes):
        name = scenario.default().node_name(node)
        store.enroll(name, public_bytes(load_or_create_private_key(state_dir / name / KEY_FILE)))


async def acknowledged(
    agents: list[NodeAgent], tasks: dict[int, asyncio.Task[None]], seconds: float = 60.0
) -> bool:
    """Whether every agent's collector acknowledged (and recorded) all it was sent."""
    for _ in range(int(seconds / 0.05)):
        if all(not a.sender.outbox and not a.sender.unrecorded for a in agents):
            return True
        await asyncio.sleep(0.05)
    return False


async def drive(
    targets: list[str], state_dir: Path, start: float, events: dict[int, Event]
) -> None:
    """The default scenario (4 nodes of 8 GPUs) on a virtual clock from `start`, node i
    streaming to targets[i], with `events` run before the ticks they are keyed by; every 10
    ticks everything sent must be acknowledged."""
    clock = ManualClock(start)
    agents = build_fleet(
        scenario.default(),
        targets[0],
        interval=INTERVAL,
        clock=clock,
        start=start,
        summary_window=SUMMARY_WINDOW,
        state_dir=state_dir,
        sender_options=FAST,
    )
    for agent, target in zip(agents, targets, strict=True):
        agent.collector = agent.sender.target = target
    tasks = {n: asyncio.ensure_future(agent.sender.run()) for n, agent in enumerate(agents)}
    try:
        for tick in range(1, TICKS + 1):
            clock.now = start + tick * INTERVAL
            if tick in events:
                await events[tick](agents, tasks)
            for agent in agents:
                report = agent.sampler.tick()
                assert report is not None
                agent.sender.submit(report)
            if tick % 10 == 0:
                assert await acknowledged(agents, tasks), f"not acknowledged by tick {tick}"
        for agent in agents:
            for report in agent.sampler.final_reports():
                agent.sender.submit(report)
        assert await acknowledged(agents, tasks)
    finally:
        for n, agent in enumerate(agents):
            agent.sender.stop()
            await tasks[n]
            agent.sampler.close()


def move(node: int, target: str) -> Event:
    """The node's agent restarts pointed at `target`: what it sent is acknowledged first,
    then a new agent life (a new stream, a new instance) goes on from the same sampler."""

    async def event(agents: list[NodeAgent], tasks: dict[int, asyncio.Task[None]]) -> None:
        old = agents[node]
        assert await acknowledged(agents, tasks)
        old.sender.stop()
        await tasks[node]
        agents[node] = NodeAgent(
            old.sampler, target, backend_name="mock", sample_in_thread=False, sender_options=FAST
        )
        tasks[node] = asyncio.ensure_future(agents[node].sender.run())

    return event


def streaming(shard: Shard) -> set[str]:
    """The nodes with a stream open to this shard now."""
    metrics = scrape(f"http://127.0.0.1:{shard.metrics}/metrics")
    return {dict(labels)["node"] for labels, up in metrics["gputally_node_up"].items() if up}


def signer_port(url: str) -> int | None:
    """The client port of the connection that holds the signing role (None: nobody's)."""
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.classid = %s AND l.granted",
            (SIGNER_LOCK,),
        ).fetchone()
    return None if row is None else int(row[0])


def holds_role(shard: Shard, url: str) -> bool:
    port = signer_port(url)
    return port is not None and any(
        c.laddr and c.laddr.port == port
        for c in psutil.Process(shard.process.pid).net_connections()
    )


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """How long `condition` took to hold (polled every 50 ms); fails after `seconds`."""
    began = time.monotonic()
    for _ in range(int(seconds / 0.05)):
        if condition():
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def sizes(url: str) -> tuple[int, int]:
    """(entries, the newest checkpoint's size) of the shared ledger."""
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT (SELECT count(*) FROM summaries),"
            " (SELECT coalesce(max(size), 0) FROM checkpoints)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def audit(ledger: str, keys: Path, out: Path, start: float) -> dict[str, Any]:
    """`audit verify` and `audit report` of the scenario's hour, as JSON."""
    command = gputally_command()
    verified = subprocess.run(
        [*command, "audit", "verify", f"--ledger={ledger}", f"--keys={keys}", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    reported = subprocess.run(
        [*command, "audit", "report", f"--ledger={ledger}", f"--keys={keys}",
         f"--from={start:.0f}", f"--to={start + TICKS * INTERVAL:.0f}", "--expected-gpus=32",
         "--claim=0.4", f"--out={out}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert reported.returncode == 0, reported.stderr
    return {
        "verify": json.loads(verified.stdout),
        "report": json.loads((out / "report.json").read_text()),
    }


def test_two_shards_on_one_postgresql_ledger_audit_as_one_collector(
    tmp_path: Path, postgres_url: str
) -> None:
    start = math.floor(time.time() / 3600) * 3600 - 2 * 3600  # a past hour, whole windows
    (tmp_path / "shared").mkdir()
    enrol(tmp_path / "fleet", tmp_path / "keys")
    a = Shard(postgres_url, tmp_path / "shared", "a", keys=tmp_path / "keys")
    with shards(a):
        wait_for(lambda: holds_role(a, postgres_url), 10)  # the first shard signs
        b = Shard(postgres_url, tmp_path / "shared", "b", keys=tmp_path / "keys")
        with shards(b):
            # behind one address: each agent tries its own shard first, then the other
            to_a = f"ipv4:127.0.0.1:{a.grpc},127.0.0.1:{b.grpc}"
            to_b = f"ipv4:127.0.0.1:{b.grpc},127.0.0.1:{a.grpc}"
            took: list[float] = []
            signed_by_a: list[int] = []

            async def kill_the_signer(*_: object) -> None:
                assert holds_role(a, postgres_url) and not holds_role(b, postgres_url)
                # the cluster is split: node-01 moved, node-00 is still on a (a shard's
                # /metrics may be a render a few seconds old: waited for)
                wait_for(lambda: streaming(b) == {"node-01", "node-02", "node-03"}, 15)
                wait_for(lambda: "node-00" in streaming(a), 15)
                os.kill(a.process.pid, signal.SIGKILL)
                a.process.wait(10)
                signed_by_a.append(sizes(postgres_url)[1])
                # the server sees a's connection close, frees the lock, and b takes it
                took.append(wait_for(lambda: holds_role(b, postgres_url), 15))

            async def all_on_b(*_: object) -> None:  # node-00 found b by itself
                wait_for(lambda: streaming(b) == {"node-00", "node-01", "node-02", "node-03"}, 15)

            events = {MOVE_AT: move(1, to_b), KILL_AT: kill_the_signer, KILL_AT + 11: all_on_b}
            asyncio.run(drive([to_a, to_a, to_b, to_b], tmp_path / "fleet", start, events))
            assert a.process.wait(10) == -signal.SIGKILL
            # b signs everything recorded, beyond what a had signed
            wait_for(lambda: (lambda n: n[0] == n[1])(sizes(postgres_url)), 20)
            b.stop()
            assert b.process.returncode == 0
    assert took and took[0] < 5.0, took
    assert 0 < signed_by_a[0] < sizes(postgres_url)[1] == 48

    # The same scenario through one collector (its SQLite file), for the figures to match.
    enrol(tmp_path / "fleet-1", tmp_path / "keys-1")
    (tmp_path / "single").mkdir()
    one = Shard(str(tmp_path / "single.db"), tmp_path / "single", "one", keys=tmp_path / "keys-1")
    with shards(one):
        target = f"127.0.0.1:{one.grpc}"
        asyncio.run(drive([target] * 4, tmp_path / "fleet-1", start, {MOVE_AT: move(1, target)}))
        one.stop()

    shared = audit(postgres_url, tmp_path / "keys", tmp_path / "report-shared", start)
    single = audit(str(tmp_path / "single.db"), tmp_path / "keys-1", tmp_path / "report-1", start)
    for answer in (shared, single):
        verified = answer["verify"]
        assert (verified["verified"], verified["entries"], verified["nodes"]) == (True, 48, 4)
        assert verified["findings"] == {}
        # what differs by construction: which keys signed (so the root), how many checkpoints
        # were signed when, where the ledger is
        for different in ("verification", "evidence"):
            answer["report"].pop(different)
    assert shared["report"] == single["report"]
    # and the figures are the scenario's: half the GPUs allocated, 0.45 busy
    assert shared["report"]["measures"]["allocated"]["figure"] == pytest.approx(0.5, abs=1e-9)


def ready(shard: Shard) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{shard.metrics}/readyz", timeout=5):
            return True
    except urllib.error.HTTPError as error:
        assert error.code == 503
        return False


def test_a_ledger_out_of_reach_stops_recording_and_it_resumes_with_nothing_lost(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The ledger's database refuses connections and drops the collector's (a restart, a
    network cut) before the nodes' summaries of one window come in: the first append fails
    (committed or not, unknown), recording stops (/readyz 503), and the collector tries the
    server every few seconds. When it answers again, the streams of the nodes whose
    summaries went unrecorded are ended (UNAVAILABLE); their agents reconnect and send them
    again, in order, and the record says which it holds. No restart, no summary lost or
    counted twice, no chain broken, checkpoints signed again."""
    start = math.floor(time.time() / 3600) * 3600 - 2 * 3600
    database = postgres_url.rsplit("/", 1)[1]
    (tmp_path / "one").mkdir()
    enrol(tmp_path / "fleet", tmp_path / "keys")
    one = Shard(postgres_url, tmp_path / "one", "one", keys=tmp_path / "keys")
    outage: list[float] = []
    connects: list[int] = []

    def admin(statement: str) -> int:
        with psycopg.connect(postgres_server.url(), autocommit=True) as db:
            cursor = db.execute(statement)
            return len(cursor.fetchall()) if cursor.description else 0

    def restore() -> None:  # once recording has stopped, the database lets them in again
        outage.append(wait_for(lambda: not ready(one), 30))
        time.sleep(1.0)
        admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
        outage.append(wait_for(lambda: ready(one), 30))

    restoring = threading.Thread(target=restore)

    async def cut(*_: object) -> None:  # before tick 40's summaries (every 10 ticks)
        admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
        dropped = admin(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND application_name = 'gputally'"
        )
        assert dropped >= 1  # the record's connection, and the signing role's
        restoring.start()

    async def count_streams(agents: list[NodeAgent], _: object) -> None:
        connects.extend(a.sender.stats.connects for a in agents)

    def unrecorded() -> float:
        metrics = scrape(f"http://127.0.0.1:{one.metrics}/metrics")["gputally_node_summaries_total"]
        return sum(v for labels, v in metrics.items() if dict(labels)["result"] == "unrecorded")

    try:
        with shards(one):
            target = f"127.0.0.1:{one.grpc}"
            events: dict[int, Event] = {38: cut, 60: count_streams}
            asyncio.run(drive([target] * 4, tmp_path / "fleet", start, events))
            restoring.join(60)
            wait_for(lambda: (lambda n: n[0] == n[1])(sizes(postgres_url)), 20)  # all signed
            wait_for(lambda: unrecorded() >= 1, 15)  # (/metrics is a render of a few s ago)
            one.stop()
    finally:
        admin(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
    assert one.process.returncode == 0 and len(outage) == 2, outage
    log = (tmp_path / "one" / "one.log").read_text()
    assert "the ledger answers again: recording resumes" in log, log[-3000:]
    # the nodes whose summaries went unrecorded streamed again
    assert sum(connects) > 4 and all(c >= 1 for c in connects), connects
    assert sizes(postgres_url) == (48, 48)  # 4 nodes x 12 windows, each once
    verified = audit(postgres_url, tmp_path / "keys", tmp_path / "report", start)["verify"]
    assert (verified["verified"], verified["entries"], verified["nodes"]) == (True, 48, 4)
    assert verified["findings"] == {}  # no chain broken, nothing twice
