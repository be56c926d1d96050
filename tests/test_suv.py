"""SUVbw factor: every timing / vendor rule against the physics computed here from the known inputs."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from pydicom.dataset import Dataset

from builder.convert.discover import SeriesInfo, SeriesKind
from builder.errors import SUVError
from builder.convert.suv import DecayCorrection, TimeReference, Units, suv_conversion, suv_from_headers
from tests.support.dicom_series import pet_timing, write_series

HALF_LIFE = 6586.2  # F-18, s
DOSE = 350e6  # Bq
WEIGHT = 72.0  # kg
INJECTION = dt.datetime(2024, 3, 5, 9, 12, 30)
SERIES = SeriesInfo(series_uid="1.2.3", study_uid="1.2", frame_of_reference_uid="1.2.4", modality="PT",
                    kind=SeriesKind.PET_AC, files=[])


def expected_factor(decay_s: float, *, weight=WEIGHT, dose=DOSE, half_life=HALF_LIFE) -> float:
    """The textbook SUVbw factor: weight[g] / (dose decayed to the reference time)."""
    return weight * 1000.0 / (dose * math.exp(-math.log(2) * decay_s / half_life))


def headers(n=3, *, units="BQML", decay="START", corrected=("ATTN", "DECY"), acq_offsets_s=(0, 0, 0), **timing):
    """n slice headers; acquisition times offset per slice from ``acquisition_dt`` (or the series time)."""
    attrs = pet_timing(**timing)
    base_acq = timing.get("acquisition_dt") or timing["series_dt"]
    out = []
    for k in range(n):
        ds = Dataset()
        for key, value in attrs.items():
            setattr(ds, key, value)
        acq = base_acq + dt.timedelta(seconds=acq_offsets_s[k])
        ds.AcquisitionDate, ds.AcquisitionTime = acq.strftime("%Y%m%d"), acq.strftime("%H%M%S.%f")
        if units is not None:
            ds.Units = units
        if decay is not None:
            ds.DecayCorrection = decay
        if corrected is not None:
            ds.CorrectedImage = list(corrected)
        out.append(ds)
    return out


def conv(hs):
    return suv_from_headers(hs, series=SERIES, exam_id="EX1")


def test_series_time_reference():
    series = INJECTION + dt.timedelta(minutes=62, seconds=11)
    c = conv(headers(series_dt=series, injection_dt=INJECTION, acq_offsets_s=(0, 180, 360)))
    assert c.time_reference is TimeReference.SERIES
    assert c.decay_time_s == pytest.approx(62 * 60 + 11)
    assert c.factor == pytest.approx(expected_factor(62 * 60 + 11), rel=1e-9)
    assert c.units is Units.BQML and c.decay_correction is DecayCorrection.START


def test_series_time_after_acquisition_uses_earliest_acquisition():
    # A re-created series: SeriesTime later than the bed positions' acquisition times.
    acq = INJECTION + dt.timedelta(minutes=60)
    series = INJECTION + dt.timedelta(minutes=95)
    c = conv(headers(series_dt=series, injection_dt=INJECTION, acquisition_dt=acq, acq_offsets_s=(240, 0, 120)))
    assert c.time_reference is TimeReference.ACQUISITION
    assert c.decay_time_s == pytest.approx(3600)
    assert c.factor == pytest.approx(expected_factor(3600), rel=1e-9)


def test_after_midnight_with_start_datetime():
    injection = dt.datetime(2024, 3, 5, 23, 40)
    series = dt.datetime(2024, 3, 6, 0, 45)
    c = conv(headers(series_dt=series, injection_dt=injection))
    assert c.decay_time_s == pytest.approx(65 * 60)
    assert c.factor == pytest.approx(expected_factor(65 * 60), rel=1e-9)


def test_after_midnight_with_start_time_only():
    injection = dt.datetime(2024, 3, 5, 23, 40)
    series = dt.datetime(2024, 3, 6, 0, 45)
    c = conv(headers(series_dt=series, injection_dt=injection, start_time_only=True))
    assert c.decay_time_s == pytest.approx(65 * 60)  # not -22h55 (time of day without the date)
    assert any("previous day" in note for note in c.notes)


def test_start_time_only_same_day():
    c = conv(headers(series_dt=INJECTION + dt.timedelta(minutes=70), injection_dt=INJECTION, start_time_only=True))
    assert c.decay_time_s == pytest.approx(70 * 60)


def test_admin_decay_correction_means_no_decay():
    c = conv(headers(decay="ADMIN", series_dt=INJECTION + dt.timedelta(minutes=70), injection_dt=INJECTION))
    assert c.time_reference is TimeReference.ADMIN and c.decay_time_s == 0
    assert c.factor == pytest.approx(WEIGHT * 1000 / DOSE, rel=1e-12)


def test_gml_is_already_suv():
    c = conv(headers(units="GML", series_dt=INJECTION, injection_dt=INJECTION))
    assert c.factor == 1.0 and c.time_reference is TimeReference.GML


def philips(hs, suv_scale=None, activity_scale=None):
    for ds in hs:
        block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
        if suv_scale is not None:
            block.add_new(0x00, "DS", f"{suv_scale:.10g}")
        if activity_scale is not None:
            block.add_new(0x09, "DS", f"{activity_scale:.10g}")
    return hs


def test_philips_counts_with_suv_scale_factor():
    series = INJECTION + dt.timedelta(minutes=60)
    activity_scale = 1.73  # Bq/ml per count
    vendor = activity_scale * expected_factor(3600)
    c = conv(philips(headers(units="CNTS", series_dt=series, injection_dt=INJECTION), vendor, activity_scale))
    assert c.units is Units.CNTS
    assert c.factor == pytest.approx(vendor, rel=1e-9)


def test_philips_counts_with_activity_scale_only():
    series = INJECTION + dt.timedelta(minutes=60)
    c = conv(philips(headers(units="CNTS", series_dt=series, injection_dt=INJECTION), None, 1.73))
    assert c.factor == pytest.approx(1.73 * expected_factor(3600), rel=1e-9)


def test_philips_counts_without_private_factors_rejected():
    with pytest.raises(SUVError, match="7053"):
        conv(headers(units="CNTS", series_dt=INJECTION + dt.timedelta(hours=1), injection_dt=INJECTION))


def test_missing_decay_correction_with_decy_assumes_start():
    series = INJECTION + dt.timedelta(minutes=60)
    c = conv(headers(decay=None, series_dt=series, injection_dt=INJECTION))
    assert c.decay_correction is DecayCorrection.START
    assert c.factor == pytest.approx(expected_factor(3600), rel=1e-9)
    assert any("START assumed" in note for note in c.notes)


@pytest.mark.parametrize(
    "kwargs,phrase",
    [
        ({"decay": "NONE"}, "DecayCorrection is NONE"),
        ({"decay": None, "corrected": None}, "DecayCorrection and CorrectedImage are both missing"),
        ({"corrected": ("ATTN",)}, "not both attenuation"),
        ({"dose_bq": None}, "dose"),
        ({"half_life_s": None}, "RadionuclideHalfLife"),
        ({"weight_kg": None}, "PatientWeight"),
        ({"weight_kg": 72000.0}, "PatientWeight"),
        ({"dose_bq": 350.0}, "plausible dose"),
        ({"injection_dt": None}, "injection time"),
        ({"units": "PROPCNTS"}, "Units"),
        ({"units": None}, "Units"),
    ],
)
def test_rejections_name_the_cause(kwargs, phrase):
    args = {"series_dt": INJECTION + dt.timedelta(hours=1), "injection_dt": INJECTION, **kwargs}
    with pytest.raises(SUVError, match=phrase) as err:
        conv(headers(**args))
    assert "EX1" in str(err.value) and "1.2.3" in str(err.value)
    assert err.value.stage == "suv"


def test_injection_after_scan_rejected():
    with pytest.raises(SUVError, match="implausible"):
        conv(headers(series_dt=INJECTION, injection_dt=INJECTION + dt.timedelta(hours=2)))


def test_from_files_and_to_dict(tmp_path):
    series_time = INJECTION + dt.timedelta(minutes=58, seconds=30)
    t = write_series(tmp_path, modality="PT", n=3, extra=pet_timing(series_dt=series_time, injection_dt=INJECTION))
    info = SeriesInfo(series_uid=t.series_uid, study_uid=t.study_uid, frame_of_reference_uid=t.for_uid,
                      modality="PT", kind=SeriesKind.PET_AC, files=t.files)
    c = suv_conversion(info, exam_id="EX1")
    assert c.factor == pytest.approx(expected_factor(58 * 60 + 30), rel=1e-9)
    d = c.to_dict()
    assert d["time_reference"] == "series" and d["units"] == "BQML" and d["decay_correction"] == "START"
    assert d["factor"] == c.factor


# --- acceptance over the generated all-variants cohort (tests/conftest.py: synthetic_cohort) -------------


@pytest.mark.parametrize("index", range(9))
def test_cohort_suv_factor_within_0_1_percent(synthetic_cohort, index):
    from builder.convert.discover import discover_exam

    src, truths = synthetic_cohort
    t = truths[index].truth
    exam = discover_exam(src / "dicom" / t["exam_id"], t["exam_id"])
    c = suv_conversion(exam.pet, exam_id=t["exam_id"])
    assert c.factor == pytest.approx(t["suv_factor"], rel=1e-3)
    assert c.units.value == t["suv"]["units"]
    assert c.time_reference.value == t["suv"]["time_reference"]
    assert c.decay_correction.value == t["suv"]["decay_correction"]
    assert c.decay_time_s == pytest.approx(t["suv"]["decay_time_s"], abs=1.0)
    assert c.dose_bq == pytest.approx(t["suv"]["dose_bq"]) and c.weight_kg == pytest.approx(t["suv"]["weight_kg"])


def test_cohort_missing_dose_rejected(synthetic_cohort):
    from builder.convert.discover import discover_exam

    src, truths = synthetic_cohort
    t = next(et.truth for et in truths if et.truth["variant"]["bad"] == "missing_dose")
    exam = discover_exam(src / "dicom" / t["exam_id"], t["exam_id"])
    with pytest.raises(SUVError, match="dose") as err:
        suv_conversion(exam.pet, exam_id=t["exam_id"])
    assert err.value.stage == t["reject_stage"] == "suv"
