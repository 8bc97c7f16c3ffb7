"""Failures under torch.distributed (2 gloo ranks): every rank learns of them and stops alike, none hangs.

Rank 0 alone writes, so its failures (the file cannot be opened; a write fails mid-run) must reach the
other ranks, which would otherwise wait forever in the next collective. Each test runs the ranks with a
deadline: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import errno
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import WORLD, Net, global_batches

from routescope import Recorder
from routescope.record.recorder import RecorderError
from routescope.store import RunFileError, writer

DEADLINE_S = 120.0
FAIL_AT_ROW = 2  # rank 0's writer fails inside the third interval


def run_ranks(fn, *args) -> None:  # type: ignore[no-untyped-def]
    """Start WORLD ranks of `fn(rank, init_file, *args)`; fail (and kill them) if they are not done in time."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"ranks still running after {DEADLINE_S:.0f} s: a rank is waiting for another (hang)")


def _fail_mid_run(rank: int, folder: str, on_error: str, device: str = "cpu") -> None:
    """Rank 0's writer gets ENOSPC inside interval FAIL_AT_ROW + 1; each rank reports how it stopped.
    device "cuda": both ranks on the one GPU (gloo reduces CUDA tensors), so the flag takes the GPU path."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/init-{on_error}", rank=rank, world_size=WORLD)
    if rank == 0:
        real = writer._append_rows

        def append(dset, first, values):  # type: ignore[no-untyped-def]
            if dset.name == "/tree/tokens" and first >= FAIL_AT_ROW:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(dset, first, values)

        writer._append_rows = append
    report: dict = {"rank": rank, "raised_at": None, "stepped": 0}
    torch.manual_seed(0)
    model = Net().to(device)
    batches = [ids.to(device) for ids in global_batches() * 8]  # 40 steps
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Recorder(model, Path(folder) / f"{on_error}.h5", every=1, sample_tokens=0, on_error=on_error) as rec:
                for i, ids in enumerate(batches, 1):
                    model(ids.chunk(WORLD)[rank]).pow(2).mean().backward()
                    try:
                        rec.step()
                    except RecorderError as err:
                        report.update(raised_at=i, error=str(err))
                        raise
                    report["stepped"] = i
                    time.sleep(0.02)  # rank 0's writer thread gets its turn, as real compute would give it
        report["warnings"] = [str(w.message) for w in caught if "recording to" in str(w.message)]
    except RecorderError:
        pass
    finally:
        (Path(folder) / f"{on_error}-rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


@pytest.mark.slow
def test_writer_failure_stops_every_rank_with_on_error_stop(tmp_path: Path) -> None:
    """on_error="stop": both ranks finish training, each warns once, rank 0's file keeps the intervals before."""
    run_ranks(_fail_mid_run, str(tmp_path), "stop")
    reports = [json.loads((tmp_path / f"stop-rank{r}.json").read_text()) for r in range(WORLD)]
    for report in reports:
        assert report["stepped"] == 40 and report["raised_at"] is None, report
        assert len(report["warnings"]) == 1, report
    assert "No space left on device" in reports[0]["warnings"][0]
    assert "rank 0" in reports[1]["warnings"][0]
    import routescope

    ds = routescope.open(tmp_path / "stop.h5")
    assert ds.sizes["step"] == FAIL_AT_ROW and ds.attrs["run_state"] == "failed"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_writer_failure_reaches_every_rank_on_cuda(tmp_path: Path) -> None:
    """The same agreement with CUDA buffers: the flag travels to the host asynchronously (pinned copy, event)."""
    run_ranks(_fail_mid_run, str(tmp_path), "raise", "cuda")
    reports = [json.loads((tmp_path / f"raise-rank{r}.json").read_text()) for r in range(WORLD)]
    assert reports[0]["raised_at"] is not None and reports[0]["raised_at"] == reports[1]["raised_at"], reports
    assert "No space left on device" in reports[0]["error"]


@pytest.mark.slow
def test_writer_failure_raises_on_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """on_error="raise": every rank raises RecorderError, at the same step (no rank left in an all-reduce)."""
    run_ranks(_fail_mid_run, str(tmp_path), "raise")
    reports = [json.loads((tmp_path / f"raise-rank{r}.json").read_text()) for r in range(WORLD)]
    assert reports[0]["raised_at"] is not None and reports[0]["raised_at"] == reports[1]["raised_at"], reports
    assert reports[0]["raised_at"] > FAIL_AT_ROW
    assert "No space left on device" in reports[0]["error"] and "rank 0" in reports[1]["error"]


def _open_then_resume(rank: int, folder: str) -> None:
    """A file that exists (no overwrite) stops both ranks at start; then a 2-rank run and its resume."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/init-open", rank=rank, world_size=WORLD)
    out: dict = {}
    try:
        model = Net()
        taken = Path(folder) / "taken.h5"
        try:
            Recorder(model, taken, every=1).start()
        except RunFileError as err:
            out["open_error"] = str(err)
        path = Path(folder) / "resumed.h5"
        with Recorder(model, path, every=2, sample_tokens=0) as rec:
            for ids in global_batches()[:4]:
                model(ids.chunk(WORLD)[rank]).sum().backward()
                rec.step()
        with Recorder(model, path, every=2, sample_tokens=0, resume=True) as rec:
            out["resumed_step"] = rec.global_step  # every rank continues from the file's last step (4)
            for ids in global_batches()[:2]:
                model(ids.chunk(WORLD)[rank]).sum().backward()
                rec.step()
    finally:
        (Path(folder) / f"open-rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


@pytest.mark.slow
def test_open_failure_and_resume_reach_every_rank(tmp_path: Path) -> None:
    (tmp_path / "taken.h5").write_bytes(b"someone else's file")
    run_ranks(_open_then_resume, str(tmp_path))
    reports = [json.loads((tmp_path / f"open-rank{r}.json").read_text()) for r in range(WORLD)]
    assert "already exists" in reports[0]["open_error"]
    assert "rank 0 could not open the run file" in reports[1]["open_error"] and "already exists" in reports[1]["open_error"]
    assert [r["resumed_step"] for r in reports] == [4, 4]
    import routescope

    assert list(routescope.open(tmp_path / "resumed.h5")["step"].values) == [2, 4, 6]
