"""Shared test configuration: markers, the --runslow switch, GPU skip."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Peer tools installed into the test's environment (dcm2niix from the dev extra) live next to
    # its python: put that folder on PATH so a run as `.venv/bin/python -m pytest` finds them too.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # A datasets cache of this run only: `datasets` keys its cache on the data files' paths, and pytest
    # reuses tmp folder names across runs, so a shared cache served an earlier run's rows (other case ids).
    cache = tempfile.mkdtemp(prefix="lymphatlas-test-datasets-")
    config._lymphatlas_datasets_cache = cache
    os.environ["HF_DATASETS_CACHE"] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = getattr(config, "_lymphatlas_datasets_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (CI does)")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory):
    """(source folder, list[ExamTruth]) of 12 small exams covering every variant (3 bad); read-only.

    Built once per session by ``tests/support/cohort.py``; the truth folder is ``source / "truth"``.
    """
    from tests.support.cohort import cohort

    return cohort(tmp_path_factory, n_exams=12, seed=7, variants="all")


@pytest.fixture(scope="session")
def synthetic_good_cohort(tmp_path_factory: pytest.TempPathFactory):
    """(source folder, list[ExamTruth]) of 3 small default (Siemens-like, HFS, accepted) exams; read-only."""
    from tests.support.cohort import cohort

    return cohort(tmp_path_factory, n_exams=3, seed=11, variants=None)


@pytest.fixture(autouse=True, scope="session")
def _client_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Keep the client's decoded cache and file-check records ($LYMPHATLAS_CACHE) out of the user's home."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LYMPHATLAS_CACHE", str(tmp_path_factory.mktemp("lymphatlas_cache")))
    yield
    patch.undo()
