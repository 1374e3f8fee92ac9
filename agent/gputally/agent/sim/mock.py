"""A fake of the ``pynvml`` functions the NVML backend calls, driven by a scenario and a clock.

``MockNVML`` plays one node of a :class:`~gputally.agent.sim.scenario.Scenario`. It returns
the same shapes as ``pynvml`` (objects with the same attribute names, bytes where NVML structs
hold char arrays, integer percentages) and raises the real ``pynvml.NVMLError`` subclasses, so
that :class:`~gputally.agent.backend.NvmlBackend` runs unchanged against it. It is a
first-class backend: ``gputally agent --backend mock`` and ``gputally simulate`` use it on
machines with no GPU at all. ``MockProcesses`` is the simulated host's view of its processes,
which the agent's attribution reads as it reads the real host's.

The module is longer than most because it is one fake of one library: every function of
``NvmlLibrary`` is here, next to the fault injection they all share.

Time-averaged readings are exact. The driver samples utilization every 1/6 s (NVML's
documented period is 1/6 s to 1 s depending on the product); ``utilization.gpu`` is the latest
such sample, and ``nvmlDeviceGetSamples`` returns the buffer of them. GPM metrics are the mean
between the two GPM samples, and the energy counter is the exact integral of power.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

import pynvml

from ..nvml import gpm_sample_address
from ..readings import ProcessFacts
from .physics import MAX_MIG_INSTANCES, Load
from .scenario import Scenario

Clock = Callable[[], float]

# The driver's utilization sampling period, and how many samples its ring buffer keeps.
UTILIZATION_PERIOD_S = 1.0 / 6.0
SAMPLE_BUFFER = 120
# Typical PCI buses of an 8-GPU HGX board, for realistic bus ids.
_PCI_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_UUID_NAMESPACE = uuid.UUID("6b1f7f2e-4d1c-4f55-9a3e-2f6c9d6a1c00")
_GPM_FIELDS = {
    pynvml.NVML_GPM_METRIC_SM_UTIL: "sm_active",
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: "sm_occupancy",
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: "tensor_active",
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: "dram_active",
}


class ManualClock:
    """A clock that only moves when told to: for tests and virtual-time simulation."""

    def __init__(self, start: float = 1_750_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, slots=True)
class MockHandle:
    """Opaque device handle, as NVML's is to its callers."""

    node: int
    index: int
    mig: int = -1  # a MIG instance's handle: the instance's slot; -1 for the physical GPU


@dataclass(slots=True)
class MockEventSet:
    gpus: set[int]
    delivered: set[tuple[int, int]]  # (fault number, gpu)


# NVLink bandwidth the mock attributes to tensor activity (collective traffic), bytes/s.
NVLINK_BYTES_PER_S = 150e9


def process_id(node: int, gpu: int, mig: int, k: int) -> int:
    """PIDs the mock gives its processes: node, GPU, MIG slot and rank are readable in it."""
    return 100_000 + node * 10_000 + gpu * 100 + (mig + 1) * 10 + k


def _decode_pid(pid: int) -> tuple[int, int, int, int]:
    rest = pid - 100_000
    return rest // 10_000, rest % 10_000 // 100, rest % 100 // 10 - 1, rest % 10


def _raise(code: int) -> None:
    raise pynvml.NVMLError(code)


@dataclass(slots=True)
class _Value:
    """NVML's value union, as the utilization samples use it (same attribute names)."""

    uiVal: int
    dVal: float = 0.0


@dataclass(slots=True)
class _Sample:
    """An nvmlSample_t. Plain attributes rather than pynvml's ctypes structure: a simulated
    fleet reads millions of them, and ctypes attribute access dominated its run time."""

    timeStamp: int
    sampleValue: _Value


class MockNVML:
    """One node's NVML, as a scenario describes it. Implements ``NvmlLibrary``."""

    driver_version = "580.95.05"
    nvml_version = "13.580.95.05"
    # What NvmlBackend.kind says, and so what every summary signs: simulated, not measured.
    PROVENANCE = "mock"

    def __init__(self, scenario: Scenario, node: int, clock: Clock, *, start: float | None = None):
        if not 0 <= node < scenario.nodes:
            raise ValueError(f"node {node} is not in the scenario (0..{scenario.nodes - 1})")
        self.scenario = scenario
        self.node = node
        self.clock = clock
        self.start = clock() if start is None else start  # scenario time 0
        self.profile = scenario.profile_of(node)
        self.initialised = False
        self.calls: Counter[str] = Counter()  # calls by function, for tests of call discipline
        self.processes = MockProcesses(self)  # the simulated host's view of the processes
        count = scenario.gpus_per_node
        self._energy_mj: list[float] = [float(self._energy_offset(i)) for i in range(count)]
        self._energy_t = [self.start] * count
        self._nvlink_kib: list[float] = [0.0] * count
        self._nvlink_t = [self.start] * count
        self._gpm_addresses = itertools.count(0x1000, 0x10)
        self._gpm_samples: dict[int, tuple[int, float] | None] = {}

    # -- scenario time and physics ---------------------------------------------------------

    def _t(self) -> float:
        return self.clock() - self.start

    def _load(self, gpu: int, t: float) -> Load:
        return self.scenario.load_at(self.node, gpu, t)

    def _power_watts(self, load: Load) -> float:
        if load.power_fraction is None:
            return self.profile.idle_watts
        return max(load.power_fraction * self.profile.power_limit_watts, self.profile.idle_watts)

    def _mean(self, gpu: int, value: Callable[[Load], float], t0: float, t1: float) -> float:
        """Exact mean of a piecewise-constant load property over [t0, t1] (scenario time)."""
        if t1 <= t0:
            return value(self._load(gpu, t1))
        edges = [t0, *self.scenario.breakpoints(self.node, gpu, t0, t1), t1]
        total = 0.0
        for a, b in itertools.pairwise(edges):
            total += value(self._load(gpu, (a + b) / 2)) * (b - a)
        return total / (t1 - t0)

    def _energy_offset(self, gpu: int) -> int:
        # A counter that did not start at zero, as on a GPU that has been up for a while.
        return 1_000_000_000 + (self.node * 131 + gpu * 17) * 1_000_000

    def gpu_uuid(self, gpu: int) -> str:
        key = f"{self.scenario.name}/{self.scenario.node_name(self.node)}/{gpu}"
        return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, key)}"

    # -- fault injection -------------------------------------------------------------------

    def _check(self, function: str, handle: MockHandle | None = None) -> None:
        """Entry of every mocked function: counts the call and applies the faults."""
        self.calls[function] += 1
        if not self.initialised:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is not None:
            self._faults(function, handle)

    def _faults(self, function: str, handle: MockHandle) -> None:
        t = self._t()
        for fault in self.scenario.faults:
            if not (fault.at <= t < fault.until and fault.hits(self.node, handle.index)):
                continue
            if fault.kind == "gpu_lost":
                _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
            if fault.kind == "unsupported" and fault.function == function:
                _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if fault.kind == "no_permission" and fault.function == function:
                _raise(pynvml.NVML_ERROR_NO_PERMISSION)

    def _gpu(self, function: str, handle: Any, *, mig_ok: bool = False) -> int:
        if not isinstance(handle, MockHandle) or handle.node != self.node:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if handle.mig >= 0 and not mig_ok:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._check(function, handle)
        return int(handle.index)

    def _not_under_mig(self) -> None:
        """What NVML answers for device-wide utilization when the GPU runs in MIG mode."""
        if self.scenario.mig_instances:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def _memory(self, gpu: int, load: Load, instances: int) -> tuple[int, int]:
        """(total, used) of one GPU, or of one of its `instances` MIG slices."""
        total = self.profile.memory_total_mib * 2**20 // instances
        reserved = self.profile.reserved_mib * 2**20 // instances
        return total, reserved + int(load.memory_fraction * (total - reserved))

    # -- system ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if any(f.kind == "no_driver" and f.hits(self.node) for f in self.scenario.faults):
            _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._check("nvmlSystemGetNVMLVersion")
        return self.nvml_version

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return self.scenario.gpus_per_node

    def nvmlDeviceGetHandleByIndex(self, index: int) -> MockHandle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < self.scenario.gpus_per_node:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        handle = MockHandle(self.node, index)
        self._check("nvmlDeviceGetHandleByIndex", handle)
        return handle

    # -- identity --------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        gpu = self._gpu("nvmlDeviceGetUUID", handle, mig_ok=True)
        if handle.mig >= 0:
            return "MIG-" + self.gpu_uuid(gpu).removeprefix("GPU-")[:-2] + f"{handle.mig:02d}"
        return self.gpu_uuid(gpu)

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        gpu = self._gpu("nvmlDeviceGetSerial", handle)
        # 13 digits like a real board's, from the same name as the UUID: two scenarios (or
        # two clusters' simulations) never give two nodes one serial
        return f"1{uuid.UUID(self.gpu_uuid(gpu).removeprefix('GPU-')).int % 10**12:012d}"

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._gpu("nvmlDeviceGetName", handle)
        return self.profile.name

    def nvmlDeviceGetPciInfo(self, handle: Any) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetPciInfo", handle)
        bus = _PCI_BUSES[gpu % len(_PCI_BUSES)] + gpu // len(_PCI_BUSES)
        # NVML's struct holds char arrays, which pynvml hands back as bytes.
        return SimpleNamespace(
            busId=f"00000000:{bus:02X}:00.0".encode(), domain=0, bus=bus, device=0
        )

    # -- telemetry -------------------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle, mig_ok=True)
        load = self._load(gpu, self._t())
        instances = self.scenario.mig_instances
        if handle.mig >= 0:
            total, used = self._memory(gpu, load, instances)
        else:
            total, used = self._memory(gpu, load, 1)
            if instances:  # the parent's used memory is the sum over its instances
                used = instances * self._memory(gpu, load, instances)[1]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def _sample_times(self, after: float, until: float) -> list[float]:
        """Scenario times of the driver's utilization samples in (after, until]."""
        first = math.floor(after / UTILIZATION_PERIOD_S + 1e-9) + 1
        last = math.floor(until / UTILIZATION_PERIOD_S + 1e-9)
        return [
            k * UTILIZATION_PERIOD_S for k in range(max(first, last - SAMPLE_BUFFER + 1), last + 1)
        ]

    def _utilization_sample(self, gpu: int, t: float, field: str = "busy") -> int:
        """The driver's sample at t: the mean over the sampling period ending at t, in %."""
        return round(100 * self._mean(gpu, attrgetter(field), t - UTILIZATION_PERIOD_S, t))

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        self._not_under_mig()
        t = self._t()
        latest = math.floor(t / UTILIZATION_PERIOD_S + 1e-9) * UTILIZATION_PERIOD_S
        return SimpleNamespace(
            gpu=self._utilization_sample(gpu, latest),
            memory=self._utilization_sample(gpu, latest, "dram_active"),
        )

    def nvmlDeviceGetSamples(
        self, handle: Any, sampling_type: int, last_seen_us: int
    ) -> tuple[int, list[Any]]:
        gpu = self._gpu("nvmlDeviceGetSamples", handle)
        self._not_under_mig()
        fields = {
            pynvml.NVML_GPU_UTILIZATION_SAMPLES: "busy",
            pynvml.NVML_MEMORY_UTILIZATION_SAMPLES: "dram_active",
        }
        if sampling_type not in fields:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        after = max(
            last_seen_us / 1e6 - self.start, self._t() - SAMPLE_BUFFER * UTILIZATION_PERIOD_S
        )
        times = self._sample_times(after, self._t())
        field = fields[sampling_type]
        # Over a stretch where the load does not change every sample is the same: integrate once.
        steady = bool(times) and not self.scenario.breakpoints(
            self.node, gpu, times[0] - UTILIZATION_PERIOD_S, times[-1]
        )
        constant = self._utilization_sample(gpu, times[-1], field) if steady else 0
        samples = []
        for t in times:
            stamp = round((self.start + t) * 1e6)
            if stamp > last_seen_us:
                value = constant if steady else self._utilization_sample(gpu, t, field)
                samples.append(_Sample(stamp, _Value(value)))
        if not samples:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)  # what NVML says when nothing is newer
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, samples

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        gpu = self._gpu("nvmlDeviceGetPowerUsage", handle)
        return round(self._power_watts(self._load(gpu, self._t())) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle)
        return round(self.profile.power_limit_watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle)
        now = self.clock()
        last = self._energy_t[gpu]
        for fault in self.scenario.faults:
            reload = self.start + fault.at
            if (
                fault.kind == "driver_reload"
                and fault.hits(self.node, gpu)
                and last < reload <= now
            ):
                # The driver reloaded: the counter restarts from zero.
                self._energy_mj[gpu], self._energy_t[gpu], last = 0.0, reload, reload
        if now > last:
            mean_watts = self._mean(gpu, self._power_watts, last - self.start, now - self.start)
            self._energy_mj[gpu] += mean_watts * (now - last) * 1000.0
            self._energy_t[gpu] = now
        return int(self._energy_mj[gpu])

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return self.profile.memory_clock_mhz  # HBM clocks stay up at idle
        if clock_type != pynvml.NVML_CLOCK_SM:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        busy = self._load(gpu, self._t()).busy > 0
        return self.profile.max_sm_clock_mhz if busy else self.profile.idle_sm_clock_mhz

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        power = self._power_watts(self._load(gpu, self._t()))
        return round(28 + 52 * power / self.profile.power_limit_watts)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        gpu = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle, mig_ok=True)
        load = self._load(gpu, self._t())
        instances = self.scenario.mig_instances
        slots = [handle.mig] if handle.mig >= 0 else (list(range(instances)) if instances else [-1])
        processes = []
        for slot in slots:
            _, used = self._memory(gpu, load, instances if slot >= 0 else 1)
            held = used - self.profile.reserved_mib * 2**20 // (instances if slot >= 0 else 1)
            for k in range(load.processes):
                processes.append(
                    SimpleNamespace(
                        pid=process_id(self.node, gpu, slot, k),
                        usedGpuMemory=held // load.processes,
                        gpuInstanceId=slot + 1 if slot >= 0 else 0xFFFFFFFF,
                        computeInstanceId=0 if slot >= 0 else 0xFFFFFFFF,
                    )
                )
        return processes

    def nvmlDeviceGetProcessUtilization(self, handle: Any, last_seen_us: int) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetProcessUtilization", handle)
        self._not_under_mig()
        t = self._t()
        load = self._load(gpu, t)
        latest = math.floor(t / UTILIZATION_PERIOD_S + 1e-9) * UTILIZATION_PERIOD_S
        stamp = round((self.start + latest) * 1e6)
        if load.processes == 0 or stamp <= last_seen_us:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)
        # Each process's share of the time kernels ran, over the last second.
        busy = self._mean(gpu, attrgetter("busy"), t - 1.0, t) / load.processes
        dram = self._mean(gpu, attrgetter("dram_active"), t - 1.0, t) / load.processes
        samples = []
        for k in range(load.processes):
            sample = pynvml.c_nvmlProcessUtilizationSample_t()
            sample.pid = process_id(self.node, gpu, -1, k)
            sample.timeStamp = stamp
            sample.smUtil = round(100 * busy)
            sample.memUtil = round(100 * dram)
            samples.append(sample)
        return samples

    # -- health ----------------------------------------------------------------------------

    def _active_faults(self, kind: str, gpu: int) -> list[Any]:
        t = self._t()
        return [
            f
            for f in self.scenario.faults
            if f.kind == kind and f.at <= t < f.until and f.hits(self.node, gpu)
        ]

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
        if counter_type != pynvml.NVML_VOLATILE_ECC:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        uncorrected = error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return sum(
            f.code for f in self._active_faults("ecc_error", gpu) if f.uncorrectable == uncorrected
        )

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        gpu = self._gpu("nvmlDeviceGetRemappedRows", handle)
        # An uncorrectable memory error remaps its row at the next reset: pending until then.
        rows = sum(1 for f in self._active_faults("ecc_error", gpu) if f.uncorrectable)
        return (0, rows, int(rows > 0), 0)

    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: int) -> int:
        gpu = self._gpu("nvmlDeviceGetPcieThroughput", handle)
        busy = self._load(gpu, self._t()).busy
        if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES:
            return round(busy * 1_000_000)  # KiB/s
        if counter == pynvml.NVML_PCIE_UTIL_RX_BYTES:
            return round(busy * 2_000_000)
        _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return 0

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> Any:
        gpu = self._gpu("nvmlDeviceGetFieldValues", handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for slot, field_id in enumerate(field_ids):
            value = values[slot]
            value.fieldId = field_id
            value.timestamp = round(self.clock() * 1e6)
            if field_id in (
                pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
            ):
                if not self.profile.nvlink:
                    value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                    continue
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                value.value.ullVal = int(self._nvlink_counter(gpu))
            elif field_id == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                power = self._power_watts(self._load(gpu, self._t()))
                value.value.uiVal = round(34 + 52 * power / self.profile.power_limit_watts)
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            value.nvmlReturn = pynvml.NVML_SUCCESS
        return values

    def _nvlink_counter(self, gpu: int) -> float:
        """Cumulative NVLink traffic in KiB, each way: collective traffic of tensor work."""
        now, last = self.clock(), self._nvlink_t[gpu]
        if now > last:
            mean = self._mean(gpu, attrgetter("tensor_active"), last - self.start, now - self.start)
            self._nvlink_kib[gpu] += mean * NVLINK_BYTES_PER_S * (now - last) / 1024
            self._nvlink_t[gpu] = now
        return self._nvlink_kib[gpu]

    # -- events ----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> MockEventSet:
        self._check("nvmlEventSetCreate")
        return MockEventSet(set(), set())

    def nvmlDeviceRegisterEvents(
        self, handle: Any, event_types: int, event_set: MockEventSet
    ) -> None:
        gpu = self._gpu("nvmlDeviceRegisterEvents", handle)
        if event_types & pynvml.nvmlEventTypeXidCriticalError:
            event_set.gpus.add(gpu)

    def nvmlEventSetWait_v2(self, event_set: MockEventSet, timeout_ms: int) -> SimpleNamespace:
        self._check("nvmlEventSetWait_v2")
        t = self._t()
        due = []
        for number, fault in enumerate(self.scenario.faults):
            code = fault.code if fault.kind == "xid" else 79 if fault.kind == "gpu_lost" else 0
            if not code or fault.at > t:
                continue
            for gpu in sorted(event_set.gpus):
                if fault.hits(self.node, gpu) and (number, gpu) not in event_set.delivered:
                    due.append((fault.at, number, gpu, code))
        if not due:
            _raise(pynvml.NVML_ERROR_TIMEOUT)  # the mock never blocks; callers must not spin
        _, number, gpu, code = min(due)
        event_set.delivered.add((number, gpu))
        return SimpleNamespace(
            device=MockHandle(self.node, gpu),
            eventType=pynvml.nvmlEventTypeXidCriticalError,
            eventData=code,
            gpuInstanceId=0xFFFFFFFF,
            computeInstanceId=0xFFFFFFFF,
        )

    def nvmlEventSetFree(self, event_set: MockEventSet) -> None:
        self._check("nvmlEventSetFree")

    # -- MIG -------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]:
        self._gpu("nvmlDeviceGetMigMode", handle)
        if not self.profile.mig:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = int(self.scenario.mig_instances > 0)
        return (mode, mode)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        self._gpu("nvmlDeviceGetMaxMigDeviceCount", handle)
        return MAX_MIG_INSTANCES if self.profile.mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> MockHandle:
        gpu = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if not 0 <= index < self.scenario.mig_instances:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)
        return MockHandle(self.node, gpu, index)

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        self._gpu("nvmlDeviceGetGpuInstanceId", handle, mig_ok=True)
        if handle.mig < 0:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(handle.mig) + 1

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        self._gpu("nvmlDeviceGetComputeInstanceId", handle, mig_ok=True)
        if handle.mig < 0:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return 0

    def nvmlDeviceGetAttributes(self, handle: Any) -> SimpleNamespace:
        self._gpu("nvmlDeviceGetAttributes", handle, mig_ok=True)
        instances = self.scenario.mig_instances if handle.mig >= 0 else 1
        slices = MAX_MIG_INSTANCES // instances if handle.mig >= 0 else MAX_MIG_INSTANCES
        return SimpleNamespace(
            multiprocessorCount=self.profile.sm_count * slices // MAX_MIG_INSTANCES,
            gpuInstanceSliceCount=slices,
            computeInstanceSliceCount=slices,
            memorySizeMB=self.profile.memory_total_mib // instances,
        )

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        gpu = self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle)
        load = self._load(gpu, self._t())
        if load.busy == 0:
            return int(pynvml.nvmlClocksEventReasonGpuIdle)
        if self._power_watts(load) >= 0.98 * self.profile.power_limit_watts:
            return int(pynvml.nvmlClocksEventReasonSwPowerCap)
        return 0

    # -- GPM (Hopper and newer) ------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: Any) -> SimpleNamespace:
        self._gpu("nvmlGpmQueryDeviceSupport", handle)
        return SimpleNamespace(version=1, isSupportedDevice=int(self.profile.gpm))

    def nvmlGpmSampleAlloc(self) -> Any:
        self._check("nvmlGpmSampleAlloc")
        address = next(self._gpm_addresses)
        self._gpm_samples[address] = None
        # An opaque pointer, as pynvml returns; it is never dereferenced.
        return ctypes.cast(ctypes.c_void_p(address), pynvml.c_nvmlGpmSample_t)

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self._check("nvmlGpmSampleFree")
        self._gpm_samples.pop(gpm_sample_address(sample), None)

    def nvmlGpmSampleGet(self, handle: Any, sample: Any) -> Any:
        gpu = self._gpu("nvmlGpmSampleGet", handle)
        address = gpm_sample_address(sample)
        if address not in self._gpm_samples:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not self.profile.gpm:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self._gpm_samples[address] = (gpu, self._t())
        return sample

    def nvmlGpmMigSampleGet(self, handle: Any, gpu_instance_id: int, sample: Any) -> Any:
        if not 1 <= gpu_instance_id <= self.scenario.mig_instances:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)
        # Every instance runs the GPU's workload, so its SM activity is the GPU's.
        return self.nvmlGpmSampleGet(handle, sample)

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        self._check("nvmlGpmMetricsGet")
        first = self._gpm_samples.get(gpm_sample_address(request.sample1))
        second = self._gpm_samples.get(gpm_sample_address(request.sample2))
        if first is None or second is None or first[0] != second[0] or second[1] <= first[1]:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        assert first is not None and second is not None
        gpu, t0, t1 = first[0], first[1], second[1]
        handle = MockHandle(self.node, gpu)
        for slot in range(request.numMetrics):
            metric = request.metrics[slot]
            name = _GPM_FIELDS.get(metric.metricId)
            try:
                self._faults("nvmlGpmMetricsGet", handle)
            except pynvml.NVMLError as error:
                metric.nvmlReturn = error.value
                continue
            if name is None:
                metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            metric.value = 100.0 * self._mean(gpu, attrgetter(name), t0, t1)
            metric.nvmlReturn = pynvml.NVML_SUCCESS
        return request


class MockProcesses:
    """Host facts for the mock's processes (user, command, cgroup), from the scenario.

    Implements ``gputally.agent.attribution.ProcessInspector``. A ``process_exit`` fault makes a GPU's processes vanish
    from the host while NVML still lists them: the race between two calls that real agents
    meet when a job ends.
    """

    def __init__(self, nvml: MockNVML):
        self.nvml = nvml

    def describe(self, pid: int) -> ProcessFacts | None:
        node, gpu, mig, _ = _decode_pid(pid)
        mock = self.nvml
        if node != mock.node or not 0 <= gpu < mock.scenario.gpus_per_node:
            return None
        t = mock._t()
        workload = mock.scenario.workload_at(node, gpu, t)
        if workload is None or mock._active_faults("process_exit", gpu):
            return None
        if workload.slurm_job:
            cgroup = f"/system.slice/slurmstepd.scope/job_{workload.slurm_job}/step_0/user/task_0"
        elif workload.pod:
            container = uuid.uuid5(_UUID_NAMESPACE, f"{workload.pod}/{gpu}/{mig}").hex * 2
            cgroup = (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                f"{workload.pod.replace('-', '_')}.slice/cri-containerd-{container}.scope"
            )
        else:
            cgroup = "/user.slice/user-1000.slice/session-1.scope"
        return ProcessFacts(user=workload.user, command=workload.command, cgroup=cgroup)
