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

from routescope.analysis.stats import (
    FROZEN_EPSILON,
    binary_entropy,
    entropy_bits,
    entropy_miller_madow,
    gini,
    is_frozen,
    node_moments,
    right_share,
)
from routescope.analysis.window import (
    Window,
    in_window,
    layer_configs,
    pick_layers,
    rolling_sums,
    select_window,
    window_bounds,
    window_counts,
)

TREE_METRICS = (
    "routing_entropy", "balance", "leaf_entropy_norm", "effective_leaves", "dead_fraction", "frozen_fraction",
    "static_fraction", "active_fraction", "firing_fraction", "leaf_gini",
)  # fmt: skip
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


def _split_metrics(visits: np.ndarray, right: np.ndarray, epsilon: float) -> dict[str, np.ndarray]:
    """Visit-weighted routing entropy and balance of a set of decision nodes (last axis), and its
    dead and frozen node counts. Unvisited nodes have no split and carry no weight."""
    visits = visits.astype(np.float64)
    live = visits > 0
    p = right_share(visits, right)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = visits.sum(-1)
        return {
            "routing_entropy": np.where(live, visits * binary_entropy(p), 0).sum(-1) / total,
            "balance": np.where(live, visits * (1 - np.abs(2 * p - 1)), 0).sum(-1) / total,
            "dead": (~live).sum(-1),
            "frozen": is_frozen(visits, right, epsilon).sum(-1),
        }


def tree_metrics_numpy(counts: dict[str, np.ndarray], layer: LayerInfo, epsilon: float = FROZEN_EPSILON) -> dict[str, np.ndarray]:
    """All per-tree metrics of one layer from window-summed counts of shape (..., T, nodes|leaves).

    `counts` holds node_visits, node_right, node_fires (..., T, 2^d - 1), leaf_visits, leaf_fires
    (..., T, 2^d) and tokens (...,). Returns arrays of shape (..., T).
    """
    d, nodes = layer.depth, 2**layer.depth - 1
    leaves = counts["leaf_visits"].astype(np.float64)
    tokens = np.asarray(counts["tokens"], dtype=np.float64)[..., None]  # (..., 1) broadcasts over trees
    split = _split_metrics(counts["node_visits"], counts["node_right"], epsilon)
    routing_entropy, balance = split["routing_entropy"], split["balance"]
    dead_nodes, frozen = split["dead"], split["frozen"]
    with np.errstate(divide="ignore", invalid="ignore"):
        leaf_entropy = entropy_bits(leaves)
        dead_leaves = (leaves == 0).sum(-1)
        if layer.variant == "leaf_mlp":
            static = dead_leaves / 2**d
            active = np.full_like(dead_leaves, 1 / 2**d, dtype=np.float64)
            firing = counts["leaf_fires"].sum(-1) / (tokens * layer.leaf_width)
        else:
            static = (dead_nodes + dead_leaves) / (2 ** (d + 1) - 1)
            active = np.full_like(dead_leaves, (d + 1) / (2 ** (d + 1) - 1), dtype=np.float64)
            firing = (counts["node_fires"].sum(-1) + counts["leaf_fires"].sum(-1)) / (tokens * (d + 1))
        return {
            "routing_entropy": routing_entropy,
            "balance": balance,
            "leaf_entropy_norm": leaf_entropy / d if d > 0 else np.full_like(leaf_entropy, np.nan),
            "effective_leaves": np.exp2(leaf_entropy),
            "dead_fraction": dead_nodes / nodes if nodes else np.full_like(leaf_entropy, np.nan),
            "frozen_fraction": frozen / nodes if nodes else np.full_like(leaf_entropy, np.nan),
            "static_fraction": static,
            "active_fraction": active,
            "firing_fraction": firing,
            "leaf_gini": gini(leaves),
        }


def depth_metrics_numpy(counts: dict[str, np.ndarray], layer: LayerInfo, epsilon: float = FROZEN_EPSILON) -> dict[str, np.ndarray]:
    """Routing entropy, balance, dead and frozen fractions per depth level: arrays (..., T, d)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("routing_entropy", "balance", "dead_fraction", "frozen_fraction")}
    for level in range(layer.depth):
        lo, hi = 2**level - 1, 2 ** (level + 1) - 1
        split = _split_metrics(counts["node_visits"][..., lo:hi], counts["node_right"][..., lo:hi], epsilon)
        out["routing_entropy"].append(split["routing_entropy"])
        out["balance"].append(split["balance"])
        out["dead_fraction"].append(split["dead"] / (hi - lo))
        out["frozen_fraction"].append(split["frozen"] / (hi - lo))
    return {k: np.stack(v, axis=-1) if v else np.zeros(counts["tokens"].shape + (layer.trees, 0)) for k, v in out.items()}


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


def summarize(ds: xr.Dataset, window: Window = (None, None), layers: list[int] | None = None,
              epsilon: float = FROZEN_EPSILON) -> xr.Dataset:  # fmt: skip
    """Window metrics per tree (dims layer, tree) and per layer (suffix-free, mean over trees)."""
    infos = select_layers(ds, layers)
    counts = window_counts(select_window(ds, window), SUMMARY_VARIABLES)
    max_trees = max(info.trees for info in infos)
    per_tree = {name: np.full((len(infos), max_trees), np.nan) for name in TREE_METRICS}
    max_depth = max(info.depth for info in infos)
    per_depth = {name: np.full((len(infos), max_depth), np.nan) for name in ("routing_entropy", "balance", "dead_fraction", "frozen_fraction")}
    for row, info in enumerate(infos):
        layer_counts = layer_slice(counts, info, leading=0)
        for name, value in tree_metrics_numpy(layer_counts, info, epsilon).items():
            per_tree[name][row, : info.trees] = value
        for name, value in depth_metrics_numpy(layer_counts, info, epsilon).items():
            per_depth[name][row, : info.depth] = np.nanmean(value, axis=0) if value.size else []
    coords = {"layer": [info.index for info in infos]}
    data = {name: (("layer",), np.nanmean(v, axis=1)) for name, v in per_tree.items()}
    data.update({f"tree_{name}": (("layer", "tree"), v) for name, v in per_tree.items()})
    data.update({f"depth_{name}": (("layer", "depth"), v) for name, v in per_depth.items()})
    return xr.Dataset(data, coords=coords, attrs=window_bounds(select_window(ds, window)))


def node_table(ds: xr.Dataset, window: Window = (None, None)) -> xr.Dataset:
    """Per node over the window: visits, split p_n, entropy, drift mu_n and spread sigma_n (layer, tree, node)."""
    counts = window_counts(select_window(ds, window), COUNT_VARIABLES)
    p = right_share(counts["node_visits"], counts["node_right"])
    mu, sigma = node_moments(counts["node_visits"], counts["node_act_sum"], counts["node_act_sqsum"])
    dims = ("layer", "tree", "node")
    return xr.Dataset({"visits": (dims, counts["node_visits"]), "p": (dims, p), "entropy": (dims, binary_entropy(p)),
                       "mu": (dims, mu), "sigma": (dims, sigma)}, coords={k: ds[k].values for k in dims})  # fmt: skip


# ---------------------------------------------------------------------------------------------- over training


def timeseries(ds: xr.Dataset, rolling: int | None = 10, layers: list[int] | None = None,
               epsilon: float = FROZEN_EPSILON) -> xr.Dataset:  # fmt: skip
    """Every tree metric as a curve over training: per interval, over the last `rolling` intervals
    (rolling=None: cumulative from the start). Dims (step, layer); per tree as tree_<name>."""
    infos = select_layers(ds, layers)
    names = SUMMARY_VARIABLES
    steps = ds["step"].values
    max_trees = max(info.trees for info in infos)
    out = {name: np.full((len(steps), len(infos), max_trees), np.nan) for name in TREE_METRICS}
    for at, sums in rolling_sums(ds, names, rolling):
        n = len(sums["tokens"])
        for row, info in enumerate(infos):
            for name, value in tree_metrics_numpy(layer_slice(sums, info, leading=1), info, epsilon).items():
                out[name][at : at + n, row, : info.trees] = value
    coords = {"step": steps, "layer": [info.index for info in infos]}
    data = {name: (("step", "layer"), np.nanmean(v, axis=2)) for name, v in out.items()}
    data.update({f"tree_{name}": (("step", "layer", "tree"), v) for name, v in out.items()})
    return xr.Dataset(data, coords=coords, attrs={"rolling": rolling if rolling is not None else "cumulative"})


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
