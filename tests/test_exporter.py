"""The agent's own /metrics: per-GPU series from the latest report, exact counters."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gputally.agent.exporter import NodeExporter, make_registry
from gputally.agent.nvml import clock_event_names
from gputally.v1 import telemetry_pb2 as pb

from .conftest import free_port, require_binary
from .factories import gputally_command, mock_node, tick

HELLO = pb.Hello(
    node="n1",
    gpus=[
        pb.GpuIdentity(
            index=0, uuid="GPU-a", model="NVIDIA A100-SXM4-80GB", memory_total_bytes=80 * 2**30
        ),
        pb.GpuIdentity(index=1, uuid="GPU-b", model="NVIDIA A100-SXM4-80GB"),
    ],
)


def samples(exporter: NodeExporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(make_registry(exporter)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def lab(gpu: int, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted(
            {
                "gpu": str(gpu),
                "uuid": "GPU-ab"[0:4] + "ab"[gpu],
                "model": "NVIDIA A100-SXM4-80GB",
                **extra,
            }.items()
        )
    )


def test_counters_are_integrated_and_missing_fields_have_no_series() -> None:
    exporter = NodeExporter(HELLO)
    for seq, energy in enumerate((1_000_000, 1_500_000, 200_000), start=1):
        ok = pb.GpuSample(
            index=0,
            status=pb.GPU_STATUS_OK,
            busy=0.5,
            process_count=1,
            energy_millijoules=energy,
            sm_clock_mhz=1410,
        )
        lost = pb.GpuSample(index=1, status=pb.GPU_STATUS_LOST)
        exporter.update(
            pb.Report(seq=seq, time_unix_nano=seq * 10**9, interval_seconds=2.0, gpus=[ok, lost])
        )
    got = samples(exporter)
    assert got[("gputally_gpu_seconds_total", lab(0, measure="observed"))] == 6.0
    assert got[("gputally_gpu_seconds_total", lab(0, measure="busy"))] == 3.0
    assert got[("gputally_gpu_seconds_total", lab(0, measure="allocated"))] == 6.0
    assert got[("gputally_gpu_seconds_total", lab(1, measure="observed"))] == 0.0
    assert got[("gputally_gpu_energy_joules_total", lab(0))] == pytest.approx(
        500 + 200
    )  # reset handled
    assert got[("gputally_gpu_up", lab(0))] == 1 and got[("gputally_gpu_up", lab(1))] == 0
    assert got[("gputally_gpu_sm_clock_hertz", lab(0))] == 1410e6
    assert got[("gputally_gpu_memory_total_bytes", lab(0))] == 80 * 2**30
    assert ("gputally_gpu_busy_ratio", lab(1)) not in got  # lost: not available, not zero
    assert ("gputally_gpu_sm_active_ratio", lab(0)) not in got  # A100: no GPM
    assert got[("gputally_agent_last_collect_success", ())] == 1


def test_the_exporter_counts_what_the_signed_summaries_count() -> None:
    """Both integrate by gputally.v1.accounting. On a board without an energy counter (before
    Volta) the power readings are integrated: the agent's own /metrics once said 0 J there
    while its summaries said the right figure."""
    toml = """
    [cluster]
    nodes = 1
    gpus_per_node = 2
    gpu_model = "NVIDIA A100-SXM4-80GB"
    [[workload]]
    gpus = 1
    kind = "training"
    [[fault]]
    kind = "unsupported"
    function = "nvmlDeviceGetTotalEnergyConsumption"
    """
    node = mock_node(toml, name="n1", summary_window=10.0)
    exporter = NodeExporter(node.sampler.hello(1, "mock"))
    summaries = []
    for _ in range(20):
        node.clock.advance(1.0)
        report = tick(node.sampler)
        assert not any(g.HasField("energy_millijoules") for g in report.gpus)
        exporter.update(report)
        if report.HasField("summary"):
            summaries.append(pb.Summary.FromString(report.summary.body))
    summaries += [pb.Summary.FromString(r.summary.body) for r in node.sampler.final_reports()]
    got = samples(exporter)
    uuids = [node.lib.gpu_uuid(i) for i in range(2)]
    for index, uuid in enumerate(uuids):
        labels = {"gpu": str(index), "uuid": uuid, "model": "NVIDIA A100-SXM4-80GB"}

        def series(name: str, labels: dict[str, str] = labels, **extra: str) -> float:
            return got[(name, tuple(sorted({**labels, **extra}.items())))]

        gpus = [g for s in summaries for g in s.gpus if g.index == index]
        joules = sum(g.energy_joules for g in gpus)
        assert joules == pytest.approx((360.0 if index == 0 else 55.0) * 20)  # W x s
        assert series("gputally_gpu_energy_joules_total") == pytest.approx(joules)
        for measure, name in (
            ("observed", "present"),
            ("busy", "busy"),
            ("sm_active", "sm_active"),
        ):
            assert series("gputally_gpu_seconds_total", measure=measure) == pytest.approx(
                sum(getattr(g, f"{name}_seconds") for g in gpus)
            )


def test_clock_event_reasons_are_decoded_by_name() -> None:
    assert clock_event_names(0) == []
    assert clock_event_names(0x1 | 0x4 | 0x40) == [
        "gpu_idle",
        "sw_power_cap",
        "hw_thermal_slowdown",
    ]


def test_the_agent_serves_its_metrics_and_promtool_accepts_them(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    port = free_port()
    command = gputally_command()
    # No collector is listening: the agent keeps sampling and serving regardless.
    agent = subprocess.Popen(
        [
            *command,
            "agent",
            "--backend=mock",
            f"--collector=127.0.0.1:{free_port()}",
            f"--metrics-listen=127.0.0.1:{port}",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        text = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=2
                ) as response:
                    text = response.read().decode()
                if 'gputally_gpu_busy_ratio{gpu="0"' in text:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert 'gputally_gpu_busy_ratio{gpu="0"' in text, text[-2000:]
        values = {
            (s.name, s.labels.get("gpu"), s.labels.get("result", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert values[("gputally_gpu_busy_ratio", "0", "")] == pytest.approx(0.9)
        assert values[("gputally_gpu_busy_ratio", "7", "")] == pytest.approx(
            0.9
        )  # node-00 is all busy
        assert values[("gputally_gpu_sm_active_ratio", "0", "")] == pytest.approx(0.6)
        assert values[("gputally_agent_collector_connected", None, "")] == 0
        assert values[("gputally_agent_reports_total", None, "submitted")] >= 1
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert (
            checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip()
        ), checked
    finally:
        agent.terminate()
        agent.wait(15)


def test_health_attribution_xid_and_mig_families(tmp_path: Path) -> None:
    toml = """
    [cluster]
    nodes = 1
    gpus_per_node = 2
    mig_instances = 2
    [[workload]]
    gpus = 1
    kind = "training"
    slurm_job = 31337
    user = "erin"
    [[fault]]
    kind = "xid"
    code = 94
    gpu = 1
    at = 0.2
    [[fault]]
    kind = "ecc_error"
    gpu = 0
    count = 2
    """
    node = mock_node(toml, name="n1")
    sampler, lib, clock = node.sampler, node.lib, node.clock
    exporter = NodeExporter(sampler.hello(1, "mock"))
    for _ in range(3):
        clock.advance(1.0)
        exporter.update(tick(sampler))
    text = generate_latest(make_registry(exporter)).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    uuid0, uuid1 = lib.gpu_uuid(0), lib.gpu_uuid(1)
    model = "NVIDIA H100 80GB HBM3"

    def at(name: str, gpu: int, **extra: str) -> float:
        labels = {"gpu": str(gpu), "uuid": (uuid0, uuid1)[gpu], "model": model, **extra}
        return got[(name, tuple(sorted(labels.items())))]

    assert at("gputally_gpu_xid_events_total", 1, xid="94") == 1  # once, though read three times
    assert at("gputally_gpu_ecc_errors", 0, type="corrected") == 2
    assert at("gputally_gpu_attribution_info", 0, source="slurm", tenant="erin", job="31337") == 1
    assert at("gputally_gpu_nvlink_total", 0, direction="tx") > 0
    mig = {k: v for k, v in got.items() if k[0] == "gputally_mig_sm_active_ratio"}
    # GPU 0 trains on both of its instances, GPU 1 is idle on both
    assert sorted(round(v, 6) for v in mig.values()) == [0.0, 0.0, 0.85, 0.85]
    # each instance is attributed on its own (here: the job running in both of GPU 0's)
    owners = sorted(
        (dict(k[1])["gpu"], dict(k[1])["gpu_instance"], dict(k[1])["job"])
        for k, v in got.items()
        if k[0] == "gputally_mig_attribution_info" and v == 1
    )
    assert owners == [("0", "1", "31337"), ("0", "2", "31337")]
    # MIG: the parents' busy is not available, so there is no series at all (never a 0)
    assert [k for k in got if k[0] == "gputally_gpu_busy_ratio"] == []
    assert at("gputally_gpu_up", 0) == 1
    promtool = require_binary("promtool")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
        checked
    )
