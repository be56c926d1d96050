"""Every survivor of a ``scripts/mutation.sh`` run with the reason it survives, as Markdown.

    python scripts/mutation_survivors.py SCRATCH > docs/mutation-survivors.md

``SCRATCH`` is the run's folder (``$MUTATION_DIR``; one sub-folder per part). A survivor is explained
by a rule on its change (a message's words, a log line, the context attached to an error) or by the
table below (part -> function -> mutant numbers -> reason). A survivor that neither explains is listed
as UNEXPLAINED and the script exits 1: a new survivor needs a test that kills it, or a reason.
Mutant numbers are mutmut's per function; they hold while the function's source is unchanged.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mutation_report import statuses, survivors  # noqa: E402

MESSAGE = "message text: the words of an error or a note (tests match the rejection's cause, not every word)"
LOG = "log line: nothing reads it back"
CONTEXT = ("error context: the message or the exam / series / file attached to a rejection is dropped "
           "(the tests check that the input is rejected, and at which stage)")
DTYPE = "dtype spelling: the default (or the input's own float type) gives the same values here"
TIE = "a `<` / `<=` tie that no value of the data reaches (measure zero)"

# part -> function -> {mutant numbers: reason}
REASONS: dict[str, dict[str, dict[tuple[int, ...], str]]] = {
    "suv": {
        "_decay_time": {
            (2,): "`headers[1]` for `headers[0]`: series-level attributes, the same on every slice of a series",
            (24, 26, 28): "`min` of the acquisition times without the time-zone key: no DICOM time of one series "
                          "carries a zone, so the order is the same",
            (121,): "the note's text (`None` in the notes tuple); notes are free text for the QC report",
        },
        "suv_from_headers": {
            (2,): "`headers[1]` for `headers[0]`: series-level attributes, the same on every slice of a series",
        },
        "_philips_counts_factor": {
            (37,): TIE + " (factors 1 % apart)",
        },
        "_private_datetime": {
            (7, 11, 13, 14, 15, 16): "codec / strip spellings: `ASCII` is `ascii`, the values are ASCII digits (no "
                                     "byte to ignore), a NUL or blank left over is ignored by the date parser",
        },
        "_private_float": {
            (9, 12, 13): "codec / strip spellings: `float()` ignores blanks, values are ASCII digits",
            (16, 18): "a multi-valued (VM > 1) value of a VM-1 private attribute: no vendor writes one",
        },
        "_radiopharmaceutical": {
            (21, 52): "`<= 1` for `<= 0`: a dose of (0, 1] Bq or a half-life of (0, 1] s is rejected anyway as "
                      "implausible further on (the smallest plausible dose is tested)",
        },
        "_units": {
            (11,): "a missing Units read as `XXXX` instead of empty: rejected as unknown units either way",
        },
    },
    "lesions": {
        "_label_box": {
            (35, 39): "a larger working box (to the array's end, or one voxel more): the same components inside",
        },
        "_lesion_items": {
            (25,): "`continue` -> `break` where `find_objects` gives None: instance ids are 1..n, never missing",
            (33, 35): "the aligned PET's values averaged in float32 instead of float64: SUVmean differs by < 1e-6",
            (68, 69, 70): "the position handed to the body-region rule: the part's CTs have no lungs, so every "
                          "position is `unknown`; the body region (left out of this part) is checked against the "
                          "generator's regions in test_end_to_end",
        },
        "_native_peaks": {
            (72,): "ml per PET voxel / 1001: 0.1 % of the coverage threshold, below the 7^3 sub-sampling's resolution",
            (109, 112, 115): "a larger crop around the lesion (to the array's end): the same sphere means inside",
            (130,): "`cval=0.0` spelled as its default",
        },
        "_to_pet_index": {
            (1,): "`m = None`: the point-by-point path for affine transforms gives the same indices",
        },
        "_whole_body": {
            (3,): "`len(items) >= 1` for Dmax: one lesion gives 0 either way",
        },
        "peak_kernel": {
            (6,): "`3 * volume` -> `3 / volume`: equal at the only volume used (1 ml)",
            (8,): "1001 for 1000 ml/l: 0.03 % of the radius, below the 7^3 sub-sampling's resolution",
            (16, 18, 44, 47): DTYPE,
            (53,): "sub-samples `c - s` for `c + s`: the sub-sample offsets are symmetric about 0",
            (68,): "`<` for `<=` on the sphere's surface: " + TIE,
        },
    },
    "acceptance": {
        "_register": {
            (5,): "the registration images' spacing: the crafted candidates do not use the images "
                  "(test_align's real registrations do; not in this part, ~30 s each)",
            (19,): "the identity's rotation centre: a zero rotation about any centre is the identity",
            tuple(range(26, 34)) + (103, 104, 106): "the optimiser's inputs: the crafted candidates ignore them "
                  "(test_align's real registrations use them; not in this part, ~30 s each)",
            (39, 41, 54): "the metric's sampling region (the overlap mask, or none): the crafted candidates rank the "
                          "same on the phantom's body either way",
            (84, 126): TIE + " (`after <= before - margin`)",
            (86, 128): "the margin divided instead of multiplied by |metric|: the crafted candidates gain either "
                       "nothing or far more than either margin",
            (99,): "`>=` for `>` against the auto threshold: " + TIE,
        },
        "align_pet": {
            (12,): "`body=None` for the registration: the crafted candidates rank the same without the body mask",
            (41,): "the shift recorded over the whole image instead of the body: the crafted transforms are "
                   "translations, the same shift everywhere",
        },
    },
    "deid": {
        "_searched_text": {
            (8, 12, 27, 30): "decode spelling: `utf-8` is the default codec (and `UTF-8` the same one)",
        },
        "header_identifiers": {
            (5, 7, 8): "`stop_before_pixels` dropped: the same header values, the pixels read as well",
            (15,): "`value == 'XXXX'`: an empty value is skipped one line later anyway",
        },
        "load_or_create_key": {
            (7,): "`b'XXXX'` for an unreadable key: shorter than 16 bytes either way, rejected the same",
            (17,): "`token_bytes(None)`: 32 bytes, the default",
            (27,): "the temporary key file created without its mode: `fchmod` sets 0600 before any byte is written",
            (47, 48): "the temporary file's `unlink` flags: it exists whenever that line runs",
        },
        "nifti_header_text": {
            (14, 15, 33, 34, 37, 38): "a few more bytes of a NIfTI header or extension read and searched: "
                                      "the same identifiers found (nothing follows the header but the image)",
        },
        "secure_private_dir": {
            (8,): "`mkdir` without its mode: the next lines chmod the folder to 0700",
            (11, 12, 21, 22): "a mode test that is always true: the folder and files are chmod-ed to 0700 / 0600, "
                              "their end state either way",
        },
        "work_key": {
            (16,): "the separator of the list of key-derived files in the message: " + MESSAGE,
        },
    },
    "splits": {
        "_Bins.__init__": {
            (8, 15): "one more bin per diagnosis than folds + test: an extra bin no fold reads",
            (13,): "every bin's burden starting at 1.0 instead of 0.0: the same offset in every bin, the same order",
        },
        "_Bins.lightest_fold": {
            (16, 18, 19): "the burden rounded to 10 digits or not at all instead of 9: ties closer than 1e-9 ml "
                          "do not occur in the tests' burdens",
        },
        "_place_in_test": {
            (29,): "the test bin's count kept under no diagnosis: folds never read bin 0 (the test bin)",
        },
        "_placements": {
            (19, 20, 24): "the guard against moving a published case: every published case is placed where it "
                          "was by construction, so the guard cannot fire (its list and message never built)",
        },
        "_test_positions": {
            (51,): "the `n_fresh - 1` clamp never binds (offset < step), so `n_fresh + 1` changes nothing",
        },
        "plan_splits": {
            (102,): "`used` when no previous release has a fold (`default=-2`): only read when one exists",
            tuple(range(126, 136)): "arguments of the plan's one log line: " + LOG,
        },
        "read_splits": {
            (6,): "what the file is, in the error message: " + MESSAGE,
            (11,): "the error's fix text: " + MESSAGE,
        },
    },
    "loader": {
        "CaseDataset.__getitem__": {
            (35, 37): DTYPE + " (the decoded affine is float64)",
            (41,): "`_spacing_zyx(row, None)`: the row's spacing comes first; the affine is only a fallback",
        },
        "CaseDataset._from_shard": {
            (4,): "the three columns start as `''` instead of None: every one is read before use",
            (12, 13, 15, 16, 19, 22, 23): "the `where` text of a decode error: " + MESSAGE,
            (29, 31): DTYPE + " (the label column decodes to uint8)",
            (34,): "`continue` -> `break` after the label: the label is the last column read",
            (47, 48): "the internal three-columns assert: every column is read, so it holds either way",
        },
        "PatchDataset.__getitem__": {
            (4,): "`index <= len`: the case list then raises IndexError itself",
            (5,): MESSAGE,
            (38, 40): "`slice(None, n)` / `slice(n)` for `slice(0, n)`: the same slice",
            (44, 51): "the inner slice `b + a` and the full-size test: numpy clips the slice and the pad path gives "
                      "the same crop",
            (97, 99, 106): DTYPE + " (the entry's affine and start are float64 / int64)",
            (125,): "`_spacing_zyx(meta, None)`: the row's spacing comes first; the affine is only a fallback",
        },
        "PatchDataset.__init__": {
            (1, 2): "the `progress` and `instances` defaults: `load_lymphatlas` passes both",
            (7, 14): "`progress` passed on as None or not at all: only whether a progress bar is drawn",
            (21,): MESSAGE,
        },
        "_spacing_zyx": {
            (12, 14, 15, 20, 22): DTYPE + " (affines and spacings are float64 already)",
        },
    },
    "resampling": {
        "_crop_to_reference": {
            (1,): "the crop margin 4 voxels instead of 3: a larger crop gives the same values",
            (5, 6, 8, 9, 10, 12, 13, 14, 16): "a reference corner one or two voxels in or out: the crop's "
                                              "3-voxel margin covers it",
            (33, 44): "`astype(None)`: float corners, converted to int by the ROI call",
            (46,): "`max(None)`: the largest corner index on any axis, a larger crop (same values)",
            (52,): "`hi <= lo`: a one-voxel overlap resamples the whole image instead of its crop (same values)",
            (58,): "the ROI's index left at its default 0: only with `lo` = 0, else a larger region (same values)",
        },
        "_row_intervals": {
            (10, 12, 14, 16): DTYPE + " (integer indices times a float step)",
            (31,): "`to_index[:4, 0]`: the loop reads only the first 3 steps",
            (47,): "`<= 1e-12` for `< 1e-12`: " + TIE,
            (49,): "NaN for 0 in an empty row's stop: `max(stop, first)` makes it empty either way",
            (57,): "`step >= 0` after the zero-step branch: a step of exactly 0 never gets there",
            (102, 103, 111, 112): "a clip bound dropped: `first` >= 0 and `stop` <= nx already hold by construction",
        },
        "_coarse_axes": {
            (7, 9, 18, 20, 26, 28): DTYPE + " (direction cosines and spacings are floats)",
        },
        "_upsample_array": {
            (2, 29, 31): "float64 instead of float32 working arrays: the same float32 values, resampled to float32",
            (3, 5, 6): "the copy flag of `astype`: the input is not modified either way",
            (12, 35, 46, 53, 59, 66, 67, 68, 72, 73, 82): "how the lines are split into thread slabs (more, fewer, "
                "overlapping, none, another axis the filter does not run along): every line is filtered whole, "
                "so the values are the same (test_bounded_cubic_does_not_depend_on_the_thread_count)",
            (17, 18): "a 2-voxel axis skipped: the resampler pads every axis by a voxel on each side (n >= 3) and "
                      "no caller of `upsample_cubic2` has a 2-voxel axis",
        },
        "_upsample_axis": {
            (7, 9, 11, 12, 25): "spline filter arguments spelled as their defaults (order 3, mirror, float output)",
            (39, 41, 50, 52, 91): "slice bounds spelled differently (`None` for 0, the head slice): the same slices",
        },
        "_zero_beyond_fov": {
            (1,): "`m = None`: the closed form replaced by `pet_fov_mask`, which gives the same mask",
            (23, 25): DTYPE,
            (39,): "`np.full(4, -0.5)`: `_row_intervals` reads only the first 3 bounds",
            (55, 58, 59, 60, 61, 62, 63, 65, 68, 69): "which rows are visited: beyond the reach box the resampler "
                "already wrote 0 and inside the field of view a visited row keeps its values, so visiting more "
                "or fewer rows at the edge gives the same image",
            (77,): "the pasted region one slice taller: the same values pasted back (fails only at the CT's last "
                   "slice, where the ROI would leave the image; not reached by the test grids)",
            (105,): "`stop < start`: an empty interval zeroes the row either way",
        },
        "resample_to_reference": {
            (26, 52, 151): "the output pixel type dropped: the input is float32 already (cast above), so the "
                           "output is float32",
            (33, 35, 38): "Threshold arguments spelled as their defaults (lower 0, outside value 0; the float64 "
                          "maximum is above every float32)",
            (68, 70, 111, 113, 118, 120, 125, 127, 170, 172): DTYPE,
            (154, 160, 161, 165): "a larger reach box (more rows visited by `_zero_beyond_fov`): the same image",
        },
        "upsample_cubic2": {
            (10, 11): "a 2-voxel axis upsampled or not (`>= 2` vs `> 2`): no caller upsamples a 2-voxel axis",
        },
    },
}

RULES: list[tuple[str, str]] = [
    # (regex on the changed lines, reason): applied after the kind (text, log) and before the table
    (r"raise _fail\(|_fail\(|Error\(|exam_id=|series_uid=|path=|series, exam_id|series, None|None, exam_id", CONTEXT),
]


def groups(script: Path) -> list[tuple[str, str, list[str]]]:
    """(part, module, mutant name globs) of each row of scripts/mutation.sh's table."""
    table = script.read_text().split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    out = []
    for line in table.splitlines():
        group, module, globs, *_ = line.split("|")
        out.append((group, module, globs.split()))
    return out


def reason(group: str, fn: str, number: int, kind: str, change: str) -> str | None:
    if kind == "log":
        return LOG
    if kind == "text":
        return MESSAGE
    for numbers, why in REASONS.get(group, {}).get(fn, {}).items():
        if number in numbers:
            return why
    for pattern, why in RULES:
        if re.search(pattern, change):
            return why
    return None


def main(scratch: str) -> int:
    root = Path(scratch)
    lines = ["# Mutation survivors", "",
             "Every mutant that the fast tests of `scripts/mutation.sh` leave alive, by part and function, with "
             "the reason (made by `scripts/mutation_survivors.py` from a run's folder; mutant numbers are mutmut's, "
             "`mutmut show <module>.x_<function>__mutmut_<n>` in the part's folder shows one).", ""]
    unexplained = 0
    for group, module, globs in groups(Path(__file__).parent / "mutation.sh"):
        folder = root / group
        if not (folder / "results.txt").exists():
            continue
        status = statuses(str(folder), *globs)
        tested = sum(1 for s in status.values() if s not in ("skipped", "not checked"))
        killed = sum(1 for s in status.values() if s in ("killed", "timeout"))
        by_fn = survivors(str(folder), module, status)
        n = sum(len(v) for v in by_fn.values())
        lines += [f"## {group} (`{module}`): {killed}/{tested} killed, {n} survive", ""]
        for fn, rows in sorted(by_fn.items()):
            lines += [f"### `{fn}`", ""]
            for number, kind, change, no_test in rows:
                why = reason(group, fn, number, kind, change)
                if why is None:
                    unexplained += 1
                    why = "UNEXPLAINED"
                if no_test:
                    why = "no test runs it; " + why
                shown = change.replace("`", "'")
                shown = shown if len(shown) <= 140 else shown[:137] + "..."
                lines.append(f"- {number}: `{shown}`: {why}")
            lines.append("")
    print("\n".join(lines))
    if unexplained:
        print(f"{unexplained} survivors unexplained", file=sys.stderr)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
