"""The installed entry points as a user types them, from a folder outside the checkout.

`lymphatlas --version`, the builder's console script `lymphatlas-build`, `import builder` anywhere
(Dask workers need it), the wheel's contents, and the builder's logging (other libraries' INFO
lines held back).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lymphatlas_ds.schema import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("script", ["lymphatlas", "lymphatlas-build"])
def test_version(tmp_path, script):
    proc = _run([str(BIN / script), "--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{script} {importlib.metadata.version('lymphatlas-ds')} (release schema {SCHEMA_VERSION})"


def test_builder_imports_and_runs_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = _run([sys.executable, "-c", "import builder, builder.convert.pipeline, sys; print(builder.__file__)"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = _run([str(BIN / "lymphatlas-build"), "synth", "src", "--exams", "1", "--seed", "3", "--size", "small"],
                tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "src" / "dicom").iterdir())) == 1 and (tmp_path / "src" / "clinical.csv").is_file()


def test_builder_log_holds_back_other_libraries_info_lines(tmp_path):
    code = (
        "import logging, sys\n"
        "from builder.__main__ import main, QUIET_LOGGERS\n"
        "rc = main(sys.argv[1:])\n"
        "for name in ('highdicom.seg.sop', 'openjpeg.utils', 'pylibjpeg.utils'):\n"
        "    logging.getLogger(name).info('noise from %s', name)\n"
        "logging.getLogger('builder.convert.pipeline').info('own line')\n"
        "logging.getLogger('highdicom.seg.sop').warning('a real warning')\n"
    )
    for verbose, noisy in (([], False), (["-v"], True)):
        # a command that fails fast (no such source) still sets the logging up first
        proc = _run([sys.executable, "-c", code, *verbose, "report", str(tmp_path / "no_work")], tmp_path)
        assert "own line" in proc.stderr and "a real warning" in proc.stderr
        assert ("noise from" in proc.stderr) is noisy, proc.stderr


@pytest.mark.slow
def test_the_wheel_ships_builder_and_both_console_scripts(tmp_path):
    from tests.support.wheel import build_wheel

    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        card = z.read("builder/release/dataset_card.md").decode()
    for module in ("builder/__init__.py", "builder/__main__.py", "builder/convert/pipeline.py", "builder/commands/convert.py",
                   "builder/release/build.py", "lymphatlas_synth/cohort.py", "lymphatlas_ds/nnunet_trainers.py",
                   "lymphatlas_ds/reader.py", "lymphatlas_ds/py.typed"):
        assert module in names
    assert not any(n.startswith(("tests/", "tools/", "benchmarks/")) for n in names)
    assert "lymphatlas = lymphatlas_ds.cli:main" in entry_points
    assert "lymphatlas-build = builder.__main__:main" in entry_points
    assert card == (REPO / "dataset_card.md").read_text()  # the card template travels as a file, not a link


def test_verify_reports_progress_in_plain_lines_off_a_terminal_unless_quiet(tmp_path):
    from tests.support.releases import build_fake_release

    release = build_fake_release(tmp_path, n_patients=2, seed=1, shape_zyx=(12, 16, 16))
    env = {**os.environ, "LYMPHATLAS_CACHE": str(tmp_path / "cache")}
    proc = _run([str(BIN / "lymphatlas"), "verify", release.path.name], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    # stderr is a pipe here: plain lines over the bytes to hash (a tqdm bar only on a terminal)
    total = sum(int(e["size"]) for e in json.loads((release.path / "manifest.json").read_text())["files"].values())
    assert f"verify 1.0.0: {total}/{total} B\n" in proc.stderr and "\r" not in proc.stderr, proc.stderr
    proc = _run([str(BIN / "lymphatlas"), "verify", release.path.name, "--quiet"], tmp_path, env=env)
    assert proc.returncode == 0 and "verify 1.0.0" not in proc.stderr
