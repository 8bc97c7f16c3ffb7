"""The run files a dashboard serves: opened lazily, re-opened when they grow, with cached curves.

A `RunSource` is the only place the dashboard touches a file, always through routescope.store's
`RunFile` (single-interval reads use its direct hyperslab `read`). Everything expensive over the whole
run (per-interval metric curves, μ_n of one tree, pruning events) is computed once and extended
incrementally as new intervals arrive, so callbacks stay fast on long runs.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from routescope.analysis import events as rs_events
from routescope.analysis.families import FamilyLayer, family_layers, l1_metrics_numpy, moe_metrics_numpy
from routescope.analysis.family import FAMILY_ANALYSES
from routescope.analysis.stats import node_moments
from routescope.analysis.tree import LayerInfo, layer_infos
from routescope.store.reader import RunFile, reads_run_file
from routescope.store.schema import layer_sizes

FAMILY_GROUPS = tuple(name for name in FAMILY_ANALYSES if name != "tree")  # drawn by family_views
FAMILY_BLOCK = 256  # intervals per family_timeseries call when the curves catch up
WHOLE_RUN_EVERY_S = 30.0  # a live run's pruning events / warnings are refreshed at most this often


@dataclass
class _Cache:
    """Per-file caches, valid for `steps` intervals; extended, never recomputed from scratch."""

    steps: int = 0
    curves: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (step, layer)
    mu: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (layer, tree) -> (step, node)
    events: pd.DataFrame | None = None
    events_steps: int = -1
    family_curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # family -> metric -> (step, layer)
    expert_share: dict[int, np.ndarray] = field(default_factory=dict)  # moe layer -> (step, expert)
    warnings: pd.DataFrame | None = None
    warnings_steps: int = -1
    whole_run_at: dict[str, float] = field(default_factory=dict)  # when events/warnings were last computed


class RunSource:
    """One run file: its groups as lazy xarray Datasets, its state, and cached curves."""

    def __init__(self, path: str | Path, label: str) -> None:
        self.path = Path(path)
        self.label = label
        self._lock = threading.RLock()  # Dash may run callbacks in threads
        self._file: RunFile | None = None
        self._signature: tuple[float, int] | None = None
        self.tree: xr.Dataset | None = None
        self.run: xr.Dataset | None = None
        self.traces: xr.Dataset | None = None
        self.families: dict[str, xr.Dataset] = {}  # the `l1` / `moe` groups present
        self._cache = _Cache()
        self.refresh(force=True)

    # ---- file access ----
    def _file_signature(self) -> tuple[float, int]:
        st = self.path.stat()
        return st.st_mtime, st.st_size

    def refresh(self, force: bool = False) -> bool:
        """Re-open the file if it changed on disk; True when there are new intervals (or on first open).

        Re-opening after each flush works both with SWMR (local disks) and without it (network
        filesystems, where SWMR does not work), so live following needs no special mode.
        """
        with self._lock:
            try:
                signature = self._file_signature()
            except OSError:
                RunFile.open(self.path).close()  # raises the reader's one-line explanation (missing, unreadable, ...)
                raise
            if not force and signature == self._signature:
                return False
            before = self.n_steps if self.tree is not None or self.run is not None else -1
            old = self._file
            f, self.tree, self.run, self.traces, self.families = open_groups(self.path)
            self._file, self._signature = f, signature
            if self.n_steps < before:  # the file was replaced by a shorter one: caches start over
                self._cache = _Cache()
            if old is not None:
                old.close()
            return self.n_steps != before

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # ---- basic facts ----
    @property
    def state(self) -> str:
        """running / finished / interrupted / failed, as the file says."""
        ds = self.tree if self.tree is not None else self.run
        return str(ds.attrs.get("run_state", "unknown")) if ds is not None else "unknown"

    @property
    def steps(self) -> np.ndarray:
        """Closing steps of the intervals the step slider walks: the tree group's, else the first family's."""
        primary = self.tree if self.tree is not None else next(iter(self.families.values()), self.run)
        return primary["step"].values if primary is not None else np.zeros(0, dtype=np.int64)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def layers(self) -> list[LayerInfo]:
        return layer_infos(self.tree) if self.tree is not None else []

    @property
    def record_every(self) -> int:
        """Optimizer steps per interval (each row sums that many steps)."""
        ds = self.tree if self.tree is not None else self.run
        return int(ds.attrs.get("record_every", 1)) if ds is not None else 1

    @property
    def config(self) -> dict[str, Any]:
        ds = self.tree if self.tree is not None else self.run
        try:
            return json.loads(ds.attrs.get("config", "{}")) if ds is not None else {}
        except json.JSONDecodeError:
            return {}

    # ---- one interval ----
    def _rows(self, name: str, rows: slice | int, layer: int, trees: slice | int, width: int) -> np.ndarray:
        """A hyperslab of one `tree` variable through RunFile.read (no dask overhead per chunk); rows are
        interval positions, bounded by the file's complete intervals."""
        return self._file.read("tree", name, rows, layer, trees, slice(0, width))

    def interval(self, index: int, layer: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Variables of one layer at one interval (by position), read lazily: {name: (tree, ...)}."""
        with self._lock:
            if not 0 <= index < self.n_steps:
                raise IndexError(f"interval {index} of {self.n_steps}")
            info = self.layers[layer]
            out = {}
            for name in names:
                width = 2**info.depth - 1 if name.startswith("node_") else 2**info.depth
                out[name] = self._rows(name, index, layer, slice(0, info.trees), width)
            return out

    # ---- cached curves ----
    def curves(self) -> dict[str, np.ndarray]:
        """Per-interval metrics (report key names) as {metric: (step, layer)}, extended incrementally."""
        with self._lock:
            cache, n = self._cache, self.n_steps
            if self.tree is None or n == cache.steps:
                return cache.curves
            new = FAMILY_ANALYSES["tree"].timeseries(self.tree.isel(step=slice(cache.steps, n)), rolling=1)
            for name in FAMILY_ANALYSES["tree"].keys:
                block = new[name].values
                cache.curves[name] = block if name not in cache.curves else np.concatenate([cache.curves[name], block])
            cache.steps = n
            return cache.curves

    def mu(self, layer: int, tree: int) -> np.ndarray:
        """μ_n per interval for one tree, (step, node); NaN where a node got no tokens. Cached."""
        with self._lock:
            info = self.layers[layer]
            nodes = 2**info.depth - 1
            have = self._cache.mu.get((layer, tree))
            done = 0 if have is None else len(have)
            if done < self.n_steps:
                rows = slice(done, self.n_steps)
                block, _ = node_moments(self._rows("node_visits", rows, layer, tree, nodes),
                                        self._rows("node_act_sum", rows, layer, tree, nodes))
                have = block if have is None else np.concatenate([have, block])
                self._cache.mu[(layer, tree)] = have
            return have

    def events(self) -> pd.DataFrame:
        """Pruning events (routescope.analysis.events), recomputed only when the run has grown."""
        with self._lock:
            if self.tree is None:
                return pd.DataFrame(columns=["step", "layer", "tree", "node", "event"])
            if self._cache.events_steps != self.n_steps and self._due("events"):
                self._cache.events = rs_events.pruning_events(self.tree)
                self._cache.events_steps = self.n_steps
            return self._cache.events

    def warnings(self) -> pd.DataFrame:
        """Early-warning flags (routescope.analysis.early_warnings), recomputed only when the run has grown."""
        with self._lock:
            if self.tree is None or self.n_steps < 3:
                return pd.DataFrame(columns=["step", "layer", "tree", "node"])
            if self._cache.warnings_steps != self.n_steps and self._due("warnings"):
                self._cache.warnings = rs_events.early_warnings(self.tree).flags
                self._cache.warnings_steps = self.n_steps
            return self._cache.warnings

    def _due(self, name: str) -> bool:
        """Whole-run passes (events, warnings) run at most every WHOLE_RUN_EVERY_S while a run grows."""
        now = time.monotonic()
        last = self._cache.whole_run_at.get(name)
        if last is not None and now - last < WHOLE_RUN_EVERY_S:
            return False
        self._cache.whole_run_at[name] = now
        return True

    # ---- the l1 / moe groups ----
    def family_layers(self, family: str) -> list[FamilyLayer]:
        """The layers of one family group (index, name, width, k); empty when the run has none."""
        ds = self.families.get(family)
        return family_layers(ds, family) if ds is not None else []

    def family_row(self, family: str, step_index: int | None) -> int | None:
        """Row of a family's group for a slider position: the interval with the same closing step, or
        the last one before it (groups may differ by a row after a kill); None when it has no rows."""
        with self._lock:
            ds = self.families.get(family)
            if ds is None or ds.sizes["step"] == 0 or self.n_steps == 0:
                return None
            step = self.steps[self._clamp(step_index)]
            return max(int(np.searchsorted(ds["step"].values, step, side="right")) - 1, 0)

    def _clamp(self, index: int | None) -> int:
        n = self.n_steps
        return n - 1 if index is None or not 0 <= index < n else int(index)

    def _family_counts(self, family: str, row: int, layer: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """One layer's counts at one interval (RunFile.read); `tokens` is that layer's tokens."""
        out = {name: self._file.read(family, name, row, layer) for name in names}
        out["tokens"] = self._file.read(family, "layer_tokens", row, layer)
        return out

    def l1_interval(self, layer: int, row: int) -> dict[str, Any]:
        """One L1 layer at one interval: the file's bin edges for its width, the active-unit histogram,
        and its metrics from routescope.analysis (unit_firing_rate (unit,), active_mean, ...)."""
        with self._lock:
            info = self.family_layers("l1")[layer]
            counts = self._family_counts("l1", row, layer, ("unit_fires", "active_sum", "active_hist"))
            bins = layer_sizes("l1", {"d_hidden": info.width})["bin"]  # this layer's share of the padded bins
            edges = np.asarray(self._file.variable_attr("l1", "active_hist", "bin_edges"))[: bins + 1]
            values = l1_metrics_numpy(counts, info.width, edges[:-1])
            return {"step": int(self.families["l1"]["step"].values[row]), "edges": edges,
                    "hist": counts["active_hist"][:bins], **values}  # fmt: skip

    def moe_interval(self, layer: int, row: int) -> dict[str, Any]:
        """One MoE layer at one interval: loads as shares of k·tokens (processed, selected before drops),
        the co-selection counts (E, E), tokens, and its metrics from routescope.analysis."""
        with self._lock:
            info = self.family_layers("moe")[layer]
            names = ("expert_tokens", "dropped_tokens", "coselect", "router_entropy_sum")
            counts = self._family_counts("moe", row, layer, names)
            values = moe_metrics_numpy(counts, info.width, info.k)
            scale = max(float(info.k * counts["tokens"]), 1.0)
            coselect = counts["coselect"][: info.width, : info.width]
            return {"step": int(self.families["moe"]["step"].values[row]), "tokens": float(counts["tokens"]),
                    "processed": values["tokens_per_expert"] / scale, "selected": np.diagonal(coselect) / scale,
                    "coselect": coselect, **values}  # fmt: skip

    def expert_share(self, layer: int) -> np.ndarray:
        """Tokens each expert processed per interval as a share of k·tokens, (step, expert). Cached."""
        with self._lock:
            info = self.family_layers("moe")[layer]
            n = self.families["moe"].sizes["step"]
            have = self._cache.expert_share.get(layer)
            done = 0 if have is None else len(have)
            if done < n:
                rows = slice(done, n)
                processed = self._file.read("moe", "expert_tokens", rows, layer, slice(0, info.width)).astype(float)
                tokens = self._file.read("moe", "layer_tokens", rows, layer).astype(float)
                block = processed / np.maximum(info.k * tokens, 1.0)[:, None]
                have = block if have is None else np.concatenate([have, block])
                self._cache.expert_share[layer] = have
            return have

    def family_curves(self, family: str) -> dict[str, np.ndarray]:
        """Per-interval metrics of a family (routescope.analysis.family_timeseries), {metric: (step, layer)},
        extended incrementally as the run grows."""
        with self._lock:
            ds = self.families.get(family)
            if ds is None:
                return {}
            have = self._cache.family_curves.setdefault(family, {})
            done, n = len(next(iter(have.values()), ())), ds.sizes["step"]
            # rolling=1: each interval on its own, so new rows need only new rows; blocks of
            # FAMILY_BLOCK rows bound the memory (an MoE co-selection row is E² counts per layer)
            for start in range(done, n, FAMILY_BLOCK):
                new = FAMILY_ANALYSES[family].timeseries(ds.isel(step=slice(start, min(start + FAMILY_BLOCK, n))), rolling=1)
                for name in new.data_vars:
                    block = new[name].values
                    have[name] = block if name not in have else np.concatenate([have[name], block])
            return have

    def loss(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"train": (steps, values), "val": ...} from the run group."""
        if self.run is None:
            return {}
        steps = self.run["step"].values
        out = {}
        for name, label in (("train_loss", "train"), ("val_loss", "val")):
            if name in self.run:
                out[label] = (steps, np.asarray(self.run[name].values, dtype=float))
        return out


@reads_run_file()
def open_groups(path: Path) -> tuple[RunFile, xr.Dataset | None, xr.Dataset | None, xr.Dataset | None, dict[str, xr.Dataset]]:
    """The open file, its tree / run / traces groups (None where absent) and its l1 / moe groups;
    damage is a RunFileError."""
    run_file = RunFile.open(path)
    try:
        tree = run_file.dataset("tree") if "tree" in run_file else None
        run = run_file.dataset("run") if "run" in run_file else None
        traces = run_file.dataset("traces") if run_file.has_variable("traces", "sample") else None
        families = {name: run_file.dataset(name) for name in FAMILY_GROUPS if name in run_file}
    except BaseException:
        run_file.close()
        raise
    return run_file, tree, run, traces, families


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
    for src in sources:
        config = dict(src.config)
        preset = dict(config.get("preset", {})) if isinstance(config.get("preset"), dict) else {}
        for d in (config, preset):
            d.pop("seed", None)
            d.pop("out", None)
        config["preset"] = preset
        members.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(src.label)
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
