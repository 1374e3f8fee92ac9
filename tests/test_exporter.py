"""The agent's own /metrics: per-GPU series from the latest report, exact counters."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gputally.agent.exporter import NodeExporter, clock_event_names, make_registry
from gputally.v1 import telemetry_pb2 as pb

from .conftest import free_port, require_binary

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
    script = Path(sys.executable).with_name("gputally")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gputally.agent"]
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
