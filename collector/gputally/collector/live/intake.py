"""Signed summaries into the record: signature, resend, and each node's chain.

A report may carry a summary its agent signed. The intake opens it (the signature must verify
with the node's enrolled key, the body must name the node and pass the summary checks), tells
a summary sent again (the agent's acknowledgement was lost) from a new one, and stores a new
one durably, verbatim, in the record. It follows each node's chain as it goes, so that a
summary that does not continue it (an evidence gap an auditor will see) is counted and
logged when it happens, not found months later.

Without enrolled keys nothing can be verified, so nothing is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.signing import chain_hash, verify_summary

from ..record.keys import KeyStore
from ..record.store import Record
from .validate import InvalidMessageError, check_summary

log = logging.getLogger("gputally.collector.intake")


@dataclass(slots=True)
class Chain:
    """One node's chain as the record holds it, and what its summaries did."""

    seq: int = 0  # the newest recorded summary's chain number, and its body's hash
    hash: bytes = b""
    loaded: bool = False  # seq/hash read back from the record (after a collector restart)
    key: bytes = b""  # the key the chain is signed with; a new key, a new chain
    recorded: int = 0  # summaries stored in the record
    resent: int = 0  # summaries sent again that the record already held
    breaks: int = 0  # recorded summaries that did not continue the chain


class SummaryIntake:
    # How far back a summary sent again is looked for in the record: an agent resends only
    # what was not acknowledged, which is the newest few (one per stream interruption).
    RESEND_HORIZON = 256

    def __init__(self, keys: KeyStore | None = None, record: Record | None = None):
        self.keys = keys
        self.record = record
        self.chains: dict[str, Chain] = {}

    @property
    def recording(self) -> bool:
        return self.keys is not None and self.record is not None

    def chain(self, node: str) -> Chain:
        chain = self.chains.get(node)
        if chain is None:
            chain = self.chains[node] = Chain()
        return chain

    def stream_opened(self, node: str, public_key: bytes) -> None:
        """A stream now speaks for `node` with `public_key`. A rotated key (or the first
        stream since the collector started) has a chain of its own, read back from the
        record if it holds that key's summaries."""
        chain = self.chain(node)
        if self.keys is not None and chain.key != public_key:
            chain.key = public_key
            chain.seq, chain.hash, chain.loaded = 0, b"", False

    def open(self, node: str, signed: pb.SignedSummary, gpus: Container[int]) -> pb.Summary:
        """The summary `signed` carries, checked; InvalidMessageError when it is refused."""
        if self.keys is not None:
            key = self.keys.key(node)
            if key is None or not verify_summary(key, signed.body, signed.signature):
                raise InvalidMessageError(
                    "summary signature does not verify with the node's enrolled key"
                )
        try:
            summary = pb.Summary.FromString(signed.body)
        except DecodeError:
            raise InvalidMessageError("summary body is not a Summary message") from None
        if summary.node != node:
            raise InvalidMessageError(f"summary names node {summary.node!r}, not {node!r}")
        check_summary(summary, gpus)
        return summary

    def take(
        self,
        node: str,
        instance: int,
        seq: int,
        signed: pb.SignedSummary,
        summary: pb.Summary,
        received: float,
    ) -> None:
        """Record an opened summary, unless the record holds it already. Raises
        InvalidMessageError for one that would rewrite the node's recorded chain."""
        if not self.recording:
            return
        assert self.record is not None
        chain = self.chain(node)
        if self._recorded_already(node, chain, signed, summary):
            chain.resent += 1
            return
        stored = self.record.append(
            node,
            instance,
            seq,
            summary.window_start_unix_nano,
            summary.window_end_unix_nano,
            received,
            signed.SerializeToString(),  # the signed bytes, as the agent sent them
        )
        if not stored:
            return
        chain.recorded += 1
        expected = (chain.seq + 1, chain.hash)
        if chain.seq and (summary.chain_seq, summary.prev_hash) != expected:
            chain.breaks += 1
            log.warning(
                "summary chain broken",
                extra={
                    "kv": {"node": node, "chain_seq": summary.chain_seq, "expected": expected[0]}
                },
            )
        chain.seq = summary.chain_seq
        chain.hash = chain_hash(signed.body)

    def _recorded_already(
        self, node: str, chain: Chain, signed: pb.SignedSummary, summary: pb.Summary
    ) -> bool:
        """True for a summary the record already holds; InvalidMessageError for one that
        would rewrite the node's recorded chain; False for a new one."""
        assert self.record is not None
        if not chain.loaded:
            # After a collector restart, the chain goes on from what the record holds.
            chain.loaded = True
            newest = self.record.recent(node, 1)
            if newest and not chain.seq:
                latest = pb.SignedSummary.FromString(newest[0])
                key = self.keys.key(node) if self.keys is not None else None
                # only the current key's chain goes on; a rotated key's starts afresh
                if key is not None and verify_summary(key, latest.body, latest.signature):
                    chain.seq = pb.Summary.FromString(latest.body).chain_seq
                    chain.hash = chain_hash(latest.body)
        if summary.chain_seq > chain.seq:
            return False
        for stored in self.record.recent(node, self.RESEND_HORIZON):
            earlier = pb.SignedSummary.FromString(stored).body
            if earlier == signed.body:
                return True
            if pb.Summary.FromString(earlier).chain_seq == summary.chain_seq:
                break  # same number, other content: a rewrite, refused below
        raise InvalidMessageError(
            f"summary {summary.chain_seq} of node {node} is not the one recorded under that number "
            f"(the recorded chain is at {chain.seq}): refused, so the record is not rewritten"
        )
