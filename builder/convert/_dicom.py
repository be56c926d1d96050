"""Header helpers shared by discovery, reading and SUV: safe header reads and DICOM date/times.

Private to the ingest stages (``discover``, ``read``, ``suv``). Date and time strings are parsed
with pydicom's own value representations (``DA``, ``TM``, ``DT``), which accept every form the
standard allows (``HHMM``, ``HHMMSS.FFFFFF``, a UTC offset on ``DT`` ...).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DA, DT, TM

logger = logging.getLogger(__name__)

# The first bytes of a DICOM file without the 128-byte preamble and "DICM" (older exports,
# some PACS): group 0x0002 or 0x0008, little endian.
_RAW_GROUP_PREFIXES = (b"\x02\x00", b"\x08\x00")


class NotDicomError(Exception):
    """The file is not a DICOM file (no preamble, no plausible first element)."""


def looks_like_raw_dicom(path: Path) -> bool:
    """True when a file without a DICOM preamble starts like a DICOM data set (group 0002 or 0008)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and head[:2] in _RAW_GROUP_PREFIXES


def read_header(path: Path, tags: Sequence[str | int] | None = None) -> Dataset:
    """Read a file's header without its pixel data (fast: discovery reads ~1000 files a second).

    Args:
        path: the file.
        tags: keywords or tags to keep (``specific_tags``); None keeps the whole header.

    Raises:
        NotDicomError: the file is not DICOM at all (callers skip it with a logged note).
        Exception: anything pydicom raises for a DICOM file it cannot parse (corrupt, truncated).
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags) if tags else None)
    except InvalidDicomError as e:
        if not looks_like_raw_dicom(path):
            raise NotDicomError(str(path)) from e
        # A preamble-less file that starts like a data set: read it as such.
        return pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(tags) if tags else None)


def text(ds: Dataset, keyword: str) -> str | None:
    """A string attribute stripped of padding, or None when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def number(ds: Dataset, keyword: str) -> float | None:
    """A numeric attribute as float, or None when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued string attribute (ImageType, CorrectedImage ...) as upper-case strings."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes)):
        value = [value]
    return tuple(str(v).strip().upper() for v in value)


def parse_date(value: object) -> _dt.date | None:
    """A DICOM DA value as a date, None when absent or unparseable."""
    if value in (None, ""):
        return None
    try:
        d = value if isinstance(value, _dt.date) else DA(str(value).strip())
    except ValueError:
        return None
    return _dt.date(d.year, d.month, d.day) if d else None


def parse_time(value: object) -> _dt.time | None:
    """A DICOM TM value as a time, None when absent or unparseable.

    Accepts the ACR-NEMA ``HH:MM:SS`` form some exports still write.
    """
    if value in (None, ""):
        return None
    if isinstance(value, _dt.time):
        return value
    s = str(value).strip().replace(":", "")
    try:
        t = TM(s)
    except ValueError:
        return None
    return _dt.time(t.hour, t.minute, t.second, t.microsecond) if t is not None else None


def parse_datetime(value: object) -> _dt.datetime | None:
    """A DICOM DT value as a datetime (aware when the value carries a UTC offset)."""
    if value in (None, ""):
        return None
    if isinstance(value, _dt.datetime):
        return value
    try:
        d = DT(str(value).strip())
    except ValueError:
        return None
    if d is None:
        return None
    return _dt.datetime(d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, tzinfo=d.tzinfo)


def combine(date: _dt.date | None, time: _dt.time | None) -> _dt.datetime | None:
    """A date and a time as one datetime, None if either is missing."""
    if date is None or time is None:
        return None
    return _dt.datetime.combine(date, time)


def naive_difference_s(later: _dt.datetime, earlier: _dt.datetime) -> float:
    """Seconds from ``earlier`` to ``later``; when only one carries a UTC offset, both are taken as local time."""
    if (later.tzinfo is None) != (earlier.tzinfo is None):
        later = later.replace(tzinfo=None)
        earlier = earlier.replace(tzinfo=None)
    return (later - earlier).total_seconds()
