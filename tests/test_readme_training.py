"""The README's end-to-end training example runs as printed, in a user's folder.

The code block under "Training end to end" is taken from README.md exactly and run in a
subprocess from a folder holding ``./mirror`` (a fake release published there): 20 iterations of a
MONAI UNet on ``load_lymphatlas`` patches with ``RandFlipd`` on 2 DataLoader workers, then
sliding-window inference over the fold's validation cases and MONAI's Dice. Checks appended to the
block compare what it computed with the fake cohort's truth: each prediction lies on its case's
grid (shape), the validation cases are the release's fold-0 validation cases, and each case's Dice
equals the Dice of the prediction against the WORK label, computed here with numpy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builder.release.publish import publish_mirror
from tests.support.releases import build_fake_release

REPO = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
HEADING = "### Training end to end"

pytest.importorskip("monai")

CHECKS = """
import json, numpy as np
seen = {}
with torch.no_grad():
    for case in val:
        logits = sliding_window_inference(case["image"][None], roi_size=(32, 32, 32), sw_batch_size=2,
                                          predictor=model, overlap=0.25)
        seen[case["case_id"]] = logits.argmax(dim=1)[0].numpy().astype(np.uint8)
np.savez("predictions.npz", **seen)
json.dump({"iterations": iterations, "num_workers": loader.num_workers,
           "dice": [float(v) for v in dice.get_buffer()[:, 0]], "order": [c for c in val.case_ids],
           "mean": float(dice.aggregate().item()),
           "evaluate_dice": {r["case_id"]: r["dice"] for r in scores.cases}}, open("run.json", "w"))
"""


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(HEADING):]
    return _BLOCK.findall(section)[0]


def test_the_block_is_the_documented_recipe():
    code = readme_block()
    for needle in ("load_lymphatlas(", "RandFlipd", "num_workers=2", "sliding_window_inference", "DiceMetric",
                   "iterations < 20"):
        assert needle in code


@pytest.mark.slow
def test_readme_training_example_runs_and_its_dice_is_the_truths(tmp_path):
    release = build_fake_release(tmp_path, n_patients=6, seed=8, shape_zyx=(24, 36, 40), name="lymphatlas")
    user = tmp_path / "user"
    user.mkdir()
    publish_mirror(release.path, user / "mirror")
    env = {**os.environ, "LYMPHATLAS_CACHE": str(user / ".cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", readme_block() + CHECKS], cwd=user, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((user / "run.json").read_text())
    assert run["iterations"] == 20 and run["num_workers"] == 2
    splits = json.loads((release.path / "splits.json").read_text())["cases"]
    want_val = sorted(c for c, e in splits.items() if e["split"] == "train" and e["fold"] == 0)
    assert sorted(run["order"]) == want_val and len(run["dice"]) == len(want_val)
    predictions = np.load(user / "predictions.npz")
    dices = []
    for case_id, monai_dice in zip(run["order"], run["dice"]):
        truth = release.truth[case_id].label.astype(bool)
        pred = predictions[case_id].astype(bool)
        assert pred.shape == truth.shape  # on the case's grid, [Z, Y, X]
        if not truth.any():
            assert np.isnan(monai_dice)  # MONAI leaves a case without lesion out of the mean
            continue
        dices.append(2 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum()))
        assert monai_dice == pytest.approx(dices[-1], abs=1e-6), case_id
    assert run["mean"] == pytest.approx(np.mean(dices), abs=1e-6)
    # the saved predictions, read back by nibabel and scored by evaluate, are the model's (NIfTI is x, y, z)
    import nibabel as nib

    for case_id in want_val:
        saved = nib.load(str(user / "pred" / f"{case_id}.nii.gz"))
        assert saved.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(saved.dataobj).transpose(2, 1, 0), predictions[case_id])
        truth = release.truth[case_id].label
        pred = predictions[case_id]
        denominator = int(truth.sum() + pred.sum())
        if denominator:
            expected = 2 * int((truth.astype(bool) & pred.astype(bool)).sum()) / denominator
            assert run["evaluate_dice"][case_id] == pytest.approx(expected, abs=1e-9), case_id
    assert f"20 iterations, mean Dice over {len(want_val)} validation cases" in proc.stdout
