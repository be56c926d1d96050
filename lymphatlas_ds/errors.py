"""One exception family for the whole project; messages say what was expected, what was found, what to do."""

from __future__ import annotations


class LymphAtlasError(Exception):
    """Base class of every error raised on purpose by lymphatlas_ds and builder."""


class SourceError(LymphAtlasError):
    """A release, mirror or Hub repository cannot be found or resolved."""


class IntegrityError(LymphAtlasError):
    """A file does not match the release manifest (size or sha256); re-download or run `lymphatlas verify`."""


class SchemaError(LymphAtlasError):
    """A release or a row does not follow lymphatlas_ds.schema."""


class SelectionError(SchemaError):
    """A fold or subset asked of a release holds no case (a small release has fewer folds)."""


class EvaluationError(LymphAtlasError):
    """Predictions that cannot be evaluated against a release: missing, unknown, off-grid or non-binary."""


class MissingDependencyError(LymphAtlasError, ModuleNotFoundError):
    """An optional package that a feature needs is not installed; the message names what to install.

    A ``ModuleNotFoundError`` too, so ``except ImportError`` around an import keeps working.
    """
