"""Release statistics: the dataset card and `lymphatlas info` print the same figures, and those are
the figures a reader recomputes from metadata/cases.csv (one aggregation, lymphatlas_ds.statistics)."""

from __future__ import annotations

import csv
import re
import statistics
import subprocess
import sys
from collections import Counter

import pytest

from tests.support.releases import build_fake_release

ROWS = {"lesions": "lesion_count", "TMTV (ml)": "tmtv_ml", "SUVmax in lesions": "suv_max"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    return build_fake_release(root, n_patients=10, seed=9, shape_zyx=(10, 14, 14)).path


def _recompute(path) -> dict:
    """The card's figures from metadata/cases.csv, by hand: plain csv + statistics."""
    with open(path / "metadata" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = {}
    for r in sorted(rows, key=lambda r: (r["subject_id"], int(r["exam_index"] or 0), r["case_id"])):
        first.setdefault(r["subject_id"], r)

    def five(values):
        return [round(min(values), 2), round(statistics.median(values), 2), round(statistics.mean(values), 2),
                round(max(values), 2), round(sum(values), 2)]

    with_lesion = [r for r in rows if int(r["lesion_count"] or 0) > 0]
    return {
        "cases": len(rows),
        "patients": len({r["subject_id"] for r in rows}),
        "sex": dict(sorted(Counter(r["sex"] for r in first.values()).items())),
        "lesion_count": five([float(r["lesion_count"] or 0) for r in rows]),
        "tmtv_ml": five([float(r["tmtv_ml"] or 0) for r in rows]),
        "suv_max": five([float(r["suv_max"]) for r in with_lesion])[:4],
        "without": len(rows) - len(with_lesion),
    }


def _card(path) -> dict:
    text = (path / "README.md").read_text()
    out = {}
    for name, key in ROWS.items():
        m = re.search(rf"^\| {re.escape(name)} \|(.*)\|\s*$", text, re.M)
        assert m, f"card has no '{name}' row"
        out[key] = [float(v) for v in m.group(1).split("|") if v.strip()]
    sex = re.search(r"^Sex \(patients, at their first examination\): (.*)\.$", text, re.M).group(1)
    out["sex"] = {k: int(v) for k, v in (p.split(": ") for p in sex.split(", "))}
    out["without"] = int(re.search(r"^Examinations without any lesion: (\d+)\.", text, re.M).group(1))
    return out


def _info(path, cwd) -> dict:
    proc = subprocess.run([sys.executable, "-m", "lymphatlas_ds.cli", "info", str(path)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    out = {}
    for name, key in ROWS.items():
        m = re.search(rf"^{re.escape(name)}\s+([-\d. ]+)$", text, re.M)
        assert m, f"info prints no '{name}' line:\n{text}"
        out[key] = [float(v) for v in m.group(1).split()]
    sex = re.search(r"^sex \(patients, at their first examination\): (.*)$", text, re.M).group(1)
    out["sex"] = {k: int(v) for k, v in (p.split(": ") for p in sex.split(", "))}
    out["without"] = int(re.search(r"^examinations without any lesion: (\d+)$", text, re.M).group(1))
    m = re.search(r"^(\d+) cases of (\d+) subjects", text, re.M)
    out["cases"], out["patients"] = int(m.group(1)), int(m.group(2))
    return out


def test_card_and_info_print_the_figures_recomputed_from_cases_csv(release, tmp_path):
    truth = _recompute(release)
    assert truth["without"] > 0 and truth["patients"] < truth["cases"]  # the conventions matter here
    card, info = _card(release), _info(release, tmp_path)
    for key in ("lesion_count", "tmtv_ml", "suv_max"):
        assert card[key] == truth[key], key
        assert info[key][: len(truth[key])] == truth[key], key
    for got in (card, info):
        assert got["sex"] == truth["sex"] and got["without"] == truth["without"]
    assert (info["cases"], info["patients"]) == (truth["cases"], truth["patients"])
