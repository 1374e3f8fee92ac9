"""Tamper evidence: every alteration of the ledger is caught by `audit verify`."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.collector.audit.verify import Receipt, ReceiptError, keys_digest, verify_ledger
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import COLLECTOR_KEY_FILE, CheckpointError, Ledger
from gputally.collector.record.merkle import leaf_hash
from gputally.collector.record.merkle import root as merkle_root
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import public_bytes, sign_summary

from . import factories
from .factories import empty_ledger, gputally_command, tick

T0 = int(factories.T0)  # whole seconds: the windows below are built in nanoseconds

NODES = ("n1", "n2", "n3")


def build(tmp_path: Path, windows: int = 4) -> tuple[Path, Path]:
    """A ledger of 3 nodes x `windows` signed summaries, checkpointed twice."""
    keys, store, record, ledger = empty_ledger(tmp_path)
    signers = {}
    for node in NODES:
        key = Ed25519PrivateKey.generate()
        signers[node] = SummarySigner(key, node)
        store.enroll(node, signers[node].public_key)
    for w in range(windows):
        for node in NODES:
            summary = pb.Summary(
                window_start_unix_nano=(T0 + 60 * w) * 10**9,
                window_end_unix_nano=(T0 + 60 * w + 60) * 10**9,
            )
            summary.gpus.add(
                index=0, uuid=f"GPU-{node}", present_seconds=60.0, busy_seconds=6.0 * (w + 1)
            )
            signed = signers[node].sign(summary)
            record.append(
                node,
                1,
                w + 1,
                summary.window_start_unix_nano,
                summary.window_end_unix_nano,
                0.0,
                signed.SerializeToString(),
            )
        if w in (1, windows - 1):
            assert ledger.checkpoint(float(T0 + w))
    record.close()
    return tmp_path / "ledger.db", keys


def rows(db: Path) -> list[tuple[int, str, bytes]]:
    with sqlite3.connect(db) as con:
        return [
            (int(i), str(n), bytes(b))
            for i, n, b in con.execute("SELECT id, node, body FROM summaries ORDER BY id")
        ]


def set_body(db: Path, entry: int, body: bytes, *, fix_leaf: bool) -> None:
    with sqlite3.connect(db) as con:
        if fix_leaf:  # a careful forger recomputes the derived column too
            con.execute(
                "UPDATE summaries SET body = ?, leaf = ? WHERE id = ?",
                (body, leaf_hash(body), entry),
            )
        else:
            con.execute("UPDATE summaries SET body = ? WHERE id = ?", (body, entry))


def test_an_untouched_ledger_verifies(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    result = verify_ledger(db, keys)
    assert result.ok, result.problems
    assert (result.entries, result.checkpoints, result.nodes) == (12, 2, set(NODES))


@pytest.mark.parametrize("fix_leaf", [False, True])
def test_any_single_changed_byte_in_a_summary_is_caught(tmp_path: Path, fix_leaf: bool) -> None:
    db, keys = build(tmp_path)
    entry, _, body = rows(db)[4]
    for position in range(len(body)):
        changed = bytearray(body)
        changed[position] ^= 0x01
        set_body(db, entry, bytes(changed), fix_leaf=fix_leaf)
        result = verify_ledger(db, keys)
        assert not result.ok, f"byte {position} changed unnoticed"
        assert result.problems[0].entry == entry or result.problems[0].entry is None
    set_body(db, entry, body, fix_leaf=True)
    assert verify_ledger(db, keys).ok  # and the original bytes verify again


def test_any_single_changed_byte_in_a_checkpoint_is_caught(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    with sqlite3.connect(db) as con:
        checkpoint_id, note = con.execute(
            "SELECT id, note FROM checkpoints ORDER BY id LIMIT 1"
        ).fetchone()
    raw = note.encode()
    for position in range(len(raw)):
        changed = bytearray(raw)
        changed[position] ^= 0x01
        try:
            text = changed.decode()
        except UnicodeDecodeError:
            continue  # not storable as TEXT; the note's bytes are UTF-8 by construction
        with sqlite3.connect(db) as con:
            con.execute("UPDATE checkpoints SET note = ? WHERE id = ?", (text, checkpoint_id))
        assert not verify_ledger(db, keys).ok, f"checkpoint byte {position} changed unnoticed"


def test_a_deleted_summary_is_caught_and_named(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    entry, node, _ = rows(db)[4]  # n2's second summary
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM summaries WHERE id = ?", (entry,))
    result = verify_ledger(db, keys)
    assert not result.ok
    assert result.problems[0].message == f"node {node}'s summaries 2 are missing before 3"


def test_a_replayed_summary_is_caught(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    _, node, body = rows(db)[1]
    with sqlite3.connect(db) as con:
        con.execute(
            "INSERT INTO summaries (node, instance, seq, window_start_ns, window_end_ns, received, body, leaf)"
            " VALUES (?, 9, 1, 0, 1, 0, ?, ?)",
            (node, body, leaf_hash(body)),
        )
    result = verify_ledger(db, keys)
    assert "comes after 4: replayed or reordered" in result.problems[0].message


def test_reordered_summaries_are_caught(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    first, second = rows(db)[0], rows(db)[3]  # n1's summaries 1 and 2
    set_body(db, first[0], second[2], fix_leaf=True)
    set_body(db, second[0], first[2], fix_leaf=True)
    result = verify_ledger(db, keys)
    assert result.problems[0].entry == first[0]
    assert "summaries 1 are missing before 2" in result.problems[0].message


def test_an_unenrolled_key_is_caught(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    (keys / "n3.pub").unlink()
    result = verify_ledger(db, keys)
    assert result.problems[0].message == "node n3 has no enrolled key"


def test_a_summary_signed_by_another_key_is_caught(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    entry, _, body = rows(db)[2]
    signed = pb.SignedSummary.FromString(body)
    signed.signature = sign_summary(Ed25519PrivateKey.generate(), signed.body)
    set_body(db, entry, signed.SerializeToString(), fix_leaf=True)
    assert verify_ledger(db, keys).problems[0].message == "the signature of node n3 does not verify"


def test_the_collector_will_not_sign_after_tampering(tmp_path: Path) -> None:
    db, _keys = build(tmp_path)
    entry, _, _body = rows(db)[0]
    other = rows(db)[3][2]
    set_body(db, entry, other, fix_leaf=True)
    ledger = Ledger(Record(db), Ed25519PrivateKey.generate(), "gputally/test")
    assert ledger.broken
    with pytest.raises(CheckpointError, match="no longer give the root"):
        ledger.checkpoint(0.0)


def test_audit_verify_command(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    command = gputally_command()
    ok = subprocess.run(
        [*command, "audit", "verify", f"--ledger={db}", f"--keys={keys}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "12 entries from 3 nodes, 2 checkpoints" in ok.stdout and "verified" in ok.stdout
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM summaries WHERE id = 7")
    bad = subprocess.run(
        [*command, "audit", "verify", f"--ledger={db}", f"--keys={keys}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "FAILED: 2 findings of 2 kinds\n  chain gap: 1\n" in bad.stdout
    assert "    entry 10: node n1's summaries 3 are missing before 4\n" in bad.stdout
    assert "  checkpoint: 1\n    log: checkpoint 2 (size 12): the ledger has only 11" in bad.stdout


def test_census_counts_cards_and_peak_throughput(tmp_path: Path) -> None:
    import json

    db, keys = build(tmp_path)
    command = gputally_command()
    out = subprocess.run(
        [*command, "audit", "census", f"--ledger={db}", f"--keys={keys}", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["cards"] == 3 and result["duplicates"] == []
    assert [c["uuid"] for c in result["inventory"]] == ["GPU-n1", "GPU-n2", "GPU-n3"]
    assert result["inventory"][0]["gpu_hours"] == pytest.approx(4 * 60 / 3600)


def test_census_flags_one_card_claimed_by_two_nodes() -> None:
    from gputally.collector.audit.census import PEAK_BF16_TFLOPS, Card, census

    h100 = "NVIDIA H100 80GB HBM3"
    cards = {
        "GPU-a": Card(
            "GPU-a", "S1", h100, {"n1": (0.0, 100.0), "n2": (50.0, 150.0)}
        ),  # at once: impossible
        "GPU-b": Card("GPU-b", "S2", h100, {"n1": (0.0, 100.0), "n3": (200.0, 300.0)}),  # moved
        "GPU-c": Card("GPU-c", "S2", h100, {"n4": (0.0, 100.0)}),  # reuses GPU-b's serial
        "GPU-d": Card("GPU-d", "S4", "NVIDIA A100-SXM4-80GB", {"n5": (0.0, 100.0)}),
    }
    result = census(cards)
    kinds = sorted(d["kind"] for d in result["duplicates"])
    assert kinds == [
        "claimed by two nodes at once",
        "moved between nodes",
        "one serial under several UUIDs",
    ]
    assert result["total_peak_bf16_pflops"] == pytest.approx(
        (3 * PEAK_BF16_TFLOPS[h100] + 312.0) / 1000
    )


def test_parallel_verification_agrees_with_the_in_process_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gputally.collector.audit import verify as audit

    db, keys = build(tmp_path, windows=6)
    monkeypatch.setattr(audit, "_CHUNK", 4)  # 18 entries: several batches, through worker processes
    assert verify_ledger(db, keys, workers=2).ok
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM summaries WHERE id = 8")
    parallel, serial = verify_ledger(db, keys, workers=2), verify_ledger(db, keys, workers=1)
    assert [(p.entry, p.message) for p in parallel.problems] == [
        (p.entry, p.message) for p in serial.problems
    ]
    assert parallel.problems[0].message == "node n2's summaries 3 are missing before 4"


def test_the_checkpoint_key_is_published_even_when_the_key_directory_is_read_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gputally.collector.record.ledger import collector_key_text, publish_collector_key

    keys, state = tmp_path / "keys", tmp_path / "state"
    keys.mkdir()
    state.mkdir()
    *_, ledger = empty_ledger(tmp_path / "elsewhere")
    text = collector_key_text(ledger.origin, public_bytes(ledger.key))
    publish_collector_key(ledger, keys, state)
    assert (keys / COLLECTOR_KEY_FILE).read_text() == text and not (
        state / COLLECTOR_KEY_FILE
    ).exists()
    # a key directory that cannot take the file (a ConfigMap, /etc under ProtectSystem=strict):
    # simulated with a directory in the file's place, since tests may run as root
    other = tmp_path / "readonly"
    (other / COLLECTOR_KEY_FILE).mkdir(parents=True)
    with caplog.at_level("INFO", logger="gputally.collector"):
        publish_collector_key(ledger, other, state)
    assert (state / COLLECTOR_KEY_FILE).read_text() == text
    assert "copy the checkpoint key into it for auditors" in caplog.text

    # another ledger's key published there (a second collector's, or before a rotation) is
    # replaced, and the log says which key it was: its checkpoints need it to be checked
    caplog.clear()
    (keys / COLLECTOR_KEY_FILE).write_text("gputally/other+01234567+AQ==\n")
    with caplog.at_level("WARNING", logger="gputally.collector"):
        publish_collector_key(ledger, keys, state)
    assert (keys / COLLECTOR_KEY_FILE).read_text() == text
    assert [r.getMessage() for r in caplog.records] == [
        "replaced a published checkpoint key that named another key"
    ]
    assert caplog.records[0].kv["was"] == "gputally/other+01234567+AQ=="  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gputally.collector"):
        publish_collector_key(ledger, keys, state)  # its own key again: nothing to say
    assert not caplog.records
    # the same key copied in by hand without its line ending: left as it is, nothing said,
    # and not published elsewhere as if the directory could not take it
    (keys / COLLECTOR_KEY_FILE).write_text(text.strip())
    (state / COLLECTOR_KEY_FILE).unlink()
    with caplog.at_level("INFO", logger="gputally.collector"):
        publish_collector_key(ledger, keys, state)
    assert (keys / COLLECTOR_KEY_FILE).read_text() == text.strip()
    assert not caplog.records and not (state / COLLECTOR_KEY_FILE).exists()
    assert sorted(p.name for p in keys.iterdir()) == [COLLECTOR_KEY_FILE]  # no temporary left


def rotated(tmp_path: Path, *, late_old_key: bool) -> tuple[Path, Path]:
    """Node n1 signs two summaries with its first key, is reinstalled (a new key, enrolled
    with --rotate, starting a new chain), signs two more; optionally its old key then signs
    one more."""
    keys, store, record, ledger = empty_ledger(tmp_path)
    old = SummarySigner(Ed25519PrivateKey.generate(), "n1")
    new = SummarySigner(Ed25519PrivateKey.generate(), "n1")
    store.enroll("n1", old.public_key)
    store.enroll("n1", new.public_key, rotate=True)
    signers = [old, old, new, new] + ([old] if late_old_key else [])
    for w, signer in enumerate(signers):
        summary = pb.Summary(
            window_start_unix_nano=(T0 + 60 * w) * 10**9,
            window_end_unix_nano=(T0 + 60 * w + 60) * 10**9,
        )
        summary.gpus.add(index=0, uuid="GPU-n1", present_seconds=60.0, busy_seconds=30.0)
        signed = signer.sign(summary)
        record.append(
            "n1",
            1 if signer is old else 2,
            w + 1,
            summary.window_start_unix_nano,
            summary.window_end_unix_nano,
            0.0,
            signed.SerializeToString(),
        )
    assert ledger.checkpoint(float(T0 + 600))
    record.close()
    return tmp_path / "ledger.db", keys


def test_a_rotated_key_starts_a_new_chain_and_the_old_one_still_verifies(tmp_path: Path) -> None:
    db, keys = rotated(tmp_path, late_old_key=False)
    result = verify_ledger(db, keys)
    assert result.ok, result.problems
    assert result.entries == 4


def test_a_retired_key_cannot_sign_after_the_rotation(tmp_path: Path) -> None:
    db, keys = rotated(tmp_path, late_old_key=True)
    result = verify_ledger(db, keys)
    assert [(p.entry, p.message) for p in result.problems] == [
        (5, "node n1's summary is signed with a key it had retired (key 1)")
    ]


# -- receipts: a full verification's record, so that a report need not check signatures again


def _prefix_receipt(db: Path, keys: Path, size: int) -> Receipt:
    """The receipt a full verification of the ledger's first `size` entries would have left."""
    leaves = [leaf_hash(body) for _, _, body in rows(db)[:size]]
    return Receipt("gputally/test", size, merkle_root(leaves), keys_digest(keys), "earlier")


def test_a_receipt_spares_the_signatures_it_covers_and_no_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gputally.collector.audit import verify as audit

    db, keys = build(tmp_path)
    full = verify_ledger(db, keys)
    assert full.ok and full.trusted == 0
    receipt = Receipt.of(full, "now")
    assert (receipt.size, receipt.root) == (12, merkle_root([leaf_hash(b) for *_, b in rows(db)]))
    assert Receipt.load(_written(tmp_path / "r.json", receipt)) == receipt

    from gputally.v1.signing import verify_summary as real_verify

    checked: list[bytes] = []

    def counting(key: bytes, body: bytes, signature: bytes) -> bool:
        checked.append(body)
        return real_verify(key, body, signature)

    monkeypatch.setattr(audit, "verify_summary", counting)
    monkeypatch.setattr(audit, "_CHUNK", 4)  # the receipt's edge falls inside a batch
    assert verify_ledger(db, keys, workers=1, receipt=receipt).trusted == 12
    assert checked == []
    partial = verify_ledger(db, keys, workers=1, receipt=_prefix_receipt(db, keys, 6))
    assert partial.ok and partial.trusted == 6
    assert len(checked) == 6  # entries 7..12, every one of them


def test_a_receipt_never_hides_a_change(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    receipt = Receipt.of(verify_ledger(db, keys), "now")
    entry, _, body = rows(db)[4]
    signed = pb.SignedSummary.FromString(body)
    signed.signature = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    set_body(db, entry, signed.SerializeToString(), fix_leaf=True)  # the leaf hash made to match
    result = verify_ledger(db, keys, receipt=receipt)
    # not the same bytes as the receipt's: every signature checked again, the forgery named
    assert result.trusted == 0 and "not those the receipt was made from" in result.receipt_note
    assert (result.problems[0].entry, result.problems[0].message) == (
        entry,
        "the signature of node n2 does not verify",
    )
    # after the receipt's entries, a bad signature is checked and named as well
    assert verify_ledger(db, keys, receipt=_prefix_receipt(db, keys, 4)).problems[0].entry == entry


def test_a_receipt_holds_only_for_its_keys_and_log(tmp_path: Path) -> None:
    db, keys = build(tmp_path)
    receipt = Receipt.of(verify_ledger(db, keys), "now")
    other = Receipt("gputally/elsewhere", receipt.size, receipt.root, receipt.keys_digest, "")
    assert verify_ledger(db, keys, receipt=other).receipt_note == (
        "the receipt is for the log gputally/elsewhere, not gputally/test"
    )
    longer = Receipt(receipt.origin, 13, receipt.root, receipt.keys_digest, "")
    assert verify_ledger(db, keys, receipt=longer).receipt_note == (
        "the receipt covers 13 entries, the ledger holds 12"
    )
    KeyStore(keys).enroll("n9", Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    changed = verify_ledger(db, keys, receipt=receipt)
    assert changed.ok and changed.trusted == 0
    assert changed.receipt_note == "the key directory is not the one the receipt was made with"
    # a receipt comes only from a full verification that holds
    trusting = verify_ledger(db, keys, receipt=Receipt.of(changed, "now"))
    assert trusting.ok and trusting.trusted == 12
    with pytest.raises(ReceiptError):
        Receipt.of(trusting, "later")
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM summaries WHERE id = 7")
    with pytest.raises(ReceiptError):
        Receipt.of(verify_ledger(db, keys), "later")


def _written(path: Path, receipt: Receipt) -> Path:
    path.write_text(receipt.dumps())
    return path


def test_audit_report_with_a_receipt_gives_the_same_report(tmp_path: Path) -> None:
    import json

    db, keys = build(tmp_path)
    command = gputally_command()

    def gputally(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "audit", *args, f"--ledger={db}", f"--keys={keys}"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    receipt = tmp_path / "receipt.json"
    made = gputally("verify", f"--receipt={receipt}")
    assert made.returncode == 0 and f"receipt: {receipt} (size 12," in made.stdout
    period = ["--from=2026-01-01", "--to=2026-01-02", "--expected-gpus=3", "--claim=0.1"]
    reports = {}
    for name, extra in (("full", []), ("receipt", [f"--receipt={receipt}"])):
        ran = gputally("report", *period, f"--out={tmp_path / name}", *extra)
        assert ran.returncode == 0, ran.stderr
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    full, by_receipt = reports["full"], reports["receipt"]
    assert by_receipt["verification"]["signatures_by_receipt"] == 12
    assert full["verification"]["signatures_by_receipt"] == 0
    for report in (full, by_receipt):
        report["verification"].pop("signatures_by_receipt")
        report["verification"].pop("receipt_verified_at")
        report["evidence"].pop("command")  # the runs differ in --out and --receipt, by design
    assert full == by_receipt and full["figure"] > 0
    html = (tmp_path / "receipt" / "report.html").read_text()
    assert "The signatures of the first 12 summaries were checked by the full verification" in html
    receipt.write_text("{not json")
    broken = gputally("report", *period, f"--out={tmp_path / 'x'}", f"--receipt={receipt}")
    assert broken.returncode != 0 and "not a usable receipt" in broken.stderr


def test_audit_prove_gives_proofs_any_rfc9162_verifier_accepts(tmp_path: Path) -> None:
    """Inclusion of an entry and consistency with an earlier checkpoint, against the newest
    signed checkpoint; checked here with the tree recomputed from the stored bytes."""
    import base64
    import json

    from gputally.collector.record.merkle import ProofError, verify_consistency, verify_inclusion

    db, keys = build(tmp_path)  # 12 entries, checkpoints at 6 and 12
    leaves = [leaf_hash(body) for *_, body in rows(db)]
    command = gputally_command()
    done = subprocess.run(
        [*command, "audit", "prove", f"--ledger={db}", f"--keys={keys}", "--entry=5", "--since=6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    root = base64.b64decode(answer["root"])
    assert answer["size"] == 12 and root == merkle_root(leaves)
    assert answer["checkpoint"].startswith("gputally/test\n12\n" + answer["root"] + "\n")
    inclusion = answer["inclusion"]
    assert (inclusion["entry"], inclusion["index"]) == (5, 4)
    path = [base64.b64decode(h) for h in inclusion["proof"]]
    verify_inclusion(leaves[4], 4, 12, path, root)
    with pytest.raises(ProofError):
        verify_inclusion(leaves[5], 4, 12, path, root)
    consistency = answer["consistency"]
    older = base64.b64decode(consistency["root"])
    assert consistency["size"] == 6 and older == merkle_root(leaves[:6])
    verify_consistency(6, 12, older, root, [base64.b64decode(h) for h in consistency["proof"]])
    for args, message in (
        (["--entry=13"], "entry 13 is not among the 12 the checkpoint signs"),
        (["--since=13"], "--since 13: the checkpoint signs 1..12 entries"),
        ([], "give --entry ID, --node NODE, --since SIZE, or several"),
    ):
        refused = subprocess.run(
            [*command, "audit", "prove", f"--ledger={db}", f"--keys={keys}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    set_body(db, 3, rows(db)[2][2] + b"x", fix_leaf=True)  # a forger's entry: no proof on it
    refused = subprocess.run(
        [*command, "audit", "prove", f"--ledger={db}", f"--keys={keys}", "--since=6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # the ledger does not hold what its checkpoint signs: the answer is no (1), not bad input
    assert refused.returncode == 1 and "do not give the root signed at size 12" in refused.stderr


def test_an_entry_of_the_wrong_type_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """SQLite lets any column hold text: an edited row is caught by the checks on its bytes,
    and the commands that read the record say so in one line."""
    db, keys = build(tmp_path)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE summaries SET body = 'hello' WHERE id = 5")
    result = verify_ledger(db, keys)
    assert not result.ok and result.problems[0].entry == 5
    assert "leaf hash is not the hash of its bytes" in result.problems[0].message
    command = gputally_command()
    query = subprocess.run(
        [*command, "query", f"--db={db}", "--expected-gpus=3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert query.returncode == 2 and "Traceback" not in query.stderr
    assert "holds an entry that is not a summary: the record is damaged" in query.stderr


# -- provenance ------------------------------------------------------------------------------


def test_summaries_sign_the_backend_they_were_measured_with() -> None:
    node = factories.mock_node(
        '[cluster]\nnodes = 1\ngpus_per_node = 1\n[[workload]]\nshare = 1.0\nkind = "training"\n',
        start=factories.T0,
        summary_window=10.0,
    )
    signed = []
    for _ in range(12):
        node.clock.advance(1.0)
        report = tick(node.sampler)
        if report.HasField("summary"):
            signed.append(report.summary)
    node.close()
    summary = pb.Summary.FromString(signed[0].body)
    # in the signed body: the collector, and an auditor, read it where the numbers are
    assert (summary.backend, summary.driver_version) == ("mock", "580.95.05")


def test_figures_over_simulated_summaries_say_so_first_and_count_each_backend() -> None:
    from gputally.collector.audit.figures import as_dict, compute, render_text

    def row(node: str, backend: str) -> tuple[str, bytes]:
        s = factories.summary(factories.T0, 3600.0, 0.5, node)
        s.backend = backend
        return node, factories.envelope(s)

    rows = [row("n1", "mock"), row("n2", "nvml"), row("n3", "")]
    answer = as_dict(compute(rows, factories.T0, factories.T0 + 3600, 3), "busy", 0.4)
    assert answer["backends"] == {"mock": 1, "nvml": 1, "unknown": 1}
    assert answer["simulated"] == 1
    first = render_text(answer).splitlines()[0]
    assert first == (
        "SIMULATED DATA: 1 of the 3 summaries of this period come from the mock backend "
        "(gputally simulate or --backend mock), not from GPUs"
    )
    real = as_dict(compute(rows[1:], factories.T0, factories.T0 + 3600, 2), "busy", 0.4)
    assert real["simulated"] == 0 and "SIMULATED" not in render_text(real)
