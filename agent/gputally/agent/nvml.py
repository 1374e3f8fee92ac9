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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Protocol, TypeVar

import pynvml

from .attribution import (
    UNATTRIBUTED,
    Attribution,
    Attributor,
    HostProcesses,
    ProcessFacts,
    ProcessInspector,
    container_id,
)

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
    def nvmlGpmMigSampleGet(self, handle: Any, gpu_instance_id: int, sample: Any) -> Any: ...
    def nvmlDeviceGetProcessUtilization(self, handle: Any, last_seen_us: int) -> list[Any]: ...
    def nvmlDeviceGetTotalEccErrors(
        self, handle: Any, error_type: int, counter_type: int
    ) -> int: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: int) -> int: ...
    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> Any: ...
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None: ...
    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any: ...
    def nvmlEventSetFree(self, event_set: Any) -> None: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]: ...
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int: ...
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any: ...
    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int: ...
    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int: ...
    def nvmlDeviceGetAttributes(self, handle: Any) -> Any: ...


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
# NVML clock-event (throttle) reason bits, by the name we expose.
CLOCK_EVENT_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", pynvml.nvmlClocksEventReasonGpuIdle),
    ("applications_clocks_setting", pynvml.nvmlClocksEventReasonApplicationsClocksSetting),
    ("sw_power_cap", pynvml.nvmlClocksEventReasonSwPowerCap),
    ("hw_slowdown", pynvml.nvmlClocksEventReasonHwSlowdown),
    ("sync_boost", pynvml.nvmlClocksEventReasonSyncBoost),
    ("sw_thermal_slowdown", pynvml.nvmlClocksEventReasonSwThermalSlowdown),
    ("hw_thermal_slowdown", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
    ("hw_power_brake_slowdown", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown),
    ("display_clock_setting", pynvml.nvmlClocksEventReasonDisplayClockSetting),
)


def clock_event_names(mask: int) -> list[str]:
    return [name for name, bit in CLOCK_EVENT_REASONS if mask & bit]


NO_INSTANCE = 0xFFFFFFFF  # NVML's "not in a MIG instance"


@dataclass(slots=True)
class ProcessInfo:
    """A compute process on a GPU: what NVML says, plus what the host says about it."""

    pid: int
    memory_bytes: int | None
    gpu_instance_id: int = NO_INSTANCE
    sm_util: float | NotAvailable = NotAvailable("not read")
    memory_util: float | NotAvailable = NotAvailable("not read")
    user: str = ""
    command: str = ""
    cgroup: str = ""
    container_id: str = ""
    exited: bool = False  # gone between NVML's list and the host lookup


@dataclass(slots=True)
class MigReading:
    """One MIG instance of a GPU in MIG mode."""

    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    slices: int | NotAvailable
    memory_total_bytes: int | NotAvailable = NotAvailable("not read")
    memory_used_bytes: int | NotAvailable = NotAvailable("not read")
    process_count: int | NotAvailable = NotAvailable("not read")
    sm_active: float | NotAvailable = NotAvailable("not read")
    attribution: Attribution = UNATTRIBUTED  # its pod or job: instances are shared out


# GpuReading fields that are not single measurements.
STRUCTURED = ("processes", "xid_events", "attribution", "mig_enabled", "mig_slices", "mig")


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
    ecc_corrected_volatile: int | NotAvailable = NotAvailable("not read")
    ecc_uncorrected_volatile: int | NotAvailable = NotAvailable("not read")
    remapped_rows_correctable: int | NotAvailable = NotAvailable("not read")
    remapped_rows_uncorrectable: int | NotAvailable = NotAvailable("not read")
    remap_pending: bool | NotAvailable = NotAvailable("not read")
    remap_failure: bool | NotAvailable = NotAvailable("not read")
    pcie_tx_bytes_per_second: float | NotAvailable = NotAvailable("not read")
    pcie_rx_bytes_per_second: float | NotAvailable = NotAvailable("not read")
    nvlink_tx_bytes: int | NotAvailable = NotAvailable("not read")
    nvlink_rx_bytes: int | NotAvailable = NotAvailable("not read")
    memory_clock_mhz: int | NotAvailable = NotAvailable("not read")
    memory_temperature_celsius: int | NotAvailable = NotAvailable("not read")
    processes: list[ProcessInfo] | NotAvailable = NotAvailable("not read")
    xid_events: list[tuple[int, float]] = field(default_factory=list)  # (XID, unix time)
    attribution: Attribution = UNATTRIBUTED
    mig_enabled: bool = False
    # Under MIG: the GPU's compute slices, what each instance's `slices` is a part of.
    mig_slices: int | NotAvailable | None = None
    mig: list[MigReading] = field(default_factory=list)

    def measurements(self) -> dict[str, object]:
        """Every single-valued measurement by name (identity, status and lists excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("index", "status", "error", *STRUCTURED)
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
# Fields read in one nvmlDeviceGetFieldValues call, and the reading field each fills.
_FIELD_VALUES: tuple[tuple[int, str, int], ...] = (
    (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, "nvlink_tx_bytes", 1024),  # KiB counters
    (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, "nvlink_rx_bytes", 1024),
    (pynvml.NVML_FI_DEV_MEMORY_TEMP, "memory_temperature_celsius", 1),
)
# Host facts about a process are looked up again after this many seconds.
_PROCESS_FACTS_TTL_S = 60.0


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
    facts: dict[int, tuple[float, ProcessFacts | None]] = field(default_factory=dict)


class NvmlBackend:
    """Reads identity and telemetry of every GPU on this node through NVML."""

    name = "nvml"

    def __init__(
        self,
        lib: NvmlLibrary | None = None,
        *,
        monotonic: Callable[[], float] | None = None,
        clock: Callable[[], float] | None = None,
        processes: ProcessInspector | None = None,
        attributor: Attributor | None = None,
        events: str = "thread",
    ):
        if events not in ("thread", "poll", "off"):
            raise ValueError("events must be 'thread', 'poll' or 'off'")
        self._lib: Any = lib if lib is not None else pynvml
        self._monotonic = monotonic or time.monotonic
        self._clock = clock or time.time
        # A simulated library brings its simulated host (the mock's PIDs exist nowhere else).
        self._processes: ProcessInspector = (
            processes or getattr(lib, "processes", None) or HostProcesses()
        )
        self._attributor = attributor or Attributor()
        self._events_mode = events
        self._events: XidWatcher | None = None
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
        if self._events_mode != "off":
            self._events = XidWatcher(self._lib, self._gpus, clock=self._clock)
            self._events.start(thread=self._events_mode == "thread")
        return self.inventory()

    def close(self) -> None:
        if self._events is not None:
            self._events.stop()
            self._events = None
        for gpu in self._gpus:
            pairs = [gpu.gpm, *(m.gpm for m in gpu.mig)]
            for pair in pairs:
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
        pair = self._new_gpm(lambda sample: self._lib.nvmlGpmSampleGet(gpu.handle, sample))
        if isinstance(pair, NotAvailable):
            gpu.gpm_unavailable = pair
        else:
            gpu.gpm = pair

    def _open_mig(self, gpu: _Gpu) -> None:
        mode = query(self._lib.nvmlDeviceGetMigMode, gpu.handle)
        if isinstance(mode, NotAvailable) or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
            return
        gpu.mig_enabled = True
        count = query(self._lib.nvmlDeviceGetMaxMigDeviceCount, gpu.handle)
        # As many MIG devices at most as the GPU has 1g compute slices (7 on A100 and H100,
        # 4 on A30): the whole an instance's gpuInstanceSliceCount is a part of.
        gpu.mig_slices = count
        for slot in range(0 if isinstance(count, NotAvailable) else count):
            handle = query(self._lib.nvmlDeviceGetMigDeviceHandleByIndex, gpu.handle, slot)
            if isinstance(handle, NotAvailable):
                continue  # no instance in this slot
            gi = query(self._lib.nvmlDeviceGetGpuInstanceId, handle)
            ci = query(self._lib.nvmlDeviceGetComputeInstanceId, handle)
            uuid = query(self._lib.nvmlDeviceGetUUID, handle)
            attributes = query(self._lib.nvmlDeviceGetAttributes, handle)
            instance = _Mig(
                handle=handle,
                gpu_instance_id=NO_INSTANCE if isinstance(gi, NotAvailable) else int(gi),
                compute_instance_id=NO_INSTANCE if isinstance(ci, NotAvailable) else int(ci),
                uuid="" if isinstance(uuid, NotAvailable) else _text(uuid),
                slices=attributes
                if isinstance(attributes, NotAvailable)
                else int(attributes.gpuInstanceSliceCount),
            )
            if gpu.gpm is not None and instance.gpu_instance_id != NO_INSTANCE:
                pair = self._new_gpm(
                    partial(self._lib.nvmlGpmMigSampleGet, gpu.handle, instance.gpu_instance_id)
                )
                instance.gpm = None if isinstance(pair, NotAvailable) else pair
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
        if isinstance(value, NotAvailable) and value.code in _PERMANENT_CODES:
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
        if gpu.mig_enabled and isinstance(reading.busy, NotAvailable):
            # NVML refuses device-wide utilization under MIG: say so, never report 0.
            reading.busy = reading.memory_busy = NotAvailable(
                "not available under MIG (see the instances)", reading.busy.code
            )
        self._read_basics(gpu, reading)
        self._read_processes(gpu, reading)
        self._read_health(gpu, reading)
        self._read_gpm(gpu, reading)
        for instance in gpu.mig:
            reading.mig.append(self._read_mig(gpu, instance))
        if gpu.mig_enabled:
            self._attribute_mig(gpu, reading)
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
        reasons = self._call(gpu, "nvmlDeviceGetCurrentClocksEventReasons")
        reading.clock_event_reasons = reasons if isinstance(reasons, NotAvailable) else int(reasons)

    def _read_health(self, gpu: _Gpu, reading: GpuReading) -> None:
        corrected = self._call(
            gpu,
            "nvmlDeviceGetTotalEccErrors",
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        reading.ecc_corrected_volatile = (
            corrected if isinstance(corrected, NotAvailable) else int(corrected)
        )
        uncorrected = self._call(
            gpu,
            "nvmlDeviceGetTotalEccErrors",
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        reading.ecc_uncorrected_volatile = (
            uncorrected if isinstance(uncorrected, NotAvailable) else int(uncorrected)
        )
        rows = self._call(gpu, "nvmlDeviceGetRemappedRows")
        if isinstance(rows, NotAvailable):
            reading.remapped_rows_correctable = reading.remapped_rows_uncorrectable = rows
            reading.remap_pending = reading.remap_failure = rows
        else:
            reading.remapped_rows_correctable, reading.remapped_rows_uncorrectable = (
                int(rows[0]),
                int(rows[1]),
            )
            reading.remap_pending, reading.remap_failure = bool(rows[2]), bool(rows[3])
        for counter, name in (
            (pynvml.NVML_PCIE_UTIL_TX_BYTES, "pcie_tx_bytes_per_second"),
            (pynvml.NVML_PCIE_UTIL_RX_BYTES, "pcie_rx_bytes_per_second"),
        ):
            value = self._call(gpu, "nvmlDeviceGetPcieThroughput", counter)
            setattr(
                reading, name, value if isinstance(value, NotAvailable) else value * 1024.0
            )  # KiB/s
        clock = self._call(gpu, "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_MEM)
        reading.memory_clock_mhz = clock if isinstance(clock, NotAvailable) else int(clock)
        values = self._call(
            gpu, "nvmlDeviceGetFieldValues", [field_id for field_id, _, _ in _FIELD_VALUES]
        )
        for slot, (_, name, scale) in enumerate(_FIELD_VALUES):
            if isinstance(values, NotAvailable):
                setattr(reading, name, values)
                continue
            value = values[slot]
            if value.nvmlReturn != pynvml.NVML_SUCCESS:
                setattr(reading, name, reason_of(pynvml.NVMLError(value.nvmlReturn)))
            else:
                setattr(reading, name, _field_value(value) * scale)

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
        now = self._monotonic()
        alive = {p.pid for p in processes}
        for pid in list(gpu.facts):
            if pid not in alive:
                del gpu.facts[pid]
        for process in processes:
            cached = gpu.facts.get(process.pid)
            if cached is None or now - cached[0] > _PROCESS_FACTS_TTL_S or cached[1] is None:
                cached = (now, self._processes.describe(process.pid))
                gpu.facts[process.pid] = cached
            facts = cached[1]
            if facts is None:
                process.exited = True
                continue
            process.user, process.command, process.cgroup = facts.user, facts.command, facts.cgroup
            process.container_id = container_id(facts.cgroup)
        reading.processes = processes
        if gpu.mig_enabled:
            return  # attributed once its instances are (see _attribute_mig)
        reading.attribution = self._attributor.attribute(
            gpu.info.index,
            gpu.info.uuid,
            (p.cgroup for p in processes),
            (p.user for p in processes),
        )

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
        if now - pair.prev_time < GPM_MIN_SPACING_S:
            return dict.fromkeys(
                (name for _, name in _GPM_METRICS), NotAvailable("gpm samples too close together")
            )
        got = query(take, pair.cur)
        if isinstance(got, NotAvailable):
            return dict.fromkeys((name for _, name in _GPM_METRICS), got)
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
        out: dict[str, float | NotAvailable] = {}
        for slot, (_, name) in enumerate(_GPM_METRICS):
            if isinstance(result, NotAvailable):
                out[name] = result
                continue
            metric = result.metrics[slot]
            if metric.nvmlReturn != pynvml.NVML_SUCCESS:
                out[name] = reason_of(pynvml.NVMLError(metric.nvmlReturn))
            else:
                out[name] = min(max(float(metric.value) / 100.0, 0.0), 1.0)
        return out

    def _read_gpm(self, gpu: _Gpu, reading: GpuReading) -> None:
        if gpu.gpm is None:
            why = (
                gpu.gpm_unavailable
                if gpu.gpm_unavailable is not None
                else NotAvailable("gpm not available")
            )
            for _, name in _GPM_METRICS:
                setattr(reading, name, why)
            return
        for name, value in self._gpm_metrics(
            gpu.gpm, lambda s: self._lib.nvmlGpmSampleGet(gpu.handle, s)
        ).items():
            setattr(reading, name, value)

    def _attribute_mig(self, gpu: _Gpu, reading: GpuReading) -> None:
        """Each instance to its own pod or job (Kubernetes and Slurm hand out MIG instances by
        their UUIDs), then the GPU to their common owner, if they have one."""
        processes = [] if isinstance(reading.processes, NotAvailable) else reading.processes
        for instance in reading.mig:
            inside = [p for p in processes if p.gpu_instance_id == instance.gpu_instance_id]
            instance.attribution = self._attributor.attribute(
                None, instance.uuid, (p.cgroup for p in inside), (p.user for p in inside)
            )
        reading.attribution = self._attributor.attribute(
            gpu.info.index,
            gpu.info.uuid,
            (),
            (),
            instances=[m.attribution for m in reading.mig],
        )

    def _read_mig(self, gpu: _Gpu, instance: _Mig) -> MigReading:
        reading = MigReading(
            instance.gpu_instance_id, instance.compute_instance_id, instance.uuid, instance.slices
        )
        memory = self._call(gpu, "nvmlDeviceGetMemoryInfo", handle=instance.handle)
        if isinstance(memory, NotAvailable):
            reading.memory_total_bytes = reading.memory_used_bytes = memory
        else:
            reading.memory_total_bytes, reading.memory_used_bytes = (
                int(memory.total),
                int(memory.used),
            )
        procs = self._call(gpu, "nvmlDeviceGetComputeRunningProcesses", handle=instance.handle)
        reading.process_count = procs if isinstance(procs, NotAvailable) else len(procs)
        if instance.gpm is None:
            reading.sm_active = (
                gpu.gpm_unavailable
                if gpu.gpm_unavailable is not None
                else NotAvailable("gpm not available for this instance")
            )
        else:
            gi = instance.gpu_instance_id
            metrics = self._gpm_metrics(
                instance.gpm, lambda s: self._lib.nvmlGpmMigSampleGet(gpu.handle, gi, s)
            )
            reading.sm_active = metrics["sm_active"]
        return reading


def _field_value(value: Any) -> int | float:
    kind = value.valueType
    if kind == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return float(value.value.dVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return int(value.value.uiVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return int(value.value.ulVal)
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return int(value.value.sllVal)
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_INT:
        return int(value.value.siVal)
    return int(value.value.ullVal)


def handle_key(handle: Any) -> object:
    """A hashable identity for a device handle: its address for NVML's pointers."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


class XidWatcher:
    """Collects XID events (critical errors such as 79, "GPU has fallen off the bus").

    In "thread" mode a thread of its own blocks in nvmlEventSetWait, so events are taken as
    they come, whatever the sampling does; in "poll" mode the sampling tick drains them
    (used by simulations with many nodes in one process).
    """

    WAIT_MS = 500

    def __init__(self, lib: Any, gpus: list[_Gpu], *, clock: Callable[[], float]):
        self._lib = lib
        self._clock = clock
        self._handles = [g.handle for g in gpus if g.handle is not None and g.info.lost is None]
        self._by_handle = {handle_key(g.handle): g.info.index for g in gpus if g.handle is not None}
        self._pending: dict[int, list[tuple[int, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set: Any = None
        self.unavailable: NotAvailable | None = None

    def start(self, *, thread: bool) -> None:
        event_set = query(self._lib.nvmlEventSetCreate)
        if isinstance(event_set, NotAvailable):
            self.unavailable = event_set
            return
        self._set = event_set
        registered = 0
        for handle in self._handles:
            got = query(
                self._lib.nvmlDeviceRegisterEvents,
                handle,
                pynvml.nvmlEventTypeXidCriticalError,
                event_set,
            )
            registered += not isinstance(got, NotAvailable)
        if not registered:
            self.unavailable = NotAvailable("xid events not supported")
            return
        if thread:
            self._thread = threading.Thread(target=self._run, name="gputally-xid", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wait(self.WAIT_MS)

    def _wait(self, timeout_ms: int) -> bool:
        started = time.monotonic()
        try:
            data = self._lib.nvmlEventSetWait_v2(self._set, timeout_ms)
        except pynvml.NVMLError:
            # A timeout, or the driver going away. Never spin: wait out the rest of the period.
            rest = timeout_ms / 1000.0 - (time.monotonic() - started)
            if rest > 0:
                self._stop.wait(rest)
            return False
        index = self._by_handle.get(handle_key(data.device))
        if index is not None and data.eventType == pynvml.nvmlEventTypeXidCriticalError:
            with self._lock:
                self._pending.setdefault(index, []).append((int(data.eventData), self._clock()))
        return True

    def poll(self) -> None:
        if self._set is None:
            return
        for _ in range(1000):  # bounded: a storm cannot hold the tick forever
            if not self._wait(0):
                return

    def take(self, index: int) -> list[tuple[int, float]]:
        with self._lock:
            return self._pending.pop(index, [])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.WAIT_MS / 1000.0 * 4)
        if self._set is not None:
            query(self._lib.nvmlEventSetFree, self._set)
            self._set = None


def _mark_lost(reading: GpuReading, why: NotAvailable) -> GpuReading:
    reading.status = GPU_LOST
    reading.error = why.reason
    for name in reading.measurements():
        setattr(reading, name, why)
    reading.processes = why
    reading.mig = []
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
