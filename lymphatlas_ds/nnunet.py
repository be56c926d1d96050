"""Materialize a release as an nnU-Net v2 raw dataset with the release's patient-grouped folds.

``materialize_nnunet(release, raw_dir)`` writes::

    RAW_DIR/Dataset<ID>_<Name>/
        imagesTr/<case>_0000.nii.gz    CT (int16 HU)        channel "CT": nnU-Net's CT normalization
        imagesTr/<case>_0001.nii.gz    PET (float32 SUVbw)  channel --pet-channel-name (default "PET": z-score)
        labelsTr/<case>.nii.gz         uint8 {0: background, 1: lesion}
        imagesTs/, labelsTs/           the release's test split (only with include_test / test_labels)
        dataset.json                   channel_names, labels, numTraining, file_ending + release version, citation
        splits_final.json              the release's patient-grouped folds (5; fewer in a small release), in
                                       nnU-Net's format; only folds with a training and a validation case
        lymphatlas_materialize.json    what was written from which release (idempotency, --force checks)

and, when ``preprocessed_dir`` is given, also ``preprocessed_dir/Dataset<ID>_<Name>/splits_final.json``.

Why the split file matters: without ``splits_final.json`` nnU-Net draws its own 5 folds at random
*per case*; a patient with two exams then lands on both sides of a fold and the validation Dice
is inflated. The folds here come from the release's ``splits.json`` (grouped by patient) and are
checked once more: no subject may be in the train and the validation list of one fold.

Normalization is chosen by nnU-Net from the channel *name* (``"CT"`` -> clip to the foreground
percentiles + global z-score; ``"noNorm"``, ``"rescale_to_0_1"``, ``"zscore"``; anything else ->
per-image z-score). The PET channel name is therefore an explicit option; naming PET ``"CT"``
(as some autoPET scripts do) applies CT statistics to SUV values and is logged as a warning.

Example:
    >>> from lymphatlas_ds.reader import Release
    >>> result = materialize_nnunet(Release("lymphatlas"), "nnUNet_raw", dataset_id=501, config="hl")  # doctest: +SKIP
    >>> result.dataset_dir.name
    'Dataset501_LymphAtlasHL'
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from lymphatlas_ds import schema
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds._target import NNUNET_LAYOUT, check_target
from lymphatlas_ds.errors import LymphAtlasError, SchemaError
from lymphatlas_ds.schema import Config, Split

logger = logging.getLogger(__name__)

STATE_FILE = "lymphatlas_materialize.json"
SPLITS_FILE = "splits_final.json"
FILE_ENDINGS = (".nii.gz", ".nii")
CITATION = (
    "LymphAtlas: A Unified Multimodal Lymphoma Imaging Repository Delivering AI-Enhanced Diagnostic Insights"
)
"""Cited in dataset.json when the release's manifest carries no citation of its own."""

CT_CHANNEL = 0
PET_CHANNEL = 1
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


class MaterializeError(LymphAtlasError):
    """The nnU-Net dataset cannot be written as asked (existing different dataset, bad option, bad case)."""


class _CaseRecord(Protocol):  # lymphatlas_ds.reader.CaseRecord (docs/contracts.md section 5)
    case_id: str
    meta: dict
    ct: np.ndarray
    pet: np.ndarray
    label: np.ndarray
    affine: np.ndarray


class _Release(Protocol):
    manifest: dict
    splits: dict

    def iter_cases(self, config: Config | str, split: Split | str) -> Iterable[_CaseRecord]: ...


@dataclass
class MaterializeResult:
    """What a run wrote: counts, sizes, time, and where the split files went."""

    dataset_dir: Path
    dataset_name: str
    n_training: int
    n_test: int
    files_written: int = 0
    files_skipped: int = 0
    bytes_written: int = 0
    voxel_bytes: int = 0
    seconds: float = 0.0
    splits_files: list[Path] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)
    """Release fold of each fold in splits_final.json (nnU-Net fold i is release fold ``folds[i]``)."""
    release_folds: int = 0
    left_out: list[str] = field(default_factory=list)
    """Why a release fold is not in splits_final.json (nnU-Net could not train it)."""

    @property
    def throughput_mb_s(self) -> float:
        """Uncompressed voxel data handled per second (MB/s), the figure to compare between runs."""
        return self.voxel_bytes / 1e6 / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        return (
            f"{self.dataset_name}: {self.n_training} training + {self.n_test} test cases, "
            f"{self.files_written} files written, {self.files_skipped} unchanged, "
            f"{self.bytes_written / 1e6:.1f} MB on disk, {self.voxel_bytes / 1e6:.1f} MB of voxels in "
            f"{self.seconds:.1f} s ({self.throughput_mb_s:.1f} MB/s)"
        )


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name: ``Dataset`` + the 3-digit ID + ``_`` + name.

    Example:
        >>> dataset_folder_name(501, "LymphAtlasHL")
        'Dataset501_LymphAtlasHL'
    """
    if not 1 <= int(dataset_id) <= 999:
        raise MaterializeError(f"dataset id {dataset_id} is outside nnU-Net's 1-999 (its folders use 3 digits)")
    if not _NAME_RE.fullmatch(name):
        raise MaterializeError(f"dataset name {name!r}: use letters, digits and underscores only")
    return f"Dataset{int(dataset_id):03d}_{name}"


def default_name(config: Config | str) -> str:
    """``LymphAtlas`` for the whole dataset, ``LymphAtlasHL`` / ``LymphAtlasNHL`` for a subset."""
    config = Config(config)
    return schema.DATASET_NAME if config is Config.ALL else f"{schema.DATASET_NAME}{config.value.upper()}"


def nnunet_splits(
    splits_doc: Mapping[str, Any], case_ids: Iterable[str], *, n_folds: int | None = None
) -> list[dict[str, list[str]]]:
    """The release's folds for ``case_ids`` (train split) in nnU-Net's ``splits_final.json`` format.

    Fold k validates on the cases the release placed in fold k and trains on the others. Raises
    :class:`SchemaError` when a case has no fold or when a subject would sit on both sides. A
    release without folds (``n_folds`` 0: one training patient, its cases in fold -1) gives ``[]``.
    A fold may still be empty for a subset of the release (a config): see :func:`trainable_folds`.

    Example:
        >>> doc = {"n_folds": 2, "cases": {"a": {"subject_id": "s1", "split": "train", "fold": 0},
        ...                                "b": {"subject_id": "s2", "split": "train", "fold": 1}}}
        >>> nnunet_splits(doc, ["a", "b"])
        [{'train': ['b'], 'val': ['a']}, {'train': ['a'], 'val': ['b']}]
    """
    entries = splits_doc.get("cases", {})
    n_folds = int(splits_doc.get("n_folds", schema.N_FOLDS) if n_folds is None else n_folds)
    fold_of: dict[str, int] = {}
    for case_id in sorted(set(case_ids)):
        entry = entries.get(case_id)
        if entry is None:
            raise SchemaError(f"case {case_id} is missing from the release's splits.json; the release is inconsistent")
        fold = int(entry.get("fold", -1))
        unfolded = n_folds == 0 and fold == -1  # a release without folds
        if entry.get("split") != Split.TRAIN.value or not (0 <= fold < n_folds or unfolded):
            raise SchemaError(
                f"case {case_id}: splits.json places it in split {entry.get('split')!r} fold {fold}, "
                f"expected the train split with a fold in 0..{n_folds - 1}"
            )
        fold_of[case_id] = fold
    folds = []
    for k in range(n_folds):
        val = sorted(c for c, f in fold_of.items() if f == k)
        train = sorted(c for c, f in fold_of.items() if f != k)
        folds.append({"train": train, "val": val})
    check_grouped(folds, {c: entries[c].get("subject_id") for c in fold_of})
    return folds


def trainable_folds(
    folds: list[dict[str, list[str]]], *, what: str = "this dataset"
) -> tuple[list[int], list[str]]:
    """Which folds nnU-Net can train (at least one training and one validation case), and why the others cannot.

    Returns the release fold numbers kept, in order, and one sentence per fold left out.

    Example:
        >>> trainable_folds([{"train": ["a"], "val": ["b"]}, {"train": ["a", "b"], "val": []}])
        ([0], ['release fold 1 has no validation case in this dataset (2 training cases)'])
    """
    kept, left_out = [], []
    for k, fold in enumerate(folds):
        if fold["train"] and fold["val"]:
            kept.append(k)
        else:
            missing = "validation" if not fold["val"] else "training"
            left_out.append(f"release fold {k} has no {missing} case in {what} "
                            f"({len(fold['train'])} training cases)" if fold["train"] else
                            f"release fold {k} has no {missing} case in {what} ({len(fold['val'])} validation cases)")
    return kept, left_out


def check_grouped(folds: list[dict[str, list[str]]], subject_of: Mapping[str, str | None]) -> None:
    """Raise :class:`SchemaError` if any subject is in both the train and the val list of a fold."""
    for k, fold in enumerate(folds):
        train_subjects = {subject_of.get(c) for c in fold["train"]}
        leaked = sorted(c for c in fold["val"] if subject_of.get(c) in train_subjects)
        if leaked:
            raise SchemaError(
                f"fold {k}: validation cases {leaked[:5]} share a subject with training cases; the release's "
                "splits.json is not grouped by patient - rebuild the release (builder/release/splits.py)"
            )


def _nifti_bytes(array_zyx: np.ndarray, affine: np.ndarray, *, gzip_level: int | None) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), np.asarray(affine, dtype=float))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    if gzip_level is None:
        return raw
    # mtime=0: the same voxels give the same bytes, which makes reruns comparable byte for byte
    return gzip.compress(raw, compresslevel=gzip_level, mtime=0)


def _write_error(path: Path, error: OSError) -> MaterializeError:
    """A full disk or a permission problem, as an error naming the file and what to do (no traceback)."""
    cause = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        cause += " (the disk is full)"
    return MaterializeError(
        f"cannot write {path}: {cause}. Free disk space (or fix the permissions) and run the same command again: "
        "files already written are kept and checked, none is left half-written"
    )


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from e


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes; True if written."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    try:
        write_atomic(path, data)
    except OSError as e:
        raise _write_error(path, e) from e
    return True


def _write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> bool:
    return _write_if_changed(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def _checked_case(record: _CaseRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ct, pet, label = np.asarray(record.ct), np.asarray(record.pet), np.asarray(record.label)
    where = f"case {record.case_id}"
    if not (ct.shape == pet.shape == label.shape) or ct.ndim != 3:
        raise SchemaError(f"{where}: CT {ct.shape}, PET {pet.shape} and label {label.shape} must be one 3-D grid")
    affine = np.asarray(record.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise SchemaError(f"{where}: the affine must be a finite 4x4 matrix, got {affine.shape}")
    # nnU-Net's integrity check misses NaN here: SimpleITK reads NaN PET as is and training diverges
    bad = int(np.size(pet) - np.count_nonzero(np.isfinite(pet)))
    if bad:
        raise SchemaError(
            f"{where}: PET has {bad} non-finite (NaN/inf) voxels; nnU-Net would train on them. "
            "Run `lymphatlas verify` and report the case to the maintainers"
        )
    if label.dtype.kind not in "biu" or (label.size and (label.min() < 0 or label.max() > 1)):
        raise SchemaError(f"{where}: label values must be 0 or 1 ({schema.LABELS}), got {np.unique(label)[:10]}")
    return ct.astype(schema.CT_DTYPE, copy=False), pet.astype(schema.PET_DTYPE, copy=False), \
        label.astype(schema.LABEL_DTYPE, copy=False), affine


@dataclass(frozen=True)
class _Spec:
    """The options that define the dataset's files: its identity, recorded in the state file."""

    config: Config
    name: str
    pet_channel_name: str
    file_ending: str
    include_test: bool
    test_labels: bool

    @classmethod
    def from_options(
        cls, *, config: Config | str, name: str | None, pet_channel_name: str, file_ending: str, include_test: bool,
        test_labels: bool,
    ) -> _Spec:
        """Check the options and fill in the defaults (test labels imply the test images, the name from the config)."""
        config = Config(config)
        _check_options(file_ending, pet_channel_name)
        if test_labels:
            include_test = True
        return cls(config, name or default_name(config), pet_channel_name, file_ending, include_test, test_labels)


def _identity(release: _Release, spec: _Spec) -> dict[str, Any]:
    """What the dataset is made of: the release's cases of the config (with their content hashes) and the options."""
    config = spec.config
    hashes = release.manifest.get("cases", {})
    cases = sorted(
        c for c, e in release.splits.get("cases", {}).items()
        if config is Config.ALL or str(e.get("diagnosis", "")).lower() == config.value
    )
    digest = hashlib.sha256("\n".join(f"{c} {hashes.get(c, '')}" for c in cases).encode()).hexdigest()
    return {
        "release_version": release.manifest.get("version"),
        "config": config.value,
        "cases_sha256": digest,
        "channel_names": {str(CT_CHANNEL): schema.CHANNELS[0], str(PET_CHANNEL): spec.pet_channel_name},
        "file_ending": spec.file_ending,
        "include_test": spec.include_test,
        "test_labels": spec.test_labels,
    }


def _prepare_folder(raw_dir: Path, folder_name: str, dataset_id: int, identity: dict, *, force: bool) -> Path:
    """Find conflicts with what is already there; refuse, or clear them with ``force``."""
    _mkdir(raw_dir)
    folder = raw_dir / folder_name
    for other in sorted(raw_dir.glob(f"Dataset{dataset_id:03d}_*")):
        if other.name != folder_name and other.is_dir():
            if not force:
                raise MaterializeError(
                    f"{other} already uses dataset id {dataset_id}; nnU-Net resolves ids by folder name and would "
                    f"mix it up with {folder_name}. Choose another --dataset-id, or pass --force to delete it"
                )
            logger.warning("--force: removing %s (same dataset id %d)", other, dataset_id)
            shutil.rmtree(other)
    if folder.exists() and any(folder.iterdir()):
        state_path = folder / STATE_FILE
        try:
            previous = json.loads(state_path.read_text())["identity"]
        except (OSError, ValueError, KeyError):
            previous = None
        if previous != identity:
            what = "was not written by lymphatlas materialize" if previous is None else (
                "holds a different dataset (" + ", ".join(
                    f"{k}: {previous.get(k)!r} -> {identity[k]!r}" for k in identity if previous.get(k) != identity[k]
                ) + ")"
            )
            if not force:
                raise MaterializeError(
                    f"{folder} {what}. Pass --force to replace it, or choose another --dataset-id / --name"
                )
            logger.warning("--force: replacing %s, which %s", folder, what)
            shutil.rmtree(folder)
    return folder


def _guard_targets(release: _Release, raw_dir: Path, folder_name: str, dataset_id: int,
                   preprocessed_dir: str | os.PathLike | None, *, force: bool) -> None:
    """Refuse, before anything is written, raw / preprocessed folders that overlap the release read, a WORK
    folder, a DICOM source, a mirror or a release, and (``force``) dataset folders holding what
    materialize does not write (:func:`lymphatlas_ds._target.check_target`)."""
    protected = {"the release read": getattr(release, "path", None)}
    check_target(raw_dir, command="materialize", protected=protected, layout=None, replace=False)
    for other in [raw_dir / folder_name, *sorted(raw_dir.glob(f"Dataset{dataset_id:03d}_*"))] if force else []:
        check_target(other, command="materialize --force", protected=protected, layout=NNUNET_LAYOUT, replace=True)
    if preprocessed_dir is not None:
        pre = Path(preprocessed_dir)
        check_target(pre, command="materialize", protected=protected, layout=None, replace=False)
        for other in sorted(pre.glob(f"Dataset{dataset_id:03d}_*")) if force else []:
            check_target(other, command="materialize --force", protected=protected, layout=None, replace=True)


def materialize_nnunet(
    release: _Release,
    raw_dir: str | os.PathLike,
    *,
    config: Config | str = Config.ALL,
    dataset_id: int = 501,
    name: str | None = None,
    preprocessed_dir: str | os.PathLike | None = None,
    pet_channel_name: str = "PET",
    file_ending: str = ".nii.gz",
    include_test: bool = False,
    test_labels: bool = False,
    force: bool = False,
    workers: int = 4,
    gzip_level: int = 1,
    progress: Callable[[int], None] | None = None,
) -> MaterializeResult:
    """Write the release (one config) as ``raw_dir/Dataset<ID>_<Name>/`` for nnU-Net v2.

    Idempotent: a rerun with the same release and options rewrites nothing (files are compared
    byte for byte). A folder holding a different dataset under the same id is refused unless
    ``force``; unchanged cases are skipped without decoding them (their files' sha256 are kept in
    ``lymphatlas_materialize.json``). Files are encoded and written by ``workers`` threads (zlib
    releases the GIL): on 3 whole-body cases (300x512x512) 8 writers at ``gzip_level`` 1 took 16.6 s
    against 84.7 s for one writer at level 6, for 1.5 % more disk (benchmarks/bench_materialize.py).
    ``progress(n)`` is called after each case.

    Example:
        >>> r = materialize_nnunet(Release("lymphatlas"), "raw", config="nhl", dataset_id=502)  # doctest: +SKIP
        >>> print(r.describe())  # doctest: +SKIP
    """
    start = time.perf_counter()
    spec = _Spec.from_options(config=config, name=name, pet_channel_name=pet_channel_name, file_ending=file_ending,
                              include_test=include_test, test_labels=test_labels)
    folder_name = dataset_folder_name(dataset_id, spec.name)
    identity = _identity(release, spec)
    _guard_targets(release, Path(raw_dir), folder_name, dataset_id, preprocessed_dir, force=force)
    folder = _prepare_folder(Path(raw_dir), folder_name, dataset_id, identity, force=force)
    if preprocessed_dir is not None:
        _clear_preprocessed_id(Path(preprocessed_dir), folder_name, dataset_id, force=force)
    layout = _Layout.create(folder, spec)
    recorded, state = _open_state(folder, identity)
    result = MaterializeResult(folder, folder_name, 0, 0)
    writer = _CaseWriter(release, layout, recorded, state, result, progress=progress,
                         gzip_level=gzip_level if spec.file_ending == ".nii.gz" else None)
    train_ids, test_ids = writer.write(spec.config, workers=workers)
    _check_partition(release, spec.config, train_ids, test_ids)
    _remove_stale(layout, writer.expected)
    _check_no_leak(release, train_ids, test_ids)
    result.n_training, result.n_test = len(train_ids), len(test_ids)
    _write_folds(release, spec, folder, preprocessed_dir, train_ids, test_ids, result)
    state["complete"] = True
    _write_json(folder / STATE_FILE, state, sort_keys=True)
    result.seconds = time.perf_counter() - start
    logger.info("%s", result.describe())
    return result


def _write_folds(release: _Release, spec: _Spec, folder: Path, preprocessed_dir: str | os.PathLike | None,
                 train_ids: list[str], test_ids: list[str], result: MaterializeResult) -> None:
    """dataset.json and splits_final.json with the folds nnU-Net can train (:func:`trainable_folds`)."""
    folds = nnunet_splits(release.splits, train_ids)
    result.release_folds = len(folds)
    result.folds, result.left_out = trainable_folds(folds, what=f"config {spec.config.value}")
    for reason in result.left_out:
        logger.warning("%s: left out of %s (nnU-Net cannot train it)", reason, SPLITS_FILE)
    _write_json(folder / "dataset.json", _dataset_json(release, spec, train_ids, test_ids, folds=result.folds))
    result.splits_files += _write_splits([folds[k] for k in result.folds], folder, preprocessed_dir)


class _Pass(NamedTuple):
    """One split to write, and the subfolders its images and (when written) labels go to."""

    split: Split
    images: str
    labels: str | None


@dataclass(frozen=True)
class _Layout:
    """The dataset folder: its subfolders, the splits written into them and each case's file names."""

    folder: Path
    file_ending: str
    subdirs: dict[str, Path]
    passes: list[_Pass]

    @classmethod
    def create(cls, folder: Path, spec: _Spec) -> _Layout:
        """Make the subfolders the options call for (imagesTr, labelsTr, imagesTs, labelsTs)."""
        subdirs = {"imagesTr": folder / "imagesTr", "labelsTr": folder / "labelsTr"}
        if spec.include_test:
            subdirs["imagesTs"] = folder / "imagesTs"
        if spec.test_labels:
            subdirs["labelsTs"] = folder / "labelsTs"
        for d in subdirs.values():
            _mkdir(d)
        passes = [_Pass(Split.TRAIN, "imagesTr", "labelsTr")]
        if spec.include_test:
            passes.append(_Pass(Split.TEST, "imagesTs", "labelsTs" if spec.test_labels else None))
        return cls(folder, spec.file_ending, subdirs, passes)

    def targets(self, case_id: str, where: _Pass) -> list[tuple[str, str]]:
        """(subfolder, file name) of a case's CT, PET and, when written, label files."""
        ending = self.file_ending
        out = [(where.images, f"{case_id}_{channel:04d}{ending}") for channel in (CT_CHANNEL, PET_CHANNEL)]
        return out + ([(where.labels, f"{case_id}{ending}")] if where.labels is not None else [])


def _open_state(folder: Path, identity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What an earlier run of this same dataset wrote, and the state of this run (written now if new)."""
    try:
        previous_state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        previous_state = {}
    same = previous_state.get("identity") == identity
    # what an earlier run of this same dataset wrote: {case_id: {"content_hash", "files": {relpath: sha256}}}
    recorded: dict[str, Any] = previous_state.get("cases", {}) if same else {}
    state: dict[str, Any] = {"identity": identity, "complete": False, "cases": dict(recorded)}
    if not same:  # a rerun of the same dataset leaves the file (and its mtime) alone until it changes
        _write_json(folder / STATE_FILE, state, sort_keys=True)
    return recorded, state


class _CaseWriter:
    """Encodes the cases' NIfTI files on a thread pool and writes those that changed, counting into the result."""

    def __init__(
        self, release: _Release, layout: _Layout, recorded: dict[str, Any], state: dict[str, Any],
        result: MaterializeResult, *, gzip_level: int | None, progress: Callable[[int], None] | None,
    ) -> None:
        self.release, self.layout, self.recorded, self.state, self.result = release, layout, recorded, state, result
        self.gzip_level = gzip_level
        self.progress = progress
        self.content_hashes = release.manifest.get("cases", {})
        self.expected: dict[str, set[str]] = {k: set() for k in layout.subdirs}
        self.case_ids: dict[Split, list[str]] = {Split.TRAIN: [], Split.TEST: []}
        self.n_done = 0
        self.pending: set[cf.Future] = set()

    def write(self, config: Config, *, workers: int) -> tuple[list[str], list[str]]:
        """Write every pass of the layout; returns the train and the test case ids."""
        with cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="materialize") as pool:
            for where in self.layout.passes:
                for record in self._records(config, where):
                    self._submit(pool, record, where)
                    # bound the decoded cases held in memory: whole-body volumes are 0.5-1 GB each
                    self._drain(max(3, 3 * workers))
                    self._note(record.case_id, where)
            self._drain(0)
        return self.case_ids[Split.TRAIN], self.case_ids[Split.TEST]

    def _records(self, config: Config, where: _Pass) -> Iterable[_CaseRecord]:
        """The decoded cases of a pass that need writing; unchanged ones are counted without decoding them."""
        if not hasattr(self.release, "case_ids"):
            return self.release.iter_cases(config, where.split)
        todo = []  # lymphatlas_ds.reader.Release: skip unchanged cases undecoded
        for case_id in self.release.case_ids(config, where.split):
            if self._unchanged(case_id, where):
                self.result.files_skipped += len(self.layout.targets(case_id, where))
                self._note(case_id, where)
            else:
                todo.append(case_id)
        return self.release.iter_cases(config, where.split, case_ids=todo) if todo else iter(())

    def _unchanged(self, case_id: str, where: _Pass) -> bool:
        """Whether the files of an earlier run hold this case as the release has it now."""
        # Skipping a case without decoding it needs the same release content *and* the same bytes on disk.
        entry = self.recorded.get(case_id)
        content_hash = self.content_hashes.get(case_id)
        if not entry or content_hash is None or entry.get("content_hash") != content_hash:
            return False
        files = {f"{key}/{name}" for key, name in self.layout.targets(case_id, where)}
        if set(entry.get("files", {})) != files:
            return False
        for rel in files:
            try:
                if hashlib.sha256((self.layout.folder / rel).read_bytes()).hexdigest() != entry["files"][rel]:
                    return False
            except OSError:
                return False
        return True

    def _submit(self, pool: cf.ThreadPoolExecutor, record: _CaseRecord, where: _Pass) -> None:
        """Check a decoded case and queue one task per file: the PET file alone is half of a case's work."""
        arrays = _checked_case(record)
        case_id = record.case_id
        self.result.voxel_bytes += sum(a.nbytes for a in arrays[:3])
        self.state["cases"][case_id] = {"content_hash": self.content_hashes.get(case_id), "files": {}}
        for array, (key, file_name) in zip(arrays[:3], self.layout.targets(case_id, where)):
            self.pending.add(pool.submit(self._write_file, array, arrays[3], case_id, key, file_name))

    def _write_file(self, array: np.ndarray, affine: np.ndarray, case_id: str, key: str, name: str) -> tuple:
        """Encode one volume and write it unless the file holds these bytes already (runs on the pool)."""
        data = _nifti_bytes(array, affine, gzip_level=self.gzip_level)
        written = _write_if_changed(self.layout.subdirs[key] / name, data)
        return case_id, f"{key}/{name}", written, len(data), hashlib.sha256(data).hexdigest()

    def _drain(self, limit: int) -> None:
        """Wait until at most ``limit`` files are pending; count those written and record their sha256."""
        while len(self.pending) > limit:
            done, self.pending = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                case_id, rel, written, size, sha = fut.result()
                self.result.files_written += written
                self.result.files_skipped += not written
                self.result.bytes_written += size if written else 0
                self.state["cases"][case_id]["files"][rel] = sha

    def _note(self, case_id: str, where: _Pass) -> None:
        """A case is done (written or unchanged): its files are expected, the progress callback hears of it."""
        self.case_ids[where.split].append(case_id)
        for key, file_name in self.layout.targets(case_id, where):
            self.expected[key].add(file_name)
        self.n_done += 1
        if self.progress is not None:
            self.progress(self.n_done)


def _remove_stale(layout: _Layout, expected: dict[str, set[str]]) -> None:
    """Delete the files of cases that left the release (a rerun after --force)."""
    for key, d in layout.subdirs.items():
        for stale in sorted(set(os.listdir(d)) - expected[key]):
            logger.info("removing %s/%s: not part of this dataset", key, stale)
            (d / stale).unlink()


def _write_splits(
    folds: list[dict[str, list[str]]], folder: Path, preprocessed_dir: str | os.PathLike | None
) -> list[Path]:
    """Write splits_final.json into the raw dataset folder and, when given, its preprocessed folder.

    Without a fold nnU-Net can train, no file is written and an earlier one is removed: nnU-Net
    then trains only on ``all`` cases as told (its own random per-case split would mix patients).
    """
    paths = [folder / SPLITS_FILE]
    if preprocessed_dir is not None:
        paths.append(Path(preprocessed_dir) / folder.name / SPLITS_FILE)
    if not folds:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise _write_error(path, e) from e
        return []
    for path in paths:
        _mkdir(path.parent)
        _write_json(path, folds)
    return paths


def _check_options(file_ending: str, pet_channel_name: str) -> None:
    if file_ending not in FILE_ENDINGS:
        raise MaterializeError(f"file ending {file_ending!r} is not supported; use one of {FILE_ENDINGS}")
    if not pet_channel_name or not pet_channel_name.strip():
        raise MaterializeError("the PET channel name must not be empty (it selects nnU-Net's normalization)")
    if pet_channel_name.casefold() == "ct":
        logger.warning(
            "PET channel named %r: nnU-Net will apply CT normalization (foreground percentile clipping) to SUV",
            pet_channel_name,
        )


def _clear_preprocessed_id(preprocessed_dir: Path, folder_name: str, dataset_id: int, *, force: bool) -> None:
    """Refuse (or with ``force`` remove) another preprocessed dataset under the same id."""
    for other in sorted(preprocessed_dir.glob(f"Dataset{dataset_id:03d}_*")):
        if other.name != folder_name and other.is_dir():
            if not force:
                raise MaterializeError(
                    f"{other} (preprocessed) already uses dataset id {dataset_id}. Choose another "
                    "--dataset-id, or pass --force to delete it"
                )
            logger.warning("--force: removing %s (same dataset id %d)", other, dataset_id)
            shutil.rmtree(other)


def _check_partition(release: _Release, config: Config, train_ids: list[str], test_ids: list[str]) -> None:
    """Training cases exist, none twice, none in both train and test."""
    if not train_ids:
        raise MaterializeError(
            f"the release has no training cases for config {config.value!r}; nothing for nnU-Net to train on"
        )
    if len(set(train_ids)) != len(train_ids) or set(train_ids) & set(test_ids):
        raise SchemaError("the release yielded a case twice (or in both train and test); rebuild the release")


def _check_no_leak(release: _Release, train_ids: list[str], test_ids: list[str]) -> None:
    """No subject has cases in both train and test."""
    entries = release.splits.get("cases", {})
    subject_of = {c: entries.get(c, {}).get("subject_id") for c in train_ids + test_ids}
    test_subjects = {subject_of[c] for c in test_ids}
    leaked = sorted(c for c in train_ids if subject_of[c] in test_subjects)
    if leaked:
        raise SchemaError(f"training cases {leaked[:5]} share a subject with test cases; rebuild the release")


def _dataset_json(
    release: _Release, spec: _Spec, train_ids: list[str], test_ids: list[str], *, folds: list[int]
) -> dict[str, Any]:
    """nnU-Net's dataset.json, with the release's provenance under "lymphatlas"."""
    config = spec.config
    entries = release.splits.get("cases", {})
    version = release.manifest.get("version")
    return {
        "channel_names": {str(CT_CHANNEL): schema.CHANNELS[0], str(PET_CHANNEL): spec.pet_channel_name},
        "labels": dict(schema.LABELS),
        "numTraining": len(train_ids),
        "file_ending": spec.file_ending,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": spec.name,
        "description": f"{schema.DATASET_NAME} {version} ({config.value}): whole-body FDG PET/CT, lymphoma lesions; "
                       "PET resampled onto the CT grid, PET in SUVbw",
        "reference": release.manifest.get("citation") or CITATION,
        "release": version,
        "citation": release.manifest.get("citation") or CITATION,
        "lymphatlas": {
            "release_version": version,
            "schema_version": release.manifest.get("schema_version"),
            "config": config.value,
            "numTest": len(test_ids),
            # lets a model trained on "all" be reported per diagnosis, as the paper's Tables 2 and 3
            "diagnosis": {c: entries.get(c, {}).get("diagnosis") for c in sorted(train_ids + test_ids)},
            "splits": "patient-grouped folds from the release's splits.json (splits_final.json)",
            # nnU-Net fold i is the release's fold folds[i]: folds nnU-Net cannot train are left out
            "folds": folds,
        },
    }
