"""benchmarks/ingest_scale.py at a tiny size: it runs against the collector it measures and
the bare baseline, its JSON holds every figure, and the figures agree with each other and
with the collector's own counters. Its timings are not judged here (they are the
benchmark's to print, on a machine of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest_scale.py"


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2])
def test_the_scale_benchmark_runs_small_and_its_figures_agree(shards: int) -> None:
    """One collector, and two shards on one port whose figures it adds up."""
    ran = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"--shards={shards}",
            "--streams=6",
            "--duration=6",
            "--summary-window=4",  # small templates, and summaries within the run
            "--scrape-every=2",
            "--collector-arg=--window=4",  # a live window the warm-up fills
            "--collector-arg=--lag=1",
            "--collector-arg=--stale-after=5",  # within the window and lag, as at full size
            "--saturate=2",
            "--saturate-warmup=0.5",
            "--saturate-streams=2",
            "--saturate-inflight=2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout)

    config = result["configuration"]
    assert config["streams"] == 6 and config["gpus"] == 48 and config["workers"] == 1
    assert config["shards"] == shards
    assert config["warmup_s"] >= config["collector_window_s"] + config["truth_lag_s"]
    templates = result["templates"]
    assert len(templates["shapes"]) == 8  # the built-in scenarios: 7 mixed nodes, 1 MIG node
    assert templates["report_bytes"]["min"] > 0
    assert number(templates["restamp_us"]["per_report_us"])

    steady = result["steady"]
    assert steady["failed_streams"] == 0 and steady["streams_failed_to_open"] == 0, steady
    assert steady["rejected"] == 0 and steady["sent"] > 0
    # every tick is accounted for: acknowledged, rejected, never acknowledged or skipped
    assert steady["offered"] == (
        steady["acked"] + steady["rejected"] + steady["unacked"] + steady["skipped_ticks"]
    )
    assert steady["acked_gpu_samples_per_s"] == pytest.approx(
        steady["acked_reports_per_s"] * 8, rel=1e-6
    )
    # the collector counted exactly what the streams sent, warm-up included
    assert steady["collector_accepted_reports"] == steady["reports_sent_not_rejected"]
    assert steady["collector_clipped_seconds"] == pytest.approx(steady["clipped_seconds"], abs=1e-3)
    for measure, counter in steady["counters"].items():
        assert counter["collector"] is not None, measure
        assert abs(counter["relative_error"]) < 1e-6, (measure, counter)
    # the summaries were sent and accepted (no record: nothing to record them in)
    assert steady["summaries_sent"] > 0
    assert steady["collector_chain_breaks"] == 0
    # the live figures, as a render of their age may show them, match the truth
    assert steady["metrics"]["scrapes"] >= 2 and steady["metrics"]["failed"] == 0
    for measure in ("busy", "effective", "coverage"):
        figures = steady["live_vs_truth"][measure]
        assert number(figures["truth_mean"]) and figures["truth_mean"] > 0, measure
        assert abs(figures["worst_allowing_age"]) < 0.05, (measure, figures)
    for name in ("ack_latency_ms", "generator_late_ms"):
        d = steady[name]
        assert d["p50"] <= d["p99"] <= d["max"], name
    assert steady["lag_s"]["p50"] >= 0.9 * config["report_every_s"]
    assert {"collector", "generators", "machine", "others"} <= set(steady["cpu_percent"])
    rss = steady["rss_mib"]
    assert rss["start"] <= rss["max"] and number(rss["slope_mib_per_min"])

    saturation = result["saturation"]
    for name in ("baseline", "collector"):
        x = saturation[name]
        assert x["failed_streams"] == 0, (name, x["errors"])
        assert x["acked"] > 0 and x["rejected"] == 0, name
        assert number(x["ack_latency_ms"]["p50"])
    assert number(saturation["ratio"]) and saturation["ratio"] > 0

    assert {row["target"] for row in result["targets"]} >= {"every report acknowledged"}
    assert result["collector_exit"] == 0


def test_the_benchmark_reads_the_cluster_counters_and_adds_the_shards_up() -> None:
    """read_metrics takes the cluster's report counts (the only ones under --node-metrics
    none), and merged adds shards up as the recording rules do."""
    import importlib

    sys.path.insert(0, str(SCRIPT.parent))  # benchmarks/ is not a package
    try:
        ingest_scale = importlib.import_module("ingest_scale")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    a = ingest_scale.read_metrics(
        b'gputally_collector_reports_total{result="accepted"} 7.0\n'
        b'gputally_collector_reports_total{result="rejected"} 1.0\n'
        b'gputally_cluster_gpu_seconds_total{measure="busy"} 30.0\n'
        b'gputally_cluster_utilization_ratio{measure="busy"} 0.25\n'
        b'gputally_cluster_gpus{state="expected"} 16.0\n'
        b'gputally_cluster_gpus{state="reporting"} 8.0\n'
        b"gputally_cluster_window_seconds 30.0\n"
    )
    assert (a["accepted"], a["rejected"], a["seconds"], a["window"]) == (7, 1, {"busy": 30.0}, 30)
    b = ingest_scale.read_metrics(
        b'gputally_collector_reports_total{result="accepted"} 5.0\n'
        b'gputally_cluster_gpu_seconds_total{measure="busy"} 12.0\n'
        b'gputally_cluster_utilization_ratio{measure="busy"} 0.5\n'
        b'gputally_cluster_gpus{state="expected"} 16.0\n'
        b'gputally_cluster_gpus{state="reporting"} 8.0\n'
        b"gputally_cluster_window_seconds 30.0\n"
    )
    both = ingest_scale.merged([a, b])
    assert (both["accepted"], both["rejected"], both["seconds"]) == (12, 1, {"busy": 42.0})
    assert both["ratio"] == {"busy": 0.75} and both["window"] == 30.0
    assert both["gpus"] == {"expected": 16.0, "reporting": 16.0}
    assert ingest_scale.merged([a]) == a


def test_the_live_path_benchmark_runs_small_on_the_agents_reports() -> None:
    """benchmarks/live_path.py: 8 node shapes, 40 s sampled, a report every 10 s: 4 reports
    of 8 GPUs each per shape; then a view and a render both ways (timings not judged)."""
    ran = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "live_path.py"), "--report-every=10", "--ticks=40",
         "--copies=1", "--repeat=1", "--view-nodes=4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "ingest: 32 reports of 8 nodes (every 10 s, 8.0 GPUs each), best of 1"
    labels = [line.strip().split("  ")[0] for line in lines[1:]]
    assert labels == [
        "ClusterState.ingest", "parse only (baseline)", "ratio ingest / parse",
        "view and render of 4 nodes x 8 GPUs, best of 1",
        "view", "view without nodes", "render", "render without nodes",
    ]  # fmt: skip


def test_the_memory_benchmark_finds_the_live_state_bounded_over_simulated_time() -> None:
    """benchmarks/live_memory.py: 16 nodes (each shape twice) reporting every 10 s for 300
    simulated seconds, a checkpoint a minute: the state holds the same sizes at every
    checkpoint after the first (the live window is 30 s), and it says so."""
    ran = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "live_memory.py"), "--nodes=16", "--seconds=300",
         "--checkpoint=60", "--render-every=30"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("16 nodes x 8 GPUs, 30 reports each over 300 simulated s")
    header = lines[1].split()
    assert header[-8:] == [
        "nodes", "series", "entries", "most", "cards", "chains", "xids", "labels"
    ]  # fmt: skip
    rows = [line.split() for line in lines[2:7]]
    assert [row[0] for row in rows] == ["60", "120", "180", "240", "300"]
    assert {row[3] for row in rows} == {"16"}  # nodes
    # every uncapped size, after the first (padding rules appear as the burn tool is found)
    assert len({tuple(row[3:9]) for row in rows[1:]}) == 1
    assert int(rows[-1][7]) == 16 * 8 * 3  # cards: each UUID and serial, each card's end
    assert lines[7].startswith("480 reports ingested, ")  # 16 nodes x 30
    assert lines[8].startswith("bounded: every size the same at each checkpoint after the first")
