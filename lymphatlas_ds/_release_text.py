"""What a release's prose says, checked against its data: the card (README.md) and CHANGELOG.md.

The builder renders both from the release's own rows (builder/release/card.py, build.py); a card or
changelog rewritten afterwards, its manifest entry updated, still verifies file by file.
:func:`lymphatlas_ds.manifest.verify_consistency` calls these two checks with the shards' metadata
rows (already checked against ``splits.json``, ``metadata/cases.csv`` and the manifest), so the
counts the text states must be the counts of the data:

* the card: its version (title and "release **X.Y.Z**"), "N examinations of M patients", the
  Contents table (cases per split and diagnosis), the train cases per fold, the ``configs:`` of its
  YAML front matter (each config and split that has shards, no other), and its "Changes in X.Y.Z"
  block equal to the changelog's newest section;
* the changelog: its newest section is the manifest's version; its statistics column gives the
  release's cases, patients and cases per split and diagnosis; a first release adds exactly the
  manifest's cases, an update adds and changes only cases of the manifest and removes none of them,
  and each listing has as many ids as its count.

Statistics that need the lesion columns (TMTV, SUVmax) are not re-derived here: they are
aggregates of cases.csv, which is checked column by column against the shards.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lymphatlas_ds import schema

CARD_NAME = "README.md"
CHANGELOG_NAME = "CHANGELOG.md"
_SPLITS = ("train", "test")
_DIAGNOSES = ("HL", "NHL")

Problem = tuple[str, str]


def _counts(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Cases, patients, cases per (split, diagnosis) and train cases per fold, from the shards' rows."""
    by = Counter((r.get("split"), r.get("diagnosis")) for r in rows.values())
    folds = Counter(r.get("fold") for r in rows.values() if r.get("split") == "train")
    return {"cases": len(rows), "patients": len({r.get("subject_id") for r in rows.values()}), "by": by, "folds": folds}


def _mismatch(path: str, what: str, said: Any, found: Any) -> Iterator[Problem]:
    if str(said) != str(found):
        yield path, f"says {what} {said}, the release has {found}"


def _latest_section(text: str) -> tuple[str | None, str]:
    """The newest ``## <version>`` heading of a changelog and its body (stripped)."""
    match = re.search(r"^## (.+?)[ \t]*$", text, re.MULTILINE)
    if match is None:
        return None, ""
    body = text[match.end():]
    end = re.search(r"^## ", body, re.MULTILINE)
    return match.group(1), (body if end is None else body[:end.start()]).strip()


def _stat(body: str, name: str) -> str | None:
    """The last column of the changelog table's row ``name`` (this version's value)."""
    match = re.search(rf"^\| {re.escape(name)} \|(.*)\|[ \t]*$", body, re.MULTILINE)
    return match.group(1).split("|")[-1].strip() if match else None


def _listed(body: str, what: str) -> tuple[int, list[str]] | None:
    match = re.search(rf"^- {what} \((\d+)\): (.*)$", body, re.MULTILINE)
    if match is None:
        return None
    ids = [] if match.group(2).strip() == "none" else [i.strip() for i in match.group(2).split(",")]
    return int(match.group(1)), ids


def check_changelog(root: Path, version: str, cases: Mapping[str, str],
                    rows: Mapping[str, Mapping[str, Any]]) -> list[Problem]:
    """The newest section of ``CHANGELOG.md`` against the manifest's version and cases and the shards' rows."""
    try:
        text = (root / CHANGELOG_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []  # reported by manifest._check_changelog
    latest, body = _latest_section(text)
    if latest is None:
        return []
    if latest != version:
        return [(CHANGELOG_NAME, f"its newest section is '## {latest}', the manifest's version is {version}")]
    counts = _counts(rows)
    problems = []
    for name, found in (("cases", counts["cases"]), ("patients", counts["patients"]),
                        *((f"{s} cases ({d})", counts["by"][(s, d)]) for s in _SPLITS for d in _DIAGNOSES)):
        said = _stat(body, name)
        if said is None:
            problems.append((CHANGELOG_NAME, f"the statistics table of its newest section has no row '{name}'"))
        else:
            problems += _mismatch(CHANGELOG_NAME, f"'{name}'", said, found)
    first = re.search(r"^First release: (\d+) cases of (\d+) patients\.", body, re.MULTILINE)
    if first:
        problems += _mismatch(CHANGELOG_NAME, "(first release) cases", first.group(1), counts["cases"])
        problems += _mismatch(CHANGELOG_NAME, "(first release) patients", first.group(2), counts["patients"])
    problems += _check_listings(body, cases, first_release=first is not None)
    return problems


def _check_listings(body: str, cases: Mapping[str, str], *, first_release: bool) -> list[Problem]:
    """The added / removed / changed lists of the newest section against the manifest's cases."""
    problems: list[Problem] = []
    listings = {what: _listed(body, what) for what in ("added", "removed", "changed")}
    for what, listing in listings.items():
        if listing is None:
            problems.append((CHANGELOG_NAME, f"the newest section has no '- {what} (N): ...' line"))
        elif listing[0] != len(listing[1]):
            problems.append((CHANGELOG_NAME, f"lists {len(listing[1])} {what} case(s) under the count {listing[0]}"))
    added = set((listings["added"] or (0, []))[1])
    if first_release and added != set(cases):
        problems.append((CHANGELOG_NAME, f"a first release adds the manifest's {len(cases)} cases, it lists "
                                         f"{len(added)} ({_ids(added ^ set(cases))} differ)"))
    for what in ("added", "changed"):
        if outside := set((listings[what] or (0, []))[1]) - set(cases):
            problems.append((CHANGELOG_NAME, f"lists as {what} case(s) the manifest lacks: {_ids(outside)}"))
    if kept := set((listings["removed"] or (0, []))[1]) & set(cases):
        problems.append((CHANGELOG_NAME, f"lists as removed case(s) the manifest still has: {_ids(kept)}"))
    return problems


def _ids(values: set[str], limit: int = 5) -> str:
    ordered = sorted(values)
    return ", ".join(ordered[:limit]) + (f" (and {len(ordered) - limit} more)" if len(ordered) > limit else "")


def _front_matter_configs(text: str) -> dict[str, set[str]] | None:
    """{config name: its splits} of the card's YAML ``configs:`` (None: no readable front matter)."""
    import yaml

    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1)) or {}
        return {str(c["config_name"]): {str(f["split"]) for f in c.get("data_files") or []}
                for c in data.get("configs") or []}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None


def _expected_configs(rows: Mapping[str, Mapping[str, Any]], root: Path | None = None) -> dict[str, set[str]]:
    """The configs and splits the builder lists: each with at least one case (schema.Config), and the
    lesions and preview configs with every split that has a case, where the release has their folder
    (a release of an older builder has none)."""
    out: dict[str, set[str]] = {}
    side = [c for c in (schema.LESIONS_CONFIG, schema.PREVIEW_CONFIG) if root is not None and (root / c).is_dir()]
    for row in rows.values():
        for config in (schema.Config.ALL.value, str(row.get("diagnosis", "")).lower(), *side):
            out.setdefault(config, set()).add(str(row.get("split")))
    return out


def check_card(root: Path, version: str, rows: Mapping[str, Mapping[str, Any]]) -> list[Problem]:
    """The card's version, counts, configs and latest changes against the manifest, the shards and the changelog."""
    try:
        text = (root / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [(CARD_NAME, f"cannot be read ({e}); every release has its card")]
    counts = _counts(rows)
    problems: list[Problem] = []
    title = re.search(rf"^# {re.escape(schema.DATASET_NAME)} (\S+?):", text, re.MULTILINE)
    problems += _mismatch(CARD_NAME, "in its title the version", title.group(1) if title else "(no title)", version)
    said = re.search(r"This is release \*\*(\S+)\*\*.*?: (\d+) examinations of (\d+) patients\.", text, re.DOTALL)
    if said is None:
        problems.append((CARD_NAME, "has no line 'This is release **X.Y.Z** ...: N examinations of M patients.'"))
    else:
        problems += _mismatch(CARD_NAME, "release", said.group(1), version)
        problems += _mismatch(CARD_NAME, "examinations (cases)", said.group(2), counts["cases"])
        problems += _mismatch(CARD_NAME, "patients", said.group(3), counts["patients"])
    for split in _SPLITS:
        row = re.search(rf"^\| {split} \| (\d+) \| (\d+) \| (\d+) \|[ \t]*$", text, re.MULTILINE)
        if row is not None:
            hl, nhl = counts["by"][(split, "HL")], counts["by"][(split, "NHL")]
            problems += _mismatch(CARD_NAME, f"in its Contents table {split} HL / NHL / all",
                                  " / ".join(row.groups()), f"{hl} / {nhl} / {hl + nhl}")
    per_fold = re.search(r"Train examinations per fold: (.*?)\.\n", text, re.DOTALL)
    if per_fold is not None:
        # A small release has fewer folds than schema.N_FOLDS (splits.json's n_folds): every fold holds a case.
        n_folds = 1 + max((f for f in counts["folds"] if isinstance(f, int) and f >= 0), default=-1)
        expected = ", ".join(f"fold {f}: {counts['folds'][f]}" for f in range(n_folds))
        problems += _mismatch(CARD_NAME, "train examinations per", " ".join(per_fold.group(1).split()), expected)
    configs = _front_matter_configs(text)
    expected_configs = _expected_configs(rows, root)
    if configs != expected_configs:
        problems.append((CARD_NAME, f"its configs are {_configs_text(configs)}, the shards give "
                                    f"{_configs_text(expected_configs)}"))
    problems += _check_card_changes(root, text, version)
    return problems


def _configs_text(configs: dict[str, set[str]] | None) -> str:
    if configs is None:
        return "(no readable YAML front matter)"
    return "; ".join(f"{c}: {'/'.join(sorted(s))}" for c, s in sorted(configs.items())) or "(none)"


def _check_card_changes(root: Path, text: str, version: str) -> list[Problem]:
    """The card's "Changes in X.Y.Z" block is the changelog's newest section."""
    match = re.search(rf"^Changes in {re.escape(version)}:\n(.*)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        return [(CARD_NAME, f"has no 'Changes in {version}:' block (the changelog's newest section)")]
    try:
        _latest, section = _latest_section((root / CHANGELOG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return []
    if not match.group(1).strip().startswith(section):
        return [(CARD_NAME, f"its 'Changes in {version}' block differs from the newest section of {CHANGELOG_NAME}")]
    return []


__all__ = ["check_card", "check_changelog"]
