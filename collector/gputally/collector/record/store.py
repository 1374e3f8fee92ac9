"""The collector's durable record: every summary an agent sent, verbatim, in a database.

Append-only by design: rows are inserted, never updated or deleted, and each holds the
summary's bytes as received, so that the audit trail can later chain, sign and Merkle-hash the
same rows without a second store. A summary is durable before the collector acknowledges the
report that carried it.

`Record` is the interface, with two engines: one SQLite file (WAL, full synchronisation), the
embedded default, and a PostgreSQL database (record/postgres.py) that several collectors,
the shards of one cluster, append to at once. `Record(location)` opens either: a
`postgresql://` (or `postgres://`) URL names a PostgreSQL ledger, anything else a file. Both
give the same rows, byte for byte: the auditor's tools read them the same way and trust
neither more than the other (a database is storage; the entries and the keys are the proof).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gputally.cli.options import UNAVAILABLE, USAGE
from gputally.v1.accounting import Window, next_window

from .merkle import leaf_hash

SCHEMA = """
CREATE TABLE IF NOT EXISTS summaries (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    instance INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    window_start_ns INTEGER NOT NULL,
    window_end_ns INTEGER NOT NULL,
    received REAL NOT NULL,
    body BLOB NOT NULL,
    leaf BLOB NOT NULL,  -- RFC 9162 leaf hash of body: the entry's place in the Merkle log
    UNIQUE (node, instance, seq)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    note TEXT NOT NULL,  -- the signed note (C2SP tlog-checkpoint)
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS summaries_by_window ON summaries (window_end_ns, window_start_ns);
CREATE TABLE IF NOT EXISTS inventory (
    since REAL NOT NULL,
    expected INTEGER NOT NULL
);
-- Witnesses' cosignatures (C2SP tlog-cosignature) of the checkpoint of each size: signature
-- lines by outside parties, kept as they came; the auditor checks them with the witnesses'
-- keys, so a row here proves nothing by being here.
CREATE TABLE IF NOT EXISTS cosignatures (
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    witness TEXT NOT NULL,
    line TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    UNIQUE (size, line)
);
-- An index, not evidence: the tree's frontier at each checkpoint (merkle.Frontier), and the
-- checkpoint's last entry, from which a consistency proof to a later size is made reading only
-- the entries added since (merkle.consistency_proof_extending).
CREATE TABLE IF NOT EXISTS frontiers (
    size INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    peaks BLOB NOT NULL
);
-- Facts fixed when the ledger was created (its origin), never changed after.
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- An index, not evidence: each card's latest recorded window (accounting.next_window) and
-- the node that recorded it, kept in the same transaction as the entries, so that a window
-- of the same card (from any node) that would count a second twice is refused at once,
-- across collector restarts. `uuid` is the card's key (accounting.card).
CREATE TABLE IF NOT EXISTS gpu_windows (
    uuid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    covered REAL NOT NULL,
    joules REAL NOT NULL
);
"""

# One card's part of a summary: (card key, window start ns, window end ns, covered seconds,
# joules); and a row of the GPU window index: (card key, node, start, end, covered, joules).
CardWindow = tuple[str, int, int, float, float]
IndexRow = tuple[str, str, int, int, float, float]


class RecordError(RuntimeError):
    """The record cannot be read or written (missing, not a gputally record, damaged, or
    the disk failed); the message says which ledger and why, in one line."""

    exit_code = USAGE


class RecordUnavailableError(RecordError):
    """The ledger's database server cannot be reached, or refused the connection (down,
    network, authentication, no such database): nothing is known of the ledger, nothing was
    changed, and trying again later may work."""

    exit_code = UNAVAILABLE


class RecordInUseError(RecordUnavailableError):
    """Another collector is writing this SQLite ledger: two would each sequence and sign a log
    of their own in one file. Nothing was opened or changed."""


class SigningLostError(RecordError):
    """This collector no longer holds the role of signing the shared ledger's checkpoints
    (its connection dropped, so the database let another shard take it): the checkpoint was
    not stored. Not damage: another shard goes on signing."""


class OverlapError(ValueError):
    """A card's window that would count a second twice (accounting.next_window), from this
    node or another: the summary is refused and nothing is stored."""

    def __init__(self, index: int, holder: str, held: Window):
        super().__init__(f"card {index} overlaps the window {held} recorded by {holder}")
        self.index = index  # which of the summary's card windows
        self.holder = holder  # the node whose window it overlaps
        self.held = held


def is_url(location: str | Path) -> bool:
    """Whether a ledger location is a PostgreSQL URL (else it is a SQLite file)."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def display(location: str | Path) -> str:
    """A ledger location as messages and reports show it: a URL without its password."""
    if not is_url(location):
        return str(location)
    assert isinstance(location, str)
    try:
        parts = urlsplit(location)
        users, at, hosts = parts.netloc.rpartition("@")
        netloc = f"{users.partition(':')[0]}@{hosts}" if at else hosts
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:  # not a URL urllib can take apart: none of it is shown
        return f"{location.partition('://')[0]}://(unreadable URL)"


def beside(location: str | Path, suffix: str, option: str) -> Path:
    """The default path of a file kept beside a SQLite ledger (its key, its checkpoint
    state); RecordError for a PostgreSQL ledger, which has no directory to keep it in."""
    if is_url(location):
        raise RecordError(
            f"{option}: a PostgreSQL ledger ({display(location)}) has no directory to keep it "
            f"beside: give {option} (a path on this collector's own disk)"
        )
    return Path(f"{location}{suffix}")


def missing(location: str | Path) -> bool:
    """Whether a SQLite ledger's file is not there. A PostgreSQL ledger is never missing: its
    tables are made when absent, and the Ledger then refuses what a remembered checkpoint says
    they lack."""
    return not is_url(location) and not Path(location).exists()


def advance_windows(
    node: str, windows: Sequence[CardWindow], held: dict[str, tuple[str, Window]]
) -> list[IndexRow]:
    """The GPU window index's new rows once a summary of `node` with these card windows is
    counted, given each card's latest recorded (node, window); OverlapError for a card whose
    window would count a second twice. Each card is taken against what the record held before
    the summary, as the index is written once per summary."""
    rows: list[IndexRow] = []
    for index, (key, start, end, covered, joules) in enumerate(windows):
        holder, latest = held.get(key, (node, None))
        window = next_window(latest, start, end, covered, joules)
        if window is None:
            assert latest is not None
            raise OverlapError(index, holder, latest)
        rows.append((key, node, *window))
    return rows


def signed64(value: int) -> int:
    # SQL integers are signed 64-bit; agent instance ids are unsigned 64-bit.
    return value - (1 << 64) if value >= 1 << 63 else value


def clamp64(t: int) -> int:
    # a period past 2262 (in ns) is clamped to what a 64-bit column holds, not an overflow
    return max(min(t, 2**63 - 1), -(2**63))


class Record:
    """The record's interface. `Record(location)` opens the engine the location names (as
    pathlib's Path gives the class of its platform), so that every caller, test and tool
    opens a ledger one way whatever it is stored in.

    Entries are numbered by the record, gap-free, in the order they were appended, and become
    visible in that order: an entry's id is its place in the Merkle log."""

    where: str  # how messages name the ledger: its path, or its URL without the password
    last_id: int  # the id of the newest entry this process appended
    shared = False  # whether several collectors may append to it at once (shards)

    def __new__(cls, location: str | Path, *, readonly: bool = False) -> Record:
        if cls is Record:
            if is_url(location):
                from .postgres import PostgresRecord

                return super().__new__(PostgresRecord)
            return super().__new__(SqliteRecord)
        return super().__new__(cls)

    def close(self) -> None:
        raise NotImplementedError

    def reader(self) -> Record:
        """The same ledger opened again, read-only, on a connection of its own."""
        raise NotImplementedError

    def command(self, statement: str) -> str:
        """How a person runs one SQL statement on this ledger (for messages)."""
        raise NotImplementedError

    def signer(self) -> bool:
        """Whether this collector may sign the ledger's checkpoints now: always on a ledger
        of one collector; on a shared one, while this collector holds the signing role, which
        it takes when it is free (see record/postgres.py)."""
        raise NotImplementedError

    def append(
        self,
        node: str,
        instance: int,
        seq: int,
        window_start_ns: int,
        window_end_ns: int,
        received: float,
        body: bytes,
        windows: Sequence[CardWindow] = (),
    ) -> bool:
        """Store one summary durably (committed and synced when this returns), and advance its
        cards' latest windows (`windows`: its card windows) in the same transaction, which
        refuses the summary (OverlapError, nothing stored) when one of them would count a
        second twice. False when it was already stored (a resent report). RecordError when it
        cannot be written."""
        raise NotImplementedError

    def index_windows(self, rows: list[IndexRow]) -> None:
        """Fill the GPU window index from scratch (a ledger written before it existed)."""
        raise NotImplementedError

    def indexed(self) -> bool:
        """Whether the GPU window index covers the entries (it is empty only when they are)."""
        raise NotImplementedError

    def has_entry(self, entry: int) -> bool:
        raise NotImplementedError

    def meta(self, key: str) -> str | None:
        raise NotImplementedError

    def set_meta(self, key: str, value: str) -> None:
        """Fix a fact of the ledger; one already fixed stays as it was (the first writer
        wins: read it back)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make the ledger's main storage hold everything recorded so far (best effort)."""
        raise NotImplementedError

    def append_many(self, rows: list[tuple[str, int, int, int, int, float, bytes]]) -> None:
        """Store many summaries in one transaction (bulk loads; the collector appends one by
        one)."""
        raise NotImplementedError

    def recent(self, node: str, limit: int) -> list[bytes]:
        """The stored bytes of the node's newest `limit` summaries, newest first."""
        raise NotImplementedError

    def entries(self, after_id: int | None = None) -> Iterator[tuple[int, str, bytes, bytes]]:
        """(id, node, body, stored leaf hash) of every entry after `after_id` (of every row,
        without one: ids of 0 or below, which the collector never writes, are rows too, and
        an auditor must see them), in log order. RecordError when a damaged page stops the
        read."""
        raise NotImplementedError

    def add_checkpoint(self, size: int, root: bytes, note: str, created: float) -> None:
        raise NotImplementedError

    def checkpoint_times(self) -> dict[int, float]:
        """size -> when the collector says it signed the checkpoint of that size (its own
        clock: a claim, which witnesses' cosignatures can confirm)."""
        raise NotImplementedError

    def add_frontier(self, size: int, last_id: int, peaks: list[bytes]) -> None:
        raise NotImplementedError

    def frontier_at(self, size: int) -> tuple[int, list[bytes]] | None:
        """(last entry id, peaks) of the tree at a checkpointed `size`; None when not kept."""
        raise NotImplementedError

    def leaves(self, after_id: int, limit: int) -> list[bytes]:
        """The stored leaf hashes of the `limit` entries after `after_id`, in log order."""
        raise NotImplementedError

    def add_cosignature(self, size: int, witness: str, line: str, timestamp: int) -> None:
        raise NotImplementedError

    def cosignatures(self) -> list[tuple[int, str, str]]:
        """(size, witness name, signature line) of every cosignature kept, oldest first."""
        raise NotImplementedError

    def checkpoints(self, after_id: int | None = None) -> list[tuple[int, int, bytes, str]]:
        """(id, size, root, signed note) of every checkpoint (after the row `after_id`),
        oldest first."""
        raise NotImplementedError

    def declare_inventory(self, expected: int, since: float) -> None:
        raise NotImplementedError

    def inventory_at(self, when: float) -> int | None:
        """The declared inventory in force at `when` (else the earliest one declared)."""
        raise NotImplementedError

    def summaries(self, start_ns: int, end_ns: int) -> Iterator[tuple[str, bytes]]:
        """(node, summary bytes) of every summary whose window overlaps [start, end)."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def span(self) -> tuple[int, int] | None:
        raise NotImplementedError


def _no_table(error: sqlite3.Error) -> bool:
    """A table a ledger written by an older collector lacks (read-only readers cannot add
    it): read as empty."""
    return isinstance(error, sqlite3.OperationalError) and "no such table" in str(error)


def _blob(value: object) -> bytes:
    """A stored blob as bytes. SQLite lets any column hold any type, so a damaged or edited
    row may hold text or NULL where bytes belong: the checks then fail on its bytes, rather
    than the reader on its type."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return b"" if value is None else str(value).encode()


def _integer(value: object) -> int:
    """A stored integer as an int, -1 when a damaged or edited row holds something else."""
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return -1


class SqliteRecord(Record):
    """The record in one SQLite file, the embedded default: one collector appends to it
    (SQLite serialises writers, but a second collector on one file would sign a second log).
    A writer holds an exclusive lock on `<file>.lock` while open, so that a second collector
    started on the same file (a copy of a unit, a typo in a port) is refused at once rather
    than found by the audit. Readers (audit, query) take no lock. The lock guards against
    mistakes, not the centre: a forked log is what checkpoints and witnesses catch."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.where = str(self.path)
        self._lockfile: TextIO | None = None
        if readonly and not self.path.exists():
            raise RecordError(f"{self.path}: no such record (the collector's --db file)")
        if not readonly:
            self._lockfile = self._take_lock()
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
                )
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(SCHEMA)
            self._db.execute("SELECT count(*) FROM summaries").fetchone()
        except sqlite3.Error as error:
            self._release()
            raise RecordError(f"{self.path}: not a gputally record: {error}") from None
        self._lock = threading.Lock()
        self.last_id = 0

    def _take_lock(self) -> TextIO:
        """The writer's lock: flock on a file beside the ledger (not on the ledger itself,
        whose POSIX locks are SQLite's own; flock is released when the process dies, so a
        crash leaves nothing to clean up). The file holds the holder's process id, for the
        message a second writer gets."""
        lock = Path(f"{self.path}.lock")
        try:
            handle = open(lock, "a+")  # noqa: SIM115 - held open for the record's lifetime
        except OSError as error:
            raise RecordError(f"{lock}: cannot open the ledger's lock file: {error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RecordInUseError(
                f"{self.path}: another collector is writing this ledger (process {holder} "
                f"holds {lock}); an SQLite ledger has one collector: several collectors share "
                "a PostgreSQL --db"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def _release(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def _damaged(self, error: sqlite3.Error) -> RecordError:
        return RecordError(f"{self.path}: the record cannot be read or written: {error}")

    def close(self) -> None:
        self._db.close()
        self._release()

    def reader(self) -> Record:
        return SqliteRecord(self.path, readonly=True)

    def command(self, statement: str) -> str:
        return f'sqlite3 {self.path} "{statement}"'

    def signer(self) -> bool:
        return True

    def append(
        self,
        node: str,
        instance: int,
        seq: int,
        window_start_ns: int,
        window_end_ns: int,
        received: float,
        body: bytes,
        windows: Sequence[CardWindow] = (),
    ) -> bool:
        with self._lock:
            try:
                # IMMEDIATE: the write lock first, so that the windows read are those the
                # summary is checked against when it is written
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    rows = advance_windows(node, windows, self._held([w[0] for w in windows]))
                except OverlapError:
                    self._db.execute("ROLLBACK")
                    raise
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO summaries"
                    " (node, instance, seq, window_start_ns, window_end_ns, received, body, leaf)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        node,
                        signed64(instance),
                        seq,
                        window_start_ns,
                        window_end_ns,
                        received,
                        body,
                        leaf_hash(body),
                    ),
                )
                stored = cursor.rowcount == 1
                if stored:
                    self.last_id = int(cursor.lastrowid or 0)
                if stored and rows:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO gpu_windows"
                        " (uuid, node, start_ns, end_ns, covered, joules) VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise self._damaged(error) from None
            return stored

    def _held(self, cards: list[str]) -> dict[str, tuple[str, Window]]:
        """card -> (node, its latest window) of those cards the record has."""
        if not cards:
            return {}
        rows = self._db.execute(
            "SELECT uuid, node, start_ns, end_ns, covered, joules FROM gpu_windows"
            f" WHERE uuid IN ({','.join('?' * len(cards))})",
            cards,
        ).fetchall()
        return {
            str(u): (str(n), (int(w0), int(w1), float(c), float(j))) for u, n, w0, w1, c, j in rows
        }

    def index_windows(self, rows: list[IndexRow]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO gpu_windows"
                " (uuid, node, start_ns, end_ns, covered, joules) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")

    def indexed(self) -> bool:
        with self._lock:
            has_index = self._db.execute("SELECT 1 FROM gpu_windows LIMIT 1").fetchone()
            has_entries = self._db.execute("SELECT 1 FROM summaries LIMIT 1").fetchone()
        return has_index is not None or has_entries is None

    def has_entry(self, entry: int) -> bool:
        with self._lock:
            try:
                row = self._db.execute("SELECT 1 FROM summaries WHERE id = ?", (entry,)).fetchone()
            except sqlite3.Error as error:
                raise self._damaged(error) from None
        return row is not None

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def sync(self) -> None:
        """Move the WAL's pages into the database file, so that the .db file alone (a copy
        taken without its -wal) holds everything recorded so far. Best effort: a reader
        holding the WAL makes it a partial move, never a loss."""
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def append_many(self, rows: list[tuple[str, int, int, int, int, float, bytes]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO summaries"
                " (node, instance, seq, window_start_ns, window_end_ns, received, body, leaf)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(n, signed64(i), s, w0, w1, r, b, leaf_hash(b)) for n, i, s, w0, w1, r, b in rows],
            )
            self._db.execute("COMMIT")

    def recent(self, node: str, limit: int) -> list[bytes]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT body FROM summaries WHERE node = ? ORDER BY id DESC LIMIT ?",
                    (node, limit),
                ).fetchall()
            except sqlite3.Error as error:
                raise self._damaged(error) from None
        return [_blob(body) for (body,) in rows]

    def entries(self, after_id: int | None = None) -> Iterator[tuple[int, str, bytes, bytes]]:
        where, bound = ("WHERE id > ? ", (after_id,)) if after_id is not None else ("", ())
        try:
            for i, node, body, leaf in self._db.execute(
                f"SELECT id, node, body, leaf FROM summaries {where}ORDER BY id", bound
            ):
                yield int(i), str(node), _blob(body), _blob(leaf)
        except sqlite3.Error as error:
            raise self._damaged(error) from None

    def add_checkpoint(self, size: int, root: bytes, note: str, created: float) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO checkpoints (size, root, note, created) VALUES (?, ?, ?, ?)",
                    (size, root, note, created),
                )
            except sqlite3.Error as error:
                raise self._damaged(error) from None

    def checkpoint_times(self) -> dict[int, float]:
        with self._lock:
            try:
                rows = self._db.execute("SELECT size, created FROM checkpoints").fetchall()
            except sqlite3.Error as error:
                raise self._damaged(error) from None
        out: dict[int, float] = {}
        for size, created in rows:
            with contextlib.suppress(TypeError, ValueError):
                out.setdefault(int(size), float(created))
        return out

    def add_frontier(self, size: int, last_id: int, peaks: list[bytes]) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO frontiers (size, last_id, peaks) VALUES (?, ?, ?)",
                    (size, last_id, b"".join(peaks)),
                )
            except sqlite3.Error as error:
                raise self._damaged(error) from None

    def frontier_at(self, size: int) -> tuple[int, list[bytes]] | None:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT last_id, peaks FROM frontiers WHERE size = ?", (size,)
                ).fetchone()
            except sqlite3.Error as error:
                if _no_table(error):
                    return None
                raise self._damaged(error) from None
        if row is None:
            return None
        blob = _blob(row[1])
        return int(row[0]), [blob[i : i + 32] for i in range(0, len(blob), 32)]

    def leaves(self, after_id: int, limit: int) -> list[bytes]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT leaf FROM summaries WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
                ).fetchall()
            except sqlite3.Error as error:
                raise self._damaged(error) from None
        return [_blob(leaf) for (leaf,) in rows]

    def add_cosignature(self, size: int, witness: str, line: str, timestamp: int) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO cosignatures (size, witness, line, timestamp)"
                    " VALUES (?, ?, ?, ?)",
                    (size, witness, line, timestamp),
                )
            except sqlite3.Error as error:
                raise self._damaged(error) from None

    def cosignatures(self) -> list[tuple[int, str, str]]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT size, witness, line FROM cosignatures ORDER BY id"
                ).fetchall()
            except sqlite3.Error as error:
                if _no_table(error):
                    return []
                raise self._damaged(error) from None
        out: list[tuple[int, str, str]] = []
        for size, witness, line in rows:
            out.append((_integer(size), str(witness), str(line)))
        return out

    def checkpoints(self, after_id: int | None = None) -> list[tuple[int, int, bytes, str]]:
        where, bound = ("WHERE id > ? ", (after_id,)) if after_id is not None else ("", ())
        with self._lock:
            try:
                rows = self._db.execute(
                    f"SELECT id, size, root, note FROM checkpoints {where}ORDER BY id", bound
                ).fetchall()
            except sqlite3.Error as error:
                raise self._damaged(error) from None
        # an edited size that is not a number reads as -1: the checks then fail on it
        return [(int(i), _integer(size), _blob(root), str(note)) for i, size, root, note in rows]

    def declare_inventory(self, expected: int, since: float) -> None:
        with self._lock:
            last = self._db.execute(
                "SELECT expected FROM inventory ORDER BY since DESC LIMIT 1"
            ).fetchone()
            if last is None or last[0] != expected:
                self._db.execute(
                    "INSERT INTO inventory (since, expected) VALUES (?, ?)", (since, expected)
                )

    def inventory_at(self, when: float) -> int | None:
        row = self._db.execute(
            "SELECT expected FROM inventory WHERE since <= ? ORDER BY since DESC LIMIT 1", (when,)
        ).fetchone()
        if row is None:
            row = self._db.execute(
                "SELECT expected FROM inventory ORDER BY since LIMIT 1"
            ).fetchone()
        return None if row is None else int(row[0])

    def summaries(self, start_ns: int, end_ns: int) -> Iterator[tuple[str, bytes]]:
        try:
            rows = self._db.execute(
                "SELECT node, body FROM summaries WHERE window_end_ns > ? AND window_start_ns < ? ORDER BY id",
                (clamp64(start_ns), clamp64(end_ns)),
            )
            for node, body in rows:
                yield str(node), _blob(body)
        except sqlite3.Error as error:
            raise self._damaged(error) from None

    def count(self) -> int:
        try:
            return int(self._db.execute("SELECT count(*) FROM summaries").fetchone()[0])
        except sqlite3.Error as error:
            raise self._damaged(error) from None

    def span(self) -> tuple[int, int] | None:
        try:
            row = self._db.execute(
                "SELECT min(window_start_ns), max(window_end_ns) FROM summaries"
            ).fetchone()
        except sqlite3.Error as error:
            raise self._damaged(error) from None
        return None if row[0] is None else (int(row[0]), int(row[1]))
