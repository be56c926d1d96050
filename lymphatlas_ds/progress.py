"""Progress reporting for the command lines: a tqdm bar on a terminal, plain lines in a log.

``progress_bar(...)`` takes tqdm's arguments. When stderr is a terminal it returns a tqdm bar;
otherwise (a log file, a pipe, a CI job) a :class:`PlainProgress` that writes one line such as
``convert: 20/120 exam`` every tenth of the total (every ``EVERY`` items when the total is unknown)
or every ``seconds`` seconds, and one at the end,
instead of the bar's carriage-return redraws that a log keeps line after line.

Example:
    >>> with progress_bar(total=3, desc="verify", unit="case") as bar:  # doctest: +SKIP
    ...     bar.update(1)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

EVERY = 10
"""Items between two plain progress lines (besides the time rule)."""
SECONDS = 30.0
"""Seconds between two plain progress lines (besides the item rule)."""


class PlainProgress:
    """tqdm's interface as used here (update, n, total, close, set_postfix_str, iteration), in plain lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, file: TextIO | None = None, every: int | None = None,
                 seconds: float = SECONDS, **_ignored: Any) -> None:
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.postfix = total, 0, ""
        self.file = file if file is not None else sys.stderr
        if every is None:
            every = -(-int(total) // 10) if total else EVERY
        self.every, self.seconds = max(1, int(every)), seconds
        self._last_n, self._last_t, self._closed = 0, time.monotonic(), False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.n - self._last_n >= self.every or time.monotonic() - self._last_t >= self.seconds:
            self._line()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._line()
        self._closed = True

    def _line(self) -> None:
        self._last_n, self._last_t = self.n, time.monotonic()
        if self.disable:
            return
        of = f"/{_count(self.total)}" if self.total is not None else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {_count(self.n)}{of} {self.unit}{extra}", file=self.file, flush=True)


def _count(value: float) -> str:
    """A count as a reader wants it in a log: whole numbers in full (45711700 B, not 4.57117e+07)."""
    return f"{int(value)}" if float(value).is_integer() else f"{value:.1f}"


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """A tqdm bar when the output (``file``, default stderr) is a terminal, else :class:`PlainProgress`."""
    out = kwargs.get("file") or sys.stderr
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        from tqdm import tqdm

        kwargs.setdefault("file", sys.stderr)
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)
