"""Pruning events (metrics v2) and the early warning, scored against two baselines on the run itself.

Every unit (decision node or leaf) gets a calibrated state in each rolling window of K intervals
(calibrated.py). A unit *dies* at the first interval t from which every rolling window finds it dead
up to the end of the run, having been live before; the dead stretch must span at least K windows,
or the death is `pending`. The same for *freezes* (live, minority child provably under ε). A death
under a live parent is a `pruned_root`; one under a parent that is not live is a `cascade`.

The early warning that predicts pruning-root deaths, with its baselines, is in warning.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from routescope.analysis.calibrated import DEAD, DEFAULT, LIVE, Thresholds, tree_states
from routescope.analysis.stats import node_moments
from routescope.analysis.tree import LayerInfo, layer_infos
from routescope.analysis.window import pick_layers

EVENT_COLUMNS = ["kind", "status", "step", "layer", "tree", "node", "level", "leaf", "role", "side", "drift_first",
                 "drift_before", "drift_last", "parent_drift_first", "parent_drift_before", "mu_first", "mu_before",
                 "live_windows"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- history


@dataclass
class History:
    """Per rolling window of K intervals (one per interval, ending there) and per unit in heap order (leaf j
    is unit 2^d − 1 + j; padding of shallower layers is state −1): state, frozen, starved side, and
    the standardized drift μ/σ; per interval, the raw visits. Arrays (step, layer, tree, unit)."""

    steps: np.ndarray
    infos: list[LayerInfo]
    th: Thresholds
    state: np.ndarray  # int8 rolling state, -1 where the unit does not exist
    frozen: np.ndarray  # bool, decision nodes only (unit < 2^d − 1)
    starves_right: np.ndarray
    visits: np.ndarray  # raw per-interval visits
    rolling_visits: np.ndarray
    drift: np.ndarray  # rolling μ/σ (float32, NaN where unvisited or unrecorded)
    mu: np.ndarray


def _rolling(values: np.ndarray, k: int) -> np.ndarray:
    """Sums over the last k intervals (fewer at the start), along axis 0."""
    cum = np.cumsum(values, axis=0)
    out = cum.copy()
    out[k:] -= cum[:-k]
    return out


def _units(ds: xr.Dataset, node_name: str, leaf_name: str, info: LayerInfo) -> np.ndarray | None:
    """One layer's per-interval node then leaf values in heap order (step, tree, unit), None if not recorded."""
    if node_name not in ds or leaf_name not in ds:
        return None
    nodes = 2**info.depth - 1
    node = ds[node_name].isel(layer=info.index).values[:, : info.trees, :nodes]
    leaf = ds[leaf_name].isel(layer=info.index).values[:, : info.trees, : nodes + 1]
    return np.concatenate([node, leaf], axis=-1)


def history(ds: xr.Dataset, th: Thresholds = DEFAULT, layers: list[int] | None = None) -> History:
    """The rolling states of every unit of the chosen tree layers over the whole of `ds` (one pass, in memory)."""
    infos = pick_layers(layer_infos(ds), layers)
    steps, k = ds["step"].values, th.persistence
    shape = (len(steps), ds.sizes["layer"], ds.sizes["tree"], 2 ** (max(i.depth for i in infos) + 1) - 1)
    state = np.full(shape, -1, dtype=np.int8)
    frozen, starves_right = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    visits, rolling_visits = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.float64)
    drift, mu = np.full(shape, np.nan, dtype=np.float32), np.full(shape, np.nan, dtype=np.float32)
    tokens = _rolling(ds["tokens"].values.astype(np.float64), k)
    for info in infos:
        raw = _units(ds, "node_visits", "leaf_visits", info)
        assert raw is not None
        nodes, units, t = 2**info.depth - 1, 2 ** (info.depth + 1) - 1, info.trees
        right = _rolling(ds["node_right"].isel(layer=info.index).values[:, :t, :nodes].astype(np.float64), k)
        rolled = _rolling(raw.astype(np.float64), k)
        st = tree_states(rolled[..., :nodes], right, rolled[..., nodes:], tokens, th)
        at = (slice(None), info.index, slice(0, t), slice(0, units))
        state[at], visits[at], rolling_visits[at] = st.states, raw, rolled
        frozen[at][..., :nodes], starves_right[at][..., :nodes] = st.frozen, st.starves_right
        sums, squares = _units(ds, "node_act_sum", "leaf_act_sum", info), _units(ds, "node_act_sqsum", "leaf_act_sqsum", info)
        if sums is not None and squares is not None:
            m, s = node_moments(rolled, _rolling(sums.astype(np.float64), k), _rolling(squares.astype(np.float64), k))
            assert s is not None
            with np.errstate(divide="ignore", invalid="ignore"):
                drift[at] = np.where(s > 0, m / s, np.nan)
            mu[at] = m
    return History(steps, infos, th, state, frozen, starves_right, visits, rolling_visits, drift, mu)


def _tail(mask: np.ndarray) -> np.ndarray:
    """Length of the run of True at the end of axis 0."""
    return np.cumprod(mask[::-1], axis=0, dtype=np.int64).sum(0)


def _first(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along axis 0 (len where none)."""
    return np.where(mask.any(0), mask.argmax(0), len(mask))


def death_intervals(h: History) -> tuple[np.ndarray, np.ndarray]:
    """Per unit (layer, tree, unit): the interval t its final dead stretch began (−1 if it never died
    after being live) and whether that stretch spans at least K windows (False: pending)."""
    dead, live = h.state == DEAD, h.state == LIVE
    tail = _tail(dead)
    start = len(h.steps) - tail
    died = (tail > 0) & (_first(live) < start)
    return np.where(died, start, -1), died & (tail >= h.th.persistence)


# ---------------------------------------------------------------------------------------------- events


def pick_at(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[index[...], ...] along axis 0 (NaN where index is out of range)."""
    ok = (index >= 0) & (index < len(values))
    got = np.take_along_axis(values, np.clip(index, 0, len(values) - 1)[None], 0)[0].astype(np.float64)
    return np.where(ok, got, np.nan)


def events_table(h: History) -> pd.DataFrame:
    """One row per unit that died or froze (status "event"), or began to and has not yet persisted K
    windows ("pending"), with its role, side and drift summary; sorted by step."""
    steps, n = h.steps, len(h.steps)
    live = h.state == LIVE
    first_live = _first(live)
    last = n - 1
    start, confirmed = death_intervals(h)
    froze_tail = _tail(h.frozen)
    froze_start = n - froze_tail
    was_free = _first(live & ~h.frozen) < froze_start
    froze = (froze_tail > 0) & was_free
    parents = np.maximum((np.arange(h.state.shape[-1]) - 1) // 2, 0)
    parent_drift = h.drift[..., parents] * np.where(np.arange(h.state.shape[-1]) % 2 == 0, 1, -1)  # toward the unit
    rows: list[list[Any]] = []
    for kind, began, final, mask in (("died", start, confirmed, start >= 0), ("froze", froze_start, froze_tail >= h.th.persistence, froze)):
        before = began - 1
        summary = {"drift_first": pick_at(h.drift, first_live), "drift_before": pick_at(h.drift, before),
                   "drift_last": pick_at(h.drift, np.full(began.shape, last)), "parent_drift_first": pick_at(parent_drift, first_live),
                   "parent_drift_before": pick_at(parent_drift, before), "mu_first": pick_at(h.mu, first_live),
                   "mu_before": pick_at(h.mu, before)}  # fmt: skip
        parent_live = pick_at(h.state[..., parents], began) == LIVE
        depths = {info.index: info.depth for info in h.infos}
        for layer, tree, unit in zip(*np.nonzero(mask)):
            if layer not in depths:
                continue  # a layer not chosen
            nodes = 2 ** depths[layer] - 1
            at = (layer, tree, unit)
            if kind == "died":
                role, side = ("pruned_root" if parent_live[at] else "cascade"), ("left" if unit % 2 else "right")
            else:
                role, side = None, "right" if h.starves_right[-1][at] else "left"
            rows.append([kind, "event" if final[at] else "pending", int(steps[began[at]]), int(layer), int(tree), int(unit),
                         int(np.log2(unit + 1)), bool(unit >= nodes), role, side, *(float(v[at]) for v in summary.values()),
                         int(live[:, layer, tree, unit].sum())])  # fmt: skip
    table = pd.DataFrame(rows, columns=EVENT_COLUMNS)
    return table.sort_values(["step", "layer", "tree", "node", "kind"], ignore_index=True)


def pruning_events(ds: xr.Dataset, th: Thresholds = DEFAULT, layers: list[int] | None = None) -> pd.DataFrame:
    """Deaths and freezes of the run's units (v2: persistence K, pending at the end; see events_table)."""
    return events_table(history(ds, th, layers))

