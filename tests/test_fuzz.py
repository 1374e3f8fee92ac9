"""Fuzzing the ingest path (issue 11): whatever bytes arrive, the collector answers with a
status or a rejection, never an unhandled exception, and what it already holds stays right.

* In process, the real ``IngestService.Stream`` over a stand-in for grpc's stream context:
  at least 100,000 mutated messages (bit flips, byte changes, cuts, insertions, splices of
  real agent messages made by the agent's own sampler over the mock), in streams that also
  pass the proof of possession so that mutated batches reach ingest. ``--fuzz-messages N``
  runs more.
* Structured, with hypothesis: arbitrary report fields (NaN, infinities, huge and negative
  numbers, unknown indices, long strings) straight into ``ClusterState.ingest``.
* Over the wire: mutated raw bytes on real gRPC streams, then an honest agent still counts
  exactly.

After each run a control node, fed honest reports between the fuzzed streams, must have
exactly the seconds it was given, and every counter must be finite and not negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gputally.agent.chain import SummarySigner
from gputally.collector.live import server as ingest
from gputally.collector.live.state import ClusterState
from gputally.collector.live.validate import InvalidMessageError, Limits, TimeLimits
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import sign_stream

from .conftest import Collector
from .factories import T0, busy_sample, hello, mock_node, raw_stream, report, tick

NODE_TOML = """
[cluster]
nodes = 1
gpus_per_node = 4
gpu_model = "NVIDIA H100 80GB HBM3"
mig_instances = 0
[[workload]]
gpus = 2
kind = "training"
user = "alice"
slurm_job = 4242
[[workload]]
gpus = 1
kind = "inference"
processes = 3
"""


def corpus() -> tuple[pb.Hello, list[bytes], Ed25519PrivateKey]:
    """Real messages of one mock node, as its agent makes them: its Hello and batches of its
    reports (with processes, attribution and, every 30 s, a signed summary)."""
    node = mock_node(NODE_TOML, start=T0, summary_window=30.0)
    key = Ed25519PrivateKey.generate()
    node.sampler.signer = SummarySigner(key, node.sampler.node)
    reports = []
    for _ in range(90):
        node.clock.advance(1.0)
        reports.append(tick(node.sampler))
    node.close()
    first = node.sampler.hello(7, "mock")
    batches = [
        pb.AgentMessage(batch=pb.ReportBatch(reports=reports[i : i + 3])).SerializeToString()
        for i in range(0, len(reports), 3)
    ]
    seeds = [pb.AgentMessage(hello=first).SerializeToString(), *batches]
    return first, seeds, key


# Values that break naive code: NaN, infinities, extremes, off-by-ones.
WEIRD_FLOATS = (math.nan, math.inf, -math.inf, -1.0, 0.0, 1.0000001, 1e308, -1e-300, 5e-324)
WEIRD_INTS = (0, 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
WEIRD_TEXT = ("", "é" * 300, "\x00", "a" * 5000, "GPU-" + "x" * 200, "busy_without_work")


def tweak(rng: random.Random, data: bytes) -> bytes:
    """A mutation that keeps the message decodable: one field of one report or GPU sample
    (or of the Hello) set to a weird value, or a sample repeated, or a report repeated."""
    message = pb.AgentMessage.FromString(data)
    if message.WhichOneof("body") == "hello":
        target: Any = rng.choice([message.hello, *message.hello.gpus])
    elif message.batch.reports:
        r = rng.choice(message.batch.reports)
        if rng.random() < 0.1:
            message.batch.reports.add().CopyFrom(r)
            return message.SerializeToString()
        if r.gpus and rng.random() < 0.1:
            r.gpus.add().CopyFrom(r.gpus[0])
            return message.SerializeToString()
        parts: list[Any] = [r, *r.gpus]
        for g in r.gpus:
            parts.extend(g.processes)
            parts.extend(g.mig)
            if g.HasField("attribution"):
                parts.append(g.attribution)
        target = rng.choice(parts)
    else:
        return data
    fields = [f for f in target.DESCRIPTOR.fields if not f.is_repeated and f.message_type is None]
    if not fields:
        return data
    f = rng.choice(fields)
    try:
        if f.cpp_type in (f.CPPTYPE_DOUBLE, f.CPPTYPE_FLOAT):
            setattr(target, f.name, rng.choice(WEIRD_FLOATS))
        elif f.cpp_type == f.CPPTYPE_STRING and f.type == f.TYPE_STRING:
            setattr(target, f.name, rng.choice(WEIRD_TEXT))
        elif f.cpp_type == f.CPPTYPE_STRING:
            setattr(target, f.name, rng.randbytes(rng.choice((0, 1, 31, 32, 33, 64))))
        elif f.cpp_type == f.CPPTYPE_BOOL:
            setattr(target, f.name, not getattr(target, f.name))
        elif f.cpp_type in (f.CPPTYPE_INT32, f.CPPTYPE_INT64, f.CPPTYPE_ENUM):
            setattr(target, f.name, rng.choice((-1, 0, 1, 2**31 - 1, -(2**31))))
        else:
            setattr(target, f.name, rng.choice(WEIRD_INTS))
    except (ValueError, TypeError):
        return data  # out of the field's range: protobuf itself refuses to build it
    return message.SerializeToString()


def mutate(rng: random.Random, data: bytes, seeds: list[bytes], tweaks: float = 0.5) -> bytes:
    """One mutation (or a few): a share `tweaks` keep the message decodable (`tweak`), the rest
    are the byte-level kinds a fuzzer uses: flip a bit, set a byte to an interesting value,
    cut, insert random bytes, duplicate a chunk, splice with another message, a huge varint."""
    if rng.random() < tweaks:
        try:
            return tweak(rng, data)
        except Exception:  # a seed that no longer decodes: mutate its bytes instead
            pass
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(7)
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 16)))
            continue
        i = rng.randrange(len(b))
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12))
        elif kind == 2:
            del b[i : i + rng.randrange(1, 32)]
        elif kind == 3:
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif kind == 4:
            j = min(len(b), i + rng.randrange(1, 64))
            b[i:i] = b[i:j]
        elif kind == 5:
            other = rng.choice(seeds)
            b = b[:i] + bytearray(other[rng.randrange(len(other)) :])
        else:  # a varint made huge: lengths, indices, sequence numbers, times
            b[i:i] = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    return bytes(b)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


class FakeContext:
    """What IngestService.Stream uses of grpc.aio's context, fed with raw bytes: read()
    decodes them as grpc's deserializer would (raising DecodeError), abort() raises."""

    def __init__(self, answer: Callable[[list[pb.CollectorMessage]], bytes | None]):
        self.answer = answer
        self.written: list[pb.CollectorMessage] = []
        self.sent = 0

    async def read(self) -> Any:
        data = self.answer(self.written)
        if data is None:
            return grpc.aio.EOF
        self.sent += 1
        return pb.AgentMessage.FromString(data)

    async def write(self, message: pb.CollectorMessage) -> None:
        self.written.append(message)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def control(state: ClusterState, seq: int, t: float) -> None:
    state.ingest("control", report(seq, t, busy_sample(0, 0.5), busy_sample(1, 0.5)), received=t)


def check_intact(state: ClusterState, control_reports: int) -> None:
    view = state.view()
    for name, value in view.counters.seconds.items():
        assert math.isfinite(value) and value >= 0, name
    assert math.isfinite(view.counters.energy_joules) and view.counters.energy_joules >= 0
    for measure, ratio in view.window.ratios.items():
        assert 0 <= ratio <= 1, measure
    node = state.nodes["control"]
    assert node.counters.seconds["observed"] == 2.0 * control_reports
    assert node.counters.seconds["busy"] == 1.0 * control_reports
    assert node.reports["accepted"] == control_reports


def test_a_hundred_thousand_mutated_messages_through_the_real_stream_handler(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    wanted = int(request.config.getoption("--fuzz-messages"))
    first, seeds, key = corpus()
    state = ClusterState(
        limits=TimeLimits(horizon=math.inf, skew=math.inf),
        clock=lambda: T0,
        sizes=Limits(max_refusals_per_peer=10**9),  # every stream is one peer's here
    )
    service = ingest.IngestService(state, hello_timeout=5.0)
    state.open_session(hello("control", 2))
    rng = random.Random(20261201)
    sent = streams = controls = 0
    outcomes: dict[str, int] = {}
    hellos: list[pb.Hello] = []
    reasons: dict[str, int] = {}
    started = time.monotonic()

    def stream_plan() -> Callable[[list[pb.CollectorMessage]], bytes | None]:
        """A stream: a Hello (intact three times in four, so that most streams get past it
        and their batches reach ingest), a proof if challenged, then mutated batches."""
        length = rng.randrange(1, 40)
        intact_hello = rng.random() < 0.75
        state_of: dict[str, int] = {"batches": 0, "answered": 0}

        def answer(written: list[pb.CollectorMessage]) -> bytes | None:
            if state_of["batches"] == 0 and state_of["answered"] == 0:
                state_of["answered"] = 1
                own = pb.Hello()
                own.CopyFrom(first)
                own.instance_id = rng.getrandbits(63) + 1  # a new agent life: new numbers
                hellos.append(own)
                h = pb.AgentMessage(hello=own).SerializeToString()
                return h if intact_hello else mutate(rng, h, seeds)
            if (
                written
                and written[-1].WhichOneof("body") == "challenge"
                and state_of["answered"] == 1
            ):
                state_of["answered"] = 2
                nonce = written[-1].challenge.nonce
                signature = sign_stream(key, nonce, first.node, hellos[-1].instance_id)
                proof = pb.AgentMessage(proof=pb.Proof(signature=signature)).SerializeToString()
                return proof if rng.random() < 0.95 else mutate(rng, proof, seeds)
            if state_of["batches"] >= length:
                return None
            state_of["batches"] += 1
            # mostly decodable, so that most streams go on and their reports reach ingest
            return mutate(rng, rng.choice(seeds[1:]), seeds, tweaks=0.9)

        return answer

    async def run() -> None:
        nonlocal sent, streams, controls
        while sent < wanted:
            context = FakeContext(stream_plan())
            try:
                await service.Stream(None, context)
                outcome = "OK"
            except Aborted as aborted:
                outcome = aborted.code.name
                reasons[str(aborted)[:50]] = reasons.get(str(aborted)[:50], 0) + 1
            sent += context.sent
            streams += 1
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if streams % 50 == 0:
                controls += 1
                control(state, controls, T0 + controls)

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
    elapsed = time.monotonic() - started
    fuzzed = state.nodes[first.node].reports
    print(
        f"fuzz: {sent} messages in {streams} streams, {elapsed:.1f} s, outcomes {outcomes}, "
        f"reports {fuzzed}"
    )
    print(sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    assert sent >= wanted
    # the refusals were statuses with reasons, and messages that decoded were ingested
    assert outcomes.get("OK", 0) > 0 and outcomes.get("INVALID_ARGUMENT", 0) > 0
    assert state.nodes[first.node].reports["accepted"] > 0
    assert state.nodes[first.node].reports["rejected"] > 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    check_intact(state, controls)


finite = st.floats(allow_nan=True, allow_infinity=True)
text = st.text(max_size=300)


@st.composite
def samples(draw: st.DrawFn) -> pb.GpuSample:
    sample = pb.GpuSample(index=draw(st.integers(0, 5)))
    sample.status = draw(st.sampled_from([0, 1, 2, 3, 99]))  # type: ignore[assignment]
    for name in ("busy", "sm_active", "effective", "power_watts", "memory_busy"):
        if draw(st.booleans()):
            setattr(sample, name, draw(finite))
    if draw(st.booleans()):
        sample.energy_millijoules = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        sample.process_count = draw(st.integers(0, 2**32 - 1))
    sample.padding.extend(draw(st.lists(text, max_size=3)))
    if draw(st.booleans()):
        sample.attribution.tenant = draw(text)
        sample.attribution.job = draw(text)
    sample.xid_events.extend(
        pb.XidEvent(code=c) for c in draw(st.lists(st.integers(0, 2**64 - 1), max_size=4))
    )
    sample.mig_enabled = draw(st.booleans())
    if sample.mig_enabled:
        sample.mig_slices = draw(st.integers(0, 2**32 - 1))
        for _ in range(draw(st.integers(0, 3))):
            sample.mig.add(
                gpu_instance_id=draw(st.integers(0, 20)),
                slices=draw(st.integers(0, 2**32 - 1)),
                sm_active=draw(finite),
            )
    return sample


@st.composite
def reports(draw: st.DrawFn) -> pb.Report:
    return pb.Report(
        seq=draw(st.integers(0, 2**64 - 1)),
        time_unix_nano=draw(st.integers(-(2**63), 2**63 - 1)),
        interval_seconds=draw(finite),
        gpus=draw(st.lists(samples(), max_size=4)),
    )


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(batch=st.lists(reports(), min_size=1, max_size=5))
def test_arbitrary_report_fields_are_rejected_or_counted_never_crash(
    batch: list[pb.Report],
) -> None:
    state = ClusterState(limits=TimeLimits(horizon=math.inf, skew=math.inf), clock=lambda: T0)
    state.open_session(hello("n1", 4))
    state.open_session(hello("control", 2))
    control(state, 1, T0 + 1)
    for r in batch:
        with contextlib.suppress(InvalidMessageError):
            state.ingest("n1", r, received=T0 + 2)
    control(state, 2, T0 + 2)
    check_intact(state, 2)


def test_mutated_bytes_over_the_wire_leave_the_collector_serving(
    collector_factory: Callable[..., Collector], caplog: pytest.LogCaptureFixture
) -> None:
    # every stream comes from 127.0.0.1: no throttle of its refusals, or most would be that
    collector = collector_factory(sizes=Limits(hello_timeout=2.0, max_refusals_per_peer=10**9))
    _, seeds, _ = corpus()
    rng = random.Random(7)

    async def drain(call: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass

    async def wire(messages: int) -> dict[str, int]:
        codes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(collector.target) as channel:
            method = channel.stream_stream(
                "/gputally.v1.Ingest/Stream",
                request_serializer=None,  # raw bytes, as a hostile client sends them
                response_deserializer=pb.CollectorMessage.FromString,
            )
            sent = 0
            while sent < messages:
                chunk = [mutate(rng, rng.choice(seeds), seeds) for _ in range(rng.randrange(1, 8))]
                call = method()
                reader = asyncio.ensure_future(drain(call))
                try:
                    async with asyncio.timeout(15):
                        for message in chunk:
                            try:
                                await call.write(message)
                            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                                break  # the collector ended the stream: its status says why
                        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                            await call.done_writing()
                        await reader  # a call's status comes after every answer is read
                        code = (await call.code()).name
                except TimeoutError:
                    call.cancel()
                    code = "TIMEOUT"
                codes[code] = codes.get(code, 0) + 1
                sent += len(chunk)
        return codes

    with caplog.at_level(logging.WARNING):
        codes = asyncio.run(wire(2000))
    # UNKNOWN is what grpc answers when a handler raises: never. (INTERNAL is the client's own
    # word for a write the collector's end of the stream no longer took: it had refused the
    # stream, which its own count below shows.)
    assert "TIMEOUT" not in codes and "UNKNOWN" not in codes, codes
    refusals = collector.state.refusals
    assert refusals.get("INVALID_ARGUMENT", 0) >= codes.get("INVALID_ARGUMENT", 0) > 0
    assert sum(refusals.values()) + codes.get("OK", 0) >= sum(codes.values()) - codes.get(
        "TIMEOUT", 0
    )
    # then an honest agent's reports count exactly
    honest = Ed25519PrivateKey.generate()
    _, ack = asyncio.run(
        raw_stream(
            collector.target,
            hello("honest", 2, key=honest),
            [
                [
                    report(i + 1, T0 + i + 1, busy_sample(0, 0.5), busy_sample(1, 1.0))
                    for i in range(10)
                ]
            ],
            key=honest,
        )
    )
    assert ack.ack.acked_seq == 10 and not ack.ack.rejections
    node = collector.state.nodes["honest"]
    assert node.counters.seconds["observed"] == 20.0 and node.counters.seconds["busy"] == 15.0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
