"""Dashboard bugs a new user hit, each reproduced through the Dashboard methods or the figure builders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from conftest import walk_components

from routescope.dashboards import figures as F
from routescope.dashboards import figures_families as FF
from routescope.dashboards.app import Dashboard, create_app


def test_log_scale_path_usage_keeps_its_axis() -> None:
    """Counts up to 300 with empty leaves: the log axis spans them (not 1..10^126) and the uniform label sits
    on the uniform line, in the log10 units plotly wants for labels."""
    counts = np.array([[300.0, 0, 50, 2, 0, 8, 0, 0]])
    fig = F.path_usage(counts, 10, 0, log=True)
    low, high = fig.layout.yaxis.range
    assert fig.layout.yaxis.type == "log" and low < 0 < np.log10(2) and np.log10(300) < high < np.log10(300) + 1
    uniform = counts.sum() / 8
    (label,) = [a for a in fig.layout.annotations if a.text == "uniform"]
    assert label.y == pytest.approx(np.log10(uniform)) and fig.layout.shapes[0].y0 == pytest.approx(uniform)
    linear = F.path_usage(counts, 10, 0, log=False)
    assert [a.y for a in linear.layout.annotations if a.text == "uniform"] == [pytest.approx(uniform)]


def test_tree_dropdown_acts_on_path_usage(debug_run: Path) -> None:
    board = Dashboard([debug_run])
    plain = board.paths(0, 0, None, False)
    assert {bar.opacity for bar in plain.data} == {1.0}
    picked = board.paths(0, 0, None, False, tree=1)
    assert [bar.opacity for bar in picked.data] == [0.25, 1.0] and "tree 1" in picked.layout.title.text


def test_slider_shows_steps_from_the_start_and_has_no_index_box(debug_run: Path) -> None:
    app = create_app([debug_run])
    slider = next(c for c in walk_components(app.layout) if getattr(c, "id", None) == "step")
    steps = app.board.sources[0].steps
    assert slider.marks and set(slider.marks.values()) <= {str(int(s)) for s in steps} and str(int(steps[-1])) in slider.marks.values()
    assert getattr(slider, "allow_direct_input", False) is False


def test_tokens_tab_on_a_run_without_trees(family_runs: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "l1.h5"
    shutil.copy(family_runs["l1"], path)
    items, fig = Dashboard([path]).tokens(0, 0, 0, 0, "")
    assert "has no tree layers" in str(items[0].children) and isinstance(fig, go.Figure)


def test_dense_baseline_loss_is_shown_and_compared(debug_run: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    dense = tmp_path / "dense.h5"
    assert run_cli("record", "--config", "shakespeare-dense", "--steps", "4", "--every", "2", "--out", str(dense),
                   "--device", "cpu").returncode == 0  # fmt: skip
    board = Dashboard([debug_run, dense])
    _, lines = board.curves(1, "train_loss", None)
    assert lines.data and len(lines.data[0].y) == 2  # the dense run's two intervals
    compared = board.compare("train_loss", None)
    assert {trace.name for trace in compared.data} == {src.label for src in board.sources}


def test_drift_opens_below_the_root_and_marks_warnings_on_the_child() -> None:
    from routescope.dashboards.tree_views import DRIFT_NODES

    assert 0 not in DRIFT_NODES
    steps = np.arange(1, 6) * 10
    mu = np.zeros((5, 7))
    warnings = pd.DataFrame({"step": [30], "layer": [0], "tree": [0], "node": [0], "child": [2]})
    on_root = F.drift_figure(steps, mu, [0], 0, 0, None, warnings)
    assert not [t for t in on_root.data if t.name == "early warning"]
    on_child = F.drift_figure(steps, mu, [2], 0, 0, None, warnings)
    assert [list(t.x) for t in on_child.data if t.name == "early warning"] == [[30]]


def test_messages_do_not_repeat_run(family_runs: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "run.h5"  # the label of a file called run.h5 is "run"
    shutil.copy(family_runs["moe"], path)
    fig = Dashboard([path]).l1_over_training(0, 0)
    assert fig.layout.annotations[0].text == "run has no l1 layers"


def test_moe_titles_fit_and_say_the_interval_sums_steps() -> None:
    bars = FF.expert_load_bars(np.full(8, 0.125), np.full(8, 0.125), 40, "moe layer 1 (blocks.1.mlp)", 0.0, 1.0, steps=10)
    cosel = FF.coselect_heatmap(np.ones((8, 8)), 100.0, 40, "moe layer 1 (blocks.1.mlp)")
    for fig in (bars, cosel):
        assert max(len(line) for line in fig.layout.title.text.replace("<sup>", "").replace("</sup>", "").split("<br>")) <= 90
    assert "10 steps ending at step 40, summed" in bars.layout.title.text
    heatmap = FF.expert_load_heatmap(np.arange(1, 4) * 10, np.full((3, 8), 0.125), "moe layer 1", 10)
    assert "each column sums 10 steps" in heatmap.layout.title.text
