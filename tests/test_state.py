"""Cluster state: exact integration, live windows, counters, validation."""

from __future__ import annotations

import pytest

from gputally.collector.state import ClusterState, InvalidMessageError
from gputally.v1 import telemetry_pb2 as pb

T0 = 1_750_000_000.0


def hello(node: str = "n1", gpus: int = 2, instance: int = 1) -> pb.Hello:
    return pb.Hello(
        node=node,
        instance_id=instance,
        gpus=[
            pb.GpuIdentity(index=i, uuid=f"GPU-{node}-{i}", model="NVIDIA H100 80GB HBM3")
            for i in range(gpus)
        ],
    )


def report(seq: int, t: float, *samples: pb.GpuSample, interval: float = 1.0) -> pb.Report:
    return pb.Report(
        seq=seq, time_unix_nano=int(t * 1e9), interval_seconds=interval, gpus=list(samples)
    )


def gpu(
    index: int, busy: float, sm: float | None = None, procs: int = 1, energy: int | None = None
) -> pb.GpuSample:
    sample = pb.GpuSample(
        index=index, status=pb.GPU_STATUS_OK, busy=busy, process_count=procs, power_watts=100.0
    )
    if sm is not None:
        sample.sm_active = sm
    if energy is not None:
        sample.energy_millijoules = energy
    return sample


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
    _, resume = state.open_session(hello(instance=7))
    assert resume == 0
    state.ingest("n1", report(5, T0, gpu(0, 1.0)), received=T0)
    assert state.open_session(hello(instance=7))[1] == 5
    assert state.open_session(hello(instance=8))[1] == 0  # a restarted agent: new numbering


def test_newer_session_supersedes_older() -> None:
    state = ClusterState()
    first, _ = state.open_session(hello())
    second, _ = state.open_session(hello())
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
        (report(0, T0, gpu(0, 0.5)), "seq must be positive"),
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
        (pb.Hello(node=""), "node name is empty"),
        (pb.Hello(node="a b"), "without spaces"),
        (
            pb.Hello(node="n", gpus=[pb.GpuIdentity(index=0), pb.GpuIdentity(index=0)]),
            "indices repeat",
        ),
        (
            pb.Hello(
                node="n",
                gpus=[pb.GpuIdentity(index=0, uuid="U"), pb.GpuIdentity(index=1, uuid="U")],
            ),
            "UUIDs repeat",
        ),
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
        state.ingest("n1", report(seq, T0 + seq, sample, interval=2.0), received=T0 + seq)
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
