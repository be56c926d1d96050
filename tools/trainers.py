"""nnU-Net trainer variants of this project, and how to find a trainer class by name.

``nnUNetTrainer_LymphAtlasTiny`` exists for the CPU smoke test: nnU-Net's smallest stock trainer
(``nnUNetTrainer_1epoch``) still runs 250 training + 50 validation iterations, about 35 minutes on
two CPU cores for a toy dataset. The tiny one runs 2 epochs of 3 + 1 iterations and predicts its
validation cases without test-time mirroring, so materialize -> plan -> train -> predict -> report
fits in a few minutes. It is a check that the pipeline runs, not a model.

Why a resolver of our own: nnU-Net finds a trainer by *importing every module* under
``nnunetv2/training/nnUNetTrainer`` until one defines the name, and only then looks in
``$nnUNet_extTrainer``. A class defined here is never found that way, and the walk itself fails
where ``timm`` is absent (one architecture imports it). :func:`resolve_trainer` imports only the
modules that can define the classes the baseline uses.

Example:
    >>> resolve_trainer("tiny").__name__
    'nnUNetTrainer_LymphAtlasTiny'
"""

from __future__ import annotations

import importlib

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

TRAINER_MODULES: tuple[str, ...] = (
    "tools.trainers",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs",
)
"""Modules searched, in order, for a trainer given by its bare class name."""

ALIASES = {"tiny": "nnUNetTrainer_LymphAtlasTiny", "paper": "nnUNetTrainer_500epochs"}
"""Short names for the command line. The paper trained each fold for 500 epochs."""


class nnUNetTrainer_LymphAtlasTiny(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming scheme
    """A few iterations of the stock trainer: for CI on CPU, not for results."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
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


def resolve_trainer(name: str) -> type[nnUNetTrainer]:
    """The trainer class for ``name``: an alias, a class in :data:`TRAINER_MODULES`, or ``module:Class``.

    Example:
        >>> resolve_trainer("nnUNetTrainer").__module__
        'nnunetv2.training.nnUNetTrainer.nnUNetTrainer'
    """
    name = ALIASES.get(name, name)
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        candidates = [module_name]
    else:
        class_name, candidates = name, list(TRAINER_MODULES)
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if ":" in name:
                raise ValueError(f"trainer {name!r}: cannot import {module_name} ({e})") from e
            continue
        cls = getattr(module, class_name, None)
        if isinstance(cls, type) and issubclass(cls, nnUNetTrainer):
            return cls
    raise ValueError(
        f"trainer {name!r} not found in {', '.join(candidates)}; give one of {sorted(ALIASES)}, a class there, "
        "or module:Class for a trainer of your own"
    )
