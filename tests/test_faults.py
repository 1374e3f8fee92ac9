"""Faults injected into real processes over loopback: `gputally collector`, `gputally
simulate` and `gputally agent` started as an SRE starts them, then killed with SIGKILL (or
stopped with SIGSTOP) while they stream, and started again on the same files.

What must hold afterwards is what docs/audit.md promises: every node's chain 1..k exactly
once, `audit verify` clean, the seconds the agents observed complete in the record (and in
the live counters once the backlog arrives), the seconds nobody observed missing, and
nothing counted twice. Every wait has a deadline; every figure measured is printed
(`pytest -s` shows them).
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gputally.agent.sim.demo import scrape
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb

from .conftest import free_port
from .factories import gputally_command

Metrics = dict[str, dict[tuple[tuple[str, str], ...], float]]

NODES = 2
GPUS_PER_NODE = 2
GPUS = NODES * GPUS_PER_NODE
NODE_NAMES = tuple(f"node-{n:02d}" for n in range(NODES))  # scenario.node_name
WINDOW_S = 5.0  # --summary-window
INTERVAL_S = 0.5  # --interval
# The collector outage of test 2, and how long the agent of test 3 stays dead.
OUTAGE_S = 60.0
AGENT_DOWN_S = 10.0
# An agent retries a refused connection with jittered exponential backoff capped at 30 s
# (Sender.backoff_max): after an outage of more than ~16 s its next attempt can come up to
# 30 s after the collector is back, so a run that outlives an outage must last that long.
BACKOFF_MAX_S = 30.0
START_S = 30.0  # a process start (imports, a ledger check) on a loaded 2-core machine
ORIGIN = "example.org/gputally-faults"

# 2 nodes x 2 GPUs; node-00's two GPUs run a steady job (busy 0.9), node-01's are idle.
SCENARIO = f"""\
[cluster]
nodes = {NODES}
gpus_per_node = {GPUS_PER_NODE}
gpu_model = "NVIDIA H100 80GB HBM3"

[[workload]]
share = 0.5
kind = "steady"
busy = 0.9
sm_active = 0.6
power_fraction = 0.8
"""


# -- processes -------------------------------------------------------------------------------


class Processes:
    """Every process a test starts, each with its stderr in a file of its own (a pipe nobody
    reads would stall a chatty process); whatever still runs at the end is killed."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.logs.mkdir()
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{len(self.started):02d}-{name}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [*gputally_command(), *args], stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.started.append((process, log))
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        path = next(log for p, log in self.started if p is process)
        return path.read_text(errors="replace")[-4000:]

    def logs_text(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for _, log in self.started
        )

    def finish(self, process: subprocess.Popen[bytes], timeout: float) -> str:
        """Wait (bounded) for a process that ends by itself; its log, once it exited 0."""
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:g} s\n{self.logs_text()}") from None
        assert code == 0, self.log(process)
        return self.log(process)

    def kill_all(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path / "logs")
    try:
        yield started
    finally:
        started.kill_all()


def gputally(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gputally_command(), *args], capture_output=True, text=True, timeout=timeout
    )


def wait_for(
    what: str,
    condition: Callable[[], bool],
    timeout: float,
    explain: Callable[[], str] = lambda: "",
    step: float = 0.1,
) -> float:
    """Poll `condition` until it holds (the time it did) or `timeout` s pass (a failure)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s\n{explain()}")
        time.sleep(step)
    return time.time()


def http_status(url: str) -> int:
    """The status of a GET; 0 while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


class CollectorProcess:
    """`gputally collector` on fixed loopback ports and files, started again on the same ones
    after a fault."""

    def __init__(self, processes: Processes, home: Path, expected_gpus: int = GPUS):
        self.processes = processes
        self.home = home
        self.db = home / "ledger.db"
        self.keys = home / "keys"
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        while self.metrics_port == self.grpc_port:
            self.metrics_port = free_port()
        self.expected_gpus = expected_gpus
        self.process: subprocess.Popen[bytes] | None = None
        self.lives = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> float:
        """Start it and wait until /healthz answers; the seconds that took."""
        began = time.monotonic()
        self.lives += 1
        self.process = self.processes.start(
            f"collector-{self.lives}",
            "collector",
            f"--db={self.db}",
            f"--keys={self.keys}",
            "--trust-on-first-use",
            f"--collector-key={self.home / 'collector.key'}",
            f"--origin={ORIGIN}",
            f"--grpc-listen={self.target}",
            f"--metrics-listen=127.0.0.1:{self.metrics_port}",
            f"--expected-gpus={self.expected_gpus}",
            "--checkpoint-interval=2",
            "--window=5",
            "--lag=1",
            "--stale-after=5",
        )
        wait_for("the collector's /healthz", self._healthy, START_S, self._log)
        return time.monotonic() - began

    def _log(self) -> str:
        return self.processes.log(self.process) if self.process is not None else ""

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the collector exited with {self.process.returncode}\n{self._log()}"
            )
        return http_status(f"{self.url}/healthz") == 200

    def metrics(self) -> Metrics:
        """The collector's /metrics; empty while it does not answer."""
        try:
            return scrape(f"{self.url}/metrics")
        except OSError:
            return {}

    def recorded(self, node: str) -> float:
        return metric(self.metrics(), "gputally_node_summaries_total", node=node, result="recorded")

    def kill(self) -> float:
        """SIGKILL: no last checkpoint, no goodbye to the streams. The time it was sent."""
        assert self.process is not None
        at = time.time()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        return at

    def stop(self) -> None:
        """SIGTERM, as systemd stops it: it signs a last checkpoint and exits 0."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.processes.finish(self.process, 30.0)


# -- the record ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One recorded summary, as its agent signed it."""

    node: str
    chain_seq: int
    start: float
    end: float
    present: tuple[float, ...]  # seconds each GPU was observed in the window
    signed: bytes  # the SignedSummary as recorded


def read_ledger(db: Path) -> list[Entry]:
    record = Record(db, readonly=True)
    try:
        entries = []
        for _, node, body, _ in record.entries():
            s = pb.Summary.FromString(pb.SignedSummary.FromString(body).body)
            assert s.node == node
            entries.append(
                Entry(
                    node,
                    s.chain_seq,
                    s.window_start_unix_nano / 1e9,
                    s.window_end_unix_nano / 1e9,
                    tuple(g.present_seconds for g in s.gpus),
                    body,
                )
            )
        return entries
    finally:
        record.close()


def by_node(entries: list[Entry]) -> dict[str, list[Entry]]:
    """Each node's entries in chain order."""
    out: dict[str, list[Entry]] = {}
    for entry in entries:
        out.setdefault(entry.node, []).append(entry)
    return {node: sorted(found, key=lambda e: e.chain_seq) for node, found in sorted(out.items())}


def assert_chains_whole(entries: list[Entry]) -> dict[str, int]:
    """Every node's chain numbers are 1..k, each exactly once; {node: k}."""
    chains = {node: [e.chain_seq for e in found] for node, found in by_node(entries).items()}
    assert set(chains) == set(NODE_NAMES)
    for node, numbers in chains.items():
        assert numbers == list(range(1, len(numbers) + 1)), (node, numbers)
    return {node: len(numbers) for node, numbers in chains.items()}


def last_sample(entries: list[Entry]) -> float:
    """When the node's agent took its last sample: its last (flushed, partial) window is
    covered from its start to there, every GPU alike."""
    last = entries[-1]
    assert len(set(last.present)) == 1, last
    return last.start + last.present[0]


def stalls(entries: list[Entry]) -> str:
    """What the agents left unobserved inside their lives (windows other than each node's
    first and last, less any whose neighbour is not adjacent: a restart), in GPU-seconds by
    node: a tick more than two intervals late (a stalled process) covers only two."""
    lost = {}
    for node, found in by_node(entries).items():
        inner = [
            e
            for before, e, after in zip(found, found[1:], found[2:], strict=False)
            if before.end == e.start and e.end == after.start
        ]
        lost[node] = round(sum(WINDOW_S * len(e.present) - sum(e.present) for e in inner), 3)
    return f"lost to stalls (GPU-s): {lost}"


def verify(collector: CollectorProcess) -> dict[str, Any]:
    """`gputally audit verify --json`: exit 0, verified, no finding of any kind."""
    done = gputally(
        "audit", "verify", f"--ledger={collector.db}", f"--keys={collector.keys}", "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    assert answer["verified"] is True
    assert answer["findings"] == {}  # no chain gap, rewrite, overlap, signature, checkpoint...
    assert answer["nodes"] == NODES and answer["checkpoints"] >= 1
    return answer


def query(db: Path, start: float, end: float) -> dict[str, Any]:
    done = gputally(
        "query", f"--db={db}", f"--from={start:.0f}", f"--to={end:.0f}", "--json", "--by=node"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    assert answer["seconds"] == end - start and answer["expected_gpus"] == GPUS
    return answer


def node_rows(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in answer["by_node"]}


def observed_seconds(row: dict[str, Any]) -> float:
    """A node's observed GPU-seconds in a query's period (`gpu_hours` is its present time)."""
    return float(row["gpu_hours"]) * 3600.0


def spool(state: Path, node: str) -> dict[int, bytes]:
    """The node's spooled summaries (signed, not yet recorded by its word), by chain number."""
    return {int(p.stem): p.read_bytes() for p in (state / node / "spool").glob("*.summary")}


def spooled(state: Path, node: str) -> int:
    return len(spool(state, node))


def boundaries(after: float, upto: float) -> int:
    """Summary windows ending in (after, upto]."""
    return max(0, math.floor(upto / WINDOW_S) - math.floor(after / WINDOW_S))


# Sums of 0.5 s slices split pro rata at window edges, at unix times of 1.8e9 s (a float's
# step there is 2.4e-7 s): exact to far better than this, and a lost report would be 0.5 s.
# No other slack on coverage: an agent process stalled for more than two intervals (1 s)
# leaves the rest of the stall unobserved, honestly, and such a failure says so (stalls()).
FLOAT_SLACK = 1e-6


def simulate(
    processes: Processes, tmp_path: Path, collector: CollectorProcess, duration: float
) -> subprocess.Popen[bytes]:
    scenario = tmp_path / "cluster.toml"
    scenario.write_text(SCENARIO)
    return processes.start(
        "simulate",
        "simulate",
        f"--scenario={scenario}",
        f"--collector={collector.target}",
        f"--state-dir={tmp_path / 'state'}",
        f"--summary-window={WINDOW_S:g}",
        f"--interval={INTERVAL_S:g}",
        f"--duration={duration:g}",
    )


def mid_stream(collector: CollectorProcess, processes: Processes, timeout: float) -> float:
    """Wait until every node has two summaries recorded and a checkpoint was signed."""

    def streaming() -> bool:
        return (collector.db.with_name("ledger.db.checkpoint").exists()) and all(
            collector.recorded(node) >= 2 for node in NODE_NAMES
        )

    return wait_for("two summaries of every node recorded", streaming, timeout, processes.logs_text)


# -- 1. kill -9 the collector while agents stream --------------------------------------------


def test_a_collector_killed_mid_stream_and_restarted_loses_and_doubles_no_summary(
    tmp_path: Path, processes: Processes
) -> None:
    collector = CollectorProcess(processes, tmp_path)
    collector.start()
    began = time.time()
    fleet = simulate(processes, tmp_path, collector, duration=25.0)
    mid_stream(collector, processes, 2 * WINDOW_S + START_S)
    before = {node: collector.recorded(node) for node in NODE_NAMES}
    killed = collector.kill()
    restart = collector.start()
    err = processes.finish(fleet, 25.0 + 2 * START_S)
    assert "dropped 0" in err  # no report left an outbox unsent
    metrics = collector.metrics()
    collector.stop()

    answer = verify(collector)
    entries = read_ledger(collector.db)
    chains = assert_chains_whole(entries)
    assert answer["entries"] == len(entries) == sum(chains.values())
    for node, found in by_node(entries).items():
        assert chains[node] > before[node] >= 2  # killed mid-stream, and it went on after
        # one agent life: its windows follow each other without a gap
        assert all(a.end == b.start for a, b in itertools.pairwise(found)), node
        assert spooled(tmp_path / "state", node) == 0  # everything signed was recorded
        assert metric(metrics, "gputally_node_chain_breaks_total", node=node) == 0
    # the whole windows every node covered are covered completely: the kill lost no second
    nodes = by_node(entries).values()
    start, end = max(found[1].start for found in nodes), min(found[-1].start for found in nodes)
    figures = query(collector.db, start, end)
    assert figures["coverage"] == pytest.approx(1.0, abs=FLOAT_SLACK), stalls(entries)
    assert figures["summaries"] == NODES * (end - start) / WINDOW_S
    print(
        f"\ncollector killed {killed - began:.1f} s into the run, healthy again after "
        f"{restart:.2f} s; recorded before the kill {before}; chains {chains}; resent after "
        "the restart "
        + str(
            {
                n: metric(metrics, "gputally_node_summaries_total", node=n, result="resent")
                for n in NODE_NAMES
            }
        )
        + f"; coverage of [{start:.0f}, {end:.0f}) = {figures['coverage']!r}; {stalls(entries)}"
    )


# -- 2. a collector outage -------------------------------------------------------------------


def test_a_collector_outage_is_filled_by_the_backlog_in_the_record_and_the_counters(
    tmp_path: Path, processes: Processes
) -> None:
    collector = CollectorProcess(processes, tmp_path)
    collector.start()
    began = time.time()
    before_kill = 2 * WINDOW_S + 5.0  # at most this long after the start: two windows recorded
    duration = before_kill + OUTAGE_S + 5.0 + BACKOFF_MAX_S + 5.0
    fleet = simulate(processes, tmp_path, collector, duration=duration)
    mid_stream(collector, processes, before_kill)
    killed = collector.kill()
    time.sleep(max(0.0, killed + OUTAGE_S - time.time()))
    # the agents kept sampling: each window closed in the outage is signed and spooled
    state = tmp_path / "state"
    backlog = {node: spooled(state, node) for node in NODE_NAMES}
    for node in NODE_NAMES:
        assert backlog[node] >= boundaries(killed, time.time() - 2 * INTERVAL_S), backlog
    restarted = time.time()
    restart = collector.start()
    assert time.time() - began < duration - BACKOFF_MAX_S, (
        "the run would end before its agents reconnect"
    )
    err = processes.finish(fleet, duration + START_S)
    assert "dropped 0" in err  # the outbox held the whole outage
    metrics = collector.metrics()
    collector.stop()

    verify(collector)
    entries = read_ledger(collector.db)
    assert_chains_whole(entries)
    for node in NODE_NAMES:
        assert spooled(state, node) == 0
    # the outage's windows: complete, the scenario's figures exactly
    start = math.ceil(killed / WINDOW_S) * WINDOW_S
    end = math.floor(restarted / WINDOW_S) * WINDOW_S
    figures = query(collector.db, start, end)
    assert figures["coverage"] == pytest.approx(1.0, abs=FLOAT_SLACK), stalls(entries)
    assert figures["summaries"] == NODES * (end - start) / WINDOW_S
    assert figures["measures"]["busy"]["figure"] == pytest.approx(0.45, abs=FLOAT_SLACK)
    assert figures["measures"]["allocated"]["figure"] == pytest.approx(0.5, abs=FLOAT_SLACK)
    # The live counter of the restarted collector: it received every report the old one did
    # not acknowledge. Those cover every second the agents observed from the kill to their
    # last sample (the record's present seconds: the windows after the kill's, and the rest
    # of the kill's window, whole unless the agents lost some of it themselves), and before
    # the kill only what the report straddling it covers: at most one report interval per
    # GPU, and as much again for a report in flight, not yet acknowledged, when it died.
    counted = metric(metrics, "gputally_cluster_gpu_seconds_total", measure="observed")
    after = math.floor(killed / WINDOW_S) * WINDOW_S + WINDOW_S
    observed = sum(sum(e.present) for e in entries if e.start >= after)
    in_kill_window = [e for e in entries if e.end == after]
    assert len(in_kill_window) == NODES
    short = sum(WINDOW_S * len(e.present) - sum(e.present) for e in in_kill_window)
    since_kill = observed + GPUS * (after - killed)
    assert since_kill - short - FLOAT_SLACK <= counted <= since_kill + GPUS * 2 * INTERVAL_S
    print(
        f"\ncollector killed {killed - began:.1f} s into the run for {restarted - killed:.1f} s, "
        f"healthy again after {restart:.2f} s; spooled in the outage {backlog}; coverage of "
        f"[{start:.0f}, {end:.0f}) = {figures['coverage']!r}, busy "
        f"{figures['measures']['busy']['figure']!r}; observed counter {counted:.3f} GPU-s "
        f"against {since_kill:.3f} GPU-s observed since the kill "
        f"({(counted - since_kill) / GPUS:+.3f} s per GPU); {stalls(entries)}"
    )


# -- 3. kill -9 an agent ---------------------------------------------------------------------


def agent(
    processes: Processes, tmp_path: Path, collector: CollectorProcess, node: int, duration: float
) -> subprocess.Popen[bytes]:
    """`gputally agent` playing one node of the scenario, as on a real node: its own process,
    key, chain and spool (the mock's serial numbers come from the node's index, so two
    one-node scenario files would clash at the collector: see the report)."""
    scenario = tmp_path / "cluster.toml"
    scenario.write_text(SCENARIO)
    return processes.start(
        f"agent-{node}",
        "agent",
        "--backend=mock",
        f"--scenario={scenario}",
        f"--mock-node={node}",
        f"--state-dir={tmp_path / 'state'}",
        f"--collector={collector.target}",
        f"--summary-window={WINDOW_S:g}",
        f"--interval={INTERVAL_S:g}",
        f"--duration={duration:g}",
        "--kubelet-socket=",
    )


def test_an_agent_killed_with_a_summary_in_its_spool_continues_its_chain(
    tmp_path: Path, processes: Processes
) -> None:
    collector = CollectorProcess(processes, tmp_path)
    collector.start()
    duration = 3 * WINDOW_S + 2.0 + AGENT_DOWN_S + 3 * WINDOW_S
    began = time.time()
    steady = agent(processes, tmp_path, collector, 0, duration)
    victim = agent(processes, tmp_path, collector, 1, duration)
    ends = began + duration
    mid_stream(collector, processes, 2 * WINDOW_S + START_S)
    both_seen = time.time()
    # Kill it while a summary it signed waits in its spool: hold the collector (SIGSTOP)
    # until the next window is sealed, then kill the agent and let the collector go on.
    state = tmp_path / "state"
    assert collector.process is not None
    collector.process.send_signal(signal.SIGSTOP)
    try:
        wait_for("a summary spooled", lambda: spooled(state, NODE_NAMES[1]) >= 1, WINDOW_S + 3)
        killed = time.time()
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        in_spool = spool(state, NODE_NAMES[1])
    finally:
        collector.process.send_signal(signal.SIGCONT)
    time.sleep(max(0.0, killed + AGENT_DOWN_S - time.time()))
    reports = metric(
        collector.metrics(), "gputally_node_reports_total", node=NODE_NAMES[1], result="accepted"
    )
    restarted = time.time()
    assert ends - restarted > 2 * WINDOW_S, "too little of the run left after the restart"
    again = agent(processes, tmp_path, collector, 1, ends - restarted)

    def back() -> bool:
        counted = collector.metrics()
        return (
            metric(counted, "gputally_node_reports_total", node=NODE_NAMES[1], result="accepted")
            > reports
        )

    back_seen = wait_for(
        "the restarted agent's first report", back, START_S, processes.logs_text, step=0.05
    )
    processes.finish(steady, duration + START_S)
    processes.finish(again, duration + START_S)
    metrics = collector.metrics()
    collector.stop()

    verify(collector)  # its chain goes on: no chain gap, nothing twice
    entries = read_ledger(collector.db)
    chains = assert_chains_whole(entries)
    nodes = by_node(entries)
    assert spooled(state, NODE_NAMES[1]) == 0
    for node in NODE_NAMES:
        assert metric(metrics, "gputally_node_chain_breaks_total", node=node) == 0
    # what the dead agent had spooled is in the record as it was signed, once: sent again by
    # the agent restarted on the same state directory (or taken from the dead stream)
    recorded = {e.chain_seq: e.signed for e in nodes[NODE_NAMES[1]]}
    assert in_spool and all(recorded[seq] == body for seq, body in in_spool.items())
    # the period: whole windows both nodes were observed in, from the window in which the
    # collector had two summaries of each (so both agents had opened a window before it, and
    # the kill comes after its start) to the earlier last sample
    start = math.floor(both_seen / WINDOW_S) * WINDOW_S
    end = math.floor(min(last_sample(found) for found in nodes.values()) / WINDOW_S) * WINDOW_S
    figures = query(collector.db, start, end)
    rows = node_rows(figures)
    period = end - start
    for node in NODE_NAMES:  # nothing counted twice
        assert observed_seconds(rows[node]) <= GPUS_PER_NODE * period + FLOAT_SLACK
    assert observed_seconds(rows[NODE_NAMES[0]]) == pytest.approx(
        GPUS_PER_NODE * period, abs=FLOAT_SLACK
    ), stalls(entries)
    missing = period - observed_seconds(rows[NODE_NAMES[1]]) / GPUS_PER_NODE
    # The agent was dead from the kill to its restart: at least that much is missing. At
    # most: the restarted agent covers time from when it opened (before its first report
    # arrived), and the dead one lost the window it had open (up to one window) and, killed
    # in the tick after a window's end, the window just sealed but not yet signed (one
    # report interval).
    assert restarted - killed <= missing <= back_seen - killed + WINDOW_S + INTERVAL_S
    resent = metric(metrics, "gputally_node_summaries_total", node=NODE_NAMES[1], result="resent")
    coverage = observed_seconds(rows[NODE_NAMES[0]]) / (GPUS_PER_NODE * period)
    print(
        f"\nagent node-01 killed {killed - began:.1f} s into the run with summary "
        f"{sorted(in_spool)} in its spool, restarted {restarted - killed:.2f} s later, its "
        f"first report arrived {back_seen - restarted:.2f} s after that; chains {chains}; "
        f"resent {resent:g}; over [{start:.0f}, {end:.0f}) ({period:g} s) node-00 coverage "
        f"{coverage!r}, node-01 missing {missing:.3f} s per GPU (coverage "
        f"{1 - missing / period:.4f}); {stalls(entries)}"
    )
