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

from routescope.analysis.balance_audit import balance_audit
from routescope.analysis.calibrated import DEFAULT, Thresholds
from routescope.analysis.family import FAMILY_ANALYSES, legend, number
from routescope.analysis.window import (
    ALL,
    LAST_QUARTER,
    MetricsError,
    Window,
    describe_window,
    resolve_window,
    select_window,
)
from routescope.store.format import RunFileError
from routescope.store.reader import RunFile, reads_run_file

REPORT_VERSION = 2  # metrics version 2: calibrated states (docs/metrics.md)


@reads_run_file(MetricsError)
def build_report(path: str | Path, window: Window = LAST_QUARTER, layers: list[int] | None = None,
                 events: bool = False, th: Thresholds = DEFAULT) -> dict[str, Any]:  # fmt: skip
    """The report object of one run file over a window of steps, by default the last quarter of the run
    (events: add the v2 pruning events and the early warning's evaluation, over the whole run unless a
    window of steps is given; tree layers only).

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
            summary, entries = family.report_entries(ds, window, chosen[name], traces, th)
            rows += entries
            means[name] = {key: _mean(summary[key].values) for key in family.keys}
            window_info = window_info or describe_summary_window(ds, window, summary)
        result = {
            "schema_version": run.schema_version,
            "report_version": REPORT_VERSION,
            "thresholds": th.as_dict(),
            "path": str(path),
            "window": window_info,
            "layers": rows,
            "run": next(iter(means.values())),
            "families": means,
        }
        if "moe" in datasets:  # is the balance loss the model reports the one its routing implies?
            moe_steps = datasets["moe"]["step"].values
            span = resolve_window(moe_steps, window)
            result["balance_audit"] = balance_audit(select_window(datasets["moe"], span),
                                                    select_window(run.dataset("run"), span))  # fmt: skip
        if events and "tree" in datasets and chosen["tree"] != []:
            span = ALL if window == LAST_QUARTER else window  # events need the run's history, not just its end
            result["events"] = _events(select_window(datasets["tree"], span), chosen["tree"], th)
        return result


def describe_summary_window(ds: Any, window: Window, summary: Any) -> dict[str, Any]:
    """The report's `window` object: the bounds asked for, how (`span`), and the intervals a summary covered."""
    start, end = resolve_window(ds["step"].values, window)
    return {"start": start, "end": end, "span": describe_window(window), "first_step": summary.attrs["window_first_step"],
            "last_step": summary.attrs["window_last_step"], "intervals": summary.attrs["intervals"],
            "run_intervals": int(ds.sizes["step"])}  # fmt: skip


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


def _events(ds: Any, layers: list[int] | None, th: Thresholds) -> dict[str, Any]:
    """v2 pruning events and the early warning's evaluation, over the chosen tree layers (None: all)."""
    from routescope.analysis.events import pruning_events
    from routescope.analysis.warning import early_warnings

    table = pruning_events(ds, th, layers)
    final = table[table["status"] == "event"]
    deaths = final[final["kind"] == "died"]
    warning = early_warnings(ds, th=th, layers=layers)
    return {
        "span_steps": [int(ds["step"].values[0]), int(ds["step"].values[-1])],
        "died": int(len(deaths)),
        "pruned_roots": int((deaths["role"] == "pruned_root").sum()),
        "cascade": int((deaths["role"] == "cascade").sum()),
        "died_right": int((deaths["side"] == "right").sum()),
        "froze": int((final["kind"] == "froze").sum()),
        "froze_starving_right": int(((final["kind"] == "froze") & (final["side"] == "right")).sum()),
        "pending_deaths": int(((table["status"] == "pending") & (table["kind"] == "died")).sum()),
        "pending_freezes": int(((table["status"] == "pending") & (table["kind"] == "froze")).sum()),
        "first_death_step": int(deaths["step"].min()) if len(deaths) else None,
        "early_warning": warning.as_dict(),
    }


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
        title = f"{report['path']}: {window_phrase(w)}"
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
    audit = report.get("balance_audit")
    if audit and audit["status"] == "flagged":
        warnings.append(Text(f"MoE balance loss flagged: {audit['cause']}", style="bold red"))
    elif audit and audit["status"] == "ok":
        tables.append(Text(f"MoE balance loss: the reported loss matches the recorded routing (ratio {audit['ratio']:.3f})"))
    return Group(*tables, *warnings)


def window_phrase(w: dict[str, Any]) -> str:
    """'steps 230–300 (the last quarter: 8 of 30 intervals)' for a report's window."""
    how = {"last-quarter": "the last quarter: ", "all": "the whole run: "}.get(w.get("span", ""), "")
    total = f" of {w['run_intervals']}" if "run_intervals" in w else ""
    steps = f"steps {w['first_step']}–{w['last_step']}" if w["first_step"] != w["last_step"] else f"step {w['last_step']}"
    return f"{steps} ({how}{w['intervals']}{total} interval{'s' if w['intervals'] != 1 else ''})"


def legend_text(families: list[str]) -> Text:
    """The column abbreviations of the tables, spelled out (definitions: docs/metrics.md)."""
    entries = "; ".join(f"{label}: {name}" for label, name in legend(families))
    return Text(f"columns — {entries}. Definitions: docs/metrics.md", style="dim")


def compare_table(reports: list[dict[str, Any]]) -> Table:
    """Several runs side by side: one row per (family, layer, metric), one column per run."""
    first = reports[0]["window"]
    span = {"last-quarter": "the last quarter of each run", "all": "whole runs"}.get(first.get("span", ""),
                                                                                    f"window {first.get('span')}")
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


def events_summary(e: dict[str, Any]) -> Group:
    """`report --events` for people: the event counts, the early warning's verdict and its held-out scores
    beside the trivial rule's and a random flagger's, and the lifts."""
    first = f", the first at step {e['first_death_step']}" if e["first_death_step"] is not None else ""
    parts: list[Any] = [Text(f"events (steps {e['span_steps'][0]}–{e['span_steps'][1]}): {e['died']} units died{first} "
                             f"({e['pruned_roots']} pruned roots, {e['cascade']} cascading; {e['died_right']} right "
                             f"children), {e['froze']} nodes froze ({e['froze_starving_right']} starving the right child); "
                             f"pending: {e['pending_deaths']} deaths, {e['pending_freezes']} freezes")]  # fmt: skip
    w = e["early_warning"]
    parts.append(Text(f"early warning: {w['verdict']}"))
    rows = [("predictor", w["predictor"]), ("trivial rule (minority child ≤ 1 token)", w["trivial"]),
            ("random, predictor's flag count", w["random"]), ("random, trivial rule's flag count", w["random_trivial"])]  # fmt: skip
    table = Table("held-out scoring", "flags", "precision", "recall", "F1", box=None)
    for name, score in rows:
        if score:
            table.add_row(name, f"{score['flags']:,}", _fmt(score["precision"]), _fmt(score["recall"]), _fmt(score["f1"]))
    if w["predictor"] or w["trivial"]:
        parts.append(table)
        lifts = [f"{name} {value:.2f}×" for name, value in (("predictor over random", w["lift_over_random"]),
                 ("predictor over trivial", w["lift_over_trivial"]), ("trivial over random", w["trivial_lift_over_random"]))
                 if value is not None]  # fmt: skip
        if lifts:
            parts.append(Text("precision lift: " + ", ".join(lifts)))
    return Group(*parts)


INFO_KEYS = {"tree": ("dead_fraction", "undetermined_fraction", "frozen_fraction", "static_fraction"),
             "l1": ("dead_fraction", "undetermined_units"), "moe": ("dead_experts", "undetermined_experts")}


def routing_summary(path: str | Path, window: str | None) -> dict[str, Any]:
    """`info`'s routing line: calibrated states per family over the window (default: the last quarter), from
    the window summaries alone (not the report's per-layer extras such as the MI null). A bad window given
    by the user raises; a default window that cannot be computed becomes {"error": ...}."""
    from routescope.analysis.window import parse_window

    bounds = parse_window(window)
    families: dict[str, dict[str, float | None]] = {}
    info: dict[str, Any] | None = None
    try:
        with RunFile.open(path) as run:
            for name in run.families:
                ds = run.dataset(name)
                summary = FAMILY_ANALYSES[name].summary(ds, bounds)
                families[name] = {key: _mean(summary[key].values) for key in INFO_KEYS.get(name, ())}
                info = info or describe_summary_window(ds, bounds, summary)
    except MetricsError as err:
        if window is not None:
            raise
        return {"error": str(err)}
    return {"window": info, "phrase": window_phrase(info) if info else "", "families": families}
