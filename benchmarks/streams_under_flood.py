"""Benchmark: many honest agent streams at once, while one stream floods the collector.

A real `gputally collector` runs as its own process (no record, --max-streams-per-peer above
the stream count since every stream comes from 127.0.0.1), so that its resident memory and
CPU time, read with psutil, are its own. Load generators, each a process of its own:

  honest  --workers processes (default 1) holding --streams streams (default 500) between
          them, each stream its own TCP connection and one 8-GPU node: a Hello with a key, the
          Proof answering the collector's Challenge, then one report a second (~2 KiB, the
          fields an NVML agent fills in), each waited for: its ack latency is the time from
          the write of the report to the read of its Ack;
  flood   one proven stream that, in its phase, writes batches as fast as the collector takes
          them: --flood-batch reports (default 1024, the --max-batch-reports limit) of 8 GPUs,
          padded with processes up to just under the message size limit (4 MiB), every report
          invalid (its last GPU sample has an index the Hello did not announce: the collector
          checks the seven samples before it, and rejects each report in the Ack);
  churn   one process that, in its phase, opens stream after stream on one connection with a
          bogus Hello: GPU indices repeated (INVALID_ARGUMENT), and a well-formed Hello whose
          Proof is not a signature by its key (UNAUTHENTICATED), in turn.

Once every honest stream is open, a warm-up (--warmup, default 40 s, or a fifth of --duration
when shorter: the live window fills) is followed by --duration (default 300 s) split evenly
into the phases: baseline (honest streams only), flood, and churn (leave it out with
--no-churn). The baseline is the reference: each phase's ack latency p50/p99/max is printed
with its ratio to the baseline's. The collector's RSS is sampled every few seconds (start,
max, end, least-squares slope in MiB/min over the measured span); its CPU, and each load
generator's, is given per phase as % of one core. At the end /metrics is scraped once
(render time and size), and the reports the collector counts as accepted are compared with
the acks the honest streams read. --scrape-every scrapes it during the run too, as
Prometheus would (off by default, so that the phases differ only by the flood and the
churn). Also timed here, in this process: parsing one flood message (the collector does it
in one go, before its slices of 32 reports) and applying it to a ClusterState (what the
collector spreads over those slices).

    .venv/bin/python benchmarks/streams_under_flood.py [--streams 500] [--duration 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.sender import CHANNEL_OPTIONS
from gputally.collector.live.state import ClusterState
from gputally.collector.live.validate import InvalidMessageError, Limits
from gputally.v1 import PROTOCOL_REVISION
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import public_bytes, sign_stream

METHOD = "/gputally.v1.Ingest/Stream"
MODEL = "NVIDIA H100 80GB HBM3"
GIB = 2**30
LIMITS = Limits()
# Every channel its own TCP connection, as real agents have (grpc shares a connection between
# channels of the same target and options otherwise).
OPTIONS: tuple[tuple[str, int], ...] = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
OPEN_AT_ONCE = 32  # handshakes in flight while the honest streams open
FLOOD_NODE, CHURN_NODE = "flood", "churn"
FLOOD_NUMBER, CHURN_NUMBER = 0xF100D, 0xC4A1  # their GPU UUIDs' number, apart from any node's


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gputally() -> list[str]:
    script = Path(sys.executable).with_name("gputally")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gputally.cli"]


# -- messages (as tests/factories.py builds them, fuller: what an NVML agent sends) ---------


def node_name(number: int) -> str:
    return f"node-{number:05d}"


def hello(
    node: str, number: int, gpus: int, key: Ed25519PrivateKey | None, instance: int
) -> pb.Hello:
    return pb.Hello(
        node=node,
        agent_version="0.1.0-bench",
        backend="mock",
        driver_version="570.124.06",
        nvml_version="12.570.124.06",
        instance_id=instance,
        sample_interval_seconds=1.0,
        protocol_revision=PROTOCOL_REVISION,
        public_key=public_bytes(key) if key is not None else b"",
        gpus=[
            pb.GpuIdentity(
                index=i,
                uuid=f"GPU-{number:08x}-0000-4000-8000-{i:012x}",
                serial=f"{1_650_000_000_000 + number * 16 + i}",
                model=MODEL,
                pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                memory_total_bytes=80 * GIB,
                power_limit_watts=700.0,
            )
            for i in range(gpus)
        ],
    )


def process(pid: int, node: str) -> pb.ProcessSample:
    return pb.ProcessSample(
        pid=pid,
        memory_bytes=60 * GIB,
        sm_util=0.6,
        memory_util=0.4,
        user="svc",
        command="python train.py",
        cgroup=f"/kubepods.slice/kubepods-pod{pid:08x}.slice",
        gpu_instance_id=0xFFFFFFFF,
    )


def sample(index: int, node: str) -> pb.GpuSample:
    """One GPU read OK, busy training, with the fields the NVML backend fills in (as the
    agent's mock backend gives them: an 8-GPU report of ~2.3 KiB) and a Kubernetes pod."""
    return pb.GpuSample(
        index=index,
        status=pb.GPU_STATUS_OK,
        busy=0.93,
        memory_busy=0.41,
        memory_used_bytes=61 * GIB,
        power_watts=540.0,
        power_limit_watts=700.0,
        sm_clock_mhz=1980,
        temperature_celsius=64,
        process_count=1,
        process_memory_bytes=60 * GIB,
        clock_event_reasons=0,
        sm_active=0.62,
        sm_occupancy=0.31,
        tensor_active=0.44,
        dram_active=0.52,
        processes=[process(40_000 + index, node)],
        ecc_corrected_volatile=0,
        ecc_uncorrected_volatile=0,
        remapped_rows_correctable=0,
        remapped_rows_uncorrectable=0,
        remap_pending=False,
        remap_failure=False,
        pcie_tx_bytes_per_second=2.1e9,
        pcie_rx_bytes_per_second=3.4e9,
        nvlink_tx_bytes=7 * 10**14,
        nvlink_rx_bytes=7 * 10**14,
        memory_clock_mhz=2619,
        memory_temperature_celsius=70,
        attribution=pb.Attribution(source="kubernetes", tenant="team-ml", job=f"train-{node}"),
        effective=0.62,
    )


def report(node: str, gpus: int, seq: int, t_ns: int) -> pb.Report:
    return pb.Report(
        seq=seq,
        time_unix_nano=t_ns,
        interval_seconds=1.0,
        gpus=[sample(i, node) for i in range(gpus)],
    )


def flood_message(batch: int, gpus: int, limit: int) -> tuple[bytes, int]:
    """One AgentMessage of `batch` invalid reports, each padded (more processes per GPU, a
    longer command line) so that the message is as large as it can be under `limit` bytes;
    and the processes per GPU sample."""
    template = report(FLOOD_NODE, gpus, batch, time.time_ns())  # the largest seq: the bound
    # the last sample names a GPU the Hello did not announce: the seven before it are checked
    template.gpus[-1].index = gpus

    def bound() -> int:
        # each report: its tag and length (at most 4 bytes); the two envelopes: 5 each
        return batch * (template.ByteSize() + 4) + 10

    processes = 1
    while processes < LIMITS.max_items:
        for s in template.gpus:
            s.processes.append(process(50_000 + processes, FLOOD_NODE))
        if bound() > limit:
            for s in template.gpus:
                del s.processes[-1]
            break
        processes += 1
    commands = [s.processes[-1] for s in template.gpus]
    pad = max(0, (limit - bound()) // (batch * gpus))
    while pad:
        for p in commands:
            p.command = "python train.py " + "x" * pad
        if bound() <= limit:
            break
        pad -= 1
    message = pb.AgentMessage()
    for seq in range(1, batch + 1):
        r = message.batch.reports.add()
        r.CopyFrom(template)
        r.seq = seq
    data = message.SerializeToString()
    if len(data) > limit:
        raise SystemExit(f"the flood message is {len(data)} bytes, over {limit}")
    return data, processes


# -- the load generators (each in a process of its own) ------------------------------------


def stream_call(channel: Any) -> Any:
    """A Stream call whose requests are bytes serialized here (None: grpc sends them as is)."""
    return channel.stream_stream(
        METHOD, request_serializer=None, response_deserializer=pb.CollectorMessage.FromString
    )()


async def handshake(call: Any, first: pb.Hello, key: Ed25519PrivateKey) -> None:
    """Hello, the Proof answering the Challenge, the Welcome."""
    await call.write(pb.AgentMessage(hello=first).SerializeToString())
    reply = await call.read()
    if reply is grpc.aio.EOF or reply.WhichOneof("body") != "challenge":
        raise RuntimeError(f"{first.node}: no Challenge after the Hello: {reply}")
    proof = sign_stream(key, reply.challenge.nonce, first.node, first.instance_id)
    await call.write(pb.AgentMessage(proof=pb.Proof(signature=proof)).SerializeToString())
    reply = await call.read()
    if reply is grpc.aio.EOF or reply.WhichOneof("body") != "welcome":
        raise RuntimeError(f"{first.node}: no Welcome after the Proof: {reply}")


class HonestStream:
    """One node: a report a second, the next one only after the previous one's Ack."""

    def __init__(self, number: int, gpus: int):
        self.number = number
        self.node = node_name(number)
        self.key = Ed25519PrivateKey.generate()
        self.hello = hello(self.node, number, gpus, self.key, number + 1)
        self.message = pb.AgentMessage(
            batch=pb.ReportBatch(reports=[report(self.node, gpus, 0, 0)])
        )
        self.report = self.message.batch.reports[0]
        self.channel: Any = None
        self.call: Any = None
        self.sends = array("d")  # monotonic time of each report's write
        self.latencies = array("d")  # seconds from that write to the read of its Ack
        self.sent = self.acked = self.rejected = self.late = 0
        self.error = ""

    async def open(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=OPTIONS)
        self.call = stream_call(self.channel)
        await handshake(self.call, self.hello, self.key)

    async def run(self, first: float, end: float) -> None:
        at, seq = first, 0
        try:
            while at < end:
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                seq += 1
                self.report.seq = seq
                self.report.time_unix_nano = time.time_ns()
                data = self.message.SerializeToString()
                began = time.monotonic()
                await self.call.write(data)
                self.sent += 1
                reply = await self.call.read()
                done = time.monotonic()
                if reply is grpc.aio.EOF or reply.WhichOneof("body") != "ack":
                    self.error = f"report {seq}: {reply} instead of an Ack"
                    return
                if reply.ack.acked_seq >= seq:
                    self.acked += 1
                self.rejected += sum(1 for r in reply.ack.rejections if r.seq == seq)
                self.sends.append(began)
                self.latencies.append(done - began)
                at += 1.0
                if at < done:  # the Ack came after the next tick: those missed are skipped
                    missed = math.ceil(done - at)
                    self.late += missed
                    at += missed
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name}: {error.details()}"

    async def close(self) -> None:
        if self.call is not None and not self.error:
            try:
                await self.call.done_writing()
                await asyncio.wait_for(self.call.read(), 10.0)
            except (grpc.aio.AioRpcError, TimeoutError) as error:
                self.error = self.error or f"closing: {error}"
        if self.channel is not None:
            await self.channel.close()


async def receive(conn: Connection) -> Any:
    return await asyncio.to_thread(conn.recv)


async def honest_role(conn: Connection, config: dict[str, Any]) -> None:
    streams = [HonestStream(n, config["gpus"]) for n in config["numbers"]]
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def opened(stream: HonestStream) -> None:
        async with gate:
            await stream.open(config["target"])

    began = time.monotonic()
    await asyncio.gather(*(opened(s) for s in streams))
    conn.send(("ready", {"connect_s": time.monotonic() - began}))
    schedule = await receive(conn)
    total = config["streams"]
    await asyncio.gather(
        *(s.run(schedule["go"] + s.number / total, schedule["end"]) for s in streams)
    )
    await asyncio.gather(*(s.close() for s in streams))
    sends, latencies = array("d"), array("d")
    for s in streams:
        sends.extend(s.sends)
        latencies.extend(s.latencies)
    errors = [f"{s.node}: {s.error}" for s in streams if s.error]
    conn.send(
        (
            "result",
            {
                "sends": sends.tobytes(),
                "latencies": latencies.tobytes(),
                "sent": sum(s.sent for s in streams),
                "acked": sum(s.acked for s in streams),
                "rejected": sum(s.rejected for s in streams),
                "late": sum(s.late for s in streams),
                "errors": errors,
                "report_bytes": streams[0].message.ByteSize() if streams else 0,
            },
        )
    )
    await receive(conn)  # stay (for the CPU figures) until told to go


async def flood_role(conn: Connection, config: dict[str, Any]) -> None:
    """One proven stream writing invalid batches as fast as the collector takes them. The
    collector ends a stream whose batches are all rejected, three in a row: the flood then
    does what a hostile client would, opens another at once (counted in `reconnects`)."""
    key = Ed25519PrivateKey.generate()
    data, processes = flood_message(config["batch"], config["gpus"], config["bytes"])
    conn.send(("ready", {"batch_bytes": len(data), "processes_per_sample": processes}))
    schedule = await receive(conn)
    start, end = schedule["phases"]["flood"]
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    written = acked = rejected = reconnects = 0
    error = ""
    ended: dict[str, int] = {}
    began = time.monotonic()
    instance = 0
    while time.monotonic() < end:
        instance += 1
        first = hello(FLOOD_NODE, FLOOD_NUMBER, config["gpus"], key, instance)
        async with grpc.aio.insecure_channel(config["target"], options=OPTIONS) as channel:
            call = stream_call(channel)
            try:
                await handshake(call, first, key)
            except grpc.aio.AioRpcError as failure:
                error = f"{failure.code().name}: {failure.details()}"
                break

            async def read(call: Any = call) -> None:
                nonlocal acked, rejected
                while True:
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        return
                    acked += 1
                    rejected += len(reply.ack.rejections)

            reader = asyncio.ensure_future(read())
            try:
                while time.monotonic() < end and not reader.done():
                    # as fast as the collector takes them in (HTTP/2 flow control holds us back)
                    await asyncio.wait_for(call.write(data), max(0.01, end - time.monotonic()))
                    written += 1
            except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            if time.monotonic() >= end:
                call.cancel()  # the phase is over: the reader ends with it
            (outcome,) = await asyncio.gather(reader, return_exceptions=True)
            if isinstance(outcome, grpc.aio.AioRpcError):
                ended[outcome.code().name] = ended.get(outcome.code().name, 0) + 1
            call.cancel()
        reconnects += 1
    elapsed = time.monotonic() - began
    conn.send(
        (
            "result",
            {
                "batches_written": written,
                "batches_acked": acked,
                "reports_rejected": rejected,
                "seconds": elapsed,
                "reconnects": max(0, reconnects - 1),
                "ended_by": ended,
                "error": error,
            },
        )
    )
    await receive(conn)


async def churn_role(conn: Connection, config: dict[str, Any]) -> None:
    gpus = config["gpus"]
    key = Ed25519PrivateKey.generate()
    # GPU indices repeated: refused by the Hello's checks, before any Challenge
    repeated = hello(CHURN_NODE, CHURN_NUMBER, gpus, None, 1)
    for gpu in repeated.gpus:
        gpu.index = 0
    bad_hello = pb.AgentMessage(hello=repeated).SerializeToString()
    # well formed, with a key, but the Proof is not that key's signature of the nonce
    good_hello = pb.AgentMessage(
        hello=hello(CHURN_NODE, CHURN_NUMBER, gpus, key, 1)
    ).SerializeToString()
    bad_proof = pb.AgentMessage(proof=pb.Proof(signature=bytes(64))).SerializeToString()
    statuses: dict[str, int] = {}
    attempts = 0
    error = ""
    async with grpc.aio.insecure_channel(config["target"], options=OPTIONS) as channel:
        conn.send(("ready", {}))
        schedule = await receive(conn)
        start, end = schedule["phases"]["churn"]
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        began = time.monotonic()
        while time.monotonic() < end:
            call = stream_call(channel)
            status = "OK"
            try:
                if attempts % 2:
                    await call.write(good_hello)
                    reply = await call.read()
                    if reply is not grpc.aio.EOF and reply.WhichOneof("body") == "challenge":
                        await call.write(bad_proof)
                    reply = await call.read()
                else:
                    await call.write(bad_hello)
                    reply = await call.read()
                if reply is not grpc.aio.EOF:
                    error = f"a bogus Hello was answered with {reply.WhichOneof('body')}"
                    call.cancel()
                    break
            except grpc.aio.AioRpcError as refusal:
                status = refusal.code().name
            attempts += 1
            statuses[status] = statuses.get(status, 0) + 1
        elapsed = time.monotonic() - began
    conn.send(
        (
            "result",
            {"attempts": attempts, "seconds": elapsed, "statuses": statuses, "error": error},
        )
    )
    await receive(conn)


ROLES: dict[str, Callable[[Connection, dict[str, Any]], Coroutine[Any, Any, None]]] = {
    "honest": honest_role,
    "flood": flood_role,
    "churn": churn_role,
}


def child(role: str, conn: Connection, config: dict[str, Any]) -> None:
    """A load generator process's body: its role on an event loop; a failure goes back."""
    try:
        asyncio.run(ROLES[role](conn, config))
    except Exception as error:
        conn.send(("error", f"{role}: {type(error).__name__}: {error}"))


# -- the measuring process -----------------------------------------------------------------


class Failed(Exception):
    """The benchmark cannot go on; the message says why."""


class Worker:
    def __init__(
        self, ctx: Any, name: str, role: str, config: dict[str, Any], processes: list[Any]
    ):
        self.name, self.role = name, role
        self.conn, theirs = multiprocessing.Pipe()
        self.process = ctx.Process(target=child, args=(role, theirs, config), name=name)
        self.process.start()
        processes.append(self.process)
        theirs.close()
        self.ps = psutil.Process(self.process.pid)
        self.ready: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None
        self.cpu_last = 0.0

    def poll(self) -> None:
        """Take what it sent, if anything; Failed for an error."""
        while self.conn.poll():
            try:
                kind, value = self.conn.recv()
            except EOFError:
                raise Failed(f"{self.name} ended without a word") from None
            if kind == "error":
                raise Failed(value)
            if kind == "ready":
                self.ready = value
            else:
                self.result = value

    def cpu(self) -> float:
        try:
            times = self.ps.cpu_times()
            self.cpu_last = times.user + times.system
        except psutil.NoSuchProcess:
            pass
        return self.cpu_last


def wait_for(workers: Sequence[Worker], what: str, timeout: float, collector: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            w.poll()
        if all(getattr(w, what) is not None for w in workers):
            return
        if collector.poll() is not None:
            raise Failed(f"the collector exited ({collector.returncode})")
        if time.monotonic() > deadline:
            late = [w.name for w in workers if getattr(w, what) is None]
            raise Failed(f"{', '.join(late)}: not {what} within {timeout:.0f} s")
        time.sleep(0.05)


def cpu_seconds(p: psutil.Process) -> float:
    times = p.cpu_times()
    return times.user + times.system


def percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / var


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def local_costs(gpus: int, data: bytes) -> dict[str, float]:
    """What the flood message costs the collector's code, timed here: parsing it (one go, on
    the event loop) and applying its reports to a ClusterState (in the collector, in slices)."""
    parse = []
    for _ in range(5):
        began = time.perf_counter()
        message = pb.AgentMessage.FromString(data)
        parse.append(time.perf_counter() - began)
    key = Ed25519PrivateKey.generate()
    state = ClusterState(sizes=LIMITS)
    state.open_session(hello(FLOOD_NODE, FLOOD_NUMBER, gpus, key, 1), proven=True)
    reports = message.batch.reports
    apply = []
    for _ in range(3):
        began = time.perf_counter()
        for r in reports:
            with contextlib.suppress(InvalidMessageError):
                state.ingest(FLOOD_NODE, r)
        apply.append(time.perf_counter() - began)
    began = time.perf_counter()
    ack = pb.Ack(acked_seq=len(reports))
    for r in reports:
        ack.rejections.add(seq=r.seq, reason=f"GPU index {gpus} was not in this node's hello")
    ack_bytes = pb.CollectorMessage(ack=ack).SerializeToString()
    ack_s = time.perf_counter() - began
    apply_s = sorted(apply)[1]
    return {
        "parse_ms": round(sorted(parse)[2] * 1000, 3),
        "apply_ms": round(apply_s * 1000, 3),
        "apply_slice_ms": round(apply_s * 1000 * 32 / max(1, len(reports)), 3),
        "ack_ms": round(ack_s * 1000, 3),
        "ack_bytes": len(ack_bytes),
    }


_SERIES = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def read_metrics(text: str) -> dict[str, Any]:
    accepted = rejected_flood = 0.0
    refused: dict[str, float] = {}
    for line in text.splitlines():
        match = _SERIES.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), dict(_LABEL.findall(match.group(2))), match.group(3)
        if name == "gputally_node_reports_total":
            if labels.get("node", "").startswith("node-") and labels.get("result") == "accepted":
                accepted += float(value)
            if labels.get("node") == FLOOD_NODE and labels.get("result") == "rejected":
                rejected_flood += float(value)
        elif name == "gputally_streams_refused_total":
            refused[labels.get("status", "?")] = float(value)
    return {
        "accepted_honest": int(accepted),
        "rejected_flood": int(rejected_flood),
        "streams_refused": {k: int(v) for k, v in refused.items()},
    }


def scrape(url: str) -> tuple[float, bytes]:
    """Seconds from the request to the last byte of the answer, and the answer."""
    seconds, body, _ = scrape_wire(url)
    return seconds, body


def scrape_wire(url: str) -> tuple[float, bytes, int]:
    """One scrape as Prometheus makes it (it asks for gzip): the seconds from the request to
    the last byte, the exposition, and the bytes on the wire."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        raw: bytes = answer.read()
        zipped = answer.headers.get("Content-Encoding") == "gzip"
    seconds = time.perf_counter() - began
    return seconds, gzip.decompress(raw) if zipped else raw, len(raw)


def scrapes(url: str, start: float, end: float, every: float, out: list[float]) -> None:
    """--scrape-every: /metrics scraped as Prometheus does, from `start` to `end`."""
    at = start
    while at < end:
        time.sleep(max(0.0, at - time.monotonic()))
        out.append(scrape(url)[0])
        at += every


def run(args: argparse.Namespace, tmp: Path, processes: list[Any]) -> dict[str, Any]:
    wall = time.monotonic()
    gpus = args.gpus_per_node
    grpc_port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    collector_log = tmp / "collector.log"
    with collector_log.open("wb") as sink:
        collector = subprocess.Popen(
            [
                *gputally(),
                "collector",
                f"--grpc-listen={target}",
                f"--metrics-listen=127.0.0.1:{metrics_port}",
                "--db=",
                f"--expected-gpus={gpus * (args.streams + 1)}",  # the flood node's too
                f"--max-streams-per-peer={args.streams + 16}",
                "--grace=1",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    processes.append(collector)
    deadline = time.monotonic() + 30
    while True:
        if collector.poll() is not None:
            raise Failed(f"the collector exited: {collector_log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", grpc_port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise Failed("the collector did not listen within 30 s") from None
            time.sleep(0.1)
    proc = psutil.Process(collector.pid)
    rss_idle = proc.memory_info().rss / 2**20

    log(f"flood message: {args.flood_batch} reports, under {args.flood_bytes:,} bytes ...")
    flood_data, _ = flood_message(args.flood_batch, gpus, args.flood_bytes)
    costs = local_costs(gpus, flood_data)
    del flood_data

    ctx = multiprocessing.get_context("spawn")
    workers_n = max(1, min(args.workers, args.streams))
    honest = [
        Worker(
            ctx,
            f"honest-{w}",
            "honest",
            {
                "target": target,
                "gpus": gpus,
                "streams": args.streams,
                "numbers": list(range(w, args.streams, workers_n)),
            },
            processes,
        )
        for w in range(workers_n)
    ]
    common = {"target": target, "gpus": gpus}
    flood = Worker(
        ctx,
        "flood",
        "flood",
        {**common, "batch": args.flood_batch, "bytes": args.flood_bytes},
        processes,
    )
    churn = Worker(ctx, "churn", "churn", common, processes) if args.churn else None
    workers = [*honest, flood, *([churn] if churn else [])]
    log(f"opening {args.streams} honest streams from {workers_n} process(es) ...")
    began = time.monotonic()
    wait_for(workers, "ready", 60 + args.streams * 0.2, collector)
    connect_s = time.monotonic() - began
    rss_connected = proc.memory_info().rss / 2**20

    names = ["baseline", "flood", *(["churn"] if churn else [])]
    go = time.monotonic() + 0.5
    t0 = go + args.warmup
    share = args.duration / len(names)
    phases = {name: (t0 + i * share, t0 + (i + 1) * share) for i, name in enumerate(names)}
    end = t0 + args.duration
    schedule = {"go": go, "end": end, "phases": phases}
    for w in workers:
        w.conn.send(schedule)
    log(
        f"open in {connect_s:.1f} s; warm-up {args.warmup:.0f} s, then "
        f"{', '.join(names)}: {share:.0f} s each ..."
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    scraped: list[float] = []
    scraper = threading.Thread(
        target=scrapes,
        args=(metrics_url, go, end, args.scrape_every, scraped),
        daemon=True,
    )
    if args.scrape_every:
        scraper.start()

    me = psutil.Process()

    def load_cpu() -> dict[str, float]:
        machine = psutil.cpu_times()  # every core: what else ran on this machine meanwhile
        ours = {
            "collector": cpu_seconds(proc),
            "honest": sum(w.cpu() for w in honest),
            "flood": flood.cpu(),
            **({"churn": churn.cpu()} if churn else {}),
        }
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        return {**ours, "others": busy - sum(ours.values()) - cpu_seconds(me)}

    every = args.sample_every or min(5.0, args.duration / 20)
    rss: list[tuple[float, float]] = []
    marks: list[tuple[float, dict[str, float]]] = []
    boundaries = [t0, *(e for _, e in phases.values())]
    next_sample = go
    while True:
        now = time.monotonic()
        if boundaries and now >= boundaries[0]:
            marks.append((now, load_cpu()))
            boundaries.pop(0)
        if now >= next_sample:
            rss.append((now, proc.memory_info().rss / 2**20))
            next_sample += every
        if not boundaries:
            break
        for w in workers:
            w.poll()
        if collector.poll() is not None:
            raise Failed(f"the collector exited: {collector_log.read_text()[-2000:]}")
        time.sleep(max(0.0, min(next_sample, boundaries[0], now + 0.5) - time.monotonic()))
    rss_end = proc.memory_info().rss / 2**20
    wait_for(workers, "result", 60.0, collector)
    if args.scrape_every:
        scraper.join(90)

    render_s, body = scrape(metrics_url)
    counted = read_metrics(body.decode())
    for w in workers:
        w.conn.send("exit")
    collector.terminate()
    collector.wait(30)
    for w in workers:
        w.process.join(10)

    # the honest reports, by the phase of their write
    sends, latencies = array("d"), array("d")
    for w in honest:
        assert w.result is not None
        sends.frombytes(w.result["sends"])
        latencies.frombytes(w.result["latencies"])
    by_phase: dict[str, list[float]] = {name: [] for name in names}
    for sent, latency in zip(sends, latencies, strict=True):
        for name, (start, stop) in phases.items():
            if start <= sent < stop:
                by_phase[name].append(latency)
                break
    rows = []
    base: dict[str, float | None] = {}
    for i, name in enumerate(names):
        values = sorted(by_phase[name])
        (m0, c0), (m1, c1) = marks[i], marks[i + 1]
        figures: dict[str, float | None] = {
            "p50": percentile(values, 0.50),
            "p99": percentile(values, 0.99),
            "max": values[-1] if values else None,
        }
        if name == "baseline":
            base = figures
        start, stop = phases[name]
        in_phase = [v for t, v in rss if start <= t <= stop]
        rows.append(
            {
                "phase": name,
                "seconds": round(m1 - m0, 3),
                "reports": len(values),
                "p50_ms": ms(figures["p50"]),
                "p99_ms": ms(figures["p99"]),
                "max_ms": ms(figures["max"]),
                **{
                    f"{k}_ratio": (
                        round(v / b, 3) if v is not None and (b := base.get(k)) else None
                    )
                    for k, v in figures.items()
                },
                "cpu_percent": {
                    k: max(0.0, round(100.0 * (c1[k] - c0[k]) / (m1 - m0), 1)) for k in c0
                },
                "rss_end_mib": round(in_phase[-1], 1) if in_phase else None,
                "rss_slope_mib_per_min": (
                    round(s, 3)
                    if (s := slope([(t, v) for t, v in rss if start <= t <= stop])) is not None
                    else None
                ),
            }
        )
    measured = [(t, v) for t, v in rss if t >= t0]
    (m_first, c_first), (m_last, c_last) = marks[0], marks[-1]
    h: dict[str, Any] = {
        k: sum(w.result[k] for w in honest if w.result)
        for k in ("sent", "acked", "rejected", "late")
    }
    errors = [e for w in honest if w.result for e in w.result["errors"]]
    assert flood.result is not None and flood.ready is not None
    f = flood.result
    return {
        "streams": args.streams,
        "gpus_per_node": gpus,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "cpu_cores": os.cpu_count(),
        "processes": {"honest": workers_n, "flood": 1, "churn": 1 if churn else 0},
        "connect_s": round(connect_s, 3),
        "honest": {
            **h,
            "failed_streams": len(errors),
            "errors": errors[:10],
            "report_bytes": honest[0].result["report_bytes"] if honest[0].result else 0,
        },
        "phases": rows,
        "flood": {
            "batch_reports": args.flood_batch,
            "batch_bytes": flood.ready["batch_bytes"],
            "processes_per_sample": flood.ready["processes_per_sample"],
            "batches_written": f["batches_written"],
            "batches_acked": f["batches_acked"],
            "reports_rejected": f["reports_rejected"],
            "reports_rejected_per_s": round(f["reports_rejected"] / max(f["seconds"], 1e-9), 1),
            "error": f["error"],
            "reconnects": f["reconnects"],
            "ended_by": f["ended_by"],
            **costs,
        },
        "churn": (
            {
                "attempts": churn.result["attempts"],
                "per_s": round(churn.result["attempts"] / max(churn.result["seconds"], 1e-9), 1),
                "statuses": churn.result["statuses"],
                "error": churn.result["error"],
            }
            if churn and churn.result
            else None
        ),
        "rss_mib": {
            "idle": round(rss_idle, 1),
            "connected": round(rss_connected, 1),
            "start": round(measured[0][1], 1) if measured else None,
            "max": round(max(v for _, v in measured), 1) if measured else None,
            "end": round(rss_end, 1),
            "slope_mib_per_min": (
                round(s, 3)
                if (s := slope([(t - t0, v) for t, v in measured])) is not None
                else None
            ),
            "samples": len(measured),
            "every_s": round(every, 3),
        },
        "collector_cpu_percent": round(
            100.0 * (c_last["collector"] - c_first["collector"]) / (m_last - m_first), 1
        ),
        "metrics": {
            "render_ms": round(render_s * 1000, 1),
            "bytes": len(body),
            "lines": body.count(b"\n"),
            **counted,
        },
        "scrapes_during": (
            {
                "every_s": args.scrape_every,
                "count": len(scraped),
                "render_ms_p50": ms(percentile(sorted(scraped), 0.5)),
                "render_ms_max": ms(max(scraped, default=None)),
            }
            if args.scrape_every
            else None
        ),
        "collector_exit": collector.returncode,
        "wall_s": round(time.monotonic() - wall, 1),
    }


def fmt(value: float | None, spec: str, width: int) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def table(r: dict[str, Any]) -> str:
    h, f, m, rss = r["honest"], r["flood"], r["metrics"], r["rss_mib"]
    p = r["processes"]
    lines = [
        f"streams under flood: {r['streams']} honest streams of {r['gpus_per_node']}-GPU nodes "
        f"({h['report_bytes']:,} B reports, one a second, proof of possession) to one collector "
        f"process; load from {p['honest']} process(es) for the honest streams, {p['flood']} "
        f"for the flood, {p['churn']} for the churn; {r['cpu_cores']} CPU cores",
        f"open in {r['connect_s']:.1f} s, warm-up {r['warmup_s']:.0f} s (not measured), then "
        f"{len(r['phases'])} phases of {r['duration_s'] / len(r['phases']):.0f} s; "
        f"{r['wall_s']:.0f} s in all",
        "",
    ]
    header = (
        f"{'phase':<9} {'reports':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'p50 x':>6} {'p99 x':>6} {'max x':>6} {'collector':>9} {'honest':>7} "
        f"{'flood':>6} {'churn':>6} {'others':>6} {'RSS MiB':>8} {'MiB/min':>8}"
    )
    lines += [header, "-" * len(header)]
    for row in r["phases"]:
        cpu = row["cpu_percent"]
        lines.append(
            f"{row['phase']:<9} {row['reports']:>8,} {fmt(row['p50_ms'], '.1f', 8)} "
            f"{fmt(row['p99_ms'], '.1f', 8)} {fmt(row['max_ms'], '.1f', 8)} "
            f"{fmt(row['p50_ratio'], '.2f', 6)} {fmt(row['p99_ratio'], '.2f', 6)} "
            f"{fmt(row['max_ratio'], '.2f', 6)} {cpu['collector']:>8.1f}% {cpu['honest']:>6.1f}% "
            f"{cpu['flood']:>5.1f}% {fmt(cpu.get('churn'), '.1f', 5)}% {cpu['others']:>5.1f}% "
            f"{fmt(row['rss_end_mib'], '.1f', 8)} {fmt(row['rss_slope_mib_per_min'], '+.2f', 8)}"
        )
    lines += [
        "(latency: write of a report to the read of its Ack; x: ratio to the baseline; CPU: % "
        "of one core, per process, others: the rest of this machine's load; RSS: the "
        "collector's at the phase's end, and its slope over the phase)",
        "",
        f"honest reports: {h['sent']:,} sent, {h['acked']:,} acked, {h['rejected']:,} rejected, "
        f"{h['late']:,} ticks skipped (an Ack later than the next tick), "
        f"{h['failed_streams']} streams failed",
        f"collector counts {m['accepted_honest']:,} honest reports accepted",
        f"flood: {f['batches_acked']:,} batches of {f['batch_reports']:,} reports "
        f"({f['batch_bytes'] / 2**20:.2f} MiB, {f['processes_per_sample']} processes per GPU "
        f"sample) acked, {f['reports_rejected']:,} reports rejected "
        f"({f['reports_rejected_per_s']:,.0f}/s); the collector ended its stream "
        f"{sum(f['ended_by'].values()):,} times ({f['ended_by']}), it reconnected "
        f"{f['reconnects']:,} times{'; ' + f['error'] if f['error'] else ''}",
        f"  one flood message, timed here: parse {f['parse_ms']:.1f} ms (the collector's event "
        f"loop does it in one go), apply {f['apply_ms']:.1f} ms "
        f"({f['apply_slice_ms']:.2f} ms per slice of 32), its Ack {f['ack_bytes'] / 1024:.0f} KiB "
        f"built in {f['ack_ms']:.1f} ms",
    ]
    c = r["churn"]
    if c:
        statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(c["statuses"].items()))
        lines.append(
            f"churn: {c['attempts']:,} bogus streams ({c['per_s']:,.0f}/s): {statuses}"
            f"{'; ' + c['error'] if c['error'] else ''}"
        )
    lines += [
        f"collector RSS: idle {rss['idle']:.1f} MiB, streams open {rss['connected']:.1f}, "
        f"measured span: start {fmt(rss['start'], '.1f', 0)}, max {fmt(rss['max'], '.1f', 0)}, "
        f"end {rss['end']:.1f} MiB; slope {fmt(rss['slope_mib_per_min'], '+.2f', 0)} MiB/min "
        f"({rss['samples']} samples, every {rss['every_s']:g} s)",
        f"collector CPU over the measured span: {r['collector_cpu_percent']:.1f} % of one core",
        f"/metrics after the run: {m['render_ms']:.0f} ms, {m['bytes'] / 1024:,.0f} KiB, "
        f"{m['lines']:,} lines",
    ]
    d = r["scrapes_during"]
    if d:
        lines.append(
            f"/metrics during the run, every {d['every_s']:g} s: {d['count']} scrapes, "
            f"p50 {fmt(d['render_ms_p50'], '.0f', 0)} ms, max {fmt(d['render_ms_max'], '.0f', 0)} ms"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--streams", type=int, default=500, help="honest streams (default: %(default)s)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="measured span, split evenly into the phases (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="honest streams only, not measured, before the phases "
        "(default: 40, or a fifth of --duration when that is less)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes holding the honest streams (default: %(default)s)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs of each node (default: %(default)s)"
    )
    parser.add_argument(
        "--flood-batch",
        type=int,
        default=LIMITS.max_batch_reports,
        metavar="N",
        help="reports in each flood batch (default: %(default)s, --max-batch-reports)",
    )
    parser.add_argument(
        "--flood-bytes",
        type=int,
        default=LIMITS.max_message_bytes - 4096,
        metavar="BYTES",
        help="a flood message's size, at most (default: %(default)s, just under "
        "--max-message-bytes)",
    )
    parser.add_argument(
        "--no-churn",
        dest="churn",
        action="store_false",
        help="leave out the phase of bogus Hellos",
    )
    parser.add_argument(
        "--sample-every",
        type=float,
        metavar="SECONDS",
        help="collector RSS sampling (default: 5, or a twentieth of --duration when less)",
    )
    parser.add_argument(
        "--scrape-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also scrape /metrics this often from the warm-up on, as Prometheus would "
        "(default: 0, only once after the run)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.streams < 1 or args.duration <= 0 or args.gpus_per_node < 1:
        parser.error("--streams, --duration and --gpus-per-node are above 0")
    if not 1 <= args.flood_batch <= LIMITS.max_batch_reports:
        parser.error(f"--flood-batch is in [1, {LIMITS.max_batch_reports}]")
    if args.workers < 1 or args.scrape_every < 0:
        parser.error("--workers is at least 1, --scrape-every not negative")
    if args.flood_bytes > LIMITS.max_message_bytes:
        parser.error(f"--flood-bytes is at most {LIMITS.max_message_bytes}")
    if args.warmup is None:
        args.warmup = min(40.0, args.duration / 5)
    processes: list[Any] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gputally-flood-") as tmp:
            result = run(args, Path(tmp), processes)
    except Failed as failure:
        print(f"streams_under_flood: {failure}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(processes):  # only what this run started, by its handle
            if isinstance(p, subprocess.Popen):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            elif p.is_alive():
                p.kill()
                p.join()
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
