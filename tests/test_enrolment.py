"""Enrolment records (docs/enrolment.md): the format, its verification, the findings, the commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gputally.cli.main import main
from gputally.collector.audit.enrolment import (
    ENROLLED_LATE,
    GPU_NOT_ENROLLED,
    GPU_NOT_SEEN,
    NOT_ENROLLED,
    RECORD_INVALID,
    Enrolment,
    EnrolmentError,
    EnrolmentFinding,
    EnrolmentRecord,
    InvalidRecordError,
    load_enrolment,
    open_record,
    parse_record,
    read_record_file,
    serialise_record,
    sign_record,
    write_record,
)
from gputally.collector.record.ledger import parse_verifier_key, sign_note, verifier_key
from gputally.v1.accounting import card
from gputally.v1.signing import (
    decode_public_key,
    encode_public_key,
    key_fingerprint,
    public_bytes,
)

from .factories import gputally_command

NAME = "auditor.example.org/enrolment"


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


FEB = at("2026-02-20T10:00:00")
MAR = at("2026-03-01T00:00:00")  # the period begins
MID = at("2026-03-10T12:30:00")


def raw(key: Ed25519PrivateKey) -> bytes:
    return public_bytes(key)


def short(key: bytes) -> str:
    return key_fingerprint(key)[:23]


@pytest.fixture
def auditor() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def enrol(
    directory: Path,
    auditor: Ed25519PrivateKey,
    node: str,
    key: bytes,
    when: int,
    gpus: list[tuple[str, str | None]],
) -> Path:
    record = EnrolmentRecord.create(node, key, when, gpus)
    return write_record(directory, sign_record(record, NAME, auditor), record)


def vkey(auditor: Ed25519PrivateKey) -> str:
    return verifier_key(NAME, raw(auditor))


# -- the format ------------------------------------------------------------------------------


def test_a_record_is_the_text_the_format_says_and_verifies(auditor: Ed25519PrivateKey) -> None:
    node_key = bytes(range(32))
    record = EnrolmentRecord.create(
        "gpu-07.dc1", node_key, MAR + 0.9, [("GPU-bbb", "1320"), ("GPU-aaa", ""), ("GPU-ccc", None)]
    )
    assert serialise_record(record) == (
        "gputally enrolment v1\n"
        "node gpu-07.dc1\n"
        f"key {encode_public_key(node_key)}\n"
        f"fingerprint {key_fingerprint(node_key)}\n"
        "enrolled 2026-03-01T00:00:00Z\n"
        "gpu GPU-aaa -\n"
        "gpu GPU-bbb 1320\n"
        "gpu GPU-ccc -\n"
    )
    assert record.file_name == (
        f"gpu-07.dc1.{key_fingerprint(node_key)[7:23]}.20260301T000000Z.enrol"
    )
    note = sign_record(record, NAME, auditor)
    assert open_record(note, NAME, raw(auditor)) == record


def test_a_changed_byte_anywhere_in_a_record_fails(
    tmp_path: Path, auditor: Ed25519PrivateKey
) -> None:
    path = enrol(tmp_path, auditor, "n1", raw(Ed25519PrivateKey.generate()), FEB, [("GPU-a", "7")])
    good = path.read_bytes()
    assert read_record_file(path, NAME, raw(auditor)).node == "n1"
    for i in range(len(good)):
        for flip in (0x01, 0x20):
            path.write_bytes(good[:i] + bytes([good[i] ^ flip]) + good[i + 1 :])
            with pytest.raises(InvalidRecordError, match=f"^{path}: "):
                read_record_file(path, NAME, raw(auditor))
    for changed in (good[:-1], good + b"\n", good.replace(b"\n", b"\r\n"), b"", b"\n" + good):
        path.write_bytes(changed)
        with pytest.raises(InvalidRecordError):
            read_record_file(path, NAME, raw(auditor))


def test_a_record_signed_by_another_key_fails(auditor: Ed25519PrivateKey) -> None:
    record = EnrolmentRecord.create("n1", raw(Ed25519PrivateKey.generate()), FEB, [])
    note = sign_record(record, NAME, Ed25519PrivateKey.generate())  # same name, another key
    with pytest.raises(InvalidRecordError, match="no signature by the enrolment key"):
        open_record(note, NAME, raw(auditor))
    other_name = sign_record(record, "someone.else/enrolment", auditor)
    with pytest.raises(InvalidRecordError, match="no signature by the enrolment key"):
        open_record(other_name, NAME, raw(auditor))
    # a second signature, even a valid one, makes it no record of ours
    cosigned = sign_record(record, NAME, auditor) + other_name.rpartition("\n\n")[2]
    with pytest.raises(InvalidRecordError, match="one signature"):
        open_record(cosigned, NAME, raw(auditor))


def unused_bits_changed(line: str) -> str:
    """The same key, written with other unused bits in its last base64 digit."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = line[-2]
    return line[:-2] + alphabet[alphabet.index(last) ^ 1] + "="


def canonical_lines() -> list[str]:
    key = bytes(range(32))
    return [
        "gputally enrolment v1",
        "node n1",
        f"key {encode_public_key(key)}",
        f"fingerprint {key_fingerprint(key)}",
        "enrolled 2026-03-01T00:00:00Z",
        "gpu GPU-a 11",
        "gpu GPU-b -",
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ls: [*ls[:5], ls[6], ls[5]], "not sorted by UUID"),
        (lambda ls: [*ls[:5], "gpu GPU-a 11", "gpu gpu-A 12"], "listed twice"),
        (lambda ls: [*ls[:5], "gpu GPU-a 11", "gpu GPU-b 11"], "serial is listed twice"),
        (lambda ls: [*ls[:5], "gpu GPU-a  11"], "expected 'gpu <uuid> <serial or ->'"),
        (lambda ls: [*ls[:5], "gpu GPU-a 11 "], "expected 'gpu <uuid> <serial or ->'"),
        (lambda ls: [*ls[:4], "enrolled 2026-03-01T00:00:00+00:00", *ls[5:]], "RFC 3339"),
        (lambda ls: [*ls[:4], "enrolled 2026-02-30T00:00:00Z", *ls[5:]], "is not a date"),
        (lambda ls: [*ls[:3], "fingerprint " + ls[3][12:].upper(), *ls[4:]], "not the key's"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "line 2: expected 'node"),
        (lambda ls: ["gputally enrolment v2", *ls[1:]], "line 1"),
        (lambda ls: [*ls[:1], "node n1 n2", *ls[2:]], "one word"),
        (lambda ls: [*ls[:1], "node .hidden", *ls[2:]], "node name"),
        (lambda ls: ls[:4], "line 5: missing"),
        (lambda ls: [*ls[:2], unused_bits_changed(ls[2]), *ls[3:]], "canonical"),
    ],
)
def test_non_canonical_text_fails_even_when_signed(
    change: object, reason: str, auditor: Ed25519PrivateKey
) -> None:
    lines = change(canonical_lines())  # type: ignore[operator]
    text = "".join(line + "\n" for line in lines)
    with pytest.raises(InvalidRecordError, match=reason):
        open_record(sign_note(text, NAME, auditor), NAME, raw(auditor))


def test_the_canonical_text_itself_parses() -> None:
    text = "".join(line + "\n" for line in canonical_lines())
    assert serialise_record(parse_record(text)) == text


nodes = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Z")),
    min_size=1,
    max_size=40,
).filter(lambda n: not n.startswith(".") and "/" not in n)
identities = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Z")),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    node=nodes,
    uuids=st.lists(identities, unique_by=card, max_size=8),
    serials=st.lists(identities.filter(lambda s: s != "-"), unique_by=card, max_size=8),
    when=st.integers(0, at("9999-12-31T23:59:59")),
    key=st.binary(min_size=32, max_size=32),
)
def test_parse_of_serialise_is_the_record(
    node: str, uuids: list[str], serials: list[str], when: int, key: bytes
) -> None:
    gpus = [(uuid, serials[i] if i < len(serials) else None) for i, uuid in enumerate(uuids)]
    record = EnrolmentRecord.create(node, key, when, gpus)
    text = serialise_record(record)
    assert parse_record(text) == record
    assert serialise_record(parse_record(text)) == text


# -- the directory and the findings ----------------------------------------------------------


def test_findings_name_each_key_and_gpu_the_enrolment_does_not_vouch_for(
    tmp_path: Path, auditor: Ed25519PrivateKey
) -> None:
    k1, k2, k3, stranger = (raw(Ed25519PrivateKey.generate()) for _ in range(4))
    enrol(tmp_path, auditor, "n1", k1, FEB, [("GPU-1a", "101"), ("GPU-1b", None)])
    enrol(tmp_path, auditor, "n2", k2, MID, [("GPU-2a", "201")])  # after the period began
    enrol(tmp_path, auditor, "n3", k3, FEB, [("GPU-3a", "301")])
    enrolment = load_enrolment(tmp_path, vkey(auditor))
    assert enrolment.problems == [] and len(enrolment.records) == 3

    used = {"n1": {k1}, "n2": {k2}, "n3": {k3}, "n4": {stranger}, "n5": {k1}}
    gpus = {"n1": {"GPU-1a", "gpu-1B", "GPU-9z"}, "n2": {"GPU-2a"}, "n3": {"GPU-1a"}}
    assert enrolment.check(used, gpus, MAR) == [
        EnrolmentFinding(
            NOT_ENROLLED,
            "n4",
            f"node n4: key {short(stranger)} signed summaries, and no enrolment record of n4 "
            "holds it",
        ),
        EnrolmentFinding(
            NOT_ENROLLED,
            "n5",
            f"node n5: key {short(k1)} signed summaries, and no enrolment record of n5 holds it "
            "(it is enrolled for n1)",
        ),
        EnrolmentFinding(
            ENROLLED_LATE,
            "n2",
            "node n2: GPU GPU-2a was first enrolled 2026-03-10T12:30:00Z, after the period "
            "began 2026-03-01T00:00:00Z",
        ),
        EnrolmentFinding(
            ENROLLED_LATE,
            "n2",
            f"node n2: key {short(k2)} was enrolled 2026-03-10T12:30:00Z, after the period "
            "began 2026-03-01T00:00:00Z",
        ),
        EnrolmentFinding(
            GPU_NOT_ENROLLED,
            "n1",
            "node n1: GPU GPU-9z appears in its summaries, and no enrolment record of n1 lists it",
        ),
        EnrolmentFinding(
            GPU_NOT_ENROLLED,
            "n3",
            "node n3: GPU GPU-1a appears in its summaries, and no enrolment record of n3 lists "
            "it (it is enrolled for n1)",
        ),
        # and n3's own enrolled GPU never reported: replaced by the one above
        EnrolmentFinding(
            GPU_NOT_SEEN,
            "n3",
            "node n3: GPU GPU-3a, enrolled 2026-02-20T10:00:00Z, appears in none of its summaries",
        ),
    ]
    # without a period, nothing is late
    assert [f.kind for f in enrolment.check(used, gpus, None)] == [
        NOT_ENROLLED,
        NOT_ENROLLED,
        GPU_NOT_ENROLLED,
        GPU_NOT_ENROLLED,
        GPU_NOT_SEEN,
    ]


def test_a_rotated_node_passes_for_both_of_its_keys(
    tmp_path: Path, auditor: Ed25519PrivateKey
) -> None:
    old, new = raw(Ed25519PrivateKey.generate()), raw(Ed25519PrivateKey.generate())
    enrol(tmp_path, auditor, "n1", old, FEB - 86400, [("GPU-a", "1"), ("GPU-b", "2")])
    enrol(tmp_path, auditor, "n1", new, FEB, [("GPU-a", "1"), ("GPU-c", "3")])  # and a new GPU
    enrol(tmp_path, auditor, "n1", new, MID, [("GPU-a", "1"), ("GPU-d", "4")])  # mid-period
    enrolment = load_enrolment(tmp_path, vkey(auditor))
    assert len(enrolment.records_for("n1")) == 3 and enrolment.problems == []
    seen = {"n1": {"GPU-a", "GPU-b", "GPU-c", "GPU-d"}}
    assert enrolment.check({"n1": {old, new}}, seen, None) == []
    # a GPU first enrolled during the period is reported, the key (enrolled before) is not
    assert enrolment.check({"n1": {old, new}}, seen, MAR) == [
        EnrolmentFinding(
            ENROLLED_LATE,
            "n1",
            "node n1: GPU GPU-d was first enrolled 2026-03-10T12:30:00Z, after the period began "
            "2026-03-01T00:00:00Z",
        )
    ]


def test_records_that_do_not_verify_are_problems_and_findings_not_errors(
    tmp_path: Path, auditor: Ed25519PrivateKey
) -> None:
    k1, k2 = raw(Ed25519PrivateKey.generate()), raw(Ed25519PrivateKey.generate())
    good = enrol(tmp_path, auditor, "n1.dc", k1, FEB, [("GPU-a", "1")])
    forged = enrol(tmp_path, Ed25519PrivateKey.generate(), "n2", k2, FEB, [("GPU-b", "2")])
    renamed = tmp_path / good.name.replace("n1.dc.", "n9.")
    good.rename(renamed)
    (tmp_path / "notes.txt").write_text("not a record: ignored\n")
    enrolment = load_enrolment(tmp_path, vkey(auditor))
    assert enrolment.records == []
    assert enrolment.problems == [
        f"{forged}: no signature by the enrolment key {NAME}",
        f"{renamed}: the record it holds is named {good.name} (node n1.dc, key {short(k1)})",
    ]
    assert enrolment.check({"n2": {k2}}, {}, None) == [
        EnrolmentFinding(
            NOT_ENROLLED,
            "n2",
            f"node n2: key {short(k2)} signed summaries, and no enrolment record of n2 holds it",
        ),
        EnrolmentFinding(RECORD_INVALID, "n2", enrolment.problems[0]),
        EnrolmentFinding(RECORD_INVALID, "n9", enrolment.problems[1]),
    ]


def test_an_unusable_directory_or_key_is_an_error(
    tmp_path: Path, auditor: Ed25519PrivateKey
) -> None:
    with pytest.raises(EnrolmentError, match="no such enrolment directory"):
        load_enrolment(tmp_path / "missing", vkey(auditor))
    with pytest.raises(EnrolmentError, match=r"no enrolment record \(\*\.enrol\)"):
        load_enrolment(tmp_path, vkey(auditor))
    with pytest.raises(EnrolmentError, match="neither a verifier key"):
        load_enrolment(tmp_path, "not-a-key")
    (tmp_path / "bad.vkey").write_text("name+00000000+AAAA\n")
    with pytest.raises(EnrolmentError, match="not an enrolment verifier key"):
        load_enrolment(tmp_path, tmp_path / "bad.vkey")
    (tmp_path / "good.vkey").write_text(vkey(auditor) + "\n")
    enrol(tmp_path / "records", auditor, "n1", raw(auditor), FEB, [])
    assert load_enrolment(tmp_path / "records", str(tmp_path / "good.vkey")).name == NAME
    assert isinstance(Enrolment(NAME, raw(auditor), []).problems, list)


def test_a_record_is_never_written_over(tmp_path: Path, auditor: Ed25519PrivateKey) -> None:
    enrol(tmp_path, auditor, "n1", raw(auditor), FEB, [])
    with pytest.raises(EnrolmentError, match="exists already"):
        enrol(tmp_path, auditor, "n1", raw(auditor), FEB, [("GPU-a", "1")])


# -- the commands ----------------------------------------------------------------------------


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    return subprocess.run(
        [*gputally_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        input=stdin,
    )


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and text in result.stderr, result.stderr


@pytest.mark.parametrize("command", [[], ["init"], ["sign"], ["show"]])
def test_every_enrolment_command_has_useful_help(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["enrolment", *command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"usage: gputally enrolment {' '.join(command)}".strip() in text
    assert "auditor holds the enrolment key" in text and "before the audited period" in text


def test_the_enrolment_procedure_from_the_command_line(tmp_path: Path) -> None:
    key = tmp_path / "offline" / "enrolment.key"
    created = run("enrolment", "init", "--key", str(key), "--name", NAME)
    assert created.returncode == 0, created.stderr
    line = created.stdout.strip()
    assert (
        line.startswith(NAME + "+")
        and (tmp_path / "offline" / "enrolment.key.vkey").read_text() == line + "\n"
    )
    assert key.stat().st_mode & 0o777 == 0o600
    again = run("enrolment", "init", "--key", str(key), "--name", NAME)
    one_line_error(again, "exists already")
    assert (tmp_path / "offline" / "enrolment.key.vkey").read_text() == line + "\n"

    # on the node: its inventory and its key, enrolled at the collector as usual
    state = tmp_path / "state"
    inventory = run(
        "agent",
        "--backend",
        "mock",
        "--once",
        "--json",
        "--interval",
        "0.1",
        "--state-dir",
        str(state),
    )
    assert inventory.returncode == 0, inventory.stderr
    (tmp_path / "node-00.json").write_text(inventory.stdout)
    shown = json.loads(inventory.stdout)
    public = run("agent", "--backend", "mock", "--print-public-key", "--state-dir", str(state))
    node_key = public.stdout.strip()
    keys = tmp_path / "keys"
    assert run("enroll", "--keys", str(keys), "--node", "node-00", node_key).returncode == 0

    records = tmp_path / "enrolment"
    signed = run(
        "enrolment",
        "sign",
        "--key",
        str(key),
        "--dir",
        str(records),
        "--at",
        "2026-02-20T10:00:00Z",
        "--inventory",
        str(tmp_path / "node-00.json"),
        "--public-key",
        str(keys / "node-00.pub"),
    )
    assert signed.returncode == 0, signed.stderr
    assert "--backend mock, a simulation" in signed.stderr  # never passed off as a node's GPUs
    (path,) = records.iterdir()
    fingerprint = key_fingerprint(decode_public_key(node_key, "key"))
    assert signed.stdout.splitlines() == [
        f"node-00 {fingerprint} 2026-02-20T10:00:00Z {len(shown['gpus'])} GPUs",
        str(path),
    ]
    record = parse_record(path.read_text().rpartition("\n\n")[0] + "\n")
    assert {(g.uuid, g.serial) for g in record.gpus} == {
        (g["uuid"], g["serial"] or None) for g in shown["gpus"]
    }

    # a rotated node: its .pub's last line is the key signed; GPUs given by hand, from stdin
    other = Ed25519PrivateKey.generate()
    (keys / "node-01.pub").write_text(node_key + "\n" + encode_public_key(raw(other)) + "\n")
    by_hand = run(
        "enrolment",
        "sign",
        "--key",
        str(key),
        "--dir",
        str(records),
        "--at",
        "2026-02-21",
        "--node",
        "node-01",
        "--public-key",
        str(keys / "node-01.pub"),
        "--gpu",
        "GPU-b:77",
        "--gpu",
        "GPU-a",
    )
    assert by_hand.returncode == 0, by_hand.stderr
    assert f"node-01 {key_fingerprint(raw(other))} 2026-02-21T00:00:00Z 2 GPUs" in by_hand.stdout

    listed = run("enrolment", "show", "--dir", str(records), "--enrolment-key", line)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout.splitlines()
    assert out[-1] == f"2 records for 2 nodes verify with {NAME}; 0 do not"
    assert f"node-01  {key_fingerprint(raw(other))[:23]}  2026-02-21T00:00:00Z  2 GPUs" in out
    assert "    GPU-a  -" in out and "    GPU-b  77" in out
    as_json = run(
        "enrolment", "show", "--dir", str(records), "--json", "--enrolment-key", str(key) + ".vkey"
    )
    assert [r["node"] for r in json.loads(as_json.stdout)["records"]] == ["node-00", "node-01"]

    # a record altered after signing: show names it and exits 1
    path.write_text(path.read_text().replace("enrolled 2026-02-20", "enrolled 2026-02-19"))
    tampered = run("enrolment", "show", "--dir", str(records), "--enrolment-key", line)
    assert tampered.returncode == 1
    assert f"INVALID {path}: the signature of {NAME} does not verify" in tampered.stdout


def test_bad_enrolment_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    key = tmp_path / "e.key"
    assert run("enrolment", "init", "--key", str(key), "--name", NAME).returncode == 0
    node_key = encode_public_key(raw(Ed25519PrivateKey.generate()))
    sign = ("enrolment", "sign", "--key", str(key), "--dir", str(tmp_path / "r"))
    one_line_error(
        run("enrolment", "init", "--key", str(tmp_path / "x"), "--name", "a b"), "--name"
    )
    one_line_error(run(*sign, "--node", "n1", "--public-key", "nope!"), "not base64")
    one_line_error(
        run(
            "enrolment",
            "sign",
            "--key",
            str(tmp_path / "none.key"),
            "--dir",
            "r",
            "--node",
            "n1",
            "--public-key",
            node_key,
        ),
        "gputally enrolment init",
    )
    one_line_error(
        run(*sign, "--name", "other", "--node", "n1", "--public-key", node_key), "names this key"
    )
    one_line_error(run(*sign, "--node", "a/b", "--public-key", node_key), "node name")
    one_line_error(
        run(*sign, "--node", "n1", "--public-key", node_key, "--gpu", "GPU-a:a b"), "serial"
    )
    one_line_error(run(*sign, "--node", "n1", "--public-key", node_key, "--at", "soon"), "--at")
    one_line_error(run(*sign, "--inventory", "-", "--public-key", node_key, stdin="{"), "not JSON")
    one_line_error(
        run(*sign, "--inventory", "-", "--public-key", node_key, stdin='{"node": "n1"}'), "no gpus"
    )
    one_line_error(
        run(*sign, "--inventory", "-", "--public-key", node_key, "--gpu", "GPU-a", stdin="{}"),
        "--gpu goes with --node",
    )
    assert not (tmp_path / "r").exists()  # nothing written by any of them
    one_line_error(
        run(
            "enrolment", "show", "--dir", str(tmp_path / "r"), "--enrolment-key", str(key) + ".vkey"
        ),
        "no such enrolment directory",
    )


def test_enroll_sh_collects_what_the_auditor_signs(tmp_path: Path) -> None:
    """On Kubernetes, `enroll.sh --collect DIR` gathers each node's inventory and key, and
    `enrolment sign` takes them as they are."""
    from .test_deploy import FAKE_KUBECTL, K8S

    (tmp_path / "bin").mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    kubectl.chmod(0o755)
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "pods.txt").write_text("agent-x1 node-a\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    collected = tmp_path / "collected"
    done = subprocess.run(
        ["sh", str(K8S / "enroll.sh"), "--collect", str(collected)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in collected.iterdir()) == ["node-a.json", "node-a.pub"]
    enrolled = (tmp_path / "cluster" / "configmap" / "node-a.pub").read_text()
    assert (collected / "node-a.pub").read_text() == enrolled  # the key the collector trusts

    key = tmp_path / "enrolment.key"
    assert run("enrolment", "init", "--key", str(key), "--name", NAME).returncode == 0
    signed = run(
        "enrolment",
        "sign",
        "--key",
        str(key),
        "--dir",
        str(tmp_path / "enrolment"),
        "--inventory",
        str(collected / "node-a.json"),
        "--public-key",
        str(collected / "node-a.pub"),
    )
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("node-a SHA256:")


def test_the_documented_record_verifies() -> None:
    """docs/enrolment.md shows a record, its file name and its enrolment key: they must agree."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "enrolment.md").read_text()
    note = re.search(r"```\n(gputally enrolment v1\n.*?)```", text, re.S)
    file_name = re.search(r"in the file `([^`]+)`", text)
    key = re.search(r"enrolment\nkey `([^`]+)`", text)
    assert note and file_name and key
    enrolment_name, public_key = parse_verifier_key(key.group(1))
    record = open_record(note.group(1), enrolment_name, public_key)
    assert record.file_name == file_name.group(1) and record.node == "node-17"
