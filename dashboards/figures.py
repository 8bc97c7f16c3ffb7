"""Figure builders of the dashboard: plain functions from numbers (numpy / xarray) to `go.Figure`.

Nothing here knows about Dash or files, so every view is testable without a browser and usable in a
notebook. Curves longer than `MAX_POINTS` are binned to the mean of consecutive intervals and the
figure says so in its title: nothing is subsampled silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# The tree view's figures live in figures_tree.py; they are part of this module's interface too.
from routescope.dashboards.figures_tree import (  # noqa: F401
    FROZEN_COLOR,
    NODE_COLORINGS,
    OUTLINE_WIDTH,
    TEMPLATE,
    UNIT_STATE_COLORS,
    state_legend,
    tree_icicle,
    unit_states,
)

MAX_POINTS = 2000  # curve points per trace before binning


def style_layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    """Paper-ready defaults: white template, labelled axes, compact margins."""
    fig.update_layout(template=TEMPLATE, title=title, margin=dict(l=60, r=20, t=60, b=50), legend_title_text="")
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return fig


def bin_curve(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean of `k` consecutive intervals (k ≥ 1 chosen to fit max_points) along axis 0; returns k too."""
    n = len(steps)
    k = max(1, -(-n // max_points))
    if k == 1:
        return steps, values, 1
    usable = (n // k) * k
    tail = values[usable:]
    with warnings.catch_warnings():  # all-NaN bins (e.g. a dead layer's curve) stay NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        binned = np.nanmean(values[:usable].reshape(n // k, k, *values.shape[1:]), axis=1)
        tail_mean = np.nanmean(tail, axis=0, keepdims=True) if len(tail) else None
    bsteps = steps[k - 1 : usable : k]
    if tail_mean is not None:  # the last partial bin keeps the newest intervals visible
        binned = np.concatenate([binned, tail_mean])
        bsteps = np.append(bsteps, steps[-1])
    return bsteps, binned, k


def binned_note(k: int) -> str:
    return f" (mean of {k} intervals per point)" if k > 1 else ""


# ---- 1. path usage ---------------------------------------------------------------------------------


def path_usage(counts: np.ndarray, step: int, layer: int, log: bool = False, tree: int | None = None) -> go.Figure:
    """Leaf-visit histogram of one layer at one interval: counts (trees, leaves); the uniform level dashed.
    `tree` picks one tree (drawn solid, the others faint); on a log axis empty leaves are left out."""
    counts = np.asarray(counts, dtype=float)
    trees, leaves = counts.shape
    fig = go.Figure()
    for t in range(trees):
        fig.add_bar(x=np.arange(leaves), y=counts[t], name=f"tree {t}", opacity=1.0 if tree in (None, t) else 0.25)
    uniform = counts.sum(axis=1).mean() / leaves if leaves else 0.0
    fig.update_layout(barmode="group", bargap=0.05)
    if log:
        # A log axis takes its range (and a line's position) in log10 units; a zero count has no log.
        positive = counts[counts > 0]
        top = float(positive.max()) if positive.size else 1.0
        fig.update_yaxes(type="log", range=[np.log10(0.8), np.log10(top * 2)])
    if uniform > 0:  # a line takes data units on a log axis, but its label log10 units (plotly.js #6880)
        fig.add_hline(y=uniform, line_dash="dash", line_color="black")
        fig.add_annotation(text="uniform", x=1, xref="paper", xanchor="right", yanchor="bottom", showarrow=False,
                           y=np.log10(uniform) if log else uniform, yref="y")  # fmt: skip
    which = "" if tree is None else f", tree {tree} highlighted"
    return style_layout(fig, f"Path usage: layer {layer}{which}, interval ending at step {step}", "leaf", "tokens")


def frame_indices(n: int, max_frames: int = 60) -> np.ndarray:
    """At most `max_frames` evenly spaced interval positions out of n, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(max_frames, n)).round().astype(int)) if n else np.zeros(0, dtype=int)


def path_usage_animation(steps: np.ndarray, counts: np.ndarray, layer: int, log: bool = False, max_frames: int = 60) -> go.Figure:
    """Leaf-visit histograms over training as an animation: counts (step, trees, leaves), one frame per
    shown interval (at most `max_frames`, evenly spaced, the last interval always included)."""
    counts = np.asarray(counts, dtype=float)
    picks = frame_indices(len(steps), max_frames)
    base = path_usage(counts[picks[-1]], int(steps[picks[-1]]), layer, log)
    frames = []
    for i in picks:
        data = [go.Bar(x=np.arange(counts.shape[2]), y=counts[i, t], name=f"tree {t}") for t in range(counts.shape[1])]
        frames.append(go.Frame(data=data, name=str(int(steps[i])), layout=go.Layout(title_text=f"Path usage: layer {layer}, step {int(steps[i])}")))
    base.frames = frames
    slider_steps = [
        dict(method="animate", label=str(int(steps[i])), args=[[str(int(steps[i]))], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
        for i in picks
    ]  # fmt: skip
    base.update_layout(
        updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.15, xanchor="left", buttons=[
            dict(label="play", method="animate", args=[None, dict(frame=dict(duration=150, redraw=True), fromcurrent=True)]),
            dict(label="pause", method="animate", args=[[None], dict(mode="immediate", frame=dict(duration=0))]),
        ])],
        sliders=[dict(active=len(picks) - 1, steps=slider_steps, x=0.12, len=0.88, y=-0.1, currentvalue=dict(prefix="step "))],
    )  # fmt: skip
    return base


# ---- 3. curves over training ----------------------------------------------------------------------


def metric_heatmap(steps: np.ndarray, values: np.ndarray, metric: str) -> go.Figure:
    """One metric as a (layer × step) heatmap: values (step, layer)."""
    bsteps, binned, k = bin_curve(np.asarray(steps), np.asarray(values, dtype=float))
    fig = go.Figure(go.Heatmap(x=bsteps, y=np.arange(binned.shape[1]), z=binned.T, colorscale="Viridis", colorbar=dict(title=dict(text=metric))))
    return style_layout(fig, f"{metric} per layer{binned_note(k)}", "step", "layer")


def metric_lines(
    steps: np.ndarray,
    values: np.ndarray,
    metric: str,
    layers: Sequence[int],
    loss: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> go.Figure:
    """Lines of one metric for chosen layers, with the run's loss curves in a second panel."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(metric, "loss"), horizontal_spacing=0.1)
    bsteps, binned, k = bin_curve(np.asarray(steps), np.asarray(values, dtype=float))
    for layer in layers:
        fig.add_scatter(x=bsteps, y=binned[:, layer], mode="lines", name=f"layer {layer}", row=1, col=1)
    for name, (lsteps, lvals) in (loss or {}).items():
        ok = np.isfinite(lvals)
        if ok.any():
            fig.add_scatter(x=lsteps[ok], y=lvals[ok], mode="lines+markers" if ok.sum() < 50 else "lines", name=name, row=1, col=2)
    style_layout(fig, f"{metric} over training{binned_note(k)}", "step", "")
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_yaxes(title_text="cross-entropy (nats)", row=1, col=2)
    return fig


# ---- 4. node drift ----------------------------------------------------------------------------------

EVENT_COLOR, PENDING_COLOR, WARNING_COLOR = "crimson", "#f1a3b0", "orange"
WARNING_NAMES = {"predictor": "early warning (predictor)", "trivial rule": "early warning (trivial rule)"}


def _event_text(row: Any) -> str:
    """Hover text of one pruning event: 'node 5: died (pruned_root, right), pending (...)'."""
    detail = [str(v) for v in (getattr(row, "role", None), getattr(row, "side", None)) if isinstance(v, str) and v]
    status = getattr(row, "status", "event")
    pending = ", pending (not yet persisted K windows)" if status == "pending" else ""
    return f"node {row.node}: {getattr(row, 'kind', 'event')}" + (f" ({', '.join(detail)})" if detail else "") + pending


def drift_figure(
    steps: np.ndarray,
    mu: np.ndarray,
    nodes: Sequence[int],
    layer: int,
    tree: int,
    events: pd.DataFrame | None = None,
    warnings: Any = None,
) -> go.Figure:
    """μ_n over training for chosen nodes: mu (step, node). Marks pruning events (analysis.pruning_events:
    columns step, layer, tree, node, kind, status) as ×, pending ones hollow and lighter; and early warnings
    (▲, on the `child` they expect to starve). `warnings` is a WarningReport (analysis.early_warnings): its
    flags are labelled by whose they are (`source`) and its `verdict` is in the title and the hover; a bare
    DataFrame of flags is drawn as "early warning"."""
    fig = go.Figure()
    bsteps, binned, k = bin_curve(np.asarray(steps), np.asarray(mu, dtype=float))
    for n in nodes:
        fig.add_scatter(x=bsteps, y=binned[:, n], mode="lines", name=f"node {n}")
    if warnings is None or isinstance(warnings, pd.DataFrame):  # bare flags (a DataFrame has `.flags` of its own)
        flags, source, verdict = warnings, None, None
    else:
        flags, source, verdict = warnings.flags, warnings.source, warnings.verdict
    marks: list[tuple[pd.DataFrame | None, str, str, str]] = []
    if events is not None and not events.empty:
        pending = events["status"] == "pending" if "status" in events else pd.Series(False, index=events.index)
        marks += [(events[~pending], "x", EVENT_COLOR, "died/froze"),
                  (events[pending], "x-open", PENDING_COLOR, "died/froze, pending")]  # fmt: skip
    marks.append((flags, "triangle-up", WARNING_COLOR, WARNING_NAMES.get(source or "", "early warning")))
    for frame, symbol, color, label in marks:
        if frame is None or frame.empty:
            continue
        # a warning is about the child expected to starve (never the root), an event about the node itself
        node = frame["child"] if "child" in frame else frame["node"]
        sel = frame[(frame["layer"] == layer) & (frame["tree"] == tree) & node.isin(list(nodes))]
        if sel.empty:
            continue
        sel = sel.assign(parent=sel["node"], node=node[sel.index])
        step_index = np.searchsorted(steps, sel["step"].to_numpy()).clip(0, len(steps) - 1)
        y = [mu[i, n] if np.isfinite(mu[i, n]) else 0.0 for i, n in zip(step_index, sel["node"])]
        if "child" in frame:
            text = [f"node {c}: {label}, from node {p}'s split" + (f"<br>{verdict}" if verdict else "") for c, p in zip(sel["node"], sel["parent"])]
        else:
            text = [_event_text(row) for row in sel.itertuples()]
        fig.add_scatter(x=sel["step"], y=y, mode="markers", name=label, text=text, hoverinfo="text+x",
                        marker=dict(symbol=symbol, size=11, color=color, line=dict(width=2, color=color)))  # fmt: skip
    fig.add_hline(y=0, line_color="gray", line_width=1)
    title = f"Node drift μ_n, layer {layer} tree {tree}{binned_note(k)}"
    if verdict:
        title += f"<br><sup>early warning: {verdict}</sup>"
    return style_layout(fig, title, "step", "μ_n (mean pre-activation)")


# ---- 5. tokens ----------------------------------------------------------------------------------------


def decode_context(ids: np.ndarray) -> str:
    """Byte ids (−1 = before the sequence start) to printable text; other tokenizers show ids."""
    ids = [int(i) for i in ids if i >= 0]
    if all(i < 256 for i in ids):
        return bytes(ids).decode("utf-8", errors="replace").replace("\n", "⏎")
    return " ".join(map(str, ids))


def token_paths(leaves: np.ndarray, labels: Sequence[str], tree: int = 0) -> go.Figure:
    """Paths of sampled tokens through the layers as parallel categories: leaves (tokens, layers)."""
    leaves = np.asarray(leaves)
    dims = [dict(label=f"layer {layer}", values=leaves[:, layer]) for layer in range(leaves.shape[1])]
    fig = go.Figure(go.Parcats(dimensions=dims, line=dict(color=leaves[:, 0], colorscale="Viridis"), hoveron="color"))
    fig.update_layout(template=TEMPLATE, title=f"Leaf per layer (tree {tree}) of {len(labels)} sampled tokens", margin=dict(l=40, r=40, t=60, b=30))
    return fig


# ---- 6. compare runs -------------------------------------------------------------------------------


def loss_figure(loss: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> go.Figure:
    """A run's losses over training: loss {"train": (steps, values), "val": ...}; NaN gaps (no measurement) skipped."""
    fig = go.Figure()
    for name, (steps, values) in loss.items():
        keep = np.isfinite(values)
        fig.add_scatter(x=np.asarray(steps)[keep], y=np.asarray(values)[keep], mode="lines+markers" if keep.sum() < 50 else "lines",
                        name=f"{name} loss")  # fmt: skip
    return style_layout(fig, title, "step", "loss (nats per token)")


def compare_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], metric: str, groups: Mapping[str, str] | None = None) -> go.Figure:
    """Several runs' curves on the same axes: curves {run label: (steps, values)}; runs mapped to the same
    group (e.g. seeds of one configuration) are drawn as the mean with a min–max band."""
    groups = groups or {label: label for label in curves}
    fig = go.Figure()
    members: dict[str, list[str]] = {}
    for label in curves:
        members.setdefault(groups.get(label, label), []).append(label)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    note = ""
    for i, (group, labels) in enumerate(members.items()):
        color = palette[i % len(palette)]
        if len(labels) == 1:
            steps, values = curves[labels[0]]
            bsteps, binned, k = bin_curve(steps, values)
            note = note or binned_note(k)
            fig.add_scatter(x=bsteps, y=binned, mode="lines", name=group, line=dict(color=color))
            continue
        n = min(len(curves[lab][0]) for lab in labels)  # common steps of the group
        steps = curves[labels[0]][0][:n]
        stack = np.stack([curves[lab][1][:n] for lab in labels])
        bsteps, binned, k = bin_curve(steps, stack.T)
        note = note or binned_note(k)
        lo, hi, mean = binned.min(axis=1), binned.max(axis=1), binned.mean(axis=1)
        fig.add_scatter(x=np.concatenate([bsteps, bsteps[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                        fillcolor=color, opacity=0.2, line=dict(width=0), name=f"{group} (min–max of {len(labels)})", hoverinfo="skip")  # fmt: skip
        fig.add_scatter(x=bsteps, y=mean, mode="lines", name=f"{group} (mean of {len(labels)})", line=dict(color=color))
    return style_layout(fig, f"{metric}: runs compared{note}", "step", metric)
