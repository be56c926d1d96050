"""Fault injection: kill -9, a full disk, two runs at once, a dead worker, a dead parent.

Every scenario runs the commands as a maintainer types them (subprocesses, from another folder),
breaks them, and then checks what must hold whatever the timing:

* no good case lost: every case WORK had before is still there, complete, its voxels matching
  its recorded content hash, and its id_map row kept;
* no half file visible: every non-hidden case folder, release, mirror version and nnU-Net file is
  complete (hidden ``.tmp-``/``.partial`` names may remain; the next run clears them);
* the previous release and the mirror's versions are byte for byte as they were;
* no orphan process: nothing of the killed run's session is left alive;
* the rerun completes.

Kill points come from a seeded random generator: the same seed kills at the same delays. The
client's decoded-cache kill test lives with the cache (tests/test_cache.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.convert import pipeline
from builder.convert.case import load_case
from lymphatlas_ds.manifest import content_hash, verify_release
from tests.support.disk import small_tmpfs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
KILL_SEED = 12


# --- helpers -----------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path, env: dict | None = None, module: str = "builder") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=600)


def _terminal_signals() -> None:
    """In the child: SIGINT as a terminal gives it. A suite started in the background by a non-interactive
    shell (`.ci/run &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str, cwd: Path, env: dict | None = None, module: str = "builder") -> subprocess.Popen:
    # A session of its own: every process the run starts (workers too) carries its id.
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})}, start_new_session=True,
                            preexec_fn=_terminal_signals)


def _session_alive(sid: int) -> list[int]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(proc.info["pid"]) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.info["pid"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def _assert_no_orphans(sid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (alive := _session_alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes of the killed run still alive: {alive}"


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL the run's main process after ``delay`` s; False if it had already finished."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _changed_source(source: Path, dst: Path, *, years: int) -> Path:
    """The same DICOM and masks (symlinks) with every age raised: every exam must be re-converted."""
    (dst / "dicom").mkdir(parents=True)
    for exam in (source / "dicom").iterdir():
        (dst / "dicom" / exam.name).symlink_to(exam, target_is_directory=True)
    (dst / "masks").symlink_to(source / "masks", target_is_directory=True)
    rows = list(csv.DictReader(io.StringIO((source / "clinical.csv").read_text())))
    for row in rows:
        row["age"] = str(int(float(row["age"])) + years)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (dst / "clinical.csv").write_text(out.getvalue())
    return dst


def _fresh_work(base: dict, work: Path) -> Path:
    """An empty WORK with the base run's de-identification key: the same exams get the same case ids."""
    (work / "private").mkdir(parents=True)
    shutil.copy2(base["work"] / "private" / "deid.key", work / "private" / "deid.key")
    return work


def _assert_cases_whole(work: Path, must_have: dict[str, str]) -> None:
    """Every visible case is complete and its voxels match its hash; every id_map row has its case."""
    id_map = pipeline.read_id_map(work)
    for exam_id, case_id in must_have.items():
        assert id_map.get(exam_id, {}).get("case_id") == case_id, f"id_map row of {exam_id} lost"
    for folder in (work / "cases").iterdir():
        if folder.name.startswith("."):
            continue  # a temporary or replaced case: never listed, cleared by the next run
        case = load_case(folder, arrays=True)  # all files present, case.json valid
        a = case["arrays"]
        affine = case["geometry"]["affine_ras"]
        import numpy as np

        assert content_hash(a["ct"], a["pet"], a["label"], np.asarray(affine, np.float64)) == case["content_hash"], folder
    for exam_id, row in id_map.items():
        assert (work / "cases" / row["case_id"]).is_dir(), f"id_map row {exam_id} has no case"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(synthetic_good_cohort, tmp_path_factory) -> dict:
    """A converted WORK of 3 good exams, its release 1.0.0, a mirror holding it."""
    source, _ = synthetic_good_cohort
    root = tmp_path_factory.mktemp("faults")
    work = root / "work"
    proc = _cli("convert", str(source), str(work), "--workers", "2", "--quiet", "--no-report", cwd=root)
    assert proc.returncode == 0, proc.stderr
    rel = _cli("release", str(work), str(root / "rel100"), "--version", "1.0.0", "--quiet", cwd=root)
    assert rel.returncode == 0, rel.stderr
    pub = _cli("publish", str(root / "rel100"), "--mirror", str(root / "mirror"), cwd=root)
    assert pub.returncode == 0, pub.stderr
    cases = {e: r["case_id"] for e, r in pipeline.read_id_map(work).items()}
    assert len(cases) == 3
    return {"source": source, "root": root, "work": work, "cases": cases}


# --- kill -9 -----------------------------------------------------------------------------------


def test_convert_killed_at_random_points_loses_no_case(base, tmp_path) -> None:
    rng = random.Random(KILL_SEED)
    for attempt in range(3):
        work = tmp_path / f"work{attempt}"
        shutil.copytree(base["work"], work, ignore=shutil.ignore_patterns("qc"))
        # every exam changed: each case is rewritten in place while the run is killed
        source = _changed_source(base["source"], tmp_path / f"source{attempt}", years=1)  # within the birth date's
        proc = _start("convert", str(source), str(work), "--workers", "2", "--quiet", "--no-report", cwd=tmp_path)
        killed = _kill_after(proc, rng.uniform(1.0, 12.0))
        _assert_no_orphans(proc.pid)
        _assert_cases_whole(work, base["cases"])
        rerun = _cli("convert", str(source), str(work), "--workers", "2", "--quiet", "--no-report", cwd=tmp_path)
        assert rerun.returncode == 0, (killed, rerun.stdout, rerun.stderr)
        _assert_cases_whole(work, base["cases"])
        assert not [p for p in (work / "cases").iterdir() if p.name.startswith(".")]
        run = json.loads((work / "build.json").read_text())["run"]
        assert (run["converted"] + run["skipped"], run["failed"], run["rejected"]) == (3, 0, 0)
        assert json.loads((work / "failures.json").read_text()) == []


def test_release_killed_at_random_points_leaves_the_previous_release(base, tmp_path) -> None:
    rng = random.Random(KILL_SEED + 1)
    previous = base["root"] / "rel100"
    before = _files(previous)
    for attempt in range(3):
        target = tmp_path / f"rel{attempt}"
        shutil.copytree(previous, target)
        # an overwrite is the hardest case: the old folder is swapped out for the new one
        args = ("release", str(base["work"]), str(target), "--version", "1.0.0", "--overwrite", "--quiet")
        proc = _start(*args, cwd=tmp_path)
        _kill_after(proc, rng.uniform(0.3, 4.0))
        _assert_no_orphans(proc.pid)
        assert target.is_dir(), "the release folder vanished"
        verify_release(target)  # old or new, never half
        assert _files(target) == before  # same WORK, same version: the same bytes either way
        rerun = _cli(*args, cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert _files(target) == before
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".rel{attempt}.") and
                    p.name != f".rel{attempt}.lock"]
    assert _files(previous) == before


def test_publish_killed_at_random_points_leaves_the_mirror(base, tmp_path) -> None:
    rng = random.Random(KILL_SEED + 2)
    work = tmp_path / "work"
    shutil.copytree(base["work"], work, ignore=shutil.ignore_patterns("qc"))
    withdrawn = sorted(base["cases"])[0]
    assert _cli("withdraw", str(work), withdrawn, cwd=tmp_path).returncode == 0
    rel110 = tmp_path / "rel110"
    assert _cli("release", str(work), str(rel110), "--version", "1.1.0", "--previous", str(base["root"] / "mirror"),
                "--quiet", cwd=tmp_path).returncode == 0
    for attempt in range(3):
        mirror = tmp_path / f"mirror{attempt}"
        shutil.copytree(base["root"] / "mirror", mirror)
        before = _files(mirror)
        proc = _start("publish", str(rel110), "--mirror", str(mirror), cwd=tmp_path)
        _kill_after(proc, rng.uniform(0.2, 3.0))
        _assert_no_orphans(proc.pid)
        assert {k: v for k, v in _files(mirror).items() if k.startswith("1.0.0/")} == \
            {k: v for k, v in before.items() if k.startswith("1.0.0/")}
        listing = json.loads((mirror / "versions.json").read_text())
        for version in listing["versions"]:
            verify_release(mirror / version)
        rerun = _cli("publish", str(rel110), "--mirror", str(mirror), cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads((mirror / "versions.json").read_text()) == {"latest": "1.1.0", "versions": ["1.0.0", "1.1.0"]}
        verify_release(mirror / "1.1.0")
        changelog = (mirror / "1.1.0" / "CHANGELOG.md").read_text()
        assert f"- removed (1): {base['cases'][withdrawn]}" in changelog


def test_materialize_killed_at_random_points_then_completes(base, tmp_path) -> None:
    import gzip

    rng = random.Random(KILL_SEED + 3)
    release = base["root"] / "rel100"
    clean = tmp_path / "clean"
    ok = _cli("materialize", "--nnunet", str(clean), "--source", str(release), "--include-test", "--quiet",
              cwd=tmp_path, module="lymphatlas_ds.cli")
    assert ok.returncode == 0, ok.stderr
    expected = _files(clean)
    for attempt in range(3):
        raw = tmp_path / f"raw{attempt}"
        proc = _start("materialize", "--nnunet", str(raw), "--source", str(release), "--include-test", "--quiet",
                      cwd=tmp_path, module="lymphatlas_ds.cli")
        _kill_after(proc, rng.uniform(0.5, 5.0))
        _assert_no_orphans(proc.pid)
        for path in raw.rglob("*.nii.gz") if raw.exists() else ():
            if not path.name.startswith("."):
                gzip.decompress(path.read_bytes())  # a visible file is a whole file
        rerun = _cli("materialize", "--nnunet", str(raw), "--source", str(release), "--include-test", "--quiet",
                     cwd=tmp_path, module="lymphatlas_ds.cli")
        assert rerun.returncode == 0, rerun.stderr
        got = {k: v for k, v in _files(raw).items() if not Path(k).name.startswith(".")}
        assert got == {k: v for k, v in expected.items() if not Path(k).name.startswith(".")}


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MB tmpfs: room for two small cases (5.5-6.7 MB each), not for a third or a second copy of one."""
    with small_tmpfs(tmp_path / "disk", "14m") as mount:
        yield mount


def test_a_full_disk_keeps_every_good_case_and_the_rerun_completes(base, small_disk, tmp_path) -> None:
    work = small_disk / "work"
    exams = sorted(base["cases"])[:2]
    first = _cli("convert", str(base["source"]), str(work), "--exams", *exams, "--workers", "1", "--quiet",
                 "--no-report", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    kept = {e: r["case_id"] for e, r in pipeline.read_id_map(work).items()}  # this WORK's own key, own ids
    assert sorted(kept) == exams
    before = {c: _files(work / "cases" / c) for c in kept.values()}
    # every exam changed: each new case needs room next to the old one, which the disk does not have
    source = _changed_source(base["source"], tmp_path / "source", years=1)
    full = _cli("convert", str(source), str(work), "--workers", "1", "--quiet", "--no-report", cwd=tmp_path)
    assert full.returncode == 3, full.stdout + full.stderr  # 3: errors of this run, nothing lost
    assert "No space left on device" in full.stdout and "Traceback" not in full.stdout + full.stderr
    failures = {f["exam_id"]: f for f in json.loads((work / "failures.json").read_text())}
    assert failures and all(f["kind"] == "run" for f in failures.values()), failures
    _assert_cases_whole(work, kept)
    for exam_id, case_id in kept.items():
        if exam_id in failures:  # not rewritten: exactly the earlier case
            assert _files(work / "cases" / case_id) == before[case_id]
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    rerun = _cli("convert", str(source), str(work), "--workers", "1", "--quiet", "--no-report", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _assert_cases_whole(work, kept)
    assert len(pipeline.read_id_map(work)) == 3


def test_a_full_disk_in_release_and_publish_names_the_path_without_a_traceback(base, small_disk, tmp_path) -> None:
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], check=True)
    rel = _cli("release", str(base["work"]), str(small_disk / "rel"), "--version", "1.0.0", "--quiet", cwd=tmp_path)
    assert rel.returncode == 2, rel.stdout + rel.stderr
    assert "No space left on device" in rel.stderr and str(small_disk) in rel.stderr and "free space" in rel.stderr
    assert "Traceback" not in rel.stderr
    assert not [p for p in small_disk.iterdir() if p.name != ".rel.lock"]  # nothing half-written left
    pub = _cli("publish", str(base["root"] / "rel100"), "--mirror", str(small_disk / "mirror"), cwd=tmp_path)
    assert pub.returncode == 2, pub.stdout + pub.stderr
    assert "No space left on device" in pub.stderr and str(small_disk / "mirror") in pub.stderr
    assert "Traceback" not in pub.stderr
    assert sorted(p.name for p in (small_disk / "mirror").iterdir()) == [".lock"]


# --- concurrency, dead workers, a dead parent --------------------------------------------------------


def test_two_concurrent_converts_one_refused_one_queued(base, tmp_path) -> None:
    work = _fresh_work(base, tmp_path / "work")
    first = _start("convert", str(base["source"]), str(work), "--workers", "2", "--quiet", "--no-report",
                   cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not ((work / ".lock").is_file() and (work / ".lock").read_text().startswith("PID")):
        assert time.monotonic() < deadline and first.poll() is None, "the first convert never took the lock"
        time.sleep(0.1)
    second = _cli("convert", str(base["source"]), str(work), "--workers", "1", "--quiet", "--no-report", cwd=tmp_path)
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr and "convert" in second.stderr
    queued = _cli("convert", str(base["source"]), str(work), "--workers", "1", "--quiet", "--no-report", "--wait",
                  cwd=tmp_path)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert queued.returncode == 0, queued.stdout + queued.stderr
    assert "3 unchanged" in queued.stdout  # it ran after the first had finished
    _assert_cases_whole(work, base["cases"])


def test_a_killed_worker_is_recorded_retried_and_the_run_goes_on(base, tmp_path) -> None:
    victim = sorted(base["cases"])[1]
    work = _fresh_work(base, tmp_path / "work")
    dead = _cli("convert", str(base["source"]), str(work), "--workers", "2", "--quiet", "--no-report", cwd=tmp_path,
                env={pipeline.FAULT_ENV: f"kill-worker:{victim}"})
    assert dead.returncode == 3, dead.stdout + dead.stderr
    assert "BrokenProcessPool" not in dead.stderr and "Traceback" not in dead.stderr
    failures = json.loads((work / "failures.json").read_text())
    assert [(f["exam_id"], f["kind"], f["stage"]) for f in failures] == [(victim, "run", "worker")]
    assert "SIGKILL" in failures[0]["reason"]
    others = {e: c for e, c in base["cases"].items() if e != victim}
    _assert_cases_whole(work, others)
    assert victim not in pipeline.read_id_map(work)
    # killed once only: the retry in a fresh process converts it
    once = _cli("convert", str(base["source"]), str(work), "--workers", "2", "--quiet", "--no-report", cwd=tmp_path,
                env={pipeline.FAULT_ENV: f"kill-worker:{victim}:{tmp_path / 'killed-once'}"})
    assert once.returncode == 0, once.stdout + once.stderr
    assert (tmp_path / "killed-once").exists()
    _assert_cases_whole(work, base["cases"])
    assert json.loads((work / "failures.json").read_text()) == []


def test_a_killed_dask_worker_is_recorded_per_exam(base, tmp_path, monkeypatch) -> None:
    from distributed import LocalCluster

    victim = sorted(base["cases"])[0]
    import dask

    monkeypatch.setenv(pipeline.FAULT_ENV, f"kill-worker:{victim}")  # the cluster's worker processes inherit it
    work = tmp_path / "work"
    # one retry on another worker (Dask's own), then KilledWorker
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = pipeline.convert_cohort(base["source"], work, scheduler=cluster.scheduler_address, progress=False)
    by_exam = {r.exam_id: r for r in summary.results}
    assert by_exam[victim].status is pipeline.Status.FAILED and by_exam[victim].stage == "worker"
    assert "KilledWorker" in by_exam[victim].reason
    assert all(r.status is pipeline.Status.CONVERTED for e, r in by_exam.items() if e != victim)


def test_a_killed_parent_takes_its_workers_with_it(base, tmp_path) -> None:
    import psutil

    work = _fresh_work(base, tmp_path / "work")
    proc = _start("convert", str(base["source"]), str(work), "--workers", "2", "--quiet", "--no-report", cwd=tmp_path)
    deadline = time.monotonic() + 120
    busy: list = []
    while len(busy) < 2:  # both workers well into an exam (past start-up, which dies with the parent anyway)
        assert time.monotonic() < deadline and proc.poll() is None, "no workers at work"
        try:
            busy = [c for c in psutil.Process(proc.pid).children()
                    if "resource_tracker" not in " ".join(c.cmdline()) and c.cpu_times().user > 2.0]
        except psutil.NoSuchProcess:
            busy = []
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # at once, not after finishing their exams (an orphan worker would end only when it next writes to
    # the dead parent's pipe: seconds to minutes later, its work lost)
    _assert_no_orphans(proc.pid, timeout=3)
    rerun = _cli("convert", str(base["source"]), str(work), "--workers", "2", "--quiet", "--no-report", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _assert_cases_whole(work, base["cases"])
