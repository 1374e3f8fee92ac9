"""Golden snapshots: everything the agent reads from one node, per GPU model profile.

The files in tests/golden/ are the agent's `--once --json` view of a mock node on a fixed
clock. A change in any field, unit or "not available" reason shows up as a diff. To accept an
intended change, run with GPUTALLY_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gputally.agent.sampler import snapshot

from .factories import mock_node, scenario

GOLDEN = Path(__file__).parent / "golden"
NODE = """
[cluster]
nodes = 1
gpus_per_node = 4
gpu_model = "{model}"
[[workload]]
gpus = 1
kind = "training"
[[workload]]
gpus = 1
kind = "burn"
[[workload]]
gpus = 1
kind = "inference"
[[fault]]
kind = "no_permission"
function = "nvmlDeviceGetTemperature"
gpu = 3
"""


@pytest.mark.parametrize(
    ("name", "model"), [("h100", "NVIDIA H100 80GB HBM3"), ("a100", "NVIDIA A100-SXM4-80GB")]
)
def test_snapshot_matches_golden_file(name: str, model: str) -> None:
    sc = scenario(NODE.format(model=model), name=f"golden-{name}")
    node = mock_node(sc, start=1_750_000_000.0)
    node.clock.advance(1.0)
    got = {
        "node": sc.node_name(0),
        "driver_version": node.backend.driver_version,
        **snapshot(node.sampler.inventory, node.read()),
    }
    path = GOLDEN / f"{name}.json"
    text = json.dumps(got, indent=2, sort_keys=True) + "\n"
    if os.environ.get("GPUTALLY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with GPUTALLY_UPDATE_GOLDEN=1"
    assert json.loads(path.read_text()) == got
