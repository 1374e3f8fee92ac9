"""Every second counted at any report cadence: an agent that samples every second and reports
every 10 s gives the collector, the record and its own exporter exactly what one reporting
every second gives."""

from __future__ import annotations

import dataclasses
import gzip
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gputally.agent.sampler import Sampler
from gputally.collector.live.metrics import Exposition, make_app, make_registry
from gputally.collector.live.state import ClusterState, Series
from gputally.collector.live.validate import InvalidMessageError, LimitError, check_hello
from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb

from .factories import T0, busy_sample, hello, mock_node, report

# Work that changes within a report, padding that starts inside one, an XID, a GPU lost for a
# while, a driver reload (the energy counter restarts), a process that exits: everything a
# report of 10 ticks must add up tick by tick.
MIXED = """
[cluster]
nodes = 1
gpus_per_node = 4
gpu_model = "NVIDIA H100 80GB HBM3"
[[workload]]
gpus = 1
kind = "square"
period = 7.25
duty = 0.4
busy = 1.0
sm_active = 0.5
[[workload]]
gpus = 1
kind = "burn"
start = 33
[[workload]]
gpus = 1
kind = "training"
[[fault]]
kind = "xid"
gpu = 2
at = 41
code = 31
[[fault]]
kind = "gpu_lost"
gpu = 3
at = 20
until = 47
[[fault]]
kind = "driver_reload"
at = 55
until = 56
"""
SECONDS = 120


def run(
    toml: str, every: float | None, seconds: int = SECONDS, **options: Any
) -> tuple[Sampler, list[pb.Report], list[pb.Report]]:
    """(sampler, the reports sent, every tick's readings) of `seconds` of a node."""
    node = mock_node(toml, name="n1", start=T0, summary_window=60.0, report_every=every, **options)
    sent: list[pb.Report] = []
    ticks: list[pb.Report] = []
    for _ in range(seconds):
        node.clock.advance(1.0)
        outgoing = node.sampler.tick()
        assert node.sampler.last_tick is not None
        ticks.append(node.sampler.last_tick)
        if outgoing is not None:
            sent.append(outgoing)
    sent.extend(node.sampler.final_reports())
    return node.sampler, sent, ticks


def ingest(sampler: Sampler, reports: list[pb.Report], **options: Any) -> ClusterState:
    state = ClusterState(expected_gpus=4, window=30.0, lag=0.0, clock=lambda: T0, **options)
    state.open_session(sampler.hello(1, "mock"))
    for sent in reports:
        state.ingest("n1", sent, received=sent.time_unix_nano / 1e9)
    return state


def summaries(reports: list[pb.Report]) -> list[bytes]:
    return [
        pb.Summary.FromString(r.summary.body).SerializeToString() for r in reports if r.summary.body
    ]


def test_reports_every_10_s_carry_each_gpus_totals_tick_by_tick() -> None:
    sampler, sent, ticks = run(MIXED, 10.0)
    spanning = [r for r in sent if r.gpus]
    assert [r.interval_seconds for r in spanning] == [10.0] * 12
    assert [r.seq for r in sent] == list(range(1, len(sent) + 1))
    assert sampler.hello(1, "mock").report_interval_seconds == 10.0
    for k, outgoing in enumerate(spanning):
        mine = ticks[10 * k : 10 * k + 10]
        assert outgoing.time_unix_nano == mine[-1].time_unix_nano
        for sample in outgoing.gpus:
            # the latest tick's reading, and every XID of the ten
            latest = mine[-1].gpus[sample.index]
            assert sample.busy == latest.busy and sample.status == latest.status
            assert [e.code for e in sample.xid_events] == [
                e.code for t in mine for e in t.gpus[sample.index].xid_events
            ]
            expected = accounting.zeros()
            for t in mine:
                for name, value in accounting.contributions(
                    t.gpus[sample.index], t.interval_seconds
                ).items():
                    expected[name] += value
            got = {f: getattr(sample.totals, f) for f in accounting.FIELDS if f != "energy_joules"}
            assert got == pytest.approx({k: v for k, v in expected.items() if k != "energy_joules"})
    assert any(e.code == 31 for r in spanning for g in r.gpus for e in g.xid_events)
    assert any(g.totals.flagged.seconds > 0 for r in spanning for g in r.gpus)
    assert any(0 < g.totals.lost_seconds < 10 for r in spanning for g in r.gpus)


def test_the_signed_summaries_do_not_depend_on_the_report_cadence() -> None:
    _, every_second, _ = run(MIXED, None)
    _, every_ten, _ = run(MIXED, 10.0)
    assert summaries(every_second) == summaries(every_ten)
    assert len(summaries(every_ten)) == SECONDS // 60


def test_the_collector_counts_the_same_seconds_at_any_cadence() -> None:
    one, every_second, ticks = run(MIXED, None)
    ten, every_ten, _ = run(MIXED, 10.0)
    a, b = ingest(one, every_second), ingest(ten, every_ten)
    assert b.counters.seconds == pytest.approx(a.counters.seconds, rel=1e-9)
    assert b.counters.flagged == pytest.approx(a.counters.flagged, rel=1e-9)
    assert b.counters.padding == pytest.approx(a.counters.padding, rel=1e-9)
    assert a.counters.padding  # the burn is flagged
    # energy: the agent's joules tick by tick, across the driver reload
    assert b.counters.energy_joules == pytest.approx(a.counters.energy_joules, rel=1e-9)
    present = sum(
        accounting.contributions(g, t.interval_seconds)["present_seconds"]
        for t in ticks
        for g in t.gpus
    )
    assert a.counters.seconds["observed"] == pytest.approx(present)
    assert present < 4 * SECONDS - 27  # GPU 3 was lost from 20 s on
    # The live window over the last 30 s (three whole reports of 10 s): the same figures. At
    # 10 s a report, the window ends 10 s later (the newest report's span is not all in).
    end = T0 + SECONDS
    va, vb = a.view(now=end), b.view(now=end + 10.0)
    assert vb.window.ratios == pytest.approx(va.window.ratios, rel=1e-9)
    assert vb.window.coverage == pytest.approx(va.window.coverage, rel=1e-9)
    assert vb.window.without_padding == pytest.approx(va.window.without_padding, rel=1e-9)
    assert vb.nodes[0].window.ratios == pytest.approx(va.nodes[0].window.ratios, rel=1e-9)


def test_the_live_window_follows_the_report_cadence() -> None:
    ten, every_ten, _ = run(MIXED, 10.0, seconds=40)
    state = ingest(ten, every_ten)
    view = state.view(now=T0 + 40)
    # 30 s configured, three reports' worth at 10 s: 30 s; the lag grows by a report's span
    assert view.window_seconds == 30.0
    twenty = ClusterState(window=30.0, lag=3.0)
    twenty.open_session(hello(gpus=1, report_interval_seconds=20.0))
    assert twenty.view().window_seconds == 60.0
    assert twenty._spans() == (60.0, 23.0)
    # An agent that says it reports hourly stretches nothing beyond MAX_CADENCE_S (60 s).
    hourly = ClusterState(window=30.0, lag=3.0)
    hourly.open_session(hello(gpus=1, report_interval_seconds=3600.0))
    assert hourly.view().window_seconds == 180.0 and hourly._spans() == (180.0, 63.0)


def test_one_agent_claiming_a_slow_cadence_does_not_slow_every_nodes_live_figure() -> None:
    """The window follows the cadence of 99% of the connected GPUs: 200 nodes report every
    second, one says every 60 s. Its seconds still count, late; nobody else's figure waits."""
    state = ClusterState(expected_gpus=201, window=30.0, lag=3.0, clock=lambda: T0)
    for n in range(200):
        state.open_session(hello(f"n{n}", gpus=1))
    state.open_session(hello("slow", gpus=1, report_interval_seconds=60.0))
    for k in range(1, 41):
        for n in range(200):
            state.ingest(f"n{n}", report(k, T0 + k, busy_sample(0, 1.0)), received=T0 + k)
    view = state.view(now=T0 + 40)
    assert (view.window_seconds, view.window_end) == (30.0, T0 + 37)
    assert view.window.ratios["busy"] == pytest.approx(200 / 201)
    # three slow GPUs of 203 are more than 1% of them: the window follows them
    state.open_session(hello("slow2", gpus=1, report_interval_seconds=60.0))
    state.open_session(hello("slow3", gpus=1, report_interval_seconds=60.0))
    assert state.view(now=T0 + 40).window_seconds == 180.0
    # one slow agent claiming 64 GPUs (4% of them by its Hello) counts as the median node's
    # one GPU: 0.5% of 201, not followed
    liar = ClusterState(expected_gpus=264, window=30.0, lag=3.0, clock=lambda: T0)
    for n in range(200):
        liar.open_session(hello(f"n{n}", gpus=1))
    liar.open_session(hello("slow", gpus=64, report_interval_seconds=60.0))
    assert liar.view(now=T0 + 40).window_seconds == 30.0
    liar.open_session(hello("slow2", gpus=64, report_interval_seconds=60.0))
    liar.open_session(hello("slow3", gpus=64, report_interval_seconds=60.0))
    assert liar.view(now=T0 + 40).window_seconds == 180.0  # 3 of 203 nodes: followed
    # a small cluster: one node of two is more than 1%, its cadence is followed
    small = ClusterState(window=30.0, lag=3.0)
    small.open_session(hello("a", gpus=1))
    small.open_session(hello("b", gpus=1, report_interval_seconds=20.0))
    assert small.view().window_seconds == 60.0


def test_the_agents_exporter_still_sees_every_tick() -> None:
    """NodeAgent feeds its local /metrics every tick's readings (Sampler.last_tick), so the
    node's own counters do not depend on the report cadence either."""
    from gputally.agent.exporter import NodeExporter

    exporters = []
    for every in (None, 10.0):
        node = mock_node(MIXED, name="n1", start=T0, report_every=every)
        exporter = NodeExporter(node.sampler.hello(0, "mock"))
        for _ in range(30):
            node.clock.advance(1.0)
            node.sampler.tick()
            assert node.sampler.last_tick is not None
            exporter.update(node.sampler.last_tick)
        exporters.append(exporter)
    one, ten = exporters
    assert one.seconds[0]["busy"] > 0
    assert ten.seconds == one.seconds and ten.joules == one.joules


def test_a_stall_ends_the_report_in_progress() -> None:
    node = mock_node(MIXED, name="n1", start=T0, report_every=10.0)
    outgoing = []
    for step in (1.0, 1.0, 1.0, 60.0, 1.0):
        node.clock.advance(step)
        report_now = node.sampler.tick()
        if report_now is not None:
            outgoing.append(report_now)
    # three ticks, then a stall: the three go out alone, and the stall is not covered
    assert [r.interval_seconds for r in outgoing] == [3.0]
    (rest,) = node.sampler.final_reports()[:1]
    assert rest.interval_seconds == 2.0 + 1.0  # the tick after the stall covers 2 s (the cap)


def test_report_every_must_be_at_least_the_interval() -> None:
    with pytest.raises(ValueError, match="more often than samples"):
        mock_node(MIXED, name="n1", report_every=0.5)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: setattr(t, "busy_seconds", 11.0), "busy_seconds"),
        (lambda t: setattr(t, "present_seconds", 10.5), "within the window"),
        (lambda t: setattr(t, "sm_active_seconds", math.nan), "finite"),
        (lambda t: setattr(t.flagged, "seconds", 12.0), "padding"),
        # flagged busy seconds in no flagged second: not the plain GPU it looks like
        (lambda t: setattr(t.flagged, "busy_seconds", 3.0), "busy_seconds"),
        (lambda t: setattr(t, "energy_joules", 1e9), "energy_joules"),
        # each within the 10 s, together 20 s of padding in 10 s
        (
            lambda t: [t.padding.add(rule="burn_tool", seconds=10.0) for _ in range(2)],
            "padding rule is named twice",
        ),
    ],
)
@pytest.mark.parametrize("gpus", [1, 3])
def test_impossible_totals_are_refused_and_count_nothing(
    change: Any, problem: str, gpus: int
) -> None:
    """One GPU's totals impossible, alone or beside plain ones (checked column by column)."""
    state = ClusterState(expected_gpus=gpus, clock=lambda: T0)
    state.open_session(hello(gpus=gpus, report_interval_seconds=10.0))
    samples = [busy_sample(i, 0.5) for i in range(gpus)]
    for sample in samples:
        sample.totals.present_seconds = 10.0
        sample.totals.busy_seconds = 5.0
    change(samples[-1].totals)
    with pytest.raises(InvalidMessageError, match=problem):
        state.ingest("n1", report(1, T0 + 10, *samples, interval=10.0), received=T0 + 10)
    assert state.counters.seconds["observed"] == 0.0
    assert state.nodes["n1"].reports["rejected"] == 1


def test_totals_with_a_long_attribution_are_beyond_the_limit() -> None:
    state = ClusterState(expected_gpus=2, clock=lambda: T0)
    state.open_session(hello(gpus=2, report_interval_seconds=10.0))
    samples = [busy_sample(i, 0.5) for i in range(2)]
    for sample in samples:
        sample.totals.present_seconds = 10.0
    samples[1].totals.attribution.tenant = "t" * (state.sizes.max_string + 1)
    with pytest.raises(LimitError, match="attribution tenant is longer than --max-string"):
        state.ingest("n1", report(1, T0 + 10, *samples, interval=10.0), received=T0 + 10)
    samples[1].totals.attribution.tenant = "t" * (state.sizes.max_string // 4)
    accepted = state.ingest("n1", report(1, T0 + 10, *samples, interval=10.0), received=T0 + 10)
    assert accepted == "accepted"


def test_totals_with_too_many_shares_are_beyond_the_limit() -> None:
    state = ClusterState(expected_gpus=1, clock=lambda: T0)
    state.open_session(hello(gpus=1))
    sample = busy_sample(0, 0.5)
    for _ in range(state.sizes.max_items + 1):
        sample.totals.shares.add()
    with pytest.raises(LimitError, match="max-items"):
        state.ingest("n1", report(1, T0 + 10, sample, interval=10.0), received=T0 + 10)


@pytest.mark.parametrize("value", [-1.0, math.inf, 7200.0])
def test_a_hello_with_an_impossible_report_interval_is_refused(value: float) -> None:
    with pytest.raises(InvalidMessageError, match="report_interval_seconds"):
        check_hello(hello(gpus=1, report_interval_seconds=value))


def test_totals_count_instead_of_the_reading() -> None:
    """A report of 10 s whose latest reading is idle, but whose ticks were busy 7 s of 10:
    the totals count, the reading only shows."""
    state = ClusterState(expected_gpus=1, window=10.0, lag=0.0, clock=lambda: T0)
    state.open_session(hello(gpus=1, report_interval_seconds=10.0))
    sample = busy_sample(0, 0.0)
    totals = sample.totals
    totals.present_seconds = 10.0
    totals.busy_seconds = 7.0
    totals.allocated_seconds = 10.0
    totals.sm_active_seconds = 3.5
    totals.sm_measured_seconds = 10.0
    totals.effective_seconds = 3.5
    totals.memory_busy_seconds = 2.0
    state.ingest("n1", report(1, T0 + 10, sample, interval=10.0), received=T0 + 10)
    assert state.counters.seconds == {
        "observed": 10.0,
        "allocated": 10.0,
        "busy": 7.0,
        "sm_active": 3.5,
        "effective": 3.5,
        "memory_busy": 2.0,
    }
    # the window (10 s configured: 30 s at this cadence) ends a report's span (10 s) later
    window = state.view(now=T0 + 20).window
    assert window.ratios["busy"] == pytest.approx(7.0 / 30)
    assert window.ratios["memory_busy"] == pytest.approx(2.0 / 30)


# -- the live window's running sums -----------------------------------------------------------


def test_a_series_spreads_each_entry_evenly_and_cuts_it_at_the_window_edges() -> None:
    series = Series()
    width = len(series.total)
    series.add(0.0, 10.0, [10.0] * width)
    series.add(10.0, 20.0, [20.0] * width)
    series.add(20.0, 30.0, [0.0] * width)
    assert series.over(5.0, 15.0)[0] == pytest.approx(5.0 + 10.0)
    assert series.over(0.0, 30.0)[0] == pytest.approx(30.0)
    assert series.over(12.0, 40.0)[0] == pytest.approx(16.0)
    assert series.over(30.0, 40.0)[0] == pytest.approx(0.0)
    series.trim(10.5)  # the first entry ended before: gone
    assert len(series.entries) == 2 and series.total[0] == pytest.approx(20.0)


def test_a_series_adds_its_total_up_afresh_so_rounding_never_builds_up() -> None:
    series = Series()
    width = len(series.total)
    for k in range(10_000):
        series.add(k * 0.1, (k + 1) * 0.1, [0.1 + 1e-9 * (k % 7)] * width)
        series.trim(k * 0.1 - 3.0)
    exact = math.fsum(e[2][0] for e in series.entries)
    assert series.total[0] == pytest.approx(exact, rel=1e-12, abs=1e-12)


# -- /metrics rendered once per refresh -------------------------------------------------------


def scrape(app: Any, encoding: str = "", query: str = "") -> tuple[str, dict[str, str], bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/metrics",
        "QUERY_STRING": query,
        "HTTP_ACCEPT_ENCODING": encoding,
    }
    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def busy_line(body: bytes) -> str:
    lines = body.decode().splitlines()
    return next(
        line
        for line in lines
        if line.startswith('gputally_cluster_gpu_seconds_total{measure="busy"')
    )


def test_metrics_are_served_from_one_render_per_refresh() -> None:
    now = [T0]
    state = ClusterState(expected_gpus=1, clock=lambda: now[0])
    state.open_session(hello(gpus=1))
    state.ingest("n1", report(1, T0 + 1, busy_sample(0, 1.0)), received=T0 + 1)
    app = make_app(make_registry(state), ready=lambda: "", refresh=3600.0)
    status, headers, first = scrape(app)
    assert status == "200 OK" and headers["Content-Length"] == str(len(first))
    assert busy_line(first).endswith(" 1.0")
    state.ingest("n1", report(2, T0 + 2, busy_sample(0, 1.0)), received=T0 + 2)
    _, _, second = scrape(app)
    assert second == first  # the same render, within the refresh
    _, zipped_headers, zipped = scrape(app, encoding="gzip, deflate")
    assert zipped_headers["Content-Encoding"] == "gzip"
    # gzip asked for the first time: rendered afresh, with the new second
    assert busy_line(gzip.decompress(zipped)).endswith(" 2.0")
    # a filtered scrape is prometheus-client's own
    status, _, filtered = scrape(app, query="name[]=gputally_metrics_refresh_seconds")
    assert status == "200 OK" and filtered != first
    assert "gputally_metrics_render_seconds" in first.decode()


def test_metrics_refresh_0_renders_every_scrape() -> None:
    state = ClusterState(expected_gpus=1, clock=lambda: T0)
    state.open_session(hello(gpus=1))
    app = make_app(make_registry(state), ready=lambda: "")
    state.ingest("n1", report(1, T0 + 1, busy_sample(0, 1.0)), received=T0 + 1)
    assert busy_line(scrape(app)[2]).endswith(" 1.0")
    state.ingest("n1", report(2, T0 + 2, busy_sample(0, 1.0)), received=T0 + 2)
    assert busy_line(scrape(app)[2]).endswith(" 2.0")


def test_the_renderer_thread_renders_while_scraped_and_stops() -> None:
    registry = CollectorRegistry()
    exposition = Exposition(registry, refresh=0.05)
    assert exposition.get(False) == generate_latest(registry)
    thread = exposition._thread
    assert thread is not None and thread.is_alive()
    for _ in range(200):  # bounded: 10 s at most
        if exposition.renders >= 3:
            break
        thread.join(0.05)
    assert exposition.renders >= 3
    exposition.stop()
    thread.join(5.0)
    assert not thread.is_alive()


def test_scrapes_during_a_render_get_the_previous_one_without_waiting() -> None:
    """A render that takes a while (a large cluster): only the first scrape renders; every
    later one, even while the next render is under way, is served the latest finished render
    and renders nothing itself."""
    import threading

    rendered_by: list[str] = []

    class Slow(Collector):
        def collect(self) -> Iterator[Any]:
            rendered_by.append(threading.current_thread().name)
            time.sleep(0.15)  # a render's time
            yield GaugeMetricFamily("slow", "a slow series", value=len(rendered_by))

    registry = CollectorRegistry()
    registry.register(Slow())
    exposition = Exposition(registry, refresh=0.2)
    try:
        exposition.get(False)  # the first scrape renders; the renderer starts
        for _ in range(20):  # bounded: 20 scrapes, 2 s
            time.sleep(0.1)
            assert exposition.get(False).startswith(b"# HELP slow")
        assert rendered_by[0] == threading.current_thread().name
        assert len(rendered_by) >= 4
        assert set(rendered_by[1:]) == {"gputally-metrics-render"}, rendered_by
    finally:
        exposition.stop()


def test_a_scrape_after_the_renderer_stopped_gets_a_fresh_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The renderer stops when nobody scrapes; the next scrape restarts it, and must not be
    served the render left from before, however soon the new renderer runs."""
    from gputally.collector.live import metrics

    monkeypatch.setattr(metrics, "IDLE_AFTER_S", 0.1)
    value = [1.0]

    class Reading(Collector):
        def collect(self) -> Iterator[Any]:
            yield GaugeMetricFamily("reading", "a value", value=value[0])

    registry = CollectorRegistry()
    registry.register(Reading())
    exposition = Exposition(registry, refresh=0.02)
    try:
        assert b"reading 1.0" in exposition.get(False)
        thread = exposition._thread
        assert thread is not None
        thread.join(5.0)  # idle: it stops by itself
        assert not thread.is_alive()
        value[0] = 2.0
        assert b"reading 2.0" in exposition.get(False)
    finally:
        exposition.stop()


def test_a_tenant_whose_seconds_left_the_window_while_its_gpus_are_fresh_reads_zero() -> None:
    state = ClusterState(expected_gpus=1, window=2.0, lag=0.0, stale_after=15.0)
    state.open_session(hello(gpus=1))
    for k in range(1, 4):
        sample = busy_sample(0, 1.0)
        sample.attribution.source, sample.attribution.tenant = "static", "ml"
        state.ingest("n1", report(k, T0 + k, sample), received=T0 + k)
    # 7 s after the last report: still fresh (15 s), its seconds out of the 2-s window
    view = state.view(now=T0 + 10)
    assert view.by_tenant["ml"].gpus == 1.0
    assert view.by_tenant["ml"].ratios["busy"] == 0.0 and view.by_tenant["ml"].coverage == 0.0


def test_node_metrics_none_serves_the_cluster_figures_only() -> None:
    state = ClusterState(expected_gpus=1, clock=lambda: T0)
    state.open_session(hello(gpus=1))
    state.ingest("n1", report(1, T0 + 1, busy_sample(0, 1.0)), received=T0 + 1)
    full = generate_latest(make_registry(state)).decode()
    bare = generate_latest(make_registry(state, node_series=False)).decode()
    assert "gputally_node_up{" in full and "gputally_node_" not in bare
    assert busy_line(bare.encode()) == busy_line(full.encode())
    # the reports are still counted, for the cluster: accepted, duplicate and rejected
    state.ingest("n1", report(1, T0 + 1, busy_sample(0, 1.0)), received=T0 + 1)
    with pytest.raises(InvalidMessageError):
        state.ingest("n1", report(2, T0 + 2, busy_sample(5, 1.0)), received=T0 + 2)
    bare = generate_latest(make_registry(state, node_series=False)).decode()
    for result, count in (("accepted", 1), ("duplicate", 1), ("rejected", 1)):
        assert f'gputally_collector_reports_total{{result="{result}"}} {count:.1f}' in bare


def test_a_view_without_nodes_has_the_same_cluster_figures() -> None:
    """view(nodes=False) (--node-metrics none) skips the per-node figures only: the mixed
    node (burn tool flagged, a lost GPU, a driver reload), training with a tenant, at 10 s."""
    pod = "3f2c1a9e-0b7d-4c55-9a3e-2f6c9d6a1c00"
    sampler, sent, _ = run(MIXED.replace('"training"', f'"training"\npod = "{pod}"'), 10.0)
    state = ingest(sampler, sent)
    end = sent[-1].time_unix_nano / 1e9
    full, bare = state.view(now=end), state.view(now=end, nodes=False)
    assert bare.nodes == [] and len(full.nodes) == 1
    # GPU 3 was lost at 20 s and stays off the bus: 3 of 4 report
    assert full.reporting == full.nodes[0].reporting == bare.reporting == 3
    assert full.power_watts == full.nodes[0].power_watts == bare.power_watts > 0
    assert dataclasses.replace(full, nodes=[]) == bare
    assert bare.padding_gpus == {"burn_tool": 1} and len(bare.by_tenant) == 1
    assert next(iter(bare.by_tenant.values())).ratios["busy"] > 0


def test_a_summary_naming_a_padding_rule_twice_is_impossible() -> None:
    """Each entry within the window's seconds, but together twice them: the record's rule
    (accounting.summary_problem) refuses it, as the totals' does."""
    summary = pb.Summary(node="n1", window_start_unix_nano=0, window_end_unix_nano=300 * 10**9)
    gpu = summary.gpus.add(index=0, uuid="GPU-0", present_seconds=300.0, busy_seconds=300.0)
    assert accounting.summary_problem(summary) == ""
    for _ in range(2):
        gpu.padding.add(rule="burn_tool", seconds=300.0)
    assert accounting.summary_problem(summary) == "summary GPU 0: a padding rule is named twice"
