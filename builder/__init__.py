"""LymphAtlas builder: DICOM export + masks + clinical table -> aligned cases -> versioned releases.

Run from a checkout: ``python -m builder --help``.
"""

from __future__ import annotations

__version__ = "0.1.0"
"""The builder version written into build.json, case.json and the release manifest (defined only here)."""
