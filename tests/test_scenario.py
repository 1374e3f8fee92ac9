"""Scenario files: the documented example, assignment of GPUs, and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gputally.agent.sim import scenario

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_example_parses_to_the_expected_cluster() -> None:
    sc = scenario.default()
    assert (sc.nodes, sc.gpus_per_node, sc.total_gpus) == (4, 8, 32)
    (workload,) = sc.workloads
    assert workload.gpus == 16 and workload.load.busy == 0.9 and workload.load.sm_active == 0.6
    assert workload.load.power_fraction == 0.8
    busy = [sc.load_at(n, g, 10.0).busy for n in range(4) for g in range(8)]
    assert sum(busy) / 32 == pytest.approx(0.45)
    assert [sc.node_name(n) for n in range(4)] == ["node-00", "node-01", "node-02", "node-03"]


def test_the_example_file_shipped_in_scenarios_is_the_default() -> None:
    assert scenario.load(ROOT / "scenarios" / "half-steady.toml") == scenario.parse(
        tomllib.loads(scenario.DEFAULT_TOML), name="half-steady"
    )


def test_workloads_at_different_times_share_gpus() -> None:
    sc = scenario.parse(
        tomllib.loads(
            """
            [cluster]
            nodes = 1
            gpus_per_node = 4
            [[workload]]
            gpus = 4
            end = 100
            [[workload]]
            gpus = 2
            start = 100
            busy = 0.5
            sm_active = 0.1
            """
        )
    )
    assert [sc.load_at(0, g, 50).busy for g in range(4)] == [0.9] * 4
    assert [sc.load_at(0, g, 150).busy for g in range(4)] == [0.5, 0.5, 0.0, 0.0]
    assert sc.breakpoints(0, 0, 0, 200) == [100.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing \\[cluster\\]"),
        ("[cluster]\nnodes = 0\ngpus_per_node = 8", "cluster.nodes: must be >= 1"),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\ngpu_model = 'GTX 480'",
            "unknown model 'GTX 480'",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[workload]]\nshare = 1.5",
            "share: must be <= 1",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[workload]]\ngpus = 9",
            "needs 9 GPUs but only 8",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[workload]]\ngpus = 1\nkind = 'spin'",
            "unknown kind 'spin'",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[workload]]\ngpus = 1\nbusy = 0.2\nsm_active = 0.5",
            "cannot exceed busy",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[workload]]\ngpus = 1\nbussy = 0.2",
            "unknown key\\(s\\) bussy",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[workload]]\nshare = 0.5\ngpus = 2",
            "exactly one of",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[fault]]\nkind = 'gpu_lost'\nnode = 3",
            "node: 3 is out of range",
        ),
        (
            "[cluster]\nnodes = 1\ngpus_per_node = 8\n[[fault]]\nkind = 'unsupported'",
            "name the pynvml function",
        ),
    ],
)
def test_bad_scenarios_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(scenario.ScenarioError, match=message):
        scenario.parse(tomllib.loads(text))


def test_unreadable_files_are_reported_with_their_path(tmp_path: Path) -> None:
    with pytest.raises(scenario.ScenarioError, match="no such scenario file"):
        scenario.load(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[cluster\n")
    with pytest.raises(scenario.ScenarioError, match=r"broken\.toml: not valid TOML"):
        scenario.load(broken)
