"""`routescope export`: a run into the tools users already watch, without losing its exactness.

    routescope.exports.export("run.h5", "parquet", "run_tables/")   # or "zarr", "tensorboard"

Parquet: tidy tables pandas and polars read (metrics per step × layer × metric; counts per step × layer × tree ×
node, × leaf, × L1 unit, × MoE expert; the run's losses). Zarr: every group as xarray writes it, for object
storage; `xr.open_zarr(out, group=...)` gives back `routescope.open`'s Dataset. TensorBoard: scalars under
`routescope/<family>/layer<L>/<metric>`, histograms with one bucket per leaf or expert (the exact counts, not
re-binned), a units × steps heatmap image per layer. W&B: an offline run directory (`wandb sync` uploads it)
with a few metrics per layer and the per-unit counts as tables.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds
from routescope.analysis.window import Window
from routescope.exports.tables import count_tables, groups, metric_table
from routescope.exports.writers import MissingExtra, to_parquet, to_tensorboard, to_wandb, to_zarr

TARGETS = ("parquet", "zarr", "tensorboard", "wandb")
LIVE_SECONDS = 120.0  # a "running" file modified this recently is still being written

__all__ = ["TARGETS", "ExportError", "MissingExtra", "count_tables", "export", "metric_table"]


class ExportError(ValueError):
    """An export that cannot be made as asked; the message is one line."""


def export(path: str | Path, to: str, out: str | Path, window: Window = (None, None), overwrite: bool = False,
           rolling: int | None = PERSISTENCE, th: Thresholds = DEFAULT) -> list[Path]:  # fmt: skip
    """Write run `path` as `to` into the folder `out` (created; an existing one only with `overwrite`); returns the
    files or groups written. A run still being written is refused: export it once it has finished."""
    from routescope.store import describe

    if to not in TARGETS:
        raise ExportError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    path, out = Path(path), Path(out)
    summary = describe(path)
    if summary["run_state"] == "running" and time.time() - path.stat().st_mtime < LIVE_SECONDS:
        raise ExportError(f"{path} is still being written; export it once the run has finished")
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    datasets = groups(path, window)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if to == "parquet":
            written = to_parquet(datasets, partial, rolling, th)
        elif to == "zarr":
            written = to_zarr(datasets, partial)
        elif to == "tensorboard":
            written = to_tensorboard(datasets, partial, rolling, th)
        else:
            written = to_wandb(datasets, partial, path.stem, summary.get("config") or {}, rolling, th)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return [out / p.relative_to(partial) for p in written]
