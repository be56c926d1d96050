"""Every fenced block of README.md runs as written, or is excluded here with its reason.

The user's blocks run in a folder holding ``./mirror`` (a small release published into a local
mirror): the python blocks top to bottom as one script (as in a notebook: later blocks use ``item``),
each line of the bash blocks in a shell. Substituted, and only these: the Hub repo id
``org/lymphatlas`` becomes ``./mirror`` (no network here; README says ``revision=`` is ignored on
folders) and the placeholder case id ``LA-xxxxxxxx`` a case of the release. The maintainers' block
runs (slow) with its placeholders filled and its ``[optional]`` parts left out. What they write is
read back with the ecosystem's own tools (nnU-Net's dataset.json, MONAI's datalist loader, nibabel).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)

EXCLUDED = {
    "bash scripts/demo.sh": "the demo itself (setup, a synthetic cohort, every stage: many minutes); its stages run below",
    "bash scripts/test.sh": "the test suite itself",
    "bash scripts/mutation.sh": "mutation testing, about 70 minutes on a loaded 2-core machine, not in CI",
    "dask scheduler --port 8786": "a cluster across nodes; tests/test_cluster.py starts a real scheduler and two workers",
    "@article": "a citation, not a command",
    "lymphatlas evaluate pred": "needs a model's predictions for every case of the fold; tests/test_evaluate.py runs this "
                                "command in a subprocess from another folder on predictions written for a release",
}
USER_BASH = "lymphatlas info"
BUILDER_BASH = "python -m builder synth"


def readme_blocks() -> list[tuple[str, str]]:
    return FENCE.findall((REPO / "README.md").read_text())


def classify(code: str) -> str:
    first = code.strip().splitlines()[0]
    for prefix in EXCLUDED:
        if first.startswith(prefix):
            return "excluded"
    if first.startswith(USER_BASH):
        return "user-bash"
    if first.startswith(BUILDER_BASH):
        return "builder-bash"
    return "unknown"


def test_every_readme_block_is_run_or_excluded_with_a_reason():
    kinds = [(lang, classify(code) if lang == "bash" else lang) for lang, code in readme_blocks()]
    assert all(kind in ("python", "excluded", "user-bash", "builder-bash") for _, kind in kinds), kinds
    assert sum(kind == "python" for _, kind in kinds) >= 3 and ("bash", "user-bash") in kinds
    assert ("bash", "builder-bash") in kinds


def _lines(code: str) -> list[str]:
    return [line.split(" #")[0].strip() for line in code.splitlines() if line.split(" #")[0].strip()]


@pytest.fixture(scope="module")
def mirror_folder(tmp_path_factory):
    from builder.release.publish import publish_mirror
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("readme")
    release = build_fake_release(root, n_patients=12, seed=8, shape_zyx=(12, 16, 16), name="lymphatlas")
    publish_mirror(release.path, root / "mirror")
    return root


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "LYMPHATLAS_CACHE": str(home / "cache"),
           "HF_DATASETS_CACHE": str(home / "hf"), "PATH": str(BIN) + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow  # about 3 minutes on the loaded 2-core machine (DataLoader workers, MONAI, nnU-Net export)
def test_the_users_readme_lines_run_against_a_mirror(mirror_folder, tmp_path):
    root = mirror_folder
    env = _env(tmp_path)
    case_id = json.loads((root / "mirror" / "1.0.0" / "manifest.json").read_text())["cases"]
    case_id = sorted(case_id)[0]
    python = "\n".join(code for lang, code in readme_blocks() if lang == "python")
    assert python.count('"org/lymphatlas"') == 2  # the Hub lines: what is substituted, and nothing else
    script = tmp_path / "readme.py"
    script.write_text(python.replace('"org/lymphatlas"', '"./mirror"'))
    proc = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert list((root / "pred").rglob("*.nii.gz"))  # MONAI's SaveImage wrote the resampled label
    (bash,) = [code for lang, code in readme_blocks() if lang == "bash" and classify(code) == "user-bash"]
    for line in _lines(bash):
        line = line.replace("LA-xxxxxxxx", case_id)
        proc = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    (dataset_json,) = (root / "nnUNet_raw").glob("Dataset502_*/dataset.json")
    dataset = json.loads(dataset_json.read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "PET"} and dataset["numTraining"] > 0, dataset
    from monai.data import load_decathlon_datalist

    assert load_decathlon_datalist(str(root / "lymphatlas_monai" / "datalist.json"), True, "training")
    assert (root / "case.png").stat().st_size > 0


def _filled(line: str, subject: str) -> str:
    """A maintainer's line with its placeholders filled and its [optional] parts and alternatives left out."""
    line = re.sub(r"\s*\[[^\]]*\]", "", line).split(" | ")[0]
    line = line.replace("ID...", subject).replace("--exams 12", "--exams 2")
    for word, value in (("SOURCE", "src"), ("WORK", "work"), ("RELEASE", "rel"), ("MIRROR", "mirror")):
        line = re.sub(rf"\b{word}\b", value, line)
    return line


@pytest.mark.slow
def test_the_maintainers_readme_lines_run(tmp_path):
    """synth, convert, report, an update release on a mirror, publish, withdraw: as README lists them.
    Before the README's `release ... --version 1.1.0 --mirror MIRROR` (an update) the mirror gets 1.0.0."""
    env = _env(tmp_path)
    (bash,) = [code for lang, code in readme_blocks() if lang == "bash" and classify(code) == "builder-bash"]
    lines = _lines(bash)

    def run(line: str) -> None:
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    for line in lines:
        if " release " in line:  # the update needs a first version on the mirror
            run("python -m builder release work rel0 --version 1.0.0 && python -m builder publish rel0 --mirror mirror")
        if " withdraw " in line:
            subject = sorted(p.name for p in (tmp_path / "work" / "cases").iterdir())[0]
            run(_filled(line, subject))
            continue
        run(_filled(line, ""))
    versions = json.loads((tmp_path / "mirror" / "versions.json").read_text())
    assert "1.1.0" in json.dumps(versions)
    assert (tmp_path / "work" / "qc" / "index.html").is_file()
