"""Recording under torch.distributed: 2 gloo ranks under DDP write the file one process writes for all tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import check_tree_invariants
from torch import nn

from routescope import Recorder, TreeFFN
from routescope.record.distributed import NullWriter, accumulator_names, ignore_accumulators, reduce_interval

STEPS, EVERY, WORLD = 5, 2, 2  # intervals close at steps 2, 4 and 5 (the partial last one)
COUNTS = ("tokens", "layer_tokens", "node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires")
SUMS = ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum")


class Net(nn.Module):
    """Embedding -> two tree layers (neuron and leaf-MLP form)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.first = TreeFFN(16, 16, 3, trees=2)
        self.second = TreeFFN(16, 16, 2, variant="leaf_mlp", leaf_width=4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(self.embed(ids)))


def global_batches() -> list[torch.Tensor]:
    """The same (4, 8) id batches for every process; rank r trains on rows [2r, 2r+2)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (4, 8), generator=g) for _ in range(STEPS)]


def train(model: nn.Module, rec: Recorder, rank: int | None) -> None:
    """lr=0 SGD steps (weights stay equal across runs, so routing is comparable exactly)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for ids in global_batches():
        local = ids if rank is None else ids.chunk(WORLD)[rank]
        loss = model(local).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss, token_ids=local, lr=0.0)


def _worker(rank: int, init_file: str, out: str) -> None:
    """One rank: DDP with broadcast_buffers=True built BEFORE the recorder (the harder order)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls = []
    all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(sys._getframe(1).f_globals.get("__name__"))
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    try:
        torch.manual_seed(0)
        model = Net()
        # find_unused_parameters: the leaf-MLP form's routing weights get no gradient (hard decisions)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=True, find_unused_parameters=True)
        with Recorder(ddp, Path(out) / f"rank{rank}.h5", every=EVERY, sample_tokens=4) as rec:
            train(ddp, rec, rank)
        (Path(out) / f"calls{rank}.json").write_text(json.dumps(calls))
        # Ranks that disagree on the tensor scalars get a clear error on every rank (not a hang).
        try:
            with Recorder(model, Path(out) / f"mismatch{rank}.h5", every=1, sample_tokens=0) as rec:
                model(global_batches()[0])
                rec.step(loss=torch.tensor(1.0) if rank == 0 else None)
        except RuntimeError as err:
            (Path(out) / f"mismatch{rank}.txt").write_text(str(err))
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_over_all_tokens(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    assert not (tmp_path / "rank1.h5").exists(), "only rank 0 writes"
    for rank in range(WORLD):  # one all-reduce per dtype per interval, none per step
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        assert calls.count("routescope.record.distributed") == 2 * 3, calls
        assert "different tensor scalars" in (tmp_path / f"mismatch{rank}.txt").read_text()

    torch.manual_seed(0)
    model = Net()
    with Recorder(model, tmp_path / "single.h5", every=EVERY, sample_tokens=4) as rec:
        train(model, rec, None)

    assert check_tree_invariants(tmp_path / "rank0.h5") == 3
    with h5py.File(tmp_path / "rank0.h5", "r") as two, h5py.File(tmp_path / "single.h5", "r") as one:
        assert two.attrs["world_size"] == 2 and one.attrs["world_size"] == 1
        assert list(two["tree/step"][:]) == list(one["tree/step"][:]) == [2, 4, 5]
        assert list(two["tree/tokens"][:]) == [64, 64, 32]  # both ranks' tokens
        for name in COUNTS:
            np.testing.assert_array_equal(two[f"tree/{name}"][:], one[f"tree/{name}"][:], err_msg=name)
        for name in SUMS:
            np.testing.assert_allclose(two[f"tree/{name}"][:], one[f"tree/{name}"][:], rtol=1e-9, atol=1e-9, err_msg=name)
        # train_loss: per-rank interval means averaged over ranks = the mean over all tokens (equal halves)
        np.testing.assert_allclose(two["run/train_loss"][:], one["run/train_loss"][:], rtol=1e-5)
        np.testing.assert_array_equal(two["run/tokens_seen"][:], one["run/tokens_seen"][:])
        assert two["traces/leaf"].shape[0] > 0  # rank 0's sample is kept


def test_reduce_interval_is_identity_outside_distributed() -> None:
    ints, floats = torch.arange(5), torch.rand(4, dtype=torch.float64)
    out_ints, out_floats, failed = reduce_interval(ints, floats, 3, 2, 1, writer_failed=True)
    assert out_ints is ints and out_floats is floats and failed is None


def test_ignore_accumulators_marks_every_accumulator_buffer() -> None:
    model = Net()
    names = ignore_accumulators(model)
    assert "first.node_visits" in names and "second.leaf_act_sum" in names and "first.tokens" in names
    assert set(names) == set(accumulator_names(model))
    assert set(names) <= set(model._ddp_params_and_buffers_to_ignore)
    assert not any(name.startswith("embed") for name in names)
    NullWriter("x", overwrite=True).append_interval(1, {}, {})  # takes anything, writes nothing
