"""Predictions of a model on LymphAtlas items: sliding-window inference over a whole case, and the
prediction written as NIfTI on the case's grid, ready for ``lymphatlas evaluate``.

Items keep arrays in ``[C, Z, Y, X]`` order with an affine for ``(x, y, z)`` indices (see
:mod:`lymphatlas_ds.loader`); a NIfTI file stores ``[x, y, z]``. :func:`save_prediction` does the
transpose and writes the item's affine (sform and qform, code 1), and a label as ``uint8``
(what the release's labels are, and what nnU-Net and ``evaluate`` expect), so the file has the
shape and affine of the release's label for that case.

Example:
    >>> model.eval()  # doctest: +SKIP
    >>> for item in load_lymphatlas("./mirror", fold=0, subset="val"):  # doctest: +SKIP
    ...     label = predict_case(model, item, roi_size=96)             # uint8 [Z, Y, X]
    ...     save_prediction(item, label, "pred/")                      # pred/<case_id>.nii.gz
    >>> # then: lymphatlas evaluate pred --release ./mirror --fold 0 --out report
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphatlas_ds import codec
from lymphatlas_ds._io import write_atomic

NIFTI_ENDINGS = (".nii.gz", ".nii")


def _spatial_shape(item: dict[str, Any]) -> tuple[int, int, int]:
    for key in ("label", "image"):
        if item.get(key) is not None:
            return tuple(int(s) for s in item[key].shape[-3:])  # type: ignore[return-value]
    raise ValueError("the item has neither 'image' nor 'label': pass a LymphAtlas item (load_lymphatlas, hf_torch)")


def _as_label(array: np.ndarray, case_id: str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"case {case_id}: the prediction holds non-integer values (probabilities or logits?); "
                "threshold or argmax it first (predict_case does), or pass label=False to save a float map"
            )
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > 255:
        raise ValueError(f"case {case_id}: label values {lo}..{hi} do not fit uint8 (0..255)")
    return array.astype(np.uint8)


def save_prediction(
    item: dict[str, Any], array: Any, path: str | os.PathLike, *, label: bool = True
) -> Path:
    """Write ``array`` (``[Z, Y, X]`` or ``[1, Z, Y, X]`` in the item's order) as NIfTI on the item's grid.

    ``path`` is a ``.nii.gz`` / ``.nii`` file, or a folder (existing, ending in ``/`` or without a
    suffix; made when missing), where the file is ``<case_id>.nii.gz``, the name ``lymphatlas evaluate`` and nnU-Net look for. A label
    (``label=True``) is stored as ``uint8`` (bool or integer values 0..255; a float array of whole
    numbers is accepted, probabilities are refused); ``label=False`` stores ``float32``. The file is
    written to a temporary name and renamed; the same input gives the same bytes. Returns the path.

    Example:
        >>> save_prediction(item, predict_case(model, item, 96), "pred/")  # doctest: +SKIP
        PosixPath('pred/LA-0000001.nii.gz')
    """
    if "affine" not in item:
        raise ValueError("save_prediction needs the item's 'affine' (a LymphAtlas item from load_lymphatlas or hf_torch)")
    case_id = str(item.get("case_id") or "")
    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    shape = _spatial_shape(item)
    if values.shape != shape:
        raise ValueError(
            f"case {case_id}: prediction of shape {values.shape}, the item is {shape} ([Z, Y, X]); "
            "pass the prediction in the item's axis order (after MONAI/TorchIO, convert back with interop.to_zyx)"
        )
    values = _as_label(values, case_id) if label else values.astype(np.float32)
    as_folder = str(path).endswith(("/", os.sep))
    path = Path(path)
    if as_folder or path.is_dir() or not path.suffix:
        if not case_id:
            raise ValueError("the item has no 'case_id' to name the file: give a file path")
        path = path / f"{case_id}.nii.gz"
    if not path.name.endswith(NIFTI_ENDINGS):
        raise ValueError(f"{path}: a prediction is written as .nii.gz or .nii")
    affine = item["affine"]
    affine = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    # the release's own cell encoding: gzip (deterministic bytes) for .nii.gz, raw for .nii
    level = {} if path.name.endswith(".gz") else {"level": None}
    data = bytes(codec.encode_volume(np.ascontiguousarray(values), np.asarray(affine, dtype=np.float64), path.name,
                                     **level)["bytes"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data)


def _roi(roi_size: int | Sequence[int]) -> tuple[int, int, int]:
    roi = (int(roi_size),) * 3 if isinstance(roi_size, (int, np.integer)) else tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be an int or 3 positive ints (z, y, x), got {roi_size!r}")
    return roi  # type: ignore[return-value]


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's ``dense_patch_slices`` places them (the last one flush with the end)."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = []
    for i in range(int(np.ceil(size / step))):
        start = i * step
        starts.append(min(start, size - roi))
        if start + roi >= size:
            break
    return starts


def sliding_window(
    image: torch.Tensor, roi_size: tuple[int, int, int], predictor: Callable[[torch.Tensor], torch.Tensor], *,
    sw_batch_size: int = 1, overlap: float = 0.25, sw_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Plain sliding-window inference (MONAI's window placement, uniform averaging): ``[B, C, *S] -> [B, K, *S]``.

    The fallback of :func:`predict_case` when MONAI is not installed. A volume smaller than the
    window is zero-padded at its end and the output cropped back.

    Example:
        >>> out = sliding_window(torch.zeros(1, 2, 10, 10, 10), (4, 4, 4), lambda x: x[:, :1])
        >>> tuple(out.shape)
        (1, 1, 10, 10, 10)
    """
    spatial = tuple(int(s) for s in image.shape[2:])
    pad = [max(0, r - s) for r, s in zip(roi_size, spatial)]
    if any(pad):
        image = torch.nn.functional.pad(image, [p for d in reversed(pad) for p in (0, d)])
    full = tuple(int(s) for s in image.shape[2:])
    starts = [_window_starts(s, r, overlap) for s, r in zip(full, roi_size)]
    windows = [tuple(slice(a, a + r) for a, r in zip(corner, roi_size))
               for corner in np.array(np.meshgrid(*starts, indexing="ij")).reshape(3, -1).T.tolist()]
    out = count = None
    for b in range(image.shape[0]):
        for first in range(0, len(windows), sw_batch_size):
            chunk = windows[first:first + sw_batch_size]
            batch = torch.stack([image[b][(slice(None), *w)] for w in chunk])
            if sw_device is not None:
                batch = batch.to(sw_device)
            pred = predictor(batch).to(image.device, torch.float32)
            if out is None:
                out = torch.zeros((image.shape[0], pred.shape[1], *full), dtype=torch.float32, device=image.device)
                count = torch.zeros(full, dtype=torch.float32, device=image.device)
            for w, p in zip(chunk, pred):
                out[b][(slice(None), *w)] += p
                if b == 0:
                    count[w] += 1
    assert out is not None and count is not None
    out /= count
    return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def predict_case(
    model: Callable[[torch.Tensor], torch.Tensor],
    item: dict[str, Any],
    roi_size: int | Sequence[int],
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    device: torch.device | str | None = None,
    output: str = "label",
    use_monai: bool | None = None,
) -> Any:
    """Sliding-window prediction of a whole case: the label (``uint8 [Z, Y, X]``) or the logits.

    ``model`` maps ``[B, C, z, y, x]`` windows of the item's ``image`` (item axis order, the one
    ``load_lymphatlas`` patches have) to ``[B, K, z, y, x]`` logits; ``roi_size`` (an int or
    ``(z, y, x)``) is the window, typically the training patch size. Windows run on ``device``
    (default: where the model's parameters are) while the whole case stays on the CPU. Uses MONAI's
    ``sliding_window_inference`` when MONAI is installed (``use_monai=None``), else
    :func:`sliding_window`; both place and average windows alike. Put the model in ``eval()``
    mode first. ``output="label"``: argmax over K channels (K > 1) or logit > 0 (K = 1), a
    ``uint8`` numpy array for :func:`save_prediction`; ``output="logits"``: float32 ``[K, Z, Y, X]``.

    Example:
        >>> label = predict_case(model.eval(), item, roi_size=(64, 64, 64), sw_batch_size=2)  # doctest: +SKIP
    """
    if output not in ("label", "logits"):
        raise ValueError(f"output must be 'label' or 'logits', got {output!r}")
    roi = _roi(roi_size)
    image = item["image"]
    image = (image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))).float()
    if image.ndim != 4:
        raise ValueError(f"case {item.get('case_id')}: expected an item image [C, Z, Y, X], got shape {tuple(image.shape)}")
    if device is None and isinstance(model, torch.nn.Module):
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else None
    batch = image.unsqueeze(0).cpu()
    if use_monai is None:
        try:
            import monai.inferers  # noqa: F401

            use_monai = True
        except ImportError:
            use_monai = False
    with torch.no_grad():
        if use_monai:
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(batch, roi, sw_batch_size, model, overlap=overlap, mode="constant",
                                              sw_device=device, device="cpu")
            logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        else:
            logits = sliding_window(batch, roi, model, sw_batch_size=sw_batch_size, overlap=overlap, sw_device=device)
    logits = logits[0].float()
    if output == "logits":
        return logits
    if logits.shape[0] == 1:
        return (logits[0] > 0).numpy().astype(np.uint8)
    return logits.argmax(0).numpy().astype(np.uint8)


__all__ = ["predict_case", "save_prediction", "sliding_window"]
