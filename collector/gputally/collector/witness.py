"""`gputally witness`: the daemon an outside party runs (the funder, a regulator, a tenant) to
cosign a centre's checkpoints, so that the centre cannot later roll its ledger back or show
two histories.

It speaks C2SP tlog-witness (POST /add-checkpoint) and cosigns in C2SP tlog-cosignature v1
(record/witnessing.py has both formats). For each log it knows (the collectors' verifier
keys, `--logs`), it keeps the latest checkpoint it cosigned, durably, in its own SQLite file,
and cosigns a new one only when its signature verifies and a consistency proof from that
checkpoint does. A rollback (an older size), a fork (the same size, another root) or a proof
that fails is refused, and, being signed by the log, kept as evidence (`witness show`).

Its view is only as good as its state file: `serve` refuses to run without the file `init`
made (a witness that lost its state would cosign a rolled-back log), and the file is written
with full synchronisation before a cosignature is returned. Nothing here imports the
collector's live path or the agent: the witness is a separate party's program.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gputally.cli.options import FAILED, Address, address, fail

log = logging.getLogger("gputally.witness")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The latest checkpoint cosigned for each log: all a witness must remember.
CREATE TABLE IF NOT EXISTS logs (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    cosignature TEXT NOT NULL,
    timestamp INTEGER NOT NULL
);
-- Forks: a checkpoint the log signed for a size this witness cosigned, with another root.
-- Two signed roots for one size cannot both be honest, whoever sends them, so each (origin,
-- size, root) is kept once, as evidence against the log. A smaller checkpoint (stale, or
-- replayed: anyone can resend an old one) or a bad proof attached to a good checkpoint proves
-- nothing against the log, and is answered (409, 422) but not kept.
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    at REAL NOT NULL,
    status INTEGER NOT NULL,
    why TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS refused_once ON refused (origin, why);
"""
DEFAULT_LISTEN = "127.0.0.1:9473"


class WitnessError(RuntimeError):
    """The witness cannot run with this key, state or configuration; the message says why."""


class Answer(tuple[int, str, bytes]):
    """(HTTP status, content type, body)."""

    __slots__ = ()

    def __new__(cls, status: int, body: str | bytes, content_type: str = "text/plain") -> Answer:
        data = body.encode() if isinstance(body, str) else body
        return super().__new__(cls, (status, content_type, data))


class WitnessState:
    """The witness's durable view: one row per log, updated in one transaction with the check."""

    def __init__(self, path: Path, *, create: bool = False):
        if not create and not path.exists():
            raise WitnessError(
                f"{path}: no witness state; `gputally witness init` makes it. A witness that lost "
                "its state must not start afresh (it would cosign a rolled-back log): restore it"
            )
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as error:
            raise WitnessError(f"{path}: not a witness state: {error}") from None
        self.path = path
        self.lock = threading.Lock()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def latest(self, origin: str) -> tuple[int, bytes, str, str, int] | None:
        """(size, root, note, cosignature, timestamp) of the log's latest cosigned checkpoint."""
        row = self.db.execute(
            "SELECT size, root, note, cosignature, timestamp FROM logs WHERE origin = ?", (origin,)
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), bytes(row[1]), str(row[2]), str(row[3]), int(row[4])

    def logs(self) -> list[tuple[str, int, bytes, int]]:
        rows = self.db.execute("SELECT origin, size, root, timestamp FROM logs ORDER BY origin")
        return [(str(o), int(s), bytes(r), int(t)) for o, s, r, t in rows]

    def refusals(self) -> list[tuple[str, float, int, str]]:
        rows = self.db.execute("SELECT origin, at, status, why FROM refused ORDER BY id")
        return [(str(o), float(a), int(s), str(w)) for o, a, s, w in rows]

    def refuse(self, origin: str, status: int, why: str, body: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO refused (origin, at, status, why, body) VALUES (?, ?, ?, ?, ?)",
            (origin, time.time(), status, why, body),
        )


class WitnessService:
    """The add-checkpoint logic, apart from HTTP: `add(body)` -> Answer."""

    def __init__(
        self,
        state: WitnessState,
        key: Any,
        name: str,
        logs: dict[str, bytes],
        clock: Callable[[], float] = time.time,
    ):
        self.state = state
        self.key = key
        self.name = name
        self.logs = logs  # origin -> the log's Ed25519 public key
        self.clock = clock

    def add(self, body: bytes) -> Answer:
        from .record import merkle
        from .record.ledger import CheckpointError, open_note, split_note
        from .record.witnessing import (
            SIZE_CONTENT_TYPE,
            RequestError,
            cosign,
            parse_add_checkpoint,
        )

        try:
            old, proof, note = parse_add_checkpoint(body)
            text, _ = split_note(note)
        except (RequestError, CheckpointError) as error:
            return Answer(400, f"{error}\n")
        origin = text.split("\n", 1)[0]
        log_key = self.logs.get(origin)
        if log_key is None:
            return Answer(404, f"unknown log {origin[:100]!r}\n")
        try:
            _, size, root = open_note(note, origin, log_key)
        except CheckpointError as error:
            return Answer(403, f"{error}\n")
        if old > size:
            return Answer(400, f"old size {old} is larger than the checkpoint's {size}\n")
        if size >= 1 << 63:
            return Answer(400, "a tree size is below 2^63\n")
        with self.state.lock:
            db = self.state.db
            db.execute("BEGIN IMMEDIATE")
            try:
                held = self.state.latest(origin)
                latest = held[0] if held is not None else 0
                answer: Answer | None = None
                if old != latest:
                    # the log's idea of what we cosigned is not ours: it learns our size (a
                    # smaller checkpoint is refused the same way: we never go back)
                    answer = Answer(409, f"{latest}\n", SIZE_CONTENT_TYPE)
                elif held is not None and old == size and held[1] != root:
                    answer = Answer(409, f"fork: another root for size {size}\n")
                    why = f"fork: another root at size {size}: {base64.b64encode(root).decode()}"
                    self.state.refuse(origin, 409, why, body)
                elif old == 0 and proof:
                    answer = Answer(400, "the consistency proof from size 0 is empty\n")
                elif held is not None and 0 < old < size:
                    try:
                        merkle.verify_consistency(old, size, held[1], root, proof)
                    except merkle.ProofError as error:
                        answer = Answer(422, f"{error}\n")
                if answer is None:
                    timestamp = max(int(self.clock()), held[4] if held is not None else 0)
                    line = cosign(text, self.name, self.key, timestamp)
                    db.execute(
                        "INSERT OR REPLACE INTO logs"
                        " (origin, size, root, note, cosignature, timestamp)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (origin, size, root, note, line, timestamp),
                    )
                    answer = Answer(200, line)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        if answer[0] == 200:
            log.info("cosigned", extra={"kv": {"origin": origin, "size": size}})
        else:
            log.warning(
                "refused",
                extra={"kv": {"origin": origin, "status": answer[0], "why": answer[2].decode()}},
            )
        return answer

    def checkpoint(self, origin: str) -> Answer:
        """The latest checkpoint cosigned for `origin`, with this witness's cosignature: what
        an auditor passes to `audit verify --against`."""
        held = self.state.latest(origin)
        if held is None:
            return Answer(404, f"no checkpoint of {origin[:100]!r} was cosigned here\n")
        return Answer(200, held[2] + held[3])


def make_app(service: WitnessService) -> Callable[..., Iterable[bytes]]:
    from .record.witnessing import MAX_REQUEST_BYTES

    reasons = {
        200: "200 OK",
        400: "400 Bad Request",
        403: "403 Forbidden",
        404: "404 Not Found",
        405: "405 Method Not Allowed",
        409: "409 Conflict",
        411: "411 Length Required",
        413: "413 Content Too Large",
        422: "422 Unprocessable Entity",
    }

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/add-checkpoint":
            if method != "POST":
                answer = Answer(405, "POST a checkpoint here (C2SP tlog-witness)\n")
            else:
                try:
                    length = int(environ.get("CONTENT_LENGTH") or "")
                except ValueError:
                    length = -1
                if length < 0:
                    answer = Answer(411, "a Content-Length is needed\n")
                elif length > MAX_REQUEST_BYTES:
                    answer = Answer(413, f"at most {MAX_REQUEST_BYTES} bytes\n")
                else:
                    answer = service.add(environ["wsgi.input"].read(length))
        elif path == "/checkpoint" and method == "GET":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            origin = (query.get("origin") or [""])[0]
            answer = service.checkpoint(origin)
        elif path == "/healthz":
            answer = Answer(200, "ok\n")
        else:
            answer = Answer(
                404, "not found: POST /add-checkpoint, GET /checkpoint?origin=..., /healthz\n"
            )
        status, content_type, body = answer
        start_response(reasons.get(status, f"{status} Error"), [("Content-Type", content_type)])
        return [body]

    return app


# -- the command -------------------------------------------------------------------------------


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    witness: argparse.ArgumentParser = sub.add_parser(
        "witness",
        help="cosign a collector's checkpoints as an outside party (C2SP tlog-witness)",
        description="A witness, run by a party the audited centre does not control, cosigns each "
        "checkpoint the collector sends it after checking that it extends the last one it cosigned "
        "(a consistency proof), and refuses rollbacks and forks. Auditors then verify the ledger "
        "against the witness's latest checkpoint (`audit verify --against`), which the centre "
        "cannot take back. Start with `init`, give the printed key to the collector's "
        "--witnesses file and to the auditors, then `serve`.",
    )
    commands = witness.add_subparsers(dest="witness_command", metavar="WITNESS_COMMAND")
    commands.required = True
    init = commands.add_parser(
        "init",
        help="make the witness's key and state, print its verifier key",
        description="Create the witness's Ed25519 key (never overwritten) and its state file, and "
        "print the verifier key that collectors and auditors configure.",
    )
    _key_options(init)
    init.add_argument(
        "--name",
        required=True,
        help="the witness's name in its cosignatures, e.g. witness.funder.example/gputally "
        "(printable ASCII, no spaces or '+')",
    )
    init.set_defaults(handler=run_init)
    serve = commands.add_parser(
        "serve",
        help="serve POST /add-checkpoint and GET /checkpoint?origin=...",
        description="Cosign the checkpoints of the logs in --logs, over HTTP (or HTTPS with "
        "--web-config-file). GET /checkpoint?origin=ORIGIN gives the latest cosigned checkpoint "
        "of a log, for `audit verify --against`.",
    )
    _key_options(serve)
    serve.add_argument(
        "--logs",
        default="",
        metavar="FILE",
        help="the logs this witness cosigns: their verifier keys, one per line (each "
        "collector's collector.vkey); # comments",
    )
    serve.add_argument(
        "--listen",
        type=address,
        default=address(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help="where to serve (default: %(default)s)",
    )
    serve.add_argument(
        "--web-config-file",
        default="",
        metavar="YAML",
        help="TLS and basic auth, in the Prometheus exporter-toolkit format (default: plain HTTP)",
    )
    serve.set_defaults(handler=run_serve)
    show = commands.add_parser(
        "show",
        help="the logs this witness has cosigned, and the forks it keeps as evidence",
        description="List each log's latest cosigned checkpoint and every fork seen (a checkpoint "
        "the log signed with another root for a size this witness cosigned; exit 1 if any). "
        "With --origin, print that log's latest cosigned checkpoint in full, for `audit verify "
        "--against`.",
    )
    show.add_argument(
        "--state", default="witness.db", metavar="PATH", help="(default: %(default)s)"
    )
    show.add_argument("--origin", default="", help="print this log's latest cosigned checkpoint")
    show.set_defaults(handler=run_show)
    return {"witness": witness}


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        default="witness.key",
        metavar="PATH",
        help="the witness's Ed25519 private key, mode 0600 (default: %(default)s)",
    )
    parser.add_argument(
        "--state",
        default="witness.db",
        metavar="PATH",
        help="the witness's durable view of every log (SQLite); back it up, never lose it "
        "(default: %(default)s)",
    )


def run_init(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError, load_or_create_private_key, public_bytes

    from .record.ledger import check_origin
    from .record.witnessing import witness_key_text

    key_path, state_path = Path(args.key), Path(args.state)
    try:
        check_origin(args.name)
    except ValueError as error:
        return fail("witness init", f"--name: {error}")
    if key_path.exists() or state_path.exists():
        existing = key_path if key_path.exists() else state_path
        return fail("witness init", f"{existing} exists: a witness is made once, never remade")
    try:
        key = load_or_create_private_key(key_path)
        state = WitnessState(state_path, create=True)
        vkey = witness_key_text(args.name, public_bytes(key))
        state.set_meta("name", args.name)
        state.set_meta("vkey", vkey)
        Path(f"{key_path}.vkey").write_text(vkey + "\n")
    except (OSError, KeyFileError, WitnessError) as error:
        return fail("witness init", str(error))
    print(vkey)
    print(f"wrote {key_path} (keep it secret), {key_path}.vkey and {state_path}", file=sys.stderr)
    return 0


def _open(args: argparse.Namespace) -> tuple[WitnessState, Any, str]:
    """The state and the key, checked to belong together."""
    from gputally.v1.signing import load_or_create_private_key, public_bytes

    from .record.witnessing import witness_key_text

    state = WitnessState(Path(args.state))
    name, vkey = state.meta("name"), state.meta("vkey")
    if name is None or vkey is None:
        raise WitnessError(f"{args.state}: not made by `gputally witness init`")
    if not Path(args.key).exists():
        raise WitnessError(f"{args.key}: no such key (the witness's key, made by `witness init`)")
    key = load_or_create_private_key(Path(args.key))
    if witness_key_text(name, public_bytes(key)) != vkey:
        raise WitnessError(f"{args.key} is not the key of the witness whose state is {args.state}")
    return state, key, name


def read_logs(path: Path) -> dict[str, bytes]:
    """origin -> public key, from a file of collector verifier keys; ValueError."""
    from .record.ledger import parse_verifier_key

    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"--logs {path}: {error.strerror or error}") from None
    logs: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            name, key = parse_verifier_key(line)
        except ValueError as error:
            raise ValueError(f"--logs {path}: line {number}: {error}") from None
        if name in logs:
            raise ValueError(f"--logs {path}: line {number}: the log {name} has a key already")
        logs[name] = key
    if not logs:
        raise ValueError(f"--logs {path}: no log's verifier key in the file")
    return logs


def run_serve(args: argparse.Namespace) -> int:
    from gputally.cli.web import WebConfigError, serve_http
    from gputally.v1.signing import KeyFileError

    if not args.logs:
        return fail("witness serve", "--logs FILE: the verifier keys of the logs to cosign")
    try:
        state, key, name = _open(args)
        logs = read_logs(Path(args.logs))
        service = WitnessService(state, key, name, logs)
        server, _ = serve_http(
            make_app(service),
            args.listen,
            args.web_config_file,
            name="gputally-witness",
            open_paths=frozenset({"/healthz"}),
        )
    except (WitnessError, KeyFileError, ValueError, WebConfigError) as error:
        return fail("witness serve", str(error))
    except OSError as error:
        return fail("witness serve", f"--listen {args.listen}: {error.strerror or error}")
    print(
        f"gputally witness {name}: cosigning {len(logs)} log(s) on "
        f"{Address(args.listen.bind_host, server.server_port)}",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def run_show(args: argparse.Namespace) -> int:
    try:
        state = WitnessState(Path(args.state))
    except WitnessError as error:
        return fail("witness show", str(error))
    if args.origin:
        held = state.latest(args.origin)
        if held is None:
            return fail("witness show", f"no checkpoint of {args.origin!r} was cosigned", FAILED)
        sys.stdout.write(held[2] + held[3])
        return 0
    print(f"witness {state.meta('name')}: {state.meta('vkey')}")
    for origin, size, root, timestamp in state.logs():
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
        print(f"  {origin}: size {size:,}, root {base64.b64encode(root).decode()}, cosigned {when}")
    refusals = state.refusals()
    for origin, at, status, why in refusals:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        print(f"  FORK {when} {origin} (HTTP {status}): {why}")
    return FAILED if refusals else 0
