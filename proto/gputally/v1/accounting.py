"""What the protocol's numbers add up to (docs/utilization.md §2-§7 and §9).

One home for every accounting rule, so that a second is counted the same way wherever it is
counted: the agent's summaries (the record) and its own /metrics counters, the collector's
live window and counters, and the figures recomputed from a ledger all go through here.

* :func:`contributions`: what one GPU sample adds to its totals over the seconds it covers;
* :class:`EnergyCounter`: joules between two samples of a GPU;
* :func:`mig_shares`: a MIG GPU's contributions split among the owners of its instances;
* :func:`bounds` and :func:`measured`: the figure, lower and upper bound of every measure
  over totals of those numbers, and how much of them was measured;
* :func:`owner`: the tenant and job a GPU's seconds are charged to, as figures name them.

Totals are plain dicts keyed by the names below, which are GpuSummary's own field names.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gputally.v1 import telemetry_pb2 as pb

# Every measure, in the order every metric, figure and table shows them: from a GPU held, to a
# kernel running on it, to its SMs at work. Summaries carry memory_busy too, but only the
# collector's live view shows it: no audited figure is made of it.
MEASURES = ("allocated", "busy", "sm_active", "effective", "memory_busy")
RECORDED_MEASURES = ("allocated", "busy", "sm_active", "effective")

# The GPU-seconds counters (the collector's gputally_*_gpu_seconds_total, the agent's
# gputally_gpu_seconds_total): each `measure` label and the accounting field it adds up.
COUNTED = (("observed", "present_seconds"), *((m, f"{m}_seconds") for m in MEASURES))

# The agent's padding rules (§7), and the name of their union in GpuSummary.flagged.
BUSY_WITHOUT_WORK = "busy_without_work"
FLATLINE_LOW_MEMORY = "flatline_low_memory"
BURN_TOOL = "burn_tool"
PADDING_RULES = (BUSY_WITHOUT_WORK, FLATLINE_LOW_MEMORY, BURN_TOOL)
ANY_RULE = "any"

# The numbers a GpuSummary adds up, and a PaddingTotal, straight from the protocol.
SUMMARY_FIELDS = tuple(f.name for f in pb.GpuSummary.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
FLAGGED_FIELDS = tuple(f.name for f in pb.PaddingTotal.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
# What a sample adds up to: a summary's numbers.
FIELDS = SUMMARY_FIELDS
# The flagged part of a sample's numbers (a PaddingTotal's, less its seconds).
_FLAGGED_MEASURES = tuple(name for name in FLAGGED_FIELDS if name != "seconds")
# Device-wide numbers that NVML gives only for the whole of a MIG GPU: split by slices.
_BY_SLICES = (
    "present_seconds",
    "busy_seconds",
    "busy_missing_seconds",
    "energy_joules",
    "memory_busy_seconds",
    "memory_busy_missing_seconds",
)

Totals = dict[str, float]


def zeros() -> Totals:
    return dict.fromkeys(FIELDS, 0.0)


def contributions(sample: pb.GpuSample, seconds: float, joules: float = 0.0) -> Totals:
    """What one GPU sample adds to its totals over the `seconds` it covers (§2, §3).

    A GPU that is not OK is not present: it adds its energy and, when lost, lost seconds. A
    measure NVML did not give is unknown, never 0: busy, allocated and memory_busy then add
    missing seconds (the upper bound's), and SM activity adds its cap, busy (an SM is active
    only while a kernel runs), or 1 where busy is unknown too."""
    values = zeros()
    values["energy_joules"] = joules
    if sample.status != pb.GPU_STATUS_OK:
        if sample.status == pb.GPU_STATUS_LOST:
            values["lost_seconds"] = seconds
        return values
    values["present_seconds"] = seconds
    if sample.HasField("process_count"):
        values["allocated_seconds"] = seconds * (sample.process_count > 0)
    else:
        values["allocated_missing_seconds"] = seconds
    has_busy = sample.HasField("busy")
    busy = sample.busy * seconds if has_busy else 0.0
    values["busy_seconds"] = busy
    if not has_busy:
        values["busy_missing_seconds"] = seconds
    if sample.HasField("sm_active"):
        values["sm_active_seconds"] = sample.sm_active * seconds
        values["sm_measured_seconds"] = seconds
    else:
        values["busy_unmeasured_seconds"] = busy if has_busy else seconds
    if sample.HasField("effective"):
        values["effective_seconds"] = sample.effective * seconds
        if sample.effective_estimated:
            values["effective_estimated_seconds"] = values["effective_seconds"]
    if sample.HasField("memory_busy"):
        values["memory_busy_seconds"] = sample.memory_busy * seconds
    else:
        values["memory_busy_missing_seconds"] = seconds
    return values


def flagged(values: Mapping[str, float]) -> Totals:
    """The flagged part of a flagged sample's (or of flagged samples') totals: its present
    seconds as "seconds", and its measures, as a PaddingTotal holds them. Padding flags only
    present seconds (§7)."""
    out = {name: values[name] for name in _FLAGGED_MEASURES}
    out["seconds"] = values["present_seconds"]
    return out


def unpadded(values: Mapping[str, float], flagged_part: Mapping[str, float]) -> Totals:
    """`values` with the flagged seconds counting as no work (§7): the measures lose their
    flagged part; presence, and so the denominator and the coverage, stay."""
    out = dict(values)
    for name in _FLAGGED_MEASURES:
        if name in out:
            out[name] -= flagged_part.get(name, 0.0)
    return out


def mig_shares(
    sample: pb.GpuSample, seconds: float, values: Mapping[str, float]
) -> list[tuple[pb.Attribution, Totals]]:
    """A MIG GPU's contributions (`values`, over `seconds`) split among the owners of its
    instances in proportion to the compute slices each holds (§9), owner by owner.

    Slices that no instance of an owner of its own holds (an instance handed to nobody, or
    none at all) go to the GPU's own attribution; slices in no instance are measured idle.
    Allocated and SM-active seconds come from each instance's processes and GPM; the numbers
    NVML gives only for the whole GPU (busy, energy, ...) are split by slices. Where the
    slices are unknown, or the GPU is not OK, the whole GPU is its own owner's.

    The GPU is shared out only when the result has more than one owner, or one that is not
    the GPU's own (see :func:`is_shared`)."""
    whole = sample.attribution
    total = sample.mig_slices if sample.HasField("mig_slices") else 0
    held = sum(m.slices for m in sample.mig)
    if (
        sample.status != pb.GPU_STATUS_OK
        or total <= 0
        or held > total
        or any(not m.HasField("slices") for m in sample.mig)
    ):
        return [(whole, dict(values))]
    parts: dict[bytes, tuple[pb.Attribution, Totals]] = {}

    def part(owner: pb.Attribution, fraction: float) -> Totals:
        key = owner.SerializeToString(deterministic=True)
        if key not in parts:
            parts[key] = (owner, zeros())
        out = parts[key][1]
        for name in _BY_SLICES:
            out[name] += values[name] * fraction
        return out

    rest = (total - held) / total
    if rest > 0:  # no instance there: no process, no kernel can run on these slices
        out = part(whole, rest)
        out["sm_measured_seconds"] += seconds * rest
    has_busy = sample.HasField("busy")
    for instance in sample.mig:
        fraction = instance.slices / total
        out = part(instance.attribution if instance.attribution.source else whole, fraction)
        if instance.HasField("process_count"):
            out["allocated_seconds"] += seconds * fraction * (instance.process_count > 0)
        else:
            out["allocated_missing_seconds"] += seconds * fraction
        if instance.HasField("sm_active"):
            out["sm_active_seconds"] += instance.sm_active * seconds * fraction
            out["effective_seconds"] += instance.sm_active * seconds * fraction
            out["sm_measured_seconds"] += seconds * fraction
        else:  # capped by busy where NVML gave it, as for a whole GPU
            out["busy_unmeasured_seconds"] += (
                values["busy_seconds"] if has_busy else seconds
            ) * fraction
    return list(parts.values())


def is_shared(parts: list[tuple[pb.Attribution, Totals]], attribution: pb.Attribution) -> bool:
    """Whether :func:`mig_shares` split the GPU among owners, rather than leaving all of it
    to the GPU's own attribution."""
    return len(parts) > 1 or (bool(parts) and parts[0][0] != attribution)


# -- what is physically possible --------------------------------------------------------------
# The collector refuses, and the auditor's tools flag, what no GPU can do; the agent clamps
# its own counters by the same rules, so that honest figures never trip them.

# The longest summary window: an agent's windows are minutes; a longer one would let a single
# summary claim hours that nothing else vouches for.
MAX_SUMMARY_WINDOW_S = 3600.0
# No accelerator board draws more than this (B200: 1,000 W; MI355X: 1,400 W): a ceiling for
# energy when the enforced power limit is not known (a summary does not carry it).
MAX_BOARD_WATTS = 2000.0
# Energy may exceed the enforced limit x seconds by this factor: limits are enforced on
# average over about a second, and a counter read at slightly different times than the
# interval's ends gains a little.
ENERGY_TOLERANCE = 1.25
# One card's latest window: (start ns, end ns, the card's covered seconds and joules in it).
Window = tuple[int, int, float, float]


def next_window(
    latest: Window | None, start: int, end: int, covered: float, joules: float
) -> Window | None:
    """The card's latest window once a summary of [start, end) ns covering `covered` of its
    seconds (present and lost) and `joules` is counted; None when that summary would count a
    second (or a joule) twice.

    A window may start where the latest ended, or later. It may also be the latest window
    again, if both together cover no more seconds than it has and no more energy than a
    board draws in it: an agent restarted within a window sends that window's two parts
    (windows are aligned, so their bounds are equal to the nanosecond). Anything else
    overlaps."""
    if latest is None or start >= latest[1]:
        return (start, end, covered, joules)
    length = (end - start) / 1e9
    if (
        (start, end) == latest[:2]
        and latest[2] + covered <= length * 1.001 + 1e-6
        and latest[3] + joules <= max_joules(length)
    ):
        return (start, end, latest[2] + covered, latest[3] + joules)
    return None


def max_joules(seconds: float, power_limit_watts: float | None = None) -> float:
    """The most energy a GPU can draw in `seconds`: its enforced limit (capped at the board
    ceiling), with the tolerance, plus one joule for the counter's rounding."""
    limit = MAX_BOARD_WATTS
    if power_limit_watts is not None and 0 < power_limit_watts < MAX_BOARD_WATTS:
        limit = power_limit_watts
    return limit * ENERGY_TOLERANCE * max(seconds, 0.0) + 1.0


# What no GPU summary can say, whoever signed it. Each number is GPU-seconds within the window
# (energy aside), none negative or not finite, and the parts are nested as their definitions
# nest them (utilization.md): measured seconds are present seconds, SM activity is within the
# seconds it was measured, the estimated part of `effective` within it, padding within what it
# flags. A number outside its place raises or lowers a bound that no sample supports.
_PARTS = (
    # (part, whole): part <= whole, within the tolerance
    ("allocated_seconds", "present_seconds"),
    ("busy_seconds", "present_seconds"),
    ("sm_measured_seconds", "present_seconds"),
    ("effective_seconds", "present_seconds"),
    ("busy_missing_seconds", "present_seconds"),
    ("allocated_missing_seconds", "present_seconds"),
    ("sm_active_seconds", "sm_measured_seconds"),
    ("effective_estimated_seconds", "effective_seconds"),
    ("busy_unmeasured_seconds", "present_seconds"),  # busy seconds, or present ones when
    # busy is not known: the cap of SM activity where it was not measured
    ("memory_busy_seconds", "present_seconds"),
    ("memory_busy_missing_seconds", "present_seconds"),
)
# Present seconds split between a measure known and its missing seconds (and between SM
# activity measured and not): each pair together is within the present seconds.
_DISJOINT = (
    ("busy_seconds", "busy_missing_seconds"),
    ("allocated_seconds", "allocated_missing_seconds"),
    ("sm_measured_seconds", "busy_unmeasured_seconds"),
    ("memory_busy_seconds", "memory_busy_missing_seconds"),
)
_FLAGGED_PARTS = (
    ("allocated_seconds", "seconds"),
    ("busy_seconds", "seconds"),
    ("sm_active_seconds", "seconds"),
    ("effective_seconds", "seconds"),
    ("effective_estimated_seconds", "effective_seconds"),
    ("busy_unmeasured_seconds", "seconds"),
    ("memory_busy_seconds", "seconds"),
)
# Every number has its place: a GpuSummary field added without one fails here, at import.
assert set(SUMMARY_FIELDS) == {
    "present_seconds",
    "lost_seconds",
    "energy_joules",
    *(part for part, _ in _PARTS),
}, "a GpuSummary number was added: give it its place in _PARTS"
assert set(FLAGGED_FIELDS) == {"seconds", *(part for part, _ in _FLAGGED_PARTS)}
# The rules by position in SUMMARY_FIELDS and FLAGGED_FIELDS, for the fast checks.
_AT = {name: i for i, name in enumerate(SUMMARY_FIELDS)}
_PRESENT, _LOST, _ENERGY = _AT["present_seconds"], _AT["lost_seconds"], _AT["energy_joules"]
_PARTS_AT = tuple((_AT[part], _AT[whole]) for part, whole in _PARTS)
_DISJOINT_AT = tuple((_AT[a], _AT[b]) for a, b in _DISJOINT)
_F_AT = {name: i for i, name in enumerate(FLAGGED_FIELDS)}
_F_PARTS_AT = tuple((_F_AT[part], _F_AT[whole]) for part, whole in _FLAGGED_PARTS)
# a flagged measure and the GPU's own (allocated within allocated, ...)
_F_OWN_AT = tuple((_F_AT[name], _AT[name]) for name in FLAGGED_FIELDS[1:])
# Read in one C call per message: the auditor's tools check every GPU summary of a ledger.
_summary_values = operator.attrgetter(*SUMMARY_FIELDS)
_flagged_values = operator.attrgetter(*FLAGGED_FIELDS)
MAX_IDENTITY = 128  # a UUID or serial longer than this is not one NVML gives


def card(uuid: str) -> str:
    """The key one card is known by, whatever the case of its UUID: "GPU-ABC" and "gpu-abc"
    are one card (NVML gives lower-case hex), so neither counts twice."""
    return uuid.casefold()


def uuid_problem(uuid: str) -> str:
    """Why `uuid` cannot name a card ("" when it can): empty, too long, or holding spaces or
    unprintable characters (which would let one card pass for two)."""
    if not uuid:
        return "has no UUID"
    # isprintable() refuses every space but " " itself (Unicode separators are not printable)
    if len(uuid) > MAX_IDENTITY or not uuid.isprintable() or " " in uuid:
        return f"has a UUID that is not one ({uuid[:40]!r})"
    return ""


def implausible_energy(gpu: pb.GpuSummary, window_seconds: float) -> str:
    """Why a GPU summary's energy is more than any GPU draws in its window; "" when it is not."""
    limit = max_joules(window_seconds)
    if not (0.0 <= gpu.energy_joules <= limit):
        return (
            f"energy_joules {gpu.energy_joules:.6g} J is not what a GPU draws in "
            f"{window_seconds:g} s (0 to {limit:.6g} J)"
        )
    return ""


def _part_ok(part: pb.GpuSummary, slack: float, tol: float, joules: float) -> bool:
    """Whether one GPU summary (or share) is possible: the fast check of the rules above."""
    values = _summary_values(part)
    # a finite sum rules out NaN and infinities; then min bounds every number from below
    if not math.isfinite(sum(values)) or min(values) < 0.0:
        return False
    top = values[_PRESENT] + tol
    if (
        values[_PRESENT] + values[_LOST] > slack
        or values[_ENERGY] > joules
        or any(values[a] > values[b] + tol for a, b in _PARTS_AT)
        or any(values[a] + values[b] > top for a, b in _DISJOINT_AT)
    ):
        return False
    padding = part.padding
    if padding and len({total.rule for total in padding}) != len(padding):
        return False  # each rule within the seconds, but added up beyond them
    for total in (part.flagged, *padding) if padding else (part.flagged,):
        flagged = _flagged_values(total)
        if not math.isfinite(sum(flagged)) or min(flagged) < 0.0:
            return False
        if max(flagged) <= tol:
            continue  # nothing flagged, and nothing claimed within it
        if (
            flagged[0] > top
            or any(flagged[a] > flagged[b] + tol for a, b in _F_PARTS_AT)
            or any(flagged[f] > values[g] + tol for f, g in _F_OWN_AT)
        ):
            return False
    return True


def _part_problem(part: pb.GpuSummary, length: float, slack: float, tol: float) -> str:
    """What is impossible in one GPU summary (or share) that _part_ok refused."""
    for name in SUMMARY_FIELDS:
        value = getattr(part, name)
        if not math.isfinite(value) or value < 0.0:
            return f"{name} must be a finite number, not negative, got {value!r}"
        if name != "energy_joules" and value > slack:
            return f"{name} must be within the window ({length:g} s), got {value!r}"
    if part.present_seconds + part.lost_seconds > slack:
        return f"present and lost seconds add up to more than the window ({length:g} s)"
    problem = implausible_energy(part, length)
    if problem:
        return problem
    for name, whole in _PARTS:
        if getattr(part, name) > getattr(part, whole) + tol:
            return (
                f"{name} ({getattr(part, name):g}) is more than {whole} ({getattr(part, whole):g})"
            )
    for a, b in _DISJOINT:
        if getattr(part, a) + getattr(part, b) > part.present_seconds + tol:
            return f"{a} and {b} add up to more than present_seconds ({part.present_seconds:g})"
    rules = [total.rule for total in part.padding]
    if len(set(rules)) != len(rules):
        return "a padding rule is named twice"
    for total in (part.flagged, *part.padding):
        what = f"padding {total.rule or '(flagged)'}"
        for name in FLAGGED_FIELDS:
            value = getattr(total, name)
            if not math.isfinite(value) or value < 0.0:
                return f"{what}: {name} must be a finite number, not negative, got {value!r}"
        if total.seconds > part.present_seconds + tol:
            return f"{what}: flags {total.seconds:g} s of {part.present_seconds:g} present"
        for name, whole in _FLAGGED_PARTS:
            if getattr(total, name) > getattr(total, whole) + tol:
                return f"{what}: {name} is more than its {whole}"
        for name in FLAGGED_FIELDS[1:]:
            if getattr(total, name) > getattr(part, name) + tol:
                return f"{what}: {name} is more than the GPU's"
    return "impossible numbers"


_uuid = operator.attrgetter("uuid")
_index = operator.attrgetter("index")
_flagged_total = operator.attrgetter("flagged")
_has_more = operator.attrgetter("shares", "padding")


def _summary_ok(gpus: Sequence[pb.GpuSummary], slack: float, tol: float, joules: float) -> bool:
    """The common case of summary_problem, column by column at C speed (the auditor's tools
    check every GPU summary of a ledger): plain GPUs (no MIG shares, no per-rule padding),
    nothing flagged, every rule holding for all of them. False sends the summary through
    the checks one by one, which also name what is wrong."""
    n = len(gpus)
    if not n:
        return True
    uuids = list(map(_uuid, gpus))
    joined = "".join(uuids)
    if (
        not all(uuids)
        or " " in joined
        or not joined.isprintable()
        or max(map(len, uuids)) > MAX_IDENTITY
        or len(set(map(str.casefold, uuids))) != n
        or len(set(map(_index, gpus))) != n
        or any(map(any, map(_has_more, gpus)))
    ):
        return False
    flagged = list(map(_flagged_values, map(_flagged_total, gpus)))
    rows = list(map(_summary_values, gpus))
    if not (
        math.isfinite(sum(map(sum, rows)) + sum(map(sum, flagged)))
        and min(map(min, rows)) >= 0.0
        and min(map(min, flagged)) >= 0.0
        and max(map(max, flagged)) <= tol
    ):
        return False
    columns = list(zip(*rows, strict=True))
    present = columns[_PRESENT]
    top = [p + tol for p in present]
    gt, add = operator.gt, operator.add
    return not (
        max(map(add, present, columns[_LOST])) > slack
        or max(columns[_ENERGY]) > joules
        or any(
            any(map(gt, columns[a], top if b == _PRESENT else [w + tol for w in columns[b]]))
            for a, b in _PARTS_AT
        )
        or any(any(map(gt, map(add, columns[a], columns[b]), top)) for a, b in _DISJOINT_AT)
    )


def _margins(length: float) -> tuple[float, float, float]:
    """(slack, tol, joules) of the rules over `length` seconds: the span a GPU's seconds may
    fill (clocks tick a little apart), the rounding each sum may carry, the most a GPU draws."""
    return length * 1.001 + 1e-6, 1e-6 * length + 1e-6, max_joules(length)


def summary_problem(summary: pb.Summary) -> str:
    """Why a summary cannot be true whoever signed it ("" when it can): a window of impossible
    length, a GPU twice or without a usable UUID, numbers out of their place (above), energy
    beyond what a GPU draws, MIG shares that do not add up. The collector refuses such a
    summary; the auditor's tools flag one a ledger holds and count none of it."""
    length = (summary.window_end_unix_nano - summary.window_start_unix_nano) / 1e9
    if not 0 < length <= MAX_SUMMARY_WINDOW_S:
        return f"summary window must be in (0, {MAX_SUMMARY_WINDOW_S:g}] s, got {length:g} s"
    slack, tol, joules = _margins(length)
    if _summary_ok(summary.gpus, slack, tol, joules):
        return ""
    indices: set[int] = set()
    cards: set[str] = set()
    for gpu in summary.gpus:
        uuid = gpu.uuid
        problem = uuid_problem(uuid)
        if problem:
            return f"summary GPU {gpu.index} {problem}"
        key = card(uuid)
        if gpu.index in indices or key in cards:
            return f"summary: GPU {gpu.index} ({uuid}) appears twice"
        indices.add(gpu.index)
        cards.add(key)
        problem = _gpu_problem(gpu, length, slack, tol, joules)
        if problem:
            return f"summary GPU {gpu.index}{problem}"
    return ""


def totals_problem(totals: pb.GpuSummary, seconds: float) -> str:
    """Why a report's totals of one GPU (GpuSample.totals) cannot be true over the report's
    `seconds` ("" when they can): the rules of a summary's GPU, over that span."""
    problem = _gpu_problem(totals, seconds, *_margins(seconds))
    return f"totals{problem}" if problem else ""


def _gpu_problem(gpu: pb.GpuSummary, length: float, slack: float, tol: float, joules: float) -> str:
    """What is impossible in one GPU's numbers over `length` seconds, with its MIG shares
    ("" when nothing is), said after the GPU's name: ": ..." or " share k: ..."."""
    shares = gpu.shares
    if not shares:  # the common case, without building the loop below
        if not _part_ok(gpu, slack, tol, joules):
            return f": {_part_problem(gpu, length, slack, tol)}"
        return ""
    for part, what in ((gpu, ""), *((s, f" share {k}") for k, s in enumerate(shares))):
        if part.shares and part is not gpu:
            return f"{what}: a share cannot have shares of its own"
        if not _part_ok(part, slack, tol, joules):
            return f"{what}: {_part_problem(part, length, slack, tol)}"
    held = sum(s.present_seconds for s in shares)
    if abs(held - gpu.present_seconds) > tol:
        return f": its shares hold {held:g} s, the GPU {gpu.present_seconds:g} s"
    # A split moves seconds (and joules) between owners, never creates them. The shares
    # may know more than the GPU (an instance's processes or SM activity, where the whole
    # GPU's are missing), never more than the GPU's known and unknown seconds together.
    columns = zip(*map(_summary_values, shares), strict=True)
    total = dict(zip(SUMMARY_FIELDS, map(sum, columns), strict=True))
    unmeasured = gpu.present_seconds - gpu.sm_measured_seconds
    for name, limit in (
        ("allocated_seconds", gpu.allocated_seconds + gpu.allocated_missing_seconds + tol),
        ("busy_seconds", gpu.busy_seconds + gpu.busy_missing_seconds + tol),
        ("sm_active_seconds", gpu.sm_active_seconds + unmeasured + tol),
        (
            "effective_seconds",
            gpu.effective_seconds + gpu.busy_unmeasured_seconds + unmeasured + tol,
        ),
        ("energy_joules", gpu.energy_joules + 1.0),
    ):
        if total[name] > limit:
            return f": its shares' {name} add up to {total[name]:g}, more than the GPU's"
    return ""


class EnergyCounter:
    """The joules one GPU drew between its samples (§6).

    NVML's total-energy counter counts from the driver's load, so the energy of a sample is
    the counter's increase since the previous sample; a smaller value means the driver
    reloaded and the counter restarted at zero, so the energy since the reload is the value
    itself. The first reading only sets the baseline. A board without the counter (before
    Volta) has its power readings integrated over the covered seconds instead.

    Either way the energy of a sample is at most max_joules of its seconds: a step beyond
    that (a counter that jumped, a "reset" to a huge value) is not energy the board drew, so
    the power reading stands in for it (else nothing), and `implausible` counts it."""

    __slots__ = ("implausible", "last_mj")

    def __init__(self) -> None:
        self.last_mj: int | None = None
        self.implausible = 0

    def joules(self, sample: pb.GpuSample, seconds: float) -> float:
        limit = sample.power_limit_watts if sample.HasField("power_limit_watts") else None
        powered = (
            sample.power_watts * seconds
            if sample.status == pb.GPU_STATUS_OK and sample.HasField("power_watts")
            else 0.0
        )
        if sample.HasField("energy_millijoules"):
            energy, last = sample.energy_millijoules, self.last_mj
            self.last_mj = energy
            if last is None:
                return 0.0
            joules = (energy - last if energy >= last else energy) / 1000.0
        else:
            joules = powered
        if joules > max_joules(seconds, limit):
            self.implausible += 1
            return powered if powered <= max_joules(seconds, limit) else 0.0
        return joules


SUPPORTED, REFUTED, UNDETERMINED = "supported", "refuted", "undetermined"


@dataclass(frozen=True, slots=True)
class Bounds:
    """A measure's figure over a capacity, and the bounds that unknown seconds leave it (§5)."""

    figure: float
    lower: float
    upper: float

    def verdict(self, claim: float) -> str:
        """A claim "at least `claim`": supported at or below the lower bound, refuted above
        the upper bound, undetermined between."""
        if claim <= self.lower + 1e-12:
            return SUPPORTED
        if claim > self.upper + 1e-12:
            return REFUTED
        return UNDETERMINED


def headline(verdict: str, without_padding: str) -> str:
    """How a claim's verdict is worded (§8), given its verdicts with and without flagged
    time: the verdict itself when flagged padding does not change it; else, first, that
    padding decides it, so that a verdict padding makes never reads as a pass."""
    if verdict == without_padding:
        return verdict
    if verdict == SUPPORTED:
        return f"supported only by flagged padding; {without_padding} without it"
    if verdict == UNDETERMINED:
        return f"undetermined only because of flagged padding; {without_padding} without it"
    return f"{verdict} only with flagged padding; {without_padding} without it"


def _clamp(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def bounds(
    values: Mapping[str, float],
    capacity: float,
    measures: tuple[str, ...] = RECORDED_MEASURES,
) -> dict[str, Bounds]:
    """Figure, lower and upper bound of each measure over `capacity` GPU-seconds (§5).

    Unobserved seconds (capacity minus present) count as 0 in the lower bound and 1 in the
    upper. Present seconds without the measure raise only the upper bound: missing seconds
    at 1, unmeasured SM activity at its cap. Estimated effective work counts in the figure,
    never in the lower bound."""
    if capacity <= 0:
        return dict.fromkeys(measures, Bounds(0.0, 0.0, 0.0))
    v = values
    unobserved = max(capacity - v["present_seconds"], 0.0)
    out: dict[str, Bounds] = {}
    for measure in measures:
        if measure == "sm_active":
            figure = lower = v["sm_active_seconds"]
            upper = lower + v["busy_unmeasured_seconds"]
        elif measure == "effective":
            figure = v["effective_seconds"]
            lower = figure - v["effective_estimated_seconds"]
            upper = lower + v["busy_unmeasured_seconds"]
        else:  # busy, allocated, memory_busy: known or missing, second by second
            figure = lower = v[f"{measure}_seconds"]
            upper = lower + v[f"{measure}_missing_seconds"]
        out[measure] = Bounds(
            _clamp(figure / capacity),
            _clamp(lower / capacity),
            _clamp((upper + unobserved) / capacity),
        )
    return out


def coverage(values: Mapping[str, float], capacity: float) -> float:
    """Present seconds over `capacity` GPU-seconds (§5)."""
    return _clamp(values["present_seconds"] / capacity) if capacity > 0 else 0.0


def measured(
    values: Mapping[str, float], capacity: float, measures: tuple[str, ...] = MEASURES
) -> dict[str, float]:
    """The share of `capacity` in which each measure was measured (effective: by GPM, not
    estimated)."""
    if capacity <= 0:
        return dict.fromkeys(measures, 0.0)
    present = values["present_seconds"]
    out = {}
    for measure in measures:
        if measure in ("sm_active", "effective"):
            seconds = values["sm_measured_seconds"]
        else:
            seconds = present - values[f"{measure}_missing_seconds"]
        out[measure] = _clamp(seconds / capacity)
    return out


UNATTRIBUTED = "(unattributed)"
NO_TENANT = "(no tenant)"


def owner(attribution: pb.Attribution) -> tuple[str, str]:
    """The tenant and job a GPU's (or a MIG share's) seconds are charged to, as every
    breakdown names them: a GPU no source attributes is "(unattributed)"; one attributed to
    a job without a tenant (a Slurm job of an unknown user, a pod found by its cgroup) is
    under "(no tenant)"."""
    tenant = attribution.tenant or (UNATTRIBUTED if not attribution.source else NO_TENANT)
    return tenant, attribution.job or UNATTRIBUTED
