"""A small real disk for full-disk tests: a tmpfs of a given size, mounted for one test."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount's syntax: "16k", "14m") at ``path``; skip the test where that is not allowed.

    Mounting needs root and mount rights (CAP_SYS_ADMIN): elsewhere the test is skipped with the reason.
    The mount is removed afterwards, lazily when an open handle (a blosc2 array, a process) keeps it busy.
    """
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs a small tmpfs: `mount -t tmpfs` requires root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield path
    finally:
        gc.collect()  # open handles (blosc2 arrays) keep the mount busy
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)
