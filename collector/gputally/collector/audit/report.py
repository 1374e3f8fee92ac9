"""`gputally audit report`: a verified ledger turned into an evidence package a person can sign.

Writes, into one directory:

* `report.html`: one self-contained page (inline CSS and SVG, no script, nothing fetched),
  whose first screen holds the verdicts in plain words, the limitations and the evidence to
  cite; then the plots, the weeks and phases, the breakdowns, the evidence in full and the
  methodology;
* `report.json`: everything the page shows, and more: every measure with its bounds and
  verdicts, per GPU, node x day, weeks, phases, the evidence, warnings and limitations, the
  methodology;
* CSV tables: `daily.csv`, `weeks.csv`, `phases.csv`, `nodes.csv`, `models.csv`,
  `tenants.csv`, `jobs.csv`, `gpus.csv`, `node_days.csv`;
* `MANIFEST.sha256`: the SHA-256 of every other file, in `sha256sum -c` format.

Every number comes from the ledger's summaries through figures.py; nothing from a live system.
What each section means: docs/report.md.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gputally.v1 import __version__

from .figures import (
    DAY,
    MEASURES,
    WORK_MEASURE,
    PeriodFigures,
    Rollup,
    as_dict,
    bounds,
    simulated_lines,
    verdict_caveat,
    verdicts,
)
from .verify import CAVEATS, UNCOUNTED, Verification

# -- content ---------------------------------------------------------------------------------


def build(
    rollup: Rollup,
    measure: str,
    claim: float | None,
    verification: Verification,
    receipt_verified_at: str = "",
    *,
    ledger: Path | None = None,
    keys: Path | None = None,
    command: Sequence[str] = (),
) -> dict[str, Any]:
    """The report's content, from a rollup filled while the ledger was verified: the figures,
    and the evidence that lets someone else check them (the ledger file and key directory
    they came from, and the command that made them)."""
    total, days = rollup.period(), rollup.days()
    answer = as_dict(total, measure, claim, top=10_000)
    daily = []
    node_days = []
    for day, figures in days:
        row = _row(figures, claim)
        b = row["measures"][measure]
        daily.append(
            {
                "date": day,
                "figure": b["figure"],
                "lower": b["lower"],
                "upper": b["upper"],
                "without_padding": b["without_padding"]["figure"],
                **_flat(row),
            }
        )
        for node, group in sorted(figures.nodes.items()):
            nb = figures.group_bounds(group)
            capacity = len(group.gpus) * figures.seconds
            values = group.sums.values
            node_days.append(
                {
                    "date": day,
                    "node": node,
                    "gpus": len(group.gpus),
                    "coverage": values["present_seconds"] / capacity if capacity > 0 else 0.0,
                    **{
                        f"{m}{suffix}": getattr(nb[m], part)
                        for m in MEASURES
                        for suffix, part in (
                            ("", "figure"),
                            ("_lower", "lower"),
                            ("_upper", "upper"),
                        )
                    },
                    "energy_kwh": values["energy_joules"] / 3.6e6,
                    "padding_gpu_hours": group.sums.flagged["seconds"] / 3600.0,
                }
            )
    weeks = [
        {
            "week": label,
            "partial": partial,
            "verdict_caveat": verdict_caveat(figures, measure),
            **_flat(_row(figures, claim)),
        }
        for label, figures, partial in rollup.weeks()
    ]
    phases = [
        {"name": name, **as_dict(phase.period(), measure, claim, top=10_000)}
        for name, phase in rollup.phases.items()
    ]
    answer.update(
        {
            "daily": daily,
            "weeks": weeks,
            "phases": phases,
            "node_days": node_days,
            "per_gpu": _per_gpu(total),
            "verification": {
                "origin": verification.origin,
                "entries": verification.entries,
                "root": verification.root.hex(),
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
            "evidence": evidence(verification, ledger, keys, command),
        }
    )
    # Findings the figures still count, which a verdict must not pass over: GPUs the auditor
    # did not enrol, keys enrolled late, summaries recorded before their windows ended.
    found = verification.by_kind()
    caveats = [
        f"the figures count {len(found[kind]):,} {CAVEATS[kind]}"
        for kind in CAVEATS
        if kind in found
    ]
    early = int(verification.recording.get("early", 0) or 0)  # type: ignore[call-overload]
    if early:
        caveats.append(
            f"{early:,} summaries the collector's own times say were recorded before their "
            "windows ended, which no honest record can show"
        )
        answer["warnings"].append(
            f"{early:,} summaries were recorded before their windows ended, by the collector's "
            "own checkpoint times: those times (or its clock) are wrong, and they are the only "
            "record of when the history was written"
        )
    answer["findings_caveats"] = caveats
    if caveats:
        text = "; ".join(caveats)
        answer["verdict_caveat"] = (
            f"{answer['verdict_caveat']}; {text}" if answer["verdict_caveat"] else text
        )
        for phase in phases:
            phase["verdict_caveat"] = (
                f"{phase['verdict_caveat']}; {text}" if phase["verdict_caveat"] else text
            )
    recording = answer["evidence"]["recording"]
    if recording and recording.get("late"):
        answer["warnings"].append(
            f"{recording['late']:,} of the {recording.get('summaries', 0):,} summaries were recorded "
            f"more than {_duration(recording.get('late_after_s', 0))} after their window ended "
            f"({_by_whom(recording)}): history written after the fact, not a live record"
        )
    answer["limitations"] = limitations(answer)
    answer["methodology"] = list(METHODOLOGY)
    return answer


def _row(figures: PeriodFigures, claim: float | None) -> dict[str, Any]:
    """A span's figures (a day, a week): every measure's bounds and verdict, coverage, energy."""
    return {
        "from": _iso(figures.start),
        "to": _iso(figures.end),
        "days": figures.seconds / DAY,
        "gpus": len(figures.total.gpus),
        "coverage": figures.coverage(),
        "measures": verdicts(figures, claim),
        "energy_kwh": figures.total.sums.values["energy_joules"] / 3.6e6,
        "padding_gpu_hours": figures.total.sums.flagged["seconds"] / 3600.0,
    }


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A _row as one flat CSV-ready row: <measure>, _lower, _upper, _without_padding, _verdict."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key != "measures":
            out[key] = value
            continue
        for m, b in value.items():  # in their place: the columns are _SPAN_FIELDS
            out[m] = b["figure"]
            out[f"{m}_lower"] = b["lower"]
            out[f"{m}_upper"] = b["upper"]
            out[f"{m}_without_padding"] = b["without_padding"]["figure"]
            out[f"{m}_verdict"] = b["headline_verdict"]
    return out


def _per_gpu(total: PeriodFigures) -> list[dict[str, Any]]:
    """One row per GPU: where it was, what it is, how much of the period it was observed, and
    every measure over the period (a GPU that reported for a day of a week is at most 1/7)."""
    rows = []
    for key, group in sorted(total.gpus.items()):
        b = bounds(group.sums, total.seconds)
        uuid, serial = total.gpu_identity.get(key, (key, ""))
        values = group.sums.values
        rows.append(
            {
                "node": " ".join(sorted(total.gpu_nodes.get(key, ()))),
                "uuid": uuid,
                "serial": serial,
                "model": total.gpu_model.get(key, ""),
                "gpu_hours": values["present_seconds"] / 3600.0,
                "coverage": values["present_seconds"] / total.seconds if total.seconds else 0.0,
                **{
                    f"{m}{suffix}": getattr(b[m], part)
                    for m in MEASURES
                    for suffix, part in (("", "figure"), ("_lower", "lower"), ("_upper", "upper"))
                },
                "energy_kwh": values["energy_joules"] / 3.6e6,
                "padding_gpu_hours": group.sums.flagged["seconds"] / 3600.0,
            }
        )
    return rows


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_phases(
    texts: Sequence[str], start: float, end: float, now: float
) -> list[tuple[str, float, float]]:
    """(name, start, end) of each `NAME=FROM..TO` (times as gputally.cli.options.parse_time
    reads them); ValueError, with one line that says what is wrong, for a phase that is not
    written so, ends before it starts, leaves the period [start, end), or reuses a name."""
    from gputally.cli.options import parse_time

    out: list[tuple[str, float, float]] = []
    for text in texts:
        name, equals, span = text.partition("=")
        t0_text, dots, t1_text = span.partition("..")
        name = name.strip()
        if not equals or not dots or not name or not t0_text.strip() or not t1_text.strip():
            raise ValueError(
                f"{text!r}: write NAME=FROM..TO, e.g. acceptance=2026-03-01..2026-06-01"
            )
        if not name.isprintable() or len(name) > 64:
            raise ValueError(f"{text!r}: a phase name is printable and at most 64 characters")
        try:
            t0, t1 = parse_time(t0_text, now), parse_time(t1_text, now)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if t1 <= t0:
            raise ValueError(f"{name}: it must end after it starts")
        if t0 < start or t1 > end:
            raise ValueError(
                f"{name}: {_iso(t0)}..{_iso(t1)} is not within the period "
                f"{_iso(start)}..{_iso(end)} (--from/--to)"
            )
        if any(name == other for other, _, _ in out):
            raise ValueError(f"{name}: two phases have this name")
        out.append((name, t0, t1))
    return out


def summary_lines(r: dict[str, Any]) -> list[str]:
    """What `audit report` prints after its verdict line: the real-work measure's verdict
    beside it, why a verdict is not a plain one, each phase, each warning."""
    claim, work = r["claim"], WORK_MEASURE

    def figures(v: dict[str, Any], name: str) -> str:
        text = f"{name} {v['figure']:.2%} [{v['lower']:.2%}, {v['upper']:.2%}]"
        if claim is not None:
            text += f", claim {claim:.2%}: {v['headline_verdict']}"
        return text

    lines = []
    if r["measure"] != work:
        lines.append(figures(r["verdicts"][work], work) + " (the real-work measure)")
    if r["verdict_caveat"]:
        lines.append(f"NOT A PLAIN VERDICT: {r['verdict_caveat']}")
    for phase in r["phases"]:
        shown = [r["measure"]] + ([work] if r["measure"] != work else [])
        lines.append(
            f"phase {phase['name']} {phase['from']}..{phase['to']}: "
            + "; ".join(figures(phase["verdicts"][m], m) for m in shown)
        )
    lines += [f"warning: {w}" for w in r["warnings"]]
    return lines


# -- evidence --------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file(path: Path) -> dict[str, Any]:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _checkpoint(note: str) -> dict[str, Any] | None:
    """Size and root of a C2SP checkpoint note (origin, size, base64 root, then signatures);
    the note was verified already, this only reads it."""
    lines = note.split("\n")
    if len(lines) < 3 or not lines[1].isdigit():
        return None
    try:
        root = base64.b64decode(lines[2], validate=True)
    except ValueError:
        root = b""
    return {
        "origin": lines[0],
        "size": int(lines[1]),
        "root": lines[2],
        "root_hex": root.hex(),
        "note": note,
    }


def evidence(
    verification: Verification,
    ledger: Path | None,
    keys: Path | None,
    command: Sequence[str] = (),
) -> dict[str, Any]:
    """What to cite, so that anyone can check the report: the tool and command, the ledger
    file's SHA-256, the newest signed checkpoint in full, the keys' fingerprints, witness
    cosignatures and when the summaries were recorded."""
    from gputally.v1.signing import KeyFileError, key_fingerprint

    from ..record.ledger import read_collector_key

    out: dict[str, Any] = {
        "tool": f"gputally {__version__}",
        "version": __version__,
        "command": shlex.join(["gputally", *command[1:]]) if command else "",
        "ledger": None,
        # SQLite in WAL mode keeps recent writes in <ledger>-wal until they are checkpointed
        # into the file: the file's hash is of the file alone, the -wal's is given apart
        "ledger_wal": None,
        "origin": verification.origin,
        "entries": verification.entries,
        "root": base64.b64encode(verification.root).decode(),
        "root_hex": verification.root.hex(),
        "checkpoint": _checkpoint(verification.checkpoint_note),
        "checkpoints": verification.checkpoints,
        "collector_key": None,
        "node_keys": {node: list(fps) for node, fps in sorted(verification.signers.items())},
        "keys_digest": verification.keys_digest,
        "cosignatures": [dict(c) for c in verification.cosignatures],
        # entries covered by a checkpoint enough of the given witnesses cosigned
        "witnessed": verification.witnessed,
        "recording": dict(verification.recording),
        # cosignatures the ledger keeps (checked or not), the witness keys given, and the
        # checkpoint the ledger was verified against (--against), if any
        "cosignature_rows": verification.cosignature_rows,
        "witness_keys": list(verification.witness_keys),
        "against": dict(verification.against) if verification.against else None,
    }
    if ledger is not None:
        out["ledger"] = _file(ledger)
        wal = ledger.with_name(ledger.name + "-wal")
        if wal.is_file():
            out["ledger_wal"] = _file(wal)
    if keys is not None:
        try:
            name, raw = read_collector_key(keys)
            out["collector_key"] = {"name": name, "fingerprint": key_fingerprint(raw)}
        except KeyFileError:
            pass
    out["keys"] = len({fp for fps in verification.signers.values() for fp in fps}) + (
        1 if out["collector_key"] else 0
    )
    return out


# -- limitations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limitation:
    kind: str
    what: str  # a few plain words, in bold on the first screen
    why: str  # one or two plain sentences

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "what": self.what, "why": self.why}


def limitations(r: dict[str, Any]) -> list[dict[str, str]]:
    """What the figures cannot show, in the words of someone who has not read the manual, the
    most serious first."""
    out: list[Limitation] = []
    inv, ev, v = r["inventory"], r["evidence"], r["verification"]
    if r["simulated"]:
        out.append(
            Limitation(
                "simulated",
                "Simulated data.",
                f"{r['simulated']:,} of the {r['summaries']:,} records come from the simulator, "
                "not from GPUs: nothing here measures a real cluster.",
            )
        )
    if inv["understated"]:
        impossible = [f"{_name(m)} {x:.2%}" for m, x in inv["over_declared"].items() if x > 1.0]
        out.append(
            Limitation(
                "over_inventory",
                f"More GPUs than declared: {inv['seen']} reported, {inv['declared']} declared.",
                f"Every figure is over the {inv['seen']} seen, so no verdict is one about the "
                f"{inv['declared']} declared"
                + (
                    f"; over {inv['declared']} GPUs the record would give {', '.join(impossible)},"
                    " which no GPU can do"
                    if impossible
                    else ""
                )
                + ".",
            )
        )
    if inv["capped"]:
        out.append(
            Limitation(
                "capped",
                "Figures capped at 100%.",
                f"{', '.join(_name(m) for m in inv['capped'])}: the record holds more GPU-time "
                "than the inventory has; the inventory or the record is wrong.",
            )
        )
    if r["summaries"] and inv["never_seen"]:
        out.append(
            Limitation(
                "never_seen",
                f"{inv['never_seen']:,} declared GPUs never reported.",
                "They count as doing nothing in each figure, and as fully used at the top of "
                "its range.",
            )
        )
    coverage = r["coverage"]
    out.append(
        Limitation(
            "coverage",
            f"Observed: {coverage:.2%} of the GPU-time (coverage).",
            (
                "Time not observed (GPUs or nodes silent) counts as no work in the figure and as "
                "full work at the top of its range."
                if coverage < 0.9995
                else "Every GPU counted reported throughout the period."
            ),
        )
    )
    measured = r["measured"][WORK_MEASURE]
    if coverage > 0 and measured < coverage - 0.0005:
        out.append(
            Limitation(
                "work_unmeasured",
                f"Real work measured in {measured:.2%} of the time only.",
                "GPUs without the SM activity counter (models before Hopper) say only that a "
                "program ran; there the range of real work reaches up to the busy time.",
            )
        )
    if not ev["cosignatures"] and ev.get("cosignature_rows") and not ev.get("witness_keys"):
        out.append(
            Limitation(
                "witnesses",
                "Witnesses not checked.",
                f"The log keeps {ev['cosignature_rows']:,} witness cosignatures, but no witness "
                "key was given (--witness-key), so none was checked: until they are, only the "
                "centre vouches for the state of its log.",
            )
        )
    elif not ev["cosignatures"]:
        out.append(
            Limitation(
                "witnesses",
                "No witness cosigned the log.",
                "Only the centre signed the state of its log (its checkpoints): a centre that "
                "rolled the log back would be caught only by someone holding a later copy.",
            )
        )
    elif ev["witnessed"] < ev["entries"]:
        out.append(
            Limitation(
                "unwitnessed_tail",
                f"{ev['entries'] - ev['witnessed']:,} newest records not yet witnessed.",
                "No independent witness has cosigned a state of the log that holds them; they "
                "rest on the centre's signature alone.",
            )
        )
    checkpoint = ev["checkpoint"]
    signed = checkpoint["size"] if checkpoint else 0
    if ev["entries"] > signed:
        out.append(
            Limitation(
                "unsigned_tail",
                f"{ev['entries'] - signed:,} newest records not yet in a signed log state.",
                "They verify one by one, but no checkpoint of the collector covers them yet.",
            )
        )
    recording = ev["recording"]
    if recording and recording.get("summaries") and recording.get("source") != "witnessed":
        out.append(
            Limitation(
                "claimed_times",
                "When the records were made is the centre's word.",
                "No witness timestamped "
                + ("them" if recording.get("source") == "collector" else "some of them")
                + ": their recording times are the collector's own checkpoint times, which the "
                "centre can set as it likes.",
            )
        )
    if recording and recording.get("late"):
        out.append(
            Limitation(
                "late",
                f"{recording['late']:,} of {recording.get('summaries', 0):,} records arrived late.",
                f"Recorded more than {_duration(recording.get('late_after_s', 0))} after the "
                f"time they describe (longest {_duration(recording.get('max_delay_s', 0))}, "
                f"{_by_whom(recording)}): history written after the fact.",
            )
        )
    left_out = sum(f["count"] for kind, f in v["findings"].items() if kind in UNCOUNTED)
    if left_out:
        out.append(
            Limitation(
                "findings",
                f"{left_out:,} record{'' if left_out == 1 else 's'} left out.",
                "The log holds records a collector should have refused (overlapping or "
                "impossible); none counts in any figure.",
            )
        )
    others = {kind: f for kind, f in v["findings"].items() if kind not in UNCOUNTED}
    if others:
        out.append(
            Limitation(
                "other_findings",
                "Findings: "
                + ", ".join(f"{f['count']:,} {kind}" for kind, f in others.items())
                + ".",
                "The verification found these beside the figures (see Findings below); the "
                "figures count what they concern.",
            )
        )
    if r["padding_gpu_hours"] > 0.005:
        out.append(
            Limitation(
                "padding",
                f"{r['padding_gpu_hours']:,.1f} GPU-hours flagged as padding.",
                "Load that keeps a GPU looking busy without doing work; verdicts are given with "
                "and without it.",
            )
        )
    use = r["unattributed"]
    if use["busy_share"] > 0.01:
        out.append(
            Limitation(
                "unattributed",
                f"{use['busy_share']:.1%} of the busy time has no tenant or job.",
                "No scheduler record says who ran it: the per-tenant tables cannot bill it.",
            )
        )
    out.append(
        Limitation(
            "trust",
            "Signatures prove who reported, not that it is true.",
            "The centre runs the collector and holds its machines' keys: compare the energy "
            f"({r['energy_kwh']:,.{0 if r['energy_kwh'] >= 10 else 1}f} kWh) with the "
            "electricity meter.",
        )
    )
    return [item.as_dict() for item in out]


def _by_whom(recording: dict[str, Any]) -> str:
    """Whose word the recording times are (verify.py's recording source)."""
    return {
        "witnessed": "by the witnesses' cosignature times",
        "collector": "by the collector's own checkpoint times",
        "mixed": "by the witnesses' times, else the collector's",
    }.get(str(recording.get("source", "")), "by the times the log was signed")


def _duration(seconds: object) -> str:
    s = float(seconds) if isinstance(seconds, int | float) else 0.0
    if s >= 2 * 86400:
        return f"{s / 86400:.1f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} hours"
    if s >= 120:
        return f"{s / 60:.0f} minutes"
    return f"{s:.0f} s"


# -- methodology -----------------------------------------------------------------------------

METHODOLOGY = (
    "Every figure is recomputed by the auditor's own tool from the signed records in the "
    "ledger and the public keys, after every signature, every machine's chain of records and "
    "every signed state of the log (checkpoint) has been checked. Nothing comes from the "
    "centre's live systems or databases.",
    "Each GPU's agent integrates what the GPU reports second by second and signs a summary "
    "per window (minutes). For each measure, the figure is the GPU-seconds of that measure "
    "divided by the declared GPUs times the seconds of the period: a GPU that never reported "
    "counts as idle in the figure, the denominator is never reduced. When more GPUs report "
    "than were declared, the figures are over those seen, and the report says so.",
    "Measures. 'Busy' (NVML utilization.gpu, what nvidia-smi shows) is the share of time at "
    "least one program ran on the GPU, however little of the GPU it used: a one-thread loop "
    "reads 100%. 'Real work' (sm_active, NVML GPM SM activity) is the share of the GPU's "
    "compute units (SMs) at work; it is measured on Hopper and newer GPUs. 'Effective' is SM "
    "activity where measured, else an estimate from power draw, always labelled. 'Held' "
    "(allocated) is the share of time a program held the GPU.",
    "Which measure a contract should name: real work (sm_active). Busy tells whether "
    "something ran, not whether the GPU was used: on production clusters mean busy is often "
    "66-70% where SM activity is 38-42%. This report gives the verdict on both, side by side.",
    "Range. Time not observed counts as no work in the lower bound and as full work in the "
    "upper bound; where a measure was not measured, the same. Estimates never count towards "
    "the lower bound. A claim 'at least c' is supported (Yes) only when c is at or below the "
    "lower bound, refuted (No) when c is above the upper bound, and undetermined (Cannot "
    "tell) in between.",
    "Padding. Load whose purpose is to look busy (busy without SM activity, a flat 100% with "
    "almost no memory, known burn tools) is flagged, never silently removed: every verdict is "
    "also given without flagged time, and a claim that passes only with it is never shown as a "
    "pass.",
    "Periods. A summary window that lies partly in a period counts pro rata to the part "
    "inside; days, ISO weeks (Monday 00:00 UTC) and named phases are cut exactly at their "
    "bounds. Times are UTC on the agents' clocks.",
    "Evidence. The ledger is an append-only Merkle log (RFC 9162); its signed checkpoints "
    "name its size and root hash, so that any change to any record changes the root. "
    "MANIFEST.sha256 lists every file of this report with its SHA-256.",
)


# -- SVG -------------------------------------------------------------------------------------

W, H, PAD = 720, 250, 44
TOP = 30  # room above a time plot for the phase boundaries' names


def _pct(value: float, places: int = 0) -> str:
    return f"{value:.{places}%}"


def _claim_pct(claim: float) -> str:
    """A claim as people write it: 85%, 85.5%."""
    text = f"{claim * 100:.4f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _y(v: float, top: float = 1.0) -> float:
    return H - PAD + (TOP - H + PAD) * (v / top if top > 0 else 0.0)


def _yticks(top: float, percent: bool) -> str:
    out = []
    for f in (0, 0.25, 0.5, 0.75, 1.0):
        y = _y(f * top, top)
        label = f"{f * top:.0%}" if percent else f"{f * top:.3g}"
        out.append(
            f'<line x1="{PAD}" x2="{W - PAD}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
        )
    return "".join(out)


class TimeAxis:
    """x positions for times of a period: a boundary within a day lands within the day."""

    def __init__(self, start: float, end: float, left: float = PAD, right: float = W - PAD):
        self.start, self.end, self.left, self.right = start, end, left, right

    def x(self, t: float) -> float:
        span = self.end - self.start
        return self.left + (self.right - self.left) * ((t - self.start) / span if span else 0)

    def labels(self, spans: Sequence[tuple[str, float, float]], y: float) -> str:
        """A label under every few spans (days, weeks), at most about ten, each in the middle
        of its span; none under a span too narrow to hold it (a partial week of a day)."""
        step = max(1, math.ceil(len(spans) / 10))
        return "".join(
            f'<text x="{self.x((t0 + t1) / 2):.1f}" y="{y:.1f}" text-anchor="middle">'
            f"{html.escape(label)}</text>"
            for label, t0, t1 in spans[::step]
            if step > 1 or self.x(t1) - self.x(t0) >= 6 * len(label)
        )

    def marks(self, marks: Sequence[tuple[float, str]], top: float, bottom: float) -> str:
        """A vertical line at each phase boundary with its name above the plot."""
        out = []
        for i, (t, label) in enumerate(marks):
            x = self.x(t)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4:.1f}" y2="{bottom:.1f}" class="phase">'
                f"<title>{html.escape(label)}</title></line>"
                f'<text x="{x:.1f}" y="{top - 8 - 10 * (i % 2):.1f}" text-anchor="middle" '
                f'class="phasetext">{html.escape(label)}</text>'
            )
        return "".join(out)


def phase_marks(
    phases: Sequence[dict[str, Any]], start: float, end: float
) -> list[tuple[float, str]]:
    """(time, label) of every phase boundary inside the period: "acceptance ▸" where a phase
    starts, "◂ acceptance" where it ends, both at a time one ends and the next starts."""
    at: dict[float, list[str]] = {}
    for phase in phases:
        t0, t1 = _unix(phase["from"]), _unix(phase["to"])
        if start < t0 < end:
            at.setdefault(t0, []).append(f"{phase['name']} \u25b8")
        if start < t1 < end:
            at.setdefault(t1, []).insert(0, f"\u25c2 {phase['name']}")
    return [(t, " ".join(labels)) for t, labels in sorted(at.items())]


def _figure(title: str, svg: str, note: str = "") -> str:
    extra = f"<p class='note'>{note}</p>" if note else ""
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}{extra}</figure>"


def time_chart(
    title: str,
    axis: TimeAxis,
    spans: Sequence[tuple[str, float, float]],
    lines: Sequence[tuple[str, Sequence[float], str]] = (),
    *,
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    bars: Sequence[float] | None = None,
    bar_classes: Sequence[str] = (),
    claim: float | None = None,
    marks: Sequence[tuple[float, str]] = (),
    percent: bool = True,
) -> str:
    """A plot over time: lines through the middle of each span (a day, a week), or bars
    across them, the band of a figure's bounds, the claim, and every phase boundary."""
    top = (
        1.0
        if percent
        else (max([*(bars or ()), *(v for _, vs, _ in lines for v in vs)], default=0.0) or 1.0)
    )
    body = [_yticks(top, percent), axis.labels(spans, H - PAD + 16)]
    middles = [axis.x((t0 + t1) / 2) for _, t0, t1 in spans]
    if band is not None and spans:
        upper = " ".join(f"{x:.1f},{_y(v, top):.1f}" for x, v in zip(middles, band[1], strict=True))
        lower = " ".join(
            f"{x:.1f},{_y(v, top):.1f}"
            for x, v in reversed(list(zip(middles, band[0], strict=True)))
        )
        body.append(f'<polygon points="{upper} {lower}" class="band"/>')
    if bars is not None:
        for i, ((label, t0, t1), v) in enumerate(zip(spans, bars, strict=True)):
            x0, x1 = axis.x(t0), axis.x(t1)
            cls = bar_classes[i] if i < len(bar_classes) else "bar"
            value = _pct(v, 2) if percent else f"{v:.4g}"
            body.append(
                f'<rect x="{x0 + 0.5:.1f}" y="{_y(v, top):.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                f'height="{H - PAD - _y(v, top):.1f}" class="{cls}"><title>{html.escape(label)}: '
                f"{value}</title></rect>"
            )
    for name, values, cls in lines:
        if spans:
            points = " ".join(
                f"{x:.1f},{_y(v, top):.1f}" for x, v in zip(middles, values, strict=True)
            )
            body.append(
                f'<polyline class="{cls}" points="{points}"><title>{html.escape(name)}</title></polyline>'
            )
    if claim is not None:
        body.append(
            f'<line x1="{PAD}" x2="{W - PAD}" y1="{_y(claim):.1f}" y2="{_y(claim):.1f}" class="claim"/>'
            f'<text x="{W - PAD}" y="{_y(claim) - 4:.1f}" text-anchor="end" class="claimtext">'
            f"claim {_claim_pct(claim)}</text>"
        )
    body.append(axis.marks(marks, TOP, H - PAD))
    legend = ""
    if len(lines) > 1:
        legend = "".join(
            f'<line x1="{PAD + 10 + 150 * i}" x2="{PAD + 30 + 150 * i}" y1="{H - 8}" y2="{H - 8}" class="{cls}"/>'
            f'<text x="{PAD + 34 + 150 * i}" y="{H - 4}">{html.escape(name)}</text>'
            for i, (name, _, cls) in enumerate(lines)
        )
    return _figure(
        title,
        f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">{"".join(body)}{legend}</svg>',
    )


def shade(value: float) -> str:
    """The heatmap's colour of a figure: pale yellow at 0% to dark blue at 100%, so that 0%
    is a colour of its own, never the grey hatching of no data."""
    v = min(max(value, 0.0), 1.0)
    return f"hsl({50 + 170 * v:.0f}, {85 - 15 * v:.0f}%, {86 - 56 * v:.0f}%)"


LEGEND_STEPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def heatmap(
    title: str,
    rows: dict[str, dict[str, tuple[float, float]]],
    axis: TimeAxis,
    spans: Sequence[tuple[str, float, float]],
    marks: Sequence[tuple[float, str]] = (),
    limit: int = 60,
) -> str:
    """Node x day: a cell per node and day, coloured by the day's figure over the node's GPUs
    (`rows[node][date]` = (figure, observed share)); a cell the node sent nothing for is
    hatched grey, "no data", and the legend says which is which."""
    names = sorted(rows)[:limit]
    row_h = 12
    top = TOP
    bottom = top + max(len(names), 1) * row_h
    cells = [
        '<defs><pattern id="nodata" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
        '<line x1="0" y1="0" x2="0" y2="6" class="hatch"/></pattern></defs>'
    ]
    for r, name in enumerate(names):
        y = top + r * row_h
        cells.append(
            f'<text x="{PAD - 4}" y="{y + 9}" text-anchor="end" class="small">{html.escape(name)}</text>'
        )
        for day, t0, t1 in spans:
            cell = rows[name].get(day)
            observed = cell is not None and cell[1] > 0
            fill = shade(cell[0]) if cell is not None and observed else "url(#nodata)"
            label = (
                f"{cell[0]:.1%} ({cell[1]:.0%} of the time observed)"
                if cell is not None and observed
                else "no data (nothing observed)"
            )
            x0, x1 = axis.x(t0), axis.x(t1)
            cells.append(
                f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" height="{row_h - 1}" '
                f'fill="{fill}" class="{"cell" if observed else "cell nodata"}">'
                f"<title>{html.escape(name)} {day}: {label}</title></rect>"
            )
    cells.append(axis.labels([(day[5:], t0, t1) for day, t0, t1 in spans], bottom + 12))
    cells.append(axis.marks(marks, top, bottom))
    # the legend: the colour of each step of the scale, then "no data"
    y = bottom + 24
    for i, step in enumerate(LEGEND_STEPS):
        x = PAD + i * 52
        cells.append(
            f'<rect x="{x}" y="{y}" width="16" height="10" fill="{shade(step)}" class="legend"/>'
            f'<text x="{x + 20}" y="{y + 9}" class="small">{step:.0%}</text>'
        )
    x = PAD + len(LEGEND_STEPS) * 52 + 10
    cells.append(
        f'<rect x="{x}" y="{y}" width="16" height="10" fill="url(#nodata)" class="legend nodata"/>'
        f'<text x="{x + 20}" y="{y + 9}" class="small">no data (nothing observed that day)</text>'
    )
    more = (
        f" (first {limit} of {len(rows)} nodes; all in node_days.csv)" if len(rows) > limit else ""
    )
    height = y + 16
    return _figure(
        title + more,
        f'<svg viewBox="0 0 {W} {height}" role="img" aria-label="{html.escape(title)}">{"".join(cells)}</svg>',
    )


HISTOGRAM_BINS = 20


def histogram_bins(
    values: Sequence[float], bins: int = HISTOGRAM_BINS
) -> list[tuple[float, float, int]]:
    """(low, high, count) of each bin: bin i holds [i/bins, (i+1)/bins), the last one [.., 1]
    with 100% in it. A value is binned as rounded to 9 decimals, so that 85% that float
    arithmetic made 84.99999999999% is counted with 85%. Figures are within [0, 1] (bounds
    clamps them: no card has more seconds than the clock), so there is no bin above 100%."""
    counts = [0] * bins
    for v in values:
        position = round(min(max(v, 0.0), 1.0) * bins, 9)
        counts[min(math.floor(position), bins - 1)] += 1
    return [(i / bins, (i + 1) / bins, counts[i]) for i in range(bins)]


def bin_label(low: float, high: float) -> str:
    return f"{low * 100:g}%\u2013{high * 100:g}%"


def bin_span(low: float, high: float) -> str:
    """What a bin holds, in words: its upper edge is not in it, but for the last bin's 100%."""
    last = high >= 1.0
    return f"from {low * 100:g}% up to {'and including' if last else 'but not including'} {high * 100:g}%"


def histogram(title: str, values: Sequence[float], claim: float | None = None) -> str:
    """The distribution of per-GPU figures: bars on a linear 0-100% axis, each bin's edges
    labelled where they are, and the claim drawn where it lies."""
    bins = histogram_bins(values)
    top = float(max(4, math.ceil(max(c for _, _, c in bins) / 4) * 4))  # whole GPUs per tick
    axis = TimeAxis(0.0, 1.0)  # a linear axis, of fractions here

    def x(v: float) -> float:
        return axis.x(v)

    body = [_yticks(top, percent=False)]
    for low, high, count in bins:
        x0, x1 = x(low), x(high)
        body.append(
            f'<rect x="{x0 + 0.5:.1f}" y="{_y(count, top):.1f}" width="{x1 - x0 - 1:.1f}" '
            f'height="{H - PAD - _y(count, top):.1f}" class="bar" data-bin="{bin_label(low, high)}">'
            f"<title>{bin_label(low, high)}: {count} GPU{'' if count == 1 else 's'} ({bin_span(low, high)})</title></rect>"
        )
    for i in range(HISTOGRAM_BINS + 1):
        edge = i / HISTOGRAM_BINS
        body.append(
            f'<text x="{x(edge):.1f}" y="{H - PAD + 14}" text-anchor="middle" class="small" '
            f'data-edge="{edge * 100:g}">{edge * 100:g}%</text>'
        )
    if claim is not None:
        body.append(
            f'<line x1="{x(claim):.1f}" x2="{x(claim):.1f}" y1="{TOP:.1f}" y2="{H - PAD}" class="claim"/>'
            f'<text x="{x(claim) + 3:.1f}" y="{TOP + 10:.1f}" class="claimtext">claim {_claim_pct(claim)}</text>'
        )
    body.append(
        f'<text x="{W / 2:.0f}" y="{H - 8}" text-anchor="middle" class="small">each bar: GPUs from '
        "its left edge up to but not including its right edge; the last bar includes 100%</text>"
    )
    return _figure(
        title,
        f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">{"".join(body)}</svg>',
    )


# -- HTML ------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1240px;padding:8px 18px;color:#222}
h1{font-size:1.3em;margin:.2em 0 .1em}h2{font-size:1.05em;margin:.5em 0 .2em}
.sub{margin:0 0 .3em;color:#444}
table{border-collapse:collapse}td,th{padding:.12em .6em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}th{font-weight:600}
.verdict{font-size:1.2em;font-weight:600;margin:.2em 0}
.simulated{font-size:1em;font-weight:600;color:#b00;border:2px solid #b00;padding:.2em .5em;margin:.2em 0}
.supported{color:#176d2f}.refuted{color:#a11}.undetermined{color:#8a6100}.caveat{color:#8a6100}
.padding-decides{color:#a11}.verdict-figures{font-size:1.1em;margin:.2em 0}
.answer{font-size:14.5px;margin:.15em 0 .3em;line-height:1.3}
table.measures{font-size:12.5px;margin:.3em 0;width:100%}table.measures small{color:#555}
table.measures td,table.measures th{padding:.1em .35em}table.measures td{white-space:nowrap}
.first{display:grid;grid-template-columns:1.4fr 1fr;grid-template-areas:"v l" "e e";gap:0 24px;align-items:start}
#verdicts{grid-area:v}#limitations{grid-area:l}#evidence{grid-area:e}
@media (max-width:1000px){.first{grid-template-columns:1fr;grid-template-areas:"v" "l" "e"}}
#limitations ul{margin:.1em 0;padding-left:1.1em;font-size:12.5px;line-height:1.3}
#limitations li{margin:.15em 0}#verdicts p.caveat{font-size:12.5px;margin:.2em 0}
#evidence dl{display:grid;grid-template-columns:repeat(3,max-content 1fr);gap:2px 8px;font-size:12.5px;margin:.1em 0}
#evidence dd.wide{grid-column:2 / span 5}
#evidence dt{font-weight:600}#evidence dd{margin:0;overflow-wrap:anywhere}
code,.hash,pre{font:11.5px/1.3 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:.4em}
.rest{max-width:900px}
svg{width:100%;height:auto;font-size:10px}.grid{stroke:#ddd}.line{fill:none;stroke:#1f5fbf;stroke-width:1.6}
.work{fill:none;stroke:#c05a00;stroke-width:1.6;stroke-dasharray:5 2}
.band{fill:#1f5fbf;opacity:.15}.claim{stroke:#a11;stroke-dasharray:4 3}.claimtext{fill:#a11}
.phase{stroke:#6a1b9a;stroke-width:1.4;stroke-dasharray:2 2}.phasetext{fill:#6a1b9a;font-size:9px}
.bar{fill:#1f5fbf}.bar.partial{fill:#9bb7e3}.small{font-size:8px}.hatch{stroke:#999;stroke-width:2}
figure{margin:1.2em 0}figcaption{font-weight:600;margin-bottom:.3em}.note{font-size:12px;color:#555}
"""

# Plain names, for people who have not read the manual: (name, what it counts, the question
# a claim on it asks, the question without a claim).
PLAIN = {
    "sm_active": (
        "Real work",
        "share of each GPU's compute units (SMs) at work",
        "Were the GPUs doing real work at least {c} of the time?",
        "How much of the time were the GPUs doing real work?",
    ),
    "busy": (
        "Busy",
        "time a program was running on the GPU, however little it did (what nvidia-smi shows)",
        "Was a program running on the GPUs at least {c} of the time?",
        "How much of the time was a program running on the GPUs?",
    ),
    "effective": (
        "Real work incl. estimates",
        "SM activity where measured, else estimated from power (estimates never make a Yes)",
        "Were the GPUs doing real work at least {c} of the time, counting estimates?",
        "How much of the time were the GPUs doing real work, counting estimates?",
    ),
    "allocated": (
        "Held",
        "time a program held the GPU, whether or not it ran anything",
        "Did programs hold the GPUs at least {c} of the time?",
        "How much of the time did programs hold the GPUs?",
    ),
}


def _name(measure: str) -> str:
    return PLAIN[measure][0].lower()


def answer_of(v: dict[str, Any], caveat: str | None, short: bool = False) -> tuple[str, str]:
    """(answer in plain words, its CSS class) of a measure's verdict (figures.verdicts):
    never a pass's colour when flagged padding decides, or the inventory is in doubt."""
    verdict = v["verdict"]
    if verdict is None:
        return "", ""
    if v["padding_decides"]:
        clean = _WORD[v["verdict_without_padding"]]
        if verdict == "supported":
            text = "Only with padding" if short else f"Only if padding counts ({clean} without it)"
        else:
            text = (
                "Cannot tell, by padding"
                if short
                else f"Cannot tell only because of padding ({clean} without it)"
            )
        return text, "padding-decides"
    if caveat and verdict == "supported":
        return ("Yes, but" if short else "Yes, but not a plain yes"), "caveat"
    return _WORD[verdict], verdict


_WORD = {"supported": "Yes", "refuted": "No", "undetermined": "Cannot tell"}


def plain_caveat(r: dict[str, Any]) -> str:
    """figures.verdict_caveat in a few plain words, for the first screen."""
    inv = r["inventory"]
    parts = []
    if inv["understated"]:
        text = (
            f"{inv['seen']:,} GPUs reported where {inv['declared']:,} were declared, so the "
            f"figures are over the {inv['seen']:,}"
        )
        raw = inv["over_declared"][r["measure"]]
        if raw > 1.0:
            text += f"; over {inv['declared']:,} they would give {raw:.2%}, which is impossible"
        parts.append(text)
    if inv["capped"]:
        parts.append("a figure came out above 100% and had to be capped")
    parts += r.get("findings_caveats", [])
    return "; ".join(parts) + ". See Limitations."


def _headline_measures(measure: str) -> list[str]:
    """The measures of the plain-language verdict: real work first, then the claim's measure,
    or busy when the claim is on real work."""
    return [WORK_MEASURE, measure if measure != WORK_MEASURE else "busy"]


def verdicts_html(r: dict[str, Any]) -> str:
    """The first thing to read: each headline measure's question and answer, then every
    measure side by side, then the phases'."""
    claim, caveat = r["claim"], r["verdict_caveat"]
    out = []
    if claim is not None and r["padding_decides"]:
        out.append(padding_headline(r))
    for m in _headline_measures(r["measure"]):
        v = r["verdicts"][m]
        name, _, question, plain_question = PLAIN[m]
        figures = f"{v['figure']:.2%} (between {v['lower']:.2%} and {v['upper']:.2%})"
        if r["coverage"] > 0 and r["measured"][m] == 0:  # no GPU here measures it: no 0% shown
            figures = f"not measured on these GPUs (between {v['lower']:.2%} and {v['upper']:.2%})"
        mine = " <small>(the claim's measure)</small>" if m == r["measure"] else ""
        if claim is None:
            out.append(f'<p class="answer">{plain_question}{mine} <b>{figures}</b></p>')
            continue
        word, cls = answer_of(v, caveat)
        out.append(
            f'<p class="answer" data-measure="{m}">{question.format(c=_claim_pct(claim))}{mine} '
            f'<b class="{cls}">{html.escape(word)}: {figures}</b></p>'
        )
    if caveat:
        out.append(
            f'<p class="caveat"><b>Not a plain verdict:</b> {html.escape(plain_caveat(r))}</p>'
        )
    head = (
        f"<th>&ge; {_claim_pct(claim)}?</th><th>without padding</th>" if claim is not None else ""
    )
    rows = []
    for m in MEASURES:
        v = r["verdicts"][m]
        name, what, _, _ = PLAIN[m]
        cells = ""
        if claim is not None:
            word, cls = answer_of(v, caveat, short=True)
            clean = _week_word(v["verdict_without_padding"], caveat)  # never a plain Yes
            cells = f'<td class="{cls}">{html.escape(word)}</td><td>{clean}</td>'
        mark = " &larr; claim" if m == r["measure"] else ""
        rows.append(
            f'<tr data-measure="{m}" title="{html.escape(what)}"><td>{name} <small><code>{m}</code>'
            f"</small>{mark}</td><td>{v['figure']:.2%}</td><td>{v['lower']:.2%}&ndash;"
            f"{v['upper']:.2%}</td>{cells}</tr>"
        )
    out.append(
        '<table class="measures"><tr><th>measure</th><th>figure</th><th>range</th>'
        f"{head}</tr>{''.join(rows)}</table>"
        "<p class='note'>Range: the lowest to the highest the truth can be"
        + ("; Yes only when even the lowest reaches the claim." if claim is not None else ".")
        + "</p>"
    )
    if r["phases"]:
        out.append(phases_table(r, compact=True))
    return '<section id="verdicts"><h2>Verdict</h2>' + "".join(out) + "</section>"


def phases_table(r: dict[str, Any], compact: bool = False) -> str:
    """Each phase's figures and verdicts, the claim's measure beside real work."""
    claim = r["claim"]
    shown = _headline_measures(r["measure"]) if compact else list(MEASURES)
    head = "".join(f"<th>{PLAIN[m][0]}</th>" for m in shown)
    rows = []
    for phase in r["phases"]:
        cells = []
        for m in shown:
            v = phase["verdicts"][m]
            text = f"{v['figure']:.2%}"
            if not compact:
                text += f" [{v['lower']:.2%}, {v['upper']:.2%}]"
            if claim is not None:
                word, cls = answer_of(v, phase["verdict_caveat"], short=compact)
                text += f' <b class="{cls}">{html.escape(word)}</b>'
            cells.append(f"<td>{text}</td>")
        coverage = "" if compact else f"<td>{phase['coverage']:.2%}</td>"
        rows.append(
            f"<tr><td>{html.escape(phase['name'])}</td><td>{phase['from'][:16].replace('T', ' ')} "
            f"&ndash; {phase['to'][:16].replace('T', ' ')}</td>{''.join(cells)}{coverage}</tr>"
        )
    cov = "" if compact else "<th>observed</th>"
    title = "By phase" if compact else "Phases"
    return (
        f'<table class="{"measures phases" if compact else "phases"}"><tr><th>{title}</th>'
        f"<th>from &ndash; to (UTC)</th>{head}{cov}</tr>" + "".join(rows) + "</table>"
    )


def limitations_html(r: dict[str, Any]) -> str:
    items = "".join(
        f'<li data-kind="{html.escape(item["kind"])}"><b>{html.escape(item["what"])}</b> '
        f"{html.escape(item['why'])}</li>"
        for item in r["limitations"]
    )
    return f'<section id="limitations"><h2>Limitations</h2><ul>{items}</ul></section>'


def evidence_html(r: dict[str, Any]) -> str:
    """The evidence to cite, on the first screen: enough to find and re-check this very log.
    Laid out two pairs to a line, the command and the hashes across the page."""
    ev = r["evidence"]
    rows: list[tuple[str, str, bool]] = [  # (label, value, whether it spans the line)
        ("Tool", html.escape(ev["tool"]), False),
        (
            "Log",
            f"<code>{html.escape(ev['origin'])}</code>, {ev['entries']:,} signed records, all verified",
            False,
        ),
        ("This report", "<code>MANIFEST.sha256</code>: every file's SHA-256", False),
    ]
    if ev["command"]:
        rows.append(("Command", f"<code>{html.escape(ev['command'])}</code>", True))
    if ev["ledger"]:
        rows.append(
            (
                "Ledger file",
                f"SHA-256 <code class='hash'>{ev['ledger']['sha256']}</code> "
                f"({ev['ledger']['bytes']:,} bytes: <code>{html.escape(ev['ledger']['path'])}</code>)",
                True,
            )
        )
    if ev["ledger_wal"] and ev["ledger_wal"]["bytes"]:
        rows.append(
            (
                "Its -wal file",
                f"SHA-256 <code class='hash'>{ev['ledger_wal']['sha256']}</code> (the newest "
                "writes of a live collector, not in the file's hash)",
                True,
            )
        )
    checkpoint = ev["checkpoint"]
    if checkpoint:
        rows.append(
            (
                "Signed log state",
                f"size {checkpoint['size']:,}, root <code class='hash'>{html.escape(checkpoint['root'])}</code> "
                "(its <i>checkpoint</i>: the collector's signature over the log's size and root hash)",
                True,
            )
        )
    else:
        rows.append(("Signed log state", "none: the collector never signed a checkpoint", True))
    machines = ev["keys"] - (1 if ev["collector_key"] else 0)
    rows.append(
        (
            "Keys",
            f"{ev['keys']:,} public keys ({machines:,} machine{'' if machines == 1 else 's'}"
            + (", 1 collector" if ev["collector_key"] else "")
            + ")",
            False,
        )
    )
    cosigned = len(ev["cosignatures"])
    rows.append(
        (
            "Witnesses",
            (f"{cosigned} cosigned, up to record {ev['witnessed']:,}" if cosigned else "none"),
            False,
        )
    )
    body = "".join(
        f"<dt>{k}</dt><dd{' class=wide' if wide else ''}>{v}</dd>" for k, v, wide in rows
    )
    return f'<section id="evidence"><h2>Evidence to cite</h2><dl>{body}</dl></section>'


def evidence_in_full(r: dict[str, Any]) -> str:
    ev, v = r["evidence"], r["verification"]
    parts = ["<h2>Evidence in full</h2>"]
    parts.append(
        f"<p>Ledger verified: {v['entries']:,} signed summaries from {v['nodes']} nodes; every "
        f"signature, every node's chain and {v['checkpoints']} signed checkpoints hold. Every "
        f"figure is recomputed from those summaries. Merkle root of all {ev['entries']:,} entries: "
        f"<code class='hash'>{ev['root']}</code> (hex <code class='hash'>{ev['root_hex']}</code>).</p>"
    )
    if v["signatures_by_receipt"]:
        parts.append(
            f"<p>The signatures of the first {v['signatures_by_receipt']:,} summaries were checked by the"
            f" full verification of {html.escape(v['receipt_verified_at'])}, whose receipt holds for"
            " these very bytes and keys; this run recomputed every hash, chain and checkpoint.</p>"
        )
    if ev["ledger"]:
        parts.append(
            "<p>The ledger file's SHA-256 is of the file as it was when this report was written. "
            "A live collector keeps its newest writes in a <code>-wal</code> file beside it, which "
            "that hash does not cover"
            + (
                f" (it held {ev['ledger_wal']['bytes']:,} bytes, SHA-256 <code class='hash'>"
                f"{ev['ledger_wal']['sha256']}</code>)"
                if ev["ledger_wal"]
                else " (there was none)"
            )
            + "; hash a copy (<code>sqlite3 ledger.db .backup copy.db</code>) for a figure that stays "
            "valid.</p>"
        )
    checkpoint = ev["checkpoint"]
    if checkpoint:
        parts.append(
            f"<p>The newest signed checkpoint, in full (C2SP signed note; size {checkpoint['size']:,}, root "
            f"hex <code class='hash'>{checkpoint['root_hex']}</code>):</p><pre>{html.escape(checkpoint['note'])}</pre>"
        )
    collector = ev["collector_key"]
    if collector:
        parts.append(
            f"<p>Collector key <code>{html.escape(collector['name'])}</code>: "
            f"<code class='hash'>{collector['fingerprint']}</code>. Keys directory digest "
            f"<code class='hash'>{ev['keys_digest']}</code>.</p>"
        )
    if ev["node_keys"]:
        rows = "".join(
            f"<tr><td>{html.escape(node)}</td><td><code class='hash'>{'<br>'.join(fps)}</code></td></tr>"
            for node, fps in ev["node_keys"].items()
        )
        parts.append(
            "<table><tr><th>node</th><th>fingerprints of the keys that signed its summaries</th></tr>"
            f"{rows}</table>"
        )
    if ev["cosignatures"]:
        rows = "".join(
            f"<tr><td>{html.escape(str(c.get('witness', '')))}</td><td>{c.get('size', '')}</td>"
            f"<td>{html.escape(_when(c.get('time')))}</td><td><code class='hash'>"
            f"{html.escape(str(c.get('key', '')))}</code></td></tr>"
            for c in ev["cosignatures"]
        )
        parts.append(
            "<h3>Witness cosignatures</h3><table><tr><th>witness</th><th>size</th><th>cosigned</th>"
            f"<th>verifier key</th></tr>{rows}</table>"
        )
    else:
        parts.append("<p>No witness cosigned this ledger's checkpoints.</p>")
    recording = ev["recording"]
    if recording and recording.get("summaries"):
        parts.append(
            "<h3>When the summaries were recorded</h3><p>"
            f"{recording.get('summaries', 0):,} summaries of the period; how long after its "
            f"window each was recorded, {html.escape(_by_whom(recording))}: median "
            f"{_duration(recording.get('median_delay_s', 0))}, 99th percentile "
            f"{_duration(recording.get('p99_delay_s', 0))}, longest {_duration(recording.get('max_delay_s', 0))}; "
            f"{recording.get('late', 0):,} recorded more than {_duration(recording.get('late_after_s', 0))} late.</p>"
        )
    return "".join(parts)


def _when_text(iso: str) -> str:
    """A time of the title: its date at midnight UTC, else its date and time."""
    return html.escape(
        iso[:10] if iso[10:] == "T00:00:00Z" else iso[:16].replace("T", " ") + " UTC"
    )


def _when(seconds: object) -> str:
    if isinstance(seconds, int | float) and math.isfinite(seconds):
        return _iso(float(seconds))
    return ""


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


def _week_word(verdict: str | None, caveat: str | None) -> str:
    """A week's verdict in a word: never a plain Yes under a caveat."""
    if verdict == "supported" and caveat:
        return "Yes, but"
    return _WORD.get(verdict or "", verdict or "")


def weeks_table(r: dict[str, Any]) -> str:
    m, work = r["measure"], WORK_MEASURE
    shown = [m] if m == work else [m, work]
    head = "".join(f"<th>{x}</th>" for x in shown)
    rows = "".join(
        f"<tr><td>{w['week']}{' (partial)' if w['partial'] else ''}</td><td>{w['days']:.2f}</td>"
        + "".join(
            f"<td>{w[x]:.2%} [{w[x + '_lower']:.2%}, {w[x + '_upper']:.2%}]"
            + (
                " " + _week_word(w[x + "_verdict"], w["verdict_caveat"] or r["verdict_caveat"])
                if r["claim"] is not None
                else ""
            )
            + "</td>"
            for x in shown
        )
        + f"<td>{w['coverage']:.2%}</td></tr>"
        for w in r["weeks"]
    )
    return (
        "<h2>By ISO week</h2><p><small>Monday 00:00 UTC to Monday; a week the period holds only "
        "part of is marked partial, and its figures are over the part it holds.</small></p>"
        f"<table><tr><th>week</th><th>days</th>{head}<th>observed</th></tr>{rows}</table>"
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


def plots(r: dict[str, Any]) -> list[str]:
    m, work = r["measure"], WORK_MEASURE
    start, end = _unix(r["from"]), _unix(r["to"])
    axis = TimeAxis(start, end)
    days = [(d["date"][5:], _unix(d["from"]), _unix(d["to"])) for d in r["daily"]]
    weeks = [(w["week"][5:], _unix(w["from"]), _unix(w["to"])) for w in r["weeks"]]
    marks = phase_marks(r["phases"], start, end)
    daily = r["daily"]
    lines = [(f"{m} (claim's measure)", [d[m] for d in daily], "line")]
    if m != work:
        lines.append((f"{work} (real work)", [d[work] for d in daily], "work"))
    out = [
        time_chart(
            f"Daily {m}: figure, with the band between its lower and upper bounds"
            + (f"; {work} (real work) dashed" if m != work else ""),
            axis,
            days,
            lines,
            band=([d["lower"] for d in daily], [d["upper"] for d in daily]),
            claim=r["claim"],
            marks=marks,
        ),
        time_chart(
            f"Weekly {m} (ISO weeks; a partial week in a lighter colour)",
            axis,
            weeks,
            bars=[w[m] for w in r["weeks"]],
            bar_classes=["bar partial" if w["partial"] else "bar" for w in r["weeks"]],
            claim=r["claim"],
            marks=marks,
        ),
        time_chart(
            "Observed share of the inventory's GPU-time, per day (coverage)",
            axis,
            days,
            [("observed", [d["coverage"] for d in daily], "line")],
            marks=marks,
        ),
    ]
    dates = [(d["date"], _unix(d["from"]), _unix(d["to"])) for d in r["daily"]]
    for name in [m] if m == work else [m, work]:
        cells: dict[str, dict[str, tuple[float, float]]] = {}
        for row in r["node_days"]:
            cells.setdefault(row["node"], {})[row["date"]] = (row[name], row["coverage"])
        out.append(heatmap(f"Node x day: {name}", cells, axis, dates, marks))
    for name in [m] if m == work else [m, work]:
        out.append(
            histogram(
                f"Distribution of per-GPU {name} over the period ({len(r['per_gpu'])} GPUs)",
                [g[name] for g in r["per_gpu"]],
                r["claim"],
            )
        )
    out += [
        time_chart(
            "Padding: GPU-hours flagged per day",
            axis,
            days,
            bars=[d["padding_gpu_hours"] for d in daily],
            marks=marks,
            percent=False,
        ),
        time_chart(
            "Energy per day (kWh), to set against the electricity meter",
            axis,
            days,
            bars=[d["energy_kwh"] for d in daily],
            marks=marks,
            percent=False,
        ),
    ]
    return out


def render_html(r: dict[str, Any]) -> str:
    # simulated figures say so before anything else: they are not measurements
    simulated = "".join(
        f'<p class="simulated">{html.escape(line)}</p>' for line in simulated_lines(r)[:1]
    )
    v = r["verification"]

    def listed(uncounted: bool) -> str:
        return "".join(
            f"<li><b>{f['count']:,} {html.escape(kind)}</b>: "
            f"{html.escape(f['examples'][0]['message']) if f['examples'] else ''}</li>"
            for kind, f in v.get("findings", {}).items()
            if (kind in UNCOUNTED) == uncounted
        )

    left_out, others = listed(True), listed(False)
    findings_html = (
        '<div class="findings"><p><b>Findings</b>: the ledger holds summaries a collector should '
        "have refused. None of them is counted in any figure of this report (each GPU-second "
        "once, the first recorded).</p><ul>" + left_out + "</ul></div>"
        if left_out
        else ""
    ) + (
        '<div class="findings"><p><b>Findings</b> beside the figures (the figures count what '
        "they concern):</p><ul>" + others + "</ul></div>"
        if others
        else ""
    )
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in r["warnings"])
    inv = r["inventory"]
    days = r["seconds"] / 86400
    methodology = "".join(f"<p>{html.escape(p)}</p>" for p in r["methodology"])
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>gputally audit report: {html.escape(r["from"])} to {html.escape(r["to"])}</title><style>{CSS}</style></head><body>
{simulated}<h1>GPU utilization audit: {_when_text(r["from"])} to {_when_text(r["to"])}</h1>
<p class="sub">{days:.2f} days from {html.escape(r["from"])} to {html.escape(r["to"])}; {inv["declared"]:,} GPUs declared,
{inv["seen"]:,} reported; figures recomputed from the centre's signed records, all checked.</p>
<div class="first">{verdicts_html(r)}{limitations_html(r)}{evidence_html(r)}</div>
<div class="rest">
{findings_html}
<h2>Figures</h2>
<p>Energy {r["energy_kwh"]:,.1f} kWh. Padding flagged: {r["padding_gpu_hours"]:,.1f} GPU-hours. Coverage
(observed share of the declared GPUs' time): {r["coverage"]:.2%}.</p>
{"<h3>Warnings</h3><ul>" + warnings + "</ul>" if warnings else ""}
{"".join(plots(r))}
{weeks_table(r)}
{"<h2>Phases</h2>" + phases_table(r) if r["phases"] else ""}
{"".join(breakdown_table(r[key], title, over) for key, title, over in _TABLES)}
<p><small>Per GPU (with node, serial and coverage), per node and day, per week and per phase: the CSV files and
report.json.</small></p>
{evidence_in_full(r)}
<h2>Methodology</h2>{methodology}
<p><small>Definitions: docs/utilization.md; how to read this report: docs/report.md.</small></p>
</div>
</body></html>
"""


# -- files -----------------------------------------------------------------------------------

MANIFEST = "MANIFEST.sha256"


# A cell a spreadsheet would run as a formula: node, tenant, job and model names are the
# agents' words, and an auditor opens these files in a spreadsheet.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Text that a spreadsheet would take for a formula, quoted with a leading apostrophe
    (the OWASP rule); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def _csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)


def _fields(rows: Sequence[dict[str, Any]], first: Sequence[str]) -> list[str]:
    """A table's columns: its rows' (all alike), or, for a table without rows, `first`."""
    return list(rows[0]) if rows else list(first)


# The columns of a span's flat row (_flat), for the header of a table without rows.
_SPAN_FIELDS = (
    "from",
    "to",
    "days",
    "gpus",
    "coverage",
    *(
        f"{m}{suffix}"
        for m in MEASURES
        for suffix in ("", "_lower", "_upper", "_without_padding", "_verdict")
    ),
    "energy_kwh",
    "padding_gpu_hours",
)


def write(report: dict[str, Any], out: Path, measure: str) -> list[Path]:
    """Every file of the report into `out`, then MANIFEST.sha256 of them all; the paths
    written, the manifest last."""
    del measure  # every measure is in every table
    out.mkdir(parents=True, exist_ok=True)
    breakdown_fields = ["name", "gpus", "gpu_hours", "energy_kwh", *MEASURES]
    phases = [{"name": p["name"], **_flat(_phase_row(p))} for p in report["phases"]]
    tables: dict[str, tuple[Sequence[dict[str, Any]], list[str]]] = {
        "daily.csv": (report["daily"], _fields(report["daily"], ["date", *_SPAN_FIELDS])),
        "weeks.csv": (
            report["weeks"],
            _fields(report["weeks"], ["week", "partial", *_SPAN_FIELDS]),
        ),
        "phases.csv": (phases, _fields(phases, ["name", *_SPAN_FIELDS])),
        "nodes.csv": (report["by_node"], breakdown_fields),
        "models.csv": (report["by_model"], breakdown_fields),
        "tenants.csv": (report["by_tenant"], breakdown_fields),
        "jobs.csv": (report["by_job"], breakdown_fields),
        "gpus.csv": (
            report["per_gpu"],
            _fields(report["per_gpu"], ["node", "uuid", "serial", "model", "coverage", *MEASURES]),
        ),
        "node_days.csv": (
            report["node_days"],
            _fields(report["node_days"], ["date", "node", "gpus", "coverage", *MEASURES]),
        ),
    }
    paths = [out / "report.json"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    for name, (rows, fields) in tables.items():
        _csv(out / name, rows, fields)
        paths.append(out / name)
    paths.append(out / "report.html")
    paths[-1].write_text(render_html(report))
    manifest = out / MANIFEST
    manifest.write_text("".join(f"{file_sha256(p)}  {p.name}\n" for p in paths))
    return [*paths, manifest]


def _phase_row(phase: dict[str, Any]) -> dict[str, Any]:
    """A phase's answer (as_dict) as a _row, for phases.csv."""
    return {
        "from": phase["from"],
        "to": phase["to"],
        "days": phase["seconds"] / DAY,
        "gpus": phase["seen_gpus"],
        "coverage": phase["coverage"],
        "measures": phase["verdicts"],
        "energy_kwh": phase["energy_kwh"],
        "padding_gpu_hours": phase["padding_gpu_hours"],
    }
