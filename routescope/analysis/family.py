"""One interface per layer family: what the report, `info` and the dashboard need of tree, l1 and moe.

Each family's analysis is a `FamilyAnalysis`: its metric keys with short labels and full names, its
layers, its window summary and time series, and the per-layer fields of the report. Callers loop
over `FAMILY_ANALYSES` (in file order: tree, l1, moe) instead of branching on the family's name, so
adding a family adds one entry here (its file variables: routescope.store.schema; its dashboard
views: dashboards/views).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from routescope.analysis import families, tree
from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds
from routescope.analysis.window import LAST_QUARTER, Window, pick_layers, select_window


@dataclass(frozen=True)
class Metric:
    """A metric key (report JSON, Dataset variable), its table label (two short lines) and its full name."""

    key: str
    label: str
    name: str
    table: bool = True  # shown as a column of the report's table (every metric is in the JSON)

    @property
    def short(self) -> str:
        """The label on one line ("bal-\\nance" -> "balance", "route\\nH" -> "route H")."""
        return self.label.replace("-\n", "").replace("\n", " ")


@dataclass(frozen=True)
class FamilyAnalysis:
    """The analysis of one layer family behind the interface every caller uses."""

    name: str  # the family's group in the file
    metrics: tuple[Metric, ...]  # the report's columns and JSON keys, in order
    shape_header: str  # the table column saying a layer's shape
    info_columns: tuple[tuple[str, str], ...]  # `info`'s columns: (header, key of the layer's spec)
    layers: Callable[[xr.Dataset], list[Any]]  # layer descriptors (index, name, ...) of the family's group
    summary: Callable[..., xr.Dataset]  # (ds, window, layers, th) -> per-layer window metrics (dims layer, ...)
    timeseries: Callable[..., xr.Dataset]  # (ds, rolling, layers, th) -> per-interval metrics (dims step, layer)
    head: Callable[[Any], dict[str, Any]]  # a layer's identifying report fields after layer, name, family
    shape: Callable[[dict[str, Any]], str]  # a report entry's shape, as the table prints it
    # (summary, chosen layers, window, traces) -> per chosen layer, the report fields after the metrics
    extras: Callable[[xr.Dataset, list[Any], Window, xr.Dataset | None], list[dict[str, Any]]]
    layer_word: str = "layer"  # how errors name one of its layers ("l1 layer 3")
    extra_columns: tuple[Metric, ...] = ()  # fields of `extras` the table shows too

    @property
    def columns(self) -> tuple[Metric, ...]:
        """The report table's metric columns: the metrics shown in tables, then the tree's mutual information."""
        return tuple(m for m in (*self.metrics, *self.extra_columns) if m.table)

    @property
    def keys(self) -> tuple[str, ...]:
        """The metric keys, in report order."""
        return tuple(m.key for m in self.metrics)

    def chosen(self, ds: xr.Dataset, layers: list[int] | None) -> list[Any]:
        """The layers picked by index (all when None); a clear error for an index this family lacks."""
        return pick_layers(self.layers(ds), layers, self.layer_word)

    def report_entries(self, ds: xr.Dataset, window: Window, layers: list[int] | None, traces: xr.Dataset | None = None,
                       th: Thresholds = DEFAULT) -> tuple[xr.Dataset, list[dict[str, Any]]]:  # fmt: skip
        """The window summary and one report entry per chosen layer (JSON-ready: floats or None)."""
        summary = self.summary(ds, window, layers, th)
        chosen = self.chosen(ds, layers)
        bad = nonfinite_totals(ds, window)
        entries = []
        for row, (info, extra) in enumerate(zip(chosen, self.extras(summary, chosen, window, traces))):
            entry: dict[str, Any] = {"layer": info.index, "name": info.name, "family": self.name, **self.head(info)}
            entry.update({key: number(summary[key].values[row]) for key in self.keys})
            entry.update(extra)
            entry["nonfinite_tokens"] = None if bad is None else bad[info.index]
            entries.append(entry)
        return summary, entries


def nonfinite_totals(ds: xr.Dataset, window: Window) -> list[int] | None:
    """Per layer, tokens with NaN/inf activations over the window (tree: max over trees); None for older files."""
    if "nonfinite_tokens" not in ds:
        return None
    totals = np.asarray(select_window(ds, window)["nonfinite_tokens"].sum("step").values)
    return [int(v.max(initial=0)) for v in totals.reshape(totals.shape[0], -1)]


def number(value: Any) -> float | None:
    """A metric value for JSON: a float at full precision, None for NaN."""
    value = float(value)
    return None if np.isnan(value) else value


TREE_METRIC_NAMES = (
    Metric("routing_entropy", "route\nH", "routing entropy (mean bits per decision over live nodes, unweighted)"),
    Metric("balance", "bal-\nance", "balance (visit-weighted over live nodes; 1 = every split 50/50)"),
    Metric("leaf_entropy_norm", "leaf\nH/d", "leaf entropy / depth (1 = uniform over the leaves)"),
    Metric("effective_leaves", "eff.\nleaves", "effective leaves (2^leaf entropy)", table=False),
    Metric("dead_fraction", "dead", "dead fraction (decision nodes provably under δ of their balanced share)"),
    Metric("undetermined_fraction", "un-\ndet.", "undetermined fraction (decision nodes neither provably dead nor live)"),
    Metric("frozen_fraction", "frozen", "frozen fraction (live nodes whose minority child provably gets under ε)"),
    Metric("right_starved_share", "right\nstarved", "right-starved share (frozen nodes starving their right child)"),
    Metric("static_fraction", "static", "static fraction (dead units / all units: auto-pruning)"),
    Metric("zero_visit_fraction", "zero\nvisits", "zero-visit fraction (decision nodes no token reached; v1's dead)",
           table=False),
    Metric("pruned_roots", "pruned\nroots", "pruned roots per tree (dead units whose parent is live)"),
    Metric("cascade_dead", "casc-\nade", "cascade dead per tree (dead units below a pruned root)", table=False),
    Metric("active_fraction", "active", "active fraction (units a token uses / units)", table=False),
    Metric("firing_fraction", "firing", "firing fraction (used units with a non-zero output)"),
    Metric("leaf_gini", "leaf\nGini", "Gini coefficient of the leaf visits", table=False),
)
L1_METRIC_NAMES = (
    Metric("active_mean", "active\nmean", "mean active units per token"),
    Metric("active_p50", "active\np50", "median active units per token (histogram bin)"),
    Metric("active_p99", "active\np99", "99th percentile of active units per token (histogram bin)"),
    Metric("active_max", "active\nmax", "most active units of any token (histogram bin)"),
    Metric("active_fraction", "active\nfrac.", "active fraction (mean active units / units)"),
    Metric("dead_units", "dead\nunits", "dead units (provably firing under δ of the layer's mean rate)"),
    Metric("dead_fraction", "dead\nfrac.", "dead fraction (dead units / units)"),
    Metric("undetermined_units", "un-\ndet.", "undetermined units (neither provably dead nor live)"),
    Metric("zero_fire_units", "zero\nfires", "units no token fired (v1's dead count)", table=False),
)
MOE_METRIC_NAMES = (
    Metric("load_cv", "load\nCV", "load coefficient of variation (selections before drops)"),
    Metric("max_mean_load", "max/\nmean", "max / mean expert load (before drops)"),
    Metric("dead_experts", "dead\nexperts", "dead experts (provably selected under δ of their balanced share k/E)"),
    Metric("undetermined_experts", "un-\ndet.", "undetermined experts (neither provably dead nor live)"),
    Metric("zero_selection_experts", "zero\nselect.", "experts no token selected (v1's dead count)", table=False),
    Metric("router_entropy", "router\nH bits", "router entropy per token (bits)"),
    Metric("router_entropy_norm", "router\nH/log E", "router entropy / log2(experts)"),
    Metric("drop_fraction", "drop\nfrac.", "drop fraction (dropped / k·tokens)"),
    Metric("active_fraction", "active\nfrac.", "active fraction (processed selections per token / experts)"),
)


MI_REPORT_KEYS = ("mi_bits", "mi_null_bits", "mi_excess_bits", "mi_excess_low", "mi_excess_high", "mi_p_value")


def tree_extras(summary: xr.Dataset, chosen: list[Any], window: Window, traces: xr.Dataset | None) -> list[dict[str, Any]]:
    """The tree report's extra fields: token↔leaf mutual information beside its shuffled-pairs null, from the
    sampled traces of the summary's intervals (None without traces); `mutual_information` is v1's name of mi_bits."""
    if traces is None or "leaf" not in traces:
        return [{"mutual_information": None, **dict.fromkeys(MI_REPORT_KEYS)} for _ in chosen]
    from routescope.analysis.mutual_info import mutual_information_table

    steps = (int(summary.attrs["window_first_step"]), int(summary.attrs["window_last_step"]) + 1)
    mi = mutual_information_table(traces, steps)
    out = []
    for info in chosen:
        entry = {key: number(mi[key].values[info.index]) for key in MI_REPORT_KEYS}
        out.append({"mutual_information": entry["mi_bits"], **entry})
    return out


def vector_extras(vector: str) -> Callable[..., list[dict[str, Any]]]:
    """An l1/moe report's extra field: its per-unit vector (unit_firing_rate, tokens_per_expert) per layer."""

    def extras(summary: xr.Dataset, chosen: list[Any], window: Window, traces: xr.Dataset | None) -> list[dict[str, Any]]:
        return [{vector: [number(v) for v in summary[vector].values[row, : info.width]]} for row, info in enumerate(chosen)]

    return extras


MUTUAL_INFORMATION = Metric("mi_excess_bits", "MI\nexcess",
                            "token↔leaf mutual information above its shuffled-pairs null (bits, sampled tokens)")

TREE = FamilyAnalysis(
    name="tree",
    metrics=TREE_METRIC_NAMES,
    shape_header="d×T",
    info_columns=(("variant", "variant"), ("depth", "depth"), ("trees", "trees"), ("units/tree", "units_per_tree"),
                  ("activation", "activation"), ("placement", "placement")),  # fmt: skip
    layers=tree.layer_infos,
    summary=lambda ds, window=LAST_QUARTER, layers=None, th=DEFAULT: tree.summarize(ds, window, layers, th),
    timeseries=lambda ds, rolling=PERSISTENCE, layers=None, th=DEFAULT: tree.timeseries(ds, rolling, layers, th),
    head=lambda info: {"depth": info.depth, "trees": info.trees, "variant": info.variant},
    shape=lambda entry: f"{entry['depth']}×{entry['trees']}",
    extras=tree_extras,
    extra_columns=(MUTUAL_INFORMATION,),
)
L1 = FamilyAnalysis(
    name="l1",
    metrics=L1_METRIC_NAMES,
    shape_header="units",
    info_columns=(("d_in", "d_in"), ("units", "d_hidden"), ("d_out", "d_out"), ("l1_coef", "l1_coef"), ("gated", "gated"),
                  ("bias", "bias")),  # fmt: skip
    layers=lambda ds: families.family_layers(ds, "l1"),
    summary=lambda ds, window=LAST_QUARTER, layers=None, th=DEFAULT: families.summarize_family(ds, "l1", window, layers, th),
    timeseries=lambda ds, rolling=PERSISTENCE, layers=None, th=DEFAULT: families.family_timeseries(ds, "l1", rolling, layers,
                                                                                                th),
    head=lambda info: {"depth": None, "trees": None, "units": info.width},
    shape=lambda entry: str(entry["units"]),
    extras=vector_extras("unit_firing_rate"),
    layer_word="l1 layer",
)
MOE = FamilyAnalysis(
    name="moe",
    metrics=MOE_METRIC_NAMES,
    shape_header="k/E",
    info_columns=(("experts", "experts"), ("k", "k"), ("width", "expert_width"), ("capacity", "capacity_factor"),
                  ("activation", "activation"), ("balance", "balance_coef")),  # fmt: skip
    layers=lambda ds: families.family_layers(ds, "moe"),
    summary=lambda ds, window=LAST_QUARTER, layers=None, th=DEFAULT: families.summarize_family(ds, "moe", window, layers, th),
    timeseries=lambda ds, rolling=PERSISTENCE, layers=None, th=DEFAULT: families.family_timeseries(ds, "moe", rolling, layers,
                                                                                                th),
    head=lambda info: {"depth": None, "trees": None, "experts": info.width, "k": info.k},
    shape=lambda entry: f"{entry['k']}/{entry['experts']}",
    extras=vector_extras("tokens_per_expert"),
    layer_word="moe layer",
)
FAMILY_ANALYSES: dict[str, FamilyAnalysis] = {f.name: f for f in (TREE, L1, MOE)}  # file order of the groups


def legend(families_shown: list[str]) -> list[tuple[str, str]]:
    """(label, full name) of every column the report's tables show for these families, once each."""
    seen: dict[str, str] = {}
    for name in families_shown:
        fam = FAMILY_ANALYSES[name]
        for metric in fam.columns:
            seen.setdefault(metric.short, metric.name)
    return list(seen.items())

