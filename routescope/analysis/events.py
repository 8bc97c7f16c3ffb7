"""Pruning events and collapse early warnings, streamed over a run's intervals.

A decision node *dies* at the first interval from which no token reaches it again until the end of
the run (after having been reached before); it *freezes* when, from some interval on, it stays
live with min(p, 1 - p) < epsilon. The early warning follows the auto-pruning mechanism: with
z ~ N(mu, sigma^2) a node sends about Phi(-|mu|/sigma) of its tokens to its minority child, so when
|mu|/sigma keeps growing the minority child is about to starve.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
from scipy.special import ndtr

from routescope.analysis.stats import FROZEN_EPSILON, is_frozen, node_moments
from routescope.analysis.tree import layer_infos
from routescope.analysis.window import blocks

EVENT_COLUMNS = ["kind", "step", "layer", "tree", "node", "depth", "parent_died_same_step",
                 "mu_first", "mu_last", "mu_min", "mu_max", "live_intervals"]  # fmt: skip


def _node_depth(node: int) -> int:
    return int(np.floor(np.log2(node + 1)))


def pruning_events(ds: xr.Dataset, epsilon: float = FROZEN_EPSILON) -> pd.DataFrame:
    """One row per node that died or froze during the run, with its mu_n trajectory summary."""
    names = ("node_visits", "node_right", "node_act_sum")
    steps = ds["step"].values
    shape = ds["node_visits"].shape[1:]  # (layer, tree, node)
    last_live = np.full(shape, -1)
    first_live = np.full(shape, -1)
    last_unfrozen = np.full(shape, -1)
    live_count = np.zeros(shape, dtype=np.int64)
    mu_first, mu_last = np.full(shape, np.nan), np.full(shape, np.nan)
    mu_min, mu_max = np.full(shape, np.inf), np.full(shape, -np.inf)
    at = 0
    for block in blocks(ds, names):
        v = block["node_visits"].astype(np.float64)
        mu, _ = node_moments(v, block["node_act_sum"])
        live = v > 0
        index = (at + np.arange(len(v)))[:, None, None, None]
        last_live = np.maximum(last_live, np.where(live, index, -1).max(0))
        unset = (first_live < 0) & live.any(0)
        first_live = np.where(unset, np.where(live, index, np.iinfo(np.int64).max).min(0), first_live)
        frozen = is_frozen(v, block["node_right"], epsilon)
        last_unfrozen = np.maximum(last_unfrozen, np.where(~frozen, index, -1).max(0))
        live_count += live.sum(0)
        masked = np.where(live, mu, np.nan)
        with warnings.catch_warnings():  # all-NaN slices (nodes unvisited in this block) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mu_min = np.fmin(mu_min, np.nanmin(masked, axis=0))
            mu_max = np.fmax(mu_max, np.nanmax(masked, axis=0))
        first_in_block = np.take_along_axis(masked, np.clip(first_live - at, 0, len(v) - 1)[None], 0)[0]
        mu_first = np.where(np.isnan(mu_first) & (first_live >= at) & (first_live < at + len(v)), first_in_block, mu_first)
        last_in_block = np.take_along_axis(masked, np.clip(last_live - at, 0, len(v) - 1)[None], 0)[0]
        mu_last = np.where((last_live >= at) & (last_live < at + len(v)), last_in_block, mu_last)
        at += len(v)
    end = len(steps) - 1
    rows = []
    infos = layer_infos(ds)
    died = (last_live >= 0) & (last_live < end)
    froze = (last_live == end) & (last_unfrozen >= 0) & (last_unfrozen < end)
    for kind, mask, index in (("died", died, last_live + 1), ("froze", froze, last_unfrozen + 1)):
        for layer, tree, node in zip(*np.nonzero(mask)):
            info = infos[layer]
            if tree >= info.trees or node >= 2**info.depth - 1:
                continue  # padding of a smaller layer
            step = int(steps[index[layer, tree, node]])
            parent = (node - 1) // 2
            parent_died = bool(kind == "died" and node > 0 and died[layer, tree, parent]
                               and steps[last_live[layer, tree, parent] + 1] == step)  # fmt: skip
            rows.append([kind, step, int(layer), int(tree), int(node), _node_depth(int(node)), parent_died,
                         mu_first[layer, tree, node], mu_last[layer, tree, node], mu_min[layer, tree, node],
                         mu_max[layer, tree, node], int(live_count[layer, tree, node])])  # fmt: skip
    return pd.DataFrame(rows, columns=EVENT_COLUMNS).sort_values(["step", "layer", "tree", "node"], ignore_index=True)


@dataclass
class WarningReport:
    """Flags raised by `early_warnings` and how well they predicted deaths in the same run."""

    flags: pd.DataFrame  # step, layer, tree, node, child (the minority child expected to die), score
    deaths: int  # children that died while their parent was live (the events a warning can predict)
    predicted: int  # of those, deaths flagged within `horizon` intervals before they happened
    true_flags: int  # flags followed by the flagged child's death within `horizon` intervals

    @property
    def precision(self) -> float:
        return self.true_flags / len(self.flags) if len(self.flags) else float("nan")

    @property
    def recall(self) -> float:
        return self.predicted / self.deaths if self.deaths else float("nan")


def early_warnings(ds: xr.Dataset, horizon: int = 10, lookback: int = 5, min_tokens: float = 1.0,
                   layers: list[int] | None = None) -> WarningReport:  # fmt: skip
    """Flag nodes whose minority child is projected to receive < `min_tokens` per interval within
    `horizon` intervals, by extrapolating the trend of |mu|/sigma over the last `lookback` intervals;
    then score the flags against the deaths that followed in the same run (of the chosen `layers` only)."""
    names = ("node_visits", "node_right", "node_act_sum", "node_act_sqsum")
    steps = ds["step"].values
    infos = layer_infos(ds)
    events = pruning_events(ds)
    if layers is not None:
        events = events[events["layer"].isin(layers)]
    death_index = {(r.layer, r.tree, r.node): int(np.searchsorted(steps, r.step)) for r in events.itertuples() if r.kind == "died"}
    history: list[np.ndarray] = []
    flags = []
    at = 0
    for block in blocks(ds, names):
        v = block["node_visits"].astype(np.float64)
        mu, sigma = node_moments(v, block["node_act_sum"], block["node_act_sqsum"])
        with np.errstate(invalid="ignore"):
            score = np.abs(mu) / np.maximum(sigma, 1e-6)  # sigma floored: a node whose z never varies
        for i in range(len(v)):
            history = (history + [score[i]])[-lookback:]
            if len(history) < lookback:
                continue
            slope = (history[-1] - history[0]) / (lookback - 1)
            projected = history[-1] + np.maximum(slope, 0) * horizon
            minority_share = ndtr(-projected)
            right_is_minority = block["node_right"][i] * 2 < block["node_visits"][i]
            child_visits = np.where(right_is_minority, block["node_right"][i], block["node_visits"][i] - block["node_right"][i])
            risky = (v[i] > 0) & (child_visits > 0) & (slope > 0) & (v[i] * minority_share < min_tokens)
            for layer, tree, node in zip(*np.nonzero(risky)):
                if tree >= infos[layer].trees or node >= 2 ** infos[layer].depth - 1 or (layers is not None and layer not in layers):
                    continue
                flags.append((at + i, int(layer), int(tree), int(node),
                              int(2 * node + 1 + right_is_minority[layer, tree, node]), float(projected[layer, tree, node])))  # fmt: skip
        at += len(v)
    # Keep the first flag of each (node, child) episode; a flag is true if that child dies within the horizon.
    seen: set[tuple[int, int, int]] = set()
    rows, true_flags = [], 0
    for index, layer, tree, node, child, score in flags:
        key = (layer, tree, child)
        if key in seen:
            continue
        seen.add(key)
        death = death_index.get(key)
        hit = death is not None and index < death <= index + horizon
        true_flags += hit
        rows.append((int(steps[index]), layer, tree, node, child, score, hit))
    table = pd.DataFrame(rows, columns=["step", "layer", "tree", "node", "child", "projected_score", "child_died"])
    flagged_first = {(r.layer, r.tree, r.child): int(np.searchsorted(steps, r.step)) for r in table.itertuples()}
    # Predictable deaths: a child starved by its live parent's split, not one cascading from a dead parent.
    own = events[(events["kind"] == "died") & (events["node"] > 0) & ~events["parent_died_same_step"]]
    deaths = {(r.layer, r.tree, r.node): death_index[(r.layer, r.tree, r.node)] for r in own.itertuples()}
    predicted = sum(1 for key, idx in deaths.items() if key in flagged_first and idx - horizon <= flagged_first[key] < idx)
    return WarningReport(flags=table, deaths=len(deaths), predicted=predicted, true_flags=true_flags)
