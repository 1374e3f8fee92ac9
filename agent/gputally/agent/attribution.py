"""Who is using a GPU: process facts from the host, and the GPU's tenant and job.

NVML names the processes on a GPU by PID only. :meth:`Attributor.annotate` adds to the
backend's readings what the host knows about each (user, command line, cgroup, container) and
attributes the GPU to a tenant and a job, from the first of these that answers:

1. a static map (TOML: GPU UUID or index -> tenant/job), for fixed reservations;
2. a Slurm job-mapping directory, as written by a prolog script in the style of Princeton's
   jobstats: one file per GPU, named by its index or UUID, holding ``JOBID [USER]``;
3. the kubelet's pod resources API (a gRPC service on a Unix socket): the pod a GPU is
   allocated to, with its namespace as the tenant and its name as the job, whether or not a
   process runs on the GPU yet;
4. the cgroup of the GPU's processes: a Slurm job (``.../job_1234/...``) or a Kubernetes pod
   (``...pod<uid>...``).

A GPU in MIG mode is shared out by instance: each MIG instance is attributed the same way, by
its own UUID (the name Kubernetes device plugins and Slurm hand it out by) and its own
processes; the GPU itself goes to its instances' owner when they all have the same one, and to
nobody when they are shared: the collector's per-tenant figures leave such a GPU out, and the
instances' own series (the agent's ``gputally_mig_*``) name their owners.

Values are cut to a bounded length, and there is at most one tenant and job per GPU or MIG
instance, so the label sets that come out of attribution stay bounded by the number of devices.

When the agent runs in a container it needs the host's PID namespace (``hostPID: true``): NVML
reports host PIDs.
"""

from __future__ import annotations

import logging
import math
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
import psutil

from gputally.kubelet.v1 import podresources_pb2 as podresources
from gputally.kubelet.v1 import podresources_pb2_grpc as podresources_grpc

from .readings import (
    GPU_LOST,
    UNATTRIBUTED,
    Attribution,
    GpuInfo,
    GpuReading,
    NotAvailable,
    ProcessFacts,
    ProcessInfo,
    known,
)

log = logging.getLogger("gputally.agent")

MAX_LABEL = 128  # longest tenant/job/command kept: bounded labels, bounded messages
# Host facts about a process are looked up again after this many seconds.
PROCESS_FACTS_TTL_S = 60.0
_SLURM_JOB = re.compile(r"/job_(\d+)(?:/|$)")
_K8S_POD = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER = re.compile(
    r"(?:docker-|cri-containerd-|crio-|containerd-)?([0-9a-f]{64})(?:\.scope)?$"
)


class ProcessInspector(Protocol):
    def describe(self, pid: int) -> ProcessFacts | None:
        """Facts about a process, or None when it no longer exists."""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def container_id(cgroup: str) -> str:
    last = cgroup.rstrip("/").rsplit("/", 1)[-1]
    match = _CONTAINER.search(last)
    return match.group(1)[:12] if match else ""


def _read_cgroup(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""
    paths = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    # cgroup v2 has one line "0::/path"; under v1 the memory controller is the usual witness.
    for key in ("", "memory", "cpu,cpuacct", "devices"):
        if key in paths:
            return paths[key]
    return next(iter(paths.values()), "")


class HostProcesses:
    """Process facts from psutil and /proc: the real host."""

    def describe(self, pid: int) -> ProcessFacts | None:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                try:
                    user = process.username()
                except (psutil.AccessDenied, KeyError):
                    user = str(process.uids().real)
                try:
                    command = " ".join(process.cmdline()) or process.name()
                except psutil.AccessDenied:
                    command = process.name()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None  # exited between NVML's list and this look
        except psutil.AccessDenied:
            return ProcessFacts("", "", _read_cgroup(pid))
        return ProcessFacts(user, _cut(command), _read_cgroup(pid))


def from_cgroups(cgroups: Iterable[str], users: Iterable[str] = ()) -> Attribution:
    """A Slurm job or a Kubernetes pod named in the processes' cgroup paths."""
    user = next((u for u in users if u), "")
    for path in cgroups:
        job = _SLURM_JOB.search(path)
        if job:
            return Attribution("slurm", _cut(user), job.group(1))
        pod = _K8S_POD.search(path)
        if pod:
            return Attribution("kubernetes", "", "pod/" + pod.group(1).replace("_", "-"))
    return UNATTRIBUTED


class JobMapError(ValueError):
    pass


KUBELET_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


class PodResources:
    """Which pod each GPU is allocated to, from the kubelet's pod resources API.

    The answer is cached for `refresh` seconds: the agent asks for every GPU every second,
    the kubelet's allocations change at pod starts. A socket that does not exist (not a
    Kubernetes node) is silently no source; a kubelet that does not answer is logged once per
    distinct error and is no source until it answers again. Never raises: attribution must not
    stop sampling."""

    def __init__(
        self,
        socket: Path | str,
        *,
        refresh: float = 10.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.socket = Path(socket)
        self.refresh = refresh
        self.timeout = timeout
        self.clock = clock
        self.lists = 0  # List calls made (the cache's effect is measurable)
        self.last_error = ""
        self._by_uuid: dict[str, Attribution] = {}
        self._fetched = -math.inf
        self._channel: grpc.Channel | None = None

    def lookup(self, uuid: str) -> Attribution | None:
        now = self.clock()
        if now - self._fetched >= self.refresh:
            self._fetched = now
            self._by_uuid = self._list()
        return self._by_uuid.get(uuid)

    def _list(self) -> dict[str, Attribution]:
        if not self.socket.exists():
            return {}
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket.resolve()}")
        self.lists += 1
        try:
            response = podresources_grpc.PodResourcesListerStub(self._channel).List(
                podresources.ListPodResourcesRequest(), timeout=self.timeout
            )
        except grpc.RpcError as error:
            message = f"{error.code().name}: {error.details()}"
            if message != self.last_error:
                log.warning(
                    "kubelet pod resources unavailable",
                    extra={"kv": {"socket": str(self.socket), "error": message}},
                )
            self.last_error = message
            return {}
        self.last_error = ""
        out: dict[str, Attribution] = {}
        for pod in response.pod_resources:
            held = Attribution("kubernetes", _cut(pod.namespace), _cut(pod.name))
            for container in pod.containers:
                for device in container.devices:
                    if not device.resource_name.startswith("nvidia.com/"):
                        continue
                    for device_id in device.device_ids:
                        # "<uuid>::<n>": the n-th share of a time-sliced GPU
                        out[device_id.partition("::")[0]] = held
        return out

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class Attributor:
    """Attribution of each GPU from the sources above, in their order."""

    def __init__(
        self,
        static_map: Path | str | None = None,
        slurm_dir: Path | str | None = None,
        kubelet_socket: Path | str | None = None,
        *,
        processes: ProcessInspector | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.static: dict[str, Attribution] = load_static_map(static_map) if static_map else {}
        self.slurm_dir = Path(slurm_dir) if slurm_dir else None
        self.kubelet = PodResources(kubelet_socket) if kubelet_socket else None
        # The host the processes run on: this one, or a simulated node's.
        self.processes: ProcessInspector = processes or HostProcesses()
        self._monotonic = monotonic
        self._facts: dict[int, tuple[float, ProcessFacts | None]] = {}  # pid -> (when, facts)

    def annotate(self, inventory: Sequence[GpuInfo], readings: Sequence[GpuReading]) -> None:
        """Add the host's facts to every process of `readings` and attribute each GPU (and,
        under MIG, each instance, then the GPU by its instances)."""
        now = self._monotonic()
        alive: set[int] = set()
        for info, reading in zip(inventory, readings, strict=True):
            processes = known(reading.processes, [])
            for process in processes:
                alive.add(process.pid)
                self._describe(process, now)
            if reading.status == GPU_LOST:
                continue
            if reading.mig_enabled:
                for instance in reading.mig:
                    inside = [p for p in processes if p.gpu_instance_id == instance.gpu_instance_id]
                    instance.attribution = self.attribute(
                        None, instance.uuid, (p.cgroup for p in inside), (p.user for p in inside)
                    )
                reading.attribution = self.attribute(
                    info.index, info.uuid, (), (), instances=[m.attribution for m in reading.mig]
                )
            elif not isinstance(reading.processes, NotAvailable):
                # Only with a process list, as the cgroups are part of the answer.
                reading.attribution = self.attribute(
                    info.index,
                    info.uuid,
                    (p.cgroup for p in processes),
                    (p.user for p in processes),
                )
        for pid in [pid for pid in self._facts if pid not in alive]:
            del self._facts[pid]

    def _describe(self, process: ProcessInfo, now: float) -> None:
        cached = self._facts.get(process.pid)
        if cached is None or cached[1] is None or now - cached[0] > PROCESS_FACTS_TTL_S:
            cached = self._facts[process.pid] = (now, self.processes.describe(process.pid))
        facts = cached[1]
        if facts is None:
            process.exited = True
            return
        process.user, process.command, process.cgroup = facts.user, facts.command, facts.cgroup
        process.container_id = container_id(facts.cgroup)

    def attribute(
        self,
        index: int | None,
        uuid: str,
        cgroups: Iterable[str],
        users: Iterable[str],
        *,
        instances: Sequence[Attribution] | None = None,
    ) -> Attribution:
        """The GPU's (or, with `index` None, a MIG instance's) tenant and job. For a GPU in
        MIG mode, `instances` holds its instances' attributions: with no source naming the
        GPU itself, it is charged to its instances' owner when they all have the same one,
        and to nobody when they are shared (the instances carry their own)."""
        explicit = self._explicit(index, uuid)
        if explicit is not None:
            return explicit
        if instances is not None:
            owners = {a for a in instances if a.source}
            return owners.pop() if len(owners) == 1 else UNATTRIBUTED
        return from_cgroups(cgroups, users)

    def _explicit(self, index: int | None, uuid: str) -> Attribution | None:
        # A MIG instance is named only by its UUID: an index names the physical GPU.
        names = [n for n in (uuid, "" if index is None else str(index)) if n]
        for key in names:
            if key in self.static:
                return self.static[key]
        if self.slurm_dir is not None:
            for name in names:
                try:
                    words = (self.slurm_dir / name).read_text().split()
                except OSError:
                    continue
                if words:
                    return Attribution(
                        "slurm", _cut(words[1]) if len(words) > 1 else "", _cut(words[0])
                    )
        if self.kubelet is not None and uuid:
            return self.kubelet.lookup(uuid)
        return None


def load_static_map(path: Path | str) -> dict[str, Attribution]:
    """``[gpus]`` table: key a GPU UUID or index; value ``"tenant/job"`` or ``{tenant, job}``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise JobMapError(f"{path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise JobMapError(f"{path}: not valid TOML: {error}") from None
    table = data.get("gpus")
    if not isinstance(table, dict):
        raise JobMapError(
            f"{path}: expected a [gpus] table mapping GPU UUIDs or indices to tenant/job"
        )
    mapping = {}
    for key, value in table.items():
        if isinstance(value, str):
            tenant, _, job = value.partition("/")
        elif isinstance(value, dict) and set(value) <= {"tenant", "job"}:
            tenant, job = str(value.get("tenant", "")), str(value.get("job", ""))
        else:
            raise JobMapError(
                f'{path}: gpus.{key}: expected "tenant/job" or {{tenant = ..., job = ...}}'
            )
        mapping[str(key)] = Attribution("static", _cut(tenant), _cut(job))
    return mapping
