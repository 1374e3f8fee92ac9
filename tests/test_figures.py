"""Summaries, padding rules and period figures: exact arithmetic from known inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gputally.agent.padding import PaddingDetector, PaddingRules, effective
from gputally.agent.summary import Summarizer
from gputally.collector.audit.figures import Rollup, as_dict, bounds, compute
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
        s.gpus[0].attribution.source, s.gpus[0].attribution.tenant = "static", "lab"
        rows.append((f"n{n}", signed(s)))
    answer = as_dict(compute(rows, T0, T0 + 3600, expected=10_000), "busy", 0.85)
    assert answer["coverage"] == pytest.approx(16 / 10_000)
    assert answer["warnings"] == [
        "9984 of the 10000 GPUs declared never reported in this period: their seconds count as "
        "unobserved (zero in the figure, full in its upper bound)",
        "coverage is 0.2%: 99.8% of the figure's capacity was not observed and counts as zero "
        "in it, so the figure can be far below what the GPUs did; the bounds say how far",
    ]
    full = as_dict(compute(rows, T0, T0 + 3600, expected=16), "busy", 0.85)
    assert full["warnings"] == []


def gpu_hour(
    node: str, index: int, busy: float, sm: float, *, t: float = T0, tenant: str = "lab"
) -> pb.Summary:
    """One GPU's hour at `busy`, SM activity `sm` measured throughout, held by `tenant` ("":
    attributed to no one)."""
    s = pb.Summary(window_start_unix_nano=int(t * 1e9), window_end_unix_nano=int((t + 3600) * 1e9))
    gpu = s.gpus.add(
        index=index,
        uuid=f"GPU-{node}-{index}",
        serial=f"S-{node}-{index}",
        model=H100,
        present_seconds=3600.0,
        allocated_seconds=3600.0,
        busy_seconds=busy * 3600,
        sm_active_seconds=sm * 3600,
        sm_measured_seconds=3600.0,
        effective_seconds=sm * 3600,
    )
    if tenant:
        gpu.attribution.source, gpu.attribution.tenant = "static", tenant
    return s


def sixteen(busy: float = 0.85, sm: float = 0.55) -> list[tuple[str, bytes]]:
    """16 GPUs (4 nodes of 4) for an hour at `busy`, SM activity `sm`."""
    return [(f"n{n}", signed(gpu_hour(f"n{n}", g, busy, sm))) for n in range(4) for g in range(4)]


def test_every_measure_gets_its_verdict_side_by_side() -> None:
    """Busy 85% supports a claim of 85% while SM activity 55% refutes it: the real-work
    measure's verdict is given beside the claim's, in the answer and in `gputally query`."""
    from gputally.collector.audit.figures import WORK_MEASURE, render_text

    answer = as_dict(compute(sixteen(), T0, T0 + 3600, expected=16), "busy", 0.85)
    assert WORK_MEASURE == answer["work_measure"] == "sm_active"
    got = {
        m: (v["figure"], v["lower"], v["upper"], v["verdict"])
        for m, v in answer["verdicts"].items()
    }
    assert got == {
        "allocated": (1.0, 1.0, 1.0, SUPPORTED),
        "busy": (0.85, 0.85, 0.85, SUPPORTED),
        "sm_active": (0.55, 0.55, 0.55, REFUTED),
        "effective": (0.55, 0.55, 0.55, REFUTED),
    }
    assert answer["verdicts"]["sm_active"]["headline_verdict"] == "refuted"
    assert answer["verdict_caveat"] is None and answer["warnings"] == []
    lines = render_text(answer).splitlines()
    assert "claim       busy >= 85.00%: SUPPORTED  (without flagged padding: supported)" in lines
    assert "work        sm_active >= 85.00%: REFUTED  (sm_active 55.00% [55.00%, 55.00%])" in lines
    no_claim = as_dict(compute(sixteen(), T0, T0 + 3600, expected=16), "busy", None)
    assert no_claim["verdicts"]["busy"]["verdict"] is None
    assert not any(line.startswith("work") for line in render_text(no_claim).splitlines())


def test_more_gpus_than_declared_is_said_loudly_and_is_no_plain_pass() -> None:
    """16 GPUs at 85% busy, 12 declared: over the 12, busy would be 113.33%; the figures are
    over the 16 seen, the warning says both, and the verdict carries a caveat."""
    from gputally.collector.audit.figures import render_text

    answer = as_dict(compute(sixteen(), T0, T0 + 3600, expected=12), "busy", 0.85)
    inventory = answer["inventory"]
    assert (inventory["declared"], inventory["seen"], inventory["denominator"]) == (12, 16, 16)
    assert inventory["understated"] is True and inventory["capped"] == []
    assert inventory["over_declared"]["busy"] == pytest.approx(16 * 0.85 / 12)
    assert inventory["over_declared"]["allocated"] == pytest.approx(16 / 12)
    assert answer["figure"] == 0.85 and answer["verdict"] == SUPPORTED
    assert answer["warnings"] == [
        "16 GPUs reported but only 12 were declared: the inventory is understated, and every "
        "figure is over the 16 seen (over the 12 declared: allocated 133.33%, busy 113.33%, "
        "more than any GPU can do)"
    ]
    assert answer["verdict_caveat"] == (
        "the figures are over the 16 GPUs seen, not the 12 declared: the declared inventory is "
        "wrong, and no verdict here is one about it; over the 12 declared, busy would be "
        "113.33%, more than any GPU can do"
    )
    assert f"caveat      not a plain verdict: {answer['verdict_caveat']}" in render_text(answer)


def test_a_figure_above_100_percent_is_capped_and_said() -> None:
    """One card's window sent in two parts that together hold a second more than the window
    (within the restart tolerance): busy 3601 s of 3600 comes out at 100%, capped, and said."""
    parts = []
    for seconds in (1800.0, 1801.0):
        s = factories.summary(T0, 3600.0, 1.0)
        s.gpus[0].present_seconds = s.gpus[0].busy_seconds = seconds
        parts.append(("n1", signed(s)))
    answer = as_dict(compute(parts, T0, T0 + 3600, expected=1), "busy", 0.9)
    assert answer["inventory"]["capped"] == ["busy"]
    assert answer["figure"] == 1.0 and answer["verdict"] == SUPPORTED
    assert (
        "busy came out above 100% of the GPU-seconds counted and were capped at 100%: the "
        "record holds more GPU-seconds than the inventory has" in answer["warnings"]
    )
    assert answer["verdict_caveat"] == (
        "busy came out above 100% of the GPU-seconds counted and were capped at 100%: the "
        "record holds more than the inventory can"
    )


def test_use_attributed_to_no_one_is_said_above_one_percent() -> None:
    """GPU 0 busy 60% for the lab, GPU 1 busy 20% for no one: a quarter of the use is
    unattributed, 0.2 GPU-hours of it."""
    rows = [
        ("n1", signed(gpu_hour("n1", 0, 0.6, 0.3))),
        ("n1", signed(gpu_hour("n1", 1, 0.2, 0.1, tenant=""))),
    ]
    answer = as_dict(compute(rows, T0, T0 + 3600, expected=2), "busy", None)
    assert answer["unattributed"] == {
        "busy_gpu_hours": pytest.approx(0.2),
        "allocated_gpu_hours": pytest.approx(1.0),
        "busy_share": pytest.approx(0.25),
        "allocated_share": pytest.approx(0.5),
    }
    assert answer["warnings"] == [
        "0.2 GPU-hours busy (25.0% of all) ran on GPUs attributed to no tenant and no job: who "
        "used them the record does not say"
    ]
    rows[1] = ("n1", signed(gpu_hour("n1", 1, 0.006, 0.0, tenant="")))  # 1% of all: not said
    assert as_dict(compute(rows, T0, T0 + 3600, expected=2), "busy", None)["warnings"] == []


def hourly(
    busy: Callable[[float], float], start: float, hours: int, node: str = "n1"
) -> list[tuple[str, bytes]]:
    """One GPU's hours from `start`, each at busy(window start)."""
    return [
        (node, signed(gpu_hour(node, 0, busy(start + h * 3600), 0.0, t=start + h * 3600)))
        for h in range(hours)
    ]


def rolled(rows: list[tuple[str, bytes]], rollup: Rollup) -> Rollup:
    for node, body in rows:
        rollup.add_summary(node, pb.Summary.FromString(pb.SignedSummary.FromString(body).body))
    return rollup


MAR_1 = 1_772_323_200.0  # 2026-03-01T00:00:00Z, a Sunday: ISO week 2026-W09's last day


def test_iso_weeks_start_on_monday_and_partial_ones_are_marked() -> None:
    """From Sunday 1 March 12:00 to Tuesday 10 March 06:00: half a day of W09, all of W10,
    and 1.25 days of W11, at busy 20%, 60% and 100% (by the week the hour is in)."""
    monday = MAR_1 + 86400

    def busy(t: float) -> float:
        return 0.2 if t < monday else 0.6 if t < monday + 7 * 86400 else 1.0

    start, end = MAR_1 + 43200, monday + 8 * 86400 + 21600
    rollup = rolled(hourly(busy, MAR_1, 11 * 24), Rollup(start, end, 1))
    weeks = rollup.weeks()
    assert [(label, partial) for label, _, partial in weeks] == [
        ("2026-W09", True),
        ("2026-W10", False),
        ("2026-W11", True),
    ]
    assert [(f.start, f.end) for _, f, _ in weeks] == [
        (start, monday),
        (monday, monday + 7 * 86400),
        (monday + 7 * 86400, end),
    ]
    assert [bounds(f.total.sums, f.capacity)["busy"].figure for _, f, _ in weeks] == [
        pytest.approx(0.2),
        pytest.approx(0.6),
        pytest.approx(1.0),
    ]


def test_a_phase_cut_within_a_day_and_a_window_is_exact() -> None:
    """A phase from 2 March 06:30 to 4 March 18:00, on a GPU at busy 100% before 3 March
    12:15 and 0% after: its figure is the share of its time before then, exactly, as
    compute() gives it over the phase alone; the period's own figures do not change."""
    drop = MAR_1 + 2 * 86400 + 44100  # 3 March 12:15, within an hour's window

    def busy(t: float) -> float:
        return 1.0 if t + 3600 <= drop else 0.25 if t < drop else 0.0  # the cut hour: 15 min

    rows = hourly(busy, MAR_1, 5 * 24)
    p0, p1 = MAR_1 + 86400 + 23400, MAR_1 + 3 * 86400 + 64800
    rollup = rolled(rows, Rollup(MAR_1, MAR_1 + 5 * 86400, 1, [("acceptance", p0, p1)]))
    phase = rollup.phases["acceptance"].period()
    assert (phase.start, phase.end) == (p0, p1)
    assert bounds(phase.total.sums, phase.capacity)["busy"].figure == pytest.approx(
        (drop - p0) / (p1 - p0)
    )
    alone = compute(rows, p0, p1, expected=1)
    assert as_dict(phase, "busy", 0.5) == as_dict(alone, "busy", 0.5)
    assert as_dict(rollup.period(), "busy", 0.5) == as_dict(
        compute(rows, MAR_1, MAR_1 + 5 * 86400, expected=1), "busy", 0.5
    )


def test_phases_must_lie_within_the_period_and_have_names_of_their_own() -> None:
    with pytest.raises(ValueError, match="within the period"):
        Rollup(MAR_1, MAR_1 + 86400, 1, [("late", MAR_1 + 3600, MAR_1 + 2 * 86400)])
    with pytest.raises(ValueError, match="names must differ"):
        Rollup(MAR_1, MAR_1 + 86400, 1, [("a", MAR_1, MAR_1 + 60), ("a", MAR_1 + 60, MAR_1 + 120)])


def test_phases_travel_to_worker_rollups() -> None:
    """verify.py builds each worker's rollup as Rollup(*main.period_of()), pickled to the
    worker process: a partial rollup adds the phases up too, and merges."""
    import pickle

    phases = [("a", MAR_1 + 600, MAR_1 + 7200)]
    main = Rollup(MAR_1, MAR_1 + 86400, 3, phases)
    carried = pickle.loads(pickle.dumps(main.period_of()))
    assert carried == (MAR_1, MAR_1 + 86400, 3, tuple(phases))
    worker = Rollup(*carried)
    assert list(worker.phases) == ["a"]
    rolled(hourly(lambda t: 0.5, MAR_1, 3), worker)
    main.merge(worker)
    a = main.phases["a"].period()
    assert a.summaries == 2 and bounds(a.total.sums, a.capacity)["busy"].figure == pytest.approx(
        0.5 / 3  # 1 GPU at 50% of 3 declared
    )
    with pytest.raises(ValueError, match="same phases"):
        main.merge(Rollup(MAR_1, MAR_1 + 86400, 3))


def test_a_window_cut_by_the_period_widens_the_bounds_and_keeps_the_figure() -> None:
    """A summary does not say when in its window its seconds were: a period that cuts a
    window gets the pro rata figure, but bounds that hold wherever they were."""
    from gputally.collector.audit.figures import gpu_numbers
    from gputally.v1 import telemetry_pb2 as pb

    hour = pb.Summary(
        window_start_unix_nano=int(MAR_1) * 10**9,
        window_end_unix_nano=int(MAR_1 + 3600) * 10**9,
    )
    # busy 2,700 s of the hour (75%), SM activity 900 s, all measured
    hour.gpus.add(
        index=0,
        uuid="GPU-a",
        present_seconds=3600,
        busy_seconds=2700,
        sm_active_seconds=900,
        sm_measured_seconds=3600,
    )
    for start, end, busy, sm in (
        # the first half: of the 2,700 busy seconds at least 900 are in it, at most 1,800;
        # of the 2,700 seconds without SM activity at least 900; so SM active 0 .. 900
        (MAR_1, MAR_1 + 1800, (900 / 1800, 1.0), (0.0, 900 / 1800)),
        # the last quarter (900 s): busy 0 .. 900, SM active 0 .. 900
        (MAR_1 + 2700, MAR_1 + 3600, (0.0, 1.0), (0.0, 1.0)),
        # the whole hour: exact, as before
        (MAR_1, MAR_1 + 3600, (0.75, 0.75), (0.25, 0.25)),
    ):
        rollup = Rollup(start, end, 1)
        rollup.add("n1", (MAR_1, MAR_1 + 3600.0), gpu_numbers("n1", hour))
        period = rollup.period()
        got = bounds(period.total.sums, period.capacity)
        assert got["busy"].figure == pytest.approx(0.75)  # pro rata, whatever the cut
        assert (got["busy"].lower, got["busy"].upper) == pytest.approx(busy)
        assert (got["sm_active"].lower, got["sm_active"].upper) == pytest.approx(sm)
        assert got["sm_active"].figure == pytest.approx(0.25)
