"""The collector's durable record: every summary an agent sent, verbatim, in one SQLite file.

Append-only by design: rows are inserted, never updated or deleted, and each holds the
summary's bytes as received, so that the audit trail can later chain, sign and Merkle-hash the
same rows without a second store. The file runs in WAL mode with full synchronisation: a
summary is on disk before the collector acknowledges the report that carried it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

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


class RecordError(RuntimeError):
    """The record cannot be read or written (missing, not a gputally record, damaged, or
    the disk failed); the message says which file and why, in one line."""


def _damaged(path: Path, error: sqlite3.Error) -> RecordError:
    return RecordError(f"{path}: the record cannot be read or written: {error}")


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


def _signed(value: int) -> int:
    # SQLite integers are signed 64-bit; agent instance ids are unsigned 64-bit.
    return value - (1 << 64) if value >= 1 << 63 else value


class Record:
    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise RecordError(f"{self.path}: no such record (the collector's --db file)")
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
            raise RecordError(f"{self.path}: not a gputally record: {error}") from None
        self._lock = threading.Lock()
        self.last_id = 0  # the id of the newest entry this process appended

    def close(self) -> None:
        self._db.close()

    def append(
        self,
        node: str,
        instance: int,
        seq: int,
        window_start_ns: int,
        window_end_ns: int,
        received: float,
        body: bytes,
        windows: list[tuple[str, int, int, float, float]] | None = None,
    ) -> bool:
        """Store one summary durably (committed and synced when this returns), and its cards'
        latest windows (`windows`: card, start, end, covered, joules) in the same transaction. False
        when it was already stored (a resent report). RecordError when it cannot be written."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO summaries"
                    " (node, instance, seq, window_start_ns, window_end_ns, received, body, leaf)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        node,
                        _signed(instance),
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
                if stored and windows:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO gpu_windows"
                        " (uuid, node, start_ns, end_ns, covered, joules) VALUES (?, ?, ?, ?, ?, ?)",
                        [(key, node, *window) for key, *window in windows],
                    )
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _damaged(self.path, error) from None
            return stored

    def latest_windows(
        self, cards: list[str]
    ) -> dict[str, tuple[str, tuple[int, int, float, float]]]:
        """card -> (node, its latest window) of those cards the record has."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT uuid, node, start_ns, end_ns, covered, joules FROM gpu_windows"
                    f" WHERE uuid IN ({','.join('?' * len(cards))})",
                    cards,
                ).fetchall()
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None
        return {
            str(u): (str(n), (int(w0), int(w1), float(c), float(j))) for u, n, w0, w1, c, j in rows
        }

    def index_windows(self, rows: list[tuple[str, str, int, int, float, float]]) -> None:
        """Fill the GPU window index from scratch (a ledger written before it existed):
        (card, node, start, end, covered, joules) each."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO gpu_windows"
                " (uuid, node, start_ns, end_ns, covered, joules) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")

    def indexed(self) -> bool:
        """Whether the GPU window index covers the entries (it is empty only when they are)."""
        with self._lock:
            has_index = self._db.execute("SELECT 1 FROM gpu_windows LIMIT 1").fetchone()
            has_entries = self._db.execute("SELECT 1 FROM summaries LIMIT 1").fetchone()
        return has_index is not None or has_entries is None

    def has_entry(self, entry: int) -> bool:
        with self._lock:
            try:
                row = self._db.execute("SELECT 1 FROM summaries WHERE id = ?", (entry,)).fetchone()
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None
        return row is not None

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))

    def sync(self) -> None:
        """Move the WAL's pages into the database file, so that the .db file alone (a copy
        taken without its -wal) holds everything recorded so far. Best effort: a reader
        holding the WAL makes it a partial move, never a loss."""
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def append_many(self, rows: list[tuple[str, int, int, int, int, float, bytes]]) -> None:
        """Store many summaries in one transaction (bulk loads; the collector appends one by one)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO summaries"
                " (node, instance, seq, window_start_ns, window_end_ns, received, body, leaf)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(n, _signed(i), s, w0, w1, r, b, leaf_hash(b)) for n, i, s, w0, w1, r, b in rows],
            )
            self._db.execute("COMMIT")

    def recent(self, node: str, limit: int) -> list[bytes]:
        """The stored bytes of the node's newest `limit` summaries, newest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT body FROM summaries WHERE node = ? ORDER BY id DESC LIMIT ?",
                    (node, limit),
                ).fetchall()
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None
        return [_blob(body) for (body,) in rows]

    def leaves_after(self, after_id: int) -> list[tuple[int, bytes]]:
        """(id, leaf hash) of the entries after `after_id`, in log order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, leaf FROM summaries WHERE id > ? ORDER BY id", (after_id,)
            ).fetchall()
        return [(int(i), _blob(leaf)) for i, leaf in rows]

    def entries(self, after_id: int | None = None) -> Iterator[tuple[int, str, bytes, bytes]]:
        """(id, node, body, stored leaf hash) of every entry after `after_id` (of every row,
        without one: ids of 0 or below, which the collector never writes, are rows too, and
        an auditor must see them), in log order. RecordError when a damaged page stops the
        read."""
        where, bound = ("WHERE id > ? ", (after_id,)) if after_id is not None else ("", ())
        try:
            for i, node, body, leaf in self._db.execute(
                f"SELECT id, node, body, leaf FROM summaries {where}ORDER BY id", bound
            ):
                yield int(i), str(node), _blob(body), _blob(leaf)
        except sqlite3.Error as error:
            raise _damaged(self.path, error) from None

    def add_checkpoint(self, size: int, root: bytes, note: str, created: float) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO checkpoints (size, root, note, created) VALUES (?, ?, ?, ?)",
                    (size, root, note, created),
                )
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None

    def checkpoint_times(self) -> dict[int, float]:
        """size -> when the collector says it signed the checkpoint of that size (its own
        clock: a claim, which witnesses' cosignatures can confirm)."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT size, created FROM checkpoints").fetchall()
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None
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
                raise _damaged(self.path, error) from None

    def frontier_at(self, size: int) -> tuple[int, list[bytes]] | None:
        """(last entry id, peaks) of the tree at a checkpointed `size`; None when not kept."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT last_id, peaks FROM frontiers WHERE size = ?", (size,)
                ).fetchone()
            except sqlite3.Error as error:
                if _no_table(error):
                    return None
                raise _damaged(self.path, error) from None
        if row is None:
            return None
        blob = _blob(row[1])
        return int(row[0]), [blob[i : i + 32] for i in range(0, len(blob), 32)]

    def leaves(self, after_id: int, limit: int) -> list[bytes]:
        """The stored leaf hashes of the `limit` entries after `after_id`, in log order."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT leaf FROM summaries WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
                ).fetchall()
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None
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
                raise _damaged(self.path, error) from None

    def cosignatures(self) -> list[tuple[int, str, str]]:
        """(size, witness name, signature line) of every cosignature kept, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT size, witness, line FROM cosignatures ORDER BY id"
                ).fetchall()
            except sqlite3.Error as error:
                if _no_table(error):
                    return []
                raise _damaged(self.path, error) from None
        out: list[tuple[int, str, str]] = []
        for size, witness, line in rows:
            out.append((_integer(size), str(witness), str(line)))
        return out

    def checkpoints(self) -> list[tuple[int, int, bytes, str]]:
        """(id, size, root, signed note) of every checkpoint, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, size, root, note FROM checkpoints ORDER BY id"
                ).fetchall()
            except sqlite3.Error as error:
                raise _damaged(self.path, error) from None
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
        """The declared inventory in force at `when` (else the earliest one declared)."""
        row = self._db.execute(
            "SELECT expected FROM inventory WHERE since <= ? ORDER BY since DESC LIMIT 1", (when,)
        ).fetchone()
        if row is None:
            row = self._db.execute(
                "SELECT expected FROM inventory ORDER BY since LIMIT 1"
            ).fetchone()
        return None if row is None else int(row[0])

    def summaries(self, start_ns: int, end_ns: int) -> Iterator[tuple[str, bytes]]:
        """(node, summary bytes) of every summary whose window overlaps [start, end)."""
        # SQLite integers are 64-bit: a period past 2262 (in ns) is clamped, not an overflow
        start_ns, end_ns = (max(min(t, 2**63 - 1), -(2**63)) for t in (start_ns, end_ns))
        try:
            rows = self._db.execute(
                "SELECT node, body FROM summaries WHERE window_end_ns > ? AND window_start_ns < ? ORDER BY id",
                (start_ns, end_ns),
            )
            for node, body in rows:
                yield str(node), _blob(body)
        except sqlite3.Error as error:
            raise _damaged(self.path, error) from None

    def count(self) -> int:
        try:
            return int(self._db.execute("SELECT count(*) FROM summaries").fetchone()[0])
        except sqlite3.Error as error:
            raise _damaged(self.path, error) from None

    def span(self) -> tuple[int, int] | None:
        try:
            row = self._db.execute(
                "SELECT min(window_start_ns), max(window_end_ns) FROM summaries"
            ).fetchone()
        except sqlite3.Error as error:
            raise _damaged(self.path, error) from None
        return None if row[0] is None else (int(row[0]), int(row[1]))
