"""Documented intensity presets for LymphAtlas items: a CT window and a PET SUV clip.

The loader returns physical units (CT in Hounsfield units, PET in SUVbw) and never rescales on its
own; these transforms are what to pass as ``transform=`` when a model wants bounded inputs. Each
acts on an item dict (``item["image"]`` is ``[2, Z, Y, X]``, channels in ``schema.CHANNELS``
order), returns it, and works on torch tensors and numpy arrays, so it composes with MONAI
dictionary transforms and plain functions alike.

Example:
    >>> import torch
    >>> item = {"image": torch.tensor([[[[-1000.0, 40.0, 2000.0]]], [[[0.0, 5.0, 40.0]]]])}
    >>> item = Compose([CTWindow.soft_tissue(), PETClip(max_suv=20.0)])(item)
    >>> item["image"][0].flatten().tolist(), item["image"][1].flatten().tolist()
    ([0.0, 0.5, 1.0], [0.0, 0.25, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lymphatlas_ds.schema import CHANNELS

Item = dict[str, Any]

CT_CHANNEL = CHANNELS.index("CT")
PET_CHANNEL = CHANNELS.index("PET")


def _clip(x: Any, low: float, high: float) -> Any:
    # torch.Tensor.clip and numpy.ndarray.clip share this signature.
    return x.clip(low, high)


@dataclass(frozen=True)
class CTWindow:
    """Clip the CT channel to the window ``[level - width/2, level + width/2]`` HU.

    With ``rescale=True`` (default) the window is then mapped linearly to ``[0, 1]``.
    Presets: :meth:`soft_tissue` (level 40, width 400: lymph nodes, the usual choice for lymphoma)
    and :meth:`wide` (level 0, width 2000: bone and lung stay distinguishable).

    Example:
        >>> import numpy as np
        >>> out = CTWindow(level=0, width=200, rescale=False)({"image": np.array([[[[-500.0, 50.0]]], [[[1.0, 1.0]]]])})
        >>> out["image"][0].ravel().tolist()
        [-100.0, 50.0]
    """

    level: float = 40.0
    width: float = 400.0
    rescale: bool = True

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"CT window width must be > 0 HU, got {self.width}")

    @classmethod
    def soft_tissue(cls) -> CTWindow:
        return cls(level=40.0, width=400.0)

    @classmethod
    def wide(cls) -> CTWindow:
        return cls(level=0.0, width=2000.0)

    def __call__(self, item: Item) -> Item:
        image = item["image"]
        low, high = self.level - self.width / 2, self.level + self.width / 2
        ct = _clip(image[CT_CHANNEL], low, high)
        if self.rescale:
            ct = (ct - low) / self.width
        image = image.clone() if hasattr(image, "clone") else image.copy()
        image[CT_CHANNEL] = ct
        return {**item, "image": image}


@dataclass(frozen=True)
class PETClip:
    """Clip the PET channel to ``[0, max_suv]`` SUVbw; with ``rescale=True`` divide by ``max_suv``.

    SUV has no upper bound (bladder, brain, hot lesions reach 30-50); a clip keeps a few hot
    voxels from dominating normalisation. ``max_suv=20`` keeps every lymphoma lesion's contrast
    in the usual range while flattening the bladder.

    Example:
        >>> import numpy as np
        >>> PETClip(max_suv=10.0, rescale=False)({"image": np.array([[[[0.0]]], [[[25.0]]]])})["image"][1].item()
        10.0
    """

    max_suv: float = 20.0
    rescale: bool = True

    def __post_init__(self) -> None:
        if not self.max_suv > 0:
            raise ValueError(f"max_suv must be > 0, got {self.max_suv}")

    def __call__(self, item: Item) -> Item:
        image = item["image"]
        pet = _clip(image[PET_CHANNEL], 0.0, self.max_suv)
        if self.rescale:
            pet = pet / self.max_suv
        image = image.clone() if hasattr(image, "clone") else image.copy()
        image[PET_CHANNEL] = pet
        return {**item, "image": image}


@dataclass(frozen=True)
class Compose:
    """Apply transforms in order (any callables taking and returning an item dict)."""

    transforms: Sequence[Callable[[Item], Item]]

    def __call__(self, item: Item) -> Item:
        for transform in self.transforms:
            item = transform(item)
        return item
