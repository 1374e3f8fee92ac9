"""The collector daemon: gRPC ingest (grpc.aio, one session per agent stream), the HTTP
endpoints, and the checkpoint signer, put together by :func:`serve`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gputally.cli.options import Address
from gputally.cli.options import address as options_address
from gputally.cli.tls import ServerFiles, TlsError, is_loopback, peer_names, server_credentials
from gputally.cli.web import serve_http
from gputally.v1 import __version__
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc
from gputally.v1.signing import (
    NONCE_BYTES,
    PUBLIC_KEY_BYTES,
    load_or_create_private_key,
    verify_stream,
)

from ..record.keys import KeyStore
from ..record.ledger import CheckpointError, Ledger, LedgerStartError, publish_collector_key
from ..record.store import Record, beside, display, missing
from ..record.witnessing import WitnessConfigError, Witnesses, read_witnesses
from .metrics import HEALTH_PATHS, make_app, make_registry
from .state import ClusterState, IdentityConflictError, NotEnrolledError, UnauthenticatedError
from .validate import (
    MAX_NODE_NAME,
    InvalidMessageError,
    LimitError,
    Limits,
    TimeLimits,
    check_hello,
)

log = logging.getLogger("gputally.collector.ingest")

# gRPC server options, named and explained once (the message size is Limits').
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Agents ping every 30 s on quiet streams; gRPC's default policy would answer such pings
    # with GOAWAY "too_many_pings" and cut the agents off. Accept pings down to 10 s apart.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Ping agents every 60 s ourselves, so a vanished node's session is closed within ~80 s.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
# One collector per port unless --share-port: grpc shares a port between processes by default
# (SO_REUSEPORT), so a second collector started by mistake took half the streams silently.
SHARED_PORT = ("grpc.so_reuseport", 1)
OWN_PORT = ("grpc.so_reuseport", 0)
# Reports validated and applied between two yields to the event loop: one batch of a
# thousand reports must not hold up every other stream (and the scrapes' lock) until done.
SLICE = 32
# A stream whose last REJECTED_BATCHES batches were rejected whole is ended: it sends nothing
# that counts, and each of its batches costs the collector a core for milliseconds.
REJECTED_BATCHES = 3
# The span over which a peer's refused streams are counted (Limits.max_refusals_per_peer).
REFUSAL_WINDOW_S = 10.0


class _Refused(Exception):
    """Ends a stream with a status: raised inside the session, turned into an abort once."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def _read(context: grpc.aio.ServicerContext, timeout: float | None = None) -> Any:
    """The stream's next message; a message that is not an AgentMessage ends the stream with
    INVALID_ARGUMENT and a reason (grpc would answer UNKNOWN, and log a traceback)."""
    try:
        if timeout is None:
            return await context.read()
        return await asyncio.wait_for(context.read(), timeout)
    except DecodeError:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "a message that is not a gputally.v1 AgentMessage"
        ) from None
    except TimeoutError:
        raise _Refused(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no Hello (and Proof) within {timeout:g} s of opening the stream (--hello-timeout)",
        ) from None


def peer_host(peer: str) -> str:
    """The address part of grpc's peer string ("ipv4:10.0.0.7:5123", "ipv6:[::1]:5123";
    grpc writes the brackets of IPv6 percent-encoded: "ipv6:%5B::1%5D:5123")."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer  # unix sockets and the like: one peer each


class IngestService(pb_grpc.IngestServicer):
    """One session per agent stream. Before any of a stream's reports can count, it passes,
    in this order: the stream limits (in total and per peer address), its Hello within
    --hello-timeout, the Hello's checks and limits, the client certificate's name (mutual
    TLS), the proof that it holds the Hello's key, and the node's enrolment. Every refusal is
    a precise status with a reason, logged once, never a traceback."""

    def __init__(
        self,
        state: ClusterState,
        *,
        client_names: bool = False,
        hello_timeout: float | None = None,
    ):
        self.state = state
        self.sizes = state.sizes
        # mutual TLS: the client certificate must name the Hello's node
        self.client_names = client_names
        self.hello_timeout = self.sizes.hello_timeout if hello_timeout is None else hello_timeout
        self.streams = 0  # welcomed: speaking for a node
        self.pending = 0  # opened, not yet welcomed (Hello, Proof)
        self.by_peer: dict[str, int] = {}
        # peer -> (start of its refusal window, streams refused in it)
        self.refusals: dict[str, tuple[float, int]] = {}
        # node -> the task of the stream speaking for it, so that it can be ended from outside
        # (end_for_resend); the tasks so ended, for their handlers to say why
        self.handlers: dict[str, asyncio.Task[Any]] = {}
        self.ending: set[asyncio.Task[Any]] = set()

    def end_for_resend(self) -> int:
        """End the streams of the nodes whose summaries went unrecorded while the ledger was
        out of reach, now that it answers (ClusterState.must_resend): each with UNAVAILABLE,
        so that its agent reconnects and sends them again, in order. How many were ended."""
        ended = 0
        for node, task in list(self.handlers.items()):
            if task not in self.ending and self.state.must_resend(node):
                self.ending.add(task)
                task.cancel()
                ended += 1
        return ended

    async def Stream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        peer = peer_host(context.peer())
        node = ""
        welcomed = False
        self.pending += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        try:
            if self._throttled(peer):
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {self.sizes.max_refusals_per_peer} streams from {peer} were "
                    f"refused in {REFUSAL_WINDOW_S:g} s (--max-refusals-per-peer): retry later",
                )
            # Streams that have not proven anything yet have their own, smaller budget, so
            # that a flood of them cannot take the places of the nodes' streams.
            if self.pending > self.sizes.max_pending_streams:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.pending - 1} streams are opening (no Welcome yet), the limit "
                    f"(--max-pending-streams {self.sizes.max_pending_streams}); retry later",
                )
            if self.by_peer[peer] > self.sizes.max_streams_per_peer:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.by_peer[peer] - 1} streams are open from {peer}, the limit per "
                    f"address (--max-streams-per-peer {self.sizes.max_streams_per_peer})",
                )
            named: list[str] = []  # the Hello's node, for the log of a refusal
            try:
                hello, session, resume, recorded = await self._open(context, named)
            finally:
                node = named[0] if named else ""
            node = hello.node
            if self.streams >= self.sizes.max_streams:
                self.state.close_session(node, session)
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the collector has {self.streams} streams open, its limit "
                    f"(--max-streams {self.sizes.max_streams}); retry later",
                )
            self.pending -= 1
            self.streams += 1
            welcomed = True
            log.info(
                "agent connected",
                extra={"kv": {"node": node, "gpus": len(hello.gpus), "peer": context.peer()}},
            )
            task = asyncio.current_task()
            assert task is not None
            self.handlers[node] = task
            try:
                await self._session(context, hello, session, resume, recorded)
            except asyncio.CancelledError:
                if task not in self.ending:
                    raise
                self.ending.discard(task)
                task.uncancel()
                raise _Refused(
                    grpc.StatusCode.UNAVAILABLE,
                    "the ledger answers again after an outage: reconnect, and send the "
                    "summaries it has not recorded again, in order",
                ) from None
            finally:
                if self.handlers.get(node) is task:
                    del self.handlers[node]
                self.state.close_session(node, session)
                log.info("agent disconnected", extra={"kv": {"node": node}})
        except _Refused as refusal:
            self.state.refused_stream(refusal.code.name)
            quiet = self._count_refusal(peer)  # past the peer's limit: not logged
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "stream refused",
                extra={
                    "kv": {
                        "peer": context.peer(),
                        "node": node,
                        "status": refusal.code.name,
                        "error": refusal.reason,
                    }
                },
            )
            await context.abort(refusal.code, refusal.reason)
        finally:
            if welcomed:
                self.streams -= 1
            else:
                self.pending -= 1
            self.by_peer[peer] -= 1
            if not self.by_peer[peer]:
                del self.by_peer[peer]

    def _throttled(self, peer: str) -> bool:
        start, count = self.refusals.get(peer, (0.0, 0))
        return (
            count > self.sizes.max_refusals_per_peer and time.monotonic() - start < REFUSAL_WINDOW_S
        )

    def _count_refusal(self, peer: str) -> bool:
        """Count a refused stream of `peer`; True when its refusals are no longer logged (one
        line says so when that starts)."""
        now = time.monotonic()
        start, count = self.refusals.get(peer, (now, 0))
        if now - start >= REFUSAL_WINDOW_S:
            start, count = now, 0
        count += 1
        self.refusals[peer] = (start, count)
        if len(self.refusals) > 2 * self.sizes.max_streams:  # bounded: forget the quiet ones
            self.refusals = {
                p: v for p, v in self.refusals.items() if now - v[0] < REFUSAL_WINDOW_S
            }
        limit = self.sizes.max_refusals_per_peer
        if count == limit + 1:
            log.warning(
                "streams refused in a loop: refused at once, and no longer logged",
                extra={"kv": {"peer": peer, "refused": count, "seconds": REFUSAL_WINDOW_S}},
            )
        return count > limit

    async def _open(
        self, context: grpc.aio.ServicerContext, named: list[str]
    ) -> tuple[pb.Hello, int, int, int]:
        """The Hello, its proof of possession, and the session it opens: within one
        --hello-timeout from the stream's start, however the client paces them."""
        deadline = time.monotonic() + self.hello_timeout
        first = await _read(context, self.hello_timeout)
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on a stream must be a Hello"
            )
        hello = first.hello
        named.append(hello.node[:MAX_NODE_NAME])
        try:
            check_hello(hello, self.sizes)
        except LimitError as error:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except InvalidMessageError as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if self.client_names:
            names = peer_names(dict(context.auth_context()))
            if hello.node not in names:
                raise _Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"hello from {hello.node}: the client certificate is for "
                    f"{', '.join(sorted(names)) or 'no name'}, not this node",
                )
        proven = False
        if hello.protocol_revision >= 2 and hello.public_key:
            proven = await self._prove(context, hello, deadline)
        try:
            session, resume, recorded = self.state.open_session(hello, proven=proven)
        except LimitError as error:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except InvalidMessageError as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except UnauthenticatedError as error:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None
        except NotEnrolledError as error:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        except IdentityConflictError as error:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None
        return hello, session, resume, recorded

    async def _prove(
        self, context: grpc.aio.ServicerContext, hello: pb.Hello, deadline: float
    ) -> bool:
        """Challenge the stream to sign a fresh nonce with the Hello's key."""
        if len(hello.public_key) != PUBLIC_KEY_BYTES:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hello from {hello.node}: public_key must be {PUBLIC_KEY_BYTES} bytes of Ed25519",
            )
        nonce = os.urandom(NONCE_BYTES)
        await context.write(pb.CollectorMessage(challenge=pb.Challenge(nonce=nonce)))
        answer = await _read(context, max(deadline - time.monotonic(), 0.001))
        if answer is grpc.aio.EOF or answer.WhichOneof("body") != "proof":
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "after a Challenge the agent's next message must be its Proof",
            )
        if not verify_stream(
            hello.public_key, answer.proof.signature, nonce, hello.node, hello.instance_id
        ):
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"hello from {hello.node}: the proof does not verify with the Hello's public "
                "key: this stream does not hold that key's private half",
            )
        return True

    async def _session(
        self,
        context: grpc.aio.ServicerContext,
        hello: pb.Hello,
        session: int,
        resume: int,
        recorded: int,
    ) -> None:
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
        rejected_whole = 0  # consecutive batches none of whose reports counted
        while True:
            message = await _read(context)
            if message is grpc.aio.EOF:
                return
            if not self.state.is_current(hello.node, session):
                raise _Refused(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"a newer stream from node {hello.node} replaced this one",
                )
            if message.WhichOneof("body") != "batch":
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "after the Welcome, only report batches may be sent",
                )
            reports = message.batch.reports
            if len(reports) > self.sizes.max_batch_reports:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a batch of {len(reports)} reports, more than --max-batch-reports "
                    f"{self.sizes.max_batch_reports}: send smaller batches",
                )
            ack = await self._apply(hello.node, session, reports)
            await context.write(pb.CollectorMessage(ack=ack))  # first: it lets them go
            whole = bool(reports) and len(ack.rejections) == len(reports)
            rejected_whole = rejected_whole + 1 if whole else 0
            if rejected_whole >= REJECTED_BATCHES:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"node {hello.node}: the last {REJECTED_BATCHES} batches were rejected "
                    f"whole ({ack.rejections[0].reason}): stream ended",
                )

    async def _apply(self, node: str, session: int, reports: Sequence[pb.Report]) -> pb.Ack:
        """Every report of a batch, SLICE at a time with the event loop let go in between;
        the rejections are logged once for the batch, with their count and the first reason."""
        ack = pb.Ack()
        for i, report in enumerate(reports):
            if i and not i % SLICE:
                await asyncio.sleep(0)
                if not self.state.is_current(node, session):
                    break  # superseded mid-batch: the new stream resends the rest
            try:
                self.state.ingest(node, report)
            except InvalidMessageError as error:
                ack.rejections.add(seq=report.seq, reason=str(error))
            ack.acked_seq = max(ack.acked_seq, report.seq)
        if ack.rejections:
            first = ack.rejections[0]
            log.warning(
                "reports rejected",
                extra={
                    "kv": {
                        "node": node,
                        "rejected": len(ack.rejections),
                        "of": len(reports),
                        "first_seq": first.seq,
                        "error": first.reason,
                    }
                },
            )
        # what the record holds, not what was sent: the only number that lets an agent let go
        self.state.intake.acknowledge()
        ack.recorded_chain_seq = self.state.intake.recorded_seq(node)
        return ack


@dataclass(frozen=True, slots=True)
class Tls:
    """The gRPC listener's TLS (gputally.cli.tls): none, or a certificate and key, and for
    mutual TLS the CA of the agents' client certificates."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""


async def start(
    state: ClusterState,
    listen: Address | str,
    tls: Tls = Tls(),
    *,
    insecure: bool = False,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, int, IngestService]:
    """Start the ingest server; returns it, the port bound (useful with port 0) and the
    service. Plaintext only on a loopback address, unless `insecure`: on any other, tenants
    sharing the network could read and forge the stream. `share_port`: other processes of
    this user may bind the port too (shards on one machine). TlsError for unusable files,
    OSError when it cannot listen."""
    address = listen if isinstance(listen, Address) else options_address(str(listen))
    if not tls.cert and not insecure and not is_loopback(address.host):
        raise OSError(
            "plaintext gRPC is refused on a non-loopback address: give --tls-cert and "
            "--tls-key (`gputally ca` makes them), or --insecure to accept anyone on the network"
        )
    if bool(tls.cert) != bool(tls.key) or (tls.client_ca and not tls.cert):
        raise TlsError("--tls-cert and --tls-key go together, and --tls-client-ca needs both")
    sizes = state.sizes
    server = grpc.aio.server(
        options=(
            *SERVER_OPTIONS,
            SHARED_PORT if share_port else OWN_PORT,
            ("grpc.max_receive_message_length", sizes.max_message_bytes),
            # streams on one connection: an agent needs one; more than one peer may open are
            # refused before they reach the collector's code
            ("grpc.max_concurrent_streams", min(sizes.max_streams_per_peer + 8, 2**31 - 1)),
            # a TLS or HTTP/2 handshake not done in 10 s is dropped (grpc's default: 120 s)
            ("grpc.server_handshake_timeout_ms", 10_000),
        )
    )
    service = IngestService(state, client_names=bool(tls.client_ca))
    pb_grpc.add_IngestServicer_to_server(service, server)
    try:
        if tls.cert:
            credentials = server_credentials(ServerFiles(tls.cert, tls.key, tls.client_ca))
            port = server.add_secure_port(str(address), credentials)
        else:
            port = server.add_insecure_port(str(address))
    except RuntimeError as error:  # grpcio raises RuntimeError when the bind fails
        raise OSError(f"cannot listen there ({error})") from None
    if port == 0:
        raise OSError("cannot listen there (the address is in use or not this host's)")
    await server.start()
    return server, port, service


_LIMITS = Limits()  # the defaults


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
    live_backlog: float = 3600.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False
    web_config_file: str = ""
    metrics_refresh: float = 0.0
    node_metrics: str = "all"
    max_message_bytes: int = _LIMITS.max_message_bytes
    max_batch_reports: int = _LIMITS.max_batch_reports
    max_gpus: int = _LIMITS.max_gpus
    max_string: int = _LIMITS.max_string
    max_items: int = _LIMITS.max_items
    max_streams: int = _LIMITS.max_streams
    max_pending_streams: int = _LIMITS.max_pending_streams
    max_streams_per_peer: int = _LIMITS.max_streams_per_peer
    max_nodes: int = _LIMITS.max_nodes
    evict_after: float = _LIMITS.evict_after
    hello_timeout: float = _LIMITS.hello_timeout
    max_refusals_per_peer: int = _LIMITS.max_refusals_per_peer
    max_models: int = _LIMITS.max_models
    max_xid_codes: int = _LIMITS.max_xid_codes
    witnesses: str = ""
    witness_ca: str = ""
    witness_timeout: float = 10.0
    share_port: bool = False
    record_retry: float = 5.0

    @property
    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the collector until `stop` is set: ingest, /metrics, and, with a record and keys, a
    ledger whose checkpoints are signed every checkpoint_interval and once more at the end.
    OSError (naming the option) when a listener cannot be opened; nothing is left running."""
    s = settings
    # Before anything is made: a collector that cannot listen (another one holds the port)
    # must leave no ledger, key or published collector.vkey behind (that one would replace the
    # running collector's for its auditors).
    _can_listen(s.metrics_listen, s.grpc_listen, s.share_port)
    latest = Path(s.checkpoint_state or f"{s.db}.checkpoint")
    if s.db and s.keys and latest.exists() and missing(s.db):
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


def _can_listen(metrics: Address, grpc_at: Address, shared: bool) -> None:
    """OSError naming the option when the listeners could not open now, each tried as it
    binds: /metrics on one socket (IPv6 when its host has a ":", as serve_http binds it),
    gRPC on any of its host's addresses (one is enough for grpc), SO_REUSEPORT only for
    --share-port. The sockets listen and stay open until both are tried, so that one port
    given to both is refused too. A process binding meanwhile is left to the listeners."""
    held: list[socket.socket] = []

    def probe(family: int, where: Any, reuse_port: bool) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        held.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as both listeners do
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
        sock.listen()

    try:
        try:
            family = socket.AF_INET6 if ":" in metrics.bind_host else socket.AF_INET
            probe(family, (metrics.bind_host, metrics.port), False)
        except OSError as error:
            raise OSError(f"--metrics-listen {metrics}: {error.strerror or error}") from None
        try:
            found = socket.getaddrinfo(
                grpc_at.bind_host, grpc_at.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            failed: OSError | None = None
            for family, _, _, _, where in found:
                try:
                    probe(family, where, shared)
                    failed = None
                    break
                except OSError as error:
                    failed = failed or error
            if failed is not None:
                raise failed
        except OSError as error:
            raise OSError(f"--grpc-listen {grpc_at}: {error.strerror or error}") from None
    finally:
        for sock in held:
            sock.close()


async def _serve(s: Settings, record: Record | None, stop: asyncio.Event) -> None:
    keys = KeyStore(s.keys, trust_on_first_use=s.trust_on_first_use) if s.keys else None
    if record is not None and keys is None:
        log.warning(
            "no --keys: summaries cannot be verified, so none is recorded in %s", display(s.db)
        )
    ledger = None
    key_dir: Path | None = None  # the private key's directory: collector.vkey's fallback
    if record is not None and keys is not None:
        key_path = Path(s.collector_key or beside(s.db, ".key", "--collector-key"))
        latest = Path(s.checkpoint_state or beside(s.db, ".checkpoint", "--checkpoint-state"))
        ledger = Ledger(
            record,
            load_or_create_private_key(key_path),
            s.origin,
            latest,
            full_check=s.startup_check == "full",
        )
        key_dir = key_path.parent
    witnesses = None
    if s.witnesses:
        if ledger is None:
            raise WitnessConfigError(
                "--witnesses: witnesses cosign checkpoints: give --db and --keys"
            )
        witnesses = Witnesses(
            read_witnesses(Path(s.witnesses)),
            ledger.record,
            timeout=s.witness_timeout,
            ca_file=s.witness_ca,
        )
    state = ClusterState(
        expected_gpus=s.expected_gpus,
        window=s.window,
        lag=s.lag,
        stale_after=s.stale_after,
        record=record,
        keys=keys,
        ledger=ledger,
        limits=TimeLimits(s.horizon, s.max_skew, s.live_backlog),
        sizes=s.limits,
    )

    started = threading.Event()  # both listeners up, the checkpoint key published

    def ready() -> str:
        """Why the collector is not ready ("" when it is): starting (/metrics answers before
        gRPC listens), stopping, or not recording."""
        if stop.is_set():
            return "stopping"
        if not started.is_set():
            return "starting"
        if state.intake.stopped:
            return f"summaries are not being recorded: {state.intake.stopped}"
        return ""

    registry = make_registry(
        state,
        witnesses,
        (lambda: ledger.last_size) if ledger is not None else None,
        (lambda: ledger.signing) if ledger is not None else None,
        node_series=s.node_metrics == "all",
    )
    app = make_app(registry, ready=ready, refresh=s.metrics_refresh)
    try:
        # health checks need no password (probes have none), but get TLS like the rest
        http, _ = serve_http(
            app, s.metrics_listen, s.web_config_file, open_paths=frozenset(HEALTH_PATHS)
        )
    except OSError as error:
        raise OSError(f"--metrics-listen {s.metrics_listen}: {error.strerror or error}") from None
    try:
        try:
            server, grpc_port, service = await start(
                state,
                s.grpc_listen,
                Tls(s.tls_cert, s.tls_key, s.tls_client_ca),
                insecure=s.insecure,
                share_port=s.share_port,
            )
        except OSError as error:
            raise OSError(f"--grpc-listen {s.grpc_listen}: {error}") from None
        if ledger is not None and key_dir is not None:  # only by a collector that is up
            publish_collector_key(ledger, Path(s.keys), key_dir)
        started.set()
        grpc_at = Address(s.grpc_listen.bind_host, grpc_port)
        metrics_at = Address(s.metrics_listen.bind_host, http.server_port)
        scheme = "https" if s.web_config_file and _web_tls(s.web_config_file) else "http"
        print(
            f"gputally collector: gRPC{' (TLS)' if s.tls_cert else ''} on {grpc_at}, "
            f"metrics on {scheme}://{metrics_at}/metrics",
            file=sys.stderr,
            flush=True,
        )
        if state.keys is None:
            log.warning(
                "no --keys: live figures come from unauthenticated streams "
                "(gputally_cluster_unauthenticated_nodes)"
            )
        if s.expected_gpus is None:
            log.warning(
                "no --expected-gpus: ratios use the GPUs seen as the denominator, so GPUs that never report cannot lower them"
            )
        await _run(s, state, ledger, server, stop, witnesses, service)
    finally:
        http.shutdown()
        http.server_close()


def _web_tls(path: str) -> bool:
    from gputally.cli.web import load_web_config

    return load_web_config(path).tls is not None


async def _run(
    s: Settings,
    state: ClusterState,
    ledger: Ledger | None,
    server: grpc.aio.Server,
    stop: asyncio.Event,
    witnesses: Witnesses | None = None,
    service: IngestService | None = None,
) -> None:
    """Sign checkpoints until `stop`; then let the streams finish and cover what they sent.
    Each new checkpoint goes to the witnesses (and, at start, the newest one, to any witness
    behind it). Meanwhile nodes idle for --evict-after are forgotten, so memory follows the
    live fleet."""

    def witness(wait: float) -> None:
        """Send the newest checkpoint to the witnesses behind it, waiting at most `wait`:
        never long, since a witness must not hold up signing or stopping."""
        if (
            witnesses is not None
            and ledger is not None
            and ledger.last_note
            and not ledger.broken
            and witnesses.behind(ledger.last_size)
        ):
            witnesses.submit(ledger.last_note, ledger.consistency, wait=wait)

    async def evictions() -> None:
        while True:
            await asyncio.sleep(min(60.0, s.evict_after))
            state.evict()

    async def reconnections() -> None:
        """While recording waits for the ledger's server (a PostgreSQL --db out of reach),
        try it every --record-retry; /readyz says why it waits meanwhile."""
        while True:
            await asyncio.sleep(s.record_retry)
            if state.intake.waiting and await asyncio.to_thread(state.resume_recording):
                ended = service.end_for_resend() if service is not None else 0
                log.warning(
                    "streams ended for their agents to resend", extra={"kv": {"streams": ended}}
                )

    async def checkpoints() -> None:
        while ledger is not None:
            try:
                await asyncio.to_thread(ledger.checkpoint, time.time())
            except CheckpointError as error:
                log.error("checkpoint refused", extra={"kv": {"error": str(error)}})
            witness(0.0)  # starts the requests on threads of their own, returns at once
            await asyncio.sleep(s.checkpoint_interval)

    signer = asyncio.ensure_future(checkpoints())
    evictor = asyncio.ensure_future(evictions())
    reconnector = asyncio.ensure_future(reconnections())
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
        evictor.cancel()
        reconnector.cancel()
        if history is not None:
            await history
        await server.stop(s.grace)
        if ledger is not None:
            with contextlib.suppress(CheckpointError):
                ledger.checkpoint(time.time())  # cover everything recorded before the stop
            # one last round for the final checkpoint, bounded by one witness's timeout
            await asyncio.to_thread(witness, s.witness_timeout)
