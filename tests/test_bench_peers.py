"""benchmarks/bench_peers.py --quick: the peer comparison runs end to end and prints a row per loader."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_peers_quick_prints_every_row(tmp_path):
    """About 5-15 minutes on 2 loaded cores (nnU-Net's planning and preprocessing, spawned workers)."""
    pytest.importorskip("nnunetv2")
    pytest.importorskip("monai")
    pytest.importorskip("torchio")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_peers import PEERS, TITLES

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--quick", "--keep",
                           str(tmp_path / "work")], cwd=tmp_path, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for peer in PEERS:
        row = rows.get(TITLES[peer])
        assert row is not None, f"no row for {peer} in:\n{proc.stdout}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8, row
        # every measured cell holds a positive number
        for cell in cells[1:]:
            number = re.match(r"[0-9.]+", cell)
            assert number and float(number.group()) > 0, f"{peer}: {cell!r} in {row}"
    assert re.search(r"\d+ cores", proc.stdout) and "load average" in proc.stdout
