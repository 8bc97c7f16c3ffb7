"""Study summaries (issue 20, item 5): a run reduced to a small NetCDF that plain xarray reads back, holding the
same curves as the analysis and drift quantiles recomputed here from the raw counts with h5py and numpy."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

import routescope
from routescope.analysis import timeseries
from routescope.analysis.run_summary import QUANTILES, write_summary
from routescope.trainers.presets import get_preset
from routescope.trainers.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("summary") / "run.h5"
    train(get_preset("debug", steps=40, record_every=2), out=path, device="cpu", show_progress=False)
    return path


def test_summary_round_trips_and_is_small(run: Path, tmp_path: Path) -> None:
    out = write_summary(run, tmp_path / "s.nc", command="routescope record ...", commit="abc123")
    assert os.path.getsize(out) < 1_000_000
    s = xr.open_dataset(out, engine="h5netcdf")
    ts = timeseries(routescope.open(run), rolling=5)
    for name in ("static_fraction", "right_starved_share", "leaf_entropy_norm"):
        np.testing.assert_array_equal(s[name].values, ts[name].values, err_msg=name)
    with h5py.File(run, "r") as f:
        np.testing.assert_array_equal(s["val_loss"].values, f["run/val_loss"][:])
        np.testing.assert_array_equal(s["run_step"].values, f["run/step"][:])
    assert s.attrs["command"] == "routescope record ..." and s.attrs["commit"] == "abc123"
    assert s.attrs["run_state"] == "finished" and s.attrs["delta"] == 0.05


def test_drift_quantiles_match_the_raw_counts(run: Path, tmp_path: Path) -> None:
    """μ/σ from rolling 5-interval sums of node_visits / node_act_sum / node_act_sqsum, per layer, quantiles over
    every decision node of every tree: recomputed from the file with numpy only."""
    s = xr.open_dataset(write_summary(run, tmp_path / "s.nc"), engine="h5netcdf")
    with h5py.File(run, "r") as f:
        visits, total, square = (f[f"tree/{n}"][:].astype(np.float64) for n in ("node_visits", "node_act_sum", "node_act_sqsum"))
    steps = visits.shape[0]
    for at in (4, steps // 2, steps - 1):
        lo = max(0, at - 4)
        v, t, q = (a[lo : at + 1].sum(0) for a in (visits, total, square))  # (layer, tree, node)
        for layer in range(v.shape[0]):
            with np.errstate(divide="ignore", invalid="ignore"):
                mu = t[layer] / v[layer]
                sigma = np.sqrt(np.maximum(q[layer] / v[layer] - mu**2, 0))
                drift = np.where((v[layer] > 0) & (sigma > 0), mu / sigma, np.nan).ravel()
            expected = np.nanquantile(drift, QUANTILES)
            np.testing.assert_allclose(s["drift_quantile"].values[at, layer], expected, rtol=1e-12, err_msg=f"{at} {layer}")


@pytest.mark.filterwarnings("ignore:the model has no routed layers")
def test_dense_baseline_keeps_its_losses(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = get_preset("debug", steps=6, record_every=2)
    path = tmp_path / "dense.h5"
    train(replace(cfg, model=replace(cfg.model, mlp="dense")), out=path, device="cpu", show_progress=False)
    s = xr.open_dataset(write_summary(path, tmp_path / "d.nc"), engine="h5netcdf")
    assert "static_fraction" not in s and np.isfinite(s["val_loss"].values).any()
    assert '"mlp": "dense"' in s.attrs["config"]


def test_window_metrics_are_the_last_two_quarters(run: Path, tmp_path: Path) -> None:
    """`window_*` equals summarize() over the last ceil(n/4) intervals ("end") and the ceil(n/4) before them."""
    from routescope.analysis import summarize

    s = xr.open_dataset(write_summary(run, tmp_path / "s.nc"), engine="h5netcdf")
    ds = routescope.open(run)
    steps = ds["step"].values  # 20 intervals: quarters of 5
    assert len(steps) == 20
    end = summarize(ds, window=(int(steps[15]), None))
    previous = summarize(ds, window=(int(steps[10]), int(steps[15])))
    for name in ("static_fraction", "right_starved_share", "leaf_entropy_norm"):
        np.testing.assert_array_equal(s[f"window_{name}"].sel(window="end").values, end[name].values)
        np.testing.assert_array_equal(s[f"window_{name}"].sel(window="previous").values, previous[name].values)


def test_rule_inputs_from_a_summary(run: Path, tmp_path: Path) -> None:
    from routescope.analysis.study_rules import run_values

    s = xr.open_dataset(write_summary(run, tmp_path / "s.nc"), engine="h5netcdf")
    values = run_values(s)
    assert values.arm == "gelu-node" and values.seed == 0
    end = s["window_static_fraction"].sel(window="end").values
    prev = s["window_static_fraction"].sel(window="previous").values
    assert values.sf == pytest.approx(np.nanmean(end)) and values.dsf == pytest.approx(np.nanmean(end) - np.nanmean(prev))
    assert np.isfinite(values.drift_slope) and values.val_loss == s["val_loss"].values[-1]
