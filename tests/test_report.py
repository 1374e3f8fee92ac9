"""`gputally audit report`: verified ledger in, verdicts, JSON, CSV and a self-contained HTML out."""

from __future__ import annotations

import asyncio
import csv
import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.sim import scenario as scenario_mod
from gputally.agent.sim.fleet import run_fleet_virtual
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import COLLECTOR_KEY_FILE, Ledger, collector_key_text
from gputally.collector.record.store import Record
from gputally.v1.signing import public_bytes

from .conftest import Collector
from .factories import gputally_command

START = 1_740_787_200.0  # 2025-03-01T00:00:00Z
SCENARIO = """
[cluster]
nodes = 2
gpus_per_node = 4
[[workload]]
share = 1.0
busy = 0.85
sm_active = 0.5
end = 86400
[[workload]]
share = 0.5
busy = 1.0
sm_active = 0.6
start = 86400
slurm_job = 4242
user = "alice"
"""


def ledger(
    tmp_path: Path, collector_factory: Callable[..., Collector], toml: str = SCENARIO
) -> tuple[Path, Path]:
    sc = scenario_mod.parse(tomllib.loads(toml), name="three-days")
    db, keys = tmp_path / "ledger.db", tmp_path / "keys"
    record = Record(db)
    collector = collector_factory(
        expected_gpus=8, record=record, keys=KeyStore(keys, trust_on_first_use=True)
    )
    asyncio.run(
        run_fleet_virtual(
            sc, collector.target, seconds=3 * 86400, start=START, interval=900, summary_window=3600
        )
    )
    collector.stop()
    key = Ed25519PrivateKey.generate()
    assert Ledger(record, key, "gputally/test").checkpoint(START)
    (keys / COLLECTOR_KEY_FILE).write_text(collector_key_text("gputally/test", public_bytes(key)))
    return db, keys


def report(
    db: Path, keys: Path, out: Path, start: str, end: str, claim: str
) -> subprocess.CompletedProcess[str]:
    command = gputally_command()
    return subprocess.run(
        [
            *command,
            "audit",
            "report",
            f"--ledger={db}",
            f"--keys={keys}",
            f"--from={start}",
            f"--to={end}",
            "--expected-gpus=8",
            "--measure=busy",
            f"--claim={claim}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_verdicts_files_and_plots(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    db, keys = ledger(tmp_path, collector_factory)
    accepted = report(db, keys, tmp_path / "acceptance", "2025-03-01", "2025-03-02", "0.85")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    data = json.loads((tmp_path / "acceptance" / "report.json").read_text())
    for key in ("measure", "figure", "lower", "upper", "coverage", "verdict", "energy_kwh"):
        assert key in data
    assert data["measure"] == "busy" and data["verdict"] == "supported"
    assert data["figure"] == pytest.approx(0.85, abs=0.005) and data["coverage"] == pytest.approx(
        1.0, abs=0.005
    )
    assert data["energy_kwh"] > 0 and data["verification"]["verified"]
    after = report(db, keys, tmp_path / "after", "2025-03-02", "2025-03-04", "0.85")
    assert after.returncode == 0, after.stderr
    data = json.loads((tmp_path / "after" / "report.json").read_text())
    assert data["verdict"] == "refuted" and data["figure"] == pytest.approx(0.5, abs=0.005)
    assert [d["date"] for d in data["daily"]] == ["2025-03-02", "2025-03-03"]
    assert all(d["figure"] == pytest.approx(0.5, abs=0.005) for d in data["daily"])
    with (tmp_path / "after" / "daily.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    with (tmp_path / "after" / "gpus.csv").open() as handle:
        per_gpu = [float(row["busy"]) for row in csv.DictReader(handle)]
    assert sorted(round(x, 3) for x in per_gpu) == [0.0] * 4 + [1.0] * 4
    # Who held what: alice's Slurm job ran on 4 GPUs for the 2 days, the other 4 were idle.
    with (tmp_path / "after" / "tenants.csv").open() as handle:
        tenants = {row["name"]: row for row in csv.DictReader(handle)}
    assert sorted(tenants) == ["(unattributed)", "alice"]
    assert float(tenants["alice"]["gpu_hours"]) == pytest.approx(4 * 48, abs=0.01)
    assert float(tenants["alice"]["busy"]) == pytest.approx(1.0)
    assert float(tenants["(unattributed)"]["allocated"]) == 0.0
    with (tmp_path / "after" / "jobs.csv").open() as handle:
        assert {row["name"]: row["gpus"] for row in csv.DictReader(handle)}["4242"] == "4"
    with (tmp_path / "after" / "models.csv").open() as handle:
        (model,) = csv.DictReader(handle)
    assert float(model["gpu_hours"]) == pytest.approx(8 * 48, abs=0.01)
    page = (tmp_path / "after" / "report.html").read_text()
    assert page.count("<svg") == 6
    assert re.search(r"<h2>Per tenant</h2>.*?<td>alice</td><td>192\.0</td>", page, re.S)
    assert "REFUTED" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), (
        "the report must be self-contained"
    )


def test_a_report_is_refused_for_a_ledger_that_does_not_verify(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    import sqlite3

    db, keys = ledger(tmp_path, collector_factory)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM summaries WHERE id = 5")
    refused = report(db, keys, tmp_path / "r", "2025-03-01", "2025-03-02", "0.85")
    assert refused.returncode == 1 and "does not verify" in refused.stdout
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.parametrize("chunk, workers", [(None, 1), (7, 2)], ids=["one-process", "pool"])
def test_the_one_pass_rollup_equals_the_direct_computation(
    tmp_path: Path,
    collector_factory: Callable[..., Collector],
    monkeypatch: pytest.MonkeyPatch,
    chunk: int | None,
    workers: int,
) -> None:
    from gputally.collector.audit import verify as audit
    from gputally.collector.audit.figures import Rollup, as_dict, bounds, compute

    db, keys = ledger(tmp_path, collector_factory)
    if chunk is not None:  # batches of 7 entries over two worker processes: partial rollups merged
        monkeypatch.setattr(audit, "_CHUNK", chunk)
    start, end = START + 3600.5, START + 2 * 86400 + 7200  # cuts through windows and days
    rollup = Rollup(start, end, 8)
    verification = audit.verify_ledger(db, keys, rollup=rollup, workers=workers)
    assert verification.ok and verification.entries > 3 * (chunk or 0)
    record = Record(db, readonly=True)
    direct = compute(record.summaries(int(start * 1e9), int(end * 1e9)), start, end, 8)
    one_pass = rollup.period()

    def rounded(value: object) -> object:  # equal up to float summation order
        if isinstance(value, float):
            return round(value, 9)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    for name in ("busy", "sm_active", "allocated", "effective"):
        assert rounded(as_dict(one_pass, name, 0.6)) == rounded(as_dict(direct, name, 0.6))
    days = rollup.days()
    assert [d for d, _ in days] == ["2025-03-01", "2025-03-02", "2025-03-03"]
    for (_, day), t0, t1 in zip(
        days,
        (start, START + 86400, START + 2 * 86400),
        (START + 86400, START + 2 * 86400, end),
        strict=True,
    ):
        expected = compute(record.summaries(int(t0 * 1e9), int(t1 * 1e9)), t0, t1, 8)
        assert bounds(day.total.sums, day.capacity)["busy"].figure == pytest.approx(
            bounds(expected.total.sums, expected.capacity)["busy"].figure
        )


# Half the GPUs train at 90% busy, half run a burn tool (flagged from its first second): busy
# 95% with flagged padding, 45% without.
BURN = """
[cluster]
nodes = 2
gpus_per_node = 4
[[workload]]
share = 0.5
busy = 0.9
sm_active = 0.5
[[workload]]
share = 0.5
kind = "burn"
"""


def test_a_report_supported_only_by_flagged_padding_says_so_and_is_no_pass(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    from gputally.cli.options import PADDING_DECIDES

    db, keys = ledger(tmp_path, collector_factory, BURN)
    out = tmp_path / "padded"
    result = report(db, keys, out, "2025-03-01", "2025-03-02", "0.85")
    assert result.returncode == PADDING_DECIDES == 3, result.stdout + result.stderr
    simulated, verdict = result.stdout.splitlines()[:2]
    assert simulated.startswith("SIMULATED DATA: 48 of the 48 summaries")  # a mock ledger
    assert verdict == "claim busy >= 85.00%: SUPPORTED ONLY BY FLAGGED PADDING; REFUTED WITHOUT IT"
    data = json.loads((out / "report.json").read_text())
    assert data["verdict"] == "supported" and data["without_padding"]["verdict"] == "refuted"
    assert data["headline_verdict"] == "supported only by flagged padding; refuted without it"
    assert data["padding_decides"] is True
    assert data["figure"] == pytest.approx(0.95, abs=0.005)
    assert data["without_padding"]["figure"] == pytest.approx(0.45, abs=0.005)
    page = (out / "report.html").read_text()
    headline = re.search(r'<p class="verdict ([^"]*)">(.*?)</p>\s*<p[^>]*>(.*?)</p>', page, re.S)
    assert headline, page
    assert "supported" not in headline[1].split()  # not in a pass's colour
    assert headline[2].startswith(
        "SUPPORTED ONLY BY FLAGGED PADDING; REFUTED WITHOUT IT &mdash; claim: busy &ge; 85.0%"
    )
    assert re.match(
        r"busy <strong>45\.\d\d%</strong> \[[^]]+\] without flagged padding, "
        r"<strong>95\.\d\d%</strong> \[[^]]+\] with it; ",
        headline[3],
    ), headline[3]


def test_a_report_whose_verdict_padding_does_not_change_reads_as_before(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    db, keys = ledger(tmp_path, collector_factory, BURN)
    out = tmp_path / "plain"
    result = report(db, keys, out, "2025-03-01", "2025-03-02", "0.4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(
        r"busy 95\.\d\d% \[.*\], coverage .*, claim 40\.00%: supported",
        result.stdout.splitlines()[1],  # after the line that says the data are simulated
    )
    data = json.loads((out / "report.json").read_text())
    assert (data["verdict"], data["headline_verdict"], data["padding_decides"]) == (
        "supported",
        "supported",
        False,
    )
    page = (out / "report.html").read_text()
    assert '<p class="verdict supported">Claim: busy &ge; 40.0% &mdash; SUPPORTED' in page
    assert 'padding-decides"' not in page


def test_query_of_a_claim_supported_only_by_flagged_padding_is_no_pass(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    db, _ = ledger(tmp_path, collector_factory, BURN)

    def query(claim: str, *more: str) -> subprocess.CompletedProcess[str]:
        period = ["--from=2025-03-01", "--to=2025-03-02"]
        return subprocess.run(
            [*gputally_command(), "query", f"--db={db}", *period, f"--claim={claim}", *more],
            capture_output=True,
            text=True,
            timeout=60,
        )

    text = query("0.85")
    assert text.returncode == 3, text.stdout + text.stderr
    simulated, _, first, second = text.stdout.splitlines()[:4]
    assert simulated.startswith("SIMULATED DATA: ")
    assert (
        first == "VERDICT     busy >= 85.00%: SUPPORTED ONLY BY FLAGGED PADDING; REFUTED WITHOUT IT"
    )
    assert re.match(r"\s+busy 45\.\d\d% \[.*\] without flagged padding, 95\.\d\d% ", second)
    as_json = query("0.85", "--json")
    assert as_json.returncode == 3, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["headline_verdict"] == "supported only by flagged padding; refuted without it"
    assert answer["padding_decides"] is True and answer["verdict"] == "supported"
    plain = query("0.4", "--json")
    assert plain.returncode == 0, plain.stderr
    answer = json.loads(plain.stdout)
    assert (answer["headline_verdict"], answer["padding_decides"]) == ("supported", False)
