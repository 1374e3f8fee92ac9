"""benchmarks/streams_under_flood.py at a tiny size: it still runs against the collector it
measures, and every honest report it sends is acknowledged. Its timings are not judged here
(they are the benchmark's to print, on a machine of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "streams_under_flood.py"


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.slow
def test_the_flood_benchmark_runs_small_and_every_honest_report_is_acked() -> None:
    ran = subprocess.run(
        [sys.executable, str(SCRIPT), "--streams", "5", "--duration", "6", "--json"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout)

    assert result["streams"] == 5 and result["gpus_per_node"] == 8
    assert result["processes"] == {"honest": 1, "flood": 1, "churn": 1}
    honest = result["honest"]
    assert honest["failed_streams"] == 0, honest["errors"]
    assert honest["sent"] > 0
    assert honest["acked"] == honest["sent"]
    assert honest["rejected"] == 0
    # the collector's own count agrees with what the streams read
    assert result["metrics"]["accepted_honest"] == honest["acked"]

    phases = result["phases"]
    assert [p["phase"] for p in phases] == ["baseline", "flood", "churn"]
    for phase in phases:
        assert isinstance(phase["reports"], int) and phase["reports"] > 0
        for key in ("seconds", "p50_ms", "p99_ms", "max_ms", "p50_ratio", "p99_ratio"):
            assert number(phase[key]) and phase[key] > 0, (phase["phase"], key, phase[key])
        assert phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"]
        assert set(phase["cpu_percent"]) == {"collector", "honest", "flood", "churn", "others"}
        assert all(number(v) and v >= 0 for v in phase["cpu_percent"].values())
    assert phases[0]["p50_ratio"] == phases[0]["p99_ratio"] == phases[0]["max_ratio"] == 1.0
    assert sum(p["reports"] for p in phases) <= honest["sent"]  # the warm-up's are in neither

    flood = result["flood"]
    assert flood["error"] == ""
    assert flood["batch_reports"] == 1024
    assert 0 < flood["batch_bytes"] <= 4 * 2**20
    # every report of every batch the collector answered was rejected, none applied
    assert flood["reports_rejected"] == flood["batches_acked"] * flood["batch_reports"]
    # (the collector may also have taken some of the batch it was given when the flood ended)
    assert result["metrics"]["rejected_flood"] >= flood["reports_rejected"]
    for key in ("parse_ms", "apply_ms", "apply_slice_ms", "ack_ms"):
        assert number(flood[key]) and flood[key] > 0

    churn = result["churn"]
    assert churn["error"] == ""
    assert churn["attempts"] == sum(churn["statuses"].values())
    # refused for what they are, then at once once the peer keeps at it (RESOURCE_EXHAUSTED);
    # INTERNAL is the client's own word for a write its refused stream no longer took
    assert set(churn["statuses"]) <= {
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "INTERNAL",
    }
    refused = result["metrics"]["streams_refused"]
    # the churn's streams, and the flood's the collector ended (its batches rejected whole)
    ended = sum(n for code, n in flood["ended_by"].items() if code != "CANCELLED")
    assert sum(refused.values()) == churn["attempts"] + ended

    rss = result["rss_mib"]
    for key in ("idle", "connected", "start", "max", "end", "slope_mib_per_min"):
        assert number(rss[key]), key
    assert rss["idle"] > 0 and rss["start"] <= rss["max"]
    assert number(result["collector_cpu_percent"])
    metrics = result["metrics"]
    assert number(metrics["render_ms"]) and metrics["bytes"] > 0 and metrics["lines"] > 0
    assert result["collector_exit"] == 0
