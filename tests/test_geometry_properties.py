"""Property tests of the slice sort / spacing checks (builder.convert.read.slice_geometry).

Random orientations, slice orders and spacings: an intact stack always sorts back to its truth;
a single removed interior slice or a single duplicated slice is always caught and named.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import GeometryError
from builder.convert.read import slice_geometry
from tests.support.dicom_series import rotation

angles = st.tuples(*[st.floats(-180, 180, allow_nan=False)] * 3)
spacings = st.floats(0.3, 6.0, allow_nan=False)
origins = st.tuples(*[st.floats(-500, 500, allow_nan=False)] * 3)


@st.composite
def stacks(draw, min_n=3, max_n=40):
    """A regular stack: positions (shuffled), orientation and its truth."""
    n = draw(st.integers(min_n, max_n))
    rot = rotation(*draw(angles))
    spacing = draw(spacings)
    origin = np.asarray(draw(origins))
    normal = np.cross(rot[:, 0], rot[:, 1])
    # Positions rounded like DS strings (6 decimals), as a scanner writes them.
    positions = np.round(origin + np.outer(np.arange(n) * spacing, normal), 6)
    perm = draw(st.permutations(list(range(n))))
    iop = np.round(np.concatenate([rot[:, 0], rot[:, 1]]), 8)
    return {"n": n, "rot": rot, "spacing": spacing, "positions": positions, "perm": list(perm), "iop": iop,
            "normal": normal}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_intact_stack_sorts_back_to_truth(s):
    shuffled = s["positions"][s["perm"]]
    g = slice_geometry(shuffled, [s["iop"]] * s["n"])
    # Sorting recovers the generation order whatever the file order.
    assert [s["perm"][i] for i in g.order] == list(range(s["n"]))
    assert g.slice_spacing == pytest.approx(s["spacing"], abs=1e-5)
    assert np.allclose(g.origin, s["positions"][0], atol=1e-6)
    direction = np.asarray(g.direction).reshape(3, 3)
    assert np.allclose(direction, np.column_stack([s["rot"][:, 0], s["rot"][:, 1], s["normal"]]), atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(stacks(min_n=4), st.data())
def test_single_removed_interior_slice_is_caught_with_its_position(s, data):
    removed = data.draw(st.integers(1, s["n"] - 2))
    keep = [i for i in s["perm"] if i != removed]
    with pytest.raises(GeometryError, match="missing slice") as err:
        slice_geometry(s["positions"][keep], [s["iop"]] * len(keep), exam_id="EX1", series_uid="1.2.3")
    expected = float(s["positions"][removed] @ s["normal"])
    found = re.search(r"the first at (-?[0-9.]+) mm along the slice normal", str(err.value))
    assert found, str(err.value)
    # the message prints 2 decimals of the gap's position, computed from its neighbours: the printed value
    # is within half a hundredth (rounding) plus the positions' 1e-6 mm rounding of the removed slice's
    assert abs(float(found.group(1)) - expected) <= 0.005 + 1e-5, (found.group(1), expected)
    assert "EX1" in str(err.value) and "1.2.3" in str(err.value)


@settings(max_examples=150, deadline=None)
@given(stacks(min_n=2), st.data())
def test_single_duplicated_slice_is_caught(s, data):
    dup = data.draw(st.integers(0, s["n"] - 1))
    where = data.draw(st.integers(0, s["n"]))
    order = list(s["perm"])
    order.insert(where, dup)
    with pytest.raises(GeometryError, match="two slices at one position"):
        slice_geometry(s["positions"][order], [s["iop"]] * len(order))


@settings(max_examples=60, deadline=None)
@given(stacks(min_n=4), st.data())
def test_one_slice_moved_off_the_grid_is_caught(s, data):
    k = data.draw(st.integers(1, s["n"] - 2))
    shift = data.draw(st.floats(0.2, 0.8)) * s["spacing"]  # far beyond the tolerance, not onto a neighbour
    positions = s["positions"].copy()
    positions[k] = positions[k] + shift * s["normal"] * data.draw(st.sampled_from([-1, 1])) * 0.5
    with pytest.raises(GeometryError, match="non-uniform slice spacing|two slices"):
        slice_geometry(positions[s["perm"]], [s["iop"]] * s["n"])


@settings(max_examples=60, deadline=None)
@given(stacks(min_n=3), st.floats(2.0, 30.0), st.data())
def test_gantry_tilt_is_caught(s, tilt_deg, data):
    # A tilted gantry shifts each slice sideways (along the column direction) in proportion to its depth.
    shift = np.tan(np.radians(tilt_deg)) * s["spacing"]
    positions = s["positions"] + np.outer(np.arange(s["n"]) * shift, s["rot"][:, 1])
    with pytest.raises(GeometryError, match="gantry tilt"):
        slice_geometry(positions[s["perm"]], [s["iop"]] * s["n"])


@settings(max_examples=60, deadline=None)
@given(stacks(min_n=3), st.floats(0.5, 20.0), st.data())
def test_mixed_orientation_is_caught(s, angle, data):
    k = data.draw(st.integers(0, s["n"] - 1))
    tilted = s["rot"] @ rotation(angle, 0, 0)
    iops = [s["iop"]] * s["n"]
    iops[k] = np.concatenate([tilted[:, 0], tilted[:, 1]])
    with pytest.raises(GeometryError, match="mixed slice orientations"):
        slice_geometry(s["positions"][s["perm"]], iops)


def test_rounded_positions_within_tolerance_are_accepted():
    # IPP rounded to 0.01 mm on a 0.6 mm grid (seen in real exports) is not a gap.
    pos = np.round(np.outer(np.arange(50) * 0.6 + 0.003 * np.sin(np.arange(50)), [0, 0, 1]), 2)
    g = slice_geometry(pos, [[1, 0, 0, 0, 1, 0]] * 50)
    assert g.slice_spacing == pytest.approx(0.6, abs=1e-3)


def test_single_slice_is_rejected():
    with pytest.raises(GeometryError, match="at least 2"):
        slice_geometry([[0, 0, 0]], [[1, 0, 0, 0, 1, 0]])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(angles, st.floats(0.5, 5.0), st.integers(2, 7), st.integers(0, 2**16), st.booleans())
def test_files_in_any_orientation_and_order_read_back_exactly(tmp_path_factory, ang, spacing, n, seed, unsigned):
    from builder.convert.discover import SeriesInfo, SeriesKind
    from builder.convert.read import read_series
    import SimpleITK as sitk
    from tests.support.dicom_series import write_series

    folder = tmp_path_factory.mktemp("prop")
    t = write_series(folder, n=n, rows=5, cols=6, slice_spacing=spacing, rot=rotation(*ang), seed=seed,
                     unsigned=unsigned)
    info = SeriesInfo(series_uid=t.series_uid, study_uid=t.study_uid, frame_of_reference_uid=t.for_uid,
                      modality="CT", kind=SeriesKind.CT_VOLUME, files=t.files)
    image, _ = read_series(info, exam_id="EX1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), t.volume)
    np.testing.assert_allclose(image.GetOrigin(), t.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), t.spacing, atol=1e-4)
    np.testing.assert_allclose(np.asarray(image.GetDirection()).reshape(3, 3), t.direction, atol=1e-6)
