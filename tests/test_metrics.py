"""Metrics on runs built by construction, whose answers are known by hand (DESIGN.md, "Metrics")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

import routescope
from routescope import analysis
from routescope.analysis.events import early_warnings, pruning_events
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


def layer_summary(path: Path, window=(None, None)) -> dict[str, float]:
    s = analysis.summarize(routescope.open(path), window)
    return {name: float(s[name].values[0]) for name in analysis.TREE_METRICS}


def test_perfectly_balanced_tree(tmp_path: Path) -> None:
    depth = 4
    s = layer_summary(write_run(tmp_path / "b.h5", depth, [np.full((2, 16), 7)] * 3))
    assert s["routing_entropy"] == pytest.approx(1) and s["balance"] == pytest.approx(1)
    assert s["leaf_entropy_norm"] == pytest.approx(1) and s["effective_leaves"] == pytest.approx(16)
    assert s["dead_fraction"] == 0 and s["frozen_fraction"] == 0 and s["static_fraction"] == 0
    assert s["leaf_gini"] == pytest.approx(0)
    assert s["active_fraction"] == pytest.approx(5 / 31) and s["firing_fraction"] == pytest.approx(1)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_right_subtree_never_visited(tmp_path: Path, depth: int) -> None:
    leaves = np.zeros((1, 2**depth), dtype=np.int64)
    leaves[0, : 2 ** (depth - 1)] = 10  # the left half of the leaves: root always goes left
    s = layer_summary(write_run(tmp_path / "r.h5", depth, [leaves]))
    d = depth
    assert s["dead_fraction"] == pytest.approx((2 ** (d - 1) - 1) / (2**d - 1))
    assert s["frozen_fraction"] == pytest.approx(1 / (2**d - 1))  # the root: live, p = 0
    assert s["routing_entropy"] == pytest.approx((d - 1) / d) and s["balance"] == pytest.approx((d - 1) / d)
    assert s["leaf_entropy_norm"] == pytest.approx((d - 1) / d)
    assert s["effective_leaves"] == pytest.approx(2 ** (d - 1))
    assert s["static_fraction"] == pytest.approx((2 ** (d - 1) - 1 + 2 ** (d - 1)) / (2 ** (d + 1) - 1))
    assert s["leaf_gini"] == pytest.approx(0.5)
    per_depth = analysis.summarize(routescope.open(tmp_path / "r.h5"))
    np.testing.assert_allclose(per_depth["depth_frozen_fraction"].values[0], [1] + [0] * (d - 1))
    np.testing.assert_allclose(per_depth["depth_dead_fraction"].values[0], [0] + [0.5] * (d - 1))
    np.testing.assert_allclose(per_depth["depth_routing_entropy"].values[0], [0] + [1] * (d - 1))


def test_frozen_root_and_edge_probabilities(tmp_path: Path) -> None:
    s = layer_summary(write_run(tmp_path / "f.h5", 1, [np.array([[995, 5]])]))
    h = -(0.005 * math.log2(0.005) + 0.995 * math.log2(0.995))
    assert s["frozen_fraction"] == 1 and s["dead_fraction"] == 0
    assert s["routing_entropy"] == pytest.approx(h) and s["balance"] == pytest.approx(0.01)
    assert analysis.binary_entropy(np.array([0.0, 1.0, 0.5, np.nan])).tolist()[:3] == [0, 0, 1]
    # p = 0.02 is not frozen at the default epsilon, but is at epsilon = 0.05
    path = write_run(tmp_path / "g.h5", 1, [np.array([[98, 2]])])
    assert layer_summary(path)["frozen_fraction"] == 0
    assert float(analysis.summarize(routescope.open(path), epsilon=0.05)["frozen_fraction"][0]) == 1


def test_uniform_random_router(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    leaves = rng.multinomial(2_000_000, np.full(32, 1 / 32), size=3)
    s = layer_summary(write_run(tmp_path / "u.h5", 5, [leaves]))
    assert s["leaf_entropy_norm"] == pytest.approx(1, abs=1e-4) and s["balance"] > 0.99
    assert s["routing_entropy"] == pytest.approx(1, abs=1e-4) and s["leaf_gini"] < 0.01


def test_routing_entropy_equals_normalised_leaf_entropy_by_the_chain_rule(tmp_path: Path) -> None:
    leaves = np.random.default_rng(1).integers(0, 50, size=(3, 64))
    s = layer_summary(write_run(tmp_path / "c.h5", 6, [leaves]))
    assert s["routing_entropy"] == pytest.approx(s["leaf_entropy_norm"], rel=1e-12)


def test_leaf_mlp_static_and_active_fractions(tmp_path: Path) -> None:
    leaves = np.array([[5, 0, 5, 5, 0, 0, 5, 5]])
    s = layer_summary(write_run(tmp_path / "l.h5", 3, [leaves], variant="leaf_mlp", fires=0.5))
    assert s["static_fraction"] == pytest.approx(3 / 8) and s["active_fraction"] == pytest.approx(1 / 8)
    assert s["firing_fraction"] == pytest.approx(0.5)


def dying_run(tmp_path: Path, death_interval: int = 6, n: int = 12) -> Path:
    """Depth 2: root's right child (node 2) is reached until interval death_interval - 1, then never."""
    intervals, mus = [], []
    for i in range(n):
        right = max(0, 40 - 8 * i) if i < death_interval - 1 else 0
        intervals.append(np.array([[30, 30, right // 2, right - right // 2]]))
        mu0 = -0.1 - 0.3 * i  # the root's mean pre-activation drifts to the left side
        mus.append(np.array([[mu0, 0.0, 0.0]]))
    return write_run(tmp_path / "d.h5", 2, intervals, mu=mus, sigma=0.5)


def test_node_death_at_a_known_step(tmp_path: Path) -> None:
    ds = routescope.open(dying_run(tmp_path))
    events = pruning_events(ds)
    died = events[events.kind == "died"].set_index("node")
    assert set(died.index) == {2}  # its children are leaves, not decision nodes
    assert died.loc[2, "step"] == 6 and died.loc[2, "depth"] == 1 and not died.loc[2, "parent_died_same_step"]
    assert died.loc[2, "live_intervals"] == 5
    froze = events[events.kind == "froze"].set_index("node")
    assert froze.loc[0, "step"] == 6  # from step 6 on the root sends every token left
    ts = analysis.timeseries(ds, rolling=1)
    assert float(analysis.first_step_where(ts.dead_fraction, lambda x: x > 0)[0]) == 6
    assert ts.dead_fraction.sel(step=5).item() == 0 and ts.dead_fraction.sel(step=6).item() == pytest.approx(1 / 3)
    cumulative = analysis.timeseries(ds, rolling=None)
    assert (cumulative.dead_fraction.values == 0).all()  # node 2 was reached early on
    rolling3 = analysis.timeseries(ds, rolling=3)
    assert rolling3.dead_fraction.sel(step=7).item() == 0 and rolling3.dead_fraction.sel(step=8).item() > 0
    mu = analysis.node_drift(ds).sel(layer=0, tree=0, node=0).values
    np.testing.assert_allclose(mu, [-0.1 - 0.3 * i for i in range(12)])


def test_one_interval_window_and_windows(tmp_path: Path) -> None:
    ds = routescope.open(dying_run(tmp_path))
    assert float(analysis.summarize(ds, (6, 7))["dead_fraction"][0]) == pytest.approx(1 / 3)
    assert float(analysis.summarize(ds, (1, 6))["dead_fraction"][0]) == 0
    for bad, message in [((7, 7), "empty or reversed"), ((9, 3), "empty or reversed"), ((100, None), "holds no interval")]:
        with pytest.raises(analysis.MetricsError, match=message):
            analysis.summarize(ds, bad)
    with pytest.raises(analysis.MetricsError, match="no layer 3"):
        analysis.summarize(ds, layers=[3])
    assert analysis.parse_window("5:") == (5, None) and analysis.parse_window(None) == (None, None)
    with pytest.raises(analysis.MetricsError):
        analysis.parse_window("a:b")


def test_early_warning_flags_the_starving_child(tmp_path: Path) -> None:
    warning = early_warnings(routescope.open(dying_run(tmp_path)), horizon=4, lookback=3)
    assert warning.deaths == 1 and warning.predicted == 1
    assert list(warning.flags["child"]) == [2] and warning.precision == 1 and warning.recall == 1


def test_mutual_information(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 4, 4000)
    determined = write_run(tmp_path / "m.h5", 2, [np.full((1, 4), 1000)], traces=[(tokens, tokens)])
    independent = write_run(tmp_path / "i.h5", 2, [np.full((1, 4), 1000)], traces=[(tokens, rng.integers(0, 4, 4000))])
    mi = [float(analysis.mutual_information(routescope.open(p, group="traces"))[0]) for p in (determined, independent)]
    assert mi[0] == pytest.approx(2, abs=0.01) and abs(mi[1]) < 0.01


def test_report_json_agrees_with_raw_counts(debug_run: Path) -> None:
    """`report --json` on a real run against a recomputation written here from the raw counts."""
    result = run_cli("report", str(debug_run), "--json", "--window", "10:25")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"schema_version", "window", "layers"}
    with h5py.File(debug_run, "r") as f:
        steps = f["tree/step"][:]
        keep = (steps >= 10) & (steps < 25)
        visits = f["tree/node_visits"][keep].sum(0)  # (layer, tree, node)
        right = f["tree/node_right"][keep].sum(0)
        leaves = f["tree/leaf_visits"][keep].sum(0)
        depths = f["tree/layer_depth"][:]
    assert report["window"]["intervals"] == keep.sum()
    for entry in report["layers"]:
        layer, d = entry["layer"], int(depths[entry["layer"]])
        assert {"layer", "family", "depth", "trees"} <= set(entry) and entry["depth"] == d
        dead, bal, leaf_h, static = [], [], [], []
        for t in range(entry["trees"]):
            v, r, lv = visits[layer, t, : 2**d - 1], right[layer, t, : 2**d - 1], leaves[layer, t, : 2**d]
            dead.append(np.mean(v == 0))
            live = v > 0
            p = r[live] / v[live]
            bal.append(np.sum(v[live] * (1 - np.abs(2 * p - 1))) / np.sum(v[live]))
            q = lv[lv > 0] / lv.sum()
            leaf_h.append(-np.sum(q * np.log2(q)) / d)
            static.append((np.sum(v == 0) + np.sum(lv == 0)) / (2 ** (d + 1) - 1))
        assert entry["dead_fraction"] == pytest.approx(np.mean(dead), abs=1e-6)
        assert entry["balance"] == pytest.approx(np.mean(bal), abs=1e-6)
        assert entry["leaf_entropy_norm"] == pytest.approx(np.mean(leaf_h), abs=1e-6)
        assert entry["static_fraction"] == pytest.approx(np.mean(static), abs=1e-6)


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
