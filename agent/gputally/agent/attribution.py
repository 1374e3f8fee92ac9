"""Who is using a GPU: process facts from the host, and the GPU's tenant and job.

NVML names the processes on a GPU by PID only. This module adds what the host knows about each
(user, command line, cgroup, container) and attributes the GPU to a tenant and a job, from the
first of these that answers:

1. a static map (TOML: GPU UUID or index -> tenant/job), for fixed reservations;
2. a Slurm job-mapping directory, as written by a prolog script in the style of Princeton's
   jobstats: one file per GPU, named by its index or UUID, holding ``JOBID [USER]``;
3. the cgroup of the GPU's processes: a Slurm job (``.../job_1234/...``) or a Kubernetes pod
   (``...pod<uid>...``).

Values are cut to a bounded length, and there is at most one tenant and job per GPU, so the
label sets that come out of attribution stay bounded by the number of GPUs.

When the agent runs in a container it needs the host's PID namespace (``hostPID: true``): NVML
reports host PIDs.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

MAX_LABEL = 128  # longest tenant/job/command kept: bounded labels, bounded messages
_SLURM_JOB = re.compile(r"/job_(\d+)(?:/|$)")
_K8S_POD = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER = re.compile(
    r"(?:docker-|cri-containerd-|crio-|containerd-)?([0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    user: str
    command: str
    cgroup: str


@dataclass(frozen=True, slots=True)
class Attribution:
    source: str = ""  # "static", "slurm", "kubernetes"; "" when unattributed
    tenant: str = ""
    job: str = ""


UNATTRIBUTED = Attribution()


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


class Attributor:
    """Attribution of each GPU from the sources above, in their order."""

    def __init__(self, static_map: Path | str | None = None, slurm_dir: Path | str | None = None):
        self.static: dict[str, Attribution] = load_static_map(static_map) if static_map else {}
        self.slurm_dir = Path(slurm_dir) if slurm_dir else None

    def attribute(
        self, index: int, uuid: str, cgroups: Iterable[str], users: Iterable[str]
    ) -> Attribution:
        for key in (uuid, str(index)):
            if key and key in self.static:
                return self.static[key]
        if self.slurm_dir is not None:
            for name in (uuid, str(index)):
                if not name:
                    continue
                try:
                    words = (self.slurm_dir / name).read_text().split()
                except OSError:
                    continue
                if words:
                    return Attribution(
                        "slurm", _cut(words[1]) if len(words) > 1 else "", _cut(words[0])
                    )
        return from_cgroups(cgroups, users)


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
