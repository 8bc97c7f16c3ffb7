"""`routescope dash`: a Plotly Dash app over the run files named at start, live while they are written.

The app serves only those files: callbacks name a run by its position in that list, never by a
path, and the assets folder is an empty directory of our own. Every view is drawn by a function of
`dashboards.figures`; the callbacks here only pick the data (through `dashboards.sources`).
"""

from __future__ import annotations

import ipaddress
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from routescope.analysis.calibrated import DEFAULT, Thresholds
from routescope.dashboards import figures as F
from routescope.dashboards.l1_views import L1_VIEW, L1Views
from routescope.dashboards.labels import unique_labels
from routescope.dashboards.moe_views import MOE_VIEW, MoEViews
from routescope.dashboards.server_safety import guard
from routescope.dashboards.sources import RunSource
from routescope.dashboards.tree_views import METRIC_LABELS, TREE_VIEW, TreeViews

# Dash 3+ draws an input box beside a slider; ours holds interval positions, not steps, so none is shown.
NO_INPUT_BOX = {"allow_direct_input": False} if "allow_direct_input" in dcc.Slider()._prop_names else {}
VIEWS = (TREE_VIEW, L1_VIEW, MOE_VIEW)  # one per layer family, in file order (dashboards/views.py)
STATE_COLORS = {"running": "#2ca02c", "finished": "#555", "interrupted": "#ff7f0e", "failed": "#d62728"}


class Dashboard(TreeViews, L1Views, MoEViews):
    """The state behind the app: the run sources and the callback bodies, as plain methods (testable);
    each family's views come from its mixin (tree_views.py, l1_views.py, moe_views.py)."""

    def __init__(self, paths: list[str | Path], th: Thresholds = DEFAULT) -> None:
        if not paths:
            raise ValueError("give at least one run file")
        resolved = [Path(p) for p in paths]
        self.th = th  # the calibrated tests' thresholds: the tree view's states, events and warnings
        self.sources = [RunSource(p, label, th) for p, label in zip(resolved, unique_labels(resolved))]

    def warm(self) -> None:
        """Build the whole-run caches (metric curves, pruning events) ahead of the first callbacks."""
        for src in self.sources:
            try:
                src.curves()
                for family in src.families:
                    src.family_curves(family)
                src.events()
                src.warnings()
            except Exception:  # a damaged or vanishing file shows its error in the views instead
                pass

    # ---- helpers ----
    def source(self, run: int | None) -> RunSource:
        """The run at position `run` of the command line (never a path)."""
        index = int(run or 0)
        if not 0 <= index < len(self.sources):
            raise ValueError(f"no run number {index}")
        return self.sources[index]

    @staticmethod
    def _empty(message: str) -> go.Figure:
        fig = go.Figure()
        fig.add_annotation(text=message, showarrow=False, font=dict(size=16), xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_layout(template=F.TEMPLATE, xaxis_visible=False, yaxis_visible=False)
        return fig

    def tab_label(self, family: str) -> str:
        """How the tabs name a family ("L1 units")."""
        return next(view.label for view in VIEWS if view.family == family)

    # ---- live ----
    def tick(self) -> tuple[list[Any], bool]:
        """Re-open grown files; the status badges and whether anything new arrived."""
        changed = False
        for src in self.sources:
            try:
                changed |= src.refresh()
            except Exception:  # a file being replaced mid-read: keep the last good view
                pass
        badges = [
            html.Span(
                f"{src.label}: {'live' if src.state == 'running' else src.state} · {src.n_steps} intervals",
                className="badge", id=f"state-{i}",
                style={"background": STATE_COLORS.get(src.state, "#777"), "color": "white", "padding": "2px 8px",
                       "borderRadius": "8px", "marginRight": "8px", "fontSize": "13px"},
            )  # fmt: skip
            for i, src in enumerate(self.sources)
        ]
        return badges, changed

    def slider(self, run: int | None, current: int | None, previous_max: int | None, top: int | None = None) -> tuple[int, int, dict]:
        """Step slider over interval positions; follows the newest interval while it sits at the end.
        `top` fixes the range (the one the component has) instead of the file's current length."""
        src = self.source(run)
        top = min(max(src.n_steps - 1, 0), top) if top is not None else max(src.n_steps - 1, 0)
        follow = current is None or previous_max is None or current >= previous_max
        value = top if follow else min(current, top)
        steps = src.steps
        ticks = np.unique(np.linspace(0, top, min(8, top + 1)).round().astype(int)) if src.n_steps else []
        marks = {int(i): str(int(steps[i])) for i in ticks}
        return top, value, marks

    @staticmethod
    def advance(value: int | None, top: int | None, frames: int = 60) -> int:
        """The animation's next slider position: about `frames` steps over the run, then from the start."""
        top = int(top or 0)
        value = int(value or 0)
        return 0 if value >= top else min(top, value + max(1, (top + 1) // frames))


def create_app(paths: list[str | Path], interval_s: float = 2.0, th: Thresholds = DEFAULT) -> Dash:
    """Build the Dash app over `paths` (validated here: a bad file raises RunFileError before serving);
    `th`: the calibrated tests' thresholds (analysis.Thresholds)."""
    board = Dashboard(paths, th)
    threading.Thread(target=board.warm, name="routescope-dash-warm", daemon=True).start()
    assets = tempfile.mkdtemp(prefix="routescope-dash-assets-")  # empty: nothing of the disk is served
    app = Dash(__name__, assets_folder=assets, title="routescope", serve_locally=True, update_title=None)
    guard(app.server)  # traversal attempts and unknown files: a plain 404
    app.board = board  # type: ignore[attr-defined]
    first = board.sources[0]
    top, _, marks = board.slider(0, None, None)  # positions of intervals, labelled by their steps from the start
    max_layers = max((len(s.layers) for s in board.sources), default=0)
    max_trees = max((info.trees for s in board.sources for info in s.layers), default=1)
    runs = [{"label": s.label, "value": i} for i, s in enumerate(board.sources)]
    layer_opts = [{"label": f"layer {i}", "value": i} for i in range(max_layers)]
    tree_opts = [{"label": f"tree {i}", "value": i} for i in range(max_trees)]
    row = {"display": "flex", "gap": "12px", "alignItems": "center", "flexWrap": "wrap", "margin": "6px 0"}
    dd = {"width": "220px"}
    # Each family some run has brings its tabs and callbacks (one FamilyView each, in file order).
    shown = [view for view in VIEWS if view.shown(board.sources)]
    tabs = [tab for view in shown for tab in view.tabs(board, row)]
    tree_only = {"display": "contents"} if TREE_VIEW in shown else {"display": "none"}
    app.layout = html.Div(
        [
            html.Div([html.H3("routescope", style={"margin": "0 16px 0 0"}), html.Div(id="status", children=board.tick()[0])], style=row),
            html.Div(
                [
                    html.Label("run"), dcc.Dropdown(runs, 0, id="run", clearable=False, style=dd),
                    html.Span([html.Label("layer"), dcc.Dropdown(layer_opts, 0, id="layer", clearable=False, style={"width": "120px"}),
                               html.Label("tree"), dcc.Dropdown(tree_opts, 0, id="tree", clearable=False, style={"width": "110px"})],
                              style=tree_only),
                    html.Label("export"), dcc.RadioItems(["png", "svg"], "png", id="export", inline=True),
                ],
                style=row,
            ),  # fmt: skip
            html.Div([html.Label("step", style={"marginRight": "8px"}),
                      html.Div(dcc.Slider(0, top, 1, value=top, marks=marks, id="step", updatemode="mouseup", **NO_INPUT_BOX),
                               style={"flex": "1"})], style=row),  # fmt: skip
            dcc.Tabs(id="tabs", value=tabs[0].value, children=tabs),
            dcc.Interval(id="tick", interval=int(interval_s * 1000)),
            dcc.Interval(id="animate", interval=350, disabled=True),
            dcc.Store(id="version", data=0),
            dcc.Store(id="slider-max", data=max(first.n_steps - 1, 0)),
        ],
        style={"fontFamily": "system-ui, sans-serif", "margin": "12px 20px"},
    )

    @app.callback(Output("status", "children"), Output("version", "data"), Input("tick", "n_intervals"), State("version", "data"))
    def _tick(_n: int | None, version: int) -> tuple[Any, Any]:
        badges, changed = board.tick()
        return badges, (version + 1 if changed else no_update)

    # The slider follows new intervals in two chained steps: first its range, then (once the new
    # range is applied) its value, so the component never clamps a new value to the old range.
    @app.callback(Output("step", "max"), Output("step", "marks"), Output("slider-max", "data", allow_duplicate=True),
                  Input("version", "data"), Input("run", "value"), State("slider-max", "data"),
                  prevent_initial_call=True)  # fmt: skip
    def _slider_range(_v: int, run: int, previous_max: int | None) -> tuple[Any, ...]:
        top, _, marks = board.slider(run, None, None)
        return top, marks, (None if ctx.triggered_id == "run" else previous_max)  # a new run starts at its end

    @app.callback(Output("step", "value"), Output("slider-max", "data"), Input("step", "max"),
                  State("step", "value"), State("slider-max", "data"), State("run", "value"), prevent_initial_call=True)  # fmt: skip
    def _slider_follow(top: int, current: int | None, previous_max: int | None, run: int) -> tuple[Any, ...]:
        # `top` is the range the component now has (the file may have grown since: the next tick says so)
        _, value, _ = board.slider(run, current, previous_max, top=top)
        return value, top

    graphs = [graph_id for view in shown for graph_id in view.register(app, board)]

    @app.callback(*[Output(g, "config") for g in graphs], Input("export", "value"))
    def _export(fmt: str) -> tuple[dict, ...]:
        config = {"displaylogo": False, "toImageButtonOptions": {"format": fmt, "scale": 2, "filename": "routescope"}}
        return tuple(config for _ in graphs)

    return app


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (an IP literal in 127/8 or ::1, or "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve(paths: list[str | Path], host: str = "127.0.0.1", port: int = 8050, interval_s: float = 2.0,
          th: Thresholds = DEFAULT) -> None:  # fmt: skip
    """Build the app and serve it (never in debug mode)."""
    app = create_app(paths, interval_s, th)
    app.run(host=host, port=port, debug=False)


__all__ = ["METRIC_LABELS", "VIEWS", "Dashboard", "create_app", "is_loopback", "serve"]
