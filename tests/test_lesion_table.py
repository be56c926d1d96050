"""The release's lesions and preview configs (issue 22), against the independent generator's truth and
against peers (plain `datasets`, pandas, PIL, the parquet metadata).

The generator (``../shared/phantoms/foreign_cohort.py``, `--size small`) places each lesion as an
ellipsoid at least 12 mm from any other and records, per lesion, its mask voxels on the CT grid, its
volume and its SUVmax on the native PET grid (the highest PET voxel whose centre lies in the moved
lesion). The lesions config must give one row per lesion with those figures: voxels exactly, volume
to the truth's 4 decimals, SUVmax within :data:`SUVMAX_REL_TOL` (the builder reads the PET voxels at
least half covered by the registered mask: a registration residual can swap a border voxel), and the
body region of the site each lesion was planted in.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.releases import build_fake_release, datasets_cache_in_tmp, shared_fake_release  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")

SEED_ENV = "LYMPHATLAS_LESION_SEED"
SUVMAX_REL_TOL = 0.02
"""Documented tolerance of a lesion's SUVmax against the generator's native-grid truth (docs/contracts.md)."""
SITE_REGION = {"neck": "head-neck", "axilla": "thorax", "mediastinum": "thorax", "para-aortic": "abdomen",
               "groin": "pelvis"}
"""The independent generator's lymph-node sites and the body region each lies in."""


@pytest.fixture(scope="module")
def foreign_release(tmp_path_factory) -> dict:
    """Three exams of the independent generator (a seed drawn per run, printed), converted and released
    (about 3 minutes on a loaded 2-core machine: the tests that use it are marked slow; the default run
    checks the lesions config against the project's generator in tests/test_end_to_end.py)."""
    from builder.convert import pipeline
    from builder.release.build import build_release
    from lymphatlas_synth import foreign as foreign_phantoms

    if foreign_phantoms.foreign_script() is None:
        pytest.skip(foreign_phantoms.missing_reason())
    value = os.environ.get(SEED_ENV)
    seed = int(value) if value else random.SystemRandom().randrange(1, 1_000_000)
    print(f"independent generator seed {seed} (replay: {SEED_ENV}={seed})")
    root = tmp_path_factory.mktemp("lesion_table")
    truths = foreign_phantoms.generate(root / "source", root / "truth", seed=seed, size="small", limit=3)
    summary = pipeline.convert_cohort(root / "source", root / "work", workers=2, progress=False)
    assert summary.n_converted == len(truths), (seed, summary.line())
    build_release(root / "work", root / "release", version="1.0.0")
    ids = pipeline.read_id_map(root / "work")
    return {"seed": seed, "release": root / "release", "truths": truths,
            "case_of": {t["exam_id"]: ids[t["exam_id"]]["case_id"] for t in truths}}


def _lesion_rows(release: Path, **kwargs) -> list[dict]:
    import datasets

    splits = json.loads((release / "splits.json").read_text())["cases"]
    rows = []
    for split in sorted({c["split"] for c in splits.values()}):
        rows += datasets.load_dataset(str(release), "lesions", split=split, **kwargs).to_list()
    return rows


@pytest.mark.slow
def test_lesion_table_matches_the_independent_generator_lesion_by_lesion(foreign_release) -> None:
    rows = _lesion_rows(foreign_release["release"])
    seed = foreign_release["seed"]
    checked = 0
    for truth in foreign_release["truths"]:
        case_id = foreign_release["case_of"][truth["exam_id"]]
        mine = [r for r in rows if r["case_id"] == case_id]
        what = f"seed {seed} exam {truth['exam_id']} ({truth['variant']}) case {case_id}"
        assert len(mine) == len(truth["lesions"]), what
        assert sorted(r["lesion_id"] for r in mine) == list(range(1, len(mine) + 1)), what
        assert all(r["diagnosis"] and r["subject_id"] and r["split"] in ("train", "test") for r in mine)
        for les in truth["lesions"]:
            row = min(mine, key=lambda r: np.linalg.norm(np.subtract(r["centroid_lps"], les["center_lps"])))
            where = f"{what} lesion {les['id']} ({les['site']})"
            assert np.linalg.norm(np.subtract(row["centroid_lps"], les["center_lps"])) < min(les["radii_mm"]) / 2, where
            assert row["voxels"] == les["mask_voxels"], where
            assert row["volume_ml"] == pytest.approx(les["mask_volume_ml"], abs=1e-4), where
            assert row["suv_max"] == pytest.approx(les["suvmax_pet_native"], rel=SUVMAX_REL_TOL), where
            assert 0.0 < row["suv_peak"] <= row["suv_max"] + 1e-6, where
            assert row["tlg"] == pytest.approx(row["suv_mean"] * row["volume_ml"], rel=1e-9), where
            assert row["body_region"] == SITE_REGION[les["site"]], where
            lo, hi = np.asarray(row["bbox_min_xyz"]), np.asarray(row["bbox_max_xyz"])
            assert np.all(lo <= hi) and np.prod(hi - lo + 1) >= row["voxels"], where
            checked += 1
        # ids by decreasing size
        by_id = sorted(mine, key=lambda r: r["lesion_id"])
        assert [r["voxels"] for r in by_id] == sorted((r["voxels"] for r in by_id), reverse=True), what
    assert checked >= 6


@pytest.mark.slow
def test_lesions_config_filters_in_plain_datasets(foreign_release) -> None:
    truth_big = sum(les["mask_volume_ml"] > 1.0 for t in foreign_release["truths"] for les in t["lesions"])
    truth_small = sum(les["mask_volume_ml"] <= 1.0 for t in foreign_release["truths"] for les in t["lesions"])
    big = _lesion_rows(foreign_release["release"], filters=[("volume_ml", ">", 1.0)])
    assert len(big) == truth_big and all(r["volume_ml"] > 1.0 for r in big)
    assert len(_lesion_rows(foreign_release["release"])) == truth_big + truth_small


@pytest.mark.slow
def test_instance_map_of_the_work_case_is_the_label_numbered_as_the_table(foreign_release) -> None:
    """instances.nii.gz (convert) against the label and the truth's lesion voxel counts."""
    import nibabel as nib

    work = foreign_release["release"].parent / "work"
    for truth in foreign_release["truths"]:
        folder = work / "cases" / foreign_release["case_of"][truth["exam_id"]]
        instances = np.asarray(nib.load(folder / "instances.nii.gz").dataobj)
        label = np.asarray(nib.load(folder / "label.nii.gz").dataobj)
        assert instances.dtype == np.uint16
        assert np.array_equal(instances > 0, label > 0)
        counts = np.bincount(instances.ravel())[1:]
        assert sorted(counts.tolist(), reverse=True) == counts.tolist()
        assert sorted(counts.tolist()) == sorted(les["mask_voxels"] for les in truth["lesions"])


# --- fast: fake releases -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    # built once per mutation run ($LYMPHATLAS_TEST_SHARED_RELEASES, scripts/mutation.sh's loader part); read-only
    return shared_fake_release(tmp_path_factory, "lesions_fake", n_patients=8, seed=6, shape_zyx=(12, 20, 20))[0]


def test_preview_config_loads_with_plain_datasets_in_a_subprocess_and_its_images_decode(fake, tmp_path) -> None:
    code = (
        "import sys, json, datasets\n"
        "out = {}\n"
        "for split in ('train', 'test'):\n"
        "    ds = datasets.load_dataset(sys.argv[1], 'preview', split=split)\n"
        "    for row in ds:\n"
        "        row['mip'].load(); row['fusion'].load()\n"
        "        out[row['case_id']] = [row['mip'].size, row['fusion'].size, type(row['mip']).__module__, row['diagnosis']]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code, str(fake.path)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen) == set(fake.truth)
    for case_id, (mip, fusion, module, diagnosis) in seen.items():
        assert module.startswith("PIL.") and diagnosis == fake.truth[case_id].diagnosis
        assert mip[1] == fusion[1] > 100  # both panels the preview height


def test_preview_images_show_the_lesions_in_red_where_the_label_projects(fake) -> None:
    """The MIP's red outline pixels (the label's coronal projection) and the fusion's blue ones (the
    largest lesion's axial cut): a case without any lesion has none, a case with lesions has some."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    for rel in sorted((fake.path / "preview").glob("*.parquet")):
        for row in pq.read_table(rel).to_pylist():
            rgb = np.asarray(Image.open(io.BytesIO(row["mip"]["bytes"])).convert("RGB")).astype(int)
            red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
            has_lesion = bool(fake.truth[row["case_id"]].label.any())
            assert bool(red.any()) == has_lesion, row["case_id"]
            # the fusion cuts through the largest lesion: its outline (blue, over the hot PET colours) shows
            fused = np.asarray(Image.open(io.BytesIO(row["fusion"]["bytes"])).convert("RGB")).astype(int)
            blue = (fused[..., 2] > 180) & (fused[..., 0] < 100)
            assert bool(blue.any()) == has_lesion, row["case_id"]


def test_preview_row_groups_stay_under_the_viewer_limit(fake) -> None:
    import pyarrow.parquet as pq

    from builder.release.preview import VIEWER_ROW_GROUP_LIMIT

    files = sorted((fake.path / "preview").glob("*.parquet"))
    assert files
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for i in range(meta.num_row_groups):
            assert meta.row_group(i).total_byte_size < VIEWER_ROW_GROUP_LIMIT
    # one row group per file in every config (no read-ahead left in flight by a stream stopped early)
    for f in sorted(fake.path.glob("*/**/*.parquet")):
        assert pq.ParquetFile(f).metadata.num_row_groups == 1, f.relative_to(fake.path)
    card = (fake.path / "README.md").read_text()
    assert "config_name: preview" in card and "config_name: lesions" in card
    gallery = sorted((fake.path / "preview" / "gallery").glob("*.png"))
    assert gallery and all(f"(preview/gallery/{p.name})" in card for p in gallery)
    manifest = json.loads((fake.path / "manifest.json").read_text())
    assert all(f"preview/gallery/{p.name}" in manifest["files"] for p in gallery)


def test_card_lesion_table_is_computed_from_the_lesion_rows(fake) -> None:
    """pandas on the lesions config's parquet and the case table gives the card's figures."""
    import pandas as pd

    lesions = pd.concat(pd.read_parquet(p) for p in sorted((fake.path / "lesions").glob("*.parquet")))
    cases = pd.read_csv(fake.path / "metadata" / "cases.csv")
    card = (fake.path / "README.md").read_text()
    for group in ["all", *sorted(cases["diagnosis"].unique())]:
        c = cases if group == "all" else cases[cases["diagnosis"] == group]
        les = lesions[lesions["case_id"].isin(c["case_id"])]
        per_case = les.groupby("case_id").size().reindex(c["case_id"], fill_value=0)
        line = (f"| {group} | {len(c)} | {len(les)} | {float(per_case.min())} / {round(float(per_case.median()), 2)} / "
                f"{float(per_case.max())} | {round(les['volume_ml'].min(), 2)} / {round(les['volume_ml'].median(), 2)} / "
                f"{round(les['volume_ml'].max(), 2)} | {round(les['suv_max'].min(), 2)} / "
                f"{round(les['suv_max'].median(), 2)} / {round(les['suv_max'].max(), 2)} |")
        assert line in card, line
        # per case, the lesion rows add up to the main config's figures
        for _, row in c.iterrows():
            mine = lesions[lesions["case_id"] == row["case_id"]]
            assert len(mine) == row["lesion_count"]
            assert mine["volume_ml"].sum() == pytest.approx(row["tmtv_ml"], rel=1e-9)


def _rewrite_lesions(release: Path, change) -> None:
    """Change the lesions config's train file with ``change(table) -> table`` and re-record its sha256."""
    import pyarrow.parquet as pq

    from lymphatlas_ds.manifest import dumps, sha256_file

    rel = "lesions/train-00000-of-00001.parquet"
    path = release / rel
    table = change(pq.read_table(path))
    pq.write_table(table, path)
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (release / "manifest.json").write_text(dumps(manifest))


def test_verify_finds_a_lesion_table_that_disagrees_with_the_main_config(fake, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from lymphatlas_ds.cli import main

    good = tmp_path / "good"
    shutil.copytree(fake.path, good)
    assert main(["verify", str(good), "--content", "--quiet"]) == 0
    # one lesion's volume doubled: TMTV no longer adds up
    bad = tmp_path / "volume"
    shutil.copytree(fake.path, bad)
    _rewrite_lesions(bad, lambda t: t.set_column(t.schema.get_field_index("volume_ml"), "volume_ml",
                                                 pc.multiply(t["volume_ml"], pa.scalar(2.0))))
    assert main(["verify", str(bad), "--quiet"]) == 1
    # one lesion dropped: lesion_count disagrees
    gone = tmp_path / "gone"
    shutil.copytree(fake.path, gone)
    _rewrite_lesions(gone, lambda t: t.slice(1))
    assert main(["verify", str(gone), "--quiet"]) == 1
    # one lesion's voxel count off by one (volume, count and SUVmax kept): only --content (the label's instances) sees it
    off = tmp_path / "voxels"
    shutil.copytree(fake.path, off)
    _rewrite_lesions(off, lambda t: t.set_column(t.schema.get_field_index("voxels"), "voxels",
                                                 pa.array([v + (i == 0) for i, v in enumerate(t["voxels"].to_pylist())],
                                                          pa.int64())))
    assert main(["verify", str(off), "--quiet"]) == 0
    assert main(["verify", str(off), "--content", "--quiet"]) == 1


def test_load_lymphatlas_instances_match_the_lesion_rows(fake, tmp_path) -> None:
    import pyarrow.parquet as pq

    from lymphatlas_ds import load_lymphatlas
    from lymphatlas_ds.interop import to_monai, to_torchio

    rows = pq.read_table(fake.path / "lesions" / "train-00000-of-00001.parquet").to_pylist()
    want: dict[str, dict[int, int]] = {}
    for r in rows:
        want.setdefault(r["case_id"], {})[r["lesion_id"]] = r["voxels"]
    ds = load_lymphatlas(fake.path, split="train", instances=True, cache_dir=tmp_path / "cache", progress=False)
    for i in range(len(ds)):
        item = ds[i]
        ids = item["instances"][0].numpy()
        assert item["instances"].shape == item["label"].shape
        assert np.array_equal(ids > 0, item["label"][0].numpy() > 0)
        have = {int(k): int(v) for k, v in zip(*np.unique(ids[ids > 0], return_counts=True))}
        assert have == want.get(item["case_id"], {}), item["case_id"]
    pytest.importorskip("monai")
    out = to_monai(item)
    assert tuple(out["instances"].shape) == tuple(item["instances"].permute(0, 3, 2, 1).shape)
    pytest.importorskip("torchio")
    subject = to_torchio(item)
    assert subject["instances"].data.shape == out["instances"].shape


def test_patch_items_carry_the_case_instance_ids(fake, tmp_path) -> None:
    from lymphatlas_ds import load_lymphatlas

    # small patches centred on lesion voxels: many hold one lesion that is not the case's largest, whose id a
    # patch labelled on its own would renumber to 1
    ds = load_lymphatlas(fake.path, split="train", instances=True, patch_size=(5, 5, 5), samples_per_case=8,
                         foreground_ratio=1.0, cache_dir=tmp_path / "cache", progress=False)
    whole = load_lymphatlas(fake.path, split="train", instances=True, cache_dir=tmp_path / "cache", progress=False)
    by_case = {whole[i]["case_id"]: whole[i]["instances"][0] for i in range(len(whole))}
    seen_other = False
    for i in range(len(ds)):
        item = ds[i]
        z, y, x = (int(v) for v in item["patch_start"])
        expect = by_case[item["case_id"]][z:z + 5, y:y + 5, x:x + 5]
        got = item["instances"][0][: expect.shape[0], : expect.shape[1], : expect.shape[2]]
        assert np.array_equal(got.numpy(), expect.numpy()) and item["instances"].dtype == expect.dtype
        seen_other |= bool((expect > 1).any() and not (expect == 1).any())
    assert seen_other  # some patch holds only a lesion other than the largest


def test_release_refuses_lesion_items_that_are_not_the_labels_lesions(tmp_path) -> None:
    """A case.json whose items disagree with its label (a lesion's voxel count, or no per-lesion items:
    an older convert) stops the release naming the case; nothing is written."""
    from builder.release.build import ReleaseError, build_release
    from lymphatlas_synth.fake_work import make_fake_work

    cases = make_fake_work(tmp_path / "work", n_patients=2, seed=3, shape_zyx=(10, 14, 14))
    case = next(c for c in cases if c.case_json["lesions"]["count"])
    path = tmp_path / "work" / "cases" / case.case_id / "case.json"
    info = json.loads(path.read_text())
    info["lesions"]["items"][0]["voxels"] += 1
    path.write_text(json.dumps(info))
    with pytest.raises(ReleaseError, match=f"case {case.case_id}: case.json lists"):
        build_release(tmp_path / "work", tmp_path / "release", version="1.0.0")
    assert not (tmp_path / "release").exists()
    info["lesions"]["items"] = []
    path.write_text(json.dumps(info))
    with pytest.raises(ReleaseError, match=f"case {case.case_id}: case.json has no per-lesion items"):
        build_release(tmp_path / "work", tmp_path / "release", version="1.0.0")
