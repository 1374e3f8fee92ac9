"""Summaries, padding rules and period figures: exact arithmetic from known inputs."""

from __future__ import annotations

import pytest

from gputally.agent.padding import PaddingDetector, PaddingRules, effective
from gputally.agent.summary import Summarizer
from gputally.collector.audit.figures import as_dict, bounds, compute
from gputally.v1 import telemetry_pb2 as pb
from gputally.v1.accounting import (
    BURN_TOOL,
    BUSY_WITHOUT_WORK,
    FLATLINE_LOW_MEMORY,
    REFUTED,
    SUPPORTED,
    UNDETERMINED,
    Bounds,
)

from . import factories
from .factories import A100, H100, T0
from .factories import envelope as signed


def sample(index: int = 0, **fields: object) -> pb.GpuSample:
    values: dict[str, object] = {
        "status": pb.GPU_STATUS_OK,
        "busy": 1.0,
        "process_count": 1,
        "power_watts": 500.0,
        "power_limit_watts": 700.0,
    }
    values.update(fields)
    return pb.GpuSample(index=index, **values)  # type: ignore[arg-type]


def report(t: float, dt: float, *samples: pb.GpuSample) -> pb.Report:
    return factories.report(1, t, *samples, interval=dt)


def test_effective_is_sm_activity_else_the_labelled_power_estimate() -> None:
    assert effective(sample(sm_active=0.4), H100) == (0.4, False)
    # A100: (360 W - 55 W idle) / (400 - 55) = 0.88406, capped by busy 0.98
    value, estimated = effective(
        sample(busy=0.98, power_watts=360.0, power_limit_watts=400.0), A100
    )
    assert estimated and value == pytest.approx(305 / 345)
    assert effective(sample(busy=0.3, power_watts=360.0, power_limit_watts=400.0), A100) == (
        0.3,
        True,
    )
    assert effective(pb.GpuSample(index=0, busy=0.5), A100) == (
        None,
        False,
    )  # nothing to estimate from


def test_sustained_rules_flag_only_after_the_sustain_time_and_stop_at_once() -> None:
    detector = PaddingDetector(PaddingRules(sustain_seconds=10.0))
    spin = sample(busy=1.0, sm_active=0.02, process_memory_bytes=10)
    flags = [detector.update(spin, H100, 80 * 2**30, T0 + t, 1.0) for t in range(1, 13)]
    assert [bool(f) for f in flags] == [False] * 9 + [True] * 3  # from 10 s of holding on
    assert flags[-1] == [BUSY_WITHOUT_WORK, FLATLINE_LOW_MEMORY]
    real = sample(busy=1.0, sm_active=0.7, process_memory_bytes=10)
    assert detector.update(real, H100, 80 * 2**30, T0 + 13, 1.0) == [FLATLINE_LOW_MEMORY]
    assert detector.update(sample(busy=0.5, sm_active=0.02), H100, 80 * 2**30, T0 + 14, 1.0) == []


def test_burn_tools_are_flagged_at_once_and_unknown_sm_uses_power() -> None:
    detector = PaddingDetector(PaddingRules(sustain_seconds=0.5))
    burn = sample(busy=1.0)
    burn.processes.add(pid=1, command="/opt/gpu-burn/gpu_burn 3600")
    assert detector.update(burn, A100, 0, T0 + 1, 1.0)[-1] == BURN_TOOL
    # no GPM: 70 W on a 400 W A100 is within 15% of the idle-to-limit range above idle
    assert detector.update(
        sample(index=1, busy=1.0, power_watts=70.0, power_limit_watts=400.0), A100, 0, T0 + 1, 1.0
    ) == [BUSY_WITHOUT_WORK]
    assert (
        detector.update(
            sample(index=2, busy=1.0, power_watts=300.0, power_limit_watts=400.0),
            A100,
            0,
            T0 + 1,
            1.0,
        )
        == []
    )


def test_summaries_split_reports_across_window_edges_pro_rata() -> None:
    summarizer = Summarizer([pb.GpuIdentity(index=0, uuid="GPU-a", model=H100)], window=10.0)
    closed = []
    for t, busy in (
        (T0 + 4, 0.5),
        (T0 + 8, 0.5),
        (T0 + 12, 1.0),
    ):  # 4-s reports; the last straddles T0+10
        closed += summarizer.add(
            report(t, 4.0, sample(busy=busy, sm_active=busy / 2, energy_millijoules=int(t * 1000)))
        )
    (first,) = closed
    assert (first.window_start_unix_nano, first.window_end_unix_nano) == (
        round(T0 * 1e9),
        round((T0 + 10) * 1e9),
    )
    gpu = first.gpus[0]
    assert gpu.present_seconds == pytest.approx(10.0)  # (T0, T0+8] and half of (T0+8, T0+12]
    assert gpu.busy_seconds == pytest.approx(0.5 * 8 + 1.0 * 2)
    assert gpu.sm_active_seconds == pytest.approx(
        0.25 * 8 + 0.5 * 2
    ) and gpu.sm_measured_seconds == pytest.approx(10)
    assert gpu.allocated_seconds == pytest.approx(10.0)
    # energy: counter deltas of 4 J per report (the first has no baseline), split like the time
    assert gpu.energy_joules == pytest.approx(4.0 + 2.0)
    (rest,) = summarizer.flush()
    assert rest.gpus[0].present_seconds == pytest.approx(2.0)


def test_padding_and_estimates_in_summaries() -> None:
    summarizer = Summarizer([pb.GpuIdentity(index=0, uuid="GPU-a", model=A100)], window=10.0)
    padded = sample(busy=1.0, effective=0.1, effective_estimated=True)
    padded.padding.append(BURN_TOOL)
    summarizer.add(report(T0 + 5, 5.0, padded))
    (summary,) = summarizer.add(
        report(T0 + 10, 5.0, sample(busy=0.6, effective=0.5, effective_estimated=True))
    )
    gpu = summary.gpus[0]
    assert gpu.effective_seconds == pytest.approx(
        0.5 + 2.5
    ) and gpu.effective_estimated_seconds == pytest.approx(3.0)
    assert gpu.busy_unmeasured_seconds == pytest.approx(
        5.0 + 3.0
    )  # no SM activity measured: busy caps it
    assert [(p.rule, p.seconds) for p in gpu.padding] == [(BURN_TOOL, 5.0)]
    assert (gpu.flagged.seconds, gpu.flagged.busy_seconds, gpu.flagged.effective_seconds) == (
        5.0,
        5.0,
        0.5,
    )


def test_bounds_arithmetic() -> None:
    summarizer = Summarizer(
        [pb.GpuIdentity(index=i, uuid=f"GPU-{i}", model=H100) for i in range(2)], window=100.0
    )
    # GPU 0: measured, busy 0.8, SM 0.5 for 100 s. GPU 1: busy 0.6 for the last 50 s, SM unmeasured.
    summarizer.add(report(T0 + 50, 50.0, sample(0, busy=0.8, sm_active=0.5, effective=0.5)))
    (summary,) = summarizer.add(
        report(
            T0 + 100,
            50.0,
            sample(0, busy=0.8, sm_active=0.5, effective=0.5),
            sample(1, busy=0.6, effective=0.4, effective_estimated=True),
        )
    )
    figures = compute([("n1", signed(summary))], T0, T0 + 100, expected=4)
    capacity = 4 * 100.0
    b = bounds(figures.total.sums, capacity)
    unobserved = capacity - 150.0
    assert b["busy"] == Bounds(110 / capacity, 110 / capacity, (110 + unobserved) / capacity)
    assert b["sm_active"] == Bounds(50 / capacity, 50 / capacity, (50 + 30 + unobserved) / capacity)
    assert b["effective"] == Bounds(70 / capacity, 50 / capacity, (50 + 30 + unobserved) / capacity)
    assert figures.coverage() == pytest.approx(150 / capacity)
    half = compute([("n1", signed(summary))], T0 + 50, T0 + 100, expected=4)  # a window cut in two
    assert half.total.sums.values["present_seconds"] == pytest.approx(75.0)


def test_seconds_without_busy_or_processes_are_unknown_not_idle() -> None:
    summarizer = Summarizer([pb.GpuIdentity(index=0, uuid="GPU-0", model=H100)], window=100.0)
    summarizer.add(report(T0 + 60, 60.0, sample(0, busy=0.5)))
    # 40 s in which NVML answered neither utilization.gpu nor the process list
    (summary,) = summarizer.add(report(T0 + 100, 40.0, sample(0, busy=None, process_count=None)))
    (gpu,) = summary.gpus
    assert (gpu.busy_missing_seconds, gpu.allocated_missing_seconds) == (40.0, 40.0)
    assert (gpu.busy_seconds, gpu.allocated_seconds) == (30.0, 60.0)
    figures = compute([("n1", signed(summary))], T0, T0 + 100, expected=1)
    b = bounds(figures.total.sums, 100.0)
    assert b["busy"] == Bounds(0.3, 0.3, 0.7) and b["allocated"] == Bounds(0.6, 0.6, 1.0)
    assert figures.coverage() == 1.0  # present all along: only those measures are unknown


@pytest.mark.parametrize(
    ("claim", "verdict"),
    [
        (0.2, SUPPORTED),
        (0.25, SUPPORTED),
        (0.3, UNDETERMINED),
        (0.6, UNDETERMINED),
        (0.61, REFUTED),
    ],
)
def test_verdicts(claim: float, verdict: str) -> None:
    assert Bounds(0.27, 0.25, 0.6).verdict(claim) == verdict


def test_as_dict_names_the_measure_and_warns_about_an_understated_inventory() -> None:
    summarizer = Summarizer(
        [pb.GpuIdentity(index=i, uuid=f"GPU-{i}", model=H100) for i in range(3)], window=10.0
    )
    (summary,) = summarizer.add(report(T0 + 10, 10.0, *(sample(i, busy=0.5) for i in range(3))))
    answer = as_dict(compute([("n1", signed(summary))], T0, T0 + 10, expected=2), "busy", 0.5)
    # over the 3 GPUs seen, not the 2 declared: an understated inventory inflates nothing
    assert answer["measure"] == "busy" and answer["figure"] == 0.5
    assert answer["verdict"] == SUPPORTED and answer["denominator_gpus"] == 3
    assert "3 GPUs reported but only 2 were declared" in answer["warnings"][0]
    assert "every figure is over the 3 seen" in answer["warnings"][0]
    with pytest.raises(ValueError, match="unknown measure"):
        as_dict(compute([], T0, T0 + 10, expected=2), "utilization", None)


def test_the_estimate_table_in_the_specification() -> None:
    """docs/utilization.md §4 quotes these estimates for the mock's H100 workloads: they rank
    the workloads as their true SM activity does, and put the spin kernel near zero."""
    table = {
        "training": (0.9, 0.85, 0.89),
        "inference": (0.6, 0.35, 0.56),
        "readme": (0.8, 0.60, 0.78),
        "burn": (0.13, 0.02, 0.03),
    }
    estimates = {}
    for name, (power_fraction, _, quoted) in table.items():
        got, estimated = effective(
            sample(busy=1.0, power_watts=power_fraction * 700.0, power_limit_watts=700.0), H100
        )
        assert estimated and got is not None and round(got, 2) == quoted, name
        estimates[name] = got
    assert sorted(estimates, key=estimates.__getitem__) == sorted(table, key=lambda n: table[n][1])


def test_a_mig_gpu_whose_instances_all_go_to_another_owner_is_charged_to_it() -> None:
    """A GPU mapped as a whole to one owner, every instance of it handed to another: the
    instances' owner holds it all (a share of 1), not the whole GPU's mapping."""
    summarizer = Summarizer([pb.GpuIdentity(index=0, uuid="GPU-0", model=H100)], window=100.0)
    mine = pb.Attribution(source="kubernetes", tenant="ml", job="trainer")
    gpu = sample(0, busy=None, mig_enabled=True, mig_slices=7, sm_active=0.5, effective=0.5)
    gpu.attribution.CopyFrom(pb.Attribution(source="static", tenant="ops", job="maint"))
    for slices in (3, 4):
        gpu.mig.add(slices=slices, process_count=1, sm_active=0.5).attribution.CopyFrom(mine)
    (summary,) = summarizer.add(report(T0 + 100, 100.0, gpu))
    (share,) = summary.gpus[0].shares
    assert share.attribution == mine
    assert (share.present_seconds, share.allocated_seconds) == (100.0, 100.0)
    assert share.sm_active_seconds == pytest.approx(50.0)
    figures = compute([("n1", signed(summary))], T0, T0 + 100, expected=1)
    assert sorted(figures.tenants) == ["ml"] and sorted(figures.jobs) == ["trainer"]
    # the GPU's own owner, holding it all, needs no share
    gpu.mig[0].attribution.CopyFrom(gpu.attribution)
    gpu.mig[1].attribution.CopyFrom(gpu.attribution)
    (summary,) = summarizer.add(report(T0 + 200, 100.0, gpu))
    assert not summary.gpus[0].shares and summary.gpus[0].attribution.tenant == "ops"


def test_padding_flags_present_seconds_only() -> None:
    """A GPU that is not OK is not present: a padding rule on it flags nothing, in the
    summaries as in the live view (summaries used to count the rule's seconds anyway)."""
    from gputally.collector.live.state import ClusterState

    summarizer = Summarizer([pb.GpuIdentity(index=0, uuid="GPU-0", model=H100)], window=10.0)
    lost = pb.GpuSample(index=0, status=pb.GPU_STATUS_LOST, padding=[BURN_TOOL])
    (summary,) = summarizer.add(report(T0 + 10, 10.0, lost))
    gpu = summary.gpus[0]
    assert (gpu.present_seconds, gpu.lost_seconds) == (0.0, 10.0)
    assert list(gpu.padding) == [] and gpu.flagged.seconds == 0.0
    state = ClusterState(expected_gpus=1)
    state.open_session(factories.hello("n1", 1))
    state.ingest("n1", factories.report(1, T0 + 10, lost, interval=10.0), received=T0 + 10)
    assert state.counters.padding == {} and state.counters.flagged["observed"] == 0.0


def padded_answer(claim: float | None, expected: int = 1) -> dict[str, object]:
    """One GPU an hour, busy 90% of it, half an hour of which is flagged burn load: busy 90%
    with flagged padding, 40% without, over `expected` GPUs declared."""
    summary = factories.summary(T0, 3600.0, busy=0.9)
    gpu = summary.gpus[0]
    gpu.flagged.seconds, gpu.flagged.busy_seconds = 1800.0, 1800.0
    gpu.padding.add(rule=BURN_TOOL, seconds=1800.0)
    return as_dict(compute([("n1", signed(summary))], T0, T0 + 3600, expected), "busy", claim)


@pytest.mark.parametrize(
    ("verdict", "without", "wording"),
    [
        (SUPPORTED, SUPPORTED, "supported"),
        (REFUTED, REFUTED, "refuted"),
        (UNDETERMINED, UNDETERMINED, "undetermined"),
        (SUPPORTED, REFUTED, "supported only by flagged padding; refuted without it"),
        (SUPPORTED, UNDETERMINED, "supported only by flagged padding; undetermined without it"),
        (
            UNDETERMINED,
            REFUTED,
            "undetermined only because of flagged padding; refuted without it",
        ),
    ],
)
def test_a_verdict_flagged_padding_decides_is_worded_as_such(
    verdict: str, without: str, wording: str
) -> None:
    from gputally.v1.accounting import headline

    assert headline(verdict, without) == wording


def test_a_claim_supported_only_by_flagged_padding_says_so_first() -> None:
    from gputally.collector.audit.figures import render_text

    answer = padded_answer(0.8)
    assert answer["verdict"] == SUPPORTED  # with flagged padding: kept for compatibility
    assert answer["without_padding"]["verdict"] == REFUTED  # type: ignore[index]
    assert answer["headline_verdict"] == "supported only by flagged padding; refuted without it"
    assert answer["padding_decides"] is True
    lines = render_text(answer).splitlines()
    assert lines[:2] == [
        "VERDICT     busy >= 80.00%: SUPPORTED ONLY BY FLAGGED PADDING; REFUTED WITHOUT IT",
        "            busy 40.00% [40.00%, 40.00%] without flagged padding, "
        "90.00% [90.00%, 90.00%] with it; 0.50 GPU-hours flagged",
    ]
    assert (
        "claim       busy >= 80.00%: SUPPORTED ONLY BY FLAGGED PADDING; REFUTED WITHOUT IT" in lines
    )
    assert not any(
        line.rstrip().endswith(": SUPPORTED") or "SUPPORTED  (" in line for line in lines
    )


def test_a_claim_undetermined_only_because_of_flagged_padding_says_so_first() -> None:
    from gputally.collector.audit.figures import render_text

    # 2 GPUs declared, 1 seen: busy [45%, 95%] with flagged padding, [20%, 70%] without.
    answer = padded_answer(0.8, expected=2)
    assert (answer["verdict"], answer["padding_decides"]) == (UNDETERMINED, True)
    assert (
        answer["headline_verdict"]
        == "undetermined only because of flagged padding; refuted without it"
    )
    assert render_text(answer).splitlines()[0] == (
        "VERDICT     busy >= 80.00%: UNDETERMINED ONLY BECAUSE OF FLAGGED PADDING; REFUTED WITHOUT IT"
    )


def test_a_verdict_flagged_padding_does_not_change_keeps_its_wording() -> None:
    from gputally.collector.audit.figures import render_text

    answer = padded_answer(0.3)  # 40% without flagged padding still supports 30%
    assert (answer["verdict"], answer["headline_verdict"], answer["padding_decides"]) == (
        SUPPORTED,
        SUPPORTED,
        False,
    )
    lines = render_text(answer).splitlines()
    assert lines[0].startswith("period      ")
    assert "claim       busy >= 30.00%: SUPPORTED  (without flagged padding: supported)" in lines
    assert not any(line.startswith("VERDICT") for line in lines)
    no_claim = padded_answer(None)
    assert (no_claim["headline_verdict"], no_claim["padding_decides"]) == (None, False)


def test_as_dict_warns_about_gpus_never_seen_and_low_coverage() -> None:
    """16 GPUs report a full hour; 10,000 are declared: coverage 0.16%, said, with the GPUs
    that never reported, instead of a bare "undetermined" with no warning."""
    rows = []
    for n in range(16):
        s = factories.summary(T0, 3600.0, 0.5, f"n{n}")
        s.backend = "nvml"
        rows.append((f"n{n}", signed(s)))
    answer = as_dict(compute(rows, T0, T0 + 3600, expected=10_000), "busy", 0.85)
    assert answer["coverage"] == pytest.approx(16 / 10_000)
    assert answer["warnings"] == [
        "9984 of the 10000 GPUs declared never reported in this period: their seconds count as "
        "unobserved (zero in the figure, full in its upper bound)",
        "coverage is 0.2%: most of the figure's capacity was not observed, so the figure is "
        "closer to its lower bound than to what the GPUs did; the bounds say how far apart "
        "they are",
    ]
    full = as_dict(compute(rows, T0, T0 + 3600, expected=16), "busy", 0.85)
    assert full["warnings"] == []
