"""Dashboard views of the L1 and MoE families: figures on inputs with known answers, the Dashboard's
callback bodies on real debug-l1 / debug-moe runs and a mixed-family run, and `routescope dash` on
an L1-only file."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import plotly.graph_objects as go
import pytest

import routescope
from routescope import analysis as metrics
from routescope.analysis.calibrated import PERSISTENCE
from routescope.dashboards import figures_families as FF
from routescope.dashboards import sources
from routescope.dashboards.app import create_app
from routescope.store import LayerLayout
from routescope.store.schema import active_bin_edges
from routescope.store.writer import RunWriter

# ---- figures on known answers ---------------------------------------------------------------------------


def test_uniform_load_has_cv_zero_and_flat_bars_at_the_uniform_level() -> None:
    """4 experts, k = 2, 100 tokens, every expert chosen 50 times: CV 0 (routescope.analysis), bars at 1/4."""
    counts = {"tokens": np.float64(100), "expert_tokens": np.full(4, 50), "dropped_tokens": np.int64(0),
              "coselect": np.diag(np.full(4, 50)), "router_entropy_sum": np.float64(200)}  # fmt: skip
    values = metrics.moe_metrics_numpy(counts, 4, 2)
    assert values["load_cv"] == 0 and values["max_mean_load"] == 1
    share = values["tokens_per_expert"] / (2 * 100)
    fig = FF.expert_load_bars(share, share, 7, "moe layer 0", float(values["load_cv"]), float(values["max_mean_load"]))
    bars = next(t for t in fig.data if isinstance(t, go.Bar))
    assert list(bars.y) == [0.25] * 4
    assert [s.y0 for s in fig.layout.shapes] == [0.25]  # the uniform line
    assert "load CV 0.000" in fig.layout.title.text and "max/mean 1.00" in fig.layout.title.text
    assert "dead" not in fig.layout.title.text and fig.layout.yaxis.title.text == "share of k·tokens"


def test_dead_expert_shows_as_zero_in_red() -> None:
    processed, selected = np.array([0.5, 0.3, 0.2, 0.0]), np.array([0.55, 0.3, 0.15, 0.0])
    fig = FF.expert_load_bars(processed, selected, 3, "moe layer 1", 0.5, 2.2)
    bars = next(t for t in fig.data if isinstance(t, go.Bar))
    assert bars.y[3] == 0 and bars.marker.color[3] == FF.DEAD_COLOR and bars.marker.color[0] != FF.DEAD_COLOR
    diamonds = next(t for t in fig.data if isinstance(t, go.Scatter))
    np.testing.assert_allclose(diamonds.y, selected)  # the router's ask, before capacity drops
    assert "1 dead" in fig.layout.title.text


def test_expert_load_heatmap_is_expert_by_step_around_uniform() -> None:
    share = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.3, 0.0]])  # (step, expert)
    fig = FF.expert_load_heatmap(np.array([10, 20, 30]), share, "moe layer 0")
    heat = fig.data[0]
    np.testing.assert_allclose(heat.z, share.T)
    assert list(heat.x) == [10, 20, 30] and list(heat.y) == [0, 1, 2, 3]
    assert heat.zmid == 0.25 and heat.z[3][0] == 0  # a dead expert is 0 (the far end of the scale)
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "expert"


def test_coselect_heatmap_blanks_the_diagonal() -> None:
    coselect = np.array([[60, 20, 40], [20, 30, 10], [40, 10, 50]])  # 70 tokens, k = 2
    heat = FF.coselect_heatmap(coselect, 70, 5, "moe layer 0").data[0]
    z = np.array(heat.z, dtype=float)
    assert np.isnan(np.diag(z)).all()
    assert z[0, 2] == pytest.approx(40 / 70) and z[1, 0] == pytest.approx(20 / 70)
    assert "chosen by 60 tokens" in heat.text[0][0]


def test_active_units_histogram_uses_the_given_edges_on_a_log_axis() -> None:
    edges = active_bin_edges(64)
    counts = np.zeros(len(edges) - 1)
    counts[[0, 3, 20]] = [5, 10, 2]
    fig = FF.active_units_histogram(edges, counts, 9, "l1 layer 0", mean=3.5)
    trace = fig.data[0]
    lows, highs = np.array(trace.customdata, dtype=float).T
    np.testing.assert_array_equal(lows, edges)  # each bin spans the file's edges: [lows[b], lows[b+1])
    np.testing.assert_array_equal(highs[:-1], edges[1:])
    assert trace.x[0] == 0.5 and list(trace.x[1:]) == list(edges[1:])  # bin 0 (no active unit) drawn from 0.5
    assert list(trace.y[:-1]) == list(counts) and trace.line.shape == "hv"
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.ticktext[0] == "0"
    assert list(fig.data[1].x) == [3.5, 3.5] and fig.data[1].name == "mean 3.5"  # the exact mean
    assert edges[21] - edges[20] == 2 and f"{edges[20]}–{edges[21] - 1} active units: 2 tokens" in trace.text[20]
    with pytest.raises(ValueError, match="edges"):
        FF.active_units_histogram(edges[:-1], counts, 9, "l1 layer 0")


def test_unit_firing_rates_sorted_with_dead_units() -> None:
    fig = FF.unit_firing_rates(np.array([0.1, 0.0, 0.5, 0.2]), 4, "l1 layer 0")
    trace = fig.data[0]
    assert list(trace.y) == [0.5, 0.2, 0.1, 0.0] and list(trace.customdata) == [2, 3, 0, 1]
    assert trace.marker.color[-1] == FF.DEAD_COLOR and "1 of 4 units dead" in fig.layout.title.text


def test_family_curves_one_panel_per_group() -> None:
    steps = np.array([1, 2, 3])
    curves = {name: np.arange(3.0) + i for i, name in enumerate(metrics.L1_METRICS)}
    fig = FF.family_curves(steps, curves, FF.L1_PANELS, "L1")
    assert [t.name for t in fig.data] == ["mean", "p50", "p99", "dead units", "active fraction"]
    assert [a.text for a in fig.layout.annotations] == [p[0] for p in FF.L1_PANELS]
    assert fig.layout.yaxis3.title.text == "share of d_hidden" and fig.layout.xaxis3.title.text == "step"


# ---- the Dashboard on real runs ---------------------------------------------------------------------------


@pytest.fixture
def runs(family_runs: dict[str, Path]) -> dict[str, Path]:
    """debug-l1 and debug-moe, recorded once per session (conftest)."""
    return family_runs


def _tab_values(app) -> list[str]:
    tabs = next(c for c in app.layout.children if getattr(c, "id", None) == "tabs")
    return [t.value for t in tabs.children]


def test_l1_views_match_the_file(runs: dict[str, Path]) -> None:
    app = create_app([runs["l1"]])
    assert _tab_values(app) == ["l1"]
    board = app.board
    with h5py.File(runs["l1"], "r") as f:
        g = f["l1"]
        edges, units = g["active_hist"].attrs["bin_edges"], int(g["layer_units"][1])
        hist, fires, tokens = g["active_hist"][2, 1], g["unit_fires"][2, 1], g["layer_tokens"][2, 1]
        steps = g["step"][:]
    hist_fig, rates_fig = board.l1_at_step(0, 1, 2)
    trace = hist_fig.data[0]
    bins = len(active_bin_edges(units)) - 1
    np.testing.assert_array_equal(np.array(trace.customdata)[:, 0], edges[: bins + 1])  # the file's edges
    np.testing.assert_array_equal(trace.y[:-1], hist[:bins])
    assert f"step {steps[2]}" in hist_fig.layout.title.text
    np.testing.assert_allclose(rates_fig.data[0].y, np.sort(fires / tokens)[::-1])
    series = metrics.family_timeseries(routescope.open(runs["l1"], group="l1"), "l1", rolling=PERSISTENCE)  # the dashboard draws rolling K-interval windows
    curves = board.l1_over_training(0, 1)
    mean = next(t for t in curves.data if t.name == "mean")
    np.testing.assert_allclose(mean.y, series.active_mean.values[:, 1])
    assert list(mean.x) == list(steps)
    assert board.l1_at_step(0, 0, None)[0].layout.title.text.endswith(f"step {steps[-1]}")  # no step: the newest


def test_moe_views_match_the_file(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "FAMILY_BLOCK", 4)  # the curves computed in blocks equal one whole-run call
    app = create_app([runs["moe"]])
    assert _tab_values(app) == ["moe"]
    board = app.board
    with h5py.File(runs["moe"], "r") as f:
        g = f["moe"]
        k, experts = int(g["layer_k"][0]), int(g["layer_experts"][0])
        processed, tokens = g["expert_tokens"][:, 0].astype(float), g["layer_tokens"][:, 0].astype(float)
        coselect = g["coselect"][1, 0]
    share = processed / (k * tokens[:, None])
    bars, cosel = board.moe_at_step(0, 0, 1)
    np.testing.assert_allclose(next(t for t in bars.data if isinstance(t, go.Bar)).y, share[1])
    np.testing.assert_allclose(next(t for t in bars.data if isinstance(t, go.Scatter)).y, np.diag(coselect) / (k * tokens[1]))
    assert bars.layout.shapes[0].y0 == pytest.approx(1 / experts)
    series = metrics.family_timeseries(routescope.open(runs["moe"], group="moe"), "moe", rolling=1)  # one interval
    assert f"load CV {series.load_cv.values[1, 0]:.3f}" in bars.layout.title.text
    np.testing.assert_allclose(np.array(cosel.data[0].z, dtype=float)[0, 1], coselect[0, 1] / tokens[1])
    heatmap, curves = board.moe_over_training(0, 0)
    np.testing.assert_allclose(heatmap.data[0].z, share.T)
    rolling = metrics.family_timeseries(routescope.open(runs["moe"], group="moe"), "moe", rolling=PERSISTENCE)
    for name in ("load_cv", "max_mean_load", "dead_experts", "router_entropy", "drop_fraction"):
        trace = next(t for t in curves.data if t.name == FF.CURVE_NAMES[name])  # curves: rolling K-interval windows
        np.testing.assert_allclose(trace.y, getattr(rolling, name).values[:, 0], equal_nan=True)


def test_moe_balance_view_draws_the_audit(tmp_path: Path) -> None:
    """The MoE tab's balance-loss panel: the loss the recorded routing implies, the reported one, and the audit's
    verdict, for a `record` run with a balance coefficient."""
    from dataclasses import replace

    from routescope.analysis.balance_audit import balance_audit, recomputed_balance
    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import train

    cfg = get_preset("debug-moe", steps=8, record_every=2)
    cfg = replace(cfg, model=replace(cfg.model, balance_coef=0.01), batch_size=32)
    path = tmp_path / "moe.h5"
    train(cfg, out=path, device="cpu", show_progress=False)
    fig = create_app([path]).board.moe_balance(0)
    moe, run = routescope.open(path, group="moe"), routescope.open(path, group="run")
    implied = next(t for t in fig.data if t.name.startswith("implied"))
    np.testing.assert_allclose(implied.y, 0.01 * recomputed_balance(moe).sum(1))
    reported = next(t for t in fig.data if t.name.startswith("reported"))
    np.testing.assert_allclose(reported.y, run["balance_loss"].values)
    assert balance_audit(moe, run)["status"] == "ok" and "matches" in fig.layout.title.text


def test_views_of_a_family_a_run_lacks_say_so(runs: dict[str, Path]) -> None:
    app = create_app([runs["l1"], runs["moe"]])
    assert _tab_values(app) == ["l1", "moe"]
    board = app.board
    for fig in (*board.moe_at_step(0, 0, None), *board.l1_at_step(1, 0, None), board.l1_over_training(1, 0),
                board.moe_balance(0)):
        assert not fig.data and "has no" in fig.layout.annotations[0].text
    assert "layers 0..1 only" in board.l1_over_training(0, 7).layout.annotations[0].text
    assert "has no tree layers (see the L1 units tab)" in board.paths(0, 0, None, False).layout.annotations[0].text


def test_mixed_run_keeps_the_tree_views(tmp_path: Path) -> None:
    """A model with a tree, an L1 and an MoE layer: every tab appears and every view draws."""
    import torch
    from torch import nn

    from routescope import Recorder
    from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN

    torch.manual_seed(0)
    model = nn.ModuleDict({"tree": TreeFFN(8, 8, depth=2, trees=2), "l1": L1SparseFFN(8, 16, 8), "moe": TopKMoE(8, 8, experts=4, k=2)})
    path = tmp_path / "mixed.h5"
    with Recorder(model, path, every=1, sample_tokens=0) as rec:
        for _ in range(3):
            x = torch.randn(20, 8)
            for layer in model.values():
                layer(x)
            rec.step()
    app = create_app([path])
    assert _tab_values(app) == ["paths", "tree", "curves", "drift", "tokens", "compare", "l1", "moe"]
    board = app.board
    counts = next(t for t in board.paths(0, 0, 1, False).data if isinstance(t, go.Bar)).y
    assert sum(counts) == 20  # tree 0's leaves at the second interval: every token once
    assert any(isinstance(t, go.Icicle) for t in board.tree(0, 0, 1, None, "visits").data)
    assert board.l1_at_step(0, 0, 1)[0].data and board.moe_at_step(0, 0, 1)[0].data
    assert board.moe_over_training(0, 0)[0].data[0].z is not None


def _l1_rows(n: int) -> list[dict[str, np.ndarray]]:
    """n intervals of one 4-unit L1 layer: interval i has 10 tokens, each firing units 0..i % 4."""
    bins = len(active_bin_edges(4)) - 1
    rows = []
    for i in range(n):
        active = i % 4 + 1
        hist = np.zeros((1, bins), dtype=np.int64)
        hist[0, active] = 10  # bins are one unit wide this low
        fires = np.zeros((1, 4), dtype=np.int64)
        fires[0, :active] = 10
        rows.append({"tokens": np.int64(10), "layer_tokens": np.array([10]), "unit_fires": fires,
                     "active_sum": np.array([10 * active]), "active_hist": hist})  # fmt: skip
    return rows


def _write_l1(path: Path, n: int) -> None:
    writer = RunWriter(path, [LayerLayout("mlp", config={"d_hidden": 4}, family="l1")], {}, overwrite=True)
    for i, row in enumerate(_l1_rows(n)):
        writer.append_interval(10 * (i + 1), None, {}, groups={"l1": row})
    writer.close()


def test_l1_views_follow_a_growing_file(tmp_path: Path) -> None:
    """The views re-open the file when it changes and extend their cached curves with the new intervals."""
    path = tmp_path / "live.h5"
    _write_l1(path, 2)
    board = create_app([path], interval_s=0.1).board
    # rolling windows of K = 5 intervals: the mean active units of intervals 1..i (1, 2, 3, 4 alone)
    assert list(board.l1_over_training(0, 0).data[0].y) == [1, 1.5]
    grown = tmp_path / "grown.h5"
    _write_l1(grown, 4)
    os.replace(grown, path)
    _, changed = board.tick()
    assert changed and board.slider(0, None, None)[0] == 3
    assert list(board.l1_over_training(0, 0).data[0].y) == [1, 1.5, 2, 2.5]  # new windows reach back into old rows
    assert "step 40" in board.l1_at_step(0, 0, 3)[0].layout.title.text


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_dash_serves_an_l1_only_run(runs: dict[str, Path]) -> None:
    """`routescope dash` on a file with only L1 layers starts and its layout holds the L1 tab only; the real
    server answers raw traversal requests (not normalised by a client) with 404."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, "-m", "routescope.cli", "dash", str(runs["l1"]), "--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, layout = time.time() + 60, None
        while time.time() < deadline and layout is None:
            try:
                layout = urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
        assert layout is not None, "the dashboard did not answer"
        for raw in ("/_dash-component-suites/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"):  # sent as is
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", raw)
            assert conn.getresponse().status == 404, raw
            conn.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    text = json.dumps(json.loads(layout))
    assert "l1-hist-graph" in text and "paths-graph" not in text and "moe-bars-graph" not in text
    assert "Traceback" not in err and f"http://127.0.0.1:{port}/" in out


# ---- compare runs (L1 / MoE) --------------------------------------------------------------------------------


def test_family_compare_draws_each_run_as_its_file_says(tmp_path: Path, runs: dict[str, Path]) -> None:
    """Two runs of different configurations: one line each, equal to the file's own per-interval metric."""
    synthetic = tmp_path / "synthetic.h5"
    _write_l1(synthetic, 4)  # mean active units per token: 1, 2, 3, 4
    app = create_app([synthetic, runs["l1"]])
    ids = {getattr(c, "id", None) for tab in next(c for c in app.layout.children if getattr(c, "id", None) == "tabs").children
           for c in tab.children}  # fmt: skip
    assert "l1-compare-graph" in ids
    fig = app.board.family_compare("l1", "active_mean", 0)
    assert len(fig.data) == 2 and "l1 layer 0" in fig.layout.title.text
    by_steps = {tuple(t.x): list(t.y) for t in fig.data}
    assert by_steps[(10, 20, 30, 40)] == [1, 1.5, 2, 2.5]  # rolling K = 5 windows of intervals with 1, 2, 3, 4
    real = metrics.family_timeseries(routescope.open(runs["l1"], group="l1"), "l1", rolling=PERSISTENCE)  # the dashboard draws rolling K-interval windows
    np.testing.assert_allclose(by_steps[tuple(real.step.values)], real.active_mean.values[:, 0])
    # layer 1 exists in the preset's run only: one line; a layer no run has: a message, no trace
    assert len(app.board.family_compare("l1", "active_mean", 1).data) == 1
    assert not app.board.family_compare("l1", "active_mean", 7).data


def test_family_compare_groups_seeds_into_mean_and_band(tmp_path: Path, runs: dict[str, Path]) -> None:
    """Runs of one configuration (here: copies of one MoE run) are one group: a band and the mean, which
    equals each run's curve when they agree."""
    copies = [tmp_path / f"seed{i}.h5" for i in range(2)]
    for copy in copies:
        shutil.copy(runs["moe"], copy)
    fig = create_app(copies).board.family_compare("moe", "load_cv", 0)
    names = [t.name for t in fig.data]
    assert len(fig.data) == 2 and any("mean of 2" in n for n in names) and any("min–max of 2" in n for n in names)
    mean = next(t for t in fig.data if "mean of 2" in t.name)
    real = metrics.family_timeseries(routescope.open(runs["moe"], group="moe"), "moe", rolling=PERSISTENCE)  # the dashboard draws rolling K-interval windows
    np.testing.assert_allclose(mean.y, real.load_cv.values[:, 0])
