"""What simulated GPUs and workloads are like: the mock's physics.

GPU model profiles are what the mock reports for each model: memory sizes are what NVML
reports as total memory on these boards, power limits the default enforced limits of the
SXM/PCIe parts named, SM counts and clocks from NVIDIA's product briefs. Idle power matches
what the agent's effective-work estimate assumes (agent/padding.py) on purpose, so that the
estimate can be checked exactly in simulation. Workload kinds give the defaults a scenario's
``[[workload]]`` starts from (docs/scenarios.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    name: str
    memory_total_mib: int
    power_limit_watts: float
    idle_watts: float
    sm_count: int
    max_sm_clock_mhz: int
    idle_sm_clock_mhz: int
    gpm: bool  # NVML GPM (SM activity) is available on Hopper and newer
    reserved_mib: int  # memory NVML shows as used on an idle GPU
    memory_clock_mhz: int
    nvlink: bool  # SXM boards; PCIe cards such as the L40S have none
    mig: bool  # Multi-Instance GPU capable


# A data table: the entries look alike because each names every field of its model.
MODELS: dict[str, ModelProfile] = {
    p.name: p
    for p in (
        ModelProfile(
            name="NVIDIA H100 80GB HBM3",
            memory_total_mib=81559,
            power_limit_watts=700.0,
            idle_watts=70.0,
            reserved_mib=530,
            memory_clock_mhz=2619,
            nvlink=True,
            mig=True,
            sm_count=132,
            max_sm_clock_mhz=1980,
            idle_sm_clock_mhz=345,
            gpm=True,
        ),
        ModelProfile(
            name="NVIDIA H200",
            memory_total_mib=143771,
            power_limit_watts=700.0,
            idle_watts=75.0,
            reserved_mib=560,
            memory_clock_mhz=3201,
            nvlink=True,
            mig=True,
            sm_count=132,
            max_sm_clock_mhz=1980,
            idle_sm_clock_mhz=345,
            gpm=True,
        ),
        ModelProfile(
            name="NVIDIA A100-SXM4-80GB",
            memory_total_mib=81920,
            power_limit_watts=400.0,
            idle_watts=55.0,
            reserved_mib=420,
            memory_clock_mhz=1593,
            nvlink=True,
            mig=True,
            sm_count=108,
            max_sm_clock_mhz=1410,
            idle_sm_clock_mhz=210,
            gpm=False,
        ),
        ModelProfile(
            name="NVIDIA A100-SXM4-40GB",
            memory_total_mib=40960,
            power_limit_watts=400.0,
            idle_watts=52.0,
            reserved_mib=420,
            memory_clock_mhz=1215,
            nvlink=True,
            mig=True,
            sm_count=108,
            max_sm_clock_mhz=1410,
            idle_sm_clock_mhz=210,
            gpm=False,
        ),
        ModelProfile(
            name="NVIDIA L40S",
            memory_total_mib=46068,
            power_limit_watts=350.0,
            idle_watts=32.0,
            sm_count=142,
            max_sm_clock_mhz=2520,
            idle_sm_clock_mhz=210,
            gpm=False,
            reserved_mib=470,
            memory_clock_mhz=9001,
            nvlink=False,
            mig=False,
        ),
    )
}
# MIG: the most instances a GPU can be split into (1g slices).
MAX_MIG_INSTANCES = 7


@dataclass(frozen=True, slots=True)
class Load:
    """What one GPU is doing at an instant. Fractions are in [0, 1]."""

    busy: float = 0.0
    sm_active: float = 0.0
    sm_occupancy: float = 0.0
    tensor_active: float = 0.0
    dram_active: float = 0.0
    power_fraction: float | None = None  # of the power limit; None: the model's idle power
    memory_fraction: float = 0.0  # of total memory, held by the workload's processes
    processes: int = 0


IDLE = Load()

# Workload kinds and the defaults of their parameters. A periodic kind alternates between its
# load ("on", for `duty` of each `period`) and a lighter "off" load; docs/scenarios.md has the
# physics of each.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "steady": {
        "busy": 0.9,
        "sm_active": 0.5,
        "power_fraction": 0.7,
        "memory_fraction": 0.6,
        "processes": 1,
    },
    # Training: high, steady SM and tensor activity, memory near full, with a short dip for
    # evaluation/checkpointing once per period.
    "training": {
        "busy": 0.98,
        "sm_active": 0.85,
        "tensor_active": 0.65,
        "dram_active": 0.45,
        "sm_occupancy": 0.5,
        "power_fraction": 0.9,
        "memory_fraction": 0.92,
        "processes": 1,
        "period": 900.0,
        "duty": 0.98,
        "off_busy": 0.2,
        "off_sm_active": 0.05,
        "off_power_fraction": 0.3,
    },
    # Inference: bursts of requests separated by idle gaps; the server process stays resident.
    "inference": {
        "busy": 0.75,
        "sm_active": 0.35,
        "power_fraction": 0.6,
        "memory_fraction": 0.45,
        "processes": 1,
        "period": 5.0,
        "duty": 0.4,
    },
    # A square wave: full load for `duty` of each period, nothing running in between (the
    # process stays). The shape scraped gauges get wrong.
    "square": {
        "busy": 1.0,
        "sm_active": 0.6,
        "power_fraction": 0.8,
        "memory_fraction": 0.5,
        "processes": 1,
        "period": 20.0,
        "duty": 0.5,
    },
    # Burn: a spin kernel that keeps utilization.gpu near 100% while the SMs, the power and the
    # memory stay near idle. What padding looks like.
    "burn": {
        "busy": 1.0,
        "sm_active": 0.02,
        "sm_occupancy": 0.01,
        "tensor_active": 0.0,
        "dram_active": 0.01,
        "power_fraction": 0.13,
        "memory_fraction": 0.005,
        "processes": 1,
    },
    "idle": {},
}
# The command a workload's processes run, when the file does not say.
COMMANDS = {
    "steady": "python job.py",
    "training": "python train.py",
    "inference": "tritonserver --model-repository=/models",
    "square": "python bench.py",
    "burn": "gpu_burn 3600",
}
