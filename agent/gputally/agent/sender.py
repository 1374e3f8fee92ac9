"""Streams reports to the collector over one long-lived gRPC stream.

Sampling never waits for the network: :meth:`Sender.submit` only appends to a bounded outbox.
The stream sends what is in the outbox in batches, the collector acknowledges sequence numbers,
and acknowledged reports leave the outbox. After a reconnect everything not yet acknowledged is
sent again (the collector drops duplicates). When the outbox is full the oldest report is
dropped and counted: the collector then sees a gap, i.e. unobserved seconds, never invented data.
A report that carries a signed summary is dropped only when nothing else can be: summaries are
small, and they are the record auditors read.

A summary is let go only when the collector says its record holds it: a collector that keeps
a record (its Welcome says `recording`) reports the newest chain number recorded for this
node in every Ack, and a summary above it stays (in memory, and in the signer's spool) and is
sent again on the next stream, however many sequence numbers were acknowledged. Sequence
numbers can be sent by anyone; the recorded chain number comes from the record.

A stream speaks for the node only once the agent proves it holds the node's key: the
collector answers the Hello with a fresh Challenge, which the agent signs (`prove`). With
`tls`, the channel is TLS (and mutual TLS with a client certificate), its files read again at
every connection so that rotated certificates are picked up. A batch the collector finds too
big (RESOURCE_EXHAUSTED) makes the agent send half as many reports per batch from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from gputally.cli.tls import ClientFiles, TlsError
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc

log = logging.getLogger("gputally.agent.sender")

# gRPC channel options, named and explained once.
ChannelOptions = tuple[tuple[str, int | str], ...]
CHANNEL_OPTIONS: ChannelOptions = (
    # Collectors sharded behind one address (a DNS name with several addresses, a headless
    # Service, or "ipv4:a:p,b:p"): each stream's channel takes them in a random order and
    # streams to the first that answers, so agents spread over the shards, and one whose
    # shard died moves to another when it reconnects (gRFC A62: pick_first, shuffled).
    (
        "grpc.service_config",
        json.dumps({"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]}),
    ),
    # Its own connection, not one shared with the process's other channels to the same target:
    # a shared one would put every simulated node of `gputally simulate` on the shard that
    # answered first (a real agent has one channel at a time anyway).
    ("grpc.use_local_subchannel_pool", 1),
    # Ping the collector every 30 s on a quiet stream and give up after 10 s without an
    # answer, so that a dead collector or a dropped NAT entry is noticed in under a minute.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Big enough for a batch of hundreds of 8-GPU reports after a long outage.
    ("grpc.max_send_message_length", 16 * 2**20),
    ("grpc.max_receive_message_length", 16 * 2**20),
)
# A batch's bytes, at most: well under the collector's default message limit (4 MiB), so a
# backlog of large reports (many processes each) is split rather than refused.
MAX_BATCH_BYTES = 2**20


@dataclass(slots=True)
class SenderStats:
    submitted: int = 0
    sent: int = 0  # reports written to a stream (a resent report counts again)
    acked: int = 0
    rejected: int = 0
    dropped: int = 0  # lost because the outbox was full
    connects: int = 0
    connected: bool = False
    refused: bool = False  # the collector refused our hello; retried only at the slowest pace
    last_error: str = ""


# Statuses that retrying at once will not change: the Hello, the key or the certificate.
_REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
)


class CollectorRejectedError(RuntimeError):
    """The collector ended the stream for a reason retrying will not fix (bad hello, ...)."""


class Sender:
    def __init__(
        self,
        target: str,
        hello: Callable[[], pb.Hello],
        *,
        max_buffer: int = 3600,
        max_batch: int = 256,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        rng: random.Random | None = None,
        channel_options: ChannelOptions = CHANNEL_OPTIONS,
        on_acked: Callable[[pb.Report], None] | None = None,
        prove: Callable[[bytes, pb.Hello], bytes] | None = None,
        tls: ClientFiles | None = None,
    ):
        if max_buffer < 1 or max_batch < 1:
            raise ValueError("max_buffer and max_batch must be at least 1")
        self.target = target
        self._hello = hello
        self.max_buffer = max_buffer
        self.max_batch = max_batch
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._options = channel_options
        # e.g. drop a summary from the agent's spool: called once per report the collector is
        # done with (accepted, rejected, or its summary recorded)
        self._on_acked = on_acked
        # signs a Challenge's nonce for a Hello with the node's key (SummarySigner.prove)
        self._prove = prove
        self.tls = tls
        self.outbox: deque[pb.Report] = deque()
        # Reports acknowledged whose summary the collector has not recorded (its ledger was
        # damaged): sent again first on the next stream.
        self.unrecorded: deque[pb.Report] = deque()
        self._recording = False  # the collector's Welcome said it keeps a record
        self._sent_upto = 0  # highest seq written on the current stream
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._stop = asyncio.Event()  # an Event, not a bool: it changes while we await
        self.stats = SenderStats()

    # -- producer side ---------------------------------------------------------------------

    def submit(self, report: pb.Report) -> None:
        """Queue one report. Never blocks; call it on the sender's event loop."""
        if len(self.outbox) >= self.max_buffer:
            victim = next((r for r in self.outbox if not r.HasField("summary")), self.outbox[0])
            self.outbox.remove(victim)
            self.stats.dropped += 1
        self.outbox.append(report)
        self.stats.submitted += 1
        self._drained.clear()
        self._wakeup.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued report is acknowledged (or the timeout passes)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)
        return not self.outbox and not self.unrecorded

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()

    # -- stream side -----------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a stream open until stop(); reconnect with capped, jittered backoff."""
        failures = 0
        while not self._stop.is_set():
            welcomed = False
            try:
                welcomed = await self._session()
            except CollectorRejectedError as error:
                # Retrying at once will not help (bad node name, unknown key): say so loudly
                # and retry only at the slowest pace, in case the collector's policy changes.
                self.stats.last_error = str(error)
                self.stats.refused = True
                failures = 1 << 20
                log.error(
                    "collector refused this agent",
                    extra={"kv": {"collector": self.target, "error": str(error)}},
                )
            except grpc.aio.AioRpcError as error:
                self.stats.last_error = f"{error.code().name}: {error.details()}"
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and self.stats.connected:
                    # a batch beyond the collector's limits (not a stream limit at the
                    # Hello): smaller ones from now on
                    self.max_batch = max(1, self.max_batch // 2)
                log.warning(
                    "stream to collector lost",
                    extra={"kv": {"collector": self.target, "error": self.stats.last_error}},
                )
            except asyncio.InvalidStateError as error:
                # grpc.aio's write on a stream the collector's death has just finished ("RPC
                # already finished"): a lost stream like any other, to reconnect from.
                self.stats.last_error = f"stream finished: {error}"
                log.warning(
                    "stream to collector lost",
                    extra={"kv": {"collector": self.target, "error": self.stats.last_error}},
                )
            finally:
                self.stats.connected = False
            if self._stop.is_set():
                break
            failures = 1 if welcomed else min(failures + 1, 1 << 20)
            cap = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
            delay = cap / 2 + self._rng.uniform(
                0, cap / 2
            )  # jitter: agents don't reconnect in lockstep
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_stop(), delay)

    async def _wait_stop(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            await self._wakeup.wait()

    def _channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        try:
            credentials = self.tls.credentials()
        except TlsError as error:
            raise CollectorRejectedError(str(error)) from None
        options = (*self._options, *self.tls.options())
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    async def _handshake(self, call: grpc.aio.StreamStreamCall) -> pb.Welcome:
        """Hello, then (when challenged) the proof, then the Welcome."""
        hello = self._hello()
        await call.write(pb.AgentMessage(hello=hello))
        try:
            first = await call.read()
            if first is not grpc.aio.EOF and first.WhichOneof("body") == "challenge":
                if self._prove is None:
                    raise CollectorRejectedError(
                        "the collector asks this agent to prove its key, and it has none"
                    )
                signature = self._prove(first.challenge.nonce, hello)
                await call.write(pb.AgentMessage(proof=pb.Proof(signature=signature)))
                first = await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() in _REFUSALS:
                raise CollectorRejectedError(f"{error.code().name}: {error.details()}") from None
            raise
        if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
            raise CollectorRejectedError("the collector did not answer the hello with a welcome")
        return first.welcome  # type: ignore[no-any-return]

    async def _session(self) -> bool:
        """One stream's life. Returns whether the collector welcomed us."""
        async with self._channel() as channel:
            call = pb_grpc.IngestStub(channel).Stream()
            welcome = await self._handshake(call)
            self.stats.connects += 1
            self.stats.connected = True
            self.stats.last_error = ""
            self._recording = welcome.recording
            self._on_ack(welcome.resume_after_seq, (), welcome.recorded_chain_seq)
            # What was acknowledged but not recorded goes first, in sequence order, as the
            # summary alone: its samples were accepted already.
            self.outbox.extendleft(
                pb.Report(seq=r.seq, time_unix_nano=r.time_unix_nano, summary=r.summary)
                for r in reversed(self.unrecorded)
            )
            self.unrecorded.clear()
            self._sent_upto = 0  # a new stream: resend everything not yet acknowledged
            log.info("connected to collector", extra={"kv": {"collector": self.target}})
            reader = asyncio.ensure_future(self._read_acks(call))
            try:
                await self._write_loop(call, reader)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader
                call.cancel()
            return True

    async def _write_loop(
        self, call: grpc.aio.StreamStreamCall, reader: asyncio.Future[None]
    ) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                await call.write(pb.AgentMessage(batch=pb.ReportBatch(reports=batch)))
                self._sent_upto = batch[-1].seq
                self.stats.sent += len(batch)
                continue
            self._wakeup.clear()
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wakeup.wait())
            both: set[asyncio.Future[Any]] = {waiter, reader}
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if reader in done:
                reader.result()  # raises the stream's error, if any
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "collector closed the stream",
                )

    def _next_batch(self) -> list[pb.Report]:
        """The next reports to send: at most max_batch of them and MAX_BATCH_BYTES (one
        report at least, whatever its size)."""
        batch: list[pb.Report] = []
        size = 0
        for report in self.outbox:
            if report.seq <= self._sent_upto:
                continue
            size += report.ByteSize()
            if batch and (len(batch) >= self.max_batch or size > MAX_BATCH_BYTES):
                break
            batch.append(report)
        return batch

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            if message.WhichOneof("body") == "ack":
                ack = message.ack
                self._on_ack(ack.acked_seq, ack.rejections, ack.recorded_chain_seq)

    def _on_ack(
        self, acked_seq: int, rejections: Iterable[pb.Rejection], recorded_chain_seq: int
    ) -> None:
        rejected = set()
        first: pb.Rejection | None = None
        for rejection in rejections:
            rejected.add(rejection.seq)
            self.stats.rejected += 1
            first = first or rejection
        if first is not None:  # one line per acknowledgement, however many it rejects
            log.error(
                "collector rejected reports",
                extra={"kv": {"rejected": len(rejected), "seq": first.seq, "reason": first.reason}},
            )
        while self.outbox and self.outbox[0].seq <= acked_seq:
            report = self.outbox.popleft()
            self.stats.acked += 1
            if report.seq not in rejected and self._unrecorded(report, recorded_chain_seq):
                self.unrecorded.append(report)
            elif self._on_acked is not None:
                self._on_acked(report)
        for report in [r for r in self.unrecorded if not self._unrecorded(r, recorded_chain_seq)]:
            self.unrecorded.remove(report)
            if self._on_acked is not None:
                self._on_acked(report)
        if not self.outbox and not self.unrecorded:
            self._drained.set()

    def _unrecorded(self, report: pb.Report, recorded_chain_seq: int) -> bool:
        """Whether a report's summary is not yet in the collector's record (by its word)."""
        if not self._recording or not report.HasField("summary"):
            return False
        return pb.Summary.FromString(report.summary.body).chain_seq > recorded_chain_seq
