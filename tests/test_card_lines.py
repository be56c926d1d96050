"""Every fenced python / bash block and inline `lymphatlas ...` line of a rendered card runs as written.

A small release is built, then published into a local mirror; in each copy's folder (where a
user reads its README.md) the python blocks run top to bottom as one script (as in a notebook:
later blocks use ``ds`` and ``sample``), each bash line and each inline ``lymphatlas`` command runs
in a shell, with HOME in a temporary folder (the card writes ``~/nnUNet_raw`` and
``~/lymphatlas_monai``). Exit status 0 and no traceback for each; what they wrote is then read back
with the ecosystem's own tools. The card's prose claims are checked against ``datasets`` itself.

Excluded, and why: the card's ``pip install`` line would install into the test's own environment,
so here it runs as pip's dry run of the same argument (the wheel exists where the card says and is
a valid wheel with that extra); the slow test installs it as written into a fresh virtual
environment and loads the release there. The bibtex block is not a command. The Hub copy's card
(``publish --repo-id``) differs in its usage section only; tests/test_hub_card_lines.py runs its lines
(``hf download``, ``load_dataset`` / ``load_lymphatlas`` / ``lymphatlas`` from the repo id at the tag)
against a local mock of the Hub's HTTP API and reuses ``blocks`` and ``runnable`` from here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.releases import datasets_cache_in_tmp  # noqa: F401 - module fixture

pytestmark = pytest.mark.usefixtures("datasets_cache_in_tmp")

BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)


def blocks(readme: str) -> tuple[str, list[str]]:
    """(the python blocks joined, the bash lines and the inline `lymphatlas ...` commands) of a card."""
    found = FENCE.findall(readme)
    python = "\n".join(code for lang, code in found if lang == "python")
    bash = [line.split(" #")[0].strip() for lang, code in found if lang == "bash" for line in code.splitlines()]
    inline = [m for m in re.findall(r"`(lymphatlas [^`]+)`", readme) if "COMMAND" not in m]
    return python, [line for line in bash if line] + inline


def runnable(line: str) -> str:
    """A card line as the test runs it: `pip install ...` as pip's dry run (see the module docstring)."""
    if line.startswith("pip install "):
        return line.replace("pip install ", f"{sys.executable} -m pip install --dry-run --no-deps --no-index ", 1)
    return line


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    from builder.release.publish import publish_mirror
    from tests.support.releases import build_fake_release

    root = tmp_path_factory.mktemp("card_lines")
    release = build_fake_release(root, n_patients=12, seed=8, shape_zyx=(12, 16, 16), name="lymphatlas")
    publish_mirror(release.path, root / "mirror")
    return root, {"release": release.path, "mirror": root / "mirror" / "1.0.0"}


@pytest.mark.parametrize("where", ["release", "mirror"])
def test_every_card_line_runs_where_the_card_is_read(copies, tmp_path, where):
    root, folders = copies
    folder = folders[where]
    python, shell = blocks((folder / "README.md").read_text())
    assert "load_dataset(" in python and any(line.startswith("lymphatlas materialize") for line in shell)
    assert "<checkout>" not in (folder / "README.md").read_text()
    assert any(line.startswith('pip install "./wheels/lymphatlas_ds-') for line in shell)
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "LYMPHATLAS_CACHE": str(tmp_path / "cache"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "PATH": str(BIN) + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)
    script = tmp_path / "card.py"
    script.write_text(python)
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, python + proc.stderr[-3000:]
    for line in shell:
        proc = subprocess.run(["bash", "-c", runnable(line)], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stdout}\n{proc.stderr}"
    splits = json.loads((folder / "splits.json").read_text())["cases"]
    n_train = sum(e["split"] == "train" for e in splits.values())
    dataset = json.loads((tmp_path / "nnUNet_raw" / "Dataset501_LymphAtlas" / "dataset.json").read_text())
    assert dataset["numTraining"] == n_train
    from monai.data import load_decathlon_datalist

    datalist = load_decathlon_datalist(str(tmp_path / "lymphatlas_monai" / "datalist.json"), True, "training")
    assert len(datalist) == n_train


@pytest.mark.slow
def test_the_cards_install_line_installs_the_client_into_a_fresh_environment(copies, tmp_path):
    """The local mirror's card: its `pip install` line as written, in a fresh venv (no system site-packages),
    then the card's load_lymphatlas block there. torch 2.13.0 first: the CPU build on this machine's disk
    (without it, pip would fetch a CUDA build of several GB); that pin is this machine's, not the card's."""
    import venv

    _root, folders = copies
    folder = folders["mirror"]
    readme = (folder / "README.md").read_text()
    (line,) = [line for line in blocks(readme)[1] if line.startswith("pip install ")]
    env_dir = tmp_path / "client_env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=str(env_dir / "bin") + os.pathsep + os.environ["PATH"], HOME=str(tmp_path),
               LYMPHATLAS_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    for cmd in ("pip install -q torch==2.13.0", line):
        proc = subprocess.run(["bash", "-c", cmd], cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    code = next(code for lang, code in FENCE.findall(readme) if lang == "python" and "load_lymphatlas(" in code)
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-c", code + "\nprint(tuple(sample['image'].shape)[0])"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "2", proc.stderr[-3000:]


def test_the_cards_with_format_claims_hold_in_datasets(copies):
    import datasets

    _root, folders = copies
    readme = (folders["release"] / "README.md").read_text()
    assert '`with_format("numpy")` works' in readme and '`with_format("torch")` fails' in readme
    ds = datasets.load_dataset(str(folders["release"]), "nhl", split="train")
    ct = ds.with_format("numpy")[0]["ct"].item().get_fdata()
    assert ct.shape == tuple(ds[0]["shape_xyz"])
    with pytest.raises(TypeError):
        ds.with_format("torch")[0]


def test_the_interop_hint_names_an_installable_package(monkeypatch):
    from lymphatlas_ds import interop

    monkeypatch.setitem(sys.modules, "monai.data", None)  # as where MONAI is not installed: the import fails
    with pytest.raises(ImportError) as info:
        interop._require("monai.data", "monai")
    message = str(info.value)
    assert "lymphatlas-ds[" not in message and "`pip install monai`" in message
