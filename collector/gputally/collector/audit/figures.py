"""Figures for a period from summaries alone: docs/utilization.md, implemented.

Pure: no clock, no collector state. `gputally query` runs it on the collector's record; the
audit commands on a verified ledger. One path adds summaries up, :class:`Rollup`: every GPU
summary goes into one fine table keyed by (GPU, node, model, tenant, job), and one per (day,
node), once each; the period's breakdowns and its days are rolled up from those at the end.
What the numbers mean (bounds, verdicts, owners) is gputally.v1.accounting's.

A Rollup can also hold named phases (`audit report --phase`): one more Rollup each, filled by
the same adds, so that a phase that starts or ends within a day is exact. ISO weeks come from
the days, which are exact already.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import FLAGGED_FIELDS, RECORDED_MEASURES, SUMMARY_FIELDS, Bounds

MEASURES = RECORDED_MEASURES
# The real-work measure (docs/utilization.md §2): the share of a GPU's SMs at work, which a
# spin kernel does not raise. Reports put its verdict beside the claim's measure, always.
WORK_MEASURE = "sm_active"
DAY = 86400.0
WEEK = 7 * DAY
# Unix day 0 (1970-01-01) was a Thursday: ISO week n (Monday 00:00 UTC) starts on day 7n - 3.
_MONDAY = 3
_ENERGY = SUMMARY_FIELDS.index("energy_joules")


# A GPU summary's numbers: (values in SUMMARY_FIELDS order, flagged values in FLAGGED_FIELDS
# order, the seconds each padding rule flagged). Plain tuples, always unpacked by name where
# they are read: a report builds millions, and a tuple is the cheapest thing to build.
Numbers = tuple[Sequence[float], Sequence[float], list[tuple[str, float]]]


_read_values = operator.attrgetter(*SUMMARY_FIELDS)  # one C call per message, not one per field
_read_flagged = operator.attrgetter(*FLAGGED_FIELDS)
assert len(SUMMARY_FIELDS) > 1 and len(FLAGGED_FIELDS) > 1  # attrgetter gives a tuple for several


def read(gpu: pb.GpuSummary) -> Numbers:
    """A GPU summary's (or a share's) numbers, read once for all the groups they add to."""
    padding = gpu.padding
    return (
        _read_values(gpu),
        _read_flagged(gpu.flagged),
        [(total.rule, total.seconds) for total in padding] if padding else [],
    )


_I = {name: i for i, name in enumerate(SUMMARY_FIELDS)}
# For each recorded measure: the seconds it certainly holds (its lower bound's numerator) and
# those it may hold beside them (missing or unmeasured), as SUMMARY_FIELDS indexes:
# accounting.bounds, measure by measure.
_CERTAIN = (
    ("allocated", (_I["allocated_seconds"],), (), (_I["allocated_missing_seconds"],)),
    ("busy", (_I["busy_seconds"],), (), (_I["busy_missing_seconds"],)),
    ("sm_active", (_I["sm_active_seconds"],), (), (_I["busy_unmeasured_seconds"],)),
    (
        "effective",
        (_I["effective_seconds"],),
        (_I["effective_estimated_seconds"],),
        (_I["busy_unmeasured_seconds"],),
    ),
)
_PRESENT = _I["present_seconds"]


def _cut(values: Sequence[float], share: float, span: float) -> list[float]:
    """How much a window cut by the period (`share` of its `span` GPU-seconds inside) widens
    each measure's bounds beyond the pro rata share: (lower, upper) per recorded measure.

    Pro rata puts `share` of every second inside, but a summary does not say when in its
    window the seconds were: of m seconds certainly in the measure, at least
    max(0, m - (1 - share) * span) are inside; of q seconds certainly not, at least
    max(0, q - (1 - share) * span). The bounds take the worst, the figure stays pro rata."""
    outside = (1.0 - share) * span
    present = values[_PRESENT]
    out: list[float] = []
    for _, plus, minus, maybe in _CERTAIN:
        certain = sum(values[i] for i in plus) - sum(values[i] for i in minus)
        idle = present - sum(values[i] for i in plus) - sum(values[i] for i in maybe)
        out.append(max(0.0, share * certain - max(0.0, certain - outside)))
        out.append(max(0.0, share * idle - max(0.0, idle - outside)))
    return out


@dataclass(slots=True)
class Sums:
    """GPU-seconds (and joules) added up over summaries, pro rata to the period.

    Kept as flat lists (in SUMMARY_FIELDS and FLAGGED_FIELDS order): a report adds millions
    of GPU summaries, and list arithmetic is what keeps that fast."""

    totals: list[float] = field(default_factory=lambda: [0.0] * len(SUMMARY_FIELDS))
    flagged_totals: list[float] = field(default_factory=lambda: [0.0] * len(FLAGGED_FIELDS))
    by_rule: dict[str, float] = field(default_factory=dict)
    # GPU-seconds by which windows cut by the period widen each recorded measure's bounds:
    # (lower, upper) per measure of _CERTAIN, see _cut
    cut: list[float] = field(default_factory=lambda: [0.0] * (2 * len(_CERTAIN)))

    @property
    def values(self) -> dict[str, float]:
        return dict(zip(SUMMARY_FIELDS, self.totals, strict=True))

    @property
    def flagged(self) -> dict[str, float]:
        return dict(zip(FLAGGED_FIELDS, self.flagged_totals, strict=True))

    def add(self, numbers: Numbers, share: float, span: float = 0.0) -> None:
        """Add `share` of a window's numbers; `span`, the window's GPU-seconds, when the
        share is a window cut by the period (its bounds widen, see _cut)."""
        values, flagged, rules = numbers
        if share < 1.0 and span > 0.0:
            self.cut = [t + x for t, x in zip(self.cut, _cut(values, share, span), strict=True)]
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

    def merge(self, other: Sums) -> None:
        self.add((other.totals, other.flagged_totals, list(other.by_rule.items())), 1.0)
        if any(other.cut):
            self.cut = [t + x for t, x in zip(self.cut, other.cut, strict=True)]


def bounds(sums: Sums, capacity: float, *, without_padding: bool = False) -> dict[str, Bounds]:
    """Figure, lower and upper bound of every measure (docs/utilization.md §5 and §7)."""
    values = sums.values
    if without_padding:  # flagged seconds count as no work; the denominator stays
        values = accounting.unpadded(values, sums.flagged)
    out = accounting.bounds(values, capacity)
    if capacity > 0 and any(sums.cut):
        # windows cut by the period: their seconds may lie on either side of the cut
        for k, (measure, *_) in enumerate(_CERTAIN):
            b = out[measure]
            lower = max(0.0, b.lower - sums.cut[2 * k] / capacity)
            upper = min(1.0, b.upper + sums.cut[2 * k + 1] / capacity)
            out[measure] = Bounds(b.figure, min(lower, b.figure), max(upper, b.figure))
    return out


@dataclass(slots=True)
class Group:
    sums: Sums = field(default_factory=Sums)
    gpus: set[str] = field(default_factory=set)


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
    gpu_nodes: dict[str, set[str]] = field(default_factory=dict)  # per GPU: the nodes it was on
    gpu_identity: dict[str, tuple[str, str]] = field(default_factory=dict)  # (UUID, serial)
    energy_by_day: dict[str, float] = field(default_factory=dict)
    summaries: int = 0
    # summaries by the backend they were measured with ("unknown": from agents before it
    # was signed): a figure over "mock" summaries is a simulation, and says so first
    backends: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def denominator(self) -> int:
        """The GPUs the figures are over: the declared inventory, or the GPUs the summaries
        name when they are more (an understated inventory must not inflate a figure)."""
        return max(self.expected, len(self.total.gpus))

    @property
    def capacity(self) -> float:
        return self.denominator * self.seconds

    def coverage(self) -> float:
        return accounting.coverage(self.total.sums.values, self.capacity)

    def group_bounds(
        self, group: Group, *, held: bool = False, without_padding: bool = False
    ) -> dict[str, Bounds]:
        """A breakdown's figures: over its GPUs seen x the period, or (tenants and jobs) over
        the seconds it held GPUs."""
        capacity = group.sums.values["present_seconds"] if held else len(group.gpus) * self.seconds
        return bounds(group.sums, capacity, without_padding=without_padding)


# A GPU with shares is charged to its owners share by share: its own tenant and job are this.
SHARED = ""  # never a name accounting.owner gives


# What a period adds up of one GPU summary: (key: the GPU's UUID, else node/index; model;
# tenant and job, SHARED when it is charged by its shares; its Numbers; a shared MIG GPU's
# shares, (tenant, job, Numbers) each; its identity, (UUID as reported, serial)). Plain
# tuples, as Numbers are, and they travel cheaply from worker processes.
GpuNumbers = tuple[str, str, str, str, Numbers, list[tuple[str, str, Numbers]], tuple[str, str]]


def gpu_numbers(node: str, summary: pb.Summary) -> list[GpuNumbers]:
    """Each GPU's identity, attribution and numbers (can run in a worker process)."""
    out: list[GpuNumbers] = []
    for gpu in summary.gpus:
        shares = gpu.shares
        padding = gpu.padding
        tenant, job = accounting.owner(gpu.attribution) if not shares else (SHARED, SHARED)
        out.append(
            (
                accounting.card(gpu.uuid) or f"{node}/{gpu.index}",
                gpu.model or "(unknown)",
                tenant,
                job,
                # read(gpu), inlined: this runs for every GPU summary of a report
                (
                    _read_values(gpu),
                    _read_flagged(gpu.flagged),
                    [(t.rule, t.seconds) for t in padding] if padding else [],
                ),
                [(*accounting.owner(s.attribution), read(s)) for s in shares] if shares else [],
                (gpu.uuid, gpu.serial),
            )
        )
    return out


_Key = TypeVar("_Key")


def _sums_of(table: dict[_Key, Sums], key: _Key) -> Sums:
    sums = table.get(key)
    if sums is None:
        sums = table[key] = Sums()
    return sums


def _merge_table(into: dict[_Key, Sums], other: dict[_Key, Sums]) -> None:
    for key, sums in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = sums
        else:
            mine.merge(sums)


# A named part of a period: (name, start, end), unix seconds.
Phase = tuple[str, float, float]


class Rollup:
    """A period's figures and its days', in one pass that adds each GPU summary once; with
    `phases`, each phase's figures too, from the same adds."""

    def __init__(self, start: float, end: float, expected: int, phases: Sequence[Phase] = ()):
        if end <= start:
            raise ValueError("the period must end after it starts")
        if expected < 1:
            raise ValueError("the inventory must be at least 1 GPU")
        phases = tuple(phases)
        names = [name for name, _, _ in phases]
        if len(set(names)) != len(names):
            raise ValueError("phase names must differ")
        for name, p0, p1 in phases:
            if not start <= p0 < p1 <= end:
                raise ValueError(f"phase {name} must lie within the period and end after it starts")
        self.start, self.end = start, end
        self.expected = int(expected)
        self.spans: tuple[Phase, ...] = phases  # (name, start, end) of each phase
        self.fine: dict[tuple[str, str, str, str, str], Sums] = {}
        self.node_day: dict[tuple[int, str], Sums] = {}
        # MIG shares, keyed (GPU, tenant, job): only the tenant and job breakdowns use them.
        self.held: dict[tuple[str, str, str], Sums] = {}
        self.identity: dict[str, tuple[str, str]] = {}  # GPU -> (UUID, serial)
        self.summaries = 0
        self.backends: dict[str, int] = {}
        self.phases = {name: Rollup(p0, p1, int(expected)) for name, p0, p1 in phases}

    def period_of(self) -> tuple[float, float, int, tuple[Phase, ...]]:
        """What makes an empty rollup like this one (Rollup(*period_of())): verify.py's worker
        processes each add up their share of the log into one, merged after."""
        return (self.start, self.end, self.expected, self.spans)

    def add_summary(self, node: str, summary: pb.Summary) -> None:
        window = (summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9)
        self.add(node, window, gpu_numbers(node, summary), summary.backend)

    def add(
        self, node: str, window: tuple[float, float], gpus: list[GpuNumbers], backend: str = ""
    ) -> None:
        """Add one summary's GPUs, pro rata to its window's overlap with the period."""
        for phase in self.phases.values():
            phase.add(node, window, gpus, backend)
        w0, w1 = window
        overlap = min(w1, self.end) - max(w0, self.start)
        if overlap <= 0 or w1 <= w0:
            return
        share = overlap / (w1 - w0)
        self.summaries += 1
        kind = backend or "unknown"
        self.backends[kind] = self.backends.get(kind, 0) + 1
        node_rules: list[tuple[str, float]] = []
        fine, held, identity = self.fine, self.held, self.identity
        for key, model, tenant, job, numbers, shares, ident in gpus:
            sums = fine.get((key, node, model, tenant, job))
            if sums is None:
                sums = fine[(key, node, model, tenant, job)] = Sums()
            sums.add(numbers, share, w1 - w0)
            _, _, rules = numbers
            node_rules += rules
            for part_tenant, part_job, part in shares:
                _sums_of(held, (key, part_tenant, part_job)).add(part, share)
            known = identity.get(key)
            if known != ident:  # rare: the first time, or a card that says two things
                identity[key] = ident if known is None else max(known, ident)
        # The node's totals for this window, column by column, split over the days it spans.
        each = [numbers for _, _, _, _, numbers, _, _ in gpus]
        node_numbers = (
            [sum(c) for c in zip(*(v for v, _, _ in each), strict=True)]
            or [0.0] * len(SUMMARY_FIELDS),
            [sum(c) for c in zip(*(f for _, f, _ in each), strict=True)]
            or [0.0] * len(FLAGGED_FIELDS),
            node_rules,
        )
        for number in range(int(max(w0, self.start) // DAY), math.ceil(min(w1, self.end) / DAY)):
            d0, d1 = max(self.start, number * DAY), min(self.end, (number + 1) * DAY)
            day_share = (min(w1, d1) - max(w0, d0)) / (w1 - w0)
            if day_share > 0:
                _sums_of(self.node_day, (number, node)).add(
                    node_numbers, day_share, len(gpus) * (w1 - w0)
                )

    def clear(self) -> None:
        """Back to nothing added (a verification that has to start again)."""
        self.fine, self.node_day, self.held, self.summaries = {}, {}, {}, 0
        self.backends, self.identity = {}, {}
        for phase in self.phases.values():
            phase.clear()

    def merge(self, other: Rollup) -> None:
        """Add another rollup of the same period (a worker's share of the log) into this one."""
        if (other.start, other.end, other.expected) != (self.start, self.end, self.expected):
            raise ValueError("only rollups of the same period and inventory can be merged")
        if [(n, p.start, p.end) for n, p in other.phases.items()] != [
            (n, p.start, p.end) for n, p in self.phases.items()
        ]:
            raise ValueError("only rollups of the same phases can be merged")
        self.summaries += other.summaries
        for kind, count in other.backends.items():
            self.backends[kind] = self.backends.get(kind, 0) + count
        _merge_table(self.fine, other.fine)
        _merge_table(self.node_day, other.node_day)
        _merge_table(self.held, other.held)
        for key, ident in other.identity.items():
            known = self.identity.get(key)
            self.identity[key] = ident if known is None else max(known, ident)
        for name, phase in self.phases.items():
            phase.merge(other.phases[name])

    def period(self) -> PeriodFigures:
        out = PeriodFigures(
            start=self.start,
            end=self.end,
            expected=int(self.expected),
            summaries=self.summaries,
            backends=dict(self.backends),
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
                group.sums.merge(sums)
                group.gpus.add(key)
            out.gpu_model[key] = model
            out.gpu_nodes.setdefault(key, set()).add(node)
        out.gpu_identity = dict(self.identity)
        for (key, tenant, job), sums in self.held.items():
            for group in (
                out.tenants.setdefault(tenant, Group()),
                out.jobs.setdefault(job, Group()),
            ):
                group.sums.merge(sums)
                group.gpus.add(key)
        for (number, _), sums in self.node_day.items():
            day = _day(max(self.start, number * DAY))
            out.energy_by_day[day] = out.energy_by_day.get(day, 0.0) + sums.totals[_ENERGY]
        return out

    def days(self) -> list[tuple[str, PeriodFigures]]:
        """Each UTC day's figures (totals and nodes only); GPUs per node come from the period."""
        spans = {
            number: (max(self.start, number * DAY), min(self.end, (number + 1) * DAY))
            for number in range(int(self.start // DAY), math.ceil(self.end / DAY))
        }
        return [(_day(f.start), f) for _, f in self._spans(spans, lambda day: day)]

    def weeks(self) -> list[tuple[str, PeriodFigures, bool]]:
        """Each ISO week's figures (Monday 00:00 UTC to Monday), as days() gives the days':
        (e.g. "2026-W10", figures, whether the period holds only part of the week)."""
        first = (int(self.start // DAY) + _MONDAY) // 7
        last = (math.ceil(self.end / DAY) - 1 + _MONDAY) // 7
        spans = {}
        for week in range(first, last + 1):
            w0, w1 = (7 * week - _MONDAY) * DAY, (7 * week + 7 - _MONDAY) * DAY
            spans[week] = (max(self.start, w0), min(self.end, w1))
        out = []
        for week, figures in self._spans(spans, lambda day: (day + _MONDAY) // 7):
            year, number, _ = datetime.fromtimestamp((7 * week - _MONDAY) * DAY, UTC).isocalendar()
            partial = figures.seconds < WEEK
            out.append((f"{year}-W{number:02d}", figures, partial))
        return out

    def _spans(
        self, spans: dict[int, tuple[float, float]], of_day: Callable[[int], int]
    ) -> list[tuple[int, PeriodFigures]]:
        """The figures of spans made of whole days (within the period): `of_day` says which
        span a day number is in."""
        gpus_of: dict[str, set[str]] = {}
        for key, node, *_ in self.fine:
            gpus_of.setdefault(node, set()).add(key)
        figures = {
            n: PeriodFigures(start=s0, end=s1, expected=int(self.expected))
            for n, (s0, s1) in spans.items()
        }
        for (number, node), sums in self.node_day.items():
            span = figures[of_day(number)]
            span.total.sums.merge(sums)
            group = span.nodes.setdefault(node, Group())
            group.sums.merge(sums)
            group.gpus |= gpus_of.get(node, set())
            span.total.gpus |= group.gpus
        return sorted(figures.items())


class Screen:
    """Each card's seconds counted once, whatever a ledger holds (it may come from an older or
    hostile collector): in log order, a GPU summary that accounting.next_window refuses (its
    window overlaps an earlier one of the same card, by accounting.card, from any node) is not
    added up. The collector refuses such summaries at ingest by the same rule; `audit verify`
    names each one as a finding (a duplicate identity when the earlier window is another
    node's)."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[accounting.Window, str]] = {}  # card -> (window, node)

    def overlapping(
        self, node: str, start: int, end: int, gpus: Iterable[tuple[str, float, float, str]]
    ) -> list[tuple[str, str, int, str]]:
        """(card, the earlier window's node, its end in ns, UUID) of each GPU (card, covered
        seconds, joules, UUID) of a summary of [start, end) ns that would count a second (or
        a joule) twice; the rest are taken, and their windows remembered."""
        out = []
        latest = self.latest
        for key, covered, joules, uuid in gpus:
            held = latest.get(key)
            if held is None or start >= held[0][1]:  # the common case, without a call
                latest[key] = ((start, end, covered, joules), node)
                continue
            window = accounting.next_window(held[0], start, end, covered, joules)
            if window is None:
                assert held is not None
                out.append((key, held[1], held[0][1], uuid))
                continue
            latest[key] = (window, node)
        return out


GpuWindows = tuple[tuple[str, float, float, str], ...]


_windows_of = operator.attrgetter("uuid", "present_seconds", "lost_seconds", "energy_joules")


def windows_of(summary: pb.Summary) -> GpuWindows:
    """(card, covered seconds, joules, UUID) of each GPU of a summary: what Screen screens."""
    return tuple(
        (accounting.card(uuid), present + lost, joules, uuid)
        for uuid, present, lost, joules in map(_windows_of, summary.gpus)
    )


def countable(
    node: str, summary: pb.Summary, overlapping: Iterable[tuple[str, str, int, str]]
) -> list[GpuNumbers]:
    """The GPU numbers of `summary` that a period adds up: none of an impossible summary
    (accounting.summary_problem), none of a GPU whose window overlaps an earlier one."""
    if accounting.summary_problem(summary):
        return []
    skipped = {key for key, *_ in overlapping}
    numbers = gpu_numbers(node, summary)
    return [n for n in numbers if n[0] not in skipped] if skipped else numbers


def compute(
    summaries: Iterable[tuple[str, bytes]], start: float, end: float, expected: int
) -> PeriodFigures:
    """The figures of [start, end) from stored summaries, (node, SignedSummary bytes) each, in
    log order; impossible and overlapping ones (Screen) are not added up."""
    rollup = Rollup(start, end, expected)
    screen = Screen()
    for node, body in summaries:
        summary = pb.Summary.FromString(pb.SignedSummary.FromString(body).body)
        if accounting.summary_problem(summary):
            continue  # claims no window: its GPUs' seconds are not taken
        start_ns, end_ns = summary.window_start_unix_nano, summary.window_end_unix_nano
        overlapping = screen.overlapping(node, start_ns, end_ns, windows_of(summary))
        rollup.add(
            node,
            (start_ns / 1e9, end_ns / 1e9),
            countable(node, summary, overlapping),
            summary.backend,
        )
    return rollup.period()


def verdicts(figures: PeriodFigures, claim: float | None) -> dict[str, dict[str, Any]]:
    """Every measure's figure, bounds and verdict on `claim` (None without one), with and
    without flagged padding, and the verdict's one wording (accounting.headline)."""
    cluster = bounds(figures.total.sums, figures.capacity)
    clean = bounds(figures.total.sums, figures.capacity, without_padding=True)
    out = {}
    for name in MEASURES:
        b, c = cluster[name], clean[name]
        verdict = None if claim is None else b.verdict(claim)
        verdict_clean = None if claim is None else c.verdict(claim)
        out[name] = {
            "figure": b.figure,
            "lower": b.lower,
            "upper": b.upper,
            "verdict": verdict,
            "without_padding": {"figure": c.figure, "lower": c.lower, "upper": c.upper},
            "verdict_without_padding": verdict_clean,
            "headline_verdict": _headline(verdict, verdict_clean),
            "padding_decides": verdict != verdict_clean,
        }
    return out


def _unclamped(figures: PeriodFigures, gpus: int) -> dict[str, float]:
    """Each measure's figure over `gpus` x the period, not clamped to [0, 1]: what an
    inventory of `gpus` would make of the GPU-seconds recorded."""
    capacity = gpus * figures.seconds
    values = figures.total.sums.values
    if capacity <= 0 or not math.isfinite(capacity):
        return dict.fromkeys(MEASURES, 0.0)
    return {m: values[f"{m}_seconds"] / capacity for m in MEASURES}


def inventory(figures: PeriodFigures) -> dict[str, Any]:
    """The GPUs declared, seen and counted, and what the declared count alone would make of
    the record: over an understated inventory a figure can pass 100%, which bounds() would
    clamp, silently, to 100%."""
    seen = len(figures.total.gpus)
    over_declared = _unclamped(figures, figures.expected)
    over_denominator = _unclamped(figures, figures.denominator)
    return {
        "declared": figures.expected,
        "seen": seen,
        "denominator": figures.denominator,
        "understated": seen > figures.expected,
        "never_seen": max(figures.expected - seen, 0),
        # each measure over the declared GPUs, unclamped (above 1: impossible for them)
        "over_declared": over_declared,
        # measures whose figure over the GPUs counted came out above 100% and was clamped
        "capped": [m for m, x in over_denominator.items() if x > 1.0 + 1e-9],
    }


def verdict_caveat(figures: PeriodFigures, measure: str) -> str | None:
    """Why a verdict must not read as a plain pass though the bounds give one: the figures
    are over more GPUs than were declared, or a figure had to be capped at 100%. None when
    neither."""
    inv = inventory(figures)
    parts = []
    if inv["understated"]:
        parts.append(
            f"the figures are over the {inv['seen']} GPUs seen, not the {inv['declared']} "
            "declared: the declared inventory is wrong, and no verdict here is one about it"
        )
        raw = inv["over_declared"][measure]
        if raw > 1.0:
            parts.append(
                f"over the {inv['declared']} declared, {measure} would be {raw:.2%}, more than "
                "any GPU can do"
            )
    if inv["capped"]:
        parts.append(
            f"{', '.join(inv['capped'])} came out above 100% of the GPU-seconds counted and "
            "were capped at 100%: the record holds more than the inventory can"
        )
    return "; ".join(parts) if parts else None


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
        # ties by name: the same figures give the same table, in whatever order the log
        # holds them (shards interleave nodes differently)
        for name, group in sorted(
            groups.items(), key=lambda kv: (-kv[1].sums.values["present_seconds"], kv[0])
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
    verdict = None if claim is None else chosen.verdict(claim)
    verdict_clean = None if claim is None else chosen_clean.verdict(claim)
    return {
        "from": _iso(figures.start),
        "to": _iso(figures.end),
        "seconds": figures.seconds,
        "expected_gpus": figures.expected,
        "seen_gpus": seen,
        "denominator_gpus": figures.denominator,
        "measure": measure,
        "figure": chosen.figure,
        "lower": chosen.lower,
        "upper": chosen.upper,
        "coverage": figures.coverage(),
        "claim": claim,
        "verdict": verdict,
        # The verdict's one wording, and whether flagged padding changes it (§8): read these,
        # not "verdict" alone, which is the verdict with flagged padding counted as work.
        "headline_verdict": _headline(verdict, verdict_clean),
        "padding_decides": verdict != verdict_clean,
        # why the verdict is no plain pass whatever the bounds say (None: no reason)
        "verdict_caveat": verdict_caveat(figures, measure),
        "without_padding": {
            "figure": chosen_clean.figure,
            "lower": chosen_clean.lower,
            "upper": chosen_clean.upper,
            "verdict": verdict_clean,
        },
        # every measure's verdict on the same claim, side by side: the real-work measure
        # (WORK_MEASURE) beside the one the claim names
        "work_measure": WORK_MEASURE,
        "verdicts": verdicts(figures, claim),
        # the share of the capacity in which each measure was measured (not estimated)
        "measured": accounting.measured(figures.total.sums.values, figures.capacity, MEASURES),
        "inventory": inventory(figures),
        "padding_gpu_hours": figures.total.sums.flagged["seconds"] / 3600.0,
        "padding_gpu_hours_by_rule": {
            r: s / 3600.0 for r, s in sorted(figures.total.sums.by_rule.items())
        },
        "energy_kwh": figures.total.sums.values["energy_joules"] / 3.6e6,
        "energy_kwh_by_day": {d: j / 3.6e6 for d, j in sorted(figures.energy_by_day.items())},
        "measures": measures(cluster),
        "measures_without_padding": measures(clean),
        "summaries": figures.summaries,
        "backends": dict(sorted(figures.backends.items())),
        "simulated": figures.backends.get("mock", 0),
        "unattributed": unattributed(figures),
        "by_node": breakdown(figures.nodes, held=False),
        "by_model": breakdown(figures.models, held=False),
        "by_tenant": breakdown(figures.tenants, held=True),
        "by_job": breakdown(figures.jobs, held=True),
        "warnings": ([] if figures.summaries else ["no summary in the record overlaps this period"])
        + ([] if math.isfinite(figures.seconds) else ["the period is not finite"])
        + _weak_spots(figures, seen),
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def unattributed(figures: PeriodFigures) -> dict[str, float]:
    """The use no scheduler accounts for: GPU-hours busy and allocated on GPUs (or MIG
    slices) attributed to no tenant and no job, and their share of all."""
    total = figures.total.sums.values
    group = figures.tenants.get(accounting.UNATTRIBUTED)
    values = group.sums.values if group is not None else {}
    busy, allocated = values.get("busy_seconds", 0.0), values.get("allocated_seconds", 0.0)
    return {
        "busy_gpu_hours": busy / 3600.0,
        "allocated_gpu_hours": allocated / 3600.0,
        "busy_share": busy / total["busy_seconds"] if total["busy_seconds"] > 0 else 0.0,
        "allocated_share": (
            allocated / total["allocated_seconds"] if total["allocated_seconds"] > 0 else 0.0
        ),
    }


# Below this coverage a figure is mostly unobserved time counted as zero: it is said.
LOW_COVERAGE = 0.9
# Use on GPUs no scheduler attributes, above this share of all use, is said: the tenant and
# job breakdowns (and any bill made from them) cannot account for it.
UNATTRIBUTED_USE = 0.01


def _weak_spots(figures: PeriodFigures, seen: int) -> list[str]:
    """What makes a figure weak that the figure alone does not show: more GPUs seen than
    declared, GPUs declared but never seen, figures capped at 100%, low coverage, simulated
    summaries, use attributed to no tenant."""
    out = []
    inv = inventory(figures)
    if inv["understated"]:
        over = inv["over_declared"]
        impossible = [f"{m} {x:.2%}" for m, x in over.items() if x > 1.0]
        out.append(
            f"{seen} GPUs reported but only {figures.expected} were declared: the inventory is "
            f"understated, and every figure is over the {seen} seen"
            + (
                f" (over the {figures.expected} declared: {', '.join(impossible)}, more than "
                "any GPU can do)"
                if impossible
                else ""
            )
        )
    if figures.summaries and seen < figures.expected:
        out.append(
            f"{figures.expected - seen} of the {figures.expected} GPUs declared never reported "
            "in this period: their seconds count as unobserved (zero in the figure, full in its "
            "upper bound)"
        )
    if inv["capped"]:
        out.append(
            f"{', '.join(inv['capped'])} came out above 100% of the GPU-seconds counted and "
            "were capped at 100%: the record holds more GPU-seconds than the inventory has"
        )
    coverage = figures.coverage()
    if figures.summaries and coverage < LOW_COVERAGE:
        out.append(
            f"coverage is {coverage:.1%}: {1 - coverage:.1%} of the figure's capacity was not "
            "observed and counts as zero in it, so the figure can be far below what the GPUs did; "
            "the bounds say how far"
        )
    mock = figures.backends.get("mock", 0)
    if mock:
        out.append(
            f"{mock:,} of the {figures.summaries:,} summaries come from the mock backend: "
            "simulated, not measured"
        )
    use = unattributed(figures)
    if use["busy_share"] > UNATTRIBUTED_USE:
        out.append(
            f"{use['busy_gpu_hours']:,.1f} GPU-hours busy ({use['busy_share']:.1%} of all) ran on "
            "GPUs attributed to no tenant and no job: who used them the record does not say"
        )
    return out


def _headline(verdict: str | None, without_padding: str | None) -> str | None:
    if verdict is None or without_padding is None:
        return None
    return accounting.headline(verdict, without_padding)


# The breakdowns of as_dict (`query --by`), and what each one's figures are over.
BREAKDOWNS = ("node", "model", "tenant", "job")
_OVER = {
    "node": "over the node's GPUs seen x the period",
    "model": "over the model's GPUs seen x the period",
    "tenant": "over the GPU-hours the tenant held; a shared MIG GPU by its slices",
    "job": "over the GPU-hours the job held; a shared MIG GPU by its slices",
}


def simulated_lines(answer: dict[str, Any]) -> list[str]:
    """The first line of any answer over simulated summaries: they are not measurements."""
    mock, total = answer.get("simulated", 0), answer.get("summaries", 0)
    if not mock:
        return []
    return [
        f"SIMULATED DATA: {mock:,} of the {total:,} summaries of this period come from the mock "
        "backend (gputally simulate or --backend mock), not from GPUs",
        "",
    ]


def render_text(answer: dict[str, Any], by: Sequence[str] = ()) -> str:
    """as_dict's answer for a person: the claim's measure marked, every measure, then the
    breakdowns asked for, as tables."""
    days = answer["seconds"] / 86400
    lines = simulated_lines(answer) + _padding_decides_lines(answer)
    lines += [
        f"period      {answer['from']} .. {answer['to']} ({days:.2f} days)",
        f"inventory   {answer['expected_gpus']} GPUs declared, {answer['seen_gpus']} seen; "
        f"coverage {answer['coverage']:.1%}",
        "",
        f"{'measure':<12}{'figure':>9}{'lower':>9}{'upper':>9}   without padding",
    ]
    for name, b in answer["measures"].items():
        clean = answer["measures_without_padding"][name]
        mark = "  <" if name == answer["measure"] else ""
        lines.append(
            f"{name:<12}{b['figure']:>9.2%}{b['lower']:>9.2%}{b['upper']:>9.2%}   {clean['figure']:.2%}{mark}"
        )
    if answer["claim"] is not None and answer["padding_decides"]:
        lines += ["", f"claim       {_claim_headline(answer)}"]
    elif answer["claim"] is not None:
        lines += [
            "",
            f"claim       {answer['measure']} >= {answer['claim']:.2%}: {answer['verdict'].upper()}"
            f"  (without flagged padding: {answer['without_padding']['verdict']})",
        ]
    if answer["claim"] is not None:
        lines += _work_and_caveat_lines(answer)
    lines += [
        "",
        f"energy      {answer['energy_kwh']:.3f} kWh",
        f"padding     {answer['padding_gpu_hours']:.2f} GPU-hours flagged"
        + "".join(
            f", {rule} {hours:.2f}" for rule, hours in answer["padding_gpu_hours_by_rule"].items()
        ),
    ]
    lines += [f"warning     {warning}" for warning in answer["warnings"]]
    for name in by:
        lines += ["", *_breakdown_table(name, answer[f"by_{name}"], list(answer["measures"]))]
    return "\n".join(lines)


def _work_and_caveat_lines(answer: dict[str, Any]) -> list[str]:
    """Beside a claim's verdict: the same claim on the real-work measure (when the claim is on
    another), and why the verdict is no plain pass when the inventory says so."""
    lines = []
    work = answer.get("work_measure", WORK_MEASURE)
    if answer["measure"] != work and "verdicts" in answer:
        verdict = answer["verdicts"][work]
        lines.append(
            f"work        {work} >= {answer['claim']:.2%}: {verdict['headline_verdict'].upper()}"
            f"  ({work} {verdict['figure']:.2%} [{verdict['lower']:.2%}, {verdict['upper']:.2%}])"
        )
    if answer.get("verdict_caveat"):
        lines.append(f"caveat      not a plain verdict: {answer['verdict_caveat']}")
    return lines


def _claim_headline(answer: dict[str, Any]) -> str:
    """The claim and its verdict in its one wording, e.g. "busy >= 80.00%: SUPPORTED ONLY BY
    FLAGGED PADDING; REFUTED WITHOUT IT"."""
    return f"{answer['measure']} >= {answer['claim']:.2%}: {answer['headline_verdict'].upper()}"


def padding_figures(answer: dict[str, Any]) -> str:
    """The claim's measure without flagged padding and with it, the one as plain as the other."""
    clean = answer["without_padding"]
    return (
        f"{answer['measure']} {clean['figure']:.2%} [{clean['lower']:.2%}, {clean['upper']:.2%}]"
        f" without flagged padding, {answer['figure']:.2%} [{answer['lower']:.2%}, "
        f"{answer['upper']:.2%}] with it; {answer['padding_gpu_hours']:.2f} GPU-hours flagged"
    )


def _padding_decides_lines(answer: dict[str, Any]) -> list[str]:
    """What a person reads first when flagged padding decides the verdict: that it does, and
    the figure without it beside the one with it."""
    if answer["claim"] is None or not answer["padding_decides"]:
        return []
    return [f"VERDICT     {_claim_headline(answer)}", f"            {padding_figures(answer)}", ""]


def _breakdown_table(name: str, rows: list[dict[str, Any]], measures: list[str]) -> list[str]:
    width = max([len(name), *(len(str(row["name"])) for row in rows)])
    lines = [
        f"by {name} ({_OVER[name]})",
        f"{name:<{width}}{'GPUs':>7}{'GPU-h':>10}"
        + "".join(f"{m:>11}" for m in measures)
        + f"{'kWh':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row['name']:<{width}}{row['gpus']:>7}{row['gpu_hours']:>10.1f}"
            + "".join(f"{row[m]:>11.2%}" for m in measures)
            + f"{row['energy_kwh']:>10.2f}"
        )
    if not rows:
        lines.append("(none in this period)")
    return lines
