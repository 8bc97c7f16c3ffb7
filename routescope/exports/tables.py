"""Tidy tables of a run, shared by every export: the v2 metrics as curves (one row per step × layer × metric) and
the raw counts (one row per step × layer × tree × node, × leaf, × L1 unit, × MoE expert)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds
from routescope.analysis.families import family_timeseries
from routescope.analysis.tree import timeseries
from routescope.analysis.window import Window, select_window
from routescope.store import describe, open_run

FAMILIES = ("tree", "l1", "moe")


def groups(path: str | Path, window: Window = (None, None)) -> dict[str, xr.Dataset]:
    """The run's groups that hold intervals (its families and `run`), each limited to `window`."""
    summary = describe(path)
    names = [f for f in FAMILIES if f in summary["families"]] + ["run"]
    return {name: select_window(open_run(path, group=name), window) for name in names}


def layer_names(ds: xr.Dataset) -> list[str]:
    return [str(n) for n in ds["layer_name"].values]


def metric_curves(ds: xr.Dataset, family: str, rolling: int | None = PERSISTENCE, th: Thresholds = DEFAULT) -> xr.Dataset:
    """The family's layer-level metrics per interval, dims (step, layer) (per-tree / per-unit variables left out)."""
    curves = timeseries(ds, rolling=rolling, th=th) if family == "tree" else family_timeseries(ds, family, rolling, th=th)
    return curves[[n for n in curves.data_vars if curves[n].dims == ("step", "layer")]]


def metric_table(datasets: dict[str, xr.Dataset], rolling: int | None = PERSISTENCE, th: Thresholds = DEFAULT) -> pd.DataFrame:
    """step, family, layer, layer_name, metric, value: every layer-level metric of every family per interval."""
    frames = []
    for family, ds in datasets.items():
        if family == "run":
            continue
        curves = metric_curves(ds, family, rolling, th)
        names = layer_names(ds)
        long = curves.to_dataframe().reset_index().melt(id_vars=["step", "layer"], var_name="metric", value_name="value")
        long.insert(1, "family", family)
        long.insert(3, "layer_name", [names[i] for i in long["layer"]])
        frames.append(long)
    columns = ["step", "family", "layer", "layer_name", "metric", "value"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def count_tables(datasets: dict[str, xr.Dataset]) -> dict[str, pd.DataFrame]:
    """The counts behind the metrics, one tidy table per kind of unit, padding (shallower layers) left out."""
    out: dict[str, pd.DataFrame] = {}
    if "tree" in datasets:
        ds = datasets["tree"]
        depths, trees = ds["layer_depth"].values, ds["layer_trees"].values
        for kind, dim, width in (("tree_nodes", "node", lambda d: 2**d - 1), ("tree_leaves", "leaf", lambda d: 2**d)):
            names = [n for n in ds.data_vars if ds[n].dims == ("step", "layer", "tree", dim)]
            frame = ds[names].to_dataframe().reset_index()
            real = (frame["tree"].to_numpy() < trees[frame["layer"]]) & (frame[dim].to_numpy() < width(depths[frame["layer"]]))
            out[kind] = frame[real].reset_index(drop=True)
    for family, dim in (("l1", "unit"), ("moe", "expert")):
        if family in datasets:
            ds = datasets[family]
            names = [n for n in ds.data_vars if ds[n].dims == ("step", "layer", dim)]
            widths = ds["layer_units" if family == "l1" else "layer_experts"].values
            frame = ds[names].to_dataframe().reset_index()
            out[f"{family}_{dim}s"] = frame[frame[dim].to_numpy() < widths[frame["layer"]]].reset_index(drop=True)
    run = datasets["run"]
    out["run"] = run[[n for n in run.data_vars if run[n].dims == ("step",)]].to_dataframe().reset_index()
    return out


def exact_histogram(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket right edges, counts) with one bucket per index: bucket j holds the value j exactly, for trackers
    whose histograms take explicit buckets (TensorBoard's raw histograms)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.arange(len(counts), dtype=np.float64) + 0.5, counts
