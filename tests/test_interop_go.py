"""Interoperability: the ledger's checkpoints, roots and proofs, checked by an implementation
that is not ours.

golang.org/x/mod's sumdb/note and sumdb/tlog (the Go module database's own code, from Debian)
verify the checkpoint notes with the published collector.vkey, rebuild the tree from the
stored entries, and check `gputally audit prove`'s answers (tests/interop/tlogcheck). A bug
shared by our writer and our verifier passes every other test; here it fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.collector.audit.verify import verify_ledger
from gputally.collector.record import merkle
from gputally.collector.record.ledger import (
    COLLECTOR_KEY_FILE,
    CheckpointError,
    checkpoint_text,
    key_id,
    open_note,
    sign_note,
    verifier_key,
)
from gputally.collector.record.store import Record
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import public_bytes

from .conftest import IN_CI
from .factories import T0, empty_ledger, gputally_command

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "interop" / "tlogcheck"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go sources
XMOD = GOPATH / "src" / "golang.org" / "x" / "mod" / "sumdb"
ORIGIN = "example.org/gputally-interop"
NODES = ("n1", "n2", "n3", "n4", "n5")
WINDOWS = 5  # 25 entries
CHECKPOINTS = (1, 7, 16, 25)  # sizes signed: one leaf, odd sizes, a power of two, the whole log


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go checker, built offline from Debian's golang.org/x/mod sources."""
    go = shutil.which("go")
    if go is None or not (XMOD / "note").is_dir() or not (XMOD / "tlog").is_dir():
        message = (
            "Go and golang.org/x/mod are needed for the interoperability test "
            f"(go on PATH, {XMOD}); Debian: apt-get install golang-go golang-golang-x-mod-dev"
        )
        if IN_CI:
            pytest.fail(f"{message}; CI must have them, see .ci/run")
        pytest.skip(message)
    work = tmp_path_factory.mktemp("tlogcheck")
    env = {
        **os.environ,
        "GO111MODULE": "off",  # GOPATH mode: x/mod from Debian's tree, nothing downloaded
        "GOPATH": str(GOPATH),
        "GOCACHE": str(work / "cache"),  # writable whoever runs the tests
        "HOME": str(work),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",  # pure Go: no C compiler needed
    }
    binary = work / "tlogcheck"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],  # GOPATH mode refuses absolute paths
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=SOURCE,
    )
    assert built.returncode == 0, built.stderr
    return binary


def run_go(binary: Path, request: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [str(binary)], input=json.dumps(request), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


@dataclass
class Log:
    db: Path
    keys: Path
    vkey: str  # collector.vkey as published
    key: Ed25519PrivateKey  # the collector's checkpoint key
    ids: list[int]
    bodies: list[bytes]  # the entries' stored bytes, in log order
    stored_leaves: list[bytes]  # the record's leaf column
    notes: list[tuple[int, bytes, str]]  # (size, root, note) of each checkpoint, as stored

    def leaves(self) -> list[bytes]:
        return [merkle.leaf_hash(body) for body in self.bodies]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    """A real ledger: five nodes' signed, chained summaries, checkpointed at CHECKPOINTS."""
    tmp = tmp_path_factory.mktemp("interop")
    keys, store, record, ledger = empty_ledger(tmp, origin=ORIGIN)
    signers = {node: SummarySigner(Ed25519PrivateKey.generate(), node) for node in NODES}
    for node, signer in signers.items():
        store.enroll(node, signer.public_key)
    appended = 0
    for w in range(WINDOWS):
        for node in NODES:
            summary = pb.Summary(
                window_start_unix_nano=int(T0 + 60 * w) * 10**9,
                window_end_unix_nano=int(T0 + 60 * w + 60) * 10**9,
            )
            summary.gpus.add(
                index=0, uuid=f"GPU-{node}", present_seconds=60.0, busy_seconds=3.0 * (w + 1)
            )
            signed = signers[node].sign(summary)
            assert record.append(
                node,
                1,
                w + 1,
                summary.window_start_unix_nano,
                summary.window_end_unix_nano,
                T0 + 60 * w + 61,
                signed.SerializeToString(),
            )
            appended += 1
            if appended in CHECKPOINTS:
                assert ledger.checkpoint(T0 + appended)
    record.close()
    db = tmp / "ledger.db"
    assert verify_ledger(db, keys).ok  # a ledger our own auditor accepts, to begin with
    stored = Record(db, readonly=True)
    try:
        entries = list(stored.entries())
        checkpoints = [(size, root, note) for _, size, root, note in stored.checkpoints()]
    finally:
        stored.close()
    assert [size for size, *_ in checkpoints] == list(CHECKPOINTS)
    return Log(
        db=db,
        keys=keys,
        vkey=(keys / COLLECTOR_KEY_FILE).read_text(),
        key=ledger.key,
        ids=[row_id for row_id, *_ in entries],
        bodies=[body for _, _, body, _ in entries],
        stored_leaves=[leaf for *_, leaf in entries],
        notes=checkpoints,
    )


def prove(log: Log, entry: int, since: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            *gputally_command(),
            "audit",
            "prove",
            f"--ledger={log.db}",
            f"--keys={log.keys}",
            f"--entry={entry}",
            f"--since={since}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def check(binary: Path, log: Log, **request: Any) -> dict[str, Any]:
    """Go's answer, with the published key and the log's entries unless the request overrides them."""
    return run_go(binary, {"vkey": log.vkey, "leaves": [b64(b) for b in log.bodies], **request})


# -- checkpoints and roots -------------------------------------------------------------------


def test_go_verifies_every_checkpoint_with_the_published_key(tlogcheck: Path, log: Log) -> None:
    assert log.vkey == verifier_key(ORIGIN, public_bytes(log.key)) + "\n"
    answer = check(tlogcheck, log, notes=[note for *_, note in log.notes])
    assert len(answer["notes"]) == len(CHECKPOINTS)
    for (size, root, note), opened in zip(log.notes, answer["notes"], strict=True):
        assert opened["verified"] and "error" not in opened, opened
        assert (opened["origin"], opened["size"], opened["root"]) == (ORIGIN, size, b64(root))
        assert opened["text"] == checkpoint_text(ORIGIN, size, root)
        assert note.startswith(opened["text"] + "\n\u2014 ")


def test_go_rebuilds_the_same_tree_at_every_size(tlogcheck: Path, log: Log) -> None:
    answer = check(tlogcheck, log, notes=[note for *_, note in log.notes])
    leaves = log.leaves()
    assert answer["record_hashes"] == [b64(h) for h in leaves]
    assert leaves == log.stored_leaves
    assert answer["roots"] == [b64(merkle.root(leaves[:n])) for n in range(1, len(leaves) + 1)]
    for (size, root, _), opened in zip(log.notes, answer["notes"], strict=True):
        assert answer["roots"][size - 1] == opened["root"] == b64(root)


# -- audit prove's answers -------------------------------------------------------------------


PROOFS = ((0, 1), (6, 7), (9, 10), (15, 16), (24, 25), (12, 3))  # (entry's index, --since)


@pytest.fixture(scope="module")
def proofs(log: Log) -> list[dict[str, Any]]:
    """What `gputally audit prove` prints, for several entries and earlier sizes."""
    return [prove(log, log.ids[index], since) for index, since in PROOFS]


def test_audit_prove_answers_verify_in_go(
    tlogcheck: Path, log: Log, proofs: list[dict[str, Any]]
) -> None:
    answer = check(tlogcheck, log, proofs=proofs)
    signed = {size: b64(root) for size, root, _ in log.notes}
    for (index, since), asked, checked in zip(PROOFS, proofs, answer["proofs"], strict=True):
        assert checked["checkpoint"]["verified"], checked
        assert checked["checkpoint"]["size"] == len(log.bodies) and checked["agrees"]
        assert checked["inclusion"] == "verified", (index, checked)
        assert checked["consistency"] == "verified", (since, checked)
        assert asked["inclusion"]["index"] == index
        assert asked["inclusion"]["leaf_hash"] == answer["record_hashes"][index]
        # The older root is the one Go computes, and the one signed when that size was.
        assert asked["consistency"]["root"] == answer["roots"][since - 1]
        assert asked["consistency"]["root"] == signed.get(since, asked["consistency"]["root"])


# -- negative controls: what Go must reject, so that the checks above can fail ---------------


def flip(encoded: str) -> str:
    """The base64 hash with one bit of its first byte changed."""
    raw = bytearray(base64.b64decode(encoded))
    raw[0] ^= 1
    return b64(bytes(raw))


def test_go_rejects_a_note_with_one_changed_byte(tlogcheck: Path, log: Log) -> None:
    """Every single-character change of a checkpoint note: Go rejects it, or reads the very
    same text and signature bytes from it (Go's base64 decoder ignores the unused low bits of
    a last character). Our open_note rejects every one: it wants canonical base64."""
    size, root, note = log.notes[-1]
    text = checkpoint_text(ORIGIN, size, root)
    mutants = [note[:i] + chr(ord(c) ^ 1) + note[i + 1 :] for i, c in enumerate(note)]
    # A changed root, in its own alphabet; and the signature's last character with a low bit
    # set that base64 decoders may ignore (68 bytes: the last character carries 4 bits).
    at = len(ORIGIN) + len(str(size)) + 2
    mutants.append(note[:at] + ("B" if note[at] != "B" else "C") + note[at + 1 :])
    assert note.endswith("=\n")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(note[-3]) | 1]
    mutants.append(note[:-3] + last + "=\n")
    answer = check(tlogcheck, log, notes=mutants)
    signature = base64.b64decode(note.rsplit(" ", 1)[1])
    for i, (mutant, opened) in enumerate(zip(mutants, answer["notes"], strict=True)):
        assert mutant != note
        with pytest.raises(CheckpointError):
            open_note(mutant, ORIGIN, public_bytes(log.key))
        if opened["verified"]:
            # Only the signature's last character (before "=\n"), whose low bits carry nothing.
            assert mutant[:-3] == note[:-3] and opened["text"] == text, (i, mutant)
            assert base64.b64decode(mutant.rsplit(" ", 1)[1]) == signature
        else:
            assert opened["error"], opened
    assert not answer["notes"][-2]["verified"]  # the root changed: the signature fails


def test_go_rejects_the_notes_under_a_wrong_key(tlogcheck: Path, log: Log) -> None:
    impostor = public_bytes(Ed25519PrivateKey.generate())
    notes = [note for *_, note in log.notes]
    for vkey in (
        verifier_key(ORIGIN, impostor),  # another key of the same name
        verifier_key("example.org/another-log", public_bytes(log.key)),  # the key, renamed
    ):
        answer = check(tlogcheck, log, vkey=vkey, notes=notes)
        assert not any(opened["verified"] for opened in answer["notes"]), answer["notes"]
    # A malformed key is an input error, said in one line.
    name, key_hash, _ = log.vkey.strip().split("+", 2)
    other = b64(b"\x01" + impostor)
    for bad in (f"{name}+{key_hash}+{other}", f"{name}+{key_hash}", "x"):
        done = subprocess.run(
            [str(tlogcheck)],
            input=json.dumps({"vkey": bad}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("tlogcheck: vkey:")


def test_go_rejects_tampered_proofs(
    tlogcheck: Path, log: Log, proofs: list[dict[str, Any]]
) -> None:
    """Each change to a proof alone: tlog rejects that proof and still accepts the other. Go
    is given no entries here, only the answers, so that tlog's checks alone decide."""
    good = proofs[2]  # entry index 9, since 10: both proofs have several hashes

    tampered: list[dict[str, Any]] = []

    def change(part: str) -> dict[str, Any]:
        """A copy of the good answer, listed as tampered, whose `part` the caller edits."""
        bad: dict[str, Any] = json.loads(json.dumps(good))
        tampered.append(bad)
        edited: dict[str, Any] = bad[part]
        return edited

    for part in ("inclusion", "consistency"):
        for i in range(len(good[part]["proof"])):
            change(part)["proof"][i] = flip(good[part]["proof"][i])
        change(part)["proof"].pop()  # a hash short
        change(part)["proof"].append(good[part]["proof"][0])  # a hash too many
    change("inclusion")["index"] += 1  # another position
    change("inclusion")["leaf_hash"] = b64(log.leaves()[10])  # another entry
    change("consistency")["size"] += 1  # another older size
    change("consistency")["root"] = flip(good["consistency"]["root"])
    answer = check(tlogcheck, log, leaves=[], proofs=[good, *tampered])
    assert answer["proofs"][0]["inclusion"] == answer["proofs"][0]["consistency"] == "verified"
    assert len(tampered) > 10
    for bad, checked in zip(tampered, answer["proofs"][1:], strict=True):
        assert bad != good and checked["checkpoint"]["verified"] and checked["agrees"]
        for part in ("inclusion", "consistency"):
            assert (checked[part] == "verified") == (bad[part] == good[part]), (part, bad)
    # Given the entries, Go hashes the entry itself: one changed byte in it, and the answer's
    # leaf hash is not that entry's.
    bodies = list(log.bodies)
    bodies[9] = bodies[9][:-1] + bytes([bodies[9][-1] ^ 1])
    answer = check(tlogcheck, log, leaves=[b64(b) for b in bodies], proofs=[good])
    assert "not tlog.RecordHash" in answer["proofs"][0]["inclusion"]
    assert answer["proofs"][0]["consistency"] == "verified"
    # The same proofs under a checkpoint signed by another key: nothing verifies.
    forged = json.loads(json.dumps(good))
    size, root, _ = log.notes[-1]
    forged["checkpoint"] = sign_note(
        checkpoint_text(ORIGIN, size, root), ORIGIN, Ed25519PrivateKey.generate()
    )
    answer = check(tlogcheck, log, leaves=[], proofs=[forged])
    assert not answer["proofs"][0]["checkpoint"]["verified"]
    assert answer["proofs"][0]["inclusion"].startswith("checkpoint: ")
    assert answer["proofs"][0]["consistency"].startswith("checkpoint: ")
    # A hash that is not 32 bytes is an input error.
    broken = json.loads(json.dumps(good))
    broken["inclusion"]["proof"][0] = b64(b"short")
    done = subprocess.run(
        [str(tlogcheck)],
        input=json.dumps({"vkey": log.vkey, "proofs": [broken]}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


# -- the signed-note format itself -----------------------------------------------------------


def test_notes_with_blank_lines_split_at_the_last_one_in_go_and_here(
    tlogcheck: Path, log: Log
) -> None:
    """A signed note's text may hold blank lines: the signatures follow the last one. Go's
    note.Open and our open_note read the same text from such notes, and Go's note.Sign,
    given the same key, writes byte for byte the notes our sign_note writes."""
    size, root, _ = log.notes[-1]
    plain = checkpoint_text(ORIGIN, size, root)
    texts = [plain, plain + "\nan extension after a blank line\n", plain + "\n", plain + "\n\n"]
    ours = [sign_note(text, ORIGIN, log.key) for text in texts]
    # Go's signer key: the key id and 0x01 followed by the Ed25519 seed, as note.GenerateKey writes.
    seed = b64(b"\x01" + log.key.private_bytes_raw())
    skey = f"PRIVATE+KEY+{ORIGIN}+{key_id(ORIGIN, public_bytes(log.key)).hex()}+{seed}"
    answer = check(tlogcheck, log, notes=ours, skey=skey, texts=texts)
    assert answer["signed"] == ours
    for text, note, opened in zip(texts, ours, answer["notes"], strict=True):
        assert opened["verified"] and opened["text"] == text, (text, opened)
        assert (opened["origin"], opened["size"], opened["root"]) == (ORIGIN, size, b64(root))
        assert open_note(note, ORIGIN, public_bytes(log.key)) == (ORIGIN, size, root)


def test_a_tenants_proof_against_a_checkpoint_it_holds_verifies_in_go(
    tlogcheck: Path, log: Log, tmp_path: Path
) -> None:
    """`audit prove --checkpoint FILE --node NODE`: every entry of one node is in the (older)
    checkpoint a tenant kept, and the newest extends it; Go checks each proof."""
    size, _, note = log.notes[1]  # an older checkpoint, not the newest
    held = tmp_path / "held.checkpoint"
    held.write_text(note)
    done = subprocess.run(
        [*gputally_command(), "audit", "prove", f"--ledger={log.db}", f"--keys={log.keys}",
         f"--checkpoint={held}", f"--node={NODES[1]}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["size"] == size and answer["checkpoint"] == note
    inclusions = answer["inclusions"]
    # the node's entries among the first `size`, in log order, each with its index
    expected = [i for i in range(size) if i % len(NODES) == 1]
    assert [inc["index"] for inc in inclusions] == expected
    requests = [
        {"checkpoint": note, "size": size, "root": answer["root"], "inclusion": inc}
        for inc in inclusions
    ]
    checked = check(tlogcheck, log, proofs=requests)
    assert [c["inclusion"] for c in checked["proofs"]] == ["verified"] * len(expected)
    assert all(c["checkpoint"]["verified"] and c["agrees"] for c in checked["proofs"])
    # a checkpoint of more entries than the ledger holds is refused in one line
    forged = held.read_text().replace(f"\n{size}\n", f"\n{size + 10**6}\n")
    held.write_text(forged)
    refused = subprocess.run(
        [*gputally_command(), "audit", "prove", f"--ledger={log.db}", f"--keys={log.keys}",
         f"--checkpoint={held}", f"--node={NODES[1]}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "does not verify" in refused.stderr
