"""Recording through torch.compile: the layers update their accumulators inside forward (no hooks), so a
compiled model's file holds exactly the counts of the same run uncompiled."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import check_tree_invariants

from routescope import Recorder
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT, GPTConfig

COUNTS = ("tokens", "node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires")
SUMS = ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum")


def record(path: Path, compiled: bool) -> None:
    """4 SGD steps of a tiny tree GPT on Shakespeare bytes, rows of 2 steps, 4 sampled tokens per row."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=16, n_layer=2, n_head=2, d_model=32, depth=3, trees=2, backend="torch"))
    step_model = torch.compile(model, backend="aot_eager") if compiled else model
    corpus, g = Corpus.shakespeare(), torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, path, every=2, sample_tokens=4) as rec:
        for _ in range(4):
            x, y = corpus.batch("train", 4, 16, g)
            _, loss = step_model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, token_ids=x)


@pytest.mark.slow
def test_compiled_model_records_the_same_counts(tmp_path: Path) -> None:
    torch._dynamo.reset()
    record(tmp_path / "eager.h5", compiled=False)
    record(tmp_path / "compiled.h5", compiled=True)
    assert check_tree_invariants(tmp_path / "compiled.h5") == 2
    with h5py.File(tmp_path / "eager.h5", "r") as eager, h5py.File(tmp_path / "compiled.h5", "r") as compiled:
        assert compiled["tree/tokens"][:].tolist() == [128, 128]
        for name in COUNTS:
            np.testing.assert_array_equal(compiled[f"tree/{name}"][:], eager[f"tree/{name}"][:], err_msg=name)
        for name in SUMS:
            np.testing.assert_allclose(compiled[f"tree/{name}"][:], eager[f"tree/{name}"][:], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(compiled["traces/leaf"][:], eager["traces/leaf"][:])


def test_recording_forward_is_one_graph() -> None:
    """The accumulation (and trace keeping) compiles into the model's graph: no graph break falls back to eager."""
    model = GPT(GPTConfig(seq_len=16, n_layer=2, n_head=2, d_model=32, depth=3, trees=2, backend="torch"))
    for block in model.blocks:
        block.mlp.recording = block.mlp.trace_next = True
    x = torch.randint(0, 256, (2, 16))
    explained = torch._dynamo.explain(model)(x, x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert all(int(block.mlp.tokens) == 32 for block in model.blocks)
