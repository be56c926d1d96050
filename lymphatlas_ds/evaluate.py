"""Any model's predictions against a release's labels: the paper's Tables 2-3 and lesion-level metrics.

``lymphatlas evaluate PRED --release R --out DIR`` calls :func:`evaluate` then :func:`write_report`.
PRED is a folder of one prediction per case, named by case id: ``<case_id>.nii.gz`` / ``.nii``
(:func:`lymphatlas_ds.predict.save_prediction` writes these; nnU-Net's output folder has the same
names, since ``materialize`` names nnU-Net cases by case id) or ``<case_id>.dcm`` / ``.seg.dcm``
DICOM SEG (read with highdicom and placed on the case's grid by its plane positions).

Which cases: ``fold=k`` the validation cases of fold k, ``split="test"`` the test split,
``split="train"`` every train case (a merged cross-validation folder); each of these must be
predicted (the missing ones are listed). Without either, the predicted cases are evaluated
(each must be a case of the release's config). Every figure comes from
:mod:`lymphatlas_ds.metrics` (nnU-Net's voxel metrics, autoPET's lesion metrics).

Bad input stops with :class:`~lymphatlas_ds.errors.EvaluationError` before anything is written: a
prediction on another grid or orientation (the case, both shapes and affines), missing or unknown
cases (listed), values outside {0, 1}.

Written into ``out`` (temp + rename each; CSV at full precision, sorted by case and lesion):

    cases.csv        per case: ids, diagnosis, split, fold, dice, iou, fn, fp, tp, n_pred, n_ref,
                     fp_volume_ml, fn_volume_ml, n_ref_lesions, n_detected, n_pred_components,
                     n_fp_components, detection_sensitivity
    folds.csv        per group (all, HL, NHL) and row (Fold k, Mean, All cases, Test): the means of
                     the case columns as nnU-Net's foreground_mean, and lesions pooled
    lesions.csv      per reference lesion: case, lesion_id, voxels, volume_ml, suv_max, detected, ...
    detection.csv    detection rate per lesion volume bin and per SUVmax bin
    report.md        the tables above for reading
    detection_by_volume.png

Example:
    >>> result = evaluate("pred", "./mirror", fold=0)  # doctest: +SKIP
    >>> result.folds["all"]["Fold 0"]["dice"]  # doctest: +SKIP
    0.91
    >>> write_report(result, "report")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymphatlas_ds import metrics as M
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.errors import EvaluationError
from lymphatlas_ds.schema import LESIONS_CONFIG, Config, Split

log = logging.getLogger(__name__)

VOXEL_COLUMNS: tuple[str, ...] = ("dice", "iou", "fn", "fp", "tp", "n_pred", "n_ref")
"""Tables 2-3 columns (nnU-Net's Dice, IoU, FN, FP, TP, n_pred, n_ref), lower case in the CSVs."""
LESION_COLUMNS: tuple[str, ...] = ("fp_volume_ml", "fn_volume_ml", "n_ref_lesions", "n_detected",
                                   "n_pred_components", "n_fp_components", "detection_sensitivity")
CASE_COLUMNS: tuple[str, ...] = ("case_id", "subject_id", "diagnosis", "split", "fold", *VOXEL_COLUMNS, *LESION_COLUMNS)
FOLD_COLUMNS: tuple[str, ...] = ("group", "row", "n_cases", *VOXEL_COLUMNS, "fp_volume_ml", "fn_volume_ml",
                                 "n_ref_lesions", "n_detected", "n_fp_components", "detection_sensitivity")
LESION_ROW_COLUMNS: tuple[str, ...] = ("case_id", "diagnosis", "split", "fold", "lesion_id", "voxels", "volume_ml",
                                       "suv_max", "detected", "overlap_voxels", "lesion_source")
VOLUME_BINS_ML: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 5.0, 10.0, 50.0, math.inf)
"""Lesion volume bins (ml) of the detection-rate table and plot."""
SUV_BINS: tuple[float, ...] = (0.0, 2.5, 5.0, 10.0, 20.0, math.inf)
"""SUVmax bins of the detection-rate table."""
NIFTI_ENDINGS = (".nii.gz", ".nii")
SEG_ENDINGS = (".seg.dcm", ".dcm")
AFFINE_ATOL_MM = 1e-3
"""Affines agree when every entry is within this (NIfTI stores them as float32)."""


@dataclass
class Evaluation:
    """What :func:`evaluate` found: rows per case and per lesion, aggregates per group and fold."""

    release: str
    version: str
    config: str
    selection: str
    cases: list[dict[str, Any]] = field(default_factory=list)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    folds: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    detection: list[dict[str, Any]] = field(default_factory=list)

    def case(self, case_id: str) -> dict[str, Any]:
        for row in self.cases:
            if row["case_id"] == case_id:
                return row
        raise KeyError(case_id)

    @property
    def missed(self) -> list[dict[str, Any]]:
        """The reference lesions no predicted voxel touches."""
        return [row for row in self.lesions if not row["detected"]]


# ---------------------------------------------------------------------------------------- predictions


def find_predictions(pred: str | os.PathLike) -> dict[str, Path]:
    """``{case_id: file}`` of a predictions folder (NIfTI or DICOM SEG, named by case id), or of one file.

    Other files (nnU-Net's dataset.json, plans.json, summary.json, .npz) are ignored.

    Example:
        >>> find_predictions("nnUNet_results/.../fold_0/validation")  # doctest: +SKIP
        {'LA-0000001': PosixPath('.../LA-0000001.nii.gz'), ...}
    """
    pred = Path(pred)
    if not pred.exists():
        raise EvaluationError(f"{pred}: no such file or folder of predictions")
    files = [pred] if pred.is_file() else sorted(p for p in pred.iterdir() if p.is_file())
    found: dict[str, Path] = {}
    for path in files:
        case_id = _case_id_of(path)
        if case_id is None:
            continue
        if case_id in found:
            raise EvaluationError(
                f"case {case_id} has two predictions, {found[case_id].name} and {path.name} in {pred}: keep one"
            )
        found[case_id] = path
    if not found:
        raise EvaluationError(
            f"{pred}: no prediction found; expected <case_id>.nii.gz (or .nii, or a DICOM SEG <case_id>.dcm) per case"
        )
    return found


def _case_id_of(path: Path) -> str | None:
    name = path.name
    for ending in NIFTI_ENDINGS + SEG_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for a bad file
        raise EvaluationError(f"{path}: cannot read it as NIfTI ({e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(f"{path}: a prediction is a 3-D label volume, this file has shape {data.shape}")
    return data.transpose(2, 1, 0), np.asarray(img.affine, dtype=np.float64)


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_XYZ_TO_SRC = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
"""Index (x=column, y=row, z=slice) -> highdicom's (slice, row, column)."""


def _read_seg(path: Path, ref_shape_zyx: tuple[int, ...], ref_affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM SEG as ``(array_zyx, affine_ras)``, placed on the reference grid when it is that grid up to
    frame order (highdicom ``match_geometry``); otherwise its own grid (then refused as another grid)."""
    try:
        import highdicom as hd
    except ImportError as e:
        raise EvaluationError(f"{path}: reading DICOM SEG needs highdicom (`pip install highdicom`, or the client's `seg` extra)") from e
    try:
        seg = hd.seg.segread(str(path))
        volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    except Exception as e:
        raise EvaluationError(f"{path}: cannot read it as a DICOM SEG of a regular 3-D grid ({e})") from e
    own = _LPS_TO_RAS @ np.asarray(volume.affine, dtype=float) @ _XYZ_TO_SRC
    reference = hd.Volume(np.zeros(ref_shape_zyx, np.uint8), _LPS_TO_RAS @ ref_affine_ras @ np.linalg.inv(_XYZ_TO_SRC),
                          coordinate_system="PATIENT")
    try:
        matched = volume.match_geometry(reference)
    except Exception:  # not the reference grid up to flips/permutations/crops: reported as a grid mismatch
        return np.asarray(volume.array), own
    return np.asarray(matched.array), ref_affine_ras


# ---------------------------------------------------------------------------------------- reference lesions
# Where the reference lesions of a case come from: the release's lesion table when it has one (joined by
# (case_id, lesion id), the ids of its instance labelling), else computed here from the label and the PET
# (metrics.label_lesions, the same labelling). Kept in these two functions so the release's own lesion
# instances can replace the computation in one place.


def _release_lesion_rows(release: Any) -> dict[tuple[str, int], dict[str, Any]] | None:
    """The release's per-lesion rows keyed by (case_id, lesion id), or None when it has no lesion table."""
    files = release.manifest.get("files", {})
    candidates = sorted(p for p in files if p.startswith(f"{LESIONS_CONFIG}/") and p.endswith(".parquet"))
    if not candidates:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(release.file(p)) for p in candidates]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for row in pa.concat_tables(tables, promote_options="default").to_pylist():
        lesion_id = row.get("lesion_id")
        if row.get("case_id") is None or lesion_id is None:
            continue
        rows[(str(row["case_id"]), int(lesion_id))] = {k: v for k, v in row.items() if not isinstance(v, (bytes, dict))}
    return rows or None


def _reference_lesions(
    case_id: str, hits: M.LesionHits, *, voxel_ml: float,
    pet: Callable[[], np.ndarray], table: Mapping[tuple[str, int], Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    """One row per reference lesion: id, voxels, volume_ml, suv_max (+ the release table's columns)."""
    from scipy import ndimage

    rows = []
    suv_max: dict[int, float] | None = None
    for lesion_id, voxels, overlap in zip(hits.lesion_ids.tolist(), hits.voxels.tolist(), hits.overlap.tolist()):
        joined = table.get((case_id, int(lesion_id))) if table is not None else None
        if joined is not None and joined.get("voxels") is not None and int(joined["voxels"]) != int(voxels):
            # another labelling (connectivity) than metrics.label_lesions: the ids name other lesions
            log.warning("case %s lesion %s: %s voxels in the release's lesion table, %s here; not joined",
                        case_id, lesion_id, joined["voxels"], voxels)
            joined = None
        row: dict[str, Any] = {"lesion_id": int(lesion_id), "voxels": int(voxels),
                               "volume_ml": float(voxels) * voxel_ml}
        if joined is not None:
            row.update({k: v for k, v in joined.items() if k not in ("case_id", "lesion_id", "id", "voxels")})
            row["lesion_source"] = "release"
        else:
            if suv_max is None:  # the PET is read only when a lesion is not in the release's table
                ids = hits.lesion_ids.tolist()
                suv_max = dict(zip(ids, (float(v) for v in ndimage.maximum(pet()[hits.box], hits.instances, ids))))
            row["suv_max"] = suv_max[int(lesion_id)]
            row["lesion_source"] = "computed"
        row["detected"] = bool(overlap > 0)
        row["overlap_voxels"] = int(overlap)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- evaluation


def _expected_cases(release: Any, config: Config, fold: int | None, split: str | None) -> list[str] | None:
    if fold is not None:
        return release.fold_case_ids(fold, "val", config=config)
    if split is not None:
        try:
            return release.case_ids(config, Split(str(split).lower()))
        except ValueError as e:
            raise EvaluationError(f"unknown split {split!r}; expected one of {[s.value for s in Split]}") from e
    return None


def _check_cases(predicted: Mapping[str, Path], expected: list[str] | None, known: set[str], where: str,
                 pred_dir: str) -> list[str]:
    if expected is not None and not expected:
        raise EvaluationError(f"{where} holds no case: nothing to evaluate (`lymphatlas info` lists the folds and splits)")
    unknown = sorted(set(predicted) - known)
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} prediction(s) in {pred_dir} name no case of {where}: {', '.join(unknown)}. "
            "Files are named <case_id>.nii.gz; check --release, --config and --version"
        )
    if expected is None:
        return sorted(predicted)
    missing = [c for c in expected if c not in predicted]
    if missing:
        raise EvaluationError(
            f"{len(missing)} case(s) of {where} have no prediction in {pred_dir}: {', '.join(missing)}. "
            "Predict them (or leave out --fold/--split to evaluate only the predicted cases)"
        )
    extra = sorted(set(predicted) - set(expected))
    if extra:
        log.warning("%d prediction(s) outside %s are not evaluated: %s", len(extra), where, ", ".join(extra))
    return sorted(expected)


def _fmt_affine(a: np.ndarray) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:.4g}" for v in r) + "]" for r in np.asarray(a)) + "]"


def _check_grid(case_id: str, path: Path, shape_zyx: tuple[int, ...], affine: np.ndarray,
                ref_shape_zyx: tuple[int, ...], ref_affine: np.ndarray) -> None:
    if tuple(shape_zyx) == tuple(ref_shape_zyx) and np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_ATOL_MM):
        return
    raise EvaluationError(
        f"case {case_id}: prediction {path} is not on the release's grid for that case: "
        f"prediction shape (x, y, z) {tuple(shape_zyx[::-1])}, affine {_fmt_affine(affine)}"
        f"{' (the grid its DICOM SEG frames span)' if path.name.endswith(SEG_ENDINGS) else ''}; "
        f"release label shape {tuple(ref_shape_zyx[::-1])}, affine {_fmt_affine(ref_affine)}. "
        "Write predictions on the case's grid and orientation (lymphatlas_ds.save_prediction does), "
        "or resample them onto it (nearest neighbour) before evaluating"
    )


def _check_values(case_id: str, path: Path, array: np.ndarray) -> np.ndarray:
    values = np.unique(array)
    if values.size and not np.all(np.isin(values, (0, 1))):
        shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (", ..." if values.size > 8 else "")
        raise EvaluationError(
            f"case {case_id}: prediction {path} holds values {{{shown}}}; a binary label {{0, 1}} is expected "
            "(threshold probabilities, map a multi-class output to lesion = 1)"
        )
    return array != 0


def evaluate(
    predictions: str | os.PathLike,
    release: Any,
    *,
    config: Config | str = Config.ALL,
    fold: int | None = None,
    split: str | None = None,
    version: str | None = None,
    connectivity: int = M.CONNECTIVITY,
    progress: Callable[[int], object] | None = None,
) -> Evaluation:
    """Evaluate a predictions folder against a release (folder, mirror, Hub id, or a ``Release``).

    Raises :class:`EvaluationError` (nothing computed is kept) on a missing, unknown, off-grid or
    non-binary prediction. See the module docstring for the selection and the figures.

    Example:
        >>> ev = evaluate("pred", "./mirror", fold=0)  # doctest: +SKIP
        >>> [(r["case_id"], r["lesion_id"], round(r["volume_ml"], 2)) for r in ev.missed]  # doctest: +SKIP
        [('LA-0000001', 2, 0.41)]
    """
    from lymphatlas_ds.reader import Release, _as_config, _diagnoses

    if not isinstance(release, Release):
        release = Release.from_source(release, version=version)
    config = _as_config(config)
    if fold is not None and split is not None:
        raise EvaluationError("give --fold (a fold's validation cases) or --split, not both")
    predicted = find_predictions(predictions)
    wanted = {d.value for d in _diagnoses(config)}
    known = {c for c, e in release.splits["cases"].items() if e.get("diagnosis") in wanted}  # no shard read
    selection = f"fold {fold} (validation)" if fold is not None else f"split {split}" if split else "predicted cases"
    where = f"release {release.version} config {config.value}" + (f", {selection}" if fold is not None or split else "")
    case_ids = _check_cases(predicted, _expected_cases(release, config, fold, split), known, where, str(predictions))
    table = _release_lesion_rows(release)
    result = Evaluation(str(release.path), release.version, config.value, selection)
    entries = release.splits["cases"]
    for i, case_id in enumerate(case_ids):
        entry = entries.get(case_id, {})
        ids = {"case_id": case_id, "subject_id": entry.get("subject_id"), "diagnosis": entry.get("diagnosis"),
               "split": entry.get("split"), "fold": int(entry["fold"]) if entry.get("split") == "train" else None}
        case_row, lesion_rows = _evaluate_case(release, case_id, predicted[case_id], connectivity=connectivity,
                                               table=table)
        result.cases.append({**ids, **case_row})
        result.lesions.extend({**{k: ids[k] for k in ("case_id", "diagnosis", "split", "fold")}, **r} for r in lesion_rows)
        if progress is not None:
            progress(i + 1)
    result.folds = fold_table(result.cases)
    result.detection = detection_table(result.lesions)
    return result


def _evaluate_case(release: Any, case_id: str, path: Path, *, connectivity: int,
                   table: Mapping[tuple[str, int], Mapping[str, Any]] | None) -> tuple[dict, list[dict]]:
    reference, ref_affine = release.read_volume(case_id, "label")
    if path.name.endswith(NIFTI_ENDINGS):
        array, affine = _read_nifti(path)
    else:
        array, affine = _read_seg(path, reference.shape, ref_affine)
    _check_grid(case_id, path, array.shape, affine, reference.shape, ref_affine)
    prediction = _check_values(case_id, path, array)
    voxel_ml = float(np.prod(np.linalg.norm(ref_affine[:3, :3], axis=0))) / 1000.0
    voxels = M.voxel_metrics(reference, prediction)
    hits = M.lesion_hits(reference, prediction, voxel_volume_ml=voxel_ml, connectivity=connectivity)
    lesion_rows = _reference_lesions(case_id, hits, voxel_ml=voxel_ml,
                                     pet=lambda: release.read_volume(case_id, "pet")[0], table=table)
    m = hits.metrics
    row = {c: voxels[n] for c, n in zip(VOXEL_COLUMNS, M.METRICS)}
    row.update(fp_volume_ml=m.fp_volume_ml, fn_volume_ml=m.fn_volume_ml, n_ref_lesions=m.n_ref_lesions,
               n_detected=m.n_detected, n_pred_components=m.n_pred_components, n_fp_components=m.n_fp_components,
               detection_sensitivity=m.sensitivity)
    return row, lesion_rows


def _aggregate(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of Tables 2-3 (nnU-Net's foreground_mean over ``cases``) with the lesions pooled."""
    out: dict[str, Any] = {"n_cases": len(cases)}
    out.update(M.mean_over_cases(cases, VOXEL_COLUMNS))
    lesions = M.summarize(
        M.LesionMetrics(c["fp_volume_ml"], c["fn_volume_ml"], c["n_ref_lesions"], c["n_detected"],
                        c["n_pred_components"], c["n_fp_components"]) for c in cases)
    out.update(fp_volume_ml=lesions["fp_volume_ml"], fn_volume_ml=lesions["fn_volume_ml"],
               n_ref_lesions=lesions["n_ref_lesions"], n_detected=lesions["n_detected"],
               n_fp_components=lesions["n_fp_components"], detection_sensitivity=lesions["sensitivity"])
    return out


def fold_table(cases: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {row: aggregate}}``: groups ``all`` and each diagnosis present; rows ``Fold k`` (train
    cases of fold k), ``Mean`` (of the fold rows, as the paper's Mean row), ``All cases`` (pooled train
    cases, as nnU-Net's cross-validation summary) and ``Test`` (test-split cases)."""
    groups: dict[str, list[dict[str, Any]]] = {"all": list(cases)}
    diagnoses = sorted({c["diagnosis"] for c in cases if c.get("diagnosis")})
    if len(diagnoses) > 1:
        for d in diagnoses:
            groups[d] = [c for c in cases if c.get("diagnosis") == d]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, rows in groups.items():
        train = [c for c in rows if c.get("split") == "train"]
        test = [c for c in rows if c.get("split") == "test"]
        table: dict[str, dict[str, Any]] = {}
        folds = sorted({c["fold"] for c in train})
        for k in folds:
            table[f"Fold {k}"] = _aggregate([c for c in train if c["fold"] == k])
        if len(folds) > 1:
            fold_rows = [table[f"Fold {k}"] for k in folds]
            mean = {"n_cases": sum(r["n_cases"] for r in fold_rows)}
            for col in FOLD_COLUMNS[3:]:
                values = [float(r[col]) for r in fold_rows]
                mean[col] = float(np.mean(values))
            table["Mean"] = mean
        if train:
            table["All cases"] = _aggregate(train)
        if test:
            table["Test"] = _aggregate(test)
        out[name] = table
    return out


def _bin_label(lo: float, hi: float) -> str:
    return f">= {lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def detection_table(lesions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Detection rate of the reference lesions per volume bin (ml) and per SUVmax bin."""
    out = []
    for by, column, edges in (("volume_ml", "volume_ml", VOLUME_BINS_ML), ("suv_max", "suv_max", SUV_BINS)):
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = [r for r in lesions if r.get(column) is not None and lo <= float(r[column]) < hi]
            hit = sum(1 for r in inside if r["detected"])
            out.append({"by": by, "bin": _bin_label(lo, hi), "low": lo, "high": hi, "n_lesions": len(inside),
                        "n_detected": hit, "detection_rate": hit / len(inside) if inside else math.nan})
    return out


# ---------------------------------------------------------------------------------------- report


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def _csv(rows: Iterable[Mapping[str, Any]], columns: Iterable[str]) -> str:
    columns = list(columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _md(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def to_markdown(result: Evaluation) -> str:
    """The report page: Tables 2-3 per group, detection by volume and SUVmax, the missed lesions."""
    lines = [f"# Evaluation against LymphAtlas release {result.version} (config {result.config})", "",
             f"{len(result.cases)} cases ({result.selection}); lesions are {M.CONNECTIVITY}-connected components "
             "(autoPET definitions); Dice and IoU as nnU-Net computes them (a case without any foreground is "
             "skipped for those two).", ""]
    head = ["n", "Dice", "IoU", "FN", "FP", "TP", "n_pred", "n_ref", "FP vol (ml)", "FN vol (ml)", "lesions",
            "detected", "sensitivity"]
    cols = ["n_cases", *VOXEL_COLUMNS, "fp_volume_ml", "fn_volume_ml", "n_ref_lesions", "n_detected",
            "detection_sensitivity"]
    for group, table in result.folds.items():
        lines += [f"## {group}", "", "| | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for name, row in table.items():
            cells = [_md(row[c], 5 if c in ("dice", "iou") else 3 if c.endswith(("_ml", "sensitivity")) else 2)
                     if c not in ("n_cases", "n_ref_lesions", "n_detected") else str(row[c]) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Detection rate", "", "| by | bin | lesions | detected | rate |", "|---|---|---:|---:|---:|"]
    for r in result.detection:
        lines.append(f"| {r['by']} | {r['bin']} | {r['n_lesions']} | {r['n_detected']} | {_md(r['detection_rate'], 3)} |")
    lines += ["", "![detection rate by lesion volume](detection_by_volume.png)", ""]
    missed = result.missed
    lines += [f"## Missed lesions ({len(missed)})", ""]
    if missed:
        lines += ["| case | lesion | volume (ml) | SUVmax | diagnosis | fold |", "|---|---:|---:|---:|---|---:|"]
        for r in missed:
            lines.append(f"| {r['case_id']} | {r['lesion_id']} | {_md(r['volume_ml'], 3)} | {_md(r.get('suv_max'), 2)} "
                         f"| {r.get('diagnosis') or ''} | {'' if r.get('fold') is None else r['fold']} |")
    return "\n".join(lines) + "\n"


def plot_detection(result: Evaluation) -> bytes:
    """PNG bytes: detection rate of the reference lesions per volume bin, with the lesion count on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.detection if r["by"] == "volume_ml"]
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
        x = np.arange(len(rows))
        rates = [0.0 if math.isnan(r["detection_rate"]) else r["detection_rate"] for r in rows]
        ax.bar(x, rates, color="tab:blue")
        for xi, r in zip(x, rows):
            ax.text(xi, min(1.0, (0.0 if math.isnan(r["detection_rate"]) else r["detection_rate"])) + 0.02,
                    f"{r['n_detected']}/{r['n_lesions']}", ha="center", fontsize=8)
        ax.set_xticks(x, [r["bin"] for r in rows])
        ax.set_ylim(0, 1.12)
        ax.set_xlabel("reference lesion volume (ml)")
        ax.set_ylabel("detection rate")
        ax.set_title(f"Detection rate by lesion volume (release {result.version}, {result.config}, {result.selection})",
                     fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
    return buf.getvalue()


def write_report(result: Evaluation, out: str | os.PathLike) -> list[Path]:
    """Write cases.csv, folds.csv, lesions.csv, detection.csv, report.md and detection_by_volume.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fold_rows = [{"group": g, "row": name, **row} for g, table in result.folds.items() for name, row in table.items()]
    extra = sorted({k for r in result.lesions for k in r} - set(LESION_ROW_COLUMNS))
    lesions = sorted(result.lesions, key=lambda r: (r["case_id"], r["lesion_id"]))
    written = [
        write_atomic(out / "cases.csv", _csv(sorted(result.cases, key=lambda r: r["case_id"]), CASE_COLUMNS)),
        write_atomic(out / "folds.csv", _csv(fold_rows, FOLD_COLUMNS)),
        write_atomic(out / "lesions.csv", _csv(lesions, [*LESION_ROW_COLUMNS, *extra])),
        write_atomic(out / "detection.csv", _csv(result.detection, ("by", "bin", "low", "high", "n_lesions",
                                                                    "n_detected", "detection_rate"))),
        write_atomic(out / "report.md", to_markdown(result)),
        write_atomic(out / "detection_by_volume.png", plot_detection(result)),
    ]
    return written


__all__ = ["Evaluation", "detection_table", "evaluate", "find_predictions", "fold_table", "to_markdown",
           "write_report"]
