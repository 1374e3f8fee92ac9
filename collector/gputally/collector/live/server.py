"""The collector daemon: gRPC ingest (grpc.aio, one session per agent stream), the HTTP
endpoints, and the checkpoint signer, put together by :func:`serve`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gputally.cli.options import Address
from gputally.v1 import __version__
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc
from gputally.v1.signing import load_or_create_private_key

from ..record.keys import KeyStore
from ..record.ledger import CheckpointError, Ledger, LedgerStartError, publish_collector_key
from ..record.store import Record
from .metrics import make_app, make_registry, serve_http
from .state import ClusterState, IdentityConflictError, NotEnrolledError
from .validate import InvalidMessageError, TimeLimits

log = logging.getLogger("gputally.collector.ingest")

# gRPC server options, named and explained once.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Agents ping every 30 s on quiet streams; gRPC's default policy would answer such pings
    # with GOAWAY "too_many_pings" and cut the agents off. Accept pings down to 10 s apart.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Ping agents every 60 s ourselves, so a vanished node's session is closed within ~80 s.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 16 * 2**20),
)


async def _read(context: grpc.aio.ServicerContext) -> Any:
    """The stream's next message; a message that is not an AgentMessage ends the stream with
    INVALID_ARGUMENT and a reason (grpc would answer UNKNOWN, and log a traceback)."""
    try:
        return await context.read()
    except DecodeError:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "a message that is not a gputally.v1 AgentMessage"
        )


class IngestService(pb_grpc.IngestServicer):
    def __init__(self, state: ClusterState):
        self.state = state

    async def Stream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        first = await _read(context)
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on a stream must be a Hello"
            )
        hello = first.hello
        try:
            session, resume, recorded = self.state.open_session(hello)
        except IdentityConflictError as error:
            log.warning(
                "hello refused: duplicate GPU identity",
                extra={"kv": {"peer": context.peer(), "error": str(error)}},
            )
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except NotEnrolledError as error:
            log.warning(
                "hello refused", extra={"kv": {"peer": context.peer(), "error": str(error)}}
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        except InvalidMessageError as error:
            log.warning(
                "hello refused", extra={"kv": {"peer": context.peer(), "error": str(error)}}
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        log.info(
            "agent connected",
            extra={"kv": {"node": hello.node, "gpus": len(hello.gpus), "peer": context.peer()}},
        )
        try:
            self.state.intake.acknowledge()  # what the Welcome calls recorded is remembered
            await context.write(
                pb.CollectorMessage(
                    welcome=pb.Welcome(
                        collector_version=__version__,
                        resume_after_seq=resume,
                        recording=self.state.intake.recording,
                        recorded_chain_seq=recorded,
                    )
                )
            )
            while True:
                message = await _read(context)
                if message is grpc.aio.EOF:
                    return
                if not self.state.is_current(hello.node, session):
                    await context.abort(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"a newer stream from node {hello.node} replaced this one",
                    )
                if message.WhichOneof("body") != "batch":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "after the Hello, only report batches may be sent",
                    )
                await context.write(pb.CollectorMessage(ack=self._apply(hello.node, message.batch)))
        finally:
            self.state.close_session(hello.node, session)
            log.info("agent disconnected", extra={"kv": {"node": hello.node}})

    def _apply(self, node: str, batch: pb.ReportBatch) -> pb.Ack:
        ack = pb.Ack()
        for report in batch.reports:
            try:
                self.state.ingest(node, report)
            except InvalidMessageError as error:
                ack.rejections.add(seq=report.seq, reason=str(error))
                log.warning(
                    "report rejected",
                    extra={"kv": {"node": node, "seq": report.seq, "error": str(error)}},
                )
            ack.acked_seq = max(ack.acked_seq, report.seq)
        # what the record holds, not what was sent: the only number that lets an agent let go
        self.state.intake.acknowledge()
        ack.recorded_chain_seq = self.state.intake.recorded_seq(node)
        return ack


async def start(state: ClusterState, listen: Address | str) -> tuple[grpc.aio.Server, int]:
    """Start the ingest server; returns it and the port bound (useful with port 0)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_IngestServicer_to_server(IngestService(state), server)
    try:
        port = server.add_insecure_port(str(listen))
    except RuntimeError as error:  # grpcio raises RuntimeError when the bind fails
        raise OSError(f"cannot listen there ({error})") from None
    if port == 0:
        raise OSError("cannot listen there (the address is in use or not this host's)")
    await server.start()
    return server, port


@dataclass(frozen=True, slots=True)
class Settings:
    """What `gputally collector` runs with: its options, by their names."""

    grpc_listen: Address
    metrics_listen: Address
    expected_gpus: int | None
    window: float
    lag: float
    stale_after: float
    grace: float
    db: str
    keys: str
    trust_on_first_use: bool
    collector_key: str
    origin: str
    checkpoint_interval: float
    checkpoint_state: str = ""
    startup_check: str = "incremental"
    horizon: float = 7 * 86400.0
    max_skew: float = 300.0


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the collector until `stop` is set: ingest, /metrics, and, with a record and keys, a
    ledger whose checkpoints are signed every checkpoint_interval and once more at the end.
    OSError (naming the option) when a listener cannot be opened; nothing is left running."""
    s = settings
    latest = Path(s.checkpoint_state or f"{s.db}.checkpoint")
    if s.db and s.keys and latest.exists() and not Path(s.db).exists():
        raise LedgerStartError(
            f"{s.db}: no ledger, but {latest} remembers a signed checkpoint of it: restore the "
            "ledger (a new one would fork the log under the same key)"
        )
    record = Record(s.db) if s.db else None
    try:
        await _serve(s, record, stop)
    finally:
        if record is not None:
            record.close()


async def _serve(s: Settings, record: Record | None, stop: asyncio.Event) -> None:
    keys = KeyStore(s.keys, trust_on_first_use=s.trust_on_first_use) if s.keys else None
    if record is not None and keys is None:
        log.warning("no --keys: summaries cannot be verified, so none is recorded in %s", s.db)
    ledger = None
    if record is not None and keys is not None:
        key_path = Path(s.collector_key or f"{s.db}.key")
        latest = Path(s.checkpoint_state or f"{s.db}.checkpoint")
        ledger = Ledger(
            record,
            load_or_create_private_key(key_path),
            s.origin,
            latest,
            full_check=s.startup_check == "full",
        )
        publish_collector_key(ledger, Path(s.keys), key_path.parent)
    state = ClusterState(
        expected_gpus=s.expected_gpus,
        window=s.window,
        lag=s.lag,
        stale_after=s.stale_after,
        record=record,
        keys=keys,
        ledger=ledger,
        limits=TimeLimits(s.horizon, s.max_skew),
    )

    def ready() -> str:
        """Why the collector is not ready ("" when it is): stopping, or not recording."""
        if stop.is_set():
            return "stopping"
        if state.intake.stopped:
            return f"summaries are not being recorded: {state.intake.stopped}"
        return ""

    app = make_app(make_registry(state), ready=ready)
    try:
        http, _ = serve_http(app, s.metrics_listen)
    except OSError as error:
        raise OSError(f"--metrics-listen {s.metrics_listen}: {error.strerror or error}") from None
    try:
        try:
            server, grpc_port = await start(state, s.grpc_listen)
        except OSError as error:
            raise OSError(f"--grpc-listen {s.grpc_listen}: {error}") from None
        grpc_at = Address(s.grpc_listen.bind_host, grpc_port)
        metrics_at = Address(s.metrics_listen.bind_host, http.server_port)
        print(
            f"gputally collector: gRPC on {grpc_at}, metrics on http://{metrics_at}/metrics",
            file=sys.stderr,
            flush=True,
        )
        if s.expected_gpus is None:
            log.warning(
                "no --expected-gpus: ratios use the GPUs seen as the denominator, so GPUs that never report cannot lower them"
            )
        await _run(s, ledger, server, stop)
    finally:
        http.shutdown()
        http.server_close()


async def _run(
    s: Settings, ledger: Ledger | None, server: grpc.aio.Server, stop: asyncio.Event
) -> None:
    """Sign checkpoints until `stop`; then let the streams finish and cover what they sent."""

    async def checkpoints() -> None:
        while ledger is not None:
            try:
                await asyncio.to_thread(ledger.checkpoint, time.time())
            except CheckpointError as error:
                log.error("checkpoint refused", extra={"kv": {"error": str(error)}})
            await asyncio.sleep(s.checkpoint_interval)

    signer = asyncio.ensure_future(checkpoints())
    # The entries under the remembered checkpoint, rehashed while the collector runs.
    stopping = threading.Event()
    history = (
        asyncio.ensure_future(asyncio.to_thread(ledger.check_history, stopping))
        if ledger is not None and ledger.history is not None
        else None
    )
    try:
        await stop.wait()
    finally:
        stopping.set()
        signer.cancel()
        if history is not None:
            await history
        await server.stop(s.grace)
        if ledger is not None:
            with contextlib.suppress(CheckpointError):
                ledger.checkpoint(time.time())  # cover everything recorded before the stop
