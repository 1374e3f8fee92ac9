"""The record cannot lie: the hostile findings against the live path, each as a test.

Each test is one way a centre (or a tenant on its network) tried to make the record say more
than happened, or less than was acknowledged, and the answer: a precise refusal, or a summary
kept by its agent until it is recorded. Over real gRPC where the attack arrived over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gputally.agent.chain import SummarySigner
from gputally.agent.sender import Sender
from gputally.cli.options import FAILED, LEDGER, USAGE
from gputally.collector.audit.figures import as_dict, compute
from gputally.collector.live.state import ClusterState, IdentityConflictError
from gputally.collector.live.validate import InvalidMessageError, TimeLimits
from gputally.collector.record import merkle
from gputally.collector.record.keys import KeyStore
from gputally.collector.record.ledger import (
    COLLECTOR_KEY_FILE,
    LEGACY_KEY_FILE,
    Ledger,
    collector_key_text,
    parse_verifier_key,
)
from gputally.collector.record.store import Record, SqliteRecord
from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1 import telemetry_pb2_grpc as pb_grpc
from gputally.v1.accounting import max_joules
from gputally.v1.signing import encode_public_key, load_or_create_private_key, public_bytes

from .conftest import Collector, free_port
from .factories import (
    T0,
    busy_sample,
    envelope,
    gpu_sample,
    gputally_command,
    hello,
    raw_stream,
    report,
    summary,
)

NODE = "n1"


def enrolled(tmp_path: Path, *nodes: str) -> tuple[KeyStore, dict[str, Ed25519PrivateKey]]:
    (tmp_path / "keys").mkdir(exist_ok=True)
    keys = KeyStore(tmp_path / "keys")
    made = {}
    for node in nodes:
        made[node] = Ed25519PrivateKey.generate()
        keys.enroll(node, public_bytes(made[node]))
    return keys, made


def recording(tmp_path: Path) -> tuple[ClusterState, Record, SummarySigner]:
    """A collector's state that records, with one enrolled 1-GPU node, and its signer."""
    keys, made = enrolled(tmp_path, NODE)
    record = Record(tmp_path / "r.db")
    state = ClusterState(record=record, keys=keys)
    state.open_session(hello(NODE, 1, key=made[NODE]), proven=True)
    return state, record, SummarySigner(made[NODE], NODE)


def window(k: int, busy: float = 0.3, node: str = NODE, seconds: float = 300.0) -> pb.Summary:
    """Window k (300 s each from T0) of GPU 0 of `node`."""
    return summary(T0 + seconds * k, seconds, busy, node)


async def send_all(sender: Sender, reports: list[pb.Report], timeout: float = 10.0) -> bool:
    """Run a real agent sender until everything submitted is done with (or the timeout)."""
    task = asyncio.ensure_future(sender.run())
    for r in reports:
        sender.submit(r)
    drained = await sender.drain(timeout)
    sender.stop()
    await task
    return drained


# -- 1. acknowledged but never recorded ------------------------------------------------------


def test_a_replayed_hello_with_a_huge_seq_cannot_make_acknowledged_summaries_vanish(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    keys, made = enrolled(tmp_path, NODE)
    record = Record(tmp_path / "r.db")
    collector = collector_factory(expected_gpus=2, record=record, keys=keys)
    key = made[NODE]
    sniffed = hello(NODE, key=key, instance=7)  # name, instance and key travel in clear
    # the replay: one report numbered 2^62, valid as telemetry (it needs no signature)
    poison = report(2**62, T0 + 30, gpu_sample(0, busy=0.0), gpu_sample(1, busy=0.0))
    # replayed by someone without the key: refused before it can touch anything (issue 11)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(raw_stream(collector.target, sniffed, [[poison]]))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert NODE not in collector.state.nodes
    # sent by a second process that holds the key (a cloned agent): it may number anything
    asyncio.run(raw_stream(collector.target, sniffed, [[poison]], key=key))
    assert collector.state.nodes[NODE].last_seq == 2**62

    signer = SummarySigner(key, NODE, tmp_path / "agent")
    reports = [
        report(k + 1, T0 + 300 * (k + 1), busy_sample(0, 0.3), summary=signer.sign(window(k)))
        for k in range(8)
    ]
    assert len(signer.pending()) == 8  # spooled before they are sent
    sender = Sender(
        collector.target,
        lambda: hello(NODE, key=key, instance=7),
        on_acked=lambda r: signer.forget(pb.Summary.FromString(r.summary.body).chain_seq),
        prove=signer.prove,
    )
    assert asyncio.run(send_all(sender, reports))
    # every summary the agent let go of is in the ledger: all 8, and its spool is empty
    assert record.count() == 8
    assert signer.pending() == []
    assert collector.state.intake.recorded_seq(NODE) == 8


def test_summaries_are_not_acknowledged_while_the_ledger_is_damaged_and_are_sent_again(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    keys, made = enrolled(tmp_path, NODE)
    record = Record(tmp_path / "r.db")
    ledger = Ledger(record, Ed25519PrivateKey.generate(), "gputally/test")
    ledger.fail("entry 7's bytes no longer give its leaf hash (a test)")
    collector = collector_factory(expected_gpus=2, record=record, keys=keys, ledger=ledger)
    key = made[NODE]
    signer = SummarySigner(key, NODE, tmp_path / "agent")
    sender = Sender(
        collector.target,
        lambda: hello(NODE, key=key),
        backoff_initial=0.05,
        on_acked=lambda r: signer.forget(pb.Summary.FromString(r.summary.body).chain_seq),
        prove=signer.prove,
    )
    reports = [
        report(k + 1, T0 + 300 * (k + 1), busy_sample(0, 0.3), summary=signer.sign(window(k)))
        for k in range(2)
    ]

    async def scenario() -> None:
        task = asyncio.ensure_future(sender.run())
        for r in reports:
            sender.submit(r)
        for _ in range(200):  # bounded: 10 s
            if sender.stats.acked == 2:
                break
            await asyncio.sleep(0.05)
        # the reports were acknowledged (their live part counted), their summaries were not
        assert sender.stats.acked == 2 and len(sender.unrecorded) == 2
        assert record.count() == 0 and len(signer.pending()) == 2
        assert collector.state.view().intake_stopped.startswith("entry 7's bytes")
        # repaired: the next stream sends what was not recorded, first
        ledger.broken = ""
        # a newer stream for the node: the agent's is cut, and it reconnects
        await raw_stream(collector.target, hello(NODE, key=key, instance=99), [], key=key)
        sender.submit(report(3, T0 + 900, busy_sample(0, 0.3)))
        assert await sender.drain(10.0)
        sender.stop()
        await task

    asyncio.run(scenario())
    assert record.count() == 2 and signer.pending() == []


# -- 2. one window counted several times; impossible values ---------------------------------


def test_one_window_sent_three_times_is_recorded_once_and_the_claim_is_refuted(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    keys, made = enrolled(tmp_path, NODE)
    record = Record(tmp_path / "r.db")
    collector = collector_factory(expected_gpus=1, record=record, keys=keys)
    signer = SummarySigner(made[NODE], NODE)
    # the same 300 s at busy 0.3, signed three times with new chain numbers
    copies = [
        pb.Report(seq=k + 1, time_unix_nano=int((T0 + 300) * 1e9), summary=signer.sign(window(0)))
        for k in range(3)
    ]
    one_gpu = hello(NODE, 1, key=made[NODE])
    _, ack = asyncio.run(raw_stream(collector.target, one_gpu, [copies], key=made[NODE]))
    assert [r.seq for r in ack.ack.rejections] == [2, 3]
    assert all("overlaps one this node recorded" in r.reason for r in ack.ack.rejections)
    assert ack.ack.recorded_chain_seq == 1
    assert record.count() == 1
    figures = compute(record.summaries(0, 2**62), T0, T0 + 300, 1)
    answer = as_dict(figures, "busy", 0.85)
    assert answer["figure"] == pytest.approx(0.3)
    assert answer["verdict"] == "refuted"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: setattr(s.gpus[0], "energy_joules", 1e300), "is not what a GPU draws in 300 s"),
        (
            lambda s: s.MergeFrom(
                pb.Summary(
                    window_start_unix_nano=6_000_000_000 * 10**9,
                    window_end_unix_nano=(6_000_000_000 + 300) * 10**9,
                )
            ),
            "is outside what the collector accepts now",
        ),
        (
            lambda s: setattr(
                s, "window_end_unix_nano", s.window_start_unix_nano + 7 * 86400 * 10**9
            ),
            "summary window must be in (0, 3600] s",
        ),
    ],
    ids=["energy 1e300", "year 2160", "7-day window"],
)
def test_impossible_summaries_are_refused_with_their_reason(
    tmp_path: Path, change: Callable[[pb.Summary], object], reason: str
) -> None:
    keys, made = enrolled(tmp_path, NODE)
    record = Record(tmp_path / "r.db")
    state = ClusterState(record=record, keys=keys, limits=TimeLimits())  # the defaults
    state.open_session(hello(NODE, 1, key=made[NODE]), proven=True)
    s = window(0)
    change(s)
    signed = SummarySigner(made[NODE], NODE).sign(s)
    carried = pb.Report(seq=1, time_unix_nano=int((T0 + 300) * 1e9), summary=signed)
    with pytest.raises(InvalidMessageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        state.ingest(NODE, carried, received=T0 + 301)
    assert record.count() == 0


def test_the_energy_bound_is_the_power_limit_with_its_tolerance() -> None:
    assert max_joules(300.0) == 2000.0 * 1.25 * 300.0 + 1.0  # no limit known: the board ceiling
    assert max_joules(2.0, power_limit_watts=700.0) == 700.0 * 1.25 * 2.0 + 1.0


# -- 3. overlapping report intervals; energy resets ------------------------------------------


def test_a_hundred_reports_of_the_same_hour_count_it_once(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(expected_gpus=2)
    same_hour = [
        report(k + 1, T0 + 3600, gpu_sample(0, busy=1.0), gpu_sample(1, busy=1.0), interval=3600)
        for k in range(100)
    ]
    _, ack = asyncio.run(raw_stream(collector.target, hello(NODE), [same_hour]))
    assert [r.seq for r in ack.ack.rejections] == list(range(2, 101))
    assert "its seconds are already covered" in ack.ack.rejections[0].reason
    assert collector.state.counters.seconds["observed"] == 2 * 3600.0
    assert collector.state.counters.seconds["busy"] == 2 * 3600.0


def test_backwards_and_overlapping_intervals_are_refused_or_clipped() -> None:
    state = ClusterState(clock=lambda: T0 + 100)
    state.open_session(hello(NODE, 1))
    state.ingest(NODE, report(1, T0 + 10, gpu_sample(0, busy=1.0), interval=10), received=T0 + 10)
    # ends before the previous one, and arrives with it: no real time passed for its second
    # (an agent clock stepped back is another case: tests/test_network.py)
    with pytest.raises(InvalidMessageError, match="not after the previous report"):
        state.ingest(NODE, report(2, T0 + 5, gpu_sample(0, busy=1.0)), received=T0 + 10)
    # [T0 + 5, T0 + 15] overlaps [T0, T0 + 10] by 5 s: only the last 5 s count
    state.ingest(NODE, report(3, T0 + 15, gpu_sample(0, busy=1.0), interval=10), received=T0 + 15)
    node = state.nodes[NODE]
    assert state.counters.seconds["observed"] == 15.0
    assert node.clipped_seconds == 5.0
    assert node.reports == {"accepted": 2, "duplicate": 0, "rejected": 1}


def test_an_energy_counter_that_falls_to_a_huge_value_is_not_energy() -> None:
    state = ClusterState()
    state.open_session(hello(NODE, 1))
    readings = [(1, 1_000_000), (2, 1_300_000), (6, 36_900_000_000_000_000)]  # mJ; a "reset"
    for seq, (t, mj) in enumerate(readings, 1):
        sample = gpu_sample(0, busy=1.0, power_watts=300.0, power_limit_watts=700.0)
        sample.energy_millijoules = mj
        previous = readings[seq - 2][0] if seq > 1 else 0
        state.ingest(NODE, report(seq, T0 + t, sample, interval=t - previous), received=T0 + t)
    # 300 J over the first second, then the 4 s after the jump at the power reading (300 W)
    assert state.counters.energy_joules == pytest.approx(300.0 + 4 * 300.0)
    assert state.nodes[NODE].energy_refused == 1


# -- 4. one card, two nodes ------------------------------------------------------------------


def test_a_second_node_claiming_a_connected_nodes_cards_is_refused(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory(expected_gpus=2, stale_after=15.0)
    clone = hello("n2")
    for identity in clone.gpus:  # a cloned image: node n2 announces n1's cards
        identity.uuid = identity.uuid.replace("n2", NODE)

    async def both() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(collector.target) as channel:
            first = pb_grpc.IngestStub(channel).Stream()
            await first.write(pb.AgentMessage(hello=hello(NODE)))
            await first.read()
            second = pb_grpc.IngestStub(channel).Stream()
            await second.write(pb.AgentMessage(hello=clone))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await second.read()
            assert "is held by node n1, which is up" in (refused.value.details() or "")
            await first.done_writing()
            return refused.value.code()

    assert asyncio.run(both()) == grpc.StatusCode.FAILED_PRECONDITION
    view = collector.state.view()
    assert view.seen == 2 and view.identity_conflicts == 1
    with urllib.request.urlopen(collector.metrics_url, timeout=5) as page:
        text = page.read().decode()
    assert "gputally_identity_conflicts_total 1.0" in text


def test_a_card_that_moved_from_a_node_that_is_down_counts_once() -> None:
    now = [T0]
    state = ClusterState(stale_after=15.0, clock=lambda: now[0])
    session, *_ = state.open_session(hello(NODE, 1))
    state.ingest(NODE, report(1, T0, gpu_sample(0, busy=1.0)), received=T0)
    moved = hello("n2", 1)
    moved.gpus[0].uuid = f"GPU-{NODE}-0"
    with pytest.raises(IdentityConflictError):
        state.open_session(moved, proven=True)  # n1 is still connected
    state.close_session(NODE, session)
    now[0] = T0 + 16  # and now down for longer than stale_after
    state.open_session(moved, proven=True)
    view = state.view()
    assert view.seen == 1 and state.nodes[NODE].gpus == {}
    assert math.isclose(view.expected, 1)


# -- 5. never fork, never forget; 6. damage stops intake, loudly -----------------------------

ORIGIN = "example.org/gputally-test"


def gputally(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gputally_command(), *args], capture_output=True, text=True, timeout=timeout
    )


def collector_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "collector",
        f"--db={tmp_path / 'ledger.db'}",
        f"--keys={tmp_path / 'keys'}",
        f"--collector-key={tmp_path / 'collector.key'}",
        f"--origin={ORIGIN}",
        f"--grpc-listen=127.0.0.1:{free_port()}",
        *extra,
    ]


def filled(tmp_path: Path, entries: int, checkpoint_every: int) -> tuple[Record, Ledger]:
    """A ledger as the collector leaves it: `entries` signed summaries of two nodes,
    checkpointed every `checkpoint_every`, its latest checkpoint remembered outside it."""
    _, made = enrolled(tmp_path, "n1", "n2")
    key = load_or_create_private_key(tmp_path / "collector.key")
    (tmp_path / "keys" / COLLECTOR_KEY_FILE).write_text(
        collector_key_text(ORIGIN, public_bytes(key))
    )
    record = Record(tmp_path / "ledger.db")
    ledger = Ledger(record, key, ORIGIN, tmp_path / "ledger.db.checkpoint")
    signers = {node: SummarySigner(made[node], node) for node in made}
    for n in range(entries):
        node = ("n1", "n2")[n % 2]
        s = window(n // 2, node=node)
        signed = signers[node].sign(s)
        record.append(
            node,
            1,
            n + 1,
            s.window_start_unix_nano,
            s.window_end_unix_nano,
            T0,
            signed.SerializeToString(),
            [
                (
                    s.gpus[0].uuid.casefold(),
                    s.window_start_unix_nano,
                    s.window_end_unix_nano,
                    300.0,
                    s.gpus[0].energy_joules,
                )
            ],
        )
        if (n + 1) % checkpoint_every == 0:
            assert ledger.checkpoint(T0)
    return record, ledger


def one_line_refusal(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_a_ledger_rolled_back_to_an_older_copy_is_refused_at_start(tmp_path: Path) -> None:
    record, _ = filled(tmp_path, 20, 10)
    db = tmp_path / "ledger.db"
    backup = tmp_path / "backup.db"
    copy = sqlite3.connect(backup)
    assert isinstance(record, SqliteRecord)
    record._db.backup(copy)  # an old, consistent copy of 20 entries
    copy.close()
    key = load_or_create_private_key(tmp_path / "collector.key")
    ledger = Ledger(record, key, ORIGIN, tmp_path / "ledger.db.checkpoint")
    for n in range(20, 40):
        node = ("n1", "n2")[n % 2]
        s = window(n // 2, node=node)
        record.append(node, 2, n, s.window_start_unix_nano, s.window_end_unix_nano, T0, envelope(s))
    assert ledger.checkpoint(T0)  # size 40, remembered
    record.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, db)
    refused = gputally(*collector_args(tmp_path))
    one_line_refusal(
        refused, LEDGER, "the ledger holds 20 entries but a checkpoint of 40 was signed"
    )
    # and no new ledger where a checkpoint says one existed
    db.unlink()
    refused = gputally(*collector_args(tmp_path))
    one_line_refusal(refused, LEDGER, "no ledger, but")
    assert not db.exists()


def test_a_ledger_copied_without_its_wal_is_refused_not_started_afresh(tmp_path: Path) -> None:
    record, ledger = filled(tmp_path, 0, 1)
    record.sync = lambda: None  # type: ignore[method-assign]  # killed before any WAL move
    for n in range(40):
        s = window(n)
        record.append(
            "n1", 1, n + 1, s.window_start_unix_nano, s.window_end_unix_nano, T0, envelope(s)
        )
        if (n + 1) % 10 == 0:
            assert ledger.checkpoint(T0)
    copied = tmp_path / "copy"
    copied.mkdir()
    # the .db alone, taken while the collector runs: the entries are in the -wal left behind
    for name in ("ledger.db", "ledger.db.checkpoint", "collector.key"):
        shutil.copy(tmp_path / name, copied / name)
    shutil.copytree(tmp_path / "keys", copied / "keys")
    record.close()
    refused = gputally(*collector_args(copied))
    one_line_refusal(refused, LEDGER, "but a checkpoint of 40 was signed: entries were lost")


def flip_byte(db: Path, entry: int) -> None:
    with sqlite3.connect(db) as con:
        (body,) = con.execute("SELECT body FROM summaries WHERE id = ?", (entry,)).fetchone()
        changed = bytearray(body)
        changed[len(changed) // 2] ^= 0x01
        con.execute("UPDATE summaries SET body = ? WHERE id = ?", (bytes(changed), entry))
    con.close()


def test_a_flipped_byte_under_the_remembered_checkpoint_stops_a_full_start(
    tmp_path: Path,
) -> None:
    record, _ = filled(tmp_path, 10, 5)
    record.close()
    flip_byte(tmp_path / "ledger.db", 3)  # the stored leaf column is left as it was
    refused = gputally(*collector_args(tmp_path, "--startup-check=full"))
    one_line_refusal(refused, LEDGER, "do not give the root signed for them")


def wait_http(url: str, process: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str]:
    """(status, body) of the first answer from `url` while the process runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url}: {process.stderr.read() if process.stderr else ''}")


def running_collector_says(tmp_path: Path, *extra: str) -> tuple[int, str, str, str]:
    """Start `gputally collector` on the ledger; (/readyz status, its body, /metrics, log)
    once the collector has found what it finds (bounded: 30 s)."""
    port = free_port()
    process = subprocess.Popen(
        [
            *gputally_command(),
            *collector_args(tmp_path, f"--metrics-listen=127.0.0.1:{port}", *extra),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        status, body = wait_http(f"http://127.0.0.1:{port}/readyz", process)
        while status == 200 and time.monotonic() < deadline:  # the history check runs behind
            time.sleep(0.1)
            status, body = wait_http(f"http://127.0.0.1:{port}/readyz", process)
        _, metrics = wait_http(f"http://127.0.0.1:{port}/metrics", process)
    finally:
        process.terminate()
        _, log = process.communicate(timeout=30)
    return status, body, metrics, log


@pytest.mark.parametrize(
    ("entry", "startup"),
    [(12, "incremental"), (12, "full"), (3, "incremental")],
    ids=["after the checkpoint", "after the checkpoint, full start", "under it, found running"],
)
def test_damage_stops_intake_loudly(tmp_path: Path, entry: int, startup: str) -> None:
    record, _ = filled(tmp_path, 12, 10)  # entries 11 and 12 come after the checkpoint
    record.close()
    flip_byte(tmp_path / "ledger.db", entry)
    status, body, metrics, log = running_collector_says(tmp_path, f"--startup-check={startup}")
    assert status == 503
    assert body == (
        f"not ready: summaries are not being recorded: entry {entry}'s bytes no longer give "
        "its leaf hash: it was altered\n"
    )
    assert "gputally_ledger_intake_stopped 1.0" in metrics.splitlines()
    assert "ledger damaged" in log and "Traceback" not in log
    # it signed nothing over the damage: every root it signed is the original entries' (their
    # leaf column was left as written); damage after the checkpoint, found at start, stops
    # all signing; damage under it is found while a checkpoint extending it may be signed
    with sqlite3.connect(tmp_path / "ledger.db") as con:
        leaves = [bytes(leaf) for (leaf,) in con.execute("SELECT leaf FROM summaries ORDER BY id")]
        signed = con.execute("SELECT size, root FROM checkpoints").fetchall()
    con.close()
    assert all(merkle.root(leaves[:size]) == bytes(root) for size, root in signed)
    assert max(size for size, _ in signed) in ((10,) if entry > 10 else (10, 12))


def test_a_corrupt_sqlite_page_is_one_line_for_the_collector_and_the_auditor(
    tmp_path: Path,
) -> None:
    record, _ = filled(tmp_path, 60, 30)
    record.close()
    db = tmp_path / "ledger.db"
    data = bytearray(db.read_bytes())
    page = 4096
    # a page holding summaries (their bodies name the GPUs), in the middle of the table
    holding = [
        n for n in range(1, len(data) // page) if b"GPU-n" in data[n * page : (n + 1) * page]
    ]
    assert len(holding) >= 3
    n = holding[len(holding) // 2]
    data[n * page + 8 : (n + 1) * page] = b"\xa5" * (page - 8)
    db.write_bytes(bytes(data))
    refused = gputally(*collector_args(tmp_path, "--startup-check=full"))
    assert refused.returncode == USAGE and "Traceback" not in refused.stderr
    assert "the record cannot be read or written" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    # started on trust, the collector finds it while running, and stops intake
    status, body, _, log = running_collector_says(tmp_path)
    assert status == 503 and "the record cannot be read or written" in body
    assert "Traceback" not in log
    checked = gputally("audit", "verify", f"--ledger={db}", f"--keys={tmp_path / 'keys'}")
    assert checked.returncode == USAGE and "Traceback" not in checked.stderr
    assert "the record cannot be read or written" in checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1


# -- 7. standard formats ---------------------------------------------------------------------


def test_the_collector_publishes_a_standard_verifier_key_and_old_key_files_still_read(
    tmp_path: Path,
) -> None:
    record, ledger = filled(tmp_path, 4, 4)
    record.close()
    vkey = (tmp_path / "keys" / COLLECTOR_KEY_FILE).read_text()
    name, key = parse_verifier_key(vkey)
    assert (name, key) == (ORIGIN, public_bytes(ledger.key))
    prefix, key_hash, encoded = vkey.strip().split("+", 2)
    assert prefix == ORIGIN and len(key_hash) == 8 and encoded.startswith("A")  # 0x01 first
    ok = gputally(
        "audit", "verify", f"--ledger={tmp_path / 'ledger.db'}", f"--keys={tmp_path / 'keys'}"
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # a key directory from an older collector: the two-line collector.ckey
    (tmp_path / "keys" / COLLECTOR_KEY_FILE).unlink()
    (tmp_path / "keys" / LEGACY_KEY_FILE).write_text(
        f"{ORIGIN}\n{encode_public_key(public_bytes(ledger.key))}\n"
    )
    old = gputally(
        "audit", "verify", f"--ledger={tmp_path / 'ledger.db'}", f"--keys={tmp_path / 'keys'}"
    )
    assert old.returncode == 0, old.stdout + old.stderr


@pytest.mark.parametrize("origin", ["gputally test", "gputally+test", "", "gputally/\u00e9t\u00e9"])
def test_an_origin_standard_tools_would_reject_is_refused(tmp_path: Path, origin: str) -> None:
    enrolled(tmp_path, "n1")
    args = collector_args(tmp_path)
    args[args.index(f"--origin={ORIGIN}")] = f"--origin={origin}"
    one_line_refusal(gputally(*args), LEDGER, "--origin:")


def test_the_origin_is_pinned_when_the_ledger_is_created(tmp_path: Path) -> None:
    record, _ = filled(tmp_path, 4, 4)
    record.close()
    args = collector_args(tmp_path)
    args[args.index(f"--origin={ORIGIN}")] = "--origin=example.org/another-log"
    one_line_refusal(gputally(*args), LEDGER, f"this ledger's origin is '{ORIGIN}'")


# -- the auditor's side: whatever a ledger holds ---------------------------------------------


def hostile_ledger(tmp_path: Path) -> Path:
    """A ledger an older or hostile collector wrote: every summary validly signed and chained,
    but one window sent twice, one card in two nodes at once, and an impossible energy."""
    record, _ = filled(tmp_path, 0, 1)
    key = load_or_create_private_key(tmp_path / "collector.key")
    ledger = Ledger(record, key, ORIGIN, tmp_path / "ledger.db.checkpoint")
    made = {n: Ed25519PrivateKey.generate() for n in ("n1", "n2")}
    keys = KeyStore(tmp_path / "keys")
    for node, k in made.items():
        keys.enroll(node, public_bytes(k), rotate=True)
    signers = {node: SummarySigner(k, node) for node, k in made.items()}
    stolen = window(1, busy=0.9, node="n2")
    stolen.gpus[0].uuid = "gpu-n1-0"  # n2 claims n1's card (in another case) for the same 300 s
    burning = window(3, busy=0.3)
    burning.gpus[0].energy_joules = 1e300
    rows = [
        ("n1", window(0, busy=0.3)),
        ("n1", window(1, busy=0.3)),
        ("n1", window(1, busy=0.9)),  # the same window again, a new chain number
        ("n2", stolen),
        ("n1", burning),
    ]
    for seq, (node, s) in enumerate(rows, 1):
        signed = signers[node].sign(s)
        record.append(
            node,
            1,
            seq,
            s.window_start_unix_nano,
            s.window_end_unix_nano,
            T0,
            signed.SerializeToString(),
        )
    assert ledger.checkpoint(T0)
    record.close()
    return tmp_path / "ledger.db"


def test_audit_verify_names_every_kind_of_finding_with_counts_and_examples(
    tmp_path: Path,
) -> None:
    db = hostile_ledger(tmp_path)
    keys = tmp_path / "keys"
    answer = gputally("audit", "verify", f"--ledger={db}", f"--keys={keys}", "--json")
    assert answer.returncode == FAILED
    result = json.loads(answer.stdout)
    assert not result["verified"]
    assert {kind: f["count"] for kind, f in result["findings"].items()} == {
        "overlap": 1,
        "duplicate identity": 1,
        "implausible value": 1,
    }
    assert result["findings"]["overlap"]["examples"][0]["entry"] == 3
    assert (
        "GPU gpu-n1-0 is in node n2's window and in node n1's"
        in (result["findings"]["duplicate identity"]["examples"][0]["message"])
    )
    census = gputally("audit", "census", f"--ledger={db}", f"--keys={keys}", "--json")
    assert census.returncode == 0, census.stderr
    assert [
        (d["uuid"], d["nodes"], d["kind"]) for d in json.loads(census.stdout)["duplicates"]
    ] == [("GPU-n1-0", ["n1", "n2"], "claimed by two nodes at once")]
    text = gputally("audit", "verify", f"--ledger={db}", f"--keys={keys}")
    assert text.returncode == FAILED
    assert "FAILED: 3 findings of 3 kinds" in text.stdout
    assert "  implausible value: 1\n" in text.stdout


def test_a_report_on_a_hostile_ledger_counts_each_gpu_second_once_and_lists_the_findings(
    tmp_path: Path,
) -> None:
    db = hostile_ledger(tmp_path)
    out = tmp_path / "report"
    made = gputally(
        "audit",
        "report",
        f"--ledger={db}",
        f"--keys={tmp_path / 'keys'}",
        f"--from={T0:.0f}",
        f"--to={T0 + 600:.0f}",
        "--expected-gpus=1",
        "--measure=busy",
        "--claim=0.85",
        f"--out={out}",
    )
    assert made.returncode == 0, made.stderr
    assert "finding: 1 overlap" in made.stderr
    answer = json.loads((out / "report.json").read_text())
    # n1's GPU at 0.3 for both windows; the second copy (0.9) and n2's claim (0.9) left out
    assert answer["figure"] == pytest.approx(0.3)
    assert answer["verdict"] == "refuted"
    assert set(answer["verification"]["findings"]) == {
        "overlap",
        "duplicate identity",
        "implausible value",
    }
    assert "counted in any figure of this report" in (out / "report.html").read_text()
    # `query` on the same record applies the same rules
    query = gputally(
        "query",
        f"--db={db}",
        f"--from={T0:.0f}",
        f"--to={T0 + 600:.0f}",
        "--expected-gpus=1",
        "--json",
    )
    assert json.loads(query.stdout)["figure"] == pytest.approx(0.3)


# -- what a hostile review found after the first pass ----------------------------------------


def _set(field: str, value: float, part: str = "") -> Callable[[pb.Summary], object]:
    def change(s: pb.Summary) -> None:
        target = s.gpus[0] if not part else getattr(s.gpus[0], part)
        setattr(target, field, value)
        if part == "flagged":
            s.gpus[0].flagged.seconds = 1.0

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set("effective_estimated_seconds", -1e6), "effective_estimated_seconds must be a finite"),
        (_set("busy_unmeasured_seconds", math.nan), "busy_unmeasured_seconds must be a finite"),
        (_set("sm_measured_seconds", math.inf), "sm_measured_seconds must be a finite"),
        (_set("busy_seconds", -1e6, "flagged"), "padding (flagged): busy_seconds must be a finite"),
        (
            lambda s: (
                (s.gpus[0].MergeFrom(pb.GpuSummary(lost_seconds=300.0)), None)
                and s.gpus[0].ClearField("present_seconds")
            ),
            "busy_seconds (90) is more than present_seconds (0)",
        ),
        (_set("sm_active_seconds", 10.0), "sm_active_seconds (10) is more than sm_measured"),
        (
            lambda s: s.gpus.add().CopyFrom(
                pb.GpuSummary(index=1, uuid="gpu-n1-0", present_seconds=300.0)
            ),
            "appears twice",
        ),
    ],
    ids=[
        "negative estimate",
        "NaN",
        "infinity",
        "negative padding",
        "busy while absent",
        "sm active unmeasured",
        "one card twice",
    ],
)
def test_numbers_out_of_their_place_are_refused_live_and_flagged_in_the_audit(
    tmp_path: Path, change: Callable[[pb.Summary], object], reason: str
) -> None:
    keys, made = enrolled(tmp_path, NODE)
    state = ClusterState(record=Record(tmp_path / "r.db"), keys=keys)
    first = hello(NODE, 2, key=made[NODE])
    state.open_session(first, proven=True)
    s = window(0)
    change(s)
    signed = SummarySigner(made[NODE], NODE).sign(s)
    carried = pb.Report(seq=1, time_unix_nano=int((T0 + 300) * 1e9), summary=signed)
    with pytest.raises(InvalidMessageError) as refused:
        state.ingest(NODE, carried, received=T0 + 301)
    assert reason in str(refused.value)
    assert accounting.summary_problem(s)  # the same rule the auditor's tools apply


def test_an_empty_uuid_in_a_ledger_is_a_finding_and_counts_nothing(tmp_path: Path) -> None:
    record, _ = filled(tmp_path, 0, 1)
    key = load_or_create_private_key(tmp_path / "collector.key")
    ledger = Ledger(record, key, ORIGIN, tmp_path / "ledger.db.checkpoint")
    signer = SummarySigner(Ed25519PrivateKey.generate(), NODE)
    KeyStore(tmp_path / "keys").enroll(NODE, public_bytes(signer.key), rotate=True)
    for seq in range(3):  # the same window three times, its GPU without a UUID
        s = window(0, busy=0.9)
        s.gpus[0].uuid = ""
        record.append(
            NODE,
            1,
            seq + 1,
            s.window_start_unix_nano,
            s.window_end_unix_nano,
            T0,
            signer.sign(s).SerializeToString(),
        )
    assert ledger.checkpoint(T0)
    record.close()
    db, keys = tmp_path / "ledger.db", tmp_path / "keys"
    answer = json.loads(
        gputally("audit", "verify", f"--ledger={db}", f"--keys={keys}", "--json").stdout
    )
    assert answer["findings"]["implausible value"]["count"] == 3
    query = gputally(
        "query",
        f"--db={db}",
        f"--from={T0:.0f}",
        f"--to={T0 + 300:.0f}",
        "--expected-gpus=1",
        "--json",
    )
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout)["figure"] == 0.0


def test_a_uuid_in_another_case_is_the_same_card(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    state = ClusterState()
    state.open_session(hello(NODE, 1))
    for variant in ("gpu-n1-0", "GPU-N1-0"):
        clone = hello("n2", 1)
        clone.gpus[0].uuid = variant
        with pytest.raises(IdentityConflictError):
            state.open_session(clone, proven=True)
    spaced = hello("n3", 1)
    spaced.gpus[0].uuid = "GPU-n1-0 "
    with pytest.raises(InvalidMessageError, match="has a UUID that is not one"):
        state.open_session(spaced, proven=True)
    # and in the record: n2's window for the same card in another case is refused
    keys, made = enrolled(tmp_path, NODE, "n2")
    recording = ClusterState(record=Record(tmp_path / "r.db"), keys=keys)
    recording.open_session(hello(NODE, 1, key=made[NODE]), proven=True)
    first = SummarySigner(made[NODE], NODE).sign(window(0))
    recording.ingest(
        NODE,
        pb.Report(seq=1, time_unix_nano=int((T0 + 300) * 1e9), summary=first),
        received=T0 + 301,
    )
    other = hello("n2", 1, key=made["n2"])
    other.gpus[0].uuid = "gpu-n1-0"
    recording.nodes[NODE].session = 0  # n1 went away, n2 claims the card for the same window
    recording.nodes[NODE].last_received = 0.0
    recording.open_session(other, proven=True)
    copy = window(0, node="n2")
    copy.gpus[0].uuid = "gpu-n1-0"
    with pytest.raises(InvalidMessageError, match="a duplicate identity"):
        recording.ingest(
            "n2",
            pb.Report(
                seq=1,
                time_unix_nano=int((T0 + 300) * 1e9),
                summary=SummarySigner(made["n2"], "n2").sign(copy),
            ),
            received=T0 + 301,
        )


def test_a_window_split_by_an_agent_restart_is_recorded_whole_and_no_more(tmp_path: Path) -> None:
    state, record, signer = recording(tmp_path)
    parts: list[pb.Report] = []
    for seconds in (120.0, 180.0, 1.0):  # stopped after 120 s, then the rest; then one more
        s = window(0)
        s.gpus[0].present_seconds, s.gpus[0].busy_seconds = seconds, 0.3 * seconds
        parts.append(
            pb.Report(
                seq=len(parts) + 1, time_unix_nano=int((T0 + 300) * 1e9), summary=signer.sign(s)
            )
        )
    assert state.ingest(NODE, parts[0], received=T0 + 301) == "accepted"
    assert state.ingest(NODE, parts[1], received=T0 + 301) == "accepted"
    with pytest.raises(InvalidMessageError, match="overlaps one this node recorded"):
        state.ingest(NODE, parts[2], received=T0 + 301)
    assert record.count() == 2


def test_a_card_that_moved_counts_its_seconds_once_live() -> None:
    now = [T0]
    state = ClusterState(stale_after=15.0, clock=lambda: now[0])
    state.open_session(hello(NODE, 1))
    for k in range(1, 601):
        state.ingest(NODE, report(k, T0 + k, gpu_sample(0, busy=1.0)), received=T0 + k)
    state.close_session(NODE, state.nodes[NODE].session)
    now[0] = T0 + 616
    moved = hello("n2", 1)
    moved.gpus[0].uuid = f"GPU-{NODE}-0"
    state.open_session(moved, proven=True)
    # one report claiming the last 600 s, which n1 already counted up to T0 + 600
    state.ingest(
        "n2", report(1, T0 + 616, gpu_sample(0, busy=1.0), interval=600), received=T0 + 616
    )
    assert state.counters.seconds["busy"] == pytest.approx(600.0 + 16.0)
    assert state.nodes["n2"].clipped_seconds == pytest.approx(584.0)


def test_acknowledged_entries_lost_with_the_wal_are_refused_at_start(
    collector_factory: Callable[..., Collector], tmp_path: Path
) -> None:
    record, _ = filled(tmp_path, 0, 1)
    record.sync = lambda: None  # type: ignore[method-assign]  # no WAL move, as if killed
    key = load_or_create_private_key(tmp_path / "collector.key")
    ledger = Ledger(record, key, ORIGIN, tmp_path / "ledger.db.checkpoint")
    keys = KeyStore(tmp_path / "keys")
    agent_key = Ed25519PrivateKey.generate()
    keys.enroll(NODE, public_bytes(agent_key), rotate=True)
    collector = collector_factory(expected_gpus=2, record=record, keys=keys, ledger=ledger)
    signer = SummarySigner(agent_key, NODE)
    carried = [
        pb.Report(
            seq=k + 1,
            time_unix_nano=int((T0 + 300 * (k + 1)) * 1e9),
            summary=signer.sign(window(k)),
        )
        for k in range(5)
    ]
    _, ack = asyncio.run(
        raw_stream(collector.target, hello(NODE, key=agent_key), [carried], key=agent_key)
    )
    assert ack.ack.recorded_chain_seq == 5  # acknowledged: the agent lets them go
    copied = tmp_path / "copy"
    copied.mkdir()
    for name in ("ledger.db", "ledger.db.checkpoint", "collector.key"):
        shutil.copy(tmp_path / name, copied / name)  # the .db without its -wal
    shutil.copytree(tmp_path / "keys", copied / "keys")
    collector.stop()
    record.close()
    refused = gputally(*collector_args(copied))
    one_line_refusal(
        refused, LEDGER, "was acknowledged to its agent but the ledger no longer holds it"
    )


def test_a_query_far_in_the_future_is_an_answer_not_a_traceback(tmp_path: Path) -> None:
    record, _ = filled(tmp_path, 2, 2)
    record.close()
    answer = gputally(
        "query",
        f"--db={tmp_path / 'ledger.db'}",
        "--from=9999-12-31",
        "--to=9999-12-31T23:59:59",
        "--expected-gpus=1",
    )
    assert answer.returncode == 0 and "Traceback" not in answer.stderr
    assert "no summary in the record overlaps this period" in answer.stdout


# -- a second hostile review ----------------------------------------------------------------


def test_a_window_sent_again_with_no_seconds_cannot_add_energy(tmp_path: Path) -> None:
    state, record, signer = recording(tmp_path)
    full = window(0)
    full.gpus[0].energy_joules = max_joules(300.0)
    empty = window(0)
    empty.gpus[0].ClearField("present_seconds")
    empty.gpus[0].ClearField("busy_seconds")
    empty.gpus[0].energy_joules = max_joules(300.0)
    at = int((T0 + 300) * 1e9)
    state.ingest(
        NODE, pb.Report(seq=1, time_unix_nano=at, summary=signer.sign(full)), received=T0 + 301
    )
    with pytest.raises(InvalidMessageError, match="overlaps one this node recorded"):
        state.ingest(
            NODE, pb.Report(seq=2, time_unix_nano=at, summary=signer.sign(empty)), received=T0 + 301
        )
    assert record.count() == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"busy_seconds": 150.0, "busy_missing_seconds": 300.0},
            "busy_seconds and busy_missing_seconds add up",
        ),
        (
            {"allocated_seconds": 150.0, "allocated_missing_seconds": 300.0},
            "allocated_seconds and allocated_missing_seconds add up",
        ),
    ],
    ids=["busy", "allocated"],
)
def test_a_measure_and_its_missing_seconds_split_the_present_ones(
    fields: dict[str, float], reason: str
) -> None:
    s = window(0)
    for name, value in fields.items():
        setattr(s.gpus[0], name, value)
    assert reason in accounting.summary_problem(s)


def test_mig_shares_cannot_create_work_or_energy() -> None:
    s = window(0, busy=0.0)
    gpu = s.gpus[0]
    share = gpu.shares.add(present_seconds=300.0, busy_seconds=300.0, allocated_seconds=300.0)
    share.attribution.tenant = "alice"
    assert "its shares' allocated_seconds add up to 300, more than the GPU's" in (
        accounting.summary_problem(s)
    )
    share.allocated_seconds = 0.0
    assert "its shares' busy_seconds" in accounting.summary_problem(s)
    share.busy_seconds = 0.0
    share.energy_joules = 1000.0
    assert "its shares' energy_joules" in accounting.summary_problem(s)
    share.energy_joules = 0.0
    assert accounting.summary_problem(s) == ""


def test_a_receipt_with_an_impossible_size_is_one_line(tmp_path: Path) -> None:
    record, _ = filled(tmp_path, 2, 2)
    record.close()
    receipt = tmp_path / "receipt.json"
    receipt.write_text(
        '{"gputally_receipt": 1, "origin": "x", "size": 1e400, "root": "00", "keys_digest": ""}'
    )
    answer = gputally(
        "audit",
        "report",
        f"--ledger={tmp_path / 'ledger.db'}",
        f"--keys={tmp_path / 'keys'}",
        f"--from={T0:.0f}",
        f"--to={T0 + 600:.0f}",
        "--expected-gpus=1",
        f"--receipt={receipt}",
        f"--out={tmp_path / 'out'}",
    )
    assert answer.returncode == USAGE and "Traceback" not in answer.stderr
    assert "not a usable receipt" in answer.stderr


def test_a_deleted_checkpoint_state_is_refused_not_forgotten(tmp_path: Path) -> None:
    record, _ = filled(tmp_path, 4, 2)
    record.close()
    (tmp_path / "ledger.db.checkpoint").unlink()
    one_line_refusal(gputally(*collector_args(tmp_path)), LEDGER, "missing, but this ledger's")


def test_a_sequence_number_the_record_cannot_hold_is_refused_not_a_crash(tmp_path: Path) -> None:
    state, record, signer = recording(tmp_path)
    huge = pb.Report(
        seq=2**63, time_unix_nano=int((T0 + 300) * 1e9), summary=signer.sign(window(0))
    )
    with pytest.raises(InvalidMessageError, match=r"seq must be in \[1, 2\^63 - 1\]"):
        state.ingest(NODE, huge, received=T0 + 301)
    assert record.count() == 0


def test_a_node_name_too_long_for_its_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    state = ClusterState(keys=KeyStore(tmp_path / "keys", trust_on_first_use=True))
    with pytest.raises(InvalidMessageError, match="of at most 250 bytes"):
        state.open_session(hello("\u00e9" * 200, 1, key=Ed25519PrivateKey.generate()), proven=True)
    assert list((tmp_path / "keys").iterdir()) == []


def test_an_undecodable_message_is_invalid_argument_not_unknown(
    collector_factory: Callable[..., Collector],
) -> None:
    collector = collector_factory()

    async def send(first: bytes, then: bytes | None) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(collector.target) as channel:
            call = channel.stream_stream(
                "/gputally.v1.Ingest/Stream",
                request_serializer=lambda b: b,
                response_deserializer=pb.CollectorMessage.FromString,
            )()
            await call.write(first)
            if then is not None:
                assert (await call.read()).WhichOneof("body") == "welcome"
                await call.write(then)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            return refused.value.code(), refused.value.details() or ""

    garbage = b"\xff\xff\xff\xff"
    valid_hello = pb.AgentMessage(hello=hello(NODE)).SerializeToString()
    for first, then in ((garbage, None), (valid_hello, garbage)):
        assert asyncio.run(send(first, then)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "a message that is not a gputally.v1 AgentMessage",
        )


def test_a_crash_between_remembering_and_storing_a_checkpoint_loses_neither(
    tmp_path: Path,
) -> None:
    record, ledger = filled(tmp_path, 4, 2)  # checkpoints at 2 and 4
    s = window(9)
    record.append(NODE, 1, 99, s.window_start_unix_nano, s.window_end_unix_nano, T0, envelope(s))

    def killed(*_: object) -> None:
        raise SystemExit("kill -9")  # after the state file is synced, before the row

    record.add_checkpoint = killed  # type: ignore[method-assign,assignment]
    with pytest.raises(SystemExit):
        ledger.checkpoint(T0)
    record.close()
    again = Record(tmp_path / "ledger.db")
    Ledger(
        again,
        load_or_create_private_key(tmp_path / "collector.key"),
        ORIGIN,
        tmp_path / "ledger.db.checkpoint",
    )
    assert [size for _, size, _, _ in again.checkpoints()] == [2, 4, 5]
    again.close()
    checked = gputally(
        "audit",
        "verify",
        f"--ledger={tmp_path / 'ledger.db'}",
        f"--keys={tmp_path / 'keys'}",
        "--json",
    )
    # the restored checkpoint verifies; the one finding is the test's own unsigned entry
    findings = json.loads(checked.stdout)["findings"]
    assert {kind: f["count"] for kind, f in findings.items()} == {"signature": 1}


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda state: state["peaks"].reverse(), "the remembered frontier does not give"),
        (lambda state: state["peaks"].pop(), "a damaged frontier"),
    ],
    ids=["peaks swapped", "a peak missing"],
)
def test_a_damaged_frontier_in_the_state_file_is_refused_not_gone_on_from(
    tmp_path: Path, damage: Callable[[dict[str, list[str]]], object], says: str
) -> None:
    record, _ = filled(tmp_path, 6, 6)  # 6 entries: two perfect subtrees (4 and 2)
    record.close()
    path = tmp_path / "ledger.db.checkpoint"
    state = json.loads(path.read_text())
    assert len(state["peaks"]) == 2
    damage(state)
    path.write_text(json.dumps(state))
    one_line_refusal(gputally(*collector_args(tmp_path)), LEDGER, says)


def test_the_ledger_start_benchmark_still_runs_on_the_ledger_it_measures() -> None:
    """The benchmark writes the record's tables itself (bulk loads): a schema change that
    leaves it behind fails here, not months later when someone wants the figures."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ledger_start.py"
    ran = subprocess.run(
        [sys.executable, str(script), "--entries", "2000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    rows = [line.split() for line in ran.stdout.splitlines()]
    assert any(row[:1] == ["2,000"] and len(row) == 7 for row in rows)  # a row of the table
    assert "projected linearly from 2,000 entries" in ran.stdout
