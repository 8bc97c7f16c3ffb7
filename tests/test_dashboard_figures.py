"""Dashboard figures, sources and app without a browser: every expected value is known by construction."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from test_metrics import counts_from_leaves

from routescope.analysis import WarningReport
from routescope.analysis.calibrated import DEAD, DEFAULT, LIVE, UNDETERMINED, Thresholds, tree_states
from routescope.dashboards import figures as F

# ---- a depth-3 tree that 10,000 tokens entered, in all three calibrated states ---------------------------
# Heap numbering: children of n are 2n+1, 2n+2; leaf j hangs under node (7 + j - 1) // 2, so
# node 3 -> leaves 0,1; node 4 -> leaves 2,3; node 5 -> leaves 4,5; node 6 -> leaves 6,7.
# Root: every token sent left -> live and frozen, starving its RIGHT child, so node 2's subtree (2, 5, 6,
# leaves 4..7) gets nothing out of 10,000: provably dead (a zero at level 1 is proof from 119 tokens on).
# Node 1 sends 120 tokens right to node 4: its balanced share is 1/4, δ·1/4·N = 125 tokens, and 120 is
# neither provably under nor over that (one-sided 95% bounds [1.03%, 1.40%] around 1.25%): undetermined;
# so are leaves 2, 3 (60 each against δ·1/8·N = 62.5). Node 1's minority 120/10,000 = 1.2% is not provably
# under ε = 1%: not frozen. Node 3 and leaves 0, 1 (4,940 each): live.
TOKENS = 10_000
LEAF_VISITS = np.array([4940, 4940, 60, 60, 0, 0, 0, 0])
NODE_VISITS, NODE_RIGHT = counts_from_leaves(LEAF_VISITS, 3)
NODE_ACT_SUM = np.array([-30.0, 7.0, 0.0, 10.0, -5.0, 0.0, 0.0]) * NODE_VISITS / 100
DEAD_IDS = {"n2", "n5", "n6", "leaf4", "leaf5", "leaf6", "leaf7"}
UNDETERMINED_IDS = {"n4", "leaf2", "leaf3"}
LIVE_IDS = {"n0", "n1", "n3", "leaf0", "leaf1"}


def test_tree_fixture_is_consistent() -> None:
    """The hand-made tree obeys the count invariants (so the figure tests test the figure, not the data)."""
    assert list(NODE_VISITS) == [10_000, 10_000, 0, 9880, 120, 0, 0] and list(NODE_RIGHT) == [0, 120, 0, 4940, 60, 0, 0]
    for n in range(3):
        assert NODE_VISITS[2 * n + 1] + NODE_VISITS[2 * n + 2] == NODE_VISITS[n]
        assert NODE_VISITS[2 * n + 2] == NODE_RIGHT[n]
    for m in range(3, 7):
        j = 2 * (m - 3)
        assert LEAF_VISITS[j] + LEAF_VISITS[j + 1] == NODE_VISITS[m]
        assert LEAF_VISITS[j + 1] == NODE_RIGHT[m]


def _icicle(color_by: str | None = None, leaves: np.ndarray = LEAF_VISITS, tokens: float | None = TOKENS,
            th: Thresholds = DEFAULT) -> go.Icicle:  # fmt: skip
    visits, right = counts_from_leaves(leaves, 3)
    kwargs = {} if color_by is None else {"color_by": color_by}
    fig = F.tree_icicle(visits, right, NODE_ACT_SUM, leaves, tokens=tokens, th=th, **kwargs)
    assert isinstance(fig, go.Figure)
    icicles = [t for t in fig.data if isinstance(t, go.Icicle)]
    assert len(icicles) == 1
    return icicles[0]


def _by_id(trace: go.Icicle, attribute: str) -> dict[str, object]:
    values = {"colors": trace.marker.colors, "line": trace.marker.line.color, "text": trace.text}[attribute]
    return dict(zip(trace.ids, values))


# ---- 1. calibrated states ---------------------------------------------------------------------------------


def test_unit_states_are_the_analysis_states() -> None:
    """The tree view's states come from analysis.calibrated.tree_states on the same counts and tokens."""
    st = F.unit_states(NODE_VISITS, NODE_RIGHT, LEAF_VISITS, TOKENS)
    direct = tree_states(NODE_VISITS[None], NODE_RIGHT[None], LEAF_VISITS[None], np.array(float(TOKENS)))
    np.testing.assert_array_equal(st.states, direct.states)
    assert list(st.states[0]) == [LIVE, LIVE, DEAD, LIVE, UNDETERMINED, DEAD, DEAD] + [LIVE] * 2 + [UNDETERMINED] * 2 + [DEAD] * 4
    assert list(st.frozen[0]) == [True] + [False] * 6 and list(st.starves_right[0]) == [True] + [False] * 6


def test_unit_states_agree_with_the_metrics() -> None:
    """The tree view's dead, undetermined and frozen nodes are exactly the ones the metrics count."""
    from routescope.analysis.tree import LayerInfo, tree_metrics_numpy

    rng = np.random.default_rng(7)
    leaves = rng.integers(0, 400, size=64) * (rng.random(64) < 0.7)
    leaves[:4] = [5000, 0, 3, 0]  # a frozen node (leaves 0 / 1), and low counts near the thresholds
    visits, right = counts_from_leaves(leaves, 6)
    tokens = leaves.sum()
    icicle = F.tree_icicle(visits, right, np.zeros(63), leaves, tokens=tokens).data[0]
    colors, lines = _by_id(icicle, "colors"), _by_id(icicle, "line")
    layer = LayerInfo(0, "l", "tree", depth=6, trees=1, variant="neuron", leaf_width=1)
    counts = {"tokens": np.array(tokens), "node_visits": visits[None], "node_right": right[None],
              "node_fires": np.zeros((1, 63)), "leaf_visits": leaves[None], "leaf_fires": np.zeros((1, 64))}  # fmt: skip
    metrics = tree_metrics_numpy(counts, layer)
    nodes = [f"n{n}" for n in range(63)]
    shown = {state: sum(colors[i] == F.UNIT_STATE_COLORS[state] for i in nodes) for state in (DEAD, UNDETERMINED, LIVE)}
    frozen = sum(lines[i] == F.FROZEN_COLOR for i in nodes)
    assert shown[DEAD] > 0 and shown[UNDETERMINED] > 0 and frozen > 0
    assert metrics["dead_fraction"][0] == shown[DEAD] / 63
    assert metrics["undetermined_fraction"][0] == shown[UNDETERMINED] / 63
    assert metrics["frozen_fraction"][0] == frozen / 63


# ---- 2. tree_icicle ---------------------------------------------------------------------------------


def test_tree_icicle_ids_and_parents() -> None:
    trace = _icicle()
    ids = list(trace.ids)
    assert ids == [f"n{n}" for n in range(7)] + [f"leaf{j}" for j in range(8)]
    parents = dict(zip(ids, trace.parents))
    assert parents["n0"] == ""
    for n in range(1, 7):
        assert parents[f"n{n}"] == f"n{(n - 1) // 2}"
    for j in range(8):
        assert parents[f"leaf{j}"] == f"n{3 + j // 2}"
    # equal width per level: with branchvalues="total" each parent equals the sum of its children
    values = dict(zip(ids, trace.values))
    assert values["n0"] == 8 and values["n1"] == 4 and values["n3"] == 2 and values["leaf0"] == 1


def test_tree_icicle_colours_the_three_states_by_default() -> None:
    """Default colouring: the calibrated state; a dead subtree, undetermined units and live ones get the three
    state colours, no colour scale."""
    trace = _icicle()
    colors = _by_id(trace, "colors")
    for ids, state in ((DEAD_IDS, DEAD), (UNDETERMINED_IDS, UNDETERMINED), (LIVE_IDS, LIVE)):
        assert {i: colors[i] for i in ids} == {i: F.UNIT_STATE_COLORS[state] for i in ids}
    assert DEAD_IDS | UNDETERMINED_IDS | LIVE_IDS == set(trace.ids)
    assert len(set(F.UNIT_STATE_COLORS.values())) == 3 and not trace.marker.showscale
    texts = _by_id(trace, "text")
    assert {i for i in trace.ids if "dead" in texts[i]} == DEAD_IDS
    assert {i for i in trace.ids if "undetermined" in texts[i]} == UNDETERMINED_IDS
    assert texts["n1"] == "1" and texts["leaf0"] == "leaf 0"  # live, not frozen: no tag


def test_tree_icicle_frozen_node_has_outline_and_starved_side() -> None:
    trace = _icicle()
    lines, texts = _by_id(trace, "line"), _by_id(trace, "text")
    assert {i for i in trace.ids if lines[i] == F.FROZEN_COLOR} == {"n0"}
    assert {lines[i] for i in trace.ids if i != "n0"} == {"white"}  # the frozen outline is the only dark one
    assert trace.marker.line.width == F.OUTLINE_WIDTH >= 3  # thick (one width: see OUTLINE_WIDTH)
    assert texts["n0"] == "0 frozen, starves R"
    assert "right child provably gets under 1%" in trace.hovertext[0]
    # The mirror image: every token goes right, so the root starves its left child (node 1's subtree dies).
    mirrored = _icicle(leaves=LEAF_VISITS[::-1].copy())
    texts, lines = _by_id(mirrored, "text"), _by_id(mirrored, "line")
    assert texts["n0"] == "0 frozen, starves L" and lines["n0"] == F.FROZEN_COLOR
    assert texts["n1"] == "1 dead" and texts["n4"] == "4 dead" and texts["n2"] == "2"


def test_tree_icicle_other_colourings_outline_the_calibrated_states() -> None:
    """Coloured by visits, the states still show: dead and undetermined units outlined in their state colour,
    the frozen root in the frozen outline, labels as under the state colouring."""
    trace = _icicle("visits")
    colors, lines, texts = _by_id(trace, "colors"), _by_id(trace, "line"), _by_id(trace, "text")
    assert [colors[f"n{n}"] for n in range(7)] == pytest.approx(list(NODE_VISITS.astype(float)))
    assert [colors[f"leaf{j}"] for j in range(8)] == pytest.approx(list(LEAF_VISITS.astype(float)))
    assert {i for i in trace.ids if lines[i] == F.UNIT_STATE_COLORS[DEAD]} == DEAD_IDS
    assert {i for i in trace.ids if lines[i] == F.UNIT_STATE_COLORS[UNDETERMINED]} == UNDETERMINED_IDS
    assert lines["n0"] == F.FROZEN_COLOR and texts["n0"] == "0 frozen, starves R"
    assert {lines[i] for i in LIVE_IDS - {"n0"}} == {"white"}
    assert trace.marker.showscale


def test_zero_visits_with_few_tokens_are_undetermined_not_dead() -> None:
    """The old tree view called any unvisited node dead and any one-sided split frozen. With 100 tokens a zero
    at level 1 proves nothing (119 are needed), nor does a 100:0 split freeze the root (299 are needed)."""
    leaves = np.array([30, 20, 25, 25, 0, 0, 0, 0])
    trace = _icicle(leaves=leaves, tokens=100)
    colors, texts, lines = _by_id(trace, "colors"), _by_id(trace, "text"), _by_id(trace, "line")
    assert colors["n2"] == F.UNIT_STATE_COLORS[UNDETERMINED] and texts["n2"] == "2 undetermined"
    assert colors["n0"] == F.UNIT_STATE_COLORS[LIVE] and texts["n0"] == "0" and lines["n0"] != F.FROZEN_COLOR
    assert Thresholds().zero_visit_floor(1) == 119 and Thresholds().frozen_floor() == 299
    # the same shape with 1,000 tokens: now provably dead, and the root provably frozen
    trace = _icicle(leaves=leaves * 10, tokens=1000)
    assert _by_id(trace, "colors")["n2"] == F.UNIT_STATE_COLORS[DEAD]
    assert _by_id(trace, "text")["n0"] == "0 frozen, starves R"


def test_tree_icicle_uses_the_thresholds_given() -> None:
    """δ = 1%: node 4's 120 of 10,000 tokens are provably over δ·1/4·N = 25, so it is live."""
    trace = _icicle(th=Thresholds(delta=0.01))
    assert _by_id(trace, "colors")["n4"] == F.UNIT_STATE_COLORS[LIVE]


def test_state_legend_says_the_thresholds_in_one_line() -> None:
    legend = F.state_legend()
    assert "\n" not in legend and "<br>" not in legend
    assert "under 5% of its balanced share" in legend and "one-sided 95% Clopper–Pearson" in legend
    assert "provably under 1%" in legend and "undetermined: neither" in legend and "live: provably over" in legend
    other = F.state_legend(Thresholds(delta=0.025, alpha=0.01, epsilon=0.02))
    assert "under 2.5% of its balanced share" in other and "one-sided 99% Clopper–Pearson" in other
    assert "provably under 2%" in other and " 5%" not in other and "95%" not in other
    # the figure carries the legend of the thresholds it used, with a coloured square per state
    fig = F.tree_icicle(NODE_VISITS, NODE_RIGHT, NODE_ACT_SUM, LEAF_VISITS, tokens=TOKENS,
                        th=Thresholds(delta=0.025, alpha=0.01, epsilon=0.02))  # fmt: skip
    (note,) = fig.layout.annotations
    assert re.sub(r"<[^>]+>", "", note.text).replace("■ ", "").replace("□ ", "") == other
    assert all(color in note.text for color in (*F.UNIT_STATE_COLORS.values(), F.FROZEN_COLOR))


def test_tree_icicle_color_by_p() -> None:
    trace = _icicle("p")
    colors = list(trace.marker.colors)
    for n in range(7):
        if NODE_VISITS[n] > 0:
            assert colors[n] == pytest.approx(NODE_RIGHT[n] / NODE_VISITS[n])
        else:
            assert math.isnan(colors[n])
    assert colors[1] == pytest.approx(0.012) and colors[3] == pytest.approx(0.5)


def test_tree_icicle_color_by_mu() -> None:
    trace = _icicle("mu")
    colors = list(trace.marker.colors)
    for n in range(7):
        if NODE_VISITS[n] > 0:
            assert colors[n] == pytest.approx(NODE_ACT_SUM[n] / NODE_VISITS[n])
        else:
            assert math.isnan(colors[n])
    assert colors[0] == pytest.approx(-0.3)


# ---- 3. path_usage ------------------------------------------------------------------------------------


def test_path_usage_bars_uniform_line_and_log() -> None:
    counts = np.array([[10, 20, 30, 40], [25, 25, 25, 25], [0, 0, 0, 100]])  # every tree saw 100 tokens
    fig = F.path_usage(counts, step=42, layer=1)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 3
    for t, bar in enumerate(bars):
        assert list(bar.y) == list(counts[t].astype(float))
        assert list(bar.x) == [0, 1, 2, 3]
    hlines = [s for s in fig.layout.shapes if s.y0 == s.y1]
    assert len(hlines) == 1
    assert hlines[0].y0 == pytest.approx(100 / 4)
    assert fig.layout.yaxis.type != "log"
    assert "42" in fig.layout.title.text and "layer 1" in fig.layout.title.text
    log_fig = F.path_usage(counts, step=42, layer=1, log=True)
    assert log_fig.layout.yaxis.type == "log"


def test_path_usage_animation_frames() -> None:
    steps = np.arange(1, 101) * 5  # 100 intervals: 5, 10, ..., 500
    counts = np.ones((100, 2, 4))
    fig = F.path_usage_animation(steps, counts, layer=0, max_frames=60)
    assert len(fig.frames) == 60
    assert fig.frames[-1].name == "500"
    assert fig.frames[0].name == "5"
    short = F.path_usage_animation(steps[:7], counts[:7], layer=0, max_frames=60)
    assert len(short.frames) == 7
    assert [f.name for f in short.frames] == [str(s) for s in steps[:7]]


# ---- 5. bin_curve -------------------------------------------------------------------------------------


def test_bin_curve_short_is_untouched() -> None:
    steps = np.arange(100) * 10
    values = np.sin(np.arange(100.0))
    bsteps, binned, k = F.bin_curve(steps, values, max_points=2000)
    assert k == 1
    np.testing.assert_array_equal(bsteps, steps)
    np.testing.assert_array_equal(binned, values)


def test_bin_curve_means_of_three() -> None:
    n = 5000
    steps = (np.arange(n) + 1) * 10
    values = np.arange(n, dtype=float)
    bsteps, binned, k = F.bin_curve(steps, values, max_points=2000)
    assert k == 3
    assert len(binned) <= 2000
    full = n // 3  # 1666 full bins, then a partial bin of the last 2 intervals
    # bin i holds values 3i, 3i+1, 3i+2: mean 3i+1
    np.testing.assert_allclose(binned[:full], 3 * np.arange(full) + 1)
    assert binned[-1] == pytest.approx((4998 + 4999) / 2)
    assert bsteps[-1] == steps[-1]
    assert len(bsteps) == len(binned) == full + 1
    assert np.all(np.diff(bsteps) > 0)


def test_bin_curve_two_dimensional() -> None:
    n = 5000
    steps = np.arange(n)
    values = np.stack([np.arange(n, dtype=float), -np.arange(n, dtype=float)], axis=1)
    _, binned, k = F.bin_curve(steps, values, max_points=2000)
    assert k == 3 and binned.shape[1] == 2
    np.testing.assert_allclose(binned[:10, 0], 3 * np.arange(10) + 1)
    np.testing.assert_allclose(binned[:10, 1], -(3 * np.arange(10) + 1))


# ---- 6. compare_figure --------------------------------------------------------------------------------


def test_compare_figure_band_mean_and_single() -> None:
    steps = np.arange(10) * 5
    a, b, c = np.arange(10.0), 3 * np.arange(10.0), np.full(10, 7.0)
    curves = {"a": (steps, a), "b": (steps, b), "c": (steps, c)}
    fig = F.compare_figure(curves, "balance", groups={"a": "A", "b": "A", "c": "c"})
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 1
    band = bands[0]
    n = len(steps)
    np.testing.assert_allclose(band.y[:n], np.maximum(a, b))  # upper edge
    np.testing.assert_allclose(band.y[n:], np.minimum(a, b)[::-1])  # lower edge, reversed
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len(lines) == 2
    mean = next(t for t in lines if "A" in t.name)
    np.testing.assert_allclose(mean.y, (a + b) / 2)
    np.testing.assert_array_equal(mean.x, steps)
    single = next(t for t in lines if t.name == "c")
    np.testing.assert_allclose(single.y, c)
    assert "mean of" not in fig.layout.title.text
    assert "balance" in fig.layout.title.text


def test_compare_figure_without_groups_draws_plain_lines() -> None:
    steps = np.arange(5)
    fig = F.compare_figure({"x": (steps, np.ones(5)), "y": (steps, np.zeros(5))}, "m")
    assert len(fig.data) == 2 and all(t.fill != "toself" for t in fig.data)


def test_compare_figure_title_says_binned() -> None:
    n = 5000
    steps = np.arange(n)
    fig = F.compare_figure({"long": (steps, np.arange(n, dtype=float))}, "m")
    assert "mean of 3 intervals" in fig.layout.title.text
    np.testing.assert_allclose(fig.data[0].y[:5], 3 * np.arange(5) + 1)
    grouped = F.compare_figure(
        {"s0": (steps, np.arange(n, dtype=float)), "s1": (steps, np.arange(n, dtype=float) + 2)}, "m", groups={"s0": "g", "s1": "g"}
    )
    assert "mean of 3 intervals" in grouped.layout.title.text


# ---- 7. heatmap, lines, drift --------------------------------------------------------------------------


def test_metric_heatmap_axes_and_values() -> None:
    steps = np.arange(1, 6) * 10
    values = np.arange(15, dtype=float).reshape(5, 3)  # (step, layer)
    fig = F.metric_heatmap(steps, values, "dead fraction")
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.yaxis.title.text == "layer"
    heat = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heat.z), values.T)
    np.testing.assert_array_equal(heat.x, steps)


def test_metric_lines_axes_and_loss_panel() -> None:
    steps = np.arange(1, 6) * 10
    values = np.arange(15, dtype=float).reshape(5, 3)
    loss = {"train": (steps, np.array([3.0, 2.5, np.nan, 2.0, 1.8]))}
    fig = F.metric_lines(steps, values, "balance", [0, 2], loss)
    assert fig.layout.xaxis.title.text and fig.layout.xaxis2.title.text
    assert fig.layout.yaxis.title.text == "balance"
    assert fig.layout.yaxis2.title.text
    names = [t.name for t in fig.data]
    assert names == ["layer 0", "layer 2", "train"]
    np.testing.assert_allclose(fig.data[1].y, values[:, 2])
    # the NaN loss point is dropped, not drawn as a gap or zero
    np.testing.assert_allclose(fig.data[2].y, [3.0, 2.5, 2.0, 1.8])
    np.testing.assert_array_equal(fig.data[2].x, [10, 20, 40, 50])


def test_drift_figure_marks_death_event() -> None:
    steps = np.arange(1, 11) * 10  # 10 .. 100
    mu = np.tile(np.arange(7, dtype=float), (10, 1)) + np.arange(10)[:, None] * 0.1  # (step, node)
    events = pd.DataFrame(
        {"step": [40, 60, 70], "layer": [1, 0, 1], "tree": [0, 0, 1], "node": [2, 2, 2], "kind": ["died", "died", "died"]}
    )  # only the first row is of layer 1, tree 0
    fig = F.drift_figure(steps, mu, [0, 2], layer=1, tree=0, events=events)
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.yaxis.title.text
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == ["node 0", "node 2"]
    marks = [t for t in fig.data if t.mode == "markers"]
    assert len(marks) == 1
    mark = marks[0]
    assert mark.marker.symbol == "x"
    assert list(mark.x) == [40]
    assert list(mark.y) == pytest.approx([mu[3, 2]])  # step 40 is interval index 3
    assert "died" in mark.text[0]


def test_drift_figure_ignores_events_of_unshown_nodes() -> None:
    steps = np.arange(1, 6)
    mu = np.zeros((5, 3))
    events = pd.DataFrame({"step": [3], "layer": [0], "tree": [0], "node": [1], "kind": ["froze"]})
    fig = F.drift_figure(steps, mu, [0], layer=0, tree=0, events=events)
    assert not [t for t in fig.data if t.mode == "markers"]


def test_drift_figure_draws_pending_events_hollow_and_lighter() -> None:
    """Events that have not yet persisted K windows (status "pending") are drawn apart from confirmed ones."""
    steps = np.arange(1, 11) * 10
    mu = np.tile(np.arange(7, dtype=float), (10, 1))
    events = pd.DataFrame({"kind": ["died", "froze", "died"], "status": ["event", "pending", "pending"], "step": [30, 80, 90],
                           "layer": [0, 0, 0], "tree": [0, 0, 0], "node": [2, 1, 5], "role": ["pruned_root", None, "cascade"],
                           "side": ["right", "left", "left"]})  # fmt: skip
    fig = F.drift_figure(steps, mu, [1, 2], layer=0, tree=0, events=events)
    marks = {t.name: t for t in fig.data if t.mode == "markers"}
    assert set(marks) == {"died/froze", "died/froze, pending"}
    event, pending = marks["died/froze"], marks["died/froze, pending"]
    assert list(event.x) == [30] and event.marker.symbol == "x" and event.marker.color == F.EVENT_COLOR
    assert event.text[0] == "node 2: died (pruned_root, right)"
    assert list(pending.x) == [80] and pending.marker.symbol.endswith("-open") and pending.marker.color == F.PENDING_COLOR
    assert pending.text[0].startswith("node 1: froze (left), pending")
    assert F.PENDING_COLOR != F.EVENT_COLOR


def _report(source: str, verdict: str) -> WarningReport:
    flags = pd.DataFrame({"step": [30], "layer": [0], "tree": [0], "node": [0], "child": [2], "score": [1.0],
                          "child_died": [True]})  # fmt: skip
    return WarningReport(flags, source, verdict, 5, None, None, None, None, None)


def test_drift_figure_labels_warnings_by_source_and_shows_the_verdict() -> None:
    steps = np.arange(1, 6) * 10
    mu = np.zeros((5, 7))
    verdict = "no better than the trivial rule on held-out steps 30–50 (F1 0.10 vs 0.40); showing the trivial rule's flags"
    fig = F.drift_figure(steps, mu, [2], 0, 0, None, _report("trivial rule", verdict))
    (mark,) = [t for t in fig.data if t.mode == "markers"]
    assert mark.name == "early warning (trivial rule)" and list(mark.x) == [30]
    assert f"early warning: {verdict}" in fig.layout.title.text
    assert verdict in mark.text[0] and "from node 0's split" in mark.text[0]
    better = F.drift_figure(steps, mu, [2], 0, 0, None, _report("predictor", "beats the trivial rule on held-out steps 30–50"))
    assert [t.name for t in better.data if t.mode == "markers"] == ["early warning (predictor)"]
    assert "early warning: beats the trivial rule" in better.layout.title.text
    # nothing to mark on the nodes shown: the verdict is still said
    assert verdict in F.drift_figure(steps, mu, [1], 0, 0, None, _report("trivial rule", verdict)).layout.title.text


# ---- 8. decode_context ---------------------------------------------------------------------------------


def test_decode_context_bytes() -> None:
    ids = np.array([-1, -1, ord("h"), ord("i"), ord("\n"), ord("!")])
    assert F.decode_context(ids) == "hi⏎!"
    assert F.decode_context(np.array([-1, -1])) == ""


def test_decode_context_non_byte_ids() -> None:
    assert F.decode_context(np.array([-1, 300, 5])) == "300 5"
