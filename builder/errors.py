"""Errors of the builder: each names the exam, the series or file it concerns, and what to do.

Every rejection of an exam is an :class:`ExamError` carrying the pipeline ``stage`` where it
happened; ``failures.json`` records ``exam_id``, ``kind``, ``stage`` and ``str(error)``.

Two kinds of error, told apart in one place (:func:`run_fault`): a finding about the exam's content
(kind ``exam``: the exam is rejected) and an error of the run (kind ``run``: an OSError with an errno
such as EIO or ENOSPC, a MemoryError, a killed worker, an interrupt), which changes nothing in WORK.
A stage that wraps whatever a reader raises into its :class:`ExamError` (``raise ReadError(...) from
e``) needs no classification of its own: an error of the run behind it is still found.
``str(error)`` never holds a value read from the source's clinical table or a DICOM identity
attribute (failures.json and the QC report are shared among the maintainers' team); such values go to
``error.detail``, which convert logs and never writes to a file.
"""

from __future__ import annotations

from pathlib import Path

from lymphatlas_ds.errors import LymphAtlasError


class ExamError(LymphAtlasError):
    """An exam cannot be turned into an aligned case.

    Args:
        message: what was expected, what was found, what to do.
        exam_id: the source exam folder name.
        stage: pipeline stage (discover, read, suv, align, labels, qc, deid, write).
        series_uid: the series concerned, where there is one.
        path: the file concerned, where there is one.
        detail: the identifying values behind the message (a clinical.csv cell, a DICOM PatientID),
            for the maintainer's log only: never part of ``str(error)``.
    """

    stage = "unknown"

    def __init__(
        self,
        message: str,
        *,
        exam_id: str | None = None,
        series_uid: str | None = None,
        path: str | Path | None = None,
        stage: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.message = message
        self.detail = detail
        self.exam_id = exam_id
        self.series_uid = series_uid
        self.path = str(path) if path is not None else None
        if stage is not None:
            self.stage = stage
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.exam_id:
            where.append(f"exam {self.exam_id}")
        if self.series_uid:
            where.append(f"series {self.series_uid}")
        if self.path:
            where.append(f"file {self.path}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{self.message}"


class DiscoveryError(ExamError):
    """Series selection failed: no PET, two candidate CTs, different frames of reference, ..."""

    stage = "discover"


class GeometryError(ExamError):
    """A series' slices do not form one regular volume (gap, duplicate, tilt, mixed orientation)."""

    stage = "read"


class ReadError(ExamError):
    """A DICOM file is corrupt, truncated or in a transfer syntax no installed decoder handles."""

    stage = "read"


class SUVError(ExamError):
    """Body-weight SUV cannot be computed (DecayCorrection NONE, missing dose / half-life / weight / time)."""

    stage = "suv"


class LabelError(ExamError):
    """The lesion mask is on another grid, not binary, or outside the body."""

    stage = "labels"


class QCError(ExamError):
    """A per-case quality check failed; the message names the check, the value and the threshold."""

    stage = "qc"


class ClinicalError(ExamError):
    """The clinical table lacks the exam or has an invalid value."""

    stage = "clinical"


class MassRetirementError(ExamError):
    """A convert would retire (withdraw, prune, replace by a rejection) too many cases at once."""

    stage = "retire"


def run_fault(error: BaseException) -> BaseException | None:
    """The error of the run behind ``error``, or None when ``error`` is a finding about the exam.

    Follows the explicit causes (``raise X from e``) from ``error`` down: a MemoryError, or an
    OSError carrying an errno (EIO, ENOSPC, ENOENT of a file that vanished, EACCES...), is an error
    of the run, whichever stage wrapped it. An OSError without an errno is a reader's verdict on the
    bytes (gzip's BadGzipFile, "cannot identify image file") and stays a finding about the content.

    Example:
        >>> try:
        ...     try:
        ...         raise OSError(5, "Input/output error")
        ...     except Exception as e:
        ...         raise ReadError("the file is corrupt") from e
        ... except ExamError as err:
        ...     type(run_fault(err)).__name__
        'OSError'
        >>> run_fault(ReadError("the file is corrupt")) is None
        True
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or (isinstance(current, OSError) and current.errno is not None):
            return current
        current = current.__cause__
    return None


class IdentityError(ExamError):
    """The exam's DICOM identity disagrees with clinical.csv, or its study is already another exam's case."""

    stage = "identity"


class KeyFileError(ExamError):
    """WORK's de-identification key is missing while ids made with it exist, damaged, or --new-key on a used WORK."""

    stage = "deid"
