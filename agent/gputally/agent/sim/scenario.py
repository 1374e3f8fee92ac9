"""Scenario files: a simulated cluster, what runs on it, and what goes wrong, in TOML.

A scenario says how many nodes and GPUs there are, which workloads run on which share of the
GPUs and when, and which faults happen. It drives the mock NVML library; nothing else reads it.
See ``docs/scenarios.md`` for the format and the physics of each workload kind.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .physics import COMMANDS, IDLE, KIND_DEFAULTS, MAX_MIG_INSTANCES, MODELS, Load, ModelProfile


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says where and why."""


_OFF_KEYS = {"off_busy", "off_sm_active", "off_power_fraction"}
_LOAD_KEYS = {
    "busy",
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_active",
    "power_fraction",
    "memory_fraction",
    "processes",
}
_IDENTITY_KEYS = {"user", "command", "slurm_job", "pod"}
_WORKLOAD_KEYS = (
    _LOAD_KEYS
    | _OFF_KEYS
    | _IDENTITY_KEYS
    | {"kind", "share", "gpus", "start", "end", "name", "period", "duty"}
)
FAULT_KINDS = (
    "gpu_lost",
    "unsupported",
    "no_permission",
    "no_driver",
    "node_down",
    "driver_reload",
    "xid",
    "process_exit",
    "ecc_error",
)


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    kind: str
    gpus: int
    load: Load
    start: float = 0.0  # seconds from the scenario's start
    end: float = math.inf
    period: float | None = None  # periodic kinds: on for duty x period, then `off`
    duty: float = 1.0
    off: Load = IDLE
    user: str = "svc"
    command: str = ""
    slurm_job: int | None = None  # processes run in this Slurm job's cgroup
    pod: str = ""  # or in this Kubernetes pod's (its UID)

    def active(self, t: float) -> bool:
        return self.start <= t < self.end

    def load_at(self, t: float) -> Load:
        if self.period is None:
            return self.load
        phase = ((t - self.start) % self.period) / self.period
        return self.load if phase < self.duty else self.off

    def edges(self, t0: float, t1: float) -> list[float]:
        """Times in (t0, t1) where this workload's load changes."""
        points = [edge for edge in (self.start, self.end) if t0 < edge < t1]
        if self.period is not None:
            lo, hi = max(t0, self.start), min(t1, self.end)
            k = math.floor((lo - self.start) / self.period)
            while True:
                cycle = self.start + k * self.period
                if cycle >= hi:
                    break
                for edge in (cycle, cycle + self.duty * self.period):
                    if lo < edge < hi and t0 < edge < t1:
                        points.append(edge)
                k += 1
        return points

    def overlaps(self, other: Workload) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    node: int | None = None  # None: every node
    gpu: int | None = None  # None: every GPU of the node
    at: float = 0.0
    until: float = math.inf
    function: str = ""  # for unsupported / no_permission: the pynvml function name
    code: int = 0  # xid: the XID; ecc_error: how many errors
    uncorrectable: bool = False  # ecc_error

    def hits(self, node: int, gpu: int | None = None) -> bool:
        if self.node is not None and self.node != node:
            return False
        return gpu is None or self.gpu is None or self.gpu == gpu


@dataclass(frozen=True, slots=True)
class Scenario:
    nodes: int
    gpus_per_node: int
    gpu_model: str
    workloads: tuple[Workload, ...] = ()
    faults: tuple[Fault, ...] = ()
    node_prefix: str = "node"
    mig_instances: int = 0  # > 0: every GPU runs in MIG mode, split into this many instances
    node_models: tuple[str, ...] = ()  # per node, when the cluster mixes models (pools)
    expect: tuple[dict[str, Any], ...] = ()  # the figures the scenario is written to produce
    run: dict[str, Any] = field(default_factory=dict)  # how to run it: seconds, interval, ...
    name: str = "scenario"
    description: str = ""
    # GPU (node-major position) -> workloads assigned to it, in time order.
    assignment: dict[int, tuple[Workload, ...]] = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def profile(self) -> ModelProfile:
        return MODELS[self.gpu_model]

    def model_of(self, node: int) -> str:
        return self.node_models[node] if self.node_models else self.gpu_model

    def profile_of(self, node: int) -> ModelProfile:
        return MODELS[self.model_of(node)]

    def node_name(self, node: int) -> str:
        width = max(2, len(str(self.nodes - 1)))
        return f"{self.node_prefix}-{node:0{width}d}"

    def workloads_of(self, node: int, gpu: int) -> tuple[Workload, ...]:
        return self.assignment.get(node * self.gpus_per_node + gpu, ())

    def workload_at(self, node: int, gpu: int, t: float) -> Workload | None:
        t = max(t, 0.0)
        return next((w for w in self.workloads_of(node, gpu) if w.active(t)), None)

    def load_at(self, node: int, gpu: int, t: float) -> Load:
        # Before the scenario starts the cluster is as it is at its start: a job that runs
        # at t=0 was already running when the agent came up.
        t = max(t, 0.0)
        for workload in self.workloads_of(node, gpu):
            if workload.active(t):
                return workload.load_at(t)
        return IDLE

    def breakpoints(self, node: int, gpu: int, t0: float, t1: float) -> list[float]:
        """Times in (t0, t1) where this GPU's load changes: integrals are exact between them."""
        points = {edge for w in self.workloads_of(node, gpu) for edge in w.edges(max(t0, 0.0), t1)}
        return sorted(points)


def _number(value: Any, where: str, *, low: float | None = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ScenarioError(f"{where}: must be finite, got {value!r}")
    if low is not None and number < low:
        raise ScenarioError(f"{where}: must be >= {low:g}, got {value!r}")
    if high is not None and number > high:
        raise ScenarioError(f"{where}: must be <= {high:g}, got {value!r}")
    return number


def _integer(value: Any, where: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}: expected an integer, got {value!r}")
    if value < low:
        raise ScenarioError(f"{where}: must be >= {low}, got {value!r}")
    return value


def _unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ScenarioError(
            f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}"
        )


def _parse_workload(index: int, raw: Any, total: int) -> Workload:
    where = f"workload[{index}]"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a table")
    _unknown(raw, _WORKLOAD_KEYS, where)
    kind = raw.get("kind", "steady")
    if kind not in KIND_DEFAULTS:
        raise ScenarioError(
            f"{where}.kind: unknown kind {kind!r}; known: {', '.join(KIND_DEFAULTS)}"
        )
    if ("share" in raw) == ("gpus" in raw):
        raise ScenarioError(
            f"{where}: give exactly one of `share` (a fraction) or `gpus` (a count)"
        )
    if "share" in raw:
        share = _number(raw["share"], f"{where}.share", high=1.0)
        count = round(share * total)
    else:
        count = _integer(raw["gpus"], f"{where}.gpus")
    load, off, period, duty = _parse_load(where, kind, raw)
    start = _number(raw.get("start", 0.0), f"{where}.start")
    end = _number(raw["end"], f"{where}.end") if "end" in raw else math.inf
    if end <= start:
        raise ScenarioError(f"{where}: end ({end:g}) must be after start ({start:g})")
    slurm_job, pod = _parse_identity(where, raw)
    return Workload(
        name=str(raw.get("name", f"{kind}-{index}")),
        kind=kind,
        gpus=count,
        load=load,
        start=start,
        end=end,
        period=period,
        duty=duty,
        off=off,
        user=str(raw.get("user", "svc")),
        command=str(raw.get("command", COMMANDS.get(kind, ""))),
        slurm_job=slurm_job,
        pod=pod,
    )


def _parse_load(
    where: str, kind: str, raw: dict[str, Any]
) -> tuple[Load, Load, float | None, float]:
    """A workload's load and, for a periodic kind, its off load, period and duty."""
    params = dict(KIND_DEFAULTS[kind])
    params.update(
        {k: v for k, v in raw.items() if k in _LOAD_KEYS | _OFF_KEYS | {"period", "duty"}}
    )
    period = params.pop("period", None)
    duty = params.pop("duty", 1.0)
    off_params = {
        key.removeprefix("off_"): params.pop(key) for key in list(params) if key in _OFF_KEYS
    }
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key == "processes":
            values[key] = _integer(value, f"{where}.processes")
        else:
            values[key] = _number(value, f"{where}.{key}", high=1.0)
    if kind != "idle":
        # Defaults that follow from the given SM activity, so a file need not spell them out.
        sm = values.get("sm_active", 0.0)
        values.setdefault("sm_occupancy", sm * 0.5)
        values.setdefault("tensor_active", sm * 0.5)
        values.setdefault("dram_active", sm * 0.4)
        if values.get("sm_active", 0.0) > values.get("busy", 0.0) + 1e-9:
            raise ScenarioError(
                f"{where}: sm_active ({values['sm_active']}) cannot exceed busy ({values['busy']}): "
                "an SM can only be active while a kernel runs"
            )
    if period is not None:
        period = _number(period, f"{where}.period")
        if period <= 0:
            raise ScenarioError(f"{where}.period: must be > 0")
    duty = _number(duty, f"{where}.duty", high=1.0)
    # Off phase: the process stays (allocated, memory held); the kernels stop unless the
    # kind says otherwise (training's evaluation dip).
    off = Load(
        busy=_number(off_params.get("busy", 0.0), f"{where}.off_busy", high=1.0),
        sm_active=_number(off_params.get("sm_active", 0.0), f"{where}.off_sm_active", high=1.0),
        power_fraction=(
            _number(off_params["power_fraction"], f"{where}.off_power_fraction", high=1.0)
            if "power_fraction" in off_params
            else None
        ),
        memory_fraction=values.get("memory_fraction", 0.0),
        processes=values.get("processes", 0),
    )
    return Load(**values), off, period, duty


def _parse_identity(where: str, raw: dict[str, Any]) -> tuple[int | None, str]:
    """Where a workload's processes run: a Slurm job, or a Kubernetes pod (its UID)."""
    slurm_job = (
        _integer(raw["slurm_job"], f"{where}.slurm_job", low=1) if "slurm_job" in raw else None
    )
    pod = str(raw.get("pod", ""))
    if pod and not re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", pod
    ):
        raise ScenarioError(
            f"{where}.pod: expected a pod UID such as 3f2c1a9e-0b7d-4c55-9a3e-2f6c9d6a1c00"
        )
    if slurm_job and pod:
        raise ScenarioError(f"{where}: a process runs in a Slurm job or in a pod, not both")
    return slurm_job, pod


def _parse_fault(index: int, raw: Any, nodes: int, gpus_per_node: int) -> Fault:
    where = f"fault[{index}]"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a table")
    _unknown(
        raw,
        {"kind", "node", "gpu", "at", "until", "function", "code", "count", "uncorrectable"},
        where,
    )
    kind = raw.get("kind")
    if kind not in FAULT_KINDS:
        raise ScenarioError(f"{where}.kind: expected one of {', '.join(FAULT_KINDS)}, got {kind!r}")
    node = _integer(raw["node"], f"{where}.node") if "node" in raw else None
    gpu = _integer(raw["gpu"], f"{where}.gpu") if "gpu" in raw else None
    if node is not None and node >= nodes:
        raise ScenarioError(f"{where}.node: {node} is out of range (the cluster has {nodes} nodes)")
    if gpu is not None and gpu >= gpus_per_node:
        raise ScenarioError(f"{where}.gpu: {gpu} is out of range ({gpus_per_node} GPUs per node)")
    function = str(raw.get("function", ""))
    if kind in ("unsupported", "no_permission") and not function.startswith("nvml"):
        raise ScenarioError(
            f"{where}.function: name the pynvml function, e.g. 'nvmlDeviceGetPowerUsage'"
        )
    at = _number(raw.get("at", 0.0), f"{where}.at")
    until = _number(raw["until"], f"{where}.until") if "until" in raw else math.inf
    if until <= at:
        raise ScenarioError(f"{where}: until ({until:g}) must be after at ({at:g})")
    code = 0
    if kind == "xid":
        code = _integer(raw.get("code"), f"{where}.code", low=1)
    elif kind == "ecc_error":
        code = _integer(raw.get("count", 1), f"{where}.count", low=1)
    uncorrectable = bool(raw.get("uncorrectable", False))
    return Fault(
        kind=kind,
        node=node,
        gpu=gpu,
        at=at,
        until=until,
        function=function,
        code=code,
        uncorrectable=uncorrectable,
    )


def _assign(workloads: list[Workload], total: int) -> dict[int, tuple[Workload, ...]]:
    """Give each workload the lowest-numbered GPUs (node-major) free during its whole time."""
    taken: dict[int, list[Workload]] = {}
    for index, workload in enumerate(workloads):
        chosen = [
            gpu
            for gpu in range(total)
            if not any(other.overlaps(workload) for other in taken.get(gpu, ()))
        ][: workload.gpus]
        if len(chosen) < workload.gpus:
            raise ScenarioError(
                f"workload[{index}] ({workload.name}) needs {workload.gpus} GPUs but only "
                f"{len(chosen)} of {total} are free while it runs"
            )
        for gpu in chosen:
            taken.setdefault(gpu, []).append(workload)
    return {gpu: tuple(sorted(ws, key=lambda w: w.start)) for gpu, ws in taken.items()}


def parse(data: dict[str, Any], *, name: str = "scenario") -> Scenario:
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        raise ScenarioError("missing [cluster] table (nodes, gpus_per_node, gpu_model)")
    _unknown(
        data, {"cluster", "workload", "fault", "description", "name", "expect", "run"}, "scenario"
    )
    _unknown(
        cluster,
        {"nodes", "gpus_per_node", "gpu_model", "node_prefix", "mig_instances", "pool"},
        "cluster",
    )
    gpus_per_node = _integer(cluster.get("gpus_per_node"), "cluster.gpus_per_node", low=1)
    model = cluster.get("gpu_model", "NVIDIA H100 80GB HBM3")
    if model not in MODELS:
        raise ScenarioError(
            f"cluster.gpu_model: unknown model {model!r}; known: {', '.join(MODELS)}"
        )
    node_models: list[str] = []
    pools = cluster.get("pool", [])
    if not isinstance(pools, list):
        raise ScenarioError(
            "cluster.pool: expected an array of tables [[cluster.pool]] (nodes, gpu_model)"
        )
    for i, pool in enumerate(pools):
        where = f"cluster.pool[{i}]"
        if not isinstance(pool, dict):
            raise ScenarioError(f"{where}: expected a table")
        _unknown(pool, {"nodes", "gpu_model"}, where)
        pool_model = pool.get("gpu_model")
        if pool_model not in MODELS:
            raise ScenarioError(
                f"{where}.gpu_model: unknown model {pool_model!r}; known: {', '.join(MODELS)}"
            )
        node_models += [pool_model] * _integer(pool.get("nodes"), f"{where}.nodes", low=1)
    if node_models:
        model = node_models[0]
        if "nodes" in cluster and cluster["nodes"] != len(node_models):
            raise ScenarioError(
                f"cluster.nodes ({cluster['nodes']}) differs from the pools' {len(node_models)} nodes"
            )
        nodes = len(node_models)
    else:
        nodes = _integer(cluster.get("nodes"), "cluster.nodes", low=1)
    mig = _integer(cluster.get("mig_instances", 0), "cluster.mig_instances")
    if mig > MAX_MIG_INSTANCES:
        raise ScenarioError(f"cluster.mig_instances: at most {MAX_MIG_INSTANCES}, got {mig}")
    for each in set(node_models) or {model}:
        if mig and not MODELS[each].mig:
            raise ScenarioError(f"cluster.mig_instances: {each} does not support MIG")
    expect = data.get("expect", [])
    if not isinstance(expect, list) or not all(isinstance(e, dict) for e in expect):
        raise ScenarioError("expect: expected an array of tables [[expect]]")
    total = nodes * gpus_per_node
    raw_workloads = data.get("workload", [])
    raw_faults = data.get("fault", [])
    if not isinstance(raw_workloads, list) or not isinstance(raw_faults, list):
        raise ScenarioError("workloads and faults are arrays of tables: [[workload]], [[fault]]")
    workloads = [_parse_workload(i, w, total) for i, w in enumerate(raw_workloads)]
    faults = [_parse_fault(i, f, nodes, gpus_per_node) for i, f in enumerate(raw_faults)]
    return Scenario(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_model=model,
        workloads=tuple(workloads),
        faults=tuple(faults),
        node_prefix=str(cluster.get("node_prefix", "node")),
        node_models=tuple(node_models),
        expect=tuple(expect),
        run=dict(data.get("run", {})),
        mig_instances=mig,
        name=str(data.get("name", name)),
        description=str(data.get("description", "")),
        assignment=_assign(workloads, total),
    )


def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path}: not valid TOML: {error}") from None
    try:
        return parse(data, name=path.stem)
    except ScenarioError as error:
        raise ScenarioError(f"{path}: {error}") from None


# The scenario used when none is given (also the README's example): 4 nodes x 8 H100, half busy.
DEFAULT_TOML = """\
# 4 nodes x 8 GPUs; half of the GPUs run a steady job, the rest are idle
[cluster]
nodes = 4
gpus_per_node = 8
gpu_model = "NVIDIA H100 80GB HBM3"

[[workload]]
share = 0.5            # fraction of the cluster's GPUs (or: gpus = 16, an exact count)
kind = "steady"
busy = 0.9             # NVML utilization.gpu, as a fraction
sm_active = 0.6        # SM activity, as a fraction
power_fraction = 0.8   # of the power limit
"""


def default() -> Scenario:
    return parse(tomllib.loads(DEFAULT_TOML), name="default")


def load_scenario(path: str | Path | None) -> Scenario:
    """The scenario file at `path`, or the built-in default without one."""
    return load(path) if path else default()
