"""Metrics on runs built by construction, whose answers are known by hand (DESIGN.md, "Metrics")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli
from scipy import stats

import routescope
from routescope import analysis
from routescope.analysis.calibrated import Thresholds
from routescope.analysis.events import pruning_events
from routescope.analysis.window import ALL, LAST_QUARTER
from routescope.store import LayerLayout
from routescope.store.writer import RunWriter


def counts_from_leaves(leaves: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Node visits and right counts (T, 2^d - 1) implied by leaf visits (T, 2^d): a consistent tree."""
    heap = np.zeros(leaves.shape[:-1] + (2 ** (depth + 1) - 1,), dtype=np.int64)
    heap[..., 2**depth - 1 :] = leaves
    for node in range(2**depth - 2, -1, -1):
        heap[..., node] = heap[..., 2 * node + 1] + heap[..., 2 * node + 2]
    nodes = 2**depth - 1
    right = heap[..., 2 * np.arange(nodes) + 2]
    return heap[..., :nodes], right


def write_run(path: Path, depth: int, intervals: list[np.ndarray], variant: str = "neuron", mu=None,
              sigma: float = 1.0, fires: float = 1.0, traces=None) -> Path:  # fmt: skip
    """A one-layer run whose interval i has leaf visits intervals[i] (T, 2^d); mu[i] (T, nodes) optional."""
    trees = intervals[0].shape[0]
    layer = LayerLayout("mlp", depth, trees, {"family": "tree", "variant": variant, "leaf_width": 4, "depth": depth})
    writer = RunWriter(path, [layer], {}, sample_tokens=len(traces[0]) if traces else 0)
    for i, leaves in enumerate(intervals):
        visits, right = counts_from_leaves(leaves, depth)
        m = np.zeros(visits.shape) if mu is None else mu[i]
        width = 4 if variant == "leaf_mlp" else 1
        row = {
            "tokens": leaves[0].sum(), "layer_tokens": np.array([leaves[0].sum()]),
            "node_visits": visits[None], "node_right": right[None], "node_fires": np.round(fires * visits)[None],
            "node_act_sum": (m * visits)[None], "node_act_sqsum": ((m**2 + sigma**2) * visits)[None],
            "leaf_visits": leaves[None], "leaf_fires": np.round(fires * leaves * width)[None],
            "leaf_act_sum": np.zeros((1,) + leaves.shape), "leaf_act_sqsum": np.zeros((1,) + leaves.shape),
        }  # fmt: skip
        tr = None
        if traces:
            tokens, leaf = traces[i]
            k = len(tokens)
            tr = {"sample_step": np.full(k, i + 1), "token_id": tokens, "sequence": np.zeros(k), "position": np.zeros(k),
                  "context_ids": np.full((k, 32), -1), "leaf": leaf.reshape(k, 1, 1),
                  "path_act": np.zeros((k, 1, 1, depth + 1))}  # fmt: skip
        writer.append_interval(i + 1, row, {}, tr)
    writer.close()
    return path


def layer_summary(path: Path, window=ALL) -> dict[str, float]:
    s = analysis.summarize(routescope.open(path), window)
    return {name: float(s[name].values[0]) for name in analysis.TREE_METRICS}


def test_perfectly_balanced_tree(tmp_path: Path) -> None:
    depth = 4
    s = layer_summary(write_run(tmp_path / "b.h5", depth, [np.full((2, 16), 700)] * 3))
    assert s["routing_entropy"] == pytest.approx(1) and s["balance"] == pytest.approx(1)
    assert s["leaf_entropy_norm"] == pytest.approx(1) and s["effective_leaves"] == pytest.approx(16)
    assert s["dead_fraction"] == 0 and s["undetermined_fraction"] == 0 and s["frozen_fraction"] == 0
    assert s["static_fraction"] == 0 and s["pruned_roots"] == 0 and math.isnan(s["right_starved_share"])
    assert s["leaf_gini"] == pytest.approx(0)
    assert s["active_fraction"] == pytest.approx(5 / 31) and s["firing_fraction"] == pytest.approx(1)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_right_subtree_never_visited(tmp_path: Path, depth: int) -> None:
    """The root sends every one of its ample tokens left: the right subtree is dead (one pruning root, the rest
    cascading), the root is frozen starving its right child, and only live nodes carry routing entropy."""
    leaves = np.zeros((1, 2**depth), dtype=np.int64)
    leaves[0, : 2 ** (depth - 1)] = 10_000
    s = layer_summary(write_run(tmp_path / "r.h5", depth, [leaves]))
    d, half = depth, 2 ** (depth - 1)
    assert s["dead_fraction"] == pytest.approx((half - 1) / (2**d - 1)) and s["undetermined_fraction"] == 0
    assert s["zero_visit_fraction"] == pytest.approx((half - 1) / (2**d - 1))
    assert s["frozen_fraction"] == pytest.approx(1 / (2**d - 1)) and s["right_starved_share"] == 1  # the root
    assert s["pruned_roots"] == 1 and s["cascade_dead"] == (half - 1) + half - 1
    live = half  # the root and the left subtree's half - 1 nodes; only the root's split is not 50/50
    assert s["routing_entropy"] == pytest.approx((live - 1) / live) and s["balance"] == pytest.approx((d - 1) / d)
    assert s["leaf_entropy_norm"] == pytest.approx((d - 1) / d)
    assert s["effective_leaves"] == pytest.approx(2 ** (d - 1))
    assert s["static_fraction"] == pytest.approx((half - 1 + half) / (2 ** (d + 1) - 1))
    assert s["leaf_gini"] == pytest.approx(0.5)
    per_depth = analysis.summarize(routescope.open(tmp_path / "r.h5"), ALL)
    np.testing.assert_allclose(per_depth["depth_frozen_fraction"].values[0], [1] + [0] * (d - 1))
    np.testing.assert_allclose(per_depth["depth_dead_fraction"].values[0], [0] + [0.5] * (d - 1))
    np.testing.assert_allclose(per_depth["depth_routing_entropy"].values[0], [0] + [1] * (d - 1))


def test_few_tokens_leave_an_unvisited_subtree_undetermined(tmp_path: Path) -> None:
    """The same tree with 10 tokens per leaf: zero visits are not evidence yet (v1 called them dead)."""
    leaves = np.zeros((1, 8), dtype=np.int64)
    leaves[0, :4] = 10
    s = layer_summary(write_run(tmp_path / "r.h5", 3, [leaves]))
    assert s["dead_fraction"] == 0 and s["zero_visit_fraction"] == pytest.approx(3 / 7)
    assert s["undetermined_fraction"] == pytest.approx(3 / 7) and s["static_fraction"] == 0


def test_frozen_root_and_edge_probabilities(tmp_path: Path) -> None:
    s = layer_summary(write_run(tmp_path / "f.h5", 1, [np.array([[99_500, 500]])]))
    h = -(0.005 * math.log2(0.005) + 0.995 * math.log2(0.995))
    assert s["frozen_fraction"] == 1 and s["dead_fraction"] == 0 and s["right_starved_share"] == 1
    assert s["routing_entropy"] == pytest.approx(h) and s["balance"] == pytest.approx(0.01)
    assert analysis.binary_entropy(np.array([0.0, 1.0, 0.5, np.nan])).tolist()[:3] == [0, 0, 1]
    # p = 0.02 is not frozen at the default epsilon, but is at epsilon = 0.05
    path = write_run(tmp_path / "g.h5", 1, [np.array([[9_800, 200]])])
    assert layer_summary(path)["frozen_fraction"] == 0
    assert float(analysis.summarize(routescope.open(path), ALL, th=Thresholds(epsilon=0.05))["frozen_fraction"][0]) == 1
    # minority m = 0: frozen from V = 299 on (U(0, V) = 1 - alpha^(1/V) < 0.01), not at 298
    assert layer_summary(write_run(tmp_path / "e.h5", 1, [np.array([[0, 298]])]))["frozen_fraction"] == 0
    edge = layer_summary(write_run(tmp_path / "e2.h5", 1, [np.array([[0, 299]])]))
    assert edge["frozen_fraction"] == 1 and edge["right_starved_share"] == 0  # all went right: the left child starves
    assert 1 - 0.05 ** (1 / 298) >= 0.01 > 1 - 0.05 ** (1 / 299)  # the edge, from the formula


def test_uniform_random_router(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    leaves = rng.multinomial(2_000_000, np.full(32, 1 / 32), size=3)
    s = layer_summary(write_run(tmp_path / "u.h5", 5, [leaves]))
    assert s["leaf_entropy_norm"] == pytest.approx(1, abs=1e-4) and s["balance"] > 0.99
    assert s["routing_entropy"] == pytest.approx(1, abs=1e-4) and s["leaf_gini"] < 0.01
    assert s["dead_fraction"] == 0 and s["undetermined_fraction"] == 0 and s["frozen_fraction"] == 0


def test_routing_entropy_is_the_unweighted_mean_over_live_nodes(tmp_path: Path) -> None:
    """The visit-weighted mean of H(p_n) equals leaf entropy / d (chain rule), so v2 reports the unweighted mean."""
    leaves = np.random.default_rng(1).integers(0, 5_000, size=(3, 64))
    s = analysis.summarize(routescope.open(write_run(tmp_path / "c.h5", 6, [leaves])), ALL)
    visits, right = counts_from_leaves(leaves, 6)
    p = right / visits
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    np.testing.assert_allclose(s["tree_routing_entropy"].values[0], h.mean(1))  # every node is live here
    weighted = (visits * h).sum(1) / visits.sum(1) / 6
    np.testing.assert_allclose(s["tree_leaf_entropy_norm"].values[0], weighted * 6, rtol=1e-12)
    assert abs(float(s["routing_entropy"][0]) - float(s["leaf_entropy_norm"][0])) > 1e-3


def test_leaf_mlp_static_and_active_fractions(tmp_path: Path) -> None:
    leaves = np.array([[5_000, 0, 5_000, 5_000, 0, 0, 5_000, 5_000]])
    s = layer_summary(write_run(tmp_path / "l.h5", 3, [leaves], variant="leaf_mlp", fires=0.5))
    assert s["static_fraction"] == pytest.approx(3 / 8) and s["active_fraction"] == pytest.approx(1 / 8)
    assert s["firing_fraction"] == pytest.approx(0.5)


def dying_run(tmp_path: Path, death_interval: int = 6, n: int = 16) -> Path:
    """Depth 2: the root's right child (node 2) is reached until interval death_interval - 1, then never;
    6,000 tokens go left every interval."""
    intervals, mus = [], []
    for i in range(n):
        right = max(800, 4_000 - 800 * i) if i < death_interval - 1 else 0
        intervals.append(np.array([[3_000, 3_000, right // 2, right - right // 2]]))
        mu0 = -0.1 - 0.3 * i  # the root's mean pre-activation drifts to the left side
        mus.append(np.array([[mu0, 0.0, 0.0]]))
    return write_run(tmp_path / "d.h5", 2, intervals, mu=mus, sigma=0.5)


def test_node_death_at_a_known_step(tmp_path: Path) -> None:
    """Node 2's last visits are at step 5 (interval 4). With K = 1 it dies at step 6; with K = 5 the first
    window that holds none of its visits is the one ending at step 10 (intervals 5..9), and the window
    ending at step 9 still holds 800 of 30,800 tokens (2.6%: neither under nor over δ·s = 2.5% provably)."""
    assert stats.beta.ppf(0.05, 800, 30_800 - 800 + 1) < 0.025 < stats.beta.ppf(0.95, 801, 30_800 - 800)
    ds = routescope.open(dying_run(tmp_path))
    for k, step in ((1, 6), (5, 10)):
        events = pruning_events(ds, Thresholds(persistence=k))
        died = events[(events.kind == "died") & (events.status == "event")].set_index("node")
        assert set(died.index) == {2, 5, 6}  # node 2 and its two leaves
        assert (died["step"] == step).all() and died.loc[2, "role"] == "pruned_root" and died.loc[2, "side"] == "right"
        assert set(died.loc[[5, 6], "role"]) == {"cascade"} and died.loc[2, "level"] == 1 and not died.loc[2, "leaf"]
        # K = 5: windows ending at steps 1..8 are live, the one ending at 9 (800 of 30,800) undetermined
        assert died.loc[5, "leaf"] and died.loc[2, "live_windows"] == (5 if k == 1 else 8)
        assert died.loc[2, "parent_drift_before"] < died.loc[2, "parent_drift_first"] < 0  # the root drifts away from it
        froze = events[events.kind == "froze"].set_index("node")
        assert froze.loc[0, "step"] == step and froze.loc[0, "side"] == "right" and froze.loc[0, "status"] == "event"
    ts = analysis.timeseries(ds, rolling=1)
    assert float(analysis.first_step_where(ts.dead_fraction, lambda x: x > 0)[0]) == 6
    assert ts.dead_fraction.sel(step=5).item() == 0 and ts.dead_fraction.sel(step=6).item() == pytest.approx(1 / 3)
    cumulative = analysis.timeseries(ds, rolling=None)
    assert (cumulative.dead_fraction.values == 0).all()  # node 2 was reached early on
    rolling3 = analysis.timeseries(ds, rolling=3)
    assert rolling3.dead_fraction.sel(step=7).item() == 0 and rolling3.dead_fraction.sel(step=8).item() > 0
    mu = analysis.node_drift(ds).sel(layer=0, tree=0, node=0).values
    np.testing.assert_allclose(mu, [-0.1 - 0.3 * i for i in range(16)])


def test_a_death_near_the_end_is_pending(tmp_path: Path) -> None:
    """Node 2's last visits at step 13 of 16: its dead stretch spans 3 < K windows (K = 1: a plain event)."""
    ds = routescope.open(dying_run(tmp_path, death_interval=14))
    events = pruning_events(ds, Thresholds(persistence=1)).set_index("node")
    assert events.loc[2, "status"] == "event" and events.loc[2, "step"] == 14
    # with K = 5, the first window without node 2's visits ends at step 18 > 16: not even pending yet
    assert 2 not in set(pruning_events(ds).node)
    ds = routescope.open(dying_run(tmp_path / "..", death_interval=10))  # windows clear of it end at 14, 15, 16
    pending = pruning_events(ds).set_index("node")
    assert pending.loc[2, "status"] == "pending" and pending.loc[2, "step"] == 14


def test_a_node_that_alternates_zero_and_busy_intervals_never_dies(tmp_path: Path) -> None:
    """Node 2 gets nothing in every other interval: each of those intervals alone is dead, no K-window is."""
    intervals = [np.array([[3_000, 3_000, 0 if i % 2 else 2_000, 0 if i % 2 else 2_000]]) for i in range(20)]
    ds = routescope.open(write_run(tmp_path / "a.h5", 2, intervals))
    per_interval = analysis.timeseries(ds, rolling=1).dead_fraction.values[:, 0]
    assert (per_interval[1::2] > 0).all() and (per_interval[::2] == 0).all()
    events = pruning_events(ds)
    assert not (events.kind == "died").any()


def test_one_interval_window_and_windows(tmp_path: Path) -> None:
    ds = routescope.open(dying_run(tmp_path))
    assert float(analysis.summarize(ds, (6, 7))["dead_fraction"][0]) == pytest.approx(1 / 3)
    assert float(analysis.summarize(ds, (1, 6))["dead_fraction"][0]) == 0
    for bad, message in [((7, 7), "empty or reversed"), ((9, 3), "empty or reversed"), ((100, None), "holds no interval")]:
        with pytest.raises(analysis.MetricsError, match=message):
            analysis.summarize(ds, bad)
    with pytest.raises(analysis.MetricsError, match="no layer 3"):
        analysis.summarize(ds, layers=[3])
    assert analysis.parse_window("5:") == (5, None) and analysis.parse_window("all") == (None, None)
    assert analysis.parse_window(None) == LAST_QUARTER
    with pytest.raises(analysis.MetricsError):
        analysis.parse_window("a:b")


@pytest.mark.parametrize("intervals, expected", [(1, 1), (3, 1), (4, 1), (5, 2), (16, 4), (30, 8)])
def test_the_default_window_is_the_last_quarter(tmp_path: Path, intervals: int, expected: int) -> None:
    ds = routescope.open(write_run(tmp_path / "q.h5", 1, [np.array([[500, 500]])] * intervals))
    s = analysis.summarize(ds)
    assert s.attrs["intervals"] == expected and s.attrs["window_last_step"] == intervals
    assert s.attrs["window_first_step"] == intervals - expected + 1 and s.attrs["window"] == "last-quarter"


def test_mutual_information(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 4, 4000)
    determined = write_run(tmp_path / "m.h5", 2, [np.full((1, 4), 1000)], traces=[(tokens, tokens)])
    independent = write_run(tmp_path / "i.h5", 2, [np.full((1, 4), 1000)], traces=[(tokens, rng.integers(0, 4, 4000))])
    mi = [float(analysis.mutual_information(routescope.open(p, group="traces"))[0]) for p in (determined, independent)]
    assert mi[0] == pytest.approx(2, abs=0.01) and abs(mi[1]) < 0.01


def _v2_tree(v: np.ndarray, r: np.ndarray, lv: np.ndarray, n: float, d: int) -> dict[str, float]:
    """The v2 metrics of one tree, written out here from DESIGN's formulas with scipy's beta quantiles."""
    units = np.concatenate([v, lv]).astype(float)
    level = np.floor(np.log2(np.arange(len(units)) + 1))
    share = 0.05 * 2.0**-level
    upper = np.where(units >= n, 1.0, stats.beta.ppf(0.95, units + 1, np.maximum(n - units, 1e-9)))
    lower = np.where(units <= 0, 0.0, stats.beta.ppf(0.05, np.maximum(units, 1e-9), n - units + 1))
    state = np.where(upper < share, "dead", np.where(lower > share, "live", "undetermined"))
    nodes = 2**d - 1
    live = state[:nodes] == "live"
    m = np.minimum(r, v - r).astype(float)
    frozen = live & (np.where(m >= v, 1.0, stats.beta.ppf(0.95, m + 1, np.maximum(v - m, 1e-9))) < 0.01)
    starve_right = frozen & (r < v - r)
    parent_live = np.array([False] + [state[(u - 1) // 2] == "live" for u in range(1, len(units))])
    roots = int(((state == "dead") & parent_live).sum())
    p = np.where(v > 0, r / np.maximum(v, 1), 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.nan_to_num(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
    return {
        "dead_fraction": np.mean(state[:nodes] == "dead"), "undetermined_fraction": np.mean(state[:nodes] == "undetermined"),
        "frozen_fraction": frozen.mean(), "zero_visit_fraction": np.mean(v == 0),
        "static_fraction": np.mean(state == "dead"), "pruned_roots": roots, "cascade_dead": int((state == "dead").sum()) - roots,
        "right_starved_share": starve_right.sum() / frozen.sum() if frozen.any() else np.nan,
        "routing_entropy": h[live].mean() if live.any() else np.nan,
        "balance": np.sum(v[live] * (1 - np.abs(2 * p[live] - 1))) / np.sum(v[live]) if live.any() else np.nan,
    }  # fmt: skip


@pytest.mark.parametrize("window", [None, "10:25", "all"])
def test_report_json_agrees_with_raw_counts(debug_run: Path, window: str | None) -> None:
    """`report --json` on a real run against a recomputation written here from the raw counts (v2 states)."""
    result = run_cli("report", str(debug_run), "--json", *(["--window", window] if window else []))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"schema_version", "window", "layers"} and report["report_version"] == 2
    assert report["thresholds"] == {"delta": 0.05, "alpha": 0.05, "epsilon": 0.01, "persistence": 5}
    with h5py.File(debug_run, "r") as f:
        steps = f["tree/step"][:]
        if window is None:  # the last quarter of the intervals, at least one
            keep = np.arange(len(steps)) >= len(steps) - max(1, math.ceil(len(steps) / 4))
        elif window == "all":
            keep = np.ones(len(steps), dtype=bool)
        else:
            keep = (steps >= 10) & (steps < 25)
        visits = f["tree/node_visits"][keep].sum(0)  # (layer, tree, node)
        right = f["tree/node_right"][keep].sum(0)
        leaves = f["tree/leaf_visits"][keep].sum(0)
        tokens = float(f["tree/tokens"][keep].sum())
        depths = f["tree/layer_depth"][:]
    assert report["window"]["intervals"] == keep.sum() and report["window"]["first_step"] == steps[keep][0]
    for entry in report["layers"]:
        layer, d = entry["layer"], int(depths[entry["layer"]])
        assert {"layer", "family", "depth", "trees"} <= set(entry) and entry["depth"] == d
        per_tree = [_v2_tree(visits[layer, t, : 2**d - 1], right[layer, t, : 2**d - 1], leaves[layer, t, : 2**d], tokens, d)
                    for t in range(entry["trees"])]  # fmt: skip
        for key in per_tree[0]:
            values = np.array([tree[key] for tree in per_tree], dtype=float)
            expected = np.nanmean(values) if np.isfinite(values).any() else None
            assert entry[key] == (None if expected is None else pytest.approx(expected, rel=1e-9, abs=1e-12)), key
        q = leaves[layer, :, : 2**d] / leaves[layer, :, : 2**d].sum(-1, keepdims=True)
        leaf_h = -np.sum(np.where(q > 0, q * np.log2(np.where(q > 0, q, 1)), 0), -1) / d
        assert entry["leaf_entropy_norm"] == pytest.approx(leaf_h[: entry["trees"]].mean(), rel=1e-12)


@pytest.mark.parametrize("args,message", [(["--window", "20:10"], "reversed"), (["--window", "900:"], "no interval"),
                                          (["--layer", "7"], "no layer 7"), (["--window", "x"], "START:END")])  # fmt: skip
def test_report_bad_selection_is_one_line(debug_run: Path, args: list[str], message: str) -> None:
    result = run_cli("report", str(debug_run), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_report_compares_runs(debug_run: Path) -> None:
    result = run_cli("report", str(debug_run), str(debug_run), "--json")
    assert result.returncode == 0 and len(json.loads(result.stdout)["runs"]) == 2
