"""Metrics of the L1-sparse and MoE families (docs/metrics.md); family.py puts them behind the common interface.

Like the tree metrics, each is computed from counts summed over a window of intervals, per layer.
The numpy cores take any leading shape, so one function gives a window summary and a time series.

L1 (group `l1`): the per-token active-unit count distribution from `active_hist` (fixed bins,
routescope.schema.active_bin_edges) — `active_mean` is exact (active_sum / tokens); `active_p50`,
`active_p99` and `active_max` are read off the histogram as the lower edge of the bin that holds
the p-quantile token (the first bin whose cumulative count reaches p · tokens) or the highest
non-empty bin: exact up to 14 active units, at most 12% low above. `unit_firing_rate` = unit_fires /
tokens per unit; `dead_units` = units that provably fire under δ of the layer's mean firing rate
(calibrated.py; `zero_fire_units`: no fire at all, version 1's count); `active_fraction` = mean
active units / d_hidden.
MoE (group `moe`): `tokens_per_expert` (selections processed, after capacity drops); `load_cv`
(population std / mean) and `max_mean_load` (max / mean) of the load the router asks for, i.e. of
the selections before drops (the diagonal of `coselect`; capacity would hide an imbalance after
them); `dead_experts` (experts the router provably selects under δ of their balanced share k/E;
`zero_selection_experts`: none at all), `router_entropy`
(mean over tokens of the router softmax's entropy, bits; `router_entropy_norm`: / log2 E),
`drop_fraction` (dropped / (k · tokens)), `active_fraction` (processed selections per token / E).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds, above, below
from routescope.analysis.window import (
    LAST_QUARTER,
    MetricsError,
    Window,
    describe_window,
    layer_configs,
    pick_layers,
    rolling_sums,
    select_window,
    window_bounds,
    window_counts,
)

L1_METRICS = ("active_mean", "active_p50", "active_p99", "active_max", "active_fraction", "dead_units", "dead_fraction",
              "undetermined_units", "zero_fire_units")  # fmt: skip
MOE_METRICS = ("load_cv", "max_mean_load", "dead_experts", "undetermined_experts", "zero_selection_experts",
               "router_entropy", "router_entropy_norm", "drop_fraction", "active_fraction")  # fmt: skip
FAMILY_METRICS = {"l1": L1_METRICS, "moe": MOE_METRICS}
FAMILY_VECTORS = {"l1": ("unit_firing_rate", "unit"), "moe": ("tokens_per_expert", "expert")}  # per-unit / per-expert
FAMILY_COUNTS = {
    "l1": ("tokens", "unit_fires", "active_sum", "active_hist"),
    "moe": ("tokens", "expert_tokens", "dropped_tokens", "coselect", "router_entropy_sum", "router_prob_sum"),
}


@dataclass(frozen=True)
class FamilyLayer:
    """One recorded L1 or MoE layer: its index in its group, name, and width (units or experts)."""

    index: int
    name: str
    family: str
    width: int  # d_hidden (l1) or experts (moe)
    k: int  # experts per token (moe); 0 for l1
    config: dict[str, Any]


def family_layers(ds: xr.Dataset, family: str) -> list[FamilyLayer]:
    """The layers of an `l1` or `moe` group, from its layer variables and `layers` attribute."""
    width_var = "layer_units" if family == "l1" else "layer_experts"
    out = []
    for i, config in enumerate(layer_configs(ds)):
        k = int(ds["layer_k"].values[i]) if family == "moe" else 0
        out.append(FamilyLayer(i, str(ds["layer_name"].values[i]), family, int(ds[width_var].values[i]), k, config))
    return out


def histogram_quantile(hist: np.ndarray, lower_edges: np.ndarray, q: float) -> np.ndarray:
    """The lower edge of the bin holding the q-quantile of a histogram (last axis); NaN when empty."""
    hist = np.asarray(hist, dtype=np.float64)
    cum = np.cumsum(hist, axis=-1)
    total = cum[..., -1:]
    first = np.argmax(cum >= q * total - 1e-9 * total, axis=-1)  # first bin reaching q * total
    value = np.asarray(lower_edges, dtype=np.float64)[first]
    return np.where(total[..., 0] > 0, value, np.nan)


def unit_masks(hits: np.ndarray, tokens: np.ndarray, share: np.ndarray, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(dead, live) per unit (last axis) by the v2 test of its hit rate against δ·`share` (...)."""
    n = np.asarray(tokens, dtype=np.float64)[..., None]
    threshold = th.delta * np.asarray(share, dtype=np.float64)[..., None]
    return below(hits, n, threshold, th.alpha), above(hits, n, threshold, th.alpha)


def calibrated_counts(hits: np.ndarray, tokens: np.ndarray, share: np.ndarray, th: Thresholds) -> dict[str, np.ndarray]:
    """Dead and undetermined units of a layer (last axis) by the v2 test against `share` (...), and those with no hit."""
    dead, live = unit_masks(hits, tokens, share, th)
    return {"dead": dead.sum(-1), "undetermined": (~dead & ~live).sum(-1), "zero": (np.asarray(hits) == 0).sum(-1)}


def l1_metrics_numpy(counts: dict[str, np.ndarray], units: int, lower_edges: np.ndarray,
                     th: Thresholds = DEFAULT) -> dict[str, np.ndarray]:  # fmt: skip
    """L1 metrics of one layer from window-summed counts: tokens (...), unit_fires (..., U),
    active_sum (...), active_hist (..., bins). Returns arrays (...) and unit_firing_rate (..., U).
    A unit is dead when it provably fires under δ of the layer's mean firing rate."""
    tokens = np.asarray(counts["tokens"], dtype=np.float64)
    fires = np.asarray(counts["unit_fires"])[..., :units]
    hist = np.asarray(counts["active_hist"])
    bins = min(hist.shape[-1], len(lower_edges))
    hist, edges = hist[..., :bins], np.asarray(lower_edges)[:bins]
    nonempty = hist > 0
    top = np.where(nonempty.any(-1), bins - 1 - np.argmax(nonempty[..., ::-1], axis=-1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(tokens > 0, counts["active_sum"] / tokens, np.nan)
        states = calibrated_counts(fires, tokens, np.nan_to_num(mean) / units, th)
        dead = states["dead"]
        return {
            "active_mean": mean,
            "active_p50": histogram_quantile(hist, edges, 0.5),
            "active_p99": histogram_quantile(hist, edges, 0.99),
            "active_max": np.where(tokens > 0, edges[top], np.nan),
            "active_fraction": mean / units,
            "dead_units": np.where(tokens > 0, dead, np.nan),
            "dead_fraction": np.where(tokens > 0, dead / units, np.nan),
            "undetermined_units": np.where(tokens > 0, states["undetermined"], np.nan),
            "zero_fire_units": np.where(tokens > 0, states["zero"], np.nan),
            "unit_firing_rate": np.where(tokens[..., None] > 0, fires / tokens[..., None], np.nan),
        }


def moe_metrics_numpy(counts: dict[str, np.ndarray], experts: int, k: int, th: Thresholds = DEFAULT) -> dict[str, np.ndarray]:
    """MoE metrics of one layer from window-summed counts: tokens (...), expert_tokens (..., E),
    dropped_tokens (...), coselect (..., E, E), router_entropy_sum (...). Returns arrays (...) and
    tokens_per_expert (..., E). An expert is dead when the router provably selects it for under δ·k/E of the tokens."""
    tokens = np.asarray(counts["tokens"], dtype=np.float64)
    processed = np.asarray(counts["expert_tokens"], dtype=np.float64)[..., :experts]
    selected = np.diagonal(np.asarray(counts["coselect"], dtype=np.float64), axis1=-2, axis2=-1)[..., :experts]
    mean = selected.mean(-1)
    states = calibrated_counts(selected, tokens, np.full(tokens.shape, k / experts), th)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.where(tokens > 0, counts["router_entropy_sum"] / tokens, np.nan)
        return {
            "load_cv": np.where(mean > 0, selected.std(-1) / mean, np.nan),
            "max_mean_load": np.where(mean > 0, selected.max(-1) / mean, np.nan),
            "dead_experts": np.where(tokens > 0, states["dead"], np.nan),
            "undetermined_experts": np.where(tokens > 0, states["undetermined"], np.nan),
            "zero_selection_experts": np.where(tokens > 0, states["zero"], np.nan),
            "router_entropy": entropy,
            "router_entropy_norm": entropy / np.log2(experts) if experts > 1 else np.full_like(entropy, np.nan),
            "drop_fraction": np.where(tokens > 0, counts["dropped_tokens"] / (k * tokens), np.nan),
            "active_fraction": np.where(tokens > 0, processed.sum(-1) / (tokens * experts), np.nan),
            "tokens_per_expert": processed,
        }


def layer_metrics(counts: dict[str, np.ndarray], layer: FamilyLayer, ds: xr.Dataset, leading: int,
                  th: Thresholds = DEFAULT) -> dict[str, np.ndarray]:  # fmt: skip
    """One layer's metrics from group-wide counts shaped (lead..., layer, ...)."""
    idx = (slice(None),) * leading + (layer.index,)
    mine = {name: (value if name == "tokens" else value[idx]) for name, value in counts.items()}
    if "layer_tokens" in counts:
        mine["tokens"] = counts["layer_tokens"][idx]
    if layer.family == "l1":
        return l1_metrics_numpy(mine, layer.width, ds["bin"].values, th)
    return moe_metrics_numpy(mine, layer.width, layer.k, th)


def check_family(ds: xr.Dataset, family: str) -> None:
    if family not in FAMILY_METRICS:
        raise MetricsError(f"no family metrics for {family!r}; families: {', '.join(FAMILY_METRICS)} (tree: summarize)")
    needed = FAMILY_COUNTS[family][1:]
    if any(name not in ds for name in needed):
        raise MetricsError(f"this Dataset is not a {family!r} group; open it with routescope.open(path, group={family!r})")


def select_family_layers(ds: xr.Dataset, family: str, layers: list[int] | None) -> list[FamilyLayer]:
    """The chosen layers of an l1/moe group (all when `layers` is None); a clear error for a bad index."""
    return pick_layers(family_layers(ds, family), layers, f"{family} layer")


def summarize_family(ds: xr.Dataset, family: str, window: Window = LAST_QUARTER, layers: list[int] | None = None,
                     th: Thresholds = DEFAULT) -> xr.Dataset:  # fmt: skip
    """Window metrics per layer of an `l1` or `moe` group (dims layer; unit_firing_rate (layer, unit),
    tokens_per_expert (layer, expert)); by default over the last quarter of the run."""
    check_family(ds, family)
    infos = select_family_layers(ds, family, layers)
    selected = select_window(ds, window)
    counts = window_counts(selected, (*FAMILY_COUNTS[family], "layer_tokens"))
    vector, vdim = FAMILY_VECTORS[family]
    width = ds.sizes[vdim]
    data = {name: np.full(len(infos), np.nan) for name in FAMILY_METRICS[family]}
    vec = np.full((len(infos), width), np.nan)
    for row, info in enumerate(infos):
        values = layer_metrics(counts, info, ds, leading=0, th=th)
        for name in FAMILY_METRICS[family]:
            data[name][row] = values[name]
        vec[row, : info.width] = values[vector]
    out = {name: (("layer",), v) for name, v in data.items()}
    out[vector] = (("layer", vdim), vec)
    return xr.Dataset(out, coords={"layer": [info.index for info in infos], vdim: ds[vdim].values},
                      attrs={"family": family, **window_bounds(selected), "window": describe_window(window), **th.as_dict()})


def family_timeseries(ds: xr.Dataset, family: str, rolling: int | None = PERSISTENCE, layers: list[int] | None = None,
                      th: Thresholds = DEFAULT) -> xr.Dataset:  # fmt: skip
    """Each l1/moe metric per interval over the last `rolling` intervals (None: cumulative); dims (step, layer)."""
    check_family(ds, family)
    infos = select_family_layers(ds, family, layers)
    steps = ds["step"].values
    data = {name: np.full((len(steps), len(infos)), np.nan) for name in FAMILY_METRICS[family]}
    for at, sums in rolling_sums(ds, (*FAMILY_COUNTS[family], "layer_tokens"), rolling):
        n = len(sums["tokens"])
        for row, info in enumerate(infos):
            values = layer_metrics(sums, info, ds, leading=1, th=th)
            for name in FAMILY_METRICS[family]:
                data[name][at : at + n, row] = values[name]
    return xr.Dataset({n: (("step", "layer"), v) for n, v in data.items()},
                      coords={"step": steps, "layer": [info.index for info in infos]},
                      attrs={"family": family, "rolling": rolling if rolling is not None else "cumulative", **th.as_dict()})  # fmt: skip
