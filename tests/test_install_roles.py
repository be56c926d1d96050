"""Dependencies by role: the client with torch, the builder without it, plain `datasets` without the package.

pyproject.toml declares the roles (core, ``[torch]``, ``[builder]``); the wheel's METADATA carries
them as ``Requires-Dist`` lines with ``extra == ...`` markers, which is what pip reads. The fast
tests read that METADATA, check every third-party import of each package against its role, and
run the builder's console commands with torch made unimportable (as on a machine without it);
the slow test installs the wheel into fresh virtual environments, one per role, from the package
index, and runs each role there.
"""

from __future__ import annotations

import ast
import email
import importlib.metadata
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OURS = {"builder", "lymphatlas_ds", "lymphatlas_synth", "tests", "tools", "__future__"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    from tests.support.wheel import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


def requires_by_role(wheel: Path) -> dict[str, set[str]]:
    """{"": core distributions, extra: its distributions} from the wheel's METADATA Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    roles: dict[str, set[str]] = {extra: set() for extra in meta.get_all("Provides-Extra") or []}
    roles[""] = set()
    for line in meta.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        name = _norm(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        roles[extra.group(1) if extra else ""].add(name)
    return roles


def third_party_imports(package: str) -> dict[str, str]:
    """{distribution: first file importing it} for every non-stdlib import (function-level ones included) under package."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, str] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in OURS:
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(_norm(dist), str(path.relative_to(REPO)))
    return found


def test_the_wheel_declares_torch_only_for_the_client(wheel):
    roles = requires_by_role(wheel)
    assert "torch" not in roles[""], "torch must not be a core dependency (the builder's machines would install it)"
    assert roles["torch"] == {"torch"}
    assert "torch" not in roles["builder"] and "jinja2" in roles["builder"]
    assert {"datasets", "nibabel", "pyarrow", "numpy"} <= roles[""]


@pytest.mark.parametrize(("package", "allowed"), [
    ("builder", ("", "builder")),
    ("lymphatlas_synth", ("", "builder")),
    ("lymphatlas_ds", ("", "torch", "nnunet", "monai", "seg")),
])
def test_every_import_is_declared_for_its_role(wheel, package, allowed):
    """An import of an undeclared package works here (the dev environment has everything) and fails for a user."""
    roles = requires_by_role(wheel)
    declared = set().union(*(roles[role] for role in allowed))
    undeclared = {dist: where for dist, where in third_party_imports(package).items() if dist not in declared}
    assert not undeclared, f"imported by {package} but declared in none of the extras {allowed}: {undeclared}"


def _blocking(tmp_path: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """An environment in which ``modules`` cannot be imported (as where they are not installed), workers included."""
    site = tmp_path / "site_block"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    env = {**os.environ, "PYTHONPATH": str(site), "LYMPHATLAS_CACHE": str(tmp_path / "cache")}
    return env


def test_the_builder_runs_without_torch(tmp_path):
    env = _blocking(tmp_path, ("torch",))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the block holds
    steps = [
        [str(BIN / "lymphatlas-build"), "convert", "--help"],
        [str(BIN / "lymphatlas-build"), "synth", "src", "--exams", "1", "--size", "small", "--quiet"],
        [str(BIN / "lymphatlas-build"), "convert", "src", "work", "--workers", "1", "--quiet"],
        [str(BIN / "lymphatlas-build"), "release", "work", "rel", "--version", "1.0.0"],
        [str(BIN / "lymphatlas"), "verify", "rel", "--quiet"],  # the core client: no torch either
        [str(BIN / "lymphatlas"), "materialize", "rel", "--nnunet", "raw", "--config", "all"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert list((tmp_path / "work" / "cases").glob("*/ct.nii.gz"))
    assert list((tmp_path / "raw").glob("Dataset*/imagesTr/*_0001.nii.gz"))


def test_a_missing_package_is_named_in_one_line(tmp_path):
    env = _blocking(tmp_path, ("torch", "SimpleITK"))
    proc = subprocess.run([sys.executable, "-c", "from lymphatlas_ds import load_lymphatlas"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("lymphatlas_ds.errors.MissingDependencyError: load_lymphatlas")
    assert "`pip install torch`" in last and "[torch]" in last
    proc = subprocess.run([sys.executable, "-c", "import lymphatlas_ds.interop"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "MissingDependencyError" in proc.stderr and "`pip install torch`" in proc.stderr
    proc = subprocess.run([str(BIN / "lymphatlas-build"), "convert", "src", "work"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: lymphatlas-build convert needs SimpleITK")
    assert "[builder]" in proc.stderr
    assert not (tmp_path / "work").exists()
    (tmp_path / "no_nnunet").mkdir()
    env = _blocking(tmp_path / "no_nnunet", ("nnunetv2",))
    proc = subprocess.run([sys.executable, "-m", "lymphatlas_ds.nnunet_trainers"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].endswith("`pip install nnunetv2`"), proc.stderr


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(path)
    return path / "bin" / "python"


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run(python: Path, code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_each_role_installs_into_a_fresh_environment(wheel, tmp_path):
    """Fresh venvs (no system site-packages) from the package index: builder without torch, client with, datasets alone."""
    from tests.support.releases import build_fake_release

    release = build_fake_release(tmp_path, n_patients=3, seed=3, shape_zyx=(12, 16, 16), name="lymphatlas").path
    torch_pin = f"torch=={importlib.metadata.version('torch').split('+')[0]}"  # the build on disk here, not a download

    builder = _venv(tmp_path / "builder_env")
    _pip(builder, f"{wheel}[builder]")
    out = _run(builder, "import importlib.util, builder.convert.pipeline, builder.release.build, builder.release.publish\n"
                        "print(importlib.util.find_spec('torch'))", tmp_path)
    assert out.strip() == "None"
    proc = subprocess.run([str(builder.parent / "lymphatlas-build"), "convert", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # a release built there ships the client wheel repacked from the installed files: the same files as the
    # wheel pip installed, and a wheel pip accepts
    out = _run(builder, f"import os; os.environ['LYMPHATLAS_CACHE'] = {str(tmp_path / 'cache')!r}\n"
                        "from builder.release.client_wheel import client_wheel; print(client_wheel())", tmp_path)
    repacked = Path(out.strip())
    with zipfile.ZipFile(wheel) as z, zipfile.ZipFile(repacked) as r:
        assert {n for n in r.namelist() if not n.endswith("RECORD")} == {n for n in z.namelist() if not n.endswith("RECORD")}
        assert all(r.read(n) == z.read(n) for n in z.namelist() if not n.endswith("RECORD"))
    _pip(builder, "--dry-run", "--no-deps", str(repacked))

    client = _venv(tmp_path / "client_env")
    _pip(client, f"{wheel}[torch]", torch_pin)
    out = _run(client, "import importlib.util, sys\nfrom lymphatlas_ds import load_lymphatlas\n"
                       f"item = load_lymphatlas({str(release)!r}, split='train')[0]\n"
                       "print(tuple(item['image'].shape)[0], importlib.util.find_spec('SimpleITK'))", tmp_path)
    assert out.split() == ["2", "None"]

    plain = _venv(tmp_path / "datasets_env")
    _pip(plain, "datasets", "nibabel")
    out = _run(plain, "import importlib.util, datasets\n"
                      f"ds = datasets.load_dataset({str(release)!r}, 'all', split='train')\n"
                      "print(ds[0]['ct'].get_fdata().shape == tuple(ds[0]['shape_xyz']), importlib.util.find_spec('torch'),"
                      " importlib.util.find_spec('lymphatlas_ds'))", tmp_path)
    assert out.split() == ["True", "None", "None"]
