"""Publish a release folder: to a local mirror (every version side by side) and to the Hugging Face Hub.

Local mirror::

    MIRROR/versions.json        {"latest": "1.1.0", "versions": ["1.0.0", "1.1.0"]}
    MIRROR/README.md            card whose configs read MIRROR/1.1.0/data/... only (the newest version)
    MIRROR/1.0.0/...            a complete release folder, loadable with load_dataset(MIRROR/1.0.0, ...)
    MIRROR/1.1.0/...

Plain ``datasets`` ignores ``revision=`` on a local folder, so each version is its own folder;
``load_dataset(MIRROR, "nhl")`` reads the newest version through the root card (without it,
``datasets`` would merge every version's shards into one split).
A published version is never modified: publishing the same version again is a no-op when its
manifest is identical and an error otherwise. The release is verified against its manifest,
copied to a hidden temporary folder in the mirror, verified again and renamed into place; then
``versions.json`` is replaced atomically. An interrupted publish leaves the previous state.

Hub: one commit with every release file (and deletions of release files of the previous version
that this one no longer has, e.g. renumbered shards), then the tag ``v<version>``; the README.md
of the release is the dataset card, its usage lines rewritten for the repo id and the tag
(:func:`builder.release.card.hub_readme`) and the committed manifest.json listing that README's hash. ``dry_run`` returns (and the CLI prints) the planned
operations without contacting the Hub.

Example:
    >>> publish_mirror("lymphatlas", "mirror")  # doctest: +SKIP
    PosixPath('mirror/1.0.0')
    >>> plan = publish_hub("lymphatlas", "org/lymphatlas", dry_run=True)  # doctest: +SKIP
    >>> plan.tag  # doctest: +SKIP
    'v1.0.0'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError

from lymphatlas_ds import manifest as manifest_mod
from lymphatlas_ds import schema
from lymphatlas_ds._io import write_atomic
from lymphatlas_ds._lock import LOCK_NAME, folder_lock
from lymphatlas_ds._target import MIRROR, MIRROR_LAYOUT, check_target
from lymphatlas_ds.errors import LymphAtlasError

from builder.release import card, client_wheel, lineage
from builder.release.build import parse_version

log = logging.getLogger(__name__)

try:  # the HTTP client of the installed huggingface_hub: its transport errors are not OSErrors
    from huggingface_hub.utils._http import httpx2 as _http_client  # type: ignore[attr-defined]

    _HTTP_CLIENT_ERROR: type[Exception] = _http_client.HTTPError
except ImportError:  # older huggingface_hub (requests): connection errors are OSErrors
    _HTTP_CLIENT_ERROR = OSError

VERSIONS_NAME = "versions.json"
MIRROR_CARD_NAME = "README.md"
CARD_NAME = "README.md"
RELEASE_TOP_FILES = ("README.md", "CHANGELOG.md", "manifest.json", "splits.json")
RELEASE_DIRS = ("data/", "metadata/", f"{schema.LESIONS_CONFIG}/", f"{schema.PREVIEW_CONFIG}/",
                f"{client_wheel.WHEELS_FOLDER}/")
"""Folders of a Hub repo that belong to a release; files there that a new version lacks are deleted (a
commit only adds to the tree: an older version's lesions or preview shard would stay in its config's glob,
and its client wheel beside the one the card names)."""


class PublishError(LymphAtlasError):
    """A release cannot be published: it does not verify, or the version is already published differently."""


def _ignore_hidden(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(".")]


def read_versions(mirror: str | Path) -> dict[str, Any]:
    """``MIRROR/versions.json``, or an empty listing for a new mirror."""
    path = Path(mirror) / VERSIONS_NAME
    if not path.exists():
        return {"latest": None, "versions": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PublishError(f"{path} is not valid JSON ({e}); rebuild it from the version folders") from e


def publish_mirror(release: str | Path, mirror: str | Path, *, wait_for_lock: bool = False) -> Path:
    """Add ``release`` to the local mirror as ``MIRROR/<version>/``; returns that folder.

    One publish at a time per mirror (``MIRROR/.lock``; another is refused, or waited for with
    ``wait_for_lock``). A write error (a full disk) raises :class:`PublishError` naming the path;
    the versions already in the mirror and ``versions.json`` are then as they were.

    Example:
        >>> publish_mirror("lymphatlas", "mirror")  # doctest: +SKIP
        PosixPath('mirror/1.0.0')
    """
    release, mirror = Path(release), Path(mirror)
    same = already_published(release, mirror)
    if same is None or release.resolve() != (mirror / same).resolve():
        guard_mirror(release, mirror)  # a mirror's own version published again is a no-op, checked, not refused
    try:
        return _publish_mirror(release, mirror, wait_for_lock)
    except OSError as e:
        where, why = e.filename or mirror, e.strerror or str(e)
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
            _src, where, why = e.args[0][0]  # copytree gathers (source, target, error) per file: name the first
        raise PublishError(
            f"cannot publish {release} to the mirror {mirror} ({where}): {why}; the "
            "published versions and versions.json are as they were: free space on that disk (or fix the "
            "permissions) and run again"
        ) from e


def guard_mirror(release: str | Path, mirror: str | Path) -> None:
    """Refuse, before anything is written, a mirror that is, contains or lies inside the release, a WORK
    folder, a DICOM source or another release, or an existing folder that is not a mirror
    (:func:`lymphatlas_ds._target.check_target`)."""
    check_target(mirror, command="publish", layout=MIRROR_LAYOUT, own_kind=MIRROR, replace=True,
                 protected={"the release being published": release})


def _publish_mirror(release: Path, mirror: Path, wait_for_lock: bool) -> Path:
    try:
        manifest = manifest_mod.verify_release(release)
    except LymphAtlasError as e:
        raise PublishError(f"release {release} cannot be published: {e}") from e
    version = manifest["version"]
    parse_version(version)
    mirror.mkdir(parents=True, exist_ok=True)
    with folder_lock(mirror / LOCK_NAME, what=f"mirror {mirror}", wait=wait_for_lock):
        target = mirror / version
        if target.exists():
            published = manifest_mod.read_manifest(target)
            if published != manifest:
                raise PublishError(
                    f"version {version} is already published in {mirror} with other content; a published version "
                    "never changes: build the release with a new --version"
                )
            log.warning("version %s is already in %s with the same manifest: nothing to copy, nothing changed",
                        version, mirror)
        else:
            _check_mirror_base(manifest, release, mirror)
            staging = mirror / f".{version}.partial"
            if staging.exists():
                shutil.rmtree(staging)  # left by an interrupted publish
            try:
                shutil.copytree(release, staging, ignore=_ignore_hidden, copy_function=shutil.copy2)
                problems = manifest_mod.verify_files(staging, manifest)
                if problems:
                    raise PublishError(f"copy of {release} to {staging} does not verify: {'; '.join(map(str, problems))}")
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        listing = read_versions(mirror)
        versions = sorted({*listing.get("versions", []), version}, key=parse_version)
        versions = [v for v in versions if (mirror / v / manifest_mod.MANIFEST_NAME).is_file()]
        versions_doc = {"latest": versions[-1], "versions": versions}
        versions_text = json.dumps(versions_doc, indent=2) + "\n"
        versions_path = mirror / VERSIONS_NAME
        if not versions_path.is_file() or versions_path.read_text() != versions_text:  # a no-op publish writes nothing
            write_atomic(versions_path, versions_text, fsync=True)
        root_card = card.mirror_readme(mirror, versions)
        card_path = mirror / MIRROR_CARD_NAME
        if not card_path.is_file() or card_path.read_text(encoding="utf-8") != root_card:
            write_atomic(card_path, root_card, fsync=True)
        log.debug("published %s to %s", version, target)
    return target


def _check_mirror_base(manifest: dict[str, Any], release: Path, mirror: Path) -> None:
    """Refuse a release whose recorded base is not the mirror's latest version (:mod:`builder.release.lineage`)."""
    try:
        latest = lineage.mirror_latest(mirror)
        lineage.check_publish_base(manifest, latest.version, latest.manifest, release=release, target=str(mirror))
    except LymphAtlasError as e:
        raise PublishError(f"{e}; {mirror} is unchanged") from e


def already_published(release: str | Path, mirror: str | Path) -> str | None:
    """The version of ``release`` when the mirror holds it already with the same manifest (a no-op publish), else None."""
    try:
        manifest = manifest_mod.read_manifest(release)
        target = Path(mirror) / str(manifest["version"])
        if (target / manifest_mod.MANIFEST_NAME).is_file() and manifest_mod.read_manifest(target) == manifest:
            return str(manifest["version"])
    except LymphAtlasError:
        return None  # publish_mirror reports it
    return None


def _hub_latest_manifest(api: HfApi, repo_id: str, tags: set[str]) -> tuple[str | None, dict[str, Any] | None]:
    """The newest ``v<X.Y.Z>`` tag of the repo and the manifest.json committed under it."""
    tag = lineage.newest_tag(tags)
    if tag is None:
        return None, None
    try:
        path = api.hf_hub_download(repo_id, manifest_mod.MANIFEST_NAME, repo_type="dataset", revision=tag)
        return tag.removeprefix("v"), json.loads(Path(path).read_text())
    except (OSError, ValueError, HfHubHTTPError, _HTTP_CLIENT_ERROR) as e:
        raise PublishError(f"cannot read {manifest_mod.MANIFEST_NAME} of {repo_id} at tag {tag} ({e}): the base of "
                           "this release cannot be checked against the repo's latest version; nothing was sent") from e


@dataclass
class HubPlan:
    """What a Hub publish does: one commit of ``operations`` on ``repo_id``, then the tag."""

    repo_id: str
    version: str
    tag: str
    commit_message: str
    operations: list[CommitOperationAdd | CommitOperationDelete] = field(default_factory=list)
    commit_oid: str | None = None

    def describe(self) -> str:
        """Human-readable listing of the planned operations (what ``--dry-run`` prints)."""
        lines = [f"repo {self.repo_id} (dataset): commit {self.commit_message!r}, then tag {self.tag}"]
        for op in self.operations:
            if isinstance(op, CommitOperationAdd):
                lines.append(f"  add    {op.path_in_repo} ({op.upload_info.size} bytes, sha256 {op.upload_info.sha256.hex()})")
            else:
                lines.append(f"  delete {op.path_in_repo}")
        return "\n".join(lines)


def _hub_card_and_manifest(release: Path, manifest: dict[str, Any], repo_id: str) -> dict[str, bytes]:
    """README.md naming ``repo_id`` and the tag, and the manifest.json that lists that README's hash."""
    local = (release / CARD_NAME).read_text(encoding="utf-8")
    try:
        readme = card.hub_readme(local, repo_id=repo_id, version=manifest["version"]).encode("utf-8")
    except ValueError as e:
        raise PublishError(f"{release / CARD_NAME}: {e}") from e
    files = dict(manifest["files"])
    files[CARD_NAME] = {"sha256": hashlib.sha256(readme).hexdigest(), "size": len(readme)}
    hub_manifest = {**manifest, "files": files}
    return {CARD_NAME: readme, manifest_mod.MANIFEST_NAME: manifest_mod.dumps(hub_manifest).encode("utf-8")}


def plan_hub_operations(release: str | Path, repo_id: str, *, existing_files: Iterable[str] = ()) -> HubPlan:
    """Plan the commit that makes ``repo_id`` hold exactly this release's files.

    ``existing_files`` are the repo's current files: release files of an older version that this
    one lacks are deleted (other files, such as ``.gitattributes``, are left alone).
    """
    release = Path(release)
    manifest = manifest_mod.verify_release(release)
    version = manifest["version"]
    files = sorted([*manifest["files"], manifest_mod.MANIFEST_NAME])
    contents = _hub_card_and_manifest(release, manifest, repo_id)
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=contents.get(rel, str(release / rel))) for rel in files
    ]
    wanted = set(files)
    for rel in sorted(existing_files):
        if rel not in wanted and (rel in RELEASE_TOP_FILES or rel.startswith(RELEASE_DIRS)):
            operations.append(CommitOperationDelete(path_in_repo=rel))
    return HubPlan(repo_id, version, f"v{version}", f"LymphAtlas release {version}", operations)


def publish_hub(
    release: str | Path,
    repo_id: str,
    *,
    dry_run: bool = False,
    api: HfApi | None = None,
    private: bool = True,
) -> HubPlan:
    """Commit the release to the Hub dataset repo ``repo_id`` and tag it ``v<version>``.

    Refuses when the tag exists already (a published version never changes). With ``dry_run``
    nothing is sent: the returned plan lists the files to add (deletions of stale release files
    are only known once the repo can be listed). Authentication is huggingface_hub's (``HF_TOKEN``
    or ``hf auth login``).

    Example:
        >>> print(publish_hub("lymphatlas", "org/lymphatlas", dry_run=True).describe())  # doctest: +SKIP
    """
    if dry_run:
        return plan_hub_operations(release, repo_id)
    api = api or HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
        existing = api.list_repo_files(repo_id, repo_type="dataset")
        tags = {ref.name for ref in api.list_repo_refs(repo_id, repo_type="dataset").tags}
    except (OSError, HfHubHTTPError, _HTTP_CLIENT_ERROR) as e:
        raise PublishError(
            f"cannot reach or create the Hub dataset repo {repo_id} ({e}); check the network and the token "
            "(HF_TOKEN or `hf auth login`); --dry-run shows the plan without the Hub"
        ) from e
    plan = plan_hub_operations(release, repo_id, existing_files=existing)
    if plan.tag in tags:
        raise PublishError(
            f"{repo_id} already has tag {plan.tag}: a published version never changes; build a new --version"
        )
    latest_version, latest_manifest = _hub_latest_manifest(api, repo_id, tags)
    try:
        lineage.check_publish_base(manifest_mod.read_manifest(release), latest_version, latest_manifest,
                                   release=release, target=repo_id, hub=True)
    except LymphAtlasError as e:
        raise PublishError(f"{e}; nothing was sent to {repo_id}") from e
    info = api.create_commit(
        repo_id, operations=plan.operations, commit_message=plan.commit_message, repo_type="dataset"
    )
    plan.commit_oid = info.oid
    api.create_tag(
        repo_id, tag=plan.tag, revision=info.oid, tag_message=plan.commit_message, repo_type="dataset"
    )
    log.debug("published %s to %s at %s (tag %s)", plan.version, repo_id, info.oid, plan.tag)
    return plan
