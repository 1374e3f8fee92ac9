"""gRPC ingest: one session per agent stream (grpc.aio)."""

from __future__ import annotations

import logging

import grpc

from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc

from . import __version__
from .state import ClusterState, InvalidMessageError, NotEnrolledError

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


class IngestService(pb_grpc.IngestServicer):
    def __init__(self, state: ClusterState):
        self.state = state

    async def Stream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on a stream must be a Hello"
            )
        hello = first.hello
        try:
            session, resume = self.state.open_session(hello)
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
            await context.write(
                pb.CollectorMessage(
                    welcome=pb.Welcome(collector_version=__version__, resume_after_seq=resume)
                )
            )
            while True:
                message = await context.read()
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
        return ack


async def start(state: ClusterState, listen: str) -> tuple[grpc.aio.Server, int]:
    """Start the ingest server; returns it and the port bound (useful with port 0)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_IngestServicer_to_server(IngestService(state), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as error:  # grpcio raises RuntimeError when the bind fails
        raise OSError(f"could not listen for gRPC on {listen}: {error}") from None
    if port == 0:
        raise OSError(f"could not listen for gRPC on {listen}")
    await server.start()
    return server, port
