"""Converting on a real Dask cluster: `dask scheduler` and two `dask worker` processes started as a
cluster's nodes would start them (console commands, a folder outside the checkout, no PYTHONPATH),
then `lymphatlas-build convert --scheduler tcp://...`. The cases must be the local pool's: the same
case ids and the same content hashes (sha256 over the voxels and the affine).

Both runs register PET to CT: the registration's metric runs in one work unit on one thread, so a
Dask worker and a local pool process find the same transform and every voxel must agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen) -> None:
    """End a process started here and everything it started (its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=20)


def _cases(work: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["content_hash"] for p in (work / "cases").glob("*/case.json")}


@pytest.mark.slow
def test_dask_scheduler_and_two_workers_convert_the_local_pools_cases(synthetic_good_cohort, tmp_path):
    source, truths = synthetic_good_cohort
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # workers import builder as installed
    env["OMP_NUM_THREADS"] = "1"

    local = tmp_path / "work_local"
    proc = subprocess.run([str(BIN / "lymphatlas-build"), "convert", str(source), str(local), "--workers", "2",
                           "--no-report", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _cases(local)
    assert len(expected) == len(truths)

    # The same pseudonymisation key, as an update run on a cluster would use the WORK folder's own key.
    cluster = tmp_path / "work_cluster"
    (cluster / "private").mkdir(parents=True)
    (cluster / "private" / "deid.key").write_bytes((local / "private" / "deid.key").read_bytes())

    nodes = tmp_path / "nodes"
    nodes.mkdir()
    scheduler_file = nodes / "scheduler.json"
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
            cwd=nodes, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 120
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert scheduler_file.is_file(), "the dask scheduler did not start"
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(2):
            started.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                 "--memory-limit", "3GiB", "--name", f"node{i}", "--local-directory", str(nodes / f"node{i}")],
                cwd=nodes, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        wait = ("from distributed import Client; import sys\n"
                "with Client(sys.argv[1], timeout=60) as c: c.wait_for_workers(2, timeout=180); "
                "print(len(c.scheduler_info()['workers']))")
        ready = subprocess.run([sys.executable, "-c", wait, address], cwd=nodes, env=env, capture_output=True,
                               text=True, timeout=300)
        assert ready.returncode == 0 and ready.stdout.strip() == "2", ready.stderr[-2000:]

        proc = subprocess.run([str(BIN / "lymphatlas-build"), "convert", str(source), str(cluster), "--scheduler",
                               address, "--no-report", "--quiet"], cwd=nodes, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        for p in reversed(started):
            _stop(p)
    assert all(p.poll() is not None for p in started)

    build = json.loads((cluster / "build.json").read_text())
    assert build["run"]["scheduler"] == "dask"
    assert _cases(cluster) == expected
