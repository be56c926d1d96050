"""Small file helpers shared by the client, the builder and the tools.

``write_atomic`` is the one way the project writes a whole file: readers never see a half-written
file, and a crash leaves at most a hidden temporary name behind, never a truncated target.
``read_json`` is the one way it reads a JSON document it expects to exist, with an error that names
the file, what it should be and what to do.

The builder and the tools import this module; it imports nothing from them (the client ships alone).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lymphatlas_ds.errors import SchemaError

CACHE_ENV = "LYMPHATLAS_CACHE"
"""Environment variable naming the client's cache folder (decoded cases, the release wheel)."""


def default_cache_dir() -> Path:
    """The client's cache folder: ``$LYMPHATLAS_CACHE``, ``$XDG_CACHE_HOME/lymphatlas`` or ``~/.cache/lymphatlas``.

    Example:
        >>> default_cache_dir().name  # doctest: +SKIP
        'lymphatlas'
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lymphatlas"


def write_atomic(path: str | Path, data: bytes | str, *, mode: int | None = None, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder renamed into place.

    The parent folder is created. ``str`` data is written as UTF-8. With ``mode=None`` the file gets
    the mode any plain ``open()`` would give it (0o666 less the umask), so reports and release files
    stay readable to the rest of the team; an int sets exactly that mode (e.g. 0o600 for a key).
    ``fsync=True`` forces the bytes to disk before the rename (files a release depends on).
    The temporary file is removed on any error; the target is then left as it was.

    Example:
        >>> write_atomic(tmp_path / "out" / "note.txt", "hello\\n")  # doctest: +SKIP
        PosixPath('.../out/note.txt')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # A unique name opened exclusively (not mkstemp, whose fixed 0600 mode ignores the umask): two
    # writers of the same target never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # exactly this mode, whatever the umask
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, *, what: str, fix: str) -> Any:
    """Parse the JSON document at ``path``; a missing or unparsable file raises :class:`SchemaError`.

    ``what`` says what the file should be ("the manifest of a LymphAtlas release") and ``fix`` what
    to do about it ("re-download the release"); both go into the message next to the path. The
    document's shape is the caller's to check.

    Example:
        >>> read_json(release / "manifest.json", what="the release manifest",
        ...           fix="re-download the release")["version"]  # doctest: +SKIP
        '1.0.0'
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError as e:
        raise SchemaError(f"{path} not found: expected {what}; {fix}") from e
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{path} is not valid JSON ({e}): expected {what}; {fix}") from e


def replace_folder(src: Path, dst: Path, *, old_prefix: str = ".old-") -> None:
    """Move the finished folder ``src`` to ``dst`` by renames only; an existing ``dst`` is first renamed
    aside (``<old_prefix><name>-<random>``, a hidden sibling a later clean-up recognises), then deleted."""
    old = None
    if dst.exists():
        old = dst.with_name(f"{old_prefix}{dst.name}-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory in bytes: Linux's ``VmHWM``, the high-water mark of the
    process's own address space. ``getrusage().ru_maxrss`` is not that in a child process: Linux keeps
    the parent's resident size at fork across ``exec`` (a build started by a 1.9 GB pytest worker
    reported 1.9-2.7 GB while itself peaking at 1.1). Elsewhere ``ru_maxrss`` (macOS: bytes), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return None

