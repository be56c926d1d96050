"""The QC report: its contents match the WORK folder's truth, and it opens in a real browser.

The browser tests start headless Chromium on the report as a file (no server, no network) and
skip with a reason where Chromium is not installed (scripts/test.sh installs it in CI).
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from builder.report import write_report
from lymphatlas_synth.fake_work import make_fake_work

FAILURES = [
    {"exam_id": "EXAM9001", "stage": "read", "reason": "missing slice at z=-312.5 mm <b>not bold</b>"},
    {"exam_id": "EXAM9002", "stage": "suv", "reason": "no injected dose (0018,1074) in the PET series"},
]
BUILD = {
    "builder_version": "0.1.0",
    "settings": {"registration": "rigid", "seed": 0},
    "versions": {"SimpleITK": "2.x"},
    "exams": {
        "EXAM00000": {"status": "converted"},
        "EXAM00010": {"status": "converted"},
        "EXAM9001": {"status": "rejected"},
    },
}


class _Page(HTMLParser):
    """Collects the summary table, the rejected-exam table, image sources and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cases = make_fake_work(work, n_patients=3, shape_zyx=(30, 40, 44), seed=3)
    (work / "failures.json").write_text(json.dumps(FAILURES))
    (work / "build.json").write_text(json.dumps(BUILD))
    index = write_report(work)
    return work, cases, index


def _parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def test_summary_matches_the_cases(report):
    work, cases, index = report
    assert index == work / "qc" / "index.html"
    page = _parse(index)
    header, *rows = page.tables["cases"]
    assert header[:5] == ["case", "diagnosis", "lesions", "TMTV (ml)", "SUVmax"]
    by_id = {r[0]: r for r in rows}
    assert sorted(by_id) == sorted(c.case_id for c in cases)
    for c in cases:
        row = by_id[c.case_id]
        voxel_ml = 2.0 * 2.0 * 3.0 / 1000.0  # the fake grid's spacing
        assert row[1] == c.diagnosis
        assert float(row[3]) == pytest.approx(c.label.sum() * voxel_ml, abs=0.05)
        if c.label.any():
            assert float(row[4]) == pytest.approx(c.pet[c.label > 0].max(), abs=0.05)
        assert row[-1] == "passed"


def test_rejected_exams_and_build_are_listed_and_escaped(report):
    work, _, index = report
    page = _parse(index)
    _, *rows = page.tables["failures"]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted((f["exam_id"], f["stage"], f["reason"]) for f in FAILURES)
    raw = index.read_text(encoding="utf-8")
    assert "<b>not bold</b>" not in raw  # reasons are text, never markup
    settings = dict((r[0], r[1]) for r in page.tables["build"][1:])
    assert settings["settings.registration"] == "rigid"
    assert settings["versions.SimpleITK"] == "2.x"
    assert settings["exams"] == "2 converted, 1 rejected"  # counted, not listed by exam id


def test_every_image_is_a_real_picture_and_no_identifier_leaks(report):
    work, cases, index = report
    page = _parse(index)
    assert len(page.images) == 2 * len(cases)  # the case figure and the registration check
    for src in page.images:
        assert not src.startswith(("/", "http")), f"{src}: images must be relative files next to the report"
        png = matplotlib.image.imread(index.parent / src)
        assert png.shape[0] > 300 and png.shape[1] > 600 and png[..., :3].std() > 0.05, src
    text = index.read_text(encoding="utf-8")
    with open(work / "private" / "id_map.csv", newline="") as f:
        for row in csv.DictReader(f):
            assert row["patient_id"] not in text, "a patient id reached the report"
            assert row["exam_id"] not in text, "an accepted exam's source id reached the report"


def test_pictures_are_reused_until_the_case_changes(report, tmp_path):
    work, cases, _ = report
    out = tmp_path / "qc"
    write_report(work, out)
    views = out / "cases" / cases[0].case_id / "views.png"
    first = views.stat().st_mtime_ns
    os.utime(views, ns=(first - 10**9, first - 10**9))
    write_report(work, out)
    assert views.stat().st_mtime_ns == first - 10**9, "an up-to-date picture was redrawn"
    case_json = work / "cases" / cases[0].case_id / "case.json"
    original = case_json.read_text()
    try:
        case_json.write_text(original.replace('"rigid"', '"scanner"', 1))
        write_report(work, out)
        assert views.stat().st_mtime_ns > first - 10**9, "a changed case kept its old picture"
    finally:
        case_json.write_text(original)


def test_parallel_drawing_gives_the_same_bytes(report, tmp_path):
    work, cases, index = report
    out = tmp_path / "qc"
    write_report(work, out, workers=2)
    assert (out / "index.html").read_bytes() == index.read_bytes()
    for c in cases:
        for name in ("views.png", "registration.png"):
            a = (out / "cases" / c.case_id / name).read_bytes()
            b = (index.parent / "cases" / c.case_id / name).read_bytes()
            assert a == b, f"{c.case_id}/{name} differs between a parallel and a serial run"


def test_an_unreadable_case_is_reported_not_fatal(tmp_path):
    work = tmp_path / "work"
    cases = make_fake_work(work, n_patients=2, shape_zyx=(12, 16, 16))
    broken = work / "cases" / cases[0].case_id / "pet.nii.gz"
    broken.write_bytes(b"not a nifti file")
    index = write_report(work)
    text = index.read_text(encoding="utf-8")
    assert "no pictures" in text and "pet.nii.gz" in text
    rows = {r[0]: r for r in _parse(index).tables["cases"][1:]}
    assert rows[cases[0].case_id][-1] == "no pictures"
    assert rows[cases[1].case_id][-1] == "passed"


def test_a_case_json_that_is_not_json_is_reported_not_fatal(tmp_path):
    work = tmp_path / "work"
    cases = make_fake_work(work, n_patients=2, shape_zyx=(12, 16, 16))
    (work / "cases" / cases[0].case_id / "case.json").write_text('{"case_id": ')
    index = write_report(work)
    text = html.unescape(index.read_text(encoding="utf-8"))
    assert f"{cases[0].case_id}/case.json is not valid JSON" in text and "python -m builder convert" in text
    rows = {r[0]: r for r in _parse(index).tables["cases"][1:]}
    assert rows[cases[1].case_id][-1] == "passed"
    assert (index.parent / "cases" / cases[1].case_id / "views.png").is_file()


def test_a_qc_rejected_exam_keeps_its_picture(tmp_path):
    from builder.report import write_rejected_figure

    work = tmp_path / "work"
    cases = make_fake_work(work, n_patients=1, shape_zyx=(12, 16, 16))
    (work / "failures.json").write_text(json.dumps(FAILURES))
    c = cases[0]
    png = write_rejected_figure(work, "EXAM9001", c.ct, c.pet, c.label, c.affine)
    assert png == work / "qc" / "rejected" / "EXAM9001" / "views.png"
    page = _parse(write_report(work))
    assert "rejected/EXAM9001/views.png" in page.images
    assert "rejected/EXAM9002/views.png" not in page.images  # no picture kept for that one: no broken link
    with pytest.raises(Exception, match="cannot name a folder"):
        write_rejected_figure(work, "../escape", c.ct, c.pet, c.label, c.affine)


def test_cli_writes_the_report(tmp_path, capsys):
    from builder.__main__ import main

    work = tmp_path / "work"
    make_fake_work(work, n_patients=1, shape_zyx=(12, 16, 16))
    assert main(["report", str(work), "--out", str(tmp_path / "qc"), "--quiet"]) == 0
    assert (tmp_path / "qc" / "index.html").exists()
    assert str(tmp_path / "qc" / "index.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2


# ----------------------------------------------------------------------------- headless Chromium

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium; scripts/test.sh installs it)")


def _browse(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight};
  });
  var heads = Array.prototype.slice.call(document.querySelectorAll('#cases thead th'));
  var th = heads.filter(function (h) { return h.textContent.indexOf('TMTV') === 0; })[0];
  function order() {
    var rows = document.querySelectorAll('#cases tbody tr');
    return Array.prototype.map.call(rows, function (r) { return r.dataset.case; });
  }
  th.click(); var asc = order();
  th.click(); var desc = order();
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs: imgs, asc: asc, desc: desc});
  document.body.appendChild(pre);
});
</script>"""


def test_report_opens_in_chromium_images_load_and_columns_sort(report, tmp_path):
    work, cases, index = report
    probe = index.parent / "probe.html"  # beside index.html so relative image links resolve the same way
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    result = _browse(["--virtual-time-budget=15000", "--dump-dom", probe.as_uri()], tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    found = json.loads(html.unescape(dom[start : dom.index("</pre>", start)]))
    assert len(found["imgs"]) == 2 * len(cases)
    for img in found["imgs"]:
        assert img["ok"] and img["w"] > 0 and img["h"] > 0, f"{img['src']} did not load in the browser"
    tmtv = {c.case_id: float(c.label.sum()) for c in cases}  # the truth: labelled voxels
    asc = [tmtv[c] for c in found["asc"]]
    desc = [tmtv[c] for c in found["desc"]]
    assert sorted(found["asc"]) == sorted(tmtv)
    assert asc == sorted(asc) and desc == sorted(desc, reverse=True), (asc, desc)
    assert asc != desc


def test_report_screenshot_shows_the_table_and_the_first_case(report, tmp_path):
    _, _, index = report
    shot = tmp_path / "report.png"
    result = _browse(["--window-size=1400,1800", "--hide-scrollbars", f"--screenshot={shot}", index.as_uri()],
                     tmp_path / "profile")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    rgb = matplotlib.image.imread(shot)[..., :3]
    assert rgb.std() > 0.1, "the screenshot is blank"
    text = (rgb.max(axis=2) < 0.3).mean(axis=1)  # share of dark pixels per row: the page's text is #222
    assert text[: rgb.shape[0] // 5].max() > 0.05, "no text at the top (the title and the summary table)"
    black = (rgb.max(axis=2) < 0.1).mean(axis=1)  # black: the air around the body in the CT pictures
    assert black[rgb.shape[0] // 3 :].max() > 0.2, "the first case's images are not on screen"
    # A summary table row: the sortable header's blue tint is drawn near the top.
    header = (np.abs(rgb[..., 0] - 0.933) < 0.02) & (np.abs(rgb[..., 2] - 1.0) < 0.02) & (rgb[..., 1] < 0.95)
    assert header[: rgb.shape[0] // 3].sum() > 1000, "the summary table's header is not on screen"

