"""Prediction helpers (lymphatlas_ds.predict): files on the case's grid, sliding-window inference.

Ground truth: the fake WORK cases the release is built from (arrays and RAS affines), and the
label files the nnU-Net materializer writes for the same cases; MONAI's sliding_window_inference
is the peer of the fallback.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from lymphatlas_ds import load_lymphatlas, predict_case, save_prediction
from lymphatlas_ds.evaluate import evaluate
from lymphatlas_ds.nnunet import materialize_nnunet
from lymphatlas_ds.predict import sliding_window
from lymphatlas_ds.reader import Release
from tests.support.releases import build_fake_release

SPACING_XYZ = (2.0, 2.5, 3.0)
SHAPE_ZYX = (20, 24, 28)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    release = build_fake_release(root, n_patients=4, seed=9, shape_zyx=SHAPE_ZYX, spacing_xyz=SPACING_XYZ)
    items = load_lymphatlas(release.path, split="train", cache_dir=root / "cache")
    return release, items


def test_save_prediction_writes_the_case_grid_as_uint8(built, tmp_path):
    release, items = built
    reader = Release(release.path, remember=False)
    raw = materialize_nnunet(reader, tmp_path / "raw", dataset_id=509, workers=1).dataset_dir
    for index in range(len(items)):
        item = items[index]
        case = release.truth[item["case_id"]]
        path = save_prediction(item, item["label"], tmp_path / "pred/")
        assert path == tmp_path / "pred" / f"{item['case_id']}.nii.gz"
        img = nib.load(path)
        assert img.get_data_dtype() == np.uint8
        assert img.shape == case.label.shape[::-1]
        np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), case.label.transpose(2, 1, 0))
        # the same grid, header and voxels as the label nnU-Net trains on
        peer = nib.load(raw / "labelsTr" / f"{item['case_id']}.nii.gz")
        assert peer.shape == img.shape and peer.get_data_dtype() == img.get_data_dtype()
        np.testing.assert_allclose(img.affine, peer.affine, atol=1e-6)
        assert img.header.get_sform(coded=True)[1] == peer.header.get_sform(coded=True)[1] == 1
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(peer.dataobj))
    # evaluate reads them back as a perfect prediction
    result = evaluate(tmp_path / "pred", reader, split="train")
    assert all(r["dice"] == 1.0 for r in result.cases if r["n_ref"] > 0)


def test_save_prediction_takes_tensors_bools_and_refuses_probabilities(built, tmp_path):
    release, items = built
    item = items[0]
    label = item["label"][0]
    first = save_prediction(item, label.bool(), tmp_path / "a.nii.gz")
    again = save_prediction(item, label.numpy().astype(np.float32), tmp_path / "b.nii.gz")
    assert first.read_bytes() == again.read_bytes()  # same voxels, same bytes (deterministic, uint8 both)
    with pytest.raises(ValueError, match="non-integer"):
        save_prediction(item, label.float() * 0.5, tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match=r"shape \(28, 24, 20\)"):
        save_prediction(item, label.numpy().transpose(2, 1, 0), tmp_path / "d.nii.gz")
    probs = save_prediction(item, label.float() * 0.5, tmp_path / "e.nii.gz", label=False)
    assert nib.load(probs).get_data_dtype() == np.float32
    assert not (tmp_path / "c.nii.gz").exists()


class _PetAbove(torch.nn.Module):
    """Logits of "PET > threshold": a model whose right answer is known voxel for voxel."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 1:2] - self.threshold) * self.scale


def test_predict_case_stitches_windows_into_the_whole_case(built):
    release, items = built
    model = _PetAbove(3.0).eval()
    for index in range(2):
        item = items[index]
        pet = release.truth[item["case_id"]].pet
        want = (pet > 3.0).astype(np.uint8)
        for use_monai in (True, False):
            got = predict_case(model, item, roi_size=(8, 10, 12), overlap=0.5, sw_batch_size=3, use_monai=use_monai)
            assert got.dtype == np.uint8 and got.shape == pet.shape
            np.testing.assert_array_equal(got, want)
        logits = predict_case(model, item, roi_size=16, output="logits", use_monai=False)
        np.testing.assert_allclose(logits[0].numpy(), pet - 3.0, atol=1e-5)


def test_fallback_sliding_window_equals_monai():
    pytest.importorskip("monai", reason="MONAI is not installed")
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).eval()  # a window's border sees zero padding: overlaps differ
    image = torch.randn(1, 2, 13, 17, 11)
    for roi, overlap in (((8, 8, 8), 0.25), ((5, 9, 11), 0.5), ((13, 4, 6), 0.0)):
        with torch.no_grad():
            peer = sliding_window_inference(image, roi, 2, conv, overlap=overlap, mode="constant")
            mine = sliding_window(image, roi, conv, sw_batch_size=2, overlap=overlap)
        np.testing.assert_allclose(mine.numpy(), peer.as_tensor().numpy() if hasattr(peer, "as_tensor") else peer.numpy(),
                                   atol=1e-5)


def test_the_readme_saveimage_recipe_writes_what_evaluate_reads(built, tmp_path):
    pytest.importorskip("monai", reason="MONAI is not installed")
    from monai import transforms as mt

    from lymphatlas_ds.interop import to_monai

    release, items = built
    for index in range(len(items)):
        item = items[index]
        # the README's line, as written there
        mt.SaveImage(output_dir=str(tmp_path / "pred"), output_postfix="", separate_folder=False, output_dtype=np.uint8,
                     resample=False, print_log=False)(to_monai(item)["label"])
        img = nib.load(tmp_path / "pred" / f"{item['case_id']}.nii.gz")
        assert img.get_data_dtype() == np.uint8
    result = evaluate(tmp_path / "pred", Release(release.path, remember=False), split="train")
    assert len(result.cases) == len(items) and all(r["fn"] == r["fp"] == 0 for r in result.cases)


@pytest.mark.slow
def test_a_monai_unet_trains_predicts_and_is_evaluated(built, tmp_path):
    """The README's loop: patches with augmentation on 2 workers, 20 iterations of a small MONAI UNet,
    sliding-window prediction of the validation cases, saved and evaluated."""
    pytest.importorskip("monai", reason="MONAI is not installed")
    from monai import transforms as mt
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from lymphatlas_ds.interop import to_monai, to_zyx

    release, _ = built
    reader = Release(release.path, remember=False)
    fold = next(k for k in range(int(reader.splits["n_folds"])) if reader.fold_case_ids(k, "val"))
    aug = mt.Compose([to_monai, mt.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0), to_zyx])
    train = load_lymphatlas(release.path, fold=fold, subset="train", patch_size=16, seed=0, transform=aug,
                            cache_dir=tmp_path / "cache")
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2, shuffle=False)
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=0)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    iterations = 0
    while iterations < 20:
        train.set_epoch(iterations)
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"].long())
            loss.backward()
            optimizer.step()
            iterations += 1
            if iterations == 20:
                break
    model.eval()
    val = load_lymphatlas(release.path, fold=fold, subset="val", cache_dir=tmp_path / "cache")
    for item in val:
        label = predict_case(model, item, roi_size=16, sw_batch_size=4)
        assert label.shape == tuple(item["label"].shape[1:]) and set(np.unique(label)) <= {0, 1}
        save_prediction(item, label, tmp_path / "pred")
    result = evaluate(tmp_path / "pred", reader, fold=fold)
    assert sorted(r["case_id"] for r in result.cases) == sorted(reader.fold_case_ids(fold, "val"))
    for row in result.cases:  # the figures are consistent with the files, whatever the model learned
        truth = release.truth[row["case_id"]].label
        assert row["n_ref"] == truth.sum() and row["tp"] + row["fn"] == row["n_ref"]


def test_an_nnunet_output_folder_is_evaluated_as_it_is(built, tmp_path):
    """nnU-Net's writer (SimpleITK) on the materialized grid, plus the JSON files nnU-Net leaves beside them."""
    pytest.importorskip("nnunetv2", reason="nnU-Net is not installed")
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    release, _ = built
    reader = Release(release.path, remember=False)
    raw = materialize_nnunet(reader, tmp_path / "raw", dataset_id=508, workers=1).dataset_dir
    out = tmp_path / "fold_0" / "validation"
    out.mkdir(parents=True)
    io = SimpleITKIO()
    for label_file in sorted((raw / "labelsTr").glob("*.nii.gz")):
        seg, properties = io.read_seg(str(label_file))
        io.write_seg(seg[0].astype(np.uint8), str(out / label_file.name), properties)
    for name in ("summary.json", "dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        (out / name).write_text("{}")
    result = evaluate(out, reader, split="train")
    assert len(result.cases) == len(reader.case_ids("all", "train"))
    assert all(r["fn"] == r["fp"] == 0 and r["detection_sensitivity"] == 1.0 for r in result.cases if r["n_ref"] > 0)


@pytest.mark.gpu
def test_predict_case_runs_windows_on_the_gpu_and_gives_the_cpu_result(built):
    release, items = built
    item = items[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    cpu = predict_case(model, item, roi_size=(8, 12, 12), output="logits", use_monai=False)
    for use_monai in (False, True):
        gpu = predict_case(model.to("cuda"), item, roi_size=(8, 12, 12), output="logits", use_monai=use_monai)
        assert gpu.device.type == "cpu"  # the whole case stays on the CPU; windows ran on the model's device
        np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), atol=1e-4)
        model = model.to("cpu")
