"""The NVML backend: identity and telemetry of every GPU on this node.

It reads NVML through an :class:`~gputally.agent.nvml.NvmlLibrary` (``pynvml`` itself, or the
mock) and answers in :mod:`~gputally.agent.readings` values. It reads only what NVML knows:
who the processes are and whom a GPU is charged to is the attribution's business
(:mod:`gputally.agent.attribution`), which the sampler runs over these readings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pynvml

from .nvml import (
    PERMANENT_CODES,
    NvmlLibrary,
    NvmlUnavailableError,
    field_value,
    handle_key,
    init_failure_message,
    is_lost,
    query,
    text,
    unavailable,
)
from .readings import (
    GPU_ERROR,
    GPU_LOST,
    NO_INSTANCE,
    GpuInfo,
    GpuReading,
    MigReading,
    NotAvailable,
    ProcessInfo,
    convert,
    known,
)
from .xid import XidWatcher

# GPM metric ids read on Hopper and newer, and the reading field each one fills.
_GPM_METRICS: tuple[tuple[int, str], ...] = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "sm_active"),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "sm_occupancy"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "tensor_active"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "dram_active"),
)
# NVML needs two GPM samples at least this far apart to compute a metric.
GPM_MIN_SPACING_S = 0.1
# Fields read in one nvmlDeviceGetFieldValues call, the reading field each fills, its scale.
_FIELD_VALUES: tuple[tuple[int, str, int], ...] = (
    (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, "nvlink_tx_bytes", 1024),  # KiB counters
    (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, "nvlink_rx_bytes", 1024),
    (pynvml.NVML_FI_DEV_MEMORY_TEMP, "memory_temperature_celsius", 1),
)


def _milli(value: int) -> float:
    return value / 1000.0


@dataclass(slots=True)
class _Gpm:
    """A pair of GPM sample buffers compared tick after tick."""

    prev: Any
    cur: Any
    prev_time: float


@dataclass(slots=True)
class _Mig:
    handle: Any
    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    slices: int | NotAvailable
    gpm: _Gpm | None = None


@dataclass(slots=True)
class _Gpu:
    info: GpuInfo
    handle: Any
    # Calls that failed permanently (not supported, no permission): not repeated each tick.
    skip: dict[str, NotAvailable] = field(default_factory=dict)
    gpm_unavailable: NotAvailable | None = None  # None when GPM works on this GPU
    gpm: _Gpm | None = None
    # Timestamps (µs, driver clock) of the newest samples already counted.
    samples_seen_us: int = 0
    process_util_seen_us: int = 0
    mig_enabled: bool = False
    mig_slices: int | NotAvailable | None = None
    mig: list[_Mig] = field(default_factory=list)


class NvmlBackend:
    """Reads identity and telemetry of every GPU on this node through NVML."""

    name = "nvml"

    def __init__(
        self,
        lib: NvmlLibrary | None = None,
        *,
        monotonic: Callable[[], float] | None = None,
        clock: Callable[[], float] | None = None,
        events: str = "thread",
    ):
        if events not in ("thread", "poll", "off"):
            raise ValueError("events must be 'thread', 'poll' or 'off'")
        self._lib: NvmlLibrary = lib if lib is not None else pynvml
        self._monotonic = monotonic or time.monotonic
        self._clock = clock or time.time
        self._events_mode = events
        self._events: XidWatcher | None = None
        self._gpus: list[_Gpu] = []
        self.driver_version = ""
        self.nvml_version = ""

    @property
    def kind(self) -> str:
        """ "nvml", or what a stand-in library says it is ("mock"): signed into every summary,
        so that simulated figures are never taken for measured ones."""
        return str(getattr(self._lib, "PROVENANCE", "nvml"))

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> list[GpuInfo]:
        """Initialise NVML and read the inventory. Raises NvmlUnavailableError with a
        readable message when NVML cannot be used at all."""
        try:
            self._lib.nvmlInit()
        except pynvml.NVMLError as error:
            raise NvmlUnavailableError(init_failure_message(error)) from None
        self.driver_version = _text_or_empty(query(self._lib.nvmlSystemGetDriverVersion))
        self.nvml_version = _text_or_empty(query(self._lib.nvmlSystemGetNVMLVersion))
        count = query(self._lib.nvmlDeviceGetCount)
        if isinstance(count, NotAvailable):
            raise NvmlUnavailableError(f"NVML could not count the GPUs: {count.reason}")
        self._gpus = [self._open_gpu(index) for index in range(count)]
        if self._events_mode != "off":
            devices = [
                (g.handle, g.info.index)
                for g in self._gpus
                if g.handle is not None and g.info.lost is None
            ]
            self._events = XidWatcher(self._lib, devices, clock=self._clock)
            self._events.start(thread=self._events_mode == "thread")
        return self.inventory()

    def close(self) -> None:
        if self._events is not None:
            self._events.stop()
            self._events = None
        for gpu in self._gpus:
            for pair in (gpu.gpm, *(m.gpm for m in gpu.mig)):
                if pair is not None:
                    query(self._lib.nvmlGpmSampleFree, pair.prev)
                    query(self._lib.nvmlGpmSampleFree, pair.cur)
        self._gpus = []
        query(self._lib.nvmlShutdown)

    def inventory(self) -> list[GpuInfo]:
        return [gpu.info for gpu in self._gpus]

    def _open_gpu(self, index: int) -> _Gpu:
        handle = query(self._lib.nvmlDeviceGetHandleByIndex, index)
        if isinstance(handle, NotAvailable):
            # The GPU is counted by the driver but cannot be opened: keep it in the inventory
            # as lost so that it is reported, not silently dropped.
            info = GpuInfo(index, "", "", "", "", handle, handle, lost=handle)
            return _Gpu(info=info, handle=None)
        lib = self._lib
        uuid = query(lib.nvmlDeviceGetUUID, handle)
        name = query(lib.nvmlDeviceGetName, handle)
        memory = query(lib.nvmlDeviceGetMemoryInfo, handle)
        info = GpuInfo(
            index=index,
            uuid=_text_or_empty(uuid),
            serial=_text_or_empty(query(lib.nvmlDeviceGetSerial, handle)),
            model=_text_or_empty(name),
            pci_bus_id=_text_or_empty(
                convert(query(lib.nvmlDeviceGetPciInfo, handle), lambda p: p.busId)
            ),
            memory_total_bytes=convert(memory, lambda m: int(m.total)),
            power_limit_watts=convert(query(lib.nvmlDeviceGetEnforcedPowerLimit, handle), _milli),
        )
        lost = next((v for v in (uuid, name, memory) if is_lost(v)), None)
        if isinstance(lost, NotAvailable):
            info.lost = lost
        gpu = _Gpu(info=info, handle=handle)
        if info.lost is None:
            self._open_gpm(gpu)
            self._open_mig(gpu)
            self._busy_from_samples(gpu)  # count only samples taken from now on
        return gpu

    def _new_gpm(self, take: Callable[[Any], Any]) -> _Gpm | NotAvailable:
        prev = query(self._lib.nvmlGpmSampleAlloc)
        cur = query(self._lib.nvmlGpmSampleAlloc)
        if isinstance(prev, NotAvailable):
            return prev
        if isinstance(cur, NotAvailable):
            return cur
        # Take the first sample now, so that the first tick already has a pair to compare.
        first = query(take, prev)
        if isinstance(first, NotAvailable):
            return first
        return _Gpm(prev, cur, self._monotonic())

    def _open_gpm(self, gpu: _Gpu) -> None:
        support = query(self._lib.nvmlGpmQueryDeviceSupport, gpu.handle)
        if isinstance(support, NotAvailable):
            gpu.gpm_unavailable = support
            return
        if not support.isSupportedDevice:
            gpu.gpm_unavailable = NotAvailable(
                "not supported on this model (GPM needs Hopper or newer)"
            )
            return
        pair = self._new_gpm(partial(self._lib.nvmlGpmSampleGet, gpu.handle))
        if isinstance(pair, NotAvailable):
            gpu.gpm_unavailable = pair
        else:
            gpu.gpm = pair

    def _open_mig(self, gpu: _Gpu) -> None:
        lib = self._lib
        mode = query(lib.nvmlDeviceGetMigMode, gpu.handle)
        if isinstance(mode, NotAvailable) or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
            return
        gpu.mig_enabled = True
        count = query(lib.nvmlDeviceGetMaxMigDeviceCount, gpu.handle)
        # As many MIG devices at most as the GPU has 1g compute slices (7 on A100 and H100,
        # 4 on A30): the whole an instance's gpuInstanceSliceCount is a part of.
        gpu.mig_slices = count
        for slot in range(known(count, 0)):
            handle = query(lib.nvmlDeviceGetMigDeviceHandleByIndex, gpu.handle, slot)
            if isinstance(handle, NotAvailable):
                continue  # no instance in this slot
            gi = query(lib.nvmlDeviceGetGpuInstanceId, handle)
            ci = query(lib.nvmlDeviceGetComputeInstanceId, handle)
            instance = _Mig(
                handle=handle,
                gpu_instance_id=int(known(gi, NO_INSTANCE)),
                compute_instance_id=int(known(ci, NO_INSTANCE)),
                uuid=_text_or_empty(query(lib.nvmlDeviceGetUUID, handle)),
                slices=convert(
                    query(lib.nvmlDeviceGetAttributes, handle),
                    lambda a: int(a.gpuInstanceSliceCount),
                ),
            )
            if gpu.gpm is not None and instance.gpu_instance_id != NO_INSTANCE:
                pair = self._new_gpm(
                    partial(lib.nvmlGpmMigSampleGet, gpu.handle, instance.gpu_instance_id)
                )
                instance.gpm = known(pair, None)
            gpu.mig.append(instance)

    # -- sampling --------------------------------------------------------------------------

    def read(self) -> list[GpuReading]:
        """Read every GPU. A lost GPU is reported as lost; the others are unaffected."""
        if self._events is not None and self._events_mode == "poll":
            self._events.poll()
        return [self._read_gpu(gpu) for gpu in self._gpus]

    def _call(self, gpu: _Gpu, name: str, *args: Any, handle: Any = None) -> Any:
        # Keyed by arguments too: the SM clock may be readable where the memory clock is not.
        # Only constant arguments matter; the timestamps of sample queries are left out.
        constant = tuple(a for a in args if isinstance(a, int) and a < 1 << 16)
        key = f"{name}{constant}" if handle is None else f"{name}{constant}@{handle_key(handle)}"
        skipped = gpu.skip.get(key)
        if skipped is not None:
            return skipped
        value = query(getattr(self._lib, name), gpu.handle if handle is None else handle, *args)
        if isinstance(value, NotAvailable) and value.code in PERMANENT_CODES:
            gpu.skip[key] = value
        return value

    def _read_gpu(self, gpu: _Gpu) -> GpuReading:
        reading = GpuReading(
            index=gpu.info.index, mig_enabled=gpu.mig_enabled, mig_slices=gpu.mig_slices
        )
        if self._events is not None:
            reading.xid_events = self._events.take(gpu.info.index)
        if gpu.info.lost is not None or gpu.handle is None:
            return _mark_lost(reading, gpu.info.lost or NotAvailable("gpu lost"))
        util = self._call(gpu, "nvmlDeviceGetUtilizationRates")
        if is_lost(util):
            # Once a GPU is lost it stays lost until the driver is reset; the agent keeps
            # reporting it as lost rather than dropping it.
            gpu.info.lost = util
            return _mark_lost(reading, util)
        reading.busy = convert(util, lambda u: u.gpu / 100.0)
        reading.memory_busy = convert(util, lambda u: u.memory / 100.0)
        # Prefer every driver sample since the last tick over the one latest sample: with a
        # 1/6 s driver period, one reading a second sees a sixth of the time.
        integrated = self._busy_from_samples(gpu)
        if integrated is not None:
            reading.busy = integrated
        if gpu.mig_enabled and isinstance(reading.busy, NotAvailable):
            # NVML refuses device-wide utilization under MIG: say so, never report 0.
            reading.busy = reading.memory_busy = NotAvailable(
                "not available under MIG (see the instances)", reading.busy.code
            )
        self._read_basics(gpu, reading)
        self._read_processes(gpu, reading)
        self._read_health(gpu, reading)
        self._read_gpm(gpu, reading)
        reading.mig = [self._read_mig(gpu, instance) for instance in gpu.mig]
        values = reading.measurements().values()
        lost = next((v for v in values if is_lost(v)), None)
        if isinstance(lost, NotAvailable):
            gpu.info.lost = lost
            return _mark_lost(reading, lost)
        if all(isinstance(v, NotAvailable) for v in values):
            reading.status = GPU_ERROR
            reading.error = "no field could be read"
        return reading

    def _read_basics(self, gpu: _Gpu, reading: GpuReading) -> None:
        memory = self._call(gpu, "nvmlDeviceGetMemoryInfo")
        reading.memory_used_bytes = convert(memory, lambda m: int(m.used))
        reading.power_watts = convert(self._call(gpu, "nvmlDeviceGetPowerUsage"), _milli)
        reading.power_limit_watts = convert(
            self._call(gpu, "nvmlDeviceGetEnforcedPowerLimit"), _milli
        )
        reading.energy_millijoules = convert(
            self._call(gpu, "nvmlDeviceGetTotalEnergyConsumption"), int
        )
        reading.sm_clock_mhz = convert(
            self._call(gpu, "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM), int
        )
        reading.temperature_celsius = convert(
            self._call(gpu, "nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU), int
        )
        reading.clock_event_reasons = convert(
            self._call(gpu, "nvmlDeviceGetCurrentClocksEventReasons"), int
        )

    def _read_health(self, gpu: _Gpu, reading: GpuReading) -> None:
        for kind, name in (
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "ecc_corrected_volatile"),
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "ecc_uncorrected_volatile"),
        ):
            count = self._call(gpu, "nvmlDeviceGetTotalEccErrors", kind, pynvml.NVML_VOLATILE_ECC)
            setattr(reading, name, convert(count, int))
        rows = self._call(gpu, "nvmlDeviceGetRemappedRows")
        reading.remapped_rows_correctable = convert(rows, lambda r: int(r[0]))
        reading.remapped_rows_uncorrectable = convert(rows, lambda r: int(r[1]))
        reading.remap_pending = convert(rows, lambda r: bool(r[2]))
        reading.remap_failure = convert(rows, lambda r: bool(r[3]))
        for counter, name in (
            (pynvml.NVML_PCIE_UTIL_TX_BYTES, "pcie_tx_bytes_per_second"),
            (pynvml.NVML_PCIE_UTIL_RX_BYTES, "pcie_rx_bytes_per_second"),
        ):
            value = self._call(gpu, "nvmlDeviceGetPcieThroughput", counter)
            setattr(reading, name, convert(value, lambda kib: kib * 1024.0))  # KiB/s
        reading.memory_clock_mhz = convert(
            self._call(gpu, "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_MEM), int
        )
        values = self._call(
            gpu, "nvmlDeviceGetFieldValues", [field_id for field_id, _, _ in _FIELD_VALUES]
        )
        for slot, (_, name, scale) in enumerate(_FIELD_VALUES):
            if isinstance(values, NotAvailable):
                setattr(reading, name, values)
            elif values[slot].nvmlReturn != pynvml.NVML_SUCCESS:
                setattr(reading, name, unavailable(values[slot].nvmlReturn))
            else:
                setattr(reading, name, field_value(values[slot]) * scale)

    def _read_processes(self, gpu: _Gpu, reading: GpuReading) -> None:
        listed = self._call(gpu, "nvmlDeviceGetComputeRunningProcesses")
        if isinstance(listed, NotAvailable):
            reading.processes = reading.process_count = reading.process_memory_bytes = listed
            return
        processes = [
            ProcessInfo(
                pid=int(p.pid),
                # usedGpuMemory is None where the driver cannot attribute memory (e.g. WDDM).
                memory_bytes=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
                gpu_instance_id=int(getattr(p, "gpuInstanceId", NO_INSTANCE)),
            )
            for p in listed
        ]
        reading.process_count = len(processes)
        reading.process_memory_bytes = sum(p.memory_bytes or 0 for p in processes)
        self._process_utilization(gpu, processes)
        reading.processes = processes

    def _process_utilization(self, gpu: _Gpu, processes: list[ProcessInfo]) -> None:
        if not processes:
            return
        samples = self._call(gpu, "nvmlDeviceGetProcessUtilization", gpu.process_util_seen_us)
        if isinstance(samples, NotAvailable):
            reason = samples
            if samples.code == pynvml.NVML_ERROR_NOT_FOUND:
                reason = NotAvailable("no sample since the last tick", samples.code)
            for process in processes:
                process.sm_util = process.memory_util = reason
            return
        by_pid: dict[int, list[Any]] = {}
        for sample in samples:
            by_pid.setdefault(int(sample.pid), []).append(sample)
            gpu.process_util_seen_us = max(gpu.process_util_seen_us, int(sample.timeStamp))
        for process in processes:
            mine = by_pid.get(process.pid)
            if not mine:
                process.sm_util = process.memory_util = NotAvailable(
                    "no sample since the last tick"
                )
                continue
            process.sm_util = min(sum(s.smUtil for s in mine) / len(mine) / 100.0, 1.0)
            process.memory_util = min(sum(s.memUtil for s in mine) / len(mine) / 100.0, 1.0)

    def _busy_from_samples(self, gpu: _Gpu) -> float | None:
        """Time-weighted mean of the driver's utilization samples newer than the last seen
        one; None when the buffer is not supported or holds nothing new."""
        got = self._call(
            gpu, "nvmlDeviceGetSamples", pynvml.NVML_GPU_UTILIZATION_SAMPLES, gpu.samples_seen_us
        )
        if isinstance(got, NotAvailable) or not got[1]:
            return None
        value_type, samples = got
        first_call = gpu.samples_seen_us == 0
        previous = gpu.samples_seen_us
        total = weight = 0.0
        for sample in sorted(samples, key=lambda s: s.timeStamp):
            value = (
                sample.sampleValue.dVal
                if value_type == pynvml.NVML_VALUE_TYPE_DOUBLE
                else sample.sampleValue.uiVal
            )
            # A sample stands for the time since the one before it, but never for more than
            # a second: after a stall longer than the driver's buffer, the gap stays unknown.
            span = min(sample.timeStamp - previous, 1_000_000) if previous else 0
            total += value * span
            weight += span
            previous = sample.timeStamp
        gpu.samples_seen_us = previous
        if first_call or weight <= 0:
            return None
        return min(max(total / weight / 100.0, 0.0), 1.0)

    def _gpm_metrics(
        self, pair: _Gpm, take: Callable[[Any], Any]
    ) -> dict[str, float | NotAvailable]:
        """Each GPM metric between the previous sample and a new one taken now."""
        now = self._monotonic()
        names = [name for _, name in _GPM_METRICS]
        if now - pair.prev_time < GPM_MIN_SPACING_S:
            return dict.fromkeys(names, NotAvailable("gpm samples too close together"))
        got = query(take, pair.cur)
        if isinstance(got, NotAvailable):
            return dict.fromkeys(names, got)
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(_GPM_METRICS)
        request.sample1 = pair.prev
        request.sample2 = pair.cur
        for slot, (metric_id, _) in enumerate(_GPM_METRICS):
            request.metrics[slot].metricId = metric_id
        result = query(self._lib.nvmlGpmMetricsGet, request)
        # The newer sample becomes the baseline of the next tick.
        pair.prev, pair.cur, pair.prev_time = pair.cur, pair.prev, now
        if isinstance(result, NotAvailable):
            return dict.fromkeys(names, result)
        out: dict[str, float | NotAvailable] = {}
        for slot, name in enumerate(names):
            metric = result.metrics[slot]
            if metric.nvmlReturn != pynvml.NVML_SUCCESS:
                out[name] = unavailable(metric.nvmlReturn)
            else:
                out[name] = min(max(float(metric.value) / 100.0, 0.0), 1.0)
        return out

    def _read_gpm(self, gpu: _Gpu, reading: GpuReading) -> None:
        if gpu.gpm is None:
            why = gpu.gpm_unavailable
            if why is None:  # (a NotAvailable is falsy: `or` would never keep it)
                why = NotAvailable("gpm not available")
            for _, name in _GPM_METRICS:
                setattr(reading, name, why)
            return
        for name, value in self._gpm_metrics(
            gpu.gpm, partial(self._lib.nvmlGpmSampleGet, gpu.handle)
        ).items():
            setattr(reading, name, value)

    def _read_mig(self, gpu: _Gpu, instance: _Mig) -> MigReading:
        reading = MigReading(
            instance.gpu_instance_id, instance.compute_instance_id, instance.uuid, instance.slices
        )
        memory = self._call(gpu, "nvmlDeviceGetMemoryInfo", handle=instance.handle)
        reading.memory_total_bytes = convert(memory, lambda m: int(m.total))
        reading.memory_used_bytes = convert(memory, lambda m: int(m.used))
        procs = self._call(gpu, "nvmlDeviceGetComputeRunningProcesses", handle=instance.handle)
        reading.process_count = convert(procs, len)
        if instance.gpm is None:
            reading.sm_active = (
                gpu.gpm_unavailable
                if gpu.gpm_unavailable is not None
                else NotAvailable("gpm not available for this instance")
            )
        else:
            take = partial(self._lib.nvmlGpmMigSampleGet, gpu.handle, instance.gpu_instance_id)
            reading.sm_active = self._gpm_metrics(instance.gpm, take)["sm_active"]
        return reading


def _text_or_empty(value: object) -> str:
    return text(known(value, ""))


def _mark_lost(reading: GpuReading, why: NotAvailable) -> GpuReading:
    reading.status = GPU_LOST
    reading.error = why.reason
    for name in reading.measurements():
        setattr(reading, name, why)
    reading.processes = why
    reading.mig = []
    return reading
