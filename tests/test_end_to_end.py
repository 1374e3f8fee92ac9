"""End to end over loopback: simulated agents -> gRPC -> collector -> /metrics."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gputally.agent.attribution import Attributor
from gputally.agent.backend import NvmlBackend
from gputally.agent.node import NodeAgent
from gputally.agent.sampler import Sampler
from gputally.agent.sim import scenario
from gputally.agent.sim.demo import scrape
from gputally.agent.sim.fleet import run_fleet
from gputally.agent.sim.mock import MockNVML
from gputally.collector.live import server as ingest
from gputally.collector.live.state import ClusterState
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc

from .conftest import Collector, free_port
from .factories import gpu_sample, gputally_command, hello, report

Metrics = dict[str, dict[tuple[tuple[str, str], ...], float]]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


def run_and_freeze(collector: Collector, duration: float) -> None:
    """Run the README's scenario for `duration` s, then stop the collector's clock at the
    newest report so the live window holds only complete seconds."""
    asyncio.run(run_fleet(scenario.default(), collector.target, duration=duration))
    newest = max(node.last_received for node in collector.state.nodes.values())
    collector.state.clock = lambda: newest


def test_simulated_cluster_gives_the_scenario_figures(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(window=3.0, lag=1.5, stale_after=30.0)
    run_and_freeze(collector, duration=6.0)
    metrics = scrape(collector.metrics_url)
    assert value(metrics, "gputally_cluster_gpus", state="expected") == 32
    assert value(metrics, "gputally_cluster_gpus", state="reporting") == 32
    assert value(metrics, "gputally_cluster_gpus", state="lost") == 0
    assert value(metrics, "gputally_cluster_utilization_ratio", measure="busy") == pytest.approx(
        0.45, abs=0.01
    )
    assert value(
        metrics, "gputally_cluster_utilization_ratio", measure="allocated"
    ) == pytest.approx(0.5, abs=0.01)
    assert value(
        metrics, "gputally_cluster_utilization_ratio", measure="sm_active"
    ) == pytest.approx(0.3, abs=0.01)
    assert value(metrics, "gputally_cluster_coverage_ratio") == pytest.approx(1.0, abs=0.01)
    assert value(
        metrics, "gputally_node_utilization_ratio", node="node-00", measure="busy"
    ) == pytest.approx(0.9, abs=0.01)
    assert value(metrics, "gputally_node_utilization_ratio", node="node-03", measure="busy") == 0.0
    # The counters give the same figure exactly over the whole run.
    busy = value(metrics, "gputally_cluster_gpu_seconds_total", measure="busy")
    observed = value(metrics, "gputally_cluster_gpu_seconds_total", measure="observed")
    assert busy / observed == pytest.approx(0.45, abs=0.005)
    # 16 GPUs at 560 W and 16 idle at 70 W: 10,080 W while all report.
    assert value(metrics, "gputally_cluster_power_watts") == pytest.approx(10_080.0)
    accepted = sum(n.reports["accepted"] for n in collector.state.nodes.values())
    assert accepted >= 4 * 5 and all(n.missed_reports == 0 for n in collector.state.nodes.values())


def test_declared_inventory_is_the_denominator(collector_factory: Callable[..., Collector]) -> None:
    collector = collector_factory(expected_gpus=64, window=3.0, lag=1.5, stale_after=30.0)
    run_and_freeze(collector, duration=5.0)
    metrics = scrape(collector.metrics_url)
    assert value(metrics, "gputally_cluster_utilization_ratio", measure="busy") == pytest.approx(
        0.225, abs=0.01
    )
    assert value(
        metrics, "gputally_cluster_utilization_ratio", measure="sm_active"
    ) == pytest.approx(0.15, abs=0.01)
    assert value(metrics, "gputally_cluster_gpus", state="missing") == 32
    assert value(metrics, "gputally_cluster_coverage_ratio") == pytest.approx(0.5, abs=0.01)


def _agent(
    target: str,
    node: int = 0,
    name: str | None = None,
    interval: float = 0.2,
    **sampler_options: Any,
) -> NodeAgent:
    sc = scenario.default()
    lib = MockNVML(sc, node, time.time)
    sampler = Sampler(
        NvmlBackend(lib),
        attributor=Attributor(processes=lib.processes),
        node=name or sc.node_name(node),
        interval=interval,
        **sampler_options,
    )
    sampler.open()
    return NodeAgent(
        sampler,
        target,
        backend_name="mock",
        sample_in_thread=False,
        sender_options={"backoff_initial": 0.05, "backoff_max": 0.2},
    )


def test_agent_keeps_sampling_through_a_collector_restart() -> None:
    port = free_port()
    agent = _agent(f"127.0.0.1:{port}")

    async def scenario_run() -> tuple[int, int, int]:
        states = [ClusterState(), ClusterState()]
        task = asyncio.ensure_future(agent.run(duration=4.0))
        server, _, _ = await ingest.start(states[0], f"127.0.0.1:{port}")
        await asyncio.sleep(1.0)
        await server.stop(0)  # the collector goes away; the agent keeps sampling
        await asyncio.sleep(1.5)
        assert agent.sender.outbox, "reports should wait in the outbox while the collector is down"
        server, _, _ = await ingest.start(states[1], f"127.0.0.1:{port}")
        await task
        await server.stop(0)
        a, b = (s.nodes["node-00"] for s in states)
        return a.reports["accepted"], b.reports["accepted"], b.last_seq

    accepted_a, accepted_b, last_b = asyncio.run(scenario_run())
    total = agent.reports
    assert total >= 15
    assert agent.sender.stats.dropped == 0 and not agent.sender.outbox
    # the second collector has everything up to the last report (the final one carries the
    # summary of the window in progress at shutdown)
    assert last_b == agent.sampler.seq == total + 1
    assert accepted_a + accepted_b >= total  # nothing lost (a report may arrive at both)
    assert accepted_a > 0 and accepted_b > 0


def test_a_refused_hello_is_not_retried_blindly(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory()
    agent = _agent(collector.target, name="bad name")
    asyncio.run(agent.run(duration=0.6))
    assert "INVALID_ARGUMENT" in agent.sender.stats.last_error
    assert "without spaces" in agent.sender.stats.last_error
    assert agent.sender.stats.refused and agent.sender.stats.connects == 0
    assert collector.state.nodes == {}


def test_bad_report_is_rejected_with_a_reason_and_the_stream_goes_on(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(expected_gpus=1)

    async def talk() -> list[pb.CollectorMessage]:
        async with grpc.aio.insecure_channel(collector.target) as channel:
            call = pb_grpc.IngestStub(channel).Stream()
            await call.write(pb.AgentMessage(hello=hello("raw", 1)))
            replies = [await call.read()]
            now = time.time()
            good = report(1, now - 1, gpu_sample(0, busy=0.5))
            bad = report(2, now, gpu_sample(0, busy=7.0))
            also_good = report(3, now, gpu_sample(0, busy=1.0))
            await call.write(pb.AgentMessage(batch=pb.ReportBatch(reports=[good, bad, also_good])))
            replies.append(await call.read())
            await call.done_writing()
            return replies

    welcome, ack = asyncio.run(talk())
    assert welcome.WhichOneof("body") == "welcome" and welcome.welcome.resume_after_seq == 0
    assert ack.ack.acked_seq == 3
    assert [(r.seq, "busy must be a fraction" in r.reason) for r in ack.ack.rejections] == [
        (2, True)
    ]
    assert collector.state.counters.seconds["busy"] == pytest.approx(1.5)


def test_a_stream_that_does_not_start_with_hello_is_refused(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory()

    async def talk() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(collector.target) as channel:
            call = pb_grpc.IngestStub(channel).Stream()
            await call.write(pb.AgentMessage(batch=pb.ReportBatch()))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.details() == "the first message on a stream must be a Hello"
            return refused.value.code()

    assert asyncio.run(talk()) == grpc.StatusCode.INVALID_ARGUMENT


def _gputally() -> list[str]:
    return gputally_command()


def test_the_commands_as_processes(tmp_path: Path) -> None:
    """`gputally collector` and `gputally simulate` as separate processes, as an SRE runs them."""
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "GPUTALLY_COLLECTOR_WINDOW": "3"}  # configuration by environment
    collector = subprocess.Popen(
        [
            *_gputally(),
            "collector",
            f"--grpc-listen=127.0.0.1:{grpc_port}",
            f"--metrics-listen=127.0.0.1:{metrics_port}",
            "--lag=1.5",
            f"--db={tmp_path / 'record.db'}",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    simulate = None
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                scrape(url)
                break
            except OSError:
                time.sleep(0.1)
        simulate = subprocess.Popen(
            [
                *_gputally(),
                "simulate",
                f"--collector=127.0.0.1:{grpc_port}",
                "--duration=12",
                f"--state-dir={tmp_path / 'fleet'}",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        figures: dict[str, float] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and simulate.poll() is None:
            metrics = scrape(url)
            if value(metrics, "gputally_cluster_coverage_ratio") > 0.999:
                figures = {
                    m: value(metrics, "gputally_cluster_utilization_ratio", measure=m)
                    for m in ("busy", "allocated", "sm_active")
                }
                figures["window"] = value(metrics, "gputally_cluster_window_seconds")
                figures["reporting"] = value(metrics, "gputally_cluster_gpus", state="reporting")
                break
            time.sleep(0.25)
        assert figures, "the live window never filled"
        assert figures["window"] == 3.0
        assert figures["reporting"] == 32
        assert figures["busy"] == pytest.approx(0.45, abs=0.01)
        assert figures["allocated"] == pytest.approx(0.5, abs=0.01)
        assert figures["sm_active"] == pytest.approx(0.3, abs=0.01)
        _, err = simulate.communicate(timeout=30)
        assert simulate.returncode == 0, err
        assert "simulating 4 nodes x 8 GPUs" in err
    finally:
        if simulate and simulate.poll() is None:
            simulate.kill()
        collector.terminate()
        collector.wait(15)
    assert collector.returncode == 0


def test_faults_injected_in_the_fleet_are_visible_at_the_collector(
    collector_factory: Callable[..., Collector],
) -> None:
    import tomllib

    toml = """
    [cluster]
    nodes = 3
    gpus_per_node = 2
    [[workload]]
    share = 1.0
    kind = "steady"
    busy = 0.8
    sm_active = 0.4
    [[fault]]
    kind = "gpu_lost"
    node = 0
    gpu = 1
    at = 1.5
    [[fault]]
    kind = "xid"
    code = 13
    node = 1
    gpu = 0
    at = 1.0
    [[fault]]
    kind = "node_down"
    node = 2
    at = 2.5
    """
    sc = scenario.parse(tomllib.loads(toml), name="faults")
    collector = collector_factory(expected_gpus=6, window=2.0, lag=1.0, stale_after=1.5)
    asyncio.run(run_fleet(sc, collector.target, duration=5.0, interval=0.5))
    newest = max(node.last_received for node in collector.state.nodes.values())
    collector.state.clock = lambda: newest
    metrics = scrape(collector.metrics_url)
    # node-00 lost a GPU, node-02 went down: 3 of 6 GPUs still report, and the figures fall
    assert value(metrics, "gputally_cluster_gpus", state="reporting") == 3
    assert value(metrics, "gputally_cluster_gpus", state="lost") == 3
    assert value(metrics, "gputally_node_xid_events_total", node="node-00", xid="79") == 1
    assert value(metrics, "gputally_node_xid_events_total", node="node-01", xid="13") == 1
    assert value(metrics, "gputally_node_up", node="node-02") == 0
    assert value(metrics, "gputally_cluster_utilization_ratio", measure="busy") == pytest.approx(
        0.8 * 3 / 6, abs=0.02
    )
    assert value(metrics, "gputally_cluster_coverage_ratio") == pytest.approx(0.5, abs=0.02)


def test_live_padding_bounds_and_breakdowns(collector_factory: Callable[..., Collector]) -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    text = (root / "scenarios" / "burn-padding.toml").read_text()
    text = text.replace(
        "memory_fraction = 0.92\n", 'memory_fraction = 0.92\nslurm_job = 777\nuser = "alice"\n', 1
    )
    sc = scenario.parse(tomllib.loads(text), name="burn-live")
    collector = collector_factory(expected_gpus=32, window=2.0, lag=1.0, stale_after=30.0)
    asyncio.run(run_fleet(sc, collector.target, duration=4.0, interval=0.5))
    newest = max(node.last_received for node in collector.state.nodes.values())
    collector.state.clock = lambda: newest
    metrics = scrape(collector.metrics_url)

    def ratio(measure: str) -> float:
        return value(metrics, "gputally_cluster_utilization_ratio", measure=measure)

    assert ratio("busy") == pytest.approx(0.804375, abs=0.01)
    assert ratio("effective") == pytest.approx(0.3534375, abs=0.01)
    assert value(
        metrics, "gputally_cluster_utilization_without_padding_ratio", measure="busy"
    ) == pytest.approx(0.398125, abs=0.01)
    assert value(metrics, "gputally_cluster_padding_gpus", rule="burn_tool") == 13
    assert (
        value(metrics, "gputally_cluster_padding_gpus", rule="flatline_low_memory") == 0
    )  # not sustained yet
    assert value(metrics, "gputally_cluster_padding_gpu_seconds_total", rule="burn_tool") > 0
    # everything observed and measured: the bounds close on the figure
    for measure in ("busy", "sm_active"):
        lower = value(
            metrics, "gputally_cluster_utilization_bound_ratio", measure=measure, bound="lower"
        )
        upper = value(
            metrics, "gputally_cluster_utilization_bound_ratio", measure=measure, bound="upper"
        )
        assert lower == pytest.approx(ratio(measure), abs=1e-6) and upper == pytest.approx(
            ratio(measure), abs=0.01
        )
    assert value(
        metrics, "gputally_model_utilization_ratio", model="NVIDIA H100 80GB HBM3", measure="busy"
    ) == (pytest.approx(0.804375, abs=0.01))
    # the 13 training GPUs run in Slurm job 777 of alice: the tenant view sees them
    assert value(metrics, "gputally_tenant_gpus", tenant="alice") == 13
    assert value(
        metrics, "gputally_tenant_utilization_ratio", tenant="alice", measure="sm_active"
    ) == pytest.approx(0.85, abs=0.01)


def test_summaries_signed_while_the_collector_is_away_survive_an_agent_crash(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    """The agent signs summaries while no collector listens and is then killed (no clean
    shutdown). Started again, it sends its spool first: the ledger gets every summary, in one
    unbroken chain, and the spool empties as the collector acknowledges."""
    from gputally.agent.chain import SummarySigner
    from gputally.collector.record.keys import KeyStore
    from gputally.collector.record.store import Record
    from gputally.v1.signing import load_or_create_private_key as load_or_create_key
    from gputally.v1.signing import public_bytes

    state_dir = tmp_path / "state" / "node-00"
    key = load_or_create_key(state_dir / "agent.key")

    def agent(target: str) -> NodeAgent:  # a fresh process's agent: its signer reads the disk
        signer = SummarySigner(key, "node-00", state_dir)
        return _agent(target, interval=0.1, summary_window=0.5, signer=signer)

    async def crash_after(seconds: float) -> None:
        task = asyncio.ensure_future(agent(f"127.0.0.1:{free_port()}").run())
        await asyncio.sleep(seconds)
        task.cancel()  # killed: no drain, nothing acknowledged
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(crash_after(1.6))
    spooled = sorted((state_dir / "spool").glob("*.summary"))
    assert len(spooled) >= 3  # windows of 0.5 s closed while nobody listened

    keys = tmp_path / "keys"
    keys.mkdir()
    KeyStore(keys).enroll("node-00", public_bytes(key))
    record = Record(tmp_path / "record.db")
    collector = collector_factory(record=record, keys=KeyStore(keys), expected_gpus=8)
    asyncio.run(agent(collector.target).run(duration=1.2))

    bodies = [pb.SignedSummary.FromString(stored).body for _, _, stored, _ in record.entries()]
    chain = [pb.Summary.FromString(body) for body in bodies]
    assert [s.chain_seq for s in chain] == list(range(1, len(chain) + 1))
    assert len(chain) >= len(spooled) + 2  # the spool first, then the new run's windows
    for earlier, later in itertools.pairwise(range(len(chain))):
        assert chain[later].prev_hash == hashlib.sha256(bodies[earlier]).digest()
    assert collector.state.intake.chain("node-00").breaks == 0
    assert list((state_dir / "spool").glob("*.summary")) == []  # all acknowledged


def test_a_full_outbox_drops_plain_reports_before_summaries() -> None:
    from gputally.agent.sender import Sender

    sender = Sender("127.0.0.1:9", lambda: pb.Hello(), max_buffer=3)
    signed = pb.SignedSummary(body=b"summary", signature=b"s")
    sender.submit(pb.Report(seq=1, summary=signed))
    for seq in range(2, 6):
        sender.submit(pb.Report(seq=seq))
    # 5 submitted into room for 3: reports 2 and 3 made way; the summary stayed
    assert [r.seq for r in sender.outbox] == [1, 4, 5]
    assert sender.stats.dropped == 2
    # with nothing else left to drop, the oldest summary goes (and is counted)
    only = Sender("127.0.0.1:9", lambda: pb.Hello(), max_buffer=2)
    for seq in (1, 2, 3):
        only.submit(pb.Report(seq=seq, summary=signed))
    assert [r.seq for r in only.outbox] == [2, 3] and only.stats.dropped == 1


def test_a_simulated_fleet_restarted_from_its_state_directory_is_the_same_fleet(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    """`gputally simulate` killed and started again against a trust-on-first-use collector:
    its nodes keep their keys and chains (DIR/<node>/), so they are let in again and their
    chains go on without a break, instead of being refused as strangers."""
    from gputally.collector.record.keys import KeyStore
    from gputally.collector.record.store import Record

    record = Record(tmp_path / "r.db")
    keys = KeyStore(tmp_path / "keys", trust_on_first_use=True)
    collector = collector_factory(record=record, keys=keys)
    sc = scenario.parse(
        {
            "cluster": {"nodes": 2, "gpus_per_node": 1},
            "workload": [{"share": 1.0, "kind": "training"}],
        },
        name="t",
    )
    state_dir = tmp_path / "fleet"
    for _ in range(2):
        stats = asyncio.run(
            run_fleet(
                sc,
                collector.target,
                duration=2.5,
                interval=0.5,
                summary_window=1.0,
                state_dir=state_dir,
            )
        )
        assert stats.acked >= 5 * 2
    assert sorted(p.name for p in state_dir.iterdir()) == ["node-00", "node-01"]
    for node in ("node-00", "node-01"):
        chain = collector.state.intake.chains[node]
        assert chain.breaks == 0 and chain.recorded >= 4  # summaries of both runs, one chain
        assert collector.state.nodes[node].reports["rejected"] == 0
    assert sorted(p.name for p in (tmp_path / "keys").glob("*.pub")) == [
        "node-00.pub",
        "node-01.pub",
    ]
