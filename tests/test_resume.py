"""Resumable runs (`record --resume`, `Recorder(resume=True)`) and one writer per file (issue 9, part 2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import check_tree_invariants, open_plain, run_cli

from routescope import Recorder
from routescope.layers import TreeFFN
from routescope.store import RunFileError, describe
from routescope.store.lock import RunLockedError, lock_path
from routescope.trainers.presets import get_preset
from routescope.trainers.train import config_from_dict, train

DEBUG = ("--config", "debug", "--device", "cpu")


def steps_of(path: Path) -> np.ndarray:
    """The `run` group's steps (plain h5py, or SWMR for a killed file)."""
    with open_plain(path) as f:
        return f["run/step"][:]


def steps_so_far(path: Path) -> int:
    """Rows a live recording has written, 0 while the file is missing or still held before the writer enters SWMR
    mode (h5py then refuses the open with a lock error, which is a moment of the race and not a failure)."""
    try:
        return steps_of(path).size
    except OSError:
        return 0


def ckpt_step(path: Path) -> int:
    return int(torch.load(path.with_suffix(".ckpt.pt"), weights_only=False)["step"])


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def check_resumed(path: Path, kept: int, new: int) -> np.ndarray:
    """Rows = kept + new, steps strictly increasing, tree invariants, closed as finished, plain h5py opens it."""
    assert check_tree_invariants(path) == kept + new
    with h5py.File(path, "r") as f:  # closed cleanly: no open-for-write flags left
        steps = f["run/step"][:]
        assert f["run_state"][()] == 1
        assert all(f[g]["step"].shape[0] == kept + new for g in ("tree", "run"))
        assert np.all(f["traces/sample_step"][:] <= steps[-1])
        assert np.all(np.diff(f["run/tokens_seen"][:]) > 0) and np.all(np.diff(f["run/elapsed_s"][:]) > 0)
    assert np.all(np.diff(steps) > 0)
    assert not lock_path(path).exists()
    return steps


def resume_in_process(path: Path, steps: int) -> None:
    """What `routescope record --resume PATH --steps N` runs, in this process (saves a CLI start-up)."""
    cfg = replace(config_from_dict(describe(path)["config"]["preset"]), steps=steps)
    train(cfg, out=path, device="cpu", show_progress=False, checkpoint=True, resume=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug run recorded by the CLI to step 15 (3 intervals), with its checkpoint."""
    path = tmp_path_factory.mktemp("resume") / "run.h5"
    result = run_cli("record", *DEBUG, "--steps", "15", "--out", str(path))
    assert result.returncode == 0, result.stderr
    return path


def copy_run(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".ckpt.pt"), dst.with_suffix(".ckpt.pt"))
    return dst


def test_resume_after_clean_finish(finished: Path, tmp_path: Path) -> None:
    path = copy_run(finished, tmp_path)
    assert ckpt_step(path) == 15
    result = run_cli("record", "--resume", str(path), "--steps", "30", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    steps = check_resumed(path, 3, 3)
    assert steps.tolist() == [5, 10, 15, 20, 25, 30]
    summary = describe(path)
    assert summary["config"]["preset"]["steps"] == 30 and summary["run_state"] == "finished"
    assert ckpt_step(path) == 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_resume_after_signal(tmp_path: Path, sig: int) -> None:
    path = tmp_path / "run.h5"
    child = subprocess.Popen([sys.executable, "-m", "routescope.cli", "record", *DEBUG, "--steps", "100000",
                              "--every", "2", "--checkpoint-minutes", "0", "--out", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    ckpt = path.with_suffix(".ckpt.pt")
    deadline = time.monotonic() + 60
    while not (ckpt.exists() and ckpt_step(path) >= 6):
        assert child.poll() is None and time.monotonic() < deadline, "the recording did not reach step 6"
        time.sleep(0.1)
    child.send_signal(sig)
    child.wait(timeout=30)
    assert not lock_path(path).exists() or sig == signal.SIGKILL  # a killed writer leaves the (unlocked) sidecar
    at = ckpt_step(path)
    kept = int(np.count_nonzero(steps_of(path) <= at))
    assert kept >= 1
    resume_in_process(path, at + 6)
    steps = check_resumed(path, kept, 3)
    assert steps[-3:].tolist() == [at + 2, at + 4, at + 6]


def test_resume_truncates_uneven_rows(finished: Path, tmp_path: Path) -> None:
    """After a kill some variables can hold one row more than the others: resuming cuts them first."""
    path = copy_run(finished, tmp_path)
    with h5py.File(path, "r+") as f:
        f["tree/node_visits"].resize(4, axis=0)
        f["run/train_loss"].resize(4, axis=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(TreeFFN(8, 8, depth=2))
    with pytest.raises(RunFileError, match="layers"):  # another model: refused, the file untouched
        Recorder(model, path, every=5, sample_tokens=16, resume=True).start()
    assert not lock_path(path).exists()
    resume_in_process(path, 20)
    assert check_resumed(path, 3, 1).tolist() == [5, 10, 15, 20]


def test_resume_refuses_other_config(finished: Path, tmp_path: Path) -> None:
    path = copy_run(finished, tmp_path)
    before = path.read_bytes()
    assert_one_line_error(run_cli("record", "--resume", str(path), "--steps", "30", "--every", "3", "--device", "cpu"),
                          "record_every", "5", "3")  # fmt: skip
    # The rest in-process (what the CLI turns into one line): a training config differing beyond `steps`.
    with pytest.raises(RunFileError, match=r"preset\.seed: 0 in the file, 7 now"):
        train(get_preset("debug", steps=30, seed=7), out=path, device="cpu", show_progress=False, resume=True)
    assert path.read_bytes() == before and not lock_path(path).exists()
    path.with_suffix(".ckpt.pt").unlink()
    with pytest.raises(ValueError, match="no training checkpoint"):
        train(get_preset("debug", steps=30), out=path, device="cpu", show_progress=False, resume=True)
    with pytest.raises(RunFileError, match="no such file"):
        Recorder(torch.nn.Sequential(TreeFFN(8, 8, depth=2)), tmp_path / "none.h5", resume=True).start()


HOLDER = textwrap.dedent("""
    import sys, time, torch
    from routescope import Recorder
    from routescope.layers import TreeFFN
    model = torch.nn.Sequential(TreeFFN(8, 8, depth=2))
    with Recorder(model, sys.argv[1], every=1, sample_tokens=0) as rec:
        for _ in range(3):
            model(torch.randn(4, 8)); rec.step(loss=1.0)
        print("ready", flush=True)
        time.sleep(120)
""")


def test_one_writer_per_file(tmp_path: Path) -> None:
    path = tmp_path / "held.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        model = torch.nn.Sequential(TreeFFN(8, 8, depth=2))
        for kwargs in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunLockedError, match=f"process {holder.pid}"):
                Recorder(model, path, every=1, sample_tokens=0, **kwargs).start()
        result = run_cli("record", *DEBUG, "--steps", "2", "--out", str(path), "--overwrite")
        assert_one_line_error(result, f"process {holder.pid}", "one writer per file")
        assert describe(path)["intervals"] == 3  # readers are not blocked, and the file is untouched
    finally:
        holder.kill()
        holder.wait()
    # The lock died with its process: the killed file can be resumed (its open-for-write flags cleared).
    with Recorder(model, path, every=1, sample_tokens=0, resume=True) as rec:
        assert rec.global_step == 3
        for _ in range(2):
            model(torch.randn(4, 8))
            rec.step(loss=1.0)
    with h5py.File(path, "r") as f:
        assert f["run/step"][:].tolist() == [1, 2, 3, 4, 5]
        assert f["tree/tokens"][:].tolist() == [4] * 5 and f["run/tokens_seen"][:].tolist() == [4, 8, 12, 16, 20]
    assert os.path.exists(path) and not lock_path(path).exists()


def test_interrupted_before_the_first_checkpoint_says_it_cannot_be_resumed(tmp_path: Path) -> None:
    """With the default 10-minute checkpoints a short recording has none yet: SIGTERM keeps the file and the one
    error line says to record again rather than advising a --resume that would fail."""
    path = tmp_path / "run.h5"
    child = subprocess.Popen([sys.executable, "-m", "routescope.cli", "record", *DEBUG, "--steps", "100000",
                              "--every", "2", "--out", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while steps_so_far(path) < 2:
        assert child.poll() is None and time.monotonic() < deadline, "the recording did not write two intervals"
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert child.returncode == 2 and len(lines) == 1 and "cannot be resumed" in lines[0], err
    assert not path.with_suffix(".ckpt.pt").exists() and steps_of(path).size >= 2
