"""builder.convert.qc: each check fails on the input it guards against, and passes on a sound case."""

from __future__ import annotations

import numpy as np
import pytest

from builder.convert import qc
from builder.errors import QCError


def _case(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (20, 32, 32)
    z, y, x = np.mgrid[0:20, 0:32, 0:32]
    body = ((x - 16) / 12.0) ** 2 + ((y - 16) / 10.0) ** 2 <= 1
    ct = np.where(body, rng.normal(30, 20, shape), -1000).astype(np.int16)
    pet = np.where(body, rng.gamma(4, 0.3, shape), 0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[8:12, 14:18, 14:18] = 1
    pet[label > 0] = 12.0
    alignment = {"shift_mm": 3.0, "rotation_deg": 0.5, "metric_before": -0.3, "metric_after": -0.35}
    return dict(ct=ct, pet=pet, label=label, body=body, lesion_fov_fraction=1.0, grids_identical=True,
                alignment=alignment)


def _failed(**changes) -> set[str]:
    case = _case()
    case.update(changes)
    return {c.name for c in qc.run_checks(**case) if not c.passed}


def test_sound_case_passes_every_check() -> None:
    checks = qc.run_checks(**_case())
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    names = {c.name for c in checks}
    assert {"grids_identical", "suv_body_median", "label_binary", "label_inside_body", "pet_fov_covers_lesions",
            "registration_shift_mm", "registration_not_worse"} <= names
    qc.require_passed(checks, exam_id="EX1")
    assert qc.summary(checks)["passed"] is True


def test_each_check_catches_its_fault() -> None:
    c = _case()
    assert _failed(grids_identical=False) == {"grids_identical"}
    assert "suv_body_median" in _failed(pet=c["pet"] * 1000)  # Bq/ml left unconverted
    assert "suv_body_median" in _failed(pet=c["pet"] / 1000)
    assert _failed(ct=np.where(c["body"], c["ct"], -3000).astype(np.int16)) >= {"ct_min_hu"}
    bad_label = c["label"].copy()
    bad_label[0, 0, 0] = 2
    assert "label_binary" in _failed(label=bad_label)
    outside = np.zeros_like(c["label"])
    outside[0:3, 0:3, 0:3] = 1
    assert "label_inside_body" in _failed(label=outside)
    assert _failed(lesion_fov_fraction=0.8) == {"pet_fov_covers_lesions"}
    assert _failed(alignment=dict(c["alignment"], shift_mm=35.0)) == {"registration_shift_mm"}
    assert _failed(alignment=dict(c["alignment"], rotation_deg=9.0)) == {"registration_rotation_deg"}
    assert _failed(alignment=dict(c["alignment"], metric_after=-0.2)) == {"registration_not_worse"}
    assert "suv_non_negative" in _failed(pet=c["pet"] - 0.5)


def test_failure_names_check_value_and_threshold() -> None:
    case = _case()
    case["lesion_fov_fraction"] = 0.5
    checks = qc.run_checks(**case)
    with pytest.raises(QCError) as e:
        qc.require_passed(checks, exam_id="EX9")
    msg = str(e.value)
    assert "EX9" in msg and "pet_fov_covers_lesions = 0.5" in msg and ">= 0.99" in msg
    assert e.value.stage == "qc"


def test_checks_serialise_for_case_json() -> None:
    import json

    out = qc.summary(qc.run_checks(**_case()))
    again = json.loads(json.dumps(out))
    assert again == out and set(out["checks"][0]) == {"name", "passed", "value", "threshold"}
