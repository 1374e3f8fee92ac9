"""Benchmark: the collector's live path in one process, without gRPC.

What one report costs ClusterState.ingest (checks, accounting, the live window's sums) on the
agent's own reports: ingest_scale.py's built-in scenarios (8 node shapes of 8 GPUs: Kubernetes
training, Slurm inference, plain processes, a burn tool, idle GPUs, a MIG node), sampled by
gputally.agent.sampler.Sampler over MockNVML every second and reported every --report-every
seconds, each shape copied --copies times under its own node name and GPU UUIDs. The baseline,
measured in the same run on the same reports: parsing each one from its bytes and reading every
GPU sample's index (what a bare server does with a report). Best of --repeat runs, each on a
fresh state.

Then the view and the /metrics render of --view-nodes nodes of 8 GPUs (35 one-second reports
each), with every node's figures and without (--node-metrics none).

    .venv/bin/python benchmarks/live_path.py
    .venv/bin/python benchmarks/live_path.py --report-every 10 --ticks 600 --view-nodes 12500
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import generate_latest

from gputally.agent.attribution import Attributor
from gputally.agent.backend import NvmlBackend
from gputally.agent.sampler import Sampler
from gputally.agent.sim.mock import ManualClock, MockNVML
from gputally.collector.live.metrics import make_registry
from gputally.collector.live.state import ClusterState
from gputally.v1 import telemetry_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_scale import load_scenarios  # benchmarks/ is not a package: found by sys.path
from streams_under_flood import hello as flood_hello
from streams_under_flood import report as flood_report

T0 = 1_767_225_600.0


def shapes(ticks: int, report_every: float) -> list[tuple[pb.Hello, list[bytes]]]:
    """Each node shape's Hello and serialized reports, from the agent's own sampler."""
    out = []
    for scenario in load_scenarios([], 8):
        for node in range(scenario.nodes):
            clock = ManualClock(T0)
            mock = MockNVML(scenario, node, clock, start=T0)
            sampler = Sampler(
                NvmlBackend(mock, events="poll", monotonic=clock, clock=clock),
                attributor=Attributor(processes=mock.processes, monotonic=clock),
                node=f"{scenario.name}-{scenario.node_name(node)}",
                interval=1.0,
                clock=clock,
                report_every=report_every,
            )
            sampler.open()
            reports = []
            for _ in range(ticks):  # bounded: --ticks
                clock.advance(1.0)
                report = sampler.tick()
                if report is not None and report.gpus:
                    report.ClearField("summary")  # no record here: the live path only
                    reports.append(report.SerializeToString())
            out.append((sampler.hello(1, "mock"), reports))
            sampler.close()
    return out


def fleet(
    made: list[tuple[pb.Hello, list[bytes]]], copies: int
) -> tuple[list[pb.Hello], list[tuple[str, bytes, float]]]:
    """Hellos of every copy, and every report in the order a collector would get them."""
    hellos, streams = [], []
    for copy in range(copies):
        for hello, reports in made:
            named = copied(hello, copy)
            hellos.append(named)
            streams.append((named.node, reports))
    order = []
    for i in range(max(len(reports) for _, reports in streams)):
        for name, reports in streams:
            if i < len(reports):
                end = pb.Report.FromString(reports[i]).time_unix_nano / 1e9
                order.append((name, reports[i], end + 0.01))
    return hellos, order


def copied(hello: pb.Hello, copy: int) -> pb.Hello:
    """A node shape's Hello as its copy number `copy`: a node name and GPU cards of its own
    (a report names neither, so the shape's reports serve every copy)."""
    named = pb.Hello()
    named.CopyFrom(hello)
    named.node = f"{hello.node}-c{copy}"
    for gpu in named.gpus:
        gpu.uuid, gpu.serial = f"{gpu.uuid}-c{copy}", f"{gpu.serial}-c{copy}"
    return named


def ingest_once(hellos: list[pb.Hello], order: list[tuple[str, bytes, float]]) -> float:
    state = ClusterState(expected_gpus=8 * len(hellos), clock=lambda: order[-1][2])
    for hello in hellos:
        state.open_session(hello)
    reports = [(name, pb.Report.FromString(body), received) for name, body, received in order]
    began = time.perf_counter()
    for name, report, received in reports:
        state.ingest(name, report, received=received)
    return time.perf_counter() - began


def parse_once(order: list[tuple[str, bytes, float]]) -> float:
    began = time.perf_counter()
    for _, body, _ in order:
        report = pb.Report.FromString(body)
        for sample in report.gpus:
            sample.index  # noqa: B018 - read, as a bare server reads each report
    return time.perf_counter() - began


def views(nodes: int, repeat: int) -> dict[str, float]:
    now = [T0]
    state = ClusterState(expected_gpus=8 * nodes, clock=lambda: now[0])
    for n in range(nodes):
        state.open_session(flood_hello(f"node-{n:05d}", n, 8, None, 1))
    for second in range(1, 36):  # bounded: a 30 s window and its lag
        now[0] = T0 + second
        for n in range(nodes):
            sent = flood_report(f"node-{n:05d}", 8, second, int((T0 + second) * 1e9))
            state.ingest(f"node-{n:05d}", sent, received=T0 + second)
    out = {}
    for label, with_nodes in (("view", True), ("view without nodes", False)):
        best = min(_timed(lambda w=with_nodes: state.view(nodes=w)) for _ in range(repeat))
        out[label] = best
    for label, series in (("render", True), ("render without nodes", False)):
        registry = make_registry(state, node_series=series)
        out[label] = min(_timed(lambda r=registry: generate_latest(r)) for _ in range(repeat))
    return out


def _timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report-every", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--ticks", type=int, default=60, help="seconds sampled per node shape")
    parser.add_argument("--copies", type=int, default=40, help="nodes per shape")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is shown")
    parser.add_argument(
        "--view-nodes", type=int, default=1250, metavar="N", help="0: no view or render"
    )
    args = parser.parse_args()
    if min(args.ticks, args.copies, args.repeat) < 1 or args.view_nodes < 0:
        parser.error("--ticks, --copies and --repeat must be >= 1, --view-nodes >= 0")
    if args.report_every < 1:
        parser.error("--report-every must be >= 1 (the agent samples every second)")
    hellos, order = fleet(shapes(args.ticks, args.report_every), args.copies)
    gpus = sum(len(pb.Report.FromString(body).gpus) for _, body, _ in order)
    ingest = min(ingest_once(hellos, order) for _ in range(args.repeat))
    parse = min(parse_once(order) for _ in range(args.repeat))
    print(
        f"ingest: {len(order):,} reports of {len(hellos):,} nodes (every {args.report_every:g} s, "
        f"{gpus / len(order):.1f} GPUs each), best of {args.repeat}"
    )
    print(f"  ClusterState.ingest  {ingest / len(order) * 1e6:8.1f} us/report")
    print(f"  parse only (baseline){parse / len(order) * 1e6:8.1f} us/report")
    print(f"  ratio ingest / parse {ingest / parse:8.1f}")
    if args.view_nodes:
        print(f"view and render of {args.view_nodes:,} nodes x 8 GPUs, best of {args.repeat}")
        for label, seconds in views(args.view_nodes, args.repeat).items():
            print(f"  {label:22s}{seconds * 1e3:8.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
