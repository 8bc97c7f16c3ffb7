"""The dashboard's MoE tab: expert loads and the co-selection matrix at the slider's step, the load as an
expert × step heatmap and the family's metrics over training, and "compare runs". Numbers from
dashboards.sources (computed with routescope.analysis), figures from dashboards.figures_families."""

from __future__ import annotations

from typing import Any

import numpy as np
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


class MoEViews(GroupViews):
    """Callback bodies of the MoE tab (mixed into app.Dashboard)."""

    def moe_at_step(self, run: int | None, layer: int | None, step_index: int | None) -> tuple[go.Figure, go.Figure]:
        """Expert-load bars (uniform level marked) and the co-selection matrix of one MoE layer at the slider's interval."""
        pick = self._pick_row("moe", run, layer, step_index)
        if isinstance(pick, str):
            return self._empty(pick), self._empty(pick)
        src, index, label, row = pick
        data = src.moe_interval(index, row)
        bars = FF.expert_load_bars(data["processed"], data["selected"], data["step"], label,
                                   float(data["load_cv"]), float(data["max_mean_load"]), src.record_every)  # fmt: skip
        return bars, FF.coselect_heatmap(data["coselect"], data["tokens"], data["step"], label)

    def moe_over_training(self, run: int | None, layer: int | None) -> tuple[go.Figure, go.Figure]:
        """Expert load as an (expert × step) heatmap, and load CV, max/mean, dead experts, router entropy
        and drop fraction of one MoE layer over rolling K-interval windows."""
        pick = self._family_pick("moe", run, layer)
        if isinstance(pick, str):
            return self._empty(pick), self._empty(pick)
        src, index, label = pick
        steps = src.families["moe"]["step"].values
        curves = {name: values[:, index] for name, values in src.family_curves("moe").items()}
        heatmap = FF.expert_load_heatmap(steps, src.expert_share(index), label, src.record_every)
        title = f"MoE metrics over rolling windows of {src.th.persistence} intervals, {label}"
        return heatmap, FF.family_curves(steps, curves, FF.MOE_PANELS, title)


    def moe_balance(self, run: int | None) -> go.Figure:
        """The run's balance-loss audit over training (analysis.balance_audit): implied vs reported loss."""
        from routescope.analysis.balance_audit import balance_audit, balance_series

        src = self.source(run)
        moe = src.families.get("moe")
        if moe is None or src.run is None:
            return self._empty("this run has no MoE layers")
        _, expected, reported, _ = balance_series(moe, src.run)
        steps = moe["step"].values
        return FF.balance_figure(steps, expected, reported, balance_audit(moe, src.run), src.label)


def _tabs(board: Any, row: dict[str, str]) -> list[dcc.Tab]:
    sources: list[RunSource] = board.sources
    views = [side_by_side((graph("moe-bars-graph", 420), "1.3"), (graph("moe-coselect-graph", 420), "1")),
             graph("moe-heatmap-graph", 360), graph("moe-curves-graph", 760), graph("moe-balance-graph", 320)]  # fmt: skip
    return [group_tab("moe", MOE_VIEW.label, "load_cv", sources, row, views)]


def _register(app: Dash, board: MoEViews) -> list[str]:
    @app.callback(Output("moe-bars-graph", "figure"), Output("moe-coselect-graph", "figure"), Input("version", "data"),
                  Input("run", "value"), Input("moe-layer", "value"), Input("step", "value"))  # fmt: skip
    def _moe_at_step(_v: int, run: int, layer: int, step: int) -> tuple[go.Figure, go.Figure]:
        return board.moe_at_step(run, layer, step)

    @app.callback(Output("moe-heatmap-graph", "figure"), Output("moe-curves-graph", "figure"), Input("version", "data"),
                  Input("run", "value"), Input("moe-layer", "value"))  # fmt: skip
    def _moe_curves(_v: int, run: int, layer: int) -> tuple[go.Figure, go.Figure]:
        return board.moe_over_training(run, layer)

    @app.callback(Output("moe-balance-graph", "figure"), Input("version", "data"), Input("run", "value"))
    def _moe_balance(_v: int, run: int) -> go.Figure:
        return board.moe_balance(run)

    return ["moe-bars-graph", "moe-coselect-graph", "moe-heatmap-graph", "moe-curves-graph", "moe-balance-graph",
            *register_compare(app, board, "moe")]  # fmt: skip


MOE_VIEW = FamilyView(family="moe", label="MoE experts", shown=has_family("moe"), tabs=_tabs, register=_register)
