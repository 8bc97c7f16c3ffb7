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

from routescope.store.format import RunFileError, first_line

app = typer.Typer(
    help="Record, measure and see the routing dynamics of sparse feed-forward layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
errors = Console(stderr=True)


def fail(message: str) -> None:
    """Print one line saying what is wrong and what to do, then exit with code 2."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
    if resume is not None:
        out, name, cfg = resume, config, _resumed_config(resume, config, overrides)
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
        cfg = get_preset(name, **overrides)
    step_tokens = cfg.batch_size * cfg.model.seq_len
    if cfg.sample_tokens > step_tokens:  # the sample is drawn from an interval's last step: more cannot exist
        fail(f"--sample-tokens {cfg.sample_tokens} is more than the {step_tokens} tokens of one training step of "
             f"this preset (the sample comes from each interval's last step); give at most {step_tokens}")

    from routescope.record.recorder import RecorderError
    from routescope.trainers.train import train

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM closes the file as Ctrl-C does
    what = "resume" if resume is not None else "record"
    console.print(f"[bold]routescope {what}[/] {name or cfg.description or 'run'}: {cfg.steps} steps, interval {cfg.record_every} → {out}")
    try:
        reserve = None if reserve_mib is None else int(reserve_mib * 2**20)
        result = train(cfg, out=out, device=device, overwrite=overwrite, checkpoint=True, resume=resume is not None,
                       reserve_bytes=reserve, fsync=fsync)  # fmt: skip
    except KeyboardInterrupt:
        fail(f"interrupted; {out} holds every interval recorded so far (marked 'interrupted'); "
             f"continue it with `routescope record --resume {out}`")  # fmt: skip
    except (ValueError, RunFileError) as err:
        fail(str(err))
    except (RecorderError, OSError) as err:  # a full disk: the run file's writer, or the training checkpoint
        recorder = getattr(err, "recorder", None)
        what = recorder.stopped_message(hint=False) if recorder is not None else str(err.strerror or first_line(err))
        if getattr(err, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR):
            fail(f"cannot write {out} ({what}); choose another --out")
        if not out.exists():
            fail(f"{what}; {out} was not created, so nothing was recorded")
        fail(f"{what}; once there is room, continue with `routescope record --resume {out}`")
    size = out.stat().st_size
    console.print(
        f"val loss {result.initial_val_loss:.3f} → {result.final_val_loss:.3f} in {result.seconds:.0f} s "
        f"({result.tokens_per_second / 1000:.1f}k tokens/s)"
    )
    console.print(f"wrote [bold]{out}[/] ({_human_size(size)})")
    console.print(f"next: [cyan]routescope info {out}[/]")


def _resumed_config(path: Path, preset: str | None, overrides: dict[str, object]):  # type: ignore[no-untyped-def]
    """The training config to resume `path` with: the file's own (or the named preset's), with the overrides given."""
    from dataclasses import replace

    from routescope.store import RunFile
    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import config_from_dict

    try:
        with RunFile.open(path) as run:
            stored = run.config.get("preset")
    except RunFileError as err:
        fail(str(err))
    except (ValueError, AttributeError) as err:
        fail(f"{path} has an unreadable config attribute ({err}); cannot resume it")
    if not stored:
        fail(f"{path} was not recorded by `routescope record` (no preset in its config); it cannot be resumed from the CLI")
    if preset is not None:
        return get_preset(preset, **overrides)  # compared with the file's when the recorder reopens it
    try:
        return replace(config_from_dict(stored), **{k: v for k, v in overrides.items() if v is not None})
    except TypeError as err:
        fail(f"{path} holds a preset this routescope does not know ({err}); cannot resume it")


@app.command()
def sweep(
    name: Annotated[Optional[str], typer.Argument(help="Sweep name (see --list).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the run files (<sweep>-<variant>-s<seed>.h5).")] = Path("runs"),
    size: Annotated[str, typer.Option(help="tiny (seconds a run), cpu (the demo preset) or gpu.")] = "tiny",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per variant: 0 .. N-1.")] = 2,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Override the size's training steps.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    list_sweeps: Annotated[bool, typer.Option("--list", help="List the sweeps and sizes, then exit.")] = False,
) -> None:
    """Train an ablation (activation, placement, bias, depth, trees, dense) over seeds; finished runs are reused."""
    from routescope.trainers.sweep import SIZES, SWEEPS, reusable, run_sweep, sweep_configs

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
    runs = sweep_configs(name, size, seeds, steps)
    console.print(f"[bold]routescope sweep[/] {name} ({size}): {len(runs)} runs → {out}/")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        reused = [run for run, cfg in runs.items() if reusable(out / f"{run}.h5", cfg)]
        if reused:
            console.print(f"reusing {len(reused)} finished run{'s' if len(reused) != 1 else ''} of the same configuration")
        paths = run_sweep(name, out, size, seeds, steps, device)
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
) -> None:
    """Print what a run file holds: steps, layers of each family (tree, l1, moe), state and configuration."""
    from routescope.store import describe

    try:
        summary = describe(path)
    except RunFileError as err:
        fail(str(err))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"[bold]{summary['path']}[/] ({_human_size(summary['size_bytes'])}, schema {summary['schema_version']}, "
                  f"{summary['run_state']})")  # fmt: skip
    steps = (f"{summary['intervals']} intervals, steps {summary['first_step']}–{summary['last_step']}"
             if summary["intervals"] else "no complete interval yet")  # fmt: skip
    console.print(f"{steps}; {summary['tokens']:,} tokens; {summary['samples']:,} sampled token traces")
    if summary.get("failure"):
        console.print(f"[red]stopped[/]: {summary['failure']}", highlight=False)
    if summary.get("losses"):
        console.print("loss: " + ", ".join(f"{name.removesuffix('_loss')} {v['first']:.3f} → {v['last']:.3f}"
                                           for name, v in summary["losses"].items()))  # fmt: skip
    if summary.get("families"):
        groups = ", ".join(f"{name} ({n} layer{'s' if n != 1 else ''})" for name, n in summary["families"].items())
        console.print(f"groups: {groups} (routescope.open(path, group=NAME))")
    if summary["layers"]:
        for table in _layer_tables(summary["layers"]):
            console.print(table)
    else:
        console.print("no routed layers recorded (losses only)")
    preset = summary["config"].get("preset")
    if preset:
        console.print(f"config: {preset.get('description') or ''} steps={preset['steps']} batch={preset['batch_size']} "
                      f"lr={preset['lr']} seed={preset['seed']} device={summary['config'].get('device')}")  # fmt: skip
    console.print(f"versions: {', '.join(f'{k}={v}' for k, v in summary['versions'].items())}")


def _layer_tables(layers: list[dict]) -> list[Table]:
    """One table per layer family in the file (group `tree`, `l1`, `moe`), tree first; "layer" is the
    index in the family's group, the columns are the family's `info_columns`."""
    from routescope.analysis.family import FAMILY_ANALYSES

    tables = []
    for family in FAMILY_ANALYSES.values():
        mine = [layer for layer in layers if layer.get("family", "tree") == family.name]
        if not mine:
            continue
        table = Table("layer", "name", "family", *(header for header, _ in family.info_columns), box=None)
        for i, layer in enumerate(mine):
            table.add_row(str(i), layer["name"], family.name, *(_cell(layer.get(key)) for _, key in family.info_columns))
        tables.append(table)
    return tables


def _fmt3(value: float | None) -> str:
    """A share as the report table prints it: 3 decimals, – for none."""
    return "–" if value is None else f"{value:.3f}"


def _cell(value: object) -> str:
    return "–" if value is None else str(value)


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="Run file(s); several are compared side by side.")],
    window: Annotated[Optional[str], typer.Option(help="Steps START:END (half-open; either may be left out).")] = None,
    layer: Annotated[Optional[list[int]], typer.Option("--layer", "-l", help="Only this layer (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report object as JSON (keys: docs/report-json.md).")] = False,
    events: Annotated[bool, typer.Option("--events", help="Also count pruning events and score the early warning.")] = False,
) -> None:
    """Routing metrics per layer over a window of steps: tree entropy, balance, dead/frozen/static fractions;
    L1 active units per token and dead units; MoE expert load, router entropy, drops. Definitions of every
    column and key: docs/metrics.md and docs/report-json.md."""
    from routescope.analysis.report import build_report, compare_table, legend_text, report_table
    from routescope.analysis.window import MetricsError, parse_window

    try:
        bounds = parse_window(window)
        reports = [build_report(path, bounds, layer, events) for path in paths]
    except (RunFileError, MetricsError) as err:
        fail(str(err))
    if as_json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"runs": reports}, indent=2))
    elif len(reports) == 1:
        console.print(report_table(reports[0]))
        if events:
            e = reports[0]["events"]
            w = e["early_warning"]
            console.print(f"pruning: {e['died']} nodes died (first at step {e['first_death_step']}), {e['froze']} froze; "
                          f"early warning: {w['flags']} flags, {w['predicted']}/{w['deaths']} deaths predicted "
                          f"(precision {_fmt3(w['precision'])}, recall {_fmt3(w['recall'])})")  # fmt: skip
    else:
        console.print(compare_table(reports))
        families = list(dict.fromkeys(layer["family"] for r in reports for layer in r["layers"]))
        console.print(legend_text(families))


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
) -> None:
    """Open the interactive dashboard (trees: paths, curves, drift, tokens; L1 units; MoE experts; run comparison) in a browser."""
    from routescope.dashboards.app import create_app, is_loopback

    if not 1 <= port <= 65535:
        fail(f"--port must be between 1 and 65535, got {port}")
    if interval <= 0:
        fail(f"--interval must be positive, got {interval}")
    try:
        app_ = create_app(paths, interval)
    except RunFileError as err:
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
