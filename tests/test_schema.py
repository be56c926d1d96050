from lymphatlas_ds import schema
from lymphatlas_synth.fake_work import make_fake_work


def test_configs_and_channels():
    assert [c.value for c in schema.Config] == ["all", "hl", "nhl"]
    assert schema.CHANNELS == ("CT", "PET")
    assert schema.LABELS == {"background": 0, "lesion": 1}
    assert schema.Diagnosis.NHL.config is schema.Config.NHL


def test_fake_work_follows_contract(tmp_path):
    import nibabel as nib
    import numpy as np

    cases = make_fake_work(tmp_path / "work", n_patients=3)
    assert len(cases) == 4  # patient 0 has two exams
    c = cases[0]
    img = nib.load(tmp_path / "work" / "cases" / c.case_id / "ct.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), c.ct)
    np.testing.assert_allclose(img.affine, c.affine)


def test_every_geometry_column_names_one_axis_order():
    """One convention per row: 3-vectors of the CT grid are (x, y, z), as nibabel reads the Nifti cells."""
    vectors = [name for name, kind in schema.METADATA_COLUMNS.items() if kind.endswith("[3]")]
    assert vectors and all(name.endswith("_xyz") for name in vectors), vectors
    assert "shape" not in schema.METADATA_COLUMNS and "spacing" not in schema.METADATA_COLUMNS
