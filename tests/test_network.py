"""Hostile networks (issue 11): who may open a stream, what one stream may send, and what the
collector does with a clock that steps. Every test runs a real collector over loopback gRPC
(TLS where it says so) and reads the outcome from its state, its /metrics or its log."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.agent.sender import Sender
from gputally.cli import ca
from gputally.cli.tls import ClientFiles
from gputally.collector.live import server as ingest
from gputally.collector.live.state import AUTH_ENROLLED, AUTH_PROVEN, ClusterState
from gputally.collector.live.validate import InvalidMessageError, Limits, TimeLimits
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import public_bytes, sign_stream

from .conftest import Collector
from .factories import T0, busy_sample, gpu_sample, hello, raw_stream, report, summary

# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    node_cert: Path  # for node n1
    node_key: Path
    other_cert: Path  # for node n2
    other_key: Path
    rogue_cert: Path  # for n1, from another CA
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = ca.new_ca("test CA")
    rogue_ca_key, rogue_ca_cert = ca.new_ca("rogue CA")

    def write(name: str, pair: tuple[object, object]) -> tuple[Path, Path]:
        key, cert = pair
        (d / f"{name}.key").write_bytes(ca.key_pem(key))  # type: ignore[arg-type]
        (d / f"{name}.crt").write_bytes(ca.cert_pem(cert))  # type: ignore[arg-type]
        return d / f"{name}.crt", d / f"{name}.key"

    (d / "ca.crt").write_bytes(ca.cert_pem(ca_cert))
    server = write("server", ca.issue(ca_key, ca_cert, "localhost", server=True, ips=["127.0.0.1"]))
    node = write("n1", ca.issue(ca_key, ca_cert, "n1", client=True))
    other = write("n2", ca.issue(ca_key, ca_cert, "n2", client=True))
    rogue = write("rogue", ca.issue(rogue_ca_key, rogue_ca_cert, "n1", client=True))
    return Pki(d / "ca.crt", *server, *node, *other, *rogue)


def credentials(pki: Pki, cert: Path | None = None, key: Path | None = None) -> object:
    return ClientFiles(
        str(pki.ca), str(cert) if cert else "", str(key) if key else ""
    ).credentials()


def metrics(collector: Collector) -> str:
    with urllib.request.urlopen(collector.metrics_url, timeout=5) as response:
        return str(response.read().decode())


def value(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def refused(coro: object) -> tuple[grpc.StatusCode, str]:
    """Run a stream that must be refused: its status and reason."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(coro)  # type: ignore[arg-type]
    return error.value.code(), str(error.value.details())


def keyed(tmp_path: Path, *nodes: str) -> tuple[KeyStore, dict[str, Ed25519PrivateKey]]:
    (tmp_path / "keys").mkdir(exist_ok=True)
    store = KeyStore(tmp_path / "keys")
    made = {n: Ed25519PrivateKey.generate() for n in nodes}
    for node, key in made.items():
        store.enroll(node, public_bytes(key))
    return store, made


ONE = [[report(1, T0 + 1, busy_sample(0, 0.5), busy_sample(1, 0.5))]]  # one batch


# -- mutual TLS ------------------------------------------------------------------------------


def test_mutual_tls_admits_only_a_certificate_of_the_ca_that_names_the_node(
    collector_factory: Callable[..., Collector], pki: Pki, tmp_path: Path
) -> None:
    keys, made = keyed(tmp_path, "n1", "n2")
    record = Record(tmp_path / "r.db")
    collector = collector_factory(
        keys=keys,
        record=record,
        tls=ingest.Tls(str(pki.server_cert), str(pki.server_key), str(pki.ca)),
    )
    target = collector.target
    key = made["n1"]
    signed = SummarySigner(key, "n1").sign(summary(T0, 300.0, 0.5, "n1"))
    good = credentials(pki, pki.node_cert, pki.node_key)
    welcome, ack = asyncio.run(
        raw_stream(
            target,
            hello("n1", key=key),
            [[report(1, T0 + 300, busy_sample(0, 0.5), busy_sample(1, 0.5), summary=signed)]],
            key=key,
            credentials=good,
        )
    )
    assert welcome.WhichOneof("body") == "welcome"
    assert ack.ack.acked_seq == 1 and ack.ack.recorded_chain_seq == 1

    attempts = {
        # no client certificate, a certificate from another CA, and no TLS at all: the
        # handshake fails, so grpc reports the collector UNAVAILABLE to them
        "no client certificate": raw_stream(
            target, hello("n1", key=key), ONE, key=key, credentials=credentials(pki)
        ),
        "another CA": raw_stream(
            target,
            hello("n1", key=key),
            ONE,
            key=key,
            credentials=credentials(pki, pki.rogue_cert, pki.rogue_key),
        ),
        "plaintext": raw_stream(target, hello("n1", key=key), ONE, key=key),
    }
    for what, attempt in attempts.items():
        code, _ = refused(attempt)
        assert code == grpc.StatusCode.UNAVAILABLE, what
    # a valid certificate of node n2 cannot speak for n1, even with n1's key
    code, reason = refused(
        raw_stream(
            target,
            hello("n1", key=key, instance=5),
            ONE,
            key=key,
            credentials=credentials(pki, pki.other_cert, pki.other_key),
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "client certificate is for n2, not this node" in reason
    # nothing of theirs reached the live state, /metrics or the ledger
    state = collector.state
    assert set(state.nodes) == {"n1"} and state.nodes["n1"].reports["accepted"] == 1
    assert record.count() == 1
    text = metrics(collector)
    assert value(text, 'gputally_streams_refused_total{status="PERMISSION_DENIED"}') == 1.0


def test_the_agent_verifies_the_collector_and_rereads_its_certificate_files(
    collector_factory: Callable[..., Collector], pki: Pki, tmp_path: Path
) -> None:
    collector = collector_factory(tls=ingest.Tls(str(pki.server_cert), str(pki.server_key)))
    key = Ed25519PrivateKey.generate()
    signer = SummarySigner(key, "n1")
    # an agent that trusts another CA refuses the collector's certificate
    rogue_ca = tmp_path / "rogue-ca.crt"
    rogue_ca.write_bytes(ca.cert_pem(ca.new_ca("rogue")[1]))

    async def attempt(files: ClientFiles) -> bool:
        sender = Sender(
            collector.target, lambda: hello("n1", key=key), prove=signer.prove, tls=files
        )
        task = asyncio.ensure_future(sender.run())
        sender.submit(ONE[0][0])
        ok = await sender.drain(3.0)
        sender.stop()
        await task
        return ok

    assert not asyncio.run(attempt(ClientFiles(str(rogue_ca))))
    assert collector.state.nodes == {}
    # the same agent, once its CA file holds the right CA (read again at each connection)
    rogue_ca.write_bytes(pki.ca.read_bytes())
    assert asyncio.run(attempt(ClientFiles(str(rogue_ca))))
    assert collector.state.nodes["n1"].reports["accepted"] == 1


def test_a_server_certificate_replaced_on_disk_is_served_to_new_connections(
    collector_factory: Callable[..., Collector], pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    collector = collector_factory(tls=ingest.Tls(str(cert), str(key)))
    # rotate to a certificate of a new CA: a client of the old CA can no longer connect
    new_key, new_ca = ca.new_ca("rotated CA")
    pair = ca.issue(new_key, new_ca, "localhost", server=True, ips=["127.0.0.1"])
    key.write_bytes(ca.key_pem(pair[0]))
    cert.write_bytes(ca.cert_pem(pair[1]))
    (tmp_path / "new-ca.crt").write_bytes(ca.cert_pem(new_ca))
    lab = Ed25519PrivateKey.generate()
    code, _ = refused(
        raw_stream(
            collector.target, hello("n1", key=lab), [], key=lab, credentials=credentials(pki)
        )
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    fresh = ClientFiles(str(tmp_path / "new-ca.crt")).credentials()
    (welcome,) = asyncio.run(
        raw_stream(collector.target, hello("n1", key=lab), [], key=lab, credentials=fresh)
    )
    assert welcome.WhichOneof("body") == "welcome"


def test_plaintext_on_a_network_address_is_refused_without_insecure() -> None:
    state = ClusterState()

    async def start(insecure: bool) -> int:
        server, port, _ = await ingest.start(state, "0.0.0.0:0", insecure=insecure)
        await server.stop(0)
        return port

    with pytest.raises(OSError, match="plaintext gRPC is refused on a non-loopback address"):
        asyncio.run(start(False))
    assert asyncio.run(start(True)) > 0


# -- proof of possession ---------------------------------------------------------------------


def test_a_public_key_alone_opens_nothing_and_cannot_cut_off_the_real_agent(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    keys, made = keyed(tmp_path, "n1")
    collector = collector_factory(keys=keys, expected_gpus=2)
    key = made["n1"]
    signer = SummarySigner(key, "n1")

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        sender = Sender(
            collector.target,
            lambda: hello("n1", key=key, instance=3),
            prove=signer.prove,
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        task = asyncio.ensure_future(sender.run())
        sender.submit(report(1, T0 + 1, busy_sample(0, 0.1), busy_sample(1, 0.1)))
        assert await sender.drain(5.0)
        outcomes = []
        impostor = hello("n1", key=key, instance=3)  # its public key is no secret
        attempts = [
            raw_stream(collector.target, impostor, ONE),  # no proof (an empty signature)
            raw_stream(collector.target, impostor, ONE, key=Ed25519PrivateKey.generate()),
        ]
        old = pb.Hello()
        old.CopyFrom(impostor)
        old.protocol_revision = 1  # an agent that never proves: no challenge, no stream
        attempts.append(raw_stream(collector.target, old, ONE))
        for attempt in attempts:
            try:
                await attempt
                outcomes.append((grpc.StatusCode.OK, ""))
            except grpc.aio.AioRpcError as error:
                outcomes.append((error.code(), str(error.details())))
        # a proof seen on one stream does not open another: each nonce is fresh
        nonce_seen = b"\0" * 32
        replayed = sign_stream(key, nonce_seen, "n1", 3)
        outcomes.append(await _with_proof(collector.target, impostor, replayed))
        sender.submit(report(2, T0 + 2, busy_sample(0, 0.1), busy_sample(1, 0.1)))
        assert await sender.drain(5.0)
        assert sender.stats.connects == 1  # never cut off
        sender.stop()
        await task
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [code for code, _ in outcomes] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert "does not hold that key's private half" in outcomes[0][1]
    assert "proves the node's key" in outcomes[2][1]
    node = collector.state.nodes["n1"]
    assert node.last_seq == 2 and node.reports == {"accepted": 2, "duplicate": 0, "rejected": 0}
    assert node.authenticated == AUTH_ENROLLED
    text = metrics(collector)
    assert value(text, 'gputally_streams_refused_total{status="UNAUTHENTICATED"}') == 4.0
    assert value(text, "gputally_cluster_unauthenticated_nodes") == 0.0


async def _with_proof(
    target: str, first: pb.Hello, signature: bytes
) -> tuple[grpc.StatusCode, str]:
    from gputally.v1 import telemetry_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.IngestStub(channel).Stream()
        await call.write(pb.AgentMessage(hello=first))
        await call.read()  # the challenge, ignored: the proof was made for another nonce
        await call.write(pb.AgentMessage(proof=pb.Proof(signature=signature)))
        try:
            await call.read()
        except grpc.aio.AioRpcError as error:
            return error.code(), str(error.details())
        return grpc.StatusCode.OK, ""


def test_without_enrolled_keys_the_live_figures_say_they_are_unauthenticated(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory()
    key = Ed25519PrivateKey.generate()

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with asyncio.timeout(10):
            sender = Sender(
                collector.target, lambda: hello("n1", key=key), prove=SummarySigner(key, "n1").prove
            )
            task = asyncio.ensure_future(sender.run())
            sender.submit(ONE[0][0])
            assert await sender.drain(5.0)
            # while n1 is up, a stream proving another key cannot take it over
            other = Ed25519PrivateKey.generate()
            try:
                await raw_stream(
                    collector.target, hello("n1", key=other, instance=9), [], key=other
                )
                result = (grpc.StatusCode.OK, "")
            except grpc.aio.AioRpcError as error:
                result = (error.code(), str(error.details()))
            sender.stop()
            await task
            return result

    code, reason = asyncio.run(scenario())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "proved another key on this collector" in reason
    assert collector.state.nodes["n1"].authenticated == AUTH_PROVEN
    text = metrics(collector)
    assert 'authenticated="unenrolled"' in text


# -- limits ----------------------------------------------------------------------------------


def test_every_limit_is_a_precise_status_with_a_reason(
    collector_factory: Callable[..., Collector],
) -> None:
    sizes = Limits(
        max_gpus=4,
        max_string=64,
        max_batch_reports=10,
        max_message_bytes=64 * 1024,
        max_items=8,
        hello_timeout=0.5,
    )
    collector = collector_factory(sizes=sizes)
    target = collector.target
    key = Ed25519PrivateKey.generate()

    def attempt(first: pb.Hello, batches: list[list[pb.Report]]) -> tuple[grpc.StatusCode, str]:
        return refused(raw_stream(target, first, batches, key=key))

    big = hello("big", 5, key=key)
    assert attempt(big, []) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "hello from big: 5 GPUs, more than the collector accepts on one node (--max-gpus 4)",
    )
    verbose = hello("v", 1, key=key)
    verbose.driver_version = "x" * 65
    code, reason = attempt(verbose, [])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-string 64" in reason
    batch = [report(i + 1, T0 + i + 1, busy_sample(0, 0.1)) for i in range(11)]
    code, reason = attempt(hello("b", 1, key=key), [batch])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-batch-reports 10" in reason
    huge = report(1, T0 + 1, busy_sample(0, 0.1))
    huge.gpus[0].error = "e" * 70_000  # beyond the message limit: grpc refuses it unread
    code, _ = attempt(hello("m", 1, key=key, instance=2), [[huge]])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert collector.state.nodes["m"].reports["accepted"] == 0
    # a report over a list limit is rejected alone, with its reason, the stream goes on
    crowded = report(1, T0 + 1, busy_sample(0, 0.1))
    crowded.gpus[0].processes.extend(pb.ProcessSample(pid=p) for p in range(9))
    _, ack = asyncio.run(
        raw_stream(
            target,
            hello("c", 1, key=key),
            [[crowded, report(2, T0 + 2, busy_sample(0, 0.1))]],
            key=key,
        )
    )
    assert [(r.seq, r.reason) for r in ack.ack.rejections] == [
        (1, "GPU 0: 9 processes, more than --max-items 8")
    ]
    tenant = report(3, T0 + 3, busy_sample(0, 0.1))
    tenant.gpus[0].attribution.tenant = "t" * 65
    _, ack = asyncio.run(raw_stream(target, hello("c", 1, key=key), [[tenant]], key=key))
    assert "attribution tenant is longer than --max-string 64 bytes" in ack.ack.rejections[0].reason

    async def silent() -> None:
        from gputally.v1 import telemetry_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            call = pb_grpc.IngestStub(channel).Stream()
            await call.read()  # a stream that never says hello

    code, reason = refused(silent())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--hello-timeout" in reason
    # the message over its limit was refused by grpc itself, before the collector's code
    assert collector.state.refusals == {"RESOURCE_EXHAUSTED": 3, "DEADLINE_EXCEEDED": 1}


def test_streams_are_limited_in_total_and_per_peer_address(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(sizes=Limits(max_streams_per_peer=2, hello_timeout=5.0))
    from gputally.v1 import telemetry_pb2_grpc as pb_grpc

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(collector.target) as channel:
            stub = pb_grpc.IngestStub(channel)
            held = [stub.Stream() for _ in range(2)]
            for call in held:  # open, but not yet a hello: they count from the first byte
                await call.write(pb.AgentMessage(hello=hello("x", 0)))
            await asyncio.sleep(0.2)
            third = stub.Stream()
            try:
                await third.read()
                return grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                return error.code(), str(error.details())
            finally:
                for call in held:
                    call.cancel()

    code, reason = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 streams are open from 127.0.0.1" in reason and "--max-streams-per-peer 2" in reason


def test_nodes_are_capped_and_idle_ones_evicted() -> None:
    now = [T0]
    state = ClusterState(sizes=Limits(max_nodes=2, evict_after=600.0), clock=lambda: now[0])
    for name in ("a", "b"):
        session, _, _ = state.open_session(hello(name, 1))
        state.ingest(name, report(1, T0 + 1, busy_sample(0, 0.5)), received=T0 + 1)
        state.close_session(name, session)
    with pytest.raises(Exception, match=r"--max-nodes 2"):
        state.open_session(hello("c", 1))
    now[0] = T0 + 602  # a and b have been silent 601 s: forgotten to make room for c
    state.open_session(hello("c", 1))
    assert set(state.nodes) == {"c"} and state.evicted == 2
    assert set(state.intake.chains) == {"c"}  # nothing kept per node name ever seen
    view = state.view()
    assert view.seen == 1 and view.evicted == 2
    # their seconds stay in the cluster's counters
    assert view.counters.seconds["observed"] == 2.0


def test_label_values_beyond_their_caps_are_folded_and_counted(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(sizes=Limits(max_models=2, max_xid_codes=2))
    state = collector.state
    for i in range(4):
        state.open_session(hello(f"n{i}", 1, model=f"Model {i}"))
    sample = busy_sample(0, 0.5)
    sample.xid_events.extend(pb.XidEvent(code=c) for c in (13, 31, 43, 79, 79))
    sample.padding.extend(["busy_without_work", "invented-rule"])
    state.ingest("n0", report(1, T0 + 1, sample), received=T0 + 1)
    text = metrics(collector)
    models = set(re.findall(r'gputally_cluster_model_gpus\{model="([^"]+)"\}', text))
    assert models == {"Model 0", "Model 1", "(other)"}
    xids = dict(re.findall(r'gputally_node_xid_events_total\{node="n0",xid="(\w+)"\} (\S+)', text))
    assert xids == {"13": "1.0", "31": "1.0", "other": "3.0"}
    assert value(text, 'gputally_labels_folded_total{label="model"}') == 2.0
    assert value(text, 'gputally_labels_folded_total{label="xid"}') == 3.0
    assert value(text, 'gputally_labels_folded_total{label="rule"}') == 1.0


def test_a_batch_of_invalid_reports_is_one_log_line(
    collector_factory: Callable[..., Collector], caplog: pytest.LogCaptureFixture
) -> None:
    collector = collector_factory()
    key = Ed25519PrivateKey.generate()
    bad = [report(i + 1, T0 + i + 1, gpu_sample(7, busy=0.5)) for i in range(500)]
    with caplog.at_level(logging.WARNING, logger="gputally.collector.ingest"):
        _, ack = asyncio.run(raw_stream(collector.target, hello("n1", 1, key=key), [bad], key=key))
    assert len(ack.ack.rejections) == 500 and ack.ack.acked_seq == 500
    lines = [r for r in caplog.records if r.getMessage() == "reports rejected"]
    assert len(lines) == 1
    assert lines[0].kv == {  # type: ignore[attr-defined]
        "node": "n1",
        "rejected": 500,
        "of": 500,
        "first_seq": 1,
        "error": "GPU index 7 was not in this node's hello",
    }


def test_an_agent_halves_its_batches_when_the_collector_finds_them_too_big(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(sizes=Limits(max_batch_reports=10))
    key = Ed25519PrivateKey.generate()

    async def scenario() -> Sender:
        sender = Sender(
            collector.target,
            lambda: hello("n1", 1, key=key),
            prove=SummarySigner(key, "n1").prove,
            backoff_initial=0.02,
            backoff_max=0.05,
        )
        for i in range(40):  # a backlog, as after an outage
            sender.submit(report(i + 1, T0 + i + 1, busy_sample(0, 0.5)))
        task = asyncio.ensure_future(sender.run())
        assert await sender.drain(10.0)
        sender.stop()
        await task
        return sender

    sender = asyncio.run(scenario())
    assert sender.max_batch <= 10
    assert collector.state.nodes["n1"].reports["accepted"] == 40


# -- clocks ----------------------------------------------------------------------------------


def test_a_clock_stepped_back_does_not_hide_the_node() -> None:
    """Two twins report every second; one agent's clock jumps 200 s ahead for a while, then
    is stepped back. Both stay in the live window with the same figures."""
    now = [T0]
    state = ClusterState(window=30.0, lag=0.0, clock=lambda: now[0])
    for name in ("steady", "stepped"):
        state.open_session(hello(name, 1))
    skew = {"steady": 0.0, "stepped": 0.0}
    for second in range(1, 121):
        now[0] = T0 + second
        if second == 40:
            skew["stepped"] = 200.0  # NTP gone wrong: 200 s ahead, within --max-skew
        if second == 80:
            skew["stepped"] = 0.0  # and corrected
        for name in ("steady", "stepped"):
            state.ingest(
                name,
                report(second, now[0] + skew[name], busy_sample(0, 0.5)),
                received=now[0] + 0.001,
            )
    view = state.view(now[0])
    steady, stepped = (next(n for n in view.nodes if n.name == x) for x in ("steady", "stepped"))
    assert stepped.window.coverage == pytest.approx(steady.window.coverage, abs=1e-3)
    assert stepped.window.coverage == pytest.approx(1.0, abs=0.05)
    assert stepped.clock_steps == 1
    assert stepped.counters.seconds["observed"] == steady.counters.seconds["observed"] == 120.0
    assert stepped.reports["rejected"] == 0


def test_the_clock_offset_of_each_node_is_measured() -> None:
    state = ClusterState(clock=lambda: T0 + 10)
    state.open_session(hello("ahead", 1))
    state.ingest("ahead", report(1, T0 + 12.5, busy_sample(0, 0.5)), received=T0 + 10.0)
    (node,) = state.view().nodes
    assert node.clock_offset == pytest.approx(2.5)


def test_a_replayed_hundred_reports_of_one_hour_are_not_a_clock_step() -> None:
    state = ClusterState()
    state.open_session(hello("n1", 1))
    for seq in range(1, 4):  # all in one batch: no real time passed between them
        with contextlib.suppress(ValueError):
            state.ingest(
                "n1",
                report(seq, T0 + 3600, busy_sample(0, 1.0), interval=3600.0),
                received=T0 + 3600,
            )
    node = state.nodes["n1"]
    assert node.counters.seconds["observed"] == 3600.0 and node.clock_steps == 0


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    yield


# -- /metrics of both daemons from a web configuration file ------------------------------------


def test_both_daemons_serve_metrics_with_tls_and_basic_auth(pki: Pki, tmp_path: Path) -> None:
    import base64
    import ssl
    import subprocess
    import time
    import urllib.error

    import bcrypt

    from .conftest import free_port
    from .factories import gputally_command

    config = tmp_path / "web-config.yml"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    config.write_text(
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    collector_port, agent_port = free_port(), free_port()
    commands = {
        "collector": [
            "collector",
            "--db=",
            f"--metrics-listen=127.0.0.1:{collector_port}",
            "--grpc-listen=127.0.0.1:0",
        ],
        "agent": [
            "agent",
            "--backend=mock",
            f"--state-dir={tmp_path / 'agent'}",
            "--collector=127.0.0.1:9",  # nobody there: the exporter serves regardless
            f"--metrics-listen=127.0.0.1:{agent_port}",
        ],
    }
    processes = [
        subprocess.Popen(
            [*gputally_command(), *args, f"--web-config-file={config}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands.values()
    ]

    def get(port: int, password: str | None) -> tuple[int, str]:
        request = urllib.request.Request(f"https://localhost:{port}/metrics")
        if password is not None:
            token = base64.b64encode(f"prometheus:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    try:
        for port, metric in (
            (collector_port, "gputally_collector_build_info"),
            (agent_port, "gputally_gpu_"),
        ):
            deadline = time.monotonic() + 20
            status = 0
            while time.monotonic() < deadline:
                try:
                    status, body = get(port, "s3cret")
                    break
                except OSError:
                    time.sleep(0.2)
            assert status == 200 and metric in body
            assert get(port, None)[0] == 401
            assert get(port, "wrong")[0] == 401
            with pytest.raises(urllib.error.URLError):  # plain HTTP gets no metrics
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    for process in processes:
        assert "Traceback" not in (process.stderr.read() if process.stderr else "")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--grpc-listen=0.0.0.0:0"], "plaintext gRPC is refused on a non-loopback address"),
        (["--tls-cert=nope.crt", "--tls-key=nope.key"], "--tls-cert nope.crt: cannot read"),
        (["--tls-client-ca={ca}"], "--tls-client-ca needs both"),
        (["--tls-cert={cert}", "--tls-key={ca}"], "not the private key of --tls-cert"),
        (["--web-config-file={bad}"], "unknown key 'x' in the top level"),
    ],
)
def test_unusable_tls_or_web_settings_are_one_line_and_exit_2(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    from gputally.cli.main import main

    (tmp_path / "bad.yml").write_text("x: 1\n")
    names = {"ca": pki.ca, "cert": pki.server_cert, "bad": tmp_path / "bad.yml"}
    filled = [a.format(**names) for a in args]
    base = ["collector", "--db=", "--metrics-listen=127.0.0.1:0"]
    if not any(a.startswith("--grpc-listen") for a in filled):
        base.append("--grpc-listen=127.0.0.1:0")
    assert main([*base, *filled]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err


def test_a_stream_whose_batches_are_all_rejected_is_ended_after_three(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory()
    key = Ed25519PrivateKey.generate()
    bad = [
        [report(10 * b + i + 1, T0 + 10 * b + i + 1, gpu_sample(7)) for i in range(10)]
        for b in range(3)
    ]

    async def stream() -> tuple[int, grpc.StatusCode, str]:
        from gputally.v1 import telemetry_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(collector.target) as channel:
            call = pb_grpc.IngestStub(channel).Stream()
            await call.write(pb.AgentMessage(hello=hello("n1", 1, key=key)))
            nonce = (await call.read()).challenge.nonce
            proof = sign_stream(key, nonce, "n1", 1)
            await call.write(pb.AgentMessage(proof=pb.Proof(signature=proof)))
            await call.read()  # the Welcome
            acks = 0
            for batch in bad:
                await call.write(pb.AgentMessage(batch=pb.ReportBatch(reports=batch)))
                acks += (await call.read()).ack.acked_seq > 0  # each batch is acknowledged
            try:
                await call.read()
                return acks, grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                return acks, error.code(), str(error.details())

    acks, code, reason = asyncio.run(stream())
    assert acks == 3  # acknowledged first, so that the agent lets them go
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "the last 3 batches were rejected whole (GPU index 7 was not in this node's hello)"
        in reason
    )
    assert collector.state.nodes["n1"].reports["rejected"] == 30
    # a batch with one good report among bad ones resets the count: the stream goes on
    good = Ed25519PrivateKey.generate()
    mixed = [
        [
            report(3 * b + 1, T0 + 3 * b + 1, gpu_sample(7)),
            report(3 * b + 2, T0 + 3 * b + 2, busy_sample(0, 0.5)),
        ]
        for b in range(5)
    ]
    replies = asyncio.run(raw_stream(collector.target, hello("n2", 1, key=good), mixed, key=good))
    assert len(replies) == 6


def test_a_peer_refused_in_a_loop_is_refused_at_once_and_not_logged(
    collector_factory: Callable[..., Collector], caplog: pytest.LogCaptureFixture
) -> None:
    collector = collector_factory(sizes=Limits(max_refusals_per_peer=5))
    bogus = hello("x", 1)
    bogus.protocol_revision = 0  # refused: INVALID_ARGUMENT

    async def loop() -> list[str]:
        codes = []
        for _ in range(12):
            try:
                await raw_stream(collector.target, bogus, [])
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
        return codes

    with caplog.at_level(logging.DEBUG, logger="gputally.collector.ingest"):
        codes = asyncio.run(loop())
    assert codes[:6] == ["INVALID_ARGUMENT"] * 6
    # refused before its Hello is read: the client may see its own write fail (INTERNAL)
    # rather than the status; the collector's count below is the truth
    assert set(codes[6:]) <= {"RESOURCE_EXHAUSTED", "INTERNAL"} and len(codes) == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["stream refused"] * 5 + [
        "streams refused in a loop: refused at once, and no longer logged"
    ]
    assert collector.state.refusals == {"INVALID_ARGUMENT": 6, "RESOURCE_EXHAUSTED": 6}


def test_a_lying_agent_cannot_count_more_seconds_than_real_time_plus_the_backlog() -> None:
    """The hostile review's attack: report 1 now, report 2 a "clock step" back to a week ago,
    then 168 hours walked forward in 170 reports, all within --max-skew and --horizon. The
    node may count the backlog an agent's outbox can bring (--live-backlog), never more."""
    now = [T0 + 7 * 86400]
    limits = TimeLimits(backlog=3600.0)
    state = ClusterState(clock=lambda: now[0], limits=limits)
    state.open_session(hello("liar", 1))
    state.ingest("liar", report(1, now[0], busy_sample(0, 1.0)), received=now[0])
    now[0] += 1.0
    start = T0 + 10
    state.ingest("liar", report(2, start, busy_sample(0, 1.0), interval=0.005), received=now[0])
    for k in range(168):
        now[0] += 0.001  # all at once: no real time passes
        with contextlib.suppress(InvalidMessageError):
            state.ingest(
                "liar",
                report(k + 3, start + 3600 * (k + 1), busy_sample(0, 1.0), interval=3600),
                received=now[0],
            )
    node = state.nodes["liar"]
    elapsed = now[0] - (T0 + 7 * 86400)  # 1.168 s
    # 604,801 GPU-seconds before; now the backlog and the time that passed, no more
    assert node.counters.seconds["busy"] <= elapsed + 3600.0 + 1e-6
    assert node.counters.seconds["busy"] == pytest.approx(3600.0, abs=2.0)
    assert node.clipped_seconds == pytest.approx(3600.0 * 168 + 1.005 - 3600.0 - elapsed, abs=2.0)


def test_streams_that_have_not_proven_anything_cannot_take_the_nodes_places(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(sizes=Limits(max_pending_streams=2, hello_timeout=5.0))
    key = Ed25519PrivateKey.generate()
    from gputally.v1 import telemetry_pb2_grpc as pb_grpc

    async def scenario() -> tuple[grpc.StatusCode, list[pb.CollectorMessage]]:
        async with grpc.aio.insecure_channel(collector.target) as channel:
            stub = pb_grpc.IngestStub(channel)
            # opened, a Hello sent, its Challenge never answered: not proven, not welcomed
            silent = [stub.Stream() for _ in range(2)]
            for i, call in enumerate(silent):
                await call.write(pb.AgentMessage(hello=hello(f"x{i}", 1, key=key)))
            await asyncio.sleep(0.3)
            third = stub.Stream()
            try:
                await third.read()
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            for call in silent:
                call.cancel()
            await asyncio.sleep(0.3)
            # their places free again, a node's stream opens
            replies = await raw_stream(collector.target, hello("n1", 1, key=key), ONE, key=key)
            return code, replies

    code, replies = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert replies[0].WhichOneof("body") == "welcome" and replies[1].ack.acked_seq == 1


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:5123", "10.0.0.7"),
        ("ipv6:[::1]:5123", "::1"),
        ("ipv6:%5B::1%5D:48782", "::1"),  # how grpcio 1.85 writes it
        ("ipv6:%5Bfe80::1%25eth0%5D:9", "fe80::1%eth0"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
    ],
)
def test_the_peer_address_is_the_host_without_the_port(peer: str, host: str) -> None:
    assert ingest.peer_host(peer) == host


def test_the_per_peer_limit_holds_for_ipv6_peers() -> None:
    state = ClusterState(sizes=Limits(max_streams_per_peer=1, hello_timeout=5.0))
    key = Ed25519PrivateKey.generate()
    from gputally.v1 import telemetry_pb2_grpc as pb_grpc

    async def scenario() -> grpc.StatusCode:
        server, port, _ = await ingest.start(state, "[::1]:0")
        try:
            options = [("grpc.use_local_subchannel_pool", 1)]  # two connections, one address
            async with (
                grpc.aio.insecure_channel(f"[::1]:{port}", options=options) as a,
                grpc.aio.insecure_channel(f"[::1]:{port}", options=options) as b,
            ):
                first = pb_grpc.IngestStub(a).Stream()  # held open: a Hello, no Proof
                await first.write(pb.AgentMessage(hello=hello("x", 1, key=key)))
                await asyncio.sleep(0.3)
                second = pb_grpc.IngestStub(b).Stream()
                try:
                    await second.read()
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    return error.code()
                finally:
                    first.cancel()
        finally:
            await server.stop(0)

    assert asyncio.run(scenario()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_chain_number_beyond_the_records_integers_is_refused() -> None:
    from gputally.collector.live.validate import check_summary

    s = summary(T0, 60.0, 0.5, "n1")
    s.chain_seq = 2**64 - 1
    with pytest.raises(InvalidMessageError, match=r"chain_seq must be in \[1, 2\^63 - 1\]"):
        check_summary(s, {0: "GPU-n1-0"}, T0 + 60, TimeLimits(horizon=math.inf, skew=math.inf))


def test_agents_behind_one_address_spread_over_the_shards_and_move_when_one_dies(
    collector_factory: Callable[..., Collector],
) -> None:
    """Collectors sharded behind one address (here a gRPC target of two addresses; a DNS name
    or a headless Service resolves the same way): each agent streams to a shard taken at
    random, and an agent whose shard dies reconnects to another."""
    shards = collector_factory(), collector_factory()
    target = "ipv4:" + ",".join(shard.target for shard in shards)
    nodes = [f"n{k:02d}" for k in range(24)]

    async def run() -> None:
        senders = [
            Sender(target, functools.partial(hello, node, 1), backoff_initial=0.05, backoff_max=0.2)
            for node in nodes
        ]
        tasks = [asyncio.ensure_future(sender.run()) for sender in senders]
        try:
            for sender in senders:
                sender.submit(report(1, T0 + 1, busy_sample(0, 0.5)))
            assert all(await asyncio.gather(*(s.drain(20.0) for s in senders)))
            first, second = (set(shard.state.nodes) for shard in shards)
            # 24 agents all on one shard by chance: 2 in 2^24
            assert first and second and not first & second and first | second == set(nodes)
            shards[0].stop()
            for sender in senders:
                sender.submit(report(2, T0 + 2, busy_sample(0, 0.5)))
            assert all(await asyncio.gather(*(s.drain(30.0) for s in senders)))
            assert {n: node.last_seq for n, node in shards[1].state.nodes.items()} == dict.fromkeys(
                nodes, 2
            )
        finally:
            for sender in senders:
                sender.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
