"""An offline oracle: what a scenario's GPUs really did, integrated exactly from its definition.

Independent of the agent and the collector: it reads the scenario's loads and faults and
integrates them between the load's breakpoints. It knows which seconds the agents observe
from the tick schedule (a report at tick k covers the interval since tick k-1; a node in a
node_down fault skips its ticks, and its first tick afterwards only restarts coverage; a lost
GPU is not present from the first tick at or after its loss).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from gputally.agent.sim.physics import MODELS, Load
from gputally.agent.sim.scenario import Scenario

MEASURES = ("allocated", "busy", "sm_active", "effective")
IDLE = {
    "NVIDIA H100 80GB HBM3": 70.0,
    "NVIDIA H200": 75.0,
    "NVIDIA A100-SXM4-80GB": 55.0,
    "NVIDIA A100-SXM4-40GB": 52.0,
    "NVIDIA L40S": 32.0,
}


@dataclass
class Truth:
    capacity: float
    observed: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(MEASURES, 0.0)
    )  # over observed seconds
    full: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(MEASURES, 0.0)
    )  # over every second
    present: float = 0.0

    def ratio(self, measure: str) -> float:
        return self.observed[measure] / self.capacity

    def true_ratio(self, measure: str) -> float:
        return self.full[measure] / self.capacity


def _value(sc: Scenario, node: int, measure: str, load: Load) -> float:
    profile = sc.profile_of(node)
    if measure == "allocated":
        return float(load.processes > 0)
    if measure == "busy":
        return load.busy
    if measure == "sm_active":
        return load.sm_active
    # effective: SM activity where GPM measures it, else the documented power estimate
    if profile.gpm:
        return load.sm_active
    limit = profile.power_limit_watts
    power = (
        max((load.power_fraction or 0.0) * limit, profile.idle_watts)
        if load.power_fraction
        else profile.idle_watts
    )
    idle = IDLE.get(profile.name, 0.1 * limit)
    return min(load.busy, max(0.0, (power - idle) / (limit - idle)))


def _integral(
    sc: Scenario, node: int, gpu: int, value: Callable[[Load], float], t0: float, t1: float
) -> float:
    if t1 <= t0:
        return 0.0
    edges = [t0, *sc.breakpoints(node, gpu, t0, t1), t1]
    return sum(
        value(sc.load_at(node, gpu, (a + b) / 2)) * (b - a) for a, b in itertools.pairwise(edges)
    )


def covered_intervals(
    sc: Scenario, node: int, seconds: float, interval: float
) -> list[tuple[float, float]]:
    downs = [f for f in sc.faults if f.kind == "node_down" and f.hits(node)]
    covered, last, was_down = [], 0.0, False
    for k in range(1, round(seconds / interval) + 1):
        t = k * interval
        if any(f.at <= t < f.until for f in downs):
            was_down = True
            continue
        if was_down:
            was_down, last = False, t
            continue
        covered.append((last, t))
        last = t
    return covered


def lost_at(sc: Scenario, node: int, gpu: int) -> float:
    times = [f.at for f in sc.faults if f.kind == "gpu_lost" and f.hits(node, gpu)]
    return min(times) if times else float("inf")


def oracle(
    sc: Scenario, t0: float, t1: float, *, expected: int, run_seconds: float, interval: float
) -> Truth:
    truth = Truth(capacity=expected * (t1 - t0))
    for node in range(sc.nodes):
        spans = covered_intervals(sc, node, run_seconds, interval)
        for gpu in range(sc.gpus_per_node):
            lost = lost_at(sc, node, gpu)
            for measure in MEASURES:

                def value(load: Load, measure: str = measure, node: int = node) -> float:
                    return _value(sc, node, measure, load)

                # A lost GPU does no work; before its loss it works whether observed or not.
                truth.full[measure] += _integral(sc, node, gpu, value, t0, min(t1, lost))
                if measure == "sm_active" and not sc.profile_of(node).gpm:
                    continue  # not measured on this model: the figure counts only measured seconds
                for a, b in spans:
                    if b >= lost:  # the reading at the tick says lost: not present
                        continue
                    lo, hi = max(a, t0), min(b, t1)
                    if hi > lo:
                        truth.observed[measure] += _integral(sc, node, gpu, value, lo, hi)
            for a, b in spans:
                if b < lost:
                    truth.present += max(0.0, min(b, t1) - max(a, t0))
    return truth


assert set(IDLE) == set(MODELS)  # the estimate's table covers every model the mock knows
