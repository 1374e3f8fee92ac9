"""Effective work and padding, decided per GPU and per tick (docs/utilization.md, §4 and §7).

*Effective* is the real-work measure: SM activity where GPM measures it, else an estimate from
power above idle, always labelled as an estimate. *Padding* is load whose purpose is to look
busy; the rules below flag it, and the figures are reported with and without flagged time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import BURN_TOOL, BUSY_WITHOUT_WORK, FLATLINE_LOW_MEMORY

# Idle power of known models, in watts, that the effective-work estimate assumes. Other models:
# 10% of the power limit. (The simulation's model profiles, sim/physics.py, give simulated
# boards the same idle draw on purpose: there the estimate can be checked exactly.)
IDLE_WATTS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 70.0,
    "NVIDIA H200": 75.0,
    "NVIDIA A100-SXM4-80GB": 55.0,
    "NVIDIA A100-SXM4-40GB": 52.0,
    "NVIDIA L40S": 32.0,
}

DEFAULT_BURN_PATTERNS = (r"\bgpu[_-]?burn\b", r"\bdcgmproftester", r"\bstress-ng\b.*--gpu")


def idle_watts(model: str, power_limit: float) -> float:
    return IDLE_WATTS.get(model, 0.1 * power_limit)


def effective(sample: pb.GpuSample, model: str) -> tuple[float | None, bool]:
    """(effective, estimated): SM activity where measured, else min(busy, power above idle
    over the power range); None when neither can be had."""
    if sample.HasField("sm_active"):
        return sample.sm_active, False
    if not (
        sample.HasField("busy")
        and sample.HasField("power_watts")
        and sample.HasField("power_limit_watts")
    ):
        return None, False
    limit = sample.power_limit_watts
    idle = idle_watts(model, limit)
    if limit <= idle:
        return None, False
    estimate = max(0.0, (sample.power_watts - idle) / (limit - idle))
    return min(sample.busy, estimate), True


@dataclass(frozen=True, slots=True)
class PaddingRules:
    busy_at_least: float = 0.9
    sm_at_most: float = 0.1
    power_headroom: float = 0.15  # of the idle-to-limit range, where SM activity is unmeasured
    flat_busy_at_least: float = 0.99
    memory_at_most: float = 0.02  # of the GPU's memory, held by its processes
    sustain_seconds: float = 300.0
    burn_patterns: tuple[str, ...] = DEFAULT_BURN_PATTERNS


@dataclass(slots=True)
class PaddingDetector:
    rules: PaddingRules = field(default_factory=PaddingRules)
    # (GPU, rule) -> when the rule's condition started to hold without a break
    _since: dict[tuple[int, str], float] = field(default_factory=dict)
    _burn: list[re.Pattern[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._burn = [re.compile(p) for p in self.rules.burn_patterns]

    def _sustained(self, key: tuple[int, str], holds: bool, start: float, end: float) -> bool:
        if not holds:
            self._since.pop(key, None)
            return False
        since = self._since.setdefault(key, start)
        return end - since >= self.rules.sustain_seconds

    def update(
        self, sample: pb.GpuSample, model: str, memory_total: int, end: float, seconds: float
    ) -> list[str]:
        """The rules that flag this GPU over the tick (end - seconds, end]."""
        rules = self.rules
        start = end - seconds
        index = sample.index
        ok = sample.status == pb.GPU_STATUS_OK and sample.HasField("busy")
        busy = sample.busy if ok else 0.0
        if sample.HasField("sm_active"):
            low_work = sample.sm_active <= rules.sm_at_most
        elif sample.HasField("power_watts") and sample.HasField("power_limit_watts"):
            idle = idle_watts(model, sample.power_limit_watts)
            low_work = sample.power_watts <= idle + rules.power_headroom * (
                sample.power_limit_watts - idle
            )
        else:
            low_work = False  # nothing to judge by: never flag on a guess
        flags = []
        if self._sustained(
            (index, BUSY_WITHOUT_WORK), ok and busy >= rules.busy_at_least and low_work, start, end
        ):
            flags.append(BUSY_WITHOUT_WORK)
        low_memory = (
            sample.HasField("process_memory_bytes")
            and memory_total > 0
            and sample.process_memory_bytes <= rules.memory_at_most * memory_total
        )
        if self._sustained(
            (index, FLATLINE_LOW_MEMORY),
            ok and busy >= rules.flat_busy_at_least and low_memory,
            start,
            end,
        ):
            flags.append(FLATLINE_LOW_MEMORY)
        if any(pattern.search(p.command) for p in sample.processes for pattern in self._burn):
            flags.append(BURN_TOOL)
        return flags
