"""RFC 9162 Merkle functions: every conformance vector, and proofs we make verify."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from gputally.collector.record.merkle import (
    EMPTY_ROOT,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "rfc9162-merkle"
INCLUSION = sorted((VECTORS / "inclusion").rglob("*.json"))
CONSISTENCY = sorted((VECTORS / "consistency").rglob("*.json"))
# The leaves the vectors' trees are built from (the Certificate Transparency test leaves).
LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]


def b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_the_vectors_are_all_there() -> None:
    assert len(INCLUSION) + len(CONSISTENCY) == 196


@pytest.mark.parametrize("path", INCLUSION, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inclusion_vectors(path: Path) -> None:
    v = load(path)
    proof = [b64(p) for p in v["proof"] or []]
    args = (b64(v["leafHash"]), v["leafIdx"], v["treeSize"], proof, b64(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_consistency_vectors(path: Path) -> None:
    v = load(path)
    proof = [b64(p) for p in v["proof"] or []]
    args = (v["size1"], v["size2"], b64(v["root1"]), b64(v["root2"]), proof)
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_our_roots_and_proofs_equal_the_vectors() -> None:
    hashes = [leaf_hash(x) for x in LEAVES]
    happy = load(VECTORS / "inclusion" / "1" / "happy-path.json")
    assert root(hashes) == b64(happy["root"])
    assert inclusion_proof(hashes, happy["leafIdx"]) == [b64(p) for p in happy["proof"]]
    consistent = load(VECTORS / "consistency" / "1" / "happy-path.json")
    assert consistency_proof(hashes[: consistent["size2"]], consistent["size1"]) == [
        b64(p) for p in consistent["proof"]
    ]
    assert root([]) == EMPTY_ROOT


def test_every_proof_we_make_verifies_and_a_changed_leaf_does_not() -> None:
    data = [f"entry {i}".encode() for i in range(37)]
    hashes = [leaf_hash(x) for x in data]
    for size in range(1, len(hashes) + 1):
        tree = hashes[:size]
        top = root(tree)
        for index in range(size):
            verify_inclusion(tree[index], index, size, inclusion_proof(tree, index), top)
        for old in range(1, size + 1):
            verify_consistency(old, size, root(hashes[:old]), top, consistency_proof(tree, old))
    with pytest.raises(ProofError):
        verify_inclusion(leaf_hash(b"forged"), 3, 37, inclusion_proof(hashes, 3), root(hashes))


def test_the_frontier_gives_the_same_root_at_every_size() -> None:
    from gputally.collector.record.merkle import Frontier

    hashes = [leaf_hash(f"entry {i}".encode()) for i in range(70)]
    frontier = Frontier()
    assert frontier.root() == EMPTY_ROOT
    for size, leaf in enumerate(hashes, start=1):
        frontier.append(leaf)
        assert frontier.size == size and frontier.root() == root(hashes[:size])
