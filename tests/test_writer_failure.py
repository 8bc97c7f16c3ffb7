"""The background writer fails (disk full): a clear RecorderError at the next step, earlier rows intact, file
marked failed, and training can go on without recording (`on_error="stop"`)."""

from __future__ import annotations

import errno
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import check_tree_invariants
from torch import nn

import routescope
from routescope import Recorder, TreeFFN
from routescope.record.recorder import RecorderError
from routescope.store import write_errors, writer

GOOD_INTERVALS = 3
DEADLINE_S = 20.0  # the failure must reach the training thread well within this (never a hang)


class Tiny(nn.Module):
    """Embedding and one tree layer: enough for the recorder to write real intervals."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.tree = TreeFFN(8, 8, 3, trees=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tree(self.embed(ids))


def fill_disk_mid_interval(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the writer's dataset appends raise ENOSPC partway through interval GOOD_INTERVALS + 1."""
    real, calls = writer._append_rows, {"n": 0, "per_interval": 0}

    def append(dset, first, values):  # type: ignore[no-untyped-def]
        if dset.name == "/tree/tokens" and first == GOOD_INTERVALS:
            calls["armed"] = 1  # the interval after the good ones has started: fail a few writes later
        if calls.get("armed"):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(dset, first, values)

    monkeypatch.setattr(writer, "_append_rows", append)
    return calls


def train_until_error(rec: Recorder, model: nn.Module, steps: int) -> tuple[int, RecorderError | None]:
    """Plain training steps; returns the step at which rec.step() raised (and the error), or (steps, None)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for i in range(1, steps + 1):
        ids = torch.randint(0, 50, (3, 6), generator=g)
        loss = model(ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        try:
            rec.step(loss=loss, token_ids=ids)
        except RecorderError as err:
            return i, err
        time.sleep(0.01)  # give the writer thread its turn, as a real step's compute would
    return steps, None


def assert_good_rows_intact(path: Path) -> None:
    """The intervals written before the failure are there, complete and invariant-clean; nothing after."""
    assert check_tree_invariants(path) == GOOD_INTERVALS
    with h5py.File(path, "r") as f:  # closed (as failed), so plain h5py opens it
        assert int(f["run_state"][()]) == 3
        assert list(f["tree/step"][:]) == [1, 2, 3] and list(f["run/step"][:]) == [1, 2, 3]
    ds = routescope.open(path)
    assert ds.attrs["run_state"] == "failed" and ds.sizes["step"] == GOOD_INTERVALS
    assert np.all(ds["tokens"].values == 18)


def test_disk_full_raises_at_next_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default on_error="raise": the next rec.step() raises RecorderError naming the OS error; close() re-raises."""
    fill_disk_mid_interval(monkeypatch)
    model, path = Tiny(), tmp_path / "full.h5"
    rec = Recorder(model, path, every=1, sample_tokens=4)
    rec.start()
    start = time.monotonic()
    failed_at, err = train_until_error(rec, model, 2000)
    assert err is not None, "the writer's failure never reached the training thread"
    assert time.monotonic() - start < DEADLINE_S
    assert "No space left on device" in str(err) and str(path) in str(err)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert failed_at > GOOD_INTERVALS
    with pytest.raises(RecorderError):  # once failed, every step says so (no silent data loss)
        rec.step()
    with pytest.raises(RecorderError, match="No space left"):
        rec.close()
    assert_good_rows_intact(path)
    assert not model.tree.recording  # the layers stopped accumulating
    assert "No space left on device" in routescope.store.describe(path)["failure"]  # room on this disk: recorded


def test_disk_full_in_a_with_block_marks_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The context-manager form: the RecorderError leaves the block and the file is closed as failed."""
    fill_disk_mid_interval(monkeypatch)
    model, path = Tiny(), tmp_path / "with.h5"
    with pytest.raises(RecorderError, match="No space left"):
        with Recorder(model, path, every=1, sample_tokens=0) as rec:
            _, err = train_until_error(rec, model, 2000)
            assert err is not None
            raise err
    assert_good_rows_intact(path)


def test_on_error_stop_lets_training_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """on_error="stop": one warning, the file closed as failed, later steps are no-ops and training finishes."""
    fill_disk_mid_interval(monkeypatch)
    model, path = Tiny(), tmp_path / "stop.h5"
    steps = 60
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(model, path, every=1, sample_tokens=4, on_error="stop") as rec:
            done, err = train_until_error(rec, model, steps)
            for _ in range(3):  # training goes on: stepping and logging stay harmless no-ops
                rec.step(loss=1.0)
                rec.log(val_loss=2.0)
    assert err is None and done == steps
    stopped = [w for w in caught if "recording to" in str(w.message)]
    assert len(stopped) == 1, [str(w.message) for w in caught]
    assert "No space left on device" in str(stopped[0].message)
    assert_good_rows_intact(path)


def test_on_error_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        Recorder(Tiny(), tmp_path / "x.h5", on_error="ignore")


def test_reserve_stops_before_the_disk_fills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Free space shrinking towards the reserve: the writer stops before writing (nothing half-written),
    names the free space and how to resume, and the file closes normally, marked failed."""
    real = write_errors.shutil.disk_usage
    free = {"left": 200 * 2**20}

    def disk_usage(path):  # type: ignore[no-untyped-def]
        free["left"] -= 40 * 2**20  # another process fills the disk: 40 MiB less at every interval
        return real(path)._replace(free=max(free["left"], 0))

    monkeypatch.setattr(write_errors.shutil, "disk_usage", disk_usage)
    model, path = Tiny(), tmp_path / "reserve.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(model, path, every=1, sample_tokens=4, on_error="stop", reserve_bytes=50 * 2**20) as rec:
            done, err = train_until_error(rec, model, 10)
    assert err is None and done == 10
    stopped = [str(w.message) for w in caught if "recording to" in str(w.message)]
    assert len(stopped) == 1 and "only 40.0 MiB free on its disk" in stopped[0] and "50.0 MiB" in stopped[0]
    assert "resume=True" in stopped[0] and "[Errno" not in stopped[0]
    # 160, 120, 80 MiB free: three intervals written; at 40 MiB (< 50) the fourth is refused before any write.
    assert_good_rows_intact(path)
    with h5py.File(path, "r") as f:  # why it stopped, for `routescope info` later
        assert f.attrs["failure"].startswith("only 40.0 MiB free on its disk")


def test_reserve_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserve_bytes"):
        Recorder(Tiny(), tmp_path / "x.h5", reserve_bytes=-1)


# A real training child whose file the kernel refuses to grow past `limit` bytes (RLIMIT_FSIZE: as a full disk,
# or a quota, does: write() fails with EFBIG). reserve=None: the writer's free-space guard; 0: no guard, so HDF5
# itself meets the failed write.
REAL_LIMIT_CHILD = """
import resource, signal, sys, warnings
import torch
sys.path.insert(0, {tests!r})
from test_writer_failure import Tiny
from routescope import Recorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
torch.manual_seed(0)
model = Tiny()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with Recorder(model, {path!r}, every=1, sample_tokens=64, on_error="stop", reserve_bytes={reserve}) as rec:
        for step in range({steps}):
            ids = torch.randint(0, 50, (3, 6))
            loss = model(ids).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            rec.step(loss=loss, token_ids=ids)
stopped = [str(w.message) for w in caught if "recording to" in str(w.message)]
print("trained", step + 1, "warnings", len(stopped))
print(*stopped, sep="\\n")
"""


def run_limited_child(path: Path, limit: int, reserve: int | None, steps: int) -> str:
    """Run REAL_LIMIT_CHILD; it must exit 0 (training finished: no crash at exit) and warn exactly once."""
    import subprocess
    import sys

    code = REAL_LIMIT_CHILD.format(tests=str(Path(__file__).parent), limit=limit, path=str(path), reserve=reserve,
                                   steps=steps)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"trained {steps} warnings 1" in result.stdout, (result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout


def assert_closed_failed_and_complete(path: Path, limit: int) -> int:
    """The limited file: within the limit, opens with plain h5py, marked failed, steps 1..rows, invariants hold."""
    assert path.stat().st_size <= limit
    rows = check_tree_invariants(path)
    assert rows >= 2
    with h5py.File(path, "r") as f:  # plain h5py: the open-for-write flags were cleared at close
        assert int(f["run_state"][()]) == 3
    ds = routescope.open(path)
    assert ds.sizes["step"] == rows and list(ds["step"].values) == list(range(1, rows + 1))
    assert ds.attrs["run_state"] == "failed"
    return rows


@pytest.mark.slow
def test_file_size_limit_stops_at_the_reserve(tmp_path: Path) -> None:
    """The free-space guard also reads `ulimit -f`: it stops cleanly before the kernel refuses a write."""
    path, limit = tmp_path / "guarded.h5", 6 * 2**20
    out = run_limited_child(path, limit, None, 3000)
    assert "left under this process's file-size limit (ulimit -f)" in out
    rows = assert_closed_failed_and_complete(path, limit)
    assert rows < 3000


@pytest.mark.slow
def test_real_failed_write_inside_hdf5(tmp_path: Path) -> None:
    """No guard (reserve_bytes=0): HDF5 meets the failed write itself. Training still finishes with one
    warning naming the OS error, the process exits cleanly, and every interval before the failed one is
    intact (the writer detaches the file instead of letting HDF5 flush half an interval at close)."""
    path, limit = tmp_path / "limited.h5", 2 * 2**20
    out = run_limited_child(path, limit, 0, 3000)
    assert "File too large" in out and "earlier intervals are intact" in out
    rows = assert_closed_failed_and_complete(path, limit)
    assert f"its {rows} earlier intervals" in out


def _mount_tmpfs(where: Path, size: str) -> bool:
    """Mount a small tmpfs (a real filesystem that fills up); False where this process may not mount."""
    import subprocess

    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("reserve", "mib"), [(None, 8), (0, 3)], ids=["guarded", "unguarded"])
def test_real_full_disk(tmp_path: Path, reserve: int | None, mib: int) -> None:
    """A real full filesystem (a small tmpfs; needs permission to mount, skipped visibly otherwise)."""
    import subprocess

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, f"{mib}m"):
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk case runs on RLIMIT_FSIZE above")
    try:
        path = disk / "run.h5"
        out = run_limited_child(path, 2**40, reserve, 3000)
        assert ("free on its disk" if reserve is None else "No space left on device") in out
        assert_closed_failed_and_complete(path, mib * 2**20)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_resume_after_the_disk_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the stop message tells the user to do works: once there is room again, resume appends after
    the last complete interval, steps strictly increasing, every row invariant-clean."""
    path = tmp_path / "resumed.h5"
    with monkeypatch.context() as patch:
        fill_disk_mid_interval(patch)  # a write fails inside interval 4: the file is detached with 3 rows
        model = Tiny()
        with pytest.warns(RuntimeWarning, match="No space left"):
            with Recorder(model, path, every=1, sample_tokens=4, on_error="stop") as rec:
                train_until_error(rec, model, 20)
    assert_good_rows_intact(path)
    with Recorder(model, path, every=1, sample_tokens=4, resume=True) as rec:
        assert rec.global_step == GOOD_INTERVALS
        train_until_error(rec, model, 5)
    assert check_tree_invariants(path) == GOOD_INTERVALS + 5
    ds = routescope.open(path)
    assert list(ds["step"].values) == list(range(1, GOOD_INTERVALS + 6)) and ds.attrs["run_state"] == "finished"


@pytest.mark.slow
def test_record_command_on_a_full_disk_then_resume(tmp_path: Path) -> None:
    """`routescope record` hitting its reserve under `ulimit -f`: exit 2 with one `error:` line that says how
    to continue, a complete file marked failed; `record --resume` (no limit now) then finishes the run."""
    import resource
    import signal
    import subprocess
    import sys

    path, limit = tmp_path / "cli.h5", 3 * 2**20

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    base = [sys.executable, "-m", "routescope.cli", "record"]
    first = subprocess.run([*base, "--config", "debug", "--out", str(path), "--device", "cpu", "--steps", "600",
                            "--every", "1", "--reserve-mib", "0.5", "--checkpoint-minutes", "0"], preexec_fn=limited, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert first.returncode == 2, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: recording to"), first.stderr[-3000:]
    assert "under this process's file-size limit" in errors[0] and f"record --resume {path}" in errors[0]
    rows = assert_closed_failed_and_complete(path, limit)
    assert 1 < rows < 600
    again = subprocess.run([*base, "--resume", str(path), "--steps", str(rows + 20)], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    ds = routescope.open(path)
    steps = ds["step"].values
    assert ds.attrs["run_state"] == "finished" and steps[-1] == rows + 20 and np.all(np.diff(steps) > 0)
    assert check_tree_invariants(path) == len(steps)


def test_fsync_syncs_the_run_file_after_every_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync=True: one os.fsync of the run file's own descriptor per interval, after its rows are flushed
    (so that what a power loss keeps is a complete interval); fsync=False: none."""
    import os

    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    for flag, path in ((False, tmp_path / "plain.h5"), (True, tmp_path / "synced.h5")):
        synced.clear()
        model = Tiny()
        with Recorder(model, path, every=2, sample_tokens=0, fsync=flag) as rec:
            train_until_error(rec, model, 7)  # intervals end at steps 2, 4, 6 and (close) 7
        inode = path.stat().st_ino
        assert synced.count(inode) == (4 if flag else 0), (flag, synced)
