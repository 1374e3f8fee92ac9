"""Keys, enrollment, signed and chained summaries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import ChainStateError, SummarySigner
from gputally.collector.live.state import ClusterState, NotEnrolledError
from gputally.collector.live.validate import InvalidMessageError
from gputally.collector.record.keys import KeyStore, KeyStoreError
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import KeyFileError, public_bytes
from gputally.v1.signing import load_or_create_private_key as load_or_create_key
from gputally.v1.signing import verify_summary as verify

from . import factories
from .conftest import Collector
from .factories import T0, carrying, gputally_command, raw_stream, summary


def test_keys_are_created_private_and_refused_when_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "n1" / "agent.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_bytes(load_or_create_key(path)) == public_bytes(key)  # loaded, not replaced
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_or_create_key(path)


def test_a_key_file_is_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state" / "collector.key"

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        load_or_create_key(path)
    assert list(path.parent.iterdir()) == []  # no key, and no temporary file left behind
    monkeypatch.undo()
    load_or_create_key(path)
    assert [p.name for p in path.parent.iterdir()] == ["collector.key"]


def test_the_collector_refuses_a_checkpoint_key_others_can_read(tmp_path: Path) -> None:
    """The collector's key signs every checkpoint: it is kept as the agents' keys are (the
    collector once took any file, and wrote it without fsync)."""
    db, key = tmp_path / "record.db", tmp_path / "record.db.key"
    load_or_create_key(key)
    key.chmod(0o644)
    done = subprocess.run(
        [
            *gputally_command(),
            "collector",
            f"--db={db}",
            f"--keys={tmp_path / 'keys'}",
            "--trust-on-first-use",
            "--grpc-listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{key}: the private key is readable by others; run `chmod 600 {key}`" in done.stderr


def test_summaries_are_chained_and_the_chain_survives_a_restart(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    first = SummarySigner(key, "n1", tmp_path)
    a, b = first.sign(summary()), first.sign(summary(T0 + 60))
    body_a, body_b = pb.Summary.FromString(a.body), pb.Summary.FromString(b.body)
    assert (body_a.node, body_a.chain_seq, body_a.prev_hash) == ("n1", 1, b"")
    assert (body_b.chain_seq, body_b.prev_hash) == (2, hashlib.sha256(a.body).digest())
    assert verify(public_bytes(key), b.body, b.signature)
    assert not verify(public_bytes(key), b.body + b"x", b.signature)
    restarted = SummarySigner(key, "n1", tmp_path)  # a new agent process on the same node
    c = pb.Summary.FromString(restarted.sign(summary(T0 + 120)).body)
    assert (c.chain_seq, c.prev_hash) == (3, hashlib.sha256(b.body).digest())


def hello(node: str, key: Ed25519PrivateKey) -> pb.Hello:
    return factories.hello(node, 1, key=key)


def test_only_enrolled_keys_speak_for_a_node(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    store = KeyStore(keys_dir)
    good, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    store.enroll("n1", public_bytes(good))
    state = ClusterState(record=Record(tmp_path / "r.db"), keys=KeyStore(keys_dir))
    state.open_session(hello("n1", good), proven=True)
    with pytest.raises(NotEnrolledError, match="not the one enrolled"):
        state.open_session(hello("n1", other), proven=True)
    with pytest.raises(NotEnrolledError, match="no enrolled key"):
        state.open_session(hello("n2", good), proven=True)
    signer = SummarySigner(good, "n1")
    ok = pb.Report(seq=1, time_unix_nano=int(T0 * 1e9), summary=signer.sign(summary()))
    assert state.ingest("n1", ok, received=T0) == "accepted"
    forged = pb.Report(
        seq=2, time_unix_nano=int(T0 * 1e9), summary=SummarySigner(other, "n1").sign(summary())
    )
    with pytest.raises(InvalidMessageError, match="signature does not verify"):
        state.ingest("n1", forged, received=T0)
    altered = signer.sign(summary(T0 + 60))
    altered.body = altered.body.replace(b"GPU-n1-0", b"GPU-n1-9")
    with pytest.raises(InvalidMessageError, match="signature does not verify"):
        state.ingest("n1", carrying(3, altered), received=T0)
    assert state.record is not None and state.record.count() == 1  # only the genuine one


def test_trust_on_first_use_enrolls_the_first_key_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys", trust_on_first_use=True)
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    store.admit("n1", public_bytes(first))
    assert (tmp_path / "keys" / "n1.pub").exists()
    with pytest.raises(KeyStoreError, match="not the one enrolled"):
        store.admit("n1", public_bytes(second))
    with pytest.raises(KeyStoreError, match="no such key directory"):
        KeyStore(tmp_path / "missing")


def test_a_running_collector_sees_enrolments_and_revocations_without_a_restart(
    tmp_path: Path,
) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    running = KeyStore(keys_dir)  # the collector's, loaded before anything is enrolled
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with pytest.raises(KeyStoreError, match="no enrolled key"):
        running.admit("n1", public_bytes(first))
    KeyStore(keys_dir).enroll("n1", public_bytes(first))  # `gputally enroll`, another process
    running.admit("n1", public_bytes(first))
    # a new key (a reinstalled node) replaces the old one only by an explicit rotation
    path = keys_dir / "n1.pub"
    with pytest.raises(KeyStoreError, match=r"already has another key.*--rotate"):
        KeyStore(keys_dir).enroll("n1", public_bytes(second))
    before = path.stat().st_mtime_ns
    KeyStore(keys_dir).enroll("n1", public_bytes(second), rotate=True)
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))  # a coarse-clock filesystem
    with pytest.raises(KeyStoreError, match="retired by a rotation"):
        running.admit("n1", public_bytes(first))
    assert running.key("n1") == public_bytes(second)
    assert running.keys("n1") == [public_bytes(first), public_bytes(second)]
    with pytest.raises(KeyStoreError, match="cannot be made current again"):
        KeyStore(keys_dir).enroll("n1", public_bytes(first), rotate=True)
    # a broken file does not unseat the key enrolled before it
    path.write_text("not base64!\n")
    assert running.key("n1") == public_bytes(second)
    # deleting the file revokes the key
    path.unlink()
    assert running.key("n1") is None
    assert running.key("../etc/passwd") is None  # names that cannot be key files


def test_an_unenrolled_agent_is_refused_with_permission_denied(
    tmp_path: Path, collector_factory: Callable[..., Collector]
) -> None:
    (tmp_path / "keys").mkdir()
    collector = collector_factory(
        record=Record(tmp_path / "r.db"), keys=KeyStore(tmp_path / "keys")
    )

    async def talk() -> grpc.aio.AioRpcError:
        key = Ed25519PrivateKey.generate()  # the agent proves it holds it: still not enrolled
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw_stream(collector.target, hello("n1", key), [], key=key)
        return refused.value

    error = asyncio.run(talk())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "gputally enroll" in (error.details() or "")


def test_enroll_command_and_agent_public_key(tmp_path: Path) -> None:
    command = gputally_command()
    printed = subprocess.run(
        [
            *command,
            "agent",
            "--backend=mock",
            f"--state-dir={tmp_path / 'state'}",
            "--print-public-key",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    key = printed.stdout.strip()
    enrolled = subprocess.run(
        [*command, "enroll", f"--keys={tmp_path / 'keys'}", "--node=node-00", key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert (tmp_path / "keys" / "node-00.pub").read_text().strip() == key
    bad = subprocess.run(
        [*command, "enroll", f"--keys={tmp_path / 'keys'}", "--node=n", "YWJj"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "32 bytes" in bad.stderr
    # a reinstalled node's new key: refused without --rotate, then made current with it
    new = base64.b64encode(public_bytes(Ed25519PrivateKey.generate())).decode()
    enroll = [*command, "enroll", f"--keys={tmp_path / 'keys'}", "--node=node-00", new]
    refused = subprocess.run(enroll, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--rotate" in refused.stderr
    rotated = subprocess.run([*enroll, "--rotate"], capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    assert (tmp_path / "keys" / "node-00.pub").read_text().split() == [key, new]


# -- the spool: summaries survive the agent ------------------------------------------------


def test_signed_summaries_wait_in_the_spool_until_acknowledged(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signer = SummarySigner(key, "n1", tmp_path)
    bodies = [signer.sign(summary(T0 + 60 * k)).body for k in range(3)]
    assert [s.body for s in signer.pending()] == bodies
    signer.forget(2)  # only that one: summary 1 still waits
    assert [s.body for s in signer.pending()] == [bodies[0], bodies[2]]
    signer.forget(1)
    assert [s.body for s in signer.pending()] == bodies[2:]
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["000000000003.summary"]
    # a restarted agent finds what is still unacknowledged, and goes on after it
    again = SummarySigner(key, "n1", tmp_path)
    assert [s.body for s in again.pending()] == bodies[2:]
    assert again.chain_seq == 3


def test_a_summary_spooled_just_before_a_crash_is_never_renumbered(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signer = SummarySigner(key, "n1", tmp_path)
    signer.sign(summary(T0))
    chain_after_first = (tmp_path / "chain.json").read_bytes()
    second = signer.sign(summary(T0 + 60))
    # the agent died after spooling summary 2 and before saving the chain's position
    (tmp_path / "chain.json").write_bytes(chain_after_first)
    restarted = SummarySigner(key, "n1", tmp_path)
    third = pb.Summary.FromString(restarted.sign(summary(T0 + 120)).body)
    assert third.chain_seq == 3
    assert third.prev_hash == hashlib.sha256(second.body).digest()


def test_an_unreadable_spool_file_is_a_clear_error(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    SummarySigner(key, "n1", tmp_path).sign(summary())
    (tmp_path / "spool" / "000000000001.summary").write_bytes(b"\xff\xff")
    with pytest.raises(ChainStateError, match=r"unreadable spooled summary.*move it away"):
        SummarySigner(key, "n1", tmp_path)


@pytest.mark.parametrize("content", ["[]", '{"node": "n1", "chain_seq": null}', "{"])
def test_an_unreadable_chain_state_is_a_clear_error(tmp_path: Path, content: str) -> None:
    key = Ed25519PrivateKey.generate()
    SummarySigner(key, "n1", tmp_path).sign(summary())
    state = tmp_path / "chain.json"
    saved = state.read_text()
    state.write_text(
        content
        if content != '{"node": "n1", "chain_seq": null}'
        else saved.replace('"chain_seq": 1', '"chain_seq": null')
    )
    with pytest.raises(ChainStateError, match=r"unreadable chain state.*move it away"):
        SummarySigner(key, "n1", tmp_path)


def test_an_append_committed_but_reported_failed_is_neither_lost_nor_recorded_twice(
    tmp_path: Path,
) -> None:
    """The ledger's server commits an append and the connection drops before it says so: the
    collector cannot tell, so it acknowledges nothing and stops recording. When the server
    answers again, the node's chain is read back: the summary is in it, the agent is told so
    (recorded_chain_seq) and a copy it sends anyway counts as resent; the chain goes on
    unbroken, one entry each."""
    from gputally.collector.record.store import RecordUnavailableError, SqliteRecord

    class DropsTheReply(SqliteRecord):
        drop = 0  # appends still to report failed after committing them

        def append(self, *args: Any, **kwargs: Any) -> bool:
            stored = super().append(*args, **kwargs)
            if self.drop:
                self.drop -= 1
                raise RecordUnavailableError("the connection to the ledger's server was lost")
            return stored

    key = Ed25519PrivateKey.generate()
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    KeyStore(keys_dir).enroll("n1", public_bytes(key))
    record = DropsTheReply(tmp_path / "r.db")
    state = ClusterState(record=record, keys=KeyStore(keys_dir))
    signer = SummarySigner(key, "n1")
    state.open_session(hello("n1", key), proven=True)
    first, second = signer.sign(summary(T0)), signer.sign(summary(T0 + 60))
    assert state.ingest("n1", carrying(1, first), received=T0) == "accepted"
    record.drop = 1
    assert state.ingest("n1", carrying(2, second), received=T0) == "accepted"  # live only
    assert record.count() == 2  # committed, though the collector was told otherwise
    assert state.intake.recorded_seq("n1") == 1  # so not acknowledged: the agent keeps it
    assert state.intake.waiting and not state.must_resend("n1")
    assert state.resume_recording() and state.must_resend("n1")
    # the agent's new stream: the Welcome reads the chain back from the record
    state.open_session(hello("n1", key), proven=True)
    assert state.intake.recorded_seq("n1") == 2  # the agent drops its copy
    assert state.ingest("n1", carrying(3, second), received=T0) == "accepted"  # sent anyway
    third = signer.sign(summary(T0 + 120))
    assert state.ingest("n1", carrying(4, third), received=T0) == "accepted"
    chain = state.intake.chain("n1")
    assert record.count() == 3 and state.intake.recorded_seq("n1") == 3
    assert (chain.recorded, chain.resent, chain.breaks, chain.unrecorded) == (2, 1, 0, 1)
    assert not state.intake.stopped


def test_after_a_key_rotation_the_collector_records_the_new_chain_without_a_break(
    tmp_path: Path,
) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    old_key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    KeyStore(keys_dir).enroll("n1", public_bytes(old_key))
    record = Record(tmp_path / "r.db")
    state = ClusterState(record=record, keys=KeyStore(keys_dir))
    old = SummarySigner(old_key, "n1")
    state.open_session(hello("n1", old_key), proven=True)
    for seq in (1, 2):
        signed = old.sign(summary(T0 + 60 * seq))
        assert state.ingest("n1", carrying(seq, signed), received=T0) == "accepted"
    # the node is reinstalled: a new key, enrolled with --rotate, and a new chain from 1
    KeyStore(keys_dir).enroll("n1", public_bytes(new_key), rotate=True)
    new = SummarySigner(new_key, "n1")
    reinstalled = hello("n1", new_key)
    reinstalled.instance_id = 2
    state.open_session(reinstalled, proven=True)
    first = new.sign(summary(T0 + 180))
    assert state.ingest("n1", carrying(1, first), received=T0) == "accepted"
    chain = state.intake.chain("n1")
    assert record.count() == 3 and chain.breaks == 0 and chain.resent == 0
    # the old key no longer speaks for the node
    with pytest.raises(NotEnrolledError, match="retired by a rotation"):
        state.open_session(hello("n1", old_key), proven=True)
    # a restarted collector goes on with the new key's chain, from its record
    state = ClusterState(record=record, keys=KeyStore(keys_dir))
    state.open_session(reinstalled, proven=True)
    assert state.ingest("n1", carrying(1, first), received=T0) == "accepted"
    second = new.sign(summary(T0 + 240))
    assert state.ingest("n1", carrying(2, second), received=T0) == "accepted"
    chain = state.intake.chain("n1")
    assert record.count() == 4 and chain.resent == 1 and chain.breaks == 0


def test_the_collector_records_a_resent_summary_once_and_refuses_a_rewrite(
    tmp_path: Path,
) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    key = Ed25519PrivateKey.generate()
    KeyStore(keys_dir).enroll("n1", public_bytes(key))
    record = Record(tmp_path / "r.db")
    signer = SummarySigner(key, "n1")
    first, second = signer.sign(summary(T0)), signer.sign(summary(T0 + 60))

    state = ClusterState(record=record, keys=KeyStore(keys_dir))
    state.open_session(hello("n1", key), proven=True)
    assert state.ingest("n1", carrying(1, first), received=T0) == "accepted"
    # the agent restarts (a new instance, sequence numbers from 1) and sends its spool again
    restarted = hello("n1", key)
    restarted.instance_id = 2
    state.open_session(restarted, proven=True)
    assert state.ingest("n1", carrying(1, first), received=T0) == "accepted"
    assert record.count() == 1 and state.intake.chain("n1").resent == 1
    # the same number with other content (signed by the node's key) would rewrite the chain
    rewrite = SummarySigner(key, "n1").sign(summary(T0 + 600))
    with pytest.raises(InvalidMessageError, match="not the one recorded under that number"):
        state.ingest("n1", carrying(2, rewrite), received=T0 + 700)
    # a restarted collector picks the chain up from its record
    state = ClusterState(record=record, keys=KeyStore(keys_dir))
    state.open_session(hello("n1", key), proven=True)
    assert state.ingest("n1", carrying(1, first), received=T0) == "accepted"  # resent again
    assert state.ingest("n1", carrying(2, second), received=T0) == "accepted"
    chain = state.intake.chain("n1")
    assert record.count() == 2 and chain.recorded == 1 and chain.breaks == 0
