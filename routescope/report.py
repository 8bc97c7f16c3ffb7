"""`routescope report`: the window metrics of one run (or several side by side) as a table or JSON.

The JSON keys are a public contract (DESIGN.md): {"schema_version", "window", "layers": [{"layer",
"family", "depth", "trees", <metric names>}]}. Layers of the L1 and MoE families carry their own
metric keys (metrics_families.py) and null depth and trees. Every entry also has "nonfinite_tokens":
tokens with NaN/inf activations in the window (tree layers: the most over their trees), null for
files written before that variable existed; the table prints a warning line per such layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from routescope import metrics
from routescope.metrics_families import FAMILY_VECTORS, L1_METRICS, MOE_METRICS, select_family_layers, summarize_family
from routescope.schema import FAMILIES
from routescope.store import RunFileError, group_dataset, open_h5, reads_run_file


@reads_run_file(metrics.MetricsError)
def build_report(path: str | Path, window: tuple[int | None, int | None] = (None, None),
                 layers: list[int] | None = None, events: bool = False) -> dict[str, Any]:  # fmt: skip
    """The report object of one run file over a window of steps (events: add pruning events and the
    early warning's precision/recall, two more passes over the window; tree layers only).

    One entry per layer of every family present (tree, then l1, then moe); "layer" is the layer's
    index in its family's group, and `layers` picks those indices in every family that has them.
    "run" holds the means over the layers of the first family present; "families" those of each.
    """
    f = open_h5(path)
    try:
        present = [name for name in FAMILIES if name in f]
        if not present:
            raise RunFileError(f"{path} has no routed layers (a dense baseline?): no routing to report; "
                               f"`routescope info {path}` shows its losses")  # fmt: skip
        datasets = {name: group_dataset(f, name) for name in present}
        chosen = _choose_layers(datasets, layers)
        rows: list[dict[str, Any]] = []
        means: dict[str, dict[str, float | None]] = {}
        window_info: dict[str, Any] | None = None
        for name, ds in datasets.items():
            if chosen[name] == []:
                continue
            if name == "tree":
                summary, family_rows = _tree_rows(f, ds, window, chosen[name])
            else:
                summary, family_rows = _family_rows(ds, name, window, chosen[name])
            rows += family_rows
            means[name] = {key: _number(np.nanmean(summary[key].values)) if np.isfinite(summary[key].values).any()
                           else None for key in FAMILY_KEYS[name]}  # fmt: skip
            window_info = window_info or {"start": window[0], "end": window[1], "first_step": summary.attrs["window_first_step"],
                                          "last_step": summary.attrs["window_last_step"], "intervals": summary.attrs["intervals"]}  # fmt: skip
        result = {
            "schema_version": int(f.attrs["schema_version"]),
            "path": str(path),
            "window": window_info,
            "layers": rows,
            "run": next(iter(means.values())),
            "families": means,
        }
        if events and "tree" in datasets and chosen["tree"] != []:
            result["events"] = _events(metrics.select_window(datasets["tree"], window))
        return result
    finally:
        f.close()


FAMILY_KEYS = {"tree": metrics.TREE_METRICS, "l1": L1_METRICS, "moe": MOE_METRICS}


def _choose_layers(datasets: dict[str, Any], layers: list[int] | None) -> dict[str, list[int] | None]:
    """Per family, the requested layer indices it has (None: all); an index no family has is an error."""
    if layers is None:
        return {name: None for name in datasets}
    counts = {name: ds.sizes["layer"] for name, ds in datasets.items()}
    missing = [i for i in layers if not any(0 <= i < n for n in counts.values())]
    if missing:
        have = ", ".join(f"{name} layers 0..{n - 1}" for name, n in counts.items())
        raise metrics.MetricsError(f"no layer {missing[0]} in this run; it has {have}")
    return {name: [i for i in layers if 0 <= i < n] for name, n in counts.items()}


def _tree_rows(f: Any, ds: Any, window: tuple[int | None, int | None], layers: list[int] | None) -> tuple[Any, list]:
    summary = metrics.summarize(ds, window, layers)
    bad = _nonfinite_totals(ds, window)
    mi = metrics.mutual_information(group_dataset(f, "traces"), window) if "traces" in f and "leaf" in f["traces"] else None
    rows = []
    for row, info in enumerate(metrics.select_layers(ds, layers)):
        entry: dict[str, Any] = {"layer": info.index, "name": info.name, "family": info.family, "depth": info.depth,
                                 "trees": info.trees, "variant": info.variant}  # fmt: skip
        for name in metrics.TREE_METRICS:
            entry[name] = _number(summary[name].values[row])
        entry["mutual_information"] = _number(mi.values[info.index]) if mi is not None else None
        entry["nonfinite_tokens"] = None if bad is None else bad[info.index]
        rows.append(entry)
    return summary, rows


def _family_rows(ds: Any, family: str, window: tuple[int | None, int | None], layers: list[int] | None) -> tuple[Any, list]:
    summary = summarize_family(ds, family, window, layers)
    vector, _ = FAMILY_VECTORS[family]
    bad = _nonfinite_totals(ds, window)
    rows = []
    for row, info in enumerate(select_family_layers(ds, family, layers)):
        entry: dict[str, Any] = {"layer": info.index, "name": info.name, "family": family, "depth": None, "trees": None}
        entry.update({"units": info.width} if family == "l1" else {"experts": info.width, "k": info.k})
        for name in FAMILY_KEYS[family]:
            entry[name] = _number(summary[name].values[row])
        entry[vector] = [_number(v) for v in summary[vector].values[row, : info.width]]
        entry["nonfinite_tokens"] = None if bad is None else bad[info.index]
        rows.append(entry)
    return summary, rows


def _nonfinite_totals(ds: Any, window: tuple[int | None, int | None]) -> list[int] | None:
    """Per layer, tokens with NaN/inf activations over the window (tree: max over trees); None for older files."""
    if "nonfinite_tokens" not in ds:
        return None
    totals = np.asarray(metrics.select_window(ds, window)["nonfinite_tokens"].sum("step").values)
    return [int(v.max(initial=0)) for v in totals.reshape(totals.shape[0], -1)]


def nonfinite_warnings(report: dict[str, Any]) -> list[str]:
    """One line per layer of the report whose window saw tokens with NaN/inf activations."""
    w = report["window"]
    return [f"warning: {layer['family']} layer {layer['layer']} ({layer['name']}): {layer['nonfinite_tokens']} tokens "
            f"with NaN/inf activations in steps {w['first_step']}–{w['last_step']} (left out of the sums)"
            for layer in report["layers"] if layer.get("nonfinite_tokens")]  # fmt: skip


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
FAMILY_COLUMNS = {
    "tree": COLUMNS,
    "l1": [("active_mean", "active\nmean"), ("active_p50", "active\np50"), ("active_p99", "active\np99"),
           ("active_max", "active\nmax"), ("active_fraction", "active\nfrac."), ("dead_units", "dead\nunits"),
           ("dead_fraction", "dead\nfrac.")],
    "moe": [("load_cv", "load\nCV"), ("max_mean_load", "max/\nmean"), ("dead_experts", "dead\nexperts"),
            ("router_entropy", "router\nH bits"), ("router_entropy_norm", "router\nH/log E"),
            ("drop_fraction", "drop\nfrac."), ("active_fraction", "active\nfrac.")],
}  # fmt: skip


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _shape(layer: dict[str, Any]) -> str:
    if layer["family"] == "l1":
        return str(layer["units"])
    if layer["family"] == "moe":
        return f"{layer['k']}/{layer['experts']}"
    return f"{layer['depth']}×{layer['trees']}"


SHAPE_HEADER = {"tree": "d×T", "l1": "units", "moe": "k/E"}


def report_table(report: dict[str, Any]) -> Group:
    """One table per family present: one row per layer, one column per metric."""
    w = report["window"]
    tables = []
    for family, columns in FAMILY_COLUMNS.items():
        layers = [layer for layer in report["layers"] if layer["family"] == family]
        if not layers:
            continue
        title = f"{report['path']}: steps {w['first_step']}–{w['last_step']} ({w['intervals']} intervals)"
        table = Table(title=title if family == "tree" else f"{title}, {family} layers", box=None, padding=(0, 1),
                      collapse_padding=True)  # fmt: skip
        for header in ("lay-\ner", "name" if family != "tree" else None, SHAPE_HEADER[family], *(label for _, label in columns)):
            if header is not None:
                table.add_column(header, justify="right")
        for layer in layers:
            name = [layer["name"]] if family != "tree" else []
            table.add_row(str(layer["layer"]), *name, _shape(layer), *(_fmt(layer[k]) for k, _ in columns))
        tables.append(table)
    warnings = [Text(line, style="bold red") for line in nonfinite_warnings(report)]
    return Group(*tables, *warnings)


def compare_table(reports: list[dict[str, Any]]) -> Table:
    """Several runs side by side: one row per (family, layer, metric), one column per run."""
    table = Table(title="comparison", box=None)
    table.add_column("layer", justify="right")
    table.add_column("metric")
    for i, report in enumerate(reports):
        table.add_column(f"[{i}] {Path(report['path']).name}", justify="right")
    for family, columns in FAMILY_COLUMNS.items():
        indices = sorted({lay["layer"] for r in reports for lay in r["layers"] if lay["family"] == family})
        for index in indices:
            label_layer = str(index) if family == "tree" else f"{family} {index}"
            for key, label in columns:
                values = [next((lay[key] for lay in r["layers"] if lay["layer"] == index and lay["family"] == family), None)
                          for r in reports]  # fmt: skip
                table.add_row(label_layer, label.replace("\n", " "), *(_fmt(v) for v in values))
    return table
