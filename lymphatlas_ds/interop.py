"""Use LymphAtlas items with MONAI dictionary transforms and TorchIO subjects.

LymphAtlas items keep arrays in ``[C, Z, Y, X]`` order (SimpleITK / numpy order) with an affine
that maps ``(x, y, z)`` voxel indices to RAS millimetres (the NIfTI convention). MONAI and TorchIO
read NIfTI through nibabel and work on ``[C, X, Y, Z]`` tensors with that same affine. So the
only conversion is reversing the spatial axes; the affine is unchanged. :func:`to_xyz` does that
(no MONAI or TorchIO needed) and :func:`to_zyx` undoes it.

Do not hand a raw item to MONAI: its spatial transforms read the first spatial axis as x and
take the geometry from a MetaTensor's affine, which a plain tensor lacks, so ``Spacingd`` on a raw
item silently resamples the wrong axes with a unit voxel size. :func:`to_monai` gives MONAI what
it expects.

MONAI (``pip install monai``)::

    from monai import transforms as mt
    pipeline = mt.Compose([
        mt.Spacingd(keys=("image", "label"), pixdim=(4.0, 4.0, 4.0), mode=("bilinear", "nearest")),
        mt.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
    ])
    out = pipeline(to_monai(item))      # [C, X, Y, Z] MetaTensors with the affine and the case id attached
    # a label on the case's grid (not resampled), as `lymphatlas evaluate` reads it: pred/<case_id>.nii.gz, uint8
    # (SaveImage's default output_dtype is float32; lymphatlas_ds.save_prediction does the same from an item)
    mt.SaveImage(output_dir="pred", output_postfix="", separate_folder=False, output_dtype=np.uint8,
                 resample=False)(to_monai(item)["label"])

For training, give random transforms to ``load_lymphatlas(transform=...)`` rather than calling them
on items yourself: there they draw from (seed, epoch, index), the same for any number of DataLoader
workers (:mod:`lymphatlas_ds.augment`); called by hand, every worker starts from the same MONAI state::

    train = load_lymphatlas(REL, fold=0, subset="train", patch_size=96, seed=0,
                            transform=mt.Compose([to_monai, mt.RandFlipd(keys=("image", "label"), prob=0.5), to_zyx]))

TorchIO (``pip install torchio``)::

    subject = to_torchio(item)          # tio.Subject(ct=, pet=, label=, case_id=, meta=, ...)
    subject = tio.Resample(4.0)(subject)

Back to items: :func:`from_monai` and :func:`from_torchio` give a LymphAtlas item again
(``[C, Z, Y, X]`` plain tensors, the affine and ``spacing_zyx`` of the transformed grid, the
other keys as they were) with the label back in its integer dtype (uint8) when the library made
it floats holding whole numbers (TorchIO's ``RandomAffine`` and MONAI's spatial transforms with
nearest interpolation do): a batch mixing uint8 and float32 labels collates in the main process
but fails in DataLoader workers (``default_collate`` stacks into a shared buffer of the first
item's dtype).

Example:
    >>> import torch
    >>> item = {"image": torch.zeros(2, 3, 4, 5), "label": torch.zeros(1, 3, 4, 5, dtype=torch.uint8), "affine": torch.eye(4)}
    >>> tuple(to_xyz(item)["image"].shape)
    (2, 5, 4, 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import torch
except ModuleNotFoundError as e:  # the client's torch extra is not installed: one line that says what to install
    from lymphatlas_ds._optional import missing

    raise missing(e.name or "torch", "lymphatlas_ds.interop") from e

from lymphatlas_ds.schema import CHANNELS, ITEM_KEYS, LABEL_DTYPE

Item = dict[str, Any]
SPATIAL_KEYS = ("image", "label", "instances")
"""The voxel keys of an item (``instances`` only with ``load_lymphatlas(..., instances=True)``)."""


def _flip_axes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.permute(0, 3, 2, 1)
    return np.asarray(value).transpose(0, 3, 2, 1)


def to_xyz(item: Item, *, keys: tuple[str, ...] = SPATIAL_KEYS) -> Item:
    """A copy of ``item`` with ``keys`` reordered from ``[C, Z, Y, X]`` to ``[C, X, Y, Z]`` (views, no copy of voxels).

    Example:
        >>> to_xyz({"image": np.zeros((2, 3, 4, 5))})["image"].shape
        (2, 5, 4, 3)
    """
    return {k: (_flip_axes(v) if k in keys else v) for k, v in item.items()}


def to_zyx(item: Item, *, keys: tuple[str, ...] = SPATIAL_KEYS) -> Item:
    """The inverse of :func:`to_xyz` (the same axis reversal), e.g. after MONAI or TorchIO transforms.

    Example:
        >>> to_zyx(to_xyz({"image": np.zeros((2, 3, 4, 5))}))["image"].shape
        (2, 3, 4, 5)
    """
    out = {k: (_flip_axes(v) if k in keys else v) for k, v in item.items()}
    for k in keys:  # MONAI MetaTensors: back to plain tensors so the item is a LymphAtlas item again
        if isinstance(out.get(k), torch.Tensor) and type(out[k]) is not torch.Tensor:
            out[k] = out[k].as_tensor() if hasattr(out[k], "as_tensor") else torch.Tensor(out[k])
    return out


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed; install it with `pip install {extra}` (or, in a clone of the project, "
            f"`pip install \".[{extra}]\"`)"
        ) from e


def to_monai(item: Item, *, keys: tuple[str, ...] = SPATIAL_KEYS) -> Item:
    """``item`` for MONAI dictionary transforms: ``keys`` become ``[C, X, Y, Z]`` MetaTensors carrying the affine.

    The RAS affine goes into each MetaTensor's ``affine`` (MONAI's convention for images it loads
    from NIfTI), so MONAI's spatial transforms (``Spacingd``, ``Orientationd``, crops) keep the
    geometry right. The case id goes into the ``filename_or_obj`` metadata, so MONAI's ``SaveImage``
    writes one file per case (``<case_id>.nii.gz`` with ``output_postfix="", separate_folder=False``;
    give ``output_dtype=np.uint8`` for a label, float32 otherwise). Other keys pass through.

    Example:
        >>> out = to_monai(item)  # doctest: +SKIP
        >>> out["image"].affine  # doctest: +SKIP
    """
    monai_data = _require("monai.data", "monai")
    if "affine" not in item:
        raise ValueError("to_monai needs the item's 'affine' (a LymphAtlas item from load_lymphatlas or hf_torch)")
    affine = torch.as_tensor(np.asarray(item["affine"], dtype=np.float64))
    out = to_xyz(item, keys=keys)
    meta = {"filename_or_obj": str(item["case_id"])} if item.get("case_id") is not None else {}
    for k in keys:
        if k in out:
            out[k] = monai_data.MetaTensor(torch.as_tensor(out[k]), affine=affine.clone(), meta=dict(meta))
    return out


_GRID_KEYS = ("image", "label", "affine", "spacing_zyx")  # what the images carry in a Subject / MetaTensor


def _integer_label(label: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``label`` in ``dtype`` again when a library made it floats holding whole numbers in its range."""
    if not label.is_floating_point() or dtype.is_floating_point:
        return label
    info = torch.iinfo(dtype)
    if label.numel() and not (torch.equal(label, label.round()) and info.min <= float(label.min())
                              and float(label.max()) <= info.max):
        return label  # interpolated (a soft label): left as floats on purpose
    return label.to(dtype)


def _grid_keys(affine: np.ndarray) -> Item:
    affine = np.asarray(affine, dtype=np.float64)
    return {"affine": torch.from_numpy(affine.copy()),
            "spacing_zyx": torch.from_numpy(np.linalg.norm(affine[:3, :3], axis=0)[::-1].copy())}


def from_monai(data: Item, *, keys: tuple[str, ...] = SPATIAL_KEYS,
               label_dtype: torch.dtype = getattr(torch, LABEL_DTYPE)) -> Item:
    """A LymphAtlas item from MONAI's ``[C, X, Y, Z]`` dictionary (the inverse of :func:`to_monai`).

    ``keys`` become plain ``[C, Z, Y, X]`` tensors; ``affine`` and ``spacing_zyx`` are the image
    MetaTensor's (the grid after MONAI's spatial transforms); ``label`` gets ``label_dtype`` back
    when it holds whole numbers; a missing ``case_id`` is taken from ``filename_or_obj``; other keys
    pass through.

    Example:
        >>> back = from_monai(to_monai(item))  # doctest: +SKIP
        >>> back["label"].dtype  # doctest: +SKIP
        torch.uint8
    """
    out = to_zyx(dict(data), keys=keys)
    source = next((data[k] for k in keys if hasattr(data.get(k), "affine")), None)
    if source is not None:
        out.update(_grid_keys(torch.as_tensor(source.affine).numpy()))
        if out.get("case_id") is None and getattr(source, "meta", {}).get("filename_or_obj"):
            out["case_id"] = str(source.meta["filename_or_obj"])
    if isinstance(out.get("label"), torch.Tensor):
        out["label"] = _integer_label(out["label"], label_dtype)
    return _in_item_order(out)


def from_torchio(subject: Any, *, label_dtype: torch.dtype = getattr(torch, LABEL_DTYPE)) -> Item:
    """A LymphAtlas item from a ``Subject`` made by :func:`to_torchio` (the inverse, after any TorchIO transform).

    ``image`` is ``[2, Z, Y, X]`` float32 from the ``ct`` and ``pet`` images, ``label`` ``[1, Z, Y, X]``
    in ``label_dtype`` when it holds whole numbers (TorchIO's ``RandomAffine`` returns float32),
    ``affine`` / ``spacing_zyx`` those of the subject's grid; ``case_id``, ``meta`` and the item's
    other keys come back from the subject.

    Example:
        >>> back = from_torchio(tio.RandomAffine()(to_torchio(item)))  # doctest: +SKIP
        >>> back["label"].dtype, back["image"].shape[0]  # doctest: +SKIP
        (torch.uint8, 2)
    """
    images = [subject[name.lower()] for name in CHANNELS]
    label = subject["label"]
    out = {k: v for k, v in dict(subject).items() if k not in (*(n.lower() for n in CHANNELS), "label", "instances")}
    image = torch.cat([torch.as_tensor(im.data) for im in images]).to(torch.float32)
    voxels = {"image": image, "label": _integer_label(torch.as_tensor(label.data), label_dtype)}
    if "instances" in subject:  # the lesion instance map: ids stay integers after interpolation (nearest)
        voxels["instances"] = _integer_label(torch.as_tensor(subject["instances"].data), torch.int32)
    out.update(to_zyx(voxels))
    out.update(_grid_keys(images[0].affine))
    return _in_item_order(out)


def _in_item_order(item: Item) -> Item:
    """``item`` with the keys of ``schema.ITEM_KEYS`` first, in that order, then the others."""
    return {**{k: item[k] for k in ITEM_KEYS if k in item}, **{k: v for k, v in item.items() if k not in ITEM_KEYS}}


def to_torchio(item: Item) -> Any:
    """A TorchIO ``Subject`` with ``ct`` and ``pet`` ``ScalarImage`` and a ``label`` ``LabelMap``, plus the item's other keys
(``instances`` as a second ``LabelMap`` when the item has one).

    ``case_id``, ``meta``, ``patch_start`` and ``foreground_centred`` travel as the subject's
    values, so :func:`from_torchio` gives the whole item back.

    Example:
        >>> subject = to_torchio(item)  # doctest: +SKIP
        >>> subject["ct"].spacing  # doctest: +SKIP
        (2.0, 2.0, 3.0)
    """
    tio = _require("torchio", "torchio")
    affine = np.asarray(item["affine"], dtype=np.float64)
    xyz = to_xyz(item)
    image = torch.as_tensor(xyz["image"])
    channels = {name.lower(): image[i : i + 1] for i, name in enumerate(CHANNELS)}
    extra = {}
    if "instances" in xyz:  # load_lymphatlas(..., instances=True): the lesion instance map, a second LabelMap
        extra["instances"] = tio.LabelMap(tensor=torch.as_tensor(xyz["instances"]).contiguous(), affine=affine)
    return tio.Subject(
        ct=tio.ScalarImage(tensor=channels["ct"].contiguous(), affine=affine),
        pet=tio.ScalarImage(tensor=channels["pet"].contiguous(), affine=affine),
        label=tio.LabelMap(tensor=torch.as_tensor(xyz["label"]).contiguous(), affine=affine),
        case_id=item.get("case_id"),
        meta=item.get("meta", {}),
        **extra,
        **{k: v for k, v in item.items() if k not in (*_GRID_KEYS, "case_id", "meta", "instances")},
    )


to_torchio_subject = to_torchio
"""The earlier name of :func:`to_torchio`."""
