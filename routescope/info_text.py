"""`routescope info` for people: what a run file holds, as `describe` and `report.routing_summary` give it,
printed as lines and one table of layers per family."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def human_size(n: float) -> str:
    """Bytes as '1.5 MB' (binary units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_info(console: Console, summary: dict[str, Any]) -> None:
    """The human form of `info`: size, state, steps, losses, groups, layers, routing states, config, versions."""
    console.print(f"[bold]{summary['path']}[/] ({human_size(summary['size_bytes'])}, schema {summary['schema_version']}, "
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
    routing = summary.get("routing") or {}
    if "error" in routing:
        console.print(f"routing: {routing['error']}", highlight=False)
    for name, values in routing.get("families", {}).items():
        shown = ", ".join(f"{key.replace('_', ' ')} {_fmt3(v)}" for key, v in values.items())
        console.print(f"routing ({name}, mean over layers, {routing['phrase']}): {shown}", highlight=False)
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
