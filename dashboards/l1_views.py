"""The dashboard's L1 tab: the active-units histogram and per-unit firing rates at the slider's step,
the family's metrics over training, and "compare runs". Numbers from dashboards.sources (which
computes them with routescope.analysis), figures from dashboards.figures_families."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc

from routescope.dashboards import figures_families as FF
from routescope.dashboards.sources import RunSource
from routescope.dashboards.views import (
    FamilyView,
    GroupViews,
    graph,
    group_tab,
    has_family,
    register_compare,
    side_by_side,
)


class L1Views(GroupViews):
    """Callback bodies of the L1 tab (mixed into app.Dashboard)."""

    def l1_at_step(self, run: int | None, layer: int | None, step_index: int | None) -> tuple[go.Figure, go.Figure]:
        """Active-units histogram and sorted per-unit firing rates of one L1 layer at the slider's interval."""
        pick = self._pick_row("l1", run, layer, step_index)
        if isinstance(pick, str):
            return self._empty(pick), self._empty(pick)
        src, index, label, row = pick
        data = src.l1_interval(index, row)
        hist = FF.active_units_histogram(data["edges"], data["hist"], data["step"], label, float(data["active_mean"]))
        return hist, FF.unit_firing_rates(data["unit_firing_rate"], data["step"], label)

    def l1_over_training(self, run: int | None, layer: int | None) -> go.Figure:
        """Mean / p50 / p99 active units, dead units and active fraction of one L1 layer over rolling K-interval windows."""
        pick = self._family_pick("l1", run, layer)
        if isinstance(pick, str):
            return self._empty(pick)
        src, index, label = pick
        curves = {name: values[:, index] for name, values in src.family_curves("l1").items()}
        title = f"L1 metrics over rolling windows of {src.th.persistence} intervals, {label}"
        return FF.family_curves(src.families["l1"]["step"].values, curves, FF.L1_PANELS, title)


def _tabs(board: Any, row: dict[str, str]) -> list[dcc.Tab]:
    sources: list[RunSource] = board.sources
    views = [side_by_side((graph("l1-hist-graph", 420), "1"), (graph("l1-rates-graph", 420), "1")), graph("l1-curves-graph", 640)]
    return [group_tab("l1", L1_VIEW.label, "active_mean", sources, row, views)]


def _register(app: Dash, board: L1Views) -> list[str]:
    @app.callback(Output("l1-hist-graph", "figure"), Output("l1-rates-graph", "figure"), Input("version", "data"),
                  Input("run", "value"), Input("l1-layer", "value"), Input("step", "value"))  # fmt: skip
    def _l1_at_step(_v: int, run: int, layer: int, step: int) -> tuple[go.Figure, go.Figure]:
        return board.l1_at_step(run, layer, step)

    @app.callback(Output("l1-curves-graph", "figure"), Input("version", "data"), Input("run", "value"), Input("l1-layer", "value"))
    def _l1_curves(_v: int, run: int, layer: int) -> go.Figure:
        return board.l1_over_training(run, layer)

    return ["l1-hist-graph", "l1-rates-graph", "l1-curves-graph", *register_compare(app, board, "l1")]


L1_VIEW = FamilyView(family="l1", label="L1 units", shown=has_family("l1"), tabs=_tabs, register=_register)
