"""Turns the node's readings into protocol messages: one Hello per stream, one Report per tick."""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.v1 import PROTOCOL_REVISION, __version__, accounting
from gputally.v1 import telemetry_pb2 as pb

from .attribution import Attributor
from .backend import NvmlBackend
from .chain import SummarySigner
from .nvml import clock_event_names
from .padding import PaddingDetector, PaddingRules, effective
from .readings import (
    GPU_ERROR,
    GPU_LOST,
    GPU_OK,
    MEASUREMENTS,
    Attribution,
    GpuInfo,
    GpuReading,
    NotAvailable,
)
from .summary import GpuTotals, Summarizer, account

_STATUS = {GPU_OK: pb.GPU_STATUS_OK, GPU_LOST: pb.GPU_STATUS_LOST, GPU_ERROR: pb.GPU_STATUS_ERROR}


def _set_present(message: Any, source: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(source, name)
        if not isinstance(value, NotAvailable):
            setattr(message, name, value)


def reading_to_proto(reading: GpuReading) -> pb.GpuSample:
    """A NotAvailable value is left absent in the message: absent means "not available"."""
    sample = pb.GpuSample(index=reading.index, status=_STATUS[reading.status], error=reading.error)
    _set_present(sample, reading, MEASUREMENTS)
    if not isinstance(reading.processes, NotAvailable):
        for process in reading.processes:
            message = sample.processes.add(
                pid=process.pid,
                user=process.user,
                command=process.command,
                cgroup=process.cgroup,
                container_id=process.container_id,
                gpu_instance_id=process.gpu_instance_id,
            )
            if process.memory_bytes is not None:
                message.memory_bytes = process.memory_bytes
            _set_present(message, process, ("sm_util", "memory_util"))
    for code, when in reading.xid_events:
        sample.xid_events.add(code=code, time_unix_nano=int(when * 1e9))
    if reading.attribution.source:
        sample.attribution.CopyFrom(_attribution(reading.attribution))
    sample.mig_enabled = reading.mig_enabled
    if isinstance(reading.mig_slices, int):
        sample.mig_slices = reading.mig_slices
    for instance in reading.mig:
        mig = sample.mig.add(
            gpu_instance_id=instance.gpu_instance_id,
            compute_instance_id=instance.compute_instance_id,
            uuid=instance.uuid,
        )
        _set_present(
            mig,
            instance,
            ("memory_total_bytes", "memory_used_bytes", "process_count", "sm_active", "slices"),
        )
        if instance.attribution.source:
            mig.attribution.CopyFrom(_attribution(instance.attribution))
    return sample


def _attribution(owner: Attribution) -> pb.Attribution:
    return pb.Attribution(source=owner.source, tenant=owner.tenant, job=owner.job)


def identity_to_proto(info: GpuInfo) -> pb.GpuIdentity:
    identity = pb.GpuIdentity(
        index=info.index,
        uuid=info.uuid,
        serial=info.serial,
        model=info.model,
        pci_bus_id=info.pci_bus_id,
    )
    if not isinstance(info.memory_total_bytes, NotAvailable):
        identity.memory_total_bytes = info.memory_total_bytes
    if not isinstance(info.power_limit_watts, NotAvailable):
        identity.power_limit_watts = info.power_limit_watts
    return identity


class _Batch:
    """The ticks of one report that spans several: each GPU's latest sample, its totals tick
    by tick, and every XID event."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.end_ns = 0
        self.latest: dict[int, pb.GpuSample] = {}
        self.totals: dict[int, GpuTotals] = {}
        self.xids: dict[int, list[pb.XidEvent]] = {}

    def add(self, tick: pb.Report, energy: dict[int, accounting.EnergyCounter]) -> None:
        seconds = tick.interval_seconds
        self.seconds += seconds
        self.end_ns = tick.time_unix_nano
        for sample in tick.gpus:
            meter = energy.setdefault(sample.index, accounting.EnergyCounter())
            joules = meter.joules(sample, seconds)
            self.latest[sample.index] = sample
            self.xids.setdefault(sample.index, []).extend(sample.xid_events)
            totals = self.totals.setdefault(sample.index, GpuTotals())
            if seconds > 0:
                totals.add(account(sample, seconds, joules))

    def report(self, seq: int) -> pb.Report:
        report = pb.Report(seq=seq, time_unix_nano=self.end_ns, interval_seconds=self.seconds)
        for index, latest in self.latest.items():
            sample = report.gpus.add()
            sample.CopyFrom(latest)
            del sample.xid_events[:]
            sample.xid_events.extend(self.xids[index])
            self.totals[index].fill(sample.totals)
        return report


class Sampler:
    """Reads the node once per tick (the backend, then the attribution) and numbers the
    reports.

    Each tick covers the interval since the previous tick, capped at ``max_gap_factor``
    sampling intervals: NVML's utilization counters only look back about a second, so time
    the agent did not sample (a stall, a suspended process) is left uncovered, which the
    collector counts as unobserved rather than guessing idle or busy.

    A report goes out every ``report_every`` seconds (default: every tick). When that spans
    several ticks, the report carries each GPU's latest reading and its totals over every
    tick (GpuSample.totals, by the summaries' own accounting), so that reporting every 10 s
    at 100,000 GPUs loses no second of any measure. A report's ticks are contiguous: a gap
    (a stall, resume()) ends the report in progress first.
    """

    def __init__(
        self,
        backend: NvmlBackend,
        *,
        attributor: Attributor | None = None,
        node: str | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        max_gap_factor: float = 2.0,
        summary_window: float = 300.0,
        padding: PaddingRules | None = None,
        signer: SummarySigner | None = None,
        report_every: float | None = None,
    ):
        if interval <= 0:
            raise ValueError("the sampling interval must be positive")
        report_every = interval if report_every is None else report_every
        if report_every < interval:
            raise ValueError(
                "reports cannot come more often than samples (report_every < interval)"
            )
        self.report_every = report_every
        self._batch: _Batch | None = None
        self._batch_energy: dict[int, accounting.EnergyCounter] = {}
        self._cut = False  # the next tick starts a new report (time was not covered)
        self.last_tick: pb.Report | None = None  # the latest tick's readings, for the exporter
        self.summary_window = summary_window
        self.padding = PaddingDetector(padding or PaddingRules())
        self.summarizer: Summarizer | None = None
        self._pending: deque[pb.SignedSummary] = deque()  # closed windows waiting for a report
        self.backend = backend
        self.attributor = attributor or Attributor(monotonic=clock)
        self.node = node or socket.gethostname()
        # Without a key of its own (simulations, tests) the sampler signs with a fresh one.
        self.signer = signer or SummarySigner(Ed25519PrivateKey.generate(), self.node)
        self.interval = interval
        self.clock = clock
        self.max_gap = interval * max_gap_factor
        self.seq = 0
        self.inventory: list[GpuInfo] = []
        self._last: float | None = None
        self.opened_at: float | None = None  # when coverage began: the clock at open()
        self.last_sample_at: float | None = None

    def open(self) -> list[GpuInfo]:
        self.inventory = self.backend.open()
        self._last = self.opened_at = self.clock()
        self.summarizer = Summarizer(
            [identity_to_proto(i) for i in self.inventory],
            self.summary_window,
            backend=self.backend.kind,
            driver_version=self.backend.driver_version,
        )
        return self.inventory

    def close(self) -> None:
        self.backend.close()

    def resume(self) -> None:
        """Start covering time afresh after an outage: the outage stays unobserved."""
        self._last = self.clock()
        self._cut = True

    @property
    def batching(self) -> bool:
        """Whether a report spans several ticks (and so carries its GPUs' totals)."""
        return self.report_every > self.interval * 1.5

    def hello(self, instance_id: int, backend_name: str) -> pb.Hello:
        return pb.Hello(
            node=self.node,
            agent_version=__version__,
            backend=backend_name,
            driver_version=self.backend.driver_version,
            nvml_version=self.backend.nvml_version,
            instance_id=instance_id,
            sample_interval_seconds=self.interval,
            report_interval_seconds=self.report_every,
            gpus=[identity_to_proto(info) for info in self.inventory],
            protocol_revision=PROTOCOL_REVISION,
            public_key=self.signer.public_key,
        )

    def read(self) -> list[GpuReading]:
        """Every GPU's reading, with its processes described and the GPU attributed."""
        readings = self.backend.read()
        self.attributor.annotate(self.inventory, readings)
        return readings

    def tick(self) -> pb.Report | None:
        """Sample once. The report due now, or None while the report in progress spans more
        ticks (see the class)."""
        readings = self.read()
        now = self.clock()
        last = self._last if self._last is not None else now - self.interval
        covered = min(max(now - last, 0.0), self.max_gap)
        gap = covered < now - last - 1e-6
        self._last = self.last_sample_at = now
        report = pb.Report(time_unix_nano=int(now * 1e9), interval_seconds=covered)
        for info, reading in zip(self.inventory, readings, strict=True):
            sample = reading_to_proto(reading)
            value, estimated = effective(sample, info.model)
            if value is not None:
                sample.effective, sample.effective_estimated = value, estimated
            memory = info.memory_total_bytes if isinstance(info.memory_total_bytes, int) else 0
            sample.padding.extend(self.padding.update(sample, info.model, memory, now, covered))
            report.gpus.append(sample)
        if self.summarizer is not None:
            self._pending.extend(self.signer.sign(s) for s in self.summarizer.add(report))
        self.last_tick = report
        if not self.batching:
            return self._numbered(report)
        out = None
        if self._batch is not None and (gap or self._cut):
            out = self._flush()
        self._cut = False
        if self._batch is None:
            self._batch = _Batch()
        self._batch.add(report, self._batch_energy)
        if out is None and self._batch.seconds >= self.report_every - self.interval / 2:
            out = self._flush()
        return out

    def _flush(self) -> pb.Report:
        assert self._batch is not None
        batch, self._batch = self._batch, None
        self.seq += 1
        return self._with_summary(batch.report(self.seq))

    def _numbered(self, report: pb.Report) -> pb.Report:
        self.seq += 1
        report.seq = self.seq
        return self._with_summary(report)

    def _with_summary(self, report: pb.Report) -> pb.Report:
        if self._pending:
            report.summary.CopyFrom(self._pending.popleft())
        return report

    def spooled_reports(self) -> list[pb.Report]:
        """Reports carrying the summaries a previous run of this agent signed but did not get
        acknowledged (the signer's spool), to send first. They cover no time of their own."""
        reports = []
        for signed in self.signer.pending():
            self.seq += 1
            reports.append(
                pb.Report(seq=self.seq, time_unix_nano=int(self.clock() * 1e9), summary=signed)
            )
        return reports

    def final_reports(self) -> list[pb.Report]:
        """For a clean shutdown: the report in progress, then reports carrying the summaries
        still open or waiting, which cover no time of their own (no GPU samples, zero
        interval)."""
        reports = [self._flush()] if self._batch is not None and self._batch.seconds > 0 else []
        self._batch = None
        if self.summarizer is not None:
            self._pending.extend(self.signer.sign(s) for s in self.summarizer.flush())
        while self._pending:
            self.seq += 1
            reports.append(
                pb.Report(
                    seq=self.seq,
                    time_unix_nano=int(self.clock() * 1e9),
                    summary=self._pending.popleft(),
                )
            )
        return reports


def snapshot(info: list[GpuInfo], readings: list[GpuReading]) -> dict[str, Any]:
    """A JSON-ready view of the node: every field, with "not available" spelled out."""

    def value(v: object) -> object:
        return {"not_available": v.reason} if isinstance(v, NotAvailable) else v

    def record(item: object) -> dict[str, object]:
        return {k: value(v) for k, v in asdict(item).items()}  # type: ignore[call-overload]

    gpus = []
    for gpu, reading in zip(info, readings, strict=True):
        gpus.append(
            {
                "index": gpu.index,
                "uuid": gpu.uuid,
                "serial": gpu.serial,
                "model": gpu.model,
                "pci_bus_id": gpu.pci_bus_id,
                "memory_total_bytes": value(gpu.memory_total_bytes),
                "status": reading.status,
                "error": reading.error,
                **{name: value(v) for name, v in reading.measurements().items()},
                "clock_event_names": (
                    clock_event_names(reading.clock_event_reasons)
                    if isinstance(reading.clock_event_reasons, int)
                    else value(reading.clock_event_reasons)
                ),
                "processes": (
                    value(reading.processes)
                    if isinstance(reading.processes, NotAvailable)
                    else [record(p) for p in reading.processes]
                ),
                "xid_events": [{"xid": code, "time": when} for code, when in reading.xid_events],
                "attribution": record(reading.attribution),
                "mig_enabled": reading.mig_enabled,
                **(
                    {"mig_slices": value(reading.mig_slices)}
                    if reading.mig_slices is not None
                    else {}
                ),
                "mig": [record(m) for m in reading.mig],
            }
        )
    return {"gpus": gpus}
