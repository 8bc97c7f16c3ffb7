"""`routescope report`: the window metrics of one run (or several side by side) as a table or JSON.

The JSON keys are a public contract (DESIGN.md): {"schema_version", "window", "layers": [{"layer",
"family", "depth", "trees", <metric names>}]}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from routescope import metrics
from routescope.store import group_dataset, open_h5, reads_run_file


@reads_run_file(metrics.MetricsError)
def build_report(path: str | Path, window: tuple[int | None, int | None] = (None, None),
                 layers: list[int] | None = None, events: bool = False) -> dict[str, Any]:  # fmt: skip
    """The report object of one run file over a window of steps (events: add pruning events and the
    early warning's precision/recall, two more passes over the window)."""
    f = open_h5(path)
    try:
        ds = group_dataset(f, "tree")
        summary = metrics.summarize(ds, window, layers)
        mi = metrics.mutual_information(group_dataset(f, "traces"), window) if "traces" in f else None
        infos = metrics.select_layers(ds, layers)
        rows = []
        for row, info in enumerate(infos):
            entry: dict[str, Any] = {"layer": info.index, "name": info.name, "family": info.family, "depth": info.depth,
                                     "trees": info.trees, "variant": info.variant}  # fmt: skip
            for name in metrics.TREE_METRICS:
                entry[name] = _number(summary[name].values[row])
            entry["mutual_information"] = _number(mi.values[info.index]) if mi is not None else None
            rows.append(entry)
        result = {
            "schema_version": int(f.attrs["schema_version"]),
            "path": str(path),
            "window": {"start": window[0], "end": window[1], "first_step": summary.attrs["window_first_step"],
                       "last_step": summary.attrs["window_last_step"], "intervals": summary.attrs["intervals"]},
            "layers": rows,
            "run": {name: _number(summary[name].mean().values) for name in metrics.TREE_METRICS},
        }  # fmt: skip
        if events:
            result["events"] = _events(metrics.select_window(ds, window))
        return result
    finally:
        f.close()


def _events(ds: Any) -> dict[str, Any]:
    from routescope.events import early_warnings, pruning_events

    table = pruning_events(ds)
    warning = early_warnings(ds)
    return {
        "died": int((table["kind"] == "died").sum()),
        "froze": int((table["kind"] == "froze").sum()),
        "first_death_step": int(table.loc[table["kind"] == "died", "step"].min()) if (table["kind"] == "died").any() else None,
        "early_warning": {"flags": len(warning.flags), "deaths": warning.deaths, "predicted": warning.predicted,
                          "precision": _number(warning.precision), "recall": _number(warning.recall)},
    }  # fmt: skip


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


COLUMNS = [("routing_entropy", "route\nH"), ("balance", "bal-\nance"), ("leaf_entropy_norm", "leaf\nH/d"),
           ("effective_leaves", "eff.\nleaves"), ("leaf_gini", "leaf\nGini"), ("dead_fraction", "dead"),
           ("frozen_fraction", "frozen"), ("static_fraction", "static"), ("active_fraction", "active"),
           ("firing_fraction", "firing"), ("mutual_information", "MI\nbits")]  # fmt: skip


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def report_table(report: dict[str, Any]) -> Table:
    """One row per layer, one column per metric."""
    w = report["window"]
    table = Table(title=f"{report['path']}: steps {w['first_step']}–{w['last_step']} ({w['intervals']} intervals)",
                  box=None, padding=(0, 1), collapse_padding=True)  # fmt: skip
    for header in ("lay-\ner", "d×T", *(label for _, label in COLUMNS)):
        table.add_column(header, justify="right")
    for layer in report["layers"]:
        table.add_row(str(layer["layer"]), f"{layer['depth']}×{layer['trees']}", *(_fmt(layer[k]) for k, _ in COLUMNS))
    return table


def compare_table(reports: list[dict[str, Any]]) -> Table:
    """Several runs side by side: one row per (layer, metric), one column per run."""
    table = Table(title="comparison", box=None)
    table.add_column("layer", justify="right")
    table.add_column("metric")
    for i, report in enumerate(reports):
        table.add_column(f"[{i}] {Path(report['path']).name}", justify="right")
    layers = sorted({layer["layer"] for report in reports for layer in report["layers"]})
    for index in layers:
        for key, label in COLUMNS:
            values = [next((lay[key] for lay in r["layers"] if lay["layer"] == index), None) for r in reports]
            table.add_row(str(index), label.replace("\n", " "), *(_fmt(v) for v in values))
    return table
