"""Dashboard figures, sources and app without a browser: every expected value is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from routescope.dashboards import figures as F

# ---- a depth-3 tree whose subtree under node 2 is dead -------------------------------------------
# Heap numbering: children of n are 2n+1, 2n+2; leaf j hangs under node (7 + j - 1) // 2, so
# node 3 -> leaves 0,1; node 4 -> leaves 2,3; node 5 -> leaves 4,5; node 6 -> leaves 6,7.
# Root: 100 tokens, all sent left (right = 0) -> frozen. Node 1: 100 tokens, 50 right -> balanced.
# Node 3: 50 tokens, 20 right -> leaves 30 / 20. Node 4: 50 tokens, 25 right -> leaves 25 / 25.
# Node 2 and its subtree (5, 6, leaves 4..7): no tokens -> dead.
NODE_VISITS = np.array([100, 100, 0, 50, 50, 0, 0])
NODE_RIGHT = np.array([0, 50, 0, 20, 25, 0, 0])
NODE_ACT_SUM = np.array([-30.0, 7.0, 0.0, 10.0, -5.0, 0.0, 0.0])
LEAF_VISITS = np.array([30, 20, 25, 25, 0, 0, 0, 0])
DEAD_IDS = {"n2", "n5", "n6", "leaf4", "leaf5", "leaf6", "leaf7"}


def test_tree_fixture_is_consistent() -> None:
    """The hand-made tree obeys the count invariants (so the figure tests test the figure, not the data)."""
    for n in range(3):
        assert NODE_VISITS[2 * n + 1] + NODE_VISITS[2 * n + 2] == NODE_VISITS[n]
        assert NODE_VISITS[2 * n + 2] == NODE_RIGHT[n]
    for m in range(3, 7):
        j = 2 * (m - 3)
        assert LEAF_VISITS[j] + LEAF_VISITS[j + 1] == NODE_VISITS[m]
        assert LEAF_VISITS[j + 1] == NODE_RIGHT[m]


# ---- 1. node_states ---------------------------------------------------------------------------------


def test_node_states_dead_frozen_alive() -> None:
    visits = np.array([0, 100, 100, 100, 100, 1000, 1000, 40])
    right = np.array([0, 0, 100, 50, 1, 5, 995, 20])
    states = F.node_states(visits, right, epsilon=0.01)
    # 0 visits -> dead; all left / all right -> frozen; balanced -> ""; a minority share of exactly ε
    # (1/100) is not frozen (the metrics' test is strict: min(p, 1-p) < ε); 5/1000 and 995/1000 are;
    # 20/40 -> alive.
    assert list(states) == ["dead", "frozen", "frozen", "", "", "frozen", "frozen", ""]


def test_node_states_agree_with_the_metrics() -> None:
    """The tree view's frozen and dead nodes are exactly the ones the metrics count (one frozen test)."""
    from routescope.analysis.tree import LayerInfo, tree_metrics_numpy

    rng = np.random.default_rng(7)
    visits = rng.integers(0, 400, size=63)
    visits[rng.choice(63, 10, replace=False)] = 0
    right = np.where(rng.random(63) < 0.4, (visits * rng.choice([0.0, 0.004, 0.01, 0.5, 0.996, 1.0], 63)).round(), visits // 2)
    states = F.node_states(visits, right)
    layer = LayerInfo(0, "l", "tree", depth=6, trees=1, variant="neuron", leaf_width=1)
    counts = {"tokens": np.array(visits[0]), "node_visits": visits[None], "node_right": right[None],
              "node_fires": np.zeros((1, 63)), "leaf_visits": np.ones((1, 64)), "leaf_fires": np.zeros((1, 64))}
    metrics = tree_metrics_numpy(counts, layer)
    assert (states == "frozen").sum() > 0 and (states == "dead").sum() == 10
    assert metrics["frozen_fraction"][0] == (states == "frozen").sum() / 63
    assert metrics["dead_fraction"][0] == (states == "dead").sum() / 63


def test_node_states_epsilon_boundary() -> None:
    visits = np.array([100, 100])
    right = np.array([2, 98])
    assert list(F.node_states(visits, right, epsilon=0.01)) == ["", ""]
    assert list(F.node_states(visits, right, epsilon=0.05)) == ["frozen", "frozen"]


# ---- 2. tree_icicle ---------------------------------------------------------------------------------


def _icicle(color_by: str = "visits") -> go.Icicle:
    fig = F.tree_icicle(NODE_VISITS, NODE_RIGHT, NODE_ACT_SUM, LEAF_VISITS, color_by=color_by)
    assert isinstance(fig, go.Figure)
    icicles = [t for t in fig.data if isinstance(t, go.Icicle)]
    assert len(icicles) == 1
    return icicles[0]


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


def test_tree_icicle_marks_exactly_the_dead_subtree() -> None:
    trace = _icicle()
    ids = list(trace.ids)
    texts = dict(zip(ids, trace.text))
    lines = dict(zip(ids, trace.marker.line.color))
    marked_dead = {i for i in ids if "dead" in texts[i]}
    assert marked_dead == DEAD_IDS
    assert {i for i in ids if lines[i] == "crimson"} == DEAD_IDS
    # node 1 is alive and balanced: no state in its label, a neutral outline
    assert texts["n1"].strip() == "1"
    assert lines["n1"] not in ("crimson", "royalblue")
    # the root sends everything left: frozen, not dead
    assert "frozen" in texts["n0"] and "dead" not in texts["n0"]
    assert lines["n0"] == "royalblue"


def test_tree_icicle_color_by_p() -> None:
    trace = _icicle("p")
    colors = list(trace.marker.colors)
    for n in range(7):
        if NODE_VISITS[n] > 0:
            assert colors[n] == pytest.approx(NODE_RIGHT[n] / NODE_VISITS[n])
        else:
            assert math.isnan(colors[n])
    assert colors[1] == pytest.approx(0.5) and colors[3] == pytest.approx(0.4)


def test_tree_icicle_color_by_mu() -> None:
    trace = _icicle("mu")
    colors = list(trace.marker.colors)
    for n in range(7):
        if NODE_VISITS[n] > 0:
            assert colors[n] == pytest.approx(NODE_ACT_SUM[n] / NODE_VISITS[n])
        else:
            assert math.isnan(colors[n])
    assert colors[0] == pytest.approx(-0.3)


def test_tree_icicle_color_by_visits_colours_leaves() -> None:
    trace = _icicle("visits")
    colors = list(trace.marker.colors)
    assert colors[:7] == pytest.approx(list(NODE_VISITS.astype(float)))
    assert colors[7:] == pytest.approx(list(LEAF_VISITS.astype(float)))


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


# ---- 8. decode_context ---------------------------------------------------------------------------------


def test_decode_context_bytes() -> None:
    ids = np.array([-1, -1, ord("h"), ord("i"), ord("\n"), ord("!")])
    assert F.decode_context(ids) == "hi⏎!"
    assert F.decode_context(np.array([-1, -1])) == ""


def test_decode_context_non_byte_ids() -> None:
    assert F.decode_context(np.array([-1, 300, 5])) == "300 5"
