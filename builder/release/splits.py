"""Patient-grouped, diagnosis-stratified, burden-balanced splits that never move a published case.

A release has a held-out ``test`` split of patients and ``N_FOLDS`` cross-validation folds on
the rest (``train``); a release with fewer training patients than that has one fold per training
patient (so every fold validates on at least one patient and trains on at least one), and one with
a single training patient has none (``n_folds`` 0, its training cases in fold ``NO_FOLD``).
Every exam of a patient lands in the same split and fold, so no patient is on both sides of a
fold or of the test boundary (nnU-Net's own random per-case split would do that). Within each
diagnosis (HL / NHL) the test split takes ``round(TEST_FRACTION * patients)`` (at least one
patient once there are two), sampled systematically along the lesion-burden order
from a seeded offset, so it spans light to heavy cases; the other patients go, heaviest first,
into the fold with the fewest patients, ties broken by the least burden so far, then by a seeded
hash of the patient. The result is deterministic and independent of input order.

An update release (``previous=``) keeps every published case where it was, puts a known patient's
new exams in that patient's bin, and places only new patients, with the same rule, so the
balance is kept as the dataset grows. The fold count never shrinks in an update; a grown small
release gets more folds (up to ``N_FOLDS``), filled by the new patients first.

Example:
    >>> cases = [SplitCase("LA-1", "LP-1", "HL", 12.0), SplitCase("LA-2", "LP-2", "HL", 3.0)]
    >>> placed = assign_splits(cases, seed=0)
    >>> sorted(placed) == ["LA-1", "LA-2"]
    True
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lymphatlas_ds._io import read_json
from lymphatlas_ds.errors import SchemaError
from lymphatlas_ds.manifest import SPLITS_NAME
from lymphatlas_ds.schema import N_FOLDS, TEST_FRACTION, Diagnosis, Split

log = logging.getLogger(__name__)

TEST_FOLD = -1
NO_FOLD = -1
"""The fold of a training case in a release without folds (a single training patient)."""
MIN_FOLDS = 2
"""Fewer training patients than this: no cross-validation folds (a fold needs a train and a val patient)."""
_NO_FOLD_BIN = -1


@dataclass(frozen=True)
class SplitCase:
    """What the split needs to know about one case (exam)."""

    case_id: str
    subject_id: str
    diagnosis: str
    burden: float  # lesion burden, e.g. total metabolic tumour volume in ml


@dataclass(frozen=True)
class Placement:
    """Where a case goes: ``split`` test with fold -1, or train with fold 0..n_folds-1."""

    subject_id: str
    diagnosis: str
    split: Split
    fold: int

    def to_dict(self) -> dict[str, Any]:
        return {"subject_id": self.subject_id, "diagnosis": self.diagnosis, "split": self.split.value, "fold": self.fold}


@dataclass(frozen=True)
class SplitPlan:
    """Every case's placement and the number of cross-validation folds of the release."""

    placements: dict[str, Placement]
    n_folds: int


def fold_count(n_train_patients: int, *, max_folds: int = N_FOLDS, at_least: int = 0) -> int:
    """How many folds ``n_train_patients`` training patients get: ``max_folds``, or one per patient
    when there are fewer, none below ``MIN_FOLDS``; never fewer than ``at_least`` (a published release's).

    Example:
        >>> [fold_count(n) for n in (1, 2, 3, 5, 40)]
        [0, 2, 3, 5, 5]
    """
    k = min(max_folds, n_train_patients) if n_train_patients >= MIN_FOLDS else 0
    return max(k, at_least)


def _bin_of(split: Split, fold: int) -> int:
    # Bin 0 is test, bins 1..n are folds 0..n-1; a training patient of a release without folds has no bin yet.
    if split is Split.TEST:
        return 0
    return _NO_FOLD_BIN if fold == NO_FOLD else fold + 1


def _placement_of(bin_index: int) -> tuple[Split, int]:
    if bin_index == _NO_FOLD_BIN:
        return Split.TRAIN, NO_FOLD
    return (Split.TEST, TEST_FOLD) if bin_index == 0 else (Split.TRAIN, bin_index - 1)


def _tie_key(seed: int, subject_id: str, bin_index: int = -1) -> str:
    return hashlib.sha256(f"{seed}:{subject_id}:{bin_index}".encode()).hexdigest()


@dataclass(frozen=True)
class _Patients:
    """The patients of this release: their exams, diagnosis stratum and total lesion burden."""

    exams: dict[str, list[SplitCase]]
    stratum: dict[str, str]
    burden: dict[str, float]


class _Bins:
    """Per-diagnosis fill of the test bin (0) and the fold bins (1..n_folds): patients and burden."""

    def __init__(self, n_folds: int, seed: int) -> None:
        self.n_folds, self.seed = n_folds, seed
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (n_folds + 1))
        self.burdens: dict[str, list[float]] = defaultdict(lambda: [0.0] * (n_folds + 1))

    def add(self, key: str, bin_index: int, burden: float) -> None:
        """Count one patient of diagnosis ``key`` and its burden in a bin."""
        self.counts[key][bin_index] += 1
        self.burdens[key][bin_index] += burden

    def lightest_fold(self, key: str, subject: str) -> int:
        """The fold bin a new patient of diagnosis ``key`` goes to."""
        fill, load = self.counts[key], self.burdens[key]
        # Heaviest first into the fold with fewest patients of this diagnosis, then fewest
        # patients of any diagnosis (so a small release leaves no fold empty), then least
        # burden: a balanced snake.
        return min(
            range(1, self.n_folds + 1),
            key=lambda b: (
                fill[b],
                sum(c[b] for c in self.counts.values()),
                round(load[b], 9),
                _tie_key(self.seed, subject, b),
            ),
        )


def _group_by_subject(cases: list[SplitCase]) -> dict[str, list[SplitCase]]:
    """Each patient's exams, after checking every diagnosis is HL or NHL."""
    by_subject: dict[str, list[SplitCase]] = defaultdict(list)
    for case in cases:
        try:
            Diagnosis(case.diagnosis)
        except ValueError as e:
            raise SchemaError(f"case {case.case_id}: diagnosis {case.diagnosis!r} is not one of HL, NHL") from e
        by_subject[case.subject_id].append(case)
    return by_subject


def _published_bins(
    previous: Mapping[str, Mapping[str, Any]], n_folds: int
) -> tuple[dict[str, int], dict[str, str]]:
    """The bin and diagnosis of every patient of the previous release, checked for consistency."""
    subject_bin: dict[str, int] = {}
    subject_diagnosis: dict[str, str] = {}
    for case_id, entry in sorted(previous.items()):
        subject, fold = entry["subject_id"], int(entry["fold"])
        split = Split(entry["split"])
        if split is Split.TRAIN and not (0 <= fold < n_folds or fold == NO_FOLD):
            raise SchemaError(
                f"previous splits: case {case_id} is in train with fold {fold}, outside 0..{n_folds - 1} "
                f"(or {NO_FOLD} in a release without folds)"
            )
        b = _bin_of(split, fold)
        if subject_bin.setdefault(subject, b) != b:
            raise SchemaError(
                f"previous splits put patient {subject} in two places (case {case_id}); "
                "the previous release is inconsistent and cannot be extended"
            )
        subject_diagnosis.setdefault(subject, entry["diagnosis"])
    return subject_bin, subject_diagnosis


def _check_stable_ids(cases: list[SplitCase], previous: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a published case that now belongs to another patient."""
    for case in cases:
        if case.case_id in previous and previous[case.case_id]["subject_id"] != case.subject_id:
            raise SchemaError(
                f"case {case.case_id} belonged to patient {previous[case.case_id]['subject_id']} in the previous "
                f"release and to {case.subject_id} now; case and subject ids must be stable across releases"
            )


def _patients(by_subject: dict[str, list[SplitCase]], subject_diagnosis: Mapping[str, str]) -> _Patients:
    """Each patient's stratum (its published diagnosis, else its first exam's) and total burden."""
    stratum = {s: subject_diagnosis.get(s) or exams[0].diagnosis for s, exams in by_subject.items()}
    burden = {s: sum(max(c.burden, 0.0) for c in exams) for s, exams in by_subject.items()}
    return _Patients(by_subject, stratum, burden)


def _test_positions(
    n_fresh: int, n_total: int, n_in_test: int, *, test_fraction: float, seed: int, key: str
) -> set[int]:
    """Which of a diagnosis's new patients, by position along the burden order, go to test."""
    # The test split takes round(fraction * patients) of each diagnosis, at least one patient
    # once there are two, so that a small first release already has both splits.
    target = 0 if n_total < 2 else max(1, round(test_fraction * n_total))
    need = min(max(0, target - n_in_test), n_fresh)
    if not need:
        return set()
    # Systematic sampling along the burden order: the test split spans light to heavy cases.
    step = n_fresh / need
    offset = int(_tie_key(seed, key)[:8], 16) / 16**8 * step
    return {min(int(offset + i * step), n_fresh - 1) for i in range(need)}


def _place_in_test(patients: _Patients, new_subjects: list[str], subject_bin: dict[str, int], bins: _Bins,
                   test_fraction: float) -> None:
    """Put each diagnosis's share of the new patients in the test split; fills ``subject_bin``."""
    for key in sorted(set(patients.stratum.values())):
        fresh = [s for s in new_subjects if patients.stratum[s] == key]
        if not fresh:
            continue
        n_total = sum(1 for s in patients.exams if patients.stratum[s] == key)
        in_test = _test_positions(
            len(fresh), n_total, bins.counts[key][0], test_fraction=test_fraction, seed=bins.seed, key=key
        )
        for position, subject in enumerate(fresh):
            if position in in_test:
                subject_bin[subject] = 0
                bins.add(key, 0, patients.burden[subject])


def _place_in_folds(patients: _Patients, to_place: list[str], subject_bin: dict[str, int], bins: _Bins) -> None:
    """Put each training patient without a fold, diagnosis by diagnosis, in the lightest fold of ``bins``."""
    for key in sorted(set(patients.stratum.values())):
        for subject in (s for s in to_place if patients.stratum[s] == key):
            best = bins.lightest_fold(key, subject) if bins.n_folds else _NO_FOLD_BIN
            subject_bin[subject] = best
            if best != _NO_FOLD_BIN:
                bins.add(key, best, patients.burden[subject])


def _placements(
    cases: list[SplitCase], subject_bin: Mapping[str, int], previous: Mapping[str, Mapping[str, Any]]
) -> dict[str, Placement]:
    """Each case's placement from its patient's bin, checking no published case moved."""
    placements = {}
    for case in cases:
        split, fold = _placement_of(subject_bin[case.subject_id])
        placements[case.case_id] = Placement(case.subject_id, case.diagnosis, split, fold)
    # A training case of a release without folds gets its first fold now: that is no move.
    before = {c: (e["split"], int(e["fold"])) for c, e in previous.items() if c in placements}
    moved = [c for c, was in before.items()
             if was != (placements[c].split.value, placements[c].fold) and was != (Split.TRAIN.value, NO_FOLD)]
    if moved:  # cannot happen by construction; a guard for future edits
        raise RuntimeError(f"published cases would move folds: {moved[:5]}")
    return placements


def plan_splits(
    cases: Iterable[SplitCase],
    *,
    seed: int = 0,
    n_folds: int = N_FOLDS,
    test_fraction: float = TEST_FRACTION,
    previous: Mapping[str, Mapping[str, Any]] | None = None,
) -> SplitPlan:
    """Place every case in test or a train fold, and choose the fold count (:func:`fold_count`).

    ``n_folds`` is the most folds a release gets. ``previous`` is the ``"cases"`` mapping of an
    earlier release's ``splits.json``: those cases keep their split and fold, and a known patient's
    new exams join that patient's bin; its fold count is kept or grows.

    Example:
        >>> plan = plan_splits([SplitCase(f"LA-{i}", f"LP-{i}", "NHL", 1.0) for i in range(4)], seed=3)
        >>> plan.n_folds, sorted(p.fold for p in plan.placements.values())
        (3, [-1, 0, 1, 2])
    """
    cases = sorted(cases, key=lambda c: c.case_id)
    if not 0 < test_fraction < 1 or n_folds < MIN_FOLDS:
        raise ValueError(f"need 0 < test_fraction < 1 and n_folds >= {MIN_FOLDS}, got {test_fraction}, {n_folds}")
    previous = previous or {}
    by_subject = _group_by_subject(cases)
    subject_bin, subject_diagnosis = _published_bins(previous, n_folds)
    _check_stable_ids(cases, previous)
    patients = _patients(by_subject, subject_diagnosis)
    # Training patients of a release without folds: kept in train, placed in a fold once there are folds.
    unfolded = [s for s in by_subject if subject_bin.get(s) == _NO_FOLD_BIN]
    for subject in unfolded:
        del subject_bin[subject]

    # Per-diagnosis fill of each bin, counting every patient of this release (kept or new).
    bins = _Bins(n_folds, seed)
    for subject in sorted(by_subject):
        if subject in subject_bin:
            bins.add(patients.stratum[subject], subject_bin[subject], patients.burden[subject])
    order = {s: (-patients.burden[s], _tie_key(seed, s)) for s in by_subject}
    new_subjects = sorted((s for s in by_subject if s not in subject_bin and s not in unfolded), key=order.__getitem__)
    _place_in_test(patients, new_subjects, subject_bin, bins, test_fraction)

    # The test split does not depend on the fold count; the folds do (one per training patient in a small release).
    to_fold = sorted((s for s in by_subject if s not in subject_bin), key=order.__getitem__)
    kept_in_folds = [s for s in by_subject if subject_bin.get(s, 0) > 0]
    used = 1 + max((int(e["fold"]) for e in previous.values() if e["split"] == Split.TRAIN.value), default=-1)
    bins.n_folds = fold_count(len(kept_in_folds) + len(to_fold), max_folds=n_folds, at_least=used)
    _place_in_folds(patients, to_fold, subject_bin, bins)

    placements = _placements(cases, subject_bin, previous)
    log.info(
        "placed %d cases of %d patients (%d new patients) in test and %d folds",
        len(placements), len(by_subject), len(new_subjects), bins.n_folds,
    )
    return SplitPlan(placements, bins.n_folds)


def assign_splits(
    cases: Iterable[SplitCase],
    *,
    seed: int = 0,
    n_folds: int = N_FOLDS,
    test_fraction: float = TEST_FRACTION,
    previous: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Placement]:
    """The placements of :func:`plan_splits`: ``{case_id: Placement}``.

    Example:
        >>> a = assign_splits([SplitCase("LA-1", "LP-1", "NHL", 1.0)], seed=3)
        >>> a["LA-1"].split.value in ("train", "test")
        True
    """
    return plan_splits(cases, seed=seed, n_folds=n_folds, test_fraction=test_fraction, previous=previous).placements


def splits_document(
    placements: Mapping[str, Placement], *, version: str, seed: int, n_folds: int | None = None
) -> dict[str, Any]:
    """The ``splits.json`` content (docs/contracts.md section 4), cases sorted by id.

    ``n_folds`` is :attr:`SplitPlan.n_folds`; without it, one more than the highest training fold.
    """
    if n_folds is None:
        n_folds = 1 + max((p.fold for p in placements.values() if p.split is Split.TRAIN), default=-1)
    return {
        "version": version,
        "seed": seed,
        "n_folds": n_folds,
        "cases": {case_id: placements[case_id].to_dict() for case_id in sorted(placements)},
    }


def read_splits(release_dir: str | Path) -> dict[str, Any]:
    """Read ``<release_dir>/splits.json`` (the previous release of an update)."""
    path = Path(release_dir) / SPLITS_NAME
    doc = read_json(path, what=f"the splits of a LymphAtlas release ({release_dir} should be a release folder)",
                    fix="pass the previous release's folder, or rebuild that release")
    if not isinstance(doc.get("cases"), dict):
        raise SchemaError(f"{path} has no 'cases' mapping; it was not written by the LymphAtlas builder")
    return doc
