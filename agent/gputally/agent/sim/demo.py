"""``gputally demo``: a collector process plus a simulated cluster, watched live.

The figures on screen are read from the collector's ``/metrics`` over HTTP, exactly what a
Prometheus server would scrape, so the demo shows the product as deployed, not internals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gputally.v1.accounting import RECORDED_MEASURES

from ..padding import PaddingRules
from .fleet import FleetStats, run_fleet, run_fleet_virtual
from .scenario import Scenario

# What each measure's line says on screen (the node table shows the first three).
_LABELS = {
    "busy": "busy (NVML utilization.gpu)",
    "sm_active": "SM active (real work)",
    "allocated": "allocated (process on GPU)",
    "effective": "effective (SM, else est.)",
}
# The demo's record keeps short summary windows, so that a short run still fills some whole.
SUMMARY_WINDOW_S = 10.0


def summary_window(duration: float | None) -> float:
    """10 s, or less for a run too short to fill a few windows of 10 s."""
    return SUMMARY_WINDOW_S if duration is None else float(max(1, min(10, int(duration // 3))))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gputally_command() -> list[str]:
    # The console script installed next to this interpreter; else the module form.
    script = Path(sys.executable).with_name("gputally")
    if script.exists():
        return [str(script)]
    found = shutil.which("gputally")
    return [found] if found else [sys.executable, "-m", "gputally.cli"]


def scrape(url: str, timeout: float = 2.0) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Metric name -> {sorted label pairs -> value}."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _get(
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def _bar(ratio: float, width: int = 30) -> str:
    filled = round(max(0.0, min(ratio, 1.0)) * width)
    return "#" * filled + "." * (width - filled)


def render(
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]],
    url: str,
    elapsed: float,
    scenario: Scenario,
) -> str:
    expected = int(_get(metrics, "gputally_cluster_gpus", state="expected"))
    reporting = int(_get(metrics, "gputally_cluster_gpus", state="reporting"))
    lost = int(_get(metrics, "gputally_cluster_gpus", state="lost"))
    window = _get(metrics, "gputally_cluster_window_seconds")
    lines = [
        f"gputally demo - {scenario.name}: {scenario.nodes} nodes x {scenario.gpus_per_node} "
        f"{scenario.gpu_model}   t={elapsed:5.0f}s",
        f"metrics: {url}",
        "",
        f"GPUs: expected {expected}  reporting {reporting}  lost {lost}   "
        f"coverage {_get(metrics, 'gputally_cluster_coverage_ratio'):6.1%}   window {window:.0f}s",
        "",
        "cluster utilization (denominator: the expected GPUs)",
    ]
    for measure in RECORDED_MEASURES:
        ratio = _get(metrics, "gputally_cluster_utilization_ratio", measure=measure)
        clean = _get(metrics, "gputally_cluster_utilization_without_padding_ratio", measure=measure)
        lines.append(
            f"  {_LABELS[measure]:<28} {ratio:6.1%}  [{_bar(ratio)}]  without padding {clean:6.1%}"
        )
    flagged = {
        dict(k)["rule"]: int(v)
        for k, v in metrics.get("gputally_cluster_padding_gpus", {}).items()
        if v
    }
    lines.append(
        "  padding: "
        + (
            ", ".join(f"{n} GPUs flagged by {rule}" for rule, n in sorted(flagged.items()))
            or "no GPU flagged"
        )
    )
    power = _get(metrics, "gputally_cluster_power_watts")
    energy = _get(metrics, "gputally_cluster_energy_joules_total")
    lines += [
        "",
        f"power now {power / 1000:7.2f} kW    energy so far {energy / 3.6e6:8.4f} kWh",
        "",
        "  node          up   alloc   busy  SM act",
    ]
    nodes = sorted({dict(k)["node"] for k in metrics.get("gputally_node_up", {})})
    for node in nodes[:16]:
        up = "yes" if _get(metrics, "gputally_node_up", node=node) else "NO "
        figures = [
            _get(metrics, "gputally_node_utilization_ratio", node=node, measure=m)
            for m in RECORDED_MEASURES[:3]
        ]
        lines.append(f"  {node:<12} {up}  {figures[0]:5.1%}  {figures[1]:5.1%}  {figures[2]:5.1%}")
    if len(nodes) > 16:
        lines.append(f"  ... and {len(nodes) - 16} more nodes")
    if elapsed < window + 3:
        lines.append(
            f"\n(the live window is still filling: figures rise for the first {window:.0f}s)"
        )
    return "\n".join(lines)


def run_demo(scenario: Scenario, args: argparse.Namespace) -> int:
    grpc_port = args.grpc_port or _free_port()
    metrics_port = args.metrics_port or _free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    expected = args.expected_gpus or scenario.total_gpus
    record = Path(tempfile.mkdtemp(prefix="gputally-demo-")) / "record.db"
    options = [
        f"--expected-gpus={expected}",
        f"--window={args.window}",
        "--lag=2",
        f"--db={record}",
        # The demo's agents are born with it: trust each node's first key (never in production).
        f"--keys={record.parent / 'keys'}",
        "--trust-on-first-use",
        # A witness, as a funder would run one, cosigns each checkpoint (every 10 s here).
        "--checkpoint-interval=10",
    ]
    witness = _Witness(record.parent / "witness")
    try:
        witness.init()
        options.append(f"--witnesses={witness.configure()}")
        with _collector(grpc_port, metrics_port, options, stop_within=10):
            witness.serve(record.parent / "keys")
            interactive = sys.stdout.isatty() and not args.plain
            code, stats = asyncio.run(
                _watch(scenario, args, f"127.0.0.1:{grpc_port}", url, interactive)
            )
    except CollectorStartError as error:
        witness.stop()
        print(f"gputally demo: the collector did not start: {error}", file=sys.stderr)
        return 1
    # The same run, from the collector's durable record: what an auditor would be shown.
    query = [*_gputally_command(), "query", f"--db={record}", "--measure=busy"]
    # The summary windows that every node covered whole: the agents start and stop a few
    # milliseconds apart, and a window they straddle is rightly not fully observed.
    window = summary_window(args.duration)
    if stats.observed_from is not None and stats.observed_to is not None:
        first = math.ceil(stats.observed_from / window) * window
        last = math.floor(stats.observed_to / window) * window
    else:
        first = last = 0.0
    if last > first:
        query += [f"--from={first:.0f}", f"--to={last:.0f}"]
    answer = subprocess.run(query, capture_output=True, text=True, timeout=60)
    shown = " ".join(["gputally", *query[len(_gputally_command()) :]])
    print(f"\nThe same run from the collector's durable record (`{shown}`):\n")
    print(answer.stdout.rstrip() or answer.stderr.rstrip())
    # And what an auditor checks first: signatures, chains and signed checkpoints.
    audit = [
        *_gputally_command(),
        "audit",
        "verify",
        f"--ledger={record}",
        f"--keys={record.parent / 'keys'}",
    ]
    if witness.vkey:
        # ... against the witness's latest checkpoint, which the centre cannot take back
        audit += [f"--witness-key={witness.vkey}", f"--against={witness.url}"]
    checked = subprocess.run(audit, capture_output=True, text=True, timeout=120)
    witness.stop()
    shown = " ".join(["gputally", *audit[len(_gputally_command()) :]])
    print(f"\n`{shown}`:\n")
    print(checked.stderr.rstrip())
    print(checked.stdout.rstrip())
    return code


class _Witness:
    """A `gputally witness` process, as an outside party would run one: its key, its state,
    its verifier key for the collector's --witnesses file and the auditor's --witness-key."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.vkey = ""
        self.process: subprocess.Popen[str] | None = None

    def init(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        made = subprocess.run(
            [
                *_gputally_command(),
                "witness",
                "init",
                "--name=witness.demo.example/gputally",
                f"--key={self.directory / 'witness.key'}",
                f"--state={self.directory / 'witness.db'}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.vkey = made.stdout.strip() if made.returncode == 0 else ""

    def configure(self) -> Path:
        path = self.directory / "witnesses"
        path.write_text(f"{self.vkey} {self.url}\n" if self.vkey else "")
        return path

    def serve(self, keys: Path) -> None:
        """Start cosigning the log whose verifier key the collector published in `keys`."""
        vkey = keys / "collector.vkey"
        if not self.vkey or not vkey.exists():
            return
        logs = self.directory / "logs"
        logs.write_text(vkey.read_text())
        self.process = subprocess.Popen(
            [
                *_gputally_command(),
                "witness",
                "serve",
                f"--key={self.directory / 'witness.key'}",
                f"--state={self.directory / 'witness.db'}",
                f"--logs={logs}",
                f"--listen=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class CollectorStartError(RuntimeError):
    """The collector process did not start; the message is what it said."""


@contextlib.contextmanager
def _collector(
    grpc_port: int, metrics_port: int, options: list[str], *, stop_within: float
) -> Iterator[subprocess.Popen[str]]:
    """A `gputally collector` process on loopback, ready (it answers /readyz) once entered;
    stopped on exit with SIGTERM, after which it signs a last checkpoint."""
    command = [
        *_gputally_command(),
        "collector",
        f"--grpc-listen=127.0.0.1:{grpc_port}",
        f"--metrics-listen=127.0.0.1:{metrics_port}",
        *options,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        if not _wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", process, 15.0):
            said = process.stderr.read() if process.stderr and process.poll() is not None else ""
            raise CollectorStartError(said.strip() or "it did not answer /readyz within 15 s")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(stop_within)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_ready(url: str, process: subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as response:
            if response.status == 200:
                return True
        time.sleep(0.1)
    return False


async def _watch(
    scenario: Scenario, args: argparse.Namespace, target: str, url: str, interactive: bool
) -> tuple[int, FleetStats]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    fleet = asyncio.ensure_future(
        run_fleet(
            scenario,
            target,
            duration=args.duration,
            stop=stop,
            summary_window=summary_window(args.duration),
        )
    )
    started = time.monotonic()
    screen = ""
    if not interactive:
        print(
            f"gputally demo: collector metrics at {url}; simulating {scenario.total_gpus} GPUs",
            flush=True,
        )
    while not fleet.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fleet), 1.0)
        if fleet.done():
            break  # keep the last screen taken while the cluster was running
        try:
            metrics = await asyncio.to_thread(scrape, url)
        except (urllib.error.URLError, OSError) as error:
            print(f"gputally demo: scrape failed: {error}", file=sys.stderr)
            continue
        screen = render(metrics, url, time.monotonic() - started, scenario)
        if interactive:
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n\n(Ctrl-C to stop)\n")
            sys.stdout.flush()
        else:
            busy = _get(metrics, "gputally_cluster_utilization_ratio", measure="busy")
            sm = _get(metrics, "gputally_cluster_utilization_ratio", measure="sm_active")
            alloc = _get(metrics, "gputally_cluster_utilization_ratio", measure="allocated")
            reporting = int(_get(metrics, "gputally_cluster_gpus", state="reporting"))
            print(
                f"t={time.monotonic() - started:5.1f}s reporting={reporting} "
                f"busy={busy:.3f} sm_active={sm:.3f} allocated={alloc:.3f}",
                flush=True,
            )
    stats = fleet.result()
    if not interactive and screen:
        print("\n" + screen)
    print(
        f"\nsimulated {stats.nodes} nodes: {stats.reports} reports sent, {stats.acked} acknowledged, {stats.dropped} dropped."
        f"\nThe busy figure counts any kernel running; SM active is the real work. Point Prometheus at {url} "
        "to keep these figures.",
        flush=True,
    )
    return 0, stats


def simulate_ledger(
    scenario: Scenario,
    *,
    start: float,
    days: float,
    ledger: Path,
    keys: Path,
    interval: float,
    summary_window: float,
    expected_gpus: int,
    padding: PaddingRules | None = None,
) -> int:
    """`gputally simulate --fast`: the scenario over `days` on a virtual clock, through the real
    agents, signing, gRPC and a real collector process that writes the ledger and signs its
    checkpoints. Leaves the ledger and the keys an auditor needs."""
    grpc_port, metrics_port = _free_port(), _free_port()
    options = [
        f"--expected-gpus={expected_gpus}",
        f"--db={ledger}",
        f"--keys={keys}",
        "--trust-on-first-use",  # the simulated agents' keys are born here: enrol them as they come
        "--checkpoint-interval=5",
        # A virtual clock replays a past (or future) period: the collector's time limits,
        # made for live agents, must let all of it in.
        f"--horizon={max(time.time() - start, 0.0) + 86400:.0f}",
        f"--max-skew={max(start + days * 86400 - time.time(), 0.0) + 300:.0f}",
    ]
    began = time.monotonic()

    def progress(done: float) -> None:
        elapsed = time.monotonic() - began
        print(
            f"  simulated {done / 86400:6.1f} of {days:g} days ({elapsed:5.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    try:
        # The collector signs a last checkpoint as it stops: give it the time.
        with _collector(grpc_port, metrics_port, options, stop_within=60):
            stats = asyncio.run(
                run_fleet_virtual(
                    scenario,
                    f"127.0.0.1:{grpc_port}",
                    seconds=days * 86400,
                    start=start,
                    interval=interval,
                    summary_window=summary_window,
                    padding=padding,
                    progress=progress,
                )
            )
    except CollectorStartError as error:
        print(f"gputally simulate: the collector did not start: {error}", file=sys.stderr)
        return 1
    print(
        f"simulated {days:g} days of {scenario.total_gpus} GPUs in {time.monotonic() - began:.0f} s: "
        f"{stats.reports} reports, {stats.dropped} dropped\n"
        f"ledger: {ledger}\nkeys:   {keys}\n"
        f"verify: gputally audit verify --ledger {ledger} --keys {keys}",
        file=sys.stderr,
    )
    return 0
