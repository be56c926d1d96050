"""LymphAtlas-DS: the LymphAtlas whole-body FDG PET/CT lymphoma dataset for torch, Hugging Face and nnU-Net.

Example:
    >>> from lymphatlas_ds import load_lymphatlas
    >>> train = load_lymphatlas("lymphatlas", config="nhl", split="train", fold=0, subset="train")  # doctest: +SKIP
    >>> train[0]["image"].shape  # doctest: +SKIP
    torch.Size([2, 300, 512, 512])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lymphatlas_ds import _exit_guard
from lymphatlas_ds.errors import IntegrityError, LymphAtlasError, SchemaError, SourceError
from lymphatlas_ds.schema import CHANNELS, LABELS, Config, Split

if TYPE_CHECKING:
    from lymphatlas_ds.loader import hf_torch, load_lymphatlas
    from lymphatlas_ds.predict import predict_case, save_prediction
    from lymphatlas_ds.reader import Release

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "LABELS",
    "Config",
    "IntegrityError",
    "LymphAtlasError",
    "Release",
    "SchemaError",
    "SourceError",
    "Split",
    "__version__",
    "hf_torch",
    "load_lymphatlas",
    "predict_case",
    "save_prediction",
]

# Imported on first use: `import lymphatlas_ds` (the CLI, the builder) should not pay for torch.
_LAZY = {"load_lymphatlas": "lymphatlas_ds.loader", "hf_torch": "lymphatlas_ds.loader", "Release": "lymphatlas_ds.reader",
         "predict_case": "lymphatlas_ds.predict", "save_prediction": "lymphatlas_ds.predict"}

# Streaming a parquet dataset with `datasets` can abort the interpreter at exit (upstream pyarrow
# bug): importing the package makes the exit wait for pyarrow's reader threads (see _exit_guard).
_exit_guard.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lymphatlas_ds' has no attribute {name!r}")
