"""`gputally audit census`: the inventory the ledger actually saw, set against a claimed capacity.

Counts the distinct cards (by UUID) per model, lists their serials and the nodes that reported
them, and flags duplicate identities: one UUID or serial reported by two nodes over
overlapping windows (one card cannot sit in two nodes at once), or a UUID that moved between
nodes (reported by one, later by another). Multiplies the cards by each model's theoretical
peak dense BF16 throughput, to set against a claimed capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from gputally.v1 import accounting
from gputally.v1 import telemetry_pb2 as pb

from ..record.store import Record

# Peak dense (without sparsity) BF16/FP16 tensor throughput, TFLOP/s, from NVIDIA's datasheets:
# "NVIDIA H100 Tensor Core GPU" (H100 SXM: 989.4; 1,979 with sparsity), "NVIDIA H200 Tensor
# Core GPU" (H200 SXM: 989; 1,979 with sparsity), "NVIDIA A100 Tensor Core GPU" (A100 SXM
# 40GB and 80GB: 312; 624 with sparsity), "NVIDIA L40S GPU" (362.05; 733 with sparsity).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA L40S": 362.05,
}


@dataclass(slots=True)
class Card:
    uuid: str
    serial: str
    model: str
    # node -> (first window start, last window end), unix seconds
    nodes: dict[str, tuple[float, float]] = field(default_factory=dict)
    present_seconds: float = 0.0


def take(record: Record, start: float, end: float) -> dict[str, Card]:
    """The cards of every entry whose signed window overlaps [start, end). Every row is read
    and the window taken from the signed body, never from the record's window columns, which
    no signature covers (run after a verification that holds: each row was checked)."""
    cards: dict[str, Card] = {}
    for _, node, stored, _ in record.entries():
        try:
            summary = pb.Summary.FromString(pb.SignedSummary.FromString(stored).body)
        except DecodeError:
            continue  # a finding of the verification, never a card
        w0, w1 = summary.window_start_unix_nano / 1e9, summary.window_end_unix_nano / 1e9
        if not (w1 > start and w0 < end):
            continue
        for gpu in summary.gpus:
            key = accounting.card(gpu.uuid) or f"{node}/{gpu.index}"  # "GPU-AB", "gpu-ab": one card
            card = cards.setdefault(key, Card(gpu.uuid or key, gpu.serial, gpu.model))
            first, last = card.nodes.get(node, (w0, w1))
            card.nodes[node] = (min(first, w0), max(last, w1))
            card.present_seconds += gpu.present_seconds
    return cards


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def census(cards: dict[str, Card]) -> dict[str, Any]:
    models: dict[str, int] = {}
    for card in cards.values():
        models[card.model] = models.get(card.model, 0) + 1
    duplicates = []
    for card in cards.values():
        spans = sorted(card.nodes.items(), key=lambda kv: kv[1])
        for i, (node_a, span_a) in enumerate(spans):
            for node_b, span_b in spans[i + 1 :]:
                kind = (
                    "claimed by two nodes at once"
                    if _overlap(span_a, span_b)
                    else "moved between nodes"
                )
                duplicates.append(
                    {
                        "uuid": card.uuid,
                        "serial": card.serial,
                        "nodes": [node_a, node_b],
                        "kind": kind,
                    }
                )
    by_serial: dict[str, list[Card]] = {}
    for card in cards.values():
        if card.serial:
            by_serial.setdefault(card.serial, []).append(card)
    for serial, same in sorted(by_serial.items()):
        if len(same) > 1:
            duplicates.append(
                {
                    "serial": serial,
                    "uuids": sorted(c.uuid for c in same),
                    "kind": "one serial under several UUIDs",
                }
            )
    rows = []
    total = 0.0
    for model, count in sorted(models.items()):
        peak = PEAK_BF16_TFLOPS.get(model)
        rows.append(
            {
                "model": model,
                "cards": count,
                "peak_bf16_tflops": peak,
                "total_pflops": None if peak is None else count * peak / 1000,
            }
        )
        total += 0.0 if peak is None else count * peak / 1000
    return {
        "cards": len(cards),
        "models": rows,
        "total_peak_bf16_pflops": total,
        "unknown_models": sorted(m for m in models if m not in PEAK_BF16_TFLOPS),
        "duplicates": duplicates,
        "inventory": [
            {
                "uuid": c.uuid,
                "serial": c.serial,
                "model": c.model,
                "nodes": sorted(c.nodes),
                "gpu_hours": c.present_seconds / 3600.0,
            }
            for c in sorted(cards.values(), key=lambda c: (c.model, c.uuid))
        ],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"cards seen: {result['cards']}",
        "",
        f"{'model':<26}{'cards':>7}{'peak BF16 TFLOP/s':>19}{'total PFLOP/s':>15}",
    ]
    for row in result["models"]:
        peak = "unknown" if row["peak_bf16_tflops"] is None else f"{row['peak_bf16_tflops']:g}"
        total = "-" if row["total_pflops"] is None else f"{row['total_pflops']:.2f}"
        lines.append(f"{row['model']:<26}{row['cards']:>7}{peak:>19}{total:>15}")
    lines.append(
        f"{'total':<26}{result['cards']:>7}{'':>19}{result['total_peak_bf16_pflops']:>15.2f}"
    )
    lines.append("")
    if not result["duplicates"]:
        lines.append("duplicate identities: none")
    for dup in result["duplicates"]:
        who = ", ".join(dup.get("nodes", dup.get("uuids", [])))
        lines.append(f"DUPLICATE {dup.get('uuid', dup.get('serial'))}: {dup['kind']} ({who})")
    return "\n".join(lines)
