"""A whole simulated fleet in one process: every node of a scenario is a real agent
(``NvmlBackend`` over ``MockNVML``, ``Sampler``, ``Sender``) with its own gRPC stream, in real
time or on a virtual clock.

With a state directory each node keeps its key, summary chain and spool in <dir>/<node>/, as
a real agent does in its --state-dir: a fleet stopped and started again continues its chains
and is recognised by a collector that enrolled its keys. Without one, keys live in memory
and every run is a new fleet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gputally.v1.signing import load_or_create_private_key

from ..attribution import Attributor
from ..backend import NvmlBackend
from ..chain import KEY_FILE, SummarySigner
from ..node import NodeAgent
from ..padding import PaddingRules
from ..sampler import Sampler
from .mock import ManualClock, MockNVML
from .scenario import Scenario


@dataclass(slots=True)
class FleetStats:
    nodes: int = 0
    reports: int = 0
    acked: int = 0
    dropped: int = 0
    refused: int = 0  # nodes the collector refused (a key, a certificate, a Hello)
    refusal: str = ""  # why, the last one
    # The span every node observed (unix seconds): from the last node to start covering time
    # to the first node to take its last sample. A query over it sees no unobserved second.
    observed_from: float | None = None
    observed_to: float | None = None


def _stats(agents: list[NodeAgent]) -> FleetStats:
    stats = FleetStats(nodes=len(agents))
    for agent in agents:
        stats.reports += agent.reports
        stats.acked += agent.sender.stats.acked
        stats.dropped += agent.sender.stats.dropped
        if agent.sender.stats.refused:
            stats.refused += 1
            stats.refusal = agent.sender.stats.last_error
    opened = [a.sampler.opened_at for a in agents if a.sampler.opened_at is not None]
    sampled = [a.sampler.last_sample_at for a in agents if a.sampler.last_sample_at is not None]
    if agents and len(opened) == len(agents) and len(sampled) == len(agents):
        stats.observed_from, stats.observed_to = max(opened), min(sampled)
    return stats


def build_fleet(
    scenario: Scenario,
    collector: str,
    *,
    interval: float = 1.0,
    report_every: float | None = None,
    clock: Callable[[], float] = time.time,
    start: float | None = None,
    summary_window: float = 300.0,
    padding: PaddingRules | None = None,
    state_dir: Path | None = None,
    sender_options: dict[str, Any] | None = None,
) -> list[NodeAgent]:
    start = clock() if start is None else start
    agents = []
    for node in range(scenario.nodes):
        mock = MockNVML(scenario, node, clock, start=start)
        name = scenario.node_name(node)
        signer = None
        if state_dir is not None:
            home = state_dir / name
            signer = SummarySigner(load_or_create_private_key(home / KEY_FILE), name, home)
        sampler = Sampler(
            # Events are drained by each tick: one thread per simulated node would not scale.
            NvmlBackend(mock, events="poll", monotonic=clock, clock=clock),
            attributor=Attributor(processes=mock.processes, monotonic=clock),
            node=name,
            interval=interval,
            report_every=report_every,
            clock=clock,
            summary_window=summary_window,
            padding=padding,
            signer=signer,
        )
        sampler.open()
        outages = [f for f in scenario.faults if f.kind == "node_down" and f.hits(node)]

        def down(now: float, outages: list = outages) -> bool:  # type: ignore[type-arg]
            return any(f.at <= now - start < f.until for f in outages)

        agents.append(
            NodeAgent(
                sampler,
                collector,
                backend_name="mock",
                sample_in_thread=False,
                down=down if outages else None,
                sender_options=sender_options,
            )
        )
    return agents


async def run_fleet(
    scenario: Scenario,
    collector: str,
    *,
    duration: float | None = None,
    interval: float = 1.0,
    report_every: float | None = None,
    stop: asyncio.Event | None = None,
    summary_window: float = 300.0,
    padding: PaddingRules | None = None,
    state_dir: Path | None = None,
    sender_options: dict[str, Any] | None = None,
) -> FleetStats:
    agents = build_fleet(
        scenario,
        collector,
        interval=interval,
        report_every=report_every,
        summary_window=summary_window,
        padding=padding,
        state_dir=state_dir,
        sender_options=sender_options,
    )
    try:
        await asyncio.gather(*(agent.run(duration=duration, stop=stop) for agent in agents))
    finally:
        for agent in agents:
            agent.sampler.close()
    return _stats(agents)


async def run_fleet_virtual(
    scenario: Scenario,
    collector: str,
    *,
    seconds: float,
    start: float,
    interval: float = 1.0,
    report_every: float | None = None,
    summary_window: float = 300.0,
    padding: PaddingRules | None = None,
    flush_every: int = 100,
    progress: Callable[[float], None] | None = None,
) -> FleetStats:
    """Run the scenario on a virtual clock from `start` (unix seconds) for `seconds`, as fast
    as the machine allows: the same agents, summaries and gRPC streams as in real time.

    Every tick, each node's sampler reads its mock and the report is queued; every
    `flush_every` ticks the fleet waits until the collector has acknowledged everything, so
    the outboxes never overflow. A node in a `node_down` fault skips its ticks, and its first
    tick after the outage only restarts coverage, as a restarted agent's would.
    """
    clock = ManualClock(start)
    agents = build_fleet(
        scenario,
        collector,
        interval=interval,
        report_every=report_every,
        clock=clock,
        start=start,
        summary_window=summary_window,
        padding=padding,
    )
    tasks: dict[int, asyncio.Task[None]] = {}  # senders start with a node's first report
    was_down = [False] * len(agents)
    try:
        for tick in range(1, round(seconds / interval) + 1):
            clock.now = start + tick * interval
            for number, agent in enumerate(agents):
                if agent.down is not None and agent.down(clock()):
                    was_down[number] = True
                    continue
                if was_down[number]:
                    was_down[number] = False
                    agent.sampler.resume()
                    continue
                if number not in tasks:
                    tasks[number] = asyncio.ensure_future(agent.sender.run())
                report = agent.sampler.tick()
                if report is not None:
                    agent.sender.submit(report)
                    agent.reports += 1
            if tick % flush_every == 0:
                await asyncio.gather(*(agents[n].sender.drain(60.0) for n in tasks))
                if progress is not None and tick % (flush_every * 20) == 0:
                    progress(tick * interval)
        for number in tasks:
            for report in agents[number].sampler.final_reports():
                agents[number].sender.submit(report)
        await asyncio.gather(*(agents[n].sender.drain(60.0) for n in tasks))
    finally:
        for number, task in tasks.items():
            agents[number].sender.stop()
            await task
        for agent in agents:
            agent.sampler.close()
    return _stats(agents)
