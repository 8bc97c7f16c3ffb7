"""Labels of the dashboard's runs: short unique names for files, and groups of seeds of one configuration
(the same configuration hash as `routescope report --group` uses, routescope.analysis.groups)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from routescope.analysis.groups import config_identity

if TYPE_CHECKING:
    from routescope.dashboards.sources import RunSource


def unique_labels(paths: list[Path]) -> list[str]:
    """Short labels for files: the stem, with parent folders added until the labels differ."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]).removesuffix(".h5") for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def seed_groups(sources: list[RunSource]) -> dict[str, str]:
    """Map each run to a group label: runs whose configurations differ only in the seed share one, named
    after what their labels have in common (a trailing seed marker such as "-s" dropped), not after one file."""
    members: dict[str, list[str]] = {}
    for src in sources:  # the configuration hash without the seed, as `report --group` counts runs
        members.setdefault(config_identity(src.config)[1], []).append(src.label)
    groups: dict[str, str] = {}
    for labels in members.values():
        name = labels[0] if len(labels) == 1 else group_name(labels)
        groups.update({label: name for label in labels})
    return groups


def group_name(labels: list[str]) -> str:
    """What several run labels share: their common prefix without a trailing seed marker ("gelu-s0", "gelu-s1"
    -> "gelu"), or all of them joined where they share nothing."""
    prefix = re.sub(r"([-_./ ]?(seed|s))?[-_./ ]*$", "", os.path.commonprefix(labels))
    return prefix or " / ".join(labels)
