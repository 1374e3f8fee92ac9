"""The node's chain of signed summaries, and its spool (docs/audit.md).

Every summary names its node, carries the next number of the node's chain and the SHA-256 of
the previous summary's body, and is signed as serialized with the node's key
(gputally.v1.signing). A deleted, reordered, replayed or altered summary then breaks a
signature or the chain.

With a state directory, every signed summary is also written to a spool (`spool/`, one file
per chain number) before it is handed to the sender, and removed when the collector has
acknowledged it. An agent that dies while the collector is away sends its spool again when it
starts: the summaries survive the agent, and the collector recognises one it already recorded.
A summary is never numbered twice: the chain's position is the newest of chain.json and the
spool.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import chain_hash, public_bytes, sign_stream, sign_summary, write_file

KEY_FILE = "agent.key"
CHAIN_FILE = "chain.json"
SPOOL_DIR = "spool"


class ChainStateError(RuntimeError):
    """A chain state or spooled summary that cannot be read; the message says what to do."""


class SummarySigner:
    """Numbers, chains and signs a node's summaries; `state_dir` None keeps the chain in memory."""

    def __init__(self, key: Ed25519PrivateKey, node: str, state_dir: Path | None = None):
        self.key = key
        self.node = node
        self.public_key = public_bytes(key)
        self._state = None if state_dir is None else state_dir / CHAIN_FILE
        self._spool = None if state_dir is None else state_dir / SPOOL_DIR
        self.chain_seq = 0
        self.prev_hash = b""
        if self._state is not None and self._state.exists():
            try:
                saved = json.loads(self._state.read_text())
                if saved.get("node") == node and saved.get("public_key") == self.public_key.hex():
                    self.chain_seq = int(saved["chain_seq"])
                    self.prev_hash = bytes.fromhex(saved["prev_hash"])
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ChainStateError(
                    f"{self._state}: unreadable chain state ({error}); move it away to start a new chain"
                ) from None
        # A summary spooled just before the agent died, with chain.json not yet updated: the
        # chain goes on after it, so that its number is never given to another summary.
        for signed in self.pending():
            summary = pb.Summary.FromString(signed.body)
            if summary.chain_seq > self.chain_seq:
                self.chain_seq = summary.chain_seq
                self.prev_hash = chain_hash(signed.body)

    def prove(self, nonce: bytes, hello: pb.Hello) -> bytes:
        """Sign a collector's Challenge for this node's stream (signing.stream_proof_message):
        the stream then speaks for the node, which a copy of its public key cannot do."""
        return sign_stream(self.key, nonce, hello.node, hello.instance_id)

    def _spooled(self) -> list[tuple[int, Path]]:
        if self._spool is None or not self._spool.is_dir():
            return []
        out = []
        for path in self._spool.glob("*.summary"):
            try:
                out.append((int(path.stem), path))
            except ValueError:
                continue  # not ours
        return sorted(out)

    def pending(self) -> list[pb.SignedSummary]:
        """The spooled summaries the collector has not acknowledged, in chain order."""
        out = []
        for _, path in self._spooled():
            try:
                signed = pb.SignedSummary.FromString(path.read_bytes())
                pb.Summary.FromString(signed.body)
            except (OSError, DecodeError) as error:
                raise ChainStateError(
                    f"{path}: unreadable spooled summary ({error}); move it away to go on"
                ) from None
            out.append(signed)
        return out

    def forget(self, chain_seq: int) -> None:
        """The collector is done with summary `chain_seq` (recorded, or refused for good):
        drop it from the spool. Only that one: an earlier summary may still wait."""
        if self._spool is not None:
            (self._spool / f"{chain_seq:012d}.summary").unlink(missing_ok=True)

    def sign(self, summary: pb.Summary) -> pb.SignedSummary:
        summary.node = self.node
        summary.chain_seq = self.chain_seq + 1
        summary.prev_hash = self.prev_hash
        body = summary.SerializeToString(deterministic=True)
        signed = pb.SignedSummary(body=body, signature=sign_summary(self.key, body))
        if self._spool is not None:  # durable before anything else knows the summary
            write_file(
                self._spool / f"{summary.chain_seq:012d}.summary", signed.SerializeToString()
            )
        self.chain_seq += 1
        self.prev_hash = chain_hash(body)
        if self._state is not None:
            state = {
                "node": self.node,
                "public_key": self.public_key.hex(),
                "chain_seq": self.chain_seq,
                "prev_hash": self.prev_hash.hex(),
            }
            write_file(self._state, json.dumps(state).encode())
        return signed
