"""A recording killed at a random moment keeps a readable, invariant-clean run file; SIGTERM and Ctrl-C close it.

Each run is a real training run in its own process (tests/crashkit.py): the trainers' loop with a
Recorder writing an interval every step (so kills land at arbitrary points of the write sequence),
or `routescope record` as a user runs it. Kill moments are seeded. benchmarks/crash_soak.py runs many more.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import h5py
import pytest
from conftest import run_cli
from crashkit import Kill, check_run_file, run_kills
from typer.testing import CliRunner

from routescope.cli import app

SEED = 20240611
# (preset, child kind, signal): every family killed, the CLI killed, both polite signals through the CLI and the script
CASES = [
    ("debug", "script", signal.SIGKILL),
    ("debug-l1", "script", signal.SIGKILL),
    ("debug-moe", "script", signal.SIGKILL),
    ("debug", "cli", signal.SIGKILL),
    ("debug", "cli", signal.SIGTERM),
    ("debug-moe", "cli", signal.SIGINT),
    ("debug-l1", "script", signal.SIGINT),
]
IDS = [f"{preset}-{mode}-{signal.Signals(sig).name}" for preset, mode, sig in CASES]


@pytest.fixture(scope="module")
def kills(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Kill]:
    """Every case's child, run two at a time and signalled 0–1.5 s after its first flushed interval."""
    folder = tmp_path_factory.mktemp("crash")
    rng = random.Random(SEED)
    todo = [Kill(folder / f"{name}.h5", preset, mode, sig, rng.uniform(0.0, 1.5))
            for name, (preset, mode, sig) in zip(IDS, CASES)]  # fmt: skip
    run_kills(todo, parallel=2)
    return dict(zip(IDS, todo))


@pytest.mark.slow
@pytest.mark.parametrize("case", IDS)
def test_signalled_run_keeps_its_intervals(kills: dict[str, Kill], case: str) -> None:
    kill = kills[case]
    if kill.sig == signal.SIGKILL:
        assert kill.returncode == -signal.SIGKILL, kill.log
        outcome = check_run_file(kill)  # never closed: still marked running, readable through SWMR only
        assert outcome.run_state == "running" and outcome.plain_open == "swmr"
        # check_run_file asserted that every interval reported flushed is there; what a kill loses is the
        # interval being written plus those still queued for the writer (outcome.lost, bounded by the queue)
    else:
        assert kill.returncode == 2, kill.log  # reported as a one-line interruption, not a crash
        assert "Traceback" not in kill.log, kill.log
        assert ("error: interrupted" if kill.mode == "cli" else "interrupted") in kill.log, kill.log
        outcome = check_run_file(kill, expect_state="interrupted")
        assert outcome.plain_open == "plain"  # closed cleanly: plain h5py opens it
        with h5py.File(kill.path, "r") as f:
            assert int(f["run_state"][()]) == 2
        if kill.mode == "script":  # the last partial interval is written on close: nothing stepped is lost
            assert outcome.lost == 0 and outcome.rows >= kill.stepped
    assert outcome.rows >= 1


@pytest.mark.slow
def test_info_and_report_read_killed_files(kills: dict[str, Kill]) -> None:
    """`info` and `report` work on a killed file of every family, in-process and as the installed command."""
    for case, kill in kills.items():
        if kill.sig != signal.SIGKILL:
            continue
        rows = check_run_file(kill).rows
        result = CliRunner().invoke(app, ["info", str(kill.path), "--json"])
        assert result.exit_code == 0, (case, result.output)
        summary = json.loads(result.stdout)
        assert summary["intervals"] == rows and summary["run_state"] == "running", case
        result = CliRunner().invoke(app, ["report", str(kill.path), "--json"])
        assert result.exit_code == 0, (case, result.output)
        assert {layer["family"] for layer in json.loads(result.stdout)["layers"]} == {kill.family}
    killed = kills["debug-moe-script-SIGKILL"].path
    result = run_cli("info", str(killed), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "running" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_kill_moments_differ(kills: dict[str, Kill]) -> None:
    """The seeded delays really spread the kills (a harness that always killed at once would test little)."""
    rows = {check_run_file(k).rows for k in kills.values() if k.sig == signal.SIGKILL}
    assert len(rows) > 1, rows


@pytest.mark.slow
def test_repair_lets_plain_h5py_open_killed_files(kills: dict[str, Kill], tmp_path: Path) -> None:
    """`routescope repair` on copies of the killed files: plain h5py opens them, with the same checked rows."""
    import dataclasses
    import shutil

    from routescope.store.repair import clear_open_flags

    for case, kill in kills.items():
        if kill.sig != signal.SIGKILL:
            continue
        before = check_run_file(kill)
        copy = tmp_path / kill.path.name
        shutil.copy(kill.path, copy)
        assert clear_open_flags(copy) is True, case
        after = check_run_file(dataclasses.replace(kill, path=copy))
        assert after.plain_open == "plain" and after.rows == before.rows and after.run_state == "running", case
