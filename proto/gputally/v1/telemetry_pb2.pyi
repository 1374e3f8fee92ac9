from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_STATUS_UNSPECIFIED: _ClassVar[GpuStatus]
    GPU_STATUS_OK: _ClassVar[GpuStatus]
    GPU_STATUS_LOST: _ClassVar[GpuStatus]
    GPU_STATUS_ERROR: _ClassVar[GpuStatus]
GPU_STATUS_UNSPECIFIED: GpuStatus
GPU_STATUS_OK: GpuStatus
GPU_STATUS_LOST: GpuStatus
GPU_STATUS_ERROR: GpuStatus

class AgentMessage(_message.Message):
    __slots__ = ("hello", "batch", "proof")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: ReportBatch
    proof: Proof
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[ReportBatch, _Mapping]] = ..., proof: _Optional[_Union[Proof, _Mapping]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("welcome", "ack", "challenge")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    challenge: Challenge
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., challenge: _Optional[_Union[Challenge, _Mapping]] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class Proof(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "agent_version", "backend", "driver_version", "nvml_version", "instance_id", "sample_interval_seconds", "gpus", "protocol_revision", "public_key", "report_interval_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    NVML_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_REVISION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_version: str
    backend: str
    driver_version: str
    nvml_version: str
    instance_id: int
    sample_interval_seconds: float
    gpus: _containers.RepeatedCompositeFieldContainer[GpuIdentity]
    protocol_revision: int
    public_key: bytes
    report_interval_seconds: float
    def __init__(self, node: _Optional[str] = ..., agent_version: _Optional[str] = ..., backend: _Optional[str] = ..., driver_version: _Optional[str] = ..., nvml_version: _Optional[str] = ..., instance_id: _Optional[int] = ..., sample_interval_seconds: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[GpuIdentity, _Mapping]]] = ..., protocol_revision: _Optional[int] = ..., public_key: _Optional[bytes] = ..., report_interval_seconds: _Optional[float] = ...) -> None: ...

class GpuIdentity(_message.Message):
    __slots__ = ("index", "uuid", "serial", "model", "pci_bus_id", "memory_total_bytes", "power_limit_watts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    serial: str
    model: str
    pci_bus_id: str
    memory_total_bytes: int
    power_limit_watts: float
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., serial: _Optional[str] = ..., model: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., power_limit_watts: _Optional[float] = ...) -> None: ...

class ReportBatch(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[Report]
    def __init__(self, reports: _Optional[_Iterable[_Union[Report, _Mapping]]] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("seq", "time_unix_nano", "interval_seconds", "gpus", "summary")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix_nano: int
    interval_seconds: float
    gpus: _containers.RepeatedCompositeFieldContainer[GpuSample]
    summary: SignedSummary
    def __init__(self, seq: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., interval_seconds: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ..., summary: _Optional[_Union[SignedSummary, _Mapping]] = ...) -> None: ...

class SignedSummary(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("window_start_unix_nano", "window_end_unix_nano", "gpus", "node", "chain_seq", "prev_hash", "backend", "driver_version")
    WINDOW_START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    window_start_unix_nano: int
    window_end_unix_nano: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuSummary]
    node: str
    chain_seq: int
    prev_hash: bytes
    backend: str
    driver_version: str
    def __init__(self, window_start_unix_nano: _Optional[int] = ..., window_end_unix_nano: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuSummary, _Mapping]]] = ..., node: _Optional[str] = ..., chain_seq: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., backend: _Optional[str] = ..., driver_version: _Optional[str] = ...) -> None: ...

class GpuSummary(_message.Message):
    __slots__ = ("index", "uuid", "serial", "model", "present_seconds", "allocated_seconds", "busy_seconds", "sm_active_seconds", "sm_measured_seconds", "effective_seconds", "effective_estimated_seconds", "busy_unmeasured_seconds", "energy_joules", "padding", "flagged", "attribution", "lost_seconds", "busy_missing_seconds", "allocated_missing_seconds", "shares", "memory_busy_seconds", "memory_busy_missing_seconds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRESENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SM_MEASURED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_ESTIMATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_UNMEASURED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    LOST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_MISSING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_MISSING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUSY_MISSING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    serial: str
    model: str
    present_seconds: float
    allocated_seconds: float
    busy_seconds: float
    sm_active_seconds: float
    sm_measured_seconds: float
    effective_seconds: float
    effective_estimated_seconds: float
    busy_unmeasured_seconds: float
    energy_joules: float
    padding: _containers.RepeatedCompositeFieldContainer[PaddingTotal]
    flagged: PaddingTotal
    attribution: Attribution
    lost_seconds: float
    busy_missing_seconds: float
    allocated_missing_seconds: float
    shares: _containers.RepeatedCompositeFieldContainer[GpuSummary]
    memory_busy_seconds: float
    memory_busy_missing_seconds: float
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., serial: _Optional[str] = ..., model: _Optional[str] = ..., present_seconds: _Optional[float] = ..., allocated_seconds: _Optional[float] = ..., busy_seconds: _Optional[float] = ..., sm_active_seconds: _Optional[float] = ..., sm_measured_seconds: _Optional[float] = ..., effective_seconds: _Optional[float] = ..., effective_estimated_seconds: _Optional[float] = ..., busy_unmeasured_seconds: _Optional[float] = ..., energy_joules: _Optional[float] = ..., padding: _Optional[_Iterable[_Union[PaddingTotal, _Mapping]]] = ..., flagged: _Optional[_Union[PaddingTotal, _Mapping]] = ..., attribution: _Optional[_Union[Attribution, _Mapping]] = ..., lost_seconds: _Optional[float] = ..., busy_missing_seconds: _Optional[float] = ..., allocated_missing_seconds: _Optional[float] = ..., shares: _Optional[_Iterable[_Union[GpuSummary, _Mapping]]] = ..., memory_busy_seconds: _Optional[float] = ..., memory_busy_missing_seconds: _Optional[float] = ...) -> None: ...

class PaddingTotal(_message.Message):
    __slots__ = ("rule", "seconds", "allocated_seconds", "busy_seconds", "sm_active_seconds", "effective_seconds", "effective_estimated_seconds", "busy_unmeasured_seconds", "memory_busy_seconds")
    RULE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_ESTIMATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_UNMEASURED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rule: str
    seconds: float
    allocated_seconds: float
    busy_seconds: float
    sm_active_seconds: float
    effective_seconds: float
    effective_estimated_seconds: float
    busy_unmeasured_seconds: float
    memory_busy_seconds: float
    def __init__(self, rule: _Optional[str] = ..., seconds: _Optional[float] = ..., allocated_seconds: _Optional[float] = ..., busy_seconds: _Optional[float] = ..., sm_active_seconds: _Optional[float] = ..., effective_seconds: _Optional[float] = ..., effective_estimated_seconds: _Optional[float] = ..., busy_unmeasured_seconds: _Optional[float] = ..., memory_busy_seconds: _Optional[float] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("index", "status", "busy", "memory_busy", "memory_used_bytes", "power_watts", "power_limit_watts", "energy_millijoules", "sm_clock_mhz", "temperature_celsius", "process_count", "process_memory_bytes", "clock_event_reasons", "sm_active", "sm_occupancy", "tensor_active", "dram_active", "error", "processes", "xid_events", "ecc_corrected_volatile", "ecc_uncorrected_volatile", "remapped_rows_correctable", "remapped_rows_uncorrectable", "remap_pending", "remap_failure", "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", "nvlink_tx_bytes", "nvlink_rx_bytes", "memory_clock_mhz", "memory_temperature_celsius", "attribution", "mig_enabled", "mig", "padding", "effective", "effective_estimated", "mig_slices", "totals")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUSY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MILLIJOULES_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROCESS_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLOCK_EVENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SM_OCCUPANCY_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    DRAM_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ECC_CORRECTED_VOLATILE_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_VOLATILE_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_CORRECTABLE_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_UNCORRECTABLE_FIELD_NUMBER: _ClassVar[int]
    REMAP_PENDING_FIELD_NUMBER: _ClassVar[int]
    REMAP_FAILURE_FIELD_NUMBER: _ClassVar[int]
    PCIE_TX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PCIE_RX_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NVLINK_TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    NVLINK_RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MIG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIG_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    MIG_SLICES_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    index: int
    status: GpuStatus
    busy: float
    memory_busy: float
    memory_used_bytes: int
    power_watts: float
    power_limit_watts: float
    energy_millijoules: int
    sm_clock_mhz: int
    temperature_celsius: int
    process_count: int
    process_memory_bytes: int
    clock_event_reasons: int
    sm_active: float
    sm_occupancy: float
    tensor_active: float
    dram_active: float
    error: str
    processes: _containers.RepeatedCompositeFieldContainer[ProcessSample]
    xid_events: _containers.RepeatedCompositeFieldContainer[XidEvent]
    ecc_corrected_volatile: int
    ecc_uncorrected_volatile: int
    remapped_rows_correctable: int
    remapped_rows_uncorrectable: int
    remap_pending: bool
    remap_failure: bool
    pcie_tx_bytes_per_second: float
    pcie_rx_bytes_per_second: float
    nvlink_tx_bytes: int
    nvlink_rx_bytes: int
    memory_clock_mhz: int
    memory_temperature_celsius: int
    attribution: Attribution
    mig_enabled: bool
    mig: _containers.RepeatedCompositeFieldContainer[MigSample]
    padding: _containers.RepeatedScalarFieldContainer[str]
    effective: float
    effective_estimated: bool
    mig_slices: int
    totals: GpuSummary
    def __init__(self, index: _Optional[int] = ..., status: _Optional[_Union[GpuStatus, str]] = ..., busy: _Optional[float] = ..., memory_busy: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., power_watts: _Optional[float] = ..., power_limit_watts: _Optional[float] = ..., energy_millijoules: _Optional[int] = ..., sm_clock_mhz: _Optional[int] = ..., temperature_celsius: _Optional[int] = ..., process_count: _Optional[int] = ..., process_memory_bytes: _Optional[int] = ..., clock_event_reasons: _Optional[int] = ..., sm_active: _Optional[float] = ..., sm_occupancy: _Optional[float] = ..., tensor_active: _Optional[float] = ..., dram_active: _Optional[float] = ..., error: _Optional[str] = ..., processes: _Optional[_Iterable[_Union[ProcessSample, _Mapping]]] = ..., xid_events: _Optional[_Iterable[_Union[XidEvent, _Mapping]]] = ..., ecc_corrected_volatile: _Optional[int] = ..., ecc_uncorrected_volatile: _Optional[int] = ..., remapped_rows_correctable: _Optional[int] = ..., remapped_rows_uncorrectable: _Optional[int] = ..., remap_pending: _Optional[bool] = ..., remap_failure: _Optional[bool] = ..., pcie_tx_bytes_per_second: _Optional[float] = ..., pcie_rx_bytes_per_second: _Optional[float] = ..., nvlink_tx_bytes: _Optional[int] = ..., nvlink_rx_bytes: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., memory_temperature_celsius: _Optional[int] = ..., attribution: _Optional[_Union[Attribution, _Mapping]] = ..., mig_enabled: _Optional[bool] = ..., mig: _Optional[_Iterable[_Union[MigSample, _Mapping]]] = ..., padding: _Optional[_Iterable[str]] = ..., effective: _Optional[float] = ..., effective_estimated: _Optional[bool] = ..., mig_slices: _Optional[int] = ..., totals: _Optional[_Union[GpuSummary, _Mapping]] = ...) -> None: ...

class ProcessSample(_message.Message):
    __slots__ = ("pid", "memory_bytes", "sm_util", "memory_util", "user", "command", "cgroup", "container_id", "gpu_instance_id")
    PID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SM_UTIL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTIL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    memory_bytes: int
    sm_util: float
    memory_util: float
    user: str
    command: str
    cgroup: str
    container_id: str
    gpu_instance_id: int
    def __init__(self, pid: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., sm_util: _Optional[float] = ..., memory_util: _Optional[float] = ..., user: _Optional[str] = ..., command: _Optional[str] = ..., cgroup: _Optional[str] = ..., container_id: _Optional[str] = ..., gpu_instance_id: _Optional[int] = ...) -> None: ...

class XidEvent(_message.Message):
    __slots__ = ("code", "time_unix_nano")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    code: int
    time_unix_nano: int
    def __init__(self, code: _Optional[int] = ..., time_unix_nano: _Optional[int] = ...) -> None: ...

class Attribution(_message.Message):
    __slots__ = ("source", "tenant", "job")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    source: str
    tenant: str
    job: str
    def __init__(self, source: _Optional[str] = ..., tenant: _Optional[str] = ..., job: _Optional[str] = ...) -> None: ...

class MigSample(_message.Message):
    __slots__ = ("gpu_instance_id", "compute_instance_id", "uuid", "memory_total_bytes", "memory_used_bytes", "process_count", "sm_active", "slices", "attribution")
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    SM_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    process_count: int
    sm_active: float
    slices: int
    attribution: Attribution
    def __init__(self, gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ..., uuid: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., process_count: _Optional[int] = ..., sm_active: _Optional[float] = ..., slices: _Optional[int] = ..., attribution: _Optional[_Union[Attribution, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("collector_version", "resume_after_seq", "recording", "recorded_chain_seq")
    COLLECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDING_FIELD_NUMBER: _ClassVar[int]
    RECORDED_CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    collector_version: str
    resume_after_seq: int
    recording: bool
    recorded_chain_seq: int
    def __init__(self, collector_version: _Optional[str] = ..., resume_after_seq: _Optional[int] = ..., recording: _Optional[bool] = ..., recorded_chain_seq: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("acked_seq", "rejections", "recorded_chain_seq")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    RECORDED_CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    recorded_chain_seq: int
    def __init__(self, acked_seq: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., recorded_chain_seq: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("seq", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
