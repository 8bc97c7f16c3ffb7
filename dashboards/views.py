"""One interface per layer family for the dashboard: each family's tabs and callbacks as a `FamilyView`.

app.py loops over the views of the families some run has (tree_views.py, l1_views.py, moe_views.py);
their callback bodies are methods mixed into `app.Dashboard`. This module holds the interface and
what the L1 and MoE views share: picking a layer, the layer dropdown and the "compare runs" section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from routescope.analysis.family import FAMILY_ANALYSES
from routescope.dashboards import figures_families as FF
from routescope.dashboards.figures import compare_figure
from routescope.dashboards.labels import seed_groups
from routescope.dashboards.sources import RunSource


@dataclass(frozen=True)
class FamilyView:
    """A family's place in the dashboard: whether it shows, its tabs, and the callbacks that fill them."""

    family: str  # the family's group in the file
    label: str  # how the other tabs name it ("L1 units")
    shown: Callable[[list[RunSource]], bool]  # does some run given at start have it
    tabs: Callable[[Any, dict[str, str]], list[dcc.Tab]]  # (board, row style) -> its tabs
    register: Callable[[Dash, Any], list[str]]  # wire its callbacks; returns its graph ids (for the export format)


def has_family(family: str) -> Callable[[list[RunSource]], bool]:
    """`shown` for a family with its own group: some run has it."""
    return lambda sources: any(family in src.families for src in sources)


def graph(graph_id: str, height: int = 480) -> dcc.Graph:
    return dcc.Graph(id=graph_id, style={"height": f"{height}px"}, config={"displaylogo": False})


def side_by_side(*graphs: tuple[dcc.Graph, str]) -> html.Div:
    """Graphs in one row, each with its flex share."""
    return html.Div([html.Div(g, style={"flex": flex}) for g, flex in graphs], style={"display": "flex"})


class HostedViews:
    """What every family's views use of the host class (app.Dashboard): the runs, one by position, an
    empty figure that says why, and the tab label of a family."""

    sources: list[RunSource]

    def source(self, run: int | None) -> RunSource:  # provided by Dashboard
        raise NotImplementedError

    @staticmethod
    def _empty(message: str) -> go.Figure:  # provided by Dashboard
        raise NotImplementedError

    def tab_label(self, family: str) -> str:  # provided by Dashboard
        raise NotImplementedError


class GroupViews(HostedViews):
    """What the views of a family with its own group (l1, moe) share."""

    def _family_pick(self, family: str, run: int | None, layer: int | None) -> tuple[RunSource, int, str] | str:
        """The run, the layer index and its label; or the reason there is nothing to draw."""
        src = self.source(run)
        layers = src.family_layers(family)
        if not layers:
            return f"{src.label} has no {family} layers"
        index = int(layer or 0)
        if not 0 <= index < len(layers):
            return f"{src.label} has {family} layers 0..{len(layers) - 1} only"
        if src.families[family].sizes["step"] == 0:
            return f"no {family} interval recorded yet"
        return src, index, f"{family} layer {index} ({layers[index].name})"

    def _pick_row(self, family: str, run: int | None, layer: int | None,
                  step_index: int | None) -> tuple[RunSource, int, str, int] | str:  # fmt: skip
        """As `_family_pick`, plus the family group's row at the slider's step."""
        pick = self._family_pick(family, run, layer)
        if isinstance(pick, str):
            return pick
        src, index, label = pick
        row = src.family_row(family, step_index)
        return "no interval recorded yet" if row is None else (src, index, label, row)

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


def group_tab(family: str, label: str, compare_default: str, sources: list[RunSource], row: dict[str, str],
              views: list[Any]) -> dcc.Tab:  # fmt: skip
    """A family's tab: a layer picker, its `views`, then "compare runs" over one of its metrics."""
    widest = max((src.family_layers(family) for src in sources), key=len)  # named after the run with the most layers
    options = [{"label": f"{family} {info.index}: {info.name}", "value": info.index} for info in widest]
    picker = html.Div([html.Label(f"{family} layer"),
                       dcc.Dropdown(options, 0, id=f"{family}-layer", clearable=False, style={"width": "360px"})], style=row)  # fmt: skip
    metrics = [{"label": FF.CURVE_NAMES.get(m, m), "value": m} for m in FAMILY_ANALYSES[family].keys]
    compare = [html.H5("Compare runs (every run given at start; runs that differ only in their seed: mean and min–max band)"),
               html.Div([html.Label("metric"), dcc.Dropdown(metrics, compare_default, id=f"{family}-compare-metric",
                                                            clearable=False, style={"width": "320px"})], style=row),
               graph(f"{family}-compare-graph", 420)]  # fmt: skip
    return dcc.Tab(label=label, value=family, children=[picker, *views, *compare])


def register_compare(app: Dash, board: GroupViews, family: str) -> list[str]:
    """The "compare runs" callback of a family tab (live: it also listens to the file-version store)."""

    @app.callback(Output(f"{family}-compare-graph", "figure"), Input("version", "data"),
                  Input(f"{family}-compare-metric", "value"), Input(f"{family}-layer", "value"))  # fmt: skip
    def _compare(_v: int, metric: str, layer: int) -> go.Figure:
        return board.family_compare(family, metric, layer)

    return [f"{family}-compare-graph"]
