"""Body-weight SUV: the factor that turns a PET series' values (after per-slice rescale) into SUVbw.

Follows the QIBA vendor-neutral SUV pseudo-code and docs/design.md "SUV":

* ``SUVbw = activity[Bq/ml] * weight[kg] * 1000 / (dose[Bq] * 2^(-dt / half_life))``.
* Units ``BQML``: the formula above. ``GML``: already SUV (factor 1). ``CNTS`` (Philips): the
  private SUV scale factor (7053,1000), or the activity scale factor (7053,1009) times the BQML
  factor when only that one is present.
* DecayCorrection ``START``: the image is decay-corrected to the scan start, so the dose is
  decayed by ``dt`` = scan start - injection, on full date-times (a scan after midnight works).
  The scan start is the series date/time, unless it is later than the earliest acquisition
  date/time (the series was re-created after the scan): then GE's private scan date/time
  (0009,100D) when present, else the earliest acquisition date/time. ``ADMIN``: the image is
  decay-corrected to the injection, ``dt = 0``. ``NONE`` (or CorrectedImage without DECY): rejected.
* DecayCorrection missing (Type 1, but absent in some exports): QIBA requires START and gives no
  rule for an absent value. When CorrectedImage says the image is decay corrected (DECY), START is
  assumed (the standard's default reference and what every vendor writes for whole-body FDG) and
  the assumption is recorded in ``notes``; without DECY either, the series is rejected.
* RadiopharmaceuticalStartDateTime missing: RadiopharmaceuticalStartTime on the series date; if
  that falls after the scan start, the injection was the day before (a scan after midnight).
* A missing dose, half-life, patient weight or injection time: rejected with the reason.

Example:
    >>> conv = suv_conversion(exam.pet, exam_id="EX0001")  # doctest: +SKIP
    >>> round(conv.factor, 8), conv.time_reference  # doctest: +SKIP
    (0.00021313, <TimeReference.SERIES: 'series'>)
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from builder.convert._dicom import combine, multi, naive_difference_s, number, parse_date, parse_datetime, parse_time, \
    read_header, text
from builder.convert.discover import SeriesInfo
from builder.errors import SUVError

logger = logging.getLogger(__name__)

_PHILIPS_CREATOR = "Philips PET Private Group"
_GE_CREATOR = "GEMS_PETD_01"
_MAX_UPTAKE_S = 24 * 3600.0  # an FDG scan more than a day after injection is a header error


class Units(str, enum.Enum):
    """PET pixel value units (0054,1001) that the builder converts."""

    BQML = "BQML"
    CNTS = "CNTS"
    GML = "GML"


class DecayCorrection(str, enum.Enum):
    """DecayCorrection (0054,1102): the time the image values are decay-corrected to."""

    START = "START"
    ADMIN = "ADMIN"
    NONE = "NONE"


class TimeReference(str, enum.Enum):
    """Which time the decay was computed to."""

    SERIES = "series"  # SeriesDate/SeriesTime
    ACQUISITION = "acquisition"  # earliest acquisition date/time (or GE's private scan date/time)
    ADMIN = "admin"  # DecayCorrection ADMIN: no decay, dt = 0
    GML = "gml"  # values already in SUV (g/ml): no time needed


@dataclass(frozen=True)
class SUVConversion:
    """The SUVbw factor of one PET series and everything it was computed from.

    ``SUVbw = image_in_series_units * factor`` where the image has the per-slice rescale applied.
    """

    factor: float
    units: Units
    decay_correction: DecayCorrection | None
    time_reference: TimeReference
    decay_time_s: float | None
    dose_bq: float | None
    half_life_s: float | None
    weight_kg: float | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-able dict for case.json (enums as their strings)."""
        return {
            "factor": self.factor,
            "units": self.units.value,
            "decay_correction": self.decay_correction.value if self.decay_correction else None,
            "time_reference": self.time_reference.value,
            "decay_time_s": self.decay_time_s,
            "dose_bq": self.dose_bq,
            "half_life_s": self.half_life_s,
            "weight_kg": self.weight_kg,
            "notes": list(self.notes),
        }


def _private_float(ds: Dataset, group: int, creator: str, offset: int) -> float | None:
    """A private numeric element by creator (block found through its private creator), None if absent."""
    try:
        block = ds.private_block(group, creator)
        elem = block[offset]
    except KeyError:
        return None
    value = elem.value
    if isinstance(value, bytes):  # implicit VR without a private dictionary entry: decimal string bytes
        try:
            value = value.decode("ascii").strip("\x00 ")
        except UnicodeDecodeError:
            return None
    try:
        return float(value if not isinstance(value, (list, tuple)) else value[0])
    except (TypeError, ValueError):
        return None


def _private_datetime(ds: Dataset, group: int, creator: str, offset: int) -> _dt.datetime | None:
    try:
        value = ds.private_block(group, creator)[offset].value
    except KeyError:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore").strip("\x00 ")
    return parse_datetime(value)


def _acquisition_datetime(ds: Dataset) -> _dt.datetime | None:
    return parse_datetime(ds.get("AcquisitionDateTime")) or combine(
        parse_date(ds.get("AcquisitionDate")), parse_time(ds.get("AcquisitionTime"))
    )


def _fail(message: str, series: SeriesInfo, exam_id: str) -> SUVError:
    return SUVError(message, exam_id=exam_id, series_uid=series.series_uid)


def suv_conversion(series: SeriesInfo, *, exam_id: str) -> SUVConversion:
    """Compute the SUVbw factor of a PET series from its headers (QIBA rules, vendor variants).

    Example:
        >>> conv = suv_conversion(exam.pet, exam_id="EX0001")  # doctest: +SKIP
        >>> suv = sitk.GetArrayFromImage(pet_image) * conv.factor  # doctest: +SKIP

    Raises:
        SUVError: DecayCorrection NONE, no decay or attenuation correction, unknown units, or a
            missing / implausible dose, half-life, weight or injection time; the message names it.
    """
    if not series.files:
        raise _fail("the PET series has no files", series, exam_id)
    headers: list[Dataset] = []
    for path in series.files:
        try:
            headers.append(read_header(Path(path)))
        except Exception as e:
            raise SUVError(f"the PET header cannot be read ({type(e).__name__}: {e}); re-export the series",
                           exam_id=exam_id, series_uid=series.series_uid, path=path) from e
    return suv_from_headers(headers, series=series, exam_id=exam_id)


def _units(first: Dataset, series: SeriesInfo, exam_id: str) -> Units:
    """The PET's Units; rejects units that cannot be converted to SUVbw."""
    units_text = (text(first, "Units") or "").upper()
    try:
        return Units(units_text)
    except ValueError:
        raise _fail(
            f"PET Units is '{units_text or 'missing'}'; only BQML, CNTS (Philips) and GML can be converted to SUVbw",
            series, exam_id,
        ) from None


def _decay_correction(first: Dataset, series: SeriesInfo, exam_id: str, notes: list[str]) -> DecayCorrection:
    """START or ADMIN from DecayCorrection and CorrectedImage; rejects an image not attenuation and decay corrected."""
    corrected = multi(first, "CorrectedImage")
    decay_text = (text(first, "DecayCorrection") or "").upper()
    if corrected and ("ATTN" not in corrected or "DECY" not in corrected):
        raise _fail(
            f"CorrectedImage is {'/'.join(corrected)}: the PET is not both attenuation (ATTN) and decay (DECY) "
            "corrected, so SUV would be wrong; export the corrected PET",
            series, exam_id,
        )
    if not decay_text:
        if "DECY" in corrected:
            decay = DecayCorrection.START
            notes.append("DecayCorrection missing; START assumed because CorrectedImage contains DECY")
            logger.warning("exam %s: PET DecayCorrection missing; START assumed (CorrectedImage has DECY)", exam_id)
        else:
            raise _fail(
                "DecayCorrection and CorrectedImage are both missing: it is unknown whether and to when the "
                "PET is decay-corrected; export the series with its PET headers", series, exam_id,
            )
    else:
        try:
            decay = DecayCorrection(decay_text)
        except ValueError:
            raise _fail(f"DecayCorrection '{decay_text}' is not START, ADMIN or NONE", series, exam_id) from None
    if decay is DecayCorrection.NONE:
        raise _fail(
            "DecayCorrection is NONE: the PET is not decay-corrected and body-weight SUV is not defined per "
            "voxel; export the decay-corrected series", series, exam_id,
        )
    if not corrected:
        notes.append("CorrectedImage missing; relying on DecayCorrection")
    return decay


def _patient_weight(first: Dataset, series: SeriesInfo, exam_id: str) -> float:
    """PatientWeight in kg; rejects a missing or implausible weight."""
    weight = number(first, "PatientWeight")
    if weight is None or weight <= 0:
        raise _fail("PatientWeight is missing or zero: body-weight SUV needs the weight (kg); add it to the "
                    "export", series, exam_id)
    if not 1.0 <= weight <= 400.0:
        raise _fail(f"PatientWeight {weight} is not a plausible weight in kg (grams or pounds?); fix the header",
                    series, exam_id)
    return weight


def _radiopharmaceutical(first: Dataset, series: SeriesInfo, exam_id: str) -> tuple[Dataset, float, float]:
    """The radiopharmaceutical item, its dose (Bq) and half-life (s); rejects a missing or implausible value."""
    rp_seq = first.get("RadiopharmaceuticalInformationSequence")
    rp = rp_seq[0] if rp_seq else Dataset()
    dose = number(rp, "RadionuclideTotalDose")
    if dose is None or dose <= 0:
        raise _fail("the injected dose (RadionuclideTotalDose) is missing: SUV cannot be computed; add it to the "
                    "export", series, exam_id)
    if dose < 1e6:
        raise _fail(f"RadionuclideTotalDose {dose} is not a plausible dose in Bq (MBq written?); fix the header",
                    series, exam_id)
    half_life = number(rp, "RadionuclideHalfLife")
    if half_life is None or half_life <= 0:
        raise _fail("RadionuclideHalfLife is missing: the dose cannot be decay-corrected; add it to the export",
                    series, exam_id)
    return rp, dose, half_life


def _philips_counts_factor(first: Dataset, bqml_factor: float, series: SeriesInfo, exam_id: str,
                           notes: list[str]) -> float:
    """The SUV factor of Philips CNTS from its private scale factors (7053,1000) or (7053,1009)."""
    suv_scale = _private_float(first, 0x7053, _PHILIPS_CREATOR, 0x00)
    activity_scale = _private_float(first, 0x7053, _PHILIPS_CREATOR, 0x09)
    if suv_scale is not None and suv_scale > 0:
        notes.append("CNTS: Philips SUV scale factor (7053,1000)")
        if activity_scale:
            ours = activity_scale * bqml_factor
            if abs(ours / suv_scale - 1) > 0.01:
                notes.append(f"Philips SUV factor differs from activity scale x BQML factor by "
                             f"{100 * (ours / suv_scale - 1):.2f} %")
                logger.warning("exam %s: %s", exam_id, notes[-1])
        return suv_scale
    if activity_scale is not None and activity_scale > 0:
        notes.append("CNTS: Philips activity scale factor (7053,1009) x BQML factor")
        return activity_scale * bqml_factor
    raise _fail(
        "Units CNTS without the Philips private scale factors (7053,1000) or (7053,1009): counts cannot "
        "be converted to SUV; export the series with its private tags (not anonymized away)",
        series, exam_id,
    )


def suv_from_headers(headers: list[Dataset], *, series: SeriesInfo, exam_id: str) -> SUVConversion:
    """:func:`suv_conversion` on headers already read (one per slice of the series)."""
    first = headers[0]
    notes: list[str] = []
    units = _units(first, series, exam_id)
    if units is Units.GML:
        return SUVConversion(factor=1.0, units=units, decay_correction=None, time_reference=TimeReference.GML,
                             decay_time_s=None, dose_bq=None, half_life_s=None, weight_kg=number(first, "PatientWeight"),
                             notes=("values already SUVbw (GML)",))
    decay = _decay_correction(first, series, exam_id, notes)
    weight = _patient_weight(first, series, exam_id)
    rp, dose, half_life = _radiopharmaceutical(first, series, exam_id)
    if decay is DecayCorrection.ADMIN:
        decay_time = 0.0
        reference = TimeReference.ADMIN
    else:
        decay_time, reference = _decay_time(headers, rp, series=series, exam_id=exam_id, notes=notes)
    decayed_dose = dose * math.pow(2.0, -decay_time / half_life)
    bqml_factor = weight * 1000.0 / decayed_dose
    if units is Units.BQML:
        factor = bqml_factor
    else:  # CNTS: Philips
        factor = _philips_counts_factor(first, bqml_factor, series, exam_id, notes)
    return SUVConversion(factor=factor, units=units, decay_correction=decay, time_reference=reference,
                         decay_time_s=decay_time, dose_bq=dose, half_life_s=half_life, weight_kg=weight,
                         notes=tuple(notes))


def _decay_time(headers: list[Dataset], rp: Dataset, *, series: SeriesInfo, exam_id: str,
                notes: list[str]) -> tuple[float, TimeReference]:
    """Seconds from injection to the scan start the image is decay-corrected to, and which time that was."""
    first = headers[0]
    series_date = parse_date(first.get("SeriesDate"))
    series_dt = combine(series_date, parse_time(first.get("SeriesTime")))
    acq = [t for t in (_acquisition_datetime(h) for h in headers) if t is not None]
    earliest_acq = min(acq, key=lambda t: t.replace(tzinfo=None)) if acq else None
    if series_dt is not None and (earliest_acq is None or naive_difference_s(earliest_acq, series_dt) >= 0):
        scan, reference = series_dt, TimeReference.SERIES
    elif earliest_acq is not None:
        ge_scan = _private_datetime(first, 0x0009, _GE_CREATOR, 0x0D)
        if series_dt is not None and ge_scan is not None:
            scan = ge_scan
            notes.append("series time after acquisition time: GE private scan date/time (0009,100D) used")
        else:
            scan = earliest_acq
            notes.append("series time after (or without) acquisition time: earliest acquisition time used")
        reference = TimeReference.ACQUISITION
    else:
        raise _fail("neither SeriesDate/SeriesTime nor AcquisitionDate/AcquisitionTime is present: the decay "
                    "time cannot be computed", series, exam_id)

    injection = parse_datetime(rp.get("RadiopharmaceuticalStartDateTime"))
    if injection is None:
        start_time = parse_time(rp.get("RadiopharmaceuticalStartTime"))
        if start_time is None:
            raise _fail("the injection time (RadiopharmaceuticalStartDateTime / RadiopharmaceuticalStartTime) is "
                        "missing: the dose cannot be decay-corrected; add it to the export", series, exam_id)
        injection = _dt.datetime.combine(series_date or scan.date(), start_time)
        if naive_difference_s(scan, injection) < 0:
            # Injected before midnight, scanned after: the time-only field cannot say so itself.
            injection -= _dt.timedelta(days=1)
            notes.append("injection time after scan time on the series date: injection taken on the previous day")
        notes.append("RadiopharmaceuticalStartDateTime missing: RadiopharmaceuticalStartTime on the series date used")
    dt = naive_difference_s(scan, injection)
    if dt < 0 or dt > _MAX_UPTAKE_S:
        raise _fail(
            f"decay time {dt / 60:.1f} min from injection to scan start is implausible (negative or over a day); "
            "check RadiopharmaceuticalStartDateTime and the series / acquisition times", series, exam_id,
        )
    return dt, reference
