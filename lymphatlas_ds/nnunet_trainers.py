"""The project's nnU-Net v2 trainers, and the one-line module that lets nnU-Net's own commands find them.

``nnUNetv2_train`` and ``nnUNetv2_predict`` find a trainer by name by importing the modules under
``nnunetv2/training/nnUNetTrainer`` one by one: first the modules directly in that folder, then
every subpackage (``primus``, ``variants/...``). A class elsewhere is never found, and where
``timm`` is missing (it needs a torchvision that imports beside the installed torch; PyPI's does
not beside the CPU torch build) the walk into the subpackages ends in ``No module named 'timm'``.
``nnUNet_extTrainer`` is only searched after that walk, so it does not help there.

:func:`install` writes one module, ``nnUNetTrainer_LymphAtlas.py``, into that folder. It
re-exports the trainers below, so nnU-Net's lookup finds them (and the paper's
``nnUNetTrainer_500epochs``) among the top-level modules, before it would reach a module that
needs ``timm``. Any other name nnU-Net asks it for goes to :func:`stock_trainer`, which walks
nnU-Net's trainer folder in nnU-Net's own order but steps over the modules whose third-party
imports are missing here (``primus``: timm), so the stock variants (``-tr nnUNetTrainer_5epochs``,
``nnUNetTrainerDiceCELoss_noSmooth``, ...) are found as well. The module holds two imports, so it
follows this package when it is upgraded; ``python -m lymphatlas_ds.nnunet_trainers --remove`` takes it away.

    python -m lymphatlas_ds.nnunet_trainers          # once per environment (scripts/setup.sh does it)
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainer_500epochs           # the paper's setting
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainer_LymphAtlasTiny -device cpu   # a CI smoke run

``nnUNetTrainer_LymphAtlasTiny`` exists for CPU smoke tests: nnU-Net's smallest stock trainer
(``nnUNetTrainer_1epoch``) still runs 250 training + 50 validation iterations on the planned patch
(160x128x112 on the demo cohort), batch and network. The tiny one runs 2 epochs of 3 + 1 iterations
with batch 1, a patch of at most 64 voxels per axis and the planned U-Net cut to its first 4 stages
(:func:`tiny_configuration`; the cut plans go into the results folder's ``plans.json``, so
``nnUNetv2_predict`` builds the same network), and predicts without test-time mirroring. It checks
that the pipeline runs; it is not a model.

Example:
    >>> from lymphatlas_ds.nnunet_trainers import installed_path  # doctest: +SKIP
    >>> installed_path().name  # doctest: +SKIP
    'nnUNetTrainer_LymphAtlas.py'
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
from collections.abc import Iterator
from copy import deepcopy
from math import prod
from pathlib import Path
from typing import Any

try:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_500epochs
except ModuleNotFoundError as e:  # nnU-Net (or torch) not installed: one line that says what to install
    if e.name and e.name.split(".")[0] not in ("torch", "nnunetv2"):
        raise
    from lymphatlas_ds._optional import missing

    raise missing(e.name, "lymphatlas_ds.nnunet_trainers (nnU-Net's trainers)") from e

__all__ = ["nnUNetTrainer_500epochs", "nnUNetTrainer_LymphAtlasTiny"]

SHIM_NAME = "nnUNetTrainer_LymphAtlas.py"
SHIM_TEXT = (
    '"""Written by `python -m lymphatlas_ds.nnunet_trainers` (LymphAtlas-DS): makes the project\'s trainers\n'
    "visible to nnU-Net's trainer lookup. Remove with `python -m lymphatlas_ds.nnunet_trainers --remove`.\"\"\"\n"
    "try:\n"
    "    from lymphatlas_ds.nnunet_trainers import *  # noqa: F401,F403\n"
    "    from lymphatlas_ds.nnunet_trainers import stock_trainer as __getattr__  # nnU-Net's own variants\n"
    "except ModuleNotFoundError as e:  # lymphatlas-ds uninstalled: stay out of nnU-Net's way\n"
    "    if not (e.name or '').startswith('lymphatlas_ds'):\n"
    "        raise\n"
)


TINY_MAX_PATCH = 64
"""Largest patch edge (voxels) of the tiny trainer."""
TINY_STAGES = 4
"""Resolution stages kept of the planned U-Net (encoder and decoder)."""
TINY_BATCH = 1


def tiny_configuration(configuration: dict[str, Any], *, max_patch: int = TINY_MAX_PATCH,
                       stages: int = TINY_STAGES, batch_size: int = TINY_BATCH) -> dict[str, Any]:
    """A planned nnU-Net configuration (inheritance resolved) made small: batch, patch and U-Net depth.

    The network keeps its first ``stages`` stages (features, kernels, strides, convolutions per
    stage); each patch edge is the planned one capped at ``max_patch`` and rounded down to a
    multiple of the kept strides' product along that axis, as the U-Net needs.

    Example:
        >>> plans = {"patch_size": [160, 128, 112], "batch_size": 2, "architecture": {"arch_kwargs": {
        ...     "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
        ...     "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "kernel_sizes": [[3, 3, 3]] * 6,
        ...     "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5}}}
        >>> tiny = tiny_configuration(plans)
        >>> tiny["patch_size"], tiny["batch_size"], tiny["architecture"]["arch_kwargs"]["features_per_stage"]
        ([64, 64, 64], 1, [32, 64, 128, 256])
    """
    out = deepcopy(configuration)
    arch = out["architecture"]["arch_kwargs"]
    keep = min(int(stages), int(arch["n_stages"]))
    arch["n_stages"] = keep
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if isinstance(arch.get(key), (list, tuple)):
            arch[key] = list(arch[key])[:keep]
    if isinstance(arch.get("n_conv_per_stage_decoder"), (list, tuple)):
        arch["n_conv_per_stage_decoder"] = list(arch["n_conv_per_stage_decoder"])[: keep - 1]
    strides = [s if isinstance(s, (list, tuple)) else [s] * len(out["patch_size"]) for s in arch["strides"]]
    patch = []
    for axis, planned in enumerate(out["patch_size"]):
        step = prod(int(s[axis]) for s in strides)
        patch.append(max(step, min(int(planned), int(max_patch)) // step * step))
    out["patch_size"] = patch
    out["batch_size"] = int(batch_size)
    return out


class nnUNetTrainer_LymphAtlasTiny(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming scheme
    """A few iterations of a small copy of the planned model: for CI on CPU, not for results.

    Batch 1, patch edges of at most 64 voxels, the U-Net's first 4 stages (:func:`tiny_configuration`),
    2 epochs of 3 training + 1 validation iterations, no mirroring.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net reads patch, batch and network from the plans (and saves them as the results folder's
        # plans.json, which nnUNetv2_predict builds the network from): make the configuration small there.
        plans = deepcopy(plans)
        resolved = PlansManager(plans)._internal_resolve_configuration_inheritance(configuration)
        resolved.pop("inherits_from", None)
        plans["configurations"][configuration] = tiny_configuration(resolved)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.save_every = 10**9  # checkpoint_final only

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):  # noqa: N802 - nnU-Net's name
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # no mirroring, in augmentation nor at inference (validation then predicts once per patch, 8x faster)
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    def _do_i_compile(self) -> bool:
        return False


def _trainer_modules(folder: Path, package: str) -> Iterator[str]:
    """The modules under ``folder`` in the order of nnU-Net's lookup: a folder's modules, then its subpackages."""
    entries = list(pkgutil.iter_modules([str(folder)]))
    yield from (f"{package}.{name}" for _, name, is_package in entries if not is_package)
    for _, name, is_package in entries:
        if is_package:
            yield from _trainer_modules(folder / name, f"{package}.{name}")


_SHIM_MODULE = "nnunetv2.training.nnUNetTrainer." + SHIM_NAME.removesuffix(".py")
_walking = False


def stock_trainer(name: str) -> type:
    """nnU-Net's own trainer class ``name``, found as nnU-Net finds it, past modules that cannot import here.

    The module that :func:`install` writes answers nnU-Net's ``hasattr(module, name)`` with this
    function, so ``nnUNetv2_train ... -tr nnUNetTrainer_5epochs`` finds the stock class before the
    walk reaches ``primus`` (which needs timm). A module that fails with a missing third-party
    package is stepped over; any other error is raised. ``AttributeError`` when no module has it.

    Example:
        >>> stock_trainer("nnUNetTrainer_5epochs").__module__  # doctest: +SKIP
        'nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs'
    """
    global _walking
    if name.startswith("__") or _walking:  # import machinery probes (__path__, ...), or a lookup from inside the walk
        raise AttributeError(name)
    skipped = []
    _walking = True
    try:
        for module_name in _trainer_modules(trainer_folder(), "nnunetv2.training.nnUNetTrainer"):
            if module_name == _SHIM_MODULE:
                continue
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] in ("nnunetv2", "lymphatlas_ds"):
                    raise
                skipped.append(f"{module_name} (needs {e.name})")
                continue
            found = getattr(module, name, None)
            if isinstance(found, type):
                return found
    finally:
        _walking = False
    raise AttributeError(f"no nnU-Net trainer {name!r}" + (f"; not searched: {', '.join(skipped)}" if skipped else ""))


def trainer_folder() -> Path:
    """nnU-Net's trainer folder, the one its lookup walks."""
    import nnunetv2.training.nnUNetTrainer as package

    return Path(package.__path__[0])


def installed_path() -> Path:
    return trainer_folder() / SHIM_NAME


def is_installed() -> bool:
    """Whether nnU-Net's lookup will find the project's trainers (the module is there, with this content)."""
    path = installed_path()
    return path.is_file() and path.read_text() == SHIM_TEXT


def install() -> Path:
    """Write the re-exporting module into nnU-Net's trainer folder (atomically; idempotent); return its path."""
    path = installed_path()
    if is_installed():
        return path
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lymphatlas-", suffix=".tmp")
    except OSError as e:
        raise PermissionError(
            f"cannot write into nnU-Net's trainer folder {path.parent} ({e}); run this with the rights of the "
            "environment's owner, or use nnU-Net's Python API through tools/nnunet_run.py instead"
        ) from e
    with os.fdopen(fd, "w") as f:
        f.write(SHIM_TEXT)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def remove() -> bool:
    """Delete the module :func:`install` wrote; ``False`` when there was none."""
    path = installed_path()
    if not path.is_file():
        return False
    path.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lymphatlas_ds.nnunet_trainers",
        description="make the project's nnU-Net trainers visible to nnUNetv2_train / nnUNetv2_predict",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--remove", action="store_true", help="remove the module written by an earlier run")
    group.add_argument("--check", action="store_true", help="exit 1 unless the module is in place")
    args = parser.parse_args(argv)
    if args.check:
        ok = is_installed()
        print(f"{installed_path()}: {'in place' if ok else 'missing; run python -m lymphatlas_ds.nnunet_trainers'}")
        return 0 if ok else 1
    if args.remove:
        print(f"removed {installed_path()}" if remove() else f"nothing to remove at {installed_path()}")
        return 0
    try:
        path = install()
    except PermissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"nnU-Net finds {', '.join(__all__)} through {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
