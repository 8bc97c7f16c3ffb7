"""The recorder: intervals, counts equal to what the layers saw, traces labelled with the right tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import check_tree_invariants
from torch import nn

import routescope
from routescope import Recorder, TreeFFN
from routescope.record.recorder import RecorderError
from routescope.store.writer import RunWriter


class TwoTrees(nn.Module):
    """Embedding -> tree -> tree: the first tree's input is a known function of the token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.first = TreeFFN(8, 8, 3, trees=2)
        self.second = TreeFFN(8, 8, 2, trees=1, variant="leaf_mlp", leaf_width=4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(self.embed(ids)))


def run_steps(model: nn.Module, rec: Recorder, steps: int, seed: int = 0, batch: tuple[int, int] = (3, 6), weights=None):
    """Train a few steps; return the ids and losses of each step (and the weights before each, if asked)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for _ in range(steps):
        if weights is not None:
            weights.append(copy.deepcopy(model.state_dict()))
        ids = torch.randint(0, 50, batch, generator=g)
        loss = model(ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss, token_ids=ids, lr=0.05)
        history.append((ids, loss.item()))
    return history


def test_intervals_counts_and_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, path = TwoTrees(), tmp_path / "r.h5"
    with Recorder(model, path, every=3, sample_tokens=0) as rec:
        history = run_steps(model, rec, 10)
        rec.log(val_loss=1.5)  # lands in the last (partial) interval
    ds = routescope.open(path)
    assert list(ds["step"].values) == [3, 6, 9, 10]  # the partial last interval is kept
    assert list(ds["tokens"].values) == [54, 54, 54, 18]
    assert check_tree_invariants(path) == 4
    run = routescope.open(path, group="run")
    expected = [np.mean([loss for _, loss in history[a:b]]) for a, b in [(0, 3), (3, 6), (6, 9), (9, 10)]]
    np.testing.assert_allclose(run["train_loss"].values, expected, rtol=1e-6)
    assert list(run["tokens_seen"].values) == [54, 108, 162, 180]
    assert np.isnan(run["val_loss"].values[:3]).all() and run["val_loss"].values[3] == 1.5
    assert ds.attrs["run_state"] == "finished"
    for _, layer in [("first", model.first), ("second", model.second)]:
        assert not layer.recording and int(layer.tokens) == 0  # switched off and drained


def test_counts_equal_an_independent_replay(tmp_path: Path) -> None:
    """Replaying the same batches through a copy of the model (same weights per step) gives the same counts."""
    torch.manual_seed(1)
    model = TwoTrees()
    replay = TwoTrees()
    replay.load_state_dict(model.state_dict())
    path = tmp_path / "r.h5"
    with Recorder(model, path, every=2, sample_tokens=0) as rec:
        history = run_steps(model, rec, 4)
    opt = torch.optim.SGD(replay.parameters(), lr=0.05)
    visits = np.zeros((2, 2, 7), dtype=np.int64)  # (interval, tree, node) of the first layer
    for step, (ids, _) in enumerate(history):
        with torch.no_grad():
            _, routing = replay.first.route_and_compute(replay.embed(ids).reshape(-1, 8))
        for t in range(2):
            np.add.at(visits[step // 2, t], routing.path[:, t, :3].reshape(-1).numpy(), 1)
        loss = replay(ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_array_equal(routescope.open(path)["node_visits"].sel(layer=0).values, visits)


def test_traces_are_labelled_with_their_tokens(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model, path = TwoTrees(), tmp_path / "t.h5"
    weights: list[dict] = []
    with Recorder(model, path, every=2, sample_tokens=5, context=4) as rec:
        history = run_steps(model, rec, 6, weights=weights)
    traces = routescope.open(path, group="traces")
    assert traces.sizes["sample"] == 15  # 5 per interval, 3 intervals
    steps = traces["sample_step"].values
    assert list(np.unique(steps)) == [2, 4, 6]
    for i in range(15):
        ids = history[int(steps[i]) - 1][0]  # the batch of the interval's last step
        seq, pos = int(traces["sequence"][i]), int(traces["position"][i])
        assert int(traces["token_id"][i]) == int(ids[seq, pos])
        ctx = traces["context_ids"].values[i]
        expected = [int(ids[seq, p]) if p >= 0 else -1 for p in range(pos - 3, pos + 1)]
        assert list(ctx) == expected
    # the recorded leaf of the first layer is where that step's weights route that token
    leaf = traces["leaf"].sel(layer=0).values
    replay = TwoTrees()
    for i in range(15):
        replay.load_state_dict(weights[int(steps[i]) - 1])
        token = int(traces["token_id"][i])
        with torch.no_grad():
            y, routing = replay.first.route_and_compute(replay.embed(torch.tensor([token])))
        assert list(leaf[i]) == (routing.path[0, :, -1] - 7).tolist()
        np.testing.assert_allclose(traces["path_act"].sel(layer=0).values[i], routing.z[0].numpy(), rtol=1e-5)
    assert (traces["leaf"].sel(layer=1, tree=1).values == -1).all()  # padding: layer 1 has one tree
    path_act = traces["path_act"].sel(layer=1).values
    assert np.isnan(path_act[:, 0, 3]).all() and not np.isnan(path_act[:, 0, :3]).any()


def test_writer_failure_reaches_the_training_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    model = TwoTrees()
    monkeypatch.setattr(RunWriter, "append_interval", disk_full)
    with pytest.raises(RecorderError, match="No space left"):
        with Recorder(model, tmp_path / "f.h5", every=1) as rec:
            for _ in range(50):
                run_steps(model, rec, 1)
    assert routescope.open(tmp_path / "f.h5").attrs["run_state"] == "failed"


def test_module_selection(tmp_path: Path) -> None:
    model = TwoTrees()
    with Recorder(model, tmp_path / "s.h5", modules=["second"], every=1) as rec:
        run_steps(model, rec, 2)
    ds = routescope.open(tmp_path / "s.h5")
    assert list(ds["layer_name"].values) == ["second"] and int(model.first.tokens) == 0
    with pytest.raises(ValueError, match="no routed layer named"):
        Recorder(model, tmp_path / "x.h5", modules=["nope"])


def test_interrupt_marks_the_file(tmp_path: Path) -> None:
    model = TwoTrees()
    with pytest.raises(KeyboardInterrupt):
        with Recorder(model, tmp_path / "i.h5", every=2) as rec:
            run_steps(model, rec, 3)
            raise KeyboardInterrupt
    ds = routescope.open(tmp_path / "i.h5")
    assert ds.attrs["run_state"] == "interrupted" and list(ds["step"].values) == [2, 3]


def test_an_interrupt_between_two_layers_leaves_the_torn_interval_out(tmp_path: Path) -> None:
    """Stopped after layer 0's forward and before layer 1's: the partial interval would hold an unfinished step
    (different token counts per layer), so it is not written; a partial interval of whole steps is."""
    import routescope
    from routescope import Recorder, TreeFFN

    for torn in (True, False):
        model = torch.nn.Sequential(TreeFFN(8, 8, depth=2), TreeFFN(8, 8, depth=2))
        path = tmp_path / f"{torn}.h5"
        rec = Recorder(model, path, every=4, sample_tokens=0)
        rec.start()
        for _ in range(5):  # one whole interval, then one step of the next
            model(torch.randn(16, 8))
            rec.step()
        if torn:
            model[0](torch.randn(16, 8))  # the interrupted step: layer 0 counted, layer 1 not
        rec.close("interrupted")
        ds = routescope.open(path)
        assert ds["step"].values.tolist() == ([4] if torn else [4, 5])
        assert np.all(ds["layer_tokens"].values[:, 0] == ds["layer_tokens"].values[:, 1])
