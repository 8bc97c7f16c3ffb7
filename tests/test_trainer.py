"""The demo trainer: the embedded corpus, presets, the schedule, and a short run whose loss falls."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import check_tree_invariants

import routescope
from routescope.trainers.data import Corpus, decode, load_plays
from routescope.trainers.model import GPT
from routescope.trainers.presets import DEFAULT_PRESET, PRESETS, get_preset
from routescope.trainers.train import learning_rate, train


def test_corpus_is_the_real_plays() -> None:
    plays = dict(load_plays())
    assert len(plays) >= 37
    assert b"If music be the food of love, play on" in plays["twelfth-night"]
    corpus = Corpus.shakespeare()
    assert 4_000_000 < len(corpus.train) + len(corpus.val) < 6_000_000
    assert 0.08 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.12
    x, y = corpus.batch("train", 4, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    assert decode([72, 105, -1]) == "Hi"


def test_presets_build_and_the_default_is_sparse() -> None:
    assert DEFAULT_PRESET in PRESETS and {"debug", "shakespeare-tree", "shakespeare-dense"} <= set(PRESETS)
    assert any(name.endswith("-gpu") for name in PRESETS)
    for name, preset in PRESETS.items():
        model = GPT(preset.model)
        assert sum(p.numel() for p in model.parameters()) > 0, name
    cfg = PRESETS[DEFAULT_PRESET].model
    active = (cfg.depth + 1) / (2 ** (cfg.depth + 1) - 1)
    assert active < 0.05  # the paper's "<5% of units per token"
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("nope")
    assert get_preset("debug", steps=3).steps == 3 and PRESETS["debug"].steps != 3


def test_learning_rate_schedule() -> None:
    cfg = get_preset("debug", lr=1.0, warmup=10, steps=110)
    assert learning_rate(cfg, 5) == pytest.approx(0.5)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 110) == pytest.approx(0.1)
    assert all(learning_rate(cfg, s) >= learning_rate(cfg, s + 1) for s in range(10, 110))


def test_debug_training_learns_and_records(tmp_path: Path) -> None:
    path = tmp_path / "debug.h5"
    result = train(get_preset("debug", steps=40), out=path, device="cpu", show_progress=False)
    assert math.log(256) - 0.2 < result.initial_val_loss < math.log(256) + 0.5  # starts near uniform over bytes
    assert result.final_val_loss < result.initial_val_loss - 1.0  # and learns
    assert check_tree_invariants(path) == 8
    ds = routescope.open(path)
    assert ds.sizes["layer"] == 2 and int(ds["tokens"].sum()) == 40 * 8 * 32
    run = routescope.open(path, group="run")
    assert run["val_loss"].notnull().sum() >= 2
    traces = routescope.open(path, group="traces")
    assert traces.sizes["sample"] == 8 * 16 and (traces["token_id"] >= 0).all()
