"""RFC 9162 (Certificate Transparency 2.0) Merkle trees: hashes, proofs and their checks.

Pure functions over SHA-256, written from RFC 9162 §2.1. The ledger keeps the tree over its
entries; auditors use the same functions to check inclusion and consistency proofs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


class ProofError(ValueError):
    """A proof that does not verify; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (already hashed with leaf_hash)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    # Iterative, level by level: a left-balanced tree reduces pairwise, carrying the odd one up.
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 §2.1.3.1."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(leaves[:k], index), root(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), root(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], size1: int) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 §2.1.4.1, between the first size1 leaves and all of them."""
    n = len(leaves)
    if not 0 < size1 <= n:
        raise ValueError(f"a consistency proof needs 0 < size1 <= size2, got {size1} and {n}")
    return _subproof(leaves, size1, True)


def consistency_proof_extending(
    size1: int, peaks1: Sequence[bytes], added: Sequence[bytes]
) -> list[bytes]:
    """PROOF(size1, D[size1 + len(added)]) from the older tree's frontier (its perfect subtrees,
    largest first: Frontier.peaks) and the leaves added since, without the older leaves.

    Every hash the proof needs from the older tree is one of its perfect subtrees, or the
    hash of several consecutive ones up to its end; so a log can prove its growth to a
    witness by reading only what it appended since the witness's last checkpoint. Equal, for
    every input, to consistency_proof over all the leaves (tests/test_witness.py)."""
    size2 = size1 + len(added)
    if size1 < 1:
        raise ValueError(f"a consistency proof needs 0 < size1 <= size2, got {size1} and {size2}")
    heights = [bit for bit in range(size1.bit_length() - 1, -1, -1) if size1 >> bit & 1]
    if len(heights) != len(peaks1):
        raise ValueError(f"{len(peaks1)} subtree hashes do not make a tree of {size1} leaves")
    spans: list[tuple[int, int, bytes]] = []
    start = 0
    for height, peak in zip(heights, peaks1, strict=True):
        spans.append((start, start + (1 << height), peak))
        start += 1 << height

    def tree_hash(lo: int, hi: int) -> bytes:
        if lo >= size1:
            return root(added[lo - size1 : hi - size1])
        chosen = [(a, b, peak) for a, b, peak in spans if a >= lo and b <= hi]
        if not chosen or chosen[0][0] != lo or chosen[-1][1] != hi:
            raise AssertionError(f"[{lo}, {hi}) is not made of the older tree's subtrees")
        node = chosen[-1][2]
        for _, _, left in reversed(chosen[:-1]):
            node = node_hash(left, node)
        return node

    def sub(lo: int, hi: int, m: int, complete: bool) -> list[bytes]:
        if m == hi - lo:
            return [] if complete else [tree_hash(lo, hi)]
        k = _split(hi - lo)
        if m <= k:
            return [*sub(lo, lo + k, m, complete), tree_hash(lo + k, hi)]
        return [*sub(lo + k, hi, m - k, False), tree_hash(lo, lo + k)]

    return sub(0, size2, size1, True)


def _subproof(leaves: Sequence[bytes], m: int, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(leaves[:k], m, complete), root(leaves[k:])]
    return [*_subproof(leaves[k:], m - k, False), root(leaves[:k])]


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes
) -> None:
    """RFC 9162 §2.1.3.2. Raises ProofError unless `leaf` is at `index` in the tree `expected_root`."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    if len(leaf) != 32 or len(expected_root) != 32:
        raise ProofError("leaf hash and root must be SHA-256 hashes (32 bytes)")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != expected_root:
        raise ProofError("inclusion proof leads to a different root")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2. Raises ProofError unless the tree (size2, root2) extends (size1, root1)."""
    if size1 < 1:
        raise ProofError("consistency with an empty tree proves nothing")
    if size1 > size2:
        raise ProofError(f"the older tree ({size1}) is larger than the newer ({size2})")
    if size1 == size2:
        if proof:
            raise ProofError("trees of the same size need an empty consistency proof")
        if root1 != root2:
            raise ProofError("trees of the same size have different roots")
        return
    if not proof:
        raise ProofError("an empty consistency proof between different sizes")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: its root is the first node
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != root1:
        raise ProofError("consistency proof does not lead to the older root")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the newer root")


class Frontier:
    """The right edge of a growing tree (its perfect subtrees, largest first): append is
    amortised O(1) and the root O(log n), without keeping the leaves."""

    def __init__(self) -> None:
        self.size = 0
        self._peaks: list[tuple[int, bytes]] = []  # (height, hash)

    def append(self, leaf: bytes) -> None:
        self.size += 1
        height, node = 0, leaf
        while self._peaks and self._peaks[-1][0] == height:
            _, left = self._peaks.pop()
            node = node_hash(left, node)
            height += 1
        self._peaks.append((height, node))

    def peaks(self) -> list[bytes]:
        """The perfect subtrees' hashes, largest first: with the size, all a frontier is."""
        return [node for _, node in self._peaks]

    def copy(self) -> Frontier:
        frontier = Frontier()
        frontier.size, frontier._peaks = self.size, list(self._peaks)
        return frontier

    @classmethod
    def resume(cls, size: int, peaks: list[bytes]) -> Frontier:
        """The frontier of a tree of `size` leaves whose perfect subtrees are `peaks`
        (their heights are the set bits of `size`); ValueError when they cannot be."""
        heights = [bit for bit in range(size.bit_length() - 1, -1, -1) if size >> bit & 1]
        if len(heights) != len(peaks) or any(len(p) != 32 for p in peaks):
            raise ValueError(f"{len(peaks)} subtree hashes do not make a tree of {size} leaves")
        frontier = cls()
        frontier.size = size
        frontier._peaks = list(zip(heights, peaks, strict=True))
        return frontier

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        node = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            node = node_hash(left, node)
        return node
