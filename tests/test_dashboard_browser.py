"""The dashboard in a real browser (headless Chromium through dash[testing] / selenium).

Needs Debian's `chromium` and `chromium-driver`. Where they are missing, the setup installs them
with apt-get when it can (root, apt available, ROUTESCOPE_NO_APT unset), else the tests are skipped
with the reason. ROUTESCOPE_SCREENSHOT=RUN.h5 runs the first test on that file instead and refreshes
docs/dashboard.png and docs/dashboard_tree.png from it (the README's screenshots).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("dash.testing", reason="dash[testing] is not installed")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402  (selenium comes with dash[testing])

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _ensure_chromium() -> str | None:
    """None when chromedriver is usable, else the reason it is not."""
    if shutil.which("chromedriver"):
        return None
    if os.environ.get("ROUTESCOPE_NO_APT") or not shutil.which("apt-get") or os.geteuid() != 0:
        return "headless Chromium missing: run `apt-get install chromium chromium-driver` (as root)"
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True, env=env,
                       capture_output=True, timeout=900)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as err:
        return f"could not install chromium with apt-get ({err}); install chromium and chromium-driver"
    return None if shutil.which("chromedriver") else "apt-get installed no chromedriver"


@pytest.fixture(scope="module")
def chromium() -> None:
    reason = _ensure_chromium()
    if reason:
        pytest.skip(reason)


def _wait_graph(dash_duo, graph_id: str, text: str | None = None, timeout: float = 20) -> None:
    """Wait until a graph has drawn (a plot inside it), and optionally contains `text`."""
    dash_duo.wait_for_element(f"#{graph_id} .main-svg", timeout=timeout)
    if text:
        dash_duo.wait_for_contains_text(f"#{graph_id}", text, timeout=timeout)


def _console_errors(dash_duo) -> list[dict]:
    """SEVERE browser-console entries, minus the favicon 404 (the app serves no favicon on purpose)."""
    return [e for e in (dash_duo.get_logs() or []) if "favicon" not in e.get("message", "")]


def test_every_view_renders_slider_and_node_click(chromium, dash_duo, debug_run: Path, tmp_path: Path) -> None:
    from routescope.dashboards.app import create_app

    shot_run = os.environ.get("ROUTESCOPE_SCREENSHOT")
    app = create_app([Path(shot_run) if shot_run else debug_run], interval_s=1.0)
    board = app.board
    steps = board.sources[0].steps
    dash_duo.driver.set_window_size(1400, 1000)
    dash_duo.start_server(app)
    # 1. Path usage at the latest step, by default.
    _wait_graph(dash_duo, "paths-graph", f"step {int(steps[-1])}")
    dash_duo.wait_for_contains_text("#status", "finished")
    screenshot = tmp_path / "dashboard.png"
    dash_duo.driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if shot_run:
        DOCS.mkdir(exist_ok=True)
        shutil.copy(screenshot, DOCS / "dashboard.png")
    # The slider is labelled with steps from the first render, and has no box for interval positions.
    dash_duo.wait_for_contains_text("#step", str(int(steps[-1])))
    assert not dash_duo.driver.find_elements("css selector", "#step input")
    # The step slider: keyboard on its handle moves one interval back.
    handle = dash_duo.wait_for_element("#step [role=slider]")
    handle.click()
    handle.send_keys("\ue012")  # Left arrow
    _wait_graph(dash_duo, "paths-graph", f"step {int(steps[-2])}")
    # Animation over training: the slider runs on by itself (wrapping to the first interval).
    animate = dash_duo.find_element("#paths-options input[value=animate]")
    animate.click()
    _wait_graph(dash_duo, "paths-graph", f"step {int(steps[0])}")
    animate.click()
    # 2. The tree; clicking a node adds it to the drift selection.
    dash_duo.find_element("#tabs .tab:nth-child(2)").click()
    _wait_graph(dash_duo, "tree-graph", "Layer 0, tree 0")
    if shot_run:
        time.sleep(1)
        dash_duo.driver.save_screenshot(str(DOCS / "dashboard_tree.png"))
    dash_duo.wait_for_element("#tree-graph g.slice path")
    sector = dash_duo.driver.execute_script(  # the sector of node 1 (labels: "1", "1 dead", "1 frozen")
        "return Array.from(document.querySelectorAll('#tree-graph g.slice'))"
        ".find(g => /^1( |$)/.test(g.textContent.trim())).querySelector('path')"
    )
    ActionChains(dash_duo.driver).move_to_element(sector).click().perform()
    # 3-6. The other views.
    # The drift view now follows node 1 as well as the root.
    for nth, graph_id, text in ((3, "lines-graph", "static fraction"), (4, "drift-graph", "node 1"),
                                (5, "token-paths", "sampled tokens"), (6, "compare-graph", "runs compared")):  # fmt: skip
        dash_duo.find_element(f"#tabs .tab:nth-child({nth})").click()
        _wait_graph(dash_duo, graph_id, text)
    assert _console_errors(dash_duo) == []


def test_live_follow_while_a_run_is_written(chromium, dash_duo, tmp_path: Path) -> None:
    """A file still open for writing (SWMR): new intervals appear without reloading the page."""
    import torch

    import routescope
    from routescope import Recorder, TreeFFN
    from routescope.dashboards.app import create_app

    torch.manual_seed(0)
    model = torch.nn.Sequential(TreeFFN(16, 16, 3, trees=2))
    path = tmp_path / "live.h5"
    rec = Recorder(model, path, every=1, sample_tokens=8)
    rec.start()

    def train_steps(k: int) -> None:
        for _ in range(k):
            model(torch.randn(64, 16)).pow(2).mean().backward()
            rec.step(loss=1.0)

    try:
        train_steps(3)
        deadline = time.time() + 10  # the recorder's writer thread writes in the background
        while len(routescope.open(path)["step"].values) < 3 and time.time() < deadline:
            time.sleep(0.1)
        app = create_app([path], interval_s=0.5)
        dash_duo.start_server(app)
        dash_duo.wait_for_contains_text("#status", "live · 3 intervals", timeout=20)
        _wait_graph(dash_duo, "paths-graph", "step 3")
        train_steps(4)
        dash_duo.wait_for_contains_text("#status", "live · 7 intervals", timeout=20)
        _wait_graph(dash_duo, "paths-graph", "step 7")  # the slider followed the newest interval
    finally:
        rec.close()
    dash_duo.wait_for_contains_text("#status", "finished", timeout=20)
    assert _console_errors(dash_duo) == []
