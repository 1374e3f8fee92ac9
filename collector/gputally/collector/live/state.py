"""The collector's live state: what every node and GPU has reported, integrated over time.

Two views come out of it:

* **counters** (GPU-seconds per measure, joules) that only grow, so that Prometheus can compute
  the exact mean over any range with ``increase()``;
* a **live window**: the cluster figure of each measure over the last ``window`` seconds, with
  its bounds and the declared inventory as the denominator, so a GPU that does not report
  lowers the figure instead of vanishing from it.

Both add samples up by gputally.v1.accounting, the rules the agents' summaries and the
auditor's figures follow, so the live view and the record never count a second differently.

Each report covers ``interval_seconds`` ending at its timestamp. Report times are moved onto
the collector's clock with a per-stream offset (the smallest receive-minus-send difference
seen), so agent clock skew does not shift windows. The live window ends ``lag`` seconds in the
past, to leave time for the newest reports to arrive. Seconds no report covers are unobserved:
they count as zero in every figure and lower the coverage; they are never filled in.

A report is checked first (live.validate), and a summary it carries goes to the record
(live.intake) before any of the report counts.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import MEASURES, card

from ..record.keys import KeyStore, KeyStoreError
from ..record.ledger import Ledger
from ..record.store import Record
from .intake import Chain, IntakeStoppedError, SummaryIntake
from .validate import (
    InvalidMessageError,
    LimitError,
    Limits,
    TimeLimits,
    check_hello,
    check_report,
)

# Tenants shown individually in the live view; the rest are summed as "(other)".
MAX_TENANTS = 20
OTHER_TENANTS = "(other)"
# What a label value beyond its cap becomes (models, padding rules, tenants), and an XID code
# beyond a node's cap (shown as xid="other").
OTHER = "(other)"
OTHER_XID = -1
# A report that starts this much before the previous one ended, yet arrives on time as the
# next one, is an agent clock stepped back (NTP), not a repeat: see ClusterState._covered.
CLOCK_STEP_S = 1.0
# "On time": at least this share of its interval after the previous report arrived. And a
# node's clock is followed across a step at most once per STEP_EVERY_S: NTP steps are rare,
# and an agent that "steps" at every report gains at most one interval per period.
STEP_ELAPSED = 0.9
STEP_EVERY_S = 600.0
# How a stream's reports are vouched for (gputally_node_info's `authenticated`).
AUTH_ENROLLED = "enrolled"  # it proved the node's enrolled key
AUTH_PROVEN = "unenrolled"  # it proved a key, but no key is enrolled: nobody vouches for it
AUTH_NONE = "none"  # a revision-1 agent, or no key: anyone could have sent them
# Longest agent-given text kept for the node's info series (versions, backend).
MAX_INFO = 64
# The accounting numbers the live window adds up, per second a sample covers.
_WINDOW_FIELDS = (
    "present_seconds",
    "allocated_seconds",
    "allocated_missing_seconds",
    "busy_seconds",
    "busy_missing_seconds",
    "sm_active_seconds",
    "sm_measured_seconds",
    "effective_seconds",
    "effective_estimated_seconds",
    "busy_unmeasured_seconds",
    "memory_busy_seconds",
    "memory_busy_missing_seconds",
)
# A live-window vector: _WINDOW_FIELDS, then the same of the flagged part (see Series).
_VECTOR = 2 * len(_WINDOW_FIELDS)
_NO_FLAGS = (0.0,) * len(_WINDOW_FIELDS)
# Read out of a GPU's accounting in one C call each: ingest does it for every GPU sample.
_window_rates = operator.itemgetter(*_WINDOW_FIELDS)
_totals_values = operator.attrgetter(*accounting.FIELDS)
_flagged_values = operator.attrgetter(*accounting.FLAGGED_FIELDS)
_flagged_values_of = operator.itemgetter(*accounting.FLAGGED_FIELDS)
_COUNTED_NAMES = tuple(name for name, _ in accounting.COUNTED)
_counted = operator.itemgetter(*(field for _, field in accounting.COUNTED))
# The same, read from a GpuSummary (a sample's totals) in one C call each.
_counted_of = operator.attrgetter(*(field for _, field in accounting.COUNTED))
_window_rates_of = operator.attrgetter(*_WINDOW_FIELDS)
# A flagged part (a PaddingTotal's fields) as the live window and the counters read it: its
# "seconds" are the flagged present seconds; a field it does not have is 0.
_FLAGGED_AT = {name: i for i, name in enumerate(accounting.FLAGGED_FIELDS)}
_FLAGGED_WINDOW = tuple(
    _FLAGGED_AT.get("seconds" if name == "present_seconds" else name, -1) for name in _WINDOW_FIELDS
)
_FLAGGED_COUNTED = tuple(
    _FLAGGED_AT["seconds" if name == "present_seconds" else name] for _, name in accounting.COUNTED
)
# Nodes a view works out per taking of the lock (see ClusterState.view).
VIEW_CHUNK = 64
# The longest report cadence the live window follows: an agent that says it reports hourly
# must not stretch every node's live figure over three hours (its own seconds count late).
MAX_CADENCE_S = 60.0
# The live window follows the cadence under which this share of the connected GPUs report:
# one agent (or a few) claiming a slow cadence cannot widen every node's live figure and
# delay it by a minute; their own newest seconds count late instead (their coverage reads
# low while they are in the lag). In a small cluster, where one node is more than the rest,
# the window follows it.
CADENCE_SHARE = 0.99


class _Now(NamedTuple):
    """What a node's GPUs say now, as a view adds them up: made again only after the node
    reported or its GPUs changed (NodeState.now is reset then), not at every view."""

    gpus: int
    models: dict[str, int]
    ok: list[GpuState]  # status OK: reporting, while the node is fresh
    # (tenant, GPUs) of the ok ones, GPU by GPU (a MIG GPU's shares by slices): added up
    # in the view in the order a view of every GPU adds them, so figures and ties are the same
    tenants: tuple[tuple[str, float], ...]
    padding: dict[str, int]  # rule -> ok GPUs it flags
    power: float  # of the ok ones


class _Accounted(NamedTuple):
    """One GPU sample's numbers over its report's interval (ClusterState._accounted)."""

    counted: tuple[float, ...]  # its accounting.COUNTED fields, in that order
    rates: tuple[float, ...]  # its _WINDOW_FIELDS
    flagged: tuple[float, ...] | None  # its flagged part, in FLAGGED_FIELDS order
    by_rule: dict[str, float]  # padding rule -> seconds it flagged
    parts: list[tuple[str, accounting.Totals]] | None  # a MIG GPU shared out, by tenant
    joules: float  # what counts of its energy


class NotEnrolledError(ValueError):
    """A node whose key is not enrolled (or not the enrolled one)."""


class IdentityConflictError(ValueError):
    """A hello claiming a GPU (UUID or serial) that another node, still up, holds."""


class UnauthenticatedError(ValueError):
    """A stream that did not prove the key it must speak with (gRPC UNAUTHENTICATED)."""


class Series:
    """One population's GPU-seconds in the live window (a node's GPUs of one model, or of one
    tenant), as entries of (start, end, vector): one entry per report, spread evenly over the
    span its samples were placed on, on the collector's clock. A vector holds _WINDOW_FIELDS
    and then the same fields of the flagged part.

    The entries' running total is kept as they come and go, so that a figure over the window
    costs only the few entries at its edges, not every sample in it: at 10,000 GPUs a scrape
    used to add up 300,000 samples. The live window's resolution is the report's span: a
    report of 10 s is 10 s spread evenly."""

    __slots__ = ("_dropped", "entries", "total")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, float, list[float]]] = deque()
        self.total = [0.0] * _VECTOR
        self._dropped = 0

    def add(self, start: float, end: float, vector: list[float]) -> None:
        self.entries.append((start, end, vector))
        self.total = list(map(operator.add, self.total, vector))

    def trim(self, horizon: float) -> None:
        """Forget the entries that ended before `horizon`."""
        entries = self.entries
        while entries and entries[0][1] < horizon:
            self.total = list(map(operator.sub, self.total, entries.popleft()[2]))
            self._dropped += 1
        # Adding and taking away leaves rounding behind: add the total up afresh now and then
        # (amortised, it costs as much again as the adding).
        if self._dropped > 2 * len(entries) + 16:
            self._dropped = 0
            self.total = [0.0] * _VECTOR
            for _, _, vector in entries:
                self.total = list(map(operator.add, self.total, vector))

    def over(self, start: float, end: float) -> list[float]:
        """The GPU-seconds in (start, end]: the total less the parts of the entries outside."""
        out = self.total
        for first, last, vector in self.entries:
            if first >= start:
                break
            outside = (min(last, start) - first) / (last - first)
            out = [o - v * outside for o, v in zip(out, vector, strict=True)]
        for first, last, vector in reversed(self.entries):
            if last <= end:
                break
            outside = (last - max(first, end)) / (last - first)
            out = [o - v * outside for o, v in zip(out, vector, strict=True)]
        return out


@dataclass(slots=True)
class GpuState:
    node: str
    index: int
    uuid: str
    model: str
    serial: str = ""
    key: str = ""  # accounting.card of the UUID: how the card is known across nodes
    status: int = pb.GPU_STATUS_UNSPECIFIED
    last_end: float = -math.inf  # collector-clock end of the newest sample
    energy: accounting.EnergyCounter = field(default_factory=accounting.EnergyCounter)
    power_watts: float | None = None
    tenant: str = accounting.UNATTRIBUTED  # whom the whole GPU is charged to now
    padding: tuple[str, ...] = ()
    # A MIG GPU shared by several owners: each tenant's part of it now.
    held: dict[str, float] = field(default_factory=dict)


def _zero_counts() -> dict[str, float]:
    return {name: 0.0 for name, _ in accounting.COUNTED}


@dataclass(slots=True)
class Counters:
    seconds: dict[str, float] = field(default_factory=_zero_counts)
    energy_joules: float = 0.0
    padding: dict[str, float] = field(default_factory=dict)  # rule -> flagged GPU-seconds
    # The part of `seconds` in time flagged by at least one padding rule (a second flagged by
    # two rules counts once here), so that figures without padding follow by subtraction.
    flagged: dict[str, float] = field(default_factory=_zero_counts)

    def add(self, other: Counters) -> None:
        for key, value in other.seconds.items():
            self.seconds[key] += value
        for key, value in other.flagged.items():
            self.flagged[key] += value
        self.energy_joules += other.energy_joules
        for rule, value in other.padding.items():
            self.padding[rule] = self.padding.get(rule, 0.0) + value

    def copy(self) -> Counters:
        return Counters(
            dict(self.seconds), self.energy_joules, dict(self.padding), dict(self.flagged)
        )


@dataclass(slots=True)
class NodeState:
    """One node's stream and what it reported. Its chain of summaries is the intake's."""

    name: str
    instance_id: int = 0
    last_seq: int = 0
    session: int = 0  # the stream currently speaking for this node; 0 when none
    backend: str = ""
    agent_version: str = ""
    driver_version: str = ""
    protocol_revision: int = 0
    offset: float = math.inf  # collector clock minus agent clock, per stream
    last_received: float = 0.0  # collector clock
    gpus: dict[int, GpuState] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    reports: dict[str, int] = field(
        default_factory=lambda: {"accepted": 0, "duplicate": 0, "rejected": 0}
    )
    missed_reports: int = 0  # sequence gaps
    xids: dict[int, int] = field(default_factory=dict)  # XID -> events reported
    # Agent clock: the end of the newest report with samples. The next one must end later,
    # and only its seconds after this count, so that report intervals never overlap.
    agent_end: float = -math.inf
    clipped_seconds: float = 0.0  # report seconds not counted: they overlapped earlier ones
    energy_refused: int = 0  # energy readings beyond what the board can draw, not counted
    opened: float = 0.0  # collector clock: when its latest stream was opened
    public_key: bytes = b""  # the key its stream proved ("" when it proved none)
    authenticated: str = AUTH_NONE
    clock_steps: int = 0  # agent clock steps back that were followed (see _covered)
    last_step: float = -math.inf  # collector clock: when the latest one was
    first_received: float = 0.0  # collector clock: its first report with samples
    counted: float = 0.0  # seconds of its reports counted so far
    # Seconds between its reports when each spans several ticks, as its Hello says; 0 when
    # every tick is a report (the configured window and lag are made for that).
    cadence: float = 0.0
    # Its GPU-seconds in the live window, by model and by tenant (see Series).
    by_model: dict[str, Series] = field(default_factory=dict)
    by_tenant: dict[str, Series] = field(default_factory=dict)
    # What its GPUs say now, for the view (ClusterState._now); None once any GpuState of it,
    # or its GPUs, changed: whatever changes them resets it.
    now: _Now | None = None


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """One population's figures over the live window (docs/utilization.md §5, live)."""

    gpus: float  # denominator (a tenant's MIG shares count by their slices)
    ratios: dict[str, float]  # measure -> figure in [0, 1]
    coverage: float  # observed GPU-seconds / (gpus x window)
    measured: dict[str, float]  # measure -> share of GPU-seconds where it was measured
    lower: dict[str, float]
    upper: dict[str, float]
    without_padding: dict[str, float]


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    up: bool
    connected: bool
    gpus: int
    reporting: int
    backend: str
    agent_version: str
    driver_version: str
    protocol_revision: int
    last_received: float
    window: WindowFigures
    counters: Counters
    reports: dict[str, int]
    missed_reports: int
    power_watts: float
    xids: dict[int, int]
    summaries: int
    summaries_resent: int
    chain_breaks: int
    summaries_overlapping: int
    summaries_unrecorded: int
    clipped_seconds: float
    energy_refused: int
    authenticated: str
    clock_offset: float  # agent clock minus collector clock (network delay included)
    clock_steps: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    time: float
    window_seconds: float
    window_end: (
        float  # collector clock: the live window is (window_end - window_seconds, window_end]
    )
    expected: int
    declared: bool
    seen: int
    reporting: int
    sessions: int
    window: WindowFigures
    counters: Counters
    power_watts: float
    nodes: list[NodeView]
    models: dict[str, int]
    by_model: dict[str, WindowFigures]
    by_tenant: dict[str, WindowFigures]
    padding_gpus: dict[str, int]  # rule -> GPUs it flags now (among reporting GPUs)
    identity_conflicts: int  # hellos refused: a GPU another node, still up, holds
    intake_stopped: str  # why summaries are not being recorded ("" while they are)
    unauthenticated: int  # connected nodes whose live reports no enrolled key vouches for
    evicted: int  # nodes forgotten after --evict-after without a stream
    folded: dict[str, int]  # label -> values shown as "(other)" (occurrences)
    refusals: dict[str, int]  # gRPC status name -> streams ended with it
    reports: dict[str, int]  # result -> reports of every node (ClusterState.reports)


def window_figures(vector: Sequence[float], denominator: float, seconds: float) -> WindowFigures:
    """Figures of one population over the live window from its GPU-seconds (a Series vector),
    over `denominator` GPUs."""
    n = len(_WINDOW_FIELDS)
    capacity = denominator * seconds
    values = dict(zip(_WINDOW_FIELDS, vector[:n], strict=True))
    figures = accounting.bounds(values, capacity, MEASURES)
    part = accounting.flagged(dict(zip(_WINDOW_FIELDS, vector[n:], strict=True)))
    clean = accounting.bounds(accounting.unpadded(values, part), capacity, MEASURES)
    return WindowFigures(
        gpus=denominator,
        ratios={m: b.figure for m, b in figures.items()},
        coverage=accounting.coverage(values, capacity),
        measured=accounting.measured(values, capacity),
        lower={m: b.lower for m, b in figures.items()},
        upper={m: b.upper for m, b in figures.items()},
        without_padding={m: b.figure for m, b in clean.items()},
    )


_Rows = tuple[list[tuple[float, ...]], list[float]]


def _weighted(rows: list[tuple[float, ...]], weights: list[float], width: int) -> list[float]:
    """Σ row x weight, column by column (most reports weigh all their GPUs alike)."""
    if not rows:
        return [0.0] * width
    first = weights[0]
    if all(w == first for w in weights):
        return [sum(column) * first for column in zip(*rows, strict=True)]
    return [sum(map(operator.mul, column, weights)) for column in zip(*rows, strict=True)]


def _sum(vectors: Iterable[Sequence[float]]) -> list[float]:
    out = [0.0] * _VECTOR
    for vector in vectors:
        out = list(map(operator.add, out, vector))
    return out


class ClusterState:
    """Thread-safe: gRPC sessions write on the event loop, scrapes read from HTTP threads."""

    def __init__(
        self,
        *,
        expected_gpus: int | None = None,
        window: float = 30.0,
        lag: float = 3.0,
        stale_after: float = 15.0,
        clock: Callable[[], float] = time.time,
        record: Record | None = None,
        keys: KeyStore | None = None,
        ledger: Ledger | None = None,
        limits: TimeLimits | None = None,
        sizes: Limits | None = None,
    ):
        if window <= 0 or lag < 0 or stale_after <= 0:
            raise ValueError("window and stale_after must be positive and lag not negative")
        if expected_gpus is not None and expected_gpus < 1:
            raise ValueError("expected_gpus must be at least 1")
        self.expected_gpus = expected_gpus
        self.window = window
        self.lag = lag
        self.stale_after = stale_after
        self.clock = clock
        self.record = record
        self.keys = keys
        # A record keeps only summaries signed by enrolled keys: without keys, none.
        self.limits = limits or TimeLimits()
        self.sizes = sizes or Limits()
        self.intake = SummaryIntake(keys, record, ledger, self.limits)
        if record is not None and expected_gpus is not None:
            record.declare_inventory(expected_gpus, clock())
        self.nodes: dict[str, NodeState] = {}
        self.counters = Counters()
        self._lock = threading.Lock()
        self._sessions = 0
        self._next_session = 0
        self._cards: dict[str, str] = {}  # "uuid:<card>" or "serial:<card>" -> its node
        # card -> (node, collector-clock end of its newest counted second): a card that moved
        # counts on its new node only after the seconds its old node already counted
        self._card_end: dict[str, tuple[str, float]] = {}
        self.identity_conflicts = 0
        self.evicted = 0
        self.refusals: dict[str, int] = {}  # gRPC status name -> streams ended with it
        # every node's reports, by result, evicted nodes' included (with --node-metrics none
        # the only count of them)
        self.reports = {"accepted": 0, "duplicate": 0, "rejected": 0}
        self.folded: dict[str, int] = {}
        self._models: set[str] = set()  # models shown by name (at most sizes.max_models)
        self._cadence = 0.0  # the report cadence the live window follows (_spans, _followed)
        # The slowest cadence connected: entries are kept that long (trimming by the window
        # followed would lose what a wider one needs when the cadences change).
        self._slowest = 0.0

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, hello: pb.Hello, proven: bool = False) -> tuple[int, int, int]:
        """Register a stream. `proven`: it signed this stream's challenge with the Hello's
        key. Returns (session id, seq to resume after, newest chain number recorded). A
        node's newer stream supersedes an older one still open (the agent reconnected).

        With enrolled keys only a stream that proved the node's enrolled key opens (and only
        then does trust-on-first-use enrol one). Without them, a key a node proved stays its
        key on this collector while the node is up: another stream for it must prove the same.
        Nothing about the node changes before these checks pass: a refused Hello moves
        neither its sequence numbers nor its stream.

        InvalidMessageError (LimitError) for a bad Hello, UnauthenticatedError,
        NotEnrolledError, IdentityConflictError when it claims a card another node holds."""
        check_hello(hello, self.sizes)
        authenticated = AUTH_PROVEN if proven else AUTH_NONE
        if self.keys is not None:
            if not proven:
                raise UnauthenticatedError(
                    f"hello from {hello.node}: this collector has enrolled keys, so a stream "
                    "speaks for a node only once it proves the node's key (agents of protocol "
                    "revision 2 and later do, when they have a key)"
                )
            try:
                self.keys.admit(hello.node, hello.public_key)
            except KeyStoreError as error:
                raise NotEnrolledError(str(error)) from None
            authenticated = AUTH_ENROLLED
        now = self.clock()
        with self._lock:
            node = self.nodes.get(hello.node)
            if node is None and len(self.nodes) >= self.sizes.max_nodes:
                self._evict(now, self.sizes.evict_after)
                if len(self.nodes) >= self.sizes.max_nodes:
                    raise LimitError(
                        f"hello from {hello.node}: the collector keeps {len(self.nodes)} nodes, "
                        f"its limit (--max-nodes {self.sizes.max_nodes})"
                    )
            if (
                self.keys is None
                and node is not None
                and node.public_key
                and (not proven or hello.public_key != node.public_key)
                and self._is_up(node, now)
            ):
                raise NotEnrolledError(
                    f"node {hello.node} proved another key on this collector and is up: a "
                    f"stream for it must prove that key (refused until the node has been down "
                    f"for {self.stale_after:g} s; enrolled keys (--keys) make this permanent)"
                )
            self._claim(hello)
            if node is None:
                node = self.nodes[hello.node] = NodeState(name=hello.node)
            if node.instance_id != hello.instance_id:
                node.instance_id = hello.instance_id
                node.last_seq = 0
            self.intake.stream_opened(hello.node, hello.public_key)
            self._next_session += 1
            if node.session == 0:
                self._sessions += 1
            node.session = self._next_session
            node.opened = now
            node.offset = math.inf
            node.public_key = hello.public_key if proven else b""
            node.authenticated = authenticated
            node.backend = hello.backend[:MAX_INFO]
            node.agent_version = hello.agent_version[:MAX_INFO]
            node.driver_version = hello.driver_version[:MAX_INFO]
            node.protocol_revision = hello.protocol_revision
            spans = hello.report_interval_seconds > hello.sample_interval_seconds
            node.cadence = min(hello.report_interval_seconds, MAX_CADENCE_S) if spans else 0.0
            self._slowest = max(self._slowest, node.cadence)
            node.now = None
            for identity in hello.gpus:
                gpu = node.gpus.get(identity.index)
                if gpu is None or gpu.uuid != identity.uuid:
                    node.gpus[identity.index] = GpuState(
                        hello.node,
                        identity.index,
                        identity.uuid,
                        self._model_label(identity.model),
                        identity.serial,
                        card(identity.uuid),
                    )
            recorded = self.intake.recorded_seq(hello.node)
            return node.session, node.last_seq, recorded

    def refused_stream(self, status: str) -> None:
        with self._lock:
            self.refusals[status] = self.refusals.get(status, 0) + 1

    def _is_up(self, node: NodeState, now: float) -> bool:
        return node.session != 0 or self._fresh(node, now)

    def _fold(self, label: str) -> None:
        self.folded[label] = self.folded.get(label, 0) + 1

    def _model_label(self, model: str) -> str:
        """The model as the live view shows it: by name for the first sizes.max_models seen,
        "(other)" after (a Hello can name any model; a series per name would be unbounded)."""
        if model in self._models:
            return model
        if len(self._models) < self.sizes.max_models:
            self._models.add(model)
            return model
        self._fold("model")
        return OTHER

    def evict(self, now: float | None = None) -> int:
        """Forget nodes without a stream and without a report for sizes.evict_after seconds
        (their seconds stay in the cluster's counters). Returns how many were forgotten."""
        with self._lock:
            return self._evict(self.clock() if now is None else now, self.sizes.evict_after)

    def _evict(self, now: float, after: float) -> int:
        idle = [
            n
            for n in self.nodes.values()
            if n.session == 0 and now - max(n.last_received, n.opened) > after
        ]
        for node in idle:
            del self.nodes[node.name]
            # its chain too (else one kept per node name ever seen): a node that comes back
            # has it read back from the record (SummaryIntake.stream_opened)
            self.intake.chains.pop(node.name, None)
            for key in [k for k, holder in self._cards.items() if holder == node.name]:
                del self._cards[key]
            for key in [k for k, (holder, _) in self._card_end.items() if holder == node.name]:
                del self._card_end[key]
        self.evicted += len(idle)
        return len(idle)

    def _claim(self, hello: pb.Hello) -> None:
        """Give the hello's cards to its node, unless another node that is up holds one:
        a card counts once (cloned machine images repeat UUIDs without any attacker). A card
        that moved from a node that is down leaves that node, so `seen` counts it once.
        Cards are compared by accounting.card (so "GPU-AB" and "gpu-ab" are one)."""
        now = self.clock()
        moving: list[tuple[NodeState, int]] = []
        for gpu in hello.gpus:
            for value, what in ((gpu.uuid, "uuid"), (gpu.serial, "serial")):
                key = f"{what}:{card(value)}"
                holder = self._cards.get(key) if value else None
                other = self.nodes.get(holder) if holder and holder != hello.node else None
                if other is None:
                    continue
                held = [
                    i for i, g in other.gpus.items() if f"{what}:{card(getattr(g, what))}" == key
                ]
                if not held:
                    continue  # that node no longer announces it
                if self._is_up(other, now):
                    self.identity_conflicts += 1
                    raise IdentityConflictError(
                        f"hello from {hello.node}: GPU {value} (its {what}) is held by node "
                        f"{other.name}, which is up: one card cannot be on two nodes (a cloned "
                        f"image, or a forged hello); refused until {other.name} has been down "
                        f"for {self.stale_after:g} s"
                    )
                moving += [(other, i) for i in held]
        for other, index in moving:
            other.gpus.pop(index, None)
            other.now = None
        for gpu in hello.gpus:
            self._cards[f"uuid:{card(gpu.uuid)}"] = hello.node
            if gpu.serial:
                self._cards[f"serial:{card(gpu.serial)}"] = hello.node

    def is_current(self, name: str, session: int) -> bool:
        with self._lock:
            node = self.nodes.get(name)
            return node is not None and node.session == session

    def resume_recording(self) -> bool:
        """Recording resumes if it waits for the record's server and that answers again
        (SummaryIntake.resume); whether it did. The probe blocks: call it off the loop."""
        if not self.intake.waiting or not self.intake.reachable():
            return False
        with self._lock:
            return self.intake.resume()

    def must_resend(self, name: str) -> bool:
        """Whether the node's stream must end for its agent to send its summaries again: some
        went unrecorded while the record's server was out of reach, which answers again."""
        with self._lock:
            chain = self.intake.chains.get(name)
            return chain is not None and chain.resend and not self.intake.waiting

    def close_session(self, name: str, session: int) -> None:
        with self._lock:
            node = self.nodes.get(name)
            if node is not None and node.session == session:
                node.session = 0
                self._sessions -= 1

    # -- ingest ----------------------------------------------------------------------------

    def ingest(self, name: str, report: pb.Report, received: float | None = None) -> str:
        """Apply one report: "accepted" or "duplicate". Raises InvalidMessageError and then
        changes no live figure, so a bad report never half-applies to them.

        A summary it carries goes to the record whatever the report's sequence number says:
        a number is a duplicate only for the live figures; the summary is one only when the
        record holds it (another stream may have sent any number). When the record cannot
        take it, the report still counts live but its summary is not acknowledged (the Ack's
        recorded_chain_seq does not reach it), and its agent keeps it."""
        received = self.clock() if received is None else received
        with self._lock:
            node = self.nodes[name]
            summary: pb.Summary | None = None
            duplicate = report.seq <= node.last_seq
            try:
                check_report(report, node.gpus, received, self.limits, self.sizes)
                if report.HasField("summary"):
                    uuids = {i: g.uuid for i, g in node.gpus.items()}
                    summary = self.intake.open(name, report.summary, uuids, received)
                    with contextlib.suppress(IntakeStoppedError):
                        self.intake.take(
                            name, node.instance_id, report.seq, report.summary, summary, received
                        )
                if duplicate:
                    node.reports["duplicate"] += 1
                    self.reports["duplicate"] += 1
                    return "duplicate"
                # A live part refused here leaves its summary recorded: that one was judged
                # on its own, and is evidence whatever the report's clock says.
                covered = self._covered(node, report, received) if report.gpus else 0.0
            except InvalidMessageError:
                node.reports["rejected"] += 1
                self.reports["rejected"] += 1
                raise
            if node.last_seq and report.seq > node.last_seq + 1:
                node.missed_reports += report.seq - node.last_seq - 1
            node.last_seq = report.seq
            node.reports["accepted"] += 1
            self.reports["accepted"] += 1
            if report.gpus:  # a summary-only report covers no time of its own
                self._integrate(node, report, received, covered)
            return "accepted"

    def _covered(self, node: NodeState, report: pb.Report, received: float) -> float:
        """The seconds of the report's interval that no earlier report of the node covered
        (agent clock): an overlap is clipped, a report that ends no later than the previous
        one covers nothing new and is refused, so no second counts twice in the counters.

        One exception: an agent's clock stepped back (NTP corrects it). Its next report then
        starts well before the previous one ended, but it is the very next sequence number
        and arrived an interval after the previous one, on the collector's clock: real time
        has passed for its seconds. That report counts whole and the node's placement on
        the collector's clock moves by the step, so the node stays in the live window. A
        lying agent gains little by it: such a report must have waited out most of its own
        interval, and only one step per STEP_EVERY_S is followed."""
        end = report.time_unix_nano / 1e9
        start = end - report.interval_seconds
        if start < node.agent_end - CLOCK_STEP_S and (
            node.last_received > 0
            and report.seq == node.last_seq + 1
            and received - node.last_received >= STEP_ELAPSED * report.interval_seconds
            and received - node.last_step >= STEP_EVERY_S
        ):
            node.last_step = received
            node.offset += node.agent_end - start  # the placement continues where it was
            node.agent_end = start
            node.clock_steps += 1
        if end <= node.agent_end:
            raise InvalidMessageError(
                f"report {report.seq} ends at {end:.3f}, not after the previous report "
                f"({node.agent_end:.3f}): its seconds are already covered"
            )
        covered = min(report.interval_seconds, end - node.agent_end)
        # Real time bounds it all: a node's counted seconds never exceed the time the
        # collector has seen pass since its first report, plus the backlog an agent may bring.
        # Whatever its clock claims (steps, a fresh start), a node cannot report faster.
        since = received - node.first_received if node.first_received else 0.0
        allowance = since + self.limits.backlog - node.counted
        if covered > allowance:
            if allowance <= 0:
                raise InvalidMessageError(
                    f"report {report.seq}: node {node.name} has reported {node.counted:.0f} s "
                    f"in {since:.0f} s (more than --live-backlog "
                    f"{self.limits.backlog:g} s ahead of the collector's clock)"
                )
            covered = allowance
        return covered

    def _card_seconds(self, node: NodeState, gpu: GpuState, end: float, covered: float) -> float:
        """The seconds of this GPU's sample that count: the report's new seconds, less any a
        previous holder of the card (it moved, or a node that is down lent it its UUID)
        already counted, on the collector's clock."""
        key = gpu.key
        held = self._card_end.get(key)
        seconds = covered
        if held is not None and held[0] != node.name:
            seconds = min(covered, max(end - held[1], 0.0))
            node.clipped_seconds += covered - seconds
        self._card_end[key] = (node.name, max(end, held[1]) if held else end)
        return seconds

    def _integrate(
        self, node: NodeState, report: pb.Report, received: float, covered: float
    ) -> None:
        """Add a valid report's samples, over the `covered` seconds it newly covers (less,
        for a card that moved, what its old node counted), to the counters and the live
        window."""
        agent_time = report.time_unix_nano / 1e9
        interval = report.interval_seconds
        node.clipped_seconds += interval - covered
        node.counted += covered
        if not node.first_received:
            node.first_received = received
        node.agent_end = agent_time
        node.offset = min(node.offset, received - agent_time)
        end = agent_time + node.offset
        node.last_received = received
        added = Counters()
        span = 0.0  # the longest any of its GPUs' samples is placed over
        # Rows of numbers per GPU, added up column by column after (zip and sum run in C).
        counted: _Rows = ([], [])  # (accounting.COUNTED values, what counts of them)
        flagged_counted: _Rows = ([], [])
        by_model: dict[str, _Rows] = {}  # (window vectors, their weight)
        by_tenant: dict[str, _Rows] = {}
        node.now = None  # its GPUs' state changes below
        for proto in report.gpus:
            gpu = node.gpus[proto.index]
            gpu.status = proto.status
            ok = proto.status == pb.GPU_STATUS_OK
            # padding flags present seconds only; a rule this collector does not know is shown
            # as "(other)" (its name is the agent's to choose: unbounded otherwise)
            rules = proto.padding
            gpu.padding = tuple(map(self._rule, rules)) if ok and rules else ()
            gpu.power_watts = proto.power_watts if proto.HasField("power_watts") else None
            gpu.tenant = accounting.owner(proto.attribution)[0]
            dt = self._card_seconds(node, gpu, end, covered)
            # The stream offset only shrinks (a faster delivery than any before), which moves
            # this report's end earlier than the previous one's placement: clip its start so
            # that two samples never cover the same second in the live window. The counters
            # below keep the agent's own interval (clipped as above), which is exact.
            placed = min(dt, max(end - gpu.last_end, 0.0))
            gpu.last_end = max(gpu.last_end, end)
            span = max(span, placed)
            got = self._accounted(node, gpu, proto, interval, dt)
            scale = dt / interval  # of the report's numbers, what counts
            flagged = got.flagged
            counted[0].append(got.counted)
            counted[1].append(scale)
            flags = _NO_FLAGS
            if flagged is not None:
                flagged_counted[0].append(tuple(flagged[at] for at in _FLAGGED_COUNTED))
                flagged_counted[1].append(scale)
                flags = tuple(flagged[at] if at >= 0 else 0.0 for at in _FLAGGED_WINDOW)
            for rule, seconds in got.by_rule.items():
                added.padding[rule] = added.padding.get(rule, 0.0) + seconds * scale
            added.energy_joules += got.joules
            # The live window: this report's GPU-seconds, placed over `placed` seconds.
            weight = placed / interval
            vector = (*got.rates, *flags)
            rows = by_model.get(gpu.model) or by_model.setdefault(gpu.model, ([], []))
            rows[0].append(vector)
            rows[1].append(weight)
            gpu.held = {}
            if got.parts is None:
                if gpu.tenant != accounting.UNATTRIBUTED:
                    rows = by_tenant.get(gpu.tenant) or by_tenant.setdefault(gpu.tenant, ([], []))
                    rows[0].append(vector)
                    rows[1].append(weight)
            else:
                for tenant, part in got.parts:
                    share = part["present_seconds"] / interval  # its slices
                    gpu.held[tenant] = gpu.held.get(tenant, 0.0) + share
                    rows = by_tenant.get(tenant) or by_tenant.setdefault(tenant, ([], []))
                    rows[0].append((*_window_rates(part), *_NO_FLAGS))
                    rows[1].append(weight)
            for event in proto.xid_events:
                code = event.code
                if code not in node.xids and len(node.xids) >= self.sizes.max_xid_codes:
                    code = OTHER_XID
                    self._fold("xid")
                node.xids[code] = node.xids.get(code, 0) + 1
        added.seconds = dict(
            zip(_COUNTED_NAMES, _weighted(*counted, len(_COUNTED_NAMES)), strict=True)
        )
        if flagged_counted[0]:
            added.flagged = dict(
                zip(_COUNTED_NAMES, _weighted(*flagged_counted, len(_COUNTED_NAMES)), strict=True)
            )
        if end - span < end:  # a span too short for the clock's resolution holds nothing
            for model, (vectors, weights) in by_model.items():
                node.by_model.setdefault(model, Series()).add(
                    end - span, end, _weighted(vectors, weights, _VECTOR)
                )
            for tenant, (vectors, weights) in by_tenant.items():
                node.by_tenant.setdefault(tenant, Series()).add(
                    end - span, end, _weighted(vectors, weights, _VECTOR)
                )
        window, lag = self._spans(self._slowest)
        self._trim(node, received - lag - window - 1.0)
        node.counters.add(added)
        self.counters.add(added)

    def _accounted(
        self, node: NodeState, gpu: GpuState, proto: pb.GpuSample, interval: float, dt: float
    ) -> _Accounted:
        """What one GPU's sample adds up to over the report's interval: the agent's totals
        tick by tick when the report spans several ticks, else this one reading over the
        whole interval (gputally.v1.accounting either way, as the summaries add up)."""
        limit = proto.power_limit_watts if proto.HasField("power_limit_watts") else None
        refused = gpu.energy.implausible
        joules = gpu.energy.joules(proto, dt)  # kept up to date either way
        ok = proto.status == pb.GPU_STATUS_OK
        if proto.HasField("totals"):
            totals = proto.totals
            counted, rates = _counted_of(totals), _window_rates_of(totals)
            flagged = _flagged_values(totals.flagged) if totals.flagged.seconds > 0 else None
            by_rule: dict[str, float] = {}
            for padding in totals.padding:
                rule = self._rule(padding.rule)
                by_rule[rule] = by_rule.get(rule, 0.0) + padding.seconds
            parts = None
            if totals.shares:
                parts = self._tenant_parts(
                    (s.attribution, dict(zip(accounting.FIELDS, _totals_values(s), strict=True)))
                    for s in totals.shares
                )
            # The agent's joules tick by tick, not the counter's step over the whole report
            # (which a driver reload inside it would cut short).
            gpu.energy.implausible = refused
            joules = totals.energy_joules * dt / interval
            if joules > accounting.max_joules(dt, limit):  # beyond this board's power limit
                gpu.energy.implausible += 1
                joules = 0.0
        else:
            values = accounting.contributions(proto, interval)
            counted, rates = _counted(values), _window_rates(values)
            flagged = None
            by_rule = {}
            if gpu.padding:
                flagged = _flagged_values_of(accounting.flagged(values))
                by_rule = dict.fromkeys(gpu.padding, values["present_seconds"])
            parts = None
            if proto.mig_enabled and ok:
                shares = accounting.mig_shares(proto, interval, values)
                if accounting.is_shared(shares, proto.attribution):
                    parts = self._tenant_parts(shares)
        node.energy_refused += gpu.energy.implausible - refused
        return _Accounted(counted, rates, flagged, by_rule, parts, joules)

    @staticmethod
    def _tenant_parts(
        shares: Iterable[tuple[pb.Attribution, accounting.Totals]],
    ) -> list[tuple[str, accounting.Totals]]:
        """A MIG GPU's shares by tenant (accounting.mig_shares, as the summaries split it);
        the unattributed part is in no tenant, as a whole unattributed GPU is."""
        out: dict[str, accounting.Totals] = {}
        for owner, part in shares:
            tenant = accounting.owner(owner)[0]
            if tenant == accounting.UNATTRIBUTED:
                continue
            held = out.get(tenant)
            out[tenant] = part if held is None else {k: v + part[k] for k, v in held.items()}
        return list(out.items())

    def _rule(self, rule: str) -> str:
        if rule in accounting.PADDING_RULES:
            return rule
        self._fold("rule")
        return OTHER

    def _spans(self, cadence: float | None = None) -> tuple[float, float]:
        """The live window and its lag, as configured, widened to follow the report cadence
        of the connected nodes (_followed, up to MAX_CADENCE_S; `cadence` when given): with
        reports every 10 s, the newest 10 s are not all in yet, and a window of a few reports
        would jump."""
        cadence = self._cadence if cadence is None else cadence
        if not cadence:
            return self.window, self.lag
        return max(self.window, 3.0 * cadence), self.lag + cadence

    def _trim(self, node: NodeState, horizon: float) -> None:
        for series in (node.by_model, node.by_tenant):
            for key in list(series):
                series[key].trim(horizon)
                if not series[key].entries:
                    del series[key]

    # -- views -----------------------------------------------------------------------------

    def view(self, now: float | None = None, *, nodes: bool = True) -> ClusterView:
        """The live figures. Each population's window costs the few entries at its edges
        (Series), and the lock is taken VIEW_CHUNK nodes at a time: ingest, which waits on
        the same lock on the event loop, is held up for a few milliseconds at a time, never
        for the whole view (a 10,000-GPU view takes a tenth of a second).

        Without `nodes`, no NodeView is made (ClusterView.nodes is empty) and no node's own
        window figures are worked out: the cluster's figures only, for --node-metrics none,
        where those were most of a 12,500-node view's cost."""
        now = self.clock() if now is None else now
        return self._view(now, nodes)

    def _fresh(self, node: NodeState, now: float) -> bool:
        """Whether the node reported lately: within stale_after, or two of its reports."""
        return node.last_received > 0 and now - node.last_received <= max(
            self.stale_after, 2.0 * node.cadence
        )

    def _view(self, now: float, with_nodes: bool) -> ClusterView:
        with self._lock:
            connected = [(n.cadence, len(n.gpus)) for n in self.nodes.values() if n.session != 0]
            if connected:
                self._cadence = _followed(connected)
                self._slowest = max(cadence for cadence, _ in connected)
            window, lag = self._spans()
            kept, kept_lag = self._spans(self._slowest)  # what ingest keeps (_integrate)
            every = sorted(self.nodes.values(), key=lambda n: n.name)
        end = now - lag
        start = end - window
        horizon = now - kept_lag - kept - 1.0
        nodes: list[NodeView] = []
        seen = reporting_gpus = 0
        power = 0.0
        models: dict[str, int] = {}
        model_seconds: dict[str, list[float]] = {}
        tenants: dict[str, float] = {}  # tenant -> GPUs it holds now (MIG shares by slices)
        tenant_seconds: dict[str, list[float]] = {}
        padding_gpus: dict[str, int] = {}
        for first in range(0, len(every), VIEW_CHUNK):
            with self._lock:
                for node in every[first : first + VIEW_CHUNK]:
                    if self.nodes.get(node.name) is not node:
                        continue  # evicted meanwhile
                    fresh = self._fresh(node, now)
                    at = node.now or self._now(node)
                    seen += at.gpus
                    for model, count in at.models.items():
                        models[model] = models.get(model, 0) + count
                    reporting = at.ok if fresh else []
                    if fresh:
                        for tenant, share in at.tenants:
                            tenants[tenant] = tenants.get(tenant, 0.0) + share
                        for rule, count in at.padding.items():
                            padding_gpus[rule] = padding_gpus.get(rule, 0) + count
                        power += at.power
                    reporting_gpus += len(reporting)
                    self._trim(node, horizon)
                    own = [0.0] * _VECTOR
                    for model, series in node.by_model.items():
                        vector = series.over(start, end)
                        if with_nodes:
                            own = list(map(operator.add, own, vector))
                        held = model_seconds.get(model)
                        model_seconds[model] = (
                            vector if held is None else list(map(operator.add, held, vector))
                        )
                    for tenant, series in node.by_tenant.items():
                        vector = series.over(start, end)
                        held = tenant_seconds.get(tenant)
                        tenant_seconds[tenant] = (
                            vector if held is None else list(map(operator.add, held, vector))
                        )
                    if with_nodes:
                        nodes.append(self._node_view(node, fresh, reporting, own, window))
        with self._lock:
            # the denominator: the declared inventory, or the GPUs seen when they are more (an
            # understated inventory must not inflate a figure: the record's rule too)
            expected = max(self.expected_gpus or 0, seen)
            cluster = _sum(model_seconds.values())
            return ClusterView(
                time=now,
                window_seconds=window,
                window_end=end,
                expected=expected,
                declared=self.expected_gpus is not None,
                seen=seen,
                reporting=reporting_gpus,
                sessions=self._sessions,
                window=window_figures(cluster, expected, window),
                counters=self.counters.copy(),
                power_watts=power,
                nodes=nodes,
                models=models,
                by_model={
                    m: window_figures(model_seconds.get(m, [0.0] * _VECTOR), n, window)
                    for m, n in models.items()
                },
                by_tenant={
                    t: window_figures(
                        _sum(tenant_seconds[x] for x in group if x in tenant_seconds), gpus, window
                    )
                    for t, (group, gpus) in _top_tenants(tenants).items()
                },
                padding_gpus=padding_gpus,
                identity_conflicts=self.identity_conflicts,
                intake_stopped=self.intake.stopped,
                # connected, or reporting lately: a forged node that sent and left counts too
                unauthenticated=sum(
                    1
                    for n in self.nodes.values()
                    if n.authenticated != AUTH_ENROLLED and (n.session != 0 or self._fresh(n, now))
                ),
                evicted=self.evicted,
                folded=dict(self.folded),
                refusals=dict(self.refusals),
                reports=dict(self.reports),
            )

    @staticmethod
    def _now(node: NodeState) -> _Now:
        """The node's _Now, made and kept (under the lock)."""
        gpus = list(node.gpus.values())
        models: dict[str, int] = {}
        for gpu in gpus:
            models[gpu.model] = models.get(gpu.model, 0) + 1
        ok = [g for g in gpus if g.status == pb.GPU_STATUS_OK]
        tenants: list[tuple[str, float]] = []
        padding: dict[str, int] = {}
        for gpu in ok:
            tenants += gpu.held.items()
            if not gpu.held and gpu.tenant != accounting.UNATTRIBUTED:
                tenants.append((gpu.tenant, 1.0))
            for rule in gpu.padding:
                padding[rule] = padding.get(rule, 0) + 1
        power = sum(g.power_watts or 0.0 for g in ok)
        node.now = _Now(len(gpus), models, ok, tuple(tenants), padding, power)
        return node.now

    def _node_view(
        self,
        node: NodeState,
        fresh: bool,
        reporting: list[GpuState],
        seconds: list[float],
        window: float,
    ) -> NodeView:
        chain = self.intake.chains.get(node.name) or Chain()
        return NodeView(
            name=node.name,
            up=fresh and node.session != 0,
            connected=node.session != 0,
            gpus=len(node.gpus),
            reporting=len(reporting),
            backend=node.backend,
            agent_version=node.agent_version,
            driver_version=node.driver_version,
            protocol_revision=node.protocol_revision,
            last_received=node.last_received,
            window=window_figures(seconds, len(node.gpus), window),
            counters=node.counters.copy(),
            reports=dict(node.reports),
            missed_reports=node.missed_reports,
            power_watts=sum(g.power_watts or 0.0 for g in reporting),
            xids=dict(node.xids),
            summaries=chain.recorded,
            summaries_resent=chain.resent,
            chain_breaks=chain.breaks,
            summaries_overlapping=chain.overlaps,
            summaries_unrecorded=chain.unrecorded,
            clipped_seconds=node.clipped_seconds,
            energy_refused=node.energy_refused,
            authenticated=node.authenticated,
            clock_offset=-node.offset if math.isfinite(node.offset) else 0.0,
            clock_steps=node.clock_steps,
        )


def _followed(nodes: list[tuple[float, int]]) -> float:
    """The cadence the live window follows, of the connected nodes' (cadence, GPUs): the
    slowest once the slowest nodes holding at most 1 - CADENCE_SHARE of the GPUs are left
    out. A node counts for no more GPUs than the median node does: its GPUs are what its
    Hello claims (up to --max-gpus), so one agent claiming 64 GPUs among nodes of 8 would
    otherwise hold more than 1% of a 6,000-GPU cluster alone, and slow everyone's figure."""
    counts = sorted(gpus for _, gpus in nodes)
    typical = counts[(len(counts) - 1) // 2]  # the lower median: more than half honest holds it
    weighed = sorted(((cadence, min(gpus, typical)) for cadence, gpus in nodes), reverse=True)
    spare = (1.0 - CADENCE_SHARE) * sum(gpus for _, gpus in weighed)
    for cadence, gpus in weighed:
        spare -= gpus
        if spare < 0:
            return cadence
    return weighed[-1][0]


def _top_tenants(tenants: dict[str, float]) -> dict[str, tuple[list[str], float]]:
    """The MAX_TENANTS tenants holding the most GPUs, and the rest together as "(other)":
    bounded series, whatever the attribution says. Each: (the tenants in it, their GPUs)."""
    ranked = sorted(tenants.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = {tenant: ([tenant], gpus) for tenant, gpus in ranked[:MAX_TENANTS]}
    rest = ranked[MAX_TENANTS:]
    if rest:
        shown[OTHER_TENANTS] = ([t for t, _ in rest], sum(g for _, g in rest))
    return shown
