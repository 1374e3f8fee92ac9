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
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.sim import scenario as scenario_mod
from gputally.agent.sim.fleet import run_fleet_virtual
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import COLLECTOR_KEY_FILE, Ledger, collector_key_text
from gputally.collector.record.store import Record
from gputally.v1.signing import public_bytes

from .conftest import Collector, require_binary
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
    # signed a minute after the last window, as a collector would
    assert Ledger(record, key, "gputally/test").checkpoint(START + 3 * 86400 + 60)
    (keys / COLLECTOR_KEY_FILE).write_text(collector_key_text("gputally/test", public_bytes(key)))
    return db, keys


HOUR = 3600
# (busy, SM activity) of one GPU for one hour; None: the GPU did not report that hour
Load = Callable[[int, int, int], tuple[float, float] | None]


def signed_ledger(
    tmp_path: Path,
    load: Load,
    *,
    start: int,
    hours: int,
    nodes: int = 4,
    gpus: int = 4,
    backend: str = "nvml",
    tenant: Callable[[int, int, int], str] | None = None,
    checkpoint_every: int = 1,
) -> tuple[Path, Path]:
    """A ledger made by hand, signed as agents sign: `nodes` x `gpus` GPUs, one summary per
    node per hour from `start`, each GPU at load(node, gpu, hour) for the whole hour, SM
    activity measured throughout; checkpointed a minute after every `checkpoint_every` hours
    (0: only at the end). Exact inputs, so exact figures."""
    from gputally.agent.chain import SummarySigner
    from gputally.v1 import telemetry_pb2 as pb

    from .factories import empty_ledger

    keys, store, record, book = empty_ledger(tmp_path)
    signers = []
    for n in range(nodes):
        signer = SummarySigner(Ed25519PrivateKey.generate(), f"node-{n:02d}")
        store.enroll(signer.node, signer.public_key)
        signers.append(signer)
    rows = []
    for hour in range(hours):
        t0 = start + hour * HOUR
        for n, signer in enumerate(signers):
            summary = pb.Summary(
                window_start_unix_nano=t0 * 10**9,
                window_end_unix_nano=(t0 + HOUR) * 10**9,
                backend=backend,
            )
            for g in range(gpus):
                at = load(n, g, hour)
                if at is None:
                    continue
                busy, sm = at
                gpu = summary.gpus.add(
                    index=g,
                    uuid=f"GPU-{n:02d}-{g}",
                    serial=f"SN{n:02d}{g}",
                    model="NVIDIA H100 80GB HBM3",
                    present_seconds=HOUR,
                    allocated_seconds=HOUR if busy > 0 else 0.0,
                    busy_seconds=busy * HOUR,
                    sm_active_seconds=sm * HOUR,
                    sm_measured_seconds=HOUR,
                    effective_seconds=sm * HOUR,
                    energy_joules=400.0 * HOUR,
                )
                who = tenant(n, g, hour) if tenant is not None else "lab"
                if who:
                    gpu.attribution.source, gpu.attribution.tenant = "static", who
                    gpu.attribution.job = f"{who}-job"
            signed = signer.sign(summary)
            rows.append(
                (
                    signer.node,
                    1,
                    hour + 1,
                    summary.window_start_unix_nano,
                    summary.window_end_unix_nano,
                    float(t0 + HOUR),
                    signed.SerializeToString(),
                )
            )
        if (checkpoint_every and (hour + 1) % checkpoint_every == 0) or hour == hours - 1:
            record.append_many(rows)
            rows = []
            assert book.checkpoint(float(t0 + HOUR + 60))  # a minute after the window
    record.close()
    return tmp_path / "ledger.db", keys


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
    # per day (busy, real work), per week, coverage, node x day (busy, real work), per-GPU
    # distributions (busy, real work), padding, energy
    assert page.count("<svg") == 9
    assert re.search(r"<h2>Per tenant</h2>.*?<td>alice</td><td>192\.0</td>", page, re.S)
    assert re.search(
        r'data-measure="busy">Was a program running .*?<b class="refuted">No: 50\.', page
    )
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
    p0, p1 = START + 5400.25, START + 86400 + 40000  # a phase cutting through both too
    rollup = Rollup(start, end, 8, [("phase", p0, p1)])
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
    # the phase, added up in the same pass (by the workers too): as if computed alone
    phase = rollup.phases["phase"].period()
    alone = compute(record.summaries(int(p0 * 1e9), int(p1 * 1e9)), p0, p1, 8)
    assert phase.summaries == alone.summaries > 0
    for name in ("busy", "sm_active"):
        assert rounded(as_dict(phase, name, 0.6)) == rounded(as_dict(alone, name, 0.6))
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
    assert re.search(r'data-measure="busy">.*?<b class="supported">Yes: 95\.\d\d% ', page)
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


# -- the evidence package ---------------------------------------------------------------------

MAR_1 = 1_772_323_200  # 2026-03-01T00:00:00Z


def audit_report(
    db: Path, keys: Path, out: Path, *args: str, start: str = "2026-03-01", end: str = "2026-03-03"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *gputally_command(),
            *("audit", "report", f"--ledger={db}", f"--keys={keys}"),
            *(f"--from={start}", f"--to={end}", f"--out={out}"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def issue_12(tmp_path: Path, **options: object) -> tuple[Path, Path]:
    """Issue 12's cluster: 16 GPUs (4 nodes of 4) for two days, every one at busy 85% with SM
    activity 55%, measured throughout."""
    return signed_ledger(tmp_path, lambda n, g, h: (0.85, 0.55), start=MAR_1, hours=48, **options)  # type: ignore[arg-type]


def test_the_work_measure_is_judged_beside_busy(tmp_path: Path) -> None:
    """Busy 85% supports "85%"; SM activity 55% refutes it: both verdicts, side by side, in
    plain words on the page, in the JSON and on stdout."""
    db, keys = issue_12(tmp_path)
    out = tmp_path / "r"
    ran = audit_report(db, keys, out, "--expected-gpus=16", "--claim=0.85")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines()[:2] == [
        "busy 85.00% [85.00%, 85.00%], coverage 100.0%, claim 85.00%: supported",
        "sm_active 55.00% [55.00%, 55.00%], claim 85.00%: refuted (the real-work measure)",
    ]
    data = json.loads((out / "report.json").read_text())
    assert {m: (v["figure"], v["verdict"]) for m, v in data["verdicts"].items()} == {
        "allocated": (1.0, "supported"),
        "busy": (0.85, "supported"),
        "sm_active": (0.55, "refuted"),
        "effective": (0.55, "refuted"),
    }
    page = (out / "report.html").read_text()
    verdicts = page[
        page.index('<section id="verdicts">') : page.index('<section id="limitations">')
    ]
    assert (
        '<p class="answer" data-measure="sm_active">Were the GPUs doing real work at least 85% of '
        'the time? <b class="refuted">No: 55.00% (between 55.00% and 55.00%)</b></p>'
    ) in verdicts
    assert (
        '<p class="answer" data-measure="busy">Was a program running on the GPUs at least 85% of '
        "the time? <small>(the claim's measure)</small> "
        '<b class="supported">Yes: 85.00% (between 85.00% and 85.00%)</b></p>'
    ) in verdicts
    # every measure's row, side by side: its figure, range and answer
    table = dict(re.findall(r'<tr data-measure="(\w+)".*?<td>([\d.]+%)</td>', verdicts))
    assert table == {
        "allocated": "100.00%",
        "busy": "85.00%",
        "sm_active": "55.00%",
        "effective": "55.00%",
    }
    assert "sm_active" not in re.sub(
        r"<code>sm_active</code>|data-measure=\"sm_active\"", "", verdicts
    )


def test_files_manifest_and_exports_are_complete(tmp_path: Path) -> None:
    """Every file is in MANIFEST.sha256 and `sha256sum -c` agrees; gpus.csv has node, UUID,
    serial, coverage and every measure; node_days.csv one row per node and day; report.json
    holds the per-GPU rows and the node x day matrix too."""
    db, keys = issue_12(tmp_path)
    out = tmp_path / "r"
    assert audit_report(db, keys, out, "--expected-gpus=16", "--claim=0.85").returncode == 0
    names = {
        "report.json",
        "report.html",
        "daily.csv",
        "weeks.csv",
        "phases.csv",
        "nodes.csv",
        "models.csv",
        "tenants.csv",
        "jobs.csv",
        "gpus.csv",
        "node_days.csv",
    }
    assert {p.name for p in out.iterdir()} == names | {"MANIFEST.sha256"}
    listed = [line.split("  ", 1) for line in (out / "MANIFEST.sha256").read_text().splitlines()]
    assert {name for _, name in listed} == names
    sha256sum = require_binary("sha256sum", "coreutils")
    check = subprocess.run(
        [sha256sum, "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0 and check.stdout.count(": OK") == len(names), check.stdout
    with (out / "models.csv").open("a") as handle:
        handle.write("tampered\n")
    check = subprocess.run(
        [sha256sum, "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 1 and "models.csv: FAILED" in check.stdout
    gpus = rows_of(out / "gpus.csv")
    assert len(gpus) == 16
    first = gpus[0]
    assert (first["node"], first["uuid"], first["serial"], first["model"]) == (
        "node-00",
        "GPU-00-0",
        "SN000",
        "NVIDIA H100 80GB HBM3",
    )
    assert float(first["coverage"]) == 1.0 and float(first["gpu_hours"]) == 48.0
    assert [float(first[m]) for m in ("allocated", "busy", "sm_active", "effective")] == [
        1.0,
        0.85,
        0.55,
        0.55,
    ]
    assert float(first["busy_lower"]) == float(first["busy_upper"]) == 0.85
    node_days = rows_of(out / "node_days.csv")
    assert [(r["date"], r["node"]) for r in node_days] == [
        (day, f"node-0{n}") for day in ("2026-03-01", "2026-03-02") for n in range(4)
    ]
    assert {(r["gpus"], r["coverage"], r["busy"], r["sm_active"]) for r in node_days} == {
        ("4", "1.0", "0.85", "0.55")
    }
    data = json.loads((out / "report.json").read_text())
    assert len(data["per_gpu"]) == 16 and len(data["node_days"]) == 8
    assert data["per_gpu"][0]["serial"] == "SN000" and data["node_days"][0]["busy"] == 0.85
    assert data["methodology"] and data["limitations"]
    daily = rows_of(out / "daily.csv")
    assert [(r["date"], r["busy"], r["sm_active"], r["sm_active_verdict"]) for r in daily] == [
        ("2026-03-01", "0.85", "0.55", "refuted"),
        ("2026-03-02", "0.85", "0.55", "refuted"),
    ]
    from gputally.collector.audit.report import _SPAN_FIELDS

    assert list(rows_of(out / "weeks.csv")[0]) == [
        "week",
        "partial",
        "verdict_caveat",
        *_SPAN_FIELDS,
    ]
    with (out / "phases.csv").open() as handle:  # no phase: a header, the same as with some
        assert handle.read().splitlines() == [
            ",".join(
                [
                    "name",
                    *("from", "to", "days", "gpus", "coverage"),
                    *(
                        f"{m}{s}"
                        for m in ("allocated", "busy", "sm_active", "effective")
                        for s in ("", "_lower", "_upper", "_without_padding", "_verdict")
                    ),
                    "energy_kwh",
                    "padding_gpu_hours",
                ]
            )
        ]


def test_the_evidence_to_cite_is_exact(tmp_path: Path) -> None:
    """Tool and version, the command as given, the ledger file's SHA-256, the newest
    checkpoint in full, the keys' fingerprints: each the very value, on the first screen."""
    import base64
    import hashlib
    import shlex
    import sqlite3

    from gputally.collector.record.ledger import read_collector_key
    from gputally.v1 import __version__
    from gputally.v1.signing import key_fingerprint

    db, keys = issue_12(tmp_path)
    out = tmp_path / "r"
    args = ("--expected-gpus=16", "--claim=0.85")
    assert audit_report(db, keys, out, *args).returncode == 0
    evidence = json.loads((out / "report.json").read_text())["evidence"]
    assert evidence["tool"] == f"gputally {__version__}"
    assert shlex.split(evidence["command"]) == [
        "gputally",
        "audit",
        "report",
        f"--ledger={db}",
        f"--keys={keys}",
        "--from=2026-03-01",
        "--to=2026-03-03",
        f"--out={out}",
        *args,
    ]
    assert evidence["ledger"] == {
        "path": str(db),
        "bytes": db.stat().st_size,
        "sha256": hashlib.sha256(db.read_bytes()).hexdigest(),
    }
    with sqlite3.connect(db) as con:
        size, root, note = con.execute(
            "SELECT size, root, note FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
    root_b64 = base64.b64encode(root).decode() if isinstance(root, bytes) else root
    checkpoint = evidence["checkpoint"]
    assert (checkpoint["size"], checkpoint["note"], checkpoint["root"]) == (192, note, root_b64)
    assert size == 192 and evidence["entries"] == 192 and evidence["root"] == root_b64
    name, raw = read_collector_key(keys)
    assert evidence["collector_key"] == {"name": name, "fingerprint": key_fingerprint(raw)}
    enrolled = {
        p.stem: key_fingerprint(base64.b64decode(p.read_text().split()[-1]))
        for p in keys.glob("*.pub")
    }
    assert evidence["node_keys"] == {node: [fp] for node, fp in sorted(enrolled.items())}
    assert evidence["keys"] == 5 and evidence["cosignatures"] == []
    page = (out / "report.html").read_text()
    first = page[
        page.index('<section id="evidence">') : page.index(
            "</section>", page.index('<section id="evidence">')
        )
    ]
    for value in (
        evidence["tool"],
        evidence["ledger"]["sha256"],
        checkpoint["root"],
        "size 192",
        "5 public keys",
    ):
        assert value in first, value
    assert shlex.join(["gputally", "audit", "report", f"--ledger={db}"]) in html_text(first)
    assert html_escape(note) in page  # the signed note itself, in full, below
    kinds = [item["kind"] for item in json.loads((out / "report.json").read_text())["limitations"]]
    # recording times: the collector's own checkpoint time, no witness's
    assert kinds == ["coverage", "witnesses", "claimed_times", "trust"]


def html_text(fragment: str) -> str:
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_more_gpus_than_declared_is_never_a_green_pass(tmp_path: Path) -> None:
    """12 declared, 16 reporting at busy 85%: over the 12, busy would be 113.33%. The figures
    are over the 16 seen, and the pass they give is qualified everywhere."""
    db, keys = issue_12(tmp_path)
    out = tmp_path / "r"
    ran = audit_report(db, keys, out, "--expected-gpus=12", "--claim=0.85")
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "busy 85.00% [85.00%, 85.00%], coverage 100.0%, claim 85.00%: supported"
    assert lines[2] == (
        "NOT A PLAIN VERDICT: the figures are over the 16 GPUs seen, not the 12 declared: the "
        "declared inventory is wrong, and no verdict here is one about it; over the 12 "
        "declared, busy would be 113.33%, more than any GPU can do"
    )
    data = json.loads((out / "report.json").read_text())
    assert data["inventory"]["over_declared"]["busy"] == pytest.approx(16 * 0.85 / 12)
    first = data["limitations"][0]
    assert first["kind"] == "over_inventory"
    assert first["what"] == "More GPUs than declared: 16 reported, 12 declared."
    assert "busy 113.33%" in first["why"]
    page = (out / "report.html").read_text()
    verdicts = page[
        page.index('<section id="verdicts">') : page.index('<section id="limitations">')
    ]
    assert 'class="supported"' not in verdicts  # no pass's green anywhere in the verdicts
    assert "<td>Yes</td>" not in verdicts  # nor a plain Yes, with or without padding
    assert '<b class="caveat">Yes, but not a plain yes: 85.00%' in verdicts
    assert "16 GPUs reported where 12 were declared" in verdicts and "113.33%" in verdicts


def forty_days(n: int, g: int, hour: int) -> tuple[float, float] | None:
    """1 March to 10 April: busy 90% (SM 60%) until 20 March 12:00, then half the GPUs at 50%
    (SM 30%) and the rest idle; node-03 silent on 11 and 12 March."""
    if n == 3 and 10 * 24 <= hour < 12 * 24:
        return None
    if hour < 19 * 24 + 12:
        return (0.9, 0.6)
    return (0.5, 0.3) if g < 2 else (0.0, 0.0)


def test_phases_and_weeks_show_the_drop_at_the_acceptance_boundary(tmp_path: Path) -> None:
    """One report over 1 March to 10 April gives 55.56% busy, refuted; the acceptance phase
    (to 20 March 12:00) gives 87.69%, supported, and the phase after it 25%: each phase has its
    figures and verdicts, each ISO week too, and every plot over time marks the boundary."""
    db, keys = signed_ledger(tmp_path, forty_days, start=MAR_1, hours=40 * 24, checkpoint_every=24)
    out = tmp_path / "r"
    phases = (
        "--phase=acceptance=2026-03-01..2026-03-20T12:00",
        "--phase=after=2026-03-20T12:00..2026-04-10",
    )
    ran = audit_report(
        db, keys, out, "--expected-gpus=16", "--claim=0.85", *phases, end="2026-04-10"
    )
    assert ran.returncode == 0, ran.stderr
    # acceptance: 468 hours of 16 GPUs, 4 of them silent for 48; after: 492 hours, 8 at 50%
    accepted = 0.9 * (16 * 468 - 4 * 48) / (16 * 468)
    total = (0.9 * (16 * 468 - 4 * 48) + 0.5 * 8 * 492) / (16 * 960)
    assert ran.stdout.splitlines()[0] == (
        f"busy {total:.2%} [{total:.2%}, {total + 192 / 15360:.2%}], coverage 98.8%, claim 85.00%: refuted"
    )
    assert ran.stdout.splitlines()[2:4] == [
        f"phase acceptance 2026-03-01T00:00:00Z..2026-03-20T12:00:00Z: busy {accepted:.2%} "
        f"[{accepted:.2%}, {accepted + 192 / 7488:.2%}], claim 85.00%: supported; sm_active "
        f"{accepted / 1.5:.2%} [{accepted / 1.5:.2%}, {accepted / 1.5 + 192 / 7488:.2%}], claim 85.00%: refuted",
        "phase after 2026-03-20T12:00:00Z..2026-04-10T00:00:00Z: busy 25.00% [25.00%, 25.00%], "
        "claim 85.00%: refuted; sm_active 15.00% [15.00%, 15.00%], claim 85.00%: refuted",
    ]
    data = json.loads((out / "report.json").read_text())
    acceptance, after = data["phases"]
    assert (acceptance["name"], acceptance["from"], acceptance["to"]) == (
        "acceptance",
        "2026-03-01T00:00:00Z",
        "2026-03-20T12:00:00Z",
    )
    assert acceptance["figure"] == pytest.approx(accepted) and acceptance["verdict"] == "supported"
    assert after["figure"] == pytest.approx(0.25) and after["verdict"] == "refuted"
    assert data["figure"] == pytest.approx(total) and data["verdict"] == "refuted"
    from gputally.collector.audit.report import _SPAN_FIELDS

    phase_rows = rows_of(out / "phases.csv")
    assert list(phase_rows[0]) == ["name", *_SPAN_FIELDS]
    assert [(r["name"], r["busy_verdict"]) for r in phase_rows] == [
        ("acceptance", "supported"),
        ("after", "refuted"),
    ]
    assert [float(r["busy"]) for r in phase_rows] == pytest.approx([accepted, 0.25])
    # ISO weeks: Sunday 1 March is W09's last day; W15 holds 6 to 9 April
    weeks = rows_of(out / "weeks.csv")
    silent = 0.9 * (16 * 168 - 4 * 48) / (16 * 168)  # W11 holds node-03's silent days
    assert [(w["week"], w["partial"], float(w["days"])) for w in weeks] == [
        ("2026-W09", "True", 1.0),
        ("2026-W10", "False", 7.0),
        ("2026-W11", "False", 7.0),
        ("2026-W12", "False", 7.0),
        ("2026-W13", "False", 7.0),
        ("2026-W14", "False", 7.0),
        ("2026-W15", "True", 4.0),
    ]
    assert [float(w["busy"]) for w in weeks] == pytest.approx(
        [0.9, 0.9, silent, (4.5 * 0.9 + 2.5 * 0.25) / 7, 0.25, 0.25, 0.25]
    )
    page = (out / "report.html").read_text()
    # the boundary, 19.5 of 40 days in, on each of the 7 plots over time, nowhere else
    x = 44 + (720 - 88) * 19.5 / 40
    marks = re.findall(
        r'<line x1="([\d.]+)" x2="[\d.]+" y1="[\d.]+" y2="[\d.]+" class="phase">', page
    )
    assert marks == [f"{x:.1f}"] * 7
    assert page.count("\u25c2 acceptance after \u25b8</text>") == 7
    # node-03 silent for two days: "no data" there, in each heatmap, never a 0% colour
    nodata = re.findall(r'<rect [^>]*class="cell nodata"><title>([^<]*)</title>', page)
    assert nodata == [f"node-03 2026-03-{d}: no data (nothing observed)" for d in (11, 12)] * 2
    verdicts = page[
        page.index('<section id="verdicts">') : page.index('<section id="limitations">')
    ]
    assert re.search(r"<td>acceptance</td>.*?87\.69% <b class=\"supported\">Yes</b>", verdicts)
    assert re.search(r"<td>after</td>.*?25\.00% <b class=\"refuted\">No</b>", verdicts)


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ("acceptance", "write NAME=FROM..TO"),
        ("=2026-03-01..2026-03-02", "write NAME=FROM..TO"),
        ("a=2026-03-01", "write NAME=FROM..TO"),
        ("a=2026-03-02..2026-03-01", "a: it must end after it starts"),
        (
            "a=2026-02-28..2026-03-02",
            "a: 2026-02-28T00:00:00Z..2026-03-02T00:00:00Z is not within the period",
        ),
        ("a=2026-03-01..soon", "a: cannot read 'soon' as a time"),
    ],
)
def test_a_phase_that_cannot_be_is_one_line_and_exit_status_2(
    tmp_path: Path, phase: str, message: str
) -> None:
    Record(tmp_path / "empty.db").close()
    ran = audit_report(
        tmp_path / "empty.db", tmp_path, tmp_path / "r", "--expected-gpus=1", f"--phase={phase}"
    )
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("gputally audit report: --phase ") and message in line, line


def test_two_phases_of_one_name_are_refused(tmp_path: Path) -> None:
    Record(tmp_path / "empty.db").close()
    twice = ("--phase=a=2026-03-01..2026-03-02", "--phase=a=2026-03-02..2026-03-03")
    ran = audit_report(tmp_path / "empty.db", tmp_path, tmp_path / "r", "--expected-gpus=1", *twice)
    assert ran.returncode == 2
    assert ran.stderr.strip() == "gputally audit report: --phase a: two phases have this name"


def test_summaries_recorded_long_after_their_window_are_a_limitation(tmp_path: Path) -> None:
    """Two days of summaries checkpointed once, a minute after the last window: by the
    collector's checkpoint times, the summaries of the first 42 hours were recorded more than
    6 hours late, the first ones 47 hours late."""
    db, keys = issue_12(tmp_path, checkpoint_every=0)
    out = tmp_path / "r"
    assert audit_report(db, keys, out, "--expected-gpus=16").returncode == 0
    data = json.loads((out / "report.json").read_text())
    recording = data["evidence"]["recording"]
    assert (recording["summaries"], recording["late"], recording["max_delay_s"]) == (
        192,
        168,
        47 * 3600 + 60,
    )
    (late,) = [item for item in data["limitations"] if item["kind"] == "late"]
    assert late["what"] == "168 of 192 records arrived late."
    assert late["why"] == (
        "Recorded more than 6.0 hours after the time they describe (longest 47.0 hours, by the "
        "collector's own checkpoint times): history written after the fact."
    )


# -- the parts, from known inputs ----------------------------------------------------------------


def test_histogram_bins_are_exact_at_their_edges() -> None:
    """Bin i holds [5i%, 5(i+1)%); the last holds [95%, 100%]: 85% is in 85%-90% (and so is
    the 85% float arithmetic leaves at 84.99999999999999%), 100% in the last bin."""
    from gputally.collector.audit.report import histogram_bins

    values = [0.85] * 16 + [0.8499999999999999, 1.0, 0.0, 0.95, 0.9499, 0.05, -0.01]
    bins = histogram_bins(values)
    assert len(bins) == 20 and bins[0][:2] == (0.0, 0.05) and bins[-1][:2] == (0.95, 1.0)
    counts = {round(low * 100): count for low, _, count in bins if count}
    assert counts == {0: 2, 5: 1, 85: 17, 90: 1, 95: 2}


def test_the_histogram_draws_each_bin_between_its_labelled_edges() -> None:
    from gputally.collector.audit.report import histogram

    svg = histogram("per GPU", [0.85] * 16 + [1.0], claim=0.85)
    edges = {
        float(e): float(x)
        for x, e in re.findall(r'<text x="([\d.]+)" [^>]*data-edge="([\d.]+)"', svg)
    }
    assert sorted(edges) == [5.0 * i for i in range(21)]
    bars = {
        label: (float(x), float(width), title)
        for x, width, label, title in re.findall(
            r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)" [^>]*data-bin="([^"]+)"><title>([^<]+)</title>',
            svg,
        )
    }
    x, width, title = bars["85%\u201390%"]
    assert title == "85%\u201390%: 16 GPUs (from 85% up to but not including 90%)"
    assert x == pytest.approx(edges[85.0] + 0.5, abs=0.06)
    assert x + width == pytest.approx(edges[90.0] - 0.5, abs=0.11)
    assert bars["95%\u2013100%"][2] == "95%\u2013100%: 1 GPU (from 95% up to and including 100%)"
    assert bars["80%\u201385%"][2].startswith("80%\u201385%: 0 GPUs")
    claim = re.search(r'<line x1="([\d.]+)" x2="[\d.]+" [^>]*class="claim"/>', svg)
    assert claim and float(claim[1]) == pytest.approx(edges[85.0], abs=0.06)


def test_the_heatmap_has_a_legend_and_no_data_is_not_zero() -> None:
    from gputally.collector.audit.report import LEGEND_STEPS, TimeAxis, heatmap, shade

    days = [("2026-03-01", 0.0, 86400.0), ("2026-03-02", 86400.0, 172800.0)]
    svg = heatmap("x", {"n1": {"2026-03-01": (0.0, 1.0)}}, TimeAxis(0.0, 172800.0), days)
    cells = re.findall(r'<rect [^>]*fill="([^"]+)" class="(cell[^"]*)"><title>([^<]+)</title>', svg)
    assert cells == [
        (shade(0.0), "cell", "n1 2026-03-01: 0.0% (100% of the time observed)"),
        ("url(#nodata)", "cell nodata", "n1 2026-03-02: no data (nothing observed)"),
    ]
    legend = re.findall(
        r'<rect [^>]*fill="([^"]+)" class="legend[^"]*"/><text [^>]*>([^<]+)</text>', svg
    )
    assert legend == [(shade(s), f"{s:.0%}") for s in LEGEND_STEPS] + [
        ("url(#nodata)", "no data (nothing observed that day)")
    ]
    assert len({shade(s) for s in LEGEND_STEPS}) == len(LEGEND_STEPS)


def hand_made(*, sm: bool = True, **fields: Any) -> dict[str, Any]:
    """A report of one GPU's hour at busy 50% (SM activity 25%, measured, or not measured),
    with a Verification filled by hand."""
    from gputally.collector.audit.figures import Rollup
    from gputally.collector.audit.report import build
    from gputally.collector.audit.verify import Verification
    from gputally.v1 import telemetry_pb2 as pb

    summary = pb.Summary(
        window_start_unix_nano=MAR_1 * 10**9, window_end_unix_nano=(MAR_1 + HOUR) * 10**9
    )
    summary.gpus.add(
        index=0,
        uuid="GPU-a",
        present_seconds=HOUR,
        busy_seconds=HOUR / 2,
        sm_active_seconds=HOUR / 4 if sm else 0.0,
        sm_measured_seconds=HOUR if sm else 0.0,
        busy_unmeasured_seconds=0.0 if sm else HOUR / 2,
    )
    summary.gpus[0].attribution.source, summary.gpus[0].attribution.tenant = "static", "lab"
    rollup = Rollup(MAR_1, MAR_1 + HOUR, 1)
    rollup.add_summary("n1", summary)
    verification = Verification(
        entries=10, checkpoints=1, origin="example.org/log", root=b"\x01" * 32, **fields
    )
    return build(rollup, "busy", 0.4, verification)


def test_witness_cosignatures_are_cited_and_their_absence_is_a_limitation() -> None:
    from gputally.collector.audit.report import render_html

    note = "example.org/log\n10\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\n\u2014 example.org/log abc=\n"
    alone = hand_made(checkpoint_note=note)
    assert [i["kind"] for i in alone["limitations"]] == ["coverage", "witnesses", "trust"]
    assert "No witness cosigned this ledger's checkpoints." in render_html(alone)
    cosigned = [{"witness": "w.example", "key": "w.example+1234+AAAA", "size": 8, "time": MAR_1}]
    witnessed = hand_made(checkpoint_note=note, cosignatures=cosigned, witnessed=8)
    kinds = [i["kind"] for i in witnessed["limitations"]]
    assert kinds == ["coverage", "unwitnessed_tail", "trust"]
    assert witnessed["limitations"][1]["what"] == "2 newest records not yet witnessed."
    page = render_html(witnessed)
    assert "<td>w.example</td><td>8</td><td>2026-03-01T00:00:00Z</td>" in page
    assert "<dt>Witnesses</dt><dd>1 cosigned, up to record 8</dd>" in page
    unsigned = hand_made()  # no checkpoint at all
    assert "unsigned_tail" in [i["kind"] for i in unsigned["limitations"]]


def test_the_ledger_and_its_wal_are_hashed_apart(tmp_path: Path) -> None:
    import hashlib

    from gputally.collector.audit.report import evidence
    from gputally.collector.audit.verify import Verification

    ledger_file, wal = tmp_path / "l.db", tmp_path / "l.db-wal"
    ledger_file.write_bytes(b"ledger bytes")
    got = evidence(Verification(), ledger_file, None)
    assert got["ledger"]["sha256"] == hashlib.sha256(b"ledger bytes").hexdigest()
    assert got["ledger_wal"] is None
    wal.write_bytes(b"recent writes")
    got = evidence(
        Verification(), ledger_file, None, ["/usr/bin/gputally", "audit", "report", "--out=my dir"]
    )
    assert got["ledger_wal"] == {
        "path": str(wal),
        "bytes": 13,
        "sha256": hashlib.sha256(b"recent writes").hexdigest(),
    }
    assert got["command"] == "gputally audit report '--out=my dir'"


def test_real_work_not_measured_is_said_so_never_shown_as_zero() -> None:
    """A GPU without SM activity counter, busy 50%: real work lies between 0% and 50%, and the
    page says it was not measured rather than "0.00%"."""
    from gputally.collector.audit.report import verdicts_html

    r = hand_made(sm=False)
    v = r["verdicts"]["sm_active"]
    assert (v["lower"], v["upper"], v["verdict"]) == (0.0, 0.5, "undetermined")
    assert (
        'Were the GPUs doing real work at least 40% of the time? <b class="undetermined">'
        "Cannot tell: not measured on these GPUs (between 0.00% and 50.00%)</b>"
    ) in verdicts_html(r)
    (unmeasured,) = [i for i in r["limitations"] if i["kind"] == "work_unmeasured"]
    assert unmeasured["what"] == "Real work measured in 0.00% of the time only."


def test_findings_left_out_and_findings_beside_the_figures_are_told_apart() -> None:
    """An overlap is left out of every figure; a key enrolled late is reported beside them."""
    from gputally.collector.audit.enrolment import ENROLLED_LATE
    from gputally.collector.audit.report import render_html
    from gputally.collector.audit.verify import OVERLAP, Problem

    r = hand_made(
        problems=[
            Problem(3, "node n1's window for GPU-a overlaps its earlier one", OVERLAP),
            Problem(
                None, "node n1: its key was first enrolled after the period began", ENROLLED_LATE
            ),
        ]
    )
    found = {i["kind"]: i["what"] for i in r["limitations"]}
    assert found["findings"] == "1 record left out."
    assert found["other_findings"] == "Findings: 1 enrolled late."
    page = render_html(r)
    findings = page[page.index('<div class="findings">') :]
    left_out, beside = findings.split("Findings</b> beside the figures")
    assert "<b>1 overlap</b>" in left_out and "enrolled late" not in left_out
    assert "<b>1 enrolled late</b>: node n1: its key was first enrolled" in beside
