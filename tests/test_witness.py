"""Witnesses: the C2SP tlog-witness protocol and tlog-cosignature format, the witness daemon's
refusals (rollback, fork, bad proof), the collector's client, and the auditor's anchors
(`audit verify --witness-key/--min-witnesses/--against`, a receipt that no longer matches).

Real HTTP on 127.0.0.1, real ledgers, the real `gputally` commands."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gputally.agent.chain import SummarySigner
from gputally.cli.options import FAILED, USAGE, address
from gputally.cli.web import serve_http
from gputally.collector.audit.verify import (
    EARLY_WITNESSED,
    FORK,
    ROLLBACK,
    WITNESS,
    Anchors,
    Receipt,
    verify_ledger,
)
from gputally.collector.record import merkle
from gputally.collector.record.ledger import (
    COLLECTOR_KEY_FILE,
    CheckpointError,
    Ledger,
    checkpoint_text,
    collector_key_text,
    sign_note,
    split_note,
)
from gputally.collector.record.store import Record
from gputally.collector.record.witnessing import (
    SIZE_CONTENT_TYPE,
    RequestError,
    Witness,
    Witnesses,
    add_checkpoint_body,
    cosign,
    open_cosignature,
    parse_add_checkpoint,
    parse_witness_key,
    read_witnesses,
    witness_key_text,
)
from gputally.collector.witness import WitnessService, WitnessState, make_app, read_logs
from gputally.v1 import telemetry_pb2 as pbm
from gputally.v1.signing import public_bytes

from .conftest import free_port
from .factories import T0, gputally_command, summary
from .test_integrity import enrolled

ORIGIN = "example.org/gputally-test"
WITNESS_NAME = "witness.example/w1"


def leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


# -- the pure rules ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.data())
def test_a_proof_from_the_frontier_equals_the_one_from_every_leaf(
    n: int, data: st.DataObject
) -> None:
    m = data.draw(st.integers(1, n))
    everything = leaves(n)
    frontier = merkle.Frontier()
    for leaf in everything[:m]:
        frontier.append(leaf)
    proof = merkle.consistency_proof_extending(m, frontier.peaks(), everything[m:])
    assert proof == merkle.consistency_proof(everything, m)
    merkle.verify_consistency(m, n, merkle.root(everything[:m]), merkle.root(everything), proof)


def test_a_cosignature_verifies_only_over_its_checkpoint_and_key() -> None:
    key = Ed25519PrivateKey.generate()
    text = checkpoint_text(ORIGIN, 20852163, bytes(range(32)))
    line = cosign(text, WITNESS_NAME, key, 1679315147)
    assert line.startswith(f"\u2014 {WITNESS_NAME} ") and line.endswith("\n")
    blob = base64.b64decode(line.split()[-1])
    # key id (0x04: the cosignature algorithm byte) || big-endian timestamp || signature
    assert len(blob) == 4 + 8 + 64
    assert blob[4:12] == (1679315147).to_bytes(8, "big")
    assert open_cosignature(line, text, WITNESS_NAME, public_bytes(key)) == 1679315147
    other = checkpoint_text(ORIGIN, 20852164, bytes(range(32)))
    with pytest.raises(CheckpointError, match="does not verify"):
        open_cosignature(line, other, WITNESS_NAME, public_bytes(key))
    # another key's line is ignored, not an error (tlog-witness: ignore unknown keys)
    assert (
        open_cosignature(line, text, WITNESS_NAME, public_bytes(Ed25519PrivateKey.generate()))
        is None
    )
    # the Ed25519 v1 message does not commit to the name: the key id does
    assert open_cosignature(line, text, "witness.example/w2", public_bytes(key)) is None
    vkey = witness_key_text(WITNESS_NAME, public_bytes(key))
    assert parse_witness_key(vkey) == (WITNESS_NAME, public_bytes(key))
    assert base64.b64decode(vkey.split("+", 2)[2])[:1] == b"\x04"


def test_the_add_checkpoint_body_round_trips_and_malformed_ones_are_refused() -> None:
    proof = [bytes([i]) * 32 for i in range(3)]
    note = "o\n5\nAAAA\n\n\u2014 o sig\n"
    body = add_checkpoint_body(4, proof, note)
    assert body.decode().startswith("old 4\n")
    assert parse_add_checkpoint(body) == (4, proof, note)
    for bad, why in (
        (b"old 04\n\nnote", "leading zeroes"),
        (b"old 4\nnot-base64!\n\nnote", "base64"),
        (b"old 4\n" + base64.b64encode(b"x" * 31) + b"\n\nnote", "SHA-256"),
        (b"old 4", "empty line"),
        (
            b"old 1\n" + b"".join(base64.b64encode(b"x" * 32) + b"\n" for _ in range(64)) + b"\nn",
            "63",
        ),
    ):
        with pytest.raises(RequestError, match=why):
            parse_add_checkpoint(bad)


# -- a log, a witness ----------------------------------------------------------------------------


class Log:
    """A collector's ledger with real signed summaries, checkpointed on demand."""

    def __init__(self, tmp_path: Path, name: str = "ledger.db"):
        self.dir = tmp_path
        _, made = enrolled(tmp_path, "n1")
        self.signer = SummarySigner(made["n1"], "n1")
        self.key = Ed25519PrivateKey.generate()
        (tmp_path / "keys" / COLLECTOR_KEY_FILE).write_text(
            collector_key_text(ORIGIN, public_bytes(self.key))
        )
        self.path = tmp_path / name
        self.record = Record(self.path)
        self.ledger = Ledger(self.record, self.key, ORIGIN)
        self.windows = 0

    def grow(self, n: int, *, checkpoint_at: float | None = None, tenant: str = "") -> str:
        """n more 300 s windows of node n1, then a checkpoint (signed at `checkpoint_at`)."""
        for _ in range(n):
            s = summary(T0 + 300.0 * self.windows, 300.0, 0.5, "n1")
            if tenant:
                s.gpus[0].attribution.tenant = tenant
            self.windows += 1
            signed = self.signer.sign(s)
            self.record.append(
                "n1", 1, self.windows, s.window_start_unix_nano, s.window_end_unix_nano,
                T0, signed.SerializeToString(),
            )  # fmt: skip
        assert self.ledger.checkpoint(checkpoint_at if checkpoint_at is not None else T0)
        return self.ledger.last_note


class WitnessServer:
    def __init__(self, tmp_path: Path, logs: dict[str, bytes], clock: float = T0 + 3600):
        self.key = Ed25519PrivateKey.generate()
        self.state_path = tmp_path / "witness.db"
        self.clock = clock
        self.start(logs)

    def start(self, logs: dict[str, bytes]) -> None:
        self.state = WitnessState(self.state_path, create=True)
        self.service = WitnessService(
            self.state, self.key, WITNESS_NAME, logs, clock=lambda: self.clock
        )
        self.http, _ = serve_http(make_app(self.service), address("127.0.0.1:0"))
        self.url = f"http://127.0.0.1:{self.http.server_port}"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.state.db.close()

    @property
    def vkey(self) -> str:
        return witness_key_text(WITNESS_NAME, public_bytes(self.key))

    def post(self, body: bytes) -> tuple[int, str, str]:
        request = urllib.request.Request(f"{self.url}/add-checkpoint", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.headers["Content-Type"], answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def log_and_witness(tmp_path: Path) -> Iterator[tuple[Log, WitnessServer]]:
    log = Log(tmp_path)
    witness = WitnessServer(tmp_path, {ORIGIN: public_bytes(log.key)})
    yield log, witness
    witness.stop()


def test_the_witness_cosigns_growth_and_refuses_rollback_fork_and_bad_proofs(
    log_and_witness: tuple[Log, WitnessServer],
) -> None:
    log, witness = log_and_witness
    first = log.grow(5)
    status, _, line = witness.post(add_checkpoint_body(0, [], first))
    assert status == 200
    text, _ = split_note(first)
    assert open_cosignature(line, text, WITNESS_NAME, public_bytes(witness.key)) == T0 + 3600

    second = log.grow(6)  # 11 entries
    proof = log.ledger.consistency(5, 11)
    # a wrong old size: 409 with the witness's size, as tlog-witness says
    status, content_type, body = witness.post(add_checkpoint_body(0, [], second))
    assert (status, content_type, body) == (409, SIZE_CONTENT_TYPE, "5\n")
    # a proof that does not verify: 422, and kept as evidence
    bent = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    assert witness.post(add_checkpoint_body(5, bent, second))[0] == 422
    witness.clock += 60
    assert witness.post(add_checkpoint_body(5, proof, second))[0] == 200

    # a rollback: the first checkpoint again, as if the later entries never were
    status, _, body = witness.post(add_checkpoint_body(5, [], first))
    assert (status, body) == (409, "11\n")
    # a fork: another tree of 11 entries, signed by the same collector key
    forked = sign_note(checkpoint_text(ORIGIN, 11, bytes(32)), ORIGIN, log.key)
    assert witness.post(add_checkpoint_body(11, [], forked))[0] == 409
    # an unknown log, a signature by another key, an old size above the new one, garbage
    other = sign_note(
        checkpoint_text("other.example/log", 3, bytes(32)), "other.example/log", log.key
    )
    assert witness.post(add_checkpoint_body(0, [], other))[0] == 404
    stranger = sign_note(
        checkpoint_text(ORIGIN, 12, bytes(32)), ORIGIN, Ed25519PrivateKey.generate()
    )
    assert witness.post(add_checkpoint_body(11, [], stranger))[0] == 403
    assert witness.post(add_checkpoint_body(12, [], second))[0] == 400
    assert witness.post(b"hello")[0] == 400

    # the view held: 11 entries, cosigned at the later time; the refusals kept, with reasons
    assert witness.state.latest(ORIGIN)[:2] == (11, merkle.root(log.record.leaves(0, 11)))  # type: ignore[index]
    # only the fork is evidence against the log (two signed roots for one size), kept once
    assert witness.post(add_checkpoint_body(11, [], forked))[0] == 409
    assert [why.split(":")[0] for _, _, _, why in witness.state.refusals()] == ["fork"]
    # and it survives a restart of the witness: the rollback is still refused
    witness.stop()
    witness.start({ORIGIN: public_bytes(log.key)})
    assert witness.post(add_checkpoint_body(5, [], first))[:3:2] == (409, "11\n")
    checkpoint = (
        urllib.request.urlopen(f"{witness.url}/checkpoint?origin={ORIGIN}", timeout=10)
        .read()
        .decode()
    )
    assert checkpoint.startswith(second) and checkpoint.count("\u2014 ") == 2


def test_the_collectors_client_proves_from_the_witness_size_and_keeps_the_cosignatures(
    log_and_witness: tuple[Log, WitnessServer],
) -> None:
    log, witness = log_and_witness
    now = lambda: witness.clock  # noqa: E731 - the witness's clock, as the client's
    client = Witnesses(
        [Witness(WITNESS_NAME, public_bytes(witness.key), witness.url)],
        log.record,
        timeout=10,
        clock=now,
    )
    log.grow(3)
    client.submit(log.ledger.last_note, log.ledger.consistency)
    for more in (1, 7, 16):
        log.grow(more)
        witness.clock += 60
        client.submit(log.ledger.last_note, log.ledger.consistency)
    held = client.status[WITNESS_NAME]
    assert (held.size, held.cosignatures, held.failures) == (27, 4, {})
    assert [size for size, _, _ in log.record.cosignatures()] == [3, 4, 11, 27]
    assert not client.behind(27)
    # a witness that cosigned this size already is not asked again
    client.submit(log.ledger.last_note, log.ledger.consistency)
    assert client.status[WITNESS_NAME].cosignatures == 4 and len(log.record.cosignatures()) == 4

    # a client that forgot what the witness cosigned (a fresh collector on a copy of the ledger
    # without its cosignatures) learns the size from the 409 and proves from there
    fresh_client = Witnesses(
        [Witness(WITNESS_NAME, public_bytes(witness.key), witness.url)],
        Record(log.dir / "x.db"),
        clock=now,
    )
    log.grow(2)
    copy = log.dir / "copy.db"  # one collector writes a ledger file: the fresh one a copy
    source, target = sqlite3.connect(log.path), sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.close()
    fresh_client.record = Record(copy)
    fresh_client.submit(log.ledger.last_note, log.ledger.consistency)
    assert fresh_client.status[WITNESS_NAME].size == 29

    # a witness that cosigned MORE than the ledger signs has seen another history: loud
    rolled = Witnesses(
        [Witness(WITNESS_NAME, public_bytes(witness.key), witness.url)],
        Record(log.dir / "y.db"),
        clock=now,
    )
    old_note = sign_note(
        checkpoint_text(ORIGIN, 11, merkle.root(log.record.leaves(0, 11))), ORIGIN, log.key
    )
    rolled.submit(old_note, log.ledger.consistency)
    assert rolled.status[WITNESS_NAME].failures == {"conflict": 1}


def test_a_crash_between_a_checkpoint_and_its_frontier_only_costs_a_full_read(
    tmp_path: Path,
) -> None:
    """The frontier is written after the checkpoint: a kill -9 between the two leaves a
    checkpoint without one, and the proof from it is made from every leaf instead, the same."""
    log = Log(tmp_path)
    log.grow(5)
    log.grow(6)
    log.grow(10)
    every = log.record.leaves(0, 21)
    kept = log.ledger.consistency(5, 21)
    with sqlite3.connect(log.path) as connection:
        connection.execute("DELETE FROM frontiers")
    assert log.record.frontier_at(5) is None
    assert log.ledger.consistency(5, 21) == kept == merkle.consistency_proof(every, 5)
    assert log.ledger.consistency(11, 21) == merkle.consistency_proof(every, 11)


def test_a_witnesses_file_is_checked_line_by_line(tmp_path: Path) -> None:
    key = witness_key_text(WITNESS_NAME, public_bytes(Ed25519PrivateKey.generate()))
    path = tmp_path / "witnesses"
    path.write_text(f"# the funder's witness\n{key} https://w1.example/\n")
    assert read_witnesses(path)[0].url == "https://w1.example"
    path.write_text(f"{key}\n")
    with pytest.raises(ValueError, match="line 1"):
        read_witnesses(path)
    path.write_text(f"{collector_key_text(ORIGIN, bytes(32)).strip()} http://x\n")
    with pytest.raises(ValueError, match="0x04"):
        read_witnesses(path)


# -- the auditor's anchors ---------------------------------------------------------------------


def _witnessed_ledger(tmp_path: Path) -> tuple[Log, WitnessServer, Witnesses]:
    log = Log(tmp_path)
    witness = WitnessServer(tmp_path, {ORIGIN: public_bytes(log.key)})
    client = Witnesses(
        [Witness(WITNESS_NAME, public_bytes(witness.key), witness.url)],
        log.record,
        clock=lambda: witness.clock,
    )
    for n in (4, 4, 4):
        log.grow(n)
        client.submit(log.ledger.last_note, log.ledger.consistency)
    return log, witness, client


def _roll_back(db: Path, keep: int) -> None:
    """What an operator would do: delete the last entries, their checkpoints and cosignatures."""
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM summaries WHERE id > ?", (keep,))
        connection.execute("DELETE FROM checkpoints WHERE size > ?", (keep,))
        connection.execute("DELETE FROM cosignatures WHERE size > ?", (keep,))


def test_a_rolled_back_ledger_fails_against_the_witness_and_a_kept_checkpoint(
    tmp_path: Path,
) -> None:
    log, witness, _ = _witnessed_ledger(tmp_path)
    keys = tmp_path / "keys"
    latest = (
        urllib.request.urlopen(f"{witness.url}/checkpoint?origin={ORIGIN}", timeout=10)
        .read()
        .decode()
    )
    witness.stop()
    anchors = Anchors(((WITNESS_NAME, public_bytes(witness.key)),), 1, latest)
    whole = verify_ledger(log.path, keys, anchors=anchors)
    assert whole.ok and whole.witnessed == 12
    assert [c["size"] for c in whole.cosignatures] == [12]

    rolled = tmp_path / "rolled.db"
    log.record.sync()
    shutil.copy(log.path, rolled)
    _roll_back(rolled, 8)
    # on its own, the shorter ledger is a complete-looking log: its checkpoints all hold
    assert verify_ledger(rolled, keys).ok
    # against the witness's latest, it is a rollback
    result = verify_ledger(rolled, keys, anchors=anchors)
    assert [p.kind for p in result.problems] == [ROLLBACK]
    assert "signs 12 entries, the ledger holds 8" in result.problems[0].message
    # against a checkpoint a tenant kept (no witness keys): also a rollback
    kept = Anchors(against=latest)
    assert [p.kind for p in verify_ledger(rolled, keys, anchors=kept).problems] == [ROLLBACK]
    # an operator who deletes entries but leaves the cosignatures is caught without --against
    leftover = tmp_path / "leftover.db"
    shutil.copy(log.path, leftover)
    with sqlite3.connect(leftover) as connection:
        connection.execute("DELETE FROM summaries WHERE id > 8")
        connection.execute("DELETE FROM checkpoints WHERE size > 8")
    found = verify_ledger(leftover, keys, anchors=Anchors(anchors.witness_keys))
    assert [p.kind for p in found.problems] == [ROLLBACK]
    assert (
        f"cosignature by witness {WITNESS_NAME} of a checkpoint of 12" in found.problems[0].message
    )
    # too few witnesses on the checkpoint given
    lone = Anchors(anchors.witness_keys, 1, log.ledger.last_note)  # the collector's, uncosigned
    assert [p.kind for p in verify_ledger(log.path, keys, anchors=lone).problems] == [WITNESS]


def test_a_forked_ledger_fails_against_the_witnessed_checkpoint(tmp_path: Path) -> None:
    log, witness, _ = _witnessed_ledger(tmp_path)
    latest = (
        urllib.request.urlopen(f"{witness.url}/checkpoint?origin={ORIGIN}", timeout=10)
        .read()
        .decode()
    )
    witness.stop()
    # Another history under the same keys: the same node, other summaries, re-signed (the
    # operator holds every key), its own checkpoints in order. Only the witness can tell.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "keys").mkdir()
    fork = Record(other_dir / "ledger.db")
    forked_ledger = Ledger(fork, log.key, ORIGIN)
    signer = SummarySigner(log.signer.key, "n1")
    for k in range(12):
        s = summary(T0 + 300.0 * k, 300.0, 0.9, "n1")  # 90% busy instead of 50%
        fork.append(
            "n1",
            1,
            k + 1,
            s.window_start_unix_nano,
            s.window_end_unix_nano,
            T0,
            signer.sign(s).SerializeToString(),
        )
    assert forked_ledger.checkpoint(T0)
    keys = tmp_path / "keys"
    assert verify_ledger(other_dir / "ledger.db", keys).ok
    anchors = Anchors(((WITNESS_NAME, public_bytes(witness.key)),), 1, latest)
    result = verify_ledger(other_dir / "ledger.db", keys, anchors=anchors)
    assert [p.kind for p in result.problems] == [FORK]


def test_a_receipt_that_no_longer_matches_the_ledger_fails_the_report(tmp_path: Path) -> None:
    log, witness, _ = _witnessed_ledger(tmp_path)
    witness.stop()
    keys = tmp_path / "keys"
    log.record.sync()
    full = verify_ledger(log.path, keys)
    receipt = tmp_path / "receipt.json"
    Receipt.of(full, "2026-04-11T00:00:00Z").write(receipt)
    rolled = tmp_path / "rolled.db"
    shutil.copy(log.path, rolled)
    _roll_back(rolled, 8)
    result = subprocess.run(
        [*gputally_command(), "audit", "report", f"--ledger={rolled}", f"--keys={keys}",
         f"--receipt={receipt}", f"--from={T0:.0f}", f"--to={T0 + 3600:.0f}",
         "--expected-gpus=1", f"--out={tmp_path / 'report'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == FAILED, result.stderr
    assert "rollback" in result.stdout and "covers 12 entries, the ledger holds 8" in result.stdout
    assert not (tmp_path / "report" / "report.html").exists()


def test_recording_delays_come_from_the_witnesses_and_else_from_the_collector(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    witness = WitnessServer(tmp_path, {ORIGIN: public_bytes(log.key)}, clock=T0 + 1200 + 30)
    client = Witnesses(
        [Witness(WITNESS_NAME, public_bytes(witness.key), witness.url)],
        log.record,
        clock=lambda: witness.clock,
    )
    # windows 0..3 end at T0+300..T0+1200; checkpointed (collector's word) at T0+1200+10,
    # witnessed at T0+1200+30
    log.grow(4, checkpoint_at=T0 + 1210)
    client.submit(log.ledger.last_note, log.ledger.consistency)
    # windows 4..7 (ending T0+1500..T0+2400) written two days late, never witnessed
    log.grow(4, checkpoint_at=T0 + 2400 + 2 * 86400)
    witness.stop()
    keys = tmp_path / "keys"
    witnessed = Anchors(((WITNESS_NAME, public_bytes(witness.key)),))
    recording = verify_ledger(log.path, keys, anchors=witnessed).recording
    assert recording["source"] == "mixed"
    assert (recording["witnessed"], recording["claimed"], recording["late"]) == (4, 4, 4)
    # witnessed delays: 930, 630, 330, 30 s; claimed: 2 days + 900, 600, 300, 0 s
    assert recording["max_delay_s"] == 2 * 86400 + 900
    assert recording["median_delay_s"] == 2 * 86400  # the 5th of 8 sorted
    unwitnessed = verify_ledger(log.path, keys).recording
    assert unwitnessed["source"] == "collector" and unwitnessed["claimed"] == 8
    # the collector's word: 910, 610, 310, 10 s, then the same four late ones
    assert (unwitnessed["median_delay_s"], unwitnessed["late"]) == (2 * 86400, 4)
    assert unwitnessed["p99_delay_s"] == 2 * 86400 + 900


# -- the commands, end to end --------------------------------------------------------------------


def gputally(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gputally_command(), *args], capture_output=True, text=True, timeout=timeout
    )


def test_witness_init_serve_show_and_a_collector_cosigned_end_to_end(tmp_path: Path) -> None:
    wkey, wstate = tmp_path / "w.key", tmp_path / "w.db"
    init = gputally(
        "witness", "init", f"--key={wkey}", f"--state={wstate}", f"--name={WITNESS_NAME}"
    )
    assert init.returncode == 0, init.stderr
    vkey = init.stdout.strip()
    assert parse_witness_key(vkey)[0] == WITNESS_NAME and (tmp_path / "w.key.vkey").exists()
    again = gputally(
        "witness", "init", f"--key={wkey}", f"--state={wstate}", f"--name={WITNESS_NAME}"
    )
    assert again.returncode == USAGE and "never remade" in again.stderr
    # a witness whose state is lost does not start afresh
    lost = gputally(
        "witness", "serve", f"--key={wkey}", f"--state={tmp_path / 'gone.db'}", "--logs=/dev/null"
    )
    assert (
        lost.returncode == USAGE and "restore it" in lost.stderr and "Traceback" not in lost.stderr
    )

    keys = tmp_path / "keys"
    keys.mkdir()
    grpc_port, metrics_port, witness_port = free_port(), free_port(), free_port()
    (tmp_path / "witnesses").write_text(f"{vkey} http://127.0.0.1:{witness_port}\n")
    collector = subprocess.Popen(
        [*gputally_command(), "collector", f"--db={tmp_path / 'ledger.db'}", f"--keys={keys}",
         "--trust-on-first-use", f"--origin={ORIGIN}", "--checkpoint-interval=1",
         f"--witnesses={tmp_path / 'witnesses'}", f"--grpc-listen=127.0.0.1:{grpc_port}",
         f"--metrics-listen=127.0.0.1:{metrics_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    witness = None
    try:
        deadline = time.monotonic() + 20
        while not (keys / COLLECTOR_KEY_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        (tmp_path / "logs").write_text((keys / COLLECTOR_KEY_FILE).read_text())
        witness = subprocess.Popen(
            [*gputally_command(), "witness", "serve", f"--key={wkey}", f"--state={wstate}",
             f"--logs={tmp_path / 'logs'}", f"--listen=127.0.0.1:{witness_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        simulate = gputally(
            "simulate", f"--collector=127.0.0.1:{grpc_port}", "--duration=8",
            "--summary-window=2", f"--state-dir={tmp_path / 'sim'}", timeout=60,
        )  # fmt: skip
        assert simulate.returncode == 0, simulate.stderr
        cosigned = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
                .read()
                .decode()
            )
            sizes = {
                line.split()[0].split("{")[0]: float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith(
                    ("gputally_ledger_checkpoint_size", "gputally_witness_cosigned_size{")
                )
            }
            if sizes.get("gputally_ledger_checkpoint_size", 0) > 0 and sizes.get(
                "gputally_witness_cosigned_size"
            ) == sizes.get("gputally_ledger_checkpoint_size"):
                cosigned = metrics
                break
            time.sleep(0.5)
        assert cosigned, "the witness never caught up with the collector's checkpoints"
    finally:
        collector.terminate()
        assert collector.wait(timeout=30) == 0, collector.communicate()[1]
    assert witness is not None
    try:
        # the auditor fetches the witness's latest checkpoint and verifies the ledger against it
        verify = gputally(
            "audit", "verify", f"--ledger={tmp_path / 'ledger.db'}", f"--keys={keys}",
            f"--witness-key={vkey}", f"--against=http://127.0.0.1:{witness_port}",
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"witness {WITNESS_NAME}: cosigned" in verify.stderr
        assert "0 after them rest on the collector's signature alone" in verify.stderr
    finally:
        witness.terminate()
        assert witness.wait(timeout=30) == 0
    show = gputally("witness", "show", f"--state={wstate}")
    assert show.returncode == 0 and ORIGIN in show.stdout
    kept = gputally("witness", "show", f"--state={wstate}", f"--origin={ORIGIN}")
    assert kept.returncode == 0 and kept.stdout.count("\u2014 ") == 2
    (tmp_path / "latest.txt").write_text(kept.stdout)
    rolled = tmp_path / "rolled.db"
    shutil.copy(tmp_path / "ledger.db", rolled)
    _roll_back(rolled, 4)
    verify = gputally(
        "audit", "verify", f"--ledger={rolled}", f"--keys={keys}", f"--witness-key={vkey}",
        f"--against={tmp_path / 'latest.txt'}",
    )  # fmt: skip
    assert verify.returncode == FAILED and "rollback" in verify.stdout
    bad = gputally(
        "audit", "verify", f"--ledger={rolled}", f"--keys={keys}", "--against=/nonexistent"
    )
    assert bad.returncode == USAGE and "Traceback" not in bad.stderr


def test_a_command_of_two_words_reads_its_own_table_and_variables(tmp_path: Path) -> None:
    config = tmp_path / "witness.toml"
    config.write_text('[witness.serve]\nlisten = "127.0.0.1:19999"\nlogs = "logs.txt"\n')
    shown = gputally("witness", "serve", f"--config={config}", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert 'listen = "127.0.0.1:19999"' in shown.stdout and 'logs = "logs.txt"' in shown.stdout
    env = subprocess.run(
        [*gputally_command(), "witness", "serve", f"--config={config}", "--print-config"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GPUTALLY_WITNESS_SERVE_LISTEN": "127.0.0.1:1"},
    )  # fmt: skip
    assert 'listen = "127.0.0.1:1"' in env.stdout
    # the logging options work after either word
    for args in (("witness", "--log-level=info", "show"), ("witness", "show", "--log-level=info")):
        ran = gputally(*args, f"--state={tmp_path / 'none.db'}")
        assert ran.returncode == USAGE and "witness init" in ran.stderr


def test_keys_enrolled_after_the_period_began_are_reported_and_unenrolled_ones_fail(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    log.grow(12, checkpoint_at=T0 + 3660)  # one hour of node n1 from T0 (2026-01-01T00:00:00Z)
    log.record.sync()
    keys, enrolment = tmp_path / "keys", tmp_path / "enrolment"
    key = tmp_path / "enrolment.key"
    made = gputally("enrolment", "init", f"--key={key}", "--name=auditor.example/enrolment")
    assert made.returncode == 0, made.stderr
    signed = gputally(
        "enrolment", "sign", f"--key={key}", f"--dir={enrolment}", "--node=n1",
        f"--public-key={keys / 'n1.pub'}", "--gpu=GPU-n1-0:1320000000001",
        "--at=2026-01-01T00:30:00Z",
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    anchors = [f"--enrolment={enrolment}", f"--enrolment-key={key}.vkey"]
    report = gputally(
        "audit", "report", f"--ledger={log.path}", f"--keys={keys}", *anchors,
        "--from=2026-01-01T00:00:00Z", "--to=2026-01-01T01:00:00Z", "--expected-gpus=1",
        f"--out={tmp_path / 'report'}",
    )  # fmt: skip
    # enrolled half an hour into the period: reported beside the figures, not a refusal
    assert report.returncode == 0, report.stdout + report.stderr
    # the key and the GPU, both enrolled half an hour in
    assert (
        "finding: 2 enrolled late (node n1: GPU GPU-n1-0 was first enrolled 2026-01-01T00:30:00Z"
        in report.stderr
    )
    assert "after the period began 2026-01-01T00:00:00Z" in report.stderr
    # enrolled before the period: nothing to say
    verify = gputally(
        "audit", "verify", f"--ledger={log.path}", f"--keys={keys}", *anchors,
        "--enrolled-by=2026-01-01T01:00:00Z",
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout
    # the same ledger under another node's record only: its key is not enrolled, and it fails
    other = tmp_path / "other-enrolment"
    gputally(
        "enrolment", "sign", f"--key={key}", f"--dir={other}", "--node=n2",
        f"--public-key={Path(keys / 'n1.pub').read_text().strip()}", "--gpu=GPU-n1-0",
        "--at=2025-12-01",
    )  # fmt: skip
    refused = gputally(
        "audit", "verify", f"--ledger={log.path}", f"--keys={keys}",
        f"--enrolment={other}", f"--enrolment-key={key}.vkey",
    )  # fmt: skip
    assert refused.returncode == FAILED
    assert "not enrolled: 1" in refused.stdout and "(it is enrolled for n2)" in refused.stdout


# -- what a hostile review found, each held to account --------------------------------------


def test_an_empty_or_unusable_against_is_an_error_not_an_anchor_turned_off(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.grow(4, checkpoint_at=T0 + 1260)
    log.record.sync()
    keys = tmp_path / "keys"
    (tmp_path / "empty.txt").write_text("\n")
    for against, says in (
        (str(tmp_path / "empty.txt"), "empty"),
        ("http://[::1", "--against"),
        (str(tmp_path / "missing.txt"), "missing.txt"),
    ):
        ran = gputally(
            "audit", "verify", f"--ledger={log.path}", f"--keys={keys}", f"--against={against}"
        )
        assert ran.returncode == USAGE and says in ran.stderr, ran.stderr
        assert "Traceback" not in ran.stderr and "anchored" not in ran.stdout


def test_a_checkpoint_of_another_key_or_origin_and_a_renamed_receipt_are_forks(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    log.grow(4, checkpoint_at=T0 + 1260)
    log.record.sync()
    keys = tmp_path / "keys"
    # the collector key was swapped: the checkpoint a tenant kept is not this log's
    other = sign_note(checkpoint_text(ORIGIN, 4, bytes(32)), ORIGIN, Ed25519PrivateKey.generate())
    result = verify_ledger(log.path, keys, anchors=Anchors(against=other))
    assert [p.kind for p in result.problems] == [FORK]
    # a receipt made for the log under another origin
    receipt = Receipt("example.org/the-real-log", 4, result.root, result.keys_digest, "t")
    found = verify_ledger(log.path, keys, receipt=receipt)
    assert [p.kind for p in found.problems] == [FORK]
    assert "is for the log example.org/the-real-log" in found.problems[0].message


def test_history_witnessed_before_its_windows_ended_is_an_integrity_finding(tmp_path: Path) -> None:
    log = Log(tmp_path)
    # the windows end at T0+300 .. T0+1200; the witness cosigns at T0 (before any ended)
    witness = WitnessServer(tmp_path, {ORIGIN: public_bytes(log.key)}, clock=T0)
    client = Witnesses(
        [Witness(WITNESS_NAME, public_bytes(witness.key), witness.url)],
        log.record,
        clock=lambda: witness.clock,
    )
    log.grow(4, checkpoint_at=T0 + 1260)
    client.submit(log.ledger.last_note, log.ledger.consistency)
    witness.stop()
    result = verify_ledger(
        log.path, tmp_path / "keys", anchors=Anchors(((WITNESS_NAME, public_bytes(witness.key)),))
    )
    assert [p.kind for p in result.problems] == [EARLY_WITNESSED] * 3  # the first ends at +300
    assert not result.trustworthy


def test_recording_before_the_windows_by_the_collectors_own_times_is_a_caveat(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    log.grow(12, checkpoint_at=T0 + 1800)  # half of the hour's windows end after that
    log.record.sync()
    ran = gputally(
        "audit", "report", f"--ledger={log.path}", f"--keys={tmp_path / 'keys'}",
        f"--from={T0:.0f}", f"--to={T0 + 3600:.0f}", "--expected-gpus=1", "--claim=0.4",
        f"--out={tmp_path / 'out'}",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["evidence"]["recording"]["early"] == 5  # ends at +2400 .. +3600, > 300 s ahead
    assert report["verdict"] == "supported" and "recorded before their" in report["verdict_caveat"]
    assert "NOT A PLAIN VERDICT" in ran.stdout
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Yes, but not a plain yes" in html and "centre&#x27;s word" in html


def test_rows_the_collector_never_writes_are_still_verified_and_counted_nowhere(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    log.grow(4, checkpoint_at=T0 + 1260)
    log.record.sync()
    keys = tmp_path / "keys"
    forged = pbm.SignedSummary(
        body=summary(T0, 300.0, 1.0, "n1").SerializeToString(), signature=bytes(64)
    )
    tampered = tmp_path / "tampered.db"
    shutil.copy(log.path, tampered)
    with sqlite3.connect(tampered) as connection:
        connection.execute(
            "INSERT INTO summaries (id, node, instance, seq, window_start_ns, window_end_ns,"
            " received, body, leaf) VALUES (-1, 'n1', 1, 99, 0, 1, 0, ?, x'00')",
            (forged.SerializeToString(),),
        )
    result = verify_ledger(tampered, keys)
    assert result.entries == 5 and not result.trustworthy
    assert result.problems[0].entry == -1
    census = gputally("audit", "census", f"--ledger={tampered}", f"--keys={keys}")
    assert census.returncode == FAILED and "Traceback" not in census.stderr


def test_the_census_reads_the_signed_windows_not_the_record_columns(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.grow(4, checkpoint_at=T0 + 1260)
    log.record.sync()
    keys = tmp_path / "keys"
    moved = tmp_path / "moved.db"
    shutil.copy(log.path, moved)
    with sqlite3.connect(moved) as connection:  # ten days later, by the unsigned columns
        connection.execute(
            "UPDATE summaries SET window_start_ns = window_start_ns + 864000000000000,"
            " window_end_ns = window_end_ns + 864000000000000"
        )
    for db, cards in ((log.path, "cards seen: 1"), (moved, "cards seen: 1")):
        ran = gputally(
            "audit", "census", f"--ledger={db}", f"--keys={keys}",
            f"--from={T0:.0f}", f"--to={T0 + 3600:.0f}",
        )  # fmt: skip
        assert ran.returncode == 0 and cards in ran.stdout, ran.stdout + ran.stderr
    later = gputally(
        "audit", "census", f"--ledger={moved}", f"--keys={keys}",
        f"--from={T0 + 9 * 86400:.0f}", f"--to={T0 + 11 * 86400:.0f}",
    )  # fmt: skip
    assert later.returncode == 0 and "cards seen: 0" in later.stdout, later.stdout


def test_a_stale_checkpoint_replayed_to_the_auditor_fails_with_max_age(tmp_path: Path) -> None:
    log, witness, _ = _witnessed_ledger(tmp_path)  # cosigned at the witness's clock, T0 + 1 h
    latest = (
        urllib.request.urlopen(f"{witness.url}/checkpoint?origin={ORIGIN}", timeout=10)
        .read()
        .decode()
    )
    witness.stop()
    keys = ((WITNESS_NAME, public_bytes(witness.key)),)
    fresh = Anchors(keys, 1, latest, max_age=600, now=T0 + 3600 + 300)
    assert verify_ledger(log.path, tmp_path / "keys", anchors=fresh).ok
    stale = Anchors(keys, 1, latest, max_age=600, now=T0 + 3 * 3600)
    result = verify_ledger(log.path, tmp_path / "keys", anchors=stale)
    assert [p.kind for p in result.problems] == [WITNESS] and "--max-age" in result.problems[
        0
    ].message


def test_altered_cosignature_and_checkpoint_rows_are_findings_not_tracebacks(
    tmp_path: Path,
) -> None:
    log, witness, _ = _witnessed_ledger(tmp_path)
    witness.stop()
    log.record.sync()
    keys = tmp_path / "keys"
    vkey = witness.vkey
    for change, kind in (
        ("INSERT INTO cosignatures (size, witness, line, timestamp) SELECT 0, witness, line,"
         " timestamp FROM cosignatures LIMIT 1", "witness"),
        ("UPDATE checkpoints SET size = 'x' WHERE id = 1", "checkpoint"),
    ):  # fmt: skip
        copy = tmp_path / "altered.db"
        shutil.copy(log.path, copy)
        with sqlite3.connect(copy) as connection:
            connection.execute(change)
        for command in ("verify", "report"):
            extra = (
                [f"--from={T0:.0f}", f"--to={T0 + 3600:.0f}", "--expected-gpus=1", f"--out={tmp_path / 'r'}"]
                if command == "report"
                else []
            )  # fmt: skip
            ran = gputally(
                "audit",
                command,
                f"--ledger={copy}",
                f"--keys={keys}",
                f"--witness-key={vkey}",
                *extra,
            )
            assert ran.returncode == FAILED and "Traceback" not in ran.stderr, ran.stderr
            assert kind in ran.stdout


def test_the_witness_refuses_a_tree_too_large_and_a_log_named_twice(tmp_path: Path) -> None:
    log = Log(tmp_path)
    witness = WitnessServer(tmp_path, {ORIGIN: public_bytes(log.key)})
    try:
        huge = sign_note(checkpoint_text(ORIGIN, 1 << 63, bytes(32)), ORIGIN, log.key)
        assert witness.post(add_checkpoint_body(0, [], huge))[:3:2] == (
            400,
            "a tree size is below 2^63\n",
        )
    finally:
        witness.stop()
    logs = tmp_path / "logs"
    line = collector_key_text(ORIGIN, public_bytes(log.key))
    logs.write_text(line + collector_key_text(ORIGIN, public_bytes(Ed25519PrivateKey.generate())))
    with pytest.raises(ValueError, match=r"line 2: the log .* has a key already"):
        read_logs(logs)


def test_a_tenants_proof_follows_the_signed_node_not_the_record_column(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.grow(4, checkpoint_at=T0 + 1260)
    log.record.sync()
    with sqlite3.connect(log.path) as connection:
        connection.execute("UPDATE summaries SET node = 'n2' WHERE id = 2")
    ran = gputally(
        "audit", "prove", f"--ledger={log.path}", f"--keys={tmp_path / 'keys'}", "--node=n1"
    )
    assert ran.returncode == 0, ran.stderr
    assert [i["index"] for i in json.loads(ran.stdout)["inclusions"]] == [0, 1, 2, 3]


def test_names_a_spreadsheet_would_run_are_quoted_in_the_csv_files(tmp_path: Path) -> None:
    log = Log(tmp_path)
    evil = '=HYPERLINK("http://evil.example/","Click")'
    log.grow(12, checkpoint_at=T0 + 3660, tenant=evil)
    log.record.sync()
    ran = gputally(
        "audit", "report", f"--ledger={log.path}", f"--keys={tmp_path / 'keys'}",
        f"--from={T0:.0f}", f"--to={T0 + 3600:.0f}", "--expected-gpus=1",
        f"--out={tmp_path / 'out'}",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    import csv

    with (tmp_path / "out" / "tenants.csv").open() as handle:
        names = [row["name"] for row in csv.DictReader(handle)]
    assert names == ["'" + evil]  # text, not a formula
    assert (
        json.loads((tmp_path / "out" / "report.json").read_text())["by_tenant"][0]["name"] == evil
    )


def test_gpus_the_auditor_never_enrolled_make_no_plain_yes(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.grow(12, checkpoint_at=T0 + 3660)
    log.record.sync()
    keys, enrolment, key = tmp_path / "keys", tmp_path / "enrolment", tmp_path / "e.key"
    assert gputally("enrolment", "init", f"--key={key}", "--name=auditor.example/e").returncode == 0
    signed = gputally(
        "enrolment", "sign", f"--key={key}", f"--dir={enrolment}", "--node=n1",
        f"--public-key={keys / 'n1.pub'}", "--gpu=GPU-n1-7", "--at=2025-12-01",
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    ran = gputally(
        "audit", "report", f"--ledger={log.path}", f"--keys={keys}", f"--enrolment={enrolment}",
        f"--enrolment-key={key}.vkey", f"--from={T0:.0f}", f"--to={T0 + 3600:.0f}",
        "--expected-gpus=1", "--claim=0.4", f"--out={tmp_path / 'out'}",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verdict"] == "supported"  # 50% busy >= 40%, but over a GPU nobody enrolled
    assert "GPU windows of GPUs no enrolment record lists" in report["verdict_caveat"]
    assert "Yes, but not a plain yes" in (tmp_path / "out" / "report.html").read_text()


class HostileWitness:
    """A witness that misbehaves on purpose, with a real witness key (so that its lines can
    verify): `mode` says how."""

    def __init__(self, mode: str, redirect_to: str = ""):
        import http.server
        import threading

        self.key = Ed25519PrivateKey.generate()
        self.mode, self.redirect_to = mode, redirect_to
        self.requests = 0
        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                hostile.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                _, _, note = parse_add_checkpoint(body)
                text, _ = split_note(note)
                if hostile.mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", hostile.redirect_to + "/add-checkpoint")
                    self.end_headers()
                    return
                if hostile.mode == "bad-size":
                    self.send_response(409)
                    self.send_header("Content-Type", SIZE_CONTENT_TYPE)
                    self.end_headers()
                    self.wfile.write(b"-5\n")
                    return
                when = int(time.time()) + (10 * 365 * 86400 if hostile.mode == "future" else 0)
                line = cosign(text, "hostile.example/w", hostile.key, when).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(line)))
                self.end_headers()
                if hostile.mode == "trickle":
                    for byte in line[:20]:  # a byte every 0.4 s: within each read's timeout
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.4)
                else:
                    self.wfile.write(line)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def witness(self) -> Witness:
        return Witness("hostile.example/w", public_bytes(self.key), self.url)

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_a_witness_that_trickles_its_answer_holds_up_neither_the_others_nor_the_collector(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    honest = WitnessServer(tmp_path, {ORIGIN: public_bytes(log.key)})
    slow = HostileWitness("trickle")
    try:
        client = Witnesses(
            [slow.witness(), Witness(WITNESS_NAME, public_bytes(honest.key), honest.url)],
            log.record,
            timeout=3.0,  # the slow answer needs 8 s; the honest one a few milliseconds
            clock=lambda: honest.clock,
        )
        log.grow(3)
        began = time.monotonic()
        client.submit(log.ledger.last_note, log.ledger.consistency, wait=0)
        assert time.monotonic() - began < 0.5  # the collector's loop is not held up
        deadline = time.monotonic() + 10
        while client.status[WITNESS_NAME].size < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.status[WITNESS_NAME].size == 3  # the honest one, in its own time
        # while the slow one is still answering, it is not asked again
        log.grow(1)
        assert client._busy == {"hostile.example/w"}
        client.submit(log.ledger.last_note, log.ledger.consistency, wait=3)
        assert client.status[WITNESS_NAME].size == 4
        # the slow answer took longer than one timeout in all: given up, as a failure
        deadline = time.monotonic() + 10
        while client._busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.status["hostile.example/w"].size == 0
        assert sum(client.status["hostile.example/w"].failures.values()) == 1
    finally:
        slow.stop()
        honest.stop()


@pytest.mark.parametrize("mode", ["future", "redirect", "bad-size"])
def test_what_a_hostile_witness_answers_is_never_kept(tmp_path: Path, mode: str) -> None:
    log = Log(tmp_path)
    elsewhere = HostileWitness("plain")  # where a redirect points: it must never be asked
    hostile = HostileWitness(mode, redirect_to=elsewhere.url)
    try:
        client = Witnesses([hostile.witness()], log.record, timeout=5)
        log.grow(3)
        client.submit(log.ledger.last_note, log.ledger.consistency)
        assert log.record.cosignatures() == []
        failures = client.status["hostile.example/w"].failures
        assert failures == {"http": 1} if mode == "redirect" else {"protocol": 1}, failures
        assert elsewhere.requests == 0
    finally:
        hostile.stop()
        elsewhere.stop()
