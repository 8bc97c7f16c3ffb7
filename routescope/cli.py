"""The `routescope` command line: record a training run, inspect a run file.

User errors (a bad path, a foreign file, an unknown preset) print one line and exit with code 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from routescope.cli_export import export as export_command
from routescope.cli_options import (
    AlphaOption,
    DeltaOption,
    EpsilonOption,
    PersistenceOption,
    errors,
    fail,
    thresholds,
)
from routescope.cli_prune import prune as prune_command
from routescope.info_text import human_size
from routescope.store.format import RunFileError, first_line

app = typer.Typer(
    help="Record, measure and see the routing dynamics of sparse feed-forward layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def record(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="Preset name (see --list; default shakespeare-tree).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: the preset's).", min=1)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run file to write.")] = Path("run.h5"),
    every: Annotated[Optional[int], typer.Option(help="Steps per recorded interval (default: the preset's).", min=1)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: the preset's).")] = None,
    sample_tokens: Annotated[Optional[int], typer.Option(help="Tokens per interval whose path is kept.", min=0)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run file (and its RUN.ckpt.pt) "
                                                   "to --steps; README: How resume works.")] = None,  # fmt: skip
    reserve_mib: Annotated[Optional[float], typer.Option("--reserve-mib", min=0, help="Free space (MiB) to leave on "
                           "OUT's disk: with less, recording stops cleanly (default: 1 MiB + 2 intervals; 0: off).")] = None,
    fsync: Annotated[bool, typer.Option("--fsync", help="Sync each interval to the disk (survives a power loss, "
                                        "not only a killed process).")] = False,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on the CPU) | bf16 | fp32")] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model (inductor); the first steps "
                                           "compile.")] = False,  # fmt: skip
    data: Annotated[Optional[Path], typer.Option(help="Train on this corpus instead of Shakespeare: a UTF-8 text "
                    "file or folder (bytes), or a nanoGPT uint16 .bin (with --vocab-size).")] = None,  # fmt: skip
    vocab_size: Annotated[Optional[int], typer.Option(min=2, help="Vocabulary size of a tokenized --data .bin.")] = None,
    probe_tokens: Annotated[int, typer.Option(min=0, help="Validation tokens routed at each interval end for routing "
                            "stability (group `probe`; 0: off).")] = 256,  # fmt: skip
    checkpoint_minutes: Annotated[float, typer.Option(min=0, help="Minutes of training between checkpoints "
                                  "(RUN.ckpt.pt, at an interval end; 0: every interval). A kill loses at most this "
                                  "much training; the run file keeps every interval.")] = 10.0,  # fmt: skip
) -> None:
    """Train a preset on the embedded Shakespeare corpus and record its routing to an HDF5 run file."""
    from routescope.trainers.presets import PRESETS, get_preset

    if list_presets:
        table = Table("preset", "steps", "tokens/step", "description", box=None)
        for name, preset in PRESETS.items():
            table.add_row(name, str(preset.steps), str(preset.batch_size * preset.model.seq_len), preset.description)
        console.print(table)
        return
    if config is not None and config not in PRESETS:
        fail(f"unknown preset {config!r}; choose one of: {', '.join(PRESETS)}")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        fail(f"--device must be auto, cpu or cuda, got {device!r}")
    overrides = {"steps": steps, "record_every": every, "seed": seed, "sample_tokens": sample_tokens}
    from routescope.cli_record import ConfigError, resumed_config, with_data

    if resume is not None:
        try:
            out, name, cfg = resume, config, resumed_config(resume, config, overrides)
        except ConfigError as err:
            fail(str(err))
    else:
        if out.is_dir():
            fail(f"--out {out} is a folder; give the path of the run file to write, e.g. --out {out / 'run.h5'}")
        if out.exists() and not overwrite:
            fail(f"{out} already exists; pass --overwrite to replace it, --resume {out} to continue it, "
                 "or --out to write elsewhere")  # fmt: skip
        if out.parent != Path("") and not out.parent.is_dir():
            fail(f"cannot write {out}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):
            fail(f"cannot write {out}: folder {out.parent} is not writable (a read-only filesystem, or no permission); "
                 "choose another --out")  # fmt: skip
        name = config or "shakespeare-tree"
        try:
            cfg = with_data(get_preset(name, **overrides), data, vocab_size)
        except ConfigError as err:
            fail(str(err))
    step_tokens = cfg.batch_size * cfg.model.seq_len
    if cfg.sample_tokens > step_tokens:  # the sample is drawn from an interval's last step: more cannot exist
        fail(f"--sample-tokens {cfg.sample_tokens} is more than the {step_tokens} tokens of one training step of "
             f"this preset (the sample comes from each interval's last step); give at most {step_tokens}")

    from routescope.record.recorder import RecorderError
    from routescope.trainers.data import CorpusError
    from routescope.trainers.train import train

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM closes the file as Ctrl-C does
    what = "resume" if resume is not None else "record"
    console.print(f"[bold]routescope {what}[/] {name or cfg.description or 'run'}: {cfg.steps} steps, interval {cfg.record_every} → {out}")
    try:
        reserve = None if reserve_mib is None else int(reserve_mib * 2**20)
        result = train(cfg, out=out, device=device, overwrite=overwrite, checkpoint=True, resume=resume is not None,
                       reserve_bytes=reserve, fsync=fsync, precision=precision, compile=compile_,
                       checkpoint_minutes=checkpoint_minutes, probe_tokens=probe_tokens)  # fmt: skip
    except KeyboardInterrupt:
        if out.with_suffix(".ckpt.pt").exists():
            fail(f"interrupted; {out} holds every interval recorded so far (marked 'interrupted'); continue it with "
                 f"`routescope record --resume {out}` (from its last checkpoint: intervals after it are trained again)")
        fail(f"interrupted before the first training checkpoint (one every --checkpoint-minutes, default 10); {out} "
             "holds every interval recorded so far (marked 'interrupted') but cannot be resumed; record it again")
    except (ValueError, RunFileError, CorpusError) as err:
        fail(str(err))
    except (RecorderError, OSError) as err:  # a full disk: the run file's writer, or the training checkpoint
        recorder = getattr(err, "recorder", None)
        what = recorder.stopped_message(hint=False) if recorder is not None else str(err.strerror or first_line(err))
        if getattr(err, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR):
            fail(f"cannot write {out} ({what}); choose another --out")
        if not out.exists():
            fail(f"{what}; {out} was not created, so nothing was recorded")
        if not out.with_suffix(".ckpt.pt").exists():
            fail(f"{what}; {out} keeps what was recorded, but no training checkpoint was written yet (one every "
                 "--checkpoint-minutes), so it cannot be resumed: once there is room, record it again")  # fmt: skip
        fail(f"{what}; once there is room, continue with `routescope record --resume {out}`")
    size = out.stat().st_size
    console.print(
        f"val loss {result.initial_val_loss:.3f} → {result.final_val_loss:.3f} in {result.seconds:.0f} s "
        f"({result.tokens_per_second / 1000:.1f}k tokens/s, {result.precision}"
        + (f", MFU {100 * result.mfu:.1f}% of the device's dense {result.precision} peak" if result.mfu is not None else "")
        + f"; {result.flops_per_token / 1e6:.1f} MFLOP per token; {result.epochs:.2f} epochs of the training split)"
    )
    console.print(f"wrote [bold]{out}[/] ({human_size(size)})")
    console.print(f"next: [cyan]routescope info {out}[/]")


@app.command()
def sweep(
    name: Annotated[Optional[str], typer.Argument(help="Sweep name (see --list).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the run files (<sweep>-<variant>-s<seed>.h5).")] = Path("runs"),
    size: Annotated[str, typer.Option(help="tiny (seconds a run), cpu (the demo preset) or gpu.")] = "tiny",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per variant: 0 .. N-1.")] = 2,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Override the size's training steps.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    shard: Annotated[str, typer.Option(help="I/N: train every N-th run from the I-th (N processes share a GPU).")] = "0/1",
    list_sweeps: Annotated[bool, typer.Option("--list", help="List the sweeps and sizes, then exit.")] = False,
) -> None:
    """Train an ablation (activation, placement, bias, depth, trees, dense) over seeds; finished runs are reused."""
    from routescope.trainers.sweep import SIZES, SWEEPS, parse_shard, reusable, run_sweep, sweep_configs

    if list_sweeps or name is None:
        table = Table("sweep", "variants", "question", box=None)
        for key, (question, variants) in SWEEPS.items():
            table.add_row(key, ", ".join(v.name for v in variants), question)
        console.print(table)
        console.print(f"sizes: {', '.join(SIZES)}")
        if name is None and not list_sweeps:
            fail("name a sweep (see the list above), e.g. `routescope sweep activation --seeds 3`")
        return
    if name not in SWEEPS:
        fail(f"unknown sweep {name!r}; choose one of: {', '.join(SWEEPS)}")
    if size not in SIZES:
        fail(f"unknown --size {size!r}; choose one of: {', '.join(SIZES)}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder for the run files")
    try:
        part = parse_shard(shard)
    except ValueError as err:
        fail(str(err))
    runs = sweep_configs(name, size, seeds, steps, shard=part)
    console.print(f"[bold]routescope sweep[/] {name} ({size}): {len(runs)} runs → {out}/")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        reused = [run for run, cfg in runs.items() if reusable(out / f"{run}.h5", cfg)]
        if reused:
            console.print(f"reusing {len(reused)} finished run{'s' if len(reused) != 1 else ''} of the same configuration")
        paths = run_sweep(name, out, size, seeds, steps, device, shard=part)
    except KeyboardInterrupt:
        fail(f"interrupted; finished runs in {out} are kept and reused when the sweep is run again")
    except (ValueError, RunFileError) as err:
        fail(str(err))
    except OSError as err:  # a read-only or full disk under --out
        fail(f"cannot write the runs to {out}/ ({err.strerror or first_line(err)}); choose a writable --out folder")
    console.print(f"{len(paths)} runs in {out}/ ({len(reused)} reused, {len(paths) - len(reused)} trained); compare them: "
                  f"[cyan]routescope report {out}/{name}-*.h5[/] or [cyan]routescope dash {out}/{name}-*.h5[/]")  # fmt: skip


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="Run file (.h5).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    window: Annotated[Optional[str], typer.Option(help="Steps START:END or 'all' for the routing line. Default: the last "
                                                      "quarter of the run.")] = None,
) -> None:
    """Print what a run file holds: steps, layers of each family (tree, l1, moe), state and configuration, and
    one line of routing states over the last quarter of the run (`report` has every metric)."""
    from routescope.analysis.report import routing_summary
    from routescope.analysis.window import MetricsError
    from routescope.info_text import print_info
    from routescope.store import describe

    try:
        summary = describe(path)
        if summary.get("families") and summary["intervals"]:
            summary["routing"] = routing_summary(path, window)
    except (RunFileError, MetricsError) as err:
        fail(str(err))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print_info(console, summary)


@app.command()
def report(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Run file(s); several are compared side by side.")] = None,
    window: Annotated[Optional[str], typer.Option(help="Steps START:END (half-open; either may be left out), 'all' for the "
                                                      "whole run. Default: the last quarter of the run.")] = None,
    layer: Annotated[Optional[list[int]], typer.Option("--layer", "-l", help="Only this layer (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report object as JSON (keys: docs/report-json.md).")] = False,
    events: Annotated[bool, typer.Option("--events", help="Also list pruning events and evaluate the early warning "
                                                          "(over the whole run unless --window is given).")] = False,
    group: Annotated[Optional[list[str]], typer.Option("--group", "-g", help="NAME=GLOB: a group of runs (seeds of one "
                     "arm); repeat for more groups. Prints each metric's mean and 95% interval per group, and Welch's t "
                     "and a permutation p-value between groups.")] = None,  # fmt: skip
    delta: DeltaOption = None,
    alpha: AlphaOption = None,
    epsilon: EpsilonOption = None,
    persistence: PersistenceOption = None,
) -> None:
    """Routing metrics per layer over a window of steps (default: the last quarter of the run): tree entropy,
    balance, calibrated dead/undetermined/frozen/static fractions, pruned roots; L1 active units and dead
    units; MoE expert load, router entropy, drops. Definitions: docs/metrics.md and docs/report-json.md."""
    from routescope.analysis.report import (
        build_report,
        compare_table,
        events_summary,
        legend_text,
        report_table,
    )
    from routescope.analysis.window import MetricsError, parse_window

    if not paths and not group:
        fail("give run files to report, or --group NAME=GLOB for groups of runs (see routescope report --help)")
    try:
        th = thresholds(delta, alpha, epsilon, persistence)
        bounds = parse_window(window)
        if group:
            _report_groups(group, list(paths or []), bounds, layer, th, as_json)
            return
        reports = [build_report(path, bounds, layer, events, th) for path in paths or []]
    except (RunFileError, MetricsError) as err:
        fail(str(err))
    if as_json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"runs": reports}, indent=2))
    elif len(reports) == 1:
        console.print(report_table(reports[0]))
        if events and "events" in reports[0]:
            console.print(events_summary(reports[0]["events"]))
        elif events:
            console.print("events: pruning events and the early warning are about tree layers; this report has none")
    else:
        console.print(compare_table(reports))
        families = list(dict.fromkeys(layer["family"] for r in reports for layer in r["layers"]))
        console.print(legend_text(families))


def _report_groups(specs: list[str], extra: list[Path], window: object, layers: list[int] | None, th: object,
                   as_json: bool) -> None:  # fmt: skip
    """`report --group`: each metric's mean and 95% interval per group of runs, Welch's t and a permutation p
    between groups (routescope.analysis.groups); identical runs are counted once."""
    from routescope.analysis.groups import GroupSpecError, collect_groups, expand_groups, group_table

    if extra:
        fail("give runs either as files or as --group NAME=GLOB, not both (a file can go in a group of its own: "
             "--group NAME=FILE)")  # fmt: skip
    try:
        result = collect_groups(expand_groups(specs), window, layers, th)  # type: ignore[arg-type]
    except GroupSpecError as err:
        fail(str(err))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(group_table(result))


@app.command()
def repair(path: Annotated[Path, typer.Argument(help="Run file (.h5) whose recording was killed.")]) -> None:
    """Let plain h5py open a run whose recording was killed (clears HDF5's open-for-write flags, as h5clear -s)."""
    from routescope.store.repair import clear_open_flags

    try:
        cleared = clear_open_flags(path)
    except RunFileError as err:
        fail(str(err))
    if cleared:
        console.print(f"{path}: cleared HDF5's open-for-write flags; plain h5py.File(path, 'r') opens it now "
                      "(run_state stays 'running': the run was never closed)")  # fmt: skip
    else:
        console.print(f"{path}: nothing to do (closed cleanly, plain h5py opens it)")


@app.command()
def dash(
    paths: Annotated[list[Path], typer.Argument(help="Run file(s) to show; only these files are served.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1 exposes your runs to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8050,
    interval: Annotated[float, typer.Option(help="Seconds between checks for new intervals (live runs).")] = 2.0,
    delta: DeltaOption = None,
    alpha: AlphaOption = None,
    epsilon: EpsilonOption = None,
    persistence: PersistenceOption = None,
) -> None:
    """Open the interactive dashboard (trees: paths, curves, drift, tokens; L1 units; MoE experts; run comparison) in a browser."""
    from routescope.analysis.window import MetricsError
    from routescope.dashboards.app import create_app, is_loopback

    if not 1 <= port <= 65535:
        fail(f"--port must be between 1 and 65535, got {port}")
    if interval <= 0:
        fail(f"--interval must be positive, got {interval}")
    try:
        app_ = create_app(paths, interval, thresholds(delta, alpha, epsilon, persistence))
    except (RunFileError, MetricsError) as err:
        fail(str(err))
    try:
        socket.getaddrinfo(host, port)
    except OSError as err:
        fail(f"cannot serve on --host {host} ({err.strerror or err}); give an address of this machine, e.g. 127.0.0.1")
    try:  # bind once here: the server's own failures (a taken port) print several lines and exit 1
        socket.create_server((host, port)).close()
    except OSError as err:
        fail(f"cannot serve on {host}:{port} ({err.strerror or first_line(err)}); pick another --port or --host")
    if not is_loopback(host):
        errors.print(f"[bold red]WARNING: serving on {host}: anyone who can reach this machine on port {port} "
                          "can read these runs (no authentication). Use --host 127.0.0.1 and an SSH tunnel instead.[/]")  # fmt: skip
    console.print(f"routescope dash: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/ "
                  f"({len(paths)} run{'s' if len(paths) > 1 else ''}; Ctrl-C to stop)")  # fmt: skip
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines, no dev-server banner
    app_.run(host=host, port=port, debug=False)


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    warnings.showwarning = _one_line_warning  # user-facing warnings as one line, not with a source line
    if version:
        from routescope.version import __version__

        print(__version__)
        raise typer.Exit()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
                      line: str | None = None) -> None:  # fmt: skip
    errors.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


app.command(name="prune")(prune_command)
app.command(name="export")(export_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
