"""Signed summaries into the record: signature, resend, and each node's chain.

A report may carry a summary its agent signed. The intake opens it (the signature must verify
with the node's enrolled key, the body must name the node and pass the summary checks), tells
a summary sent again (the agent's acknowledgement was lost) from a new one, and stores a new
one durably, verbatim, in the record. It follows each node's chain as it goes, so that a
summary that does not continue it (an evidence gap an auditor will see) is counted and
logged when it happens, not found months later.

Acknowledged means durable: the agent drops a summary only when `recorded_chain_seq` (in the
Welcome and every Ack) reaches it, and that number is read from what the record holds, never
from a report's sequence number, which any stream could send. A summary is refused when one of
its GPUs already has a recorded window that it overlaps, from this node or another (a card
counted twice), checked in the transaction that stores it (so across the shards of a shared
ledger too); when the ledger is damaged, none is recorded and none acknowledged, and the
agents keep them spooled until it is repaired (or, for a shared ledger's server that was out
of reach, until it answers again: then their agents are made to send them again, resume).

Without enrolled keys nothing can be verified, so nothing is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import card
from gputally.v1.signing import chain_hash, verify_summary

from ..record.keys import KeyStore
from ..record.ledger import Ledger
from ..record.store import CardWindow, OverlapError, Record, RecordError, RecordUnavailableError
from .validate import InvalidMessageError, TimeLimits, check_summary

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
    overlaps: int = 0  # summaries refused: a GPU's window overlapped one already recorded
    unrecorded: int = 0  # summaries not recorded (nor acknowledged): the intake was stopped
    # A summary of it went unrecorded (or what the record holds of it could not be read)
    # while the record's server was out of reach: when it is back, the node's stream is ended
    # so that its agent sends what it holds again, in order (SummaryIntake.resume).
    resend: bool = False


class IntakeStoppedError(RuntimeError):
    """The record cannot be extended consistently: the summary is not recorded and must not
    be acknowledged (its agent keeps it). Not the summary's fault: never a rejection."""


class SummaryIntake:
    # How far back a summary sent again is looked for in the record: an agent resends only
    # what was not acknowledged, which is the newest few (one per stream interruption).
    RESEND_HORIZON = 256

    def __init__(
        self,
        keys: KeyStore | None = None,
        record: Record | None = None,
        ledger: Ledger | None = None,
        limits: TimeLimits | None = None,
    ):
        self.keys = keys
        self.record = record
        self.ledger = ledger
        self.limits = limits or TimeLimits()
        self.chains: dict[str, Chain] = {}
        self.failure = ""  # why the record could not be written, once it could not
        # The failure is the record's server out of reach (a PostgreSQL ledger), not damage:
        # recording resumes when it answers again (resume).
        self.retryable = False

    @property
    def stopped(self) -> str:
        """Why no summary is recorded now ("" while they are): a damaged ledger or a failed
        write. /readyz and gputally_ledger_intake_stopped say so."""
        if not self.recording:
            return ""
        return self.failure or (self.ledger.broken if self.ledger is not None else "")

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
        chain.resend = False  # a new stream: its agent sends everything it holds again
        if self.keys is not None and chain.key != public_key:
            chain.key = public_key
            chain.seq, chain.hash, chain.loaded = 0, b"", False

    @property
    def waiting(self) -> bool:
        """Stopped only because the record's server was out of reach."""
        return bool(self.failure) and self.retryable

    def reachable(self) -> bool:
        """Whether the record's server answers (a statement, on a new connection when the
        old one is gone). Blocks: not on the event loop."""
        if self.record is None:
            return False
        try:
            self.record.count()
        except RecordError:
            return False
        return True

    def resume(self) -> bool:
        """After the record's server was out of reach and answers again (reachable): resume
        recording. The chains of the nodes whose summaries went unrecorded are read back from
        the record (an append that failed may have been committed or not), and their streams
        are ended (ClusterState.must_resend), so that their agents send again, in order, what
        the record lacks. Whether it resumed."""
        if not self.waiting:
            return False
        for chain in self.chains.values():
            if chain.resend:
                chain.seq, chain.hash, chain.loaded = 0, b"", False
        log.warning(
            "the ledger answers again: recording resumes", extra={"kv": {"was": self.failure}}
        )
        self.failure, self.retryable = "", False
        return True

    def acknowledge(self) -> None:
        """Everything recorded is about to be acknowledged: the ledger remembers, outside
        itself, the newest entry (so that losing it later is refused at start, not forgotten)."""
        if self.ledger is not None and self.record is not None and self.record.last_id:
            self.ledger.acknowledge(self.record.last_id)

    def recorded_seq(self, node: str) -> int:
        """The newest chain number of the node's current key the record holds (what the
        Welcome and every Ack tell its agent is safe); 0 when not recording."""
        if not self.recording:
            return 0
        chain = self.chain(node)
        try:
            self._load(node, chain)
        except RecordError as error:  # out of reach: nothing more is known to be recorded
            chain.resend = True
            self._failed(error)
        return chain.seq

    def open(
        self, node: str, signed: pb.SignedSummary, uuids: Mapping[int, str], now: float
    ) -> pb.Summary:
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
        check_summary(summary, uuids, now, self.limits)
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
        """Record an opened summary, durably, unless the record holds it already. Raises
        InvalidMessageError for one that would rewrite the node's recorded chain or count a
        GPU's seconds twice, IntakeStoppedError when nothing can be recorded now."""
        if not self.recording:
            return
        assert self.record is not None
        chain = self.chain(node)
        try:
            if self._recorded_already(node, chain, signed, summary):
                chain.resent += 1
                return
            if self.stopped:
                chain.unrecorded += 1
                chain.resend = True
                raise IntakeStoppedError(self.stopped)
            stored = self.record.append(
                node,
                instance,
                seq,
                summary.window_start_unix_nano,
                summary.window_end_unix_nano,
                received,
                signed.SerializeToString(),  # the signed bytes, as the agent sent them
                self._windows(summary),
            )
        except OverlapError as overlap:
            chain.overlaps += 1
            gpu = summary.gpus[overlap.index]
            start, held = summary.window_start_unix_nano, overlap.held
            whose = (
                "this node"
                if overlap.holder == node
                else f"node {overlap.holder} (a duplicate identity)"
            )
            raise InvalidMessageError(
                f"summary {summary.chain_seq}: GPU {gpu.uuid}'s window from {start / 1e9:.0f} "
                f"overlaps one {whose} recorded up to {held[1] / 1e9:.0f}: refused, so that "
                "no second of a GPU counts twice"
            ) from None
        except RecordError as error:
            chain.unrecorded += 1
            chain.resend = True
            # Stopped, even when only this append failed (it may or may not have been
            # committed): recording the node's next summary would tell its agent this one is
            # recorded too. Damage stops it for good; a server out of reach until it answers
            # again (resume), when these nodes' agents are made to send them again, in order,
            # and the record says which it holds. After a restart, the same.
            self._failed(error)
            raise IntakeStoppedError(str(error)) from None
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

    def _failed(self, error: RecordError) -> None:
        if not self.failure:
            self.failure = str(error)
            self.retryable = isinstance(error, RecordUnavailableError)
        elif not isinstance(error, RecordUnavailableError):
            self.failure, self.retryable = str(error), False  # damage outweighs an outage
        if self.ledger is not None and not isinstance(error, RecordUnavailableError):
            self.ledger.fail(str(error))  # damage: no checkpoint either

    @staticmethod
    def _windows(summary: pb.Summary) -> list[CardWindow]:
        """Each card's window in the summary, which the record checks against the card's
        latest recorded one (accounting.next_window) as it stores the summary: the same window
        sent again under a new chain number, or two nodes claiming one card, is refused."""
        start, end = summary.window_start_unix_nano, summary.window_end_unix_nano
        return [
            (card(gpu.uuid), start, end, gpu.present_seconds + gpu.lost_seconds, gpu.energy_joules)
            for gpu in summary.gpus
        ]

    def _load(self, node: str, chain: Chain) -> None:
        assert self.record is not None
        if not chain.loaded:
            # After a collector restart, the chain goes on from what the record holds
            # (loaded once read: a read that failed is tried again).
            newest = self.record.recent(node, 1)
            chain.loaded = True
            if newest and not chain.seq:
                latest = pb.SignedSummary.FromString(newest[0])
                key = self.keys.key(node) if self.keys is not None else None
                # only the current key's chain goes on; a rotated key's starts afresh
                if key is not None and verify_summary(key, latest.body, latest.signature):
                    chain.seq = pb.Summary.FromString(latest.body).chain_seq
                    chain.hash = chain_hash(latest.body)

    def _recorded_already(
        self, node: str, chain: Chain, signed: pb.SignedSummary, summary: pb.Summary
    ) -> bool:
        """True for a summary the record already holds; InvalidMessageError for one that
        would rewrite the node's recorded chain; False for a new one."""
        assert self.record is not None
        self._load(node, chain)
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
