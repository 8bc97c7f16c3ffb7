"""The dashboard's sources and app without a browser, on a real run: views, slider, labels, seed groups,
and the server's refusal of anything but the app and the files named at start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from routescope.dashboards import figures as F
from routescope.dashboards.app import METRIC_LABELS, create_app, is_loopback
from routescope.dashboards.server_safety import is_traversal
from routescope.dashboards.sources import seed_groups, unique_labels

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


def test_dashboard_tree_matches_file(app) -> None:
    """The icicle of the last interval shows exactly the recorded node visits of that tree."""
    board = app.board
    src = board.source(0)
    last = src.n_steps - 1
    data = src.interval(last, 0, ("node_visits",))
    trace = next(t for t in board.tree(0, 0, 0, None, "visits").data if isinstance(t, go.Icicle))
    nodes = data["node_visits"].shape[1]
    np.testing.assert_allclose(list(trace.marker.colors)[:nodes], data["node_visits"][0])


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
