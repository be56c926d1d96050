"""The maintainers' QC report of a WORK folder: one static HTML page with its pictures beside it.

``WORK/qc/index.html`` opens from disk with no server and no network (inline CSS and JS, images
as PNG files under ``WORK/qc/cases/<case_id>/``). It holds a summary table of every case,
sortable by column; one section per case with the case figure (three planes through the largest
lesion of CT, PET, fusion and label outlines, and a coronal PET MIP) and the registration check
(PET before and after registration with CT edges over it); the rejected exams with stage and
reason from ``failures.json`` (with the picture of an exam rejected at QC where the pipeline kept
one through :func:`write_rejected_figure`); the build's parameters and versions from ``build.json``.

The pictures of a case are redrawn only when its ``case.json`` or the figure code changed, so
calling :func:`write_report` after every converted exam is cheap. Case pages carry case ids
only; the rejected-exam list names source exam ids (there is no case for them), which makes the
report a maintainers' document like ``failures.json``: never publish it.

Example:
    >>> from builder.report import write_report
    >>> index = write_report(Path("work"))        # doctest: +SKIP
    >>> index                                      # doctest: +SKIP
    PosixPath('work/qc/index.html')
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.convert.deid import MAINTAINERS_FILE_MODE
from lymphatlas_ds import figures
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.errors import LymphAtlasError, SchemaError
from lymphatlas_ds.schema import CASE_FILES, CASE_JSON

logger = logging.getLogger(__name__)

VIEWS_PNG = "views.png"
REGISTRATION_PNG = "registration.png"
REJECTED_DIR = "rejected"
_STAMP = "render.json"
_EAGER_IMAGES = 10
"""Cases whose pictures load at once; later ones load as they scroll into view (large cohorts)."""


@dataclass(frozen=True)
class CaseImages:
    """What the report shows of one case: its case.json and the pictures (relative to the report)."""

    case_id: str
    case: dict
    views: str | None
    registration: str | None
    error: str | None = None


def write_report(
    work: Path,
    out: Path | None = None,
    *,
    force: bool = False,
    display: figures.Display = figures.DEFAULT_DISPLAY,
    workers: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Path:
    """Render the QC report of ``work`` into ``out`` (default ``work/qc``) and return its index.html.

    Args:
        work: a WORK folder (``cases/<case_id>/{ct,pet,label}.nii.gz`` + ``case.json``,
            ``failures.json``, ``build.json``).
        out: report folder; created if missing.
        force: redraw every picture even where the cached one is up to date.
        display: CT window, PET scales and resolution of the pictures.
        workers: processes drawing pictures in parallel (a whole-body case takes a few seconds).
        progress: wraps the iteration over cases (the CLI passes tqdm).

    Example:
        >>> write_report(Path("work"), Path("work/qc"))   # doctest: +SKIP
    """
    work = Path(work)
    out = Path(out) if out is not None else work / "qc"
    if not work.is_dir():
        raise LymphAtlasError(f"WORK folder {work} does not exist; run `python -m builder convert SOURCE {work}` first")
    # Hidden folders are a convert's temporary or replaced cases (builder.convert.case TMP_PREFIX, OLD_PREFIX), not cases.
    case_dirs = sorted(p.parent for p in (work / "cases").glob(f"*/{CASE_JSON}") if not p.parent.name.startswith("."))
    failures = _read_json(work / "failures.json", default=[])
    if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
        raise LymphAtlasError(
            f"{work / 'failures.json'} must be a list of {{exam_id, stage, reason}} objects; "
            "re-run convert to rewrite it"
        )
    build = _read_json(work / "build.json", default=None)
    if workers > 1 and len(case_dirs) > 1:
        # Processes, not threads: drawing is CPU-bound Python (matplotlib) and holds the GIL.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(render_case_images, d, out / "cases" / d.name, force=force, display=display)
                       for d in case_dirs]
            done: Iterable = progress(futures) if progress is not None else futures
            shown = [f.result() for f in done]
    else:
        iterator: Iterable[Path] = progress(case_dirs) if progress is not None else case_dirs
        shown = [render_case_images(d, out / "cases" / d.name, force=force, display=display) for d in iterator]
    index = out / "index.html"
    page = render_html(shown, failures=failures, build=build, display=display, out=out)
    write_atomic(index, page.encode("utf-8"), mode=MAINTAINERS_FILE_MODE)  # lists failures.json: the maintainers' group only
    logger.debug("QC report of %d cases and %d rejected exams: %s", len(shown), len(failures), index)
    return index


def _read_json(path: Path, *, default):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LymphAtlasError(f"cannot read {path}: {e}; re-run convert or fix the file") from e


def load_case_volumes(case_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CT, PET and label arrays ``[z, y, x]`` of an aligned case and its RAS affine.

    Read with :func:`builder.convert.case.read_volumes` (its CaseFileError is a LymphAtlasError).
    """
    from builder.convert.case import read_volumes

    volumes = read_volumes(case_dir)
    affine = volumes["ct"][1]
    for name, (_, other) in volumes.items():
        if not np.allclose(affine, other, atol=1e-3):
            raise LymphAtlasError(f"{case_dir / CASE_FILES[name]} is not on the CT grid of {case_dir}; re-run convert for this case")
    return volumes["ct"][0], volumes["pet"][0], volumes["label"][0], affine


def _stamp(case: dict, display: figures.Display) -> str:
    """What the pictures of a case depend on: its case.json, the figure code and the display settings."""
    h = hashlib.sha256(json.dumps(case, sort_keys=True).encode())
    h.update(f"figures {figures.FIGURES_VERSION} {display!r}".encode())
    return h.hexdigest()


def render_case_images(
    case_dir: Path, out_dir: Path, *, force: bool = False, display: figures.Display = figures.DEFAULT_DISPLAY
) -> CaseImages:
    """Draw (or reuse) the case figure and registration check of one aligned case into ``out_dir``.

    A case that cannot be drawn (unreadable file, another grid) is reported with the reason in
    the page instead of stopping the whole report.
    """
    from builder.convert.case import read_case_json

    try:
        case = read_case_json(case_dir)
    except SchemaError as e:  # names the file and what to do
        return CaseImages(case_dir.name, {}, None, None, str(e))
    case_id = case.get("case_id", case_dir.name)
    rel = f"cases/{out_dir.name}"
    stamp = _stamp(case, display)
    stamp_file = out_dir / _STAMP
    views, registration = out_dir / VIEWS_PNG, out_dir / REGISTRATION_PNG
    has_transform = _transform(case) is not None
    cached = (
        not force
        and stamp_file.exists()
        and views.exists()
        and (registration.exists() or not has_transform)
        and json.loads(stamp_file.read_text()).get("stamp") == stamp
    )
    if not cached:
        try:
            ct, pet, label, affine = load_case_volumes(case_dir)
            fig = figures.render_case(ct, pet, label, affine, title=case_id, display=display)
            fig.save(views)
            if has_transform:
                reg = figures.render_registration(
                    ct, pet, affine, _transform(case), label=label, title=case_id, display=display, focus=None
                )
                reg.save(registration)
            write_atomic(stamp_file, json.dumps({"stamp": stamp}).encode())
        except (LymphAtlasError, ValueError) as e:
            logger.warning("case %s: no pictures: %s", case_id, e)
            return CaseImages(case_id, case, None, None, str(e))
        logger.debug("case %s: pictures drawn", case_id)
    return CaseImages(
        case_id, case, f"{rel}/{VIEWS_PNG}", f"{rel}/{REGISTRATION_PNG}" if has_transform else None
    )


def _transform(case: dict) -> np.ndarray | None:
    matrix = (case.get("alignment") or {}).get("transform", {}).get("matrix")
    if matrix is None:
        return None
    m = np.asarray(matrix, dtype=float)
    return m if m.shape == (4, 4) else None


# ----------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; }
.note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; background: #eef; user-select: none; white-space: nowrap; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; }
table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
tr.warn td { background: #fff3cd; }
tr.bad td, span.bad { background: #f8d7da; }
section.case { border-top: 2px solid #889; margin-top: 2em; padding-top: 0.5em; }
img.views { width: 100%; max-width: 1600px; display: block; }
img.registration { width: 75%; max-width: 1200px; display: block; }
div.meta { display: flex; flex-wrap: wrap; gap: 0 3em; align-items: flex-start; }
details > summary { cursor: pointer; font-size: 0.9em; margin: 0.3em 0; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 0.85em; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
"""

# Plain inline JS (no network): click a header to sort by it, again to reverse. Numeric columns
# sort on data-value; empty cells go last either way.
_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener('click', function () {
      var numeric = th.dataset.type === 'num';
      var asc = th.dataset.order !== 'asc';
      Array.prototype.forEach.call(heads, function (h) { delete h.dataset.order; });
      th.dataset.order = asc ? 'asc' : 'desc';
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(tr) {
        var td = tr.cells[col];
        var v = td.dataset.value !== undefined ? td.dataset.value : td.textContent.trim();
        return numeric ? (v === '' ? NaN : parseFloat(v)) : v.toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (numeric) {
          if (isNaN(x) && isNaN(y)) return 0;
          if (isNaN(x)) return 1;
          if (isNaN(y)) return -1;
          return asc ? x - y : y - x;
        }
        return asc ? x.localeCompare(y) : y.localeCompare(x);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

_SUMMARY_COLUMNS: list[tuple[str, str]] = [
    ("case", "text"),
    ("diagnosis", "text"),
    ("lesions", "num"),
    ("TMTV (ml)", "num"),
    ("SUVmax", "num"),
    ("registration", "text"),
    ("MI before", "num"),
    ("MI after", "num"),
    ("shift (mm)", "num"),
    ("QC", "text"),
]


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, fmt: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return '<td class="num" data-value=""></td>'
    return f'<td class="num" data-value="{_e(value)}">{_e(fmt.format(value))}</td>'


def _qc_status(shown: CaseImages) -> tuple[str, str]:
    """(text, row class) of a case's QC state."""
    qc = shown.case.get("qc") or {}
    failed = [c.get("name", "?") for c in qc.get("checks", []) if not c.get("passed", True)]
    if shown.error:
        return "no pictures", "bad"
    if qc.get("passed") is False or failed:
        return "failed: " + ", ".join(failed) if failed else "failed", "bad"
    if (shown.case.get("alignment") or {}).get("improved") is False:
        return "passed (registration not applied)", "warn"
    return "passed", ""


def _summary_row(shown: CaseImages) -> str:
    c = shown.case
    clinical = c.get("clinical") or {}
    lesions = c.get("lesions") or {}
    alignment = c.get("alignment") or {}
    status, cls = _qc_status(shown)
    cells = [
        f'<td><a href="#{_e(shown.case_id)}">{_e(shown.case_id)}</a></td>',
        f"<td>{_e(clinical.get('diagnosis'))}</td>",
        _num(lesions.get("count"), "{:d}"),
        _num(lesions.get("tmtv_ml"), "{:.1f}"),
        _num(lesions.get("suv_max"), "{:.1f}"),
        f"<td>{_e(alignment.get('method'))}</td>",
        _num(alignment.get("metric_before"), "{:.3f}"),
        _num(alignment.get("metric_after"), "{:.3f}"),
        _num(alignment.get("shift_mm"), "{:.1f}"),
        f"<td>{_e(status)}</td>",
    ]
    return f'<tr class="{cls}" data-case="{_e(shown.case_id)}">' + "".join(cells) + "</tr>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _facts(c: dict) -> str:
    clinical = c.get("clinical") or {}
    geometry = c.get("geometry") or {}
    ct, pet = c.get("ct") or {}, c.get("pet") or {}
    suv = pet.get("suv") or {}
    lesions = c.get("lesions") or {}
    alignment = c.get("alignment") or {}
    rows = [
        ("subject", c.get("subject_id")),
        ("diagnosis", " / ".join(str(v) for v in (clinical.get("diagnosis"), clinical.get("subtype")) if v)),
        ("sex, age band", f"{clinical.get('sex', '')}, {clinical.get('age_band', '')}"),
        ("exam", f"#{clinical.get('exam_index', '?')}, day {clinical.get('days_from_first_exam', '?')}"),
        ("grid", f"shape (z, y, x) {_fmt(geometry.get('shape_zyx'))}, "
                 f"spacing (x, y, z) {_fmt(geometry.get('spacing_xyz'))} mm"),
        ("CT", " ".join(_fmt(v) for v in (ct.get("manufacturer"), ct.get("model")) if v)
         + (f", {_fmt(ct.get('kvp'))} kVp" if ct.get("kvp") else "")),
        ("PET", " ".join(_fmt(v) for v in (pet.get("manufacturer"), pet.get("model")) if v)),
        ("SUV", ", ".join(f"{k} {_fmt(v)}" for k, v in suv.items() if not isinstance(v, dict))),
        ("registration", alignment.get("decision")),
        ("lesions", ", ".join(f"{k} {_fmt(v)}" for k, v in lesions.items() if k != "items")),
    ]
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return f'<dl class="facts">{body}</dl>'


def _checks(c: dict) -> str:
    checks = (c.get("qc") or {}).get("checks") or []
    if not checks:
        return ""
    rows = "".join(
        f'<tr class="{"" if k.get("passed", True) else "bad"}"><td>{_e(k.get("name"))}</td>'
        f"<td>{'pass' if k.get('passed', True) else 'FAIL'}</td><td>{_e(_fmt(k.get('value')))}</td>"
        f"<td>{_e(_fmt(k.get('threshold')))}</td></tr>"
        for k in checks
    )
    n_failed = sum(1 for k in checks if not k.get("passed", True))
    # Collapsed when all passed (hundreds of cases), open when one failed.
    state = " open" if n_failed else ""
    summary = f"{len(checks)} QC checks, {n_failed} failed" if n_failed else f"{len(checks)} QC checks passed"
    return (
        f"<details{state}><summary>{_e(summary)}</summary>"
        "<table><thead><tr><th>check</th><th>result</th><th>value</th><th>threshold</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></details>"
    )


def _case_section(shown: CaseImages, position: int) -> str:
    loading = "eager" if position < _EAGER_IMAGES else "lazy"
    parts = [f'<section class="case" id="{_e(shown.case_id)}"><h2>{_e(shown.case_id)}</h2>']
    if shown.error:
        parts.append(f'<p><span class="bad">no pictures: {_e(shown.error)}</span></p>')
    parts.append(f'<div class="meta">{_facts(shown.case)}<div>{_checks(shown.case)}</div></div>')
    if shown.views:
        parts.append(
            f'<img class="views" src="{_e(shown.views)}" loading="{loading}" '
            f'alt="{_e(shown.case_id)}: CT, PET, fusion and label outlines in three planes; PET MIP">'
        )
    if shown.registration:
        parts.append(
            f'<img class="registration" src="{_e(shown.registration)}" loading="{loading}" '
            f'alt="{_e(shown.case_id)}: PET before and after registration with CT edges">'
        )
    parts.append("</section>")
    return "\n".join(parts)


def _failures(failures: list, out: Path) -> str:
    if not failures:
        return "<p>No exam was rejected.</p>"
    rows, figures_html = [], []
    for f in sorted(failures, key=lambda f: (str(f.get("stage")), str(f.get("exam_id")))):
        exam_id = str(f.get("exam_id"))
        rel = f"{REJECTED_DIR}/{exam_id}/{VIEWS_PNG}"
        has_figure = _safe_name(exam_id) and (out / rel).is_file()
        link = f' (<a href="#rejected-{_e(exam_id)}">figure</a>)' if has_figure else ""
        rows.append(f"<tr><td>{_e(exam_id)}{link}</td><td>{_e(f.get('stage'))}</td><td>{_e(f.get('reason'))}</td></tr>")
        if has_figure:
            figures_html.append(
                f'<details id="rejected-{_e(exam_id)}"><summary>{_e(exam_id)}: the rejected volumes</summary>'
                f'<img class="views" src="{_e(rel)}" loading="lazy" alt="{_e(exam_id)}: rejected at '
                f'{_e(f.get("stage"))}"></details>'
            )
    return (
        '<table class="sortable" id="failures"><thead><tr><th data-type="text">exam</th>'
        '<th data-type="text">stage</th><th data-type="text">reason</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>" + "\n".join(figures_html)
    )


def _safe_name(name: str) -> bool:
    # An exam id becomes a folder name: no separators, no "..", nothing hidden.
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def write_rejected_figure(
    work: Path,
    exam_id: str,
    ct: np.ndarray,
    pet: np.ndarray,
    label: np.ndarray | None,
    affine_ras: np.ndarray,
    *,
    out: Path | None = None,
    display: figures.Display = figures.DEFAULT_DISPLAY,
) -> Path:
    """Keep the picture of an exam rejected at QC, whose volumes are not written as a case.

    The pipeline calls it before dropping the volumes; the report shows the picture under the
    rejected exam (``<out>/rejected/<exam_id>/views.png``, ``out`` defaulting to ``work/qc``),
    so the maintainer can see what the failed check saw.

    Example:
        >>> write_rejected_figure(work, "EX0002", ct, pet, label, affine)  # doctest: +SKIP
    """
    if not _safe_name(exam_id):
        raise LymphAtlasError(f"exam id {exam_id!r} cannot name a folder; rename the source exam folder")
    out = Path(out) if out is not None else Path(work) / "qc"
    fig = figures.render_case(ct, pet, label, affine_ras, title=f"rejected exam {exam_id}", display=display)
    return fig.save(out / REJECTED_DIR / exam_id / VIEWS_PNG)


def _flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for k in sorted(value):
            out += _flatten(value[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, _fmt(value))]


def _build(build) -> str:
    if build is None:
        return "<p>No build.json in this WORK folder (written by <code>python -m builder convert</code>).</p>"
    if not isinstance(build, dict):
        return "<p>build.json is not a JSON object; re-run convert to rewrite it.</p>"
    settings = dict(build)
    # Per-exam entries are keyed by source exam id (identifying, and thousands of rows): count them.
    exams = settings.pop("exams", None)
    rows = _flatten(settings)
    if isinstance(exams, dict):
        counts: dict[str, int] = {}
        for entry in exams.values():
            status = entry.get("status", "?") if isinstance(entry, dict) else str(entry)
            counts[status] = counts.get(status, 0) + 1
        rows.append(("exams", ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))))
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return (
        f"<details><summary>{len(rows)} settings and versions of the last convert run (build.json)</summary>"
        '<table id="build"><thead><tr><th>setting</th><th>value</th></tr></thead>'
        f"<tbody>{body}</tbody></table></details>"
    )


def render_html(
    shown: list[CaseImages],
    *,
    failures: list,
    build: dict | None,
    display: figures.Display = figures.DEFAULT_DISPLAY,
    out: Path | None = None,
) -> str:
    """The report page (inline CSS and JS, relative image links); ``out`` is where it will be written."""
    head = "".join(f'<th data-type="{t}">{_e(name)}</th>' for name, t in _SUMMARY_COLUMNS)
    rows = "\n".join(_summary_row(s) for s in shown)
    n_bad = sum(1 for s in shown if _qc_status(s)[1] == "bad")
    sections = "\n".join(_case_section(s, i) for i, s in enumerate(shown))
    lo, hi = display.ct_range
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LymphAtlas QC report</title>
<style>{_CSS}</style></head>
<body>
<h1>LymphAtlas QC report</h1>
<p class="note">{len(shown)} cases, {n_bad} with a problem, {len(failures)} rejected exams.
Maintainers' document: the rejected-exam list names source exam ids; do not publish this report.
Pictures: radiological convention (patient's right on the image left; axial anterior up; coronal and
sagittal head up), pixels to scale; CT window {lo:.0f} to {hi:.0f} HU; PET inverted grey SUV 0-{display.suv_max:g};
lesion label outlined in red. Registration check: PET before (scanner geometry, the rigid transform undone)
and after registration, with CT edges in blue.</p>
<p><a href="#summary">summary</a> &middot; <a href="#rejected">rejected exams</a> &middot;
<a href="#build-settings">build</a></p>
<h2 id="summary">Summary</h2>
<p class="note">Click a column header to sort. MI: Mattes mutual information (lower is better).</p>
<table class="sortable" id="cases"><thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody></table>
<h2 id="rejected">Rejected exams</h2>
{_failures(failures, Path(out) if out is not None else Path("."))}
<h2 id="build-settings">Build parameters and versions</h2>
{_build(build)}
<h2>Cases</h2>
{sections}
<script>{_JS}</script>
</body></html>
"""
