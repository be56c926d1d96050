"""Release folders built from fake WORK folders, as many test modules need them.

``build_fake_release`` writes aligned cases with known arrays (lymphatlas_synth/fake_work.py) under
``<root>/work`` and builds a release from them with the real builder; the returned truth is what
every reader of that release must give back. ``datasets_cache_in_tmp`` keeps the arrow cache that
``datasets`` writes while loading these releases out of the user's cache folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.release.build import ReleaseSummary, build_release
from lymphatlas_synth.fake_work import FakeCase, make_fake_work


@dataclass(frozen=True)
class FakeRelease:
    """A release folder and the WORK truth of the cases added to WORK for it."""

    path: Path
    truth: dict[str, FakeCase]
    summary: ReleaseSummary


def build_fake_release(
    root: Path,
    *,
    n_patients: int,
    seed: int,
    version: str = "1.0.0",
    name: str = "release",
    previous: Path | None = None,
    **work_options: Any,
) -> FakeRelease:
    """Add ``n_patients`` fake patients to ``root/work`` and build ``root/<name>`` from all of WORK.

    ``work_options`` go to :func:`make_fake_work` (``shape_zyx``, ``spacing_xyz``, ``first_patient``);
    ``previous`` makes the build an update of that release. A second call on the same ``root`` with
    a new ``first_patient`` builds the next version from the grown WORK folder.

    Example:
        >>> first = build_fake_release(tmp_path, n_patients=4, seed=1, name="r100")  # doctest: +SKIP
        >>> build_fake_release(tmp_path, n_patients=2, seed=1, first_patient=4, version="1.1.0",
        ...                    name="r110", previous=first.path)  # doctest: +SKIP
    """
    cases = make_fake_work(root / "work", n_patients=n_patients, seed=seed, **work_options)
    summary = build_release(root / "work", root / name, version=version, previous=previous)
    return FakeRelease(root / name, {c.case_id: c for c in cases}, summary)


#: A folder where :func:`shared_fake_release` keeps its releases across processes (scripts/mutation.sh
#: sets it: every mutant runs the tests in a fresh fork, which rebuilt a module fixture's release each time).
SHARED_RELEASES_ENV = "LYMPHATLAS_TEST_SHARED_RELEASES"


def _generator_hash() -> str:
    # The code that writes a fake release: a change to it must not reuse an older folder.
    import builder.release
    import lymphatlas_synth.fake_work

    digest = hashlib.sha256()
    files = [Path(lymphatlas_synth.fake_work.__file__), Path(__file__)]
    files += sorted(Path(builder.release.__file__).parent.glob("*.py"))
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def shared_fake_release(tmp_path_factory, name: str, **options: Any) -> FakeRelease:
    """:func:`build_fake_release` in a fresh temporary folder, or, when ``$LYMPHATLAS_TEST_SHARED_RELEASES``
    names a folder, built once there (keyed by the options and the generator's code) and reused
    read-only by later processes. Callers must not write into the release (give the reader its own
    cache folder). Returns the release and a per-process temporary folder for such writes.
    """
    shared = os.environ.get(SHARED_RELEASES_ENV)
    scratch = tmp_path_factory.mktemp(name)
    if not shared:
        return build_fake_release(scratch, **options), scratch
    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path(shared) / f"{name}-{key}-{_generator_hash()}"
    root.parent.mkdir(parents=True, exist_ok=True)
    done = root / "truth.pickle"
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then read
        if not done.exists():
            release = build_fake_release(root, **options)
            done.with_suffix(".tmp").write_bytes(pickle.dumps((release.truth, release.summary)))
            done.with_suffix(".tmp").replace(done)
    truth, summary = pickle.loads(done.read_bytes())
    return FakeRelease(root / options.get("name", "release"), truth, summary), scratch


@pytest.fixture(scope="module")
def datasets_cache_in_tmp(tmp_path_factory):
    """Point ``datasets``' arrow cache at a temporary folder for one test module, then restore it.

    Modules use it as ``pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")`` after
    importing it.
    """
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = old
