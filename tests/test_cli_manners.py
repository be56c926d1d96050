"""The command lines' manners, each command run as typed in a subprocess from another folder.

- a closed pipe (``lymphatlas info ... | head -1``) ends quietly: no traceback, status 0 or 141;
- an unknown option of a command prints that command's usage, not the top-level one;
- progress: a tqdm bar on a terminal (a pty), plain lines (no carriage returns, a line every tenth)
  in a log;
- convert's end-of-run summary appears once;
- ``convert --scheduler`` to an unreachable scheduler is a network error naming the address, and
  WORK is as it was (no key, no id map, no cases folder).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
BUILDER = "python -m builder"  # the environment's python: _env puts its bin folder first on PATH


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "LYMPHATLAS_CACHE": str(root / "cache"), **extra}
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    if "PYTHONUNBUFFERED" not in extra:  # a user's default: stdout block-buffered into a pipe
        env.pop("PYTHONUNBUFFERED", None)
    return env


def _sh(cmd: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(cwd, **extra), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("manners")
    release = build_fake_release(root, n_patients=5, seed=4, shape_zyx=(12, 16, 16), name="lymphatlas")
    return root, release


@pytest.mark.parametrize("cmd", [
    "lymphatlas info lymphatlas | head -1",
    "lymphatlas info lymphatlas --json | head -c 20",
    "lymphatlas info lymphatlas | true",
    f"{BUILDER} release --help | head -1",
    "lymphatlas-build --help | true",
])
def test_a_closed_pipe_ends_quietly(small_release, cmd):
    root, _release = small_release
    proc = _sh(f"{cmd}; echo \"status=${{PIPESTATUS[0]}}\" >&2", root)
    status = int(re.search(r"status=(\d+)", proc.stderr).group(1))
    assert status in (0, 141), proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr and "Exception ignored" not in proc.stderr
    if "head -1" in cmd:
        assert proc.stdout.count("\n") == 1 and proc.stdout.strip()


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_reader_gone_before_the_first_line_gives_141_and_no_traceback(small_release, unbuffered):
    root, _release = small_release
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the command writes anything
    env = _env(root, **({"PYTHONUNBUFFERED": unbuffered} if unbuffered else {}))
    proc = subprocess.run([str(BIN / "lymphatlas"), "info", "lymphatlas"], cwd=root, env=env, stdout=writer,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(writer)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("cmd, usage", [
    ("lymphatlas info lymphatlas --config hl", "usage: lymphatlas info "),
    ("lymphatlas materialize lymphatlas --nnunet raw --bogus", "usage: lymphatlas materialize "),
    (f"{BUILDER} release work out --version 1.0.0 --bogus", "usage: python -m builder release "),
])
def test_an_unknown_option_shows_the_commands_usage(small_release, cmd, usage):
    root, _release = small_release
    proc = _sh(cmd, root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(usage) and "COMMAND ..." not in proc.stderr, proc.stderr
    assert "unrecognized arguments: " + cmd.split()[-1] in proc.stderr or "--config hl" in proc.stderr
    assert not (root / "raw").exists() and not (root / "out").exists()


def test_progress_in_a_log_is_plain_lines_every_tenth_and_each_summary_once(small_release):
    root, release = small_release
    proc = _sh(f"{BUILDER} release work rel_log --version 1.0.0 2> progress.log", root)
    assert proc.returncode == 0, proc.stdout
    log = (root / "progress.log").read_text()
    published = _sh(f"{BUILDER} publish rel_log --mirror mirror", root)
    assert published.returncode == 0, published.stderr
    for text, summary in ((proc.stdout + log, f"release 1.0.0: {len(release.truth)} cases in"),
                          (published.stdout + published.stderr, "published ")):
        assert text.count(summary) == 1, text
    n = len(release.truth)
    counts = [int(m) for m in re.findall(rf"^release 1\.0\.0: (\d+)/{n} case", log, flags=re.M)]
    assert "\r" not in log and "Traceback" not in log
    assert counts and counts[-1] == n and counts == sorted(set(counts)), log
    assert len(counts) <= 11, log  # a line every tenth at most, not one per redraw


def test_progress_on_a_terminal_is_a_bar(small_release):
    root, release = small_release
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen(["bash", "-c", f"{BUILDER} release work rel_tty --version 1.0.0"], cwd=root,
                            env=_env(root), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        try:
            chunk = os.read(master, 4096) if ready else b""
        except OSError:  # the pty closes when the command ends
            chunk = b""
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    n = len(release.truth)
    assert re.search(rf"\rrelease 1\.0\.0: 100%\|.*\| {n}/{n} ".encode(), out), out[-800:]


def test_convert_prints_its_summary_once(synthetic_good_cohort, tmp_path):
    source, truths = synthetic_good_cohort
    proc = _sh(f"{BUILDER} convert {source} work --no-report --workers 1", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    both = proc.stdout + proc.stderr
    assert both.count(f"{len(truths)} exams: {len(truths)} converted, ") == 1, both
    assert "\r" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("work_exists", [False, True])
def test_an_unreachable_scheduler_is_a_network_error_and_nothing_is_written(synthetic_good_cohort, tmp_path,
                                                                             work_exists):
    source, _truths = synthetic_good_cohort
    work = tmp_path / "work"
    if work_exists:
        work.mkdir()
        (work / "notes.txt").write_text("kept\n")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    proc = _sh(f"{BUILDER} convert {source} work --scheduler tcp://unreachable:8786", tmp_path,
               DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "network error" in proc.stderr and "tcp://unreachable:8786" in proc.stderr, proc.stderr
    assert "disk" not in proc.stderr and "cannot write" not in proc.stderr
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after == before  # no WORK, no private/deid.key, no id_map.csv, no lock file
    assert not (work / "private" / "deid.key").exists()


def test_plain_progress_writes_a_line_every_tenth_and_the_last(monkeypatch):
    import io

    from lymphatlas_ds import progress

    clock = iter(range(0, 10_000))  # one second per call: the 30 s rule fires once in 30 updates
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    with progress.progress_bar(total=95, desc="convert", unit="exam", file=out, seconds=1e9) as bar:
        for _ in range(95):
            bar.update(1)
    assert out.getvalue().splitlines() == [f"convert: {n}/95 exam" for n in (*range(10, 95, 10), 95)]
    out = io.StringIO()
    with progress.progress_bar(desc="materialize", unit="case", file=out, seconds=30) as bar:
        for _ in range(45):
            bar.update(1)
    counts = [int(line.split()[1]) for line in out.getvalue().splitlines()]
    assert counts[-1] == 45 and len(counts) < 45 and all(b - a <= 10 for a, b in zip([0, *counts], counts))
