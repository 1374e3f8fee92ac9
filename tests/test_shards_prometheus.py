"""A real Prometheus adds up two real collector shards: the recording rules' cluster figures.

Three `gputally collector` processes, each declared the whole inventory (40 GPUs, 5 nodes of
8; n5 never reports): shards A and B are one cluster (job gputally-shards), C alone is the same
cluster on a single collector (job gputally-single). Hand-made agents send every collector
known reports: n1 and n2 to A, n3 to B, n4 first to A then, restarted, to B (a node that moves
between shards); C gets every one of the same reports. Prometheus scrapes the three and
evaluates deploy/prometheus/rules/recording.yml.

Why the comparison is exact. Each counter is scraped at 0 before its first report (the
collectors start empty, and every node says hello before it reports) and is flat once the
reports are in, so a rule's increase() over its range is the counter's whole growth times one
factor: Prometheus extrapolates a counter's growth from its first to its last sample out to the
range's end (never back below zero, which the 0 sample rules out at the start). That factor is
1 + (T - last sample) / (last - first sample): up to a scrape interval over the seconds scraped,
and not the same on two targets, which Prometheus scrapes at offsets of their own. So the test
takes every series' samples from Prometheus and works out each rule's value from the known
inputs with each series' own factor (`increase` below, promql's extrapolatedRate), at one
instant T: the rules must give that to 1e-9, for the shards and for the single collector. The
factor is then the only difference between either figure and the truth (the inputs over the
declared inventory), checked too, with that bound as the tolerance (under 1% here; it
shrinks as the seconds scraped grow). Averaging the shards' own figures, or adding up their
inventories, is far outside it.

Needs the `prometheus` binary (Debian package `prometheus`); in CI a missing one fails.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gputally.v1 import telemetry_pb2 as pb

from .conftest import free_port, require_binary
from .factories import busy_sample, gputally_command, hello, raw_stream, report
from .test_prometheus import ROOT, RULES, _rules_every_second, api, scalar, start_prometheus

pytestmark = pytest.mark.prometheus

DECLARED = 40  # GPUs: 5 nodes of 8; n5 has no agent
GPUS = 8
REPORTS = 120  # one-second reports per node; n4 sends half to each shard
SCRAPE = 0.25  # seconds between scrapes
SCRAPED = 30.0  # seconds of scrapes, at least, before the instant the rules are checked at
# node: busy, SM activity, processes (dyadic fractions: every sum of them is exact)
NODES = {
    "n1": (0.875, 0.75, 1),
    "n2": (0.5, 0.25, 1),
    "n3": (0.125, 0.0625, 0),
    "n4": (0.625, 0.5, 1),
}
SHARDS, SINGLE = "gputally-shards", "gputally-single"
MEASURES = ("allocated", "busy", "sm_active", "effective")


@dataclass
class Shard:
    process: subprocess.Popen[bytes]
    grpc: str
    metrics: str  # host:port of /metrics


def start_collector(tmp_path: Path, name: str) -> Shard:
    """One `gputally collector` process on loopback, declared the whole inventory, keeping no
    record, rendering /metrics at every scrape (so a scrape sees the counters as they are)."""
    grpc_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTALLY_")}
    log = (tmp_path / f"collector-{name}.log").open("wb")
    process = subprocess.Popen(
        [
            *gputally_command(),
            "collector",
            *("--grpc-listen", f"127.0.0.1:{grpc_port}"),
            *("--metrics-listen", f"127.0.0.1:{metrics_port}"),
            *("--expected-gpus", str(DECLARED), "--db", "", "--metrics-refresh", "0"),
            "--log-level=warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    return Shard(process, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}")


def wait_ready(shard: Shard, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert shard.process.poll() is None, "the collector exited"
        try:
            with urllib.request.urlopen(f"http://{shard.metrics}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"collector {shard.metrics} did not become ready")


@pytest.fixture
def collectors(tmp_path: Path) -> Iterator[dict[str, Shard]]:
    made = {name: start_collector(tmp_path, name) for name in ("a", "b", "c")}
    try:
        for shard in made.values():
            wait_ready(shard)
        yield made
    finally:
        for shard in made.values():
            shard.process.terminate()
        for shard in made.values():
            try:
                shard.process.wait(20)
            except subprocess.TimeoutExpired:
                shard.process.kill()
                shard.process.wait(10)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A starter of start_prometheus's (test_prometheus.py); stops what it started."""
    require_binary("prometheus")  # before any collector starts: a skip (or, in CI, a failure)
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: Any, **kwargs: Any) -> str:
        process, base = start_prometheus(*args, **kwargs)
        processes.append(process)
        return base

    yield start
    for process in processes:
        process.terminate()
        process.wait(20)


# -- the agents ------------------------------------------------------------------------------


def reports(node: str, base: int, first: int, count: int) -> list[pb.Report]:
    """`count` one-second reports of the node's 8 GPUs, ending at base + first + 1, ...; numbered
    from 1 (each agent instance numbers its own)."""
    busy, sm, procs = NODES[node]
    return [
        report(
            i + 1,
            float(base + first + i + 1),
            *(busy_sample(g, busy, sm, procs) for g in range(GPUS)),
        )
        for i in range(count)
    ]


async def send(target: str, node: str, instance: int, batch: list[pb.Report]) -> None:
    """One agent stream: the hello, then the reports (in batches of 30), every one acked."""
    batches = [batch[i : i + 30] for i in range(0, len(batch), 30)]
    replies = await raw_stream(target, hello(node, GPUS, instance=instance), batches)
    assert replies[0].WhichOneof("body") == "welcome", replies[0]
    if batch:
        assert replies[-1].ack.acked_seq == batch[-1].seq, replies[-1]


def wait_for(base: str, promql: str, value: float, seconds: float = 30.0) -> None:
    """Bounded wait until the query's single value is `value`."""
    deadline, got = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        got = scalar(base, promql)
        if got == value:
            return
        time.sleep(0.25)
    raise AssertionError(f"{promql} is {got}, not {value}, after {seconds} s")


# -- what the rules must give ---------------------------------------------------------------


def increase(samples: list[tuple[int, float]], start: int, end: int) -> tuple[float, float]:
    """increase() over (start, end] of a counter's samples, as Prometheus computes it
    (promql/functions.go, extrapolatedRate): the growth from the first to the last sample
    (counter resets added back), extrapolated to the range's edges, by at most half the mean
    interval where the samples stop short of an edge, and never to below zero at the start.
    Times in milliseconds, as Prometheus keeps them. Returns (increase, growth): the factor
    is their ratio."""
    (first_t, first_v), (last_t, last_v) = samples[0], samples[-1]
    growth = last_v - first_v + sum(a for (_, a), (_, b) in itertools.pairwise(samples) if b < a)
    sampled = last_t - first_t
    mean = sampled / (len(samples) - 1)
    to_start, to_end = float(first_t - start), float(end - last_t)
    if to_start >= 1.1 * mean:
        to_start = mean / 2
    if growth > 0 and first_v >= 0:
        to_start = min(to_start, sampled * first_v / growth)
    if to_end >= 1.1 * mean:
        to_end = mean / 2
    return growth * (sampled + to_start + to_end) / sampled, growth


class Expected:
    """Each rule's value worked out from the raw samples Prometheus holds at instant T."""

    def __init__(self, base: str, at: float):
        self.at = round(at * 1000)  # ms
        self.series: list[tuple[dict[str, str], list[tuple[int, float]]]] = []
        data = api(
            base,
            "query",
            query='{__name__=~"gputally_(cluster|node)_(gpus|gpu_seconds_total|'
            'flagged_gpu_seconds_total|energy_joules_total)"}[30d]',
            time=f"{at:.3f}",
        )
        assert data["resultType"] == "matrix"
        for item in data["result"]:
            points = [(round(float(t) * 1000), float(v)) for t, v in item["values"]]
            self.series.append((item["metric"], points))
        self.factors: list[float] = []  # each counter's extrapolation factor

    def _select(self, name: str, **labels: str) -> list[list[tuple[int, float]]]:
        return [
            points
            for metric, points in self.series
            if metric["__name__"] == name and all(metric.get(k) == v for k, v in labels.items())
        ]

    def increase(self, range_s: float, name: str, **labels: str) -> float:
        """The sum over the job's instances of increase(name{labels}[range])."""
        total = 0.0
        for points in self._select(name, **labels):
            value, growth = increase(points, self.at - round(range_s * 1000), self.at)
            if growth:
                self.factors.append(value / growth)
            total += value
        return total

    def growth(self, name: str, **labels: str) -> float:
        """What the counters grew by, summed over instances: the inputs as scraped."""
        return sum(increase(points, 0, self.at)[1] for points in self._select(name, **labels))

    def held(self, range_s: float, name: str, **labels: str) -> float:
        """max over the instances of range x avg_over_time(name{labels}[range])."""
        means = [
            range_s * sum(v for _, v in points) / len(points)
            for points in self._select(name, **labels)
        ]
        return max(means)

    def rules(self, job: str, range_s: float) -> dict[str, float]:
        """Each recording rule of the range's group, by record and its labels."""
        counters = "gputally_cluster_gpu_seconds_total"
        flagged = "gputally_cluster_flagged_gpu_seconds_total"
        inventory = self.held(range_s, "gputally_cluster_gpus", job=job, state="expected")
        observed = self.increase(range_s, counters, job=job, measure="observed")
        out = {
            "cluster_coverage": observed / inventory,
            "cluster_padding": self.increase(range_s, flagged, job=job, measure="observed")
            / inventory,
            "cluster_energy_kwh": self.increase(
                range_s, "gputally_cluster_energy_joules_total", job=job
            )
            / 3.6e6,
        }
        for m in MEASURES:
            seconds = self.increase(range_s, counters, job=job, measure=m)
            out[f"cluster_utilization/{m}"] = seconds / inventory
            out[f"cluster_utilization_observed/{m}"] = seconds / observed
            out[f"cluster_utilization_without_padding/{m}"] = (
                seconds - self.increase(range_s, flagged, job=job, measure=m)
            ) / inventory
            for node in NODES:
                out[f"node_utilization/{node}/{m}"] = self.increase(
                    range_s, "gputally_node_gpu_seconds_total", job=job, node=node, measure=m
                ) / self.held(range_s, "gputally_node_gpus", job=job, node=node, state="total")
        return out


def key(record: str, metric: dict[str, str]) -> str:
    """A recorded series' key in Expected.rules: gputally:<what>:ratio_1h{node, measure}."""
    what = record.split(":")[1]
    return "/".join([what, *(metric[k] for k in ("node", "measure") if k in metric)])


RANGES = {"1h": 3600.0, "1d": 86400.0, "30d": 2592000.0}


def test_prometheus_adds_up_two_collector_shards_exactly(
    tmp_path: Path, prometheus_for: Callable[..., str], collectors: dict[str, Shard]
) -> None:
    a, b, c = collectors["a"], collectors["b"], collectors["c"]
    base = prometheus_for(
        tmp_path,
        [(SHARDS, [a.metrics, b.metrics]), (SINGLE, [c.metrics])],
        rules=_rules_every_second(tmp_path)[:1],  # recording.yml, every group each second
        scrape_interval=f"{round(SCRAPE * 1000)}ms",
    )
    groups = yaml.safe_load((RULES / "recording.yml").read_text())["groups"]
    rules = [(rule["record"], rule["expr"]) for group in groups for rule in group["rules"]]

    # Every node says hello first, so that Prometheus holds each counter at 0 before it grows.
    start = int(time.time()) - 300  # the reports cover 2 minutes, 5 minutes ago
    half = REPORTS // 2

    async def hellos(targets: list[tuple[str, str, int]]) -> None:
        await asyncio.gather(*(send(t, node, i, []) for t, node, i in targets))

    asyncio.run(
        hellos(
            [(a.grpc, "n1", 1), (a.grpc, "n2", 1), (a.grpc, "n4", 1), (b.grpc, "n3", 1)]
            + [(c.grpc, node, 1) for node in NODES]
        )
    )
    zero = 'count(gputally_node_gpu_seconds_total{measure="observed"} == 0)'
    wait_for(base, zero, 8)  # 3 nodes on A, 1 on B, 4 on C
    wait_for(base, 'count(gputally_cluster_gpu_seconds_total{measure="observed"} == 0)', 3)

    async def first_half() -> None:
        await asyncio.gather(
            *(send(a.grpc, n, 1, reports(n, start, 0, REPORTS)) for n in ("n1", "n2")),
            send(b.grpc, "n3", 1, reports("n3", start, 0, REPORTS)),
            send(a.grpc, "n4", 1, reports("n4", start, 0, half)),
            *(send(c.grpc, n, 1, reports(n, start, 0, REPORTS)) for n in ("n1", "n2", "n3")),
            send(c.grpc, "n4", 1, reports("n4", start, 0, half)),
        )

    asyncio.run(first_half())
    # n4's agent restarts and lands on B: a new agent instance, whose seconds go on from where
    # the old one's ended. B shows it from its hello (counters at 0); A keeps it, not up.
    asyncio.run(send(b.grpc, "n4", 2, []))
    wait_for(
        base,
        f'gputally_node_gpu_seconds_total{{instance="{b.metrics}", node="n4", measure="observed"}}',
        0,
    )
    scraping_since = time.monotonic()  # every counter has been scraped at 0 by now

    async def second_half() -> None:
        await asyncio.gather(
            send(b.grpc, "n4", 2, reports("n4", start, half, half)),
            send(c.grpc, "n4", 2, reports("n4", start, half, half)),
        )

    asyncio.run(second_half())
    total = GPUS * REPORTS * len(NODES)  # observed GPU-seconds
    for job in (SHARDS, SINGLE):
        wait_for(
            base,
            f'sum(gputally_cluster_gpu_seconds_total{{job="{job}", measure="observed"}})',
            total,
        )
    # Flat counters for a while: the extrapolation factor is 1 + under a scrape interval over
    # the seconds scraped, so SCRAPED seconds make it at most 1 + 0.25 / 30. Then one instant
    # T, a second ago, whose scrapes are all stored.
    time.sleep(max(0.0, SCRAPED + 1.0 - (time.monotonic() - scraping_since)))
    at = round(time.time() - 1.0, 3)

    # -- the counters as Prometheus holds them: the shards add up to the single collector ------
    expected = Expected(base, at)
    truth = {m: 0.0 for m in ("observed", *MEASURES)}
    for busy, sm, procs in NODES.values():
        seconds = GPUS * REPORTS
        truth["observed"] += seconds
        truth["busy"] += busy * seconds
        truth["sm_active"] += sm * seconds
        truth["allocated"] += seconds if procs else 0.0
    counters = "gputally_cluster_gpu_seconds_total"
    for measure in ("observed", "busy", "sm_active", "allocated"):
        for job in (SHARDS, SINGLE):
            assert expected.growth(counters, job=job, measure=measure) == truth[measure], (
                job,
                measure,
            )
    for measure in ("effective", "observed"):
        assert expected.growth(counters, job=SHARDS, measure=measure) == expected.growth(
            counters, job=SINGLE, measure=measure
        )
    assert expected.growth("gputally_cluster_energy_joules_total", job=SHARDS) == expected.growth(
        "gputally_cluster_energy_joules_total", job=SINGLE
    )
    node_seconds = "gputally_node_gpu_seconds_total"
    a_part = expected.growth(
        node_seconds, job=SHARDS, instance=a.metrics, node="n4", measure="observed"
    )
    b_part = expected.growth(
        node_seconds, job=SHARDS, instance=b.metrics, node="n4", measure="observed"
    )
    assert (a_part, b_part) == (GPUS * half, GPUS * half)  # n4 on both shards, each second once

    # -- every rule, as Prometheus evaluates its expression at that instant ---------------------
    checked = 0
    for record, expr in rules:
        range_s = RANGES[record.rsplit("_", 1)[-1].rsplit(":", 1)[-1]]
        result = api(base, "query", query=expr, time=f"{at:.3f}")["result"]
        by_job: dict[str, dict[str, float]] = {}
        for series in result:
            assert "instance" not in series["metric"], (record, series["metric"])
            by_job.setdefault(series["metric"]["job"], {})[key(record, series["metric"])] = float(
                series["value"][1]
            )
        assert set(by_job) == {SHARDS, SINGLE}, record
        what = record.split(":")[1]
        for job, values in by_job.items():
            want = {
                k: v
                for k, v in expected.rules(job, range_s).items()
                if k == what or k.startswith(what + "/")
            }
            assert set(values) == set(want), (record, job)
            for k, value in values.items():
                assert value == pytest.approx(want[k], rel=1e-9, abs=1e-15), (record, job, k)
                checked += 1
    assert checked >= len(rules) * 2

    # -- against the truth: the known inputs over the declared inventory -----------------------
    # The one difference is each series' extrapolation factor (>= 1), which bounds the error.
    expected.factors.clear()
    figures = {job: expected.rules(job, 3600.0) for job in (SHARDS, SINGLE)}
    slack = max(expected.factors) - 1
    assert 0 <= slack <= SCRAPE / (SCRAPED - SCRAPE), slack  # a scrape interval over 30 s
    inventory = DECLARED * 3600.0
    for job, figure in figures.items():
        for m in ("busy", "sm_active", "allocated"):
            ratio = figure[f"cluster_utilization/{m}"] / (truth[m] / inventory)
            assert 1 <= ratio <= 1 + slack + 1e-12, (job, m, ratio)
        coverage = figure["cluster_coverage"] / (truth["observed"] / inventory)
        assert 1 <= coverage <= 1 + slack + 1e-12, (job, coverage)
        n4 = figure["node_utilization/n4/busy"] / (GPUS * REPORTS * NODES["n4"][0] / (GPUS * 3600))
        assert 1 <= n4 <= 1 + slack + 1e-12, (job, n4)
    sharded, single = figures[SHARDS], figures[SINGLE]
    for k in ("cluster_utilization/busy", "cluster_utilization_observed/busy", "cluster_coverage"):
        assert sharded[k] == pytest.approx(single[k], rel=slack), k
    # What would be wrong, by far more than that tolerance: the mean of the shards' own
    # busy-over-observed figures (0.675 and 0.292: 0.483, where the cluster's is 0.531).
    own = [
        expected.increase(3600.0, counters, job=SHARDS, instance=s.metrics, measure="busy")
        / expected.increase(3600.0, counters, job=SHARDS, instance=s.metrics, measure="observed")
        for s in (a, b)
    ]
    mean = sum(own) / 2
    assert abs(mean / sharded["cluster_utilization_observed/busy"] - 1) > 3 * slack
    truth_busy = truth["busy"] / truth["observed"]
    assert sharded["cluster_utilization_observed/busy"] == pytest.approx(truth_busy, rel=slack)

    # -- the dashboard's health panels count each node once, however the shards hold them ------
    # At T every node is stale (its last report came SCRAPED seconds ago, past --stale-after):
    # 4 agents known, none up, their 32 GPUs lost, 8 of the 40 declared never seen. Per shard,
    # A knows 3 nodes and B 2 (n4 on both): adding the shards' own counts would give 5, 40, 24.
    board = json.loads((ROOT / "deploy" / "grafana" / "gputally-cluster.json").read_text())
    known = {
        "Agents up": {"up": 0, "known": 4},
        "GPUs lost and missing": {"lost": 32, "missing": DECLARED - 32},
        "GPUs reporting / expected": {"reporting": 0, "expected": DECLARED},
    }
    panels = {p["title"]: p for p in board["panels"] if p["title"] in known}
    assert set(panels) == set(known)
    for title, legends in known.items():
        for target in panels[title]["targets"]:
            for job in (SHARDS, SINGLE):
                shown = scalar(base, target["expr"].replace("$job", job), at)
                assert shown == legends[target["legendFormat"]], (
                    title,
                    target["legendFormat"],
                    job,
                )

    # -- and the rules Prometheus records, every one healthy, for both jobs ----------------------
    health = [r for g in api(base, "rules")["groups"] for r in g["rules"]]
    assert len(health) == len(rules)
    for rule in health:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    for record, _ in rules:
        for job in (SHARDS, SINGLE):
            assert scalar(base, f'count({record}{{job="{job}"}})') is not None, (record, job)
    recorded = scalar(
        base, f'gputally:cluster_utilization:ratio_1h{{job="{SHARDS}", measure="busy"}}'
    )
    # evaluated by Prometheus at an instant of its own: within the bound, not the same factor
    assert recorded == pytest.approx(truth["busy"] / inventory, rel=SCRAPE / (SCRAPED - SCRAPE))
