"""The client wheel shipped inside each release (``wheels/lymphatlas_ds-<version>-py3-none-any.whl``).

The package is on no index, so a release carries the wheel of the code that built it: whoever reads
the card can install the client from where the card is (the Hub repo, a local mirror, a release
folder) with ``pip install "<that wheel>[torch]"``. The wheel is listed in the manifest like any file.

Where it comes from: in a checkout (the builder runs from the source tree, an editable install
included) ``pip wheel`` builds it; where the builder was installed from a wheel, the installed
distribution's files are packed again (with a fresh RECORD). Either way the bytes are reproducible
for the same code (zip times fixed at 1980-01-01, files in sorted order), and the built wheel is
kept in the client cache folder under a hash of the code, so a process builds it once.

Example:
    >>> path = ship(Path("rel.partial"))  # doctest: +SKIP
    >>> path.relative_to("rel.partial").as_posix()  # doctest: +SKIP
    'wheels/lymphatlas_ds-0.1.0-py3-none-any.whl'
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from builder import __version__  # the one distribution: builder and client share its version
from lymphatlas_ds._io import default_cache_dir, write_atomic
from lymphatlas_ds.errors import LymphAtlasError

WHEELS_FOLDER = "wheels"
WHEEL_NAME = f"lymphatlas_ds-{__version__}-py3-none-any.whl"
DISTRIBUTION = "lymphatlas-ds"
PACKAGES = ("lymphatlas_ds", "builder", "lymphatlas_synth")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _source_tree() -> Path | None:
    """The checkout this code runs from, or None where it runs from an installed wheel."""
    pyproject = _SOURCE_ROOT / "pyproject.toml"
    if pyproject.is_file() and 'name = "lymphatlas-ds"' in pyproject.read_text():
        return _SOURCE_ROOT
    return None


def _code_hash(root: Path) -> str:
    digest = hashlib.sha256()
    files = [root / "pyproject.toml", root / "README.md"] if (root / "pyproject.toml").is_file() else []
    for package in PACKAGES:
        files += sorted(p for p in (root / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _build_from_source(root: Path, out: Path) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}  # 1980-01-01: the zip's earliest time, reproducible
    with tempfile.TemporaryDirectory(prefix="lymphatlas-wheel-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root, src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", "tests", "tools", "benchmarks", "docs"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(Path(tmp) / "dist"), str(src)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise LymphAtlasError(f"building the client wheel for wheels/ from {root} failed (pip wheel): "
                                  f"{proc.stderr.strip()[-2000:]}")
        (built,) = (Path(tmp) / "dist").glob("lymphatlas_ds-*.whl")
        shutil.copyfile(built, out)
    return out


def _repack_installed(out: Path) -> Path:
    """A wheel of the installed distribution: its package files and dist-info, RECORD written anew."""
    dist = importlib.metadata.distribution(DISTRIBUTION)
    base = Path(dist.locate_file(""))
    entries: dict[str, bytes] = {}
    info = None
    for file in dist.files or []:
        name = file.as_posix()
        top = name.split("/")[0]
        if name.endswith((".pyc", "/RECORD", "/INSTALLER", "/REQUESTED", "/direct_url.json")) or name.startswith(".."):
            continue
        if top.endswith(".dist-info"):
            info = top
        elif top not in PACKAGES:
            continue
        entries[name] = (base / name).read_bytes()
    if info is None:
        raise LymphAtlasError(f"{DISTRIBUTION} is installed without its dist-info: cannot ship the client wheel; reinstall it")
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
              for n, b in sorted(entries.items())]
    entries[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(entries):
            item = zipfile.ZipInfo(name, _ZIP_TIME)
            item.external_attr = 0o644 << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(item, entries[name])
    return out


def client_wheel() -> Path:
    """The client wheel of the running code (built once, then taken from the cache folder)."""
    root = _source_tree()
    key = _code_hash(root) if root else _code_hash(Path(importlib.metadata.distribution(DISTRIBUTION).locate_file("")))
    cached = default_cache_dir() / "wheels" / key / WHEEL_NAME
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{WHEEL_NAME}.{os.getpid()}.tmp")
    try:
        _build_from_source(root, tmp) if root else _repack_installed(tmp)
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)
    return cached


def ship(release_dir: Path) -> Path:
    """Copy the client wheel into ``release_dir/wheels/`` (temp + rename); return its path there."""
    target = Path(release_dir) / WHEELS_FOLDER / WHEEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, client_wheel().read_bytes(), fsync=True)
    return target
