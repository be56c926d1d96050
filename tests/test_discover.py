"""discover_exam: classification and the CT/PET choice on exam folders the tests write themselves."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from builder.convert.discover import SeriesKind, discover_exam, scan_series
from builder.errors import DiscoveryError, ReadError
from tests.support.dicom_series import rotation, write_series


def exam(root: Path, *, pet_corrected=("ATTN", "DECY"), nac=True, localizer=True, junk=True):
    """A PET/CT exam with the usual companions, nested at random depths; returns the truths by role."""
    study, frame = generate_uid(), generate_uid()
    out = {
        "ct": write_series(root / "a" / "b" / "CT", n=6, study_uid=study, for_uid=frame, description="WB CT"),
        "pet": write_series(root / "PET" / "x", modality="PT", n=4, slice_spacing=4.0, study_uid=study,
                            for_uid=frame, description="PET AC", extra={"CorrectedImage": list(pet_corrected)}),
    }
    if nac:
        out["nac"] = write_series(root / "PET" / "nac", modality="PT", n=4, slice_spacing=4.0, study_uid=study,
                                  for_uid=frame, description="PET NAC", extra={"CorrectedImage": ["DECY"]})
    if localizer:
        # A topogram: one coronal image; more files than nothing but never a volume.
        out["loc"] = write_series(root / "scout", n=2, study_uid=study, for_uid=frame, description="Topogram",
                                  image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), rot=rotation(90, 0, 0))
    if junk:
        (root / "a" / "README.txt").write_text("exported by PACS\n")
        (root / "PET" / "thumbs.db").write_bytes(b"\x00\x01binary")
    return out


def test_pair_chosen_and_companions_ignored(tmp_path, caplog):
    truths = exam(tmp_path)
    with caplog.at_level(logging.INFO, logger="builder.convert.discover"):
        found = discover_exam(tmp_path, "EX1")
    assert found.ct.series_uid == truths["ct"].series_uid
    assert found.pet.series_uid == truths["pet"].series_uid
    assert sorted(found.ct.files) == sorted(truths["ct"].files)
    assert found.ct.kind is SeriesKind.CT_VOLUME and found.pet.kind is SeriesKind.PET_AC
    kinds = {s.series_uid: s.kind for s in found.ignored}
    assert kinds == {truths["nac"].series_uid: SeriesKind.PET_NAC, truths["loc"].series_uid: SeriesKind.CT_LOCALIZER}
    assert {p.name for p in found.skipped_files} == {"README.txt", "thumbs.db"}
    assert "README.txt" in caplog.text  # the ignored non-DICOM file is noted


def test_preamble_less_files_are_read(tmp_path):
    truths = exam(tmp_path, nac=False, localizer=False, junk=False)
    for f in truths["pet"].files:  # strip preamble + DICM + file meta, as some old exports do
        ds = pydicom.dcmread(f)
        f.unlink()
        del ds.file_meta
        ds.preamble = None
        ds.save_as(f.with_suffix(""), enforce_file_format=False, implicit_vr=True, little_endian=True)
    found = discover_exam(tmp_path, "EX1")
    assert found.pet.series_uid == truths["pet"].series_uid and found.pet.n_files == 4


def test_dicomdir_is_skipped(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset

    truths = exam(tmp_path, nac=False, localizer=False, junk=False)
    ds = Dataset()
    ds.FileSetID = "EXPORT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory (DICOMDIR)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    found = discover_exam(tmp_path, "EX1")
    assert found.ct.series_uid == truths["ct"].series_uid
    assert tmp_path / "DICOMDIR" in found.skipped_files


def test_most_slices_ct_wins(tmp_path):
    truths = exam(tmp_path)
    small = write_series(tmp_path / "ct2", n=3, study_uid=truths["ct"].study_uid, for_uid=truths["ct"].for_uid)
    found = discover_exam(tmp_path, "EX1")
    assert found.ct.series_uid == truths["ct"].series_uid
    assert small.series_uid in {s.series_uid for s in found.ignored}


def test_two_equal_cts_is_ambiguous(tmp_path):
    truths = exam(tmp_path)
    other = write_series(tmp_path / "ct2", n=6, study_uid=truths["ct"].study_uid, for_uid=truths["ct"].for_uid)
    with pytest.raises(DiscoveryError, match="two candidate CT") as err:
        discover_exam(tmp_path, "EX1")
    assert truths["ct"].series_uid in str(err.value) and other.series_uid in str(err.value)
    assert "EX1" in str(err.value)


def test_no_corrected_pet(tmp_path):
    exam(tmp_path, pet_corrected=("DECY",))
    with pytest.raises(DiscoveryError, match="no attenuation-corrected PET") as err:
        discover_exam(tmp_path, "EX1")
    assert "pet_nac" in str(err.value) and "ct_volume" in str(err.value)  # lists what was found


def test_two_corrected_pets_is_ambiguous(tmp_path):
    truths = exam(tmp_path)
    write_series(tmp_path / "pet2", modality="PT", n=4, slice_spacing=4.0, study_uid=truths["ct"].study_uid,
                 for_uid=truths["ct"].for_uid)
    with pytest.raises(DiscoveryError, match="2 attenuation-corrected PET"):
        discover_exam(tmp_path, "EX1")


def test_different_frames_of_reference(tmp_path):
    study = generate_uid()
    ct = write_series(tmp_path / "ct", n=5, study_uid=study)
    pet = write_series(tmp_path / "pet", modality="PT", n=3, study_uid=study)
    with pytest.raises(DiscoveryError, match="different frames of reference") as err:
        discover_exam(tmp_path, "EX1")
    assert ct.for_uid in str(err.value) and pet.for_uid in str(err.value)


def test_no_ct(tmp_path):
    write_series(tmp_path / "pet", modality="PT", n=3)
    with pytest.raises(DiscoveryError, match="no axial CT volume"):
        discover_exam(tmp_path, "EX1")


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    with pytest.raises(DiscoveryError, match="no DICOM file"):
        discover_exam(tmp_path / "e", "EX1")
    with pytest.raises(DiscoveryError, match="not found"):
        discover_exam(tmp_path / "nope", "EX1")


def test_corrupt_header_named_by_path(tmp_path):
    truths = exam(tmp_path, nac=False, localizer=False, junk=False)
    victim = truths["ct"].files[1]
    victim.write_bytes(victim.read_bytes()[:200])  # cut inside the header
    with pytest.raises(ReadError) as err:
        discover_exam(tmp_path, "EX1")
    assert str(victim) in str(err.value) and "corrupt" in str(err.value)


def test_same_instance_exported_twice_counts_once(tmp_path):
    truths = exam(tmp_path, nac=False, localizer=False, junk=False)
    copy = tmp_path / "copy" / "again.dcm"
    copy.parent.mkdir()
    copy.write_bytes(truths["ct"].files[0].read_bytes())
    found = discover_exam(tmp_path, "EX1")
    assert found.ct.n_files == 6 and copy in found.skipped_files


def test_mip_and_secondary_capture_are_other(tmp_path):
    truths = exam(tmp_path, nac=False, localizer=False, junk=False)
    mip = write_series(tmp_path / "mip", modality="PT", n=3, study_uid=truths["ct"].study_uid,
                       for_uid=truths["ct"].for_uid, image_type=("DERIVED", "SECONDARY", "MIP"))
    series, _ = scan_series(tmp_path, "EX1")
    assert {s.series_uid: s.kind for s in series}[mip.series_uid] is SeriesKind.OTHER


# --- acceptance over the generated all-variants cohort (tests/conftest.py: synthetic_cohort) -------------


@pytest.mark.parametrize("index", range(12))
def test_cohort_series_choice(synthetic_cohort, index):
    src, truths = synthetic_cohort
    t = truths[index].truth
    found = discover_exam(src / "dicom" / t["exam_id"], t["exam_id"])
    assert found.ct.series_uid == t["ct"]["series_uid"]
    assert found.pet.series_uid == t["pet"]["series_uid"]
    assert {s.series_uid for s in found.ignored} == set(t["ignored_series_uids"])
    if t["variant"]["extra_series"]:
        assert {s.kind for s in found.ignored} >= {SeriesKind.CT_LOCALIZER, SeriesKind.PET_NAC}
    n_ct = t["ct"]["size"][2] - (1 if t["variant"]["bad"] == "missing_slice" else 0)
    assert found.ct.n_files == n_ct and found.pet.n_files == t["pet"]["size"][2]
