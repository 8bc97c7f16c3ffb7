"""The dashboard's sources and app without a browser, on a real run: views, slider, labels, seed groups,
and the server's refusal of anything but the app and the files named at start."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from conftest import walk_components

import routescope
from routescope.analysis import WarningReport
from routescope.analysis.calibrated import DEAD, LIVE, UNDETERMINED, Thresholds
from routescope.analysis.window import LAST_QUARTER
from routescope.dashboards import figures as F
from routescope.dashboards.app import METRIC_LABELS, Dashboard, create_app, is_loopback
from routescope.dashboards.labels import seed_groups, unique_labels
from routescope.dashboards.server_safety import is_traversal

# ---- 9. labels and seed groups -------------------------------------------------------------------------


def test_unique_labels(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same_name = [tmp_path / "a" / "run.h5", tmp_path / "b" / "run.h5"]
    labels = unique_labels(same_name)
    assert len(set(labels)) == 2
    assert labels == ["a/run", "b/run"]
    assert unique_labels([tmp_path / "x.h5", tmp_path / "y.h5"]) == ["x", "y"]


class _FakeSource:
    def __init__(self, label: str, config: dict) -> None:
        self.label = label
        self.config = config


def test_seed_groups() -> None:
    base = {"lr": 0.003, "steps": 30, "seed": 0, "model": {"depth": 3}}
    s0 = _FakeSource("s0", {"preset": dict(base, seed=0), "device": "cpu", "out": "/x/s0.h5"})
    s1 = _FakeSource("s1", {"preset": dict(base, seed=1), "device": "cpu", "out": "/x/s1.h5"})
    other = _FakeSource("other", {"preset": dict(base, seed=0, lr=0.01), "device": "cpu"})
    top = _FakeSource("top", {"seed": 5, "preset": dict(base, seed=0), "device": "cpu"})
    groups = seed_groups([s0, s1, other, top])
    assert groups["s0"] == groups["s1"] == groups["top"]  # a top-level seed is ignored too
    assert groups["other"] == "other"  # alone in its group: its own label
    assert groups["s0"] == "s0 / s1 / top"  # labels with nothing in common: named after all, not the first file
    assert s1.config["preset"]["seed"] == 1 and s0.config["out"] == "/x/s0.h5"  # inputs not mutated


def test_seed_groups_are_named_after_what_their_runs_share() -> None:
    base = {"lr": 0.003, "steps": 30, "model": {"depth": 3}}
    gelu = [_FakeSource(f"activation-gelu-s{i}", {"preset": dict(base, seed=i, act="gelu")}) for i in range(3)]
    tanh = [_FakeSource(f"runs/tanh_seed{i}", {"preset": dict(base, seed=i, act="tanh")}) for i in range(2)]
    groups = seed_groups([*gelu, *tanh])
    assert {groups[s.label] for s in gelu} == {"activation-gelu"}
    assert {groups[s.label] for s in tanh} == {"runs/tanh"}


# ---- 10. the Dashboard on a real run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(debug_run: Path):
    return create_app([debug_run])


def test_dashboard_views_return_figures(app) -> None:
    board = app.board
    src = board.source(0)
    assert src.n_steps > 1
    assert isinstance(board.paths(0, 0, None, False), go.Figure)
    assert isinstance(board.paths(0, 1, 0, True), go.Figure)
    # The animation moves the slider: ~60 steps over the run, then back to the start.
    assert board.advance(0, 9) == 1 and board.advance(8, 9) == 9 and board.advance(9, 9) == 0
    assert board.advance(0, 5999) == 100 and board.advance(5950, 5999) == 5999
    for color_by in F.NODE_COLORINGS:
        fig = board.tree(0, 0, 1, None, color_by)
        assert isinstance(fig, go.Figure)
        assert any(isinstance(t, go.Icicle) for t in fig.data)
    for metric in METRIC_LABELS:
        heat, lines = board.curves(0, metric, None)
        assert isinstance(heat, go.Figure) and isinstance(lines, go.Figure)
        assert any(isinstance(t, go.Heatmap) for t in heat.data), metric
    assert isinstance(board.drift(0, 0, 0, [0, 1, 2]), go.Figure)
    items, fig = board.tokens(0, 0, 0, 0, "")
    assert isinstance(items, list) and items
    assert isinstance(fig, go.Figure)
    items, fig = board.tokens(0, 0, 0, 0, "\x00no such text\x00")
    assert isinstance(fig, go.Figure) and not fig.data
    assert isinstance(board.compare("static_fraction", 0), go.Figure)
    badges, _ = board.tick()
    assert len(badges) == 1


def test_dashboard_tree_matches_file(app, debug_run: Path) -> None:
    """The icicle shows exactly the recorded node visits of that tree, summed over its window: by default the
    last quarter of the run, else the whole run or the K intervals up to the slider."""
    board = app.board
    src = board.source(0)
    n = src.n_steps
    visits = routescope.open(debug_run)["node_visits"].values[:, 0, 1]  # (step, node) of layer 0, tree 1
    nodes = 2 ** src.layers[0].depth - 1
    quarter = -(-n // 4)
    for window, rows in ((LAST_QUARTER, slice(n - quarter, n)), ("all", slice(0, n)), ("step", slice(max(0, n - 1 - 5), n - 1))):
        fig = board.tree(0, 0, 1, n - 2, "visits", window)
        trace = next(t for t in fig.data if isinstance(t, go.Icicle))
        np.testing.assert_allclose(list(trace.marker.colors)[:nodes], visits[rows, :nodes].sum(0), err_msg=window)
        first, last = int(src.steps[rows][0]), int(src.steps[rows][-1])
        assert f"steps {first}–{last} (" in fig.layout.title.text, (window, fig.layout.title.text)
    assert f"(the last quarter: {quarter} of {n} intervals)" in board.tree(0, 0, 1, None, None).layout.title.text


def test_dashboard_drift_says_whose_warnings_and_the_verdict(app) -> None:
    """The source caches the whole early-warning report; the drift view labels the flags by whose they are."""
    src = app.board.source(0)
    report = src.warnings()
    assert isinstance(report, WarningReport) and report.source in ("predictor", "trivial rule")
    assert src.warnings() is report  # cached: the run has not grown
    fig = app.board.drift(0, 0, 0, [1, 2])
    assert f"early warning: {report.verdict}" in fig.layout.title.text
    events = src.events()
    assert {"kind", "status", "node"} <= set(events.columns)


def test_dashboard_defaults_to_state_colouring_and_the_last_quarter(app) -> None:
    components = {getattr(c, "id", None): c for c in walk_components(app.layout)}
    assert components["color-by"].value == "state" and next(iter(F.NODE_COLORINGS)) == "state"
    assert components["tree-window"].value == LAST_QUARTER
    assert [o["value"] for o in components["tree-window"].options] == [LAST_QUARTER, "all", "step"]


def _write_tree_run(path: Path, depth: int, intervals: list[np.ndarray]) -> Path:
    """A one-layer tree run whose interval i (closing at step i + 1) has leaf visits intervals[i] (trees, 2^d)."""
    from routescope.store import LayerLayout
    from routescope.store.writer import RunWriter

    trees, nodes = intervals[0].shape[0], 2**depth - 1
    layer = LayerLayout("mlp", depth, trees, {"family": "tree", "variant": "neuron", "leaf_width": 1, "depth": depth})
    writer = RunWriter(path, [layer], {})
    for i, leaves in enumerate(intervals):
        heap = np.zeros((trees, 2 ** (depth + 1) - 1), dtype=np.int64)
        heap[:, nodes:] = leaves
        for node in range(nodes - 1, -1, -1):
            heap[:, node] = heap[:, 2 * node + 1] + heap[:, 2 * node + 2]
        visits, right = heap[:, :nodes], heap[:, 2 * np.arange(nodes) + 2]
        writer.append_interval(i + 1, {
            "tokens": leaves[0].sum(), "layer_tokens": np.array([leaves[0].sum()]), "node_visits": visits[None],
            "node_right": right[None], "node_fires": visits[None], "node_act_sum": np.zeros((1,) + visits.shape),
            "node_act_sqsum": visits[None].astype(float), "leaf_visits": leaves[None], "leaf_fires": leaves[None],
            "leaf_act_sum": np.zeros((1,) + leaves.shape), "leaf_act_sqsum": np.zeros((1,) + leaves.shape),
        }, {})  # fmt: skip
    writer.close()
    return path


def test_dashboard_tree_states_over_the_window(tmp_path: Path) -> None:
    """Six balanced intervals of 1,000 tokens, then two in which the root sends everything left. Over the last
    quarter (steps 7–8) node 2 and its leaves got 0 of 2,000 tokens: provably dead, the root frozen starving
    its right child. Over the whole run, or the five intervals up to step 6, every unit is live."""
    balanced, left = np.full((1, 4), 250), np.array([[500, 500, 0, 0]])
    board = Dashboard([_write_tree_run(tmp_path / "t.h5", 2, [balanced] * 6 + [left] * 2)])
    fig = board.tree(0, 0, 0, None, None)
    assert fig.layout.title.text.startswith("Layer 0, tree 0, steps 7–8 (the last quarter: 2 of 8 intervals): calibrated state")
    trace = fig.data[0]
    colors, texts, lines = (dict(zip(trace.ids, v)) for v in (trace.marker.colors, trace.text, trace.marker.line.color))
    assert {i for i, c in colors.items() if c == F.UNIT_STATE_COLORS[DEAD]} == {"n2", "leaf2", "leaf3"}
    assert {i for i, c in colors.items() if c == F.UNIT_STATE_COLORS[LIVE]} == {"n0", "n1", "leaf0", "leaf1"}
    assert texts["n0"] == "0 frozen, starves R" and lines["n0"] == F.FROZEN_COLOR
    assert F.state_legend(board.th) in re.sub(r"<[^>]+>", "", fig.layout.annotations[0].text).replace("■ ", "").replace("□ ", "")
    for window, step, title in (("all", None, "steps 1–8 (the whole run: 8 of 8 intervals)"),
                                ("step", 5, "steps 2–6 (the 5 intervals up to the step slider)"),
                                ("step", 0, "step 1 (the 1 interval up to the step slider)")):  # fmt: skip
        fig = board.tree(0, 0, 0, step, "state", window)
        assert title in fig.layout.title.text
        assert set(fig.data[0].marker.colors) == {F.UNIT_STATE_COLORS[LIVE]}, window
        assert F.FROZEN_COLOR not in fig.data[0].marker.line.color
    sums = board.source(0).window_sums(0, 6, 8, ("node_visits", "leaf_visits"))
    assert list(sums["node_visits"][0]) == [2000, 2000, 0] and list(sums["leaf_visits"][0]) == [1000, 1000, 0, 0]
    assert float(sums["tokens"]) == 2000
    # The board's thresholds are the view's: at δ = 0.1% a zero at level 1 proves death only from 5,990 tokens
    # on, so node 2's 0 of 2,000 is undetermined, and the legend says 0.1%.
    th = Thresholds(delta=0.001)
    assert th.zero_visit_floor(1) == 5990
    fig = Dashboard([tmp_path / "t.h5"], th=th).tree(0, 0, 0, None, None)
    assert dict(zip(fig.data[0].ids, fig.data[0].marker.colors))["n2"] == F.UNIT_STATE_COLORS[UNDETERMINED]
    assert "provably under 0.1% of its balanced share" in fig.layout.annotations[0].text


def test_window_sums_follow_a_moving_window(tmp_path: Path) -> None:
    """Windows near a cached one are built from it plus and minus the rows that differ: every window of every
    length, visited sliding and growing, equals the plain sum of the file's rows."""
    rng = np.random.default_rng(3)
    intervals = [rng.multinomial(100 + i, np.full(8, 1 / 8))[None] for i in range(12)]
    path = _write_tree_run(tmp_path / "m.h5", 3, intervals)
    src = Dashboard([path]).source(0)
    file = routescope.open(path)
    read: list[int] = []
    sum_rows = src._sum_rows
    src._sum_rows = lambda layer, lo, hi, names: read.append(hi - lo) or sum_rows(layer, lo, hi, names)
    for length in (1, 3, 5, 12):
        before = len(read)
        for start in range(0, 13 - length):
            got = src.window_sums(0, start, start + length, ("node_visits", "node_right", "leaf_visits"))
            for name in ("node_visits", "node_right", "leaf_visits"):
                np.testing.assert_array_equal(got[name], file[name].values[start : start + length, 0, :1].sum(0))
            assert int(got["tokens"]) == sum(100 + i for i in range(start, start + length))
        if length == 5:  # sliding by one reads the row that enters and the one that leaves, not all five
            assert sum(read[before:]) <= 5 + 2 * (13 - length - 1) < 5 * (13 - length)


def test_dashboard_slider(app) -> None:
    board = app.board
    src = board.source(0)
    n = src.n_steps
    top, value, marks = board.slider(0, None, None)
    assert (top, value) == (n - 1, n - 1)
    assert marks[n - 1] == str(int(src.steps[-1]))
    assert marks[0] == str(int(src.steps[0]))
    # new intervals arrived (previous max n-2 -> now n-1); the user had picked interval 1: kept
    assert board.slider(0, 1, n - 2)[1] == 1
    # the user sat at the end: follow the newest interval
    assert board.slider(0, n - 2, n - 2)[1] == n - 1



def test_dashboard_slider_follows_within_the_range_the_component_has(debug_run) -> None:
    """The file may grow between the range update and the follow step: never a value beyond `top`."""
    board = create_app([debug_run]).board
    n = board.sources[0].n_steps
    assert board.slider(0, 1, 1, top=3)[:2] == (3, 3)  # at the end of the old range: follow to the given top
    assert board.slider(0, 1, 2, top=3)[:2] == (3, 1)  # the user moved back: stay
    assert board.slider(0, None, None, top=10 * n)[:2] == (n - 1, n - 1)  # never beyond the file

def test_dashboard_source_by_position_only(app) -> None:
    with pytest.raises(ValueError):
        app.board.source(5)
    with pytest.raises(ValueError):
        app.board.source(-1)
    assert app.board.source(None) is app.board.sources[0]


# ---- 11. server safety --------------------------------------------------------------------------------


def test_server_serves_index(app) -> None:
    client = app.server.test_client()
    response = client.get("/")
    assert response.status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "/assets/../../etc/passwd",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/_dash-component-suites/../../../../etc/passwd",
        "/_dash-component-suites/dash/../../../../../../etc/passwd",
        "/assets/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/_dash-component-suites/dash/dcc/../../../etc/passwd",
        "/_dash-component-suites/dash/deps/..%5c..%5csetup.py",
        "/_dash-component-suites/dash/%2E%2E/%2E%2E/setup.py",
        "/..",
        "/%2e%2e/etc/passwd",
        "/%252e%252e/etc/passwd",
        "/_dash-layout/../../etc/passwd",
    ],
)
def test_server_refuses_path_traversal(app, url: str) -> None:
    """Every traversal attempt is a clean 404 (Dash alone gave a 500 or, for /.., the index page)."""
    client = app.server.test_client()
    response = client.get(url)
    assert response.status_code == 404
    assert b"root:" not in response.data
    assert b"Traceback" not in response.data  # never in debug mode: no stack traces to the client


def test_server_serves_only_the_app_and_registered_files(app, debug_run: Path) -> None:
    """Unknown suite files are a 404 (not Dash's 500); a run file's path gets the app's page, never the file."""
    client = app.server.test_client()
    for url in ("/_dash-component-suites/nosuchpackage/x.js", "/_dash-component-suites/dash/setup.py",
                "/_dash-component-suites/plotly/__init__.py", f"/assets/{debug_run.name}"):  # fmt: skip
        assert client.get(url).status_code == 404, url
    for url in (str(debug_run), f"/{debug_run.name}"):
        response = client.get(url)
        assert not response.data.startswith(b"\x89HDF") and b"routescope" in response.data  # Dash's page route
    assert client.get("/_dash-layout").status_code == 200 and client.get("/_dash-dependencies").status_code == 200


def test_is_traversal() -> None:
    assert is_traversal("/a/../b", "/a/../b") and is_traversal("/a/%2E%2e/b", "/a/../b") and is_traversal("/a%5cb", "/a\\b")
    assert is_traversal("/%252e%252e/x", "/%2e%2e/x")  # double-encoded
    assert not is_traversal("/_dash-component-suites/dash/deps/react@18.3.1.min.js", "/_dash-component-suites/dash/deps/react@18.3.1.min.js")
    assert not is_traversal("/a/..b/c.d", "/a/..b/c.d")  # dots inside a name are no segment


def test_server_still_serves_registered_scripts(app) -> None:
    """The traversal refusals above are not because the suites route serves nothing at all."""
    response = app.server.test_client().get("/_dash-component-suites/plotly/package_data/plotly.min.js")
    assert response.status_code == 200
    response.close()


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("localhost")
    assert is_loopback("::1")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("192.168.1.10")


def test_is_loopback_rejects_hostnames_that_start_with_127() -> None:
    """A host name such as 127.example.com may resolve to a public address: it must get the warning."""
    assert not is_loopback("127.example.com")
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
