"""`routescope.prune` and `routescope prune` (issue 21): a user model pruned from its own recording, the CLI on a
`record` run end to end, pruned checkpoints that load in one call, and bad input as one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import routescope
from routescope import Recorder, TreeFFN
from routescope.analysis import Thresholds
from routescope.layers.pruned_tree import PrunedTreeFFN
from routescope.pruning import PruneError
from routescope.pruning.quality import unit_sets


def user_model() -> torch.nn.Sequential:
    """Two tree layers; node 2 of the first layer's tree 0 never sends a token right (bias −100): the subtree of
    node 6 is dead by construction."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(TreeFFN(8, 8, depth=3, trees=2), torch.nn.GELU(), TreeFFN(8, 4, depth=2))
    with torch.no_grad():
        model[0].b[0, 2] = -100.0
    return model


@pytest.fixture(scope="module")
def user_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = user_model()
    path = tmp_path_factory.mktemp("prune") / "user.h5"
    with Recorder(model, path, every=2, sample_tokens=0) as rec:
        for _ in range(40):
            model(torch.randn(512, 8))
            rec.step()
    return model, path


def test_user_model_prunes_the_dead_subtree_and_changes_nothing_else(user_run, tmp_path: Path) -> None:  # noqa: ANN001
    model, path = user_run
    batches = [torch.randn(256, 8) for _ in range(4)]
    pruned, report = routescope.prune(model, path, batches=batches, loss=lambda m, x: m(x).square().mean())
    first = pruned[0]
    assert isinstance(first, PrunedTreeFFN) and not first.live_mask()[0, [6, 13, 14]].any()
    assert first.held_side[0, 2] == 0
    layer0 = report.layers[0]
    assert layer0.name == "0" and layer0.units_after <= 30 - 3 and layer0.params_after < layer0.params_before
    assert layer0.reached_removed == 0.0 and layer0.window_reach == 0.0  # nothing went right at node 2
    # layer 0's input is the model's: its end-to-end reroutes are exactly the tokens that reached a removed unit
    assert layer0.rerouted == layer0.reached_removed
    # tokens that reached no removed unit in either layer (original model) have bit-identical outputs
    x = torch.cat(batches)
    with torch.no_grad():
        y0, y1 = model(x), pruned(x)
        hidden = torch.nn.functional.gelu(model[0](x))
        reached = torch.zeros(len(x), dtype=torch.bool)
        for layer, inputs, cut in ((model[0], x, pruned[0]), (model[2], hidden, pruned[2])):
            used = unit_sets(layer, inputs)
            if isinstance(cut, PrunedTreeFFN):
                reached |= (used & ~cut.live_mask().reshape(-1)).any(-1)
    assert (~reached).any() and torch.equal(y1[~reached], y0[~reached])
    assert model[0].__class__ is TreeFFN, "the model given is left as it was"
    # save and load in one call, with a fresh model of the original architecture
    out = routescope.save_pruned(pruned, tmp_path / "p.pt")
    loaded = routescope.load_pruned(out, model=user_model())
    with torch.no_grad():
        assert torch.equal(loaded(x), y1)


def test_a_model_that_is_not_the_runs_is_refused(user_run) -> None:  # noqa: ANN001
    _, path = user_run
    other = torch.nn.Sequential(TreeFFN(8, 8, depth=2), TreeFFN(8, 4, depth=2))  # layer 0 of another shape
    with pytest.raises(PruneError, match="layer '0': the run recorded a tree layer of shape \\(2, 15\\)"):
        routescope.prune(other, path)
    renamed = torch.nn.Sequential()
    renamed.add_module("first", TreeFFN(8, 8, depth=3, trees=2))
    with pytest.raises(PruneError, match="that the model does not have"):
        routescope.prune(renamed, path)


def test_load_pruned_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(PruneError, match="not a pruned checkpoint"):
        routescope.load_pruned(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(PruneError, match="cannot read"):
        routescope.load_pruned(tmp_path / "junk.pt")


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    for seed in (0, 1):
        result = run_cli("record", "--config", "debug", "--device", "cpu", "--steps", "40", "--every", "2", "--seed",
                         str(seed), "--out", str(folder / f"s{seed}.h5"))  # fmt: skip
        assert result.returncode == 0, result.stderr
    return folder / "s0.h5"


def test_prune_command_end_to_end(debug_run: Path) -> None:
    """A generous δ (0.5) marks units dead in a 40-step debug run; the JSON names the file, which loads in one call
    into a model whose parameters are the report's."""
    out = debug_run.with_name("cut.pt")
    result = run_cli("prune", str(debug_run), "--delta", "0.5", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed_units"] > 0 and report["out"] == str(out) and report["window"] == "last-quarter"
    assert report["thresholds"]["delta"] == 0.5 and report["tokens"] > 0
    assert report["delta_loss"] == pytest.approx(report["loss_after"] - report["loss_before"])
    low, high = report["delta_loss_ci"]
    assert low <= report["delta_loss"] <= high
    for layer in report["layers"]:
        assert 0 <= layer["reached_removed"] <= 1 and 0 <= layer["rerouted"] <= 1
    model = routescope.load_pruned(out)
    trees = [m for m in model.modules() if isinstance(m, PrunedTreeFFN)]
    assert sum(t.live_units for t in trees) == sum(layer["units_after"] for layer in report["layers"])
    # the table form, and a second run refuses to overwrite
    again = run_cli("prune", str(debug_run), "--delta", "0.5", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_nothing_to_prune_exits_zero_and_writes_nothing(debug_run: Path) -> None:
    out = debug_run.with_name("none.pt")
    result = run_cli("prune", str(debug_run), "--delta", "1e-9", "--out", str(out))
    assert result.returncode == 0 and "nothing to prune" in result.stdout, result.stdout + result.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["other_checkpoint", "no_checkpoint", "dense", "unwritable", "foreign", "no_cuda"])
def test_prune_bad_input_is_one_line(debug_run: Path, tmp_path: Path, case: str) -> None:
    run, out, extra = debug_run, tmp_path / "out.pt", []
    if case == "other_checkpoint":
        extra = ["--checkpoint", str(debug_run.with_name("s1.ckpt.pt"))]
        words = "another run"
    elif case == "no_checkpoint":
        extra = ["--checkpoint", str(tmp_path / "missing.ckpt.pt")]
        words = "no training checkpoint"
    elif case == "dense":
        run = tmp_path / "dense.h5"
        made = run_cli("record", "--config", "debug", "--device", "cpu", "--steps", "4", "--every", "2", "--out", str(run))
        assert made.returncode == 0
        import h5py  # a run whose routed groups are gone: as a dense baseline records

        with h5py.File(run, "r+") as f:
            del f["tree"]
        words = "no routed layer"
    elif case == "unwritable":
        os.chmod(tmp_path, 0o555)
        words = "cannot write"
        if os.access(tmp_path, os.W_OK):  # root ignores the mode
            out, words = tmp_path / "no" / "such" / "out.pt", "does not exist"
    elif case == "no_cuda":
        if __import__("torch").cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        extra, words = ["--device", "cuda"], "no CUDA device"
    else:
        run = tmp_path / "foreign.h5"
        import h5py

        with h5py.File(run, "w") as f:
            f["x"] = 1
        words = "routescope"
    try:
        result = run_cli("prune", str(run), "--delta", "0.5", "--out", str(out), *extra)
    finally:
        os.chmod(tmp_path, 0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr
    assert not out.exists() and not list(out.parent.glob(".*.tmp")) if out.parent.exists() else True


def test_patched_hugging_face_model_round_trips(tmp_path: Path) -> None:
    """A `routescope.patch`ed GPT-2 recorded, pruned, saved with save_pruned and loaded into a freshly patched
    model of the same configuration (the documented route instead of save_pretrained/from_pretrained)."""
    transformers = pytest.importorskip("transformers")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                                     n_positions=32))  # fmt: skip
        routescope.patch(model, family="tree", depth=3, trees=2)
        return model

    model = fresh()
    path = tmp_path / "hf.h5"
    with Recorder(model, path, every=2, sample_tokens=0) as rec:
        for _ in range(30):
            model(torch.randint(0, 64, (8, 32)))
            rec.step()
    batches = [(torch.randint(0, 64, (4, 32)),) for _ in range(2)]
    pruned, report = routescope.prune(model, path, th=Thresholds(delta=0.5), batches=batches,
                                      loss=lambda m, b: m(b[0], labels=b[0]).loss)  # fmt: skip
    assert report.removed_units > 0 and report.loss_before is not None
    out = routescope.save_pruned(pruned, tmp_path / "hf.pruned.pt")
    loaded = routescope.load_pruned(out, model=fresh())
    loaded.eval(), pruned.eval()  # GPT-2's dropout
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    from scipy import stats

    from routescope.pruning.quality import paired_interval

    before, after = [2.0, 2.1, 1.9, 2.05], [2.01, 2.12, 1.93, 2.04]
    diff = [a - b for a, b in zip(after, before)]
    ref = stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
    assert paired_interval(before, after) == pytest.approx((ref.low, ref.high))
    assert paired_interval([1.0], [1.0]) is None


def test_a_pruned_model_trains_and_records_in_the_full_layout(user_run, tmp_path: Path) -> None:  # noqa: ANN001
    """Recording a pruned model writes the same file layout; its removed units are never visited, and training
    moves only the kept rows."""
    import h5py

    model, path = user_run
    pruned, _ = routescope.prune(model, path)
    removed = ~pruned[0].live_mask()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    out = tmp_path / "pruned.h5"
    with Recorder(pruned, out, every=2, sample_tokens=0) as rec:
        for _ in range(6):
            loss = pruned(torch.randn(256, 8)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss)
    with h5py.File(out, "r") as f, h5py.File(path, "r") as g:
        assert f["tree/node_visits"].shape[1:] == g["tree/node_visits"].shape[1:]
        visits = np.concatenate([f["tree/node_visits"][:, 0], f["tree/leaf_visits"][:, 0]], axis=-1).sum(0)  # (T, units)
    assert visits[removed.numpy()].sum() == 0 and visits[0, 0] == 6 * 256
