"""Crash harness: record a real training run in a child process, signal it at a seeded moment, check the file.

Used by tests/test_crash.py (a few kills in CI) and benchmarks/crash_soak.py (the soak). Two kinds of child:

- "script": this file run as `python tests/crashkit.py child ...`: the trainers' loop (`train`) on a
  preset (debug, debug-l1, debug-moe), with two instrumentation lines appended to a progress file
  (plain O_APPEND writes, which survive SIGKILL): `stepped N` after each `rec.step()` returns, and
  `written S` after the writer has appended *and flushed* the interval closing at step S.
- "cli": `routescope record --config PRESET ...`, exactly as a user runs it (no progress file).

`check_run_file` then asserts what a killed or interrupted run must keep (README, "What survives a crash").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

TESTS = Path(__file__).resolve().parent
FAMILY_OF = {"debug": "tree", "debug-l1": "l1", "debug-moe": "moe"}
QUEUE_DEPTH = 16  # Recorder's queue of intervals waiting for the writer (recorder.py)
START_DEADLINE_S = 90.0  # launch to the first flushed interval (torch import on a busy 2-core box)
EXIT_DEADLINE_S = 30.0  # signal to process exit


@dataclass
class Kill:
    """One child run and what happened to it: the signal, its exit code and the progress it reported."""

    path: Path
    preset: str
    mode: str  # "script" | "cli"
    sig: int
    delay_s: float
    returncode: int | None = None
    stepped: int = 0  # last step whose rec.step() returned
    written: list[int] = field(default_factory=list)  # steps whose interval was flushed, in order
    log: str = ""
    seconds: float = 0.0

    @property
    def family(self) -> str:
        return FAMILY_OF[self.preset]


def child_command(preset: str, path: Path, progress: Path | None, mode: str = "script", every: int = 1) -> list[str]:
    """The child's argv: this file's `child` entry point or the installed CLI; steps are unbounded (it is killed)."""
    if mode == "cli":
        return [sys.executable, "-m", "routescope.cli", "record", "--config", preset, "--steps", "1000000",
                "--every", str(every), "--out", str(path), "--device", "cpu"]  # fmt: skip
    return [sys.executable, str(Path(__file__).resolve()), "child", preset, str(path), str(progress), str(every)]


def _restore_sigint() -> None:
    """A child of a background shell inherits SIGINT ignored; Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(kill: Kill, every: int = 1) -> tuple[subprocess.Popen, Path, Path]:
    """Launch the child of `kill`; returns the process, its progress file and its log file."""
    progress, log = kill.path.with_suffix(".progress"), kill.path.with_suffix(".log")
    progress.write_text("")
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    if "TRITON_INTERPRET" not in env:
        import torch

        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(child_command(kill.preset, kill.path, progress, kill.mode, every), stdout=out,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=_restore_sigint)  # fmt: skip
    return proc, progress, log


def read_progress(kill: Kill, progress: Path) -> None:
    """Parse the child's progress lines into kill.stepped / kill.written (a torn last line is ignored)."""
    stepped, written = 0, []
    for line in progress.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        if parts[0] == "stepped":
            stepped = int(parts[1])
        elif parts[0] == "written":
            written.append(int(parts[1]))
    kill.stepped, kill.written = stepped, written


def flushed_rows(path: Path, group: str) -> int:
    """Complete rows an SWMR reader sees now (0 while the file is missing or not yet in SWMR mode)."""
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return int(f[f"{group}/step"].shape[0])
    except Exception:  # not created yet, not yet in SWMR mode, ...
        return 0


def run_kills(kills: list[Kill], parallel: int = 2, every: int = 1) -> list[Kill]:
    """Run every child, `parallel` at a time: wait for its first flushed interval, wait delay_s, send its signal."""
    pending = list(kills)
    running: list[tuple[Kill, subprocess.Popen, Path, Path, float, float | None, float | None]] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                kill = pending.pop(0)
                proc, progress, log = start(kill, every)
                running.append((kill, proc, progress, log, time.monotonic(), None, None))
            now = time.monotonic()
            still = []
            for kill, proc, progress, log, launched, fire_at, sent_at in running:
                if fire_at is None:  # waiting for the first flushed interval
                    if proc.poll() is not None:
                        raise AssertionError(f"{kill.path.name}: child exited early ({proc.returncode}):\n{log.read_text()}")
                    if now - launched > START_DEADLINE_S:
                        raise AssertionError(f"{kill.path.name}: no interval in {START_DEADLINE_S} s:\n{log.read_text()}")
                    ready = (flushed_rows(kill.path, kill.family) >= 1 if kill.mode == "cli"
                             else "written" in progress.read_text())  # fmt: skip
                    if ready:
                        fire_at = now + kill.delay_s
                elif sent_at is None and now >= fire_at:
                    proc.send_signal(kill.sig)
                    sent_at = now
                elif sent_at is not None and proc.poll() is not None:
                    kill.returncode, kill.seconds, kill.log = proc.returncode, now - launched, log.read_text()
                    read_progress(kill, progress)
                    continue
                elif sent_at is not None and now - sent_at > EXIT_DEADLINE_S:
                    raise AssertionError(f"{kill.path.name}: still running {EXIT_DEADLINE_S} s after signal "
                                         f"{signal.Signals(kill.sig).name}:\n{log.read_text()}")  # fmt: skip
                still.append((kill, proc, progress, log, launched, fire_at, sent_at))
            running = still
            time.sleep(0.02)
    finally:
        for _, proc, *_ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return kills


# ---------------------------------------------------------------------------------------------- checks


@dataclass
class Outcome:
    """What a signalled run's file kept: complete rows, intervals lost, and how plain h5py opened it."""

    rows: int
    lost: int  # intervals closed by rec.step() (script mode) that are not in the file; -1: unknown (cli)
    plain_open: str  # "plain" (h5py.File(p, "r")) or "swmr" (only h5py.File(p, "r", swmr=True))
    run_state: str


def open_plain_or_swmr(path: Path) -> tuple[h5py.File, str]:
    """Plain h5py first; a file killed while writing is marked open-for-write and needs the SWMR reader."""
    try:
        return h5py.File(path, "r"), "plain"
    except OSError as err:
        assert "already open for write" in str(err), f"plain h5py failed for another reason: {err}"
        return h5py.File(path, "r", libver="latest", swmr=True), "swmr"


def check_family_invariants(f: h5py.File, family: str) -> np.ndarray:
    """DESIGN.md invariants of the l1 / moe groups (tree: conftest.check_tree_invariants); returns the steps."""
    g = f[family]
    names = ["step", *(name for name in g if g[name].ndim >= 1 and g[name].maxshape[0] is None)]
    n = min(g[name].shape[0] for name in names)
    steps = g["step"][:n]
    assert np.all(np.diff(steps) > 0), f"{family}: steps must increase strictly"
    layer_tokens = g["layer_tokens"][:n]
    assert np.all(g["tokens"][:n] == layer_tokens.max(axis=1)), f"{family}: tokens is the layers' maximum"
    if family == "l1":
        fires, active, hist = g["unit_fires"][:n], g["active_sum"][:n], g["active_hist"][:n]
        assert np.all(fires.sum(-1) == active), "l1: sum over units of unit_fires must equal active_sum"
        assert np.all(hist.sum(-1) == layer_tokens), "l1: the active-count histogram must sum to the tokens"
        assert np.all(fires >= 0) and np.all(fires <= layer_tokens[..., None])
    elif family == "moe":
        k = g["layer_k"][:].astype(np.int64)
        expert, dropped = g["expert_tokens"][:n], g["dropped_tokens"][:n]
        assert np.all(expert.sum(-1) == k[None, :] * layer_tokens - dropped), \
            "moe: sum over experts of expert_tokens must equal k*tokens - dropped"
        assert np.all(dropped >= 0) and np.all(expert >= 0)
    return steps


def check_run_file(kill: Kill, expect_state: str | None = None) -> Outcome:
    """Assert what a signalled run must keep; raises AssertionError naming the first violation."""
    from conftest import check_tree_invariants

    import routescope

    path, family = kill.path, kill.family
    assert path.is_file(), f"{path}: no file"
    f, how = open_plain_or_swmr(path)
    with f:
        if family == "tree":
            steps = f["tree/step"][:]
        else:
            steps = check_family_invariants(f, family)
        run_steps = f["run/step"][:]
        state = ("running", "finished", "interrupted", "failed")[int(f["run_state"][()])]
    if family == "tree":
        rows = check_tree_invariants(path)
        steps = steps[:rows]
    rows = len(steps)
    ds = routescope.open(path, family)
    try:
        seen = ds["step"].values
    finally:
        ds.close()
    np.testing.assert_array_equal(seen, steps, err_msg="routescope.open and plain h5py disagree on the steps")
    assert np.all(np.diff(seen) > 0), "steps must increase strictly"
    run = routescope.open(path, "run")
    try:
        assert np.all(np.diff(run["step"].values) > 0)
        assert rows - 1 <= run.sizes["step"] <= rows, "the run group may trail its family by the interval in flight"
    finally:
        run.close()
    assert len(run_steps) >= run.sizes["step"]
    if expect_state is not None:
        assert state == expect_state, f"run_state {state!r}, expected {expect_state!r}"
    if how == "swmr":
        assert state == "running", "a file closed with a final state must open with plain h5py"
    lost = -1
    if kill.mode == "script":
        written = np.asarray(kill.written, dtype=np.int64)
        # every interval reported flushed survives; at most the one in flight is there unreported
        assert len(written) <= rows <= len(written) + 1, f"{rows} rows, {len(written)} reported flushed"
        np.testing.assert_array_equal(steps[: len(written)], written, err_msg="flushed steps are the file's first rows")
        closed = kill.stepped  # every=1: one interval per step
        assert rows <= closed or expect_state is not None, f"{rows} rows but only {closed} steps reported"
        lost = max(0, closed - rows)
        assert lost <= QUEUE_DEPTH + 1, f"lost {lost} intervals: more than the writer's queue"
    return Outcome(rows=rows, lost=lost, plain_open=how, run_state=state)


# ---------------------------------------------------------------------------------------------- child


def _child(preset: str, out: str, progress: str, every: str) -> None:
    """Train `preset` with recording; report progress lines; SIGTERM and Ctrl-C close the file as the CLI does."""
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before routescope.layers is imported (no GPU in the soak)
    from routescope.record.recorder import Recorder
    from routescope.store.writer import RunWriter
    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import train

    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    append, step = RunWriter.append_interval, Recorder.step

    def append_and_report(self, at_step, *args, **kwargs):  # type: ignore[no-untyped-def]
        append(self, at_step, *args, **kwargs)  # returns after f.flush()
        os.write(fd, f"written {at_step}\n".encode())

    def step_and_report(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        step(self, *args, **kwargs)
        os.write(fd, f"stepped {self.global_step}\n".encode())

    RunWriter.append_interval, Recorder.step = append_and_report, step_and_report

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = get_preset(preset, steps=1_000_000, record_every=int(every))
    try:
        train(cfg, out=out, device="cpu", show_progress=False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        _child(*sys.argv[2:])
    else:
        sys.exit("usage: crashkit.py child PRESET OUT PROGRESS EVERY")
