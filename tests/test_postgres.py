"""The ledger in PostgreSQL: the same rows as in SQLite, byte for byte, and the same audit;
entries sequenced by the database for several appending processes; one signer at a time;
refusals in one line. A real PostgreSQL server on 127.0.0.1 (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.cli.options import UNAVAILABLE, USAGE
from gputally.collector.audit.verify import verify_ledger
from gputally.collector.record import merkle
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import (
    COLLECTOR_KEY_FILE,
    CheckpointError,
    Ledger,
    LedgerStartError,
    checkpoint_text,
    collector_key_text,
    read_latest,
    sign_note,
)
from gputally.collector.record.postgres import SIGNER_LOCK
from gputally.collector.record.store import (
    OverlapError,
    Record,
    RecordError,
    RecordUnavailableError,
)
from gputally.v1.signing import public_bytes

from .conftest import PostgresServer, free_port
from .factories import T0, gputally_command, summary

ORIGIN = "example.org/gputally-shared"
NODES = ("n1", "n2", "n3")
# Fixed keys: Ed25519 signatures are deterministic, so both engines get the very same bytes.
COLLECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
AGENT_KEYS = {node: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i, node in enumerate(NODES)}  # fmt: skip


def key_directory(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    store = KeyStore(path)
    for node, key in AGENT_KEYS.items():
        store.enroll(node, public_bytes(key))
    (path / COLLECTOR_KEY_FILE).write_text(collector_key_text(ORIGIN, public_bytes(COLLECTOR_KEY)))
    return path


def write_ledger(location: str | Path, windows: int = 6) -> Record:
    """3 nodes x `windows` signed 300 s summaries, appended as the intake does (with their
    card windows), checkpointed at windows 2 and 5 at fixed times."""
    record = Record(location)
    ledger = Ledger(record, COLLECTOR_KEY, ORIGIN)
    signers = {node: SummarySigner(key, node) for node, key in AGENT_KEYS.items()}
    for w in range(windows):
        for n, node in enumerate(NODES):
            s = summary(T0 + 300 * w, 300.0, 0.1 * (n + 1) + 0.05 * w, node)
            s.gpus[0].energy_joules = 1000.0 * (w + 1)
            gpu = s.gpus[0]
            start, end = s.window_start_unix_nano, s.window_end_unix_nano
            assert record.append(
                node, 1, w + 1, start, end, T0 + 300 * w + 301,
                signers[node].sign(s).SerializeToString(),
                [(gpu.uuid.casefold(), start, end, gpu.present_seconds, gpu.energy_joules)],
            )  # fmt: skip
        if w in (2, 5):
            assert ledger.checkpoint(T0 + 300 * w + 310)
    return record


def gputally(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gputally_command(), *args], capture_output=True, text=True, timeout=timeout
    )


def report_json(out: Path) -> dict[str, Any]:
    """report.json without what names where the ledger is (its file's hash, the command)."""
    answer: dict[str, Any] = json.loads((out / "report.json").read_text())
    for field in ("ledger", "ledger_wal", "command"):
        answer["evidence"].pop(field)
    return answer


def test_one_ledger_in_sqlite_and_postgresql_is_the_same_bytes_and_the_same_audit(
    tmp_path: Path, postgres_url: str
) -> None:
    keys = key_directory(tmp_path / "keys")
    sqlite, postgres = write_ledger(tmp_path / "ledger.db"), write_ledger(postgres_url)
    assert list(postgres.entries()) == list(sqlite.entries())
    assert len(list(sqlite.entries())) == 18
    assert postgres.checkpoints() == sqlite.checkpoints()
    assert [size for _, size, _, _ in postgres.checkpoints()] == [9, 18]
    assert postgres.frontier_at(9) == sqlite.frontier_at(9) is not None
    assert postgres.checkpoint_times() == sqlite.checkpoint_times()
    assert list(postgres.summaries(int(T0 * 1e9), int((T0 + 900) * 1e9))) == list(
        sqlite.summaries(int(T0 * 1e9), int((T0 + 900) * 1e9))
    )
    assert postgres.span() == sqlite.span()
    for record in (sqlite, postgres):
        record.close()

    def audit(ledger: str) -> dict[str, Any]:
        verified = gputally("audit", "verify", f"--ledger={ledger}", f"--keys={keys}", "--json")
        assert verified.returncode == 0, verified.stderr
        out = tmp_path / f"report-{len(ledger)}"
        period = [f"--from={T0:.0f}", f"--to={T0 + 1800:.0f}", "--expected-gpus=4"]
        made = gputally(
            "audit", "report", f"--ledger={ledger}", f"--keys={keys}", *period,
            "--claim=0.2", f"--out={out}",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        census = gputally("audit", "census", f"--ledger={ledger}", f"--keys={keys}", "--json")
        proved = gputally("audit", "prove", f"--ledger={ledger}", f"--keys={keys}", "--entry=4")
        queried = gputally("query", f"--db={ledger}", "--expected-gpus=4", "--json")
        assert census.returncode == proved.returncode == queried.returncode == 0
        answer = json.loads(verified.stdout)
        assert answer.pop("ledger") == ledger.replace(PostgresServer.PASSWORD, "").replace(
            ":@", "@"
        )
        return {
            "verify": answer,
            "report": report_json(out),
            "census": json.loads(census.stdout),
            "prove": json.loads(proved.stdout),
            "query": json.loads(queried.stdout),
        }

    from_sqlite, from_postgres = audit(str(tmp_path / "ledger.db")), audit(postgres_url)
    assert from_postgres == from_sqlite
    assert from_postgres["verify"]["entries"] == 18 and from_postgres["verify"]["verified"]
    # the figure itself: n1, n2, n3 at 0.1, 0.2, 0.3 busy (+0.05 a window) over 4 GPUs
    busy = sum(0.1 * (n + 1) + 0.05 * w for n in range(3) for w in range(6)) / (4 * 6)
    assert from_postgres["report"]["figure"] == pytest.approx(busy)


def one_line(result: subprocess.CompletedProcess[str], code: int, says: str) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    # (progress lines, indented, may come first: `audit report` says it starts verifying)
    lines = [line for line in result.stderr.splitlines() if line.strip() and line[0] != " "]
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert PostgresServer.PASSWORD not in result.stderr  # a URL is shown without its password
    return lines[0]


@pytest.mark.parametrize(
    ("url", "code", "says"),
    [
        (lambda s: f"postgresql://gputally:pw@127.0.0.1:{free_port()}/x", UNAVAILABLE, "Connection refused"),
        (lambda s: s.url(password="wrong"), UNAVAILABLE, "password authentication failed"),
        (lambda s: s.url("no_such_db"), UNAVAILABLE, 'database "no_such_db" does not exist'),
        (lambda s: s.url().replace("127.0.0.1", "[::1"), USAGE, "not a PostgreSQL URL"),
        (lambda s: s.url() + "?colour=blue", USAGE, "not a PostgreSQL URL"),
        (lambda s: s.url(), USAGE, "not a gputally ledger: no table summaries"),
    ],
    ids=["unreachable", "wrong password", "no database", "malformed", "unknown parameter", "no tables"],
)  # fmt: skip
def test_a_ledger_url_that_cannot_be_used_is_one_line_and_a_distinct_exit_code(
    tmp_path: Path, postgres_server: PostgresServer, url: Any, code: int, says: str
) -> None:
    keys = key_directory(tmp_path / "keys")
    ledger = url(postgres_server)
    line = one_line(gputally("audit", "verify", f"--ledger={ledger}", f"--keys={keys}"), code, says)
    assert line.startswith("gputally audit verify: postgresql://")


def test_every_command_that_takes_a_ledger_takes_a_url_and_refuses_one_alike(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    keys = key_directory(tmp_path / "keys")
    gone = postgres_server.url(password="wrong")
    period = ["--from=0", "--to=600", "--expected-gpus=1"]
    for args in (
        ["query", f"--db={gone}"],
        ["audit", "census", f"--ledger={gone}", f"--keys={keys}"],
        ["audit", "report", f"--ledger={gone}", f"--keys={keys}", *period, f"--out={tmp_path}"],
        ["audit", "prove", f"--ledger={gone}", f"--keys={keys}", "--entry=1"],
        ["collector", f"--db={gone}", f"--grpc-listen=127.0.0.1:{free_port()}",
         f"--metrics-listen=127.0.0.1:{free_port()}"],
    ):  # fmt: skip
        one_line(gputally(*args), UNAVAILABLE, "password authentication failed")
    # a shared ledger has no directory to keep the collector's files beside
    one_line(
        gputally(
            "collector", f"--db={postgres_url}", f"--keys={keys}",
            f"--grpc-listen=127.0.0.1:{free_port()}", f"--metrics-listen=127.0.0.1:{free_port()}",
        ),
        USAGE,
        "--collector-key: a PostgreSQL ledger",
    )  # fmt: skip


# Each process appends `n` summaries of its own card, then contests one shared card with
# the others: `m` one-second windows, each of which only one node may count.
APPENDER = """
import sys
from gputally.collector.record.store import OverlapError, Record
url, node, n, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
record = Record(url)
ids, taken = [], []
for k in range(n):
    w = (k * 10**9, (k + 1) * 10**9)
    assert record.append(node, 1, k + 1, *w, 0.0, f"{node} {k}".encode(), [(node, *w, 1.0, 9.0)])
    ids.append(record.last_id)
for k in range(m):
    w = ((n + k) * 10**9, (n + k + 1) * 10**9)
    try:
        record.append(node, 1, n + k + 1, *w, 0.0, f"{node} {n + k}".encode(), [("shared", *w, 1.0, 9.0)])
    except OverlapError:
        continue
    ids.append(record.last_id)
    taken.append(k)
print(" ".join(map(str, ids)))
print(" ".join(map(str, taken)))
"""


def test_appends_from_several_processes_are_gap_free_visible_in_order_and_counted_once(
    postgres_url: str,
) -> None:
    n, m = 120, 80
    record = Record(postgres_url)  # makes the tables before the writers race for them
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, postgres_url, node, str(n), str(m)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in ("a", "b", "c")
    ]
    # While they write, a reader never sees a hole: every snapshot holds ids 1..max exactly.
    seen = []
    with psycopg.connect(postgres_url, autocommit=True) as reader:
        deadline = time.monotonic() + 90
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            row = reader.execute("SELECT count(*), coalesce(max(id), 0) FROM summaries").fetchone()
            assert row is not None
            seen.append(row)
            time.sleep(0.002)
    outputs = [w.communicate(timeout=60) for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0], [err for _, err in outputs]
    assert all(count == top for count, top in seen) and len(seen) > 10
    assert len({top for _, top in seen}) > 3  # the reader saw the log grow
    per_writer = [[int(i) for i in out.split("\n")[0].split()] for out, _ in outputs]
    taken = [[int(k) for k in out.split("\n")[1].split()] for out, _ in outputs]
    for ids in per_writer:
        assert ids == sorted(ids)  # each writer's entries in the order it appended them
    everything = sorted(i for ids in per_writer for i in ids)
    assert everything == list(range(1, len(everything) + 1))  # gap-free
    # each shared window went to one node only, whatever the race (the check is serialised
    # with the append), and the windows taken never overlap in log order
    claims = sorted(k for ks in taken for k in ks)
    assert claims == sorted(set(claims)) and len(everything) == 3 * n + len(claims)
    shared = [(i, body) for i, _, body, _ in record.entries() if int(body.split()[1]) >= n]
    windows = [int(body.split()[1]) for _, body in shared]
    assert windows == sorted(windows)
    # and the tree the ledger signs is the tree of the entries in id order
    ledger = Ledger(record, COLLECTOR_KEY, ORIGIN)
    assert ledger.checkpoint(T0)
    leaves = [merkle.leaf_hash(body) for _, _, body, _ in record.entries()]
    assert record.checkpoints()[-1][1:3] == (len(leaves), merkle.root(leaves))
    record.close()


def signer_backend(url: str) -> int:
    """The server process of the connection holding the signing role."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted",
            (SIGNER_LOCK,),
        ).fetchall()
    assert len(rows) == 1, rows
    return int(rows[0][0])


def terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))  # and wait for it


def append_windows(record: Record, node: str, windows: range) -> None:
    signer = SummarySigner(AGENT_KEYS[node], node)
    for w in range(windows.stop):
        signed = signer.sign(summary(T0 + 300 * w, 300.0, 0.5, node))
        if w in windows:
            assert record.append(node, 1, w + 1, 0, 1, 0.0, signed.SerializeToString())


def test_one_shard_signs_and_when_its_connection_drops_another_goes_on_consistently(
    tmp_path: Path, postgres_url: str
) -> None:
    keys = key_directory(tmp_path / "keys")
    a, b = Record(postgres_url), Record(postgres_url)
    shard_a = Ledger(a, COLLECTOR_KEY, ORIGIN, tmp_path / "a.checkpoint")
    shard_b = Ledger(b, COLLECTOR_KEY, ORIGIN, tmp_path / "b.checkpoint")
    append_windows(a, "n1", range(3))
    append_windows(b, "n2", range(2))
    assert (shard_a.checkpoint(T0), shard_a.signing) == (True, True)  # the first to ask
    assert (shard_b.checkpoint(T0), shard_b.signing) == (False, False)
    # the follower checked the signer's checkpoint, and gives witnesses nothing
    assert (shard_b.last_size, shard_b.last_note, shard_a.last_size) == (5, "", 5)
    assert shard_a.last_note.startswith(f"{ORIGIN}\n5\n")
    append_windows(b, "n2", range(2, 4))
    assert shard_a.checkpoint(T0 + 1)  # 7: it signs what the other shard appended too
    terminate(postgres_url, signer_backend(postgres_url))  # as if shard a's machine died
    append_windows(b, "n3", range(1))
    assert (shard_b.checkpoint(T0 + 2), shard_b.signing) == (True, True)  # b takes over
    assert (shard_a.checkpoint(T0 + 3), shard_a.signing) == (False, False)  # a follows it
    assert shard_a.last_size == shard_b.last_size == 8
    assert [size for _, size, _, _ in b.checkpoints()] == [5, 7, 8]
    # every checkpoint extends the one before: the audit holds
    assert verify_ledger(postgres_url, keys).ok
    # the role goes back when the holder closes its connection (a clean stop)
    b.close()
    append_windows(a, "n1", range(3, 4))
    assert shard_a.checkpoint(T0 + 4) and a.checkpoints()[-1][1] == 9
    a.close()


def test_each_shard_remembers_the_log_it_checked_and_one_with_another_key_is_refused(
    tmp_path: Path, postgres_url: str
) -> None:
    a = Record(postgres_url)
    shard_a = Ledger(a, COLLECTOR_KEY, ORIGIN, tmp_path / "a.checkpoint")
    append_windows(a, "n1", range(3))
    assert shard_a.checkpoint(T0)
    # a new shard joins: the first shard's mark of its state file is no refusal of this one
    b = Record(postgres_url)
    shard_b = Ledger(b, COLLECTOR_KEY, ORIGIN, tmp_path / "b.checkpoint")
    assert not shard_b.checkpoint(T0)
    remembered = read_latest(tmp_path / "b.checkpoint")  # what it checked, as if signed
    assert remembered is not None and (remembered.size, remembered.last_id) == (3, 3)
    b.close()
    # ... and once it has one, losing it is refused, as on a ledger of one collector
    (tmp_path / "b.checkpoint").unlink()
    again = Record(postgres_url)
    with pytest.raises(LedgerStartError, match=r"b\.checkpoint: missing") as refused:
        Ledger(again, COLLECTOR_KEY, ORIGIN, tmp_path / "b.checkpoint")
    assert "psql 'postgresql://gputally@127.0.0.1:" in str(refused.value)
    assert PostgresServer.PASSWORD not in str(refused.value)
    with pytest.raises(LedgerStartError, match="every shard holds the same --collector-key"):
        Ledger(again, Ed25519PrivateKey.generate(), ORIGIN, tmp_path / "c.checkpoint")
    again.close()
    a.close()


def test_a_checkpoint_row_the_key_did_not_sign_stops_every_shard(postgres_url: str) -> None:
    a, b = Record(postgres_url), Record(postgres_url)
    signer, follower = Ledger(a, COLLECTOR_KEY, ORIGIN), Ledger(b, COLLECTOR_KEY, ORIGIN)
    append_windows(a, "n1", range(4))
    assert signer.checkpoint(T0)
    assert not follower.checkpoint(T0)
    # a row slipped into the table by someone without the key
    forged = sign_note(checkpoint_text(ORIGIN, 4, b"\0" * 32), ORIGIN, Ed25519PrivateKey.generate())
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "INSERT INTO checkpoints (size, root, note, created) VALUES (4, %s, %s, 0)",
            (b"\0" * 32, forged),
        )
    for ledger in (follower, signer):
        with pytest.raises(CheckpointError, match="size 4 is not this log's"):
            ledger.checkpoint(T0 + 1)
        assert ledger.broken
    a.close()
    b.close()


def test_a_signer_will_not_go_on_from_a_log_cut_short(postgres_url: str) -> None:
    record = Record(postgres_url)
    ledger = Ledger(record, COLLECTOR_KEY, ORIGIN)
    append_windows(record, "n1", range(4))
    assert ledger.checkpoint(T0)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("DELETE FROM summaries WHERE id = 4")
    append_windows(record, "n2", range(1))  # id 4 again: another entry in its place
    with pytest.raises(CheckpointError, match="entry 4, which the log's tree covers, is gone"):
        ledger.checkpoint(T0 + 1)
    record.close()


def test_an_audit_reads_one_snapshot_and_cannot_write(postgres_url: str) -> None:
    writer = write_ledger(postgres_url, windows=2)
    reader = Record(postgres_url, readonly=True)
    assert reader.count() == 6
    append_windows(writer, "n1", range(2, 3))  # a collector goes on appending meanwhile
    assert reader.count() == 6 and len(list(reader.entries())) == 6
    with pytest.raises(RecordError, match="read-only transaction"):
        reader.add_cosignature(6, "w", "line", 0)
    reader.close()
    assert Record(postgres_url, readonly=True).count() == 7
    writer.close()


def test_a_dropped_connection_is_unavailability_not_damage_and_the_next_call_reconnects(
    postgres_url: str,
) -> None:
    record = Record(postgres_url)
    assert record.append("n1", 1, 1, 0, 10, 0.0, b"one", [("gpu", 0, 10, 10.0, 1.0)])
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(RecordUnavailableError, match="connection to the ledger's server was lost"):
        record.append("n1", 1, 2, 10, 20, 0.0, b"two", [("gpu", 10, 20, 10.0, 1.0)])
    assert record.append("n1", 1, 2, 10, 20, 0.0, b"two", [("gpu", 10, 20, 10.0, 1.0)])
    assert [(i, body) for i, _, body, _ in record.entries()] == [(1, b"one"), (2, b"two")]
    with pytest.raises(OverlapError):  # the window index survived the reconnection
        record.append("n2", 1, 1, 15, 25, 0.0, b"three", [("gpu", 15, 25, 10.0, 1.0)])
    record.close()


def test_the_password_comes_from_pgpassword_as_the_deployments_give_it(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """deploy/kubernetes/shards and gputally-collector-shard@.service give the URL without a
    password (GPUTALLY_COLLECTOR_DB, or the TOML's db) and the password in PGPASSWORD: the
    collector records with it, the auditor's commands read with it, and a wrong one is the
    one-line refusal of an unreachable ledger."""
    import os
    import urllib.request

    bare = postgres_url.replace(f":{PostgresServer.PASSWORD}@", "@")
    assert PostgresServer.PASSWORD not in bare
    keys = key_directory(tmp_path / "keys")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTALLY_", "PG"))}
    env |= {"GPUTALLY_COLLECTOR_DB": bare, "PGPASSWORD": PostgresServer.PASSWORD}
    metrics = free_port()
    collector = subprocess.Popen(
        [*gputally_command(), "collector", f"--keys={keys}",
         f"--collector-key={tmp_path / 'collector.key'}",
         f"--checkpoint-state={tmp_path / 'shard.checkpoint'}", "--expected-gpus=8",
         f"--grpc-listen=127.0.0.1:{free_port()}", f"--metrics-listen=127.0.0.1:{metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(300):  # bounded: 30 s
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert collector.poll() is None, collector.communicate()[1]
                time.sleep(0.1)
        else:
            raise AssertionError("the collector was not ready within 30 s")
    finally:
        collector.terminate()
        _, stderr = collector.communicate(timeout=30)
    assert collector.returncode == 0, stderr
    assert PostgresServer.PASSWORD not in stderr
    with psycopg.connect(postgres_url) as connection:  # it made the ledger's tables there
        (tables,) = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone() or (0,)
    assert tables > 0
    command = [*gputally_command(), "query", f"--db={bare}", "--from=0", "--to=600", "--json"]
    read = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["expected_gpus"] == 8  # the inventory the collector declared
    env["PGPASSWORD"] = "wrong"
    wrong = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    one_line(wrong, UNAVAILABLE, "password authentication failed")
