"""Run the stages over many exams: DICOM source -> aligned cases (``python -m builder convert``).

One exam is one task (:func:`convert_exam`): discover, read, SUV, align, labels, statistics, QC,
de-identification, write. Tasks run in parallel processes (``workers``) or on an existing Dask
distributed cluster (``scheduler``); a failing exam never stops the others, it becomes an entry
of ``WORK/failures.json`` with its stage and reason. Runs are resumable: an exam whose source
files, clinical row and settings hash to what its ``case.json`` recorded is skipped, and a case
folder only appears complete (written under a temporary name, then renamed).

Example:
    >>> summary = convert_cohort(Path("source"), Path("work"), settings=ConvertSettings(), workers=2)  # doctest: +SKIP
    >>> summary.n_rejected  # doctest: +SKIP
    0
"""

from __future__ import annotations

import csv
import enum
import hashlib
import io
import json
import logging
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from builder.align import AlignSettings, affine_lps, affine_ras
from builder.clinical import ClinicalRecord, RejectedRow, read_clinical
from builder.deid import PRIVATE_FILE_MODE
from builder.errors import ExamError
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.schema import CASE_JSON, SCHEMA_VERSION

logger = logging.getLogger(__name__)

BUILDER_VERSION = "0.1.0"
ID_MAP = "id_map.csv"
FAILURES = "failures.json"
BUILD_JSON = "build.json"
ID_MAP_COLUMNS = ("exam_id", "patient_id", "case_id", "subject_id")


class Status(str, enum.Enum):
    CONVERTED = "converted"
    SKIPPED = "skipped"
    REJECTED = "rejected"


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that changes the output of a convert (part of each exam's source hash)."""

    align: AlignSettings = field(default_factory=AlignSettings)
    gzip_level: int = 1

    def to_dict(self) -> dict:
        return {"align": self.align.to_dict(), "gzip_level": self.gzip_level, "builder_version": BUILDER_VERSION}


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


@dataclass
class RunSummary:
    results: list[ExamResult]
    seconds: float

    @property
    def n_converted(self) -> int:
        return sum(r.status is Status.CONVERTED for r in self.results)

    @property
    def n_skipped(self) -> int:
        return sum(r.status is Status.SKIPPED for r in self.results)

    @property
    def n_rejected(self) -> int:
        return sum(r.status is Status.REJECTED for r in self.results)

    def line(self) -> str:
        return (f"{len(self.results)} exams: {self.n_converted} converted, {self.n_skipped} unchanged (skipped), "
                f"{self.n_rejected} rejected in {self.seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# small helpers


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB
    except (ImportError, OSError):
        return None


def mask_path(source: Path, exam_id: str) -> Path | None:
    """The exam's mask in ``SOURCE/masks`` (None when there is none)."""
    for name in (f"{exam_id}.nii.gz", f"{exam_id}.nii", f"{exam_id}.seg.dcm"):
        if (source / "masks" / name).is_file():
            return source / "masks" / name
    return None


def source_hash(job: ExamJob) -> str:
    """sha256 of the exam's source files (paths and bytes), its mask, clinical row and settings."""
    h = hashlib.sha256()
    exam_dir = job.source / "dicom" / job.exam_id
    files = sorted(p for p in exam_dir.rglob("*") if p.is_file())
    mask = mask_path(job.source, job.exam_id)
    if mask is not None:
        files.append(mask)
    for path in files:
        h.update(str(path.relative_to(job.source)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update((job.clinical.hash_text() if job.clinical else "").encode())
    h.update(json.dumps(job.settings.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


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


def convert_exam(job: ExamJob) -> ExamResult:
    """Turn one exam into an aligned case folder; never raises (errors become a rejected result).

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

    try:
        with threadpool_limits(limits=job.threads or 1):
            _convert(job, stages, result)
    except ExamError as e:
        e.exam_id = e.exam_id or job.exam_id
        result.status, result.stage, result.reason = Status.REJECTED, e.stage, str(e)
        logger.warning("exam %s rejected at %s: %s", job.exam_id, e.stage, e)
    except Exception as e:  # noqa: BLE001 - one exam must never stop the others
        result.status, result.stage = Status.REJECTED, stages.current
        result.reason = f"[exam {job.exam_id}] unexpected {type(e).__name__} at stage {stages.current}: {e}"
        logger.error("exam %s failed unexpectedly:\n%s", job.exam_id, traceback.format_exc())
    result.timings_s = stages.stop()
    result.peak_rss_mb = _peak_rss_mb()
    return result


def _convert(job: ExamJob, stages: _Stages, result: ExamResult) -> None:
    import SimpleITK as sitk

    from builder import align, case, deid, labels, qc
    from builder.discover import discover_exam
    from builder.errors import ClinicalError, DiscoveryError, LabelError
    from builder.read import read_series
    from builder.suv import suv_conversion

    exam_id, settings = job.exam_id, job.settings
    exam_dir = job.source / "dicom" / exam_id
    stages.start("discover")
    if not exam_dir.is_dir():
        raise DiscoveryError(f"no DICOM folder dicom/{exam_id} in the source; export the exam or remove its clinical row",
                             exam_id=exam_id)
    if job.clinical is None:
        raise ClinicalError(f"clinical.csv has no row for exam {exam_id}; add its diagnosis, sex, age and date",
                            exam_id=exam_id)
    job.clinical.check()  # a rejected clinical.csv row raises, naming its line, its value and what is allowed
    stages.start("hash")
    src_hash = source_hash(job)
    if job.previous_case_id:
        existing = job.work / "cases" / job.previous_case_id / CASE_JSON
        if existing.is_file():
            try:
                old = json.loads(existing.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("source", {}).get("content_hash") == src_hash:
                result.status, result.case_id = Status.SKIPPED, job.previous_case_id
                result.subject_id = old.get("subject_id")
                return
    stages.start("discover")
    exam = discover_exam(exam_dir, exam_id)
    stages.start("read")
    ct, ct_meta = read_series(exam.ct, exam_id=exam_id)
    pet, pet_meta = read_series(exam.pet, exam_id=exam_id)
    stages.start("suv")
    conv = suv_conversion(exam.pet, exam_id=exam_id)
    pet_suv = sitk.Cast(pet, sitk.sitkFloat32) * float(conv.factor)
    del pet
    stages.start("labels")
    body = labels.body_mask(ct)
    mpath = mask_path(job.source, exam_id)
    if mpath is None and exam.seg is not None and exam.seg.files:
        mpath = exam.seg.files[0]
    if mpath is None:
        raise LabelError(f"no lesion mask: expected masks/{exam_id}.nii.gz or masks/{exam_id}.seg.dcm", exam_id=exam_id)
    mask_format = labels.MaskFormat.SEG if mpath.name.endswith(".dcm") else labels.MaskFormat.NIFTI
    label = labels.load_mask(mpath, ct, exam_id=exam_id, fmt=mask_format)
    labels.check_inside_body(label, body, exam_id=exam_id, path=mpath.relative_to(job.source)
                             if mpath.is_relative_to(job.source) else mpath.name)
    stages.start("align")
    body_img = sitk.GetImageFromArray(body.view(np.uint8))
    body_img.CopyInformation(ct)
    aligned = align.align_pet(ct, pet_suv, settings=settings.align, body=body_img)
    del body_img
    for k, v in aligned.timings_s.items():
        stages.timings[f"align.{k}"] = v
    pet_img = aligned.pet_on_ct  # kept alive: pet_arr is a view of its buffer
    pet_arr = sitk.GetArrayViewFromImage(pet_img)
    fov_fraction = _lesion_fov_fraction(label, ct, pet_suv, aligned.transform)
    del pet_suv
    stages.start("statistics")
    stats = labels.lesion_statistics(label, pet_arr, ct)
    stages.start("qc")
    ct_arr = sitk.GetArrayViewFromImage(ct)  # a view: `ct` stays alive until the case is written
    checks = qc.run_checks(
        ct=ct_arr, pet=pet_arr, label=label, body=body, lesion_fov_fraction=fov_fraction,
        grids_identical=ct_arr.shape == pet_arr.shape == label.shape, alignment=aligned.record,
    )
    qc.require_passed(checks, exam_id=exam_id)
    stages.start("deid")
    case_id = deid.make_case_id(job.key, exam.ct.study_uid)
    subject_id = deid.make_subject_id(job.key, job.clinical.patient_id)
    geometry_ras = affine_ras(ct)
    case_json = {
        "schema_version": SCHEMA_VERSION,
        "builder_version": BUILDER_VERSION,
        "case_id": case_id,
        "subject_id": subject_id,
        "clinical": job.clinical.published(),
        "geometry": {
            "shape_zyx": list(ct_arr.shape),
            "spacing_xyz": [float(s) for s in ct.GetSpacing()],
            "origin_lps": [float(o) for o in ct.GetOrigin()],
            "direction": [float(d) for d in ct.GetDirection()],
            "affine_ras": geometry_ras.tolist(),
        },
        "ct": deid.scrub(ct_meta.to_dict()),
        "pet": dict(deid.scrub(pet_meta.to_dict()), suv=deid.scrub(conv.to_dict())),
        "alignment": aligned.record,
        "lesions": stats,
        "qc": qc.summary(checks),
        "source": {"content_hash": src_hash, "mask_format": mask_format.value},
    }
    identifiers = [("exam_id", exam_id), ("patient_id", job.clinical.patient_id),
                   ("StudyInstanceUID", exam.ct.study_uid), ("SeriesInstanceUID", exam.ct.series_uid),
                   ("SeriesInstanceUID", exam.pet.series_uid)]
    identifiers += [("FrameOfReferenceUID", s) for s in (exam.ct.frame_of_reference_uid,) if s]
    in_headers, equipment = deid.header_identifiers([exam.ct.files[0], exam.pet.files[0]])
    identifiers += in_headers
    stages.start("write")

    def leak_check(folder: Path) -> None:
        hits = deid.find_identifiers(folder, identifiers, equipment=equipment)
        if hits:
            raise ExamError(f"identifying data would be published: {'; '.join(hits[:5])}; drop that attribute from "
                            "what convert writes (builder.deid.scrub) or from the source", exam_id=exam_id, stage="deid")

    case.write_case(job.work / "cases", case_json, ct=ct_arr, pet=pet_arr.astype(np.float32, copy=False),
                    label=label, affine_ras=geometry_ras, level=settings.gzip_level, check=leak_check)
    result.status, result.case_id, result.subject_id = Status.CONVERTED, case_id, subject_id


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
        from builder.align import transform_matrix

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
        raise ExamError(f"{dicom} not found: a source folder holds dicom/<exam_id>/ (see DESIGN.md)", stage="discover")
    return sorted(p.name for p in dicom.iterdir() if p.is_dir() and not p.name.startswith("."))


def _set_threads(n: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def convert_cohort(
    source: Path,
    work: Path,
    *,
    settings: ConvertSettings = ConvertSettings(),
    exams: list[str] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Convert every exam (or ``exams``) of ``source`` into ``work``; parallel, resumable.

    ``workers``: local processes (default: all cores). ``scheduler``: address of a Dask
    distributed scheduler (``tcp://host:port``) to run the exams on instead. The parent process
    alone writes ``id_map.csv``, ``failures.json`` and ``build.json``.

    Example:
        >>> s = convert_cohort(Path("source"), Path("work"), workers=2, progress=False)  # doctest: +SKIP
        >>> print(s.line())  # doctest: +SKIP
        6 exams: 5 converted, 0 unchanged (skipped), 1 rejected in 41.0 s
    """
    from tqdm.auto import tqdm

    from builder import case as case_mod
    from builder.deid import load_or_create_key

    t_start = time.perf_counter()
    source, work = Path(source), Path(work)
    (work / "cases").mkdir(parents=True, exist_ok=True)
    (work / "private").mkdir(parents=True, exist_ok=True)
    for name in case_mod.clean_leftovers(work / "cases"):
        logger.info("removed %s left by an interrupted run", name)
    key = load_or_create_key(work / "private")
    clinical_path = source / "clinical.csv"
    table = read_clinical(clinical_path)
    all_exams = list_exams(source)
    if exams:
        unknown = sorted(set(exams) - set(all_exams) - set(table))
        if unknown:
            raise ExamError(f"--exams names exams not in the source: {', '.join(unknown)}", stage="discover")
        selected = sorted(set(exams))
    else:
        selected = sorted(set(all_exams) | set(table))
    id_map = read_id_map(work)
    failures = _read_failures(work)
    n_workers = max(1, workers or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // min(n_workers, max(1, len(selected))))
    jobs = [
        ExamJob(source, work, e, table.get(e), key, settings,
                previous_case_id=(id_map.get(e) or {}).get("case_id") or None, threads=threads)
        for e in selected
    ]
    results: list[ExamResult] = []
    bar = tqdm(total=len(jobs), desc="convert", unit="exam", disable=not progress)

    def collect(res: ExamResult) -> None:
        results.append(res)
        if res.status is Status.REJECTED:
            failures[res.exam_id] = {"exam_id": res.exam_id, "stage": res.stage, "reason": res.reason}
            old = (id_map.pop(res.exam_id, None) or {}).get("case_id")
            if old and case_mod.remove_case(work / "cases", old):
                logger.info("removed the earlier case %s of rejected exam %s", old, res.exam_id)
        else:
            failures.pop(res.exam_id, None)
            old = (id_map.get(res.exam_id) or {}).get("case_id")
            if old and old != res.case_id:
                case_mod.remove_case(work / "cases", old)
            id_map[res.exam_id] = {"exam_id": res.exam_id, "patient_id": res.patient_id or "",
                                   "case_id": res.case_id, "subject_id": res.subject_id or ""}
        _write_id_map(work, id_map)
        write_atomic(work / FAILURES, json.dumps(sorted(failures.values(), key=lambda f: f["exam_id"]), indent=2) + "\n")
        bar.set_postfix_str(f"{res.exam_id}: {res.status.value}" + (f" ({res.stage})" if res.stage else ""))
        bar.update(1)

    try:
        if scheduler:
            from distributed import Client, as_completed as dask_completed

            with Client(scheduler) as client:
                futures = [client.submit(convert_exam, job, key=f"convert-{job.exam_id}-{os.getpid()}", pure=False)
                           for job in jobs]
                for fut in dask_completed(futures):
                    collect(fut.result())
        elif n_workers == 1 or len(jobs) <= 1:
            for job in jobs:
                collect(convert_exam(job))
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork: SimpleITK/ITK threads do not survive it
            with ProcessPoolExecutor(max_workers=min(n_workers, len(jobs)), mp_context=ctx,
                                     initializer=_set_threads, initargs=(threads,)) as pool:
                futures = [pool.submit(convert_exam, job) for job in jobs]
                for fut in as_completed(futures):
                    collect(fut.result())
    finally:
        bar.close()
    results.sort(key=lambda r: r.exam_id)
    summary = RunSummary(results, time.perf_counter() - t_start)
    _write_build_json(work, settings, summary, workers=n_workers, scheduler=scheduler)
    logger.info("%s", summary.line())
    for r in results:
        if r.status is Status.REJECTED:
            logger.info("  %s rejected at %s: %s", r.exam_id, r.stage, r.reason)
    return summary


def _write_build_json(work: Path, settings: ConvertSettings, summary: RunSummary, *, workers: int, scheduler: str | None) -> None:
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
                "converted": summary.n_converted, "skipped": summary.n_skipped, "rejected": summary.n_rejected},
        "exams": {r.exam_id: {"status": r.status.value, "stage": r.stage} for r in summary.results},
    }
    write_atomic(work / BUILD_JSON, json.dumps(build, indent=2, sort_keys=True) + "\n")


def result_dict(result: ExamResult) -> dict:
    """JSON-able form of an ExamResult (benchmarks, logs)."""
    d = asdict(result)
    d["status"] = result.status.value
    return d
