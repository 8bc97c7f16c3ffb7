"""`routescope export RUN.h5 --to parquet|zarr|tensorboard|wandb --out PATH` (docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from routescope.cli_options import fail


def export(
    run: Annotated[Path, typer.Argument(help="A run file.")],
    to: Annotated[str, typer.Option("--to", help="parquet | zarr | tensorboard | wandb (an offline run)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must not exist unless --overwrite).")],
    window: Annotated[Optional[str], typer.Option(help="Steps START:END (half-open) to export; default: the whole run.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a run as Parquet tables, a Zarr store, TensorBoard event files or an offline W&B run."""
    from routescope.analysis.window import ALL, MetricsError, parse_window
    from routescope.exports import ExportError, MissingExtra
    from routescope.exports import export as export_run
    from routescope.store import RunFileError

    try:
        bounds = ALL if window is None else parse_window(window)
        written = export_run(run, to, out, bounds, overwrite)
    except (ExportError, MissingExtra, RunFileError, MetricsError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write {out} ({err.strerror or err}); choose another --out")
    hint = {"parquet": f"pandas.read_parquet('{out}/metrics.parquet')", "zarr": f"xarray.open_zarr('{out}', group='tree')",
            "tensorboard": f"tensorboard --logdir {out}", "wandb": f"wandb sync {out}/wandb/offline-run-*"}[to]  # fmt: skip
    Console().print(f"wrote {len(written)} {'files' if to != 'zarr' else 'groups'} to [bold]{out}[/]; read it: [cyan]{hint}[/]")
