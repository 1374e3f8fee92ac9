"""Prometheus exposition of the cluster state, plus health endpoints.

A custom collector renders the state at scrape time (no per-update bookkeeping in
prometheus-client objects), following Prometheus conventions: base units, ratios in 0-1
named ``_ratio``, monotonic counters named ``_total``.

To average any measure exactly over a range, divide the counter by the inventory:

    increase(gputally_cluster_gpu_seconds_total{measure="busy"}[1h])
      / on() (gputally_cluster_gpus{state="expected"} * 3600)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .state import MAX_TENANTS, MEASURES, ClusterState, ClusterView

# The agent's padding rule names (docs/utilization.md §7), listed so every series exists at 0.
PADDING_RULES = ("busy_without_work", "flatline_low_memory", "burn_tool")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ClusterCollector(Collector):
    def __init__(self, state: ClusterState):
        self.state = state

    def collect(self) -> Iterator[Any]:
        view = self.state.view()
        yield InfoMetricFamily(
            "gputally_collector_build",
            "Collector build information.",
            value={"version": __version__},
        )

        gpus = GaugeMetricFamily(
            "gputally_cluster_gpus",
            "GPUs by state: expected (declared inventory, else GPUs seen), seen (in any agent's hello), "
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
        yield from self._bounds_and_breakdowns(view)

        up = GaugeMetricFamily(
            "gputally_node_up",
            "1 when the node's agent is connected and its telemetry is fresh.",
            labels=["node"],
        )
        node_gpus = GaugeMetricFamily(
            "gputally_node_gpus", "GPUs of the node by state.", labels=["node", "state"]
        )
        node_ratio = GaugeMetricFamily(
            "gputally_node_utilization_ratio",
            "Node utilization over the live window, over the node's GPUs.",
            labels=["node", "measure"],
        )
        node_coverage = GaugeMetricFamily(
            "gputally_node_coverage_ratio", "Node coverage over the live window.", labels=["node"]
        )
        node_seconds = CounterMetricFamily(
            "gputally_node_gpu_seconds", "Node GPU-seconds by measure.", labels=["node", "measure"]
        )
        node_energy = CounterMetricFamily(
            "gputally_node_energy_joules", "Energy drawn by the node's GPUs.", labels=["node"]
        )
        node_power = GaugeMetricFamily(
            "gputally_node_power_watts",
            "Latest power of the node's reporting GPUs.",
            labels=["node"],
        )
        node_last = GaugeMetricFamily(
            "gputally_node_last_report_timestamp_seconds",
            "When the node's latest report arrived (unix time).",
            labels=["node"],
        )
        node_reports = CounterMetricFamily(
            "gputally_node_reports", "Reports received by outcome.", labels=["node", "result"]
        )
        node_missed = CounterMetricFamily(
            "gputally_node_missed_reports",
            "Reports never received (gaps in sequence numbers).",
            labels=["node"],
        )
        node_summaries = CounterMetricFamily(
            "gputally_node_summaries",
            "Signed summaries received: recorded in the ledger, or resent (already recorded).",
            labels=["node", "result"],
        )
        node_breaks = CounterMetricFamily(
            "gputally_node_chain_breaks",
            "Recorded summaries that did not continue the node's chain: summaries lost on the "
            "way (a gap auditors will see) or an agent that started a new chain.",
            labels=["node"],
        )
        xid = CounterMetricFamily(
            "gputally_node_xid_events",
            "XID errors the node's GPUs reported (e.g. 79: fell off the bus).",
            labels=["node", "xid"],
        )
        for node in view.nodes:
            for code, count in sorted(node.xids.items()):
                xid.add_metric([node.name, str(code)], count)
            up.add_metric([node.name], int(node.up))
            node_gpus.add_metric([node.name, "total"], node.gpus)
            node_gpus.add_metric([node.name, "reporting"], node.reporting)
            for measure in MEASURES:
                node_ratio.add_metric([node.name, measure], node.window.ratios[measure])
            node_coverage.add_metric([node.name], node.window.coverage)
            for measure, gpu_seconds in node.counters.seconds.items():
                node_seconds.add_metric([node.name, measure], gpu_seconds)
            node_energy.add_metric([node.name], node.counters.energy_joules)
            node_power.add_metric([node.name], node.power_watts)
            node_last.add_metric([node.name], node.last_received)
            for result, count in node.reports.items():
                node_reports.add_metric([node.name, result], count)
            node_missed.add_metric([node.name], node.missed_reports)
            node_summaries.add_metric([node.name, "recorded"], node.summaries)
            node_summaries.add_metric([node.name, "resent"], node.summaries_resent)
            node_breaks.add_metric([node.name], node.chain_breaks)
        yield from (
            up,
            node_gpus,
            node_ratio,
            node_coverage,
            node_seconds,
            node_energy,
            node_power,
            node_last,
            node_reports,
            node_missed,
            node_summaries,
            node_breaks,
        )
        yield xid
        yield GaugeMetricFamily(
            "gputally_collector_sessions", "Agent streams currently open.", value=view.sessions
        )

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


def make_registry(state: ClusterState) -> CollectorRegistry:
    """A fresh registry per collector (never the global one): tests and embedders stay isolated."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(state))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def make_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> WSGIApp:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok = ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ready\n" if ok else b"not ready\n"]
        if path == "/metrics":
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html")])
            return [
                b'<html><body><h1>gputally collector</h1><a href="/metrics">/metrics</a> '
                b'<a href="/healthz">/healthz</a> <a href="/readyz">/readyz</a></body></html>\n'
            ]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


def split_hostport(address: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def serve_http(app: WSGIApp, address: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve the app on a daemon thread; returns the server (its server_port is the bound port)."""
    host, port = split_hostport(address)
    server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
    server = make_server(host, port, app, server_class=server_class, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="gputally-http", daemon=True)
    thread.start()
    return server, thread
