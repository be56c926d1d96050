"""The published lineage decides the base of a release: which version an update is built on, and the refusals.

An update release is built on the latest version of the place it is published to (a local mirror
or a Hub repo), never on an older one and never from scratch once that place has versions:

* ``release WORK OUT --version X --mirror M`` builds on M's latest version (found here:
  :func:`resolve_base`); ``--previous P`` still names the base by hand, and is checked: P must be
  the latest version of ``--mirror`` (or of the mirror P lies in);
* WORK remembers the versions released from it (``WORK/releases.json``, :func:`record_release`):
  an update built from it with no base at all is refused;
* a base whose patients share no subject id with WORK is refused (WORK is not the one that built
  that lineage: another key, another site): :func:`check_related`;
* ``publish`` refuses a release whose recorded base is not the target's latest version
  (:func:`check_publish_base`), and a first release into a target that has versions.

Every refusal names the latest version and the command that fixes it.

Example:
    >>> resolve_base(None, None, "work", "1.0.0") is None  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lymphatlas_ds import manifest as manifest_mod
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds.errors import LymphAtlasError
from lymphatlas_ds.lineage import UNKNOWN, base_of, describe_base, lineage_hash

HUB_BASE_MARK = ".hub-base"
"""Marks a base fetched from the Hub without its shards (:func:`fetch_hub_base`): its metadata files are checked."""
HUB_BASE_FILES = ("splits.json", "metadata/cases.csv", "CHANGELOG.md")
RELEASES_NAME = "releases.json"
"""``WORK/releases.json``: the versions released from WORK, oldest first, each with its lineage hash and base."""
VERSIONS_NAME = "versions.json"


class LineageError(LymphAtlasError):
    """A release is not built on (or not published onto) the latest version of its target."""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(version).split("."))


def _fix_release(mirror: str | Path, version: str | None = None, release: str | Path = "RELEASE", *,
                 hub: bool = False) -> str:
    target = f"--repo-id {mirror}" if hub else f"--mirror {mirror}"
    return f"`python -m builder release WORK {release} --version {version or 'X.Y.Z'} {target} --overwrite`"


def next_minor(version: str) -> str:
    """``"1.2.3" -> "1.3.0"``: the version suggested in messages."""
    major, minor, _patch = _version_key(version)
    return f"{major}.{minor + 1}.0"


@dataclass(frozen=True)
class Latest:
    """The latest published version of a mirror: its folder and manifest (``None`` values: no version yet)."""

    version: str | None
    folder: Path | None
    manifest: dict[str, Any] | None


def mirror_latest(mirror: str | Path) -> Latest:
    """The latest version of a local mirror (from ``versions.json``), or an empty :class:`Latest`."""
    mirror = Path(mirror)
    path = mirror / VERSIONS_NAME
    if not path.is_file():
        return Latest(None, None, None)
    try:
        versions = [str(v) for v in json.loads(path.read_text())["versions"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LineageError(f"{path} is not a mirror index ({e}); expected {{'latest': ..., 'versions': [...]}}") from e
    if not versions:
        return Latest(None, None, None)
    latest = max(versions, key=_version_key)
    folder = mirror / latest
    return Latest(latest, folder, manifest_mod.read_manifest(folder))


def _mirror_of(release_folder: Path) -> Path | None:
    """The mirror a version folder lies in (its parent holds versions.json), else None."""
    parent = release_folder.resolve().parent
    return parent if (parent / VERSIONS_NAME).is_file() and not (release_folder / VERSIONS_NAME).is_file() else None


def resolve_base(previous: str | Path | None, mirror: str | Path | None, work: str | Path, version: str, *,
                 repo_id: str | None = None, scratch: Path | None = None) -> Path | None:
    """The folder of the version this release is built on, or ``None`` for a first release.

    ``mirror``: its latest version (``previous``, if given too, must be that version). ``previous``
    alone: that folder (a mirror means its latest); a version folder inside a mirror must be the
    mirror's latest. ``repo_id``: the Hub repo's newest ``vX.Y.Z`` tag, its metadata fetched into
    ``scratch`` (:func:`fetch_hub_base`). None of them: a first release, refused when WORK was
    released before.
    """
    if repo_id is not None:
        if previous is not None or mirror is not None:
            raise LineageError("give one base: --repo-id, --mirror or --previous (the Hub repo's latest is the base)")
        return fetch_hub_base(repo_id, Path(scratch or "."), work=work, version=version)
    if previous is not None and (Path(previous) / VERSIONS_NAME).is_file() and mirror is None:
        mirror, previous = previous, None  # --previous MIRROR: the mirror's latest version
    if previous is not None and mirror is None:
        mirror = _mirror_of(Path(previous))
    if mirror is None:
        if previous is not None:
            return Path(previous)  # a release folder outside any mirror: the maintainer's base
        _refuse_unbased(work, version)
        return None
    latest = mirror_latest(mirror)
    if previous is None:
        return latest.folder
    chosen = manifest_mod.read_manifest(previous)
    if latest.manifest is not None and lineage_hash(chosen) != lineage_hash(latest.manifest):
        raise LineageError(
            f"--previous {previous} is version {chosen['version']}, but the latest version of the mirror {mirror} is "
            f"{latest.version}: an update built on an older version would drop the changes of the versions between "
            f"and may move published cases. Build on the latest: {_fix_release(mirror, version)}"
        )
    return Path(previous)


def newest_tag(tags: set[str] | list[str]) -> str | None:
    """The newest ``vX.Y.Z`` tag, or None when there is none."""
    found = []
    for tag in tags:
        try:
            found.append((_version_key(tag.removeprefix("v")), tag))
        except ValueError:
            continue
    found = [f for f in found if len(f[0]) == 3 and f[1].startswith("v")]
    return max(found)[1] if found else None


def fetch_hub_base(repo_id: str, dest: Path, *, work: str | Path, version: str, api: Any = None) -> Path | None:
    """The newest version of a Hub repo as a base folder: its manifest, splits, cases.csv and CHANGELOG
    (no shard), each checked against the manifest; None when the repo has no version yet."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        tag = newest_tag({t.name for t in api.list_repo_refs(repo_id, repo_type="dataset").tags})
        if tag is None:
            _refuse_unbased(work, version)
            return None
        dest.mkdir(parents=True, exist_ok=True)
        for rel in (manifest_mod.MANIFEST_NAME, *HUB_BASE_FILES):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(api.hf_hub_download(repo_id, rel, repo_type="dataset", revision=tag), dest / rel)
    except (OSError, ValueError) as e:
        raise LineageError(f"cannot read the latest version of the Hub repo {repo_id} ({e}); check the network "
                           "and the token (HF_TOKEN or `hf auth login`)") from e
    except Exception as e:  # huggingface_hub's HTTP errors have no common base with OSError
        raise LineageError(f"cannot read the latest version of the Hub repo {repo_id} ({type(e).__name__}: {e}); "
                           "check the repo id, the network and the token") from e
    manifest = manifest_mod.read_manifest(dest)
    problems = [str(p) for p in manifest_mod.verify_files(dest, {**manifest, "files": {
        k: v for k, v in manifest["files"].items() if k in HUB_BASE_FILES}}) if p.problem != "unlisted"]
    if problems:
        raise LineageError(f"version {manifest['version']} of {repo_id} (tag {tag}) does not match its manifest: "
                           f"{'; '.join(problems)}; the base cannot be trusted")
    (dest / HUB_BASE_MARK).write_text(f"{repo_id} {tag}\n")
    return dest


def _refuse_unbased(work: str | Path, version: str) -> None:
    """Refuse a first release (no base) from a WORK that was released before as another version."""
    released = read_releases(work)
    others = [r["version"] for r in released if r.get("version") != version]
    if others:
        latest = max(others, key=_version_key)
        raise LineageError(
            f"{work} was released before (as {', '.join(sorted(others, key=_version_key))}), but release {version} "
            f"names no base: built from scratch it would re-split every case and move published ones. Build it on "
            f"the published lineage: {_fix_release('MIRROR', version)} (the mirror that holds {latest}), or "
            f"--previous <the latest published release folder>"
        )


def check_related(base_splits: dict[str, Any], subjects: set[str], *, base_version: str, work: str | Path,
                  mirror_hint: str | Path) -> None:
    """Refuse a WORK none of whose patients is in the base release (an unrelated WORK or another key)."""
    base_subjects = {str(e.get("subject_id")) for e in base_splits.values()}
    if base_subjects and not (base_subjects & subjects):
        raise LineageError(
            f"no patient of {work} is in {mirror_hint} version {base_version} ({len(base_subjects)} patients, none of "
            f"the {len(subjects)} subject ids of WORK): WORK is not the one that built this lineage (another "
            "WORK, or a new de-identification key). Release from the WORK folder of this dataset (with its "
            "private/deid.key), or publish this one to a new mirror"
        )


def read_releases(work: str | Path) -> list[dict[str, Any]]:
    """The versions released from WORK (``WORK/releases.json``), oldest first; [] when none."""
    path = Path(work) / RELEASES_NAME
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["releases"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LineageError(f"{path} is not a list of releases ({e}); remove it only if WORK was never released") from e


def record_release(work: str | Path, manifest: dict[str, Any]) -> None:
    """Add (or replace) the release's version in ``WORK/releases.json``."""
    entry = {"version": manifest["version"], "manifest_sha256": lineage_hash(manifest), "base": base_of(manifest)}
    rows = [r for r in read_releases(work) if r.get("version") != manifest["version"]] + [entry]
    rows.sort(key=lambda r: _version_key(r["version"]))
    write_atomic(Path(work) / RELEASES_NAME, json.dumps({"releases": rows}, indent=2, sort_keys=True) + "\n")


def check_publish_base(manifest: dict[str, Any], latest_version: str | None, latest_manifest: dict[str, Any] | None,
                       *, release: str | Path, target: str, hub: bool = False) -> None:
    """Refuse to publish ``manifest`` onto a target whose latest version is not its recorded base."""
    version, base = manifest["version"], base_of(manifest)
    if latest_manifest is None:
        if isinstance(base, dict):
            raise LineageError(
                f"release {release} ({version}) is an update built on {base['version']}, but {target} has no version: "
                f"publish {base['version']} there first, or rebuild {version} as a first release for a new target"
            )
        return
    fix = _fix_release(target, next_minor(str(latest_version)) if _version_key(version) <= _version_key(
        str(latest_version)) else version, release, hub=hub)
    if base is None or base is UNKNOWN:
        raise LineageError(
            f"release {release} ({version}) is {describe_base(manifest)}, but {target} already has versions (latest "
            f"{latest_version}): published as it is, it would re-split the dataset. Rebuild it on {latest_version}: {fix}, "
            "then publish that"
        )
    if base.get("version") != latest_version or base.get("manifest_sha256") != lineage_hash(latest_manifest):
        other = "" if base.get("version") != latest_version else " (another build of it)"
        raise LineageError(
            f"release {release} ({version}) is built on {base.get('version')}{other}, but the latest version of "
            f"{target} is {latest_version}: it would drop the changes published since and may move published cases. "
            f"Rebuild it on {latest_version}: {fix}, then publish that"
        )


__all__ = ["LineageError", "Latest", "check_publish_base", "check_related", "mirror_latest", "next_minor",
           "read_releases", "record_release", "resolve_base"]
