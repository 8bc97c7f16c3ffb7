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

from routescope.dashboards import figures as F
from routescope.dashboards.family_views import FAMILY_TABS, FamilyViews, families_present, family_tabs, register_family_callbacks
from routescope.dashboards.server_safety import guard
from routescope.dashboards.sources import RunSource, seed_groups, unique_labels

TABS = ("paths", "tree", "curves", "drift", "tokens", "compare")  # the tree tabs; L1 / MoE: family_views.FAMILY_TABS
METRIC_LABELS = {
    "static_fraction": "static fraction (auto-pruning)",
    "dead_fraction": "dead fraction",
    "frozen_fraction": "frozen fraction",
    "routing_entropy": "routing entropy",
    "balance": "balance",
    "effective_leaves": "effective leaves",
    "active_fraction": "active fraction per token",
    "firing_fraction": "firing fraction",
    "leaf_gini": "leaf Gini",
    "leaf_entropy_norm": "leaf entropy (normalised)",
}
STATE_COLORS = {"running": "#2ca02c", "finished": "#555", "interrupted": "#ff7f0e", "failed": "#d62728"}


class Dashboard(FamilyViews):
    """The state behind the app: the run sources and the callback bodies, as plain methods (testable);
    the L1 / MoE views come from FamilyViews."""

    def __init__(self, paths: list[str | Path]) -> None:
        if not paths:
            raise ValueError("give at least one run file")
        resolved = [Path(p) for p in paths]
        self.sources = [RunSource(p, label) for p, label in zip(resolved, unique_labels(resolved))]

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
    def _step_index(src: RunSource, step_index: int | None) -> int:
        n = src.n_steps
        return n - 1 if step_index is None or step_index < 0 or step_index >= n else int(step_index)

    @staticmethod
    def _empty(message: str) -> go.Figure:
        fig = go.Figure()
        fig.add_annotation(text=message, showarrow=False, font=dict(size=16), xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_layout(template=F.TEMPLATE, xaxis_visible=False, yaxis_visible=False)
        return fig

    @staticmethod
    def _no_tree(src: RunSource) -> str:
        """Why a tree view of this run is empty: it has other families only, or nothing yet."""
        if src.tree is None and src.families:
            return f"run {src.label} has no tree layers (see the {' and '.join(FAMILY_TABS[f] for f in src.families)} tab)"
        return "no routed layers recorded yet"

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

    # ---- views ----
    @staticmethod
    def advance(value: int | None, top: int | None, frames: int = 60) -> int:
        """The animation's next slider position: about `frames` steps over the run, then from the start."""
        top = int(top or 0)
        value = int(value or 0)
        return 0 if value >= top else min(top, value + max(1, (top + 1) // frames))

    def paths(self, run: int | None, layer: int | None, step_index: int | None, log: bool) -> go.Figure:
        src = self.source(run)
        if src.tree is None or src.n_steps == 0:
            return self._empty(self._no_tree(src))
        layer = int(layer or 0)
        i = self._step_index(src, step_index)
        counts = src.interval(i, layer, ("leaf_visits",))["leaf_visits"]
        return F.path_usage(counts, int(src.steps[i]), layer, log)

    def tree(self, run: int | None, layer: int | None, tree: int | None, step_index: int | None, color_by: str) -> go.Figure:
        src = self.source(run)
        if src.tree is None or src.n_steps == 0:
            return self._empty(self._no_tree(src))
        layer, tree = int(layer or 0), int(tree or 0)
        i = self._step_index(src, step_index)
        data = src.interval(i, layer, ("node_visits", "node_right", "node_act_sum", "leaf_visits"))
        return F.tree_icicle(
            data["node_visits"][tree], data["node_right"][tree], data["node_act_sum"][tree], data["leaf_visits"][tree],
            color_by=color_by or "visits", title=f"Layer {layer}, tree {tree}, step {int(src.steps[i])}: {F.NODE_COLORINGS[color_by or 'visits']}",
        )  # fmt: skip

    def curves(self, run: int | None, metric: str, layers: list[int] | None) -> tuple[go.Figure, go.Figure]:
        src = self.source(run)
        curves = src.curves()
        if metric not in curves or src.n_steps == 0:
            empty = self._empty(self._no_tree(src))
            return empty, empty
        values = curves[metric]
        chosen = [int(x) for x in (layers or range(values.shape[1]))]
        return F.metric_heatmap(src.steps, values, METRIC_LABELS.get(metric, metric)), F.metric_lines(
            src.steps, values, METRIC_LABELS.get(metric, metric), chosen, src.loss()
        )

    def drift(self, run: int | None, layer: int | None, tree: int | None, nodes: list[int] | None) -> go.Figure:
        src = self.source(run)
        if src.tree is None or src.n_steps == 0:
            return self._empty(self._no_tree(src))
        layer, tree = int(layer or 0), int(tree or 0)
        mu = src.mu(layer, tree)
        chosen = [int(n) for n in (nodes or [0]) if int(n) < mu.shape[1]]
        return F.drift_figure(src.steps, mu, chosen, layer, tree, src.events(), src.warnings())

    def tokens(self, run: int | None, layer: int | None, tree: int | None, leaf: int | None, text: str | None) -> tuple[list, go.Figure]:
        """Contexts routed to one leaf, and the paths of sampled tokens whose context contains `text`."""
        src = self.source(run)
        tr = src.traces
        if tr is None or tr.sizes.get("sample", 0) == 0:
            return [html.Li("no sampled traces in this run")], self._empty("no sampled traces")
        layer, tree, leaf = int(layer or 0), int(tree or 0), int(leaf or 0)
        leaves = tr["leaf"][:, :, tree].values  # (sample, layer)
        contexts = tr["context_ids"].values
        routed = np.flatnonzero(leaves[:, layer] == leaf)
        items = [
            html.Li([html.Code(F.decode_context(contexts[s][:-1])), html.B(F.decode_context(contexts[s][-1:]))])
            for s in routed[-40:]
        ] or [html.Li(f"no sampled token reached leaf {leaf} of layer {layer}, tree {tree}")]
        texts = [F.decode_context(c) for c in contexts]
        picked = [i for i, t in enumerate(texts) if text and text in t] if text else list(range(len(texts)))[-200:]
        if not picked:
            return items, self._empty(f"no sampled context contains {text!r}")
        return items, F.token_paths(leaves[picked], [texts[i] for i in picked], tree)

    def compare(self, metric: str, layer: int | None) -> go.Figure:
        layer = int(layer or 0)
        curves = {}
        for src in self.sources:
            values = src.curves().get(metric)
            if values is not None and layer < values.shape[1]:
                curves[src.label] = (src.steps, values[:, layer])
        if not curves:
            return self._empty("no run has this layer")
        return F.compare_figure(curves, f"{METRIC_LABELS.get(metric, metric)}, layer {layer}", seed_groups(self.sources))


def _graph(graph_id: str, height: int = 480) -> dcc.Graph:
    return dcc.Graph(id=graph_id, style={"height": f"{height}px"}, config={"displaylogo": False})


def create_app(paths: list[str | Path], interval_s: float = 2.0) -> Dash:
    """Build the Dash app over `paths` (validated here: a bad file raises RunFileError before serving)."""
    board = Dashboard(paths)
    threading.Thread(target=board.warm, name="routescope-dash-warm", daemon=True).start()
    assets = tempfile.mkdtemp(prefix="routescope-dash-assets-")  # empty: nothing of the disk is served
    app = Dash(__name__, assets_folder=assets, title="routescope", serve_locally=True, update_title=None)
    guard(app.server)  # traversal attempts and unknown files: a plain 404
    app.board = board  # type: ignore[attr-defined]
    first = board.sources[0]
    max_layers = max((len(s.layers) for s in board.sources), default=0)
    max_trees = max((info.trees for s in board.sources for info in s.layers), default=1)
    max_depth = max((info.depth for s in board.sources for info in s.layers), default=0)
    runs = [{"label": s.label, "value": i} for i, s in enumerate(board.sources)]
    layer_opts = [{"label": f"layer {i}", "value": i} for i in range(max_layers)]
    tree_opts = [{"label": f"tree {i}", "value": i} for i in range(max_trees)]
    metric_opts = [{"label": METRIC_LABELS[m], "value": m} for m in METRIC_LABELS]
    row = {"display": "flex", "gap": "12px", "alignItems": "center", "flexWrap": "wrap", "margin": "6px 0"}
    dd = {"width": "220px"}
    # Tabs appear for the families some run has; a run without routed layers keeps the tree tabs, which say so.
    has_tree = any(s.tree is not None for s in board.sources) or not families_present(board.sources)
    tree_only = {"display": "contents"} if has_tree else {"display": "none"}
    tree_tabs = [  # the tree family's tabs (also shown for a run without routed layers, to say so)
        dcc.Tab(label="Path usage", value="paths", children=[
            html.Div([dcc.Checklist([{"label": "log scale", "value": "log"}, {"label": "animate over training", "value": "animate"}],
                                    [], id="paths-options", inline=True)], style=row),
            _graph("paths-graph")]),
        dcc.Tab(label="Tree", value="tree", children=[
            html.Div([html.Label("colour by"), dcc.Dropdown([{"label": v, "value": k} for k, v in F.NODE_COLORINGS.items()],
                                                             "visits", id="color-by", clearable=False, style={"width": "320px"}),
                      html.Span("click a node to follow its drift", style={"color": "#777"})], style=row),
            _graph("tree-graph", 560)]),
        dcc.Tab(label="Curves", value="curves", children=[
            html.Div([html.Label("metric"), dcc.Dropdown(metric_opts, "static_fraction", id="metric", clearable=False, style={"width": "320px"}),
                      html.Label("layers"), dcc.Dropdown(layer_opts, [o["value"] for o in layer_opts[:4]], id="curve-layers", multi=True, style={"width": "360px"})], style=row),
            _graph("heatmap-graph", 320), _graph("lines-graph", 420)]),
        dcc.Tab(label="Node drift", value="drift", children=[
            html.Div([html.Label("nodes"), dcc.Dropdown([{"label": f"node {n}", "value": n} for n in range(2**max_depth - 1)], [0],
                                                        id="drift-nodes", multi=True, style={"width": "520px"})], style=row),
            _graph("drift-graph")]),
        dcc.Tab(label="Tokens", value="tokens", children=[
            html.Div([html.Label("leaf"), dcc.Input(id="token-leaf", type="number", value=0, min=0, style={"width": "90px"}),
                      html.Label("contexts containing"), dcc.Input(id="token-text", type="text", value="", debounce=True, placeholder="e.g. the ")], style=row),
            html.Div([html.Div([html.H5("Sampled contexts routed to this leaf (bold: the token)"), html.Ul(id="token-contexts")],
                               style={"flex": "1", "maxHeight": "480px", "overflowY": "auto", "fontSize": "13px"}),
                      html.Div(_graph("token-paths"), style={"flex": "1.4"})], style={"display": "flex", "gap": "16px"})]),
        dcc.Tab(label="Compare runs", value="compare", children=[
            html.P("All runs given on the command line; runs that differ only in their seed are drawn as mean and min–max band."),
            _graph("compare-graph")]),
    ]  # fmt: skip
    tabs = (tree_tabs if has_tree else []) + family_tabs(board.sources, row)
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
                      html.Div(dcc.Slider(0, max(first.n_steps - 1, 0), 1, value=max(first.n_steps - 1, 0), id="step", updatemode="mouseup"),
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


    graphs = (_register_tree_callbacks(app, board) if has_tree else []) + register_family_callbacks(app, board)

    @app.callback(*[Output(g, "config") for g in graphs], Input("export", "value"))
    def _export(fmt: str) -> tuple[dict, ...]:
        config = {"displaylogo": False, "toImageButtonOptions": {"format": fmt, "scale": 2, "filename": "routescope"}}
        return tuple(config for _ in graphs)

    return app


def _register_tree_callbacks(app: Dash, board: Dashboard) -> list[str]:
    """Wire the tree tabs (path usage, tree, curves, drift, tokens, compare); returns their graph ids."""

    @app.callback(Output("paths-graph", "figure"), Input("version", "data"), Input("run", "value"), Input("layer", "value"),
                  Input("step", "value"), Input("paths-options", "value"))  # fmt: skip
    def _paths(_v: int, run: int, layer: int, step: int, options: list[str]) -> go.Figure:
        return board.paths(run, layer, step, "log" in (options or []))

    # Animation over training: an interval moves the step slider, so each frame is an ordinary,
    # lazily read view (60 pre-built Plotly frames of a long run took ~1.5 s to build and send).
    @app.callback(Output("animate", "disabled"), Input("paths-options", "value"))
    def _animate_on(options: list[str]) -> bool:
        return "animate" not in (options or [])

    @app.callback(Output("step", "value", allow_duplicate=True), Input("animate", "n_intervals"),
                  State("step", "value"), State("step", "max"), prevent_initial_call=True)  # fmt: skip
    def _animate(_n: int, value: int, top: int) -> int:
        return board.advance(value, top)

    @app.callback(Output("tree-graph", "figure"), Input("version", "data"), Input("run", "value"), Input("layer", "value"),
                  Input("tree", "value"), Input("step", "value"), Input("color-by", "value"))  # fmt: skip
    def _tree(_v: int, run: int, layer: int, tree: int, step: int, color_by: str) -> go.Figure:
        return board.tree(run, layer, tree, step, color_by)

    @app.callback(Output("heatmap-graph", "figure"), Output("lines-graph", "figure"), Input("version", "data"),
                  Input("run", "value"), Input("metric", "value"), Input("curve-layers", "value"))  # fmt: skip
    def _curves(_v: int, run: int, metric: str, layers: list[int]) -> tuple[go.Figure, go.Figure]:
        return board.curves(run, metric, layers)

    @app.callback(Output("drift-nodes", "value"), Input("tree-graph", "clickData"), State("drift-nodes", "value"), prevent_initial_call=True)
    def _click(click: dict | None, nodes: list[int] | None) -> Any:
        point = (click or {}).get("points", [{}])[0]
        node_id = str(point.get("id", ""))
        if not node_id.startswith("n"):
            return no_update
        node = int(node_id[1:])
        return sorted(set(nodes or []) | {node})

    @app.callback(Output("drift-graph", "figure"), Input("version", "data"), Input("run", "value"), Input("layer", "value"),
                  Input("tree", "value"), Input("drift-nodes", "value"))  # fmt: skip
    def _drift(_v: int, run: int, layer: int, tree: int, nodes: list[int]) -> go.Figure:
        return board.drift(run, layer, tree, nodes)

    @app.callback(Output("token-contexts", "children"), Output("token-paths", "figure"), Input("version", "data"),
                  Input("run", "value"), Input("layer", "value"), Input("tree", "value"), Input("token-leaf", "value"),
                  Input("token-text", "value"))  # fmt: skip
    def _tokens(_v: int, run: int, layer: int, tree: int, leaf: int, text: str) -> tuple[list, go.Figure]:
        return board.tokens(run, layer, tree, leaf, text)

    @app.callback(Output("compare-graph", "figure"), Input("version", "data"), Input("metric", "value"), Input("layer", "value"))
    def _compare(_v: int, metric: str, layer: int) -> go.Figure:
        return board.compare(metric, layer)

    return ["paths-graph", "tree-graph", "heatmap-graph", "lines-graph", "drift-graph", "token-paths", "compare-graph"]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (an IP literal in 127/8 or ::1, or "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve(paths: list[str | Path], host: str = "127.0.0.1", port: int = 8050, interval_s: float = 2.0) -> None:
    """Build the app and serve it (never in debug mode)."""
    app = create_app(paths, interval_s)
    app.run(host=host, port=port, debug=False)


__all__ = ["Dashboard", "create_app", "is_loopback", "serve"]
