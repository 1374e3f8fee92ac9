"""A whole simulated fleet in one process: every node of a scenario is a real agent
(``NvmlBackend`` over ``MockNVML``, ``Sampler``, ``Sender``) with its own gRPC stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from .mock import MockNVML
from .node import NodeAgent
from .nvml import NvmlBackend
from .sampler import Sampler
from .scenario import Scenario


@dataclass(slots=True)
class FleetStats:
    nodes: int = 0
    reports: int = 0
    acked: int = 0
    dropped: int = 0


def build_fleet(
    scenario: Scenario,
    collector: str,
    *,
    interval: float = 1.0,
    clock: Callable[[], float] = time.time,
    start: float | None = None,
) -> list[NodeAgent]:
    start = clock() if start is None else start
    agents = []
    for node in range(scenario.nodes):
        sampler = Sampler(
            # Events are drained by each tick: one thread per simulated node would not scale.
            NvmlBackend(MockNVML(scenario, node, clock, start=start), events="poll"),
            node=scenario.node_name(node),
            interval=interval,
            clock=clock,
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
            )
        )
    return agents


async def run_fleet(
    scenario: Scenario,
    collector: str,
    *,
    duration: float | None = None,
    interval: float = 1.0,
    stop: asyncio.Event | None = None,
) -> FleetStats:
    agents = build_fleet(scenario, collector, interval=interval)
    try:
        await asyncio.gather(*(agent.run(duration=duration, stop=stop) for agent in agents))
    finally:
        for agent in agents:
            agent.sampler.close()
    stats = FleetStats(nodes=len(agents))
    for agent in agents:
        stats.reports += agent.reports
        stats.acked += agent.sender.stats.acked
        stats.dropped += agent.sender.stats.dropped
    return stats
