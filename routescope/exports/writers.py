"""The export targets: Parquet tables, a Zarr store, TensorBoard event files. Each writes into a fresh folder and
imports its optional dependency only when used (a missing one names its extra)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds
from routescope.exports.tables import count_tables, exact_histogram, layer_names, metric_curves, metric_table
from routescope.record.live_log import LIVE_METRICS

EXTRAS = {"parquet": ("pyarrow", "parquet"), "zarr": ("zarr", "zarr"), "tensorboard": ("tensorboard", "tensorboard"),
          "wandb": ("wandb", "wandb")}  # fmt: skip
WANDB_METRICS = LIVE_METRICS  # the bounded key set: the live log's few metrics per layer, never one series per unit


class MissingExtra(ImportError):
    """An export's optional dependency is not installed; the message says which extra installs it."""


def require(target: str) -> None:
    """Import the target's optional dependency, or raise MissingExtra naming `pip install routescope[extra]`."""
    module, extra = EXTRAS[target]
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"--to {target} needs the {module} package: pip install 'routescope[{extra}]'") from None


def to_parquet(datasets: dict[str, xr.Dataset], out: Path, rolling: int | None = PERSISTENCE, th: Thresholds = DEFAULT) -> list[Path]:
    """metrics.parquet (step, family, layer, layer_name, metric, value) and one table per kind of count."""
    require("parquet")
    tables = {"metrics": metric_table(datasets, rolling, th), **count_tables(datasets)}
    paths = []
    for name, frame in tables.items():
        path = out / f"{name}.parquet"
        frame.to_parquet(path, engine="pyarrow", index=False)
        paths.append(path)
    return paths


def to_zarr(datasets: dict[str, xr.Dataset], out: Path) -> list[Path]:
    """One Zarr group per run group (the same variables, dims and attributes as `routescope.open`)."""
    require("zarr")
    for name, ds in datasets.items():
        clean = ds.copy()
        for var in clean.variables.values():
            var.encoding = {}  # HDF5 chunking and filters do not carry over
        clean.to_zarr(out, group=name, mode="a", consolidated=False)
    return [out / name for name in datasets]


def tensorboard_tag(family: str, layer: int, metric: str) -> str:
    """The stable scalar name of one layer's metric: routescope/<family>/layer<L>/<metric>."""
    return f"routescope/{family}/layer{layer}/{metric}"


def scalar_points(datasets: dict[str, xr.Dataset], rolling: int | None, th: Thresholds,
                  metrics: dict[str, tuple[str, ...]] | None = None) -> Iterator[tuple[str, int, float]]:
    """(tag, step, value) of every finite scalar an export writes: the run's losses, and each layer's metrics
    (all of them, or `metrics[family]`), per interval."""
    for family, ds in datasets.items():
        if family == "run":
            for name in ("train_loss", "val_loss"):
                if name in ds:
                    for step, value in zip(ds["step"].values, ds[name].values):
                        if np.isfinite(value):
                            yield f"routescope/run/{name}", int(step), float(value)
            continue
        curves = metric_curves(ds, family, rolling, th)
        for metric in metrics[family] if metrics else curves.data_vars:
            for layer in curves["layer"].values:
                for step, value in zip(ds["step"].values, curves[metric].sel(layer=layer).values):
                    if np.isfinite(value):
                        yield tensorboard_tag(family, int(layer), metric), int(step), float(value)


def heatmap(counts: np.ndarray) -> np.ndarray:
    """units × steps uint8 image of each interval's shares, the brightest the busiest unit of the run."""
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return (share.T / max(float(share.max()), 1e-12) * 255).astype(np.uint8)


def to_tensorboard(datasets: dict[str, xr.Dataset], out: Path, rolling: int | None = PERSISTENCE, th: Thresholds = DEFAULT) -> list[Path]:
    """Scalars per layer and metric, exact histograms (one bucket per leaf / expert: the interval's counts), a
    units × steps heatmap image per layer, and the run's losses."""
    require("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out))
    try:
        for tag, step, value in scalar_points(datasets, rolling, th):
            writer.add_scalar(tag, value, step)
        for family, ds in datasets.items():
            if family != "run":
                _histograms_and_heatmaps(writer, family, ds)
    finally:
        writer.close()
    return sorted(out.glob("events.out.tfevents.*"))


def unit_counts(ds: xr.Dataset, family: str, layer: int) -> np.ndarray:
    """(step, units) counts of one layer whose exact distribution a histogram shows: leaf visits (all trees,
    tree-major), expert selections, or L1 unit firings."""
    if family == "tree":
        depth, trees = int(ds["layer_depth"].values[layer]), int(ds["layer_trees"].values[layer])
        visits = ds["leaf_visits"].isel(layer=layer).values[:, :trees, : 2**depth]
        return visits.reshape(visits.shape[0], -1)
    if family == "moe":
        width = int(ds["layer_experts"].values[layer])
        return np.diagonal(ds["coselect"].isel(layer=layer).values, axis1=-2, axis2=-1)[:, :width]
    return ds["unit_fires"].isel(layer=layer).values[:, : int(ds["layer_units"].values[layer])]


def _histograms_and_heatmaps(writer, family: str, ds: xr.Dataset) -> None:  # noqa: ANN001
    what = {"tree": "leaf_visits", "moe": "expert_selections", "l1": "unit_fires"}[family]
    steps = ds["step"].values
    for layer, name in enumerate(layer_names(ds)):
        counts = unit_counts(ds, family, layer)
        tag = f"routescope/{family}/layer{layer}/{what}"
        for row, step in enumerate(steps):
            limits, buckets = exact_histogram(counts[row])
            total = float(buckets.sum())
            if total <= 0:
                continue
            index = np.arange(len(buckets), dtype=np.float64)
            writer.add_histogram_raw(tag, min=float(index[buckets > 0].min()), max=float(index[buckets > 0].max()),
                                     num=total, sum=float((index * buckets).sum()),
                                     sum_squares=float((index**2 * buckets).sum()), bucket_limits=limits.tolist(),
                                     bucket_counts=buckets.tolist(), global_step=int(step))  # fmt: skip
        writer.add_image(f"routescope/{family}/layer{layer}/{what}_heatmap", heatmap(counts)[None], int(steps[-1]), dataformats="CHW")


def to_wandb(datasets: dict[str, xr.Dataset], out: Path, name: str, config: dict, rolling: int | None = PERSISTENCE,
             th: Thresholds = DEFAULT) -> list[Path]:  # fmt: skip
    """An offline W&B run under `out` (`wandb sync` uploads it later): per interval a few metrics per layer and
    the losses, keyed by the interval's step; per layer, its per-unit counts as one table (step, unit, count)
    and a units × steps heatmap image."""
    require("wandb")
    import wandb

    settings = wandb.Settings(mode="offline", silent=True, console="off", save_code=False, disable_git=True,
                              x_disable_stats=True, x_disable_meta=True)  # fmt: skip
    run = wandb.init(dir=str(out), project="routescope", name=name, config=config, settings=settings)
    try:
        rows: dict[int, dict[str, float]] = {}
        for tag, step, value in scalar_points(datasets, rolling, th, WANDB_METRICS):
            rows.setdefault(step, {})[tag] = value
        for step in sorted(rows):
            run.log(rows[step], step=step)
        final = {}
        for family, ds in datasets.items():
            if family == "run":
                continue
            for layer in range(ds.sizes["layer"]):
                counts = unit_counts(ds, family, layer)
                steps = ds["step"].values
                table = wandb.Table(columns=["step", "unit", "count"],
                                    data=[[int(steps[r]), u, int(c)] for r in range(len(steps)) for u, c in enumerate(counts[r])])  # fmt: skip
                final[f"routescope/{family}/layer{layer}/unit_counts"] = table
                final[f"routescope/{family}/layer{layer}/heatmap"] = wandb.Image(heatmap(counts))
        if final:
            run.log(final, step=max(rows) if rows else 0)
    finally:
        run.finish()
    return sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
