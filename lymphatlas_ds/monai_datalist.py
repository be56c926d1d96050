"""Materialize a release as NIfTI files plus a MONAI datalist (decathlon format) with the release's folds.

``materialize_monai(release, out_dir)`` writes::

    OUT_DIR/
        imagesTr/<case>_ct.nii.gz      CT (int16 HU)
        imagesTr/<case>_pet.nii.gz     PET (float32 SUVbw), on the CT grid
        labelsTr/<case>.nii.gz         uint8 {0: background, 1: lesion}
        imagesTs/, labelsTs/           the release's test split, the same way
        datalist.json                  MONAI's decathlon-style datalist (below)

``datalist.json`` holds ``"training"`` (every train case, with its ``"fold"``: the release's
patient-grouped fold, the one it validates in) and ``"test"``; each entry has ``"image"`` (CT and PET,
two channels), ``"ct"``, ``"pet"``, ``"label"``, ``"case_id"`` and ``"subject_id"``. Paths are
relative to the folder, as :func:`monai.data.load_decathlon_datalist` expects. The NIfTI encoding is
the nnU-Net materializer's (:func:`lymphatlas_ds.nnunet._nifti_bytes`: the release's affine, sform
and qform code 1, gzip without a time stamp), so the same release gives the same bytes.

The folder is written whole into a hidden temporary sibling and renamed into place: a failure
leaves ``OUT_DIR`` as it was. An existing ``OUT_DIR`` is refused unless ``force``.

Example:
    >>> from monai.data import load_decathlon_datalist  # doctest: +SKIP
    >>> materialize_monai(Release("lymphatlas"), "monai_data")  # doctest: +SKIP
    >>> train = load_decathlon_datalist("monai_data/datalist.json", True, "training")  # doctest: +SKIP
    >>> val0 = [d for d in train if d["fold"] == 0]  # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lymphatlas_ds import schema
from lymphatlas_ds._io import replace_folder
from lymphatlas_ds._target import Layout, check_target
from lymphatlas_ds.errors import LymphAtlasError
from lymphatlas_ds.nnunet import _checked_case, _nifti_bytes, check_grouped, nnunet_splits
from lymphatlas_ds.schema import Config, Split

DATALIST = "datalist.json"
_DIRS = {Split.TRAIN: ("imagesTr", "labelsTr"), Split.TEST: ("imagesTs", "labelsTs")}


class MonaiMaterializeError(LymphAtlasError):
    """The MONAI folder cannot be written as asked (it exists, no training cases)."""


def _monai_member(_folder: Path, rel: str) -> bool:
    parts = rel.split("/")
    if len(parts) == 1:
        return rel == DATALIST
    return len(parts) == 2 and parts[0] in {d for pair in _DIRS.values() for d in pair}


MONAI_LAYOUT = Layout("a MONAI dataset (datalist.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)", _monai_member)


@dataclass
class MonaiResult:
    """What a run wrote."""

    folder: Path
    datalist: Path
    n_training: int
    n_test: int
    n_folds: int
    bytes_written: int

    def describe(self) -> str:
        return (f"{self.folder}: {self.n_training} training cases in {self.n_folds} folds + {self.n_test} test "
                f"cases, {self.bytes_written / 1e6:.1f} MB; datalist {self.datalist}")


def _entry(case_id: str, split: Split, subject_id: str | None) -> dict:
    images, labels = _DIRS[split]
    ct, pet = f"{images}/{case_id}_ct.nii.gz", f"{images}/{case_id}_pet.nii.gz"
    return {"image": [ct, pet], "ct": ct, "pet": pet, "label": f"{labels}/{case_id}.nii.gz",
            "case_id": case_id, "subject_id": subject_id}


def _write_cases(release, tmp: Path, config: Config, split: Split, *, workers: int, gzip_level: int,
                 progress: Callable[[], None] | None) -> tuple[list[str], int]:
    """Encode and write one split's cases into ``tmp``; returns the case ids and the bytes written."""
    for d in _DIRS[split]:
        (tmp / d).mkdir()
    ids, total = [], 0
    with cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="materialize-monai") as pool:
        for record in release.iter_cases(config, split):
            ct, pet, label, affine = _checked_case(record)
            entry = _entry(record.case_id, split, None)
            jobs = [pool.submit(_nifti_bytes, a, affine, gzip_level=gzip_level) for a in (ct, pet, label)]
            for rel, job in zip((entry["ct"], entry["pet"], entry["label"]), jobs):
                data = job.result()
                (tmp / rel).write_bytes(data)
                total += len(data)
            ids.append(record.case_id)
            if progress is not None:
                progress()
    return ids, total


def datalist(release, train_ids: Iterable[str], test_ids: Iterable[str], config: Config) -> dict:
    """The decathlon-style datalist: training entries with the release's folds, test entries."""
    cases = release.splits.get("cases", {})
    train_ids, test_ids = sorted(train_ids), sorted(test_ids)
    folds = nnunet_splits(release.splits, train_ids)  # checks every case has a fold and the grouping
    fold_of = {c: k for k, fold in enumerate(folds) for c in fold["val"]}
    check_grouped([{"train": train_ids, "val": test_ids}], {c: cases[c].get("subject_id") for c in train_ids + test_ids})
    training = [{**_entry(c, Split.TRAIN, cases[c].get("subject_id")), "fold": fold_of[c]} for c in train_ids]
    test = [_entry(c, Split.TEST, cases[c].get("subject_id")) for c in test_ids]
    version = release.manifest.get("version")
    return {
        "name": schema.DATASET_NAME,
        "description": f"{schema.DATASET_NAME} {version} ({config.value}): whole-body FDG PET/CT, lymphoma lesions; "
                       "PET resampled onto the CT grid, PET in SUVbw",
        "release": version,
        "config": config.value,
        "modality": {"0": "CT", "1": "PT"},
        "labels": {str(v): k for k, v in schema.LABELS.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "n_folds": len(folds),
        "folds": "each training entry's 'fold' is the release's patient-grouped fold it validates in",
        "training": training,
        "test": test,
    }


def materialize_monai(
    release, out_dir: str | os.PathLike, *, config: Config | str = Config.ALL, force: bool = False,
    workers: int = 4, gzip_level: int = 1, progress: Callable[[], None] | None = None,
) -> MonaiResult:
    """Write the release (one config) as NIfTI files and ``datalist.json`` into ``out_dir``, atomically.

    ``progress()`` is called after each case. Raises :class:`MonaiMaterializeError` when ``out_dir``
    exists (unless ``force``) or the config has no training case; the target guard
    (:func:`lymphatlas_ds._target.check_target`) refuses a WORK, a source, a mirror or the release read.
    """
    config = Config(config)
    out = Path(out_dir)
    protected = {"the release read": getattr(release, "path", None)}
    check_target(out, command="materialize --monai", protected=protected, layout=MONAI_LAYOUT, replace=force)
    if out.exists() and not force:
        raise MonaiMaterializeError(f"{out} already exists; pass --force to replace it, or choose a new folder")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        train_ids, size = _write_cases(release, tmp, config, Split.TRAIN, workers=workers, gzip_level=gzip_level,
                                       progress=progress)
        if not train_ids:
            raise MonaiMaterializeError(f"the release has no training cases for config {config.value!r}")
        test_ids, test_size = _write_cases(release, tmp, config, Split.TEST, workers=workers,
                                           gzip_level=gzip_level, progress=progress)
        doc = datalist(release, train_ids, test_ids, config)
        (tmp / DATALIST).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, permissions, an I/O error: a message, no traceback
            raise MonaiMaterializeError(
                f"cannot write {getattr(e, 'filename', None) or tmp}: {e.strerror or e}. Nothing was written: {out} "
                "is as it was. Free disk space (or fix the permissions) and run the same command again") from e
        raise
    return MonaiResult(out, out / DATALIST, len(train_ids), len(test_ids), doc["n_folds"], size + test_size)
