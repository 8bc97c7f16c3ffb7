"""The training path's options (issue 19, part 1): precision, fused AdamW, torch.compile, checkpoints by wall
time, batches gathered on the device, and the model-FLOPs count behind the MFU line. CPU-side behaviour here;
the CUDA path (bf16 autocast, pinned batches, MFU on a known device) is exercised by tests/test_gpu.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli

from routescope.trainers import train as train_module
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT, GPTConfig
from routescope.trainers.presets import get_preset
from routescope.trainers.train import peak_flops, resolve_precision, train


def test_precision_defaults_and_refusals() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("bf16", cpu)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("fp16", cpu)
    assert peak_flops(cpu, "fp32") is None


def test_record_refuses_bf16_on_the_cpu_in_one_line(tmp_path: Path) -> None:
    result = run_cli("record", "-c", "debug", "--steps", "2", "--device", "cpu", "--precision", "bf16",
                     "--out", str(tmp_path / "r.h5"))  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "needs a CUDA device" in lines[0], result.stderr


def test_cpu_batches_are_the_generators_windows() -> None:
    """Passing the CPU device changes nothing: the same windows as before, from the same generator draws."""
    corpus = Corpus(train=torch.arange(200, dtype=torch.uint8), val=torch.arange(50, dtype=torch.uint8))
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, y1 = corpus.batch("train", 4, 8, a)
    x2, y2 = corpus.batch("train", 4, 8, b, torch.device("cpu"))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.int64
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(x1[:, 1] - x1[:, 0], torch.ones(4, dtype=torch.int64))


def _linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("mlp", ["dense", "tree", "moe"])
def test_flops_per_token_by_hand(mlp: str) -> None:
    """6 × the weights one token multiplies with + 12·L·C·S, written out here from the configuration."""
    cfg = GPTConfig(mlp=mlp, n_layer=2, d_model=32, n_head=2, seq_len=16, depth=3, trees=2, dense_width=128, experts=4,
                    k=2, expert_width=16)  # fmt: skip
    model = GPT(cfg)
    per_layer = {"dense": 2 * 32 * 128, "tree": 2 * (3 + 1) * (32 + 32), "moe": 32 * 4 + 2 * 16 * 2 * 32}[mlp]
    attention = 4 * 32 * 32  # qkv and the output projection
    expected = 6 * (2 * (per_layer + attention) + 32 * 256) + 12 * 2 * 32 * 16
    assert model.flops_per_token() == expected
    if mlp == "dense":  # the dense count is every Linear weight, the tied head included once
        assert 6 * _linear_weights(model) + 12 * 2 * 32 * 16 == expected


def _count_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    steps: list[int] = []
    real = train_module.save_checkpoint

    def counting(path, model, optimizer, step, *args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(step)
        return real(path, model, optimizer, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", counting)
    return steps


@pytest.mark.parametrize("minutes, expected", [(10.0, [20]), (0.0, [5, 10, 15, 20])])
def test_checkpoints_follow_wall_time_and_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minutes: float,
                                                  expected: list[int]) -> None:  # fmt: skip
    """A short run saves once, at its end; with 0 minutes, at every interval end (the old behaviour)."""
    saved = _count_saves(monkeypatch)
    cfg = get_preset("debug", steps=20, record_every=5)
    result = train(cfg, out=tmp_path / "r.h5", device="cpu", show_progress=False, checkpoint=True, checkpoint_minutes=minutes)
    assert saved == expected and result.precision == "fp32" and result.mfu is None
    assert torch.load(tmp_path / "r.ckpt.pt", weights_only=False)["step"] == 20
    with pytest.raises(ValueError, match="checkpoint-minutes"):
        train(cfg, device="cpu", show_progress=False, checkpoint_minutes=-1)


def _counts(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[f"tree/{name}"][:] for name in ("node_visits", "node_right", "leaf_visits", "tokens")}


@pytest.mark.slow
def test_compiled_training_records_what_eager_records(tmp_path: Path) -> None:
    """torch.compile (inductor, on the CPU) trains the same model: the recorded routing counts of a few steps equal
    the eager run's (the routing decisions agree; float sums may differ in the last bits), and so do the losses."""
    cfg = replace(get_preset("debug", steps=6, record_every=3), eval_every=1000)
    eager = train(cfg, out=tmp_path / "eager.h5", device="cpu", show_progress=False)
    compiled = train(cfg, out=tmp_path / "compiled.h5", device="cpu", show_progress=False, compile=True)
    a, b = _counts(tmp_path / "eager.h5"), _counts(tmp_path / "compiled.h5")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert compiled.final_train_loss == pytest.approx(eager.final_train_loss, rel=1e-4)
