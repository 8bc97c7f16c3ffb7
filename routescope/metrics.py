"""Routing-dynamics metrics over windows of steps (DESIGN.md, "Metrics"): one implementation for the
CLI, the dashboard and the notebooks. This file holds the tree family's; the L1 and MoE families'
(`summarize_family`, `family_timeseries`, ...) are in metrics_families.py and reachable from here.

Every metric is computed from counts summed over a window of intervals, per tree, then averaged over
the trees of a layer (plain mean). Entropies are in bits. The core works on numpy arrays with any
leading shape, so the same code gives a window summary (one row) and a time series (one row per
interval, streamed through the file block by block, never loading whole variables).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

FROZEN_EPSILON = 0.01  # a live node is frozen when min(p, 1 - p) < epsilon
TREE_METRICS = (
    "routing_entropy", "balance", "leaf_entropy_norm", "effective_leaves", "dead_fraction", "frozen_fraction",
    "static_fraction", "active_fraction", "firing_fraction", "leaf_gini",
)  # fmt: skip
COUNT_VARIABLES = ("tokens", "node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires",
                   "node_act_sum", "node_act_sqsum")  # fmt: skip
SUMMARY_VARIABLES = ("tokens", "node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires")
BLOCK_BYTES = 64 * 1024 * 1024  # rows of the file read at once when streaming


class MetricsError(ValueError):
    """A bad window or layer selection; the message says what is wrong and what to do."""


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
    configs = json.loads(ds.attrs.get("layers", "[]"))
    infos = []
    for i in range(ds.sizes["layer"]):
        cfg = configs[i] if i < len(configs) else {}
        infos.append(LayerInfo(
            index=i, name=str(ds["layer_name"].values[i]), family=cfg.get("family", "tree"),
            depth=int(ds["layer_depth"].values[i]), trees=int(ds["layer_trees"].values[i]),
            variant=cfg.get("variant", "neuron"), leaf_width=int(cfg.get("leaf_width", 1)),
        ))  # fmt: skip
    return infos


# ---------------------------------------------------------------------------------------------- core


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in bits with H(0) = H(1) = 0 (NaN stays NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 1.0 - p
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return np.where(np.isnan(p), np.nan, h)


def entropy_bits(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (bits) of the distribution proportional to `counts` along `axis` (NaN if empty)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = counts / total
        terms = np.where(q > 0, q * np.log2(q), 0.0)
    h = -terms.sum(axis=axis)
    return np.where(np.squeeze(total, axis=axis) > 0, h, np.nan)


def gini(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Gini coefficient along `axis`: 0 when all equal, (n-1)/n when one holds everything."""
    x = np.sort(np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1), axis=-1)
    n = x.shape[-1]
    total = x.sum(-1)
    rank = np.arange(1, n + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (2.0 * (rank * x).sum(-1)) / (n * total) - (n + 1.0) / n
    return np.where(total > 0, g, np.nan)


def _split_metrics(visits: np.ndarray, right: np.ndarray, epsilon: float) -> dict[str, np.ndarray]:
    """Visit-weighted routing entropy and balance of a set of decision nodes (last axis), and its
    dead and frozen node counts. Unvisited nodes have no split and carry no weight."""
    visits, right = visits.astype(np.float64), right.astype(np.float64)
    live = visits > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(live, right / visits, np.nan)
        total = visits.sum(-1)
        return {
            "routing_entropy": np.where(live, visits * binary_entropy(p), 0).sum(-1) / total,
            "balance": np.where(live, visits * (1 - np.abs(2 * p - 1)), 0).sum(-1) / total,
            "dead": (~live).sum(-1),
            "frozen": (live & (np.minimum(p, 1 - p) < epsilon)).sum(-1),
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


# ---------------------------------------------------------------------------------------------- windows


def parse_window(text: str | None) -> tuple[int | None, int | None]:
    """'a:b', 'a:', ':b' or None -> (start, end) of a half-open window of steps [start, end)."""
    if text is None or text.strip() in ("", ":"):
        return (None, None)
    parts = text.split(":")
    if len(parts) != 2:
        raise MetricsError(f"window {text!r} must look like START:END (either may be left out), e.g. 100:500")
    try:
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise MetricsError(f"window {text!r} must hold integer steps, e.g. 100:500") from None
    return start, end


def select_window(ds: xr.Dataset, window: tuple[int | None, int | None] = (None, None)) -> xr.Dataset:
    """The intervals whose closing step lies in [start, end); clear errors for empty or bad windows."""
    start, end = window
    steps = ds["step"].values
    if len(steps) == 0:
        raise MetricsError("the run has no complete interval yet; wait for the first one to be written")
    if start is not None and end is not None and start >= end:
        raise MetricsError(f"window {start}:{end} is empty or reversed; the start must be below the end")
    keep = np.ones(len(steps), dtype=bool)
    if start is not None:
        keep &= steps >= start
    if end is not None:
        keep &= steps < end
    if not keep.any():
        raise MetricsError(
            f"window {'' if start is None else start}:{'' if end is None else end} holds no interval; "
            f"the run's intervals close at steps {steps[0]}..{steps[-1]}"
        )
    return ds.isel(step=np.flatnonzero(keep))


def window_counts(ds: xr.Dataset, names: tuple[str, ...] = COUNT_VARIABLES) -> dict[str, np.ndarray]:
    """Counts summed over all intervals of `ds` (streamed by dask, one pass), as numpy arrays without `step`."""
    import dask

    names = [n for n in names if n in ds]
    summed = dask.compute(*[ds[n].data.sum(axis=0) if hasattr(ds[n].data, "dask") else ds[n].values.sum(0) for n in names])
    return dict(zip(names, (np.asarray(s) for s in summed)))


def _layer_slice(counts: dict[str, np.ndarray], layer: LayerInfo, leading: int) -> dict[str, np.ndarray]:
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


def pick_layers(infos: list, layers: list[int] | None, what: str = "layer") -> list:
    """The chosen entries of `infos` (all when `layers` is None); a clear error naming a bad index."""
    if layers is None:
        return infos
    bad = [i for i in layers if not 0 <= i < len(infos)]
    if bad:
        raise MetricsError(f"no {what} {bad[0]} in this run; it has {what}s 0..{len(infos) - 1}")
    return [infos[i] for i in layers]


def select_layers(ds: xr.Dataset, layers: list[int] | None) -> list[LayerInfo]:
    return pick_layers(layer_infos(ds), layers)


def summarize(ds: xr.Dataset, window: tuple[int | None, int | None] = (None, None), layers: list[int] | None = None,
              epsilon: float = FROZEN_EPSILON) -> xr.Dataset:  # fmt: skip
    """Window metrics per tree (dims layer, tree) and per layer (suffix-free, mean over trees)."""
    infos = select_layers(ds, layers)
    counts = window_counts(select_window(ds, window), SUMMARY_VARIABLES)
    max_trees = max(info.trees for info in infos)
    per_tree = {name: np.full((len(infos), max_trees), np.nan) for name in TREE_METRICS}
    max_depth = max(info.depth for info in infos)
    per_depth = {name: np.full((len(infos), max_depth), np.nan) for name in ("routing_entropy", "balance", "dead_fraction", "frozen_fraction")}
    for row, info in enumerate(infos):
        layer_counts = _layer_slice(counts, info, leading=0)
        for name, value in tree_metrics_numpy(layer_counts, info, epsilon).items():
            per_tree[name][row, : info.trees] = value
        for name, value in depth_metrics_numpy(layer_counts, info, epsilon).items():
            per_depth[name][row, : info.depth] = np.nanmean(value, axis=0) if value.size else []
    coords = {"layer": [info.index for info in infos]}
    data = {name: (("layer",), np.nanmean(v, axis=1)) for name, v in per_tree.items()}
    data.update({f"tree_{name}": (("layer", "tree"), v) for name, v in per_tree.items()})
    data.update({f"depth_{name}": (("layer", "depth"), v) for name, v in per_depth.items()})
    steps = select_window(ds, window)["step"].values
    return xr.Dataset(data, coords=coords, attrs={"window_first_step": int(steps[0]), "window_last_step": int(steps[-1]),
                                                  "intervals": len(steps)})  # fmt: skip


def node_table(ds: xr.Dataset, window: tuple[int | None, int | None] = (None, None)) -> xr.Dataset:
    """Per node over the window: visits, split p_n, entropy, drift mu_n and spread sigma_n (layer, tree, node)."""
    counts = window_counts(select_window(ds, window))
    visits = counts["node_visits"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(visits > 0, counts["node_right"] / visits, np.nan)
        mu = np.where(visits > 0, counts["node_act_sum"] / visits, np.nan)
        sigma = np.sqrt(np.maximum(np.where(visits > 0, counts["node_act_sqsum"] / visits, np.nan) - mu**2, 0))
    dims = ("layer", "tree", "node")
    return xr.Dataset({"visits": (dims, counts["node_visits"]), "p": (dims, p), "entropy": (dims, binary_entropy(p)),
                       "mu": (dims, mu), "sigma": (dims, sigma)}, coords={k: ds[k].values for k in dims})  # fmt: skip


# ---------------------------------------------------------------------------------------------- over training


def _blocks(ds: xr.Dataset, names: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive blocks of whole intervals, as numpy, about BLOCK_BYTES per variable."""
    row_bytes = max(ds[n].dtype.itemsize * int(np.prod(ds[n].shape[1:])) for n in names)
    rows = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, ds.sizes["step"], rows):
        block = ds.isel(step=slice(start, start + rows))
        yield {n: block[n].values for n in names}


def timeseries(ds: xr.Dataset, rolling: int | None = 10, layers: list[int] | None = None,
               epsilon: float = FROZEN_EPSILON) -> xr.Dataset:  # fmt: skip
    """Every tree metric as a curve over training: per interval, over the last `rolling` intervals
    (rolling=None: cumulative from the start). Dims (step, layer); per tree as tree_<name>."""
    infos = select_layers(ds, layers)
    names = SUMMARY_VARIABLES
    steps = ds["step"].values
    max_trees = max(info.trees for info in infos)
    out = {name: np.full((len(steps), len(infos), max_trees), np.nan) for name in TREE_METRICS}
    history: dict[str, np.ndarray] | None = None
    at = 0
    for block in _blocks(ds, names):
        n = len(block["tokens"])
        if history is None:  # cumulative sums through the `rolling` intervals before this block
            history = {k: np.zeros(((rolling or 1),) + v.shape[1:], dtype=v.dtype) for k, v in block.items()}
        window = {}
        for k, v in block.items():
            cum = history[k][-1] + np.cumsum(v, axis=0)
            if rolling is None:
                window[k] = cum
                history[k] = cum[-1:]
            else:
                both = np.concatenate([history[k], cum])
                window[k] = cum - both[:n]
                history[k] = both[-rolling:]
        for row, info in enumerate(infos):
            for name, value in tree_metrics_numpy(_layer_slice(window, info, leading=1), info, epsilon).items():
                out[name][at : at + n, row, : info.trees] = value
        at += n
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
    visits = ds["node_visits"]
    return (ds["node_act_sum"] / visits.where(visits > 0)).rename("mu")


def _entropy_miller_madow(counts: np.ndarray) -> float:
    """Plug-in entropy (bits) with the Miller-Madow bias correction (m - 1) / (2N ln 2)."""
    counts = counts[counts > 0]
    total = counts.sum()
    if total == 0:
        return float("nan")
    return float(entropy_bits(counts) + (len(counts) - 1) / (2 * total * np.log(2)))


def mutual_information(traces: xr.Dataset, window: tuple[int | None, int | None] = (None, None)) -> xr.DataArray:
    """I(token; leaf) in bits per layer (mean over trees) from the sampled traces, Miller-Madow corrected."""
    steps = traces["sample_step"].values
    keep = np.ones(len(steps), dtype=bool)
    if window[0] is not None:
        keep &= steps >= window[0]
    if window[1] is not None:
        keep &= steps < window[1]
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
            h = [_entropy_miller_madow(np.bincount(np.unique(a, return_inverse=True)[1])) for a in (t, lf, joint)]
            values.append(h[0] + h[1] - h[2])
        if values:
            result[layer] = float(np.mean(values))
    return xr.DataArray(result, dims=("layer",), coords={"layer": traces["layer"].values}, name="mutual_information")


# The L1 and MoE families' metrics live in metrics_families.py (which imports this module); they are
# reachable from here too, imported on first use so that neither module imports the other at load time.
_FAMILY_NAMES = ("L1_METRICS", "MOE_METRICS", "FAMILY_METRICS", "FamilyLayer", "family_layers", "histogram_quantile",
                 "l1_metrics_numpy", "moe_metrics_numpy", "select_family_layers", "summarize_family",
                 "family_timeseries")  # fmt: skip


def __getattr__(name: str) -> Any:
    """routescope.metrics.summarize_family and the other L1/MoE metrics (see metrics_families.py)."""
    if name in _FAMILY_NAMES:
        from routescope import metrics_families

        return getattr(metrics_families, name)
    raise AttributeError(f"module 'routescope.metrics' has no attribute {name!r}")
