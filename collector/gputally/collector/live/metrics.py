"""Prometheus exposition of the cluster state, plus health endpoints.

A custom collector renders the state at scrape time (no per-update bookkeeping in
prometheus-client objects), following Prometheus conventions: base units, ratios in 0-1
named ``_ratio``, monotonic counters named ``_total``.

To average any measure exactly over a range, divide the counter by the inventory:

    increase(gputally_cluster_gpu_seconds_total{measure="busy"}[1h])
      / on() (gputally_cluster_gpus{state="expected"} * 3600)
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from gputally.v1 import __version__
from gputally.v1.accounting import MEASURES, PADDING_RULES

from ..record.witnessing import Witnesses
from .state import MAX_TENANTS, OTHER_XID, ClusterState, ClusterView, NodeView

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
NodeValues = Callable[[NodeView], Iterable[tuple[Sequence[str], float]]]

# Per-node series: kind, name, help, labels after "node", and each one's (labels, value)s.
_NODE_SERIES: tuple[tuple[str, str, str, tuple[str, ...], NodeValues], ...] = (
    (
        "gauge",
        "gputally_node_info",
        "The node's agent as its hello describes it (backend mock or nvml, versions), and how "
        "its stream is vouched for: authenticated=enrolled (it proved the node's enrolled key), "
        "unenrolled (it proved a key nobody enrolled), none (it proved no key).",
        ("backend", "agent_version", "driver_version", "protocol_revision", "authenticated"),
        lambda n: [
            (
                (
                    n.backend,
                    n.agent_version,
                    n.driver_version,
                    str(n.protocol_revision),
                    n.authenticated,
                ),
                1,
            )
        ],
    ),
    (
        "gauge",
        "gputally_node_clock_offset_seconds",
        "The node's clock minus the collector's, as its fastest-delivered report shows it "
        "(network delay included, so a few milliseconds below the truth). Reports more than "
        "--max-skew ahead are refused.",
        (),
        lambda n: [((), n.clock_offset)],
    ),
    (
        "counter",
        "gputally_node_clock_steps",
        "Times the node's clock stepped back and its reports were followed across the step "
        "(counted whole, placed where the previous one ended).",
        (),
        lambda n: [((), n.clock_steps)],
    ),
    (
        "gauge",
        "gputally_node_up",
        "1 when the node's agent is connected and its telemetry is fresh.",
        (),
        lambda n: [((), int(n.up))],
    ),
    (
        "gauge",
        "gputally_node_gpus",
        "GPUs of the node by state.",
        ("state",),
        lambda n: [(("total",), n.gpus), (("reporting",), n.reporting)],
    ),
    (
        "gauge",
        "gputally_node_utilization_ratio",
        "Node utilization over the live window, over the node's GPUs.",
        ("measure",),
        lambda n: [((m,), n.window.ratios[m]) for m in MEASURES],
    ),
    (
        "gauge",
        "gputally_node_coverage_ratio",
        "Node coverage over the live window.",
        (),
        lambda n: [((), n.window.coverage)],
    ),
    (
        "counter",
        "gputally_node_gpu_seconds",
        "Node GPU-seconds by measure.",
        ("measure",),
        lambda n: [((m,), v) for m, v in n.counters.seconds.items()],
    ),
    (
        "counter",
        "gputally_node_energy_joules",
        "Energy drawn by the node's GPUs.",
        (),
        lambda n: [((), n.counters.energy_joules)],
    ),
    (
        "gauge",
        "gputally_node_power_watts",
        "Latest power of the node's reporting GPUs.",
        (),
        lambda n: [((), n.power_watts)],
    ),
    (
        "gauge",
        "gputally_node_last_report_timestamp_seconds",
        "When the node's latest report arrived (unix time).",
        (),
        lambda n: [((), n.last_received)],
    ),
    (
        "counter",
        "gputally_node_reports",
        "Reports received by outcome.",
        ("result",),
        lambda n: [((r,), c) for r, c in n.reports.items()],
    ),
    (
        "counter",
        "gputally_node_missed_reports",
        "Reports never received (gaps in sequence numbers).",
        (),
        lambda n: [((), n.missed_reports)],
    ),
    (
        "counter",
        "gputally_node_summaries",
        "Signed summaries received: recorded in the ledger, or resent (already recorded).",
        ("result",),
        lambda n: [
            (("recorded",), n.summaries),
            (("resent",), n.summaries_resent),
            (("overlapping",), n.summaries_overlapping),
            (("unrecorded",), n.summaries_unrecorded),
        ],
    ),
    (
        "counter",
        "gputally_node_clipped_seconds",
        "Report seconds not counted because an earlier report of the node covered them "
        "(overlapping intervals: a clock stepped back, or a lying agent).",
        (),
        lambda n: [((), n.clipped_seconds)],
    ),
    (
        "counter",
        "gputally_node_energy_refused",
        "Energy readings not counted: more than the board can draw in their interval (a counter "
        "that jumped, or a reset to an impossible value).",
        (),
        lambda n: [((), n.energy_refused)],
    ),
    (
        "counter",
        "gputally_node_chain_breaks",
        "Recorded summaries that did not continue the node's chain: summaries lost on the "
        "way (a gap auditors will see) or an agent that started a new chain.",
        (),
        lambda n: [((), n.chain_breaks)],
    ),
    (
        "counter",
        "gputally_node_xid_events",
        "XID errors the node's GPUs reported (e.g. 79: fell off the bus).",
        ("xid",),
        lambda n: [
            (("other" if code == OTHER_XID else str(code),), count)
            for code, count in sorted(n.xids.items())
        ],
    ),
)


class ClusterCollector(Collector):
    """The live state as metrics. `nodes`: with each node's own series (about 32 a node:
    400,000 at 12,500 nodes, seconds to render); without them, the cluster's only, for
    clusters whose agents are scraped for per-node detail (--node-metrics none)."""

    def __init__(self, state: ClusterState, nodes: bool = True):
        self.state = state
        self.nodes = nodes

    def collect(self) -> Iterator[Any]:
        view = self.state.view(nodes=self.nodes)
        yield InfoMetricFamily(
            "gputally_collector_build",
            "Collector build information.",
            value={"version": __version__},
        )
        yield from self._cluster(view)
        yield from self._bounds_and_breakdowns(view)
        if self.nodes:
            yield from self._nodes(view)
        yield GaugeMetricFamily(
            "gputally_collector_sessions", "Agent streams currently open.", value=view.sessions
        )
        yield GaugeMetricFamily(
            "gputally_ledger_intake_stopped",
            "1 when summaries are not being recorded (nor acknowledged: agents keep them spooled) "
            "because the ledger cannot be extended consistently; /readyz says why.",
            value=int(bool(view.intake_stopped)),
        )
        yield CounterMetricFamily(
            "gputally_identity_conflicts",
            "Hellos refused because they claimed a GPU (UUID or serial) another node, still up, holds.",
            value=view.identity_conflicts,
        )
        yield from self._guards(view)

    def _guards(self, view: ClusterView) -> Iterator[Any]:
        """What the collector refused, folded and forgot: its limits at work."""
        yield GaugeMetricFamily(
            "gputally_cluster_unauthenticated_nodes",
            "Nodes connected or reporting within --stale-after whose live reports no enrolled key "
            "vouches for (no --keys, or an "
            "agent that proves no key): anyone who can reach the port could have sent them.",
            value=view.unauthenticated,
        )
        yield _counts(
            "gputally_streams_refused",
            "Agent streams ended with an error status, by gRPC status (UNAUTHENTICATED: a failed "
            "proof of possession; RESOURCE_EXHAUSTED: a limit; PERMISSION_DENIED: a key not enrolled).",
            "status",
            view.refusals,
        )
        yield _counts(
            "gputally_collector_reports",
            "Reports of every node by result (accepted, duplicate: a sequence number seen, "
            "rejected: refused with a reason in the Ack), evicted nodes' included.",
            "result",
            view.reports,
        )
        yield CounterMetricFamily(
            "gputally_nodes_evicted",
            "Nodes forgotten after --evict-after without a stream or report.",
            value=view.evicted,
        )
        folded = CounterMetricFamily(
            "gputally_labels_folded",
            'Label values shown as "(other)" because their label reached its cap (model: GPUs '
            "announced, xid: events, rule: flagged samples).",
            labels=["label"],
        )
        for label in ("model", "xid", "rule"):
            folded.add_metric([label], view.folded.get(label, 0))
        yield folded

    def _cluster(self, view: ClusterView) -> Iterator[Any]:
        """The cluster's GPUs, live figures, counters and models."""
        gpus = GaugeMetricFamily(
            "gputally_cluster_gpus",
            "GPUs by state: expected (the denominator: the declared inventory, or the GPUs seen when "
            "more), seen (in any agent's hello), "
            "reporting (fresh telemetry, status ok), lost (seen but not reporting), missing (expected but never seen).",
            labels=["state"],
        )
        lost = view.seen - view.reporting
        for state, value in (
            ("expected", view.expected),
            ("seen", view.seen),
            ("reporting", view.reporting),
            ("lost", lost),
            ("missing", max(view.expected - view.seen, 0)),
        ):
            gpus.add_metric([state], value)
        yield gpus
        yield GaugeMetricFamily(
            "gputally_cluster_inventory_declared",
            "1 when the expected GPU count was declared (--expected-gpus); 0 when it is only the GPUs seen.",
            value=int(view.declared),
        )
        ratio = GaugeMetricFamily(
            "gputally_cluster_utilization_ratio",
            "Cluster utilization over the live window by measure, over the expected GPU count; "
            "unobserved GPU-seconds count as zero.",
            labels=["measure"],
        )
        measured = GaugeMetricFamily(
            "gputally_cluster_measured_ratio",
            "Share of the expected GPU-seconds of the live window in which the measure was available.",
            labels=["measure"],
        )
        for measure in MEASURES:
            ratio.add_metric([measure], view.window.ratios[measure])
            measured.add_metric([measure], view.window.measured[measure])
        yield ratio
        yield measured
        yield GaugeMetricFamily(
            "gputally_cluster_coverage_ratio",
            "Observed GPU-seconds over expected GPU-seconds in the live window.",
            value=view.window.coverage,
        )
        yield GaugeMetricFamily(
            "gputally_cluster_window_seconds",
            "Length of the live window behind the _ratio gauges.",
            value=view.window_seconds,
        )
        yield GaugeMetricFamily(
            "gputally_cluster_window_end_timestamp_seconds",
            "When the live window behind the _ratio gauges ends (it lags the newest reports, "
            "and /metrics is served from a render up to --metrics-refresh old).",
            value=view.window_end,
        )
        yield GaugeMetricFamily(
            "gputally_cluster_power_watts",
            "Sum of the latest power readings of reporting GPUs.",
            value=view.power_watts,
        )
        seconds = CounterMetricFamily(
            "gputally_cluster_gpu_seconds",
            "GPU-seconds integrated from reports: observed (telemetry present), and each measure weighted by its value.",
            labels=["measure"],
        )
        for measure, gpu_seconds in view.counters.seconds.items():
            seconds.add_metric([measure], gpu_seconds)
        yield seconds
        yield CounterMetricFamily(
            "gputally_cluster_energy_joules",
            "Energy drawn by all GPUs, from NVML total-energy counters.",
            value=view.counters.energy_joules,
        )
        models = GaugeMetricFamily(
            "gputally_cluster_model_gpus", "GPUs seen, by model.", labels=["model"]
        )
        for model, count in sorted(view.models.items()):
            models.add_metric([model], count)
        yield models

    def _nodes(self, view: ClusterView) -> Iterator[Any]:
        """Every node's state, live figures, counters and evidence (_NODE_SERIES)."""
        families = [
            (
                (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                    name, text, labels=["node", *labels]
                ),
                values,
            )
            for kind, name, text, labels, values in _NODE_SERIES
        ]
        for node in view.nodes:
            for family, values in families:
                for extra, value in values(node):
                    family.add_metric([node.name, *extra], value)
        for family, _ in families:
            yield family

    def _bounds_and_breakdowns(self, view: ClusterView) -> Iterator[Any]:
        """Lower and upper bounds, figures without padding, padding, per model and per tenant."""
        bound = GaugeMetricFamily(
            "gputally_cluster_utilization_bound_ratio",
            "Bounds of the live cluster figure: unobserved or unmeasured GPU-seconds count as 0 (lower) "
            "or at their cap (upper); estimates never count towards the lower bound.",
            labels=["measure", "bound"],
        )
        clean = GaugeMetricFamily(
            "gputally_cluster_utilization_without_padding_ratio",
            "Cluster figure over the live window with flagged padding time counted as no work.",
            labels=["measure"],
        )
        for measure in MEASURES:
            bound.add_metric([measure, "lower"], view.window.lower[measure])
            bound.add_metric([measure, "upper"], view.window.upper[measure])
            clean.add_metric([measure], view.window.without_padding[measure])
        yield bound
        yield clean
        padding_now = GaugeMetricFamily(
            "gputally_cluster_padding_gpus",
            "Reporting GPUs a padding rule flags now.",
            labels=["rule"],
        )
        for rule in PADDING_RULES:
            padding_now.add_metric([rule], view.padding_gpus.get(rule, 0))
        yield padding_now
        padding_seconds = CounterMetricFamily(
            "gputally_cluster_padding_gpu_seconds",
            "GPU-seconds flagged as padding, by rule.",
            labels=["rule"],
        )
        for rule in PADDING_RULES:
            padding_seconds.add_metric([rule], view.counters.padding.get(rule, 0.0))
        yield padding_seconds
        flagged = CounterMetricFamily(
            "gputally_cluster_flagged_gpu_seconds",
            "The part of gputally_cluster_gpu_seconds_total in time flagged as padding by any rule "
            "(counted once however many rules flag it); subtract it for figures without padding.",
            labels=["measure"],
        )
        for measure, gpu_seconds in view.counters.flagged.items():
            flagged.add_metric([measure], gpu_seconds)
        yield flagged
        for family, label, groups, text in (
            (
                "gputally_model_utilization_ratio",
                "model",
                view.by_model,
                "over the model's GPUs seen",
            ),
            (
                "gputally_tenant_utilization_ratio",
                "tenant",
                view.by_tenant,
                "over the GPUs attributed to the tenant, a shared MIG GPU by its slices "
                f'(top {MAX_TENANTS}, the rest as "(other)")',
            ),
        ):
            metric = GaugeMetricFamily(
                family, f"Utilization over the live window {text}.", labels=[label, "measure"]
            )
            gpus = GaugeMetricFamily(
                family.replace("_utilization_ratio", "_gpus"), f"GPUs {text}.", labels=[label]
            )
            for name, figures in sorted(groups.items()):
                gpus.add_metric([name], figures.gpus)
                for measure in MEASURES:
                    metric.add_metric([name, measure], figures.ratios[measure])
            yield metric
            if label == "tenant":
                yield gpus


class WitnessCollector(Collector):
    """What the witnesses did with the ledger's checkpoints (record/witnessing.Witnesses)."""

    def __init__(self, witnesses: Witnesses, ledger_size: Callable[[], int]):
        self.witnesses = witnesses
        self.ledger_size = ledger_size

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "gputally_ledger_checkpoint_size",
            "Entries covered by the newest checkpoint the collector signed.",
            value=self.ledger_size(),
        )
        size = GaugeMetricFamily(
            "gputally_witness_cosigned_size",
            "Entries covered by the newest checkpoint this witness cosigned; below "
            "gputally_ledger_checkpoint_size, the newest entries are not yet witnessed.",
            labels=["witness"],
        )
        at = GaugeMetricFamily(
            "gputally_witness_cosigned_timestamp_seconds",
            "When this witness cosigned its newest checkpoint (its clock, as signed).",
            labels=["witness"],
        )
        count = CounterMetricFamily(
            "gputally_witness_cosignatures",
            "Cosignatures received from this witness and kept in the ledger.",
            labels=["witness"],
        )
        failures = CounterMetricFamily(
            "gputally_witness_failures",
            "Checkpoints this witness did not cosign, by reason (conflict: it has seen another "
            "history of this log, a rollback or a fork; refused: it does not know or trust this "
            "log's key; http, error: unreachable; proof, protocol, record).",
            labels=["witness", "reason"],
        )
        for name, held in sorted(self.witnesses.status.items()):
            size.add_metric([name], held.size)
            at.add_metric([name], held.cosigned_at)
            count.add_metric([name], held.cosignatures)
            for reason, n in sorted(held.failures.items()):
                failures.add_metric([name, reason], n)
        yield from (size, at, count, failures)


class SignerCollector(Collector):
    """Whether this collector signs the ledger's checkpoints now: always, on its own ledger;
    on a ledger its shards share (PostgreSQL), the one that holds the role."""

    def __init__(self, signing: Callable[[], bool]):
        self.signing = signing

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "gputally_ledger_signer",
            "1 when this collector signs the ledger's checkpoints now (one shard of a shared "
            "ledger at a time), else 0.",
            value=1.0 if self.signing() else 0.0,
        )


def make_registry(
    state: ClusterState,
    witnesses: Witnesses | None = None,
    ledger_size: Callable[[], int] | None = None,
    signing: Callable[[], bool] | None = None,
    node_series: bool = True,
) -> CollectorRegistry:
    """A fresh registry per collector (never the global one): tests and embedders stay isolated."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(state, node_series))
    if witnesses is not None and ledger_size is not None:
        registry.register(WitnessCollector(witnesses, ledger_size))
    if signing is not None:
        registry.register(SignerCollector(signing))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# Served without basic auth under a web configuration (they tell only "ok" or why not ready).
HEALTH_PATHS = ("/healthz", "/readyz")
# A renderer nobody scraped for this long (or 4 refreshes) stops until the next scrape.
IDLE_AFTER_S = 120.0


def _counts(name: str, text: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one series per key of `counts`, in the keys' order."""
    family = CounterMetricFamily(name, text, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    return family


class Exposition:
    """The /metrics text, rendered by prometheus-client once per `refresh` seconds on a
    thread of its own and served as bytes (gzipped once, when asked for), so that a scrape
    costs a copy, not a render: at 10,000 GPUs a render is ~40,000 series, about half a
    second of one core (benchmarks/ingest_scale.py prints it). A scrape gets figures at most
    `refresh` seconds old (or 4 renders' time, see `every`) plus a render's time, and never
    waits for a render but the first (and the first asking for gzip); counters stay exact
    (Prometheus computes rates from their values, whenever they were read).

    The renderer runs while scrapes come; after IDLE_AFTER_S without one it stops, and the
    next scrape renders afresh. `refresh` 0 renders at every scrape."""

    def __init__(self, registry: CollectorRegistry, refresh: float = 0.0):
        self.registry = registry
        self.refresh = refresh
        self.render_seconds = 0.0  # how long the latest render took
        self.renders = 0
        self._lock = threading.Lock()  # the fields below; never held while rendering
        self._rendering = threading.Lock()  # one render at a time
        self._body = b""
        self._gzipped: bytes | None = None
        self._want_gzip = False
        self._rendered_at = -float("inf")  # time.monotonic() when the render began
        self._scraped_at = -float("inf")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _fresh(self, gzipped: bool) -> bool:
        """Whether the latest render may be served: while the renderer runs, any (the next
        one is under way, and a scrape that rendered it or waited for it would take a
        render's time: seconds at 100,000 GPUs on a busy machine, beyond Prometheus' scrape
        timeout; the figures say when their window ended); else one begun within `every`."""
        if not self._body or (gzipped and self._gzipped is None):
            return False
        if self._thread is not None and self._thread.is_alive():
            return True
        return time.monotonic() - self._rendered_at <= self.every

    def _render(self) -> None:
        """Render (under _rendering): scrapes meanwhile get the previous render at once."""
        started, began = time.perf_counter(), time.monotonic()
        body = generate_latest(self.registry)
        with self._lock:
            zipped = self._want_gzip
        gzipped = gzip.compress(body, compresslevel=6) if zipped else None
        with self._lock:
            self._body, self._gzipped, self._rendered_at = body, gzipped, began
            self.render_seconds = time.perf_counter() - started
            self.renders += 1

    def get(self, gzipped: bool) -> bytes:
        """The body of a scrape (gzipped when `gzipped`)."""
        with self._lock:
            self._scraped_at = time.monotonic()
            self._want_gzip = self._want_gzip or gzipped
            fresh, renders = self._fresh(gzipped), self.renders
            if self.refresh > 0 and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(
                    target=self._run, name="gputally-metrics-render", daemon=True
                )
                self._thread.start()
        if not fresh:  # the first scrape, one after the renderer stopped, or refresh 0
            with self._rendering:
                # unless a render finished while this scrape waited for the lock (not merely
                # a renderer started: the body may be one left from before it stopped)
                if self.renders == renders or (gzipped and self._gzipped is None):
                    self._render()
        with self._lock:
            if gzipped and self._gzipped is not None:
                return self._gzipped
            return self._body

    @property
    def every(self) -> float:
        """How often the renderer renders: `refresh`, or slower when a render takes more than
        a quarter of it (400,000 series at 100,000 GPUs), so that serving /metrics never
        takes more than a quarter of a core."""
        return max(self.refresh, 4.0 * self.render_seconds) if self.refresh > 0 else 0.0

    def _run(self) -> None:
        idle = max(IDLE_AFTER_S, 4 * self.refresh)
        # one render begun every `every` seconds (not `every` after the previous one ended)
        while not self._stop.wait(max(0.0, self._rendered_at + self.every - time.monotonic())):
            with self._lock:
                if time.monotonic() - self._scraped_at > idle:
                    return
            with self._rendering:
                self._render()

    def stop(self) -> None:
        self._stop.set()


class RenderCollector(Collector):
    """What serving /metrics costs, for whoever sizes a collector."""

    def __init__(self, exposition: Exposition):
        self.exposition = exposition

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "gputally_metrics_render_seconds",
            "How long the latest render of /metrics took (it is served from that render).",
            value=self.exposition.render_seconds,
        )
        yield GaugeMetricFamily(
            "gputally_metrics_refresh_seconds",
            "How often /metrics is rendered while scraped (0: at every scrape): "
            "--metrics-refresh, or 4 renders' time when that is longer.",
            value=self.exposition.every,
        )


def make_app(
    registry: CollectorRegistry, ready: Callable[[], str], refresh: float = 0.0
) -> WSGIApp:
    """/metrics, /healthz and /readyz. `ready` says why the collector is not ready ("" when
    it is): /readyz answers 503 with that reason, for a load balancer and a person alike.
    /metrics is served from a render at most `refresh` seconds old (Exposition); a request
    that filters series (name[]=...) is rendered for itself."""
    metrics_app = make_wsgi_app(registry)
    exposition = Exposition(registry, refresh)
    registry.register(RenderCollector(exposition))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            why = ready()
            start_response(
                "503 Service Unavailable" if why else "200 OK", [("Content-Type", "text/plain")]
            )
            return [f"not ready: {why}\n".encode() if why else b"ready\n"]
        if path == "/metrics":
            if environ.get("QUERY_STRING"):
                body: Iterable[bytes] = metrics_app(environ, start_response)
                return body
            zipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
            data = exposition.get(zipped)
            headers = [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))]
            if zipped:
                headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", headers)
            return [data]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html")])
            return [
                b'<html><body><h1>gputally collector</h1><a href="/metrics">/metrics</a> '
                b'<a href="/healthz">/healthz</a> <a href="/readyz">/readyz</a></body></html>\n'
            ]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app
