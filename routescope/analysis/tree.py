"""The tree family's metrics over windows of steps (docs/metrics.md): one implementation for the
CLI, the dashboard and the notebooks. The L1 and MoE families' are in families.py; family.py puts
all three behind one interface.

Every metric is computed from counts summed over a window of intervals, per tree, then averaged over
the trees of a layer (plain mean). Entropies are in bits. The core works on numpy arrays with any
leading shape, so the same code gives a window summary (one row) and a time series (one row per
interval, streamed through the file block by block, never loading whole variables).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from routescope.analysis.calibrated import (
    DEAD,
    DEFAULT,
    LIVE,
    PERSISTENCE,
    UNDETERMINED,
    Thresholds,
    TreeStates,
    calibrated_tree_numpy,
    tree_states,
)
from routescope.analysis.stats import (
    binary_entropy,
    entropy_bits,
    entropy_miller_madow,
    gini,
    node_moments,
    right_share,
)
from routescope.analysis.window import (
    LAST_QUARTER,
    Window,
    describe_window,
    in_window,
    layer_configs,
    pick_layers,
    rolling_sums,
    select_window,
    window_bounds,
    window_counts,
)

TREE_METRICS = (
    "routing_entropy", "balance", "leaf_entropy_norm", "effective_leaves", "dead_fraction", "undetermined_fraction",
    "frozen_fraction", "right_starved_share", "static_fraction", "zero_visit_fraction", "pruned_roots", "cascade_dead",
    "active_fraction", "firing_fraction", "leaf_gini",
)  # fmt: skip
DEPTH_METRICS = ("routing_entropy", "balance", "dead_fraction", "undetermined_fraction", "frozen_fraction")
COUNT_VARIABLES = ("tokens", "node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires",
                   "node_act_sum", "node_act_sqsum")  # fmt: skip
SUMMARY_VARIABLES = ("tokens", "node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires")


@dataclass(frozen=True)
class LayerInfo:
    """What the metrics need to know about one recorded layer."""

    index: int
    name: str
    family: str
    depth: int
    trees: int
    variant: str
    leaf_width: int


def layer_infos(ds: xr.Dataset) -> list[LayerInfo]:
    """Per-layer shape and variant, from the file's `layers` attribute and layer variables."""
    infos = []
    for i, cfg in enumerate(layer_configs(ds)):
        infos.append(LayerInfo(
            index=i, name=str(ds["layer_name"].values[i]), family=cfg.get("family", "tree"),
            depth=int(ds["layer_depth"].values[i]), trees=int(ds["layer_trees"].values[i]),
            variant=cfg.get("variant", "neuron"), leaf_width=int(cfg.get("leaf_width", 1)),
        ))  # fmt: skip
    return infos


# ---------------------------------------------------------------------------------------------- core


def tree_metrics_numpy(counts: dict[str, np.ndarray], layer: LayerInfo, th: Thresholds = DEFAULT,
                       states: TreeStates | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """All per-tree metrics of one layer from window-summed counts of shape (..., T, nodes|leaves).

    `counts` holds node_visits, node_right, node_fires (..., T, 2^d - 1), leaf_visits, leaf_fires
    (..., T, 2^d) and tokens (...,). States are calibrated (calibrated.py). Returns arrays (..., T).
    """
    d = layer.depth
    leaves = counts["leaf_visits"].astype(np.float64)
    tokens = np.asarray(counts["tokens"], dtype=np.float64)[..., None]  # (..., 1) broadcasts over trees
    out = calibrated_tree_numpy(counts["node_visits"], counts["node_right"], counts["leaf_visits"], counts["tokens"],
                                layer.variant, th, states)  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        leaf_entropy = entropy_bits(leaves)
        if layer.variant == "leaf_mlp":
            active = np.full_like(leaf_entropy, 1 / 2**d)
            firing = counts["leaf_fires"].sum(-1) / (tokens * layer.leaf_width)
        else:
            active = np.full_like(leaf_entropy, (d + 1) / (2 ** (d + 1) - 1))
            firing = (counts["node_fires"].sum(-1) + counts["leaf_fires"].sum(-1)) / (tokens * (d + 1))
        out.update({
            "leaf_entropy_norm": leaf_entropy / d if d > 0 else np.full_like(leaf_entropy, np.nan),
            "effective_leaves": np.exp2(leaf_entropy),
            "active_fraction": active,
            "firing_fraction": firing,
            "leaf_gini": gini(leaves),
        })  # fmt: skip
    return {name: out[name] for name in TREE_METRICS}


def depth_metrics_numpy(counts: dict[str, np.ndarray], layer: LayerInfo, th: Thresholds = DEFAULT,
                        states: TreeStates | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Routing entropy, balance and the dead, undetermined and frozen fractions per depth level: arrays (..., T, d)."""
    st = states if states is not None else layer_states(counts, th)
    visits = np.asarray(counts["node_visits"], dtype=np.float64)
    p = right_share(visits, counts["node_right"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in DEPTH_METRICS}
    for level in range(layer.depth):
        lo, hi = 2**level - 1, 2 ** (level + 1) - 1
        state, live = st.states[..., lo:hi], st.states[..., lo:hi] == LIVE
        weight = np.where(live, visits[..., lo:hi], 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["routing_entropy"].append(np.where(live, binary_entropy(p[..., lo:hi]), 0.0).sum(-1) / live.sum(-1))
            out["balance"].append((weight * (1 - np.abs(2 * np.nan_to_num(p[..., lo:hi]) - 1))).sum(-1) / weight.sum(-1))
        out["dead_fraction"].append((state == DEAD).sum(-1) / (hi - lo))
        out["undetermined_fraction"].append((state == UNDETERMINED).sum(-1) / (hi - lo))
        out["frozen_fraction"].append(st.frozen[..., lo:hi].sum(-1) / (hi - lo))
    return {k: np.stack(v, axis=-1) if v else np.zeros(counts["tokens"].shape + (layer.trees, 0)) for k, v in out.items()}


def layer_states(counts: dict[str, np.ndarray], th: Thresholds = DEFAULT) -> TreeStates:
    """The calibrated states of one layer's window-summed counts (calibrated.tree_states)."""
    return tree_states(counts["node_visits"], counts["node_right"], counts["leaf_visits"], counts["tokens"], th)


def layer_slice(counts: dict[str, np.ndarray], layer: LayerInfo, leading: int) -> dict[str, np.ndarray]:
    """One layer's unpadded counts from arrays shaped (lead..., layer, tree, x)."""
    nodes, leaves = 2**layer.depth - 1, 2**layer.depth
    idx = (slice(None),) * leading + (layer.index,)
    out = {"tokens": counts["tokens"]}
    for name, value in counts.items():
        if name.startswith("node_"):
            out[name] = value[idx][..., : layer.trees, :nodes]
        elif name.startswith("leaf_"):
            out[name] = value[idx][..., : layer.trees, :leaves]
    return out


def select_layers(ds: xr.Dataset, layers: list[int] | None) -> list[LayerInfo]:
    """The chosen tree layers (all when `layers` is None); a clear error for a bad index."""
    return pick_layers(layer_infos(ds), layers)


def summarize(ds: xr.Dataset, window: Window = LAST_QUARTER, layers: list[int] | None = None,
              th: Thresholds = DEFAULT) -> xr.Dataset:  # fmt: skip
    """Window metrics per tree (dims layer, tree), per depth (layer, depth) and per layer (suffix-free, mean
    over trees). The default window is the last quarter of the run: how it routes now."""
    infos = select_layers(ds, layers)
    counts = window_counts(select_window(ds, window), SUMMARY_VARIABLES)
    max_trees = max(info.trees for info in infos)
    per_tree = {name: np.full((len(infos), max_trees), np.nan) for name in TREE_METRICS}
    max_depth = max(info.depth for info in infos)
    per_depth = {name: np.full((len(infos), max_depth), np.nan) for name in DEPTH_METRICS}
    for row, info in enumerate(infos):
        layer_counts = layer_slice(counts, info, leading=0)
        states = layer_states(layer_counts, th)  # computed once for the tree and the depth metrics
        for name, value in tree_metrics_numpy(layer_counts, info, th, states).items():
            per_tree[name][row, : info.trees] = value
        for name, value in depth_metrics_numpy(layer_counts, info, th, states).items():
            per_depth[name][row, : info.depth] = _tree_mean(value, axis=0) if value.size else []
    coords = {"layer": [info.index for info in infos]}
    data = {name: (("layer",), _tree_mean(v, axis=1)) for name, v in per_tree.items()}
    data.update({f"tree_{name}": (("layer", "tree"), v) for name, v in per_tree.items()})
    data.update({f"depth_{name}": (("layer", "depth"), v) for name, v in per_depth.items()})
    attrs = {**window_bounds(select_window(ds, window)), "window": describe_window(window), **th.as_dict()}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _tree_mean(values: np.ndarray, axis: int) -> np.ndarray:
    """The plain mean over trees, leaving out trees where a metric is undefined (NaN; all NaN -> NaN, silently)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(values)
        return np.where(ok.any(axis), np.where(ok, values, 0).sum(axis) / ok.sum(axis), np.nan)


def node_table(ds: xr.Dataset, window: Window = LAST_QUARTER, th: Thresholds = DEFAULT) -> xr.Dataset:
    """Per node over the window: visits, split p_n, entropy, drift mu_n and spread sigma_n, the calibrated
    state (0 dead, 1 undetermined, 2 live), frozen and its starved side (layer, tree, node); per leaf its
    visits and state (layer, tree, leaf). Padding of shallower layers is NaN / -1."""
    selected = select_window(ds, window)
    counts = window_counts(selected, COUNT_VARIABLES + ("leaf_visits",))
    p = right_share(counts["node_visits"], counts["node_right"])
    mu, sigma = node_moments(counts["node_visits"], counts["node_act_sum"], counts["node_act_sqsum"])
    node_state = np.full(counts["node_visits"].shape, -1, dtype=np.int8)
    leaf_state = np.full(counts["leaf_visits"].shape, -1, dtype=np.int8)
    frozen = np.zeros(node_state.shape, dtype=bool)
    starves_right = np.zeros(node_state.shape, dtype=bool)
    for info in layer_infos(ds):
        c = layer_slice(counts, info, leading=0)
        st = layer_states(c, th)
        nodes, t = 2**info.depth - 1, info.trees
        node_state[info.index, :t, :nodes] = st.states[..., :nodes]
        leaf_state[info.index, :t, : nodes + 1] = st.states[..., nodes:]
        frozen[info.index, :t, :nodes], starves_right[info.index, :t, :nodes] = st.frozen, st.starves_right
    dims, leaf_dims = ("layer", "tree", "node"), ("layer", "tree", "leaf")
    data = {"visits": (dims, counts["node_visits"]), "p": (dims, p), "entropy": (dims, binary_entropy(p)), "mu": (dims, mu),
            "sigma": (dims, sigma), "state": (dims, node_state), "frozen": (dims, frozen), "starves_right": (dims, starves_right),
            "leaf_visits": (leaf_dims, counts["leaf_visits"]), "leaf_state": (leaf_dims, leaf_state)}  # fmt: skip
    attrs = {**window_bounds(selected), "window": describe_window(window), **th.as_dict()}
    return xr.Dataset(data, coords={k: ds[k].values for k in (*dims, "leaf")}, attrs=attrs)


# ---------------------------------------------------------------------------------------------- over training


def timeseries(ds: xr.Dataset, rolling: int | None = PERSISTENCE, layers: list[int] | None = None,
               th: Thresholds = DEFAULT) -> xr.Dataset:  # fmt: skip
    """Every tree metric as a curve over training: per interval, over the last `rolling` intervals (default
    K = 5; rolling=None: cumulative from the start). Dims (step, layer); per tree as tree_<name>."""
    infos = select_layers(ds, layers)
    names = SUMMARY_VARIABLES
    steps = ds["step"].values
    max_trees = max(info.trees for info in infos)
    out = {name: np.full((len(steps), len(infos), max_trees), np.nan) for name in TREE_METRICS}
    for at, sums in rolling_sums(ds, names, rolling):
        n = len(sums["tokens"])
        for row, info in enumerate(infos):
            for name, value in tree_metrics_numpy(layer_slice(sums, info, leading=1), info, th).items():
                out[name][at : at + n, row, : info.trees] = value
    coords = {"step": steps, "layer": [info.index for info in infos]}
    data = {name: (("step", "layer"), _tree_mean(v, axis=2)) for name, v in out.items()}
    data.update({f"tree_{name}": (("step", "layer", "tree"), v) for name, v in out.items()})
    return xr.Dataset(data, coords=coords, attrs={"rolling": rolling if rolling is not None else "cumulative", **th.as_dict()})


def first_step_where(curve: xr.DataArray, condition: Any) -> xr.DataArray:
    """The first step at which `condition(curve)` holds, per remaining dimension (NaN if never).

    E.g. first_step_where(ts.static_fraction, lambda s: s > 0.5) -> the step each layer passed 50%.
    """
    hit = condition(curve)
    steps = curve["step"]
    first = hit.argmax("step")
    return xr.where(hit.any("step"), steps.isel(step=first), np.nan)


def node_drift(ds: xr.Dataset) -> xr.DataArray:
    """mu_n = node_act_sum / node_visits per interval (step, layer, tree, node); NaN where unvisited. Lazy."""
    mu = xr.apply_ufunc(lambda visits, total: node_moments(visits, total)[0], ds["node_visits"], ds["node_act_sum"],
                        dask="parallelized", output_dtypes=[np.float64])  # fmt: skip
    return mu.rename("mu")


def mutual_information(traces: xr.Dataset, window: Window = (None, None)) -> xr.DataArray:
    """I(token; leaf) in bits per layer (mean over trees) from the sampled traces, Miller-Madow corrected."""
    keep = in_window(traces["sample_step"].values, window)
    tokens = traces["token_id"].values[keep]
    leaves = traces["leaf"].values[keep]  # (sample, layer, tree)
    valid_tokens = tokens >= 0
    result = np.full(leaves.shape[1], np.nan)
    for layer in range(leaves.shape[1]):
        values = []
        for tree in range(leaves.shape[2]):
            leaf = leaves[:, layer, tree]
            ok = valid_tokens & (leaf >= 0)
            if ok.sum() < 2:
                continue
            t, lf = tokens[ok].astype(np.int64), leaf[ok].astype(np.int64)
            joint = t * (int(lf.max()) + 1) + lf
            h = [entropy_miller_madow(np.bincount(np.unique(a, return_inverse=True)[1])) for a in (t, lf, joint)]
            values.append(h[0] + h[1] - h[2])
        if values:
            result[layer] = float(np.mean(values))
    return xr.DataArray(result, dims=("layer",), coords={"layer": traces["layer"].values}, name="mutual_information")
