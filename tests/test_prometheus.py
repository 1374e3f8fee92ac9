"""A real Prometheus scrapes a real collector fed by a simulated cluster over gRPC.

Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`). In CI they are
required: a missing binary fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gputally.agent.sim import scenario
from gputally.agent.sim.fleet import run_fleet

from .conftest import Collector, free_port, require_binary

pytestmark = pytest.mark.prometheus


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
    data = api(base, "query", **params)
    assert data["resultType"] == "vector", (promql, data)
    return list(data["result"])


def scalar(base: str, promql: str, at: float | None = None) -> float | None:
    result = query(base, promql, at)
    return float(result[0]["value"][1]) if result else None


def eventually(base: str, promql: str, seconds: float = 20.0) -> float | None:
    """The query's value once Prometheus has enough samples to answer it (bounded wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = scalar(base, promql)
        if value is not None:
            return value
        time.sleep(0.5)
    return None


def start_prometheus(
    tmp_path: Path,
    jobs: Sequence[tuple[str, Sequence[str]]],
    rules: Sequence[Path] = (),
    scrape_interval: str = "1s",
) -> tuple[subprocess.Popen[bytes], str]:
    """A Prometheus on loopback scraping each job's targets (host:port) every
    `scrape_interval`, evaluating rules every second, with its data in tmp_path: the process
    and the HTTP API's base URL, once it is ready (bounded wait)."""
    binary = require_binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: 1s\n"
        + "".join(
            f"rule_files:\n  - '{r}'\n" if i == 0 else f"  - '{r}'\n" for i, r in enumerate(rules)
        )
        + "scrape_configs:\n"
        + "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: {list(targets)}\n"
            for job, targets in jobs
        )
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
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return process, base
        except OSError:
            time.sleep(0.2)
    process.terminate()
    process.wait(20)
    raise AssertionError(
        "prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()
    )


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start Prometheus scraping the collector (and optionally an agent) every second, with
    optional rule files; yields a starter that returns the HTTP API's base URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(target: str, agent: str | None = None, rules: Sequence[Path] = ()) -> str:
        jobs = [("gputally-collector", [target])] + ([("gputally-agent", [agent])] if agent else [])
        process, base = start_prometheus(tmp_path, jobs, rules)
        processes.append(process)
        return base

    yield start
    for process in processes:
        process.terminate()
        process.wait(20)


def test_prometheus_scrapes_the_cluster_figures(
    collector_factory: Callable[..., Collector], prometheus: Callable[..., str]
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
        assert sorted(r["metric"]["node"] for r in per_node) == ["node-00", "node-01"]
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


ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules"
MEASURES = {"busy": 0.45, "sm_active": 0.30, "allocated": 0.50, "effective": 0.30}


def _rules_every_second(tmp_path: Path) -> list[Path]:
    """The deployed rule files with every group evaluated each second (the only change), so
    a test of a minute sees them evaluated."""
    out = []
    for name in ("recording.yml", "alerts.yml"):
        text = (RULES / name).read_text()
        text = re.sub(r"(?m)^    interval: \d+[smhd]$", "    interval: 1s", text)
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def _start_agent_exporter(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One agent serving its own /metrics (mock backend). Its stream goes nowhere (port 9):
    the collector's figures stay those of the simulated fleet."""
    port = free_port()
    log = (tmp_path / "agent.log").open("wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gputally")),
            *("agent", "--backend", "mock", "--node", "exporter-node"),
            *("--collector", "127.0.0.1:9", "--metrics-listen", f"127.0.0.1:{port}"),
            *("--state-dir", str(tmp_path / "agent-state"), "--duration", "120"),
            "--log-level=error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, f"127.0.0.1:{port}"


def _legend(template: str, labels: dict[str, str]) -> str:
    """A series' name as Grafana's legend format gives it ("{{node}}" -> node-00)."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: labels.get(m.group(1), ""), template)


def test_every_recording_rule_alert_and_dashboard_query_against_a_live_cluster(
    tmp_path: Path,
    collector_factory: Callable[..., Collector],
    prometheus: Callable[..., str],
) -> None:
    """The deployed rules and the Grafana dashboard, evaluated by a real Prometheus that
    scrapes a collector fed by the 4 x 8 default scenario over gRPC and a live agent. The
    steady job runs as Slurm job 4242 of user alice, so the tenant breakdown has a tenant."""
    import tomllib

    import yaml

    attributed = scenario.DEFAULT_TOML.replace(
        'kind = "steady"\n', 'kind = "steady"\nslurm_job = 4242\nuser = "alice"\n', 1
    )
    assert attributed != scenario.DEFAULT_TOML
    cluster = scenario.parse(tomllib.loads(attributed), name="default-attributed")

    collector = collector_factory(expected_gpus=32, window=4.0, lag=1.5)
    agent, agent_target = _start_agent_exporter(tmp_path)
    base = prometheus(
        collector.metrics_url.removeprefix("http://").removesuffix("/metrics"),
        agent=agent_target,
        rules=_rules_every_second(tmp_path),
    )
    # Prometheus holds the counters at 0 before the fleet starts, so that its increase() over
    # any range sees every GPU-second: without that sample, the ratios over a range depend on
    # which part of the first reports landed before the first scrape.
    deadline = time.monotonic() + 20
    while scalar(base, 'gputally_cluster_gpu_seconds_total{measure="observed"}') != 0:
        assert time.monotonic() < deadline, "prometheus never scraped the idle collector"
        time.sleep(0.2)
    fleet = threading.Thread(
        target=lambda: asyncio.run(run_fleet(cluster, collector.target, duration=40.0))
    )
    fleet.start()
    try:
        # bounded wait: the live window full (coverage 1) and 12 s of rule evaluations since
        deadline, settled = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            coverage = scalar(base, "gputally_cluster_coverage_ratio")
            if settled is None and coverage is not None and coverage > 0.999:
                settled = time.monotonic()
            if settled is not None and time.monotonic() - settled > 12:
                break
            time.sleep(0.5)
        assert settled is not None, "the cluster never reached full coverage"
        at = time.time() - 1.0  # one instant for every query: the rules' outputs agree

        # -- recording rules: every one returns data; the scenario fixes its value ------------
        records = [
            rule["record"]
            for group in yaml.safe_load((RULES / "recording.yml").read_text())["groups"]
            for rule in group["rules"]
        ]
        for record in records:
            assert query(base, record, at), f"{record} returned no data"
        for window in ("1h", "1d", "30d"):

            def recorded(record: str, window: str = window, **labels: str) -> float:
                selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
                result = scalar(base, f"gputally:{record}{window}{{{selector}}}", at)
                assert result is not None, (record, window, labels)
                return result

            coverage = recorded("cluster_coverage:ratio_")
            # under a minute of data in the range: the rest counts as zero, never renormalised
            assert 0 < coverage < 0.05
            for measure, truth in MEASURES.items():
                observed = recorded("cluster_utilization_observed:ratio_", measure=measure)
                assert observed == pytest.approx(truth, abs=0.01), (window, measure)
                figure = recorded("cluster_utilization:ratio_", measure=measure)
                assert figure == pytest.approx(observed * coverage, rel=1e-6), (window, measure)
                clean = recorded("cluster_utilization_without_padding:ratio_", measure=measure)
                assert clean == pytest.approx(figure, rel=1e-9)  # no padding in this scenario
            assert recorded("cluster_padding:ratio_") == 0
            assert recorded("cluster_energy_kwh:") > 0
            busy, held = (
                recorded("node_utilization:ratio_", node="node-00", measure=m)
                for m in ("busy", "allocated")
            )
            assert busy / held == pytest.approx(0.9, abs=0.01)  # node-00 runs the steady job
            assert recorded("node_utilization:ratio_", node="node-02", measure="busy") == 0

        # -- alerts: every rule evaluates without error; none fires on a healthy cluster -------
        groups = api(base, "rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len(records) + 24
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert [r["name"] for r in rules if r.get("state") == "firing"] == []
        assert scalar(base, 'up{job="gputally-agent"}', at) == 1

        # -- the Grafana dashboard: every panel's queries, as Grafana would send them ----------
        board = json.loads((ROOT / "deploy" / "grafana" / "gputally-cluster.json").read_text())
        variables = {"job": ".*", "node": ".*", "measure": "busy"}
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":  # label_values(metric, label)
                metric, label = re.fullmatch(
                    r"label_values\((.+), (\w+)\)", variable["definition"]
                ).groups()  # type: ignore[union-attr]
                metric = metric.replace("$job", ".*")
                values = api(base, f"label/{label}/values", **{"match[]": metric})
                assert values, variable["name"]
        # queries allowed to be empty, and why: no XID event happens in this scenario; this
        # collector has no witnesses (the same expression is GputallyWitnessBehind's, which
        # promtool tests in alerts_test.yml, and test_witness.py reads the metrics themselves)
        may_be_empty = {"{{node}} XID {{xid}}", "{{witness}}", "{{witness}} conflicts"}
        without_witnesses = {"Ledger entries not yet witnessed"}
        known: dict[str, dict[str, float]] = {
            "Utilization by measure (live window)": MEASURES,
            "GPUs reporting / expected": {"reporting": 32, "expected": 32},
            "Agents up": {"up": 4, "known": 4},
            "$measure by node": {"node-00": 0.9, "node-02": 0.0},
            "$measure by GPU model": {"NVIDIA H100 80GB HBM3": 0.45},
            "$measure by tenant": {"alice": 0.9},
            "XID events": {"all nodes": 0},
            "GPUs lost and missing": {"lost": 0, "missing": 0},
        }
        checked = 0
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            answered = False
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "10s").replace("$__range", "20s")
                for name, substitute in variables.items():
                    expr = expr.replace(f"${name}", substitute)
                result = query(base, expr, at)
                if not result:
                    assert target["legendFormat"] in may_be_empty, (panel["title"], expr)
                    continue
                answered = True
                for series in result:
                    legend = _legend(target["legendFormat"], series["metric"])
                    expected = known.get(panel["title"], {}).get(legend)
                    if expected is not None:
                        checked += 1
                        assert float(series["value"][1]) == pytest.approx(expected, abs=0.01), (
                            panel["title"],
                            legend,
                        )
            assert answered or panel["title"] in without_witnesses, (
                f"panel {panel['title']!r} shows no data"
            )
        assert checked >= 14  # every known figure above was found and compared
    finally:
        fleet.join(60)
        agent.terminate()
        agent.wait(20)
