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
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: ReportBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[ReportBatch, _Mapping]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("welcome", "ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "agent_version", "backend", "driver_version", "nvml_version", "instance_id", "sample_interval_seconds", "gpus", "protocol_revision")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    NVML_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_REVISION_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_version: str
    backend: str
    driver_version: str
    nvml_version: str
    instance_id: int
    sample_interval_seconds: float
    gpus: _containers.RepeatedCompositeFieldContainer[GpuIdentity]
    protocol_revision: int
    def __init__(self, node: _Optional[str] = ..., agent_version: _Optional[str] = ..., backend: _Optional[str] = ..., driver_version: _Optional[str] = ..., nvml_version: _Optional[str] = ..., instance_id: _Optional[int] = ..., sample_interval_seconds: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[GpuIdentity, _Mapping]]] = ..., protocol_revision: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("seq", "time_unix_nano", "interval_seconds", "gpus")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix_nano: int
    interval_seconds: float
    gpus: _containers.RepeatedCompositeFieldContainer[GpuSample]
    def __init__(self, seq: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., interval_seconds: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("index", "status", "busy", "memory_busy", "memory_used_bytes", "power_watts", "power_limit_watts", "energy_millijoules", "sm_clock_mhz", "temperature_celsius", "process_count", "process_memory_bytes", "clock_event_reasons", "sm_active", "sm_occupancy", "tensor_active", "dram_active", "error")
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
    def __init__(self, index: _Optional[int] = ..., status: _Optional[_Union[GpuStatus, str]] = ..., busy: _Optional[float] = ..., memory_busy: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., power_watts: _Optional[float] = ..., power_limit_watts: _Optional[float] = ..., energy_millijoules: _Optional[int] = ..., sm_clock_mhz: _Optional[int] = ..., temperature_celsius: _Optional[int] = ..., process_count: _Optional[int] = ..., process_memory_bytes: _Optional[int] = ..., clock_event_reasons: _Optional[int] = ..., sm_active: _Optional[float] = ..., sm_occupancy: _Optional[float] = ..., tensor_active: _Optional[float] = ..., dram_active: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("collector_version", "resume_after_seq")
    COLLECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    collector_version: str
    resume_after_seq: int
    def __init__(self, collector_version: _Optional[str] = ..., resume_after_seq: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("acked_seq", "rejections")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, acked_seq: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("seq", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
