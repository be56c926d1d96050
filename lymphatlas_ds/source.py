"""Resolve where a release is: a release folder, a local mirror + version, or a Hugging Face Hub repo id.

Every client entry point (``load_lymphatlas``, ``lymphatlas info / verify / materialize / show``)
takes a ``source`` and calls :func:`resolve_release` to get a local release folder:

- a **release folder** (it has ``manifest.json``) is used as it is; ``version``, if given, must
  match the manifest's;
- a **local mirror** (it has ``versions.json``, one release folder per version, as
  ``python -m builder publish --mirror`` writes it) gives ``DIR/<version>``, the newest by default;
- a **Hub repo id** (``org/name``, not an existing path) is downloaded with
  :func:`huggingface_hub.snapshot_download` (``repo_type="dataset"``, ``revision=f"v{version}"``)
  into the Hub cache. With ``HF_HUB_OFFLINE=1`` (or no network) the cached snapshot of that tag
  is used, so a cluster node without internet works once the login node has downloaded it.

Example:
    >>> resolved = resolve_release("releases/mirror", version="1.0.0")  # doctest: +SKIP
    >>> resolved.path.name, resolved.version, resolved.kind.value  # doctest: +SKIP
    ('1.0.0', '1.0.0', 'mirror')
"""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lymphatlas_ds.errors import SourceError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
VERSIONS_NAME = "versions.json"
REPO_TYPE = "dataset"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class SourceKind(str, enum.Enum):
    """How a source was given."""

    FOLDER = "folder"
    MIRROR = "mirror"
    HUB = "hub"


@dataclass(frozen=True)
class ResolvedRelease:
    """A release found on local disk: its folder, its version and where it came from.

    ``versions`` lists every version the source offers (newest last) when that is known
    (a mirror, or the Hub tags seen online or in the local cache); a plain folder offers its own.
    """

    path: Path
    version: str
    kind: SourceKind
    source: str
    versions: tuple[str, ...] = ()


def version_key(version: str) -> tuple[int, int, int]:
    """Sort key of a semantic version ``X.Y.Z`` (a leading ``v`` is accepted).

    Example:
        >>> sorted(["1.10.0", "1.2.0", "v1.9.1"], key=version_key)
        ['1.2.0', 'v1.9.1', '1.10.0']
    """
    match = _VERSION.match(version.removeprefix("v"))
    if not match:
        raise SourceError(f"version {version!r} is not a semantic version X.Y.Z (e.g. 1.0.0)")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _manifest_version(folder: Path) -> str:
    path = folder / MANIFEST_NAME
    try:
        return str(json.loads(path.read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(
            f"{path} is not a readable LymphAtlas manifest ({e}); re-download the release or run `lymphatlas verify`"
        ) from e


def _read_versions(mirror: Path) -> list[str]:
    path = mirror / VERSIONS_NAME
    try:
        data = json.loads(path.read_text())
        versions = [str(v) for v in data["versions"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{path} is not a valid mirror index ({e}); expected {{'latest': ..., 'versions': [...]}}") from e
    return sorted(versions, key=version_key)


def _resolve_folder(folder: Path, version: str | None, source: str) -> ResolvedRelease:
    found = _manifest_version(folder)
    if version is not None and version_key(version) != version_key(found):
        raise SourceError(
            f"{source} is the release folder of version {found}, not {version}; "
            "pass the mirror folder (the parent holding versions.json) to pick another version"
        )
    return ResolvedRelease(folder, found, SourceKind.FOLDER, source, (found,))


def _resolve_mirror(mirror: Path, version: str | None, source: str) -> ResolvedRelease:
    versions = _read_versions(mirror)
    if not versions:
        raise SourceError(f"mirror {source} lists no versions in {VERSIONS_NAME}; publish a release into it first")
    wanted = versions[-1] if version is None else version.removeprefix("v")
    if wanted not in versions:
        raise SourceError(f"mirror {source} has no version {wanted}; it has {', '.join(versions)}")
    folder = mirror / wanted
    if not (folder / MANIFEST_NAME).is_file():
        raise SourceError(
            f"mirror {source} lists version {wanted} but {folder} has no {MANIFEST_NAME}; "
            "the mirror is incomplete: publish that version again"
        )
    return ResolvedRelease(folder, _manifest_version(folder), SourceKind.MIRROR, source, tuple(versions))


def _hub_cached_versions(repo_id: str, cache_dir: str | Path | None) -> list[str]:
    """Versions whose tag ``vX.Y.Z`` is recorded in the local Hub cache (``refs/``) of ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    refs = root / repo_folder_name(repo_id=repo_id, repo_type=REPO_TYPE) / "refs"
    if not refs.is_dir():
        return []
    tags = (p.name for p in refs.iterdir() if p.is_file())
    return sorted((t[1:] for t in tags if t.startswith("v") and _VERSION.match(t[1:])), key=version_key)


def _hub_versions(repo_id: str, cache_dir: str | Path | None) -> list[str]:
    """Versions of ``repo_id``: its ``vX.Y.Z`` tags online, else those in the local Hub cache."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            refs = HfApi().list_repo_refs(repo_id, repo_type=REPO_TYPE)
            online = [t.name[1:] for t in refs.tags if t.name.startswith("v") and _VERSION.match(t.name[1:])]
            if online:
                return sorted(online, key=version_key)
        except Exception as e:  # noqa: BLE001 - no network, unknown repo...: fall back to the cache
            log.info("could not list the tags of %s on the Hub (%s); using the local Hub cache", repo_id, e)
    return _hub_cached_versions(repo_id, cache_dir)


def _resolve_hub(repo_id: str, version: str | None, cache_dir: str | Path | None) -> ResolvedRelease:
    from huggingface_hub import snapshot_download

    # Listing the tags costs a Hub call: only when the newest version is asked for.
    versions = _hub_versions(repo_id, cache_dir) if version is None else []
    if version is None:
        if not versions:
            raise SourceError(
                f"no version of the Hub dataset {repo_id} is known: no vX.Y.Z tag online or in the local Hub cache; "
                "name a version (`--version X.Y.Z` on the command line, version=\"X.Y.Z\" in Python), "
                "or download it once with network access"
            )
        version = versions[-1]
    version = version.removeprefix("v")
    version_key(version)
    try:
        folder = snapshot_download(repo_id, repo_type=REPO_TYPE, revision=f"v{version}", cache_dir=cache_dir)
    except Exception as e:  # huggingface_hub raises many types (offline, not found, gated...)
        raise SourceError(
            f"cannot get version {version} (tag v{version}) of the Hub dataset {repo_id}: {type(e).__name__}: {e}. "
            "Check the repo id and version; a gated repo needs access granted on its page and a login "
            "(`hf auth login` or HF_TOKEN); offline (HF_HUB_OFFLINE=1) it must already be in the Hub cache"
        ) from e
    path = Path(folder)
    found = _manifest_version(path)
    if version_key(found) != version_key(version):
        raise SourceError(f"tag v{version} of {repo_id} holds a release whose manifest says version {found}")
    versions = sorted(set(versions) | set(_hub_cached_versions(repo_id, cache_dir)) | {found}, key=version_key)
    return ResolvedRelease(path, found, SourceKind.HUB, repo_id, tuple(versions))


def resolve_release(
    source: str | Path, *, version: str | None = None, cache_dir: str | Path | None = None
) -> ResolvedRelease:
    """Find the local release folder for ``source`` (folder, mirror or Hub repo id) and ``version``.

    ``version=None`` means the folder's own version, or the newest of a mirror or Hub repo.
    ``cache_dir`` is the Hub cache (default: huggingface_hub's, ``HF_HUB_CACHE``); it is not used
    for local sources.

    Example:
        >>> resolve_release("lymphatlas").version  # doctest: +SKIP
        '1.0.0'
        >>> resolve_release("org/lymphatlas", version="1.0.0").kind  # doctest: +SKIP
        <SourceKind.HUB: 'hub'>
    """
    if version is not None:
        version = version.removeprefix("v")
        version_key(version)
    text = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _resolve_folder(path, version, text)
        if (path / VERSIONS_NAME).is_file():
            return _resolve_mirror(path, version, text)
        raise SourceError(
            f"{text} is a folder but neither a release ({MANIFEST_NAME}) nor a mirror ({VERSIONS_NAME}); "
            "point to the release folder or to the mirror that holds versions.json"
        )
    if path.exists():
        raise SourceError(f"{text} is a file; a source is a release folder, a mirror folder or a Hub repo id (org/name)")
    if isinstance(source, str) and _REPO_ID.match(source):
        return _resolve_hub(source, version, cache_dir)
    raise SourceError(f"{text} does not exist and is not a Hub repo id of the form org/name")


def list_versions(source: str | Path, *, cache_dir: str | Path | None = None) -> list[str]:
    """Every version a source offers, oldest first (see :class:`ResolvedRelease`).

    Example:
        >>> list_versions("releases/mirror")  # doctest: +SKIP
        ['1.0.0', '1.1.0']
    """
    path = Path(source).expanduser()
    if path.is_dir() and (path / VERSIONS_NAME).is_file() and not (path / MANIFEST_NAME).is_file():
        return _read_versions(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return [_manifest_version(path)]
    if isinstance(source, str) and not path.exists() and _REPO_ID.match(source):
        return _hub_versions(source, cache_dir)
    return list(resolve_release(source, cache_dir=cache_dir).versions)
