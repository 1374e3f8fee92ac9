"""Cluster state: exact integration, live windows, counters, validation."""

from __future__ import annotations

import pytest

from gputally.collector.live.state import ClusterState
from gputally.collector.live.validate import InvalidMessageError
from gputally.v1 import PROTOCOL_REVISION
from gputally.v1 import telemetry_pb2 as pb

from .factories import T0, busy_sample, gpu_sample, hello, report


def gpu(
    index: int, busy: float, sm: float | None = None, procs: int = 1, energy: int | None = None
) -> pb.GpuSample:
    return busy_sample(index, busy, sm, procs, energy)


def feed(
    state: ClusterState,
    node: str,
    seconds: int,
    *values: tuple[float, float | None],
    start_seq: int = 1,
) -> None:
    for k in range(seconds):
        t = T0 + k + 1
        samples = [gpu(i, busy, sm, procs=int(busy > 0)) for i, (busy, sm) in enumerate(values)]
        state.ingest(node, report(start_seq + k, t, *samples), received=t)


def test_counters_integrate_exactly() -> None:
    state = ClusterState(expected_gpus=4, clock=lambda: T0)
    state.open_session(hello())
    feed(state, "n1", 10, (0.9, 0.6), (0.0, 0.0))
    seconds = state.counters.seconds
    assert seconds["observed"] == 20.0
    assert seconds["busy"] == pytest.approx(9.0)
    assert seconds["sm_active"] == pytest.approx(6.0)
    assert seconds["allocated"] == 10.0


def test_flagged_counters_count_a_second_once_however_many_rules_flag_it() -> None:
    state = ClusterState(expected_gpus=2, clock=lambda: T0)
    state.open_session(hello())
    for k in range(1, 5):
        burn = gpu(0, 1.0, 0.05)
        burn.padding.extend(["burn_tool", "busy_without_work"])
        state.ingest("n1", report(k, T0 + k, burn, gpu(1, 0.5, 0.4)), received=T0 + k)
    counters = state.counters
    assert counters.padding == {"burn_tool": 4.0, "busy_without_work": 4.0}
    assert counters.flagged["observed"] == 4.0  # not 8: one GPU, four seconds
    assert counters.flagged["busy"] == pytest.approx(4.0)
    assert counters.flagged["sm_active"] == pytest.approx(0.2)
    # without padding, by subtraction: only GPU 1's work is left
    assert counters.seconds["busy"] - counters.flagged["busy"] == pytest.approx(2.0)


def test_live_window_uses_the_declared_inventory() -> None:
    state = ClusterState(expected_gpus=4, window=5.0, lag=1.0)
    state.open_session(hello())
    feed(state, "n1", 10, (0.9, 0.6), (0.5, 0.2))
    view = state.view(now=T0 + 10)  # window (T0+4, T0+9]
    assert view.expected == 4 and view.seen == 2 and view.reporting == 2
    assert view.window.ratios["busy"] == pytest.approx((0.9 + 0.5) / 4)
    assert view.window.ratios["sm_active"] == pytest.approx((0.6 + 0.2) / 4)
    assert view.window.ratios["allocated"] == pytest.approx(2 / 4)
    assert view.window.coverage == pytest.approx(0.5)
    node = view.nodes[0]
    assert node.window.ratios["busy"] == pytest.approx(0.7)  # the node's own GPUs
    assert node.window.coverage == pytest.approx(1.0)


def test_without_declared_inventory_the_denominator_is_what_was_seen() -> None:
    state = ClusterState(window=5.0, lag=1.0)
    state.open_session(hello())
    feed(state, "n1", 10, (0.9, 0.6), (0.5, 0.2))
    view = state.view(now=T0 + 10)
    assert view.expected == 2 and not view.declared
    assert view.window.ratios["busy"] == pytest.approx(0.7)


def test_unobserved_seconds_lower_the_ratio_and_the_coverage() -> None:
    state = ClusterState(expected_gpus=1, window=10.0, lag=0.0, stale_after=100.0)
    state.open_session(hello(gpus=1))
    for k in (1, 2, 3, 4, 5):  # only the first 5 of 10 seconds are reported
        state.ingest("n1", report(k, T0 + k, gpu(0, 1.0)), received=T0 + k)
    view = state.view(now=T0 + 10)
    assert view.window.ratios["busy"] == pytest.approx(0.5)
    assert view.window.coverage == pytest.approx(0.5)


def test_a_window_edge_splits_a_sample_exactly() -> None:
    state = ClusterState(expected_gpus=1, window=2.5, lag=0.0)
    state.open_session(hello(gpus=1))
    for k, busy in enumerate((1.0, 0.0, 1.0, 1.0), start=1):
        state.ingest("n1", report(k, T0 + k, gpu(0, busy)), received=T0 + k)
    # window (T0+1.5, T0+4]: half of second 2 (busy 0), second 3 and 4 (busy 1) -> 2 / 2.5
    assert state.view(now=T0 + 4).window.ratios["busy"] == pytest.approx(0.8)


def test_agent_clock_skew_does_not_shift_the_window() -> None:
    state = ClusterState(expected_gpus=1, window=5.0, lag=1.0)
    state.open_session(hello(gpus=1))
    skew = -3600.0  # the agent's clock is an hour behind
    for k in range(1, 11):
        state.ingest("n1", report(k, T0 + k + skew, gpu(0, 0.8)), received=T0 + k + 0.01)
    assert state.view(now=T0 + 10).window.ratios["busy"] == pytest.approx(0.8)


def test_a_faster_delivery_never_counts_a_second_twice() -> None:
    # Reports 1-5 arrive 0.3 s after they are sent, 6-10 only 0.01 s: the stream offset
    # shrinks by 0.29 s, and report 6 would overlap report 5 in the live window.
    state = ClusterState(expected_gpus=1, window=5.0, lag=1.0)
    state.open_session(hello(gpus=1))
    for k in range(1, 11):
        delay = 0.3 if k <= 5 else 0.01
        state.ingest("n1", report(k, T0 + k, gpu(0, 0.5)), received=T0 + k + delay)
    window = state.view(now=T0 + 10).window
    assert window.ratios["busy"] == pytest.approx(0.5)
    assert window.coverage == pytest.approx(1.0)
    assert state.counters.seconds["busy"] == pytest.approx(5.0)  # the agent's intervals


def test_duplicates_are_ignored_and_gaps_counted() -> None:
    state = ClusterState(expected_gpus=1)
    state.open_session(hello(gpus=1))
    assert state.ingest("n1", report(1, T0 + 1, gpu(0, 1.0)), received=T0 + 1) == "accepted"
    assert state.ingest("n1", report(1, T0 + 1, gpu(0, 1.0)), received=T0 + 1.1) == "duplicate"
    assert state.ingest("n1", report(4, T0 + 4, gpu(0, 1.0)), received=T0 + 4) == "accepted"
    node = state.nodes["n1"]
    assert node.reports == {"accepted": 2, "duplicate": 1, "rejected": 0}
    assert node.missed_reports == 2
    assert state.counters.seconds["busy"] == 2.0


def test_reconnect_of_same_instance_resumes_and_restart_starts_over() -> None:
    state = ClusterState()
    _, resume, _ = state.open_session(hello(instance=7))
    assert resume == 0
    state.ingest("n1", report(5, T0, gpu(0, 1.0)), received=T0)
    assert state.open_session(hello(instance=7))[1] == 5
    assert state.open_session(hello(instance=8))[1] == 0  # a restarted agent: new numbering


def test_newer_session_supersedes_older() -> None:
    state = ClusterState()
    first, *_ = state.open_session(hello())
    second, *_ = state.open_session(hello())
    assert not state.is_current("n1", first) and state.is_current("n1", second)
    state.close_session("n1", first)  # the old stream ending does not close the new one
    assert state.is_current("n1", second)
    assert state.view().sessions == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (report(1, T0, gpu(0, 1.5)), "busy must be a fraction"),
        (report(1, T0, gpu(9, 0.5)), "GPU index 9 was not in this node's hello"),
        (report(1, T0, gpu(0, 0.5), gpu(0, 0.5)), "appears twice"),
        (report(0, T0, gpu(0, 0.5)), r"seq must be in \[1, 2\^63 - 1\], got 0"),
        (report(1, T0, gpu(0, 0.5), interval=0.0), "interval_seconds"),
        (report(1, T0, gpu(0, 0.5), interval=float("nan")), "interval_seconds"),
    ],
)
def test_bad_reports_are_rejected_whole_and_change_nothing(bad: pb.Report, message: str) -> None:
    state = ClusterState(expected_gpus=2)
    state.open_session(hello())
    state.ingest("n1", report(1, T0, gpu(0, 1.0)), received=T0)
    before = dict(state.counters.seconds)
    bad.seq = bad.seq and 2
    with pytest.raises(InvalidMessageError, match=message):
        state.ingest("n1", bad, received=T0 + 1)
    assert state.counters.seconds == before
    assert state.nodes["n1"].last_seq == 1
    assert state.nodes["n1"].reports["rejected"] == 1


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.Hello(node="", protocol_revision=1), "node name is empty"),
        (pb.Hello(node="a b", protocol_revision=1), "without spaces"),
        (
            pb.Hello(
                node="n",
                protocol_revision=1,
                gpus=[pb.GpuIdentity(index=0), pb.GpuIdentity(index=0)],
            ),
            "indices repeat",
        ),
        (
            pb.Hello(
                node="n",
                protocol_revision=1,
                gpus=[
                    pb.GpuIdentity(index=0, uuid="U", model="M"),
                    pb.GpuIdentity(index=1, uuid="U", model="M"),
                ],
            ),
            "UUIDs repeat",
        ),
        (
            pb.Hello(
                node="n",
                protocol_revision=1,
                gpus=[
                    pb.GpuIdentity(index=0, uuid="U", model="M", serial="S"),
                    pb.GpuIdentity(index=1, uuid="V", model="M", serial="S"),
                ],
            ),
            "serials repeat",
        ),
        (
            pb.Hello(node="n", protocol_revision=1, gpus=[pb.GpuIdentity(index=0, model="M")]),
            "GPU 0 has no UUID",
        ),
        (
            pb.Hello(node="n", protocol_revision=1, gpus=[pb.GpuIdentity(index=0, uuid="U")]),
            "GPU 0 has no usable model",
        ),
        (pb.Hello(node="n"), "protocol_revision is not set"),
    ],
)
def test_bad_hellos_are_refused(msg: pb.Hello, message: str) -> None:
    with pytest.raises(InvalidMessageError, match=message):
        ClusterState().open_session(msg)


def test_energy_counter_deltas_survive_a_driver_reload() -> None:
    state = ClusterState()
    state.open_session(hello(gpus=1))
    for seq, energy in enumerate((5_000_000, 5_300_000, 5_600_000, 200_000, 500_000), start=1):
        state.ingest("n1", report(seq, T0 + seq, gpu(0, 1.0, energy=energy)), received=T0 + seq)
    # 300 J + 300 J, then the counter restarted at 0 (reload): +200 J, then +300 J
    assert state.counters.energy_joules == pytest.approx(1100.0)


def test_lost_gpu_and_stale_node_leave_reporting() -> None:
    state = ClusterState(expected_gpus=3, stale_after=5.0)
    state.open_session(hello(gpus=2))
    lost = pb.GpuSample(index=1, status=pb.GPU_STATUS_LOST)
    state.ingest("n1", report(1, T0, gpu(0, 1.0), lost), received=T0)
    view = state.view(now=T0 + 1)
    assert (view.expected, view.seen, view.reporting) == (3, 2, 1)
    assert state.view(now=T0 + 6).reporting == 0  # nothing for longer than stale_after


def test_energy_falls_back_to_integrated_power_without_a_counter() -> None:
    state = ClusterState()
    state.open_session(hello(gpus=1))
    for seq in (1, 2, 3):
        sample = pb.GpuSample(index=0, status=pb.GPU_STATUS_OK, busy=1.0, power_watts=250.0)
        state.ingest("n1", report(seq, T0 + 2 * seq, sample, interval=2.0), received=T0 + 2 * seq)
    assert state.counters.energy_joules == pytest.approx(3 * 2.0 * 250.0)


def test_live_tenants_of_a_mig_gpu_follow_its_instances_owners() -> None:
    state = ClusterState(expected_gpus=1, window=10.0, lag=0.0, clock=lambda: T0 + 10)
    state.open_session(hello(gpus=1))
    for k in range(1, 11):
        sample = gpu(0, 0.0, sm=0.5)
        sample.ClearField("busy")  # NVML refuses it under MIG
        sample.mig_enabled, sample.mig_slices = True, 7
        sample.attribution.CopyFrom(pb.Attribution(source="static", tenant="ops"))
        for slices, tenant in ((3, "ml"), (4, "ml" if k > 5 else "ops")):
            instance = sample.mig.add(slices=slices, process_count=1, sm_active=0.5)
            instance.attribution.CopyFrom(pb.Attribution(source="kubernetes", tenant=tenant))
        state.ingest("n1", report(k, T0 + k, sample), received=T0 + k)
    tenants = state.view().by_tenant
    # now all 7 slices are ml's, whatever the whole-GPU map says; ops's share has gone
    assert set(tenants) == {"ml"} and tenants["ml"].gpus == 1.0
    # ml held 3/7 for the first 5 s and all of it for the last 5: 0.5 x 7/7 + 0.5 x 3/7
    assert tenants["ml"].coverage == pytest.approx((5 * 3 / 7 + 5) / 10)
    assert tenants["ml"].ratios["allocated"] == pytest.approx((5 * 3 / 7 + 5) / 10)


def _live_and_recorded(samples: list[pb.GpuSample], seconds: int = 10):
    """The same samples, one a second, through the live window and through a summary."""
    from gputally.agent.summary import Summarizer
    from gputally.collector.audit.figures import as_dict, compute

    from .factories import envelope

    state = ClusterState(expected_gpus=1, window=float(seconds), lag=0.0)
    state.open_session(hello(gpus=1))
    summarizer = Summarizer(list(hello(gpus=1).gpus), window=float(seconds))
    summaries = []
    for k in range(1, seconds + 1):
        reported = report(k, T0 + k, *samples)
        state.ingest("n1", reported, received=T0 + k)
        summaries += summarizer.add(reported)
    (summary,) = summaries
    figures = compute([("n1", envelope(summary))], T0, T0 + seconds, expected=1)
    recorded = {row["name"]: row for row in as_dict(figures, "allocated", None)["by_tenant"]}
    return state.view(now=T0 + seconds).by_tenant, recorded


def test_a_mig_owner_with_one_unmeasured_instance_counts_the_same_live_and_recorded() -> None:
    """Owner a holds 3 + 2 of 7 slices, and NVML lists the processes of its 3-slice instance
    only; b holds 2 slices. The measured part of a's GPU counts, the unmeasured part only
    widens the bound, in the live view exactly as in the summaries (the live view used to
    drop all of a's allocated time once one of its instances did not say)."""
    mig = gpu_sample(0, mig_enabled=True, mig_slices=7, sm_active=0.5, effective=0.5)
    a = pb.Attribution(source="kubernetes", tenant="a", job="a-0")
    b = pb.Attribution(source="kubernetes", tenant="b", job="b-0")
    mig.mig.add(gpu_instance_id=1, slices=3, process_count=1, sm_active=0.6).attribution.CopyFrom(a)
    mig.mig.add(gpu_instance_id=2, slices=2, sm_active=0.6).attribution.CopyFrom(a)
    mig.mig.add(gpu_instance_id=3, slices=2, process_count=0, sm_active=0.0).attribution.CopyFrom(b)
    live, recorded = _live_and_recorded([mig])
    assert set(live) == set(recorded) == {"a", "b"}
    assert live["a"].gpus == pytest.approx(5 / 7) and live["b"].gpus == pytest.approx(2 / 7)
    assert live["a"].ratios["allocated"] == pytest.approx(3 / 5)  # 3 of its 5 slices measured busy
    assert live["a"].upper["allocated"] == pytest.approx(1.0)  # the other 2 could have been
    assert live["a"].ratios["sm_active"] == pytest.approx(0.6)
    for tenant in ("a", "b"):
        for measure in ("allocated", "sm_active", "busy"):
            assert live[tenant].ratios[measure] == pytest.approx(recorded[tenant][measure])


def test_the_live_view_names_tenants_as_the_record_does() -> None:
    """A Slurm job whose user is unknown is charged to "(no tenant)", live and recorded; the
    live view used to name the tenant after the job."""
    slurm = busy_sample(0, 0.5)
    slurm.attribution.CopyFrom(pb.Attribution(source="slurm", job="4242"))
    live, recorded = _live_and_recorded([slurm])
    assert set(live) == set(recorded) == {"(no tenant)"}
    assert live["(no tenant)"].ratios["busy"] == pytest.approx(recorded["(no tenant)"]["busy"])


def test_node_info_shows_what_each_hello_says_cut_to_a_bounded_length() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gputally.collector.live.metrics import make_registry

    state = ClusterState(expected_gpus=2)
    first = hello("n1", 1)
    # within --max-string (a longer one is refused: tests/test_network.py), cut for the label
    first.backend, first.agent_version, first.driver_version = "mock", "0.1.0", "x" * 1000
    state.open_session(first)
    text = generate_latest(make_registry(state)).decode()
    (info,) = [f for f in text_string_to_metric_families(text) if f.name == "gputally_node_info"]
    (series,) = info.samples
    assert series.value == 1 and series.labels == {
        "node": "n1",
        "backend": "mock",
        "agent_version": "0.1.0",
        "driver_version": "x" * 64,
        "protocol_revision": str(PROTOCOL_REVISION),
        "authenticated": "none",
    }
    again = hello("n1", 1, instance=2)
    again.backend = "nvml"
    state.open_session(again)  # a restarted agent: still one series for the node
    text = generate_latest(make_registry(state)).decode()
    (info,) = [f for f in text_string_to_metric_families(text) if f.name == "gputally_node_info"]
    assert [s.labels["backend"] for s in info.samples] == ["nvml"]


def test_an_understated_inventory_inflates_no_live_figure() -> None:
    """Two GPUs report, one was declared: the live figures are over the two seen, as the
    record's are, never 200% of the declared one."""
    state = ClusterState(expected_gpus=1, window=10.0, lag=0.0, clock=lambda: T0 + 10)
    state.open_session(hello(gpus=2))
    for k in range(1, 11):
        state.ingest("n1", report(k, T0 + k, gpu(0, 1.0), gpu(1, 0.0)), received=T0 + k)
    view = state.view()
    assert view.expected == 2 and view.declared
    assert view.window.ratios["busy"] == pytest.approx(0.5)


def test_the_view_follows_every_change_of_a_nodes_gpus_between_views() -> None:
    """A view keeps what each node's GPUs say now (reporting, power, tenants, padding, models)
    until the node reports again or its GPUs change: each of those changes shows at the next
    view, however many views came before."""
    now = [T0]
    state = ClusterState(
        expected_gpus=4, window=5.0, lag=1.0, stale_after=5.0, clock=lambda: now[0]
    )
    state.open_session(hello("n1", 2))

    def sample(index: int, tenant: str, status: pb.GpuStatus = pb.GPU_STATUS_OK) -> pb.GpuSample:
        out = gpu(index, 0.5, 0.4)
        out.status = status
        out.power_watts = 100.0 + index
        out.attribution.source, out.attribution.tenant = "kubernetes", tenant
        return out

    now[0] = T0 + 1
    state.ingest("n1", report(1, now[0], sample(0, "a"), sample(1, "a")), received=now[0])
    view = state.view()
    assert (view.seen, view.reporting, view.power_watts) == (2, 2, 201.0)
    assert {t: f.gpus for t, f in view.by_tenant.items()} == {"a": 2.0}
    # the node's next report: one GPU lost, the other another tenant's and flagged
    flagged = sample(1, "b")
    flagged.padding.append("burn_tool")
    now[0] = T0 + 2
    lost = sample(0, "a", pb.GPU_STATUS_LOST)
    state.ingest("n1", report(2, now[0], lost, flagged), received=now[0])
    view = state.view()
    assert (view.seen, view.reporting, view.power_watts) == (2, 1, 101.0)
    assert {t: f.gpus for t, f in view.by_tenant.items() if f.gpus} == {"b": 1.0}
    assert view.padding_gpus == {"burn_tool": 1}
    # a new hello of the node: GPU 1 is another card now (its state starts afresh)
    changed = hello("n1", 2)
    changed.gpus[1].uuid, changed.gpus[1].model = "GPU-n1-9", "NVIDIA A100-SXM4-80GB"
    session, *_ = state.open_session(changed)
    view = state.view()
    assert (view.seen, view.reporting) == (2, 0)
    assert view.models == {hello().gpus[0].model: 1, "NVIDIA A100-SXM4-80GB": 1}
    # node n2 takes GPU 0's card once n1 is down: n1 no longer counts it
    state.close_session("n1", session)
    now[0] = T0 + 20
    taker = hello("n2", 1)
    taker.gpus[0].uuid = "GPU-n1-0"
    state.open_session(taker)
    view = state.view()
    assert view.seen == 2 and view.models == {hello().gpus[0].model: 1, "NVIDIA A100-SXM4-80GB": 1}
