"""Cluster state: what every node and GPU has reported, integrated over time.

Two views come out of it:

* **counters** (GPU-seconds per measure, joules) that only grow, so that Prometheus can compute
  the exact mean over any range with ``increase()``;
* a **live window**: the cluster ratio of each measure over the last ``window`` seconds, with
  the declared inventory as the denominator, so a GPU that does not report lowers the figure
  instead of vanishing from it.

Each report covers ``interval_seconds`` ending at its timestamp. Report times are moved onto
the collector's clock with a per-stream offset (the smallest receive-minus-send difference
seen), so agent clock skew does not shift windows. The live window ends ``lag`` seconds in the
past, to leave time for the newest reports to arrive. Seconds no report covers are unobserved:
they count as zero in every ratio and lower the coverage; they are never filled in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb

from .keys import KeyStore, KeyStoreError, verify
from .record import Record

# Measures integrated over time, in the order they are exposed.
# Measures of the live view, in the order they are exposed. "effective" is SM activity where
# measured, else the agent's power-based estimate (docs/utilization.md §4).
MEASURES = ("busy", "allocated", "sm_active", "effective", "memory_busy")
_I = {m: i for i, m in enumerate(MEASURES)}
_FRACTIONS = (
    "busy",
    "memory_busy",
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_active",
    "effective",
)
log = logging.getLogger("gputally.collector.state")
_MAX_NODE_NAME = 253
_MAX_INTERVAL_S = 3600.0
_MAX_SUMMARY_WINDOW_S = 7 * 86400.0
# Tenants shown individually in the live view; the rest are summed as "(other)".
MAX_TENANTS = 20


class InvalidMessageError(ValueError):
    """A hello or report the collector refuses; the message says why."""


class NotEnrolledError(ValueError):
    """A node whose key is not enrolled (or not the enrolled one)."""


@dataclass(slots=True)
class Sample:
    end: float  # collector clock, seconds
    seconds: float
    ok: bool
    values: tuple[float | None, ...]  # one per MEASURES entry; None: not available
    estimated: bool  # "effective" is the power-based estimate
    padding: tuple[str, ...]  # rules flagging this sample
    weight: float = 1.0  # the part of the GPU it stands for: a MIG share's slices, else 1


@dataclass(slots=True)
class GpuState:
    node: str
    index: int
    uuid: str
    model: str
    status: int = pb.GPU_STATUS_UNSPECIFIED
    samples: deque[Sample] = field(default_factory=deque)
    last_end: float = -math.inf  # collector-clock end of the newest sample
    last_energy_mj: int | None = None
    power_watts: float | None = None
    tenant: str = ""
    padding: tuple[str, ...] = ()
    # A MIG GPU shared by several owners: each tenant's part of it now, and its samples.
    held: dict[str, float] = field(default_factory=dict)
    shares: dict[str, deque[Sample]] = field(default_factory=dict)


@dataclass(slots=True)
class Counters:
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("observed", *MEASURES), 0.0)
    )
    energy_joules: float = 0.0
    padding: dict[str, float] = field(default_factory=dict)  # rule -> flagged GPU-seconds
    # The part of `seconds` in time flagged by at least one padding rule (a second flagged by
    # two rules counts once here), so that figures without padding follow by subtraction.
    flagged: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("observed", *MEASURES), 0.0)
    )

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
    name: str
    instance_id: int = 0
    last_seq: int = 0
    session: int = 0  # the stream currently speaking for this node; 0 when none
    backend: str = ""
    agent_version: str = ""
    driver_version: str = ""
    offset: float = math.inf  # collector clock minus agent clock, per stream
    last_received: float = 0.0  # collector clock
    gpus: dict[int, GpuState] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    reports: dict[str, int] = field(
        default_factory=lambda: {"accepted": 0, "duplicate": 0, "rejected": 0}
    )
    missed_reports: int = 0  # sequence gaps
    xids: dict[int, int] = field(default_factory=dict)  # XID -> events reported
    summaries: int = 0  # summaries stored in the record
    chain_seq: int = 0  # the node's latest recorded summary: its chain number and body hash
    chain_hash: bytes = b""
    chain_breaks: int = 0  # recorded summaries that did not continue the chain
    chain_loaded: bool = False  # chain_seq/chain_hash read back from the record (after a restart)
    chain_key: bytes = b""  # the key the node's chain is signed with; a new key, a new chain
    summaries_resent: int = 0  # summaries sent again that the record already held


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


@dataclass(frozen=True, slots=True)
class ClusterView:
    time: float
    window_seconds: float
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


def _check_hello(hello: pb.Hello) -> None:
    if not hello.node:
        raise InvalidMessageError("hello: node name is empty")
    if (
        len(hello.node) > _MAX_NODE_NAME
        or not hello.node.isprintable()
        or any(c.isspace() for c in hello.node)
    ):
        raise InvalidMessageError(
            f"hello: node name {hello.node[:40]!r} is not a printable name without spaces of at most {_MAX_NODE_NAME} characters"
        )
    indices = [gpu.index for gpu in hello.gpus]
    if len(set(indices)) != len(indices):
        raise InvalidMessageError(f"hello from {hello.node}: GPU indices repeat: {sorted(indices)}")
    uuids = [gpu.uuid for gpu in hello.gpus if gpu.uuid]
    if len(set(uuids)) != len(uuids):
        raise InvalidMessageError(f"hello from {hello.node}: GPU UUIDs repeat")


def _check_report(node: NodeState, report: pb.Report) -> None:
    if report.seq == 0:
        raise InvalidMessageError("seq must be positive")
    summary_only = not report.gpus and report.HasField("summary") and report.interval_seconds == 0
    if not summary_only and (
        not (0 < report.interval_seconds <= _MAX_INTERVAL_S)
        or not math.isfinite(report.interval_seconds)
    ):
        raise InvalidMessageError(
            f"interval_seconds must be in (0, {_MAX_INTERVAL_S:g}], got {report.interval_seconds!r}"
        )
    if report.time_unix_nano <= 0:
        raise InvalidMessageError("time_unix_nano must be positive")
    seen: set[int] = set()
    for sample in report.gpus:
        if sample.index not in node.gpus:
            raise InvalidMessageError(f"GPU index {sample.index} was not in this node's hello")
        if sample.index in seen:
            raise InvalidMessageError(f"GPU index {sample.index} appears twice")
        seen.add(sample.index)
        for name in _FRACTIONS:
            if sample.HasField(name):
                value = getattr(sample, name)
                if not (0.0 <= value <= 1.0):
                    raise InvalidMessageError(
                        f"GPU {sample.index}: {name} must be a fraction in [0, 1], got {value!r}"
                    )
        for process in sample.processes:
            for name in ("sm_util", "memory_util"):
                if process.HasField(name) and not (0.0 <= getattr(process, name) <= 1.0):
                    raise InvalidMessageError(
                        f"GPU {sample.index} pid {process.pid}: {name} must be a fraction in [0, 1]"
                    )
        for instance in sample.mig:
            if instance.HasField("sm_active") and not (0.0 <= instance.sm_active <= 1.0):
                raise InvalidMessageError(
                    f"GPU {sample.index} MIG {instance.gpu_instance_id}: sm_active must be a fraction"
                )
        if sample.HasField("power_watts") and not (0.0 <= sample.power_watts < 1e5):
            raise InvalidMessageError(
                f"GPU {sample.index}: power_watts out of range: {sample.power_watts!r}"
            )


def _check_summary(node: NodeState, summary: pb.Summary) -> None:
    length = (summary.window_end_unix_nano - summary.window_start_unix_nano) / 1e9
    if not 0 < length <= _MAX_SUMMARY_WINDOW_S:
        raise InvalidMessageError(
            f"summary window must be in (0, {_MAX_SUMMARY_WINDOW_S:g}] s, got {length:g} s"
        )
    slack = length * 1.001 + 1e-6
    for gpu in summary.gpus:
        if gpu.index not in node.gpus:
            raise InvalidMessageError(
                f"summary: GPU index {gpu.index} was not in this node's hello"
            )
        for part, what in ((gpu, ""), *((s, f" share {k}") for k, s in enumerate(gpu.shares))):
            if part.shares and part is not gpu:
                raise InvalidMessageError(
                    f"summary GPU {gpu.index}{what}: a share cannot have shares of its own"
                )
            for name in (
                "present_seconds",
                "allocated_seconds",
                "busy_seconds",
                "sm_active_seconds",
                "effective_seconds",
                "lost_seconds",
                "busy_missing_seconds",
                "allocated_missing_seconds",
            ):
                value = getattr(part, name)
                if not (0.0 <= value <= slack) or not math.isfinite(value):
                    raise InvalidMessageError(
                        f"summary GPU {gpu.index}{what}: {name} must be within the window "
                        f"({length:g} s), got {value!r}"
                    )
            if part.energy_joules < 0 or not math.isfinite(part.energy_joules):
                raise InvalidMessageError(
                    f"summary GPU {gpu.index}{what}: energy_joules must be >= 0"
                )
        held = sum(s.present_seconds for s in gpu.shares)
        if gpu.shares and abs(held - gpu.present_seconds) > 1e-6 * length + 1e-6:
            raise InvalidMessageError(
                f"summary GPU {gpu.index}: its shares hold {held:g} s, the GPU {gpu.present_seconds:g} s"
            )


def _values(sample: pb.GpuSample) -> tuple[float | None, ...]:
    allocated = None if not sample.HasField("process_count") else float(sample.process_count > 0)
    return (
        sample.busy if sample.HasField("busy") else None,
        allocated,
        sample.sm_active if sample.HasField("sm_active") else None,
        sample.effective if sample.HasField("effective") else None,
        sample.memory_busy if sample.HasField("memory_busy") else None,
    )


def _owner(attribution: pb.Attribution) -> str:
    return attribution.tenant or attribution.job


def _mig_shares(sample: pb.GpuSample) -> dict[str, tuple[float, tuple[float | None, ...]]]:
    """A MIG GPU shared by several owners, split by compute slices as the agent's summaries
    split it (docs/utilization.md §9): tenant -> (its fraction of the GPU, its values in
    MEASURES order). Empty when all of it is the GPU's own owner's (or nobody's), or its
    slices are unknown."""
    total = sample.mig_slices if sample.HasField("mig_slices") else 0
    held = sum(m.slices for m in sample.mig)
    if not sample.mig or total <= 0 or held > total:
        return {}
    if any(not m.HasField("slices") for m in sample.mig):
        return {}
    whole = _owner(sample.attribution)
    # Per tenant: its fraction, and its allocated and SM-active slices (None once one of its
    # instances does not say).
    fractions: dict[str, float] = {}
    allocated: dict[str, float | None] = {}
    active: dict[str, float | None] = {}
    if held < total:  # slices in no instance: nothing can run there
        fractions[whole] = (total - held) / total
        allocated[whole] = active[whole] = 0.0
    for instance in sample.mig:
        name = _owner(instance.attribution) if instance.attribution.source else whole
        fraction = instance.slices / total
        fractions[name] = fractions.get(name, 0.0) + fraction
        a, s = allocated.get(name, 0.0), active.get(name, 0.0)
        allocated[name] = (
            a + fraction * (instance.process_count > 0)
            if a is not None and instance.HasField("process_count")
            else None
        )
        active[name] = (
            s + fraction * instance.sm_active
            if s is not None and instance.HasField("sm_active")
            else None
        )
    if set(fractions) == {whole}:  # one owner only, the GPU's own
        return {}
    busy = sample.busy if sample.HasField("busy") else None
    memory_busy = sample.memory_busy if sample.HasField("memory_busy") else None
    out: dict[str, tuple[float, tuple[float | None, ...]]] = {}
    for name, fraction in fractions.items():
        if not name or not fraction:
            continue  # unattributed: in no tenant, as a whole unattributed GPU is
        a, s = allocated[name], active[name]
        sm = None if s is None else s / fraction
        out[name] = (fraction, (busy, None if a is None else a / fraction, sm, sm, memory_busy))
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
        # A record keeps only summaries signed by enrolled keys: without keys, none.
        self.keys = keys
        if record is not None and expected_gpus is not None:
            record.declare_inventory(expected_gpus, clock())
        self.nodes: dict[str, NodeState] = {}
        self.counters = Counters()
        self._lock = threading.Lock()
        self._sessions = 0
        self._next_session = 0

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, hello: pb.Hello) -> tuple[int, int]:
        """Register a stream. Returns (session id, seq to resume after). A node's newer
        stream supersedes an older one still open (the agent reconnected)."""
        _check_hello(hello)
        if self.keys is not None:
            try:
                self.keys.admit(hello.node, hello.public_key)
            except KeyStoreError as error:
                raise NotEnrolledError(str(error)) from None
        with self._lock:
            node = self.nodes.get(hello.node)
            if node is None:
                node = self.nodes[hello.node] = NodeState(name=hello.node)
            if node.instance_id != hello.instance_id:
                node.instance_id = hello.instance_id
                node.last_seq = 0
            if self.keys is not None and node.chain_key != hello.public_key:
                # A rotated key (or the first stream since the collector started): the chain
                # is the new key's, read back from the record if it has that key's summaries.
                node.chain_key = hello.public_key
                node.chain_seq, node.chain_hash, node.chain_loaded = 0, b"", False
            self._next_session += 1
            if node.session == 0:
                self._sessions += 1
            node.session = self._next_session
            node.offset = math.inf
            node.backend = hello.backend
            node.agent_version = hello.agent_version
            node.driver_version = hello.driver_version
            for identity in hello.gpus:
                gpu = node.gpus.get(identity.index)
                if gpu is None or gpu.uuid != identity.uuid:
                    node.gpus[identity.index] = GpuState(
                        hello.node, identity.index, identity.uuid, identity.model
                    )
            return node.session, node.last_seq

    def is_current(self, name: str, session: int) -> bool:
        with self._lock:
            node = self.nodes.get(name)
            return node is not None and node.session == session

    def close_session(self, name: str, session: int) -> None:
        with self._lock:
            node = self.nodes.get(name)
            if node is not None and node.session == session:
                node.session = 0
                self._sessions -= 1

    # -- ingest ----------------------------------------------------------------------------

    def ingest(self, name: str, report: pb.Report, received: float | None = None) -> str:
        """Apply one report: "accepted" or "duplicate". Raises InvalidMessageError and then
        changes nothing, so a bad report never half-applies. A summary it carries is stored
        in the record first; if that fails the report is not accepted (and will be resent)."""
        received = self.clock() if received is None else received
        with self._lock:
            node = self.nodes[name]
            summary: pb.Summary | None = None
            try:
                _check_report(node, report)
                if report.HasField("summary"):
                    summary = self._open_summary(name, node, report.summary)
            except InvalidMessageError:
                node.reports["rejected"] += 1
                raise
            if report.seq <= node.last_seq:
                node.reports["duplicate"] += 1
                return "duplicate"
            resent = False
            if summary is not None and self.record is not None and self.keys is not None:
                try:
                    resent = self._recorded_already(name, node, report.summary, summary)
                except InvalidMessageError:
                    node.reports["rejected"] += 1
                    raise
            if resent:
                node.summaries_resent += 1
            elif summary is not None and self.record is not None and self.keys is not None:
                stored = self.record.append(
                    name,
                    node.instance_id,
                    report.seq,
                    summary.window_start_unix_nano,
                    summary.window_end_unix_nano,
                    received,
                    report.summary.SerializeToString(),  # the signed bytes, as the agent sent them
                )
                node.summaries += stored
                if stored:
                    expected = (node.chain_seq + 1, node.chain_hash)
                    if node.chain_seq and (summary.chain_seq, summary.prev_hash) != expected:
                        node.chain_breaks += 1
                        log.warning(
                            "summary chain broken",
                            extra={
                                "kv": {
                                    "node": name,
                                    "chain_seq": summary.chain_seq,
                                    "expected": expected[0],
                                }
                            },
                        )
                    node.chain_seq = summary.chain_seq
                    node.chain_hash = hashlib.sha256(report.summary.body).digest()
            if node.last_seq and report.seq > node.last_seq + 1:
                node.missed_reports += report.seq - node.last_seq - 1
            node.last_seq = report.seq
            node.reports["accepted"] += 1
            if not report.gpus:
                return "accepted"  # a summary-only report: it covers no time of its own
            agent_time = report.time_unix_nano / 1e9
            node.offset = min(node.offset, received - agent_time)
            end = agent_time + node.offset
            node.last_received = received
            added = Counters()
            dt = report.interval_seconds
            for proto in report.gpus:
                gpu = node.gpus[proto.index]
                gpu.status = proto.status
                ok = proto.status == pb.GPU_STATUS_OK
                values = _values(proto) if ok else (None,) * len(MEASURES)
                padding = tuple(proto.padding) if ok else ()
                # The stream offset only shrinks (a faster delivery than any before), which
                # moves this report's end earlier than the previous one's placement: clip its
                # start so that two samples never cover the same second in the live window.
                # The counters below keep the agent's own interval, which is exact.
                placed = min(dt, max(end - gpu.last_end, 0.0))
                gpu.last_end = max(gpu.last_end, end)
                gpu.samples.append(
                    Sample(end, placed, ok, values, proto.effective_estimated, padding)
                )
                gpu.power_watts = proto.power_watts if proto.HasField("power_watts") else None
                gpu.tenant = _owner(proto.attribution)
                gpu.held = {}
                for tenant, (fraction, part) in (_mig_shares(proto) if ok else {}).items():
                    gpu.held[tenant] = fraction
                    gpu.shares.setdefault(tenant, deque()).append(
                        Sample(end, placed, ok, part, False, (), fraction)
                    )
                gpu.padding = padding
                for event in proto.xid_events:
                    node.xids[event.code] = node.xids.get(event.code, 0) + 1
                if ok:
                    added.seconds["observed"] += dt
                    for measure, value in zip(MEASURES, values, strict=True):
                        if value is not None:
                            added.seconds[measure] += value * dt
                    for rule in padding:
                        added.padding[rule] = added.padding.get(rule, 0.0) + dt
                    if padding:
                        added.flagged["observed"] += dt
                        for measure, value in zip(MEASURES, values, strict=True):
                            if value is not None:
                                added.flagged[measure] += value * dt
                if proto.HasField("energy_millijoules"):
                    energy = proto.energy_millijoules
                    if gpu.last_energy_mj is not None:
                        # The counter restarts at zero when the driver reloads: then the
                        # energy since the reload is the new value itself.
                        delta = (
                            energy - gpu.last_energy_mj if energy >= gpu.last_energy_mj else energy
                        )
                        added.energy_joules += delta / 1000.0
                    gpu.last_energy_mj = energy
                elif ok and proto.HasField("power_watts"):
                    # No energy counter on this board (pre-Volta): integrate the power
                    # readings over the covered seconds instead.
                    added.energy_joules += proto.power_watts * dt
                self._trim(gpu, received)
            node.counters.add(added)
            self.counters.add(added)
            return "accepted"

    def _open_summary(self, name: str, node: NodeState, signed: pb.SignedSummary) -> pb.Summary:
        if self.keys is not None:
            key = self.keys.key(name)
            if key is None or not verify(key, signed.body, signed.signature):
                raise InvalidMessageError(
                    "summary signature does not verify with the node's enrolled key"
                )
        try:
            summary = pb.Summary.FromString(signed.body)
        except DecodeError:
            raise InvalidMessageError("summary body is not a Summary message") from None
        if summary.node != name:
            raise InvalidMessageError(f"summary names node {summary.node!r}, not {name!r}")
        _check_summary(node, summary)
        return summary

    # How far back a summary sent again is looked for in the record: an agent resends only
    # what was not acknowledged, which is the newest few (one per stream interruption).
    _RESEND_HORIZON = 256

    def _recorded_already(
        self, name: str, node: NodeState, signed: pb.SignedSummary, summary: pb.Summary
    ) -> bool:
        """True for a summary the record already holds (an agent sends its spool again when
        its acknowledgement was lost); InvalidMessageError for one that would rewrite the
        node's recorded chain; False for a new one."""
        assert self.record is not None
        if not node.chain_loaded:
            # After a collector restart, the chain goes on from what the record holds.
            node.chain_loaded = True
            newest = self.record.recent(name, 1)
            if newest and not node.chain_seq:
                latest = pb.SignedSummary.FromString(newest[0])
                key = self.keys.key(name) if self.keys is not None else None
                # only the current key's chain goes on; a rotated key's starts afresh
                if key is not None and verify(key, latest.body, latest.signature):
                    node.chain_seq = pb.Summary.FromString(latest.body).chain_seq
                    node.chain_hash = hashlib.sha256(latest.body).digest()
        if summary.chain_seq > node.chain_seq:
            return False
        for stored in self.record.recent(name, self._RESEND_HORIZON):
            earlier = pb.SignedSummary.FromString(stored).body
            if earlier == signed.body:
                return True
            if pb.Summary.FromString(earlier).chain_seq == summary.chain_seq:
                break  # same number, other content: a rewrite, refused below
        raise InvalidMessageError(
            f"summary {summary.chain_seq} of node {name} is not the one recorded under that number "
            f"(the recorded chain is at {node.chain_seq}): refused, so the record is not rewritten"
        )

    def _trim(self, gpu: GpuState, now: float) -> None:
        horizon = now - self.lag - self.window - 1.0
        while gpu.samples and gpu.samples[0].end < horizon:
            gpu.samples.popleft()
        if not gpu.shares:  # every report trims every GPU: keep the common case bare
            return
        for samples in gpu.shares.values():
            while samples and samples[0].end < horizon:
                samples.popleft()
        for tenant in [t for t, samples in gpu.shares.items() if not samples]:
            del gpu.shares[tenant]

    # -- views -----------------------------------------------------------------------------

    def _window(
        self, gpus: list[Iterable[Sample]], denominator: float, start: float, end: float
    ) -> WindowFigures:
        """Figures over the samples of `gpus` (one sample series per GPU or MIG share)."""
        n = len(MEASURES)
        figure, lower, caps, measured, flagged = (
            [0.0] * n,
            [0.0] * n,
            [0.0] * n,
            [0.0] * n,
            [0.0] * n,
        )
        observed = 0.0
        for samples in gpus:
            for sample in samples:
                overlap = min(sample.end, end) - max(sample.end - sample.seconds, start)
                if overlap <= 0 or not sample.ok:
                    continue
                overlap *= sample.weight
                observed += overlap
                busy = sample.values[_I["busy"]]
                for i, value in enumerate(sample.values):
                    measure = MEASURES[i]
                    known = value is not None and not (measure == "effective" and sample.estimated)
                    if value is not None:
                        figure[i] += value * overlap
                        if sample.padding:
                            flagged[i] += value * overlap
                    if known:
                        lower[i] += value * overlap  # type: ignore[operator]
                        measured[i] += overlap
                    elif measure in ("sm_active", "effective") and busy is not None:
                        caps[i] += busy * overlap  # an SM is only active while a kernel runs
                    else:
                        caps[i] += overlap
        capacity = denominator * (end - start)
        if capacity <= 0:
            zeros = dict.fromkeys(MEASURES, 0.0)
            return WindowFigures(
                denominator, zeros, 0.0, dict(zeros), dict(zeros), dict(zeros), dict(zeros)
            )
        unobserved = max(capacity - observed, 0.0)

        def ratio(values: list[float]) -> dict[str, float]:
            return {
                m: min(max(v / capacity, 0.0), 1.0) for m, v in zip(MEASURES, values, strict=True)
            }

        return WindowFigures(
            gpus=denominator,
            ratios=ratio(figure),
            coverage=min(observed / capacity, 1.0),
            measured=ratio(measured),
            lower=ratio(lower),
            upper=ratio([lo + cap + unobserved for lo, cap in zip(lower, caps, strict=True)]),
            without_padding=ratio([f - x for f, x in zip(figure, flagged, strict=True)]),
        )

    def view(self, now: float | None = None) -> ClusterView:
        now = self.clock() if now is None else now
        end = now - self.lag
        start = end - self.window
        with self._lock:
            all_gpus: list[GpuState] = []
            nodes: list[NodeView] = []
            models: dict[str, list[GpuState]] = {}
            tenants: dict[str, list[tuple[Iterable[Sample], float]]] = {}
            padding_gpus: dict[str, int] = {}
            reporting_total = 0
            power_total = 0.0
            for node in sorted(self.nodes.values(), key=lambda n: n.name):
                fresh = node.last_received > 0 and now - node.last_received <= self.stale_after
                gpus = list(node.gpus.values())
                reporting = [g for g in gpus if fresh and g.status == pb.GPU_STATUS_OK]
                power = sum(g.power_watts or 0.0 for g in reporting)
                reporting_total += len(reporting)
                power_total += power
                all_gpus.extend(gpus)
                for gpu in gpus:
                    models.setdefault(gpu.model, []).append(gpu)
                for gpu in reporting:
                    for tenant, fraction in gpu.held.items():
                        tenants.setdefault(tenant, []).append((gpu.shares[tenant], fraction))
                    if gpu.tenant and not gpu.held:
                        tenants.setdefault(gpu.tenant, []).append((gpu.samples, 1.0))
                    for rule in gpu.padding:
                        padding_gpus[rule] = padding_gpus.get(rule, 0) + 1
                nodes.append(
                    NodeView(
                        name=node.name,
                        up=fresh and node.session != 0,
                        connected=node.session != 0,
                        gpus=len(gpus),
                        reporting=len(reporting),
                        backend=node.backend,
                        last_received=node.last_received,
                        window=self._window([g.samples for g in gpus], len(gpus), start, end),
                        counters=node.counters.copy(),
                        reports=dict(node.reports),
                        missed_reports=node.missed_reports,
                        power_watts=power,
                        xids=dict(node.xids),
                        summaries=node.summaries,
                        summaries_resent=node.summaries_resent,
                        chain_breaks=node.chain_breaks,
                    )
                )
            ranked = sorted(tenants.items(), key=lambda kv: (-sum(f for _, f in kv[1]), kv[0]))
            shown = dict(ranked[:MAX_TENANTS])
            rest = [g for _, gs in ranked[MAX_TENANTS:] for g in gs]
            if rest:
                shown["(other)"] = rest
            seen = len(all_gpus)
            expected = self.expected_gpus if self.expected_gpus is not None else seen
            return ClusterView(
                time=now,
                window_seconds=self.window,
                expected=expected,
                declared=self.expected_gpus is not None,
                seen=seen,
                reporting=reporting_total,
                sessions=self._sessions,
                window=self._window([g.samples for g in all_gpus], expected, start, end),
                counters=self.counters.copy(),
                power_watts=power_total,
                nodes=nodes,
                models={m: len(g) for m, g in models.items()},
                by_model={
                    m: self._window([x.samples for x in g], len(g), start, end)
                    for m, g in models.items()
                },
                by_tenant={
                    t: self._window([s for s, _ in g], sum(f for _, f in g), start, end)
                    for t, g in shown.items()
                },
                padding_gpus=padding_gpus,
            )
