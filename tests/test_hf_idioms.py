"""Plain Hugging Face `datasets` idioms, run as a user types them: the code blocks of the release's own
card and of the mirror's card, each in a fresh interpreter started from another folder, with the
datasets / Hub caches in the test's folder and the Hub offline. The exit status matters: streaming
used to abort the interpreter at exit (upstream pyarrow bug, lymphatlas_ds/_exit_guard.py).

Truth: the fake WORK arrays the releases were built from (lymphatlas_synth/fake_work.py) and each
release's splits.json; never the client's own output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import DatasetCard

import lymphatlas_ds
from builder.release.card import hub_readme
from builder.release.publish import publish_mirror
from tests.support.releases import build_fake_release

REPO = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A user's folder: ./lymphatlas (release 1.0.0) and ./mirror (1.0.0 and 1.1.0), with the fake truth."""
    root = tmp_path_factory.mktemp("user")
    first = build_fake_release(root, n_patients=6, seed=3, name="lymphatlas")
    second = build_fake_release(
        root, n_patients=3, seed=3, first_patient=40, version="1.1.0", name="r110", previous=first.path
    )
    publish_mirror(first.path, root / "mirror")
    publish_mirror(second.path, root / "mirror")
    truth = {**first.truth, **second.truth}
    return root, truth


def _env(cwd: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HOME": str(cwd / ".hf"),
        "HF_DATASETS_CACHE": str(cwd / ".hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "LYMPHATLAS_CACHE": str(cwd / ".lymphatlas-cache"),
    }


def _python(code: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout
    )


def _block(readme: Path, needle: str) -> str:
    """The python code block of a card that contains ``needle``, exactly as the card shows it."""
    blocks = [b for b in _BLOCK.findall(readme.read_text()) if needle in b]
    assert len(blocks) == 1, f"{readme}: expected one python block with {needle!r}, found {len(blocks)}"
    return blocks[0]


def _cases(release: Path, *, split: str, config: str = "all", fold: int | None = None) -> list[str]:
    entries = json.loads((release / "splits.json").read_text())["cases"]
    return sorted(
        c for c, e in entries.items()
        if e["split"] == split and config in ("all", e["diagnosis"].lower()) and (fold is None or e["fold"] == fold)
    )


def test_card_streaming_exits_cleanly_in_5_of_5_runs(user_folder):
    root, _ = user_folder
    code = _block(root / "lymphatlas" / "README.md", "streaming=True")
    assert 'datasets.load_dataset(os.getcwd(), "nhl", split="train", streaming=True)' in code
    train = _cases(root / "lymphatlas", split="train", config="nhl")
    for run in range(5):
        proc = _python(code, root / "lymphatlas")  # the card's lines run where it is read
        # 134: "terminate called without an active exception" at interpreter exit; 124/timeout: the hang
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip() in train, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_the_exit_guard_closes_readers_and_waits_until_pyarrow_lets_go_of_their_files(user_folder):
    root, _ = user_folder
    code = (
        "import datasets, lymphatlas_ds\n"
        "from lymphatlas_ds import _exit_guard\n"
        "ds = datasets.load_dataset('./lymphatlas', 'nhl', split='train', streaming=True)\n"
        "it = iter(ds)\n"
        "first = next(it)\n"  # a suspended reader, its file open, pyarrow's threads reading ahead
        "before = _exit_guard._scan()\n"
        "_exit_guard.wait_for_parquet_readers()\n"
        "after = _exit_guard._scan()\n"
        "print(len(before[0]), len(after[0]), len(after[1]))\n"
    )
    proc = _python(code, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one suspended parquet generator before; none after, and no closed parquet file left alive
    assert proc.stdout.split() == ["1", "0", "0"], proc.stdout


def test_card_datasets_lines_load_filter_and_decode_the_true_volumes(user_folder):
    root, truth = user_folder
    code = _block(root / "lymphatlas" / "README.md", "filters=")
    code += (
        "\nimport json, numpy as np\n"
        f"np.save({str(root / 'ct.npy')!r}, np.asarray(ct))\n"
        "print(json.dumps({'case': case['case_id'], 'ids': sorted(ds['case_id']), 'fold1': sorted(fold1['case_id'])}))\n"
    )
    proc = _python(code, root / "lymphatlas")  # the card's lines run where it is read
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    release = root / "lymphatlas"
    assert out["ids"] == _cases(release, split="train", config="nhl")
    assert out["fold1"] == _cases(release, split="train", config="nhl", fold=1)
    assert out["fold1"] and len(out["fold1"]) < len(out["ids"])  # the filter kept one fold, not all or nothing
    # nibabel's (x, y, z) array of the first case: the WORK volume, transposed
    np.testing.assert_array_equal(np.load(root / "ct.npy"), truth[out["case"]].ct.transpose(2, 1, 0))


def test_card_hf_torch_gives_torch_items_with_the_true_voxels(user_folder):
    root, truth = user_folder
    card = root / "lymphatlas" / "README.md"
    code = _block(card, "filters=") + _block(card, "hf_torch(")
    code += (
        "\nimport numpy as np, torch\n"
        "assert isinstance(item['image'], torch.Tensor)\n"
        f"np.save({str(root / 'image.npy')!r}, item['image'].numpy()); "
        f"np.save({str(root / 'label.npy')!r}, item['label'].numpy())\n"
        "print(item['case_id'])\n"
    )
    proc = _python(code, root / "lymphatlas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    case = truth[proc.stdout.strip().splitlines()[-1]]
    image, label = np.load(root / "image.npy"), np.load(root / "label.npy")
    assert image.shape == (2, *case.ct.shape) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], case.ct.astype(np.float32))  # channel 0 = CT (HU)
    np.testing.assert_array_equal(image[1], case.pet)  # channel 1 = PET (SUV)
    np.testing.assert_array_equal(label, case.label[None])


def test_mirror_card_lines_read_the_newest_version_or_the_pinned_one(user_folder):
    root, _ = user_folder
    mirror = root / "mirror"
    block = _block(mirror / "README.md", "load_dataset(")
    lines = [line for line in block.splitlines() if "load_dataset(" in line and "import" not in line]
    assert len(lines) == 2
    expected = [_cases(mirror / "1.1.0", split="train", config="nhl"), _cases(mirror / "1.0.0", split="train", config="nhl")]
    assert expected[0] != expected[1]  # the update added NHL train cases: a merge or a stale version would show
    for line, want in zip(lines, expected):
        code = f"from datasets import load_dataset\n{line}\nimport json; print(json.dumps(list(ds['case_id'])))\n"
        proc = _python(code, root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert sorted(got) == want and len(got) == len(set(got)), line


def _load_dataset_sources(text: str) -> list[str]:
    return re.findall(r'load_dataset\("([^"]*)"', text)


def test_no_card_shows_a_bare_name_or_an_install_that_does_not_work(user_folder):
    root, _ = user_folder
    local = (root / "lymphatlas" / "README.md").read_text()
    hub = hub_readme(local, repo_id="org/lymphatlas", version="1.0.0")
    mirror = (root / "mirror" / "README.md").read_text()
    # a local copy's card reads the folder that holds it (a release or a mirror's version folder), never a name
    assert not _load_dataset_sources(local) and local.count("load_dataset(os.getcwd(),") >= 3
    assert _load_dataset_sources(mirror) and all(s.startswith("./") for s in _load_dataset_sources(mirror))
    assert set(_load_dataset_sources(hub)) == {"org/lymphatlas"}
    for call in re.findall(r"load_dataset\([^\n]*", hub):
        assert 'revision="v1.0.0"' in call, call
    assert "lymphatlas materialize org/lymphatlas --version 1.0.0" in hub
    # the Hub card keeps its front matter: configs, features, access terms
    data = DatasetCard(hub).data
    assert [c["config_name"] for c in data.configs] == ["all", "hl", "nhl", "lesions", "preview"]
    assert data.extra_gated_prompt and "Affiliation" in data.extra_gated_fields
    for text in (local, hub, mirror, (REPO / "README.md").read_text(), (REPO / "docs" / "design.md").read_text()):
        assert "pip install lymphatlas-ds" not in text
    assert "author  = {Ding, Jiajun and" in local and "## Limitations" in local


def test_hf_torch_is_exported_and_the_public_names_stay_few():
    from lymphatlas_ds.loader import hf_torch

    assert lymphatlas_ds.hf_torch is hf_torch and "hf_torch" in lymphatlas_ds.__all__
    assert len(lymphatlas_ds.__all__) <= 14  # 12 + the two prediction helpers (save_prediction, predict_case)


def test_no_message_suggests_huggingface_cli():
    # Only `hf` is installed with current huggingface_hub: `hf auth login` is the command that exists.
    for folder in ("builder", "lymphatlas_ds"):
        for path in (REPO / folder).rglob("*.py"):
            assert "huggingface-cli" not in path.read_text(), path


def test_the_wheel_installs_in_a_fresh_venv_and_imports_from_another_folder(tmp_path):
    from tests.support.wheel import build_wheel

    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as z:
        assert "lymphatlas_ds/_exit_guard.py" in z.namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(python), "-c", "import lymphatlas_ds; print(lymphatlas_ds.__file__); print(lymphatlas_ds.__version__)"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, version = proc.stdout.split()
    assert Path(where).is_relative_to(venv) and version == lymphatlas_ds.__version__  # the wheel's copy, not the checkout


def test_a_hub_id_that_cannot_be_had_is_a_message_naming_the_login_command(tmp_path):
    lymphatlas = Path(sys.executable).with_name("lymphatlas")
    proc = subprocess.run(
        [str(lymphatlas), "info", "org/absent", "--version", "1.0.0"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "org/absent" in proc.stderr and "tag v1.0.0" in proc.stderr and "`hf auth login`" in proc.stderr
    assert "huggingface-cli" not in proc.stderr
