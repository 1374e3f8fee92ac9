"""The NVML backend: the one module that calls NVML.

Everything NVML says goes through :func:`query`, which turns an ``NVMLError`` into an explicit
:class:`NotAvailable` value carrying the reason. The rest of the agent never sees a raw
``NVMLError``: it sees a number or a ``NotAvailable``, and "not available" is never
confused with zero.

The backend talks to NVML through an object with the ``pynvml`` function names
(:class:`NvmlLibrary`). In production that is the ``pynvml`` module itself; in tests, in
``gputally simulate`` and on machines without a GPU it is :class:`gputally.agent.mock.MockNVML`,
so the code below runs unchanged against both.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

import pynvml

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NotAvailable:
    """A value NVML could not give, and why ("not supported", "gpu lost", ...)."""

    reason: str
    code: int = 0

    def __bool__(self) -> bool:  # so that `if value:` never treats it as data
        return False


# The NVML return codes that mean "this GPU is gone" rather than "this one field failed".
_LOST_CODES = frozenset(
    {
        pynvml.NVML_ERROR_GPU_IS_LOST,
        pynvml.NVML_ERROR_GPU_NOT_FOUND,
        pynvml.NVML_ERROR_RESET_REQUIRED,
    }
)
# Codes that will not change while the agent runs: the call is not retried on every tick.
_PERMANENT_CODES = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)
_REASONS = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: "not supported",
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission",
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "not in this driver",
    pynvml.NVML_ERROR_GPU_IS_LOST: "gpu lost",
    pynvml.NVML_ERROR_GPU_NOT_FOUND: "gpu not found",
    pynvml.NVML_ERROR_RESET_REQUIRED: "gpu requires reset",
    pynvml.NVML_ERROR_NO_DATA: "no data yet",
    pynvml.NVML_ERROR_NOT_READY: "not ready",
    pynvml.NVML_ERROR_TIMEOUT: "timeout",
}


def reason_of(error: pynvml.NVMLError) -> NotAvailable:
    code = int(getattr(error, "value", 0) or 0)
    return NotAvailable(_REASONS.get(code, str(error).lower() or f"nvml error {code}"), code)


def query(fn: Callable[..., T], *args: Any) -> T | NotAvailable:
    """Call one NVML function; an NVML error becomes a NotAvailable."""
    try:
        return fn(*args)
    except pynvml.NVMLError as error:
        return reason_of(error)


def is_lost(value: object) -> bool:
    return isinstance(value, NotAvailable) and value.code in _LOST_CODES


class NvmlLibrary(Protocol):
    """The ``pynvml`` functions this backend calls (and that the mock implements).

    Constants, structures and ``NVMLError`` always come from the real ``pynvml`` module,
    which imports fine on machines without a driver.
    """

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlSystemGetNVMLVersion(self) -> str: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetSerial(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...
    def nvmlDeviceGetSamples(
        self, handle: Any, sampling_type: int, last_seen_us: int
    ) -> tuple[int, list[Any]]: ...
    def nvmlGpmQueryDeviceSupport(self, handle: Any) -> Any: ...
    def nvmlGpmSampleAlloc(self) -> Any: ...
    def nvmlGpmSampleFree(self, sample: Any) -> None: ...
    def nvmlGpmSampleGet(self, handle: Any, sample: Any) -> Any: ...
    def nvmlGpmMetricsGet(self, metrics_get: Any) -> Any: ...


class NvmlUnavailableError(RuntimeError):
    """NVML cannot be used at all on this machine (no driver, no library)."""


def _text(value: object) -> str:
    # pynvml returns str from most getters but bytes from char-array struct fields.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    return str(value)


@dataclass(slots=True)
class GpuInfo:
    """Identity of one GPU, read once at start."""

    index: int
    uuid: str
    serial: str
    model: str
    pci_bus_id: str
    memory_total_bytes: int | NotAvailable
    power_limit_watts: float | NotAvailable
    lost: NotAvailable | None = None


GPU_OK = "ok"
GPU_LOST = "lost"
GPU_ERROR = "error"


@dataclass(slots=True)
class GpuReading:
    """One GPU at one sampling tick. Fractions are in [0, 1]."""

    index: int
    status: str = GPU_OK
    error: str = ""
    busy: float | NotAvailable = NotAvailable("not read")
    memory_busy: float | NotAvailable = NotAvailable("not read")
    memory_used_bytes: int | NotAvailable = NotAvailable("not read")
    power_watts: float | NotAvailable = NotAvailable("not read")
    power_limit_watts: float | NotAvailable = NotAvailable("not read")
    energy_millijoules: int | NotAvailable = NotAvailable("not read")
    sm_clock_mhz: int | NotAvailable = NotAvailable("not read")
    temperature_celsius: int | NotAvailable = NotAvailable("not read")
    process_count: int | NotAvailable = NotAvailable("not read")
    process_memory_bytes: int | NotAvailable = NotAvailable("not read")
    clock_event_reasons: int | NotAvailable = NotAvailable("not read")
    sm_active: float | NotAvailable = NotAvailable("not read")
    sm_occupancy: float | NotAvailable = NotAvailable("not read")
    tensor_active: float | NotAvailable = NotAvailable("not read")
    dram_active: float | NotAvailable = NotAvailable("not read")

    def measurements(self) -> dict[str, object]:
        """Every measurement field by name (identity and status excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("index", "status", "error")
        }


# GPM metric ids read on Hopper and newer, and the reading field each one fills.
_GPM_METRICS: tuple[tuple[int, str], ...] = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "sm_active"),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "sm_occupancy"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "tensor_active"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "dram_active"),
)
# NVML needs two GPM samples at least this far apart to compute a metric.
GPM_MIN_SPACING_S = 0.1


@dataclass(slots=True)
class _Gpu:
    info: GpuInfo
    handle: Any
    # Calls that failed permanently (not supported, no permission): not repeated each tick.
    skip: dict[str, NotAvailable] = field(default_factory=dict)
    gpm: NotAvailable | None = None  # None when GPM works on this GPU
    gpm_prev: Any = None
    gpm_cur: Any = None
    gpm_prev_time: float = 0.0
    # Timestamp (µs, driver clock) of the newest utilization sample already counted.
    samples_seen_us: int = 0


class NvmlBackend:
    """Reads identity and telemetry of every GPU on this node through NVML."""

    name = "nvml"

    def __init__(
        self, lib: NvmlLibrary | None = None, *, monotonic: Callable[[], float] | None = None
    ):
        self._lib: Any = lib if lib is not None else pynvml
        self._monotonic = monotonic or time.monotonic
        self._gpus: list[_Gpu] = []
        self.driver_version = ""
        self.nvml_version = ""

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> list[GpuInfo]:
        """Initialise NVML and read the inventory. Raises NvmlUnavailableError with a
        readable message when NVML cannot be used at all."""
        try:
            self._lib.nvmlInit()
        except pynvml.NVMLError as error:
            raise NvmlUnavailableError(_init_failure_message(error)) from None
        version = query(self._lib.nvmlSystemGetDriverVersion)
        self.driver_version = "" if isinstance(version, NotAvailable) else _text(version)
        version = query(self._lib.nvmlSystemGetNVMLVersion)
        self.nvml_version = "" if isinstance(version, NotAvailable) else _text(version)
        count = query(self._lib.nvmlDeviceGetCount)
        if isinstance(count, NotAvailable):
            raise NvmlUnavailableError(f"NVML could not count the GPUs: {count.reason}")
        self._gpus = [self._open_gpu(index) for index in range(count)]
        return self.inventory()

    def close(self) -> None:
        for gpu in self._gpus:
            for sample in (gpu.gpm_prev, gpu.gpm_cur):
                if sample is not None:
                    query(self._lib.nvmlGpmSampleFree, sample)
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
        uuid = query(self._lib.nvmlDeviceGetUUID, handle)
        serial = query(self._lib.nvmlDeviceGetSerial, handle)
        name = query(self._lib.nvmlDeviceGetName, handle)
        pci = query(self._lib.nvmlDeviceGetPciInfo, handle)
        memory = query(self._lib.nvmlDeviceGetMemoryInfo, handle)
        limit = query(self._lib.nvmlDeviceGetEnforcedPowerLimit, handle)
        info = GpuInfo(
            index=index,
            uuid="" if isinstance(uuid, NotAvailable) else _text(uuid),
            serial="" if isinstance(serial, NotAvailable) else _text(serial),
            model="" if isinstance(name, NotAvailable) else _text(name),
            pci_bus_id="" if isinstance(pci, NotAvailable) else _text(pci.busId),
            memory_total_bytes=memory if isinstance(memory, NotAvailable) else int(memory.total),
            power_limit_watts=limit if isinstance(limit, NotAvailable) else limit / 1000.0,
        )
        lost = next((v for v in (uuid, name, memory) if is_lost(v)), None)
        if isinstance(lost, NotAvailable):
            info.lost = lost
        gpu = _Gpu(info=info, handle=handle)
        self._open_gpm(gpu)
        self._busy_from_samples(gpu)  # count only samples taken from now on
        return gpu

    def _open_gpm(self, gpu: _Gpu) -> None:
        support = query(self._lib.nvmlGpmQueryDeviceSupport, gpu.handle)
        if isinstance(support, NotAvailable):
            gpu.gpm = support
            return
        if not support.isSupportedDevice:
            gpu.gpm = NotAvailable("not supported on this model (GPM needs Hopper or newer)")
            return
        prev = query(self._lib.nvmlGpmSampleAlloc)
        cur = query(self._lib.nvmlGpmSampleAlloc)
        if isinstance(prev, NotAvailable) or isinstance(cur, NotAvailable):
            gpu.gpm = prev if isinstance(prev, NotAvailable) else NotAvailable("gpm alloc failed")
            return
        gpu.gpm_prev, gpu.gpm_cur = prev, cur
        # Take the first sample now, so that the first tick already has a pair to compare.
        first = query(self._lib.nvmlGpmSampleGet, gpu.handle, gpu.gpm_prev)
        if isinstance(first, NotAvailable):
            gpu.gpm = first
            return
        gpu.gpm_prev_time = self._monotonic()

    # -- sampling --------------------------------------------------------------------------

    def read(self) -> list[GpuReading]:
        """Read every GPU. A lost GPU is reported as lost; the others are unaffected."""
        return [self._read_gpu(gpu) for gpu in self._gpus]

    def _call(self, gpu: _Gpu, name: str, *args: Any) -> Any:
        skipped = gpu.skip.get(name)
        if skipped is not None:
            return skipped
        value = query(getattr(self._lib, name), gpu.handle, *args)
        if isinstance(value, NotAvailable) and value.code in _PERMANENT_CODES:
            gpu.skip[name] = value
        return value

    def _read_gpu(self, gpu: _Gpu) -> GpuReading:
        reading = GpuReading(index=gpu.info.index)
        if gpu.info.lost is not None or gpu.handle is None:
            return _mark_lost(reading, gpu.info.lost or NotAvailable("gpu lost"))
        util = self._call(gpu, "nvmlDeviceGetUtilizationRates")
        if is_lost(util):
            # Once a GPU is lost it stays lost until the driver is reset; the agent keeps
            # reporting it as lost rather than dropping it.
            gpu.info.lost = util
            return _mark_lost(reading, util)
        if isinstance(util, NotAvailable):
            reading.busy = reading.memory_busy = util
        else:
            reading.busy = util.gpu / 100.0
            reading.memory_busy = util.memory / 100.0
        # Prefer every driver sample since the last tick over the one latest sample: with a
        # 1/6 s driver period, one reading a second sees a sixth of the time.
        integrated = self._busy_from_samples(gpu)
        if integrated is not None:
            reading.busy = integrated
        memory = self._call(gpu, "nvmlDeviceGetMemoryInfo")
        reading.memory_used_bytes = memory if isinstance(memory, NotAvailable) else int(memory.used)
        power = self._call(gpu, "nvmlDeviceGetPowerUsage")
        reading.power_watts = power if isinstance(power, NotAvailable) else power / 1000.0
        limit = self._call(gpu, "nvmlDeviceGetEnforcedPowerLimit")
        reading.power_limit_watts = limit if isinstance(limit, NotAvailable) else limit / 1000.0
        energy = self._call(gpu, "nvmlDeviceGetTotalEnergyConsumption")
        reading.energy_millijoules = energy if isinstance(energy, NotAvailable) else int(energy)
        clock = self._call(gpu, "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM)
        reading.sm_clock_mhz = clock if isinstance(clock, NotAvailable) else int(clock)
        temp = self._call(gpu, "nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU)
        reading.temperature_celsius = temp if isinstance(temp, NotAvailable) else int(temp)
        procs = self._call(gpu, "nvmlDeviceGetComputeRunningProcesses")
        if isinstance(procs, NotAvailable):
            reading.process_count = reading.process_memory_bytes = procs
        else:
            reading.process_count = len(procs)
            # usedGpuMemory is None where the driver cannot attribute memory (e.g. WDDM).
            reading.process_memory_bytes = sum(int(p.usedGpuMemory or 0) for p in procs)
        reasons = self._call(gpu, "nvmlDeviceGetCurrentClocksEventReasons")
        reading.clock_event_reasons = reasons if isinstance(reasons, NotAvailable) else int(reasons)
        self._read_gpm(gpu, reading)
        values = reading.measurements().values()
        lost = next((v for v in values if is_lost(v)), None)
        if isinstance(lost, NotAvailable):
            gpu.info.lost = lost
            return _mark_lost(reading, lost)
        if all(isinstance(v, NotAvailable) for v in values):
            reading.status = GPU_ERROR
            reading.error = "no field could be read"
        return reading

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

    def _read_gpm(self, gpu: _Gpu, reading: GpuReading) -> None:
        if gpu.gpm is not None:
            for _, name in _GPM_METRICS:
                setattr(reading, name, gpu.gpm)
            return
        now = self._monotonic()
        if now - gpu.gpm_prev_time < GPM_MIN_SPACING_S:
            for _, name in _GPM_METRICS:
                setattr(reading, name, NotAvailable("gpm samples too close together"))
            return
        got = query(self._lib.nvmlGpmSampleGet, gpu.handle, gpu.gpm_cur)
        if isinstance(got, NotAvailable):
            for _, name in _GPM_METRICS:
                setattr(reading, name, got)
            return
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(_GPM_METRICS)
        request.sample1 = gpu.gpm_prev
        request.sample2 = gpu.gpm_cur
        for slot, (metric_id, _) in enumerate(_GPM_METRICS):
            request.metrics[slot].metricId = metric_id
        result = query(self._lib.nvmlGpmMetricsGet, request)
        # The newer sample becomes the baseline of the next tick.
        gpu.gpm_prev, gpu.gpm_cur = gpu.gpm_cur, gpu.gpm_prev
        gpu.gpm_prev_time = now
        for slot, (_, name) in enumerate(_GPM_METRICS):
            if isinstance(result, NotAvailable):
                setattr(reading, name, result)
                continue
            metric = result.metrics[slot]
            if metric.nvmlReturn != pynvml.NVML_SUCCESS:
                setattr(reading, name, reason_of(pynvml.NVMLError(metric.nvmlReturn)))
            else:
                setattr(reading, name, min(max(float(metric.value) / 100.0, 0.0), 1.0))


def _mark_lost(reading: GpuReading, why: NotAvailable) -> GpuReading:
    reading.status = GPU_LOST
    reading.error = why.reason
    for name in reading.measurements():
        setattr(reading, name, why)
    return reading


def _init_failure_message(error: pynvml.NVMLError) -> str:
    code = getattr(error, "value", None)
    if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return (
            "NVML library not found (libnvidia-ml.so): the NVIDIA driver is not installed "
            "or not visible to this process. On a machine without NVIDIA GPUs, use "
            "--backend mock."
        )
    if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA kernel driver is not loaded (nvidia.ko); check `lsmod | grep nvidia`."
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return "no permission to open the NVIDIA devices (/dev/nvidia*); run as a user in the video group."
    if code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return (
            "the NVML library and the kernel driver versions differ; reload the driver or reboot."
        )
    return f"NVML could not be initialised: {error}"


def gpm_sample_address(sample: Any) -> int:
    """The address an opaque GPM sample handle points at (used by the mock as a key)."""
    return int(ctypes.cast(sample, ctypes.c_void_p).value or 0)
