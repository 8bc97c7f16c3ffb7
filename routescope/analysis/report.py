"""`routescope report`: the window metrics of one run (or several side by side) as a table or JSON.

The JSON keys are a public contract (docs/report-json.md): {"schema_version", "path", "window",
"layers": [{"layer", "name", "family", "depth", "trees", <metric keys>, "nonfinite_tokens"}], "run",
"families"}. Every family present contributes its layers through its FamilyAnalysis (family.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from routescope.analysis.family import FAMILY_ANALYSES, legend, number
from routescope.analysis.window import MetricsError, Window, select_window
from routescope.store.format import RunFileError
from routescope.store.reader import RunFile, reads_run_file


@reads_run_file(MetricsError)
def build_report(path: str | Path, window: Window = (None, None), layers: list[int] | None = None,
                 events: bool = False) -> dict[str, Any]:  # fmt: skip
    """The report object of one run file over a window of steps (events: add pruning events and the
    early warning's precision/recall, two more passes over the window; tree layers only).

    One entry per layer of every family present (tree, then l1, then moe); "layer" is the layer's
    index in its family's group, and `layers` picks those indices in every family that has them.
    "run" holds the means over the layers of the first family present; "families" those of each.
    """
    with RunFile.open(path) as run:
        if not run.families:
            raise RunFileError(f"{path} has no routed layers (a dense baseline?): no routing to report; "
                               f"`routescope info {path}` shows its losses")  # fmt: skip
        datasets = {name: run.dataset(name) for name in run.families}
        chosen = choose_layers(datasets, layers)
        traces = run.dataset("traces") if run.samples else None
        rows: list[dict[str, Any]] = []
        means: dict[str, dict[str, float | None]] = {}
        window_info: dict[str, Any] | None = None
        for name, ds in datasets.items():
            if chosen[name] == []:
                continue
            family = FAMILY_ANALYSES[name]
            summary, entries = family.report_entries(ds, window, chosen[name], traces)
            rows += entries
            means[name] = {key: _mean(summary[key].values) for key in family.keys}
            window_info = window_info or {"start": window[0], "end": window[1], "first_step": summary.attrs["window_first_step"],
                                          "last_step": summary.attrs["window_last_step"], "intervals": summary.attrs["intervals"]}  # fmt: skip
        result = {
            "schema_version": run.schema_version,
            "path": str(path),
            "window": window_info,
            "layers": rows,
            "run": next(iter(means.values())),
            "families": means,
        }
        if events and "tree" in datasets and chosen["tree"] != []:
            result["events"] = _events(select_window(datasets["tree"], window), chosen["tree"])
        return result


def _mean(values: Any) -> float | None:
    """The mean over layers of one metric, None when no layer has a value."""
    return number(np.nanmean(values)) if np.isfinite(values).any() else None


def choose_layers(datasets: dict[str, Any], layers: list[int] | None) -> dict[str, list[int] | None]:
    """Per family, the requested layer indices it has (None: all); an index no family has is an error."""
    if layers is None:
        return {name: None for name in datasets}
    counts = {name: ds.sizes["layer"] for name, ds in datasets.items()}
    missing = [i for i in layers if not any(0 <= i < n for n in counts.values())]
    if missing:
        have = ", ".join(f"{name} layers 0..{n - 1}" for name, n in counts.items())
        raise MetricsError(f"no layer {missing[0]} in this run; it has {have}")
    return {name: [i for i in layers if 0 <= i < n] for name, n in counts.items()}


def nonfinite_warnings(report: dict[str, Any]) -> list[str]:
    """One line per layer of the report whose window saw tokens with NaN/inf activations."""
    w = report["window"]
    return [f"warning: {layer['family']} layer {layer['layer']} ({layer['name']}): {layer['nonfinite_tokens']} tokens "
            f"with NaN/inf activations in steps {w['first_step']}–{w['last_step']} (left out of the sums)"
            for layer in report["layers"] if layer.get("nonfinite_tokens")]  # fmt: skip


def _events(ds: Any, layers: list[int] | None) -> dict[str, Any]:
    """Pruning events and the early warning's score in the window, over the chosen tree layers (None: all)."""
    from routescope.analysis.events import early_warnings, pruning_events

    table = pruning_events(ds)
    if layers is not None:
        table = table[table["layer"].isin(layers)]
    warning = early_warnings(ds, layers=layers)
    return {
        "died": int((table["kind"] == "died").sum()),
        "froze": int((table["kind"] == "froze").sum()),
        "first_death_step": int(table.loc[table["kind"] == "died", "step"].min()) if (table["kind"] == "died").any() else None,
        "early_warning": {"flags": len(warning.flags), "deaths": warning.deaths, "predicted": warning.predicted,
                          "precision": number(warning.precision), "recall": number(warning.recall)},
    }  # fmt: skip


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def report_table(report: dict[str, Any], with_legend: bool = True) -> Group:
    """One table per family present (one row per layer, one column per metric), then a legend of the columns."""
    w = report["window"]
    tables: list[Any] = []
    shown = []
    for family in FAMILY_ANALYSES.values():
        layers = [layer for layer in report["layers"] if layer["family"] == family.name]
        if not layers:
            continue
        shown.append(family.name)
        title = f"{report['path']}: steps {w['first_step']}–{w['last_step']} ({w['intervals']} intervals)"
        table = Table(title=title if family.name == "tree" else f"{title}, {family.name} layers", box=None, padding=(0, 1),
                      collapse_padding=True)  # fmt: skip
        for header in ("lay-\ner", "name" if family.name != "tree" else None, family.shape_header,
                       *(m.label for m in family.columns)):  # fmt: skip
            if header is not None:
                table.add_column(header, justify="right")
        for layer in layers:
            name = [layer["name"]] if family.name != "tree" else []
            table.add_row(str(layer["layer"]), *name, family.shape(layer), *(_fmt(layer[m.key]) for m in family.columns))
        tables.append(table)
    if with_legend:
        tables.append(legend_text(shown))
    warnings = [Text(line, style="bold red") for line in nonfinite_warnings(report)]
    return Group(*tables, *warnings)


def legend_text(families: list[str]) -> Text:
    """The column abbreviations of the tables, spelled out (definitions: docs/metrics.md)."""
    entries = "; ".join(f"{label}: {name}" for label, name in legend(families))
    return Text(f"columns — {entries}. Definitions: docs/metrics.md", style="dim")


def compare_table(reports: list[dict[str, Any]]) -> Table:
    """Several runs side by side: one row per (family, layer, metric), one column per run."""
    first = reports[0]["window"]
    span = ("whole runs" if first["start"] is None and first["end"] is None
            else f"window {'' if first['start'] is None else first['start']}:{'' if first['end'] is None else first['end']}")  # fmt: skip
    table = Table(title=f"comparison over {span}", box=None)
    table.add_column("layer", justify="right")
    table.add_column("metric")
    for i, report in enumerate(reports):
        table.add_column(f"[{i}] {Path(report['path']).name}", justify="right")
    for family in FAMILY_ANALYSES.values():
        indices = sorted({lay["layer"] for r in reports for lay in r["layers"] if lay["family"] == family.name})
        for index in indices:
            label_layer = str(index) if family.name == "tree" else f"{family.name} {index}"
            for metric in family.columns:
                values = [next((lay[metric.key] for lay in r["layers"] if lay["layer"] == index and lay["family"] == family.name),
                               None) for r in reports]  # fmt: skip
                table.add_row(label_layer, metric.short, *(_fmt(v) for v in values))
    return table
