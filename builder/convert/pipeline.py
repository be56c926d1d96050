"""Run the stages over many exams: DICOM source -> aligned cases (``python -m builder convert``).

One exam is one task (:func:`convert_exam`): discover, read, SUV, align, labels, statistics, QC,
de-identification, write. Tasks run in parallel processes (``workers``) or on an existing Dask
distributed cluster (``scheduler``); a failing exam never stops the others, it becomes an entry
of ``WORK/failures.json`` with its stage and reason. Runs are resumable: an exam whose source
files, clinical row and settings hash to what its ``case.json`` recorded is skipped, and a case
folder only appears complete (written under a temporary name, then renamed).

Two kinds of failure, and only one may cost a case:

* **rejected** (content): the exam's data fail a check (:class:`~builder.errors.ExamError`). If
  its source changed since its earlier case was written, that case is *retired* (the run says so):
  the published data must follow the source.
* **failed** (this run's infrastructure): a full disk or any OSError, MemoryError, a bug, a worker
  process killed (out of memory, segfault, kill -9), an interrupt. The exam is listed with its
  stage and cause, its earlier case and id_map row stay exactly as they were, and a rerun retries it.

A dead worker's exams are retried once, each alone in a fresh process; the pool is rebuilt and the
run goes on. Workers exit when the parent dies. One convert at a time per WORK folder (an OS lock,
:mod:`lymphatlas_ds._lock`). Exams that have a case in WORK but are gone from the source are
reported (``gone_from_source`` in ``build.json``), never converted or silently kept in a release:
:func:`withdraw_exams` (``python -m builder withdraw``, or ``convert --prune``) removes them.

Example:
    >>> summary = convert_cohort(Path("source"), Path("work"), settings=ConvertSettings(), workers=2)  # doctest: +SKIP
    >>> summary.n_rejected  # doctest: +SKIP
    0
"""

from __future__ import annotations

import contextlib
import csv
import enum
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from builder.convert.align import AlignSettings, affine_lps, affine_ras
from builder.convert.clinical import ClinicalRecord, RejectedRow, read_clinical
from builder.convert.deid import MAINTAINERS_FILE_MODE, PRIVATE_FILE_MODE
from builder import __version__ as BUILDER_VERSION
from builder.errors import ExamError, MassRetirementError, run_fault
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds._lock import work_lock
from lymphatlas_ds.schema import CASE_JSON, SCHEMA_VERSION

if TYPE_CHECKING:
    import SimpleITK as sitk

    from builder.convert.discover import ExamSeries
    from builder.convert.read import SeriesMetadata
    from builder.convert.suv import SUVConversion

logger = logging.getLogger(__name__)

ID_MAP = "id_map.csv"
JOURNAL = "pending"
"""``WORK/private/pending/<case_id>.json``: the id_map row of a case a worker is about to make visible
(:func:`_journal_entry`); the parent records the row and removes the entry (:func:`_settle_journal`)."""
FAILURES = "failures.json"
BUILD_JSON = "build.json"
FAULT_ENV = "LYMPHATLAS_FAULT"
"""Test hook, read by :func:`_injected_fault` only: ``kill-worker:EXAM_ID`` makes the process that
converts that exam kill itself with SIGKILL (as the OOM killer would); ``kill-worker:EXAM_ID:FLAG``
does so only while the file FLAG does not exist, creating it first (the retry then succeeds);
``delay:EXAM_ID:SECONDS`` (``*`` for every exam) holds that exam's worker for SECONDS before it starts,
so a signal sent meanwhile lands while the exam is in flight, however fast the machine."""
ID_MAP_COLUMNS = ("exam_id", "patient_id", "case_id", "subject_id")


class Status(str, enum.Enum):
    CONVERTED = "converted"
    SKIPPED = "skipped"
    REJECTED = "rejected"  # the exam's content fails a check
    FAILED = "failed"  # an error of this run (disk, memory, a killed worker, a bug): nothing is removed


FAILURE_KIND = {Status.REJECTED: "exam", Status.FAILED: "run"}
"""failures.json ``kind``: ``exam`` (a finding about the exam's content) or ``run`` (an error of this run)."""
MASS_RETIREMENT_FRACTION = 0.10
"""A convert that would retire more than this fraction of WORK's cases, and at least 2, is refused
unless ``allow_mass_retirement`` (``--allow-mass-withdrawal``)."""


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that changes the output of a convert (part of each exam's source hash)."""

    align: AlignSettings = field(default_factory=AlignSettings)
    gzip_level: int = 1

    def to_dict(self) -> dict:
        return {"align": self.align.to_dict(), "gzip_level": self.gzip_level, "builder_version": BUILDER_VERSION}

    def sha256(self) -> str:
        """sha256 of :meth:`to_dict` (``case.json`` source.settings_sha256, the release's provenance)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ExamJob:
    """One exam's task, picklable for process pools and Dask."""

    source: Path
    work: Path
    exam_id: str
    clinical: ClinicalRecord | RejectedRow | None
    key: bytes
    settings: ConvertSettings
    previous_case_id: str | None = None
    threads: int = 0


@dataclass
class ExamResult:
    """What happened to one exam."""

    exam_id: str
    status: Status
    case_id: str | None = None
    subject_id: str | None = None
    patient_id: str | None = None
    stage: str | None = None
    reason: str | None = None
    timings_s: dict = field(default_factory=dict)
    peak_rss_mb: float | None = None
    source_changed: bool = False  # an earlier case exists and the source no longer hashes to it
    retired_case: str | None = None  # the earlier case this run removed (a changed source now rejected)


@dataclass
class RunSummary:
    results: list[ExamResult]
    seconds: float
    gone: dict[str, str] = field(default_factory=dict)  # exam id -> case id of exams the source no longer has
    pruned: dict[str, str] = field(default_factory=dict)  # the same, removed by --prune

    @property
    def n_converted(self) -> int:
        return sum(r.status is Status.CONVERTED for r in self.results)

    @property
    def n_skipped(self) -> int:
        return sum(r.status is Status.SKIPPED for r in self.results)

    @property
    def n_rejected(self) -> int:
        return sum(r.status is Status.REJECTED for r in self.results)

    @property
    def n_failed(self) -> int:
        return sum(r.status is Status.FAILED for r in self.results)

    def line(self) -> str:
        failed = f", {self.n_failed} failed (errors of this run: rerun)" if self.n_failed else ""
        return (f"{len(self.results)} exams: {self.n_converted} converted, {self.n_skipped} unchanged (skipped), "
                f"{self.n_rejected} rejected{failed} in {self.seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# small helpers


def _peak_rss_mb() -> float | None:
    from lymphatlas_ds._io import peak_rss_bytes

    peak = peak_rss_bytes()
    return None if peak is None else peak / 2**20


class SourceHashes(NamedTuple):
    """An exam's source hashes (:func:`source_hashes`), all from one read of its files."""

    content: str
    """The source with the settings: an unchanged one is skipped (``case.json`` source.content_hash)."""
    exam: str
    """The source alone (files, masks, clinical row): only a change of it lets a rejection retire a case
    (``case.json`` source.exam_hash)."""
    images: str
    """The files and masks with the settings, without the clinical row (``case.json`` source.image_sha256):
    two sources with the same image hash give the same voxels, so a changed clinical row alone (a corrected
    diagnosis, an exam renumbered) re-writes the case's metadata, not its images."""


def source_hashes(job: ExamJob) -> SourceHashes:
    """sha256 of the exam's source files (paths and bytes), its masks and clinical row, with and without the settings.

    Every file named as the exam's mask counts (:func:`builder.convert.labels.mask_files`): a second
    mask added beside the first changes the hash, so the exam is converted again (and rejected).
    Other settings or another builder version change ``content`` (the exam is converted again), never ``exam``.
    """
    from builder.convert.labels import mask_files

    h, images = hashlib.sha256(), hashlib.sha256()
    exam_dir = job.source / "dicom" / job.exam_id
    files = sorted(p for p in exam_dir.rglob("*") if p.is_file())
    files += [path for path, _ in mask_files(job.source / "masks", job.exam_id)]
    for path in files:
        name = str(path.relative_to(job.source)).encode() + b"\0"
        h.update(name)
        images.update(name)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                images.update(block)
    h.update((job.clinical.hash_text() if job.clinical else "").encode())
    exam = h.copy().hexdigest()
    settings = json.dumps(job.settings.to_dict(), sort_keys=True).encode()
    h.update(settings)
    images.update(settings)
    return SourceHashes(h.hexdigest(), exam, images.hexdigest())


def source_hash(job: ExamJob) -> str:
    """The exam's source hash with the settings (``case.json`` source.content_hash; :func:`source_hashes`)."""
    return source_hashes(job).content


# --------------------------------------------------------------------------------------------
# one exam


class _Stages:
    """Times each stage and remembers which one is running (for unexpected errors)."""

    def __init__(self) -> None:
        self.current = "start"
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def start(self, name: str) -> None:
        now = time.perf_counter()
        if self.current != "start":
            self.timings[self.current] = self.timings.get(self.current, 0.0) + now - self._t0
        self.current, self._t0 = name, now

    def stop(self) -> dict:
        self.start("done")
        return {k: round(v, 3) for k, v in self.timings.items()}


def _injected_fault(exam_id: str) -> None:
    """The one place that reads :data:`FAULT_ENV` (fault-injection tests); a no-op when it is unset."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("delay:"):
        _, target, seconds = spec.split(":", 2)
        if target in ("*", exam_id):
            time.sleep(float(seconds))
        return
    if not spec.startswith("kill-worker:"):
        return
    _, target, *flag = spec.split(":", 2)
    if target != exam_id:
        return
    if flag:
        try:
            os.close(os.open(flag[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return  # killed once already: this attempt runs
    os.kill(os.getpid(), signal.SIGKILL)


def convert_exam(job: ExamJob) -> ExamResult:
    """Turn one exam into an aligned case folder; never raises (errors become a rejected or failed result).

    A finding about the exam's content (an :class:`ExamError` with no error of the run behind it,
    :func:`builder.errors.run_fault`) gives :attr:`Status.REJECTED`; anything else (an OSError or
    MemoryError, raised as is or wrapped by a stage's reader, a bug) gives :attr:`Status.FAILED`, an
    error of this run that costs no earlier case. An interrupt (KeyboardInterrupt) passes through.

    Example:
        >>> convert_exam(ExamJob(source, work, "EX0001", record, key, ConvertSettings()))  # doctest: +SKIP
        ExamResult(exam_id='EX0001', status=<Status.CONVERTED: 'converted'>, case_id='LA-3f9c2a1b', ...)
    """
    import SimpleITK as sitk

    if job.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(job.threads)
    stages = _Stages()
    result = ExamResult(job.exam_id, Status.REJECTED, patient_id=job.clinical.patient_id if job.clinical else None)
    # The same thread counts for ITK and for numpy's BLAS wherever the exam runs (a process pool, a
    # Dask worker, which sets OPENBLAS_NUM_THREADS=1, or this process): threaded reductions round
    # differently with another count, and the case bytes must not depend on the executor.
    from threadpoolctl import threadpool_limits

    _injected_fault(job.exam_id)
    try:
        with threadpool_limits(limits=job.threads or 1):
            _convert(job, stages, result)
    except Exception as e:  # noqa: BLE001 - one exam must never stop the others
        _record_error(job, stages.current, result, e)
    result.timings_s = stages.stop()
    result.peak_rss_mb = _peak_rss_mb()
    return result


def _record_error(job: ExamJob, stage: str, result: ExamResult, error: Exception) -> None:
    """Fill ``result`` from the error that stopped the exam: a rejection (content) or a failure (this run)."""
    fault = run_fault(error) if isinstance(error, ExamError) else error if isinstance(error, (OSError, MemoryError)) else None
    if isinstance(error, ExamError) and fault is None:
        error.exam_id = error.exam_id or job.exam_id
        result.status, result.stage, result.reason = Status.REJECTED, error.stage, str(error)
        # error.detail (clinical.csv cells, DICOM identity values) goes to this log only, never to failures.json
        detail = f" [log only: {error.detail}]" if getattr(error, "detail", None) else ""
        logger.warning("exam %s rejected at %s: %s%s", job.exam_id, error.stage, error, detail)
        return
    result.status, result.stage = Status.FAILED, stage
    if fault is None:  # a bug
        result.reason = (f"[exam {job.exam_id}] unexpected {type(error).__name__} at stage {stage}: {error}; "
                         "any earlier case is kept; report this with the log (-v)")
        logger.error("exam %s failed unexpectedly:\n%s", job.exam_id, traceback.format_exc())
        return
    file = getattr(fault, "filename", None) or getattr(error, "path", None)
    where = f" ({file})" if file else ""
    why = getattr(fault, "strerror", None) or str(fault) or type(fault).__name__
    result.reason = (f"[exam {job.exam_id}] {type(fault).__name__} at stage {stage}{where}: {why}; an error of "
                     "this run, not of the exam: any earlier case is kept; free disk space or memory (or fix the "
                     "disk) and rerun")
    logger.error("exam %s failed at %s: %s", job.exam_id, stage, result.reason)


class ExamImages(NamedTuple):
    """One exam as convert reads it (:func:`read_exam`): CT and PET with their headers, the SUV conversion, the body."""

    ct: sitk.Image
    """int16 HU, the case's grid."""
    pet_suv: sitk.Image
    """float32 SUVbw on the PET's own grid."""
    body: np.ndarray
    """bool [z, y, x] on the CT grid (:func:`builder.convert.labels.body_mask`)."""
    ct_meta: SeriesMetadata
    pet_meta: SeriesMetadata
    suv: SUVConversion


def read_exam(exam: ExamSeries, *, stage: Callable[[str], None] = lambda name: None) -> ExamImages:
    """Read an exam's CT and PET, convert the PET to SUV and find the body: convert's own read step.

    ``stage`` is told the name of each step as it begins (``read``, ``suv``, ``labels``), so convert
    times them and names the one an error interrupts. Tests and benchmarks read exams through this
    function to see exactly what convert aligns.

    Example:
        >>> images = read_exam(discover_exam(Path("source/dicom/EX0001"), "EX0001"))  # doctest: +SKIP
        >>> images.pet_suv.GetPixelIDTypeAsString()  # doctest: +SKIP
        '32-bit float'
    """
    import SimpleITK as sitk

    from builder.convert import labels
    from builder.convert.read import read_series
    from builder.convert.suv import suv_conversion

    exam_id = exam.exam_id
    stage("read")
    ct, ct_meta = read_series(exam.ct, exam_id=exam_id)
    pet, pet_meta = read_series(exam.pet, exam_id=exam_id)
    stage("suv")
    conv = suv_conversion(exam.pet, exam_id=exam_id)
    pet_suv = sitk.Cast(pet, sitk.sitkFloat32) * float(conv.factor)
    del pet
    stage("labels")
    body = labels.body_mask(ct)
    return ExamImages(ct, pet_suv, body, ct_meta, pet_meta, conv)


def body_image(body: np.ndarray, ct: sitk.Image) -> sitk.Image:
    """The body mask as a uint8 image on the CT grid: where :func:`~builder.convert.align.align_pet` samples."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(body.view(np.uint8))
    image.CopyInformation(ct)
    return image


def _convert(job: ExamJob, stages: _Stages, result: ExamResult) -> None:
    import SimpleITK as sitk

    from builder.convert import align, case, identity, lesions, qc
    from builder.convert.discover import discover_exam
    from lymphatlas_ds.lesions import label_instances

    exam_id, settings = job.exam_id, job.settings
    exam_dir = job.source / "dicom" / exam_id
    stages.start("discover")
    _check_job(job, exam_dir, result)
    stages.start("hash")
    src_hash = source_hashes(job)
    if _unchanged(job, src_hash, result):
        return
    stages.start("discover")
    exam = discover_exam(exam_dir, exam_id)
    stages.start("identity")  # before a metadata-only rewrite too: a changed row must still be this exam's patient
    identity.check_exam(job, exam, lambda: {r["case_id"]: e for e, r in read_id_map(job.work).items() if r.get("case_id")})
    if _metadata_only(job, src_hash, result):
        return
    ct, pet_suv, body, ct_meta, pet_meta, conv = read_exam(exam, stage=stages.start)
    label, mask_format = _lesion_label(job, exam, ct, body)
    stages.start("align")
    body_img = body_image(body, ct)
    aligned = align.align_pet(ct, pet_suv, settings=settings.align, body=body_img)
    del body_img
    for k, v in aligned.timings_s.items():
        stages.timings[f"align.{k}"] = v
    pet_img = aligned.pet_on_ct  # kept alive: pet_arr is a view of its buffer
    pet_arr = sitk.GetArrayViewFromImage(pet_img)
    fov_fraction = _lesion_fov_fraction(label, ct, pet_suv, aligned.transform)
    stages.start("statistics")
    instances, _ = label_instances(label)
    stats = lesions.lesion_statistics(label, pet_arr, ct, pet=pet_suv, transform=aligned.transform, instances=instances)
    del pet_suv
    stages.start("qc")
    ct_arr = sitk.GetArrayViewFromImage(ct)  # a view: `ct` stays alive until the case is written
    checks = qc.run_checks(
        ct=ct_arr, pet=pet_arr, label=label, body=body, lesion_fov_fraction=fov_fraction,
        grids_identical=ct_arr.shape == pet_arr.shape == label.shape, alignment=aligned.record,
    )
    qc.require_passed(checks, exam_id=exam_id)
    stages.start("deid")
    geometry_ras = affine_ras(ct)
    case_json = _case_json(job, exam, ct, ct_arr.shape, geometry_ras, src_hash, mask_format,
                           ct_meta=ct_meta, pet_meta=pet_meta, conv=conv, aligned=aligned, stats=stats,
                           qc_summary=qc.summary(checks))
    leak_check = _leak_check(job, exam)
    stages.start("write")
    entry = _journal_entry(job, case_json)  # before the case is visible: no case folder without its row
    try:
        case.write_case(job.work / "cases", case_json, ct=ct_arr, pet=pet_arr.astype(np.float32, copy=False),
                        label=label, affine_ras=geometry_ras, level=settings.gzip_level, check=leak_check,
                        extra_files={align.TRANSFORM_FILE: align.transform_text(aligned.transform)},
                        instances=instances)
    except Exception:
        entry.unlink(missing_ok=True)  # nothing was made visible
        raise
    result.status, result.case_id, result.subject_id = Status.CONVERTED, case_json["case_id"], case_json["subject_id"]


def _journal_entry(job: ExamJob, case_json: dict) -> Path:
    """Write the id_map row of the case about to be written (``WORK/private/pending/<case_id>.json``)."""
    row = {"exam_id": job.exam_id, "patient_id": job.clinical.patient_id, "case_id": case_json["case_id"],
           "subject_id": case_json["subject_id"]}
    path = job.work / "private" / JOURNAL / f"{case_json['case_id']}.json"
    write_atomic(path, json.dumps(row, sort_keys=True) + "\n", mode=PRIVATE_FILE_MODE, fsync=True)
    return path


def _settle_journal(work: Path, id_map: dict[str, dict], present: set[str]) -> list[str]:
    """Record the id_map row of every case a worker made visible but this process never recorded.

    Each journal entry whose case folder is complete (:func:`~builder.convert.case.load_case`), whose
    case.json names the entry's case and subject ids and whose exam is still in the source (``present``)
    is adopted: its row goes into ``id_map`` (an earlier case of the exam under another id is removed, as
    a conversion does). Every entry is then removed; a folder not adopted is left to :func:`_remove_orphans`.
    Whether the adopted case still matches its source is for the run to see: it compares the source
    hashes as for any case (unchanged: skipped; changed: converted again). Returns the adopted exam ids.
    """
    from builder.convert import case as case_mod
    from lymphatlas_ds.errors import SchemaError

    folder = work / "private" / JOURNAL
    adopted = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            row = json.loads(path.read_text())
            info = case_mod.load_case(work / "cases" / row["case_id"])
            complete = info["case_id"] == row["case_id"] and info["subject_id"] == row["subject_id"]
        except (json.JSONDecodeError, KeyError, TypeError, SchemaError, OSError):
            complete = False
        if complete and row["exam_id"] in present:
            old = (id_map.get(row["exam_id"]) or {}).get("case_id")
            if old and old != row["case_id"]:
                case_mod.remove_case(work / "cases", old)
            id_map[row["exam_id"]] = {k: row.get(k, "") for k in ID_MAP_COLUMNS}
            adopted.append(row["exam_id"])
            logger.warning("recorded case %s of exam %s: a worker wrote it while the run was being stopped",
                           row["case_id"], row["exam_id"])
    if adopted:
        _write_id_map(work, id_map)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        path.unlink(missing_ok=True)  # the row is saved (or the case was not adopted): done
    return adopted


def _check_job(job: ExamJob, exam_dir: Path, result: ExamResult) -> None:
    """The exam has a DICOM folder and a valid clinical row (a changed row now rejected retires its case)."""
    from builder.errors import ClinicalError, DiscoveryError

    exam_id = job.exam_id
    if not exam_dir.is_dir():
        raise DiscoveryError(f"no DICOM folder dicom/{exam_id} in the source; export the exam or remove its clinical row",
                             exam_id=exam_id)
    if job.clinical is None:
        raise ClinicalError(f"clinical.csv has no row for exam {exam_id}; add its diagnosis, sex, age and date",
                            exam_id=exam_id)
    try:
        job.clinical.check()  # a rejected clinical.csv row raises, naming its line, its value and what is allowed
    except ExamError:
        # A valid row (or one converted before the checks) made the earlier case: the row has changed since,
        # a content rejection of a changed source, which retires that case.
        result.source_changed = job.previous_case_id is not None
        raise


def _unchanged(job: ExamJob, src_hash: SourceHashes, result: ExamResult) -> bool:
    """True (the result marked SKIPPED) when the exam's earlier case was made from the same source and settings.

    Otherwise ``result.source_changed`` says whether the source itself changed (its exam hash; a case
    written before that hash was recorded compares by its content hash), the only change that lets a
    rejection retire the earlier case.
    """
    if job.previous_case_id:
        existing = job.work / "cases" / job.previous_case_id
        if (existing / CASE_JSON).is_file():
            from builder.convert.case import read_case_json
            from lymphatlas_ds.errors import SchemaError

            try:
                old = read_case_json(existing)
            except SchemaError:  # unreadable: convert again
                old = {}
            recorded = old.get("source", {})
            if recorded.get("content_hash") == src_hash.content:
                result.status, result.case_id = Status.SKIPPED, job.previous_case_id
                result.subject_id = old.get("subject_id")
                return True
            result.source_changed = recorded.get("exam_hash") != src_hash.exam
    return False


def _metadata_only(job: ExamJob, src_hash: SourceHashes, result: ExamResult) -> bool:
    """Re-write only case.json's clinical block when the images and the patient are those of the earlier case.

    True (the result marked CONVERTED at stage ``metadata``) when the earlier case recorded the same
    image hash (:func:`source_hashes`) and the same subject: its voxels would come out identical.
    """
    if not job.previous_case_id:
        return False
    from builder.convert import deid
    from builder.convert.case import read_case_json
    from lymphatlas_ds.errors import SchemaError

    folder = job.work / "cases" / job.previous_case_id
    try:
        old = read_case_json(folder)
    except SchemaError:
        return False
    subject = deid.make_subject_id(job.key, job.clinical.patient_id)
    if (old.get("source") or {}).get("image_sha256") != src_hash.images or old.get("subject_id") != subject:
        return False
    source = {**old["source"], "content_hash": src_hash.content, "exam_hash": src_hash.exam}
    info = {**old, "clinical": job.clinical.published(), "source": source}
    write_atomic(folder / CASE_JSON, json.dumps(info, indent=2, sort_keys=True) + "\n")
    result.status, result.case_id, result.subject_id, result.stage = (
        Status.CONVERTED, job.previous_case_id, subject, "metadata")
    logger.info("exam %s: clinical row changed, images unchanged: case.json of %s re-written (metadata only)",
                job.exam_id, job.previous_case_id)
    return True


def _lesion_label(job: ExamJob, exam: Any, ct: Any, body: np.ndarray) -> tuple[np.ndarray, Any]:
    """The lesion mask on the CT grid (masks/<exam>.nii.gz or a DICOM SEG), checked inside the body; its format."""
    from builder.convert import labels

    exam_id = job.exam_id
    seg = exam.seg.files[0] if exam.seg is not None and exam.seg.files else None
    mpath, mask_format = labels.find_mask(job.source / "masks", exam_id, seg=seg)
    label = labels.load_mask(mpath, ct, exam_id=exam_id, fmt=mask_format)
    labels.check_inside_body(label, body, exam_id=exam_id, path=mpath.relative_to(job.source)
                             if mpath.is_relative_to(job.source) else mpath.name)
    return label, mask_format


def _case_json(job: ExamJob, exam: Any, ct: Any, shape_zyx: tuple[int, ...], geometry_ras: np.ndarray,
               src_hash: SourceHashes, mask_format: Any, *, ct_meta: Any, pet_meta: Any, conv: Any, aligned: Any,
               stats: dict, qc_summary: dict) -> dict[str, Any]:
    """The case.json of a converted exam (docs/contracts.md section 3): de-identified ids, scrubbed headers."""
    from builder.convert import deid

    return {
        "schema_version": SCHEMA_VERSION,
        "builder_version": BUILDER_VERSION,
        "case_id": deid.make_case_id(job.key, exam.ct.study_uid),
        "subject_id": deid.make_subject_id(job.key, job.clinical.patient_id),
        "clinical": job.clinical.published(),
        "geometry": {
            "shape_zyx": list(shape_zyx),
            "spacing_xyz": [float(s) for s in ct.GetSpacing()],
            "origin_lps": [float(o) for o in ct.GetOrigin()],
            "direction": [float(d) for d in ct.GetDirection()],
            "affine_ras": geometry_ras.tolist(),
        },
        "ct": deid.scrub(ct_meta.to_dict()),
        "pet": dict(deid.scrub(pet_meta.to_dict()), suv=deid.scrub(conv.to_dict())),
        "alignment": aligned.record,
        "lesions": stats,
        "qc": qc_summary,
        "source": {"content_hash": src_hash.content, "exam_hash": src_hash.exam, "image_sha256": src_hash.images,
                   "mask_format": mask_format.value, "settings_sha256": job.settings.sha256()},
    }


def _leak_check(job: ExamJob, exam: Any) -> Callable[[Path], None]:
    """A check of the written case folder: none of the exam's identifiers (ids, UIDs, header values) in it."""
    from builder.convert import deid

    exam_id = job.exam_id
    identifiers = [("exam_id", exam_id), ("patient_id", job.clinical.patient_id),
                   ("StudyInstanceUID", exam.ct.study_uid), ("SeriesInstanceUID", exam.ct.series_uid),
                   ("SeriesInstanceUID", exam.pet.series_uid)]
    identifiers += [("FrameOfReferenceUID", s) for s in (exam.ct.frame_of_reference_uid,) if s]
    in_headers, equipment = deid.header_identifiers([exam.ct.files[0], exam.pet.files[0]])
    identifiers += in_headers

    def leak_check(folder: Path) -> None:
        hits = deid.find_identifiers(folder, identifiers, equipment=equipment, show_values=False)
        if hits:  # the values themselves only in the log (error.detail), never in failures.json
            values = deid.find_identifiers(folder, identifiers, equipment=equipment)
            raise ExamError(f"identifying data would be published: {'; '.join(hits[:5])}; drop that attribute from "
                            "what convert writes (builder.convert.deid.scrub) or from the source", exam_id=exam_id,
                            stage="deid", detail="; ".join(values[:5]))

    return leak_check


def _lesion_fov_fraction(label: np.ndarray, ct, pet, transform) -> float | None:
    """Fraction of lesion voxels whose point (through ``transform``) lies inside the PET volume."""
    import SimpleITK as sitk

    idx = np.argwhere(label)
    if idx.size == 0:
        return None
    if len(idx) > 20000:  # a regular subsample is plenty for a fraction
        idx = idx[:: len(idx) // 20000 + 1]
    pts = (affine_lps(ct) @ np.c_[idx[:, ::-1], np.ones(len(idx))].T)[:3].T
    if isinstance(transform, sitk.Euler3DTransform):
        from builder.convert.align import transform_matrix

        m = transform_matrix(transform)
        moved = (m[:3, :3] @ pts.T).T + m[:3, 3]
    else:
        moved = np.array([transform.TransformPoint(tuple(p)) for p in pts])
    inv = np.linalg.inv(affine_lps(pet))
    cidx = (inv[:3, :3] @ moved.T).T + inv[:3, 3]
    size = np.asarray(pet.GetSize(), float)
    inside = np.all((cidx >= -0.5) & (cidx <= size - 0.5), axis=1)
    return float(inside.mean())


# --------------------------------------------------------------------------------------------
# many exams


def read_id_map(work: Path) -> dict[str, dict]:
    """``WORK/private/id_map.csv`` as {exam_id: row}."""
    path = work / "private" / ID_MAP
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["exam_id"]: row for row in csv.DictReader(f)}


def _write_id_map(work: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=ID_MAP_COLUMNS)
    w.writeheader()
    for exam_id in sorted(rows):
        w.writerow({k: rows[exam_id].get(k, "") for k in ID_MAP_COLUMNS})
    write_atomic(work / "private" / ID_MAP, buf.getvalue(), mode=PRIVATE_FILE_MODE)  # owner only, whatever the umask


def _write_failures(work: Path, failures: dict[str, dict]) -> None:
    """``WORK/failures.json``: the entries sorted by exam id."""
    write_atomic(work / FAILURES, json.dumps(sorted(failures.values(), key=lambda f: f["exam_id"]), indent=2) + "\n",
                 mode=MAINTAINERS_FILE_MODE)  # exam ids and reasons: the maintainers' group only, whatever the umask


def _read_failures(work: Path) -> dict[str, dict]:
    path = work / FAILURES
    if not path.is_file():
        return {}
    try:
        return {f["exam_id"]: f for f in json.loads(path.read_text())}
    except (json.JSONDecodeError, KeyError, TypeError):
        logger.warning("%s is unreadable; it will be rewritten from this run", path)
        return {}


def list_exams(source: Path) -> list[str]:
    """Exam ids of a source folder: the folders under ``dicom/``."""
    dicom = source / "dicom"
    if not dicom.is_dir():
        raise ExamError(f"{dicom} not found: a source folder holds clinical.csv, dicom/<exam_id>/ and masks/ "
                        "(docs/contracts.md); check the SOURCE argument", stage="discover")
    return sorted(p.name for p in dicom.iterdir() if p.is_dir() and not p.name.startswith("."))


def _parent_watchdog(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _worker_init(threads: int, parent_pid: int) -> None:
    """Initializer of every worker process: thread count, and exit as soon as the parent dies.

    On Linux the kernel sends SIGKILL to the worker when its parent ends (prctl PR_SET_PDEATHSIG);
    elsewhere a watchdog thread notices the new parent PID within a second. Without this a killed
    convert leaves workers that finish their exams unrecorded and then wait forever.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the watchdog still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)
    # Ctrl-C in a terminal reaches the whole process group: the parent alone decides (it stops the
    # workers and records what they finished); a worker must not die half-way on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_parent_watchdog, args=(parent_pid,), daemon=True, name="parent-watchdog").start()
    _set_threads(threads)


def _set_threads(n: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def _isolated_main(job: ExamJob, threads: int, parent_pid: int, conn) -> None:
    _worker_init(threads, parent_pid)
    conn.send(convert_exam(job))
    conn.close()


def _died(job: ExamJob, how: str) -> ExamResult:
    return ExamResult(
        job.exam_id, Status.FAILED, patient_id=job.clinical.patient_id if job.clinical else None, stage="worker",
        reason=(f"[exam {job.exam_id}] the worker process converting this exam died ({how}): killed by the system "
                "(out of memory?) or crashed, and again when retried alone in a fresh process; any earlier case "
                "is kept; give the exam more memory (fewer --workers) and rerun"),
    )


def _run_isolated(ctx, job: ExamJob, threads: int) -> ExamResult:
    """Run one exam alone in a fresh process; a death of that process becomes a failed result."""
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_main, args=(job, threads, os.getpid(), sender), daemon=True,
                       name=f"convert-{job.exam_id}")
    proc.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    except BaseException:  # an interrupt: the exam must not go on being written after the parent has gone
        proc.kill()
        raise
    finally:
        receiver.close()
        proc.join()
    if result is not None:
        return result
    code = proc.exitcode
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return _died(job, how)


def _run_local_pool(jobs: list[ExamJob], n_workers: int, threads: int, collect) -> None:
    """Run ``jobs`` on ``n_workers`` spawned processes; survive the death of any of them.

    At most ``n_workers`` exams are in flight, so when a worker dies (the pool is then broken and
    its other workers are stopped) the suspects are exactly the exams in flight: each is retried
    once, alone in a fresh process, which also tells the culprit from its neighbours; then a new
    pool takes the rest.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork: SimpleITK/ITK threads do not survive it
    pending = deque(jobs)
    while pending:
        suspects: list[ExamJob] = []
        with ProcessPoolExecutor(max_workers=min(n_workers, len(pending)), mp_context=ctx,
                                 initializer=_worker_init, initargs=(threads, os.getpid())) as pool:
            in_flight: dict = {}

            def fill() -> bool:
                """Submit pending exams up to ``n_workers`` in flight; False when the pool is broken."""
                while pending and len(in_flight) < n_workers:
                    job = pending.popleft()
                    try:
                        in_flight[pool.submit(convert_exam, job)] = job
                    except BrokenProcessPool:  # a worker died after the last result came back
                        pending.appendleft(job)
                        return False
                return True

            try:
                broken = not fill()
                while in_flight and not broken:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = in_flight.pop(fut)
                        try:
                            collect(fut.result())
                        except BrokenProcessPool:
                            suspects.append(job)
                    broken = bool(suspects) or not fill()
                if broken:  # the exams still in flight ran on the broken pool: suspects too
                    suspects.extend(in_flight.values())
                    in_flight.clear()
            except BaseException:  # an interrupt (Ctrl-C, SIGTERM): stop the workers, keep what they finished
                _stop_pool(pool, in_flight, collect)
                raise
        if suspects:
            logger.warning("a worker process died while converting %s: retrying each alone in a fresh process",
                           ", ".join(sorted(j.exam_id for j in suspects)))
            for job in sorted(suspects, key=lambda j: j.exam_id):
                collect(_run_isolated(ctx, job, threads))


def _stop_pool(pool: ProcessPoolExecutor, in_flight: dict, collect: Callable[[ExamResult], None]) -> None:
    """Kill the pool's workers and wait for them to end, then record the exams they had finished.

    Once this returns no worker writes into WORK any more: a case a worker wrote whose result had
    reached this process is recorded here; one whose result had not is recorded from its journal
    entry (:meth:`_Ledger.interrupted`). The others are recorded as interrupted.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())  # {pid: Process}; no public handle
    for proc in processes:
        with contextlib.suppress(OSError, ValueError):
            proc.kill()
    for proc in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            proc.join()
    pool.shutdown(wait=False, cancel_futures=True)
    for fut, job in list(in_flight.items()):
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            in_flight.pop(fut)
            collect(fut.result())


def _run_dask(jobs: list[ExamJob], scheduler: str, collect) -> None:
    """Run ``jobs`` on a Dask distributed cluster; a task that kills its worker is recorded per exam.

    Dask reschedules a task whose worker died on another worker (``distributed.scheduler.allowed-failures``
    times) and then raises KilledWorker; a lost connection raises a CommClosedError. Either way the
    exam is listed as failed at stage ``worker`` and the run goes on.
    """
    from distributed import Client, as_completed as dask_completed

    with Client(scheduler) as client:
        futures = {client.submit(convert_exam, job, key=f"convert-{job.exam_id}-{os.getpid()}", pure=False): job
                   for job in jobs}
        for fut in dask_completed(list(futures)):
            job = futures[fut]
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - KilledWorker, CommClosedError, a cancelled task
                res = _died(job, f"Dask reports {type(e).__name__}: {e}")
            collect(res)


def _check_source(source: Path) -> None:
    """Refuse a SOURCE that is not a source folder before anything (WORK, a key) is created."""
    if not source.is_dir():
        raise ExamError(f"SOURCE {source} is not a folder; give the export folder that holds clinical.csv, "
                        "dicom/<exam_id>/ and masks/", stage="discover")
    missing = [n for n in ("clinical.csv", "dicom") if not (source / n).exists()]
    if missing:
        raise ExamError(f"SOURCE {source} has no {' and no '.join(missing)}: a source folder holds clinical.csv, "
                        "dicom/<exam_id>/ and masks/ (docs/contracts.md); check the SOURCE argument", stage="discover")


def convert_cohort(
    source: Path,
    work: Path,
    *,
    settings: ConvertSettings = ConvertSettings(),
    exams: list[str] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    prune: bool = False,
    wait_for_lock: bool = False,
    allow_mass_retirement: bool = False,
    new_key: bool = False,
) -> RunSummary:
    """Convert every exam (or ``exams``) of ``source`` into ``work``; parallel, resumable.

    ``workers``: local processes (default: all cores). ``scheduler``: address of a Dask
    distributed scheduler (``tcp://host:port``) to run the exams on instead. The parent process
    alone writes ``id_map.csv``, ``failures.json`` and ``build.json``, under the WORK lock (another
    convert of the same WORK is refused, or waited for with ``wait_for_lock``). Exams with a case in
    WORK whose DICOM folder is gone from the source are listed in ``summary.gone``; ``prune``
    removes them (:func:`withdraw_exams`). An interrupt (Ctrl-C, or SIGTERM to this process) stops the
    worker processes, records every exam they had finished and the unfinished ones as failed, and
    re-raises KeyboardInterrupt. A run that would retire (prune, or replace by a rejection of a changed
    source) more than :data:`MASS_RETIREMENT_FRACTION` of WORK's cases, and at least 2, retires none
    and raises :class:`~builder.errors.MassRetirementError` naming them, unless ``allow_mass_retirement``. The de-identification key must be WORK's own
    (:func:`builder.convert.deid.work_key`): a missing key with an id_map or cases stops the run
    before anything is written; ``new_key`` (a new key) is only for an empty WORK.

    Example:
        >>> s = convert_cohort(Path("source"), Path("work"), workers=2, progress=False)  # doctest: +SKIP
        >>> print(s.line())  # doctest: +SKIP
        6 exams: 5 converted, 0 unchanged (skipped), 1 rejected in 41.0 s
    """
    source, work = Path(source), Path(work)
    _check_source(source)
    if scheduler:  # a scheduler that cannot be reached is reported before WORK or the key is created
        from builder.convert.scheduler import check_scheduler

        check_scheduler(scheduler)
    table = read_clinical(source / "clinical.csv")
    all_exams = list_exams(source)
    if not all_exams and not table:
        raise ExamError(f"SOURCE {source} holds no exam (dicom/ is empty and clinical.csv has no row); "
                        "check the SOURCE argument or the export", stage="discover")
    work.mkdir(parents=True, exist_ok=True)
    with work_lock(work, wait=wait_for_lock):
        with _terminate_as_interrupt():
            return _convert_locked(source, work, table, all_exams, settings=settings, exams=exams, workers=workers,
                                   scheduler=scheduler, progress=progress, prune=prune,
                                   allow_mass_retirement=allow_mass_retirement,
                                   new_key=new_key)


def _convert_locked(source: Path, work: Path, table: dict, all_exams: list[str], *, settings: ConvertSettings,
                    exams: list[str] | None, workers: int | None, scheduler: str | None, progress: bool,
                    prune: bool, allow_mass_retirement: bool, new_key: bool = False) -> RunSummary:
    """The run itself, under the WORK lock: select the exams, convert them, record every result."""
    from lymphatlas_ds.progress import progress_bar

    t_start = time.perf_counter()
    key = _prepare_work(work, new_key=new_key)
    id_map = read_id_map(work)
    present = set(all_exams)
    _settle_journal(work, id_map, present)
    _remove_orphans(work, id_map)
    failures = _read_failures(work)
    gone = {e: row.get("case_id", "") for e, row in sorted(id_map.items()) if e not in present}
    n_cases = len(id_map)
    if prune and not allow_mass_retirement:  # before anything is converted: a missing export changes nothing
        _guard_mass_retirement({e: "gone from the source (--prune)" for e in gone}, id_map, n_cases, work)
    selected = _select_exams(exams, present, table, gone)
    n_workers = max(1, workers or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // min(n_workers, max(1, len(selected))))
    jobs = [
        ExamJob(source, work, e, table.get(e), key, settings,
                previous_case_id=(id_map.get(e) or {}).get("case_id") or None, threads=threads)
        for e in selected
    ]
    bar = progress_bar(total=len(jobs), desc="convert", unit="exam", disable=not progress)
    ledger = _Ledger(work, id_map, failures, bar)
    try:
        jobs = _reject_duplicate_studies(source, jobs, key, id_map, ledger.collect)
        _run_jobs(jobs, scheduler, n_workers, threads, ledger.collect)
    except KeyboardInterrupt:
        ledger.interrupted(jobs)
        raise
    finally:
        bar.close()
        ordered = [ledger.results[k] for k in sorted(ledger.results)]
        summary = RunSummary(ordered, time.perf_counter() - t_start, gone=gone)
        _write_build_json(work, settings, summary, workers=n_workers, scheduler=scheduler, source=source)
    if not allow_mass_retirement:
        why = {e: f"{ledger.results[e].status.value} at {ledger.results[e].stage}: {ledger.results[e].reason}"
               for e in ledger.to_retire}
        if prune:
            why.update({e: "gone from the source (--prune)" for e in gone})
        _guard_mass_retirement(why, id_map, n_cases, work)
    ledger.retire()
    if prune and gone:
        pruned = withdraw_exams(work, list(gone))
        summary.gone, summary.pruned = {}, pruned
        _write_build_json(work, settings, summary, workers=n_workers, scheduler=scheduler, source=source)
    _log_summary(summary, work)
    return summary


def _guard_mass_retirement(why: dict[str, str], id_map: dict[str, dict], n_cases: int, work: Path) -> None:
    """Refuse to retire more than :data:`MASS_RETIREMENT_FRACTION` of ``n_cases`` cases, and at least 2.

    ``why``: {exam id: why its case would go}. Raises :class:`MassRetirementError` naming each.
    """
    if len(why) < 2 or len(why) <= MASS_RETIREMENT_FRACTION * n_cases:
        return
    listing = "; ".join(f"{e} (case {(id_map.get(e) or {}).get('case_id') or 'none'}): {why[e]}" for e in sorted(why))
    raise MassRetirementError(
        f"this convert would retire {len(why)} of the {n_cases} cases of {work} (more than "
        f"{MASS_RETIREMENT_FRACTION:.0%}): {listing}. Nothing was retired: those cases and their id_map rows are "
        "as they were. Look at the source first (a re-exported clinical.csv, a missing or moved dicom/ folder); "
        "if these exams really are to go, run the same command again with --allow-mass-withdrawal",
        stage="retire")


def _remove_orphans(work: Path, id_map: dict[str, dict]) -> list[str]:
    """Remove every case folder of WORK that has no id_map row (after :func:`_settle_journal`); their names.

    Such a folder was made visible by a run killed before it recorded the case, and could not be
    adopted (incomplete, or its exam is gone from the source): it must not reach a release. If its
    exam is still in the source, this run converts it again (the same case id).
    """
    from builder.convert import case as case_mod

    known = {row.get("case_id") for row in id_map.values()}
    removed = []
    for folder in sorted((work / "cases").iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in known:
            case_mod.remove_case(work / "cases", folder.name)
            removed.append(folder.name)
            logger.warning("removed case folder %s: it has no row in %s (a run interrupted before recording it); "
                           "its exam, if still in the source, is converted again", folder, work / "private" / ID_MAP)
    return removed


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) handled as Ctrl-C for the block: the run stops its workers
    and records what they did instead of dying with them still writing. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare_work(work: Path, *, new_key: bool = False) -> bytes:
    """The de-identification key (checked first: a lost one stops the run before anything is written);
    WORK's cases/ and private/ folders, cleared of what an interrupted run left."""
    from builder.convert import case as case_mod
    from builder.convert.deid import work_key

    key = work_key(work, new_key=new_key)
    (work / "cases").mkdir(parents=True, exist_ok=True)
    (work / "private").mkdir(parents=True, exist_ok=True)
    for name in case_mod.clean_leftovers(work / "cases"):  # safe: we hold the WORK lock, no other run writes
        logger.info("removed %s left by an interrupted run", name)
    return key


def _reject_duplicate_studies(source: Path, jobs: list[ExamJob], key: bytes, id_map: dict[str, dict],
                              collect: Callable[[ExamResult], None]) -> list[ExamJob]:
    """Reject (without converting) each exam whose DICOM study another exam holds; the jobs left to run."""
    from builder.convert.identity import duplicate_studies

    case_of = {e: row.get("case_id", "") for e, row in id_map.items()}
    rejected = duplicate_studies(source, [j.exam_id for j in jobs], key, case_of)
    for job in jobs:
        if job.exam_id in rejected:
            error, changed = rejected[job.exam_id]
            logger.warning("exam %s rejected at %s: %s [log only: %s]", job.exam_id, error.stage, error, error.detail)
            collect(ExamResult(job.exam_id, Status.REJECTED, stage=error.stage, reason=str(error),
                               patient_id=job.clinical.patient_id if job.clinical else None, source_changed=changed))
    return [j for j in jobs if j.exam_id not in rejected]


def _select_exams(exams: list[str] | None, present: set[str], table: dict, gone: dict[str, str]) -> list[str]:
    """The exams to convert: ``exams`` (each must be in the source), or every exam of the source and
    clinical.csv; never one gone from the source."""
    if exams:
        unknown = sorted(set(exams) - present - set(table))
        if unknown:
            raise ExamError(f"--exams names exams not in the source: {', '.join(unknown)}", stage="discover")
        return sorted(set(exams) - set(gone))
    return sorted((present | set(table)) - set(gone))


def _run_jobs(jobs: list[ExamJob], scheduler: str | None, n_workers: int, threads: int,
              collect: Callable[[ExamResult], None]) -> None:
    """Convert ``jobs`` on a Dask cluster, in this process, or on a local process pool."""
    if scheduler:
        _run_dask(jobs, scheduler, collect)
    elif n_workers == 1 or len(jobs) <= 1:
        for job in jobs:
            collect(convert_exam(job))
    else:
        _run_local_pool(jobs, n_workers, threads, collect)


class _Ledger:
    """The run's bookkeeping, kept by the parent process alone: results, id_map.csv and failures.json."""

    def __init__(self, work: Path, id_map: dict[str, dict], failures: dict[str, dict], bar: Any) -> None:
        self.work, self.id_map, self.failures, self.bar = work, id_map, failures, bar
        self.results: dict[str, ExamResult] = {}
        self.to_retire: dict[str, str] = {}  # exam id -> earlier case a content rejection of a changed source retires

    def save(self) -> None:
        """Write id_map.csv and failures.json as they stand."""
        _write_id_map(self.work, self.id_map)
        _write_failures(self.work, self.failures)

    def collect(self, res: ExamResult) -> None:
        """Record one exam's result (saved at once) and advance the progress bar."""
        self.results[res.exam_id] = res
        if res.status in (Status.REJECTED, Status.FAILED):
            self._failed(res)
        else:
            self._converted(res)
        self.save()
        if res.status is Status.CONVERTED:  # its row is saved: the journal entry is done
            (self.work / "private" / JOURNAL / f"{res.case_id}.json").unlink(missing_ok=True)
        self.bar.set_postfix_str(f"{res.exam_id}: {res.status.value}" + (f" ({res.stage})" if res.stage else ""))
        self.bar.update(1)

    def _failed(self, res: ExamResult) -> None:
        """A failures.json entry (kind ``exam`` or ``run``); a rejected changed source is marked for retirement."""
        self.failures[res.exam_id] = {"exam_id": res.exam_id, "kind": FAILURE_KIND[res.status], "stage": res.stage,
                                      "reason": res.reason}
        old = (self.id_map.get(res.exam_id) or {}).get("case_id")
        # Only a content rejection of a changed source retires the earlier case, at the end of the run
        # (:meth:`retire`, past the mass-retirement guard); an error of this run (disk, memory, a dead
        # worker, an interrupt) never costs a good case or its id_map row.
        if res.status is Status.REJECTED and res.source_changed and old:
            self.to_retire[res.exam_id] = old

    def retire(self) -> None:
        """Remove the earlier cases (and id_map rows) marked by :meth:`_failed`, and save."""
        from builder.convert import case as case_mod

        for exam_id, old in sorted(self.to_retire.items()):
            self.id_map.pop(exam_id, None)
            if case_mod.remove_case(self.work / "cases", old):
                self.results[exam_id].retired_case = old
                logger.warning("retired the earlier case %s of exam %s: its source changed and is now rejected",
                               old, exam_id)
        self.to_retire.clear()
        self.save()

    def _converted(self, res: ExamResult) -> None:
        """The exam's id_map row (its earlier case removed when the case id changed); no failure entry."""
        from builder.convert import case as case_mod

        self.failures.pop(res.exam_id, None)
        old = (self.id_map.get(res.exam_id) or {}).get("case_id")
        if old and old != res.case_id:
            case_mod.remove_case(self.work / "cases", old)
        self.id_map[res.exam_id] = {"exam_id": res.exam_id, "patient_id": res.patient_id or "",
                                    "case_id": res.case_id, "subject_id": res.subject_id or ""}

    def interrupted(self, jobs: list[ExamJob]) -> None:
        """Record the cases the stopped workers made visible (the journal), every other unfinished exam as
        failed at stage ``interrupted``, and save."""
        adopted = set(_settle_journal(self.work, self.id_map, {job.exam_id for job in jobs}))
        for job in jobs:
            if job.exam_id in adopted and job.exam_id not in self.results:
                self.results[job.exam_id] = ExamResult(job.exam_id, Status.CONVERTED,
                                                       case_id=self.id_map[job.exam_id]["case_id"])
                self.failures.pop(job.exam_id, None)
        for job in jobs:
            if job.exam_id not in self.results:
                res = ExamResult(job.exam_id, Status.FAILED, stage="interrupted",
                                 reason=f"[exam {job.exam_id}] the run was interrupted; rerun")
                self.results[job.exam_id] = res
                self._failed(res)  # a failure entry; a failed exam never retires its earlier case
        self.save()


def _log_summary(summary: RunSummary, work: Path) -> None:
    """The run's summary line, each rejected or failed exam, and the exams gone from the source."""
    # DEBUG: `python -m builder convert` prints all of this on stdout; a log line would show it twice
    logger.debug("%s", summary.line())
    for r in summary.results:
        if r.status in (Status.REJECTED, Status.FAILED):
            logger.debug("  %s %s at %s: %s", r.exam_id, r.status.value, r.stage, r.reason)
    if summary.gone:
        gone = summary.gone
        logger.debug("%d exams of WORK are gone from the source (%s): their cases stay until "
                       "`python -m builder withdraw %s %s` (or convert --prune); release refuses them",
                       len(gone), ", ".join(gone), work, " ".join(gone))


def withdraw_exams(work: str | Path, exams: list[str], *, wait_for_lock: bool = False) -> dict[str, str]:
    """Remove the cases, id_map rows and failure entries of ``exams`` from WORK; {exam id: case id removed}.

    For a patient who withdrew consent or an exam deleted from the source. Every id is checked
    before anything is removed; an unknown one is an error that changes nothing. The next release
    built from WORK lacks these cases and its CHANGELOG lists them as removed (published versions
    keep them: see the README, "Withdrawing a patient").

    Example:
        >>> withdraw_exams("work", ["EX0003"])  # doctest: +SKIP
        {'EX0003': 'LA-3f9c2a1b'}
    """
    from builder.convert import case as case_mod

    work = Path(work)
    if not (work / "cases").is_dir():
        raise ExamError(f"{work} is not a WORK folder (no cases/); give the folder `python -m builder convert` wrote",
                        stage="withdraw")
    with work_lock(work, wait=wait_for_lock):
        id_map = read_id_map(work)
        failures = _read_failures(work)
        by_case = {row.get("case_id"): e for e, row in id_map.items() if row.get("case_id")}
        wanted = [by_case.get(x, x) for x in exams]  # a case id names its exam
        unknown = sorted(set(e for e in wanted if e not in id_map and e not in failures))
        if unknown:
            raise ExamError(f"{', '.join(unknown)}: no such exam (or case) in {work / 'private' / ID_MAP} or "
                            f"{work / FAILURES}; nothing was withdrawn. Give exam ids as in the source", stage="withdraw")
        removed: dict[str, str] = {}
        for exam_id in sorted(set(wanted)):
            case_id = (id_map.get(exam_id) or {}).get("case_id", "")
            if case_id:
                case_mod.remove_case(work / "cases", case_id)
                shutil.rmtree(work / "qc" / "cases" / case_id, ignore_errors=True)  # its QC pictures
            removed[exam_id] = case_id
            logger.debug("withdrew exam %s (case %s)", exam_id, case_id or "none")
        # The id_map row goes last: should a removal fail, a rerun still knows the case.
        for exam_id in removed:
            id_map.pop(exam_id, None)
            failures.pop(exam_id, None)
        _write_id_map(work, id_map)
        _write_failures(work, failures)
        build_path = work / BUILD_JSON
        if build_path.is_file():
            try:
                build = json.loads(build_path.read_text())
            except json.JSONDecodeError:
                build = None
            if isinstance(build, dict) and build.get("gone_from_source"):
                build["gone_from_source"] = {e: c for e, c in build["gone_from_source"].items() if e not in removed}
                write_atomic(build_path, json.dumps(build, indent=2, sort_keys=True) + "\n")
        return removed


def _write_build_json(work: Path, settings: ConvertSettings, summary: RunSummary, *, workers: int, scheduler: str | None,
                      source: Path | None = None) -> None:
    import importlib.metadata as md

    versions = {}
    for pkg in ("SimpleITK", "numpy", "scipy", "nibabel", "pydicom", "highdicom"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    build = {
        "builder_version": BUILDER_VERSION,
        "schema_version": SCHEMA_VERSION,
        "settings": settings.to_dict(),
        "versions": versions,
        "run": {"workers": workers, "scheduler": "dask" if scheduler else "local",
                "converted": summary.n_converted, "skipped": summary.n_skipped, "rejected": summary.n_rejected,
                "failed": summary.n_failed},
        "exams": {r.exam_id: {"status": r.status.value, "stage": r.stage} for r in summary.results},
        "gone_from_source": dict(sorted(summary.gone.items())),
        # Where WORK was converted from: release and publish refuse a target there (lymphatlas_ds._target).
        "source": str(Path(source).resolve()) if source is not None else None,
    }
    write_atomic(work / BUILD_JSON, json.dumps(build, indent=2, sort_keys=True) + "\n")


def result_dict(result: ExamResult) -> dict:
    """JSON-able form of an ExamResult (benchmarks, logs)."""
    d = asdict(result)
    d["status"] = result.status.value
    return d
