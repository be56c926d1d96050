"""Build the project's wheel the way a user's `pip wheel .` does, from a copy of the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Not part of any distribution, and large or machine-specific: never copied.
_SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache")


def build_wheel(dest: Path) -> Path:
    """Build ``lymphatlas_ds-*.whl`` into ``dest`` and return its path.

    The checkout is copied first (setuptools leaves a build/ folder in the tree it builds); tests,
    tools and benchmarks travel with the copy, so a wheel that picked them up would be caught.
    """
    src = dest / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_SKIP)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)],
        cwd=dest, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dest.glob("lymphatlas_ds-*-py3-none-any.whl")
    return wheel
