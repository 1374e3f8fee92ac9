"""`gputally audit`: the auditor's commands, reading only a ledger and public keys.

`verify` checks every signature, chain and checkpoint; `report` and `census` verify first,
then recompute; `prove` gives RFC 9162 proofs against the newest checkpoint. Only what the
parsers need is imported here: an auditor's command loads neither the agent nor the live path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gputally.cli.options import (
    FAILED,
    PADDING_DECIDES,
    TIMES,
    count,
    fail,
    parse_time,
    positive,
)

from ..cli import VERDICT_EXITS, add_claim_options, add_period_options

# Ten years of daily figures: a longer report would draw nothing a person could read, and a
# typing slip (--to 1e12) would ask for millions of days.
MAX_REPORT_DAYS = 3660

if TYPE_CHECKING:
    from .figures import Rollup
    from .verify import Anchors, Receipt, Verification


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    return {"audit": _register_audit(sub)}


def _add_ledger_options(
    parser: argparse.ArgumentParser, *, receipt: bool, anchors: bool = True
) -> None:
    """What every auditor's command reads: the ledger and the public keys, and what the ledger
    is checked against (witnesses, a kept checkpoint), nothing else."""
    parser.add_argument(
        "--ledger",
        required=True,
        metavar="PATH|URL",
        help="the collector's record: its --db file, or its PostgreSQL URL (read in one "
        "read-only transaction)",
    )
    parser.add_argument(
        "--keys",
        required=True,
        metavar="DIR",
        help="the agents' <node>.pub files and the collector's collector.vkey (or an older collector.ckey)",
    )
    if anchors:
        _add_anchor_options(parser)
    if receipt:
        parser.add_argument(
            "--receipt",
            metavar="FILE",
            help="a receipt from `audit verify --receipt`: the signatures it covers are not checked again "
            "(every hash, chain and checkpoint still is; a ledger or key directory that differs from the "
            "receipt's is verified in full, and a ledger shorter than the receipt, or with other first "
            "entries, fails)",
        )


def _add_anchor_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "anchors", "what the ledger must agree with beyond its own checkpoints (docs/audit.md)"
    )
    group.add_argument(
        "--witness-key",
        action="append",
        default=[],
        metavar="VKEY",
        help="a witness's verifier key (the line `gputally witness init` printed, or a file "
        "holding it); repeat for each witness. Every cosignature by these keys must verify, "
        "and one of more entries than the ledger holds is a rollback",
    )
    group.add_argument(
        "--min-witnesses",
        type=count,
        default=0,
        metavar="N",
        help="how many of the --witness-key witnesses must have cosigned (the --against "
        "checkpoint, if given, else some checkpoint of the ledger) (default: 1 with "
        "--witness-key)",
    )
    group.add_argument(
        "--against",
        default="",
        metavar="CHECKPOINT",
        help="a checkpoint of this log kept outside the ledger: a file (a witness's latest, "
        "from `gputally witness show --origin`, or one a tenant or the auditor kept), or a "
        "witness's URL (its latest is fetched from /checkpoint?origin=...). A ledger shorter "
        "than it (rolled back) or with other first entries (forked) fails",
    )
    group.add_argument(
        "--max-age",
        type=positive,
        default=None,
        metavar="SECONDS",
        help="the --against checkpoint must have been cosigned by a --witness-key witness at "
        "most this long ago: a stale checkpoint replayed to you proves nothing of what came "
        "after it (default: any age; fetch it yourself, over https)",
    )
    group.add_argument(
        "--late-after",
        type=positive,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="a summary first recorded (witnessed, else checkpointed) this long after its "
        "window ended is counted as late: history written after the fact (default: %(default)s)",
    )
    group.add_argument(
        "--enrolment",
        default="",
        metavar="DIR",
        help="the auditor's signed enrolment records (`gputally enrolment sign`): every key that "
        "signed summaries must have one for its node, and every GPU seen must be listed "
        "(docs/enrolment.md) (default: not checked)",
    )
    group.add_argument(
        "--enrolment-key",
        default="",
        metavar="VKEY",
        help="the enrolment key's verifier key (a file or the line), which the auditor holds",
    )
    group.add_argument(
        "--enrolled-by",
        default="",
        metavar="TIME",
        help="report keys and GPUs enrolled after this time (default: the report's --from; "
        "for `audit verify`, not checked)",
    )


def _register_audit(sub: Any) -> argparse.ArgumentParser:
    audit: argparse.ArgumentParser = sub.add_parser(
        "audit",
        help="verify the ledger and report on utilization claims, from the ledger and public keys alone",
        description="Auditor's commands. They read only the ledger file and the public keys.",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)
    check = audit_sub.add_parser(
        "verify",
        help="check every signature, every node's chain and every checkpoint",
        description="Check every summary's signature against the enrolled keys, every node's chain "
        "(gaps, reorders, duplicates), every summary's plausibility (window, seconds and energy a GPU "
        "can have; no GPU's windows overlapping, from one node or two), and the Merkle tree against "
        "the signed checkpoints. Exits 0 only when all holds; otherwise lists every kind of finding "
        "(signature, chain gap, rewrite, overlap, duplicate identity, implausible value, checkpoint) "
        "with its count and first examples, and exits 1.",
    )
    _add_ledger_options(check, receipt=False)
    check.add_argument("--json", action="store_true", help="print the result as JSON, for machines")
    check.add_argument(
        "--examples",
        type=count,
        default=3,
        metavar="N",
        help="examples shown per kind of finding (default: %(default)s)",
    )
    check.add_argument(
        "--receipt",
        metavar="FILE",
        help="when all holds, write a receipt here: the log's size and root and the keys' digest, "
        "so that `audit report --receipt FILE` need not check these signatures again",
    )
    check.set_defaults(handler=run_audit_verify)
    report = audit_sub.add_parser(
        "report",
        help="verify, then write an evidence package for a period: report.html, report.json, CSV "
        "tables and a manifest of their hashes",
        description="Verify the ledger (as `audit verify`), then recompute every figure for the period from "
        "its summaries and write into --out a self-contained report.html (verdicts on every measure, "
        "limitations and the evidence to cite on its first screen; plots per day, week and phase), "
        "report.json with everything, CSV tables (daily, weeks, phases, nodes, models, tenants, jobs, "
        "gpus, node_days) and MANIFEST.sha256 of them all (docs/report.md).",
        epilog=f"{VERDICT_EXITS} {TIMES}",
    )
    _add_ledger_options(report, receipt=True)
    add_period_options(report, required=True)
    report.add_argument(
        "--expected-gpus",
        type=count,
        required=True,
        metavar="N",
        help="the inventory the claim is about",
    )
    add_claim_options(report)
    report.add_argument(
        "--phase",
        action="append",
        default=[],
        metavar="NAME=FROM..TO",
        help="a named part of the period with its own figures and verdicts, its bounds marked on every "
        "plot, e.g. acceptance=2026-03-01..2026-06-01; within --from/--to, names unique; repeatable",
    )
    report.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    report.set_defaults(handler=run_audit_report)
    census = audit_sub.add_parser(
        "census",
        help="the inventory the ledger saw: cards per model, serials, duplicate identities, peak throughput",
        description="Verify the ledger, then list the cards it saw in the period: per model, with serials "
        "and UUIDs, duplicate identities (one card reported by two nodes), and the theoretical peak dense "
        "BF16 throughput per model and in total, to set against a claimed capacity.",
        epilog=TIMES,
    )
    _add_ledger_options(census, receipt=True)
    add_period_options(census, required=False, what="the ledger")
    census.add_argument("--json", action="store_true", help="print JSON, with the full card list")
    census.set_defaults(handler=run_audit_census)
    prove = audit_sub.add_parser(
        "prove",
        help="RFC 9162 inclusion and consistency proofs against a signed checkpoint",
        description="Print, as JSON, the newest signed checkpoint and the proofs asked for: that an "
        "entry is in the log (--entry), and that the log as it was at an earlier size is a prefix of "
        "it (--since, e.g. the size of a checkpoint you kept). Each proof is checked before it is "
        "printed; check it again with any RFC 9162 implementation.",
    )
    _add_ledger_options(prove, receipt=False, anchors=False)
    prove.add_argument("--entry", type=count, metavar="ID", help="the entry (its id) to prove")
    prove.add_argument(
        "--since", type=count, metavar="SIZE", help="the earlier size to prove consistency from"
    )
    prove.add_argument(
        "--node",
        default="",
        help="prove every entry of this node (a tenant's proof that its summaries are in the log)",
    )
    prove.add_argument(
        "--checkpoint",
        default="",
        metavar="FILE",
        help="prove against this checkpoint of the log (one you hold, e.g. a witness's cosigned "
        "latest) instead of the ledger's newest",
    )
    prove.set_defaults(handler=run_audit_prove)
    return audit


# -- audit -----------------------------------------------------------------------------------


def _load_receipt(args: argparse.Namespace) -> Receipt | None:
    """The receipt named by --receipt (None without one); ReceiptError when unusable."""
    from .verify import Receipt

    return Receipt.load(Path(args.receipt)) if args.receipt else None


def _anchors(args: argparse.Namespace) -> Anchors:
    """The Anchors of --witness-key, --min-witnesses, --against and --late-after;
    AnchorError (one line) when one cannot be used."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from ..record.ledger import read_collector_key
    from ..record.witnessing import NoRedirect, parse_witness_key
    from .verify import AnchorError, Anchors

    keys: list[tuple[str, bytes]] = []
    for text in args.witness_key:
        try:
            keys.append(parse_witness_key(text))
        except (OSError, ValueError) as error:
            raise AnchorError(f"--witness-key {text[:80]}: {error}") from None
    if args.min_witnesses > len(keys):
        raise AnchorError(
            f"--min-witnesses {args.min_witnesses}: only {len(keys)} --witness-key given"
        )
    against: str | None = None
    if args.against.startswith(("http://", "https://")):
        url = args.against.rstrip("/")
        try:
            if "/checkpoint" not in urllib.parse.urlsplit(url).path:
                origin, _ = read_collector_key(Path(args.keys))
                url += "/checkpoint?" + urllib.parse.urlencode({"origin": origin})
            # no redirects: the checkpoint comes from the witness asked, or not at all
            opener = urllib.request.build_opener(NoRedirect())
            with opener.open(url, timeout=30) as answer:
                against = answer.read(1 << 20).decode()
        except (urllib.error.URLError, OSError, UnicodeDecodeError, ValueError) as error:
            raise AnchorError(f"--against {url}: {getattr(error, 'reason', error)}") from None
        host = urllib.parse.urlsplit(url).hostname or ""
        if url.startswith("http://") and host not in ("127.0.0.1", "::1", "localhost"):
            print(
                f"  warning: --against over plain http ({url}): anyone on the path could "
                "answer with a stale checkpoint; use https, or --max-age",
                file=sys.stderr,
            )
    elif args.against:
        try:
            against = Path(args.against).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise AnchorError(f"--against {args.against}: {error}") from None
    if args.against and not (against or "").strip():
        raise AnchorError(f"--against {args.against}: empty: no checkpoint to verify against")
    if args.max_age is not None and not args.against:
        raise AnchorError("--max-age applies to the --against checkpoint: give one")
    enrolment = None
    if args.enrolment or args.enrolment_key:
        from .enrolment import EnrolmentError, load_enrolment

        if not (args.enrolment and args.enrolment_key):
            raise AnchorError("--enrolment and --enrolment-key go together")
        try:
            enrolment = load_enrolment(Path(args.enrolment), args.enrolment_key)
        except EnrolmentError as error:
            raise AnchorError(str(error)) from None
    enrolled_by = None
    if args.enrolled_by:
        try:
            enrolled_by = parse_time(args.enrolled_by, time.time())
        except ValueError as error:
            raise AnchorError(f"--enrolled-by: {error}") from None
    return Anchors(
        tuple(keys),
        args.min_witnesses,
        against,
        args.late_after,
        enrolment,
        enrolled_by,
        args.max_age,
        time.time(),
    )


def _say_anchors(verification: Verification, args: argparse.Namespace) -> None:
    """What the witnesses vouch for, and how late the summaries were recorded (stderr)."""
    for cosigned in verification.cosignatures:
        print(
            f"  witness {cosigned['witness']}: cosigned {cosigned['size']:,} entries at "
            f"{_utc(float(str(cosigned['time'])))}",
            file=sys.stderr,
        )
    if args.witness_key:
        rest = verification.entries - verification.witnessed
        print(
            f"  witnessed: {verification.witnessed:,} entries; {rest:,} after them rest on the "
            "collector's signature alone",
            file=sys.stderr,
        )
    recording = verification.recording
    if recording.get("summaries"):
        late = int(str(recording["late"]))
        print(
            f"  recorded ({recording['source']}): median {_duration(recording['median_delay_s'])}"
            f", 99% within {_duration(recording['p99_delay_s'])}, longest "
            f"{_duration(recording['max_delay_s'])} after their windows; {late:,} late "
            f"(after {_duration(recording['late_after_s'])})"
            + (
                f"; {recording['early']:,} recorded before their windows ended"
                if recording.get("early")
                else ""
            ),
            file=sys.stderr,
        )


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(value: object) -> str:
    seconds = float(str(value))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _say_receipt(
    verification: Verification, receipt: Receipt | None, args: argparse.Namespace
) -> None:
    if verification.trusted and receipt is not None:
        print(
            f"  signatures of the first {verification.trusted:,} entries: by the receipt "
            f"{args.receipt} (verified {receipt.verified_at})",
            file=sys.stderr,
        )
    elif receipt is not None:
        print(f"  receipt not used: {verification.receipt_note}", file=sys.stderr)


def _verified(
    args: argparse.Namespace, command: str, *, rollup: Rollup | None = None
) -> tuple[Verification, Receipt | None] | int:
    """Verify the ledger as `audit verify` does (adding its figures into `rollup` on the way),
    with the --receipt given. The verification when it holds; else the exit code, said."""
    from gputally.v1.signing import KeyFileError

    from ..record.store import RecordError
    from .verify import UNCOUNTED, AnchorError, ReceiptError, verify_ledger

    try:
        receipt = _load_receipt(args)
        verification = verify_ledger(
            args.ledger,
            Path(args.keys),
            progress=lambda n: print(f"  {n:,} entries checked", file=sys.stderr, flush=True),
            rollup=rollup,
            receipt=receipt,
            anchors=_anchors(args),
        )
    except RecordError as error:
        return fail(command, str(error), error.exit_code)
    except (KeyFileError, ReceiptError, AnchorError) as error:
        return fail(command, str(error))
    _say_receipt(verification, receipt, args)
    _say_anchors(verification, args)
    if not verification.trustworthy:
        print(f"gputally {command}: the ledger does not verify ({_failed_at(verification)})")
        return FAILED
    for kind, found in verification.by_kind().items():
        # summaries a collector should have refused: left out of every figure, and said
        print(
            f"  finding: {len(found):,} {kind} ({found[0].message})"
            + ("; not counted in any figure" if kind in UNCOUNTED else ""),
            file=sys.stderr,
        )
    return verification, receipt


def _failed_at(verification: Verification) -> str:
    from .verify import INTEGRITY

    first = next(p for p in verification.problems if p.kind in INTEGRITY)
    where = f"entry {first.entry}" if first.entry is not None else "log"
    return f"{first.kind} at {where}: {first.message}"


def run_audit_verify(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError

    from ..record.store import RecordError, display
    from .verify import AnchorError, Receipt, verify_ledger

    def progress(entries: int) -> None:
        print(f"  ... {entries:,} entries checked", file=sys.stderr, flush=True)

    try:
        result = verify_ledger(
            args.ledger, Path(args.keys), progress=progress, anchors=_anchors(args)
        )
    except RecordError as error:
        return fail("audit verify", str(error), error.exit_code)
    except (KeyFileError, AnchorError) as error:
        return fail("audit verify", str(error))
    if not args.json:
        _say_anchors(result, args)
    receipt_path = ""
    if result.ok and args.receipt:
        receipt = Receipt.of(result, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        try:
            receipt.write(Path(args.receipt))
        except OSError as error:
            return fail("audit verify", f"--receipt: {error}")
        receipt_path = args.receipt
    if args.json:
        print(
            json.dumps(
                {
                    "ledger": display(args.ledger),
                    "verified": result.ok,
                    "entries": result.entries,
                    "nodes": len(result.nodes),
                    "checkpoints": result.checkpoints,
                    "origin": result.origin,
                    "root": result.root.hex(),
                    "findings": result.findings(args.examples),
                    "receipt": receipt_path or None,
                    "checkpoint": result.checkpoint_note,
                    "cosignatures": result.cosignatures,
                    "witnessed": result.witnessed,
                    "recording": result.recording,
                },
                indent=2,
            )
        )
        return 0 if result.ok else FAILED
    print(
        f"ledger {display(args.ledger)}: {result.entries:,} entries from {len(result.nodes)} "
        f"nodes, {result.checkpoints} checkpoints"
    )
    if not result.ok:
        kinds = result.by_kind()
        total = sum(len(found) for found in kinds.values())
        print(f"FAILED: {total:,} findings of {len(kinds)} kinds")
        for kind, found in kinds.items():
            print(f"  {kind}: {len(found):,}")
            for problem in found[: args.examples]:
                where = f"entry {problem.entry}" if problem.entry is not None else "log"
                print(f"    {where}: {problem.message}")
            if len(found) > args.examples:
                print(f"    ... and {len(found) - args.examples:,} more")
        return FAILED
    print(
        "verified: every signature, every chain, every summary's plausibility and every checkpoint holds"
    )
    if args.against:
        print(f"anchored: the ledger extends the checkpoint given ({args.against})")
    if args.witness_key:
        print(
            f"witnessed: {len(result.cosignatures)} of the {len(args.witness_key)} witnesses given "
            f"cosigned it, up to {result.witnessed:,} of its {result.entries:,} entries"
        )
    if args.enrolment:
        print(f"enrolled: every key and GPU has the auditor's enrolment record ({args.enrolment})")
    if receipt_path:
        print(
            f"receipt: {receipt_path} (size {result.entries:,}, root {result.root.hex()[:16]}...)"
        )
    return 0


def run_audit_report(args: argparse.Namespace) -> int:
    from ..record.store import is_url
    from . import report as report_module
    from .figures import Rollup, padding_figures, simulated_lines

    def say(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    now = time.time()
    try:
        start, end = parse_time(args.start, now), parse_time(args.end, now)
    except ValueError as error:
        return fail("audit report", str(error))
    if end <= start:
        return fail("audit report", "--to must be after --from")
    if end - start > MAX_REPORT_DAYS * 86400:
        return fail(
            "audit report",
            f"a report draws every day of its period, {MAX_REPORT_DAYS:,} at most; ask for a "
            "shorter one (`gputally query` gives the figures of any period)",
        )
    try:
        phases = report_module.parse_phases(args.phase, start, end, now)
    except ValueError as error:
        return fail("audit report", f"--phase {error}")
    say("verifying the ledger and adding up its figures ...")
    rollup = Rollup(start, end, args.expected_gpus, phases)
    verified = _verified(args, "audit report", rollup=rollup)
    if isinstance(verified, int):
        return verified
    verification, receipt = verified
    say(f"verified {verification.entries:,} entries; writing the report ...")
    try:
        answer = report_module.build(
            rollup,
            args.measure,
            args.claim,
            verification,
            receipt.verified_at if receipt is not None and verification.trusted else "",
            ledger=None if is_url(args.ledger) else Path(args.ledger),
            keys=Path(args.keys),
            # the command line as typed; none when main() was called with other arguments
            # than the process's (in-process), rather than a wrong one
            command=sys.argv if sys.argv[1:3] == ["audit", "report"] else (),
        )
        paths = report_module.write(answer, Path(args.out), args.measure)
    except OSError as error:
        return fail("audit report", f"--out {args.out}: {error}")
    for line in simulated_lines(answer)[:1]:  # before anything else: not measurements
        print(line)
    if answer["padding_decides"]:  # said first, and never a pass (docs/utilization.md §8)
        print(f"claim {args.measure} >= {args.claim:.2%}: {answer['headline_verdict'].upper()}")
        print(f"{padding_figures(answer)}, coverage {answer['coverage']:.1%}")
    else:
        verdict = f", claim {args.claim:.2%}: {answer['verdict']}" if args.claim is not None else ""
        print(
            f"{args.measure} {answer['figure']:.2%} [{answer['lower']:.2%}, {answer['upper']:.2%}], "
            f"coverage {answer['coverage']:.1%}{verdict}"
        )
    for line in report_module.summary_lines(answer):
        print(line)
    for path in paths:
        print(f"wrote {path}")
    return PADDING_DECIDES if answer["padding_decides"] else 0


def run_audit_prove(args: argparse.Namespace) -> int:
    from gputally.v1.signing import KeyFileError

    from ..record.store import RecordError
    from .verify import ProofRefusedError, ProofRequestError, prove

    if args.entry is None and args.since is None and not args.node:
        return fail("audit prove", "give --entry ID, --node NODE, --since SIZE, or several")
    try:
        checkpoint = Path(args.checkpoint).read_text() if args.checkpoint else ""
    except (OSError, UnicodeDecodeError) as error:
        return fail("audit prove", f"--checkpoint {args.checkpoint}: {error}")
    try:
        answer = prove(
            args.ledger,
            Path(args.keys),
            entry=args.entry,
            since=args.since,
            checkpoint=checkpoint,
            node=args.node,
        )
    except ProofRefusedError as error:
        return fail("audit prove", str(error), FAILED)
    except RecordError as error:
        return fail("audit prove", str(error), error.exit_code)
    except (KeyFileError, ProofRequestError) as error:
        return fail("audit prove", str(error))
    print(json.dumps(answer, indent=2))
    return 0


def run_audit_census(args: argparse.Namespace) -> int:
    from ..record.store import Record, RecordError
    from . import census as census_module

    verified = _verified(args, "audit census")
    if isinstance(verified, int):
        return verified
    try:
        record = Record(args.ledger, readonly=True)
    except RecordError as error:
        return fail("audit census", str(error), error.exit_code)
    try:
        span = record.span() or (0, 0)
        now = time.time()
        try:
            start = parse_time(args.start, now) if args.start else span[0] / 1e9
            end = parse_time(args.end, now) if args.end else span[1] / 1e9
        except ValueError as error:
            return fail("audit census", str(error))
        result = census_module.census(census_module.take(record, start, end))
    except RecordError as error:
        return fail("audit census", str(error), error.exit_code)
    finally:
        record.close()
    print(json.dumps(result, indent=2) if args.json else census_module.render(result))
    return 0
