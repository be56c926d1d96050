"""`python -m builder withdraw WORK ID... [--reason CODE]`: remove exams (consent withdrawn, deleted) from WORK.

An ID is an exam id as in the source, a case id, or a subject id (``LP-...``: every exam of that
patient, listed before anything is removed). Their case folders, QC pictures, id_map rows and
failure entries go; the reason is recorded in ``WORK/withdrawals.json`` and the next release built
from WORK lists the cases as removed with it in its CHANGELOG. Versions already published keep
them: see the README, "Withdrawing a patient".
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="WORK folder written by `python -m builder convert`")
    parser.add_argument("exams", nargs="+", metavar="ID",
                        help="exam ids as in the source, case ids, or subject ids (every exam of the patient)")
    from builder.release.changes import WITHDRAWAL_REASONS

    parser.add_argument("--reason", choices=WITHDRAWAL_REASONS, default=None,
                        help="why, as a code (the next release's CHANGELOG shows it per case, so never free text)")
    parser.add_argument("--wait", action="store_true", help="if another run holds WORK, wait for it")


def expand_subjects(id_map: dict[str, dict], ids: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Replace each subject id by its exams; returns the ids to withdraw and {subject id: its exams}."""
    by_subject: dict[str, list[str]] = {}
    for exam_id, row in sorted(id_map.items()):
        if row.get("subject_id"):
            by_subject.setdefault(row["subject_id"], []).append(exam_id)
    out: list[str] = []
    expanded: dict[str, list[str]] = {}
    for x in ids:
        if x in by_subject and x not in id_map:
            expanded[x] = by_subject[x]
            out += by_subject[x]
        else:
            out.append(x)
    return out, expanded


def run(args: argparse.Namespace) -> int:
    from builder.convert.pipeline import read_id_map, withdraw_exams
    from builder.release.changes import record_withdrawals
    from lymphatlas_ds._lock import work_lock

    id_map = read_id_map(args.work)
    exams, expanded = expand_subjects(id_map, args.exams)
    for subject, subject_exams in expanded.items():
        listing = ", ".join(f"{e} (case {id_map[e].get('case_id') or 'none'})" for e in subject_exams)
        print(f"patient {subject}: {len(subject_exams)} exam(s) to withdraw: {listing}")
    if not (args.work / "cases").is_dir():  # withdraw_exams says what is wrong
        withdraw_exams(args.work, exams, wait_for_lock=args.wait)
    with work_lock(args.work, wait=args.wait):  # one hold for the removal and its record (the lock re-enters)
        removed = withdraw_exams(args.work, exams, wait_for_lock=args.wait)
        record_withdrawals(args.work, {c: (id_map.get(e) or {}).get("subject_id", "") for e, c in removed.items()
                                       if c}, reason=args.reason)
    for exam_id, case_id in removed.items():
        print(f"withdrew {exam_id}" + (f": removed case {case_id}" if case_id else " (it had no case)"))
    print(f"next: build a new release from {args.work} (its CHANGELOG lists the removed cases with the reason) and "
          "publish it; published versions still hold the cases (README: Withdrawing a patient)")
    return 0
