"""Telemetry depth: processes and attribution, XID events, health fields, MIG."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import pynvml
import pytest

from gputally.agent.attribution import Attributor, JobMapError, container_id, from_cgroups
from gputally.agent.readings import GPU_LOST, NO_INSTANCE, Attribution, NotAvailable
from gputally.agent.sampler import reading_to_proto
from gputally.agent.sim import scenario as scenario_mod
from gputally.agent.sim.mock import ManualClock, MockNVML, process_id

from .factories import MockNode, mock_node

POD = "3f2c1a9e-0b7d-4c55-9a3e-2f6c9d6a1c00"
NODE = f"""
[cluster]
nodes = 1
gpus_per_node = 4
gpu_model = "NVIDIA H100 80GB HBM3"
[[workload]]
gpus = 1
kind = "training"
user = "alice"
slurm_job = 4242
[[workload]]
gpus = 1
kind = "inference"
pod = "{POD}"
processes = 2
[[workload]]
gpus = 1
kind = "steady"
user = "bob"
command = "python sweep.py --lr 3e-4"
"""


def make(toml: str, **options: Any) -> tuple[MockNode, MockNVML, ManualClock]:
    """Node 0 of `toml`, opened, one second later: what its readings say."""
    node = mock_node(toml, **options)
    node.clock.advance(1.0)
    return node, node.lib, node.clock


def test_processes_carry_host_facts_and_per_process_utilization() -> None:
    backend, _, _ = make(NODE)
    training, inference, sweep, idle = backend.read()
    assert not isinstance(training.processes, NotAvailable)
    (process,) = training.processes
    assert process.pid == process_id(0, 0, -1, 0)
    assert (process.user, process.command) == ("alice", "python train.py")
    assert process.cgroup == "/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0"
    assert process.sm_util == pytest.approx(0.98) and process.gpu_instance_id == NO_INSTANCE
    assert isinstance(inference.processes, list) and len(inference.processes) == 2
    assert all(p.sm_util == pytest.approx(0.75 / 2, abs=0.01) for p in inference.processes)
    assert inference.process_count == 2
    assert (
        isinstance(sweep.processes, list)
        and sweep.processes[0].command == "python sweep.py --lr 3e-4"
    )
    assert idle.processes == [] and idle.process_count == 0


def test_gpus_are_attributed_to_slurm_jobs_and_pods_from_cgroups() -> None:
    backend, _, _ = make(NODE)
    training, inference, sweep, idle = backend.read()
    assert training.attribution == Attribution("slurm", "alice", "4242")
    assert inference.attribution == Attribution("kubernetes", "", f"pod/{POD}")
    assert isinstance(inference.processes, list) and len(inference.processes[0].container_id) == 12
    assert sweep.attribution == Attribution() and idle.attribution == Attribution()
    sample = reading_to_proto(training)
    assert (sample.attribution.source, sample.attribution.job) == ("slurm", "4242")
    assert sample.processes[0].user == "alice" and sample.processes[0].HasField("sm_util")


def test_a_static_map_beats_the_slurm_directory_which_beats_cgroups(tmp_path: Path) -> None:
    static = tmp_path / "jobs.toml"
    backend, lib, _ = make(NODE)
    uuid = lib.gpu_uuid(2)
    static.write_text(
        f'[gpus]\n"{uuid}" = "team-x/sweep-7"\n3 = {{ tenant = "reserved", job = "" }}\n'
    )
    slurm = tmp_path / "gpustat"
    slurm.mkdir()
    (slurm / "0").write_text("9999 carol\n")  # overrides the cgroup's job 4242
    (slurm / "2").write_text("1 nobody\n")  # loses to the static map
    backend, _, _ = make(NODE, static=static, slurm=slurm)
    training, inference, sweep, idle = backend.read()
    assert training.attribution == Attribution("slurm", "carol", "9999")
    assert inference.attribution.source == "kubernetes"
    assert sweep.attribution == Attribution("static", "team-x", "sweep-7")
    assert idle.attribution == Attribution("static", "reserved", "")


def test_bad_static_maps_are_explained(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gpus]\n0 = 7\n")
    with pytest.raises(JobMapError, match=r"gpus\.0: expected"):
        Attributor(bad)
    bad.write_text("gpus = 1\n")
    with pytest.raises(JobMapError, match=r"expected a \[gpus\] table"):
        Attributor(bad)
    with pytest.raises(JobMapError, match=r"nope\.toml"):
        Attributor(tmp_path / "nope.toml")


def test_cgroup_parsing() -> None:
    assert from_cgroups(["/slurm/uid_1000/job_77/step_batch/task_0"], ["dave"]) == Attribution(
        "slurm", "dave", "77"
    )
    pod = "/kubepods/burstable/pod3f2c1a9e-0b7d-4c55-9a3e-2f6c9d6a1c00/0123456789abcdef" + "0" * 48
    assert from_cgroups([pod]) == Attribution("kubernetes", "", f"pod/{POD}")
    assert container_id("/system.slice/docker-" + "ab" * 32 + ".scope") == "ab" * 6
    assert from_cgroups(["/user.slice/user-1000.slice/session-3.scope"]) == Attribution()


def test_a_process_that_exits_between_two_calls_is_kept_and_marked() -> None:
    backend, _, _ = make(NODE + '\n[[fault]]\nkind = "process_exit"\ngpu = 0\n')
    training = backend.read()[0]
    assert isinstance(training.processes, list) and training.processes[0].exited
    assert training.processes[0].user == "" and training.process_count == 1
    assert training.attribution == Attribution()  # nothing left to attribute it from


@pytest.mark.parametrize("events", ["poll", "thread"])
def test_xid_events_reach_the_reading_of_their_gpu(events: str) -> None:
    toml = (
        NODE
        + '\n[[fault]]\nkind = "xid"\ncode = 48\ngpu = 1\nat = 0.5\n[[fault]]\nkind = "gpu_lost"\ngpu = 3\nat = 0.5\n'
    )
    backend, _, _clock = make(toml, events=events)
    readings = backend.read()
    deadline = time.monotonic() + 5
    while (
        events == "thread"
        and time.monotonic() < deadline
        and not any(r.xid_events for r in readings)
    ):
        time.sleep(0.05)  # the watcher thread takes them as they come
        readings = backend.read()
    events_by_gpu = {r.index: [code for code, _ in r.xid_events] for r in readings}
    assert events_by_gpu == {0: [], 1: [48], 2: [], 3: [79]}
    assert readings[3].status == GPU_LOST
    assert [code for code, _ in backend.read()[1].xid_events] == []  # each event once
    backend.close()


def test_health_fields() -> None:
    toml = (
        NODE
        + '\n[[fault]]\nkind = "ecc_error"\ngpu = 0\ncount = 3\n[[fault]]\nkind = "ecc_error"\ngpu = 0\nuncorrectable = true\n'
    )
    backend, _, clock = make(toml)
    training, _inference, _sweep, idle = backend.read()
    assert (training.ecc_corrected_volatile, training.ecc_uncorrected_volatile) == (3, 1)
    assert (
        training.remapped_rows_uncorrectable,
        training.remap_pending,
        training.remap_failure,
    ) == (1, True, False)
    assert (idle.ecc_corrected_volatile, idle.remap_pending) == (0, False)
    assert training.pcie_tx_bytes_per_second == pytest.approx(0.98 * 1_000_000 * 1024, rel=1e-3)
    assert training.memory_clock_mhz == 2619
    assert training.memory_temperature_celsius == round(34 + 52 * 0.9)
    first = training.nvlink_tx_bytes
    clock.advance(2.0)
    later = backend.read()[0].nvlink_tx_bytes
    assert isinstance(first, int) and isinstance(later, int)
    assert later - first == pytest.approx(
        0.65 * 150e9 * 2, rel=1e-3
    )  # tensor activity x NVLink rate
    assert idle.nvlink_tx_bytes == 0


def test_pcie_cards_have_no_nvlink_and_say_so() -> None:
    backend, _, _ = make(NODE.replace("NVIDIA H100 80GB HBM3", "NVIDIA L40S"))
    reading = backend.read()[0]
    assert reading.nvlink_tx_bytes == NotAvailable("not supported", pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert isinstance(reading.memory_temperature_celsius, int)
    assert reading.mig_enabled is False and reading.mig == []


def test_mig_instances_are_reported_and_the_parent_refuses_utilization() -> None:
    toml = NODE.replace("[cluster]\n", "[cluster]\nmig_instances = 3\n")
    backend, _lib, _ = make(toml)
    training = backend.read()[0]
    assert training.mig_enabled
    assert isinstance(training.busy, NotAvailable) and "under MIG" in training.busy.reason
    assert [m.gpu_instance_id for m in training.mig] == [1, 2, 3]
    first = training.mig[0]
    assert first.uuid.startswith("MIG-") and first.slices == 2
    assert first.memory_total_bytes == 81559 * 2**20 // 3
    assert first.process_count == 1 and first.sm_active == pytest.approx(0.85)
    assert training.process_count == 3  # the parent lists every instance's processes
    assert isinstance(training.processes, list)
    assert sorted(p.gpu_instance_id for p in training.processes) == [1, 2, 3]
    assert training.sm_active == pytest.approx(0.85)  # device-level GPM still answers
    sample = reading_to_proto(training)
    assert sample.mig_enabled and len(sample.mig) == 3 and not sample.HasField("busy")


def test_mig_on_a_model_without_it_is_refused() -> None:
    with pytest.raises(scenario_mod.ScenarioError, match="does not support MIG"):
        scenario_mod.parse(
            tomllib.loads(
                NODE.replace("[cluster]\n", "[cluster]\nmig_instances = 2\n").replace(
                    "H100 80GB HBM3", "L40S"
                )
            )
        )
