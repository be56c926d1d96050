"""The one guard on a folder a command writes, replaces or deletes: release, publish, materialize.

``check_target(target, command=..., protected={...}, layout=..., replace=...)`` refuses, before
anything is written or deleted, a target that

* is, lies inside or contains a protected folder the caller names (WORK, the DICOM source WORK was
  converted from, the previous release, the release being read), after resolving symlinks: a link
  to WORK is WORK;
* is, lies inside or directly contains a folder of the project that the command does not write
  there (recognised by what it holds, :func:`project_kind`: a WORK folder, a DICOM source, a mirror,
  a release; a mirror's version folders are its own), so a WORK, source or mirror nobody named is
  protected too;
* with ``replace`` (``--overwrite``, ``--force``, a mirror being added to), holds anything the
  command would not have written (``layout``): a de-identification key, an id map, DICOM files,
  unrelated files. The message lists what was found.

The builder and the client call it; it imports nothing from the builder (the client ships alone).

Example:
    >>> check_target("lymphatlas", command="release", protected={"WORK": "work"},
    ...              layout=RELEASE_LAYOUT, own_kind=RELEASE, replace=False)  # doctest: +SKIP
    PosixPath('/data/lymphatlas')
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lymphatlas_ds.errors import LymphAtlasError

WORK = "a WORK folder"
SOURCE = "a DICOM source"
MIRROR = "a mirror"
RELEASE = "a release"

_PRIVATE_NAMES = frozenset({"deid.key", "id_map.csv"})
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
_RELEASE_FILE = re.compile(
    r"README\.md|CHANGELOG\.md|manifest\.json|splits\.json|metadata/[\w.-]+\.(csv|json)"
    r"|data/[a-z]+/[a-z]+-\d+-of-\d+\.parquet"
)
_NNUNET_DIRS = frozenset({"imagesTr", "labelsTr", "imagesTs", "labelsTs"})
_LISTED = 5


class TargetError(LymphAtlasError):
    """A command's target folder overlaps a folder it must not touch, or holds what it does not write."""


@dataclass(frozen=True)
class Layout:
    """What a command writes into its target: ``member(folder, rel)`` says whether a file is one of its own."""

    what: str
    member: Callable[[Path, str], bool]


def _release_member(folder: Path, rel: str) -> bool:
    if _RELEASE_FILE.fullmatch(rel):
        return True
    try:  # a file the release's own manifest lists (a file a newer builder adds)
        return rel in json.loads((folder / "manifest.json").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False


def _mirror_member(folder: Path, rel: str) -> bool:
    parts = rel.split("/")
    if len(parts) == 1:
        return rel in ("versions.json", "README.md")
    return bool(_SEMVER.fullmatch(parts[0])) and _release_member(folder / parts[0], "/".join(parts[1:]))


def _nnunet_member(_folder: Path, rel: str) -> bool:
    parts = rel.split("/")
    if len(parts) == 1:
        return rel in ("dataset.json", "splits_final.json", "lymphatlas_materialize.json")
    return len(parts) == 2 and parts[0] in _NNUNET_DIRS


RELEASE_LAYOUT = Layout("a release folder (README.md, CHANGELOG.md, manifest.json, splits.json, metadata/, data/)",
                        _release_member)
MIRROR_LAYOUT = Layout("a mirror (versions.json, README.md and one release folder per version)", _mirror_member)
NNUNET_LAYOUT = Layout("an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)",
                       _nnunet_member)


def _exists(path: Path, *, folder: bool = False) -> bool:
    try:
        return path.is_dir() if folder else path.is_file()
    except OSError:  # a folder we may not look into: not ours to recognise
        return False


def project_kind(folder: Path) -> str | None:
    """What ``folder`` is by what it holds: :data:`WORK`, :data:`SOURCE`, :data:`MIRROR`, :data:`RELEASE` or None.

    Example:
        >>> project_kind(Path("work"))  # doctest: +SKIP
        'a WORK folder'
    """
    if _exists(folder / "private" / "deid.key") or _exists(folder / "private" / "id_map.csv") or (
        _exists(folder / "cases", folder=True) and (_exists(folder / "build.json") or _exists(folder / "failures.json"))
    ):
        return WORK
    if _exists(folder / "dicom", folder=True) and _exists(folder / "clinical.csv"):
        return SOURCE
    if _exists(folder / "versions.json"):
        return MIRROR
    if _exists(folder / "manifest.json") and _exists(folder / "splits.json"):
        return RELEASE
    return None


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def foreign_files(folder: Path, layout: Layout | None) -> dict[str, list[str]]:
    """The files of ``folder`` that ``layout`` does not write, by kind: private key / id map, DICOM, other.

    Hidden files and folders (locks, ``.git``, ``.cache``) are skipped; with ``layout=None`` only
    private files and DICOM count. Symlinks are listed, never followed.
    """
    found: dict[str, list[str]] = {"private": [], "dicom": [], "other": []}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in links)
        for name in sorted([*filenames, *links]):
            if name.startswith("."):
                continue
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if name in _PRIVATE_NAMES or rel.startswith("private/") or "/private/" in rel:
                found["private"].append(rel)
            elif layout is not None and layout.member(folder, rel) and not path.is_symlink():
                continue
            elif _is_dicom(path):
                found["dicom"].append(rel)
            elif layout is not None:
                found["other"].append(rel)
    return {k: v for k, v in found.items() if v}


def _listing(files: list[str]) -> str:
    more = f" (and {len(files) - _LISTED} more)" if len(files) > _LISTED else ""
    return ", ".join(files[:_LISTED]) + more


_KIND_WORDS = {"private": "a de-identification key or id map", "dicom": "DICOM files", "other": "unrelated files"}


def _overlaps(resolved: Path, protected: Mapping[str, str | os.PathLike | None]) -> tuple[list[str], set[Path]]:
    """How ``resolved`` overlaps each protected folder, and those folders resolved."""
    problems, named = [], set()
    for name, path in protected.items():
        if path is None:
            continue
        other = Path(path).expanduser().resolve()
        named.add(other)
        if resolved == other:
            problems.append(f"it is {name} ({other})")
        elif resolved.is_relative_to(other):
            problems.append(f"it lies inside {name} ({other})")
        elif other.is_relative_to(resolved):
            problems.append(f"it contains {name} ({other})")
    return problems, named


def _contained(resolved: Path, named: set[Path], own_kind: str | None) -> list[str]:
    """The project folders directly inside ``resolved`` (a mirror's version folders are its own)."""
    try:
        children = sorted(p for p in resolved.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # absent, or not a folder: nothing inside
        return []
    problems = []
    for child in children:
        kind = project_kind(child)
        if kind is not None and child.resolve() not in named and not (own_kind == MIRROR and kind == RELEASE):
            problems.append(f"it contains {kind} ({child})")
    return problems


def check_target(
    target: str | os.PathLike,
    *,
    command: str,
    protected: Mapping[str, str | os.PathLike | None],
    layout: Layout | None,
    replace: bool,
    own_kind: str | None = None,
) -> Path:
    """Refuse ``target`` (raise :class:`TargetError`) unless ``command`` may write it; return it resolved.

    ``protected`` maps a description ("WORK", "the previous release") to a folder (None: unknown);
    ``own_kind`` is the :func:`project_kind` the target itself may have (a release replaced by a
    release, a mirror added to); ``replace``: the command deletes or adds to what is there, so it
    must hold only ``layout``'s files (``layout=None``: only no key, id map or DICOM). Nothing is
    written or deleted here.
    """
    resolved = Path(target).expanduser().resolve()
    problems, named = _overlaps(resolved, protected)
    for folder in (resolved, *resolved.parents):
        kind = project_kind(folder)
        if kind is not None and folder not in named and not (folder == resolved and kind == own_kind):
            problems.append(f"it {'is' if folder == resolved else 'lies inside'} {kind} ({folder})")
    problems += _contained(resolved, named, own_kind)
    if replace and not problems and _exists(resolved, folder=True):
        for kind, files in foreign_files(resolved, layout).items():
            problems.append(f"it holds {_KIND_WORDS[kind]}: {_listing(files)}")
    if problems:
        link = f" (that is {resolved})" if Path(target).expanduser().absolute() != resolved else ""
        should = f"; {command} writes {layout.what}" if layout is not None else ""
        raise TargetError(
            f"{command}: refusing the target {target}{link}: {'; '.join(dict.fromkeys(problems))}{should}. Nothing was "
            "written or deleted. Choose a new folder outside WORK, the DICOM source, the previous release and any "
            "mirror (e.g. a sibling of WORK)"
        )
    return resolved


__all__ = ["MIRROR", "MIRROR_LAYOUT", "NNUNET_LAYOUT", "RELEASE", "RELEASE_LAYOUT", "SOURCE", "WORK", "Layout",
           "TargetError", "check_target", "foreign_files", "project_kind"]
