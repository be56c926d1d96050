"""Faults of a convert run, in the default suite: interrupts, I/O errors and MemoryError at each stage,
a rejection of an unchanged source, a mass retirement, a full disk at the lock, an absurd DICOM header.

One rule holds them together: an error of the run (OSError, MemoryError, a killed worker, an
interrupt, a full disk) never changes WORK's cases or id_map; only a finding about the exam's content
rejects it, and a rejection retires a good earlier case only when the source itself changed. Each
test checks the end state (case folder bytes, id_map rows, failures.json kinds, release contents).
The slow kill -9 / full tmpfs scenarios live in tests/test_faults.py, whose helpers are reused here.
"""

from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from builder.convert import pipeline
from tests.test_faults import _assert_cases_whole, _assert_no_orphans, _cli, _files, _fresh_work, _start

CONVERT = ("--quiet", "--no-report")


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(synthetic_good_cohort, tmp_path_factory) -> dict:
    """A WORK with the 3 good exams converted (in this process, serially) and its id_map."""
    source, _ = synthetic_good_cohort
    work = tmp_path_factory.mktemp("faults_convert") / "work"
    summary = pipeline.convert_cohort(source, work, workers=1, progress=False)
    assert summary.n_converted == 3, summary.line()
    cases = {e: r["case_id"] for e, r in pipeline.read_id_map(work).items()}
    return {"source": source, "work": work, "cases": cases, "id_map": pipeline.read_id_map(work)}


def _copy_work(base: dict, dst: Path) -> Path:
    shutil.copytree(base["work"], dst, ignore=shutil.ignore_patterns("qc"))
    return dst


def _source_view(source: Path, dst: Path, *, drop: tuple[str, ...] = (), age_of: tuple[str, ...] = (),
                 real_masks: bool = False) -> Path:
    """The source through symlinks, without the exams ``drop`` and with the age of ``age_of`` raised by a
    year and their mask re-encoded (their source changes, images included: a clinical change alone only
    re-writes case.json); ``real_masks`` copies masks/ so a test can rewrite one."""
    (dst / "dicom").mkdir(parents=True)
    for exam in (source / "dicom").iterdir():
        if exam.name not in drop:
            (dst / "dicom" / exam.name).symlink_to(exam, target_is_directory=True)
    if real_masks or age_of:
        shutil.copytree(source / "masks", dst / "masks")
        for exam in age_of:  # the same mask re-encoded: other bytes, same voxels, so the images convert again
            for mask in (dst / "masks").glob(f"{exam}.nii.gz"):
                mask.write_bytes(gzip.compress(gzip.decompress(mask.read_bytes()), compresslevel=1, mtime=1))
    else:
        (dst / "masks").symlink_to(source / "masks", target_is_directory=True)
    rows = list(csv.DictReader(io.StringIO((source / "clinical.csv").read_text())))
    for row in rows:
        if row["exam_id"] in age_of:
            row["age"] = str(int(float(row["age"])) + 1)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(r for r in rows if r["exam_id"] not in drop)
    (dst / "clinical.csv").write_text(out.getvalue())
    return dst


def _failures(work: Path) -> dict[str, dict]:
    return {f["exam_id"]: f for f in json.loads((work / "failures.json").read_text())}


def _visible_cases(work: Path) -> set[str]:
    if not (work / "cases").is_dir():
        return set()
    return {p.name for p in (work / "cases").iterdir() if p.is_dir() and not p.name.startswith(".")}


def _assert_no_orphan_case(work: Path) -> None:
    rows = {r["case_id"] for r in pipeline.read_id_map(work).values()}
    orphans = _visible_cases(work) - rows
    assert not orphans, f"case folders without an id_map row: {sorted(orphans)}"


def _released_cases(release: Path) -> set[str]:
    with open(release / "metadata" / "cases.csv", newline="") as f:
        return {row["case_id"] for row in csv.DictReader(f)}


# --- interrupts: real signals to a real `python -m builder convert` ----------------------------------


def _wait_for_workers(proc, n: int, timeout: float = 120.0) -> None:
    """Until ``proc`` has ``n`` worker processes, then 3 s more: each has taken an exam and is held in
    the test's delay (60 s), so no exam can finish before the signal."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "the convert never started its workers"
        try:
            workers = [c for c in psutil.Process(proc.pid).children()
                       if "resource_tracker" not in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            workers = []
        if len(workers) >= n:
            time.sleep(3.0)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_parent_alone_stops_its_workers_and_leaves_no_orphan_case(base, tmp_path, sig) -> None:
    work = _fresh_work(base, tmp_path / "work")  # the base's key: the same exams get the same case ids
    # every exam held 60 s in its worker: the signal lands while both workers have an exam in flight
    proc = _start("convert", str(base["source"]), str(work), "--workers", "2", *CONVERT, cwd=tmp_path,
                  env={pipeline.FAULT_ENV: "delay:*:60"})
    _wait_for_workers(proc, 2)
    proc.send_signal(sig)  # to the parent process alone, as a terminal's kill or a scheduler sends it
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr
    _assert_no_orphans(proc.pid, timeout=2)  # the workers ended with the parent, not after their exams
    time.sleep(1.0)  # a worker left running would write its case now
    _assert_no_orphan_case(work)
    _assert_cases_whole(work, {})
    failures = _failures(work)
    unfinished = set(base["cases"]) - set(pipeline.read_id_map(work))
    assert unfinished and {e: (failures[e]["kind"], failures[e]["stage"]) for e in unfinished} == \
        {e: ("run", "interrupted") for e in unfinished}
    rerun = _cli("convert", str(base["source"]), str(work), "--workers", "2", *CONVERT, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _assert_cases_whole(work, base["cases"])
    assert _visible_cases(work) == set(base["cases"].values())
    assert _failures(work) == {}


def test_an_interrupted_case_of_a_withdrawn_exam_is_never_released(base, tmp_path) -> None:
    """Ctrl-C while the workers convert, the exam is then removed from the source, `convert --prune`,
    `release`: the withdrawn exam's case is not in the release, whether its case was recorded before
    the interrupt or left without an id_map row by a worker the interrupt overtook."""
    work = _fresh_work(base, tmp_path / "work")
    last = sorted(base["cases"])[-1]  # held 60 s in its worker: still in flight when the others are done
    proc = _start("convert", str(base["source"]), str(work), "--workers", "2", *CONVERT, cwd=tmp_path,
                  env={pipeline.FAULT_ENV: f"delay:{last}:60"})
    deadline = time.monotonic() + 180
    while not _visible_cases(work):  # the first case is visible: interrupt while the other exam converts
        assert time.monotonic() < deadline and proc.poll() is None, "no case was ever written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()
    _assert_no_orphan_case(work)
    # A worker killed between its case's rename and its result's arrival leaves what the old code left
    # after every Ctrl-C: a case folder without a row. Plant one for the exam to be withdrawn.
    by_case = {c: e for e, c in base["cases"].items()}
    first = sorted(_visible_cases(work))[0]
    withdrawn = sorted(e for e in base["cases"] if base["cases"][e] != first)[0]
    if not (work / "cases" / base["cases"][withdrawn]).exists():
        shutil.copytree(base["work"] / "cases" / base["cases"][withdrawn], work / "cases" / base["cases"][withdrawn])
        _journal(work, base["id_map"][withdrawn])  # as the worker wrote it before making the case visible
    source = _source_view(base["source"], tmp_path / "source", drop=(withdrawn,))
    pruned = _cli("convert", str(source), str(work), "--workers", "2", "--prune", *CONVERT, cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    _assert_no_orphan_case(work)
    assert withdrawn not in pipeline.read_id_map(work)
    assert base["cases"][withdrawn] not in _visible_cases(work)
    rel = _cli("release", str(work), str(tmp_path / "rel"), "--version", "1.0.0", "--quiet", cwd=tmp_path)
    assert rel.returncode == 0, rel.stdout + rel.stderr
    released = _released_cases(tmp_path / "rel")
    assert released == {c for e, c in base["cases"].items() if e != withdrawn}, (released, by_case)


def test_a_convert_killed_with_sigkill_mid_way_loses_no_case_and_shows_no_half_case(base, tmp_path) -> None:
    """kill -9 of the whole run (parent and workers, as a power cut or the OOM killer of a cgroup would)
    while it replaces every case of a converted WORK: one exam is held in its worker, so the kill lands with
    cases already replaced and one still in flight. Every case is still there, whole (its voxels match its
    hash), each id_map row has its case, no visible case lacks a row, and the rerun completes. The default
    suite's version of tests/test_faults.py's random kills (those run with --runslow)."""
    import os

    work = _copy_work(base, tmp_path / "work")
    exams = sorted(base["cases"])
    # every exam's source changed (mask re-encoded, age + 1): each case is converted and swapped in again
    source = _source_view(base["source"], tmp_path / "source", age_of=tuple(exams))
    inode = {e: (work / "cases" / c).stat().st_ino for e, c in base["cases"].items()}
    held = exams[0]
    proc = _start("convert", str(source), str(work), "--workers", "2", *CONVERT, cwd=tmp_path,
                  env={pipeline.FAULT_ENV: f"delay:{held}:120"})
    deadline = time.monotonic() + 240

    def replaced() -> set[str]:
        out = set()
        for e, c in base["cases"].items():
            try:
                if (work / "cases" / c).stat().st_ino != inode[e]:
                    out.add(e)
            except FileNotFoundError:
                pass
        return out

    while replaced() != set(exams[1:]):
        assert time.monotonic() < deadline and proc.poll() is None, (replaced(), proc.stderr.read())
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the session: parent and workers at once, no handler runs
    assert proc.wait(timeout=30) == -signal.SIGKILL
    _assert_no_orphans(proc.pid, timeout=5)
    _assert_cases_whole(work, base["cases"])  # the replaced ones and the one in flight
    _assert_no_orphan_case(work)
    assert _visible_cases(work) == set(base["cases"].values())
    assert (work / "cases" / base["cases"][held]).stat().st_ino == inode[held]  # the held one was never touched
    rerun = _cli("convert", str(source), str(work), "--workers", "2", *CONVERT, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _assert_cases_whole(work, base["cases"])
    assert replaced() == set(exams)
    assert not [p.name for p in (work / "cases").iterdir() if p.name.startswith(".")]
    assert _failures(work) == {}


def _journal(work: Path, row: dict) -> None:
    path = work / "private" / pipeline.JOURNAL / f"{row['case_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: row[k] for k in pipeline.ID_MAP_COLUMNS}))


def test_a_recorded_in_the_journal_case_without_its_row_is_adopted_at_start(base, tmp_path) -> None:
    """What a kill -9 of the parent between a worker's rename and the parent's record leaves: the case,
    its journal entry, no row. The exam is still in the source: its row is adopted, the case kept."""
    work = _copy_work(base, tmp_path / "work")
    exam_id = sorted(base["cases"])[1]
    before = _files(work / "cases" / base["cases"][exam_id])
    rows = dict(base["id_map"])
    pipeline._write_id_map(work, {e: r for e, r in rows.items() if e != exam_id})
    _journal(work, rows[exam_id])
    summary = pipeline.convert_cohort(base["source"], work, workers=1, progress=False)
    assert {r.exam_id: r.status for r in summary.results} == {e: pipeline.Status.SKIPPED for e in base["cases"]}
    assert pipeline.read_id_map(work) == base["id_map"]
    assert _files(work / "cases" / base["cases"][exam_id]) == before
    assert not list((work / "private" / pipeline.JOURNAL).iterdir())


def test_a_case_folder_without_an_id_map_row_is_removed_at_start_and_its_exam_converted_again(base, tmp_path) -> None:
    work = _copy_work(base, tmp_path / "work")
    exam_id = sorted(base["cases"])[1]
    rows = dict(base["id_map"])
    rows.pop(exam_id)
    pipeline._write_id_map(work, rows)  # the case stays, its row is gone: an interrupted run's leftover
    summary = pipeline.convert_cohort(base["source"], work, workers=1, progress=False)
    by_exam = {r.exam_id: r.status for r in summary.results}
    assert by_exam[exam_id] is pipeline.Status.CONVERTED  # removed, then converted again from the source
    assert {e for e, s in by_exam.items() if s is pipeline.Status.SKIPPED} == set(base["cases"]) - {exam_id}
    assert pipeline.read_id_map(work) == base["id_map"]
    _assert_cases_whole(work, base["cases"])


# --- errors of the run at each stage: nothing in WORK changes ---------------------------------------


def _eio(*args, **kwargs):
    path = next((str(a) for a in args if isinstance(a, (str, Path))), None)
    raise OSError(errno.EIO, "Input/output error", path)


def _no_memory(*args, **kwargs):
    raise MemoryError()


def _inject(monkeypatch, stage: str, fault) -> None:
    """Make the reads (or writes) of ``stage`` fail with ``fault``, where the stage's own code reads."""
    import SimpleITK as sitk

    from builder.convert import case, discover, labels, read, suv

    if stage == "discover":
        monkeypatch.setattr(discover, "read_header", fault)
    elif stage == "read":
        monkeypatch.setattr(read, "open", fault, raising=False)  # the slice headers' and pixels' open()
    elif stage == "suv":
        monkeypatch.setattr(suv, "read_header", fault)
    elif stage == "labels":
        if fault is _eio:  # ITK reports an I/O error as a RuntimeError; the disk fails Python's reads too
            def itk_read(*args, **kwargs):
                raise RuntimeError("ITK ERROR: ImageFileReader: Could not read file")

            monkeypatch.setattr(sitk, "ReadImage", itk_read)
            monkeypatch.setattr(labels, "open", fault, raising=False)
        else:
            monkeypatch.setattr(sitk, "ReadImage", fault)
    elif stage == "write":
        monkeypatch.setattr(case, "write_nifti", fault)


@pytest.mark.parametrize("fault", [_eio, _no_memory], ids=["EIO", "MemoryError"])
@pytest.mark.parametrize("stage", ["discover", "read", "suv", "labels", "write"])
def test_an_error_of_the_run_at_any_stage_keeps_the_earlier_case_and_row(base, tmp_path, monkeypatch, stage,
                                                                         fault) -> None:
    exam_id = sorted(base["cases"])[0]
    case_id = base["cases"][exam_id]
    work = _copy_work(base, tmp_path / "work")
    before = _files(work / "cases" / case_id)
    # its clinical row changed: the exam converts again, and a rejection now would retire its case
    source = _source_view(base["source"], tmp_path / "source", age_of=(exam_id,))
    _inject(monkeypatch, stage, fault)
    summary = pipeline.convert_cohort(source, work, exams=[exam_id], workers=1, progress=False)
    (result,) = summary.results
    assert (result.status, result.stage, result.retired_case) == (pipeline.Status.FAILED, stage, None), result
    assert exam_id in result.reason and "error of this run" in result.reason
    assert _files(work / "cases" / case_id) == before
    assert pipeline.read_id_map(work) == base["id_map"]
    assert _visible_cases(work) == set(base["cases"].values())
    failure = _failures(work)[exam_id]
    assert (failure["kind"], failure["stage"]) == ("run", stage), failure
    assert summary.n_failed == 1 and "errors of this run: rerun" in summary.line()


def test_run_errors_end_the_command_with_status_3_and_say_rerun(base, tmp_path) -> None:
    """As typed: a worker killed twice is an error of the run: exit 3, kind run, the case kept."""
    exam_id = sorted(base["cases"])[2]
    work = _copy_work(base, tmp_path / "work")
    before = _files(work / "cases" / base["cases"][exam_id])
    source = _source_view(base["source"], tmp_path / "source", age_of=(exam_id,))
    proc = _cli("convert", str(source), str(work), "--workers", "2", *CONVERT, cwd=tmp_path,
                env={pipeline.FAULT_ENV: f"kill-worker:{exam_id}"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "errors of this run: rerun" in proc.stdout and "Traceback" not in proc.stderr
    assert _failures(work)[exam_id]["kind"] == "run"
    assert _files(work / "cases" / base["cases"][exam_id]) == before
    assert pipeline.read_id_map(work) == base["id_map"]


# --- rejections: only a changed source retires a case -----------------------------------------------


def test_a_content_rejection_of_an_unchanged_source_keeps_the_good_case(base, tmp_path, monkeypatch) -> None:
    """Other settings (a new builder version, another gzip level) convert an unchanged exam again; a
    check that now fails rejects it but cannot retire the case its unchanged source once gave."""
    from builder.convert import qc
    from builder.errors import QCError

    exam_id = sorted(base["cases"])[0]
    case_id = base["cases"][exam_id]
    work = _copy_work(base, tmp_path / "work")
    before = _files(work / "cases" / case_id)

    def stricter(checks, *, exam_id):
        raise QCError("lesion_fov_fraction 0.97 < 0.99 (a stricter threshold)", exam_id=exam_id)

    monkeypatch.setattr(qc, "require_passed", stricter)
    settings = pipeline.ConvertSettings(gzip_level=2)
    summary = pipeline.convert_cohort(base["source"], work, exams=[exam_id], workers=1, progress=False,
                                      settings=settings)
    (result,) = summary.results
    assert (result.status, result.stage, result.retired_case) == (pipeline.Status.REJECTED, "qc", None), result
    assert _files(work / "cases" / case_id) == before
    assert pipeline.read_id_map(work) == base["id_map"]
    assert _failures(work)[exam_id]["kind"] == "exam"


# --- mass retirement --------------------------------------------------------------------------------


def _break_mask(source: Path, exam_id: str) -> None:
    """Rewrite the exam's NIfTI mask with a value 2: a content rejection (not binary) of a changed source."""
    import nibabel as nib

    path = source / "masks" / f"{exam_id}.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj).astype(np.uint8)
    data[data > 0] = 2
    path.unlink()
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def test_a_mass_retirement_by_rejection_is_refused_then_allowed_with_the_flag(base, tmp_path) -> None:
    work = _copy_work(base, tmp_path / "work")
    before = {c: _files(work / "cases" / c) for c in base["cases"].values()}
    broken = sorted(base["cases"])[:2]  # 2 of 3 cases: more than 10 %
    source = _source_view(base["source"], tmp_path / "source", real_masks=True)
    for exam_id in broken:
        _break_mask(source, exam_id)
    refused = _cli("convert", str(source), str(work), "--workers", "1", *CONVERT, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and "--allow-mass-withdrawal" in refused.stderr
    for exam_id in broken:
        assert exam_id in refused.stderr and base["cases"][exam_id] in refused.stderr
    assert "not binary" in refused.stderr  # why each would go
    assert {c: _files(work / "cases" / c) for c in base["cases"].values()} == before
    assert pipeline.read_id_map(work) == base["id_map"]
    assert {e: f["kind"] for e, f in _failures(work).items()} == {e: "exam" for e in broken}
    allowed = _cli("convert", str(source), str(work), "--workers", "1", "--allow-mass-withdrawal", *CONVERT,
                   cwd=tmp_path)
    assert allowed.returncode == 1, allowed.stdout + allowed.stderr
    kept = sorted(base["cases"])[2]
    assert pipeline.read_id_map(work) == {kept: base["id_map"][kept]}
    assert _visible_cases(work) == {base["cases"][kept]}


def test_a_mass_prune_is_refused_before_anything_changes_then_allowed_with_the_flag(base, tmp_path) -> None:
    work = _copy_work(base, tmp_path / "work")
    before = _files(work)
    gone = tuple(sorted(base["cases"])[1:])  # a half-copied export: 2 of 3 exam folders missing
    source = _source_view(base["source"], tmp_path / "source", drop=gone)
    refused = _cli("convert", str(source), str(work), "--prune", "--workers", "1", *CONVERT, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and "--allow-mass-withdrawal" in refused.stderr
    assert all(e in refused.stderr and "gone from the source" in refused.stderr for e in gone)
    assert _files(work) == before  # nothing at all: not a case, not a row, not failures.json
    allowed = _cli("convert", str(source), str(work), "--prune", "--allow-mass-withdrawal", "--workers", "1",
                   *CONVERT, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert set(pipeline.read_id_map(work)) == set(base["cases"]) - set(gone)
    assert _visible_cases(work) == {base["cases"][e] for e in base["cases"] if e not in gone}


def test_one_retirement_of_a_few_cases_needs_no_flag(base, tmp_path) -> None:
    work = _copy_work(base, tmp_path / "work")
    gone = sorted(base["cases"])[0]
    source = _source_view(base["source"], tmp_path / "source", drop=(gone,))
    pruned = _cli("convert", str(source), str(work), "--prune", "--workers", "1", *CONVERT, cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert gone not in pipeline.read_id_map(work) and base["cases"][gone] not in _visible_cases(work)


# --- a full disk at the lock, an absurd header --------------------------------------------------------


def test_a_full_disk_when_the_lock_file_is_created_is_one_clear_message(base, tmp_path) -> None:
    from tests.support.disk import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        try:  # fill the disk to its last byte
            with open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
        proc = _cli("convert", str(base["source"]), str(disk / "work"), "--workers", "1", *CONVERT, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert f"lock file {disk / 'work' / '.lock'}" in proc.stderr and "No space left on device" in proc.stderr
        assert "free disk space" in proc.stderr
        assert not [p for p in (disk / "work").rglob("*") if p.name != ".lock"]  # nothing else was created


def test_enospc_opening_a_lock_file_names_it_in_process(tmp_path, monkeypatch) -> None:
    import os

    from lymphatlas_ds import _lock

    real_open = os.open

    def full(path, *args, **kwargs):
        if str(path).endswith(_lock.LOCK_NAME):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(_lock.os, "open", full)
    with pytest.raises(_lock.LockError, match=r"lock file .*\.lock.*No space left on device.*free disk space"):
        with _lock.work_lock(tmp_path / "work"):
            pass


@pytest.mark.parametrize("header", [{"Rows": 65535, "Columns": 65535}, {"Rows": 1024, "Columns": 1024},
                                    {"NumberOfFrames": 2**31 - 1}], ids=["65535x65535", "1024x1024", "frames"])
def test_an_absurd_image_size_in_a_header_rejects_the_exam_naming_the_file(base, tmp_path, header) -> None:
    import pydicom
    import tracemalloc

    from builder.convert.discover import discover_exam
    from builder.convert.read import read_series

    exam_id = sorted(base["cases"])[0]
    source = _source_view(base["source"], tmp_path / "source", drop=(exam_id,))
    shutil.copytree(base["source"] / "dicom" / exam_id, source / "dicom" / exam_id)
    (source / "clinical.csv").write_text((base["source"] / "clinical.csv").read_text())
    ct = discover_exam(source / "dicom" / exam_id, exam_id).ct
    victim = Path(sorted(ct.files)[len(ct.files) // 2])
    ds = pydicom.dcmread(victim)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.save_as(victim)
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as info:
            read_series(ct, exam_id=exam_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20, f"{peak} bytes allocated for a header's claim"
    from builder.errors import ReadError

    assert isinstance(info.value, ReadError) and info.value.path == str(victim), info.value
    proc = _cli("convert", str(source), str(tmp_path / "work"), "--exams", exam_id, "--workers", "1", *CONVERT,
                cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    failure = _failures(tmp_path / "work")[exam_id]
    assert (failure["kind"], failure["stage"]) == ("exam", "read") and str(victim) in failure["reason"], failure
