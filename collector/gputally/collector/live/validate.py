"""What the collector refuses: the checks every Hello, Report and Summary passes before any of
it counts. Pure functions: each raises InvalidMessageError with a message for the agent's log,
or returns, and never changes anything."""

from __future__ import annotations

import math
from collections.abc import Container

from gputally.v1 import PROTOCOL_REVISION
from gputally.v1 import telemetry_pb2 as pb

MAX_NODE_NAME = 253  # a DNS name's length
MAX_INTERVAL_S = 3600.0
MAX_SUMMARY_WINDOW_S = 7 * 86400.0
# GpuSample fields that are fractions in [0, 1].
_FRACTIONS = (
    "busy",
    "memory_busy",
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_active",
    "effective",
)
# GpuSummary (and share) numbers that are seconds within the summary's window.
_WITHIN_WINDOW = (
    "present_seconds",
    "allocated_seconds",
    "busy_seconds",
    "sm_active_seconds",
    "effective_seconds",
    "lost_seconds",
    "busy_missing_seconds",
    "allocated_missing_seconds",
)


class InvalidMessageError(ValueError):
    """A hello, report or summary the collector refuses; the message says why."""


def check_hello(hello: pb.Hello) -> None:
    if not hello.node:
        raise InvalidMessageError("hello: node name is empty")
    if (
        len(hello.node) > MAX_NODE_NAME
        or not hello.node.isprintable()
        or any(c.isspace() for c in hello.node)
    ):
        raise InvalidMessageError(
            f"hello: node name {hello.node[:40]!r} is not a printable name without spaces of at most {MAX_NODE_NAME} characters"
        )
    if hello.protocol_revision < 1:
        raise InvalidMessageError(
            f"hello from {hello.node}: protocol_revision is not set; this collector speaks "
            f"gputally.v1 revision {PROTOCOL_REVISION} and accepts any revision from 1"
        )
    indices = [gpu.index for gpu in hello.gpus]
    if len(set(indices)) != len(indices):
        raise InvalidMessageError(f"hello from {hello.node}: GPU indices repeat: {sorted(indices)}")
    uuids = [gpu.uuid for gpu in hello.gpus if gpu.uuid]
    if len(set(uuids)) != len(uuids):
        raise InvalidMessageError(f"hello from {hello.node}: GPU UUIDs repeat")


def check_report(report: pb.Report, gpus: Container[int]) -> None:
    """A report of a node whose hello announced the GPU indices `gpus`."""
    if report.seq == 0:
        raise InvalidMessageError("seq must be positive")
    summary_only = not report.gpus and report.HasField("summary") and report.interval_seconds == 0
    if not summary_only and (
        not (0 < report.interval_seconds <= MAX_INTERVAL_S)
        or not math.isfinite(report.interval_seconds)
    ):
        raise InvalidMessageError(
            f"interval_seconds must be in (0, {MAX_INTERVAL_S:g}], got {report.interval_seconds!r}"
        )
    if report.time_unix_nano <= 0:
        raise InvalidMessageError("time_unix_nano must be positive")
    seen: set[int] = set()
    for sample in report.gpus:
        if sample.index not in gpus:
            raise InvalidMessageError(f"GPU index {sample.index} was not in this node's hello")
        if sample.index in seen:
            raise InvalidMessageError(f"GPU index {sample.index} appears twice")
        seen.add(sample.index)
        _check_sample(sample)


def _check_sample(sample: pb.GpuSample) -> None:
    for name in _FRACTIONS:
        if sample.HasField(name):
            value = getattr(sample, name)
            if not (0.0 <= value <= 1.0):
                raise InvalidMessageError(
                    f"GPU {sample.index}: {name} must be a fraction in [0, 1], got {value!r}"
                )
    for process in sample.processes:
        for name in ("sm_util", "memory_util"):
            if process.HasField(name) and not (0.0 <= getattr(process, name) <= 1.0):
                raise InvalidMessageError(
                    f"GPU {sample.index} pid {process.pid}: {name} must be a fraction in [0, 1]"
                )
    for instance in sample.mig:
        if instance.HasField("sm_active") and not (0.0 <= instance.sm_active <= 1.0):
            raise InvalidMessageError(
                f"GPU {sample.index} MIG {instance.gpu_instance_id}: sm_active must be a fraction"
            )
    if sample.HasField("power_watts") and not (0.0 <= sample.power_watts < 1e5):
        raise InvalidMessageError(
            f"GPU {sample.index}: power_watts out of range: {sample.power_watts!r}"
        )


def check_summary(summary: pb.Summary, gpus: Container[int]) -> None:
    """A summary of a node whose hello announced the GPU indices `gpus`: every number within
    its window, and a MIG GPU's shares adding up to it."""
    length = (summary.window_end_unix_nano - summary.window_start_unix_nano) / 1e9
    if not 0 < length <= MAX_SUMMARY_WINDOW_S:
        raise InvalidMessageError(
            f"summary window must be in (0, {MAX_SUMMARY_WINDOW_S:g}] s, got {length:g} s"
        )
    slack = length * 1.001 + 1e-6
    for gpu in summary.gpus:
        if gpu.index not in gpus:
            raise InvalidMessageError(
                f"summary: GPU index {gpu.index} was not in this node's hello"
            )
        for part, what in ((gpu, ""), *((s, f" share {k}") for k, s in enumerate(gpu.shares))):
            if part.shares and part is not gpu:
                raise InvalidMessageError(
                    f"summary GPU {gpu.index}{what}: a share cannot have shares of its own"
                )
            for name in _WITHIN_WINDOW:
                value = getattr(part, name)
                if not (0.0 <= value <= slack) or not math.isfinite(value):
                    raise InvalidMessageError(
                        f"summary GPU {gpu.index}{what}: {name} must be within the window "
                        f"({length:g} s), got {value!r}"
                    )
            if part.energy_joules < 0 or not math.isfinite(part.energy_joules):
                raise InvalidMessageError(
                    f"summary GPU {gpu.index}{what}: energy_joules must be >= 0"
                )
        held = sum(s.present_seconds for s in gpu.shares)
        if gpu.shares and abs(held - gpu.present_seconds) > 1e-6 * length + 1e-6:
            raise InvalidMessageError(
                f"summary GPU {gpu.index}: its shares hold {held:g} s, the GPU {gpu.present_seconds:g} s"
            )
