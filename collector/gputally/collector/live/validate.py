"""What the collector refuses: the checks every Hello, Report and Summary passes before any of
it counts. Pure functions: each raises InvalidMessageError with a message for the agent's log,
or returns, and never changes anything."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Container, Mapping
from dataclasses import dataclass

from gputally.v1 import PROTOCOL_REVISION
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import (
    MAX_IDENTITY,
    PADDING_RULES,
    card,
    summary_problem,
    totals_problem,
    uuid_problem,
)

# A DNS name is at most 253 characters; a node's key file is <node>.pub, and a file name is
# at most 255 bytes: so at most 250 bytes of UTF-8.
MAX_NODE_NAME = 250
MAX_SEQ = 2**63 - 1  # the record stores sequence numbers as SQLite's signed 64-bit integers
MAX_INTERVAL_S = 3600.0


class InvalidMessageError(ValueError):
    """A hello, report or summary the collector refuses; the message says why."""


class LimitError(InvalidMessageError):
    """A message beyond one of the collector's Limits (gRPC RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class TimeLimits:
    """When a report or summary may say it happened, on the collector's clock: no earlier than
    `horizon` seconds ago (an agent's spool may hold days of summaries from a collector
    outage, never more), no later than `skew` seconds ahead (agent clocks drift; the future
    has not been measured yet)."""

    horizon: float = 7 * 86400.0
    skew: float = 300.0
    # How far a node's live reports may run ahead of the time the collector has seen pass
    # since its first one: the backlog an agent brings after an outage (its outbox holds an
    # hour at one report a second). Older seconds reach the record through signed summaries.
    backlog: float = 3600.0

    def check(self, what: str, start_ns: int, end_ns: int, now: float) -> None:
        earliest, latest = now - self.horizon, now + self.skew
        if start_ns / 1e9 < earliest or end_ns / 1e9 > latest:
            raise InvalidMessageError(
                f"{what} [{start_ns / 1e9:.0f}, {end_ns / 1e9:.0f}] is outside what the "
                f"collector accepts now: [{earliest:.0f}, {latest:.0f}] (unix seconds; "
                f"--horizon {self.horizon:g} s back, --max-skew {self.skew:g} s ahead)"
            )


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one agent may send and the collector keeps, so that memory and the work per
    message stay bounded whatever a client sends. Each is a collector option; refusals name
    the option. A message over max_message_bytes never reaches Python: grpc refuses it."""

    max_message_bytes: int = 4 * 2**20  # one AgentMessage; an 8-GPU report is ~2 KiB
    max_batch_reports: int = 1024  # reports in one batch (the agent sends at most 256)
    max_gpus: int = 64  # GPUs in one Hello (the largest machines hold 16)
    max_string: int = 1024  # bytes of any text the collector keeps (versions, tenants, jobs)
    max_items: int = 1024  # entries of any list in one GPU sample (processes, XIDs, MIG, ...)
    max_streams: int = 20_000  # welcomed streams in total (one per node)
    max_pending_streams: int = 1024  # streams opened but not yet welcomed (Hello, Proof)
    max_streams_per_peer: int = 64  # open streams from one IP address
    max_nodes: int = 20_000  # nodes kept in the live state (a 100,000-GPU cluster: 12,500)
    evict_after: float = 86_400.0  # a node without a stream or report this long is forgotten
    hello_timeout: float = 10.0  # seconds a stream may take to send its Hello (and Proof)
    # streams refused from one IP address per REFUSAL_WINDOW_S before the next ones are
    # refused at once, unread and unlogged (a client retrying bad Hellos in a loop)
    max_refusals_per_peer: int = 100
    max_models: int = 32  # distinct GPU models shown; the rest are "(other)"
    max_xid_codes: int = 32  # distinct XID codes shown per node; the rest are "other"


# GpuSample fields that are fractions in [0, 1].
_FRACTIONS = (
    "busy",
    "memory_busy",
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_active",
    "effective",
)
# Read in one C call each (an absent optional field reads 0.0, which is in range): the fast
# check of every sample, before the slow one that names what is wrong.
_fractions = operator.attrgetter(*_FRACTIONS)
_process_fractions = operator.attrgetter("sm_util", "memory_util")
_mig_fraction = operator.attrgetter("sm_active")
_attribution_texts = operator.attrgetter("source", "tenant", "job")


def _too_long(text: str, limit: int) -> bool:
    # len() first: a str of n characters holds at most 4n bytes of UTF-8, most hold n
    return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)


def check_hello(hello: pb.Hello, sizes: Limits = Limits()) -> None:
    """A Hello's identity: LimitError beyond `sizes`, InvalidMessageError when it is unusable."""
    if not hello.node:
        raise InvalidMessageError("hello: node name is empty")
    if (
        len(hello.node.encode()) > MAX_NODE_NAME
        or not hello.node.isprintable()
        or any(c.isspace() for c in hello.node)
    ):
        raise InvalidMessageError(
            f"hello: node name {hello.node[:40]!r} is not a printable name without spaces of at most {MAX_NODE_NAME} bytes"
        )
    if len(hello.gpus) > sizes.max_gpus:
        raise LimitError(
            f"hello from {hello.node}: {len(hello.gpus)} GPUs, more than the collector accepts "
            f"on one node (--max-gpus {sizes.max_gpus})"
        )
    for name in ("agent_version", "backend", "driver_version", "nvml_version"):
        if _too_long(getattr(hello, name), sizes.max_string):
            raise LimitError(
                f"hello from {hello.node}: {name} is longer than --max-string "
                f"{sizes.max_string} bytes"
            )
    if hello.protocol_revision < 1:
        raise InvalidMessageError(
            f"hello from {hello.node}: protocol_revision is not set; this collector speaks "
            f"gputally.v1 revision {PROTOCOL_REVISION} and accepts any revision from 1"
        )
    for name in ("sample_interval_seconds", "report_interval_seconds"):
        value = getattr(hello, name)
        if not (math.isfinite(value) and 0.0 <= value <= MAX_INTERVAL_S):
            raise InvalidMessageError(
                f"hello from {hello.node}: {name} must be in [0, {MAX_INTERVAL_S:g}], got {value!r}"
            )
    indices = [gpu.index for gpu in hello.gpus]
    if len(set(indices)) != len(indices):
        raise InvalidMessageError(f"hello from {hello.node}: GPU indices repeat: {sorted(indices)}")
    for gpu in hello.gpus:
        # The UUID is the card's identity in every count, census and overlap check: a card
        # without one (or a model) cannot be told from another, so it is refused, not guessed.
        problem = uuid_problem(gpu.uuid)
        if problem:
            raise InvalidMessageError(f"hello from {hello.node}: GPU {gpu.index} {problem}")
        if not gpu.model or len(gpu.model) > MAX_IDENTITY or not gpu.model.isprintable():
            raise InvalidMessageError(
                f"hello from {hello.node}: GPU {gpu.index} has no usable model "
                f"(got {gpu.model[:40]!r})"
            )
        if gpu.serial and uuid_problem(gpu.serial):
            raise InvalidMessageError(f"hello from {hello.node}: GPU {gpu.index}: bad serial")
        if _too_long(gpu.pci_bus_id, MAX_IDENTITY):
            raise InvalidMessageError(f"hello from {hello.node}: GPU {gpu.index}: bad PCI bus id")
    uuids = [card(gpu.uuid) for gpu in hello.gpus]
    if len(set(uuids)) != len(uuids):
        raise InvalidMessageError(f"hello from {hello.node}: GPU UUIDs repeat")
    serials = [card(gpu.serial) for gpu in hello.gpus if gpu.serial]
    if len(set(serials)) != len(serials):
        raise InvalidMessageError(f"hello from {hello.node}: GPU serials repeat")


def check_report(
    report: pb.Report,
    gpus: Container[int],
    now: float,
    limits: TimeLimits = TimeLimits(),
    sizes: Limits = Limits(),
) -> None:
    """A report of a node whose hello announced the GPU indices `gpus`, received at `now`."""
    if not 0 < report.seq <= MAX_SEQ:
        raise InvalidMessageError(f"seq must be in [1, 2^63 - 1], got {report.seq}")
    summary_only = not report.gpus and report.HasField("summary") and report.interval_seconds == 0
    if not summary_only and (
        not (0 < report.interval_seconds <= MAX_INTERVAL_S)
        or not math.isfinite(report.interval_seconds)
    ):
        raise InvalidMessageError(
            f"interval_seconds must be in (0, {MAX_INTERVAL_S:g}], got {report.interval_seconds!r}"
        )
    if report.time_unix_nano <= 0:
        raise InvalidMessageError("time_unix_nano must be positive")
    end = report.time_unix_nano
    limits.check("the report's interval", end - round(report.interval_seconds * 1e9), end, now)
    seen: set[int] = set()
    for sample in report.gpus:
        if sample.index not in gpus:
            raise InvalidMessageError(f"GPU index {sample.index} was not in this node's hello")
        if sample.index in seen:
            raise InvalidMessageError(f"GPU index {sample.index} appears twice")
        seen.add(sample.index)
        _check_sample(sample, sizes)
        if sample.HasField("totals"):
            _check_totals(sample, report.interval_seconds, sizes)


def _check_attribution(where: str, attribution: pb.Attribution, sizes: Limits) -> None:
    # Kept by the collector (whom a GPU is charged to) and shown as labels: bounded.
    if sum(map(len, _attribution_texts(attribution))) * 4 <= sizes.max_string:
        return  # the common case: short whatever the characters
    for name in ("source", "tenant", "job"):
        if _too_long(getattr(attribution, name), sizes.max_string):
            raise LimitError(
                f"{where}: attribution {name} is longer than --max-string {sizes.max_string} bytes"
            )


def _sample_ok(sample: pb.GpuSample, sizes: Limits) -> bool:
    """The common case of _check_sample, at C speed where it can be: every list within
    bounds, every fraction in [0, 1], a plausible power, short attributions, known rules."""
    processes, mig = sample.processes, sample.mig
    if max(len(processes), len(sample.xid_events), len(mig), len(sample.padding)) > sizes.max_items:
        return False
    values = _fractions(sample)
    if processes:
        values = (*values, *itertools.chain.from_iterable(map(_process_fractions, processes)))
    if mig:
        values = (*values, *map(_mig_fraction, mig))
    # a finite sum rules out NaN and infinities, which min() and max() would pass over
    if not (math.isfinite(sum(values)) and min(values) >= 0.0 and max(values) <= 1.0):
        return False
    if not 0.0 <= sample.power_watts < 1e5:  # absent: 0.0
        return False
    padding = sample.padding
    if padding and any(rule not in PADDING_RULES for rule in padding):
        return False
    texts = sum(map(len, _attribution_texts(sample.attribution)))
    if mig:
        texts += sum(sum(map(len, _attribution_texts(i.attribution))) for i in mig)
    return texts * 4 <= sizes.max_string


def _check_sample(sample: pb.GpuSample, sizes: Limits = Limits()) -> None:
    if _sample_ok(sample, sizes):
        return
    where = f"GPU {sample.index}"
    for name in ("processes", "xid_events", "mig", "padding"):
        if len(getattr(sample, name)) > sizes.max_items:
            raise LimitError(
                f"{where}: {len(getattr(sample, name))} {name}, more than --max-items {sizes.max_items}"
            )
    for rule in sample.padding:
        if rule not in PADDING_RULES and _too_long(rule, MAX_IDENTITY):
            raise InvalidMessageError(
                f"{where}: a padding rule name of more than {MAX_IDENTITY} characters"
            )
    if sample.HasField("attribution"):
        _check_attribution(where, sample.attribution, sizes)
    for instance in sample.mig:
        if instance.HasField("attribution"):
            _check_attribution(
                f"{where} MIG {instance.gpu_instance_id}", instance.attribution, sizes
            )
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


def _check_totals(sample: pb.GpuSample, seconds: float, sizes: Limits) -> None:
    """A GPU's totals over a report that spans several ticks: bounded, and physically
    possible over the report's interval (the rules of a summary's GPU)."""
    totals = sample.totals
    where = f"GPU {sample.index}"
    for name in ("padding", "shares"):
        if len(getattr(totals, name)) > sizes.max_items:
            raise LimitError(f"{where}: totals with more {name} than --max-items {sizes.max_items}")
    for part in (totals, *totals.shares):
        if part.HasField("attribution"):
            _check_attribution(where, part.attribution, sizes)
    for rule in (padding.rule for padding in totals.padding):
        if rule not in PADDING_RULES and _too_long(rule, MAX_IDENTITY):
            raise InvalidMessageError(
                f"{where}: a padding rule name of more than {MAX_IDENTITY} characters"
            )
    problem = totals_problem(totals, seconds)
    if problem:
        raise InvalidMessageError(f"{where}: {problem}")


def check_summary(
    summary: pb.Summary, uuids: Mapping[int, str], now: float, limits: TimeLimits = TimeLimits()
) -> None:
    """A summary of a node whose hello announced the GPUs `uuids` (index -> UUID), received at
    `now`: of this node's GPUs, at a plausible time, and physically possible in itself
    (accounting.summary_problem, the rule the auditor's tools apply to a ledger too)."""
    problem = summary_problem(summary)
    if problem:
        raise InvalidMessageError(problem)
    if not 0 < summary.chain_seq <= MAX_SEQ:
        # the record's integers are signed 64-bit: a number beyond them would wedge the chain
        raise InvalidMessageError(
            f"summary: chain_seq must be in [1, 2^63 - 1], got {summary.chain_seq}"
        )
    limits.check(
        "the summary's window", summary.window_start_unix_nano, summary.window_end_unix_nano, now
    )
    for gpu in summary.gpus:
        if gpu.index not in uuids:
            raise InvalidMessageError(
                f"summary: GPU index {gpu.index} was not in this node's hello"
            )
        if gpu.uuid != uuids[gpu.index]:
            raise InvalidMessageError(
                f"summary: GPU {gpu.index} is {gpu.uuid!r}, the hello said {uuids[gpu.index]!r}"
            )
