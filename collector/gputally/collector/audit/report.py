"""`gputally audit report`: a verified ledger turned into a report a person can read.

Writes, into one directory: `report.json` (the figures, bounds, coverage, verdict, energy, and
the daily series), CSV tables (`daily.csv`, `nodes.csv`, `models.csv`, `tenants.csv`,
`jobs.csv`, `gpus.csv`) and `report.html`, one
self-contained page whose plots are inline SVG, so it opens anywhere, offline, unchanged.
Every number comes from the ledger's summaries through figures.py; nothing from a live system.
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .figures import MEASURES, Rollup, as_dict, bounds, simulated_lines
from .verify import Verification


def build(
    rollup: Rollup,
    measure: str,
    claim: float | None,
    verification: Verification,
    receipt_verified_at: str = "",
) -> dict[str, Any]:
    """The report's content, from a rollup filled while the ledger was verified."""
    total, days = rollup.period(), rollup.days()
    answer = as_dict(total, measure, claim, top=10_000)
    series = []
    heat: dict[str, dict[str, float]] = {}
    for day, figures in days:
        b = bounds(figures.total.sums, figures.capacity)[measure]
        clean = bounds(figures.total.sums, figures.capacity, without_padding=True)[measure]
        series.append(
            {
                "date": day,
                "figure": b.figure,
                "lower": b.lower,
                "upper": b.upper,
                "without_padding": clean.figure,
                "coverage": figures.coverage(),
                "energy_kwh": figures.total.sums.values["energy_joules"] / 3.6e6,
                "padding_gpu_hours": figures.total.sums.flagged["seconds"] / 3600.0,
            }
        )
        for node, group in figures.nodes.items():
            heat.setdefault(node, {})[day] = figures.group_bounds(group)[measure].figure
    per_gpu = []
    for key, group in sorted(total.gpus.items()):
        figure = bounds(group.sums, total.seconds)[measure].figure
        per_gpu.append({"uuid": key, "model": total.gpu_model.get(key, ""), measure: figure})
    answer.update(
        {
            "daily": series,
            "node_day": heat,
            "per_gpu": per_gpu,
            "verification": {
                "entries": verification.entries,
                "checkpoints": verification.checkpoints,
                "nodes": len(verification.nodes),
                "verified": verification.ok,
                # summaries a collector should have refused (overlaps, duplicate identities,
                # impossible values): named here, and not counted in any figure above
                "findings": verification.findings(),
                # Whose Ed25519 checks these are: this run's, or a receipt's for the first
                # `signatures_by_receipt` entries (the same bytes, under the same keys).
                "signatures_by_receipt": verification.trusted,
                "receipt_verified_at": receipt_verified_at,
            },
        }
    )
    return answer


# -- SVG ------------------------------------------------------------------------------------

W, H, PAD = 720, 240, 44


def _x(i: int, n: int) -> float:
    return PAD + (W - 2 * PAD) * (i / max(n - 1, 1))


def _y(v: float, top: float = 1.0) -> float:
    return H - PAD + (2 * PAD - H) * (v / top if top > 0 else 0.0)


def _frame(
    title: str, body: str, labels: Sequence[str], top: float = 1.0, percent: bool = True
) -> str:
    ticks = "".join(
        f'<line x1="{PAD}" x2="{W - PAD}" y1="{_y(f * top, top):.1f}" y2="{_y(f * top, top):.1f}" class="grid"/>'
        f'<text x="{PAD - 6}" y="{_y(f * top, top) + 4:.1f}" text-anchor="end">'
        f"{(f'{f * top:.0%}' if percent else f'{f * top:.3g}')}</text>"
        for f in (0, 0.25, 0.5, 0.75, 1.0)
    )
    n = len(labels)
    step = max(1, n // 8)
    xlabels = "".join(
        f'<text x="{_x(i, n):.1f}" y="{H - PAD + 16}" text-anchor="middle">{html.escape(labels[i])}</text>'
        for i in range(0, n, step)
    )
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">{ticks}{xlabels}{body}</svg></figure>'
    )


def line_chart(
    title: str,
    labels: Sequence[str],
    line: Sequence[float],
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    hline: float | None = None,
) -> str:
    n = len(line)
    body = ""
    if band is not None and n:
        upper = " ".join(f"{_x(i, n):.1f},{_y(v):.1f}" for i, v in enumerate(band[1]))
        lower = " ".join(
            f"{_x(i, n):.1f},{_y(v):.1f}" for i, v in reversed(list(enumerate(band[0])))
        )
        body += f'<polygon points="{upper} {lower}" class="band"/>'
    if n:
        body += (
            '<polyline class="line" points="'
            + " ".join(f"{_x(i, n):.1f},{_y(v):.1f}" for i, v in enumerate(line))
            + '"/>'
        )
    if hline is not None:
        body += f'<line x1="{PAD}" x2="{W - PAD}" y1="{_y(hline):.1f}" y2="{_y(hline):.1f}" class="claim"/>'
        body += f'<text x="{W - PAD}" y="{_y(hline) - 4:.1f}" text-anchor="end" class="claimtext">claim {hline:.0%}</text>'
    return _frame(title, body, labels)


def bar_chart(
    title: str, labels: Sequence[str], values: Sequence[float], percent: bool = False
) -> str:
    top = max(values, default=0.0) or 1.0
    n = len(values)
    width = max((W - 2 * PAD) / max(n, 1) - 1, 1)
    body = "".join(
        f'<rect x="{PAD + i * (W - 2 * PAD) / max(n, 1):.1f}" y="{_y(v, top):.1f}" width="{width:.1f}" '
        f'height="{H - PAD - _y(v, top):.1f}" class="bar"><title>{html.escape(labels[i])}: {v:.4g}</title></rect>'
        for i, v in enumerate(values)
    )
    return _frame(title, body, labels, top, percent)


def heatmap(title: str, rows: dict[str, dict[str, float]], days: Sequence[str]) -> str:
    names = sorted(rows)[:60]
    cell_w = (W - 2 * PAD) / max(len(days), 1)
    height = max(len(names), 1) * 12 + 40
    cells = []
    for r, name in enumerate(names):
        cells.append(
            f'<text x="{PAD - 4}" y="{30 + r * 12 + 9}" text-anchor="end" class="small">{html.escape(name)}</text>'
        )
        for c, day in enumerate(days):
            value = rows[name].get(day)
            shade = (
                "#eee"
                if value is None
                else f"hsl(210, 70%, {95 - 60 * min(max(value, 0), 1):.0f}%)"
            )
            label = "no data" if value is None else f"{value:.1%}"
            cells.append(
                f'<rect x="{PAD + c * cell_w:.1f}" y="{30 + r * 12}" width="{max(cell_w - 0.5, 0.5):.1f}" height="11" '
                f'fill="{shade}"><title>{html.escape(name)} {day}: {label}</title></rect>'
            )
    more = f" (first 60 of {len(rows)} nodes)" if len(rows) > 60 else ""
    return (
        f"<figure><figcaption>{html.escape(title + more)}</figcaption>"
        f'<svg viewBox="0 0 {W} {height}" role="img" aria-label="{html.escape(title)}">{"".join(cells)}</svg></figure>'
    )


def histogram(title: str, values: Sequence[float], bins: int = 20) -> str:
    counts = [0] * bins
    for v in values:
        counts[min(int(max(v, 0.0) * bins), bins - 1)] += 1
    labels = [f"{i / bins:.0%}-{(i + 1) / bins:.0%}" for i in range(bins)]
    return bar_chart(title, labels, [float(c) for c in counts])


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:800px;color:#222}
h1{font-size:1.5em}table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}.verdict{font-size:1.3em;font-weight:600}
.simulated{font-size:1.3em;font-weight:600;color:#b00;border:2px solid #b00;padding:.4em .6em}
.supported{color:#176d2f}.refuted{color:#a11}.undetermined{color:#8a6100}
.padding-decides{color:#a11}.verdict-figures{font-size:1.3em}
svg{width:100%;height:auto;font-size:10px}.grid{stroke:#ddd}.line{fill:none;stroke:#1f5fbf;stroke-width:1.5}
.band{fill:#1f5fbf;opacity:.15}.claim{stroke:#a11;stroke-dasharray:4 3}.claimtext{fill:#a11}
.bar{fill:#1f5fbf}.small{font-size:8px}figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:.3em}
"""


# The breakdown tables of the page (all rows are in the CSV files), and how many rows each.
_TABLES = (
    ("by_model", "Per GPU model", "over the model's GPUs seen"),
    ("by_tenant", "Per tenant", "over the GPU-hours the tenant held"),
    ("by_job", "Per job", "over the GPU-hours the job held"),
)
_TABLE_ROWS = 20


def breakdown_table(rows: Sequence[dict[str, Any]], title: str, over: str) -> str:
    """One breakdown, largest first by GPU-hours: the figure of every measure."""
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(str(row['name']))}</td><td>{row['gpu_hours']:,.1f}</td>"
        + "".join(f"<td>{row[m]:.2%}</td>" for m in MEASURES)
        + f"<td>{row['energy_kwh']:,.1f}</td></tr>"
        for row in rows[:_TABLE_ROWS]
    )
    more = (
        f"<p><small>{len(rows) - _TABLE_ROWS} more in the CSV file.</small></p>"
        if len(rows) > _TABLE_ROWS
        else ""
    )
    head = "".join(f"<th>{m}</th>" for m in MEASURES)
    return (
        f"<h2>{title}</h2><p><small>Figures {over}; a MIG GPU shared by several tenants is "
        f"charged by its compute slices.</small></p><table><tr><th>name</th><th>GPU-hours</th>"
        f"{head}<th>kWh</th></tr>{body}</table>{more}"
    )


def padding_headline(r: dict[str, Any]) -> str:
    """The headline of a verdict that flagged padding decides: that it does, first and never
    in a pass's colour, then the figure without flagged padding as large as the one with it."""
    clean = r["without_padding"]

    def figure(b: dict[str, Any], what: str) -> str:
        return f"<strong>{b['figure']:.2%}</strong> [{b['lower']:.2%}, {b['upper']:.2%}] {what}"

    return (
        f'<p class="verdict padding-decides">{html.escape(r["headline_verdict"].upper())} '
        f"&mdash; claim: {r['measure']} &ge; {r['claim']:.1%}</p>"
        f'<p class="verdict-figures">{r["measure"]} {figure(clean, "without flagged padding")}, '
        f"{figure(r, 'with it')}; {r['padding_gpu_hours']:,.1f} GPU-hours flagged as padding.</p>"
    )


def render_html(r: dict[str, Any]) -> str:
    m = r["measure"]
    days = [d["date"] for d in r["daily"]]
    short = [day[5:] for day in days]  # MM-DD on the axes
    verdict = r["verdict"]
    rows = "".join(
        f"<tr><td>{name}</td><td>{b['figure']:.2%}</td><td>{b['lower']:.2%}</td><td>{b['upper']:.2%}</td>"
        f"<td>{r['measures_without_padding'][name]['figure']:.2%}</td></tr>"
        for name, b in r["measures"].items()
    )
    claim = (
        f'<p class="verdict {verdict}">Claim: {m} &ge; {r["claim"]:.1%} &mdash; {verdict.upper()}'
        f" (without flagged padding: {r['without_padding']['verdict']})</p>"
        if r["claim"] is not None
        else ""
    )
    if r["claim"] is not None and r["padding_decides"]:
        claim = padding_headline(r)
    v = r["verification"]
    by_receipt = (
        f" The signatures of the first {v['signatures_by_receipt']:,} summaries were checked by the"
        f" full verification of {html.escape(v['receipt_verified_at'])}, whose receipt holds for"
        " these very bytes and keys; this run recomputed every hash, chain and checkpoint."
        if v["signatures_by_receipt"]
        else ""
    )
    plots = [
        line_chart(
            f"Daily {m}: figure, with the band between its lower and upper bounds",
            short,
            [d["figure"] for d in r["daily"]],
            ([d["lower"] for d in r["daily"]], [d["upper"] for d in r["daily"]]),
            r["claim"],
        ),
        line_chart(
            "Coverage: observed share of the inventory's GPU-seconds, per day",
            short,
            [d["coverage"] for d in r["daily"]],
        ),
        heatmap(f"Node x day: {m}", r["node_day"], days),
        histogram(
            f"Distribution of per-GPU {m} over the period ({len(r['per_gpu'])} GPUs)",
            [g[m] for g in r["per_gpu"]],
        ),
        bar_chart(
            "Padding: GPU-hours flagged per day",
            short,
            [d["padding_gpu_hours"] for d in r["daily"]],
        ),
        bar_chart("Energy per day (kWh)", short, [d["energy_kwh"] for d in r["daily"]]),
    ]
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in r["warnings"])
    # simulated figures say so before anything else: they are not measurements
    simulated = "".join(
        f'<p class="simulated">{html.escape(line)}</p>' for line in simulated_lines(r)[:1]
    )
    findings = "".join(
        f"<li><b>{f['count']:,} {html.escape(kind)}</b>: "
        f"{html.escape(f['examples'][0]['message']) if f['examples'] else ''}</li>"
        for kind, f in v.get("findings", {}).items()
    )
    findings_html = (
        '<div class="findings"><p><b>Findings</b>: the ledger holds summaries a collector should '
        "have refused. None of them is counted in any figure of this report (each GPU-second "
        "once, the first recorded).</p><ul>" + findings + "</ul></div>"
        if findings
        else ""
    )
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>gputally audit report: {html.escape(r["from"])} to {html.escape(r["to"])}</title><style>{CSS}</style></head><body>
{simulated}<h1>GPU utilization audit report</h1>
<p>Period {html.escape(r["from"])} to {html.escape(r["to"])} ({r["seconds"] / 86400:.1f} days).
Inventory: {r["expected_gpus"]} GPUs declared, {r["seen_gpus"]} seen. Coverage {r["coverage"]:.1%}.</p>
<p>Ledger verified: {v["entries"]:,} signed summaries from {v["nodes"]} nodes, every signature, every node's chain
and {v["checkpoints"]} signed checkpoints hold. Every figure below is recomputed from those summaries.{by_receipt}</p>
{findings_html}
{claim}
<table><tr><th>measure</th><th>figure</th><th>lower</th><th>upper</th><th>without padding</th></tr>{rows}</table>
<p>Energy {r["energy_kwh"]:,.1f} kWh. Padding flagged: {r["padding_gpu_hours"]:,.1f} GPU-hours.</p>
{"<ul>" + warnings + "</ul>" if warnings else ""}
{"".join(plots)}
{"".join(breakdown_table(r[key], title, over) for key, title, over in _TABLES)}
<p><small>Definitions: docs/utilization.md. The lower bound counts unobserved or unmeasured time as 0 and never counts
estimates; the upper bound counts it at its maximum. A claim is supported at or below the lower bound, refuted above the
upper bound, undetermined between.</small></p>
</body></html>
"""


def write(report: dict[str, Any], out: Path, measure: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    breakdowns = {"nodes.csv": "by_node", "models.csv": "by_model", "tenants.csv": "by_tenant"}
    breakdowns["jobs.csv"] = "by_job"
    paths = [
        out / "report.json",
        out / "daily.csv",
        *(out / name for name in breakdowns),
        out / "gpus.csv",
        out / "report.html",
    ]
    summary = {k: v for k, v in report.items() if k not in ("node_day", "per_gpu")}
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(report["daily"][0]) if report["daily"] else ["date"]
        )
        writer.writeheader()
        writer.writerows(report["daily"])
    for name, key in breakdowns.items():
        with (out / name).open("w", newline="") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=["name", "gpus", "gpu_hours", "energy_kwh", *MEASURES]
            )
            writer.writeheader()
            writer.writerows(report[key])
    with (out / "gpus.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["uuid", "model", measure])
        writer.writeheader()
        writer.writerows(report["per_gpu"])
    paths[-1].write_text(render_html(report))
    return paths
