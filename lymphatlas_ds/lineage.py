"""The lineage of a release: the published version it was built on, and the checks of a mirror's chain.

Every release's ``manifest.json`` records its base (docs/contracts.md section 4)::

    "base": null                                                   a first release
    "base": {"version": "1.1.0", "manifest_sha256": "<lineage hash of 1.1.0's manifest>"}

The lineage hash of a manifest (:func:`lineage_hash`) is the sha256 of its canonical text with
the ``README.md`` entry left out: the Hub copy of a release rewrites the card's usage lines (and so
that entry), and must keep the identity of the mirror's copy. A manifest written before lineage was
recorded has no ``base`` key (:data:`UNKNOWN`).

:func:`check_chain` checks a local mirror: each version's base is the version published before it,
with that version's lineage hash, and no case the two share moved split or fold.

Example:
    >>> base_of({"base": None}) is None
    True
    >>> base_of({}) is UNKNOWN
    True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_KEY = "base"
CARD_FILE = "README.md"
UNKNOWN = object()
""":func:`base_of` of a manifest written before releases recorded their base."""


def lineage_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical text, its ``README.md`` file entry left out.

    Example:
        >>> m = {"version": "1.0.0", "files": {"README.md": {"sha256": "a", "size": 1}}, "cases": {}}
        >>> lineage_hash(m) == lineage_hash({**m, "files": {"README.md": {"sha256": "b", "size": 2}}})
        True
    """
    files = {k: v for k, v in (manifest.get("files") or {}).items() if k != CARD_FILE}
    text = json.dumps({**manifest, "files": files}, indent=2, sort_keys=True) + "\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def base_record(manifest: dict[str, Any] | None) -> dict[str, str] | None:
    """The ``base`` entry of a release built on ``manifest`` (``None``: a first release)."""
    if manifest is None:
        return None
    return {"version": str(manifest["version"]), "manifest_sha256": lineage_hash(manifest)}


def base_of(manifest: dict[str, Any]) -> dict[str, str] | None | object:
    """The recorded base of a release: a ``{"version", "manifest_sha256"}`` dict, ``None`` for a first
    release, :data:`UNKNOWN` for a manifest without the key (written before lineage was recorded)."""
    if BASE_KEY not in manifest:
        return UNKNOWN
    return manifest[BASE_KEY]


def describe_base(manifest: dict[str, Any]) -> str:
    """``"built on 1.1.0"``, ``"a first release (no base)"`` or ``"of unknown base"`` (for messages)."""
    base = base_of(manifest)
    if base is UNKNOWN:
        return "of unknown base (built before releases recorded their base)"
    if base is None:
        return "a first release (no base)"
    return f"built on {base['version']}"  # type: ignore[index]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ChainProblem:
    """One break of a mirror's lineage: the version and what is wrong."""

    version: str
    problem: str

    def __str__(self) -> str:
        return f"version {self.version}: {self.problem}"


def moved_cases(base_splits: dict[str, Any], splits: dict[str, Any]) -> list[str]:
    """``"<case>: train fold 2 -> test"`` for each case of both splits tables whose split or fold differs."""
    out = []
    for case_id in sorted(set(base_splits) & set(splits)):
        a, b = base_splits[case_id], splits[case_id]
        if (a.get("split"), int(a.get("fold", 0))) != (b.get("split"), int(b.get("fold", 0))):
            out.append(f"{case_id}: {a.get('split')} fold {a.get('fold')} -> {b.get('split')} fold {b.get('fold')}")
    return out


def check_chain(mirror: str | Path, versions: list[str]) -> list[ChainProblem]:
    """The lineage of the mirror's ``versions`` (oldest first): an empty list when it holds.

    Each version after the first must record as its base the version before it, with that
    version's lineage hash; the first must record none. A version of unknown base (an old manifest)
    or with no base after the first is compared with the version before it. In every pair, no
    common case may change split or fold.
    """
    mirror = Path(mirror)
    problems: list[ChainProblem] = []
    manifests: dict[str, dict[str, Any]] = {}
    for i, version in enumerate(versions):
        try:
            manifest = manifests[version] = _read_json(mirror / version / "manifest.json")
        except (OSError, ValueError) as e:
            problems.append(ChainProblem(version, f"its manifest.json cannot be read ({e})"))
            continue
        before = versions[i - 1] if i else None
        problems += _check_base(version, base_of(manifest), before, manifests)
        base = base_of(manifest)
        # Unknown or no base: compare with the version before it (what its users had last).
        compare_to = before if base is UNKNOWN or base is None else base.get("version")  # type: ignore[union-attr]
        if compare_to and compare_to in manifests:
            problems += _check_folds(mirror, version, compare_to)
    return problems


def _check_base(version: str, base: Any, before: str | None, manifests: dict[str, dict[str, Any]]) -> list[ChainProblem]:
    """The recorded base of ``version`` is ``before`` (the version published just before it), hash included."""
    if base is UNKNOWN:
        return []
    if base is None:
        if before is None:
            return []
        return [ChainProblem(version, f"records no base (a first release) but follows {before} in the mirror: "
                                      "it was built without the published lineage, so its splits may differ")]
    wanted = str(base.get("version"))
    if wanted not in manifests:
        return [ChainProblem(version, f"is built on {wanted}, which this mirror does not hold")]
    if lineage_hash(manifests[wanted]) != base.get("manifest_sha256"):
        return [ChainProblem(version, f"is built on a {wanted} whose manifest differs from the mirror's {wanted}")]
    if wanted != before:
        return [ChainProblem(version, f"is built on {wanted}, not on {before}, the version published before it "
                                      f"(the changes of the versions between are not in it)")]
    return []


def _check_folds(mirror: Path, version: str, base: str) -> list[ChainProblem]:
    try:
        before = _read_json(mirror / base / "splits.json")["cases"]
        after = _read_json(mirror / version / "splits.json")["cases"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [ChainProblem(version, f"splits.json of {version} or {base} cannot be read ({e})")]
    moved = moved_cases(before, after)
    if not moved:
        return []
    more = f" (and {len(moved) - 5} more)" if len(moved) > 5 else ""
    return [ChainProblem(version, f"{len(moved)} case(s) of {base} changed split or fold: {'; '.join(moved[:5])}{more}")]


__all__ = ["BASE_KEY", "UNKNOWN", "ChainProblem", "base_of", "base_record", "check_chain", "describe_base",
           "lineage_hash", "moved_cases"]
