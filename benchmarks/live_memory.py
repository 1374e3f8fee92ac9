"""Benchmark: does the collector's live state stay bounded? Hours of ingest in one process.

The agent's own reports (live_path.py's: ingest_scale.py's 8 node shapes sampled by
gputally.agent.sampler.Sampler over MockNVML every second, reported every --report-every
seconds), each shape copied under its own node name and GPU UUIDs up to --nodes nodes, their
phases spread over the report cadence, are ingested by ClusterState on a simulated clock (no
gRPC, nothing waits), with a view every --view-every seconds and a /metrics render, with every
node's series and without, every --render-every seconds, as a collector serves them.

At every --checkpoint seconds, after a garbage collection, it prints the process's RSS, the
Python heap (tracemalloc, with --trace: slower), and the size of every container in the
live state that grows with what it is fed: nodes, live-window series and their entries,
cards, summary chains, XID codes, label values (padding rules, folded labels, refusals).
Once the first live window has passed, a bounded state holds the same sizes at every
checkpoint (XID codes and label values may still first appear, within their caps); the last
line says whether it did (exit status 1 if not), and the RSS slope over the checkpoints
after the first.

    .venv/bin/python benchmarks/live_memory.py
    .venv/bin/python benchmarks/live_memory.py --nodes 12500 --seconds 1800 --trace
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import psutil
from prometheus_client import generate_latest

from gputally.collector.live.metrics import make_registry
from gputally.collector.live.state import ClusterState
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import PADDING_RULES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_path import T0, copied, shapes  # benchmarks/ is not a package: found by sys.path

MIB = 2**20
# The sizes that must not change once the live window is full; XID codes (per node) and label
# values (padding rules, folded labels, refusal statuses) may grow as they first appear, up to
# a cap: --max-xid-codes and "other" per node; the rules and "(other)", 3 folded labels, 17
# gRPC statuses. The nodes are the same throughout: evicting idle ones is tests/test_network.py's.
UNCAPPED = ("nodes", "series", "entries", "most", "cards", "chains")
LABELS_CAP = len(PADDING_RULES) + 1 + 3 + 17


def sizes(state: ClusterState) -> dict[str, int]:
    """What in the live state grows with what it is fed (the keys are printed as columns)."""
    series = [
        s for n in state.nodes.values() for s in (*n.by_model.values(), *n.by_tenant.values())
    ]
    return {
        "nodes": len(state.nodes),
        "series": len(series),
        "entries": sum(len(s.entries) for s in series),
        "most": max((len(s.entries) for s in series), default=0),
        "cards": len(state._cards) + len(state._card_end),  # its own, as measured
        "chains": len(state.intake.chains),
        "xids": sum(len(n.xids) for n in state.nodes.values()),
        "labels": len(state.counters.padding) + len(state.folded) + len(state.refusals),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1250, help="nodes of 8 GPUs")
    parser.add_argument("--report-every", type=int, default=10, metavar="SECONDS")
    parser.add_argument("--seconds", type=int, default=3600, help="simulated seconds of ingest")
    parser.add_argument("--checkpoint", type=int, default=600, metavar="SECONDS")
    parser.add_argument("--view-every", type=int, default=15, metavar="SECONDS")
    parser.add_argument("--render-every", type=int, default=60, metavar="SECONDS")
    parser.add_argument("--trace", action="store_true", help="measure the heap (tracemalloc)")
    args = parser.parse_args()
    if min(args.nodes, args.report_every, args.view_every, args.render_every) < 1:
        parser.error("--nodes, --report-every, --view-every and --render-every must be >= 1")
    if not 0 < args.checkpoint <= args.seconds or args.checkpoint % args.report_every:
        # each checkpoint at the same phase of the reports: else a series holds one entry
        # more or less for no other reason
        parser.error("--checkpoint must be in [1, --seconds], a multiple of --report-every")

    began = time.monotonic()
    print(
        f"sampling {args.seconds:,} s of the 8 node shapes, a report every "
        f"{args.report_every} s ...",
        file=sys.stderr,
        flush=True,
    )
    made = shapes(args.seconds, float(args.report_every))
    ticks = min(len(reports) for _, reports in made)
    # one parsed report per shape and tick, shared by every copy of the shape: a report
    # names no node (its stream does) and no card (its hello does)
    parsed = [[pb.Report.FromString(body) for body in reports[:ticks]] for _, reports in made]
    if len({tuple(r.time_unix_nano for r in reports) for reports in parsed}) != 1:
        raise SystemExit("live_memory: the node shapes' reports do not end at the same times")
    now = [T0]
    state = ClusterState(expected_gpus=8 * args.nodes, clock=lambda: now[0])
    names: list[list[str]] = [[] for _ in range(args.report_every)]  # by phase
    shape_of: dict[str, int] = {}
    for n in range(args.nodes):
        shape, copy = n % len(made), n // len(made)
        hello = copied(made[shape][0], copy)
        state.open_session(hello)
        names[copy % args.report_every].append(hello.node)
        shape_of[hello.node] = shape
    registries = [make_registry(state, node_series=True), make_registry(state, node_series=False)]
    process = psutil.Process()
    if args.trace:
        tracemalloc.start()
    print(
        f"{args.nodes:,} nodes x 8 GPUs, {ticks} reports each over {args.seconds:,} simulated s; "
        f"a view every {args.view_every} s, renders every {args.render_every} s",
        flush=True,
    )
    columns = list(sizes(state))
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'heap MiB':>8} " + " ".join(f"{c:>8}" for c in columns))
    rows: list[tuple[float, float, dict[str, int]]] = []
    next_view, next_render, next_checkpoint = args.view_every, args.render_every, args.checkpoint
    accepted = rendered = 0
    for tick in range(ticks):  # bounded: the sampled reports
        end = parsed[0][tick].time_unix_nano / 1e9
        for phase, group in enumerate(names):  # bounded: --report-every phases
            now[0] = end + phase + 0.01
            for name in group:
                if state.ingest(name, parsed[shape_of[name]][tick], received=now[0]) == "accepted":
                    accepted += 1
            elapsed = now[0] - T0
            if elapsed >= next_view:
                state.view()
                state.view(nodes=False)
                next_view += args.view_every
            if elapsed >= next_render:
                rendered += sum(len(generate_latest(r)) for r in registries)
                next_render += args.render_every
            if elapsed >= next_checkpoint:
                state.view(nodes=False)  # every node trimmed as of now, not at its last view
                gc.collect()
                heap = tracemalloc.get_traced_memory()[0] / MIB if args.trace else float("nan")
                rss = process.memory_info().rss / MIB
                held = sizes(state)
                rows.append((elapsed, rss, held))
                heap_text = f"{heap:8.1f}" if args.trace else f"{'-':>8}"
                print(
                    f"{elapsed:7.0f} {rss:8.1f} {heap_text} "
                    + " ".join(f"{held[c]:8,}" for c in columns),
                    flush=True,
                )
                next_checkpoint += args.checkpoint
    print(
        f"{accepted:,} reports ingested, {rendered / MIB:,.0f} MiB of /metrics rendered, "
        f"in {time.monotonic() - began:.0f} s"
    )
    if len(rows) < 3:
        print("fewer than 3 checkpoints: give a longer --seconds for a verdict")
        return 0
    later = rows[1:]  # the first checkpoint still fills the window and the allocator
    grew = [c for c in UNCAPPED if len({held[c] for _, _, held in later}) > 1]
    # a node's codes beyond its cap are one more, "other"
    caps = {"xids": args.nodes * (state.sizes.max_xid_codes + 1), "labels": LABELS_CAP}
    grew += [f"{c} beyond {cap:,}" for c, cap in caps.items() if rows[-1][2][c] > cap]
    hours = (later[-1][0] - later[0][0]) / 3600
    slope = (later[-1][1] - later[0][1]) / hours
    print(
        ("bounded: every size the same at each checkpoint after the first (XID codes and "
         "labels within their caps)"
         if not grew else f"NOT bounded: {', '.join(grew)} changed after the first checkpoint")
        + f"; RSS {later[0][1]:.1f} -> {later[-1][1]:.1f} MiB ({slope:+.1f} MiB per simulated hour)"
    )  # fmt: skip
    return 0 if not grew else 1


if __name__ == "__main__":
    sys.exit(main())
