"""A year of update releases into one mirror: each change in its CHANGELOG, the lineage kept and its mistakes refused.

Seven versions are built from one WORK folder of tiny fake cases (lymphatlas_synth/fake_work.py) and
published to one mirror, each with one kind of change made here by hand, as convert or withdraw
would make it: new patients, a new exam of a known patient, a withdrawal (a whole patient by
subject id, and the first exam of another, whose later exam is renumbered), a diagnosis and
age-band correction that empties a config's train split, a settings change (PET re-made with
linear interpolation), and no change at all. Each version is checked against a diff of
``metadata/cases.csv``, ``splits.json`` and the content hashes computed here, not by the builder.
Then the two lineage mistakes (no base, a stale base) and an unrelated WORK are refused by
``release`` and ``publish`` typed at a console, the mirror left as it was.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from builder.release.build import build_release
from builder.release.publish import PublishError, publish_hub, publish_mirror
from lymphatlas_ds.lineage import lineage_hash
from lymphatlas_synth.fake_work import make_fake_work
from tests.support.releases import datasets_cache_in_tmp  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")

SHAPE = (8, 14, 14)  # the smallest grid fake_work places its lesions in
SEED = 5
FIELDS = ("diagnosis", "subtype", "sex", "age_band", "exam_index", "days_from_first_exam")
LINEAR_SETTINGS = hashlib.sha256(b"convert --interpolation linear").hexdigest()


# --- what this test computes itself -----------------------------------------------------------


def _cases_csv(release: Path) -> dict[str, dict[str, str]]:
    with open(release / "metadata" / "cases.csv", newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def _splits(release: Path) -> dict[str, dict]:
    return json.loads((release / "splits.json").read_text())["cases"]


def _diff(old: Path, new: Path) -> dict:
    """added / removed / content changed / field changes / moved, from the two releases' files."""
    a, b = _cases_csv(old), _cases_csv(new)
    sa, sb = _splits(old), _splits(new)
    common = sorted(set(a) & set(b))
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "content": sorted(c for c in common if a[c]["content_hash"] != b[c]["content_hash"]),
        "fields": {c: {f: (a[c][f], b[c][f]) for f in FIELDS if a[c][f] != b[c][f]} for c in common
                   if any(a[c][f] != b[c][f] for f in FIELDS)},
        "moved": [c for c in common if (sa[c]["split"], sa[c]["fold"]) != (sb[c]["split"], sb[c]["fold"])],
        "pairs": sorted({f"{r['diagnosis'].lower()}/{r['split']}" for r in a.values()}
                        - {f"{r['diagnosis'].lower()}/{r['split']}" for r in b.values()}),
    }


def _section(changelog: str, version: str) -> str:
    start = changelog.index(f"\n## {version}\n")
    end = changelog.find("\n## ", start + 1)
    return changelog[start: end if end > 0 else None]


def _case_line(section: str, case_id: str) -> str:
    match = re.search(rf"^- {re.escape(case_id)}: (.*)$", section, re.MULTILINE)
    assert match, f"no CHANGELOG line for {case_id} in:\n{section}"
    return match.group(1)


def _hash_case(folder: Path) -> str:
    """Content hash of a WORK case from its NIfTI files and case.json's affine, as docs/contracts.md defines it."""
    info = json.loads((folder / "case.json").read_text())
    digest = hashlib.sha256()
    for name, dtype in (("ct", "<i2"), ("pet", "<f4"), ("label", "u1")):
        arr = np.asanyarray(nib.load(folder / f"{name}.nii.gz").dataobj).transpose(2, 1, 0)
        digest.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    digest.update(np.asarray(info["geometry"]["affine_ras"], dtype="<f8").tobytes())
    return digest.hexdigest()


def _edit_case(folder: Path, edit) -> None:
    info = json.loads((folder / "case.json").read_text())
    edit(info)
    (folder / "case.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def _remake_pet_linear(folder: Path) -> str:
    """The case's PET re-made (as a convert with --interpolation linear would): new voxels, new record."""
    img = nib.load(folder / "pet.nii.gz")
    pet = (np.asanyarray(img.dataobj) * np.float32(0.97)).astype(np.float32)
    new = nib.Nifti1Image(pet, img.affine)
    new.set_sform(img.affine, code=1)
    new.set_qform(img.affine, code=1)
    nib.save(new, folder / "pet.nii.gz")
    digest = _hash_case(folder)

    def edit(info):
        info["alignment"]["interpolation"] = "linear"
        info["source"]["settings_sha256"] = LINEAR_SETTINGS
        info["content_hash"] = digest
    _edit_case(folder, edit)
    return digest


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _console(program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m builder ...`` or the ``lymphatlas`` command, typed in ``cwd``."""
    command = [sys.executable, "-m", "builder"] if program == "builder" else [str(Path(sys.executable).parent / program)]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


# --- the year ----------------------------------------------------------------------------------


def _release(root: Path, version: str) -> Path:
    out = root / f"r{version}"
    build_release(root / "work", out, version=version, mirror=root / "mirror")
    publish_mirror(out, root / "mirror")
    return out


@pytest.fixture(scope="module")
def year(tmp_path_factory):
    """The mirror after seven versions, the WORK folder, and what each step did (the truth)."""
    root = tmp_path_factory.mktemp("year")
    work, mirror = root / "work", root / "mirror"
    truth: dict[str, dict] = {}
    make_fake_work(work, n_patients=6, seed=SEED, shape_zyx=SHAPE)
    _release(root, "1.0.0")

    new = make_fake_work(work, n_patients=3, seed=SEED, shape_zyx=SHAPE, first_patient=6)
    truth["1.1.0"] = {"added": sorted(c.case_id for c in new)}
    _release(root, "1.1.0")

    known = make_fake_work(work, n_patients=1, seed=SEED, shape_zyx=SHAPE, first_patient=1, case_prefix="LB",
                           exam_prefix="EXB", volume_seed=99)
    truth["1.2.0"] = {"added": [known[0].case_id], "subject": known[0].subject_id}
    _release(root, "1.2.0")

    # Withdrawal: patient 3 (two exams) by subject id, and the first exam of patient 0, whose second
    # exam convert then renumbers (exam index 1 -> 0, 120 -> 0 days): a metadata-only change.
    rows = _cases_csv(mirror / "1.2.0")
    gone = sorted(c for c, r in rows.items() if r["subject_id"] == f"LP-0003{SEED:02d}")
    first, later = f"LA-00000{SEED:02d}", f"LA-00001{SEED:02d}"
    proc = _console("builder", "withdraw", str(work), f"LP-0003{SEED:02d}", "EXAM00000", "--reason",
                    "consent withdrawn", cwd=root)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"patient LP-0003{SEED:02d}: 2 exam(s) to withdraw" in proc.stdout and all(c in proc.stdout for c in gone)
    _edit_case(work / "cases" / later, lambda i: i["clinical"].update(exam_index=0, days_from_first_exam=0))
    truth["1.3.0"] = {"removed": sorted([*gone, first]), "renumbered": later}
    _release(root, "1.3.0")

    # Diagnosis correction of every HL patient in train (HL -> NHL, subtype too): hl/train empties; an age band fix.
    rows, placed = _cases_csv(mirror / "1.3.0"), _splits(mirror / "1.3.0")
    corrected = sorted(c for c, r in rows.items() if r["diagnosis"] == "HL" and placed[c]["split"] == "train")
    for case_id in corrected:
        _edit_case(work / "cases" / case_id,
                   lambda i: i["clinical"].update(diagnosis="NHL", subtype="DLBCL"))
    aged = sorted(c for c in rows if c not in corrected)[0]
    old_band = rows[aged]["age_band"]
    _edit_case(work / "cases" / aged, lambda i: i["clinical"].update(age_band="70-74"))
    truth["1.4.0"] = {"corrected": corrected, "aged": (aged, old_band)}
    _release(root, "1.4.0")

    # Settings change: two patients' PET re-made with linear interpolation (new voxels, new settings hash).
    rows = _cases_csv(mirror / "1.4.0")
    subjects = sorted({r["subject_id"] for r in rows.values()})[:2]
    remade = {c: _remake_pet_linear(work / "cases" / c) for c, r in sorted(rows.items()) if r["subject_id"] in subjects}
    truth["1.5.0"] = {"remade": remade}
    _release(root, "1.5.0")

    # No change: built and published at the console; both warn.
    proc = _console("builder", "release", str(work), "r1.6.0", "--version", "1.6.0", "--mirror", "mirror",
                    "--quiet", cwd=root)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    truth["1.6.0"] = {"release_stderr": proc.stderr, "release_stdout": proc.stdout}
    proc = _console("builder", "publish", "r1.6.0", "--mirror", "mirror", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root, truth


VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0", "1.6.0"]


def test_every_version_is_built_on_the_one_before_and_verify_checks_the_chain(year):
    root, _ = year
    mirror = root / "mirror"
    assert json.loads((mirror / "versions.json").read_text())["versions"] == VERSIONS
    for before, version in zip([None, *VERSIONS], VERSIONS):
        base = json.loads((mirror / version / "manifest.json").read_text())["base"]
        if before is None:
            assert base is None
        else:
            manifest = json.loads((mirror / before / "manifest.json").read_text())
            assert base == {"version": before, "manifest_sha256": lineage_hash(manifest)}
            assert _diff(mirror / before, mirror / version)["moved"] == []
    proc = _console("lymphatlas", "verify", "mirror", "--all-versions", "--quick", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lineage of 7 version(s) holds" in proc.stdout


def test_each_change_of_the_year_is_in_its_changelog_with_its_fields(year):
    root, truth = year
    mirror = root / "mirror"
    changelog = (mirror / "1.6.0" / "CHANGELOG.md").read_text()
    assert [v for v in VERSIONS[::-1]] == re.findall(r"^## (\S+)$", changelog, re.MULTILINE)
    for before, version in zip(VERSIONS, VERSIONS[1:]):
        diff, section = _diff(mirror / before, mirror / version), _section(changelog, version)
        for kind in ("added", "removed"):
            assert f"- {kind} ({len(diff[kind])}): {', '.join(diff[kind]) or 'none'}" in section
        assert f"- changed ({len(diff['content'])}): {', '.join(diff['content']) or 'none'}" in section
        for case_id, fields in diff["fields"].items():
            line = _case_line(section, case_id)
            for name, (old, new) in fields.items():
                assert f"{name} {old or 'none'} -> {new or 'none'}" in line, (version, line)
        for case_id in diff["removed"]:
            assert _case_line(section, case_id).startswith("removed: ")
        for case_id in diff["content"]:
            assert _case_line(section, case_id).startswith("content (voxels or geometry) changed")
    # ... and the diff is what each step did.
    d = {v: _diff(mirror / b, mirror / v) for b, v in zip(VERSIONS, VERSIONS[1:])}
    assert d["1.1.0"]["added"] == truth["1.1.0"]["added"] and not d["1.1.0"]["removed"]
    assert d["1.2.0"]["added"] == truth["1.2.0"]["added"]
    assert _cases_csv(mirror / "1.2.0")[truth["1.2.0"]["added"][0]]["subject_id"] == truth["1.2.0"]["subject"]
    assert d["1.3.0"]["removed"] == truth["1.3.0"]["removed"] and not d["1.3.0"]["content"]
    later = truth["1.3.0"]["renumbered"]
    assert d["1.3.0"]["fields"] == {later: {"exam_index": ("1", "0"), "days_from_first_exam": ("120", "0")}}
    for case_id in truth["1.3.0"]["removed"]:
        assert _case_line(_section(changelog, "1.3.0"), case_id) == "removed: consent withdrawn"
    fields = d["1.4.0"]["fields"]
    aged, old_band = truth["1.4.0"]["aged"]
    assert set(fields) == {*truth["1.4.0"]["corrected"], aged} and fields[aged] == {"age_band": (old_band, "70-74")}
    for case_id in truth["1.4.0"]["corrected"]:
        assert fields[case_id]["diagnosis"] == ("HL", "NHL")
        assert "diagnosis HL -> NHL (config hl -> nhl)" in _case_line(_section(changelog, "1.4.0"), case_id)
    assert d["1.5.0"]["content"] == sorted(truth["1.5.0"]["remade"]) and not d["1.5.0"]["fields"]
    for case_id, digest in truth["1.5.0"]["remade"].items():
        assert json.loads((mirror / "1.5.0" / "manifest.json").read_text())["cases"][case_id] == digest
        assert "interpolation bounded-cubic -> linear" in _case_line(_section(changelog, "1.5.0"), case_id)
    assert not any(d["1.6.0"][k] for k in ("added", "removed", "content", "fields"))
    assert "Update of 1.5.0: 0 added, 0 removed, 0 changed, 0 with metadata changes." in _section(changelog, "1.6.0")
    assert "warning: release 1.6.0 has no change from 1.5.0" in truth["1.6.0"]["release_stderr"]
    assert "metadata changed 0; built on 1.5.0)" in truth["1.6.0"]["release_stdout"]


def test_every_config_and_split_the_cards_list_loads_and_an_emptied_one_is_announced(year):
    root, _ = year
    mirror = root / "mirror"
    emptied = _diff(mirror / "1.3.0", mirror / "1.4.0")["pairs"]
    assert "hl/train" in emptied
    assert "config `hl` has no `train` case any more" in _section((mirror / "1.4.0" / "CHANGELOG.md").read_text(), "1.4.0")
    rows = _cases_csv(mirror / "1.6.0")
    for folder in (mirror, mirror / "1.4.0"):
        configs = DatasetCard.load(folder / "README.md").data.to_dict()["configs"]
        listed = {(c["config_name"], f["split"]) for c in configs for f in c["data_files"]}
        assert ("hl", "train") not in listed
        for config, split in sorted(listed):
            ds = datasets.load_dataset(str(folder), config, split=split)
            expected = {c for c, r in rows.items() if r["split"] == split
                        and config in ("all", "preview", r["diagnosis"].lower())}
            if config == "lesions":  # one row per lesion: the cases with lesions
                expected = {c for c, r in rows.items() if r["split"] == split and int(r["lesion_count"] or 0) > 0}
            assert set(ds["case_id"]) == expected, (folder, config, split)


def test_the_card_and_the_shards_say_what_convert_used(year):
    root, truth = year
    mirror = root / "mirror"
    first = (mirror / "1.0.0" / "README.md").read_text()
    assert "bounded by the native PET voxels" in first and "linear interpolation" not in first
    card = (mirror / "1.5.0" / "README.md").read_text()
    remade = truth["1.5.0"]["remade"]
    n = len(_cases_csv(mirror / "1.5.0"))
    assert f"linear interpolation for {len(remade)} cases" in card and "differ in interpolation" in card
    assert f"for {n - len(remade)} cases" in card
    rows = _cases_csv(mirror / "1.5.0")
    assert {c for c, r in rows.items() if r["interpolation"] == "linear"} == set(remade)
    assert {c for c, r in rows.items() if r["settings_sha256"] == LINEAR_SETTINGS} == set(remade)
    in_shards = {}
    for shard in sorted((mirror / "1.5.0" / "data").rglob("*.parquet")):
        in_shards.update(json.loads(pq.ParquetFile(shard).metadata.metadata[b"lymphatlas.provenance"]))
    assert set(in_shards) == set(rows)
    assert {c for c, p in in_shards.items() if p["interpolation"] == "linear"} == set(remade)


# --- the mistakes -----------------------------------------------------------------------------


def test_release_refuses_no_base_a_stale_base_and_an_unrelated_work(year, tmp_path):
    root, _ = year
    mirror = root / "mirror"
    before = _snapshot(mirror)
    attempts = {
        "no base": (["release", str(root / "work"), str(tmp_path / "a"), "--version", "1.7.0"], "was released before"),
        "stale": (["release", str(root / "work"), str(tmp_path / "b"), "--version", "1.7.0", "--previous",
                   str(mirror / "1.4.0")], "the latest version of the mirror"),
    }
    make_fake_work(tmp_path / "other", n_patients=3, seed=SEED + 1, shape_zyx=SHAPE)
    attempts["unrelated"] = (["release", str(tmp_path / "other"), str(tmp_path / "c"), "--version", "1.7.0",
                              "--mirror", str(mirror)], "not the one that built this lineage")
    for name, (args, why) in attempts.items():
        proc = _console("builder", *args, "--quiet", cwd=tmp_path)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and why in proc.stderr, (name, proc.stderr)
        assert "--mirror" in proc.stderr or name == "unrelated"
        assert not (tmp_path / args[2]).exists()
    assert _snapshot(mirror) == before


def test_publish_refuses_a_release_with_no_base_or_a_stale_base(year, tmp_path):
    root, _ = year
    mirror = root / "mirror"
    # A first release (another WORK of the same patients, no base) and one built on a copy of 1.4.0.
    shutil.copytree(root / "work", tmp_path / "fresh", ignore=shutil.ignore_patterns("releases.json", ".lock"))
    build_release(tmp_path / "fresh", tmp_path / "first", version="1.7.0")
    shutil.copytree(mirror / "1.4.0", tmp_path / "old")
    build_release(root / "work", tmp_path / "stale", version="1.7.0", previous=tmp_path / "old")
    before = _snapshot(mirror)
    for release, why in (("first", "a first release (no base)"), ("stale", "is built on 1.4.0")):
        proc = _console("builder", "publish", release, "--mirror", str(mirror), cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert why in proc.stderr and "1.6.0" in proc.stderr and str(mirror) in proc.stderr, proc.stderr
        assert f"--version 1.7.0 --mirror {mirror}" in proc.stderr, proc.stderr
        with pytest.raises(PublishError, match="1.6.0"):
            publish_hub(tmp_path / release, "org/lymphatlas", api=_HubWithLatest(mirror / "1.6.0"))
    assert _snapshot(mirror) == before
    # The no-op publish: a warning, nothing changed.
    proc = _console("builder", "publish", str(mirror / "1.6.0"), "--mirror", str(mirror), cwd=tmp_path)
    assert proc.returncode == 0 and "nothing changed" in proc.stderr and "published" not in proc.stdout
    assert _snapshot(mirror) == before


class _HubWithLatest:
    """A Hub repo whose latest tag holds ``latest``'s manifest: publish_hub must stop before any commit."""

    def __init__(self, latest: Path) -> None:
        self.latest, self.calls = latest, []

    def create_repo(self, *a, **k):
        self.calls.append("create_repo")

    def list_repo_files(self, *a, **k):
        return []

    def list_repo_refs(self, *a, **k):
        from types import SimpleNamespace

        return SimpleNamespace(tags=[SimpleNamespace(name="v1.0.0"), SimpleNamespace(name="v1.6.0")])

    def hf_hub_download(self, repo_id, filename, revision, **k):
        assert revision == "v1.6.0"
        return str(self.latest / filename)

    def create_commit(self, *a, **k):
        raise AssertionError("a refused release must not be committed")

    create_tag = create_commit


# --- the lineage checks of verify, the CLI's helpers -----------------------------------------------


def test_verify_names_a_version_built_without_the_lineage(year, tmp_path):
    """A mirror whose 1.1.0 records no base (built from scratch) and whose 1.2.0 moved a case: both named."""
    root, _ = year
    mirror = tmp_path / "broken"
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        shutil.copytree(root / "mirror" / version, mirror / version)
    (mirror / "versions.json").write_text(json.dumps({"latest": "1.2.0", "versions": ["1.0.0", "1.1.0", "1.2.0"]}))
    manifest = json.loads((mirror / "1.1.0" / "manifest.json").read_text())
    (mirror / "1.1.0" / "manifest.json").write_text(json.dumps({**manifest, "base": None}))
    proc = _console("lymphatlas", "verify", str(mirror), "--all-versions", "--quick", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "version 1.1.0: records no base (a first release) but follows 1.0.0" in proc.stdout
    # 1.2.0 names a 1.1.0 whose manifest is not the mirror's any more
    assert "version 1.2.0: is built on a 1.1.0 whose manifest differs" in proc.stdout

    from lymphatlas_ds.lineage import check_chain

    splits = json.loads((mirror / "1.1.0" / "splits.json").read_text())
    case_id, entry = sorted(splits["cases"].items())[0]
    splits["cases"][case_id] = {**entry, "split": "train" if entry["split"] == "test" else "test",
                                "fold": 0 if entry["split"] == "test" else -1}
    (mirror / "1.1.0" / "splits.json").write_text(json.dumps(splits))
    problems = [str(p) for p in check_chain(mirror, ["1.0.0", "1.1.0", "1.2.0"])]
    assert any(p.startswith("version 1.1.0: 1 case(s) of 1.0.0 changed split or fold") and case_id in p
               for p in problems), problems


def test_synth_first_exam_numbers_cohorts_so_they_merge(tmp_path):
    from lymphatlas_synth.cohort import generate_cohort

    b = generate_cohort(tmp_path / "b", n_exams=1, seed=2, first_exam=100)
    assert [t.exam_id for t in b] == ["EX0100"]
    assert sorted(p.name for p in (tmp_path / "b" / "dicom").iterdir()) == ["EX0100"]
    assert sorted(p.name for p in (tmp_path / "b" / "truth").iterdir() if p.suffix == ".json") == [
        "EX0100.json", "cohort.json"]
    with open(tmp_path / "b" / "clinical.csv", newline="") as f:
        assert [r["exam_id"] for r in csv.DictReader(f)] == ["EX0100"]
    proc = _console("builder", "synth", "c", "--exams", "1", "--seed", "3", "--first-exam", "-1", cwd=tmp_path)
    assert proc.returncode == 2 and "first_exam must be 0 or more" in proc.stderr and "Traceback" not in proc.stderr


def test_a_clinical_change_rewrites_case_json_without_the_image_pipeline(synthetic_good_cohort, tmp_path):
    """A subtype corrected in clinical.csv: the case's images are kept as they are (not rewritten), its
    case.json says the new subtype, and both equal a convert from scratch of the corrected source.
    Converted with linear interpolation, the release's card and cases.csv say so."""
    from builder.convert.align import AlignSettings, Interpolation
    from builder.convert.pipeline import ConvertSettings, convert_cohort

    source, _truths = synthetic_good_cohort
    shutil.copytree(source, tmp_path / "source")
    settings = ConvertSettings(align=AlignSettings(register=False, interpolation=Interpolation.LINEAR))
    work = tmp_path / "work"
    convert_cohort(tmp_path / "source", work, settings=settings, workers=1, progress=False, exams=["EX0000"])
    (case_dir,) = [p for p in (work / "cases").iterdir() if not p.name.startswith(".")]
    images = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in case_dir.iterdir() if p.suffix == ".gz"}
    clinical = tmp_path / "source" / "clinical.csv"
    with open(clinical, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["exam_id"] == "EX0000")
    # a corrected subtype (another code of the same diagnosis): the DICOM identity still agrees with the row
    new_subtype = {"HL": ("mixed cellularity", "nodular sclerosis"), "NHL": ("follicular", "DLBCL")}[row["diagnosis"]]
    row["subtype"] = new_subtype[0] if row["subtype"] != new_subtype[0] else new_subtype[1]
    with open(clinical, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    summary = convert_cohort(tmp_path / "source", work, settings=settings, workers=1, progress=False,
                             exams=["EX0000"])
    (result,) = summary.results
    assert (result.status.value, result.stage) == ("converted", "metadata")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in case_dir.iterdir() if p.suffix == ".gz"} == images
    info = json.loads((case_dir / "case.json").read_text())
    assert info["clinical"]["subtype"] == row["subtype"]

    fresh = tmp_path / "fresh"
    (fresh / "private").mkdir(parents=True)
    shutil.copy2(work / "private" / "deid.key", fresh / "private" / "deid.key")
    convert_cohort(tmp_path / "source", fresh, settings=settings, workers=1, progress=False, exams=["EX0000"])
    again = fresh / "cases" / case_dir.name
    assert json.loads((again / "case.json").read_text()) == info
    assert {p.name: p.read_bytes() for p in again.iterdir() if p.suffix == ".gz"} == {k: v[0] for k, v in images.items()}

    build_release(work, tmp_path / "release", version="1.0.0")
    (row,) = _cases_csv(tmp_path / "release").values()
    assert (row["interpolation"], row["settings_sha256"]) == ("linear", settings.sha256())
    assert (row["registration"], row["registration_improved"]) == ("scanner", "False")
    card = (tmp_path / "release" / "README.md").read_text()
    assert "- PET resampling: linear interpolation" in card and "cubic" not in card.split("## Splits")[0]


class _HubRepo:
    """A Hub dataset repo at the network boundary whose tags ``v<version>`` hold the mirror's version folders."""

    def __init__(self, mirror: Path, versions: list[str]) -> None:
        self.mirror, self.versions, self.commits = mirror, versions, []

    def __call__(self, *a, **k):  # stands in for the HfApi class too
        return self

    def list_repo_refs(self, repo_id, **k):
        from types import SimpleNamespace

        return SimpleNamespace(tags=[SimpleNamespace(name=f"v{v}") for v in self.versions])

    def hf_hub_download(self, repo_id, filename, revision, **k):
        assert not filename.startswith("data/"), "the base needs no shard"
        return str(self.mirror / revision.removeprefix("v") / filename)

    def create_repo(self, *a, **k):
        pass

    def list_repo_files(self, *a, **k):
        return []

    def create_commit(self, repo_id, **k):
        from types import SimpleNamespace

        self.commits.append(k["commit_message"])
        return SimpleNamespace(oid="c0ffee")

    def create_tag(self, *a, **k):
        pass


def test_release_repo_id_builds_on_the_hub_repos_newest_tag(year, tmp_path, monkeypatch):
    import huggingface_hub

    root, _ = year
    mirror = root / "mirror"
    shutil.copytree(root / "work", tmp_path / "work", ignore=shutil.ignore_patterns(".lock"))
    repo = _HubRepo(mirror, VERSIONS[:5])  # the repo is at 1.4.0
    monkeypatch.setattr(huggingface_hub, "HfApi", repo)
    summary = build_release(tmp_path / "work", tmp_path / "r", version="1.5.1", repo_id="org/lymphatlas")
    base = json.loads((tmp_path / "r" / "manifest.json").read_text())["base"]
    assert summary.base_version == "1.4.0"
    assert base == {"version": "1.4.0", "manifest_sha256": lineage_hash(json.loads((mirror / "1.4.0" / "manifest.json").read_text()))}
    assert _diff(mirror / "1.4.0", tmp_path / "r")["moved"] == []
    publish_hub(tmp_path / "r", "org/lymphatlas", api=repo)
    assert repo.commits == ["LymphAtlas release 1.5.1"]
    # a repo one version further: the same release is now stale, and refused before any commit
    with pytest.raises(PublishError, match="latest version of org/lymphatlas is 1.5.0") as refused:
        publish_hub(tmp_path / "r", "org/lymphatlas", api=_HubRepo(mirror, VERSIONS[:6]))
    assert "--version 1.5.1 --repo-id org/lymphatlas" in str(refused.value)
    # a repo whose splits.json is not the one its manifest lists: no base to trust, nothing built
    from builder.release.lineage import LineageError

    shutil.copytree(mirror / "1.4.0", tmp_path / "tampered" / "1.4.0")
    splits = tmp_path / "tampered" / "1.4.0" / "splits.json"
    splits.write_text(splits.read_text().replace('"fold": 0', '"fold": 1', 1))
    monkeypatch.setattr(huggingface_hub, "HfApi", _HubRepo(tmp_path / "tampered", ["1.4.0"]))
    with pytest.raises(LineageError, match="splits.json: sha256"):
        build_release(tmp_path / "work", tmp_path / "t", version="1.5.2", repo_id="org/lymphatlas")
    assert not (tmp_path / "t").exists()
    # an empty repo: a first release (WORK never released)
    (tmp_path / "work" / "releases.json").unlink()
    monkeypatch.setattr(huggingface_hub, "HfApi", _HubRepo(mirror, []))
    summary = build_release(tmp_path / "work", tmp_path / "first", version="1.0.0", repo_id="org/new")
    assert summary.base_version is None
    assert json.loads((tmp_path / "first" / "manifest.json").read_text())["base"] is None


def test_a_clinical_change_that_contradicts_the_dicom_is_checked_not_rewritten(synthetic_good_cohort, tmp_path):
    """The metadata-only path still checks the patient: an age 10 years off the DICOM birth date is
    rejected at identity, and no case.json ever says the contradicting age band."""
    from builder.convert.align import AlignSettings
    from builder.convert.pipeline import ConvertSettings, convert_cohort

    source, _truths = synthetic_good_cohort
    shutil.copytree(source, tmp_path / "source")
    settings = ConvertSettings(align=AlignSettings(register=False))
    work = tmp_path / "work"
    convert_cohort(tmp_path / "source", work, settings=settings, workers=1, progress=False, exams=["EX0000"])
    clinical = tmp_path / "source" / "clinical.csv"
    with open(clinical, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["exam_id"] == "EX0000")
    row["age"] = str(int(float(row["age"])) + 10)
    with open(clinical, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (result,) = convert_cohort(tmp_path / "source", work, settings=settings, workers=1, progress=False,
                               exams=["EX0000"]).results
    assert (result.status.value, result.stage) == ("rejected", "identity")
    band = int(row["age"]) // 5 * 5
    for case_json in (work / "cases").glob("*/case.json"):
        assert json.loads(case_json.read_text())["clinical"]["age_band"] != f"{band}-{band + 4}"


def test_a_withdrawal_reason_is_a_code_never_free_text(tmp_path):
    """The CHANGELOG publishes the reason: free text (which could name a patient or a hospital) is refused
    before anything is removed; a code is recorded."""
    work = tmp_path / "work"
    make_fake_work(work, n_patients=2, seed=SEED, shape_zyx=SHAPE)
    before = sorted(p.name for p in (work / "cases").iterdir())
    proc = _console("builder", "withdraw", str(work), before[0], "--reason", "Mr Smith called on 2024-03-02",
                    cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "consent withdrawn" in proc.stderr
    assert sorted(p.name for p in (work / "cases").iterdir()) == before and not (work / "withdrawals.json").exists()
    proc = _console("builder", "withdraw", str(work), before[0], "--reason", "consent withdrawn", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert before[0] not in {p.name for p in (work / "cases").iterdir()}
    from builder.release.changes import read_withdrawals

    assert read_withdrawals(work) == {before[0]: "consent withdrawn"}
