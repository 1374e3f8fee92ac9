"""A real Prometheus scrapes a real collector fed by a simulated cluster over gRPC.

Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`). In CI they are
required: a missing binary fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gputally.agent import scenario
from gputally.agent.simulate import run_fleet

from .conftest import Collector, free_port, require_binary

pytestmark = pytest.mark.prometheus


def query(base: str, promql: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scalar(base: str, promql: str) -> float | None:
    result = query(base, promql)
    return float(result[0]["value"][1]) if result else None  # type: ignore[index]


def eventually(base: str, promql: str, seconds: float = 20.0) -> float | None:
    """The query's value once Prometheus has enough samples to answer it (bounded wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = scalar(base, promql)
        if value is not None:
            return value
        time.sleep(0.5)
    return None


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start Prometheus scraping the given target every second; yields a starter."""
    binary = require_binary("prometheus")
    processes: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: gputally-collector\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return base
            except OSError:
                time.sleep(0.2)
        raise AssertionError(
            "prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()
        )

    yield start
    for process in processes:
        process.terminate()
        process.wait(20)


def test_prometheus_scrapes_the_cluster_figures(
    collector_factory: Callable[..., Collector], prometheus: Callable[[str], str]
) -> None:
    collector = collector_factory(expected_gpus=32, window=4.0, lag=1.5)
    base = prometheus(collector.metrics_url.removeprefix("http://").removesuffix("/metrics"))
    fleet = threading.Thread(
        target=lambda: asyncio.run(run_fleet(scenario.default(), collector.target, duration=25.0))
    )
    fleet.start()
    try:
        busy = sm = alloc = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            coverage = scalar(base, "gputally_cluster_coverage_ratio")
            if coverage is not None and coverage > 0.999:
                busy = scalar(base, 'gputally_cluster_utilization_ratio{measure="busy"}')
                sm = scalar(base, 'gputally_cluster_utilization_ratio{measure="sm_active"}')
                alloc = scalar(base, 'gputally_cluster_utilization_ratio{measure="allocated"}')
                break
            time.sleep(0.5)
        assert busy == pytest.approx(0.45, abs=0.01)
        assert sm == pytest.approx(0.3, abs=0.01)
        assert alloc == pytest.approx(0.5, abs=0.01)
        assert scalar(base, 'gputally_cluster_gpus{state="reporting"}') == 32
        assert scalar(base, 'up{job="gputally-collector"}') == 1
        # The counters answer for any range: the exact mean busy ratio over the last 5 s,
        # computed by Prometheus from increase() over the declared inventory.
        mean = eventually(
            base,
            'increase(gputally_cluster_gpu_seconds_total{measure="busy"}[5s])'
            ' / on() increase(gputally_cluster_gpu_seconds_total{measure="observed"}[5s])',
        )
        assert mean == pytest.approx(0.45, abs=0.01)
        per_node = query(base, 'gputally_node_utilization_ratio{measure="busy"} > 0.5')
        assert sorted(r["metric"]["node"] for r in per_node) == ["node-00", "node-01"]  # type: ignore[index]
    finally:
        fleet.join(60)


def test_promtool_accepts_the_exposition(collector_factory: Callable[..., Collector]) -> None:
    promtool = require_binary("promtool")
    collector = collector_factory(expected_gpus=32)
    asyncio.run(run_fleet(scenario.default(), collector.target, duration=2.0))
    with urllib.request.urlopen(collector.metrics_url, timeout=5) as response:
        exposition = response.read()
    assert b"gputally_cluster_utilization_ratio" in exposition
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b"", (
        "promtool reported lint problems"
    )
