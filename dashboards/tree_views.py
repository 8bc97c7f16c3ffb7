"""The dashboard's tree tabs: path usage, the tree itself, metric curves, node drift, sampled tokens and
"compare runs". Numbers from dashboards.sources (computed with routescope.analysis), figures from
dashboards.figures; the callback bodies are methods mixed into app.Dashboard."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html, no_update

from routescope.analysis.report import window_phrase
from routescope.analysis.window import LAST_QUARTER, in_window
from routescope.dashboards import figures as F
from routescope.dashboards.labels import seed_groups
from routescope.dashboards.sources import RunSource
from routescope.dashboards.views import FamilyView, HostedViews, graph

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
    "routing_stability": "routing stability (probe tokens routed as at the end)",
}
# Losses are one curve per run, dense baselines included: offered beside the metrics in Curves and Compare.
LOSS_LABELS = {"val_loss": "validation loss", "train_loss": "training loss"}
LOSSES = {"val_loss": "val", "train_loss": "train"}  # metric -> key of RunSource.loss()
LABELS = {**METRIC_LABELS, **LOSS_LABELS}
DRIFT_NODES = [1, 2]  # the drift view opens on the root's children: the first nodes that can die (the root cannot)
# The tree view sums its counts over a window: by default the last quarter of the run (as `report` and
# `info`), or the whole run, or the K rolling intervals up to the step slider (the windows events use).
WHOLE_RUN, AT_STEP = "all", "step"
TREE_NAMES = ("node_visits", "node_right", "node_act_sum", "leaf_visits")


class TreeViews(HostedViews):
    """Callback bodies of the tree tabs (mixed into app.Dashboard)."""

    @staticmethod
    def _step_index(src: RunSource, step_index: int | None) -> int:
        n = src.n_steps
        return n - 1 if step_index is None or step_index < 0 or step_index >= n else int(step_index)

    def _no_tree(self, src: RunSource) -> str:
        """Why a tree view of this run is empty: it has other families only, or nothing yet."""
        if src.tree is None and src.families:
            return f"{src.label} has no tree layers (see the {' and '.join(self.tab_label(f) for f in src.families)} tab)"
        return "no routed layers recorded yet"

    # ---- views ----
    def paths(self, run: int | None, layer: int | None, step_index: int | None, log: bool,
              tree: int | None = None) -> go.Figure:  # fmt: skip
        """Leaf visits of every tree of a layer at the slider's interval; `tree` (the tree dropdown) highlighted."""
        src = self.source(run)
        if src.tree is None or src.n_steps == 0:
            return self._empty(self._no_tree(src))
        layer = int(layer or 0)
        i = self._step_index(src, step_index)
        counts = src.interval(i, layer, ("leaf_visits",))["leaf_visits"]
        return F.path_usage(counts, int(src.steps[i]), layer, log, tree=None if tree is None else int(tree))

    def tree_window(self, src: RunSource, window: str | None, step_index: int | None) -> tuple[int, int, str]:
        """Interval positions [start, stop) of the tree view's window and how titles say it: "steps 230–300
        (the last quarter: 8 of 30 intervals)". `window`: LAST_QUARTER (default), WHOLE_RUN or AT_STEP (the
        K = persistence intervals up to the slider's, fewer at the start)."""
        steps, n = src.steps, src.n_steps
        if window == AT_STEP:
            stop = self._step_index(src, step_index) + 1
            start = max(0, stop - src.th.persistence)
            how = f"the {stop - start} interval{'s' if stop - start != 1 else ''} up to the step slider"
            first, last = int(steps[start]), int(steps[stop - 1])
            return start, stop, f"{f'steps {first}–{last}' if first != last else f'step {last}'} ({how})"
        span = "all" if window == WHOLE_RUN else LAST_QUARTER
        start = 0 if span == "all" else int(np.argmax(in_window(steps, LAST_QUARTER)))
        phrase = window_phrase({"first_step": int(steps[start]), "last_step": int(steps[-1]), "intervals": n - start,
                                "run_intervals": n, "span": span})  # the report's words for the same window
        return start, n, phrase

    def tree(self, run: int | None, layer: int | None, tree: int | None, step_index: int | None, color_by: str | None,
             window: str | None = LAST_QUARTER) -> go.Figure:  # fmt: skip
        """One tree's counts summed over the window (tree_window), its units in their calibrated states."""
        src = self.source(run)
        if src.tree is None or src.n_steps == 0:
            return self._empty(self._no_tree(src))
        layer, tree = int(layer or 0), int(tree or 0)
        color_by = color_by or next(iter(F.NODE_COLORINGS))
        start, stop, phrase = self.tree_window(src, window, step_index)
        data = src.window_sums(layer, start, stop, TREE_NAMES)
        return F.tree_icicle(
            data["node_visits"][tree], data["node_right"][tree], data["node_act_sum"][tree], data["leaf_visits"][tree],
            color_by=color_by, title=f"Layer {layer}, tree {tree}, {phrase}: {F.NODE_COLORINGS[color_by]}",
            tokens=float(data["tokens"]), th=src.th,
        )  # fmt: skip

    def curves(self, run: int | None, metric: str, layers: list[int] | None) -> tuple[go.Figure, go.Figure]:
        src = self.source(run)
        if metric in LOSSES:  # one curve per run, also for a dense baseline (no routed layers)
            loss = {k: v for k, v in src.loss().items() if k == LOSSES[metric]}
            if not loss:
                return self._empty(f"{src.label} records no {metric}"), self._empty(f"{src.label} records no {metric}")
            return (self._empty(f"{LABELS[metric]}: one curve per run, no layers (see below)"),
                    F.loss_figure(loss, f"{LABELS[metric]}, {src.label}"))  # fmt: skip
        curves = src.curves()
        if metric == "routing_stability" and metric not in curves and src.tree is not None:
            empty = self._empty(f"{src.label} has no probe group (record it with --probe-tokens, or Recorder(probe=...))")
            return empty, empty
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
        chosen = [int(n) for n in (nodes or DRIFT_NODES) if int(n) < mu.shape[1]]
        return F.drift_figure(src.steps, mu, chosen, layer, tree, src.events(), src.warnings())

    def tokens(self, run: int | None, layer: int | None, tree: int | None, leaf: int | None, text: str | None) -> tuple[list, go.Figure]:
        """Contexts routed to one leaf, and the paths of sampled tokens whose context contains `text`."""
        src = self.source(run)
        tr = src.traces
        if tr is None or tr.sizes.get("sample", 0) == 0:
            return [html.Li("no sampled traces in this run")], self._empty("no sampled traces")
        if "leaf" not in tr:  # an L1 / MoE run: its traces have no tree paths
            return [html.Li(f"{src.label} has no tree layers: token paths are drawn for tree layers")], self._empty(
                f"{src.label} has no tree layers")
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
        """One metric of one layer for every run on the same axes; a loss for every run, dense baselines too."""
        layer = int(layer or 0)
        curves = {}
        for src in self.sources:
            if metric in LOSSES:
                loss = src.loss().get(LOSSES[metric])
                if loss is not None:
                    curves[src.label] = loss
                continue
            values = src.curves().get(metric)
            if values is not None and layer < values.shape[1]:
                curves[src.label] = (src.steps, values[:, layer])
        if not curves:
            return self._empty("no run records this" if metric in LOSSES else "no run has this layer")
        where = "" if metric in LOSSES else f", layer {layer}"
        return F.compare_figure(curves, f"{LABELS.get(metric, metric)}{where}", seed_groups(self.sources))


def _shown(sources: list[RunSource]) -> bool:
    """The tree tabs show when some run has tree layers, and for runs without routed layers (to say so)."""
    return any(s.tree is not None for s in sources) or not any(s.families for s in sources)


def _tabs(board: Any, row: dict[str, str]) -> list[dcc.Tab]:
    sources: list[RunSource] = board.sources
    max_layers = max((len(s.layers) for s in sources), default=0)
    max_depth = max((info.depth for s in sources for info in s.layers), default=0)
    layer_opts = [{"label": f"layer {i}", "value": i} for i in range(max_layers)]
    metric_opts = [{"label": label, "value": m} for m, label in LABELS.items()]
    window_opts = [{"label": "last quarter", "value": LAST_QUARTER}, {"label": "whole run", "value": WHOLE_RUN},
                   {"label": f"{board.th.persistence} intervals up to the step slider", "value": AT_STEP}]  # fmt: skip
    return [
        dcc.Tab(label="Path usage", value="paths", children=[
            html.Div([dcc.Checklist([{"label": "log scale", "value": "log"}, {"label": "animate over training", "value": "animate"}],
                                    [], id="paths-options", inline=True)], style=row),
            graph("paths-graph")]),
        dcc.Tab(label="Tree", value="tree", children=[
            html.Div([html.Label("colour by"), dcc.Dropdown([{"label": v, "value": k} for k, v in F.NODE_COLORINGS.items()],
                                                             next(iter(F.NODE_COLORINGS)), id="color-by", clearable=False,
                                                             style={"width": "360px"}),
                      html.Label("window"), dcc.RadioItems(window_opts, LAST_QUARTER, id="tree-window", inline=True),
                      html.Span("click a node to follow its drift", style={"color": "#777"})], style=row),
            graph("tree-graph", 560)]),
        dcc.Tab(label="Curves", value="curves", children=[
            html.Div([html.Label("metric"), dcc.Dropdown(metric_opts, "static_fraction", id="metric", clearable=False, style={"width": "320px"}),
                      html.Label("layers"), dcc.Dropdown(layer_opts, [o["value"] for o in layer_opts[:4]], id="curve-layers", multi=True, style={"width": "360px"})], style=row),
            graph("heatmap-graph", 320), graph("lines-graph", 420)]),
        dcc.Tab(label="Node drift", value="drift", children=[
            html.Div([html.Label("nodes"), dcc.Dropdown([{"label": f"node {n}", "value": n} for n in range(2**max_depth - 1)], DRIFT_NODES,
                                                        id="drift-nodes", multi=True, style={"width": "520px"})], style=row),
            graph("drift-graph")]),
        dcc.Tab(label="Tokens", value="tokens", children=[
            html.Div([html.Label("leaf"), dcc.Input(id="token-leaf", type="number", value=0, min=0, style={"width": "90px"}),
                      html.Label("contexts containing"), dcc.Input(id="token-text", type="text", value="", debounce=True, placeholder="e.g. the ")], style=row),
            html.Div([html.Div([html.H5("Sampled contexts routed to this leaf (bold: the token)"), html.Ul(id="token-contexts")],
                               style={"flex": "1", "maxHeight": "480px", "overflowY": "auto", "fontSize": "13px"}),
                      html.Div(graph("token-paths"), style={"flex": "1.4"})], style={"display": "flex", "gap": "16px"})]),
        dcc.Tab(label="Compare runs", value="compare", children=[
            html.P("All runs given on the command line; runs that differ only in their seed are drawn as mean and min–max band."),
            graph("compare-graph")]),
    ]  # fmt: skip


def _register(app: Dash, board: TreeViews) -> list[str]:
    """Wire the tree tabs (path usage, tree, curves, drift, tokens, compare); returns their graph ids."""

    @app.callback(Output("paths-graph", "figure"), Input("version", "data"), Input("run", "value"), Input("layer", "value"),
                  Input("step", "value"), Input("paths-options", "value"), Input("tree", "value"))  # fmt: skip
    def _paths(_v: int, run: int, layer: int, step: int, options: list[str], tree: int) -> go.Figure:
        return board.paths(run, layer, step, "log" in (options or []), tree)

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
                  Input("tree", "value"), Input("step", "value"), Input("color-by", "value"), Input("tree-window", "value"))  # fmt: skip
    def _tree(_v: int, run: int, layer: int, tree: int, step: int, color_by: str, window: str) -> go.Figure:
        return board.tree(run, layer, tree, step, color_by, window)

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


TREE_VIEW = FamilyView(family="tree", label="tree", shown=_shown, tabs=_tabs, register=_register)
