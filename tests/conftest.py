"""Shared test helpers: DESIGN.md invariants checked with plain h5py (not routescope's reader)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be set before
# triton.jit decorates anything, i.e. before routescope.layers is first imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (torch seeded with it), for failure messages to report."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


def open_plain(path: str | Path) -> h5py.File:
    """Plain h5py: a closed run opens as is; a run killed while writing needs h5py's SWMR reader."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", libver="latest", swmr=True)


def check_tree_invariants(path: str | Path) -> int:
    """Assert every DESIGN.md invariant for every step, layer and tree; return the number of steps checked."""
    with open_plain(path) as f:
        tree = f["tree"]
        # After a kill HDF5 may have flushed one variable's last row and not another's: compare
        # the rows every variable has (routescope.open does the same).
        n = min(tree[name].shape[0] for name in ("step", "tokens", "node_visits", "node_right", "leaf_visits"))
        steps = tree["step"][:n]
        assert np.all(np.diff(steps) > 0), "steps must increase strictly"
        tokens = tree["tokens"][:n]
        visits, right = tree["node_visits"][:n], tree["node_right"][:n]
        leaves = tree["leaf_visits"][:n]
        depths, trees = tree["layer_depth"][:], tree["layer_trees"][:]
        assert visits.dtype == np.int64 and leaves.dtype == np.int64
        for layer, (d, t) in enumerate(zip(depths, trees)):
            nodes = 2**d - 1
            v, r, lv = visits[:, layer, :t, :nodes], right[:, layer, :t, :nodes], leaves[:, layer, :t, : 2**d]
            tok = tokens[:, None]
            assert np.all(lv.sum(-1) == tok), f"layer {layer}: leaves must sum to tokens"
            if d == 0:
                continue
            assert np.all(v[..., 0] == tok), f"layer {layer}: root visits must equal tokens"
            assert np.all(r <= v) and np.all(r >= 0)
            for node in range(2 ** (d - 1) - 1):  # children are decision nodes
                assert np.all(v[..., 2 * node + 1] + v[..., 2 * node + 2] == v[..., node])
                assert np.all(v[..., 2 * node + 2] == r[..., node])
            for m in range(2 ** (d - 1) - 1, nodes):  # last decision level: children are leaves
                j = 2 * (m - 2 ** (d - 1) + 1)
                assert np.all(lv[..., j] + lv[..., j + 1] == v[..., m])
                assert np.all(lv[..., j + 1] == r[..., m])
        return n


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the `routescope` console command as a user would, capturing its output."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "routescope.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)  # fmt: skip


def walk_components(component):  # type: ignore[no-untyped-def]
    """Every Dash component under `component` (itself first), for tests that look a control up by id."""
    yield component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list) else [children] if children is not None else []:
        if hasattr(child, "to_plotly_json"):
            yield from walk_components(child)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real recorded run of the `debug` preset (made once per test session)."""
    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import train

    path = tmp_path_factory.mktemp("runs") / "debug.h5"
    train(get_preset("debug"), out=path, device="cpu", show_progress=False)
    return path


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished runs of the debug-l1 and debug-moe presets, {"l1": path, "moe": path}, recorded with
    `routescope record` as a user runs it (made once per session; tests copy them before changing anything)."""
    folder = tmp_path_factory.mktemp("family-runs")
    paths = {}
    for family in ("l1", "moe"):
        paths[family] = folder / f"{family}.h5"
        result = run_cli("record", "--config", f"debug-{family}", "--out", str(paths[family]), "--device", "cpu")
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return paths


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """make(files) -> a folder on a real read-only filesystem (a tmpfs remounted ro) holding copies of
    `files` ({name: source}); skipped, visibly, where this process may not mount."""
    import shutil

    mounts: list[Path] = []

    def make(files: dict[str, Path] | None = None) -> Path:
        where = tmp_path / f"readonly{len(mounts)}"
        where.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
        if mounted.returncode:
            pytest.skip("cannot mount a filesystem here (needs root): the read-only cases need one")
        mounts.append(where)
        for name, source in (files or {}).items():
            shutil.copy(source, where / name)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", str(where)], capture_output=True)


def pytest_configure(config: pytest.Config) -> None:
    """Browser tests (dash[testing]) run headless Chromium: no display here or in CI."""
    if hasattr(config.option, "headless"):
        config.option.headless = True
    if hasattr(config.option, "webdriver"):
        config.option.webdriver = "Chrome"
