"""Per-window summaries: every report's seconds, integrated per GPU (docs/utilization.md §3).

Windows are aligned to multiples of the window length since the Unix epoch, so every node's
windows line up. A report whose interval straddles a window boundary is split pro rata.
The summary of a window is emitted by the first report that ends at or after the window's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gputally.v1 import telemetry_pb2 as pb

# Every number a GpuSummary and a PaddingTotal add up, straight from the protocol.
_SECONDS = tuple(f.name for f in pb.GpuSummary.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
_FLAGGED = tuple(f.name for f in pb.PaddingTotal.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
_FLAGGED_MEASURES = tuple(name for name in _FLAGGED if name != "seconds")


@dataclass(slots=True)
class _Totals:
    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SECONDS, 0.0))
    flagged: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_FLAGGED, 0.0))
    by_rule: dict[str, float] = field(default_factory=dict)
    attribution: pb.Attribution | None = None
    # MIG: owner (serialized attribution) -> (attribution, values); see shares().
    shares: dict[bytes, tuple[pb.Attribution, dict[str, float]]] = field(default_factory=dict)


def contributions(
    sample: pb.GpuSample, seconds: float, joules: float
) -> tuple[dict[str, float], dict[str, float]]:
    """What one sample adds to a GPU's window totals, and to its flagged totals."""
    values = dict.fromkeys(_SECONDS, 0.0)
    values["energy_joules"] = joules
    if sample.status == pb.GPU_STATUS_LOST:
        values["lost_seconds"] = seconds
    if sample.status != pb.GPU_STATUS_OK:
        return values, dict.fromkeys(_FLAGGED, 0.0)
    values["present_seconds"] = seconds
    if sample.HasField("process_count"):
        values["allocated_seconds"] = seconds * (sample.process_count > 0)
    else:
        values["allocated_missing_seconds"] = seconds
    busy = sample.busy * seconds if sample.HasField("busy") else 0.0
    values["busy_seconds"] = busy
    if not sample.HasField("busy"):
        values["busy_missing_seconds"] = seconds
    if sample.HasField("sm_active"):
        values["sm_active_seconds"] = sample.sm_active * seconds
        values["sm_measured_seconds"] = seconds
    else:
        # Unknown SM activity is capped by busy (an SM is only active while a kernel runs),
        # and by 1 where busy is unknown too.
        values["busy_unmeasured_seconds"] = busy if sample.HasField("busy") else seconds
    if sample.HasField("effective"):
        values["effective_seconds"] = sample.effective * seconds
        if sample.effective_estimated:
            values["effective_estimated_seconds"] = sample.effective * seconds
    flagged = dict.fromkeys(_FLAGGED, 0.0)
    if sample.padding:
        flagged["seconds"] = seconds
        for key in _FLAGGED_MEASURES:
            flagged[key] = values[key]
    return values, flagged


def shares(
    sample: pb.GpuSample, seconds: float, values: dict[str, float]
) -> list[tuple[pb.Attribution, dict[str, float]]]:
    """A MIG GPU's contributions split among the owners of its instances, in proportion to the
    compute slices each instance holds (docs/utilization.md §9).

    Slices that no instance of an owner of its own holds (an instance handed to nobody, or not
    partitioned at all) go to the GPU's own attribution. Allocated and SM-active seconds come
    from each instance's processes and GPM; busy and energy, which NVML gives only for the
    whole GPU, are split by slices. Where the slices are unknown, the whole GPU goes to its
    own attribution."""
    whole = sample.attribution
    total = sample.mig_slices if sample.HasField("mig_slices") else 0
    held = sum(m.slices for m in sample.mig)
    if (
        sample.status != pb.GPU_STATUS_OK
        or total <= 0
        or held > total
        or any(not m.HasField("slices") for m in sample.mig)
    ):
        return [(whole, values)]
    parts: dict[bytes, tuple[pb.Attribution, dict[str, float]]] = {}

    def part(owner: pb.Attribution, fraction: float) -> dict[str, float]:
        key = owner.SerializeToString(deterministic=True)
        if key not in parts:
            parts[key] = (owner, dict.fromkeys(_SECONDS, 0.0))
        out = parts[key][1]
        for name in ("present_seconds", "busy_seconds", "busy_missing_seconds", "energy_joules"):
            out[name] += values[name] * fraction
        return out

    rest = (total - held) / total
    if rest > 0:  # no instance there: no process, no kernel can run on these slices
        out = part(whole, rest)
        out["sm_measured_seconds"] += seconds * rest
    for instance in sample.mig:
        fraction = instance.slices / total
        out = part(instance.attribution if instance.attribution.source else whole, fraction)
        if instance.HasField("process_count"):
            out["allocated_seconds"] += seconds * fraction * (instance.process_count > 0)
        else:
            out["allocated_missing_seconds"] += seconds * fraction
        if instance.HasField("sm_active"):
            out["sm_active_seconds"] += instance.sm_active * seconds * fraction
            out["effective_seconds"] += instance.sm_active * seconds * fraction
            out["sm_measured_seconds"] += seconds * fraction
        else:  # capped by busy where NVML gave it, as for a whole GPU
            out["busy_unmeasured_seconds"] += (
                values["busy_seconds"] if sample.HasField("busy") else seconds
            ) * fraction
    return list(parts.values())


class Summarizer:
    def __init__(self, inventory: list[pb.GpuIdentity], window: float = 300.0):
        if window <= 0:
            raise ValueError("the summary window must be positive")
        self.window = window
        self.inventory = {gpu.index: gpu for gpu in inventory}
        self._open: dict[int, dict[int, _Totals]] = {}  # window number -> GPU -> totals
        self._energy: dict[int, int] = {}

    def _totals(self, number: int, index: int) -> _Totals:
        return self._open.setdefault(number, {}).setdefault(index, _Totals())

    def add(self, report: pb.Report) -> list[pb.Summary]:
        """Integrate one report; return the summaries of the windows it closed."""
        end = report.time_unix_nano / 1e9
        start = end - report.interval_seconds
        for sample in report.gpus:
            joules = self._joules(sample, report.interval_seconds)
            values, flagged = contributions(sample, report.interval_seconds, joules)
            if report.interval_seconds <= 0:
                continue
            owners = shares(sample, report.interval_seconds, values) if sample.mig_enabled else []
            first, last = math.floor(start / self.window), math.floor(end / self.window)
            for number in range(first, last + 1):
                w0, w1 = number * self.window, (number + 1) * self.window
                share = (min(end, w1) - max(start, w0)) / report.interval_seconds
                if share <= 0:
                    continue
                totals = self._totals(number, sample.index)
                for key, value in values.items():
                    totals.values[key] += value * share
                for key, value in flagged.items():
                    totals.flagged[key] += value * share
                for rule in sample.padding:
                    totals.by_rule[rule] = (
                        totals.by_rule.get(rule, 0.0) + report.interval_seconds * share
                    )
                if sample.attribution.source:
                    totals.attribution = sample.attribution
                # MIG mode is fixed for an agent's life (changing it resets the GPU), so a
                # GPU's shares cover either all of its seconds or none.
                for owner, part in owners:
                    owner_key = owner.SerializeToString(deterministic=True)
                    held = totals.shares.get(owner_key)
                    if held is None:
                        held = totals.shares[owner_key] = (owner, dict.fromkeys(_SECONDS, 0.0))
                    for name, value in part.items():
                        held[1][name] += value * share
        closed = sorted(n for n in self._open if (n + 1) * self.window <= end + 1e-9)
        return [self._emit(n) for n in closed]

    def flush(self) -> list[pb.Summary]:
        """Summaries of every window still open (the agent is stopping)."""
        return [self._emit(n) for n in sorted(self._open)]

    def _joules(self, sample: pb.GpuSample, seconds: float) -> float:
        if sample.HasField("energy_millijoules"):
            energy, last = sample.energy_millijoules, self._energy.get(sample.index)
            self._energy[sample.index] = energy
            if last is None:
                return 0.0
            # A smaller value: the driver reloaded and the counter restarted at zero.
            return (energy - last if energy >= last else energy) / 1000.0
        if sample.status == pb.GPU_STATUS_OK and sample.HasField("power_watts"):
            return sample.power_watts * seconds
        return 0.0

    def _emit(self, number: int) -> pb.Summary:
        gpus = self._open.pop(number)
        summary = pb.Summary(
            window_start_unix_nano=round(number * self.window * 1e9),
            window_end_unix_nano=round((number + 1) * self.window * 1e9),
        )
        for index, identity in sorted(self.inventory.items()):
            totals = gpus.get(index, _Totals())
            gpu = summary.gpus.add(
                index=index, uuid=identity.uuid, serial=identity.serial, model=identity.model
            )
            for key, value in totals.values.items():
                setattr(gpu, key, value)
            for rule, seconds in sorted(totals.by_rule.items()):
                gpu.padding.add(rule=rule, seconds=seconds)
            gpu.flagged.rule = "any"
            for key, value in totals.flagged.items():
                setattr(gpu.flagged, key, value)
            if totals.attribution is not None:
                gpu.attribution.CopyFrom(totals.attribution)
            # One owner only, and the GPU's own: `attribution` already says it all.
            mine = (totals.attribution or pb.Attribution()).SerializeToString(deterministic=True)
            if len(totals.shares) > 1 or (totals.shares and mine not in totals.shares):
                for owner, part in sorted(
                    totals.shares.values(), key=lambda p: (p[0].tenant, p[0].job, p[0].source)
                ):
                    held = gpu.shares.add()
                    if owner.source:
                        held.attribution.CopyFrom(owner)
                    for key, value in part.items():
                        setattr(held, key, value)
        return summary
