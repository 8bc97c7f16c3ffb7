"""A run reduced to what a study needs, small enough to commit (well under 1 MB): the version-2 tree metrics as
curves over training (rolling K intervals, per layer) and over the last two quarters of the run (`window_*`,
the study's windows), quantiles of the nodes' standardized drift μ_n/σ_n per
interval, and the run's losses; with the source config, the command and the commit that made it.

`write_summary(run, out)` writes it as NetCDF (h5netcdf): `xarray.open_dataset(out)` reads it back without
routescope. The study's notebooks read these files instead of the raw runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds
from routescope.analysis.stats import node_moments
from routescope.analysis.tree import layer_infos, summarize, timeseries
from routescope.analysis.window import rolling_sums

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SUMMARY_FORMAT = 1  # bump when the summary's variables change meaning


def drift_quantiles(ds: xr.Dataset, rolling: int | None = PERSISTENCE, quantiles: tuple[float, ...] = QUANTILES) -> xr.DataArray:
    """Quantiles over every decision node (all trees) of μ_n/σ_n in rolling windows of `rolling` intervals:
    dims (step, layer, quantile); NaN where no node of the layer was visited with a spread."""
    infos = layer_infos(ds)
    steps = ds["step"].values
    out = np.full((len(steps), len(infos), len(quantiles)), np.nan)
    names = ("node_visits", "node_act_sum", "node_act_sqsum")
    for at, sums in rolling_sums(ds, names, rolling):
        for row, info in enumerate(infos):
            nodes = 2**info.depth - 1
            sl = (slice(None), info.index, slice(0, info.trees), slice(0, nodes))
            mu, sigma = node_moments(sums["node_visits"][sl], sums["node_act_sum"][sl], sums["node_act_sqsum"][sl])
            with np.errstate(divide="ignore", invalid="ignore"):
                drift = np.where(sigma > 0, mu / sigma, np.nan).reshape(mu.shape[0], -1)
            has = np.isfinite(drift).any(axis=1)
            if has.any():
                out[at : at + len(drift), row][has] = np.nanquantile(drift[has], quantiles, axis=1).T
    return xr.DataArray(out, dims=("step", "layer", "quantile"),
                        coords={"step": steps, "layer": [i.index for i in infos], "quantile": list(quantiles)},
                        name="drift_quantile")  # fmt: skip


WINDOWS = ("end", "previous")  # the last quarter of the intervals, and the quarter before it


def quarter_windows(steps: np.ndarray) -> dict[str, tuple[int | None, int | None]]:
    """The two study windows as half-open step ranges: "end" = the last ceil(n/4) intervals (the default
    window), "previous" = the ceil(n/4) intervals before them (clipped at the start of the run)."""
    q = max(1, -(-len(steps) // 4))
    start_end = len(steps) - q
    start_prev = max(0, start_end - q)
    return {"end": (int(steps[start_end]), None), "previous": (int(steps[start_prev]), int(steps[start_end]))}


def window_metrics(ds: xr.Dataset, th: Thresholds = DEFAULT) -> xr.Dataset:
    """Every layer-level metric of `summarize` in the two study windows: `window_<metric>` (window, layer). A run
    of one interval has no "previous" quarter: NaN there."""
    windows = quarter_windows(ds["step"].values)
    parts = []
    for name in WINDOWS:
        start, end = windows[name]
        if end is not None and start >= end:
            parts.append(None)
            continue
        summary = summarize(ds, window=(start, end), th=th)
        parts.append(summary[[v for v in summary.data_vars if not v.startswith(("tree_", "depth_"))]])
    template = next(p for p in parts if p is not None)
    parts = [p if p is not None else xr.full_like(template, np.nan) for p in parts]
    stacked = xr.concat(parts, dim=xr.DataArray(list(WINDOWS), dims="window"), combine_attrs="drop")
    return stacked.rename({name: f"window_{name}" for name in stacked.data_vars})


def run_summary(path: str | Path, th: Thresholds = DEFAULT, rolling: int = PERSISTENCE, command: str = "",
                commit: str = "") -> xr.Dataset:  # fmt: skip
    """The summary Dataset of one run file (see the module doc); `command` and `commit` are kept as attributes."""
    import routescope
    from routescope.store import describe

    path = Path(path)
    run = routescope.open(path, group="run")
    losses = {name: ("run_step", run[name].values.astype(np.float64)) for name in ("train_loss", "val_loss") if name in run}
    if "tree" in describe(path)["families"]:
        ds = routescope.open(path)
        ts = timeseries(ds, rolling=rolling, th=th)
        curves = ts[[name for name in ts.data_vars if not name.startswith("tree_")]]
        summary = xr.merge([curves, drift_quantiles(ds, rolling), window_metrics(ds, th)], combine_attrs="override")
    else:  # a dense baseline: its losses only
        ds, summary = run, xr.Dataset(attrs={**th.as_dict(), "rolling": rolling})
    summary = summary.assign(losses).assign_coords(run_step=run["step"].values)
    config = json.loads(ds.attrs.get("config", "{}"))
    attrs: dict[str, Any] = {
        "summary_format": SUMMARY_FORMAT, "source": path.name, "run_state": str(ds.attrs.get("run_state", "")),
        "config": json.dumps(config), "layers": ds.attrs.get("layers", "[]"), "rolling": rolling,
        "command": command, "commit": commit, "routescope_version": str(ds.attrs.get("routescope_version", "")),
    }  # fmt: skip  (the thresholds are already attributes, from `timeseries`)
    return summary.assign_attrs(attrs)


def write_summary(path: str | Path, out: str | Path, **kwargs: Any) -> Path:
    """Write `run_summary(path, **kwargs)` to `out` as compressed NetCDF; returns `out`."""
    summary = run_summary(path, **kwargs)
    encoding = {name: {"zlib": True, "complevel": 6} for name in summary.data_vars}
    summary.to_netcdf(out, engine="h5netcdf", encoding=encoding)
    return Path(out)
