"""The real NVML backend's code, run against the mock pynvml: fields, faults, GPM."""

from __future__ import annotations

import pynvml
import pytest

from gputally.agent.backend import NvmlBackend
from gputally.agent.nvml import NvmlUnavailableError, query
from gputally.agent.readings import GPU_LOST, GPU_OK, NotAvailable
from gputally.agent.sampler import reading_to_proto
from gputally.agent.sim.mock import ManualClock, MockNVML
from gputally.agent.sim.physics import MODELS
from gputally.v1 import telemetry_pb2 as pb

from .factories import mock_node, tick

H100 = MODELS["NVIDIA H100 80GB HBM3"]


def make(toml: str, node: int = 0) -> tuple[NvmlBackend, MockNVML, ManualClock]:
    """The backend alone, not yet opened: these tests are about what NVML gives."""
    mock = mock_node(toml, node=node, opened=False)
    return mock.backend, mock.lib, mock.clock


ONE_NODE = """
[cluster]
nodes = 1
gpus_per_node = 4
gpu_model = "NVIDIA H100 80GB HBM3"
[[workload]]
gpus = 2
kind = "steady"
busy = 0.9
sm_active = 0.6
power_fraction = 0.8
memory_fraction = 0.5
"""


def test_identity_is_read_once_with_every_field() -> None:
    backend, lib, _ = make(ONE_NODE)
    inventory = backend.open()
    assert [g.index for g in inventory] == [0, 1, 2, 3]
    first = inventory[0]
    assert first.uuid == lib.gpu_uuid(0) and first.uuid.startswith("GPU-")
    assert len({g.uuid for g in inventory}) == 4
    # 13 digits, from the same name as the UUID: unique across nodes and scenarios
    assert first.serial.isdigit() and len(first.serial) == 13
    assert len({g.serial for g in inventory}) == 4
    renamed = ONE_NODE.replace("[cluster]\n", '[cluster]\nnode_prefix = "b"\n')
    other, _, _ = make(renamed)  # another cluster's node 0
    assert other.open()[0].serial != first.serial
    assert first.model == "NVIDIA H100 80GB HBM3"
    assert first.pci_bus_id == "00000000:18:00.0"  # decoded from the bytes NVML structs hold
    assert first.memory_total_bytes == 81559 * 2**20
    assert first.power_limit_watts == 700.0
    assert backend.driver_version == "580.95.05"


def test_busy_gpu_readings_are_exact() -> None:
    backend, _, clock = make(ONE_NODE)
    backend.open()
    clock.advance(1.0)
    busy, idle = backend.read()[0], backend.read()[2]
    assert busy.status == GPU_OK
    assert busy.busy == 0.9
    assert busy.sm_active == pytest.approx(0.6)
    assert busy.sm_occupancy == pytest.approx(0.3)
    assert busy.power_watts == 560.0
    assert busy.power_limit_watts == 700.0
    reserved = H100.reserved_mib * 2**20
    held = int(0.5 * (H100.memory_total_mib * 2**20 - reserved))
    assert busy.memory_used_bytes == reserved + held
    assert busy.process_count == 1 and busy.process_memory_bytes == held
    assert busy.sm_clock_mhz == 1980
    assert busy.temperature_celsius == round(28 + 52 * 0.8)
    assert busy.clock_event_reasons == 0
    assert idle.busy == 0.0 and idle.process_count == 0 and idle.power_watts == 70.0
    assert idle.clock_event_reasons == pynvml.nvmlClocksEventReasonGpuIdle
    assert idle.sm_clock_mhz == 345


def test_energy_counter_is_the_integral_of_power() -> None:
    backend, _, clock = make(ONE_NODE)
    backend.open()
    start = backend.read()[0].energy_millijoules
    clock.advance(10.0)
    end = backend.read()[0].energy_millijoules
    assert isinstance(start, int) and isinstance(end, int)
    assert end - start == 560 * 10 * 1000  # 560 W for 10 s, in millijoules


def test_gpm_metric_is_the_mean_between_two_samples() -> None:
    toml = ONE_NODE.replace('kind = "steady"', 'kind = "steady"\nend = 0.5')
    backend, _, clock = make(toml)
    backend.open()  # first GPM sample at t=0
    clock.advance(1.0)
    reading = backend.read()[0]
    # busy with SM activity 0.6 for the first half second, idle after: the mean is 0.3
    assert reading.sm_active == pytest.approx(0.3)
    assert reading.busy == pytest.approx(
        0.45
    )  # utilization.gpu: mean over the last second, rounded %


def test_gpm_is_not_available_on_a100() -> None:
    backend, _, clock = make(ONE_NODE.replace("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"))
    backend.open()
    clock.advance(1.0)
    reading = backend.read()[0]
    assert reading.busy == 0.9
    assert isinstance(reading.sm_active, NotAvailable)
    assert "not supported on this model" in reading.sm_active.reason
    sample = reading_to_proto(reading)
    assert not sample.HasField("sm_active") and sample.HasField("busy")


def test_gpu_lost_mid_run_is_reported_lost_while_others_keep_reporting() -> None:
    backend, _, clock = make(
        ONE_NODE + '\n[[fault]]\nkind = "gpu_lost"\nnode = 0\ngpu = 1\nat = 5\n'
    )
    backend.open()
    clock.advance(1.0)
    assert [r.status for r in backend.read()] == [GPU_OK] * 4
    clock.advance(5.0)
    readings = backend.read()
    assert [r.status for r in readings] == [GPU_OK, GPU_LOST, GPU_OK, GPU_OK]
    lost = readings[1]
    assert lost.error == "gpu lost"
    assert all(isinstance(v, NotAvailable) for v in lost.measurements().values())
    assert readings[0].busy == 0.9
    sample = reading_to_proto(lost)
    assert sample.status == pb.GPU_STATUS_LOST and not sample.HasField("busy")
    clock.advance(1.0)
    assert backend.read()[1].status == GPU_LOST  # stays lost


def test_gpu_lost_before_start_stays_in_the_inventory() -> None:
    backend, _, clock = make(ONE_NODE + '\n[[fault]]\nkind = "gpu_lost"\nnode = 0\ngpu = 3\n')
    inventory = backend.open()
    assert len(inventory) == 4 and inventory[3].lost is not None
    clock.advance(1.0)
    assert backend.read()[3].status == GPU_LOST


def test_unsupported_field_is_not_available_and_not_asked_again() -> None:
    toml = ONE_NODE + '\n[[fault]]\nkind = "unsupported"\nfunction = "nvmlDeviceGetPowerUsage"\n'
    backend, lib, clock = make(toml)
    backend.open()
    clock.advance(1.0)
    first = backend.read()
    assert all(
        r.power_watts == NotAvailable("not supported", pynvml.NVML_ERROR_NOT_SUPPORTED)
        for r in first
    )
    assert first[0].busy == 0.9 and first[0].status == GPU_OK
    assert lib.calls["nvmlDeviceGetPowerUsage"] == 4  # asked once per GPU
    before = lib.calls.copy()
    clock.advance(1.0)
    backend.read()
    second = lib.calls - before
    assert second["nvmlDeviceGetPowerUsage"] == 0  # and never again
    assert second["nvmlDeviceGetUtilizationRates"] == 4
    assert second["nvmlDeviceGetClockInfo"] == 8  # SM and memory clocks, both still asked
    clock.advance(1.0)
    before = lib.calls.copy()
    backend.read()
    assert lib.calls - before == second  # the same calls every tick


def test_no_permission_on_one_field() -> None:
    toml = (
        ONE_NODE
        + '\n[[fault]]\nkind = "no_permission"\nfunction = "nvmlDeviceGetComputeRunningProcesses"\ngpu = 0\n'
    )
    backend, _, clock = make(toml)
    backend.open()
    clock.advance(1.0)
    readings = backend.read()
    assert readings[0].process_count == NotAvailable(
        "no permission", pynvml.NVML_ERROR_NO_PERMISSION
    )
    assert readings[1].process_count == 1


def test_no_driver_gives_a_clear_message() -> None:
    backend, _, _ = make(ONE_NODE + '\n[[fault]]\nkind = "no_driver"\n')
    with pytest.raises(
        NvmlUnavailableError, match=r"NVIDIA driver is not installed.*--backend mock"
    ):
        backend.open()


def test_query_turns_any_nvml_error_into_not_available() -> None:
    def fails() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    assert query(fails) == NotAvailable("timeout", pynvml.NVML_ERROR_TIMEOUT)
    assert query(lambda: 7) == 7
    assert not NotAvailable("x")


def test_sampler_numbers_reports_and_caps_uncovered_gaps() -> None:
    mock = mock_node(ONE_NODE, name="n1", interval=1.0)
    sampler, clock = mock.sampler, mock.clock
    clock.advance(1.0)
    first = tick(sampler)
    clock.advance(1.0)
    second = tick(sampler)
    clock.advance(30.0)  # the agent stalled: only 2 intervals are covered, the rest is unobserved
    third = tick(sampler)
    assert [r.seq for r in (first, second, third)] == [1, 2, 3]
    assert [r.interval_seconds for r in (first, second, third)] == [1.0, 1.0, 2.0]
    assert third.time_unix_nano == int(clock() * 1e9)
    hello = sampler.hello(42, "mock")
    assert hello.node == "n1" and hello.instance_id == 42 and len(hello.gpus) == 4
    assert hello.gpus[0].memory_total_bytes == 81559 * 2**20


def test_burn_load_reads_busy_but_the_sms_and_the_power_are_near_idle() -> None:
    backend, _, clock = make(
        ONE_NODE.replace(
            'kind = "steady"\nbusy = 0.9\nsm_active = 0.6\npower_fraction = 0.8\n',
            'kind = "burn"\n',
        )
    )
    backend.open()
    clock.advance(1.0)
    burn, idle = backend.read()[0], backend.read()[3]
    assert burn.busy == 1.0
    assert burn.sm_active == pytest.approx(0.02)
    assert burn.tensor_active == 0.0
    assert isinstance(burn.power_watts, float) and isinstance(idle.power_watts, float)
    assert (
        burn.power_watts == pytest.approx(0.13 * 700) and burn.power_watts < 1.5 * idle.power_watts
    )
    assert burn.process_count == 1


def test_training_and_inference_have_their_dynamics() -> None:
    toml = """
    [cluster]
    nodes = 1
    gpus_per_node = 2
    [[workload]]
    gpus = 1
    kind = "training"
    period = 100
    [[workload]]
    gpus = 1
    kind = "inference"
    """
    backend, _, clock = make(toml)
    backend.open()
    clock.advance(1.0)
    training, inference = backend.read()
    assert training.busy == pytest.approx(0.98) and training.sm_active == pytest.approx(0.85)
    assert training.tensor_active == pytest.approx(0.65)
    assert (
        isinstance(training.memory_used_bytes, int)
        and training.memory_used_bytes > 0.9 * H100.memory_total_mib * 2**20
    )
    # inference: 2 s bursts every 5 s; the second second of the run is inside the first burst
    assert inference.busy == pytest.approx(0.75)
    clock.advance(2.0)  # t = 3: between bursts, the server process stays resident
    _, between = backend.read()
    assert between.process_count == 1 and between.sm_active == pytest.approx(0.35 / 2, abs=0.01)
    clock.advance(95.5)  # t = 98.5
    backend.read()
    clock.advance(1.0)  # t = 99.5: the second since the last read is all checkpoint dip
    dip, _ = backend.read()
    assert dip.busy == pytest.approx(0.2)
    assert dip.sm_active == pytest.approx(0.05)


def test_driver_reload_resets_the_energy_counter() -> None:
    backend, _, clock = make(ONE_NODE + '\n[[fault]]\nkind = "driver_reload"\nat = 10\n')
    backend.open()
    clock.advance(5.0)
    before = backend.read()[0].energy_millijoules
    assert isinstance(before, int) and before > 1_000_000_000
    clock.advance(10.0)  # reload at t=10, read at t=15: 5 s at 560 W since the reload
    assert backend.read()[0].energy_millijoules == 560 * 5 * 1000
