"""`routescope prune RUN.h5`: cut a `record` run's model to its calibrated-live units, check the cut on the
validation split, and write the pruned checkpoint (docs/cli.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from routescope.cli_options import (
    AlphaOption,
    DeltaOption,
    EpsilonOption,
    PersistenceOption,
    fail,
    thresholds,
)

console = Console()


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def report_table(report: Any) -> Table:
    """The quality check as a table (one row per layer)."""
    table = Table(title=f"prune: window {report.window}, {report.tokens} held-out tokens", box=None)
    for column in ("layer", "family", "units", "params", "window reach", "δ bound", "reached removed", "rerouted"):
        table.add_column(column, justify="left" if column in ("layer", "family") else "right")
    for r in report.layers:
        table.add_row(r.name, r.family, f"{r.units_before} → {r.units_after}", f"{_count(r.params_before)} → {_count(r.params_after)}",
                      _pct(r.window_reach), _pct(r.bound), _pct(r.reached_removed), _pct(r.rerouted))  # fmt: skip
    return table


def _check_checkpoint(state: dict[str, Any], run_path: Path) -> None:
    """A checkpoint must come from this run: its step within the run, its validation loss the run's at that step."""
    import numpy as np

    import routescope

    run = routescope.open(run_path, group="run")
    steps, val = run["step"].values, run["val_loss"].values
    step = int(state.get("step", -1))
    if step > int(steps[-1]):
        fail(f"the checkpoint is at step {step}, after the run's last interval ({int(steps[-1])}): it belongs to "
             "another run; give this run's checkpoint with --checkpoint")  # fmt: skip
    at = np.flatnonzero(steps == step)
    recorded = float(val[at[0]]) if at.size else math.nan
    if at.size and math.isfinite(recorded) and abs(recorded - float(state.get("val_loss", recorded))) > 1e-6:
        fail(f"the checkpoint's validation loss at step {step} ({state['val_loss']:.6f}) is not the run's ({recorded:.6f}): "
             "it belongs to another run; give this run's checkpoint with --checkpoint")  # fmt: skip


def prune(
    run: Annotated[Path, typer.Argument(help="A run file written by `routescope record`.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Its training checkpoint (default RUN.ckpt.pt).")] = None,
    window: Annotated[Optional[str], typer.Option(help="Steps START:END whose calibrated states decide (default: the "
                                                  "last quarter of the run; 'all').")] = None,  # fmt: skip
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Pruned checkpoint to write (default RUN.pruned.pt).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (keys: docs/cli.md).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    delta: DeltaOption = None,
    alpha: AlphaOption = None,
    epsilon: EpsilonOption = None,
    persistence: PersistenceOption = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda: where the quality check runs (auto: cuda when present).")] = "auto",
) -> None:
    """Remove the units a run shows calibrated-dead, check the pruned model on the validation split, save it."""
    import torch

    from routescope.analysis.window import MetricsError, parse_window
    from routescope.pruning import PruneError, save_pruned
    from routescope.pruning import prune as prune_model
    from routescope.store import RunFileError, describe
    from routescope.trainers.data import Corpus, CorpusError
    from routescope.trainers.model import GPT
    from routescope.trainers.train import config_from_dict, resolve_device
    from routescope.trainers.user_data import load_corpus

    try:
        th = thresholds(delta, alpha, epsilon, persistence)
        bounds = parse_window(window)
        summary = describe(run)
    except (RunFileError, MetricsError) as err:
        fail(str(err))
    preset = (summary.get("config") or {}).get("preset")
    if not preset:
        fail(f"{run} was not recorded by `routescope record`; prune your own model in Python: "
             "routescope.prune(model, run, batches=...)")  # fmt: skip
    if not summary["families"]:
        fail(f"{run} recorded no routed layer (a dense baseline?): nothing to prune")
    checkpoint = checkpoint or run.with_suffix(".ckpt.pt")
    out = out or run.with_suffix(".pruned.pt")
    if not checkpoint.is_file():
        fail(f"no training checkpoint {checkpoint}; give the run's checkpoint with --checkpoint")
    if out.exists() and not overwrite:
        fail(f"{out} already exists; pass --overwrite to replace it, or --out to write elsewhere")
    if not out.parent.is_dir():
        fail(f"cannot write {out}: folder {out.parent} does not exist")
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    cfg = config_from_dict(preset)
    model = GPT(cfg.model)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, EOFError, OSError) as err:
        fail(f"{checkpoint} does not fit the model {run} recorded ({str(err).splitlines()[0][:160]}); is it this run's "
             "checkpoint?")  # fmt: skip
    _check_checkpoint(state, run)
    model.to(dev)
    try:
        corpus = Corpus.shakespeare() if cfg.data is None else load_corpus(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
    except CorpusError as err:
        fail(str(err))
    generator = torch.Generator().manual_seed(1234)
    batches = [corpus.batch("val", cfg.batch_size, cfg.model.seq_len, generator, dev) for _ in range(cfg.eval_batches)]
    try:
        pruned, report = prune_model(model, run, bounds, th, batches=batches)
    except (PruneError, MetricsError) as err:
        fail(str(err))
    result = report.as_dict()
    if report.removed_units == 0:
        result["out"] = None
        console.print_json(data=result) if as_json else console.print(f"nothing to prune: every unit of {run} is "
                                                                      f"live or undetermined in window {report.window}")  # fmt: skip
        return
    try:
        save_pruned(pruned, out, config={"preset": preset}, report=result, source=str(run))
    except OSError as err:
        fail(f"cannot write {out} ({err.strerror or err}); choose another --out")
    result["out"] = str(out)
    if as_json:
        console.print_json(data=result)
        return
    console.print(report_table(report))
    delta_loss, ci = result["delta_loss"], report.delta_loss_ci
    interval = f", 95% CI {ci[0]:+.4f} to {ci[1]:+.4f} over {len(batches)} batches" if ci else ""
    console.print(f"held-out loss {report.loss_before:.4f} → {report.loss_after:.4f} ({delta_loss:+.4f}{interval}); "
                  f"{report.removed_units} units removed → [bold]{out}[/] (load it: routescope.load_pruned({str(out)!r}))")  # fmt: skip
