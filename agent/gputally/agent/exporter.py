"""The agent's own /metrics: this node's GPUs, per GPU (the dcgm-exporter use case).

Collection is decoupled from scrapes: the sampling loop hands each Report to
:meth:`NodeExporter.update`, and a scrape renders the latest one. A scrape never calls NVML,
so a slow or frequent scraper cannot slow sampling down or hang a GPU. The per-GPU
``_seconds_total`` and energy counters are integrated from every report by the same rules as
the signed summaries (gputally.v1.accounting), so Prometheus gets exact averages over any range
with ``increase()``, not a guess from one gauge reading per scrape, and the same figures the
record holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb

from .nvml import CLOCK_EVENT_REASONS
from .sender import SenderStats

# GpuSample field -> (metric name, help, scale to base units)
_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    (
        "busy",
        "gputally_gpu_busy_ratio",
        "Share of time a kernel was running (NVML utilization.gpu).",
        1.0,
    ),
    (
        "memory_busy",
        "gputally_gpu_memory_busy_ratio",
        "Share of time the memory controller was busy.",
        1.0,
    ),
    (
        "sm_active",
        "gputally_gpu_sm_active_ratio",
        "Share of SMs active (GPM, Hopper and newer).",
        1.0,
    ),
    (
        "sm_occupancy",
        "gputally_gpu_sm_occupancy_ratio",
        "Warps resident over the maximum (GPM).",
        1.0,
    ),
    (
        "tensor_active",
        "gputally_gpu_tensor_active_ratio",
        "Share of time tensor cores were active (GPM).",
        1.0,
    ),
    (
        "dram_active",
        "gputally_gpu_dram_active_ratio",
        "DRAM bandwidth used over the maximum (GPM).",
        1.0,
    ),
    ("memory_used_bytes", "gputally_gpu_memory_used_bytes", "Device memory in use.", 1.0),
    ("power_watts", "gputally_gpu_power_watts", "Power draw.", 1.0),
    ("power_limit_watts", "gputally_gpu_power_limit_watts", "Enforced power limit.", 1.0),
    ("sm_clock_mhz", "gputally_gpu_sm_clock_hertz", "SM clock.", 1e6),
    ("temperature_celsius", "gputally_gpu_temperature_celsius", "GPU temperature.", 1.0),
    ("process_count", "gputally_gpu_processes", "Running compute processes.", 1.0),
    (
        "process_memory_bytes",
        "gputally_gpu_process_memory_bytes",
        "Device memory held by compute processes.",
        1.0,
    ),
    ("memory_clock_mhz", "gputally_gpu_memory_clock_hertz", "Memory clock.", 1e6),
    (
        "memory_temperature_celsius",
        "gputally_gpu_memory_temperature_celsius",
        "Memory (HBM) temperature.",
        1.0,
    ),
    (
        "remap_pending",
        "gputally_gpu_row_remap_pending",
        "1 when a memory row remap waits for a GPU reset.",
        1.0,
    ),
    (
        "remap_failure",
        "gputally_gpu_row_remap_failure",
        "1 when a memory row remap failed: the GPU needs service.",
        1.0,
    ),
)
# GpuSample fields exposed as one family with a label telling them apart.
_LABELLED: tuple[tuple[str, str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "gauge",
        "gputally_gpu_ecc_errors",
        "ECC errors since the driver loaded (volatile counters).",
        "type",
        (("corrected", "ecc_corrected_volatile"), ("uncorrected", "ecc_uncorrected_volatile")),
    ),
    (
        "gauge",
        "gputally_gpu_remapped_rows",
        "Memory rows remapped, by the kind of error that caused it.",
        "type",
        (
            ("correctable", "remapped_rows_correctable"),
            ("uncorrectable", "remapped_rows_uncorrectable"),
        ),
    ),
    (
        "gauge",
        "gputally_gpu_pcie_throughput_bytes_per_second",
        "PCIe throughput over NVML's last 20 ms window.",
        "direction",
        (("tx", "pcie_tx_bytes_per_second"), ("rx", "pcie_rx_bytes_per_second")),
    ),
    (
        "counter",
        "gputally_gpu_nvlink",
        "NVLink data over all links since the driver loaded, in bytes.",
        "direction",
        (("tx", "nvlink_tx_bytes"), ("rx", "nvlink_rx_bytes")),
    ),
)
# MigSample field -> (metric name, help).
_MIG: tuple[tuple[str, str, str], ...] = (
    ("sm_active", "gputally_mig_sm_active_ratio", "Share of the instance's SMs active (GPM)."),
    ("memory_used_bytes", "gputally_mig_memory_used_bytes", "Device memory used in the instance."),
    ("memory_total_bytes", "gputally_mig_memory_total_bytes", "Device memory of the instance."),
    ("process_count", "gputally_mig_processes", "Compute processes in the instance."),
)
_LABELS = ["gpu", "uuid", "model"]


class NodeExporter(Collector):
    def __init__(self, hello: pb.Hello, sender_stats: Callable[[], SenderStats] | None = None):
        self._lock = threading.Lock()
        self.node = hello.node
        self.gpus = {g.index: g for g in hello.gpus}
        self.sender_stats = sender_stats
        self.latest: pb.Report | None = None
        self.last_success = 0.0
        self.seconds = {index: _zero_seconds() for index in self.gpus}
        self.joules = dict.fromkeys(self.gpus, 0.0)
        self._energy: dict[int, accounting.EnergyCounter] = {}
        self.xids: dict[tuple[int, int], int] = {}  # (gpu, XID) -> events since start

    def update(self, report: pb.Report) -> None:
        with self._lock:
            self.latest = report
            self.last_success = time.time()
            dt = report.interval_seconds
            for sample in report.gpus:
                for event in sample.xid_events:
                    self.xids[(sample.index, event.code)] = (
                        self.xids.get((sample.index, event.code), 0) + 1
                    )
                meter = self._energy.setdefault(sample.index, accounting.EnergyCounter())
                joules = meter.joules(sample, dt)
                self.joules[sample.index] = self.joules.get(sample.index, 0.0) + joules
                values = accounting.contributions(sample, dt)
                counters = self.seconds.setdefault(sample.index, _zero_seconds())
                for measure, name in accounting.COUNTED:
                    counters[measure] += values[name]

    def collect(self) -> Iterator[Any]:
        with self._lock:
            report = self.latest
            seconds = {k: dict(v) for k, v in self.seconds.items()}
            joules = dict(self.joules)
            xids = dict(self.xids)
            last_success = self.last_success
        samples = list(report.gpus) if report is not None else []
        yield from self._identity()
        yield from self._readings(samples)
        yield from self._mig(samples)
        yield from self._counters(seconds, joules, xids)
        yield from self._agent(report is not None, last_success)

    def _key(self, index: int) -> list[str]:
        """A GPU's label values, in _LABELS order."""
        gpu = self.gpus.get(index)
        return [str(index), gpu.uuid if gpu else "", gpu.model if gpu else ""]

    def _identity(self) -> Iterator[Any]:
        info = GaugeMetricFamily(
            "gputally_gpu_info", "GPU identity.", labels=[*_LABELS, "serial", "pci_bus_id"]
        )
        total = GaugeMetricFamily(
            "gputally_gpu_memory_total_bytes", "Device memory.", labels=_LABELS
        )
        for index, gpu in sorted(self.gpus.items()):
            info.add_metric([*self._key(index), gpu.serial, gpu.pci_bus_id], 1)
            if gpu.HasField("memory_total_bytes"):
                total.add_metric(self._key(index), gpu.memory_total_bytes)
        yield info
        yield total

    def _readings(self, samples: list[pb.GpuSample]) -> Iterator[Any]:
        """The latest sample's values. A field that is absent (not available) has no
        series, never a 0."""
        up = GaugeMetricFamily(
            "gputally_gpu_up",
            "1 when the GPU's telemetry was read; 0 when lost or failing.",
            labels=_LABELS,
        )
        gauges = {
            field: GaugeMetricFamily(name, text, labels=_LABELS) for field, name, text, _ in _GAUGES
        }
        reasons = GaugeMetricFamily(
            "gputally_gpu_clock_event_reason",
            "1 for each active clock-event (throttle) reason.",
            labels=[*_LABELS, "reason"],
        )
        labelled = {
            name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=[*_LABELS, label]
            )
            for kind, name, text, label, _ in _LABELLED
        }
        attribution = GaugeMetricFamily(
            "gputally_gpu_attribution_info",
            "The tenant and job the GPU is attributed to.",
            labels=[*_LABELS, "source", "tenant", "job"],
        )
        for sample in samples:
            key = self._key(sample.index)
            up.add_metric(key, int(sample.status == pb.GPU_STATUS_OK))
            for field, _, _, scale in _GAUGES:
                if sample.HasField(field):
                    gauges[field].add_metric(key, getattr(sample, field) * scale)
            if sample.HasField("clock_event_reasons"):
                for name, bit in CLOCK_EVENT_REASONS:
                    reasons.add_metric([*key, name], int(bool(sample.clock_event_reasons & bit)))
            for _, name, _, _, members in _LABELLED:
                for value_label, field in members:
                    if sample.HasField(field):
                        labelled[name].add_metric([*key, value_label], getattr(sample, field))
            if sample.attribution.source:
                a = sample.attribution
                attribution.add_metric([*key, a.source, a.tenant, a.job], 1)
        yield up
        yield from gauges.values()
        yield reasons
        yield from labelled.values()
        yield attribution

    def _mig(self, samples: list[pb.GpuSample]) -> Iterator[Any]:
        labels = ["gpu", "uuid", "gpu_instance", "mig_uuid"]
        families = {
            field: GaugeMetricFamily(name, text, labels=labels) for field, name, text in _MIG
        }
        attribution = GaugeMetricFamily(
            "gputally_mig_attribution_info",
            "The tenant and job a MIG instance is handed to.",
            labels=[*labels, "source", "tenant", "job"],
        )
        for sample in samples:
            for instance in sample.mig:
                ids = [
                    str(sample.index),
                    self._key(sample.index)[1],
                    str(instance.gpu_instance_id),
                    instance.uuid,
                ]
                for field, family in families.items():
                    if instance.HasField(field):
                        family.add_metric(ids, getattr(instance, field))
                if instance.attribution.source:
                    a = instance.attribution
                    attribution.add_metric([*ids, a.source, a.tenant, a.job], 1)
        yield from families.values()
        yield attribution

    def _counters(
        self,
        seconds: dict[int, dict[str, float]],
        joules: dict[int, float],
        xids: dict[tuple[int, int], int],
    ) -> Iterator[Any]:
        xid = CounterMetricFamily(
            "gputally_gpu_xid_events",
            "XID errors seen since the agent started.",
            labels=[*_LABELS, "xid"],
        )
        for (index, code), count in sorted(xids.items()):
            xid.add_metric([*self._key(index), str(code)], count)
        yield xid
        counter = CounterMetricFamily(
            "gputally_gpu_seconds",
            "Seconds integrated from every sample: observed, and each measure weighted by its value.",
            labels=[*_LABELS, "measure"],
        )
        for index, values in sorted(seconds.items()):
            for measure, value in values.items():
                counter.add_metric([*self._key(index), measure], value)
        yield counter
        energy = CounterMetricFamily(
            "gputally_gpu_energy_joules", "Energy drawn since the agent started.", labels=_LABELS
        )
        for index, value in sorted(joules.items()):
            energy.add_metric(self._key(index), value)
        yield energy

    def _agent(self, collected: bool, last_success: float) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "gputally_agent_last_collect_success",
            "1 when the latest sampling tick succeeded.",
            value=int(collected),
        )
        yield GaugeMetricFamily(
            "gputally_agent_last_collect_timestamp_seconds",
            "When the latest sampling tick finished.",
            value=last_success,
        )
        if self.sender_stats is None:
            return
        stats = self.sender_stats()
        sent = CounterMetricFamily(
            "gputally_agent_reports", "Reports by outcome at the collector.", labels=["result"]
        )
        for result, value in (
            ("submitted", stats.submitted),
            ("acked", stats.acked),
            ("rejected", stats.rejected),
            ("dropped", stats.dropped),
        ):
            sent.add_metric([result], value)
        yield sent
        yield GaugeMetricFamily(
            "gputally_agent_collector_connected",
            "1 while the stream to the collector is open.",
            value=int(stats.connected),
        )


def _zero_seconds() -> dict[str, float]:
    return {measure: 0.0 for measure, _ in accounting.COUNTED}


def make_registry(exporter: NodeExporter) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
