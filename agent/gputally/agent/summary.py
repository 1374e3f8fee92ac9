"""Per-window summaries: every report's seconds, integrated per GPU (docs/utilization.md §3).

Windows are aligned to multiples of the window length since the Unix epoch, so every node's
windows line up. A report whose interval straddles a window boundary is split pro rata.
The summary of a window is emitted by the first report that ends at or after the window's end.
What each sample adds up to is gputally.v1.accounting's: the same rules the collector reads
summaries and samples by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb


def _summary_zeros() -> dict[str, float]:
    return dict.fromkeys(accounting.SUMMARY_FIELDS, 0.0)


@dataclass(frozen=True, slots=True)
class Accounted:
    """What one GPU sample adds up to over the seconds it covers (gputally.v1.accounting)."""

    seconds: float
    values: accounting.Totals
    flagged: accounting.Totals | None  # its flagged part, when a padding rule flags it
    rules: tuple[str, ...]  # the padding rules that flag it
    attribution: pb.Attribution
    owners: list[tuple[pb.Attribution, accounting.Totals]]  # a MIG GPU's split, else []


def account(sample: pb.GpuSample, seconds: float, joules: float) -> Accounted:
    values = accounting.contributions(sample, seconds, joules)
    ok = sample.status == pb.GPU_STATUS_OK
    rules = tuple(sample.padding) if ok else ()  # padding flags present seconds only
    return Accounted(
        seconds,
        values,
        accounting.flagged(values) if rules else None,
        rules,
        sample.attribution,
        accounting.mig_shares(sample, seconds, values) if sample.mig_enabled else [],
    )


@dataclass(slots=True)
class GpuTotals:
    """One GPU's accounting added up over a span (a summary window, or a report's ticks):
    what a GpuSummary holds."""

    values: dict[str, float] = field(default_factory=_summary_zeros)
    flagged: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(accounting.FLAGGED_FIELDS, 0.0)
    )
    by_rule: dict[str, float] = field(default_factory=dict)
    attribution: pb.Attribution | None = None
    # MIG: owner (serialized attribution) -> (attribution, values); see accounting.mig_shares.
    shares: dict[bytes, tuple[pb.Attribution, dict[str, float]]] = field(default_factory=dict)

    def add(self, tick: Accounted, share: float = 1.0) -> None:
        """Add `share` of one sample's accounting (a sample straddling a window's end is
        split pro rata between the windows)."""
        _add(self.values, tick.values, share)
        if tick.flagged is not None:
            _add(self.flagged, tick.flagged, share)
        for rule in tick.rules:
            self.by_rule[rule] = self.by_rule.get(rule, 0.0) + tick.seconds * share
        if tick.attribution.source:
            self.attribution = tick.attribution
        # MIG mode is fixed for an agent's life (changing it resets the GPU), so a GPU's
        # shares cover either all of its seconds or none.
        for owner, part in tick.owners:
            key = owner.SerializeToString(deterministic=True)
            held = self.shares.get(key)
            if held is None:
                held = self.shares[key] = (owner, _summary_zeros())
            _add(held[1], part, share)

    def fill(self, gpu: pb.GpuSummary) -> None:
        """Write the totals into `gpu` (its identity fields are the caller's)."""
        for key, value in self.values.items():
            setattr(gpu, key, value)
        for rule, seconds in sorted(self.by_rule.items()):
            gpu.padding.add(rule=rule, seconds=seconds)
        gpu.flagged.rule = accounting.ANY_RULE
        for key, value in self.flagged.items():
            setattr(gpu.flagged, key, value)
        if self.attribution is not None:
            gpu.attribution.CopyFrom(self.attribution)
        # One owner only, and the GPU's own: `attribution` already says it all.
        parts = list(self.shares.values())
        if accounting.is_shared(parts, self.attribution or pb.Attribution()):
            for owner, part in sorted(parts, key=lambda p: (p[0].tenant, p[0].job, p[0].source)):
                held = gpu.shares.add()
                if owner.source:
                    held.attribution.CopyFrom(owner)
                for key, value in part.items():
                    setattr(held, key, value)


class Summarizer:
    def __init__(
        self,
        inventory: list[pb.GpuIdentity],
        window: float = 300.0,
        *,
        backend: str = "",
        driver_version: str = "",
    ):
        # what every summary says it was measured with, signed with its numbers
        self.backend, self.driver_version = backend, driver_version
        if window <= 0:
            raise ValueError("the summary window must be positive")
        self.window = window
        self.inventory = {gpu.index: gpu for gpu in inventory}
        self._open: dict[int, dict[int, GpuTotals]] = {}  # window number -> GPU -> totals
        self._energy: dict[int, accounting.EnergyCounter] = {}

    def _totals(self, number: int, index: int) -> GpuTotals:
        return self._open.setdefault(number, {}).setdefault(index, GpuTotals())

    def add(self, report: pb.Report) -> list[pb.Summary]:
        """Integrate one report; return the summaries of the windows it closed."""
        seconds = report.interval_seconds
        end = report.time_unix_nano / 1e9
        start = end - seconds
        for sample in report.gpus:
            meter = self._energy.setdefault(sample.index, accounting.EnergyCounter())
            joules = meter.joules(sample, seconds)
            if seconds <= 0:
                continue
            tick = account(sample, seconds, joules)
            first, last = math.floor(start / self.window), math.floor(end / self.window)
            for number in range(first, last + 1):
                w0, w1 = number * self.window, (number + 1) * self.window
                share = (min(end, w1) - max(start, w0)) / seconds
                if share > 0:
                    self._totals(number, sample.index).add(tick, share)
        closed = sorted(n for n in self._open if (n + 1) * self.window <= end + 1e-9)
        return [self._emit(n) for n in closed]

    def flush(self) -> list[pb.Summary]:
        """Summaries of every window still open (the agent is stopping)."""
        return [self._emit(n) for n in sorted(self._open)]

    def _emit(self, number: int) -> pb.Summary:
        gpus = self._open.pop(number)
        summary = pb.Summary(
            window_start_unix_nano=round(number * self.window * 1e9),
            window_end_unix_nano=round((number + 1) * self.window * 1e9),
            backend=self.backend,
            driver_version=self.driver_version[:64],
        )
        for index, identity in sorted(self.inventory.items()):
            gpu = summary.gpus.add(
                index=index, uuid=identity.uuid, serial=identity.serial, model=identity.model
            )
            gpus.get(index, GpuTotals()).fill(gpu)
        return summary


def _add(into: dict[str, float], values: dict[str, float], share: float) -> None:
    """Add `values` x `share` into the totals `into` holds (the names it has)."""
    for key in into:
        into[key] += values[key] * share
