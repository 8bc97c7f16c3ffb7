"""A recording killed at a random moment leaves a readable run file; SIGTERM closes it cleanly.

Each run is `routescope record` in its own process (as a user runs it), killed while it writes an
interval every step, so kills land at arbitrary points of the write sequence.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import check_tree_invariants, open_plain, run_cli
from typer.testing import CliRunner

import routescope
from routescope.cli import app

KILLS = 6
PARALLEL = 2  # runs recording at once
START_DEADLINE_S = 60  # from launch to the first complete interval
TERM_DEADLINE_S = 10
TOKENS_PER_STEP = 8 * 32  # debug preset: batch 8 x seq_len 32


def start_record(path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # several runs share the cores
    cmd = [sys.executable, "-m", "routescope.cli", "record", "--config", "debug", "--steps", "100000", "--every", "1",
           "--out", str(path), "--device", "cpu"]  # fmt: skip
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the writer
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def intervals(path: Path) -> int:
    """Complete intervals routescope sees now; 0 while the file is missing or not yet readable."""
    try:
        ds = routescope.open(path)
        n = ds.sizes["step"]
    except Exception:  # not created yet, still locked by the writer, ...
        return 0
    del ds  # closes our h5py handle
    return n


def wait_until_recording(proc: subprocess.Popen, path: Path, log: Path, deadline: float) -> None:
    while intervals(path) < 1:
        assert proc.poll() is None, f"record exited early ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no complete interval in {path} in time:\n{log.read_text()}"
        time.sleep(0.05)


def check_readable(path: Path, state: str) -> np.ndarray:
    """Plain h5py and routescope agree on a valid file; return its steps."""
    n = check_tree_invariants(path)
    assert n >= 1
    with open_plain(path) as f:
        tree_steps, run_steps = f["tree/step"][:], f["run/step"][:]
        plain_tokens = f["tree/tokens"][: len(tree_steps)]
    ds = routescope.open(path)
    steps = ds["step"].values
    assert np.all(np.diff(steps) > 0)
    np.testing.assert_array_equal(steps, tree_steps)
    np.testing.assert_array_equal(steps, np.arange(1, len(steps) + 1))  # every step is one interval
    np.testing.assert_array_equal(ds["tokens"].values, plain_tokens)
    assert np.all(ds["tokens"].values == TOKENS_PER_STEP)  # real rows, not fill values
    assert ds.attrs["run_state"] == state
    run = routescope.open(path, "run")
    np.testing.assert_array_equal(run["step"].values, run_steps)
    assert np.all(np.diff(run["step"].values) > 0)
    assert np.all(np.isfinite(run["train_loss"].values))
    # `run` rows are made visible just after `tree` rows: a kill may fall between the two
    assert len(tree_steps) - 1 <= len(run_steps) <= len(tree_steps)
    del ds, run
    gc.collect()
    return steps


@pytest.mark.slow
def test_sigkill_leaves_readable_file(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    delays = [rng.uniform(0.0, 1.5) for _ in range(KILLS)]
    paths = [tmp_path / f"k{i}.h5" for i in range(KILLS)]
    logs = [tmp_path / f"k{i}.log" for i in range(KILLS)]
    procs: list[subprocess.Popen] = []
    deadlines: list[float] = []
    kill_at: dict[int, float] = {}
    try:
        while len(procs) < KILLS or any(p.returncode is None for p in procs):
            running = [i for i, p in enumerate(procs) if p.returncode is None]
            if len(running) < PARALLEL and len(procs) < KILLS:  # start the next run
                i = len(procs)
                procs.append(start_record(paths[i], logs[i]))
                deadlines.append(time.monotonic() + START_DEADLINE_S)
                continue
            now = time.monotonic()
            for i in running:
                proc, path = procs[i], paths[i]
                if i not in kill_at:
                    assert proc.poll() is None, f"record {i} exited early ({proc.returncode}):\n{logs[i].read_text()}"
                    assert now < deadlines[i], f"no complete interval in {path} in time:\n{logs[i].read_text()}"
                    if intervals(path) >= 1:
                        kill_at[i] = time.monotonic() + delays[i]
                elif now >= kill_at[i]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * KILLS

    counts = set()
    for path in paths:
        steps = check_readable(path, "running")  # killed: never closed, so still marked running
        counts.add(len(steps))
        result = CliRunner().invoke(app, ["info", str(path), "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["intervals"] == len(steps) and summary["last_step"] == steps[-1]
        assert summary["run_state"] == "running"
    assert len(counts) > 1  # the kills did land at different points
    # and the installed command, in its own process, on one of them
    result = run_cli("info", str(paths[-1]), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "running" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_closes_file(tmp_path: Path) -> None:
    path, log = tmp_path / "term.h5", tmp_path / "term.log"
    proc = start_record(path, log)
    try:
        wait_until_recording(proc, path, log, time.monotonic() + START_DEADLINE_S)
        time.sleep(random.Random(7).uniform(0.0, 1.5))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TERM_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"record did not exit within {TERM_DEADLINE_S} s of SIGTERM:\n{log.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert proc.returncode == 2, text  # the CLI reports the interruption as a one-line error
    assert "error: interrupted" in text, text
    with h5py.File(path, "r") as f:  # closed cleanly: no SWMR reader needed
        assert f["tree/step"].shape[0] >= 1
    check_readable(path, "interrupted")
