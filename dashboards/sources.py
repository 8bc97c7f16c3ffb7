"""The run files a dashboard serves: opened lazily, re-opened when they grow, with cached curves.

A `RunSource` is the only place the dashboard touches a file, always through routescope.store's
`RunFile` (single-interval reads use its direct hyperslab `read`). Everything expensive over the whole
run (per-interval metric curves, μ_n of one tree, pruning events) is computed once and extended
incrementally as new intervals arrive, so callbacks stay fast on long runs.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from routescope.analysis import WarningReport, early_warnings, pruning_events
from routescope.analysis.calibrated import DEFAULT, Thresholds
from routescope.analysis.events import EVENT_COLUMNS
from routescope.analysis.families import FamilyLayer, family_layers, l1_metrics_numpy, moe_metrics_numpy
from routescope.analysis.family import FAMILY_ANALYSES
from routescope.analysis.stats import node_moments
from routescope.analysis.tree import LayerInfo, layer_infos
from routescope.store.reader import RunFile, reads_run_file
from routescope.store.schema import layer_sizes

FAMILY_GROUPS = tuple(name for name in FAMILY_ANALYSES if name != "tree")  # drawn by family_views
FAMILY_BLOCK = 256  # intervals per family_timeseries call when the curves catch up
WHOLE_RUN_EVERY_S = 30.0  # a live run's pruning events / warnings are refreshed at most this often
SUM_BLOCK_BYTES = 64 * 1024 * 1024  # rows of one variable read at once when summing a window
SUMS_KEPT = 16  # window sums cached per file (the tree view asks for the same windows again and again)


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
    warnings: WarningReport | None = None  # the whole report: flags, whose they are, verdict
    warnings_steps: int = -1
    sums: dict[tuple[int, int, int, tuple[str, ...]], dict[str, np.ndarray]] = field(default_factory=dict)
    whole_run_at: dict[str, float] = field(default_factory=dict)  # when events/warnings were last computed


class RunSource:
    """One run file: its groups as lazy xarray Datasets, its state, and cached curves."""

    def __init__(self, path: str | Path, label: str, th: Thresholds = DEFAULT) -> None:
        self.path = Path(path)
        self.label = label
        self.th = th  # the calibrated tests' thresholds (events, warnings, the tree view's states)
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

    def window_sums(self, layer: int, start: int, stop: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Variables of one layer summed over the intervals at positions start..stop − 1, {name: (tree, ...)},
        plus `tokens`: the tokens that entered every tree in them. Cached; a window near a cached one (the last
        quarter of a growing run, the slider's K intervals moved by one) is that sum plus and minus the rows
        in which they differ, so following a live run reads only its new rows."""
        with self._lock:
            start, stop, _ = slice(start, stop).indices(self.n_steps)
            stop = max(start, stop)
            key = (layer, start, stop, tuple(names))
            if key in self._cache.sums:
                return self._cache.sums[key]
            near = [k for k in self._cache.sums if k[0] == layer and k[3] == key[3]]
            base = min(near, key=lambda k: abs(k[1] - start) + abs(k[2] - stop), default=None)
            if base is not None and abs(base[1] - start) + abs(base[2] - stop) < stop - start:
                out = dict(self._cache.sums[base])
                for lo, hi, sign in ((base[2], stop, 1), (stop, base[2], -1), (base[1], start, -1), (start, base[1], 1)):
                    if lo < hi:
                        part = self._sum_rows(layer, lo, hi, names)
                        out = {name: out[name] + sign * part[name] for name in out}
            else:
                out = self._sum_rows(layer, start, stop, names)
            if len(self._cache.sums) >= SUMS_KEPT:
                self._cache.sums.pop(next(iter(self._cache.sums)))
            self._cache.sums[key] = out
            return out

    def _sum_rows(self, layer: int, start: int, stop: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """window_sums without the cache: rows start..stop − 1 read in blocks of about SUM_BLOCK_BYTES."""
        info = self.layers[layer]
        out: dict[str, np.ndarray] = {}
        for name in names:
            width = 2**info.depth - 1 if name.startswith("node_") else 2**info.depth
            rows = max(1, SUM_BLOCK_BYTES // (8 * info.trees * max(width, 1)))
            total = np.zeros((info.trees, width), dtype=self._file.read("tree", name, slice(0, 0)).dtype)
            for lo in range(start, stop, rows):
                total = total + self._rows(name, slice(lo, min(lo + rows, stop)), layer, slice(0, info.trees), width).sum(0)
            out[name] = total
        out["tokens"] = np.asarray(self._file.read("tree", "tokens", slice(start, stop)).sum())
        return out

    # ---- cached curves ----
    def curves(self) -> dict[str, np.ndarray]:
        """Metrics over the rolling window of K intervals ending at each interval (report key names) as
        {metric: (step, layer)}, extended incrementally."""
        with self._lock:
            cache, n = self._cache, self.n_steps
            if self.tree is None or n == cache.steps:
                return {**cache.curves, **self.probe_curves()} if self.tree is not None else cache.curves
            # rolling windows of K intervals (the v2 tests need the tokens of several intervals); the K − 1
            # rows before the new ones are read again so that the first new window is whole
            k = self.th.persistence
            lo = max(0, cache.steps - (k - 1))
            ts = FAMILY_ANALYSES["tree"].timeseries(self.tree.isel(step=slice(lo, n)), rolling=k, th=self.th)
            new = ts.isel(step=slice(cache.steps - lo, None))
            for name in FAMILY_ANALYSES["tree"].keys:
                block = new[name].values
                cache.curves[name] = block if name not in cache.curves else np.concatenate([cache.curves[name], block])
            cache.steps = n
            return {**cache.curves, **self.probe_curves()}

    def probe_curves(self) -> dict[str, np.ndarray]:
        """{"routing_stability": (step, layer)} from the file's probe group (analysis.stability), or {} without one;
        relative to the latest interval, so recomputed on every call (the probe is small)."""
        if self._file is None or "probe" not in self._file or not self._file.has_variable("probe", "leaf"):
            return {}
        from routescope.analysis.stability import probe_stability

        stable = probe_stability(self._file.dataset("probe"))["tree_stable"].values
        n = min(len(stable), self.n_steps)
        return {"routing_stability": stable[:n]} if n == self.n_steps else {}

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
        """Pruning events (routescope.analysis.pruning_events: kind, status "event" / "pending", step, layer, tree,
        node, ...), recomputed only when the run has grown."""
        with self._lock:
            if self.tree is None or self.n_steps == 0:
                return pd.DataFrame(columns=EVENT_COLUMNS)
            if self._cache.events_steps != self.n_steps and self._due("events"):
                self._cache.events = pruning_events(self.tree, self.th)
                self._cache.events_steps = self.n_steps
            return self._cache.events

    def warnings(self) -> WarningReport | None:
        """The early-warning report (routescope.analysis.early_warnings: the flags shown, whose they are
        (`source`) and the one-line `verdict`), recomputed only when the run has grown; None before 3 intervals."""
        with self._lock:
            if self.tree is None or self.n_steps < 3:
                return None
            if self._cache.warnings_steps != self.n_steps and self._due("warnings"):
                self._cache.warnings = early_warnings(self.tree, th=self.th)
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
            # rolling windows of K intervals, as the tree's curves: each block re-reads the K − 1 rows before it;
            # blocks of FAMILY_BLOCK rows bound the memory (an MoE co-selection row is E² counts per layer)
            k = self.th.persistence
            for start in range(done, n, FAMILY_BLOCK):
                lo = max(0, start - (k - 1))
                ts = FAMILY_ANALYSES[family].timeseries(ds.isel(step=slice(lo, min(start + FAMILY_BLOCK, n))), rolling=k,
                                                        th=self.th)  # fmt: skip
                new = ts.isel(step=slice(start - lo, None))
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
