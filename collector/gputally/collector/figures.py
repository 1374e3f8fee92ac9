"""Figures for a period from summaries alone: docs/utilization.md, implemented.

Pure functions: no clock, no collector state. `gputally query` runs them on the collector's
record; the audit tooling runs them on a verified ledger.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from gputally.v1 import telemetry_pb2 as pb

MEASURES = ("allocated", "busy", "sm_active", "effective")
SUPPORTED, REFUTED, UNDETERMINED = "supported", "refuted", "undetermined"
# Every number a GpuSummary and a PaddingTotal add up, straight from the protocol.
_FIELDS = tuple(f.name for f in pb.GpuSummary.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
_FLAGGED = tuple(f.name for f in pb.PaddingTotal.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
# A GPU summary's numbers: values (in _FIELDS order), flagged ones (_FLAGGED), seconds per rule.
Numbers = tuple[Sequence[float], Sequence[float], list[tuple[str, float]]]
_FLAGGED_MEASURES = tuple(name for name in _FLAGGED if name != "seconds")


@dataclass(slots=True)
class Sums:
    """GPU-seconds (and joules) added up over summaries, pro rata to the period.

    Kept as flat lists (in _FIELDS and _FLAGGED order): a report adds millions of GPU
    summaries into several groups each, and list arithmetic is what keeps that fast."""

    totals: list[float] = field(default_factory=lambda: [0.0] * len(_FIELDS))
    flagged_totals: list[float] = field(default_factory=lambda: [0.0] * len(_FLAGGED))
    by_rule: dict[str, float] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, float]:
        return dict(zip(_FIELDS, self.totals, strict=True))

    @property
    def flagged(self) -> dict[str, float]:
        return dict(zip(_FLAGGED, self.flagged_totals, strict=True))

    def add(self, gpu: pb.GpuSummary, share: float) -> None:
        self.add_read(read(gpu), share)

    def add_read(self, numbers: Numbers, share: float) -> None:
        values, flagged, rules = numbers
        # map(add) and comprehensions over zip run several times faster than indexed += in
        # a loop, and a report does this for every GPU summary in the ledger. A whole window
        # (share 1, most of them) takes map(add), twice as fast again, with the same sums.
        if share == 1.0:
            self.totals = list(map(operator.add, self.totals, values))
        else:
            self.totals = [t + x * share for t, x in zip(self.totals, values, strict=True)]
        if flagged[0]:  # any flagged seconds at all
            self.flagged_totals = [
                t + x * share for t, x in zip(self.flagged_totals, flagged, strict=True)
            ]
        for rule, seconds in rules:
            self.by_rule[rule] = self.by_rule.get(rule, 0.0) + seconds * share


_read_values = operator.attrgetter(*_FIELDS)  # one C call per message, not one per field
_read_flagged = operator.attrgetter(*_FLAGGED)
assert len(_FIELDS) > 1 and len(_FLAGGED) > 1  # attrgetter returns a tuple only for several


def read(gpu: pb.GpuSummary) -> Numbers:
    """A GPU summary's numbers, read once for all the groups they are added to."""
    return (
        _read_values(gpu),
        _read_flagged(gpu.flagged),
        [(total.rule, total.seconds) for total in gpu.padding],
    )


@dataclass(frozen=True, slots=True)
class Bounds:
    figure: float
    lower: float
    upper: float

    def verdict(self, claim: float) -> str:
        if claim <= self.lower + 1e-12:
            return SUPPORTED
        if claim > self.upper + 1e-12:
            return REFUTED
        return UNDETERMINED


def _clamp(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def bounds(sums: Sums, capacity: float, *, without_padding: bool = False) -> dict[str, Bounds]:
    """Figure, lower and upper bound of every measure (docs/utilization.md §5 and §7)."""
    if capacity <= 0:
        return dict.fromkeys(MEASURES, Bounds(0.0, 0.0, 0.0))
    v = dict(sums.values)
    if without_padding:  # flagged seconds count as no work; the denominator stays
        for key in _FLAGGED_MEASURES:
            v[key] -= sums.flagged[key]
    unobserved = max(capacity - sums.values["present_seconds"], 0.0)
    measured_effective = v["effective_seconds"] - v["effective_estimated_seconds"]
    unmeasured_cap = v["busy_unmeasured_seconds"]
    # Seconds present without utilization.gpu or a process list (e.g. under MIG) count as
    # neither: they raise only the upper bound, as unobserved ones do.
    raw = {
        "allocated": (
            v["allocated_seconds"],
            v["allocated_seconds"],
            v["allocated_seconds"] + v["allocated_missing_seconds"] + unobserved,
        ),
        "busy": (
            v["busy_seconds"],
            v["busy_seconds"],
            v["busy_seconds"] + v["busy_missing_seconds"] + unobserved,
        ),
        "sm_active": (
            v["sm_active_seconds"],
            v["sm_active_seconds"],
            v["sm_active_seconds"] + unmeasured_cap + unobserved,
        ),
        "effective": (
            v["effective_seconds"],
            measured_effective,
            measured_effective + unmeasured_cap + unobserved,
        ),
    }
    return {
        m: Bounds(_clamp(f / capacity), _clamp(lo / capacity), _clamp(hi / capacity))
        for m, (f, lo, hi) in raw.items()
    }


@dataclass(slots=True)
class Group:
    sums: Sums = field(default_factory=Sums)
    gpus: set[str] = field(default_factory=set)


def owner(attribution: pb.Attribution) -> tuple[str, str]:
    """The tenant and job a GPU's (or a MIG share's) seconds are charged to, as breakdowns
    name them."""
    tenant = attribution.tenant or ("(unattributed)" if not attribution.source else "(no tenant)")
    return tenant, attribution.job or "(unattributed)"


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


@dataclass(slots=True)
class PeriodFigures:
    start: float
    end: float
    expected: int
    total: Group = field(default_factory=Group)
    nodes: dict[str, Group] = field(default_factory=dict)
    models: dict[str, Group] = field(default_factory=dict)
    tenants: dict[str, Group] = field(default_factory=dict)
    jobs: dict[str, Group] = field(default_factory=dict)
    gpus: dict[str, Group] = field(default_factory=dict)  # per GPU (UUID): the distribution
    gpu_model: dict[str, str] = field(default_factory=dict)
    energy_by_day: dict[str, float] = field(default_factory=dict)
    summaries: int = 0
    detail: bool = True  # False: only the totals and the nodes (a report's days need no more)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def capacity(self) -> float:
        return self.expected * self.seconds

    def coverage(self) -> float:
        return (
            _clamp(self.total.sums.values["present_seconds"] / self.capacity)
            if self.capacity > 0
            else 0.0
        )

    def group_bounds(
        self, group: Group, *, held: bool = False, without_padding: bool = False
    ) -> dict[str, Bounds]:
        """A breakdown's figures: over its GPUs seen x the period, or (tenants and jobs) over
        the seconds it held GPUs."""
        capacity = group.sums.values["present_seconds"] if held else len(group.gpus) * self.seconds
        return bounds(group.sums, capacity, without_padding=without_padding)


def compute(
    summaries: Iterable[tuple[str, bytes]], start: float, end: float, expected: int
) -> PeriodFigures:
    """Add up every summary overlapping [start, end), pro rata to the overlap."""
    if end <= start:
        raise ValueError("the period must end after it starts")
    if expected < 1:
        raise ValueError("the inventory must be at least 1 GPU")
    out = PeriodFigures(start=start, end=end, expected=expected)
    for node, body in summaries:
        accumulate(out, node, pb.Summary.FromString(pb.SignedSummary.FromString(body).body))
    return out


def accumulate(out: PeriodFigures, node: str, summary: pb.Summary) -> None:
    """Add one summary to a period's figures, pro rata to its overlap with the period."""
    start, end = out.start, out.end
    w0, w1 = summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9
    overlap = min(w1, end) - max(w0, start)
    if overlap > 0 and w1 > w0:
        share = overlap / (w1 - w0)
        out.summaries += 1
        for gpu in summary.gpus:
            key = gpu.uuid or f"{node}/{gpu.index}"
            numbers = read(gpu)
            if not out.detail:
                for group in (out.total, out.nodes.setdefault(node, Group())):
                    group.sums.add_read(numbers, share)
                    group.gpus.add(key)
                continue
            groups = [
                out.total,
                out.nodes.setdefault(node, Group()),
                out.models.setdefault(gpu.model or "(unknown)", Group()),
                out.gpus.setdefault(key, Group()),
            ]
            # A MIG GPU shared out is charged to its owners share by share (§9).
            held = [(owner(s.attribution), read(s)) for s in gpu.shares] or [
                (owner(gpu.attribution), numbers)
            ]
            for (tenant, job), part in held:
                for group in (
                    out.tenants.setdefault(tenant, Group()),
                    out.jobs.setdefault(job, Group()),
                ):
                    group.sums.add_read(part, share)
                    group.gpus.add(key)
            out.gpu_model[key] = gpu.model
            for group in groups:
                group.sums.add_read(numbers, share)
                group.gpus.add(key)
            day = _day(max(w0, start))
            out.energy_by_day[day] = out.energy_by_day.get(day, 0.0) + gpu.energy_joules * share


def as_dict(
    figures: PeriodFigures, measure: str, claim: float | None, top: int = 50
) -> dict[str, Any]:
    """A JSON-ready answer: the figure for `measure` with its bounds, coverage and verdict,
    every measure, with and without flagged padding, and the breakdowns."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; one of {', '.join(MEASURES)}")
    cluster = bounds(figures.total.sums, figures.capacity)
    clean = bounds(figures.total.sums, figures.capacity, without_padding=True)

    def measures(b: dict[str, Bounds]) -> dict[str, dict[str, float]]:
        return {m: {"figure": x.figure, "lower": x.lower, "upper": x.upper} for m, x in b.items()}

    def breakdown(groups: dict[str, Group], held: bool) -> list[dict[str, Any]]:
        rows = []
        for name, group in sorted(
            groups.items(), key=lambda kv: -kv[1].sums.values["present_seconds"]
        )[:top]:
            b = figures.group_bounds(group, held=held)
            rows.append(
                {
                    "name": name,
                    "gpus": len(group.gpus),
                    "gpu_hours": group.sums.values["present_seconds"] / 3600.0,
                    "energy_kwh": group.sums.values["energy_joules"] / 3.6e6,
                    **{m: b[m].figure for m in MEASURES},
                }
            )
        return rows

    chosen, chosen_clean = cluster[measure], clean[measure]
    seen = len(figures.total.gpus)
    return {
        "from": datetime.fromtimestamp(figures.start, UTC).isoformat().replace("+00:00", "Z"),
        "to": datetime.fromtimestamp(figures.end, UTC).isoformat().replace("+00:00", "Z"),
        "seconds": figures.seconds,
        "expected_gpus": figures.expected,
        "seen_gpus": seen,
        "measure": measure,
        "figure": chosen.figure,
        "lower": chosen.lower,
        "upper": chosen.upper,
        "coverage": figures.coverage(),
        "claim": claim,
        "verdict": None if claim is None else chosen.verdict(claim),
        "without_padding": {
            "figure": chosen_clean.figure,
            "lower": chosen_clean.lower,
            "upper": chosen_clean.upper,
            "verdict": None if claim is None else chosen_clean.verdict(claim),
        },
        "padding_gpu_hours": figures.total.sums.flagged["seconds"] / 3600.0,
        "padding_gpu_hours_by_rule": {
            r: s / 3600.0 for r, s in sorted(figures.total.sums.by_rule.items())
        },
        "energy_kwh": figures.total.sums.values["energy_joules"] / 3.6e6,
        "energy_kwh_by_day": {d: j / 3.6e6 for d, j in sorted(figures.energy_by_day.items())},
        "measures": measures(cluster),
        "measures_without_padding": measures(clean),
        "summaries": figures.summaries,
        "by_node": breakdown(figures.nodes, held=False),
        "by_model": breakdown(figures.models, held=False),
        "by_tenant": breakdown(figures.tenants, held=True),
        "by_job": breakdown(figures.jobs, held=True),
        "warnings": (
            [
                f"{seen} GPUs reported but only {figures.expected} were declared: the inventory is understated"
            ]
            if seen > figures.expected
            else []
        )
        + ([] if figures.summaries else ["no summary in the record overlaps this period"])
        + ([] if math.isfinite(figures.seconds) else ["the period is not finite"]),
    }


# key, model, tenant, job, numbers, and a MIG GPU's shares: (tenant, job, numbers) each.
# A GPU with shares has tenant and job SHARED: its owners are in the shares.
GpuNumbers = tuple[str, str, str, str, Numbers, list[tuple[str, str, Numbers]]]
SHARED = ""  # never a name owner() gives


def gpu_numbers(node: str, summary: pb.Summary) -> list[GpuNumbers]:
    """Each GPU's identity, attribution and numbers: what a period adds up (can run in a
    worker process; plain tuples travel cheaply)."""
    out: list[GpuNumbers] = []
    for gpu in summary.gpus:
        shares = gpu.shares
        tenant, job = owner(gpu.attribution) if not shares else (SHARED, SHARED)
        padding = gpu.padding
        out.append(
            (
                gpu.uuid or f"{node}/{gpu.index}",
                gpu.model or "(unknown)",
                tenant,
                job,
                # read(gpu), inlined: this runs for every GPU summary of a report
                (
                    _read_values(gpu),
                    _read_flagged(gpu.flagged),
                    [(total.rule, total.seconds) for total in padding] if padding else [],
                ),
                [(*owner(s.attribution), read(s)) for s in shares] if shares else [],
            )
        )
    return out


class Rollup:
    """A period's figures and its days' in one pass, adding each GPU summary once.

    Sums go into one fine table keyed by (GPU, node, model, tenant, job) and one per (day, node);
    the breakdowns are rolled up from them at the end, instead of adding every GPU summary into
    every group it belongs to as it comes."""

    def __init__(self, start: float, end: float, expected: int):
        if end <= start:
            raise ValueError("the period must end after it starts")
        self.start, self.end, self.expected = start, end, expected
        self.fine: dict[tuple[str, str, str, str, str], Sums] = {}
        self.node_day: dict[tuple[int, str], Sums] = {}
        # MIG shares, keyed (GPU, tenant, job): only the tenant and job breakdowns use them.
        self.held: dict[tuple[str, str, str], Sums] = {}
        self.summaries = 0

    def add(self, node: str, window: tuple[float, float], gpus: list[GpuNumbers]) -> None:
        w0, w1 = window
        overlap = min(w1, self.end) - max(w0, self.start)
        if overlap <= 0 or w1 <= w0:
            return
        share = overlap / (w1 - w0)
        self.summaries += 1
        node_rules: list[tuple[str, float]] = []
        for key, model, tenant, job, numbers, held in gpus:
            sums = self.fine.get((key, node, model, tenant, job))
            if sums is None:
                sums = self.fine[(key, node, model, tenant, job)] = Sums()
            sums.add_read(numbers, share)
            node_rules += numbers[2]
            for part_tenant, part_job, part in held:
                sums = self.held.get((key, part_tenant, part_job))
                if sums is None:
                    sums = self.held[(key, part_tenant, part_job)] = Sums()
                sums.add_read(part, share)
        # The node's totals for this window, column by column.
        node_values = [sum(column) for column in zip(*(g[4][0] for g in gpus), strict=True)] or [
            0.0
        ] * len(_FIELDS)
        node_flagged = [sum(column) for column in zip(*(g[4][1] for g in gpus), strict=True)] or [
            0.0
        ] * len(_FLAGGED)
        day_of = 86400.0
        for number in range(
            int(max(w0, self.start) // day_of), math.ceil(min(w1, self.end) / day_of)
        ):
            d0, d1 = max(self.start, number * day_of), min(self.end, (number + 1) * day_of)
            day_share = (min(w1, d1) - max(w0, d0)) / (w1 - w0)
            if day_share <= 0:
                continue
            sums = self.node_day.get((number, node))
            if sums is None:
                sums = self.node_day[(number, node)] = Sums()
            sums.add_read((node_values, node_flagged, node_rules), day_share)

    def clear(self) -> None:
        """Back to nothing added (a verification that has to start again)."""
        self.fine, self.node_day, self.held, self.summaries = {}, {}, {}, 0

    def merge(self, other: Rollup) -> None:
        """Add another rollup of the same period (a worker's share of the log) into this one."""
        if (other.start, other.end, other.expected) != (self.start, self.end, self.expected):
            raise ValueError("only rollups of the same period and inventory can be merged")
        self.summaries += other.summaries
        _merge_table(self.fine, other.fine)
        _merge_table(self.node_day, other.node_day)
        _merge_table(self.held, other.held)

    def period(self) -> PeriodFigures:
        out = PeriodFigures(
            start=self.start, end=self.end, expected=self.expected, summaries=self.summaries
        )
        for (key, node, model, tenant, job), sums in self.fine.items():
            groups = [
                out.total,
                out.nodes.setdefault(node, Group()),
                out.models.setdefault(model, Group()),
                out.gpus.setdefault(key, Group()),
            ]
            if tenant != SHARED:
                groups += [
                    out.tenants.setdefault(tenant, Group()),
                    out.jobs.setdefault(job, Group()),
                ]
            for group in groups:
                _merge(group.sums, sums)
                group.gpus.add(key)
            out.gpu_model[key] = model
        for (key, tenant, job), sums in self.held.items():
            for group in (
                out.tenants.setdefault(tenant, Group()),
                out.jobs.setdefault(job, Group()),
            ):
                _merge(group.sums, sums)
                group.gpus.add(key)
        for (number, _), sums in self.node_day.items():
            day = _day(max(self.start, number * 86400.0))
            out.energy_by_day[day] = (
                out.energy_by_day.get(day, 0.0) + sums.totals[_FIELDS.index("energy_joules")]
            )
        return out

    def days(self) -> list[tuple[str, PeriodFigures]]:
        """Each UTC day's figures (totals and nodes only); GPUs per node come from the period."""
        gpus_of: dict[str, set[str]] = {}
        for key, node, *_ in self.fine:
            gpus_of.setdefault(node, set()).add(key)
        days: dict[int, PeriodFigures] = {}
        for number in range(int(self.start // 86400), math.ceil(self.end / 86400)):
            d0, d1 = max(self.start, number * 86400.0), min(self.end, (number + 1) * 86400.0)
            days[number] = PeriodFigures(start=d0, end=d1, expected=self.expected, detail=False)
        for (number, node), sums in self.node_day.items():
            figures = days[number]
            _merge(figures.total.sums, sums)
            group = figures.nodes.setdefault(node, Group())
            _merge(group.sums, sums)
            group.gpus |= gpus_of.get(node, set())
            figures.total.gpus |= group.gpus
        return [(_day(f.start), f) for _, f in sorted(days.items())]


_Key = TypeVar("_Key")


def _merge_table(into: dict[_Key, Sums], other: dict[_Key, Sums]) -> None:
    for key, sums in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = sums
        else:
            _merge(mine, sums)


def _merge(into: Sums, other: Sums) -> None:
    into.add_read((other.totals, other.flagged_totals, list(other.by_rule.items())), 1.0)
