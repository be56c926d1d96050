"""`scripts/setup.sh` on a fresh clone prints no false alarm: no ERROR, no warning, no traceback.

Slow (a fresh virtual environment with torch, nnU-Net, MONAI, ...: several minutes). The copy of
the checkout stands in for a fresh clone; the script creates its own `.venv` there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALARMS = re.compile(r"error|warning|traceback|!!", re.I)


@pytest.mark.slow
def test_setup_on_a_fresh_clone_prints_no_false_alarm(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist",
                                                                "*.egg-info", ".pytest_cache", ".hypothesis"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "environment ready: torch" in output
    alarms = [line for line in output.splitlines() if ALARMS.search(line)]
    assert not alarms, output[-4000:]
    # what the quiet output must not hide: the environment really has the roles and nnU-Net's stock variants
    check = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c",
                            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
                            "print(f('nnUNetTrainer_5epochs').__name__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert check.stdout.strip() == "nnUNetTrainer_5epochs", check.stderr[-3000:]
