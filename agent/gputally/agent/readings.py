"""What the agent reads off a node, as plain values: the types every other agent module uses.

A measurement is a number or a :class:`NotAvailable` that says why there is none ("not
supported", "gpu lost", ...): "not available" is never confused with zero, and turns into an
absent field in the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class NotAvailable:
    """A value NVML (or the host) could not give, and why."""

    reason: str
    code: int = 0

    def __bool__(self) -> bool:  # so that `if value:` never treats it as data
        return False


NOT_READ = NotAvailable("not read")


def convert(value: T | NotAvailable, fn: Callable[[T], U]) -> U | NotAvailable:
    """`fn(value)`, or the NotAvailable itself: a reading's unit conversion in one step."""
    return value if isinstance(value, NotAvailable) else fn(value)


def known(value: T | NotAvailable, default: U) -> T | U:
    """The value, or `default` where it is not available."""
    return default if isinstance(value, NotAvailable) else value


@dataclass(frozen=True, slots=True)
class Attribution:
    """Whom a GPU (or a MIG instance) is charged to."""

    source: str = ""  # "static", "slurm", "kubernetes"; "" when unattributed
    tenant: str = ""
    job: str = ""


UNATTRIBUTED = Attribution()


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What the host says about a process NVML lists by PID."""

    user: str
    command: str
    cgroup: str


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
NO_INSTANCE = 0xFFFFFFFF  # NVML's "not in a MIG instance"


@dataclass(slots=True)
class ProcessInfo:
    """A compute process on a GPU: what NVML says, plus what the host says about it."""

    pid: int
    memory_bytes: int | None
    gpu_instance_id: int = NO_INSTANCE
    sm_util: float | NotAvailable = NOT_READ
    memory_util: float | NotAvailable = NOT_READ
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
    memory_total_bytes: int | NotAvailable = NOT_READ
    memory_used_bytes: int | NotAvailable = NOT_READ
    process_count: int | NotAvailable = NOT_READ
    sm_active: float | NotAvailable = NOT_READ
    attribution: Attribution = UNATTRIBUTED  # its pod or job: instances are shared out


@dataclass(slots=True)
class GpuReading:
    """One GPU at one sampling tick. Fractions are in [0, 1]."""

    index: int
    status: str = GPU_OK
    error: str = ""
    busy: float | NotAvailable = NOT_READ
    memory_busy: float | NotAvailable = NOT_READ
    memory_used_bytes: int | NotAvailable = NOT_READ
    power_watts: float | NotAvailable = NOT_READ
    power_limit_watts: float | NotAvailable = NOT_READ
    energy_millijoules: int | NotAvailable = NOT_READ
    sm_clock_mhz: int | NotAvailable = NOT_READ
    temperature_celsius: int | NotAvailable = NOT_READ
    process_count: int | NotAvailable = NOT_READ
    process_memory_bytes: int | NotAvailable = NOT_READ
    clock_event_reasons: int | NotAvailable = NOT_READ
    sm_active: float | NotAvailable = NOT_READ
    sm_occupancy: float | NotAvailable = NOT_READ
    tensor_active: float | NotAvailable = NOT_READ
    dram_active: float | NotAvailable = NOT_READ
    ecc_corrected_volatile: int | NotAvailable = NOT_READ
    ecc_uncorrected_volatile: int | NotAvailable = NOT_READ
    remapped_rows_correctable: int | NotAvailable = NOT_READ
    remapped_rows_uncorrectable: int | NotAvailable = NOT_READ
    remap_pending: bool | NotAvailable = NOT_READ
    remap_failure: bool | NotAvailable = NOT_READ
    pcie_tx_bytes_per_second: float | NotAvailable = NOT_READ
    pcie_rx_bytes_per_second: float | NotAvailable = NOT_READ
    nvlink_tx_bytes: int | NotAvailable = NOT_READ
    nvlink_rx_bytes: int | NotAvailable = NOT_READ
    memory_clock_mhz: int | NotAvailable = NOT_READ
    memory_temperature_celsius: int | NotAvailable = NOT_READ
    processes: list[ProcessInfo] | NotAvailable = NOT_READ
    xid_events: list[tuple[int, float]] = field(default_factory=list)  # (XID, unix time)
    attribution: Attribution = UNATTRIBUTED
    mig_enabled: bool = False
    # Under MIG: the GPU's compute slices, what each instance's `slices` is a part of.
    mig_slices: int | NotAvailable | None = None
    mig: list[MigReading] = field(default_factory=list)

    def measurements(self) -> dict[str, object]:
        """Every single-valued measurement by name, as MEASUREMENTS lists them."""
        return {name: getattr(self, name) for name in MEASUREMENTS}


# GpuReading's single-valued measurements: the fields a GpuSample holds under the same names.
# Identity, status and the structured fields (lists, attribution, MIG) are not among them.
MEASUREMENTS = tuple(
    f.name
    for f in fields(GpuReading)
    if f.name
    not in (
        "index",
        "status",
        "error",
        "processes",
        "xid_events",
        "attribution",
        "mig_enabled",
        "mig_slices",
        "mig",
    )
)
