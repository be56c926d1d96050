"""Let pyarrow's reader threads let go of the Python files they read before the interpreter exits.

Upstream bug (apache/arrow#45214, huggingface/datasets#7566): ``datasets`` reads each parquet
shard through a Python file object (``open`` for a local file, an ``HfFileSystem`` file on the
Hub). When an iteration stops early, as ``next(iter(load_dataset(..., streaming=True)))`` does,
pyarrow's decoding threads may still hold the reader, and with it that file. If a thread drops the
last reference while the interpreter is finalizing, it must take the GIL to free the Python file;
Python ends such a thread, and the C++ runtime aborts the process ("terminate called without an
active exception", exit status 134) or it hangs. The iteration itself had succeeded. With torch
installed (``datasets`` imports it for every streaming dataset) finalization is long enough for
this to happen in 3 to 7 of 16-20 runs on a busy 2-core machine.

:func:`install` (run by ``import lymphatlas_ds``) registers an ``atexit`` hook, which runs before
finalization, while threads can still take the GIL. When pyarrow's dataset reader was used, the
hook closes the parquet generators ``datasets`` left suspended, then waits (at most
:data:`TIMEOUT_S`) until every closed parquet file that only native code still holds has been freed.
Nothing else is touched: a process that never read parquet pays nothing.
"""

from __future__ import annotations

import _io
import atexit
import gc
import io
import sys
import time
import types
import weakref

TIMEOUT_S = 10.0
"""Longest wait at exit; a reader still busy after that is left to the interpreter (as without the guard)."""

_POLL_S = 0.005
_IOBASE = _io._IOBase  # the C base of every file object (io.IOBase is an ABC over it)
_installed = False


def _is_closed_parquet_file(obj: object) -> bool:
    try:  # any file object of any library: its attributes may raise
        name = getattr(obj, "name", None) or getattr(obj, "path", None)
        return isinstance(name, str) and name.endswith(".parquet") and bool(obj.closed)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return False


def _parquet_generator_code() -> types.CodeType | None:
    module = sys.modules.get("datasets.packaged_modules.parquet.parquet")
    builder = getattr(module, "Parquet", None)
    return getattr(getattr(builder, "_generate_tables", None), "__code__", None)


def _scan() -> tuple[list[types.GeneratorType], list[io.IOBase]]:
    """The suspended parquet generators of ``datasets`` and the closed parquet files still alive.

    Types are tested with ``issubclass(type(obj), ...)``: ``isinstance`` would consult ``__class__``,
    which some objects (deprecated torch names) answer with a warning.
    """
    code = _parquet_generator_code()
    generators, files = [], []
    for obj in gc.get_objects():
        kind = type(obj)
        if kind is types.GeneratorType:
            if code is not None and obj.gi_code is code and obj.gi_frame is not None and not obj.gi_running:
                generators.append(obj)
        elif issubclass(kind, _IOBASE) and _is_closed_parquet_file(obj):
            files.append(obj)
    return generators, files


def _held_only_by_native_code(files: list[io.IOBase]) -> list[weakref.ref]:
    """Weak references to the ``files`` that no Python object refers to: what pyarrow's threads hold."""
    return [weakref.ref(f) for f in files if not [r for r in gc.get_referrers(f) if r is not files]]


def wait_for_parquet_readers(timeout_s: float = TIMEOUT_S) -> int:
    """Close the parquet readers ``datasets`` left open and wait until pyarrow's threads let go of them.

    Returns how many files were still held when the wait began (0: nothing to wait for).
    Called at exit by the hook :func:`install` registers; callable by hand before ``os._exit``.
    """
    if "pyarrow._dataset" not in sys.modules:
        return 0
    generators, files = _scan()
    if generators:
        for generator in generators:
            try:
                generator.close()  # its `with open(...)` closes the file
            except Exception:  # noqa: BLE001 - a reader's cleanup at exit must not change the exit status
                pass
        del generator
        gc.collect()
        generators, files = _scan()
    del generators
    held = _held_only_by_native_code(files)
    files.clear()
    deadline = time.monotonic() + timeout_s
    while any(ref() is not None for ref in held) and time.monotonic() < deadline:
        time.sleep(_POLL_S)  # releases the GIL: the reader thread can free the file now
    return len(held)


def install() -> None:
    """Register :func:`wait_for_parquet_readers` to run at interpreter exit (once per process)."""
    global _installed
    if not _installed:
        atexit.register(wait_for_parquet_readers)
        _installed = True
