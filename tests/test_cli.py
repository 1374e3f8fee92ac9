"""The `gputally` command: help, configuration precedence, errors, one-shot reads, the demo."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest

from gputally.cli.main import main

from .factories import gputally_command

COMMANDS = ("agent", "collector", "simulate", "demo")


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    command = gputally_command()
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_useful_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: gputally {command}" in text
    assert "--config FILE" in text and "--log-level" in text


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\b", text, re.M), command


def test_configuration_precedence_flag_env_file_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(
        '[collector]\nwindow = 12\nlag = 4\nexpected-gpus = 100\ngrpc_listen = "127.0.0.1:1"\n'
    )
    monkeypatch.setenv("GPUTALLY_COLLECTOR_LAG", "6")
    monkeypatch.setenv("GPUTALLY_COLLECTOR_EXPECTED_GPUS", "200")
    assert (
        main(["collector", "--config", str(config), "--expected-gpus", "300", "--print-config"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "window = 12.0" in lines  # from the file
    assert "lag = 6.0" in lines  # the environment beats the file
    assert "expected-gpus = 300" in lines  # the flag beats both
    assert 'grpc-listen = "127.0.0.1:1"' in lines
    assert "stale-after = 15.0" in lines  # the default


def test_logging_is_configured_like_every_other_option(tmp_path: Path) -> None:
    import os

    config = tmp_path / "agent.toml"
    config.write_text('log-format = "json"\nlog-level = "debug"\n')
    env = {**os.environ, "GPUTALLY_AGENT_LOG_LEVEL": "warning"}
    result = run("agent", "--config", str(config), "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    assert 'log-format = "json"' in result.stdout.splitlines()  # from the file
    assert 'log-level = "warning"' in result.stdout.splitlines()  # the environment beats it
    # and it takes effect: warnings (no collector listens on port 9) as JSON lines, no debug
    agent = run(
        *("agent", "--config", str(config), "--backend", "mock", "--duration", "1"),
        *("--collector", "127.0.0.1:9", "--state-dir", str(tmp_path / "state")),
        env=env,
    )
    assert agent.returncode == 0, agent.stderr
    records = [json.loads(line) for line in agent.stderr.splitlines()]
    assert records and {r["level"] for r in records} == {"warning"}
    assert records[0]["msg"] == "stream to collector lost"


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("windoe = 3\n", {}, "unknown key 'windoe'"),
        ("window = 'long'\n", {}, "window: not a number: 'long'"),
        ("window = [\n", {}, "not valid TOML"),
        ("", {"GPUTALLY_COLLECTOR_WINDOW": "-1"}, "must be positive"),
    ],
)
def test_bad_configuration_is_explained(
    tmp_path: Path, content: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(content)
    import os

    result = run("collector", "--config", str(config), "--print-config", env={**os.environ, **env})
    assert result.returncode == 2
    assert "configuration error" in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_agent_once_json_prints_a_complete_snapshot(tmp_path: Path) -> None:
    scenario = tmp_path / "a100.toml"
    scenario.write_text(
        '[cluster]\nnodes = 2\ngpus_per_node = 2\ngpu_model = "NVIDIA A100-SXM4-80GB"\n'
        "[[workload]]\ngpus = 1\nbusy = 0.7\nsm_active = 0.4\n"
    )
    result = run(
        "agent",
        "--backend",
        "mock",
        "--scenario",
        str(scenario),
        "--once",
        "--json",
        "--interval",
        "0.2",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["node"] == "node-00" and data["backend"] == "mock"
    busy, idle = data["gpus"]
    assert (
        busy["model"] == "NVIDIA A100-SXM4-80GB"
        and busy["busy"] == 0.7
        and busy["process_count"] == 1
    )
    assert idle["busy"] == 0.0 and idle["process_count"] == 0
    # A100 has no GPM: SM activity is spelled out as not available, never as 0
    assert busy["sm_active"] == {
        "not_available": "not supported on this model (GPM needs Hopper or newer)"
    }


def test_agent_on_a_machine_without_a_driver_says_so() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # a machine with a driver: the real backend must read the GPUs instead
        pynvml.nvmlShutdown()
        result = run("agent", "--backend", "nvml", "--once", "--json")
        assert result.returncode == 0 and json.loads(result.stdout)["backend"] == "nvml"
        return
    result = run("agent", "--backend", "nvml", "--once")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "NVML library not found" in result.stderr and "--backend mock" in result.stderr


def test_bad_scenario_file_is_a_clear_error(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text("[cluster]\nnodes = 2\ngpus_per_node = 8\n[[workload]]\nshare = 2\n")
    result = run("simulate", "--scenario", str(scenario), "--duration", "1")
    assert result.returncode == 2
    assert "bad.toml: workload[0].share: must be <= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_and_ends_with_the_cluster_figures() -> None:
    result = run("demo", "--duration", "7", "--window", "2", "--plain", timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "collector metrics at http://127.0.0.1:" in out
    assert re.search(r"busy \(NVML utilization.gpu\)\s+45\.0%", out), out
    assert re.search(r"SM active \(real work\)\s+30\.0%", out), out
    assert re.search(r"allocated \(process on GPU\)\s+50\.0%", out), out
    assert "GPUs: expected 32  reporting 32  lost 0" in out
    # and it ends with the same run read back from the collector's durable record
    assert "The same run from the collector's durable record" in out
    assert re.search(r"busy\s+45\.00%\s+45\.00%\s+45\.00%", out), out
    assert (
        "verified: every signature, every chain, every summary's plausibility and every "
        "checkpoint holds" in out
    )
    # against the demo's witness, which cosigned every entry
    assert re.search(r"witness witness\.demo\.example/gputally: cosigned \d+ entries", out), out
    assert "0 after them rest on the collector's signature alone" in out
    assert "witnessed: 1 of the 1 witnesses given cosigned it" in out


def test_query_answers_for_a_past_period_from_the_record(
    tmp_path: Path, collector_factory: Any
) -> None:
    import asyncio

    from gputally.agent.sim import scenario
    from gputally.agent.sim.fleet import run_fleet_virtual
    from gputally.collector.record.store import Record

    db = tmp_path / "record.db"
    from gputally.collector.record.keys import KeyStore

    keys = KeyStore(tmp_path / "keys", trust_on_first_use=True)
    collector = collector_factory(expected_gpus=64, record=Record(db), keys=keys)
    start = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    stats = asyncio.run(
        run_fleet_virtual(
            scenario.default(), collector.target, seconds=1200, start=start, interval=5
        )
    )
    collector.stop()
    # Every node covered time from the start to its last tick: the span the demo queries.
    assert (stats.observed_from, stats.observed_to) == (start, start + 1200)
    result = run(
        "query",
        "--db",
        str(db),
        "--from",
        "2026-01-01",
        "--to",
        "2026-01-01T00:20:00Z",
        "--claim",
        "0.2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (
        answer["measure"] == "busy" and answer["expected_gpus"] == 64
    )  # the inventory the collector declared
    assert answer["figure"] == pytest.approx(0.225, abs=0.005)  # 16 x 0.9 / 64
    assert answer["coverage"] == pytest.approx(0.5, abs=0.005) and answer["upper"] == pytest.approx(
        0.725, abs=0.005
    )
    assert answer["verdict"] == "supported" and answer["seen_gpus"] == 32
    # where that inventory came from, and that query checks no signature: said, not implied
    assert answer["inventory_source"].startswith("the collector's --expected-gpus, an unsigned")
    assert answer["verified"] is False
    assert answer["energy_kwh"] == pytest.approx((16 * 560 + 16 * 70) * 1195 / 3.6e6, rel=0.01)
    assert [row["name"] for row in answer["by_model"]] == ["NVIDIA H100 80GB HBM3"]
    text = run(
        "query",
        "--db",
        str(db),
        "--measure",
        "sm_active",
        "--claim",
        "0.3",
        "--expected-gpus",
        "32",
        "--by",
        "tenant,model",
    )
    assert text.returncode == 0, text.stderr
    assert re.search(r"claim\s+sm_active >= 30\.00%: SUPPORTED", text.stdout), text.stdout
    assert "coverage 100.0%" in text.stdout
    assert "unverified: `gputally audit report` checks" in text.stdout
    assert "an unsigned row of the record" not in text.stdout  # --expected-gpus was given
    # the breakdowns asked for, in that order: 32 GPUs x 1200 s, allocated busy SM effective
    figures = r"\s+32\s+10\.7\s+50\.00%\s+45\.00%\s+30\.00%\s+30\.00%\s+[0-9.]+\n"
    assert re.search(
        r"by tenant \(over the GPU-hours the tenant held.*\n.*\n\(unattributed\)"
        + figures
        + r"\nby model .*\n.*\nNVIDIA H100 80GB HBM3"
        + figures.removesuffix(r"\n"),
        text.stdout,
    ), text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "{tmp}/none.db"], "no such record"),
        (["--db", "{tmp}/junk.db"], "not a gputally record"),
        (["--db", "{tmp}/empty.db"], "holds no summary yet"),
        (
            ["--db", "{tmp}/empty.db", "--from", "yesterday", "--to", "now"],
            "cannot read 'yesterday' as a time",
        ),
        (["--db", "{tmp}/empty.db", "--from=-1h", "--to=-2h"], "--to must be after --from"),
        (["--db", "{tmp}/empty.db", "--from=-1h", "--to", "now"], "declares no inventory"),
        (["--db", "{tmp}/empty.db", "--claim", "85"], "write 85% as 0.85"),
        (["--by", "tenants"], "'tenants': the breakdowns are node, model, tenant, job"),
    ],
)
def test_query_errors_are_explained(tmp_path: Path, args: list[str], message: str) -> None:
    from gputally.collector.record.store import Record

    Record(tmp_path / "empty.db").close()
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    result = run("query", *(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["collector", "--lag", "-1", "--print-config"], "must not be negative"),
        (["collector", "--window", "inf", "--print-config"], "must be a finite number"),
        (["demo", "--grpc-port", "99999"], "a port is 0 to 65535"),
        (["agent", "--buffer-reports", "0"], "must be at least 1"),
        (["query", "--db", "{tmp}/empty.db", "--from", "nan", "--to", "now"], "between 1970"),
        (["query", "--db", "{tmp}/empty.db", "--from", "0", "--to", "1e12"], "year 9999"),
        (
            ["simulate", "--fast", "--start", "nan", "--days", "1", "--ledger", "{tmp}/s.db"],
            "--start: 'nan' is not a time",
        ),
        (
            [
                "simulate",
                "--fast",
                "--start",
                "2026-01-01",
                "--days",
                "1",
                "--ledger",
                "{tmp}/no/s.db",
            ],
            "no such directory",
        ),
        (
            ["collector", "--share-port", "--db", "{tmp}/shard.db", "--grpc-listen=127.0.0.1:0"],
            "--share-port: collectors sharing a port are shards of one cluster: give them one "
            "postgresql:// --db",
        ),
        (
            [
                *("audit", "report", "--ledger", "{tmp}/empty.db", "--keys", "{tmp}"),
                *("--from", "0", "--to", "2e9", "--expected-gpus", "1", "--out", "{tmp}/r"),
            ],
            "3,660 at most",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    from gputally.collector.record.store import Record

    Record(tmp_path / "empty.db").close()
    result = run(*(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    # one line says it all (argparse puts its usage before it)
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


def test_a_listener_that_cannot_be_opened_names_its_option() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            *("collector", "--db=", f"--metrics-listen=127.0.0.1:{port}"),
            "--grpc-listen=127.0.0.1:0",
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"gputally collector: --metrics-listen 127.0.0.1:{port}: Address already in use"
    )


def test_a_second_collector_on_the_same_grpc_port_is_refused() -> None:
    """grpc shares a port between processes that both ask for SO_REUSEPORT (its default): a
    second collector started by mistake would silently take half the agents' streams."""
    import socket

    with socket.socket() as taken:  # what another collector (or grpc server) holds
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            *("collector", "--db=", "--metrics-listen=127.0.0.1:0"),
            f"--grpc-listen=127.0.0.1:{port}",
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert result.stderr.strip() == (
        f"gputally collector: --grpc-listen 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.parametrize("option", ["--grpc-listen", "--metrics-listen", "both"])
def test_a_collector_that_cannot_listen_leaves_no_ledger_key_or_published_key(
    tmp_path: Path, option: str
) -> None:
    """A second collector started by mistake beside a running one (a ledger of its own, the
    same key directory) used to make its ledger and key, then replace the running one's
    published collector.vkey with its own before the port refused it: auditors reading the
    key directory got a key no checkpoint is signed with."""
    import socket

    keys = tmp_path / "keys"
    keys.mkdir()
    published = "gputally/running+01234567+AQ0RtCOrz5seU9pX+1SYrcP1XPUfiKywPqkJR3RLrcg5\n"
    (keys / "collector.vkey").write_text(published)  # the running collector's
    with socket.socket() as taken:  # the port the running collector holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = {"--grpc-listen": "127.0.0.1:0", "--metrics-listen": "127.0.0.1:0"}
        if option == "both":  # one free port given to both: the second cannot have it
            taken.close()
            listen = dict.fromkeys(listen, f"127.0.0.1:{port}")
        else:
            listen[option] = f"127.0.0.1:{port}"
        result = run(
            *("collector", f"--db={tmp_path / 'second.db'}", f"--keys={keys}"),
            *(f"{name}={at}" for name, at in listen.items()),
        )
    refused = "--grpc-listen" if option == "both" else option
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert result.stderr.strip() == (
        f"gputally collector: {refused} 127.0.0.1:{port}: Address already in use"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]
    assert sorted(p.name for p in keys.iterdir()) == ["collector.vkey"]
    assert (keys / "collector.vkey").read_text() == published


def test_a_collector_is_ready_only_once_it_listens_and_has_published_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics and /readyz answer before gRPC listens: until then /readyz says "starting",
    so that whoever waits for it (the demo's witness, a load balancer) finds the checkpoint
    key published and the gRPC port open. The gRPC start is held here until /readyz and the
    key directory were looked at."""
    import asyncio
    import threading
    import urllib.error
    import urllib.request

    from gputally.cli.options import Address
    from gputally.collector.live import server

    from .conftest import free_port

    keys = tmp_path / "keys"
    keys.mkdir()
    held, real_start = threading.Event(), server.start

    async def held_start(*args: Any, **kwargs: Any) -> Any:
        await asyncio.to_thread(held.wait, 30)
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(server, "start", held_start)
    metrics_port = free_port()
    settings = server.Settings(
        grpc_listen=Address("127.0.0.1", 0), metrics_listen=Address("127.0.0.1", metrics_port),
        expected_gpus=8, window=30.0, lag=3.0, stale_after=10.0, grace=5.0,
        db=str(tmp_path / "r.db"), keys=str(keys), trust_on_first_use=False, collector_key="",
        origin="gputally/test", checkpoint_interval=60.0,
    )  # fmt: skip

    def readyz() -> str:
        try:
            url = f"http://127.0.0.1:{metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode().strip())
        except urllib.error.HTTPError as error:  # 503: not ready, and why
            return str(error.read().decode().strip())
        except OSError:
            return ""  # not listening yet

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    running = threading.Thread(target=loop.run_until_complete, args=(server.serve(settings, stop),))
    running.start()
    try:
        for _ in range(300):  # bounded: 30 s
            if readyz():
                break
            time.sleep(0.1)
        assert readyz() == "not ready: starting"
        assert not (keys / "collector.vkey").exists()
        held.set()
        for _ in range(300):  # bounded: 30 s
            if readyz() == "ready":
                break
            time.sleep(0.1)
        assert readyz() == "ready" and (keys / "collector.vkey").exists()
    finally:
        held.set()
        loop.call_soon_threadsafe(stop.set)
        running.join(timeout=60)
        loop.close()


def _reporting(metrics_port: int) -> float:
    """A collector's gputally_cluster_gpus{state="reporting"}; -1 when it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            body = r.read().decode()
    except OSError:
        return -1.0
    for line in body.splitlines():
        if line.startswith('gputally_cluster_gpus{state="reporting"}'):
            return float(line.split()[-1])
    return -1.0


def test_shards_share_one_port_and_a_killed_shards_agents_move_to_the_other(
    tmp_path: Path,
) -> None:
    """--share-port: two collectors on one gRPC port (shards of one machine). The agents
    connect while only the first listens, the second binds the port beside it, the first is
    killed: its agents reconnect to the same address and land on the second. A collector
    without --share-port is still refused there."""
    import signal

    from .conftest import free_port

    port, metrics = free_port(), [free_port(), free_port()]
    running: list[subprocess.Popen[bytes]] = []

    def collector(metrics_port: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [*gputally_command(), "collector", "--share-port", "--db=", "--expected-gpus=32",
             f"--grpc-listen=127.0.0.1:{port}", f"--metrics-listen=127.0.0.1:{metrics_port}",
             "--stale-after=5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        running.append(process)
        for _ in range(300):  # bounded: 30 s
            if _reporting(metrics_port) >= 0:
                return process
            assert process.poll() is None, "the shard exited"
            time.sleep(0.1)
        raise AssertionError("the shard did not answer within 30 s")

    def wait_for(what: Callable[[], bool], seconds: float) -> bool:
        for _ in range(int(seconds / 0.2)):  # bounded
            if what():
                return True
            time.sleep(0.2)
        return False

    try:
        first = collector(metrics[0])
        fleet = subprocess.Popen(
            [*gputally_command(), "simulate", f"--collector=127.0.0.1:{port}", "--state-dir=",
             "--duration=120"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        running.append(fleet)
        # the default scenario's 4 nodes of 8 GPUs, all on the only shard listening
        assert wait_for(lambda: _reporting(metrics[0]) == 32, 40), _reporting(metrics[0])
        collector(metrics[1])  # binds the port beside the first
        assert _reporting(metrics[1]) == 0
        alone = run(
            *("collector", "--db=", "--metrics-listen=127.0.0.1:0"),
            f"--grpc-listen=127.0.0.1:{port}",
        )
        assert alone.returncode == 2 and "Address already in use" in alone.stderr, alone
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert wait_for(lambda: _reporting(metrics[1]) == 32, 60), _reporting(metrics[1])
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_a_second_collector_on_the_same_ledger_file_is_refused(tmp_path: Path) -> None:
    import os

    from gputally.collector.record.store import Record, RecordInUseError

    db = tmp_path / "ledger.db"
    first = Record(db)  # the collector that writes it
    try:
        result = run(
            *("collector", f"--db={db}", f"--keys={tmp_path / 'keys'}"),
            *("--grpc-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"),
        )
        assert result.returncode == 5 and "Traceback" not in result.stderr, result
        assert result.stderr.strip() == (
            f"gputally collector: {db}: another collector is writing this ledger (process "
            f"{os.getpid()} holds {db}.lock); an SQLite ledger has one collector: several "
            "collectors share a PostgreSQL --db"
        )
        with pytest.raises(RecordInUseError):
            Record(db)
        assert first.append("node-0", 1, 1, 0, 60 * 10**9, 1.0, b"summary")
        reader = first.reader()  # the auditor's reads take no lock
        assert reader.count() == 1
        reader.close()
    finally:
        first.close()
    Record(db).close()  # released with the writer: the next collector opens it
