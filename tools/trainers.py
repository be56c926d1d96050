"""Find an nnU-Net trainer class by name for the baseline tools (the classes live in lymphatlas_ds.nnunet_trainers).

``nnUNetTrainer_LymphAtlasTiny`` is the CPU smoke-test trainer (2 epochs of 3 + 1 iterations);
``paper`` is ``nnUNetTrainer_500epochs``, the paper's 500 epochs per fold. nnU-Net's own commands
find both once ``python -m lymphatlas_ds.nnunet_trainers`` has run (see that module).
:func:`resolve_trainer` imports only the modules that can define the classes the baseline uses,
so the Python API in :mod:`tools.nnunet_run` works without that step too.

Example:
    >>> resolve_trainer("tiny").__name__
    'nnUNetTrainer_LymphAtlasTiny'
"""

from __future__ import annotations

import importlib

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lymphatlas_ds.nnunet_trainers import nnUNetTrainer_500epochs, nnUNetTrainer_LymphAtlasTiny

__all__ = ["ALIASES", "TRAINER_MODULES", "nnUNetTrainer_500epochs", "nnUNetTrainer_LymphAtlasTiny", "resolve_trainer"]

TRAINER_MODULES: tuple[str, ...] = (
    "lymphatlas_ds.nnunet_trainers",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs",
)
"""Modules searched, in order, for a trainer given by its bare class name."""

ALIASES = {"tiny": "nnUNetTrainer_LymphAtlasTiny", "paper": "nnUNetTrainer_500epochs"}
"""Short names for the command line. The paper trained each fold for 500 epochs."""


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
