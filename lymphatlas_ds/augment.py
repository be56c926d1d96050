"""Random transforms that draw from (seed, epoch, index), as the patch sampler does.

A random transform given to :func:`lymphatlas_ds.load_lymphatlas` through ``transform=`` draws
its decisions from ``numpy.random.default_rng([seed, epoch, index, AUGMENT_STREAM])``, a stream of
its own next to the patch sampler's ``[seed, epoch, index]``. An item's augmentation therefore
depends only on the seed, the epoch and its index: the same for 0, 1 or N DataLoader workers and
in any order, new in each epoch (``set_epoch``) and for each item, and the same again for the same
seed. Without this a MONAI transform draws from a random state of its own, copied into every
worker (workers 0 and 1 flip alike) and the same in every epoch.

What is seeded, by kind of transform:

- MONAI ``Randomizable`` (``RandFlipd``, ``RandAffined``, a MONAI ``Compose`` of them):
  ``set_random_state(seed=...)`` before each item; hand MONAI ``to_monai`` items (e.g.
  ``monai.transforms.Compose([to_monai, RandFlipd(...), to_zyx])``).
- TorchIO transforms (``RandomAffine``, ``tio.Compose``): the item goes through a
  ``tio.Subject`` (:func:`lymphatlas_ds.interop.to_torchio`) and comes back as an item, its torch
  random state seeded for the call and restored after.
- :class:`lymphatlas_ds.transforms.Compose`: each of its transforms, in turn, by these rules.
- A callable with an ``rng`` keyword: called as ``transform(item, rng=generator)``.
- Any other callable: called with the global torch, numpy and ``random`` states seeded from the
  stream and restored after (the caller's own random state is left as it was).

A lambda that wraps a MONAI transform hides it: pass the transform (or a Compose) itself. The label
keeps its integer dtype (uint8) when a transform returns it as floats holding whole numbers
(TorchIO's and MONAI's resampling with nearest interpolation), so batches collate alike with and
without workers.

Example:
    >>> import numpy as np
    >>> def jitter(item, *, rng):
    ...     return {**item, "shift": int(rng.integers(10))}
    >>> a = apply_seeded(jitter, {"label": np.zeros(1, np.uint8)}, item_rng(seed=0, epoch=0, index=3))
    >>> b = apply_seeded(jitter, {"label": np.zeros(1, np.uint8)}, item_rng(seed=0, epoch=0, index=3))
    >>> a["shift"] == b["shift"]
    True
"""

from __future__ import annotations

import contextlib
import inspect
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

try:
    import torch
except ModuleNotFoundError as e:  # the client's torch extra is not installed: one line that says what to install
    from lymphatlas_ds._optional import missing

    raise missing(e.name or "torch", "lymphatlas_ds.augment") from e

from lymphatlas_ds.transforms import Compose

Item = dict[str, Any]

AUGMENT_STREAM = 1
"""The fourth entry of the seed sequence: augmentation draws apart from the patch sampler's draws."""
_MAX_SEED = 2**32 - 1  # MONAI's and numpy's legacy seeds are 32-bit


def item_rng(*, seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of item ``index`` in epoch ``epoch``.

    Example:
        >>> a, b = item_rng(seed=0, epoch=0, index=0), item_rng(seed=0, epoch=0, index=0)
        >>> int(a.integers(100)) == int(b.integers(100))
        True
    """
    return np.random.default_rng([int(seed), int(epoch), int(index), AUGMENT_STREAM])


def apply_seeded(transform: Callable[..., Any], item: Item, rng: np.random.Generator) -> Item:
    """``transform(item)`` with every random decision drawn from ``rng`` (see the module doc)."""
    out = _apply(transform, item, rng)
    return _keep_label_dtype(item, out)


def _apply(transform: Callable[..., Any], item: Any, rng: np.random.Generator) -> Any:
    if isinstance(transform, Compose):
        for part in transform.transforms:
            item = _apply(part, item, rng)
        return item
    seed = int(rng.integers(_MAX_SEED))
    if _is_monai_randomizable(transform):
        transform.set_random_state(seed=seed)
        return transform(item)
    if _is_torchio(transform):
        with _global_state_seeded(seed):
            return _through_torchio(transform, item)
    if _takes_rng(transform):
        return transform(item, rng=np.random.default_rng(seed))
    with _global_state_seeded(seed):
        return transform(item)


def _is_monai_randomizable(transform: Any) -> bool:
    monai = sys.modules.get("monai.transforms")
    return monai is not None and isinstance(transform, monai.Randomizable)


def _is_torchio(transform: Any) -> bool:
    tio = sys.modules.get("torchio")
    return tio is not None and isinstance(transform, tio.transforms.Transform)


def _takes_rng(transform: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(transform).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    rng = parameters.get("rng")
    return rng is not None and rng.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@contextlib.contextmanager
def _global_state_seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU, numpy's and ``random``'s global states for one call; restore them after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _through_torchio(transform: Callable[..., Any], item: Item) -> Item:
    """Apply a TorchIO transform to an item through a ``Subject`` and return an item on the subject's grid."""
    from lymphatlas_ds.interop import from_torchio, to_torchio

    return {**item, **from_torchio(transform(to_torchio(item)))}


def _keep_label_dtype(before: Item, after: Any) -> Any:
    """Give the label back its integer dtype when a transform made it floats holding whole numbers."""
    if not isinstance(after, dict) or "label" not in after or "label" not in before:
        return after
    old, new = before["label"], after["label"]
    old_dtype = old.dtype if isinstance(old, (torch.Tensor, np.ndarray)) else None
    if isinstance(new, torch.Tensor) and isinstance(old_dtype, torch.dtype) and new.is_floating_point() \
            and not old_dtype.is_floating_point and torch.equal(new, new.round()):
        return {**after, "label": new.to(old_dtype)}
    if isinstance(new, np.ndarray) and isinstance(old_dtype, np.dtype) and new.dtype.kind == "f" \
            and old_dtype.kind in "biu" and np.array_equal(new, np.round(new)):
        return {**after, "label": new.astype(old_dtype)}
    return after


__all__ = ["AUGMENT_STREAM", "apply_seeded", "item_rng"]
