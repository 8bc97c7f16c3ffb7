"""Figure builders for the L1-sparse and MoE families: plain functions from numbers to `go.Figure`.

Like `figures`, nothing here reads files or computes metrics: the numbers come from
`dashboards.sources`, which gets them from `routescope.analysis`. Shares are of k·tokens (MoE) or of
tokens (L1), so the uniform level of an MoE layer is 1/E whatever its k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from routescope.dashboards.figures import TEMPLATE, bin_curve, binned_note, style_layout

# Curve panels over training: (panel title, metrics of routescope.analysis.families, y-axis label).
L1_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("active units per token", ("active_mean", "active_p50", "active_p99"), "units"),
    ("dead units", ("dead_units",), "units"),
    ("active fraction", ("active_fraction",), "share of d_hidden"),
)
MOE_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("load imbalance (before drops)", ("load_cv", "max_mean_load"), "ratio"),
    ("dead experts", ("dead_experts",), "experts"),
    ("router entropy", ("router_entropy",), "bits"),
    ("drop fraction", ("drop_fraction",), "share of k·tokens"),
)
CURVE_NAMES = {
    "active_mean": "mean", "active_p50": "p50", "active_p99": "p99", "dead_units": "dead units",
    "active_fraction": "active fraction", "load_cv": "load CV", "max_mean_load": "max/mean load",
    "dead_experts": "dead experts", "router_entropy": "router entropy", "drop_fraction": "drop fraction",
}  # fmt: skip
DEAD_COLOR = "crimson"


# ---- MoE ---------------------------------------------------------------------------------------------


def expert_load_heatmap(steps: np.ndarray, share: np.ndarray, layer: str, steps_per_interval: int = 1) -> go.Figure:
    """Tokens per expert as a share of k·tokens, (expert × step): share (step, expert); the colour
    scale is centred on the uniform level 1/E, so idle experts and overloaded ones stand apart. Each
    column sums an interval's `steps_per_interval` steps (the title says so)."""
    share = np.asarray(share, dtype=float)
    experts = share.shape[1]
    bsteps, binned, k = bin_curve(np.asarray(steps), share)
    fig = go.Figure(
        go.Heatmap(x=bsteps, y=np.arange(experts), z=binned.T, colorscale="RdBu_r", zmid=1 / experts, zmin=0,
                   colorbar=dict(title=dict(text="share of k·tokens")),
                   hovertemplate="step %{x}<br>expert %{y}<br>share %{z:.3f}<extra></extra>")
    )  # fmt: skip
    summed = f"<br><sup>each column sums {steps_per_interval} steps (one step's imbalance can be larger)</sup>" if steps_per_interval > 1 else ""
    style_layout(fig, f"Expert load, {layer} (uniform = 1/{experts} = {1 / experts:.3f}){binned_note(k)}{summed}", "step",
                 "expert")  # fmt: skip
    fig.update_yaxes(dtick=1 if experts <= 32 else None)
    return fig


def expert_load_bars(
    processed: np.ndarray,
    selected: np.ndarray,
    step: int,
    layer: str,
    load_cv: float,
    max_mean_load: float,
    steps: int = 1,
) -> go.Figure:
    """Load of each expert in one interval, as a share of k·tokens: bars what it processed (after
    capacity drops), diamonds what the router asked of it (before); the uniform level 1/E dashed,
    idle experts in red. `load_cv` and `max_mean_load` (routescope.analysis) go in the title, with the
    `steps` the interval sums (its record_every)."""
    processed, selected = np.asarray(processed, dtype=float), np.asarray(selected, dtype=float)
    experts = len(processed)
    colors = [DEAD_COLOR if s == 0 else "#1f77b4" for s in selected]
    fig = go.Figure()
    fig.add_bar(x=np.arange(experts), y=processed, name="processed (after drops)", marker_color=colors,
                hovertemplate="expert %{x}<br>processed %{y:.3f}<extra></extra>")  # fmt: skip
    fig.add_scatter(x=np.arange(experts), y=selected, mode="markers", name="selected (before drops)",
                    marker=dict(symbol="diamond", size=9, color="black"),
                    hovertemplate="expert %{x}<br>selected %{y:.3f}<extra></extra>")  # fmt: skip
    fig.add_hline(y=1 / experts, line_dash="dash", line_color="black", annotation_text=f"uniform 1/{experts}")
    dead = int((selected == 0).sum())
    span = f"the {steps} steps ending at step {step}, summed" if steps > 1 else f"step {step}"
    title = (f"Expert load, {layer}: load CV {load_cv:.3f}, max/mean {max_mean_load:.2f}" + (f", {dead} dead" if dead else "")
             + f"<br><sup>{span} (one step's imbalance can be larger)</sup>")  # fmt: skip
    style_layout(fig, title, "expert", "share of k·tokens")
    fig.update_xaxes(dtick=1 if experts <= 32 else None)
    return fig


def coselect_heatmap(coselect: np.ndarray, tokens: float, step: int, layer: str) -> go.Figure:
    """Tokens that chose both experts, as a share of tokens: coselect (E, E). The diagonal (tokens
    that chose e at all) is left blank, since it would drown the pairs; it shows on hover."""
    counts = np.asarray(coselect, dtype=float)
    experts = counts.shape[0]
    share = counts / tokens if tokens > 0 else np.full_like(counts, np.nan)
    z = share.copy()
    np.fill_diagonal(z, np.nan)
    text = [[f"experts {i} and {j}: {counts[i, j]:.0f} tokens ({share[i, j]:.3f})" if i != j
             else f"expert {i} chosen by {counts[i, i]:.0f} tokens ({share[i, i]:.3f})" for j in range(experts)]
            for i in range(experts)]  # fmt: skip
    fig = go.Figure(go.Heatmap(x=np.arange(experts), y=np.arange(experts), z=z, text=text, hoverinfo="text",
                               colorscale="Viridis", colorbar=dict(title=dict(text="share of tokens"))))  # fmt: skip
    style_layout(fig, f"Co-selection, {layer}, step {step}<br><sup>tokens that chose both (diagonal blank)</sup>", "expert",
                 "expert")  # fmt: skip
    fig.update_yaxes(autorange="reversed", dtick=1 if experts <= 32 else None, scaleanchor="x")
    fig.update_xaxes(dtick=1 if experts <= 32 else None)
    return fig


# ---- L1 ------------------------------------------------------------------------------------------------


def active_units_histogram(edges: np.ndarray, counts: np.ndarray, step: int, layer: str, mean: float | None = None) -> go.Figure:
    """Tokens by number of active units in one interval, over the file's fixed log-spaced bins
    (bin b = [edges[b], edges[b+1])), on a log x axis. Bin 0 holds exactly 0 active units; a log
    axis has no 0, so it is drawn from 0.5 to 1 and its tick says "0". The exact mean (metrics) is marked."""
    edges = np.asarray(edges, dtype=float)
    counts = np.asarray(counts, dtype=float)
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{len(counts)} bins need {len(counts) + 1} edges, got {len(edges)}")
    shown = edges.copy()
    shown[0] = 0.5 if edges[0] == 0 else edges[0]
    total = counts.sum()
    hover = [f"{lo:.0f}–{hi - 1:.0f} active units: {c:.0f} tokens" + (f" ({c / total:.1%})" if total else "")
             if hi - lo > 1 else f"{lo:.0f} active units: {c:.0f} tokens" + (f" ({c / total:.1%})" if total else "")
             for lo, hi, c in zip(edges[:-1], edges[1:], counts)]  # fmt: skip
    fig = go.Figure()
    # A step line over the edges: each bin spans exactly its edges, whatever its width.
    fig.add_scatter(x=shown, y=np.append(counts, counts[-1] if len(counts) else 0), mode="lines", line_shape="hv",
                    fill="tozeroy", name="tokens", text=hover + [""], hoverinfo="text",
                    customdata=np.stack([edges, np.append(edges[1:], np.nan)], axis=-1))  # fmt: skip
    if mean is not None and np.isfinite(mean) and mean > 0:  # a trace, not a shape: shape labels misplace on log axes
        fig.add_scatter(x=[mean, mean], y=[0, max(counts.max(initial=0), 1)], mode="lines", name=f"mean {mean:.1f}",
                        line=dict(dash="dash", color="black"), hoverinfo="name")  # fmt: skip
    ticks = [0.5] + [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384) if v <= edges[-1]]
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=["0"] + [str(v) for v in ticks[1:]])
    return style_layout(fig, f"Active units per token, {layer}, interval ending at step {step}", "active units per token (log)", "tokens")


def unit_firing_rates(rates: np.ndarray, step: int, layer: str) -> go.Figure:
    """Per-unit firing rate in one interval (share of tokens for which the unit was non-zero), sorted
    from the busiest unit down; units that never fired (dead) are drawn in red at the tail."""
    rates = np.asarray(rates, dtype=float)
    order = np.argsort(-np.nan_to_num(rates, nan=-1.0), kind="stable")
    sorted_rates = rates[order]
    dead = int((rates == 0).sum())
    colors = [DEAD_COLOR if r == 0 else "#1f77b4" for r in sorted_rates]
    fig = go.Figure(go.Scatter(x=np.arange(len(rates)), y=sorted_rates, mode="lines+markers" if len(rates) <= 512 else "lines",
                               marker=dict(color=colors, size=4), line=dict(color="#1f77b4"), customdata=order,
                               hovertemplate="rank %{x}: unit %{customdata}<br>fires for %{y:.2%} of tokens<extra></extra>",
                               name="firing rate"))  # fmt: skip
    title = f"Per-unit firing rate, {layer}, step {step}: {dead} of {len(rates)} units dead"
    return style_layout(fig, title, "unit rank (busiest first)", "share of tokens")


# ---- both -------------------------------------------------------------------------------------------------


def family_curves(
    steps: np.ndarray,
    curves: Mapping[str, np.ndarray],
    panels: Sequence[tuple[str, Sequence[str], str]],
    title: str,
) -> go.Figure:
    """A family's metrics over training for one layer, one panel each: curves {metric: (step,)}
    (routescope.analysis.family_timeseries, one interval per point); panels as L1_PANELS / MOE_PANELS."""
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[p[0] for p in panels])  # fmt: skip
    note = ""
    for row, (_, names, unit) in enumerate(panels, start=1):
        for name in names:
            if name not in curves:
                continue
            bsteps, binned, k = bin_curve(np.asarray(steps), np.asarray(curves[name], dtype=float))
            note = note or binned_note(k)
            fig.add_scatter(x=bsteps, y=binned, mode="lines+markers" if len(bsteps) < 50 else "lines",
                            name=CURVE_NAMES.get(name, name), row=row, col=1)  # fmt: skip
        fig.update_yaxes(title_text=unit, row=row, col=1)
    fig.update_layout(template=TEMPLATE, title=f"{title}{note}", margin=dict(l=60, r=20, t=60, b=50), legend_title_text="")
    fig.update_xaxes(title_text="step", row=len(panels), col=1)
    return fig


__all__ = ["L1_PANELS", "MOE_PANELS", "active_units_histogram", "coselect_heatmap", "expert_load_bars",
           "expert_load_heatmap", "family_curves", "unit_firing_rates"]  # fmt: skip


def balance_figure(steps: np.ndarray, expected: np.ndarray, reported: np.ndarray | None, audit: dict, label: str) -> go.Figure:
    """The balance-loss audit over training: the loss the recorded routing implies (Σ coef · E · Σ f·P) and the
    one the model reported, with the audit's verdict in the title."""
    fig = go.Figure()
    fig.add_scatter(x=steps, y=expected, mode="lines", name="implied by the recorded routing")
    if reported is not None:
        fig.add_scatter(x=steps, y=reported, mode="lines+markers", name="reported (balance_loss)")
    verdict = {"ok": f"matches (ratio {audit['ratio']:.3f})" if audit.get("ratio") is not None else "matches",
               "flagged": f"FLAGGED: {audit.get('cause')}", "off": "no balance loss configured",
               "not recorded": "reported loss not recorded"}.get(audit["status"], audit["status"])  # fmt: skip
    fig.update_layout(title=f"MoE balance loss, {label}: {verdict}", xaxis_title="step", yaxis_title="balance loss",
                      margin=dict(t=60))  # fmt: skip
    return fig
