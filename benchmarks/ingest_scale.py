"""Benchmark: thousands of agent streams into one collector, against the truth they were fed,
with a bare gRPC server measured in the same run as the baseline.

What runs, all on 127.0.0.1 of this machine, each its own process:

  collector   a real `gputally collector` (no record unless --db: then a fresh SQLite ledger
              with --keys and --trust-on-first-use, so that the summaries are verified and
              recorded); --expected-gpus = the GPUs simulated, --max-streams-per-peer (and
              --max-streams, --max-nodes) above the stream count, since every stream comes from
              127.0.0.1; more options with --collector-arg. GPUTALLY_* variables are removed
              from its environment, so that it runs the configuration printed here.
  baseline    a bare grpc.aio server (in this file) serving the same method,
              /gputally.v1.Ingest/Stream, with the same generated code: it answers the Hello
              with a Challenge, verifies the Proof (Ed25519) and sends a Welcome, as the
              collector does (a cost per stream, paid before anything is measured), then parses
              every AgentMessage (gRPC's deserializer, as the collector's), reads each report's
              seq and GPU count, and acknowledges each message with an Ack. Nothing else.
  generators  --workers load-generator processes holding the streams between them (default:
              one per 2,500 streams, at most one per CPU core: a process writes ~1,250 paced
              reports/s for a small part of a core, and more processes than cores only take
              CPU from the collector; the "generator late" line shows whether they kept up).

Message shapes come from the agent's own code: for every node of the scenario(s) (default: two
built-in ones, 8 node shapes of --gpus H100s: Kubernetes training, a Slurm inference service,
plain processes, a burn tool that trips the padding rules, idle GPUs, and one MIG node), a
gputally.agent.sampler.Sampler over MockNVML on a ManualClock samples every --interval seconds
for one --summary-window (300 s by default, the agent's) and its reports are kept as templates:
processes, attribution, GPM, padding, MIG, every field the agent fills. With a Sampler that
knows report_every, the templates are its reports (one per --report-every seconds, each with the
GPUs' per-tick totals); with an older Sampler and --report-every above --interval, the sampler
samples every --report-every seconds instead (reports without totals; said in the output).

Each stream is one node (its own TCP connection, Ed25519 key, node name and GPU UUIDs and
serials) replaying its shape's templates in order, from an offset of its own. Each report is
re-stamped as it is sent, by mutating the template's fields and serializing: seq, time_unix_nano
= its tick's wall time (steady state; an agent stamps a report at its tick, so a write that is
late does not move it: one more than a second late would look like the agent's clock stepping
back, which the collector follows), the GPUs' energy counters (advanced by the template's own deltas, so that no
counter ever runs backwards), and, on the first report after each --summary-window closes, a
Summary (the template window's numbers, with this stream's node, UUIDs, window times and chain,
signed with its key; a stream's first, partial window and a window in which it skipped a tick
get none). MIG instance UUIDs inside samples, PIDs and cgroups stay the template's.

Steady state (--streams, --warmup then --duration): every stream sends one report per
--report-every seconds of wall time, the streams' phases spread evenly so that the load is
smooth, each report written only after the previous one's Ack came back (a tick missed meanwhile
is skipped and counted). Measured over --duration only (ticks scheduled in it):

  reports/s          offered (the ticks) and acknowledged (accepted in an Ack);
  GPU sample msgs/s  GpuSample messages in those reports (what the collector parses and adds);
  GPU-seconds/s      Σ GPUs x seconds covered by the acknowledged reports, per second of wall
                     time: the GPU time that became live (the GPU count, when all is well);
  ack latency        write of a report -> read of its Ack;
  lag                sample to live: the Ack's time - the start of the report's interval (how
                     long the oldest second in it waited to count live: at least --report-every);
  generator late     the write's time - its tick's: how far the generator itself fell behind;
  CPU                % of one core, per process (psutil), over the measured span;
  collector RSS      start, max, end and slope (MiB/min) over the measured span;
  /metrics           scraped every --scrape-every seconds: response time (request to the last
                     byte), size (lines, bytes), and the collector's own render time when it
                     serves a render made every --metrics-refresh seconds (scraped from the
                     warm-up's end, unmeasured, as a Prometheus scraping all along would have:
                     a collector's first scrape renders, the later ones are served a render);
  live vs truth      at each scrape, the collector's gputally_cluster_utilization_ratio (busy,
                     effective, ...) and gputally_cluster_coverage_ratio against the truth: the
                     same figure (gputally.v1.accounting.contributions, or the reports' per-GPU
                     totals when they carry them, then accounting.bounds over --expected-gpus x
                     the window) computed from exactly the reports the streams had sent by the
                     scrape's start, each report's seconds clipped as the collector clips them,
                     over the collector's window: its length as /metrics gives it, ending
                     --truth-lag seconds before the scrape (default: the collector's --lag, plus
                     one report for reports spanning several samples, as its live state does).
                     A collector serving a render shows figures up to a refresh (and a render)
                     old: the error is also given "allowing the render's age", against the
                     truth over that span, which tells staleness from miscounting;
  counters           after every Ack is in, gputally_cluster_gpu_seconds_total by measure
                     against the same sums over every report sent (warm-up included): exact.

Max throughput (--saturate SECONDS, 0 to leave it out): --saturate-streams fresh streams, each
keeping --saturate-inflight messages of --saturate-batch reports written ahead of their Acks (a
closed loop: a new message as soon as an Ack frees a slot), for --saturate-warmup then
--saturate seconds against the baseline, then the same against the collector (its steady
streams closed by then). Reports are stamped with the send time and keep their template's
interval (and totals): the collector counts only the time since the stream's previous report
(it clips the overlap), so no second is claimed twice and nothing is refused. The ratio
collector/baseline of reports acknowledged per second is the figure to compare with 0.7.

--profile PATH records the collector with py-spy over the measured steady span (flamegraph for
.svg, speedscope for .json, else raw collapsed stacks, whose top functions are printed too).

    .venv/bin/python benchmarks/ingest_scale.py --streams 1250 --duration 60 [--json [FILE]]
    .venv/bin/python benchmarks/ingest_scale.py --streams 12500 --report-every 10 --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import inspect
import json
import math
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.attribution import Attributor
from gputally.agent.backend import NvmlBackend
from gputally.agent.sampler import Sampler
from gputally.agent.sim.mock import ManualClock, MockNVML
from gputally.agent.sim.scenario import Scenario, ScenarioError, load, parse
from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc
from gputally.v1.signing import chain_hash, public_bytes, sign_summary, verify_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streams_under_flood import (  # benchmarks/ is not a package: found by sys.path
    OPTIONS,
    Failed,
    cpu_seconds,
    free_port,
    gputally,
    handshake,
    log,
    ms,
    percentile,
    scrape_wire,
    slope,
    stream_call,
)

MiB = 2**20
OPEN_AT_ONCE = 32  # handshakes in flight per generator process while the streams open
STREAMS_PER_WORKER = 2500  # the default --workers: one process per this many streams
MAX_MESSAGE_BYTES = 4 * MiB
# Times at which the truth is worked out per scrape: at it, and back to the oldest render it
# may have been served (a collector that renders /metrics every few seconds).
AGE_POINTS = 5  # the collector's default --max-message-bytes; the baseline's too
# Numbers the truth adds up: every accounting field a sample contributes, per second covered.
FIELDS = tuple(f for f in accounting.FIELDS if f != "energy_joules")
_AT = {name: i for i, name in enumerate(FIELDS)}
# The collector's gputally_cluster_gpu_seconds_total{measure} and the field each adds up.
COUNTED = accounting.COUNTED
# A GpuSample's per-tick totals (the agent's report_every change), when the protocol has them.
HAS_TOTALS = "totals" in pb.GpuSample.DESCRIPTOR.fields_by_name
SAMPLER_REPORTS_EVERY = "report_every" in inspect.signature(Sampler).parameters

# Two built-in scenarios: 7 node shapes of mixed work, and one MIG node. {gpus}: --gpus.
BUILTIN = {
    "bench-mixed": """
[cluster]
nodes = 7
gpus_per_node = {gpus}
gpu_model = "NVIDIA H100 80GB HBM3"

[[workload]]
name = "training"            # Kubernetes pods: attribution from the cgroup, GPM, NVLink
kind = "training"
share = 0.4
pod = "3f2c1a9e-0b7d-4c55-9a3e-2f6c9d6a1c00"

[[workload]]
name = "inference"           # a Slurm job: bursts every 5 s, the process stays resident
kind = "inference"
share = 0.2
slurm_job = 4242

[[workload]]
name = "notebooks"           # plain processes, no scheduler: no attribution
kind = "steady"
share = 0.15
busy = 0.6
sm_active = 0.3
user = "alice"

[[workload]]
name = "burn"                # busy 100% with the SMs idle: the padding rules flag it
kind = "burn"
share = 0.1
""",
    "bench-mig": """
[cluster]
nodes = 1
gpus_per_node = {gpus}
gpu_model = "NVIDIA H100 80GB HBM3"
mig_instances = 3

[[workload]]
name = "mig-training"        # every GPU split in 3 MIG instances, one pod's
kind = "training"
share = 0.75
pod = "9a7e2c11-5d3b-4f0a-8c6e-1b2d3e4f5a6b"
""",
}


# -- templates: the agent's own reports over the mock --------------------------------------


@dataclass(slots=True)
class Shape:
    """One node shape: its Hello, its reports (templates) and what they add up to."""

    name: str  # scenario/node
    hello: bytes
    reports: list[bytes]
    intervals: list[float]
    energy_start: list[int]  # per GPU position: the counter before the first template; -1: none
    energy_deltas: list[list[int]]  # per template, per GPU position: the counter's advance
    summary: bytes  # the template window's Summary (unsigned), b"" when there is none
    rates: list[tuple[float, ...]]  # per template: Σ over its GPUs of FIELDS per second
    gpus: int
    with_totals: int  # templates whose samples carry per-tick totals
    base: int = 0  # the first template's number among all shapes'


def load_scenarios(paths: Sequence[str], gpus: int) -> list[Scenario]:
    if not paths:
        return [
            parse(tomllib.loads(text.replace("{gpus}", str(gpus))), name=name)
            for name, text in BUILTIN.items()
        ]
    return [load(path) for path in paths]


def per_second(report: pb.Report) -> tuple[tuple[float, ...], bool]:
    """What one report adds per second covered, summed over its GPUs: from its samples' totals
    (over its interval) when they carry them, else accounting.contributions of each reading;
    and whether totals were used."""
    values = [0.0] * len(FIELDS)
    used_totals = False
    interval = report.interval_seconds
    for sample in report.gpus:
        rates = accounting.contributions(sample, 1.0)
        totals = next((v for f, v in sample.ListFields() if f.name == "totals"), None)
        if totals is not None and interval > 0:
            used_totals = True
            for name in FIELDS:
                if hasattr(totals, name):
                    rates[name] = float(getattr(totals, name)) / interval
        for i, name in enumerate(FIELDS):
            values[i] += rates[name]
    return tuple(values), used_totals


def build_shape(
    scenario: Scenario, node: int, interval: float, report_every: float, window: float
) -> Shape:
    """Run the agent's Sampler over MockNVML on a manual clock through one summary window,
    aligned as the agent aligns them, and keep its reports."""
    start = math.floor(time.time() / window) * window - window  # a recent window's start
    opened = start - report_every  # the first report ends where the window starts
    clock = ManualClock(opened)
    mock = MockNVML(scenario, node, clock, start=opened)
    legacy = not SAMPLER_REPORTS_EVERY and report_every != interval
    step = report_every if legacy else interval
    options: dict[str, Any] = {}
    if SAMPLER_REPORTS_EVERY:
        options["report_every"] = report_every
    sampler = Sampler(
        NvmlBackend(mock, events="poll", monotonic=clock, clock=clock),
        attributor=Attributor(processes=mock.processes, monotonic=clock),
        node=scenario.node_name(node),
        interval=step,
        clock=clock,
        summary_window=window,
        **options,
    )
    sampler.open()
    hello = sampler.hello(1, "mock")
    before: pb.Report | None = None
    pool: list[pb.Report] = []
    summary = b""
    start_ns, end_ns = round(start * 1e9), round((start + window) * 1e9)
    ticks = math.ceil((window + 3 * report_every) / step) + 10  # bounded: a window and a few
    for _ in range(ticks):
        clock.advance(step)
        report: pb.Report | None = sampler.tick()
        if report is None:
            continue
        if report.HasField("summary"):
            body = pb.Summary.FromString(report.summary.body)
            if body.window_start_unix_nano == start_ns and body.window_end_unix_nano == end_ns:
                body.node, body.chain_seq, body.prev_hash = "", 0, b""
                summary = body.SerializeToString()
            report.ClearField("summary")
        end = report.time_unix_nano / 1e9
        if end <= start + 1e-6:
            before = report
        elif end <= start + window + 1e-6 and report.gpus:
            pool.append(report)
        if summary and end >= start + window:
            break
    sampler.close()
    if not pool:
        raise Failed(f"{scenario.name} node {node}: the sampler gave no report in a window")
    first = before or pool[0]
    energy_start = [
        s.energy_millijoules if s.HasField("energy_millijoules") else -1 for s in first.gpus
    ]
    previous, deltas = energy_start, []
    for report in pool:
        now = [
            s.energy_millijoules if s.HasField("energy_millijoules") else -1 for s in report.gpus
        ]
        deltas.append(
            [max(0, b - a) if a >= 0 and b >= 0 else 0 for a, b in zip(previous, now, strict=True)]
        )
        previous = now
    rates, totals = zip(*(per_second(r) for r in pool), strict=True)
    return Shape(
        name=f"{scenario.name}/{scenario.node_name(node)}",
        hello=hello.SerializeToString(),
        reports=[r.SerializeToString() for r in pool],
        intervals=[r.interval_seconds for r in pool],
        energy_start=energy_start,
        energy_deltas=deltas,
        summary=summary,
        rates=list(rates),
        gpus=len(hello.gpus),
        with_totals=sum(totals),
    )


# -- the wire: messages assembled from serialized reports ----------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def agent_message(reports: Sequence[bytes]) -> bytes:
    """AgentMessage{batch: ReportBatch{reports}} from serialized reports (fields 2 and 1,
    length-delimited): the bytes SerializeToString gives, without building the message."""
    batch = b"".join(b"\x0a" + varint(len(r)) + r for r in reports)
    return b"\x12" + varint(len(batch)) + batch


# -- the streams (in the generator processes) ----------------------------------------------


class Templates:
    """A shape's templates, parsed once per generator process: every stream of the shape
    mutates the same messages and serializes them at once (nothing awaits in between)."""

    def __init__(self, shape: dict[str, Any]):
        self.base: int = shape["base"]
        self.hello = pb.Hello.FromString(shape["hello"])
        self.reports = [pb.Report.FromString(b) for b in shape["reports"]]
        self.intervals: list[float] = shape["intervals"]
        self.energy_start: list[int] = shape["energy_start"]
        self.summary = pb.Summary.FromString(shape["summary"]) if shape["summary"] else None
        # per template: (GPU position, its sample, the counter's advance) for metered GPUs
        self.meters = [
            [
                (i, report.gpus[i], delta[i])
                for i in range(len(report.gpus))
                if report.gpus[i].HasField("energy_millijoules")
            ]
            for report, delta in zip(self.reports, shape["energy_deltas"], strict=True)
        ]


@dataclass(slots=True)
class Stats:
    """What a stream (or a worker's streams) did in the measured span."""

    offered: int = 0  # ticks scheduled in the span
    offered_gpu_samples: int = 0  # the GPU samples of those ticks' reports
    sent: int = 0  # reports written (their tick in the span)
    acked: int = 0  # accepted in an Ack
    rejected: int = 0
    unacked: int = 0  # written, no Ack read (the stream failed)
    skipped: int = 0  # ticks missed: the previous Ack had not come back
    gpu_samples: int = 0  # GpuSample messages in the acknowledged reports
    gpu_seconds: float = 0.0  # Σ GPUs x seconds covered, of the acknowledged reports
    latencies: array[float] = field(default_factory=lambda: array("d"))
    lags: array[float] = field(default_factory=lambda: array("d"))
    late: array[float] = field(default_factory=lambda: array("d"))

    def add(self, other: Stats) -> None:
        for name in (
            "offered",
            "offered_gpu_samples",
            "sent",
            "acked",
            "rejected",
            "unacked",
            "skipped",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.gpu_samples += other.gpu_samples
        self.gpu_seconds += other.gpu_seconds
        self.latencies.extend(other.latencies)
        self.lags.extend(other.lags)
        self.late.extend(other.late)


class Stream:
    """One simulated node: its identity, its position in its templates, and its record of
    every report it sent (for the truth)."""

    def __init__(self, number: int, templates: Templates, prefix: str, run: str, window: float):
        self.t = templates
        self.node = f"{prefix}-{number:05d}"
        self.key = Ed25519PrivateKey.generate()
        self.hello = pb.Hello()
        self.hello.CopyFrom(templates.hello)
        self.hello.node = self.node
        self.hello.instance_id = random.getrandbits(63) or 1
        self.hello.public_key = public_bytes(self.key)
        for gpu in self.hello.gpus:
            name = f"{run}/{prefix}/{number}/{gpu.index}"
            gpu.uuid = f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, name)}"
            gpu.serial = f"{uuid.uuid5(uuid.NAMESPACE_DNS, name).int % 10**13:013d}"
        self.uuids = [g.uuid for g in self.hello.gpus]
        self.serials = [g.serial for g in self.hello.gpus]
        self.cursor = number * 7919 % len(templates.reports)  # streams at their own phases
        self.energy = list(templates.energy_start)
        self.seq = 0
        self.last_ns = 0  # time_unix_nano of the previous report
        self.window = window  # summary window (0: none)
        self.windows = -1  # the window the latest report ended in (-1: none yet)
        self.first_window = -1
        self.skipped_in_window = False
        self.chain_seq, self.prev_hash = 0, b""
        self.summaries = self.withheld = 0
        self.channel: Any = None
        self.call: Any = None
        self.half_closed = False
        self.error = ""
        # the truth: every report sent and not rejected (end, seconds that count, template)
        self.ends = array("d")
        self.covers = array("d")
        self.used = array("I")
        self.prev_end = -math.inf
        self.build_s = 0.0
        self.built = 0

    async def open(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=OPTIONS)
        self.call = stream_call(self.channel)
        await handshake(self.call, self.hello, self.key)

    async def close(self, timeout: float) -> None:
        """Half-close (unless done already), read the server's end of the call, let go."""
        if self.call is not None and not self.error:
            try:
                if not self.half_closed:
                    await asyncio.wait_for(self.call.done_writing(), timeout)
                    reply = await asyncio.wait_for(self.call.read(), timeout)
                    if reply is not grpc.aio.EOF:
                        self.error = f"closing: {reply.WhichOneof('body')} instead of the end"
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as error:
                self.error = f"closing: {type(error).__name__}: {error}"
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()
        self.call = self.channel = None

    def _summary(self, end_ns: int) -> pb.SignedSummary | None:
        """The signed summary due with a report ending at `end_ns`: the window the previous
        report ended in has closed. None for the stream's first (partial) window and for a
        window with a skipped tick, whose template numbers it did not send."""
        if not self.window or self.t.summary is None:
            return None
        number = math.floor(end_ns / 1e9 / self.window)
        closed, self.windows = self.windows, number
        if self.first_window < 0:
            self.first_window = number
        if closed < 0 or number <= closed:
            return None
        skipped, self.skipped_in_window = self.skipped_in_window, False
        if closed == self.first_window or skipped:
            self.withheld += 1
            return None
        summary = pb.Summary()
        summary.CopyFrom(self.t.summary)
        summary.window_start_unix_nano = round(closed * self.window * 1e9)
        summary.window_end_unix_nano = round((closed + 1) * self.window * 1e9)
        summary.node = self.node
        for gpu in summary.gpus:
            if gpu.index < len(self.uuids):
                gpu.uuid, gpu.serial = self.uuids[gpu.index], self.serials[gpu.index]
        self.chain_seq += 1
        summary.chain_seq, summary.prev_hash = self.chain_seq, self.prev_hash
        body = summary.SerializeToString(deterministic=True)
        self.prev_hash = chain_hash(body)
        self.summaries += 1
        return pb.SignedSummary(body=body, signature=sign_summary(self.key, body))

    def build(
        self, end_ns: int, elapsed: float | None, summaries: bool
    ) -> tuple[bytes, int, float]:
        """The next report, re-stamped and serialized; its template's number and interval.
        It keeps its template's interval (and totals). `elapsed` None: paced, one template's
        worth of energy; else the seconds since the previous report (the max-throughput
        mode), whose share of a template's energy the counters advance by."""
        began = time.perf_counter()
        i = self.cursor
        self.cursor = (i + 1) % len(self.t.reports)
        report = self.t.reports[i]
        self.seq += 1
        report.seq = self.seq
        report.time_unix_nano = end_ns
        seconds = self.t.intervals[i]
        scale = 1.0 if elapsed is None or seconds <= 0 else min(elapsed / seconds, 1.0)
        energy = self.energy
        for position, sample, delta in self.t.meters[i]:
            energy[position] += delta if elapsed is None else round(delta * scale)
            sample.energy_millijoules = energy[position]
        signed = self._summary(end_ns) if summaries else None
        if signed is not None:
            report.summary.CopyFrom(signed)
        data = report.SerializeToString()
        if signed is not None:
            report.ClearField("summary")
        self.last_ns = end_ns
        self.build_s += time.perf_counter() - began
        self.built += 1
        return data, self.t.base + i, seconds

    def record(self, end_ns: int, seconds: float, template: int) -> None:
        """A report sent: the seconds of it the collector counts (those after the previous
        report's end, on the agent's clock: state._covered's rule, same arithmetic)."""
        end = end_ns / 1e9
        covered = min(seconds, end - self.prev_end)
        self.ends.append(end)
        self.covers.append(covered)
        self.used.append(template)
        self.prev_end = end

    def unrecord(self) -> None:
        """The latest report was rejected: it counts for nothing."""
        self.ends.pop()
        self.covers.pop()
        self.used.pop()
        self.prev_end = self.ends[-1] if self.ends else -math.inf

    async def steady(
        self, first: float, t0: float, end: float, every: float, ack_timeout: float
    ) -> Stats:
        """One report per `every` seconds from `first` until `end` (monotonic), each written
        after the previous one's Ack; figures for the ticks from `t0` on."""
        stats = Stats()
        at = first
        gpus = len(self.hello.gpus)
        waiting = measured = False  # a report written, its Ack not read
        try:
            while at < end:
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                measured = at >= t0
                began = time.monotonic()
                end_ns = time.time_ns() - round((began - at) * 1e9)  # the tick's wall time
                data, template, seconds = self.build(end_ns, None, True)
                await self.call.write(agent_message((data,)))
                waiting = True
                self.record(end_ns, seconds, template)
                if measured:
                    stats.offered += 1
                    stats.offered_gpu_samples += gpus
                    stats.sent += 1
                    stats.late.append(began - at)
                reply = await asyncio.wait_for(self.call.read(), ack_timeout)
                done = time.monotonic()
                wall = time.time()
                if reply is grpc.aio.EOF or reply.WhichOneof("body") != "ack":
                    self.error = f"report {self.seq}: {reply} instead of an Ack"
                    break
                waiting = False
                rejected = any(r.seq == self.seq for r in reply.ack.rejections)
                acked = not rejected and reply.ack.acked_seq >= self.seq
                if not acked:
                    self.unrecord()
                if measured:
                    if acked:
                        stats.acked += 1
                        stats.gpu_samples += gpus
                        stats.gpu_seconds += gpus * self.covers[-1]
                    else:
                        stats.rejected += 1
                    stats.latencies.append(done - began)
                    stats.lags.append(wall - (end_ns / 1e9 - seconds))
                at += every
                if at < done:  # the Ack came after the next tick: those ticks are skipped
                    missed = math.ceil((done - at) / every)
                    for k in range(missed):
                        if t0 <= at + k * every < end:
                            stats.offered += 1
                            stats.offered_gpu_samples += gpus
                            stats.skipped += 1
                    self.skipped_in_window = True
                    at += missed * every
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name}: {error.details()}"
        except TimeoutError:
            self.error = f"report {self.seq}: no Ack within {ack_timeout:g} s"
        except (asyncio.InvalidStateError, asyncio.CancelledError):  # ended by the server
            self.error = self.error or f"report {self.seq}: the call ended"
        if waiting and measured:
            stats.unacked += 1
        return stats

    async def saturate(
        self, t0: float, end: float, inflight: int, batch: int, ack_timeout: float
    ) -> Stats:
        """As fast as Acks come back: `inflight` messages of `batch` reports written ahead of
        their Acks (each server acknowledges a message with one Ack). Ends half-closed."""
        stats = Stats()
        gpus = len(self.hello.gpus)
        pending: deque[tuple[int, float, bool]] = deque()  # last seq, write time, measured
        slots = asyncio.Semaphore(inflight)

        async def reader() -> None:
            while True:
                reply = await asyncio.wait_for(self.call.read(), ack_timeout)
                if reply is grpc.aio.EOF:
                    return
                done = time.monotonic()
                acked, rejected = reply.ack.acked_seq, len(reply.ack.rejections)
                while pending and pending[0][0] <= acked:
                    _, began, measured = pending.popleft()
                    slots.release()
                    if measured:
                        stats.acked += batch - rejected
                        stats.rejected += rejected
                        stats.gpu_samples += (batch - rejected) * gpus
                        stats.latencies.append(done - began)
                    rejected = 0

        task = asyncio.ensure_future(reader())
        try:
            while time.monotonic() < end and not task.done():
                try:
                    await asyncio.wait_for(slots.acquire(), max(0.001, end - time.monotonic()))
                except TimeoutError:
                    break
                if time.monotonic() >= end:
                    break
                began = time.monotonic()
                parts = []
                for _ in range(batch):
                    # Stamped now, with the template's interval: the collector counts only
                    # the seconds since the previous report (it clips the overlap), so no
                    # second is claimed twice and nothing is refused.
                    now_ns = max(time.time_ns(), self.last_ns + 1000)
                    elapsed = (now_ns - self.last_ns) / 1e9 if self.last_ns else None
                    data, _, _ = self.build(now_ns, elapsed, False)
                    parts.append(data)
                await self.call.write(agent_message(parts))
                measured = began >= t0
                pending.append((self.seq, began, measured))
                if measured:
                    stats.offered += batch
                    stats.offered_gpu_samples += batch * gpus
                    stats.sent += batch
            if not task.done():
                await self.call.done_writing()  # the server ends the call after the last Ack
                self.half_closed = True
            await asyncio.wait_for(asyncio.shield(task), ack_timeout)
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name}: {error.details()}"
        except TimeoutError:
            self.error = f"no Ack within {ack_timeout:g} s"
        except (asyncio.InvalidStateError, asyncio.CancelledError):  # ended by the server
            self.error = self.error or "the call ended"
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if task.done() and not task.cancelled() and task.exception() is not None:
            failure = task.exception()
            self.error = self.error or f"{type(failure).__name__}: {failure}"
        stats.unacked += sum(batch for _, _, measured in pending if measured)
        return stats


def truth_weights(
    streams: Sequence[Stream], windows: Sequence[tuple[float, float, float]], templates: int
) -> tuple[list[list[float]], list[float]]:
    """Per window (start, end, sent by): the seconds of each template inside the window, over
    the reports sent by then; and the seconds of each template over every report sent."""
    out = []
    for start, end, cutoff in windows:
        weights = [0.0] * templates
        for s in streams:
            ends, covers, used = s.ends, s.covers, s.used
            for k in range(bisect.bisect_right(ends, start), bisect.bisect_right(ends, cutoff)):
                e = ends[k]
                overlap = min(e, end) - max(e - covers[k], start)
                if overlap > 0:
                    weights[used[k]] += overlap
        out.append(weights)
    totals = [0.0] * templates
    for s in streams:
        for covered, template in zip(s.covers, s.used, strict=True):
            totals[template] += covered
    return out, totals


async def guarded(stream: Stream, run: Coroutine[Any, Any, Stats]) -> Stats:
    """A stream's run; whatever goes wrong ends that stream alone, with its error said."""
    try:
        return await run
    except Exception as error:
        stream.error = stream.error or f"{type(error).__name__}: {error}"
        return Stats()


async def worker_role(conn: Connection, config: dict[str, Any]) -> None:
    templates = [Templates(shape) for shape in config["shapes"]]
    count = sum(len(shape["reports"]) for shape in config["shapes"])
    streams: dict[str, list[Stream]] = {}
    conn.send(("ready", {}))
    while True:
        command, arguments = await asyncio.to_thread(conn.recv)
        if command == "exit":
            return
        if command == "open":
            group = [
                Stream(n, templates[shape], arguments["prefix"], config["run"], config["window"])
                for n, shape in arguments["streams"]
            ]
            streams[arguments["prefix"]] = group
            gate = asyncio.Semaphore(OPEN_AT_ONCE)

            async def opened(
                stream: Stream, target: str = arguments["target"], gate: Any = gate
            ) -> None:
                async with gate:
                    try:
                        await asyncio.wait_for(stream.open(target), 60.0)
                    except (grpc.aio.AioRpcError, TimeoutError, RuntimeError) as error:
                        stream.error = f"opening: {type(error).__name__}: {error}"

            began = time.monotonic()
            await asyncio.gather(*(opened(s) for s in group))
            failed = [f"{s.node}: {s.error}" for s in group if s.error]
            conn.send(("opened", {"seconds": time.monotonic() - began, "failed": failed}))
        elif command in ("steady", "saturate"):
            group = [s for s in streams[arguments["prefix"]] if not s.error]
            a = arguments
            if command == "steady":
                runs = [
                    s.steady(a["first"][s.node], a["t0"], a["end"], a["every"], a["ack_timeout"])
                    for s in group
                ]
            else:
                runs = [
                    s.saturate(a["t0"], a["end"], a["inflight"], a["batch"], a["ack_timeout"])
                    for s in group
                ]
            total = Stats()
            for stats in await asyncio.gather(
                *(guarded(s, run) for s, run in zip(group, runs, strict=True))
            ):
                total.add(stats)
            errors = [f"{s.node}: {s.error}" for s in group if s.error]
            await asyncio.gather(*(s.close(10.0) for s in group))
            every = streams[a["prefix"]]
            conn.send(
                (
                    "result",
                    {
                        "stats": {
                            k: getattr(total, k)
                            for k in (
                                "offered",
                                "offered_gpu_samples",
                                "sent",
                                "acked",
                                "rejected",
                                "unacked",
                                "skipped",
                                "gpu_samples",
                                "gpu_seconds",
                            )
                        },
                        "latencies": total.latencies.tobytes(),
                        "lags": total.lags.tobytes(),
                        "late": total.late.tobytes(),
                        "errors": errors,
                        "build_s": sum(s.build_s for s in every),
                        "built": sum(s.built for s in every),
                        "summaries": sum(s.summaries for s in every),
                        "recorded": sum(len(s.ends) for s in every),
                        "withheld": sum(s.withheld for s in every),
                        "clipped_s": sum(
                            sum(s.t.intervals[u - s.t.base] for u in s.used) - sum(s.covers)
                            for s in every
                        ),
                    },
                )
            )
        elif command == "truth":
            group = streams.get(arguments["prefix"], [])
            weights, totals = truth_weights(group, arguments["windows"], count)
            conn.send(("truth", {"windows": weights, "totals": totals}))


# -- the baseline: a bare grpc.aio server --------------------------------------------------


class BareIngest(pb_grpc.IngestServicer):
    """The same method and messages as the collector's, and nothing else: Hello, Challenge,
    Proof (verified), Welcome; then each message parsed and acknowledged."""

    async def Stream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Hello first")
        hello = first.hello
        nonce = os.urandom(32)
        await context.write(pb.CollectorMessage(challenge=pb.Challenge(nonce=nonce)))
        proof = await context.read()
        if (
            proof is grpc.aio.EOF
            or proof.WhichOneof("body") != "proof"
            or not verify_stream(
                hello.public_key, proof.proof.signature, nonce, hello.node, hello.instance_id
            )
        ):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid Proof")
        await context.write(pb.CollectorMessage(welcome=pb.Welcome(collector_version="bare")))
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            acked = samples = 0
            for report in message.batch.reports:
                acked = max(acked, report.seq)
                samples += len(report.gpus)
            await context.write(pb.CollectorMessage(ack=pb.Ack(acked_seq=acked)))


async def baseline_role(conn: Connection, config: dict[str, Any]) -> None:
    server = grpc.aio.server(
        options=(
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_concurrent_streams", 2**31 - 1),
        )
    )
    pb_grpc.add_IngestServicer_to_server(BareIngest(), server)
    if not server.add_insecure_port(f"127.0.0.1:{config['port']}"):
        raise RuntimeError(f"cannot listen on 127.0.0.1:{config['port']}")
    await server.start()
    conn.send(("ready", {}))
    await asyncio.to_thread(conn.recv)
    await server.stop(1)


ROLES: dict[str, Callable[[Connection, dict[str, Any]], Any]] = {
    "worker": worker_role,
    "baseline": baseline_role,
}


def child(role: str, conn: Connection, config: dict[str, Any]) -> None:
    """A child process's body. Ctrl-C is the measuring process's to handle: it ends us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(ROLES[role](conn, config))
    except Exception as error:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{role}: {type(error).__name__}: {error}"))


# -- the measuring process -----------------------------------------------------------------


class Child:
    """A child process (generator or baseline), its pipe and its CPU time."""

    def __init__(
        self, ctx: Any, name: str, role: str, config: dict[str, Any], processes: list[Any]
    ):
        self.name = name
        self.conn, theirs = multiprocessing.Pipe()
        self.process = ctx.Process(target=child, args=(role, theirs, config), name=name)
        self.process.start()
        processes.append(self.process)
        theirs.close()
        self.ps = psutil.Process(self.process.pid)
        self.cpu_last = 0.0
        self.stash: deque[tuple[str, Any]] = deque()  # read early, not yet expected

    def check(self) -> None:
        """Take what it sent so far; Failed if that is an error."""
        while self.conn.poll():
            try:
                got, value = self.conn.recv()
            except EOFError:
                raise Failed(f"{self.name} ended without a word") from None
            if got == "error":
                raise Failed(str(value))
            self.stash.append((got, value))

    def expect(self, kind: str, timeout: float, watch: Callable[[], None]) -> dict[str, Any]:
        """The next message, which must be `kind`; Failed for an error, silence or death."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if self.stash:
                got, value = self.stash.popleft()
                if got != kind:
                    raise Failed(f"{self.name}: {got!r} instead of {kind!r}")
                return dict(value)
            watch()
            if not self.process.is_alive():
                raise Failed(f"{self.name} ended (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise Failed(f"{self.name}: no {kind!r} within {timeout:.0f} s")
            self.conn.poll(0.1)

    def cpu(self) -> float:
        with contextlib.suppress(psutil.Error):
            self.cpu_last = cpu_seconds(self.ps)
        return self.cpu_last


def expect_all(
    children: Sequence[Child], kind: str, timeout: float, watch: Callable[[], None]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    return [c.expect(kind, max(1.0, deadline - time.monotonic()), watch) for c in children]


class Meter:
    """CPU seconds of named processes, and of the whole machine, at one moment."""

    def __init__(self, procs: dict[str, Callable[[], float]]):
        self.procs = procs

    def read(self) -> tuple[float, dict[str, float]]:
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        values = {name: f() for name, f in self.procs.items()}
        values["machine"] = busy
        return time.monotonic(), values

    @staticmethod
    def percent(
        a: tuple[float, dict[str, float]], b: tuple[float, dict[str, float]]
    ) -> dict[str, float]:
        """% of one core per process between two readings; `others`: what else ran."""
        seconds = max(b[0] - a[0], 1e-9)
        out = {k: round(100.0 * max(0.0, b[1][k] - a[1][k]) / seconds, 1) for k in a[1]}
        out["others"] = round(
            max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine")), 1
        )
        return out


_NODE_COUNTERS = "reports|summaries|chain_breaks|energy_refused|clipped_seconds"
_SERIES = re.compile(
    rf"^(gputally_(?:cluster|collector_reports|streams_refused|metrics|node_(?:{_NODE_COUNTERS}))\w*)"
    r"(?:\{(.*)\})? (\S+)$"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def read_metrics(body: bytes) -> dict[str, Any]:
    """The cluster series a run compares, from one /metrics answer."""
    out: dict[str, Any] = {
        "ratio": {},
        "seconds": {},
        "gpus": {},
        "accepted": 0,
        "rejected": 0,
        "refused": {},
        "summaries": {},
        "chain_breaks": 0.0,
        "energy_refused": 0.0,
        "clipped_seconds": 0.0,
    }
    cluster: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line.startswith("gputally_"):
            continue
        match = _SERIES.match(line)
        if not match:
            continue
        name, labels, value = (
            match.group(1),
            dict(_LABEL.findall(match.group(2) or "")),
            float(match.group(3)),
        )
        if name == "gputally_cluster_utilization_ratio":
            out["ratio"][labels.get("measure", "")] = value
        elif name == "gputally_cluster_coverage_ratio":
            out["coverage"] = value
        elif name == "gputally_cluster_window_seconds":
            out["window"] = value
        elif name == "gputally_metrics_refresh_seconds":  # a collector that serves a render
            out["refresh"] = value
        elif name == "gputally_metrics_render_seconds":
            out["render"] = value
        elif name == "gputally_cluster_gpu_seconds_total":
            out["seconds"][labels.get("measure", "")] = value
        elif name == "gputally_cluster_gpus":
            out["gpus"][labels.get("state", "")] = value
        elif name == "gputally_node_reports_total":
            if labels.get("result") == "accepted":
                out["accepted"] += value
            elif labels.get("result") == "rejected":
                out["rejected"] += value
        elif name == "gputally_collector_reports_total":  # every node's, even without nodes'
            cluster[labels.get("result", "?")] = value
        elif name == "gputally_streams_refused_total":
            out["refused"][labels.get("status", "?")] = value
        elif name == "gputally_node_summaries_total":
            result = labels.get("result", "?")
            out["summaries"][result] = out["summaries"].get(result, 0.0) + value
        elif name in (
            "gputally_node_chain_breaks_total",
            "gputally_node_energy_refused_total",
            "gputally_node_clipped_seconds_total",
        ):
            key = name.removeprefix("gputally_node_").removesuffix("_total")
            out[key] += value
    if cluster:  # a collector that counts them for the cluster (--node-metrics none too)
        out["accepted"], out["rejected"] = cluster.get("accepted", 0), cluster.get("rejected", 0)
    return out


def figures(values: Sequence[float], capacity: float) -> dict[str, float]:
    """The live window's figures over `capacity` GPU-seconds, by the collector's rules."""
    named = dict(zip(FIELDS, values, strict=True))
    out = {m: b.figure for m, b in accounting.bounds(named, capacity, accounting.MEASURES).items()}
    out["coverage"] = accounting.coverage(named, capacity)
    return out


def combine(weights: Sequence[float], rates: Sequence[tuple[float, ...]]) -> list[float]:
    values = [0.0] * len(FIELDS)
    for w, r in zip(weights, rates, strict=True):
        if w:
            for i, v in enumerate(r):
                values[i] += w * v
    return values


def within(value: float | None, a: float, b: float) -> float | None:
    """0 when `value` lies between `a` and `b`; else its relative error to the nearer."""
    if value is None:
        return None
    low, high = min(a, b), max(a, b)
    if low - 1e-12 <= value <= high + 1e-12:
        return 0.0
    return relative(value, low if value < low else high)


def worst_of(values: Sequence[float]) -> float:
    """The value farthest from 0, with its sign."""
    return max(values, key=lambda v: -v if v < 0 else v)


def relative(value: float | None, truth: float | None) -> float | None:
    if value is None or truth is None:
        return None
    if truth == 0:
        return 0.0 if value == 0 else None
    return (value - truth) / truth


def collector_defaults() -> dict[str, float]:
    """--window and --lag as the collector's own parser gives them by default."""
    try:
        from gputally.collector.cli import register

        sub = argparse.ArgumentParser(add_help=False).add_subparsers()
        parser = register(sub)["collector"]
        return {
            "window": float(parser.get_default("window")),
            "lag": float(parser.get_default("lag")),
        }
    except Exception:  # an older or newer collector: its documented defaults
        return {"window": 30.0, "lag": 3.0}


def collector_settings(extra: Sequence[str]) -> dict[str, float]:
    defaults = collector_defaults()
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--window", type=float, default=defaults["window"])
    parser.add_argument("--lag", type=float, default=defaults["lag"])
    known, _ = parser.parse_known_args(list(extra))
    return {"window": known.window, "lag": known.lag}


def live_window(
    settings: dict[str, float], interval: float, report_every: float
) -> tuple[float, float]:
    """The collector's live window and lag for agents reporting every `report_every` s, by
    its rule (live.state.ClusterState._spans): reports spanning several ticks widen the
    window to 3 reports and add one report to the lag (a cadence up to MAX_CADENCE_S)."""
    window, lag = settings["window"], settings["lag"]
    if report_every <= interval:
        return window, lag
    try:
        from gputally.collector.live import state

        longest = float(getattr(state, "MAX_CADENCE_S", 60.0))
    except Exception:  # the collector is not importable here: its documented cap
        longest = 60.0
    cadence = min(report_every, longest)
    return max(window, 3.0 * cadence), lag + cadence


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 0.50),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else None,
        "count": len(ordered),
    }


def py_spy_top(path: Path, top: int = 12) -> list[dict[str, Any]]:
    """The functions with most samples in a raw (collapsed) py-spy file: own and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    return (
        [
            {"function": f, "own": round(n / total, 4), "inclusive": round(inclusive[f] / total, 4)}
            for f, n in own.most_common(top)
        ]
        if total
        else []
    )


def metrics(urls: Sequence[str], logs: Sequence[Path]) -> tuple[float, dict[str, Any]]:
    """One scrape of every shard, which must succeed (Failed with the shard's log otherwise):
    the slowest answer's seconds, and the cluster's series (merged)."""
    slowest, parts = 0.0, []
    for url, collector_log in zip(urls, logs, strict=True):
        try:
            seconds, body, _ = scrape_wire(url)
        except OSError as error:
            raise Failed(
                f"{url} answered {error}; the collector's log ends with:\n"
                f"{collector_log.read_text(errors='replace')[-3000:]}"
            ) from None
        slowest = max(slowest, seconds)
        parts.append(read_metrics(body))
    return slowest, merged(parts)


def merged(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The cluster's series from its shards' (read_metrics each), as the recording rules add
    them up: counters summed; the ratios summed too, which is exact here because every shard
    divides by the same whole-cluster --expected-gpus x the same window; the expected GPUs,
    the window and the render's figures the largest of any shard."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                into = out.setdefault(key, {})
                for label, v in value.items():
                    if key == "gpus" and label == "expected":
                        into[label] = max(into.get(label, 0.0), v)
                    else:
                        into[label] = into.get(label, 0.0) + v
            elif key in ("window", "refresh", "render"):
                out[key] = max(out.get(key, 0.0), value)
            else:
                out[key] = out.get(key, 0) + value
    return out


def scrapes(
    urls: Sequence[str],
    start: float,
    end: float,
    every: float,
    out: list[dict[str, Any]],
    stop: threading.Event,
) -> None:
    """/metrics as Prometheus scrapes it, at start, start + every, ... (monotonic) before end:
    every shard, one after the other (the slowest answer, the sizes and series added up)."""
    at = start
    while at < end and not stop.is_set():
        if stop.wait(max(0.0, at - time.monotonic())):
            return
        wall = time.time()
        try:
            answers = [scrape_wire(url) for url in urls]
        except OSError as error:
            out.append({"wall": wall, "error": str(error)})
        else:
            out.append(
                {
                    "wall": wall,
                    "seconds": max(seconds for seconds, _, _ in answers),
                    "bytes": sum(len(body) for _, body, _ in answers),
                    "wire_bytes": sum(wire for _, _, wire in answers),
                    "lines": sum(body.count(b"\n") for _, body, _ in answers),
                    "metrics": merged([read_metrics(body) for _, body, _ in answers]),
                }
            )
        at += every
        while at < time.monotonic():  # a scrape that took longer than `every`: the next one now
            at += every


def run(args: argparse.Namespace, tmp: Path, processes: list[Any]) -> dict[str, Any]:
    wall = time.monotonic()
    settings = collector_settings(args.collector_arg)
    # -- templates
    scenarios = load_scenarios(args.scenario, args.gpus)
    window = args.summary_window or 300.0
    log(
        f"templates: the agent's Sampler over MockNVML, {sum(s.nodes for s in scenarios)} node "
        f"shapes x {window:g} s of sampling ..."
    )
    began = time.perf_counter()
    shapes: list[Shape] = []
    for scenario in scenarios:
        for node in range(scenario.nodes):
            shapes.append(build_shape(scenario, node, args.interval, args.report_every, window))
    base = 0
    for shape in shapes:
        shape.base = base
        base += len(shape.reports)
    templates_s = time.perf_counter() - began
    rates = [r for shape in shapes for r in shape.rates]
    sizes = [len(r) for shape in shapes for r in shape.reports]
    restamp = measure_restamp(shapes)

    # -- who streams what
    steady_n = args.streams if args.duration > 0 else 0
    sat_n = args.saturate_streams if args.saturate > 0 else 0
    assignment = [(n, n % len(shapes)) for n in range(steady_n)]
    expected = sum(shapes[s].gpus for _, s in assignment) or sum(s.gpus for s in shapes)
    workers_n = args.workers or max(
        1, min(os.cpu_count() or 1, math.ceil(max(steady_n, 1) / STREAMS_PER_WORKER))
    )

    # -- the collector: one, or --shards on one port (--share-port), the kernel spreading the
    # streams' connections over them
    grpc_port, base_port = free_port(), free_port()
    metrics_ports = [free_port() for _ in range(args.shards)]
    target = f"127.0.0.1:{grpc_port}"
    metrics_urls = [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports]
    total_streams = steady_n + sat_n
    command = [
        *gputally(),
        "collector",
        f"--grpc-listen={target}",
        *(["--share-port"] if args.shards > 1 else []),
        f"--expected-gpus={expected}",
        f"--max-streams-per-peer={total_streams + 16}",
        f"--max-streams={max(20_000, total_streams + 16)}",
        f"--max-nodes={max(20_000, total_streams + 16)}",
        "--grace=1",
    ]
    if args.db is None:
        command.append("--db=")
    else:
        db = Path(args.db) if args.db else tmp / "ledger.db"
        command += [f"--db={db}", f"--keys={tmp / 'keys'}", "--trust-on-first-use"]
    command += args.collector_arg
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    collector_logs = [tmp / f"collector-{k}.log" for k in range(args.shards)]
    collectors = []
    for port, collector_log in zip(metrics_ports, collector_logs, strict=True):
        with collector_log.open("wb") as sink:
            collectors.append(
                subprocess.Popen(
                    [*command, f"--metrics-listen=127.0.0.1:{port}"],
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=environment,
                )
            )
        processes.append(collectors[-1])

    def watch() -> None:
        for collector, collector_log in zip(collectors, collector_logs, strict=True):
            if collector.poll() is not None:
                raise Failed(
                    f"the collector exited ({collector.returncode}): "
                    f"{collector_log.read_text(errors='replace')[-2000:]}"
                )

    deadline = time.monotonic() + 60
    for port in (grpc_port, *metrics_ports):
        while True:
            watch()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise Failed("the collector did not listen within 60 s") from None
                time.sleep(0.1)
    procs_ = [psutil.Process(c.pid) for c in collectors]

    def collector_rss() -> float:
        return sum(p.memory_info().rss for p in procs_) / MiB

    rss_idle = collector_rss()

    # -- the generators (and the baseline)
    ctx = multiprocessing.get_context("spawn")
    config = {
        "shapes": [
            {
                "base": s.base,
                "hello": s.hello,
                "reports": s.reports,
                "intervals": s.intervals,
                "energy_start": s.energy_start,
                "energy_deltas": s.energy_deltas,
                "summary": s.summary if args.summary_window else b"",
            }
            for s in shapes
        ],
        "run": uuid.uuid4().hex[:12],
        "window": args.summary_window,
    }
    workers = [Child(ctx, f"generator-{w}", "worker", config, processes) for w in range(workers_n)]
    baseline = Child(ctx, "baseline", "baseline", {"port": base_port}, processes) if sat_n else None
    expect_all([*workers, *([baseline] if baseline else [])], "ready", 120.0, watch)
    me = psutil.Process()
    procs: dict[str, Callable[[], float]] = {
        "collector": lambda: sum(cpu_seconds(p) for p in procs_),
        "generators": lambda: sum(w.cpu() for w in workers),
        "harness": lambda: cpu_seconds(me),
    }
    if baseline is not None:
        procs["baseline"] = baseline.cpu
    profiler: subprocess.Popen[bytes] | None = None
    profile_path = Path(args.profile).resolve() if args.profile else None
    profiler_cpu = [0.0]  # its last reading: py-spy exits at the end of the steady state

    def profiler_seconds() -> float:
        if profiler is not None:
            with contextlib.suppress(psutil.Error):
                profiler_cpu[0] = cpu_seconds(psutil.Process(profiler.pid))
        return profiler_cpu[0]

    procs["profiler"] = profiler_seconds
    meter = Meter(procs)
    result: dict[str, Any] = {}

    # -- steady state
    steady: dict[str, Any] | None = None
    if steady_n:
        log(f"opening {steady_n:,} streams from {workers_n} generator process(es) ...")
        for w, worker in enumerate(workers):
            worker.conn.send(
                ("open", {"prefix": "node", "target": target, "streams": assignment[w::workers_n]})
            )
        opened = expect_all(workers, "opened", 120 + steady_n * 0.05, watch)
        open_failed = [f for o in opened for f in o["failed"]]
        connect_s = max(o["seconds"] for o in opened)
        rss_open = collector_rss()
        go = time.monotonic() + 1.0
        t0 = go + args.warmup
        end = t0 + args.duration
        every = args.report_every
        first = {f"node-{n:05d}": go + every * (n / steady_n) for n, _ in assignment}
        for w, worker in enumerate(workers):
            mine = {f"node-{n:05d}" for n, _ in assignment[w::workers_n]}
            worker.conn.send(
                (
                    "steady",
                    {
                        "prefix": "node",
                        "first": {k: v for k, v in first.items() if k in mine},
                        "t0": t0,
                        "end": end,
                        "every": every,
                        "ack_timeout": args.ack_timeout,
                    },
                )
            )
        log(
            f"open in {connect_s:.1f} s; warm-up {args.warmup:g} s, then {args.duration:g} s "
            f"measured{f', py-spy on the collector -> {profile_path}' if profile_path else ''} ..."
        )
        scraped: list[dict[str, Any]] = []
        stop_scraping = threading.Event()
        scraper = threading.Thread(
            target=scrapes,
            args=(metrics_urls, t0, end, args.scrape_every, scraped, stop_scraping),
            daemon=True,
        )
        if args.scrape_every:
            # the first scrape starts the collector's renderer: before the measured span
            time.sleep(max(0.0, t0 - min(args.scrape_every, 30.0) - time.monotonic()))
            metrics(metrics_urls, collector_logs)
            scraper.start()
        rss: list[tuple[float, float]] = []
        sample_every = args.sample_every or max(0.5, min(5.0, args.duration / 20))
        marks: list[tuple[float, dict[str, float]]] = []
        next_rss = t0
        try:
            while True:
                now = time.monotonic()
                if not marks and now >= t0:
                    marks.append(meter.read())
                    if profile_path is not None:
                        profiler = start_profiler(collectors[0].pid, profile_path, args, processes)
                if now >= next_rss and now >= t0:
                    rss.append((now - t0, collector_rss()))
                    next_rss += sample_every
                if now >= end:
                    marks.append(meter.read())
                    break
                watch()
                for worker in workers:
                    worker.check()
                time.sleep(max(0.01, min(next_rss, end, now + 0.5) - time.monotonic()))
            rss_end = collector_rss()
            generators_rss = sum(w.ps.memory_info().rss for w in workers) / MiB
            results = expect_all(workers, "result", args.ack_timeout + 60 + steady_n * 0.01, watch)
        finally:
            stop_scraping.set()
        if args.scrape_every:
            scraper.join(90)
        profile = finish_profiler(profiler, profile_path, args.duration)
        # Every Ack is in. A collector that serves a render made every `refresh` seconds
        # shows them once it has rendered again: wait for that before reading its counters.
        refresh = next(
            (
                s["metrics"]["refresh"]
                for s in reversed(scraped)
                if "refresh" in s.get("metrics", {})
            ),
            None,
        )
        if refresh is None:
            refresh = metrics(metrics_urls, collector_logs)[1].get("refresh", 0.0)
        time.sleep(min(float(refresh), 60.0) + 0.5 if refresh else 0.0)
        final_s, final = metrics(metrics_urls, collector_logs)
        # The truth at every scrape's start, and as the oldest render it may serve saw it (a
        # refresh and a render's time earlier: a render's view is taken when it begins),
        # over the collector's window (as /metrics gives its length).
        windows = []
        for s in scraped:
            got = s.get("metrics", {})
            length = got.get("window", settings["window"])
            age = got.get("refresh", 0.0) + got.get("render", 0.0) if got.get("refresh") else 0.0
            for k in range(AGE_POINTS):
                at = s["wall"] - age * k / (AGE_POINTS - 1)
                windows.append((at - args.truth_lag - length, at - args.truth_lag, at))
        for worker in workers:
            worker.conn.send(("truth", {"prefix": "node", "windows": windows}))
        truths = expect_all(workers, "truth", 120.0, watch)
        steady = steady_figures(args, results, truths, rates, expected, scraped, final, marks)
        steady.update(
            {
                "streams_failed_to_open": len(open_failed),
                "open_errors": open_failed[:5],
                "connect_s": round(connect_s, 2),
                "rss_mib": {
                    "idle": round(rss_idle, 1),
                    "streams_open": round(rss_open, 1),
                    "start": round(rss[0][1], 1) if rss else None,
                    "max": round(max(v for _, v in rss), 1) if rss else None,
                    "end": round(rss_end, 1),
                    "slope_mib_per_min": (round(x, 3) if (x := slope(rss)) is not None else None),
                    "samples": len(rss),
                    "every_s": sample_every,
                },
                "final_scrape_ms": round(final_s * 1000, 1),
                "generators_rss_mib": round(generators_rss, 1),
                "profile": profile,
            }
        )

    # -- max throughput: the baseline, then the collector
    saturation: dict[str, Any] | None = None
    if sat_n and baseline is not None:
        saturation = {}
        numbers = [(steady_n + n, n % len(shapes)) for n in range(sat_n)]
        for name, where in (("baseline", f"127.0.0.1:{base_port}"), ("collector", target)):
            prefix = f"sat{name[0]}"
            log(f"max throughput against the {name}: {sat_n} streams ...")
            for w, worker in enumerate(workers):
                worker.conn.send(
                    ("open", {"prefix": prefix, "target": where, "streams": numbers[w::workers_n]})
                )
            opened = expect_all(workers, "opened", 120 + sat_n * 0.05, watch)
            start = time.monotonic() + 0.5
            t0 = start + args.saturate_warmup
            end = t0 + args.saturate
            for worker in workers:
                worker.conn.send(
                    (
                        "saturate",
                        {
                            "prefix": prefix,
                            "t0": t0,
                            "end": end,
                            "inflight": args.saturate_inflight,
                            "batch": args.saturate_batch,
                            "ack_timeout": args.ack_timeout,
                        },
                    )
                )
            time.sleep(max(0.0, t0 - time.monotonic()))
            a = meter.read()
            while time.monotonic() < end:
                watch()
                time.sleep(min(0.5, max(0.01, end - time.monotonic())))
            b = meter.read()
            results = expect_all(workers, "result", args.ack_timeout + 60, watch)
            saturation[name] = saturate_figures(args, results, a, b, opened)
        c, bl = saturation["collector"], saturation["baseline"]
        saturation["ratio"] = (
            round(c["acked_per_s"] / bl["acked_per_s"], 3) if bl["acked_per_s"] else None
        )

    for worker in workers:
        worker.conn.send(("exit", {}))
    if baseline is not None:
        baseline.conn.send("stop")
    for collector in collectors:
        collector.terminate()
    for collector in collectors:
        try:
            collector.wait(30)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait()
    for c in [*workers, *([baseline] if baseline else [])]:
        c.process.join(10)
    result.update(
        {
            "configuration": {
                "streams": steady_n,
                "gpus_per_node": sorted({shapes[s].gpus for _, s in assignment}) or [args.gpus],
                "gpus": expected,
                "interval_s": args.interval,
                "report_every_s": args.report_every,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "scrape_every_s": args.scrape_every,
                "summary_window_s": args.summary_window,
                "workers": workers_n,
                "cpu_cores": os.cpu_count(),
                "load_average_at_start": args.load_at_start,
                "collector_command": [Path(command[0]).name, *command[1:]],
                "shards": args.shards,
                "collector_window_s": settings["window"],
                "collector_lag_s": settings["lag"],
                "truth_lag_s": args.truth_lag,
                "record": args.db is not None,
                "saturate_s": args.saturate,
                "saturate_warmup_s": args.saturate_warmup,
                "saturate_streams": sat_n,
                "saturate_inflight": args.saturate_inflight,
                "saturate_batch": args.saturate_batch,
                "scenarios": [s.name for s in scenarios],
            },
            "templates": {
                "shapes": [s.name for s in shapes],
                "reports_per_shape": sorted({len(s.reports) for s in shapes}),
                "report_bytes": {
                    "min": min(sizes),
                    "mean": round(sum(sizes) / len(sizes)),
                    "max": max(sizes),
                },
                "source": (
                    "Sampler(report_every)"
                    if SAMPLER_REPORTS_EVERY
                    else (
                        "Sampler (one report per tick)"
                        if args.report_every == args.interval
                        else f"Sampler sampling every {args.report_every:g} s (it has no "
                        "report_every yet): no per-tick totals"
                    )
                ),
                "with_totals": sum(s.with_totals for s in shapes),
                "seconds": round(templates_s, 2),
                "restamp_us": restamp,
            },
            "steady": steady,
            "saturation": saturation,
            "collector_exit": max(c.returncode for c in collectors),
            "wall_s": round(time.monotonic() - wall, 1),
        }
    )
    result["targets"] = targets(result)
    return result


def measure_restamp(shapes: Sequence[Shape]) -> dict[str, float]:
    """What re-stamping and serializing one report costs a generator, timed here: over every
    template, as the streams do it (µs per report, the median of 5 passes; and with a summary
    to sign, the rare case)."""
    config = {
        "base": 0,
        "hello": shapes[0].hello,
        "reports": shapes[0].reports,
        "intervals": shapes[0].intervals,
        "energy_start": shapes[0].energy_start,
        "energy_deltas": shapes[0].energy_deltas,
        "summary": shapes[0].summary,
    }
    passes = []
    summary_us = 0.0
    for shape in shapes:
        config.update(
            {
                "hello": shape.hello,
                "reports": shape.reports,
                "intervals": shape.intervals,
                "energy_start": shape.energy_start,
                "energy_deltas": shape.energy_deltas,
                "summary": shape.summary,
            }
        )
        stream = Stream(0, Templates(config), "time", "local", 0.0)
        runs = []
        n = len(shape.reports)
        for _ in range(5):
            began = time.perf_counter()
            for k in range(n):
                stream.build(1_750_000_000_000_000_000 + k, None, False)
            runs.append((time.perf_counter() - began) / n)
        passes.append(sorted(runs)[2])
        if shape.summary:
            signing = Stream(0, Templates(config), "time", "local", 300.0)
            signing.windows = signing.first_window = 0
            began = time.perf_counter()
            for k in range(1, 21):
                signing.windows = k  # a window closed before every report
                signing.build(round((k + 1) * 300 * 1e9), None, True)
            summary_us = max(summary_us, (time.perf_counter() - began) / 20 * 1e6)
    return {
        "per_report_us": round(1e6 * sum(passes) / len(passes), 2),
        "slowest_shape_us": round(1e6 * max(passes), 2),
        "with_summary_us": round(summary_us, 1),
    }


def start_profiler(
    pid: int, path: Path, args: argparse.Namespace, processes: list[Any]
) -> subprocess.Popen[bytes]:
    kind = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    spy = Path(sys.executable).with_name("py-spy")
    profiler = subprocess.Popen(
        [
            str(spy) if spy.exists() else "py-spy",
            "record",
            f"--pid={pid}",
            f"--duration={max(1, round(args.duration))}",
            f"--rate={args.profile_rate}",
            f"--format={kind}",
            f"--output={path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    processes.append(profiler)
    return profiler


def finish_profiler(
    profiler: subprocess.Popen[bytes] | None, path: Path | None, duration: float
) -> dict[str, Any] | None:
    if profiler is None or path is None:
        return None
    try:
        _, err = profiler.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        _, err = profiler.communicate()
    ok = profiler.returncode == 0 and path.exists()
    out: dict[str, Any] = {"path": str(path), "ok": ok}
    if not ok:
        out["error"] = err.decode(errors="replace").strip()[-500:]
    elif path.suffix not in (".svg", ".json"):
        out["top"] = py_spy_top(path)
    return out


def steady_figures(
    args: argparse.Namespace,
    results: Sequence[dict[str, Any]],
    truths: Sequence[dict[str, Any]],
    rates: Sequence[tuple[float, ...]],
    expected: int,
    scraped: Sequence[dict[str, Any]],
    final: dict[str, Any],
    marks: Sequence[tuple[float, dict[str, float]]],
) -> dict[str, Any]:
    seconds = args.duration
    total: dict[str, float] = defaultdict(float)
    latencies, lags, late = array("d"), array("d"), array("d")
    for r in results:
        for k, v in r["stats"].items():
            total[k] += v
        latencies.frombytes(r["latencies"])
        lags.frombytes(r["lags"])
        late.frombytes(r["late"])
    errors = [e for r in results for e in r["errors"]]
    built = sum(r["built"] for r in results)
    # the truth, scrape by scrape
    comparisons = []
    n = len(scraped)
    by_window = [[0.0] * len(rates) for _ in range(AGE_POINTS * n)]
    all_totals = [0.0] * len(rates)
    for t in truths:
        for i, weights in enumerate(t["windows"]):
            row = by_window[i]
            for j, w in enumerate(weights):
                row[j] += w
        for j, w in enumerate(t["totals"]):
            all_totals[j] += w
    compared = ("busy", "effective", "sm_active", "allocated", "coverage")
    for i, s in enumerate(scraped):
        if "metrics" not in s:
            comparisons.append({"error": s.get("error", "?")})
            continue
        m = s["metrics"]
        length = m.get("window", args.collector_window)
        capacity = expected * length
        # the truth at the scrape, then back to the oldest a render it was served may be
        ages = [
            figures(combine(by_window[AGE_POINTS * i + k], rates), capacity)
            for k in range(AGE_POINTS)
        ]
        truth, older = ages[0], ages[-1]
        live = {**m["ratio"], "coverage": m.get("coverage")}
        comparisons.append(
            {
                "at_s": round(s["wall"] - scraped[0]["wall"], 2),
                "response_ms": round(s["seconds"] * 1000, 1),
                "render_ms": ms(m.get("render")),
                "render_age_max_s": (
                    round(m["refresh"] + m.get("render", 0.0), 3) if m.get("refresh") else None
                ),
                "live": {k: live.get(k) for k in compared},
                "truth": {k: round(truth[k], 6) for k in compared},
                "truth_at_oldest_render": {k: round(older[k], 6) for k in compared},
                "relative_error": {
                    k: (round(e, 6) if (e := relative(live.get(k), truth[k])) is not None else None)
                    for k in compared
                },
                # 0 when the live figure lies within the truth over the render's possible age
                # (sampled at AGE_POINTS times): what such a render may show; else the error
                # against the nearer end
                "relative_error_allowing_age": {
                    k: within(live.get(k), min(a[k] for a in ages), max(a[k] for a in ages))
                    for k in compared
                },
            }
        )
    good = [c for c in comparisons if "live" in c]
    errors_by: dict[str, dict[str, float | None]] = {}
    for k in compared:
        values: list[float] = [
            c["relative_error"][k] for c in good if c["relative_error"][k] is not None
        ]
        errors_by[k] = {
            "live_mean": (
                round(sum(c["live"][k] for c in good if c["live"][k] is not None) / len(good), 6)
                if good
                else None
            ),
            "truth_mean": round(sum(c["truth"][k] for c in good) / len(good), 6) if good else None,
            "mean": round(sum(values) / len(values), 6) if values else None,
            "worst": round(worst_of(values), 6) if values else None,
            "worst_allowing_age": (
                round(worst_of(aged), 6)
                if (
                    aged := [
                        c["relative_error_allowing_age"][k]
                        for c in good
                        if c["relative_error_allowing_age"][k] is not None
                    ]
                )
                else None
            ),
        }
    # the counters: everything sent against everything counted
    totals = combine(all_totals, rates)
    counters = {}
    for measure, name in COUNTED:
        truth_value = totals[_AT[name]] if name in _AT else None
        counted = final["seconds"].get(measure)
        counters[measure] = {
            "collector": counted,
            "truth": round(truth_value, 3) if truth_value is not None else None,
            "relative_error": (
                round(e, 9) if (e := relative(counted, truth_value)) is not None else None
            ),
        }
    responses = [s["seconds"] for s in scraped if "seconds" in s]
    renders = sorted(s["metrics"]["render"] for s in scraped if "render" in s.get("metrics", {}))
    cpu = Meter.percent(marks[0], marks[-1]) if len(marks) == 2 else {}
    lat, lag, lt = summarize(latencies), summarize(lags), summarize(late)
    acked_reports = total["acked"]
    return {
        "seconds": round(marks[-1][0] - marks[0][0], 2) if len(marks) == 2 else seconds,
        "offered": int(total["offered"]),
        "sent": int(total["sent"]),
        "acked": int(acked_reports),
        "rejected": int(total["rejected"]),
        "unacked": int(total["unacked"]),
        "skipped_ticks": int(total["skipped"]),
        "failed_streams": len(errors),
        "errors": errors[:10],
        "offered_reports_per_s": round(total["offered"] / seconds, 1),
        "acked_reports_per_s": round(acked_reports / seconds, 1),
        "offered_gpu_samples_per_s": round(total["offered_gpu_samples"] / seconds, 1),
        "acked_gpu_samples_per_s": round(total["gpu_samples"] / seconds, 1),
        "gpu_seconds_per_s": round(total["gpu_seconds"] / seconds, 1),
        "ack_latency_ms": {k: ms(v) if k != "count" else v for k, v in lat.items()},
        "lag_s": {k: (round(v, 3) if v is not None else None) for k, v in lag.items()},
        "generator_late_ms": {k: ms(v) if k != "count" else v for k, v in lt.items()},
        "cpu_percent": cpu,
        "generator_build_us_per_report": round(
            1e6 * sum(r["build_s"] for r in results) / max(built, 1), 2
        ),
        "generator_cpu_us_per_report": (
            round(cpu.get("generators", 0.0) / 100 * seconds / max(total["sent"], 1) * 1e6, 1)
            if cpu
            else None
        ),
        "summaries_sent": sum(r["summaries"] for r in results),
        "summaries_withheld": sum(r["withheld"] for r in results),
        "clipped_seconds": round(sum(r["clipped_s"] for r in results), 6),
        "metrics": {
            "scrapes": len(scraped),
            "failed": sum(1 for s in scraped if "error" in s),
            "response_ms_p50": ms(percentile(sorted(responses), 0.5)),
            "response_ms_max": ms(max(responses)) if responses else None,
            "render_ms_p50": ms(percentile(renders, 0.5)),
            "render_ms_max": ms(renders[-1]) if renders else None,
            "refresh_s": final.get("refresh"),
            "lines_max": max((s["lines"] for s in scraped if "lines" in s), default=None),
            "bytes_max": max((s["bytes"] for s in scraped if "bytes" in s), default=None),
            "wire_bytes_max": max(
                (s["wire_bytes"] for s in scraped if "wire_bytes" in s), default=None
            ),
        },
        "live_vs_truth": errors_by,
        "scrapes": comparisons,
        "counters": counters,
        "collector_accepted_reports": int(final["accepted"]),
        "reports_sent_not_rejected": sum(r["recorded"] for r in results),
        "collector_rejected_reports": int(final["rejected"]),
        "streams_refused": {k: int(v) for k, v in final["refused"].items()},
        "collector_summaries": {k: int(v) for k, v in final["summaries"].items()},
        "collector_chain_breaks": int(final["chain_breaks"]),
        "collector_energy_refused": int(final["energy_refused"]),
        "collector_clipped_seconds": round(final["clipped_seconds"], 6),
        "collector_gpus": {k: int(v) for k, v in final["gpus"].items()},
    }


def saturate_figures(
    args: argparse.Namespace,
    results: Sequence[dict[str, Any]],
    a: tuple[float, dict[str, float]],
    b: tuple[float, dict[str, float]],
    opened: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    total: dict[str, float] = defaultdict(float)
    latencies = array("d")
    for r in results:
        for k, v in r["stats"].items():
            total[k] += v
        latencies.frombytes(r["latencies"])
    seconds = args.saturate
    lat = summarize(latencies)
    errors = [e for r in results for e in r["errors"]]
    return {
        "seconds": round(b[0] - a[0], 2),
        "sent": int(total["sent"]),
        "acked": int(total["acked"]),
        "rejected": int(total["rejected"]),
        "unacked": int(total["unacked"]),
        "acked_per_s": round(total["acked"] / seconds, 1),
        "gpu_samples_per_s": round(total["gpu_samples"] / seconds, 1),
        "ack_latency_ms": {k: ms(v) if k != "count" else v for k, v in lat.items()},
        "cpu_percent": (cpu := Meter.percent(a, b)),
        "generator_cpu_us_per_report": round(
            cpu.get("generators", 0.0) / 100 * (b[0] - a[0]) / max(total["sent"], 1) * 1e6, 1
        ),
        "failed_streams": len(errors) + sum(len(o["failed"]) for o in opened),
        "errors": (errors + [f for o in opened for f in o["failed"]])[:5],
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's targets for this run's cadence: 1 report/s (10,000 GPUs), or reporting every
    10 s (100,000 GPUs). Measured on this machine, load generator included."""
    out: list[dict[str, Any]] = []
    s, c = r["steady"], r["configuration"]
    fast = c["report_every_s"] < 10
    if s:
        out.append(
            {
                "target": "every report acknowledged",
                "value": f"{s['acked']:,} of {s['offered']:,}",
                "met": s["acked"] == s["offered"],
            }
        )
        worst = [
            abs(v["worst"])
            for k, v in s["live_vs_truth"].items()
            if k in ("busy", "effective", "coverage") and v["worst"] is not None
        ]
        aged = [
            abs(v["worst_allowing_age"])
            for k, v in s["live_vs_truth"].items()
            if k in ("busy", "effective", "coverage") and v["worst_allowing_age"] is not None
        ]
        out.append(
            {
                "target": "live figure within 0.5% of the truth (busy, effective, coverage)",
                "value": (
                    f"worst {100 * max(worst):.2f}%"
                    + (f" ({100 * max(aged):.2f}% allowing the render's age)" if aged else "")
                    if worst
                    else "not scraped"
                ),
                "met": bool(worst) and max(worst) <= 0.005,
            }
        )
        limit = 5.0 if fast else 15.0
        p99 = s["lag_s"]["p99"]
        out.append(
            {
                "target": f"p99 lag under {limit:g} s",
                "value": f"{p99:.2f} s" if p99 is not None else "-",
                "met": p99 is not None and p99 < limit,
            }
        )
        worst_ms = s["metrics"]["response_ms_max"]
        limit_ms = 100.0 if fast else 1000.0
        out.append(
            {
                "target": f"/metrics under {limit_ms:g} ms",
                "value": f"max {worst_ms:.0f} ms" if worst_ms is not None else "not scraped",
                "met": worst_ms is not None and worst_ms < limit_ms,
            }
        )
        if fast:
            cpu = s["cpu_percent"].get("collector")
            out.append(
                {
                    "target": "collector under one core",
                    "value": f"{cpu:.0f}%" if cpu is not None else "-",
                    "met": cpu is not None and cpu < 100.0,
                }
            )
        rss = s["rss_mib"]
        if rss["slope_mib_per_min"] is not None and rss["start"]:
            grown = rss["slope_mib_per_min"] * s["seconds"] / 60
            out.append(
                {
                    "target": "memory flat (grew under 2% over the span)",
                    "value": f"{rss['slope_mib_per_min']:+.2f} MiB/min",
                    "met": grown < 0.02 * rss["start"],
                }
            )
    if r["saturation"] and r["saturation"]["ratio"] is not None:
        out.append(
            {
                "target": "ingest at >= 0.7 of the bare baseline's rate",
                "value": f"{r['saturation']['ratio']:.2f}",
                "met": r["saturation"]["ratio"] >= 0.7,
            }
        )
    return out


# -- the table -----------------------------------------------------------------------------


def num(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:+.{digits}f}%"


def table(r: dict[str, Any]) -> str:
    c, t = r["configuration"], r["templates"]
    lines = [
        f"ingest at scale: {c['streams']:,} streams (nodes) of "
        f"{'/'.join(map(str, c['gpus_per_node']))} GPUs = {c['gpus']:,} GPUs, one report every "
        f"{c['report_every_s']:g} s each (sampled every {c['interval_s']:g} s), to "
        + (
            f"{c['shards']} `gputally collector` shards on one port (CPU, RSS and /metrics "
            "added up) "
            if c.get("shards", 1) > 1
            else "one `gputally collector` "
        )
        + f"({'recording' if c['record'] else 'no record'}; live window "
        f"{c['collector_window_s']:g} s ending {c['truth_lag_s']:g} s back, from --lag "
        f"{c['collector_lag_s']:g})",
        f"load from {c['workers']} generator process(es); {c['cpu_cores']} CPU cores, load "
        f"average {'/'.join(f'{x:.2f}' for x in c['load_average_at_start'])} at the start; "
        + (
            f"warm-up {c['warmup_s']:g} s (not measured), measured {c['duration_s']:g} s; "
            if c["streams"]
            else "no steady phase (--duration 0); "
        )
        + f"{r['wall_s']:.0f} s in all",
        f"templates: {len(t['shapes'])} node shapes ({', '.join(c['scenarios'])}), "
        f"{'/'.join(map(str, t['reports_per_shape']))} reports each from {t['source']}"
        + (f" ({t['with_totals']:,} with per-GPU totals)" if t["with_totals"] else "")
        + ", "
        f"{t['report_bytes']['min']:,}-{t['report_bytes']['max']:,} B (mean "
        f"{t['report_bytes']['mean']:,}); made in {t['seconds']:.1f} s; re-stamping and "
        f"serializing a report: {t['restamp_us']['per_report_us']:.1f} us "
        f"({t['restamp_us']['with_summary_us']:.0f} us with a summary to sign)",
    ]
    s = r["steady"]
    if s:
        cpu = s["cpu_percent"]
        rss = s["rss_mib"]
        m = s["metrics"]
        lines += [
            "",
            f"steady state, {s['seconds']:.0f} s measured             offered   acknowledged",
            f"  reports/s                              {num(s['offered_reports_per_s'], ',.1f'):>9}"
            f"   {num(s['acked_reports_per_s'], ',.1f'):>12}",
            f"  GPU sample messages/s (GpuSample)      {num(s['offered_gpu_samples_per_s']):>9}"
            f"   {num(s['acked_gpu_samples_per_s']):>12}",
            f"  GPU-seconds ingested/s (GPUs x s)      {'':>9}   {num(s['gpu_seconds_per_s']):>12}",
            f"  reports: {s['sent']:,} sent, {s['acked']:,} acked, {s['rejected']:,} rejected, "
            f"{s['unacked']:,} never acked; {s['skipped_ticks']:,} ticks skipped (previous Ack "
            f"late); {s['failed_streams']} streams failed, {s['streams_failed_to_open']} did not "
            f"open; streams refused by the collector: "
            f"{sum(s['streams_refused'].values()) if s['streams_refused'] else 0}",
            f"  ack latency (write -> Ack)        p50 {num(s['ack_latency_ms']['p50'], ',.1f')} ms"
            f"   p99 {num(s['ack_latency_ms']['p99'], ',.1f')} ms   max "
            f"{num(s['ack_latency_ms']['max'], ',.1f')} ms",
            f"  lag (Ack - interval start)        p50 {num(s['lag_s']['p50'], ',.2f')} s"
            f"    p99 {num(s['lag_s']['p99'], ',.2f')} s    max {num(s['lag_s']['max'], ',.2f')} s",
            f"  generator late (write - tick)     p50 {num(s['generator_late_ms']['p50'], ',.1f')} ms"
            f"   p99 {num(s['generator_late_ms']['p99'], ',.1f')} ms   max "
            f"{num(s['generator_late_ms']['max'], ',.1f')} ms",
            f"  CPU, % of one core: collector {num(cpu.get('collector'), '.1f')}, generators "
            f"{num(cpu.get('generators'), '.1f')}, harness {num(cpu.get('harness'), '.1f')}"
            f"{', py-spy ' + num(cpu.get('profiler'), '.1f') if s['profile'] else ''}, others "
            f"{num(cpu.get('others'), '.1f')} (machine {num(cpu.get('machine'), '.1f')} of "
            f"{100 * (c['cpu_cores'] or 1)})",
            f"  generator: {num(s['generator_cpu_us_per_report'], ',.0f')} us of CPU per report "
            f"sent (gRPC client included), {s['generator_build_us_per_report']:.1f} us of it "
            f"re-stamping and serializing; {s['generators_rss_mib']:,.0f} MiB resident",
            f"  collector RSS MiB: idle {rss['idle']:.0f}, streams open {rss['streams_open']:.0f}; "
            f"measured span: start {num(rss['start'], '.0f')}, max {num(rss['max'], '.0f')}, end "
            f"{rss['end']:.0f}, slope {num(rss['slope_mib_per_min'], '+.2f')} MiB/min",
            f"  /metrics every {c['scrape_every_s']:g} s: {m['scrapes']} scrapes "
            f"({m['failed']} failed), response p50 {num(m['response_ms_p50'], ',.0f')} ms, max "
            f"{num(m['response_ms_max'], ',.0f')} ms; {num(m['lines_max'])} lines, "
            f"{num((m['bytes_max'] or 0) / 1024, ',.0f')} KiB "
            f"({num((m['wire_bytes_max'] or 0) / 1024, ',.0f')} KiB gzipped, as Prometheus asks)"
            + (
                f"; served from a render made every {m['refresh_s']:g} s, which took p50 "
                f"{num(m['render_ms_p50'], ',.0f')} ms, max {num(m['render_ms_max'], ',.0f')} ms"
                if m["refresh_s"]
                else ""
            ),
            f"  summaries: {s['summaries_sent']:,} signed and sent, {s['summaries_withheld']:,} "
            f"withheld (first or skipped-tick windows); the collector: "
            + (
                ", ".join(f"{v:,} {k}" for k, v in sorted(s["collector_summaries"].items()))
                or "none"
            )
            + f", {s['collector_chain_breaks']} chain breaks",
            f"  report seconds clipped as overlapping (clock jitter): {s['clipped_seconds']:.3f} "
            f"here, {s['collector_clipped_seconds']:.3f} by the collector; energy readings it "
            f"refused: {s['collector_energy_refused']:,}",
            "",
            f"  live figure vs truth at each scrape (window {c['collector_window_s']:g} s ending "
            f"{c['truth_lag_s']:g} s before it)"
            + (
                f"; NOTE: the warm-up ({c['warmup_s']:g} s) is shorter than the window and its "
                "lag: the figures still rose in the measured span, and a render's age reads as "
                "error"
                if c["warmup_s"] < c["collector_window_s"] + c["truth_lag_s"]
                else ""
            ),
            "                                    live mean  truth mean  error mean  error worst"
            + ("  worst, allowing the render's age" if m["refresh_s"] else ""),
        ]
        for k, v in s["live_vs_truth"].items():
            lines.append(
                f"    {k:<30} {num(v['live_mean'], '.4f'):>9}  {num(v['truth_mean'], '.4f'):>10}"
                f"  {pct(v['mean']):>10}  {pct(v['worst']):>11}"
                + (f"  {pct(v['worst_allowing_age']):>11}" if m["refresh_s"] else "")
            )
        lines.append(
            "  counters after the last Ack (gputally_cluster_gpu_seconds_total vs every report sent):"
        )
        lines.append(
            "    "
            + ", ".join(
                f"{k} {pct(v['relative_error'], 4)}"
                for k, v in s["counters"].items()
                if v["collector"] is not None
            )
            + f"; the collector accepted {s['collector_accepted_reports']:,} reports of the "
            f"{s['reports_sent_not_rejected']:,} sent and not rejected (warm-up included)"
        )
        if s["profile"]:
            p = s["profile"]
            lines.append(
                f"  profile (py-spy, the measured span): {p['path']}"
                + ("" if p["ok"] else f" FAILED: {p.get('error', '')}")
            )
            if p.get("top"):
                lines.append(
                    "    (share of py-spy's samples; own: the innermost frame; selects and "
                    "Condition.wait are threads waiting)"
                )
            for row in p.get("top", [])[:10]:
                lines.append(
                    f"    {100 * row['own']:5.1f}% own {100 * row['inclusive']:5.1f}% incl  "
                    f"{row['function'][:100]}"
                )
    sat = r["saturation"]
    if sat:
        lines += [
            "",
            f"max throughput: {c['saturate_streams']} streams, {c['saturate_inflight']} "
            f"message(s) of {c['saturate_batch']} report(s) in flight each, "
            f"{c['saturate_s']:g} s measured after {c['saturate_warmup_s']:g} s",
            "  server      reports/s  GPU samples/s  ack p50 ms  ack p99 ms  server CPU  "
            f"generators (us/report)  machine (of {100 * (c['cpu_cores'] or 1)})",
        ]
        for name in ("baseline", "collector"):
            x = sat[name]
            cpu = x["cpu_percent"]
            lines.append(
                f"  {name:<10} {num(x['acked_per_s'], ',.0f'):>10}  {num(x['gpu_samples_per_s']):>13}  "
                f"{num(x['ack_latency_ms']['p50'], ',.1f'):>10}  {num(x['ack_latency_ms']['p99'], ',.1f'):>10}  "
                f"{num(cpu.get(name), '.0f'):>9}%  {num(cpu.get('generators'), '.0f'):>9}% "
                f"({num(x['generator_cpu_us_per_report'], ',.0f'):>5})   "
                f"{num(cpu.get('machine'), '.0f'):>6}%"
                + (
                    f"  ({x['failed_streams']} streams failed: {x['errors'][0]})"
                    if x["failed_streams"]
                    else ""
                )
                + (f"  {x['rejected']:,} rejected" if x["rejected"] else "")
            )
        lines.append(
            f"  collector / baseline: {num(sat['ratio'], '.2f')} (reports acknowledged per second)"
        )
        busy = [sat[n]["cpu_percent"].get("machine", 0.0) for n in ("baseline", "collector")]
        if max(busy) >= 90.0 * (c["cpu_cores"] or 1):
            lines.append(
                "  (every core was busy: each rate is bound by the CPUs the server shares with "
                "the generators, the generators' share included)"
            )
    if r["targets"]:
        lines += [
            "",
            "issue 13's targets for this cadence (this machine, load generator included):",
        ]
        for row in r["targets"]:
            lines.append(
                f"  {'met    ' if row['met'] else 'NOT met'}  {row['target']}: {row['value']}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def positive(text: str) -> float:
        value = float(text)
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"a positive number of seconds, got {text!r}")
        return value

    def non_negative(text: str) -> float:
        value = float(text)
        if not value >= 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"0 or more seconds, got {text!r}")
        return value

    def count(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"at least 1, got {text!r}")
        return value

    add = parser.add_argument
    add("--streams", type=count, default=1250, help="streams, one node each (default: %(default)s)")
    add(
        "--gpus",
        type=count,
        default=8,
        help="GPUs per node of the built-in scenarios (default: %(default)s)",
    )
    add(
        "--scenario",
        action="append",
        default=[],
        metavar="FILE",
        help="scenario TOML whose nodes are the node shapes (repeatable; default: the built-in "
        "mixed and MIG ones); streams take the shapes in turn",
    )
    add(
        "--interval",
        type=positive,
        default=1.0,
        metavar="SECONDS",
        help="sampling interval (default: %(default)s)",
    )
    add(
        "--report-every",
        type=positive,
        metavar="SECONDS",
        help="each stream's report cadence, in wall time (default: --interval)",
    )
    add(
        "--warmup",
        type=non_negative,
        metavar="SECONDS",
        help="not measured (default: the live window + lag + 2 reports)",
    )
    add(
        "--duration",
        type=non_negative,
        default=60.0,
        metavar="SECONDS",
        help="measured steady span (default: %(default)s; 0: no steady phase)",
    )
    add(
        "--workers",
        type=count,
        help=f"generator processes (default: one per {STREAMS_PER_WORKER:,} streams, at most the CPU count)",
    )
    add(
        "--scrape-every",
        type=non_negative,
        default=15.0,
        metavar="SECONDS",
        help="/metrics during the measured span (default: %(default)s; 0: none)",
    )
    add(
        "--sample-every",
        type=positive,
        metavar="SECONDS",
        help="collector RSS sampling (default: 5, or a twentieth of --duration)",
    )
    add(
        "--summary-window",
        type=non_negative,
        default=300.0,
        metavar="SECONDS",
        help="the agents' summary window, also the span of the templates (default: %(default)s, "
        "the agent's; 0: no summaries, templates over 300 s)",
    )
    add(
        "--shards",
        type=count,
        default=1,
        help="collector processes on the one gRPC port (--share-port), the kernel spreading the "
        "streams over them; CPU and RSS are their sums, /metrics their series added up as the "
        "recording rules add shards up; not with --db (default: %(default)s)",
    )
    add(
        "--db",
        nargs="?",
        const="",
        metavar="PATH",
        help="let the collector record (SQLite ledger at PATH, default a temporary one, with "
        "--keys and --trust-on-first-use): the summaries are verified and stored",
    )
    add(
        "--collector-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an option for the collector, e.g. --collector-arg=--window=30 (repeatable)",
    )
    add(
        "--truth-lag",
        type=non_negative,
        metavar="SECONDS",
        help="where the truth's window ends, before each scrape (default: the collector's "
        "--lag, plus --report-every when reports span several samples, as the collector does)",
    )
    add(
        "--ack-timeout",
        type=positive,
        default=60.0,
        metavar="SECONDS",
        help="a report without an Ack for this long fails its stream (default: %(default)s)",
    )
    add(
        "--saturate",
        type=non_negative,
        default=20.0,
        metavar="SECONDS",
        help="max-throughput span against each server (default: %(default)s; 0: none)",
    )
    add(
        "--saturate-warmup",
        type=non_negative,
        default=3.0,
        metavar="SECONDS",
        help="before each max-throughput span (default: %(default)s)",
    )
    add(
        "--saturate-streams",
        type=count,
        default=100,
        help="streams in the max-throughput mode (default: %(default)s)",
    )
    add(
        "--saturate-inflight",
        type=count,
        default=4,
        help="messages written ahead of their Acks per stream (default: %(default)s)",
    )
    add(
        "--saturate-batch",
        type=count,
        default=1,
        help="reports per message in the max-throughput mode (default: %(default)s)",
    )
    add(
        "--profile",
        metavar="PATH",
        help="py-spy the collector over the measured span into PATH (.svg flamegraph, .json speedscope, else raw)",
    )
    add(
        "--profile-rate",
        type=count,
        default=100,
        help="py-spy samples per second (default: %(default)s)",
    )
    add(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="JSON of every figure and the configuration: on stdout instead of the table, or "
        "into FILE besides it",
    )
    args = parser.parse_args()
    args.report_every = args.report_every or args.interval
    if args.report_every < args.interval:
        parser.error("--report-every is at least --interval")
    if args.duration == 0 and args.saturate == 0:
        parser.error("nothing to measure: --duration and --saturate are both 0")
    if args.summary_window and (
        args.summary_window < args.report_every
        or abs(
            args.summary_window / args.report_every - round(args.summary_window / args.report_every)
        )
        > 1e-9
    ):
        parser.error("--summary-window is a multiple of --report-every (or 0)")
    if not args.summary_window:
        args.summary_window = 0.0
    if any(a.split("=")[0] in ("--db", "--keys") for a in args.collector_arg):
        parser.error("give --db to this harness, not through --collector-arg")
    if args.shards > 1 and args.db is not None:
        # each shard would enrol keys on first use into one directory, and SQLite has one writer
        parser.error("--shards runs the collectors without a record: leave out --db")
    if args.saturate_batch > 1024:
        parser.error("--saturate-batch is at most 1024 (the collector's --max-batch-reports)")
    total = (args.streams if args.duration else 0) + (args.saturate_streams if args.saturate else 0)
    soft, hard = _nofile()
    if total + 512 > hard:
        parser.error(f"{total:,} streams need more open files than this machine allows ({hard:,})")
    if soft < total + 512:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    settings = collector_settings(args.collector_arg)
    window, lag = live_window(settings, args.interval, args.report_every)
    args.collector_window = window
    if args.truth_lag is None:
        args.truth_lag = lag
    if args.warmup is None:
        args.warmup = window + args.truth_lag + 2 * args.report_every
    if args.profile and args.duration == 0:
        parser.error("--profile records the steady span: give --duration")
    try:
        for path in args.scenario:
            load(path)
    except ScenarioError as error:
        parser.error(str(error))
    args.load_at_start = [round(x, 2) for x in os.getloadavg()]

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    processes: list[Any] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gputally-ingest-") as tmp:
            result = run(args, Path(tmp), processes)
    except Failed as failure:
        print(f"ingest_scale: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ingest_scale: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        for p in reversed(processes):  # only what this run started, by its handle
            if isinstance(p, subprocess.Popen):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            elif p.is_alive():
                p.kill()
                p.join()
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json == "-" else table(result))
    return 0


def _nofile() -> tuple[int, int]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


if __name__ == "__main__":
    sys.exit(main())
