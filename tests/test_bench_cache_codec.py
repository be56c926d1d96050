"""benchmarks/bench_cache_codec.py as a maintainer runs it: a table per volume, a row per codec, the cache's own among them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_cache_codec_small_prints_every_codec(tmp_path):
    """About 30 s: builds a small fake release."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_cache_codec import CANDIDATES

    from lymphatlas_ds import cache

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cache_codec.py"), "--size", "small",
                           "--cases", "1", "--patches", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (cache.CODEC, cache.CLEVEL) in CANDIDATES  # the cache's codec is one the benchmark measures
    for volume in ("ct", "pet", "label"):
        block = proc.stdout.split(f"**{volume}**")[1].split("\n\n")[1]
        rows = [line.split("|")[1].strip() for line in block.splitlines()[2:]]
        assert rows == [f"{c} {lvl}" for c, lvl in CANDIDATES], proc.stdout
        # the baseline row is 1.00x of itself; every codec took a measurable time per patch
        assert block.splitlines()[2].split("|")[3].strip() == "1.00"
        assert all(float(line.split("|")[6]) > 0 for line in block.splitlines()[2:]), block
