"""The scenario library: each scenario's figures, through the real agents, gRPC, the collector's
record and `gputally query`'s code, equal the offline oracle and the figures written in the file."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gputally.agent.padding import PaddingRules
from gputally.agent.sim import scenario as scenario_mod
from gputally.agent.sim.fleet import run_fleet_virtual
from gputally.collector.audit.figures import as_dict, compute
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb

from .conftest import Collector
from .oracle import oracle

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "scenarios").glob("*.toml"))
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a multiple of every summary window used
PP = 0.005  # half a percentage point


def run(
    sc: scenario_mod.Scenario, collector_factory: Callable[..., Collector], tmp_path: Path
) -> Record:
    settings = sc.run
    record = Record(tmp_path / f"{sc.name}.db")
    keys = KeyStore(tmp_path / "keys", trust_on_first_use=True)
    collector = collector_factory(expected_gpus=settings["expected_gpus"], record=record, keys=keys)
    stats = asyncio.run(
        run_fleet_virtual(
            sc,
            collector.target,
            seconds=settings["seconds"],
            start=START,
            interval=settings.get("interval", 1.0),
            summary_window=settings.get("summary_window", 300.0),
            padding=PaddingRules(sustain_seconds=settings.get("padding_sustain", 300.0)),
        )
    )
    assert stats.dropped == 0 and stats.acked >= stats.reports
    return record


def answer(record: Record, sc: scenario_mod.Scenario, expect: dict[str, Any]) -> dict[str, Any]:
    t0, t1 = START + expect["from"], START + expect["to"]
    figures = compute(
        record.summaries(int(t0 * 1e9), int(t1 * 1e9)), t0, t1, sc.run["expected_gpus"]
    )
    return as_dict(figures, expect["measure"], expect.get("claim"))


def test_the_library_has_the_scenarios_the_product_exists_for() -> None:
    names = {path.stem for path in LIBRARY}
    assert {"acceptance-slide", "burn-padding", "missing-nodes", "mixed-a100-h100"} <= names


@pytest.mark.parametrize(
    "path", [p for p in LIBRARY if scenario_mod.load(p).expect], ids=lambda p: p.stem
)
def test_scenario_figures_match_the_oracle_and_the_file(
    path: Path, collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    sc = scenario_mod.load(path)
    record = run(sc, collector_factory, tmp_path)
    for expect in sc.expect:
        got = answer(record, sc, expect)
        measure = expect["measure"]
        truth = oracle(
            sc,
            expect["from"],
            expect["to"],
            expected=sc.run["expected_gpus"],
            run_seconds=sc.run["seconds"],
            interval=sc.run.get("interval", 1.0),
        )
        where = f"{path.stem} {measure} [{expect['from']}, {expect['to']})"
        assert got["figure"] == pytest.approx(truth.ratio(measure), abs=PP), where
        assert got["figure"] == pytest.approx(expect["figure"], abs=PP), where
        real = truth.true_ratio("sm_active" if measure == "effective" else measure)
        assert got["lower"] - 1e-9 <= real <= got["upper"] + 1e-9, (
            f"{where}: bounds do not bracket the truth {real}"
        )
        assert got["coverage"] == pytest.approx(truth.present / truth.capacity, abs=1e-6), where
        for key in ("lower", "upper", "coverage"):
            if key in expect:
                assert got[key] == pytest.approx(expect[key], abs=PP), f"{where}: {key}"
        if "verdict" in expect:
            assert got["verdict"] == expect["verdict"], where
        if "without_padding_figure" in expect:
            assert got["without_padding"]["figure"] == pytest.approx(
                expect["without_padding_figure"], abs=PP
            ), where
        if "without_padding_verdict" in expect:
            assert got["without_padding"]["verdict"] == expect["without_padding_verdict"], where
        if "padding_gpu_hours" in expect:
            assert got["padding_gpu_hours"] == pytest.approx(
                expect["padding_gpu_hours"], rel=1e-6
            ), where


def test_burn_padding_flags_cover_the_burn_gpus_and_only_them(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    sc = scenario_mod.load(ROOT / "scenarios" / "burn-padding.toml")
    record = run(sc, collector_factory, tmp_path)
    flagged: dict[tuple[str, int], float] = {}
    present: dict[tuple[str, int], float] = {}
    for node, body in record.summaries(0, 2**62):
        for gpu in pb.Summary.FromString(pb.SignedSummary.FromString(body).body).gpus:
            key = (node, gpu.index)
            flagged[key] = flagged.get(key, 0.0) + gpu.flagged.seconds
            present[key] = present.get(key, 0.0) + gpu.present_seconds
    burn = {
        (sc.node_name(n), g)
        for n in range(sc.nodes)
        for g in range(sc.gpus_per_node)
        if (w := sc.workload_at(n, g, 10.0)) is not None and w.kind == "burn"
    }
    assert len(burn) == 13
    assert {key for key, seconds in flagged.items() if seconds > 0} == burn
    for key in burn:  # burn_tool flags from the first second: all of their time
        assert flagged[key] == pytest.approx(present[key])


def test_nodes_that_stop_reporting_mid_period_widen_the_bounds(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    text = (ROOT / "scenarios" / "missing-nodes.toml").read_text()
    text = text.replace(
        'kind = "node_down"   # node-03 is silent for the whole period\nnode = 3',
        'kind = "node_down"\nnode = 2\nat = 900',
    )
    data = tomllib.loads(text)
    data["expect"] = []
    sc = scenario_mod.parse(data, name="stop-mid-period")
    record = run(sc, collector_factory, tmp_path)
    before = answer(record, sc, {"from": 0, "to": 900, "measure": "busy"})
    whole = answer(record, sc, {"from": 0, "to": 1800, "measure": "busy"})
    after = answer(record, sc, {"from": 900, "to": 1800, "measure": "busy"})
    # (the tick at 900 s, which would cover the last 5 s before the outage, is already skipped)
    assert before["coverage"] == pytest.approx(1 - 8 * 5 / (32 * 900)) and before[
        "lower"
    ] == pytest.approx(0.9, abs=PP)
    assert after["coverage"] == pytest.approx(0.75, abs=0.01)
    assert after["lower"] < before["lower"] and after["upper"] > before["upper"]
    assert after["lower"] == pytest.approx(0.675, abs=0.01) and after["upper"] == pytest.approx(
        0.925, abs=0.01
    )
    # the whole period sits between: nothing is renormalised over the GPUs that answered
    assert whole["lower"] == pytest.approx((before["lower"] + after["lower"]) / 2, abs=1e-6)
    assert whole["expected_gpus"] == 32 and whole["seen_gpus"] == 32
