"""Benchmark: what the agent itself costs on a node (CPU and resident memory).

Runs `gputally agent --backend mock` on an 8-GPU node, sampling every second with every field
the backend reads, streaming to a real `gputally collector` process, for --seconds (default
120). A bare Python interpreter that only sleeps runs alongside as the baseline. Prints CPU
time per second of wall time (as % of one core) and peak resident memory for both.

    .venv/bin/python benchmarks/agent_cost.py [--seconds 120] [--gpus 8]

Targets (issue 3): under 1% of one core and under 60 MiB RSS. For comparison, dcgm-exporter
users report 15-20% of a core and 70-480 MiB.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gputally() -> list[str]:
    script = Path(sys.executable).with_name("gputally")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gputally.cli"]


def watch(
    processes: dict[str, psutil.Process], seconds: float, warmup: float
) -> dict[str, tuple[float, float]]:
    """CPU % of one core over the measured span (after warmup), and peak RSS in MiB."""
    time.sleep(warmup)
    start = {name: p.cpu_times() for name, p in processes.items()}
    t0 = time.monotonic()
    peak = dict.fromkeys(processes, 0.0)
    while time.monotonic() - t0 < seconds:
        for name, p in processes.items():
            peak[name] = max(peak[name], p.memory_info().rss / 2**20)
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    result = {}
    for name, p in processes.items():
        end = p.cpu_times()
        cpu = (end.user - start[name].user) + (end.system - start[name].system)
        result[name] = (100.0 * cpu / elapsed, peak[name])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="measured span (default: %(default)s)"
    )
    parser.add_argument(
        "--gpus", type=int, default=8, help="GPUs on the simulated node (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds ignored at the start (default: %(default)s)",
    )
    args = parser.parse_args()

    grpc_port, metrics_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "node.toml"
        scenario.write_text(
            f'[cluster]\nnodes = 1\ngpus_per_node = {args.gpus}\ngpu_model = "NVIDIA H100 80GB HBM3"\n'
            f'[[workload]]\ngpus = {args.gpus // 2}\nkind = "training"\n'
            f'[[workload]]\ngpus = {args.gpus - args.gpus // 2}\nkind = "inference"\n'
        )
        collector = subprocess.Popen(
            [
                *gputally(),
                "collector",
                f"--grpc-listen=127.0.0.1:{grpc_port}",
                f"--metrics-listen=127.0.0.1:{metrics_port}",
                f"--db={Path(tmp) / 'record.db'}",
            ],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        agent = subprocess.Popen(
            [
                *gputally(),
                "agent",
                "--backend=mock",
                f"--scenario={scenario}",
                f"--collector=127.0.0.1:{grpc_port}",
            ],
        )
        baseline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
        try:
            total = args.seconds + args.warmup
            print(
                f"measuring for {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up ({total:.0f} s)...",
                flush=True,
            )
            figures = watch(
                {"agent": psutil.Process(agent.pid), "baseline": psutil.Process(baseline.pid)},
                args.seconds,
                args.warmup,
            )
            reports = 0
            try:
                import urllib.request

                with urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_port}/metrics", timeout=5
                ) as response:
                    for line in response.read().decode().splitlines():
                        if (
                            line.startswith("gputally_node_reports_total{")
                            and 'result="accepted"' in line
                        ):
                            reports = int(float(line.rsplit(" ", 1)[1]))
            except OSError:
                pass
        finally:
            for process in (agent, baseline, collector):
                process.terminate()
            for process in (agent, baseline, collector):
                process.wait(15)

    agent_cpu, agent_rss = figures["agent"]
    base_cpu, base_rss = figures["baseline"]
    print(f"\nagent ({args.gpus} GPUs, 1 s sampling, mock backend), {args.seconds:.0f} s measured:")
    print(f"  CPU      {agent_cpu:6.3f} % of one core   (baseline idle python {base_cpu:6.3f} %)")
    print(
        f"  RSS peak {agent_rss:6.1f} MiB            "
        f"(baseline idle python {base_rss:6.1f} MiB, ratio {agent_rss / base_rss:4.1f}x)"
    )
    print(f"  reports accepted by the collector: {reports}")
    print(
        f"  targets: CPU < 1 %: {'met' if agent_cpu < 1.0 else 'NOT met'}; RSS < 60 MiB: {'met' if agent_rss < 60 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
