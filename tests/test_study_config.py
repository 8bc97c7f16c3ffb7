"""The pre-registered study's runs (notebooks/study/PROTOCOL.md) are exactly what the sweeps train: arms, sizes,
seeds and the regime grid, checked against the protocol's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from routescope.trainers.sweep import shard_of, sweep_configs, variant_of

PROTOCOL = Path(__file__).resolve().parents[1] / "notebooks" / "study" / "PROTOCOL.md"
ARMS = {"gelu-node": ("gelu", "node"), "relu-node": ("relu", "node"), "tanh-node": ("tanh", "node"),
        "identity-node": ("identity", "node"), "gelu-output": ("gelu", "output")}  # fmt: skip


def tree_units(model) -> int:  # noqa: ANN001
    return model.trees * (2 ** (model.depth + 1) - 1)


@pytest.mark.parametrize("size,steps,tokens,lr", [("small-gpu", 600, 16384, 1e-3), ("gpu", 3000, 16384, 1e-3),
                                                  ("cpu", 300, 1536, 3e-3)])  # fmt: skip
def test_study_sizes_match_the_protocol(size: str, steps: int, tokens: int, lr: float) -> None:
    runs = sweep_configs("study", size, seeds=5)
    assert len(runs) == 6 * 5
    for name, cfg in runs.items():
        arm, model = variant_of(name), cfg.model
        assert cfg.steps == steps and cfg.batch_size * model.seq_len == tokens and cfg.lr == lr, name
        if arm == "dense":
            assert model.mlp == "dense" and model.dense_width == 4 * model.d_model
        else:
            assert (model.activation, model.placement) == ARMS[arm] and model.mlp == "tree" and model.variant == "neuron"
            assert abs(tree_units(model) - 4 * model.d_model) <= 4, "trees and dense of the same width"
    assert sorted(cfg.seed for cfg in runs.values()) == sorted(list(range(5)) * 6)
    assert sweep_configs("study", "small-gpu", 1)["study-gelu-node-s0"].model.n_layer == 4


def test_gpu_replication_and_regime_grid() -> None:
    gpu = sweep_configs("study-gpu", "gpu", seeds=3)
    assert sorted({variant_of(n) for n in gpu}) == ["dense", "gelu-node", "gelu-output", "tanh-node"]
    grid = sweep_configs("study-regime", "small-gpu", seeds=3)
    cells = {(cfg.model.activation, cfg.lr, cfg.batch_size * cfg.model.seq_len) for cfg in grid.values()}
    assert cells == {(a, lr, t) for a in ("gelu", "tanh") for lr in (1e-3, 3e-3) for t in (1536, 16384)}
    assert len(grid) == 8 * 3 and all(cfg.steps == 600 for cfg in grid.values())


def test_variant_of_handles_hyphenated_sweeps_and_arms() -> None:
    assert variant_of("activation-gelu-s1") == "gelu"
    assert variant_of("study-gelu-node-s3") == "gelu-node"
    assert variant_of("study-gpu-tanh-node-s0") == "tanh-node"
    assert variant_of("study-regime-gelu-lr3e-3-b64-s12") == "gelu-lr3e-3-b64"


def test_protocol_states_the_decision_rules() -> None:
    text = PROTOCOL.read_text()
    for needle in ("R1", "R2", "R3", "R4", "right_starved_share", "static_fraction", "leaf_entropy_norm", "0.6",
                   "[0.4, 0.6]", "p < 0.05", "Deviations"):  # fmt: skip
        assert needle in text, needle


def test_shards_partition_a_sweep_in_order() -> None:
    runs = sweep_configs("study", "tiny", seeds=3)
    shards = [shard_of(runs, (i, 4)) for i in range(4)]
    names = [name for shard in shards for name in shard]
    assert sorted(names) == sorted(runs) and len(names) == len(set(names)) == 18  # every run once
    assert list(shards[1]) == list(runs)[1::4]
    with pytest.raises(ValueError, match="0 <= I < N"):
        shard_of(runs, (4, 4))


@pytest.mark.parametrize("shard", ["4/4", "x", "1/0", "-1/2"])
def test_cli_refuses_a_bad_shard_in_one_line(shard: str) -> None:
    from typer.testing import CliRunner

    from routescope.cli import app

    result = CliRunner().invoke(app, ["sweep", "dense", "--shard", shard, "--out", "unused"])
    assert result.exit_code != 0 and "--shard" in result.output and "Traceback" not in result.output
