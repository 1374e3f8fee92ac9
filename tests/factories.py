"""Builders the tests share: protocol messages, mock nodes, an empty ledger. One of each.

Messages are built the way an agent builds them (a Hello with its protocol revision, samples
whose absent fields mean "not available"), so a test says only what it is about.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.attribution import Attributor
from gputally.agent.backend import NvmlBackend
from gputally.agent.readings import GpuReading
from gputally.agent.sampler import Sampler
from gputally.agent.sim import scenario as scenario_mod
from gputally.agent.sim.mock import ManualClock, MockNVML
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import COLLECTOR_KEY_FILE, Ledger, collector_key_text
from gputally.collector.record.store import Record
from gputally.v1 import PROTOCOL_REVISION
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import public_bytes

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a multiple of every summary window the tests use
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"


def gputally_command() -> list[str]:
    """How to run the `gputally` command: the console script beside this interpreter, else
    the module."""
    script = Path(sys.executable).with_name("gputally")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gputally.cli"]


# -- messages --------------------------------------------------------------------------------


def hello(
    node: str = "n1",
    gpus: int = 2,
    *,
    instance: int = 1,
    key: Ed25519PrivateKey | None = None,
    model: str = H100,
    report_interval_seconds: float = 0.0,
) -> pb.Hello:
    """A node's Hello with `gpus` GPUs, GPU-<node>-<index> each."""
    return pb.Hello(
        node=node,
        instance_id=instance,
        report_interval_seconds=report_interval_seconds,
        protocol_revision=PROTOCOL_REVISION,
        public_key=public_bytes(key) if key is not None else b"",
        gpus=[pb.GpuIdentity(index=i, uuid=f"GPU-{node}-{i}", model=model) for i in range(gpus)],
    )


def gpu_sample(index: int = 0, **fields: Any) -> pb.GpuSample:
    """A GPU read OK, with the given fields (any other is absent: not available)."""
    return pb.GpuSample(index=index, status=pb.GPU_STATUS_OK, **fields)


def busy_sample(
    index: int,
    busy: float,
    sm: float | None = None,
    procs: int = 1,
    energy: int | None = None,
) -> pb.GpuSample:
    """A GPU at `busy` (SM activity `sm` when measured) with `procs` processes, at 100 W."""
    sample = gpu_sample(index, busy=busy, process_count=procs, power_watts=100.0)
    if sm is not None:
        sample.sm_active = sm
    if energy is not None:
        sample.energy_millijoules = energy
    return sample


def report(
    seq: int,
    t: float,
    *samples: pb.GpuSample,
    interval: float = 1.0,
    summary: pb.SignedSummary | None = None,
) -> pb.Report:
    """The report of `seq` covering the `interval` seconds up to `t`."""
    message = pb.Report(
        seq=seq, time_unix_nano=round(t * 1e9), interval_seconds=interval, gpus=list(samples)
    )
    if summary is not None:
        message.summary.CopyFrom(summary)
    return message


async def raw_stream(
    target: str,
    first: pb.Hello,
    batches: list[list[pb.Report]],
    *,
    key: Ed25519PrivateKey | None = None,
    credentials: Any = None,
    options: Any = (),
) -> list[pb.CollectorMessage]:
    """A hand-made agent: a hello (answering a Challenge with a proof signed by `key`, else
    with an empty one), then each batch, reading the answer to each. The replies: the
    Welcome, then an Ack per batch. Raises grpc.aio.AioRpcError when the collector ends the
    stream."""
    import grpc

    from gputally.v1 import telemetry_pb2_grpc as pb_grpc
    from gputally.v1.signing import sign_stream

    channel = (
        grpc.aio.insecure_channel(target, options=options)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials, options=options)
    )
    async with channel:
        call = pb_grpc.IngestStub(channel).Stream()
        await call.write(pb.AgentMessage(hello=first))
        reply = await call.read()
        if reply is not grpc.aio.EOF and reply.WhichOneof("body") == "challenge":
            nonce = reply.challenge.nonce
            signature = (
                sign_stream(key, nonce, first.node, first.instance_id) if key is not None else b""
            )
            await call.write(pb.AgentMessage(proof=pb.Proof(signature=signature)))
            reply = await call.read()
        replies = [reply]
        for batch in batches:
            await call.write(pb.AgentMessage(batch=pb.ReportBatch(reports=batch)))
            replies.append(await call.read())
        await call.done_writing()
        return replies


def carrying(seq: int, signed: pb.SignedSummary, t: float = T0) -> pb.Report:
    """A summary-only report, as an agent sends a closed window."""
    return pb.Report(seq=seq, time_unix_nano=int(t * 1e9), summary=signed)


def summary(
    t: float = T0, seconds: float = 60.0, busy: float = 0.5, node: str = "n1"
) -> pb.Summary:
    """A one-GPU summary of the window [t, t + seconds), present throughout, of GPU 0 of
    `node` as hello() names it."""
    s = pb.Summary(
        window_start_unix_nano=int(t * 1e9), window_end_unix_nano=int((t + seconds) * 1e9)
    )
    s.gpus.add(index=0, uuid=f"GPU-{node}-0", present_seconds=seconds, busy_seconds=busy * seconds)
    return s


def envelope(summary: pb.Summary) -> bytes:
    """A record row's bytes: the summary in its (here unsigned) envelope."""
    return pb.SignedSummary(body=summary.SerializeToString()).SerializeToString()


# -- mock nodes ------------------------------------------------------------------------------


@dataclass
class MockNode:
    """One node of a scenario, read by the agent's own code over the mock."""

    sampler: Sampler
    lib: MockNVML
    clock: ManualClock

    @property
    def backend(self) -> NvmlBackend:
        return self.sampler.backend

    def read(self) -> list[GpuReading]:
        """Every GPU, attributed, as the agent reads it at a tick."""
        return self.sampler.read()

    def close(self) -> None:
        self.sampler.close()


def scenario(toml: str, name: str = "t") -> scenario_mod.Scenario:
    return scenario_mod.parse(tomllib.loads(toml), name=name)


def tick(sampler: Sampler) -> pb.Report:
    """One tick of a sampler that reports every tick (its default): the report."""
    report = sampler.tick()
    assert report is not None, "this sampler spans several ticks per report"
    return report


def mock_node(
    toml: str | scenario_mod.Scenario,
    *,
    node: int = 0,
    start: float | None = None,
    events: str = "poll",
    static: Path | None = None,
    slurm: Path | None = None,
    kubelet: Path | None = None,
    opened: bool = True,
    **sampler_options: Any,
) -> MockNode:
    """Node `node` of a scenario on a virtual clock, with the agent's sampler, attribution and
    NVML backend over the mock. Opened (inventory read) unless `opened` is False."""
    sc = scenario(toml) if isinstance(toml, str) else toml
    clock = ManualClock() if start is None else ManualClock(start)
    lib = MockNVML(sc, node, clock)
    sampler = Sampler(
        NvmlBackend(lib, monotonic=clock, clock=clock, events=events),
        attributor=Attributor(static, slurm, kubelet, processes=lib.processes, monotonic=clock),
        node=sampler_options.pop("name", sc.node_name(node)),
        clock=clock,
        **sampler_options,
    )
    if opened:
        sampler.open()
    return MockNode(sampler, lib, clock)


# -- the record ------------------------------------------------------------------------------


def empty_ledger(
    tmp_path: Path, origin: str = "gputally/test"
) -> tuple[Path, KeyStore, Record, Ledger]:
    """A key directory holding the collector's checkpoint key, and an empty ledger
    (tmp_path/ledger.db): (keys, their store, the record, its ledger)."""
    keys = tmp_path / "keys"
    keys.mkdir(parents=True)
    record = Record(tmp_path / "ledger.db")
    ledger = Ledger(record, Ed25519PrivateKey.generate(), origin)
    (keys / COLLECTOR_KEY_FILE).write_text(collector_key_text(origin, public_bytes(ledger.key)))
    return keys, KeyStore(keys), record, ledger
