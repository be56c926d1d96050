"""Render the dataset card (the release's README.md) from the ``dataset_card.md`` template.

The YAML front matter is built with ``huggingface_hub.DatasetCardData`` (license, task
categories, tags, the ``configs:`` that ``datasets`` resolves, ``dataset_info`` with the features
and split sizes); the prose is a jinja2 template filled with statistics computed from the release
itself, so the card can never disagree with the data it describes.

Example:
    >>> text = render_card(version="1.0.0", statistics=stats, shards=infos, changelog="")  # doctest: +SKIP
    >>> DatasetCard(text).data.configs[0]["config_name"]  # doctest: +SKIP
    'all'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import DatasetCard, DatasetCardData

from lymphatlas_ds import schema
from lymphatlas_ds.schema import Config, Split

from builder.shards import ShardInfo, features

TEMPLATE_PATH = Path(__file__).resolve().parent / "dataset_card.md"  # a link to the repository's, a copy in the wheel
LICENSE = "other"
LICENSE_NAME = "lymphatlas-data-use"
LICENSE_LINK = "README.md#licence-and-terms-of-use"
"""The paper states no licence: the card says ``other`` (the Hub then wants a name and a link) and
points to the terms of use in its own prose."""


def data_files(config: Config, split: Split) -> str:
    """The ``data_files`` glob of a config's split: ``data/nhl/train-*.parquet``, ``data/*/test-*.parquet``."""
    folder = "*" if config is Config.ALL else config.value
    return f"data/{folder}/{split.value}-*.parquet"


def _in_config(path: str, config: Config) -> bool:
    return config is Config.ALL or path.startswith(f"data/{config.value}/")


def _shards_of(shards: Sequence[ShardInfo], config: Config, split: Split) -> list[ShardInfo]:
    return [s for s in shards if _in_config(s.path, config) and Path(s.path).name.startswith(split.value + "-")]


def configs_yaml(shards: Sequence[ShardInfo]) -> list[dict[str, Any]]:
    """The ``configs:`` entries of the card: all (default), hl, nhl, each with its train and test split.

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
    return out


def dataset_info_yaml(statistics: Mapping[str, Any], shards: Sequence[ShardInfo]) -> list[dict[str, Any]]:
    """``dataset_info`` per config: the features, and per split the number of cases and shard bytes."""
    out = []
    for config in Config:
        split_dict = datasets.SplitDict()
        for split in Split:
            chosen = _shards_of(shards, config, split)
            if not chosen:
                continue
            split_dict.add(
                datasets.SplitInfo(
                    name=split.value,
                    num_bytes=sum(s.size for s in chosen),
                    num_examples=sum(len(s.case_ids) for s in chosen),
                )
            )
        size = sum(s.size for s in shards if _in_config(s.path, config))
        if not size:
            continue
        info = datasets.DatasetInfo(
            features=features(), splits=split_dict, config_name=config.value, download_size=size, dataset_size=size
        )
        out.append(info._to_yaml_dict())
    return out


def card_data(statistics: Mapping[str, Any], shards: Sequence[ShardInfo]) -> DatasetCardData:
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
        configs=configs_yaml(shards),
        dataset_info=dataset_info_yaml(statistics, shards),
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


def render_card(
    *,
    version: str,
    statistics: Mapping[str, Any],
    shards: Sequence[ShardInfo],
    changelog: str,
    seed: int = 0,
    template_path: str | Path = TEMPLATE_PATH,
) -> str:
    """The README.md text of a release: front matter + the template's prose with this release's figures.

    Deterministic: nothing depends on the clock (the citation year comes from the template).
    """
    data = card_data(statistics, shards)
    card = DatasetCard.from_template(
        data,
        template_path=str(template_path),
        version=version,
        tag=f"v{version}",
        stats=statistics,
        seed=seed,
        n_folds=schema.N_FOLDS,
        test_percent=round(100 * schema.TEST_FRACTION),
        shard_max_mib=schema.SHARD_MAX_BYTES // (1024 * 1024),
        schema_version=schema.SCHEMA_VERSION,
        channels=schema.CHANNELS,
        age_band_years=schema.AGE_BAND_YEARS,
        versions=_versions(changelog),
        latest_changes=_latest_section(changelog),
        n_shards=len(shards),
        dataset_name=schema.DATASET_NAME,
        folder=schema.RELEASE_FOLDER_NAME,
        metadata_columns=list(schema.METADATA_COLUMNS),
    )
    text = str(card)
    return text if text.endswith("\n") else text + "\n"

