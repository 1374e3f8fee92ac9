"""The one module that knows NVML's error model: every NVML call goes through :func:`query`.

:func:`query` turns an ``NVMLError`` into a :class:`~gputally.agent.readings.NotAvailable`
that carries the reason, so no other module ever sees a raw ``NVMLError``: it sees a number or
a NotAvailable. :class:`NvmlLibrary` is the set of ``pynvml`` functions the agent calls: in
production the ``pynvml`` module itself, in simulations and tests
:class:`gputally.agent.sim.mock.MockNVML`. Constants, structures and ``NVMLError`` always come
from the real ``pynvml``, which imports fine on machines without a driver.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import pynvml

from .readings import NotAvailable

T = TypeVar("T")

# The NVML return codes that mean "this GPU is gone" rather than "this one field failed".
_LOST_CODES = frozenset(
    {
        pynvml.NVML_ERROR_GPU_IS_LOST,
        pynvml.NVML_ERROR_GPU_NOT_FOUND,
        pynvml.NVML_ERROR_RESET_REQUIRED,
    }
)
# Codes that will not change while the agent runs: the call is not retried on every tick.
PERMANENT_CODES = frozenset(
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


def unavailable(code: int) -> NotAvailable:
    """The NotAvailable of an NVML return code found inside a structure (GPM, field values)."""
    return reason_of(pynvml.NVMLError(code))


def query(fn: Callable[..., T], *args: Any) -> T | NotAvailable:
    """Call one NVML function; an NVML error becomes a NotAvailable."""
    try:
        return fn(*args)
    except pynvml.NVMLError as error:
        return reason_of(error)


def is_lost(value: object) -> bool:
    return isinstance(value, NotAvailable) and value.code in _LOST_CODES


class NvmlLibrary(Protocol):
    """The ``pynvml`` functions the agent calls (and that the mock implements)."""

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


def init_failure_message(error: pynvml.NVMLError) -> str:
    """What to tell a person whose nvmlInit failed, and what to do about it."""
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


def text(value: object) -> str:
    """pynvml returns str from most getters but bytes from char-array struct fields."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    return str(value)


# NVML clock-event (throttle) reason bits, by the name the agent exposes.
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


def field_value(value: Any) -> int | float:
    """The number in an nvmlFieldValue_t, by its value type."""
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


def gpm_sample_address(sample: Any) -> int:
    """The address an opaque GPM sample handle points at (the mock keys its samples by it)."""
    return int(ctypes.cast(sample, ctypes.c_void_p).value or 0)
