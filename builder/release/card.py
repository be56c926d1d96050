"""Render the dataset card (the release's README.md) from the ``dataset_card.md`` template.

The YAML front matter is built with ``huggingface_hub.DatasetCardData`` (license, task
categories, tags, the Hub's access-request fields, the ``configs:`` that ``datasets`` resolves,
``dataset_info`` with the features); the prose is a jinja2 template filled with statistics computed
from the release itself, so the card can never disagree with the data it describes.

``dataset_info`` carries no split sizes: ``datasets`` checks recorded sizes against what it read,
so ``load_dataset(..., filters=[("fold", "==", 1)])`` would fail with NonMatchingSplitsSizesError.
The release's integrity check is its manifest (``lymphatlas verify``: sha256 of every file).

The usage section depends on where a release is read from: a local release names its folder, the
copy pushed to the Hub names the repo id and the version's tag (``publish --repo-id`` swaps it in
with :func:`hub_readme`). No card shows a bare name, which ``datasets`` would resolve to whatever
copy its cache saw last. :func:`mirror_readme` writes the card at the root of a local mirror, whose
``configs`` point at the newest version's folder so that versions never merge.

Example:
    >>> text = render_card(version="1.0.0", statistics=stats, shards=infos, changelog="")  # doctest: +SKIP
    >>> DatasetCard(text).data.configs[0]["config_name"]  # doctest: +SKIP
    'all'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import jinja2
from huggingface_hub import DatasetCard, DatasetCardData

from lymphatlas_ds import schema
from lymphatlas_ds.schema import Config, Split

from builder.release import client_wheel
from builder.release.shards import ShardInfo, features

TEMPLATE_PATH = Path(__file__).resolve().parent / "dataset_card.md"  # a link to the repository's, a copy in the wheel
LICENSE = "other"
LICENSE_NAME = "lymphatlas-data-use"
LICENSE_LINK = "README.md#licence-and-terms-of-use"
"""The paper states no licence: the card says ``other`` (the Hub then wants a name and a link) and
points to the terms of use in its own prose."""

GATED_PROMPT = (
    "These are medical images of real patients, shared for research under the LymphAtlas data use terms "
    "(the card's 'Licence and terms of use'). Access is granted per person: give your name and affiliation "
    "and accept the terms below."
)
GATED_FIELDS: dict[str, Any] = {
    "Name": "text",
    "Affiliation": "text",
    "Country": "country",
    "Intended use": {"type": "select", "options": ["Research", "Education", "Other"]},
    "I will not attempt to re-identify any person in this dataset": "checkbox",
    "I will not share the data outside my research group": "checkbox",
    "I will cite the LymphAtlas paper in work that uses this dataset": "checkbox",
}
"""The Hub's access-request form (a gated dataset: ``extra_gated_prompt`` / ``extra_gated_fields``).
The gate itself is switched on in the repo settings; these fields are what a requester fills in."""

USAGE_BEGIN = "<!-- usage: begin -->"
USAGE_END = "<!-- usage: end -->"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

USAGE_TEMPLATE = """\
{#- local copy: run in the folder that holds the card (a release folder or a mirror's version folder);
    datasets 5.2 refuses load_dataset(".") ("dataset_name should be specified"), hence os.getcwd() -#}
{%- set src = repo_id if repo_id else "." -%}
{%- set py_src = '"' ~ repo_id ~ '"' if repo_id else "os.getcwd()" -%}
{%- set py_os = "" if repo_id else "import os  # run in the folder that holds this card: os.getcwd() is its path\n" -%}
{%- set raw = "./nnUNet_raw" if repo_id else "~/nnUNet_raw" -%}
{%- set pin = ', revision="' ~ tag ~ '"' if repo_id else "" -%}
{%- set ver = ' --version ' ~ version if repo_id else "" -%}
{%- if repo_id -%}
This card is the Hub copy of release {{ version }}: the repo `{{ repo_id }}`, tag `{{ tag }}`. Pin
the version with `revision="{{ tag }}"` (without it, `datasets` reads the newest commit). A gated
repo needs a login first: `hf auth login` (or `HF_TOKEN`).
{%- else -%}
This card belongs to a local copy of release {{ version }}: a release folder, or the version folder
`mirror/{{ version }}` of a local mirror (`mirror` itself reads the newest version). The lines below
run in the folder that holds this card, whose path is `os.getcwd()` (`.` in a shell); from elsewhere
give that folder's path, never a bare name (a bare name is a Hub repo id, and `datasets` falls back
to whatever copy of that name its cache saw last).
{%- endif %}

With Hugging Face `datasets` (the Nifti columns decode to nibabel images):

```python
{{ py_os }}from datasets import load_dataset
ds = load_dataset({{ py_src }}, "nhl", split="train"{{ pin }})
case = ds[0]
ct = case["ct"].get_fdata()          # [x, y, z] as nibabel returns it
fold1 = load_dataset({{ py_src }}, "nhl", split="train"{{ pin }}, filters=[("fold", "==", 1)])
```

Streaming (the `import lymphatlas_ds` makes the process exit cleanly: without it, leaving a
streamed parquet file before its end can abort the interpreter at exit, an upstream pyarrow bug,
apache/arrow#45214 and huggingface/datasets#7566):

```python
{{ py_os }}import datasets, lymphatlas_ds
stream = datasets.load_dataset({{ py_src }}, "nhl", split="train"{{ pin }}, streaming=True)
print(next(iter(stream))["case_id"])
```

`with_format("numpy")` works and holds each volume as a 0-d object array around its nibabel image
(`ds.with_format("numpy")[0]["ct"].item().get_fdata()`); `with_format("torch")` fails on the Nifti
columns (upstream). `hf_torch` gives torch items from a `datasets.Dataset` instead:

```python
from lymphatlas_ds import hf_torch
item = hf_torch(ds)[0]   # {"image": float32 [2, Z, Y, X] ({{ channels | join(", ") }}), "label": uint8 [1, Z, Y, X], "affine", "meta", ...}
```

Reading with `datasets` needs only `pip install datasets nibabel`. The `lymphatlas_ds` client (torch
loader, nnU-Net and MONAI export, the `lymphatlas` command) is on no package index: this release
ships its wheel, `wheels/{{ wheel }}`. Its `[torch]` extra adds torch for `load_lymphatlas`
(`[torch,monai]` adds MONAI as well; without an extra, the `lymphatlas` command only):
{% if repo_id %}
```bash
hf download {{ repo_id }} wheels/{{ wheel }} --repo-type dataset --revision {{ tag }} --local-dir lymphatlas_client
pip install "./lymphatlas_client/wheels/{{ wheel }}[torch]"
```

A public repo also installs straight from its URL:
`pip install "lymphatlas-ds[torch] @ https://huggingface.co/datasets/{{ repo_id }}/resolve/{{ tag }}/wheels/{{ wheel }}"`.
{%- else %}
```bash
pip install "./wheels/{{ wheel }}[torch]"
```
{%- endif %}

```python
{{ py_os }}from lymphatlas_ds import load_lymphatlas
train = load_lymphatlas({{ py_src }}, {% if repo_id %}version="{{ version }}", {% endif %}config="nhl", split="train", fold=0, subset="train")
sample = train[0]   # {"image": float32 [2, Z, Y, X] ({{ channels | join(", ") }}), "label": [1, Z, Y, X], ...}
```

For nnU-Net v2 (channels `_0000` = CT, `_0001` = PET, with a patient-grouped `splits_final.json`):

```bash
lymphatlas materialize {{ src }}{{ ver }} --nnunet {{ raw }} --config all
```

It prints nnU-Net's own commands for the dataset it wrote (`nnUNetv2_plan_and_preprocess`,
`nnUNetv2_train ... -tr nnUNetTrainer_500epochs`, the paper's setting, and `nnUNetv2_predict`).

For MONAI: NIfTI files and a `datalist.json` in MONAI's decathlon format, each training entry with
its patient-grouped `fold`, for `monai.data.load_decathlon_datalist`:

```bash
lymphatlas materialize {{ src }}{{ ver }} --monai {{ raw | replace("nnUNet_raw", "lymphatlas_monai") }} --config all
```

Check a copy against its manifest: `lymphatlas verify {{ src }}{{ ver }}`.
"""


def data_files(config: Config, split: Split) -> str:
    """The ``data_files`` glob of a config's split: ``data/nhl/train-*.parquet``, ``data/*/test-*.parquet``."""
    folder = "*" if config is Config.ALL else config.value
    return f"data/{folder}/{split.value}-*.parquet"


def _in_config(path: str, config: Config) -> bool:
    return config is Config.ALL or path.startswith(f"data/{config.value}/")


def _shards_of(shards: Sequence[ShardInfo], config: Config, split: Split) -> list[ShardInfo]:
    return [s for s in shards if _in_config(s.path, config) and Path(s.path).name.startswith(split.value + "-")]


def _side_configs(side_files: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The ``lesions`` and ``preview`` configs (schema.LESIONS_CONFIG / PREVIEW_CONFIG) from their files."""
    out = []
    for name in (schema.LESIONS_CONFIG, schema.PREVIEW_CONFIG):
        files = [{"split": s.value, "path": f"{name}/{s.value}-*.parquet"} for s in Split
                 if any(f.startswith(f"{name}/{s.value}-") and f.endswith(".parquet") for f in side_files.get(name, ()))]
        if files:
            out.append({"config_name": name, "data_files": files})
    return out


def configs_yaml(shards: Sequence[ShardInfo], side_files: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """The ``configs:`` entries of the card: all (default), hl, nhl, each with its train and test split,
    then ``lesions`` and ``preview`` (``side_files``: their files in the release, by config).

    A split with no case (possible in a small release) is left out: ``datasets`` cannot resolve a
    pattern that matches no file.
    """
    out = []
    for config in Config:
        files = [{"split": s.value, "path": data_files(config, s)} for s in Split if _shards_of(shards, config, s)]
        if not files:
            continue
        entry: dict[str, Any] = {"config_name": config.value, "data_files": files}
        if config is Config.ALL:
            entry["default"] = True
        out.append(entry)
    return out + _side_configs(side_files or {})


def dataset_info_yaml(statistics: Mapping[str, Any], shards: Sequence[ShardInfo],
                      side_files: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """``dataset_info`` per config: the features and the sizes as the Hub means them, no split sizes (see the module doc).

    ``download_size`` is the config's parquet bytes, ``dataset_size`` its bytes once read into arrow
    (what ``datasets`` counts as the splits' ``num_bytes``: the cells as stored, the metadata
    decompressed). The number of cases per split is in the card's prose and in ``metadata/cases.csv``.
    """
    out = []
    for config in Config:
        size = sum(s.size for s in shards if _in_config(s.path, config))
        if not size:
            continue
        arrow = sum(s.arrow_bytes for s in shards if _in_config(s.path, config))
        info = datasets.DatasetInfo(features=features(), config_name=config.value, download_size=size,
                                    dataset_size=arrow)
        out.append(info._to_yaml_dict())
    from builder.release import lesions, preview

    for entry in _side_configs(side_files or {}):
        feats = lesions.features() if entry["config_name"] == schema.LESIONS_CONFIG else preview.features()
        out.append(datasets.DatasetInfo(features=feats, config_name=entry["config_name"])._to_yaml_dict())
    return out


def card_data(statistics: Mapping[str, Any], shards: Sequence[ShardInfo],
              side_files: Mapping[str, Sequence[str]] | None = None) -> DatasetCardData:
    """The card's YAML front matter as ``DatasetCardData``."""
    n = int(statistics.get("cases", 0))
    size_category = "n<1K" if n < 1000 else "1K<n<10K"
    return DatasetCardData(
        license=LICENSE,
        license_name=LICENSE_NAME,
        license_link=LICENSE_LINK,
        task_categories=["image-segmentation"],
        tags=["medical", "pet-ct", "fdg-pet", "lymphoma", "3d", "nifti", "nnunet", "segmentation"],
        pretty_name=f"{schema.DATASET_NAME}: whole-body FDG PET/CT lymphoma segmentation",
        size_categories=[size_category],
        configs=configs_yaml(shards, side_files),
        dataset_info=dataset_info_yaml(statistics, shards, side_files),
        extra_gated_prompt=GATED_PROMPT,
        extra_gated_fields=GATED_FIELDS,
    )


def _versions(changelog: str) -> list[str]:
    return [line[3:].strip() for line in changelog.splitlines() if line.startswith("## ")]


def _latest_section(changelog: str) -> str:
    """The newest ``## <version>`` section of the changelog, its heading dropped."""
    start = changelog.find("\n## ")
    if start < 0:
        return ""
    body = changelog[start + 1 :].split("\n", 1)[1] if "\n" in changelog[start + 1 :] else ""
    end = body.find("\n## ")
    return (body if end < 0 else body[:end]).strip()


def usage_section(*, version: str, repo_id: str | None = None, folder: str = schema.RELEASE_FOLDER_NAME) -> str:
    """The card's usage lines between :data:`USAGE_BEGIN` and :data:`USAGE_END`.

    ``repo_id=None``: a local release, loaded by its folder path; otherwise the Hub repo the
    version is published under, pinned by its tag ``v<version>``.

    Example:
        >>> 'revision="v1.1.0"' in usage_section(version="1.1.0", repo_id="org/lymphatlas")
        True
    """
    if repo_id is not None and not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form ORG/NAME")
    text = jinja2.Template(USAGE_TEMPLATE, keep_trailing_newline=True).render(
        version=version, tag=f"v{version}", repo_id=repo_id, folder=folder, channels=schema.CHANNELS,
        wheel=client_wheel.WHEEL_NAME,
    )
    return f"{USAGE_BEGIN}\n{text.strip()}\n{USAGE_END}"


def hub_readme(readme: str, *, repo_id: str, version: str) -> str:
    """A release's README.md as pushed to ``repo_id``: the usage section names the repo and the tag.

    Raises ``ValueError`` when ``readme`` has no usage markers (a card rendered by an older builder).

    Example:
        >>> local = "intro\\n" + usage_section(version="1.0.0") + "\\nrest\\n"
        >>> 'load_dataset("org/lymphatlas"' in hub_readme(local, repo_id="org/lymphatlas", version="1.0.0")
        True
    """
    start, end = readme.find(USAGE_BEGIN), readme.find(USAGE_END)
    if start < 0 or end < start:
        raise ValueError(
            f"the card has no usage section between {USAGE_BEGIN!r} and {USAGE_END!r}; rebuild the release "
            "with this builder (`python -m builder release`)"
        )
    section = usage_section(version=version, repo_id=repo_id)
    return readme[:start] + section + readme[end + len(USAGE_END) :]


MIRROR_TEMPLATE = """\
# {{ dataset_name }} local mirror (newest version {{ latest }})

Every published version of {{ dataset_name }} side by side, each in its own folder:
{% for v in versions %}`{{ v }}/`{{ ", " if not loop.last else "." }}{% endfor %} This card's `configs` read the
newest version only (`{{ latest }}/data/...`), so versions never merge:

```python
from datasets import load_dataset
ds = load_dataset("./{{ mirror_name }}", "nhl", split="train")            # the newest version, {{ latest }}
ds = load_dataset("./{{ mirror_name }}/{{ versions[0] }}", "nhl", split="train")      # one version, pinned
```

`datasets` ignores `revision=` on a local folder: pin a version by its folder. The folder of a
version holds its own card, changelog and manifest (`lymphatlas verify ./{{ mirror_name }} --version X.Y.Z`).
`versions.json` lists the versions; this card is rewritten when a version is published.
"""


def mirror_readme(mirror: str | Path, versions: Sequence[str]) -> str:
    """The README.md of a local mirror root: the newest version's front matter with its ``data_files``
    moved into that version's folder, and a short text naming the version folders.

    ``versions`` are oldest first; the newest version's own README.md gives the YAML (features,
    configs, licence, access terms).

    Example:
        >>> mirror_readme("mirror", ["1.0.0", "1.1.0"])  # doctest: +SKIP
    """
    mirror = Path(mirror)
    if not versions:
        raise ValueError(f"mirror {mirror} lists no version")
    latest = versions[-1]
    data = DatasetCard.load(mirror / latest / "README.md").data.to_dict()
    configs = []
    for entry in data.get("configs") or []:
        files = entry.get("data_files")
        moved = dict(entry)
        if isinstance(files, str):
            moved["data_files"] = f"{latest}/{files}"
        elif isinstance(files, list):
            moved["data_files"] = [
                {**f, "path": f"{latest}/{f['path']}"} if isinstance(f, dict) else f"{latest}/{f}" for f in files
            ]
        configs.append(moved)
    data["configs"] = configs
    data["pretty_name"] = f"{schema.DATASET_NAME} local mirror (newest: {latest})"
    text = jinja2.Template(MIRROR_TEMPLATE, keep_trailing_newline=True).render(
        dataset_name=schema.DATASET_NAME, latest=latest, versions=list(versions), mirror_name=mirror.name
    )
    card = DatasetCard(f"---\n{DatasetCardData(**data).to_yaml()}\n---\n\n{text}")
    out = str(card)
    return out if out.endswith("\n") else out + "\n"


def render_card(
    *,
    version: str,
    statistics: Mapping[str, Any],
    shards: Sequence[ShardInfo],
    changelog: str,
    seed: int = 0,
    template_path: str | Path = TEMPLATE_PATH,
    repo_id: str | None = None,
    n_folds: int = schema.N_FOLDS,
    provenance: Mapping[str, Any] | None = None,
    lesion_statistics: Mapping[str, Any] | None = None,
    side_files: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The README.md text of a release: front matter + the template's prose with this release's figures.

    Deterministic: nothing depends on the clock (the citation year comes from the template).
    ``repo_id`` renders the usage lines of the Hub copy (see :func:`usage_section`). ``n_folds``:
    the release's fold count (``splits.json``; fewer than ``N_FOLDS`` in a small release). ``provenance``
    is :func:`builder.release.provenance.summarise` of the release's rows (what convert used).
    ``lesion_statistics`` is :func:`lymphatlas_ds.statistics.lesion_table` of the lesions config's rows;
    ``side_files`` the files of the lesions and preview configs (their YAML configs and the gallery).
    """
    from lymphatlas_ds.lesions import LESION_CONNECTIVITY

    side_files = side_files or {}
    data = card_data(statistics, shards, side_files)
    card = DatasetCard.from_template(
        data,
        template_path=str(template_path),
        version=version,
        tag=f"v{version}",
        stats=statistics,
        seed=seed,
        n_folds=n_folds,
        max_folds=schema.N_FOLDS,
        test_percent=round(100 * schema.TEST_FRACTION),
        schema_version=schema.SCHEMA_VERSION,
        channels=schema.CHANNELS,
        age_band_years=schema.AGE_BAND_YEARS,
        versions=_versions(changelog),
        latest_changes=_latest_section(changelog),
        n_shards=len(shards),
        dataset_name=schema.DATASET_NAME,
        folder=schema.RELEASE_FOLDER_NAME,
        metadata_columns=list(schema.METADATA_COLUMNS),
        usage=usage_section(version=version, repo_id=repo_id),
        provenance=provenance or {},
        lesion_stats=lesion_statistics or {},
        lesions_config=schema.LESIONS_CONFIG,
        preview_config=schema.PREVIEW_CONFIG,
        connectivity=LESION_CONNECTIVITY,
        gallery=[f for f in side_files.get(schema.PREVIEW_CONFIG, ()) if f.endswith(".png")],
    )
    text = str(card)
    return text if text.endswith("\n") else text + "\n"

