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
from tests.support.small_data import DOSE, HALF_LIFE, INJECTION, SERIES, WEIGHT


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


@pytest.mark.parametrize("activity_scale", [1.73, 0.41])  # Bq/ml per count, either side of 1
def test_philips_counts_with_activity_scale_only(activity_scale):
    series = INJECTION + dt.timedelta(minutes=60)
    c = conv(philips(headers(units="CNTS", series_dt=series, injection_dt=INJECTION), None, activity_scale))
    assert c.factor == pytest.approx(activity_scale * expected_factor(3600), rel=1e-9)


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
        ({"decay": "RADIATION"}, "is not START, ADMIN or NONE"),
    ],
)
def test_rejections_name_the_cause(kwargs, phrase):
    args = {"series_dt": INJECTION + dt.timedelta(hours=1), "injection_dt": INJECTION, **kwargs}
    with pytest.raises(SUVError, match=phrase) as err:
        conv(headers(**args))
    assert "EX1" in str(err.value) and "1.2.3" in str(err.value)
    assert err.value.stage == "suv"


def test_injection_after_scan_rejected():
    with pytest.raises(SUVError, match="implausible") as err:
        conv(headers(series_dt=INJECTION, injection_dt=INJECTION + dt.timedelta(hours=2)))
    assert (err.value.exam_id, err.value.series_uid) == ("EX1", SERIES.series_uid)


def test_no_scan_time_at_all_is_rejected_with_its_exam_and_series():
    hs = headers(series_dt=INJECTION + dt.timedelta(hours=1), injection_dt=INJECTION)
    for ds in hs:
        for key in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime"):
            if key in ds:
                delattr(ds, key)
    with pytest.raises(SUVError, match="neither SeriesDate/SeriesTime nor AcquisitionDate/AcquisitionTime") as err:
        conv(hs)
    assert (err.value.exam_id, err.value.series_uid) == ("EX1", SERIES.series_uid)


def test_a_series_without_files_or_with_an_unreadable_file_is_rejected_with_its_exam_series_and_file(tmp_path):
    info = SeriesInfo(series_uid="9.8.7", study_uid="1.2", frame_of_reference_uid="1.3", modality="PT",
                      kind=SeriesKind.PET_AC, files=())
    with pytest.raises(SUVError, match="the PET series has no files") as err:
        suv_conversion(info, exam_id="EX2")
    assert (err.value.exam_id, err.value.series_uid) == ("EX2", "9.8.7")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"")
    info = SeriesInfo(series_uid="9.8.7", study_uid="1.2", frame_of_reference_uid="1.3", modality="PT",
                      kind=SeriesKind.PET_AC, files=(bad,))
    with pytest.raises(SUVError, match="the PET header cannot be read") as err:
        suv_conversion(info, exam_id="EX2")
    assert (err.value.exam_id, err.value.series_uid, err.value.path) == ("EX2", "9.8.7", str(bad))


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


# --- boundaries and header forms (scripts/mutation.sh survivors of the SUV module) -------------------


def test_to_dict_holds_every_field_by_its_case_json_name():
    series = INJECTION + dt.timedelta(minutes=60)
    c = conv(headers(series_dt=series, injection_dt=INJECTION, corrected=None))
    assert c.to_dict() == {
        "factor": expected_factor(3600), "units": "BQML", "decay_correction": "START", "time_reference": "series",
        "decay_time_s": 3600.0, "dose_bq": DOSE, "half_life_s": HALF_LIFE, "weight_kg": WEIGHT,
        "notes": ["CorrectedImage missing; relying on DecayCorrection"],
    }
    gml = conv(headers(units="GML", series_dt=series, injection_dt=INJECTION)).to_dict()
    assert gml == {"factor": 1.0, "units": "GML", "decay_correction": None, "time_reference": "gml",
                   "decay_time_s": None, "dose_bq": None, "half_life_s": None, "weight_kg": WEIGHT,
                   "notes": ["values already SUVbw (GML)"]}


def test_acquisition_datetime_alone_is_read_as_the_beds_time():
    # a re-created series whose beds carry only AcquisitionDateTime (no AcquisitionDate / Time)
    beds = INJECTION + dt.timedelta(minutes=55)
    hs = headers(series_dt=INJECTION + dt.timedelta(minutes=90), injection_dt=INJECTION)
    for k, ds in enumerate(hs):
        del ds.AcquisitionDate, ds.AcquisitionTime
        ds.AcquisitionDateTime = (beds + dt.timedelta(minutes=3 * k)).strftime("%Y%m%d%H%M%S.%f")
    c = conv(hs)
    assert c.time_reference is TimeReference.ACQUISITION and c.decay_time_s == pytest.approx(55 * 60)
    assert c.notes == ("series time after (or without) acquisition time: earliest acquisition time used",)


@pytest.mark.parametrize("weight,ok", [(1.0, True), (400.0, True), (0.99, False), (400.5, False)])
def test_plausible_weight_bounds_are_inclusive(weight, ok):
    args = dict(series_dt=INJECTION + dt.timedelta(hours=1), injection_dt=INJECTION, weight_kg=weight)
    if ok:
        assert conv(headers(**args)).factor == pytest.approx(expected_factor(3600, weight=weight), rel=1e-9)
    else:
        with pytest.raises(SUVError, match="not a plausible weight"):
            conv(headers(**args))


@pytest.mark.parametrize("field,value,phrase", [("weight_kg", 0.0, "missing or zero"), ("dose_bq", 0.0, "is missing"),
                                                ("half_life_s", 0.0, "RadionuclideHalfLife is missing")])
def test_zero_weight_dose_or_half_life_is_missing_not_implausible(field, value, phrase):
    with pytest.raises(SUVError, match=phrase):
        conv(headers(series_dt=INJECTION + dt.timedelta(hours=1), injection_dt=INJECTION, **{field: value}))


def test_smallest_plausible_dose_and_no_radiopharmaceutical_sequence():
    c = conv(headers(series_dt=INJECTION + dt.timedelta(hours=1), injection_dt=INJECTION, dose_bq=1e6))
    assert c.factor == pytest.approx(expected_factor(3600, dose=1e6), rel=1e-9)
    hs = headers(series_dt=INJECTION + dt.timedelta(hours=1), injection_dt=INJECTION)
    for ds in hs:
        del ds.RadiopharmaceuticalInformationSequence
    with pytest.raises(SUVError, match="RadionuclideTotalDose"):
        conv(hs)


@pytest.mark.parametrize("minutes", [0, 24 * 60])
def test_decay_time_of_zero_and_of_a_day_are_accepted(minutes):
    c = conv(headers(series_dt=INJECTION + dt.timedelta(minutes=minutes), injection_dt=INJECTION))
    assert c.decay_time_s == pytest.approx(minutes * 60) and c.factor == pytest.approx(expected_factor(minutes * 60))
    # a time-only injection at the scan's time of day is that day's, not the day before
    same = conv(headers(series_dt=INJECTION + dt.timedelta(minutes=minutes), injection_dt=INJECTION,
                        start_time_only=True))
    assert same.decay_time_s == 0.0


def test_start_time_only_without_a_series_date_uses_the_scan_date():
    hs = headers(series_dt=INJECTION + dt.timedelta(minutes=50), injection_dt=INJECTION, start_time_only=True)
    for ds in hs:
        del ds.SeriesDate, ds.SeriesTime
    c = conv(hs)
    assert c.time_reference is TimeReference.ACQUISITION and c.decay_time_s == pytest.approx(50 * 60)


def test_philips_factors_that_agree_give_no_note_and_a_zero_suv_factor_is_not_used():
    series = INJECTION + dt.timedelta(minutes=60)
    ours = 1.73 * expected_factor(3600)
    c = conv(philips(headers(units="CNTS", series_dt=series, injection_dt=INJECTION), ours * 1.009, 1.73))
    assert c.factor == pytest.approx(ours * 1.009) and c.notes == ("CNTS: Philips SUV scale factor (7053,1000)",)
    zero = conv(philips(headers(units="CNTS", series_dt=series, injection_dt=INJECTION), 0.0, 1.73))
    assert zero.factor == pytest.approx(ours, rel=1e-9)
    assert zero.notes == ("CNTS: Philips activity scale factor (7053,1009) x BQML factor",)
    with pytest.raises(SUVError, match="7053") as err:
        conv(philips(headers(units="CNTS", series_dt=series, injection_dt=INJECTION), 0.0, 0.0))
    assert (err.value.exam_id, err.value.series_uid) == ("EX1", SERIES.series_uid)


def test_private_values_without_a_dictionary_entry_are_read_from_their_bytes():
    # implicit VR files of a reader without the private dictionary: the values arrive as raw bytes
    series = INJECTION + dt.timedelta(minutes=60)
    hs = headers(units="CNTS", series_dt=series, injection_dt=INJECTION)
    for ds in hs:
        block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
        block.add_new(0x00, "UN", b"0.00123 ")
        block.add_new(0x09, "UN", b"1.73\x00")
    assert conv(hs).factor == pytest.approx(0.00123)
    first_bed = INJECTION + dt.timedelta(minutes=61)
    hs = headers(series_dt=INJECTION + dt.timedelta(minutes=90), injection_dt=INJECTION, acquisition_dt=first_bed)
    for ds in hs:
        block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
        block.add_new(0x0D, "UN", (first_bed - dt.timedelta(seconds=95)).strftime("%Y%m%d%H%M%S.%f").encode() + b"\x00")
    assert conv(hs).decay_time_s == pytest.approx(61 * 60 - 95)
    assert conv(hs).notes == ("series time after acquisition time: GE private scan date/time (0009,100D) used",)
