"""Optional dependencies by role, and the one-line error that names what to install.

The roles (pyproject.toml): the core install reads and materializes releases (the ``lymphatlas``
command); the ``torch`` extra adds ``load_lymphatlas`` / ``hf_torch`` / interop; the ``builder``
extra adds the maintainers' pipeline (``lymphatlas-build``) without torch. Reading a release with
plain ``datasets`` needs neither (``pip install datasets nibabel``).

Example:
    >>> print(missing("torch", "load_lymphatlas"))
    load_lymphatlas needs torch, which is not installed here: `pip install torch` (or the client with it: `pip install "lymphatlas_ds-0.1.0-py3-none-any.whl[torch]"`)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lymphatlas_ds.errors import MissingDependencyError

WHEEL = "lymphatlas_ds-{version}-py3-none-any.whl"

BUILDER_MODULES = frozenset({
    "SimpleITK", "pydicom", "highdicom", "pandas", "dask", "distributed", "pylibjpeg", "libjpeg", "openjpeg",
    "rle", "isal", "threadpoolctl", "jinja2",
})
"""Top-level modules of the ``builder`` extra (pyproject.toml): a missing one asks for the extra as a whole."""


def _wheel() -> str:
    from lymphatlas_ds import __version__

    return WHEEL.format(version=__version__)


def missing(module: str, feature: str) -> MissingDependencyError:
    """The error for ``feature`` (what the user called) when ``module`` cannot be imported: one line, what to install."""
    top = module.split(".")[0]
    if top == "torch":
        how = f"`pip install torch` (or the client with it: `pip install \"{_wheel()}[torch]\"`)"
        what = "torch"
    elif top in BUILDER_MODULES:
        how = f"`pip install \"{_wheel()}[builder]\"` (from the wheel) or `pip install \".[builder]\"` (in a clone)"
        what = f"{top}, one of the builder extra's packages"
    else:
        how = f"`pip install {top}`"
        what = top
    return MissingDependencyError(f"{feature} needs {what}, which is not installed here: {how}", name=top)


def require(module: str, feature: str) -> ModuleType:
    """``import module``, or :func:`missing`'s error when it (or a package it needs) is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing(e.name or module, feature) from e
