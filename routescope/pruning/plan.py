"""What `routescope prune` removes: per recorded layer, the units the calibrated (v2) states call dead in a window.

Trees: a dead unit goes with its whole subtree; a decision node whose two child subtrees both go, goes too (its
tokens could go nowhere); the root never goes. A kept node that lost one child is held to the other. L1 layers
lose their dead hidden units, MoE layers their dead experts. Each plan also carries what the window predicts:
the share of the window's tokens that reached the removed units (the share a pruned model reroutes, on data
like the window's) and the calibrated bound on it (Σ δ·share over the removed units: with probability ≥ 1 − α
each removed unit's reach lies below its δ·share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from routescope.analysis.calibrated import DEAD, DEFAULT, Thresholds, heap_levels
from routescope.analysis.families import FAMILY_COUNTS, family_layers, unit_masks
from routescope.analysis.tree import SUMMARY_VARIABLES, layer_infos, layer_slice, layer_states
from routescope.analysis.window import LAST_QUARTER, Window, describe_window, select_window, window_counts


@dataclass
class LayerPlan:
    """One layer's cut. keep: (T, units) for trees, (units,) for L1, (experts,) for MoE; held_side: trees only."""

    name: str
    family: str
    keep: np.ndarray
    held_side: np.ndarray | None = None
    window_reach: float = 0.0  # share of the window's tokens that reached a removed unit (summed over trees)
    bound: float = 0.0  # Σ δ·share over the removed units (trees: over the removed subtrees' roots)
    notes: list[str] = field(default_factory=list)

    @property
    def units_before(self) -> int:
        return int(self.keep.size)

    @property
    def units_after(self) -> int:
        return int(self.keep.sum())


def tree_cut(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep (T, units) bool, held_side (T, nodes) int8) from unit states (T, units) in heap order."""
    trees, units = states.shape
    nodes = (units - 1) // 2
    removed = states == DEAD
    removed[:, 0] = False  # the root sees every token
    for unit in range(1, units):  # top-down: a removed unit takes its subtree
        removed[:, unit] |= removed[:, (unit - 1) // 2]
    for node in range(nodes - 1, 0, -1):  # bottom-up: both children gone -> the node goes
        removed[:, node] |= removed[:, 2 * node + 1] & removed[:, 2 * node + 2]
    for unit in range(1, units):  # and its other descendants with it
        removed[:, unit] |= removed[:, (unit - 1) // 2]
    both_root_children = removed[:, 1] & removed[:, 2] if units > 1 else np.zeros(trees, dtype=bool)
    removed[both_root_children] = False  # cannot happen for a live root: leave such a tree whole
    held = np.full((trees, nodes), -1, dtype=np.int8)
    if nodes:
        left, right = removed[:, 1::2][:, :nodes], removed[:, 2::2][:, :nodes]
        held[~removed[:, :nodes] & right & ~left] = 0
        held[~removed[:, :nodes] & left & ~right] = 1
    return ~removed, held


def removed_roots(keep: np.ndarray) -> np.ndarray:
    """(T, units) bool: removed units whose parent is kept (the roots of the removed subtrees)."""
    units = keep.shape[-1]
    parents = (np.arange(1, units) - 1) // 2
    roots = ~keep[:, 1:] & keep[:, parents]
    return np.concatenate([np.zeros((keep.shape[0], 1), dtype=bool), roots], axis=1)


def plan_tree_layers(ds: xr.Dataset, window: Window, th: Thresholds) -> list[LayerPlan]:
    """Plans for every neuron-variant tree layer of a `tree` group over `window`."""
    counts = window_counts(select_window(ds, window), SUMMARY_VARIABLES)
    plans = []
    for info in layer_infos(ds):
        if info.variant != "neuron":
            continue
        mine = layer_slice(counts, info, leading=0)
        keep, held = tree_cut(layer_states(mine, th).states)
        visits = np.concatenate([mine["node_visits"], mine["leaf_visits"]], axis=-1).astype(np.float64)
        roots = removed_roots(keep)
        tokens = float(mine["tokens"])
        share = th.delta * np.exp2(-heap_levels(keep.shape[1]).astype(np.float64))
        reach = float(visits[roots].sum() / tokens) if tokens > 0 else float("nan")
        plans.append(LayerPlan(info.name, "tree", keep, held, reach, float((share[None, :] * roots).sum())))
    return plans


def plan_family_layers(ds: xr.Dataset, family: str, window: Window, th: Thresholds) -> list[LayerPlan]:
    """Plans for the L1 or MoE layers of a family group over `window` (dead = the v2 test of the families' metrics)."""
    counts = window_counts(select_window(ds, window), (*FAMILY_COUNTS[family], "layer_tokens"))
    plans = []
    for layer in family_layers(ds, family):
        tokens = counts["layer_tokens"][layer.index] if "layer_tokens" in counts else counts["tokens"]
        tokens = float(tokens)
        if family == "l1":
            hits = np.asarray(counts["unit_fires"][layer.index][: layer.width], dtype=np.float64)
            share = counts["active_sum"][layer.index] / tokens / layer.width if tokens > 0 else 0.0
        else:
            hits = np.diagonal(np.asarray(counts["coselect"][layer.index], dtype=np.float64))[: layer.width]
            share = layer.k / layer.width
        dead, _ = unit_masks(hits, np.float64(tokens), np.float64(share), th)
        keep = ~np.asarray(dead, dtype=bool)
        notes = []
        if not keep.any():  # never remove every unit of a layer
            keep[np.argmax(hits)] = True
            notes.append("every unit tested dead; the busiest is kept")
        reach = float(hits[~keep].sum() / tokens) if tokens > 0 else float("nan")
        plans.append(LayerPlan(layer.name, family, keep, None, reach, float(th.delta * share * (~keep).sum()), notes))
    return plans


def plan_run(path: str | Path, window: Window = LAST_QUARTER, th: Thresholds = DEFAULT) -> tuple[list[LayerPlan], str]:
    """Every routed layer's plan from a run file, and the window's description (e.g. 'last-quarter')."""
    from routescope.store import describe, open_run

    families = describe(path)["families"]
    plans: list[LayerPlan] = []
    if "tree" in families:
        plans += plan_tree_layers(open_run(path, group="tree"), window, th)
    for family in ("l1", "moe"):
        if family in families:
            plans += plan_family_layers(open_run(path, group=family), family, window, th)
    return plans, describe_window(window)
