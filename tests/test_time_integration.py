"""Time integration: every second the agent runs is counted, from the driver's sample buffer."""

from __future__ import annotations

import itertools

import pytest

from gputally.agent.sim import scenario as scenario_mod
from gputally.agent.sim.mock import ManualClock, MockNVML

from .factories import mock_node, scenario, tick

# A square wave that does not line up with the 1-s ticks nor with 30-s scrapes:
# full load for 2.9 s of every 7.25 s.
SQUARE = """
[cluster]
nodes = 1
gpus_per_node = 1
[[workload]]
gpus = 1
kind = "square"
period = 7.25
duty = 0.4
busy = 1.0
sm_active = 0.5
"""
NO_SAMPLE_BUFFER = '\n[[fault]]\nkind = "unsupported"\nfunction = "nvmlDeviceGetSamples"\n'


def true_busy_seconds(sc: scenario_mod.Scenario, t0: float, t1: float) -> float:
    edges = [t0, *sc.breakpoints(0, 0, t0, t1), t1]
    return sum(sc.load_at(0, 0, (a + b) / 2).busy * (b - a) for a, b in itertools.pairwise(edges))


def agent_busy_seconds(toml: str, seconds: int) -> float:
    node = mock_node(toml, name="n", interval=1.0)
    sampler, clock = node.sampler, node.clock
    total = 0.0
    for _ in range(seconds):
        clock.advance(1.0)
        report = tick(sampler)
        total += report.gpus[0].busy * report.interval_seconds
    return total


def scraped_gauge_busy_seconds(toml: str, seconds: int, every: int) -> float:
    """What a 30-s scraped exporter reports: utilization.gpu read at each scrape, held between."""
    clock = ManualClock()
    lib = MockNVML(scenario(toml), 0, clock)
    lib.nvmlInit()
    handle = lib.nvmlDeviceGetHandleByIndex(0)
    readings: list[float] = []
    for t in range(every, seconds + 1, every):
        clock.now = lib.start + t
        readings.append(float(lib.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0)
    return sum(readings) * every


def test_square_wave_integral_matches_the_truth_within_one_percent() -> None:
    sc = scenario(SQUARE)
    truth = true_busy_seconds(sc, 0.0, 60.0)
    assert truth == pytest.approx(25.2)  # 8 full periods x 2.9 s + 2.0 s of the 9th
    agent = agent_busy_seconds(SQUARE, 60)
    assert agent == pytest.approx(truth, rel=0.01)
    gauge = scraped_gauge_busy_seconds(SQUARE, 60, every=30)
    # Both scrapes land in an "on" phase: the gauge says the GPU was busy the whole minute.
    assert gauge == pytest.approx(60.0)
    assert abs(gauge - truth) / truth > 0.5


def test_without_the_sample_buffer_polling_is_the_fallback() -> None:
    sc = scenario(SQUARE)
    truth = true_busy_seconds(sc, 0.0, 60.0)
    polled = agent_busy_seconds(SQUARE + NO_SAMPLE_BUFFER, 60)
    with_buffer = agent_busy_seconds(SQUARE, 60)
    # Polling once a second sees only the driver's latest 1/6-s sample: close, not exact.
    assert polled == pytest.approx(truth, rel=0.05)
    assert abs(with_buffer - truth) < abs(polled - truth)


def test_a_stall_longer_than_the_driver_buffer_is_not_filled_in() -> None:
    toml = SQUARE.replace('kind = "square"', 'kind = "steady"').replace(
        "period = 7.25\nduty = 0.4\n", ""
    )
    node = mock_node(toml, name="n", interval=1.0)
    sampler, clock = node.sampler, node.clock
    clock.advance(1.0)
    tick(sampler)
    clock.advance(60.0)  # the agent was stopped for a minute
    report = tick(sampler)
    assert report.interval_seconds == 2.0  # only what can be vouched for is covered
    assert report.gpus[0].busy == pytest.approx(1.0)
