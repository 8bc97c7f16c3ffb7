"""The dashboard's L1 and MoE tabs: callback bodies (`FamilyViews`, mixed into `app.Dashboard`), their
layout and their callbacks. A tab appears only when some run given at start has the family's group.

As for the tree views, the bodies only pick data through `dashboards.sources` (whose numbers come
from `routescope.analysis`) and hand it to `dashboards.figures_families`.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from routescope.dashboards import figures_families as FF
from routescope.dashboards.figures import compare_figure
from routescope.dashboards.sources import FAMILY_GROUPS, RunSource, seed_groups
from routescope.analysis.families import FAMILY_METRICS

COMPARE_DEFAULT = {"l1": "active_mean", "moe": "load_cv"}  # the metric a family's "compare runs" view opens on

FAMILY_TABS = {"l1": "L1 units", "moe": "MoE experts"}


class FamilyViews:
    """Views of the `l1` and `moe` groups; the host class provides `source(run)` and `_empty(message)`."""

    sources: list[RunSource]

    def source(self, run: int | None) -> RunSource:  # provided by Dashboard
        raise NotImplementedError

    @staticmethod
    def _empty(message: str) -> go.Figure:  # provided by Dashboard
        raise NotImplementedError

    def _family_pick(self, family: str, run: int | None, layer: int | None) -> tuple[RunSource, int, str] | str:
        """The run, the layer index and its label; or the reason there is nothing to draw."""
        src = self.source(run)
        layers = src.family_layers(family)
        if not layers:
            return f"run {src.label} has no {family} layers"
        index = int(layer or 0)
        if not 0 <= index < len(layers):
            return f"run {src.label} has {family} layers 0..{len(layers) - 1} only"
        if src.families[family].sizes["step"] == 0:
            return f"no {family} interval recorded yet"
        return src, index, f"{family} layer {index} ({layers[index].name})"

    def l1_at_step(self, run: int | None, layer: int | None, step_index: int | None) -> tuple[go.Figure, go.Figure]:
        """Active-units histogram and sorted per-unit firing rates of one L1 layer at the slider's interval."""
        pick = self._family_pick("l1", run, layer)
        if isinstance(pick, str):
            return self._empty(pick), self._empty(pick)
        src, index, label = pick
        row = src.family_row("l1", step_index)
        if row is None:
            return self._empty("no interval recorded yet"), self._empty("no interval recorded yet")
        data = src.l1_interval(index, row)
        hist = FF.active_units_histogram(data["edges"], data["hist"], data["step"], label, float(data["active_mean"]))
        return hist, FF.unit_firing_rates(data["unit_firing_rate"], data["step"], label)

    def l1_over_training(self, run: int | None, layer: int | None) -> go.Figure:
        """Mean / p50 / p99 active units, dead units and active fraction of one L1 layer per interval."""
        pick = self._family_pick("l1", run, layer)
        if isinstance(pick, str):
            return self._empty(pick)
        src, index, label = pick
        curves = {name: values[:, index] for name, values in src.family_curves("l1").items()}
        return FF.family_curves(src.families["l1"]["step"].values, curves, FF.L1_PANELS, f"L1 metrics per interval, {label}")

    def moe_at_step(self, run: int | None, layer: int | None, step_index: int | None) -> tuple[go.Figure, go.Figure]:
        """Expert-load bars (uniform level marked) and the co-selection matrix of one MoE layer at the slider's interval."""
        pick = self._family_pick("moe", run, layer)
        if isinstance(pick, str):
            return self._empty(pick), self._empty(pick)
        src, index, label = pick
        row = src.family_row("moe", step_index)
        if row is None:
            return self._empty("no interval recorded yet"), self._empty("no interval recorded yet")
        data = src.moe_interval(index, row)
        bars = FF.expert_load_bars(data["processed"], data["selected"], data["step"], label,
                                   float(data["load_cv"]), float(data["max_mean_load"]))  # fmt: skip
        return bars, FF.coselect_heatmap(data["coselect"], data["tokens"], data["step"], label)

    def moe_over_training(self, run: int | None, layer: int | None) -> tuple[go.Figure, go.Figure]:
        """Expert load as an (expert × step) heatmap, and load CV, max/mean, dead experts, router entropy
        and drop fraction of one MoE layer per interval."""
        pick = self._family_pick("moe", run, layer)
        if isinstance(pick, str):
            return self._empty(pick), self._empty(pick)
        src, index, label = pick
        steps = src.families["moe"]["step"].values
        curves = {name: values[:, index] for name, values in src.family_curves("moe").items()}
        heatmap = FF.expert_load_heatmap(steps, src.expert_share(index), label)
        return heatmap, FF.family_curves(steps, curves, FF.MOE_PANELS, f"MoE metrics per interval, {label}")


    def family_compare(self, family: str, metric: str, layer: int | None) -> go.Figure:
        """One metric of one l1/moe layer per interval for every run that has the layer, on the same axes;
        runs that differ only in their seed as mean and min–max band (as the tree's "Compare runs")."""
        index = int(layer or 0)
        curves = {}
        for src in self.sources:
            values = src.family_curves(family).get(metric)
            if values is None or index >= values.shape[1] or not len(values):
                continue
            steps = src.families[family]["step"].values
            n = min(len(steps), len(values))  # a live file may have grown between the two reads
            curves[src.label] = (steps[:n], values[:n, index])
        if not curves:
            return self._empty(f"no run has {family} layer {index} with a recorded interval")
        title = f"{FF.CURVE_NAMES.get(metric, metric)}, {family} layer {index}"
        return compare_figure(curves, title, seed_groups([src for src in self.sources if src.label in curves]))


def families_present(sources: list[RunSource]) -> list[str]:
    """The l1 / moe families that at least one run has, in file order."""
    return [name for name in FAMILY_GROUPS if any(name in src.families for src in sources)]


def _layer_options(sources: list[RunSource], family: str) -> list[dict[str, Any]]:
    """Layer choices of a family, named after the run with the most such layers."""
    widest = max((src.family_layers(family) for src in sources), key=len)
    return [{"label": f"{family} {info.index}: {info.name}", "value": info.index} for info in widest]


def _graph(graph_id: str, height: int) -> dcc.Graph:
    return dcc.Graph(id=graph_id, style={"height": f"{height}px"}, config={"displaylogo": False})


def family_tabs(sources: list[RunSource], row: dict[str, str]) -> list[dcc.Tab]:
    """One tab per family present: a layer picker, the views at the slider's step, the views over training."""
    tabs = []
    for family in families_present(sources):
        options = _layer_options(sources, family)
        picker = html.Div([html.Label(f"{family} layer"),
                           dcc.Dropdown(options, 0, id=f"{family}-layer", clearable=False, style={"width": "360px"})], style=row)  # fmt: skip
        if family == "l1":
            views = [html.Div([html.Div(_graph("l1-hist-graph", 420), style={"flex": "1"}),
                               html.Div(_graph("l1-rates-graph", 420), style={"flex": "1"})], style={"display": "flex"}),
                     _graph("l1-curves-graph", 640)]  # fmt: skip
        else:
            views = [html.Div([html.Div(_graph("moe-bars-graph", 420), style={"flex": "1.3"}),
                               html.Div(_graph("moe-coselect-graph", 420), style={"flex": "1"})], style={"display": "flex"}),
                     _graph("moe-heatmap-graph", 360), _graph("moe-curves-graph", 760)]  # fmt: skip
        metrics = [{"label": FF.CURVE_NAMES.get(m, m), "value": m} for m in FAMILY_METRICS[family]]
        views += [html.H5("Compare runs (every run given at start; runs that differ only in their seed: mean and "
                          "min–max band)"),
                  html.Div([html.Label("metric"), dcc.Dropdown(metrics, COMPARE_DEFAULT[family], id=f"{family}-compare-metric",
                                                               clearable=False, style={"width": "320px"})], style=row),
                  _graph(f"{family}-compare-graph", 420)]  # fmt: skip
        tabs.append(dcc.Tab(label=FAMILY_TABS[family], value=family, children=[picker, *views]))
    return tabs


def register_family_callbacks(app: Dash, board: FamilyViews) -> list[str]:
    """Wire the tabs `family_tabs` made (live: every view also listens to the file-version store);
    returns the ids of their graphs (for the export-format callback)."""
    present = families_present(board.sources)
    graphs: list[str] = []
    if "l1" in present:

        @app.callback(Output("l1-hist-graph", "figure"), Output("l1-rates-graph", "figure"), Input("version", "data"),
                      Input("run", "value"), Input("l1-layer", "value"), Input("step", "value"))  # fmt: skip
        def _l1_at_step(_v: int, run: int, layer: int, step: int) -> tuple[go.Figure, go.Figure]:
            return board.l1_at_step(run, layer, step)

        @app.callback(Output("l1-curves-graph", "figure"), Input("version", "data"), Input("run", "value"), Input("l1-layer", "value"))
        def _l1_curves(_v: int, run: int, layer: int) -> go.Figure:
            return board.l1_over_training(run, layer)

        graphs += ["l1-hist-graph", "l1-rates-graph", "l1-curves-graph"]
    if "moe" in present:

        @app.callback(Output("moe-bars-graph", "figure"), Output("moe-coselect-graph", "figure"), Input("version", "data"),
                      Input("run", "value"), Input("moe-layer", "value"), Input("step", "value"))  # fmt: skip
        def _moe_at_step(_v: int, run: int, layer: int, step: int) -> tuple[go.Figure, go.Figure]:
            return board.moe_at_step(run, layer, step)

        @app.callback(Output("moe-heatmap-graph", "figure"), Output("moe-curves-graph", "figure"), Input("version", "data"),
                      Input("run", "value"), Input("moe-layer", "value"))  # fmt: skip
        def _moe_curves(_v: int, run: int, layer: int) -> tuple[go.Figure, go.Figure]:
            return board.moe_over_training(run, layer)

        graphs += ["moe-bars-graph", "moe-coselect-graph", "moe-heatmap-graph", "moe-curves-graph"]
    for family in present:

        @app.callback(Output(f"{family}-compare-graph", "figure"), Input("version", "data"),
                      Input(f"{family}-compare-metric", "value"), Input(f"{family}-layer", "value"))  # fmt: skip
        def _compare(_v: int, metric: str, layer: int, family: str = family) -> go.Figure:
            return board.family_compare(family, metric, layer)

        graphs.append(f"{family}-compare-graph")
    return graphs


__all__ = ["FAMILY_TABS", "FamilyViews", "families_present", "family_tabs", "register_family_callbacks"]
