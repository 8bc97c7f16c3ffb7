"""The dashboard's tree view figure: one tree as an icicle, coloured by calibrated state (metrics v2) or by
a node quantity, with the one-line legend of the test. Re-exported by figures.py."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from routescope.analysis.calibrated import (
    DEAD,
    DEFAULT,
    LIVE,
    STATE_NAMES,
    UNDETERMINED,
    Thresholds,
    TreeStates,
    heap_levels,
    lower_bound,
    tree_states,
    upper_bound,
)
from routescope.analysis.stats import node_moments, right_share

TEMPLATE = "plotly_white"
NODE_COLORINGS = {  # the first is the tree view's default
    "state": "calibrated state (dead / undetermined / live)",
    "visits": "tokens that reached the node",
    "p": "split p_n (share sent right)",
    "balance": "balance 1 − |2p_n − 1|",
    "mu": "drift μ_n (mean pre-activation)",
}


# ---- 2. the tree ------------------------------------------------------------------------------------

# The calibrated states (metrics v2) in three colours from Paul Tol's colour-blind-safe palettes, apart in
# lightness too (dark wine, light sand, mid teal); frozen nodes get a dark indigo outline.
UNIT_STATE_COLORS = {DEAD: "#882255", UNDETERMINED: "#DDCC77", LIVE: "#44AA99"}
FROZEN_COLOR = "#332288"
# One width for every outline: plotly.js draws NaN paths (console errors) when an icicle with per-sector
# widths zooms into a clicked node, so frozen nodes stand out by a thick dark outline among white ones.
OUTLINE_WIDTH = 3


def _percent(value: float) -> str:
    """0.05 -> '5%', 0.025 -> '2.5%', 0.95 -> '95%'."""
    return f"{value * 100:.6g}%"


def state_legend(th: Thresholds = DEFAULT, html: bool = False) -> str:
    """The tree view's one-line legend of the calibrated test, from the thresholds in use; with `html`, a
    coloured square before each state (for a plotly annotation)."""

    def square(color: str, shape: str = "■") -> str:
        return f"<span style='color:{color}'>{shape}</span> " if html else ""

    return (f"{square(UNIT_STATE_COLORS[DEAD])}dead: provably under {_percent(th.delta)} of its balanced share "
            f"(one-sided {_percent(1 - th.alpha)} Clopper–Pearson); {square(UNIT_STATE_COLORS[LIVE])}live: provably over; "
            f"{square(UNIT_STATE_COLORS[UNDETERMINED])}undetermined: neither; {square(FROZEN_COLOR, '□')}blue outline: "
            f"frozen (minority child provably under {_percent(th.epsilon)})")  # fmt: skip


def unit_states(node_visits: np.ndarray, node_right: np.ndarray, leaf_visits: np.ndarray, tokens: float | None = None,
                th: Thresholds = DEFAULT) -> TreeStates:  # fmt: skip
    """The calibrated states of one tree's window-summed counts (analysis.calibrated.tree_states): nodes
    (2^d − 1,), leaves (2^d,), `tokens` that entered the tree in the window (default: the root's visits)."""
    nv, lv = np.asarray(node_visits, dtype=float), np.asarray(leaf_visits, dtype=float)
    if tokens is None:
        tokens = nv[0] if len(nv) else lv.sum()
    return tree_states(nv[None], np.asarray(node_right, dtype=float)[None], lv[None], np.asarray(float(tokens)), th)


def tree_icicle(
    node_visits: np.ndarray,
    node_right: np.ndarray,
    node_act_sum: np.ndarray,
    leaf_visits: np.ndarray,
    color_by: str = "state",
    title: str = "",
    tokens: float | None = None,
    th: Thresholds = DEFAULT,
) -> go.Figure:
    """One tree over a window as an icicle, root on top: counts summed over the window, `tokens` the tokens
    that entered the tree in it (default: the root's visits). Every unit gets equal width (the structure).
    Colour shows `color_by` (see NODE_COLORINGS; "state": the calibrated state, three colours); frozen
    nodes get a dark outline (FROZEN_COLOR) and "frozen, starves L/R" in their label; under the other
    colourings dead and undetermined units are outlined in their state colour. The legend line under the
    tree explains the test with the thresholds used. Node ids in clickData: "n5" (node 5), "leaf3"."""
    nv, nr = np.asarray(node_visits, dtype=float), np.asarray(node_right, dtype=float)
    lv = np.asarray(leaf_visits, dtype=float)
    leaves = len(lv)
    nodes = leaves - 1
    depth = int(np.log2(leaves)) if leaves else 0
    p = right_share(nv, nr)
    mu, _ = node_moments(nv, node_act_sum)
    n_tokens = float(tokens) if tokens is not None else float(nv[0] if nodes else lv.sum())
    st = unit_states(nv, nr, lv, n_tokens, th)
    states, frozen, starves_right = st.states[0], st.frozen[0], st.starves_right[0]
    units = np.concatenate([nv, lv])
    share = th.delta * np.exp2(-heap_levels(len(units)))
    with np.errstate(invalid="ignore", divide="ignore"):
        reach = units / n_tokens if n_tokens > 0 else np.full(len(units), np.nan)
    low, high = lower_bound(units, n_tokens, th.alpha), upper_bound(units, n_tokens, th.alpha)
    by_state = color_by == "state"
    if not by_state:
        metric = {"visits": nv, "p": p, "balance": 1 - np.abs(2 * p - 1), "mu": mu}[color_by]
    ids, parents, values, colors, labels, hover, lines = [], [], [], [], [], [], []

    def outline(unit: int) -> None:
        if unit < nodes and frozen[unit]:
            lines.append(FROZEN_COLOR)
        elif by_state or states[unit] == LIVE:
            lines.append("white")
        else:  # the state is not the colour: a dead or undetermined unit is outlined in its state colour
            lines.append(UNIT_STATE_COLORS[int(states[unit])])

    def evidence(unit: int) -> str:
        return (f"visits {units[unit]:.0f} of {n_tokens:.0f} tokens (reach {reach[unit]:.3g})<br>one-sided "
                f"{_percent(1 - th.alpha)} bounds [{low[unit]:.3g}, {high[unit]:.3g}] vs δ·2^-ℓ = {share[unit]:.3g}"
                f"<br>state: {STATE_NAMES[int(states[unit])]}")  # fmt: skip

    for n in range(nodes):
        level = int(np.floor(np.log2(n + 1)))
        ids.append(f"n{n}")
        parents.append("" if n == 0 else f"n{(n - 1) // 2}")
        values.append(2 ** (depth - level))
        colors.append(UNIT_STATE_COLORS[int(states[n])] if by_state else metric[n])
        side = "R" if starves_right[n] else "L"
        tag = f"frozen, starves {side}" if frozen[n] else "" if states[n] == LIVE else STATE_NAMES[int(states[n])]
        labels.append(f"{n}" + (f" {tag}" if tag else ""))
        froze = (f"<br>frozen: the {'right' if starves_right[n] else 'left'} child provably gets under "
                 f"{_percent(th.epsilon)} of its tokens" if frozen[n] else "")  # fmt: skip
        hover.append(f"node {n}, depth {level}<br>{evidence(n)}{froze}<br>p_n {p[n]:.3f}<br>μ_n {mu[n]:.3f}")
        outline(n)
    for j in range(leaves):
        unit = nodes + j
        parent = (unit - 1) // 2 if nodes else None
        ids.append(f"leaf{j}")
        parents.append(f"n{parent}" if parent is not None else "")
        values.append(1)
        colors.append(UNIT_STATE_COLORS[int(states[unit])] if by_state else lv[j] if color_by == "visits" else np.nan)
        labels.append(f"leaf {j}" + ("" if states[unit] == LIVE else f" {STATE_NAMES[int(states[unit])]}"))
        hover.append(f"leaf {j}, depth {depth}<br>{evidence(unit)}")
        outline(unit)
    marker = dict(colors=colors, line=dict(color=lines, width=OUTLINE_WIDTH))
    if not by_state:
        marker.update(colorscale="Viridis", showscale=True, colorbar=dict(title=dict(text=color_by)))
    fig = go.Figure(
        go.Icicle(
            ids=ids, labels=labels, parents=parents, values=values, branchvalues="total", text=labels, textinfo="label",
            hovertext=hover, hoverinfo="text", tiling=dict(orientation="v"), sort=False, marker=marker,
        )
    )  # fmt: skip
    fig.add_annotation(text=state_legend(th, html=True), showarrow=False, xref="paper", yref="paper", x=0, y=0,
                       xanchor="left", yanchor="top", yshift=-4, font=dict(size=12), align="left")  # fmt: skip
    fig.update_layout(template=TEMPLATE, title=title or f"Tree coloured by {NODE_COLORINGS[color_by]}", margin=dict(l=10, r=10, t=60, b=34))
    return fig
