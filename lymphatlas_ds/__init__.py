"""LymphAtlas-DS: the LymphAtlas whole-body FDG PET/CT lymphoma dataset for torch, Hugging Face and nnU-Net."""

from __future__ import annotations

from lymphatlas_ds.errors import IntegrityError, LymphAtlasError, SchemaError, SourceError
from lymphatlas_ds.schema import CHANNELS, LABELS, Config, Split

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "LABELS",
    "Config",
    "IntegrityError",
    "LymphAtlasError",
    "SchemaError",
    "SourceError",
    "Split",
    "__version__",
]
