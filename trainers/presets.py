"""Named training presets (data, not code): `routescope record --config NAME` picks one.

`debug` is tiny and doubles as the CI config (`debug-l1`, `debug-moe`: the other families);
`shakespeare-tree` is the default demo (300 steps in about a minute on 2 CPU cores), `shakespeare-l1`
and `shakespeare-moe` the same run with the other layer families; the `-gpu` presets are the same
experiments at GPU size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from routescope.trainers.model import GPTConfig


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    steps: int = 300
    batch_size: int = 12  # sequences per step; tokens per step = batch_size * model.seq_len
    lr: float = 3e-3  # AdamW peak learning rate, after linear warmup, cosine decay to lr / 10
    warmup: int = 20
    grad_clip: float = 1.0
    eval_every: int = 100  # validation loss every N steps (and at the end)
    eval_batches: int = 8
    record_every: int = 10  # steps per recorded interval
    sample_tokens: int = 64  # tokens per interval whose whole path is kept
    seed: int = 0
    description: str = ""
    data: str | None = None  # a user corpus (`record --data`); None: the embedded Shakespeare

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `data` only when set, so the demo's stored configs stay as they were."""
        d = asdict(self)
        if d["data"] is None:
            del d["data"]
        return d


def _tree(**model: Any) -> GPTConfig:
    return GPTConfig(mlp="tree", **model)


def _l1(**model: Any) -> GPTConfig:
    return GPTConfig(mlp="l1", bias=False, **model)  # the recipe's gated FFN has no biases


def _moe(**model: Any) -> GPTConfig:
    return GPTConfig(mlp="moe", **model)


_DEBUG_MODEL = {"seq_len": 32, "n_layer": 2, "n_head": 2, "d_model": 32}
_DEBUG_RUN = {"steps": 30, "batch_size": 8, "eval_every": 15, "eval_batches": 2, "record_every": 5, "sample_tokens": 16}

PRESETS: dict[str, TrainConfig] = {
    "debug": TrainConfig(
        model=_tree(seq_len=32, n_layer=2, n_head=2, d_model=32, depth=3, trees=2),
        steps=30, batch_size=8, eval_every=15, eval_batches=2, record_every=5, sample_tokens=16,
        description="tiny tree model for tests and CI (seconds)",
    ),
    "debug-l1": TrainConfig(
        model=_l1(**_DEBUG_MODEL, dense_width=64), **_DEBUG_RUN,
        description="tiny L1-sparse gated-FFN model for tests and CI (seconds)",
    ),
    "debug-moe": TrainConfig(
        model=_moe(**_DEBUG_MODEL, experts=4, k=2, expert_width=16, capacity_factor=1.0), **_DEBUG_RUN,
        description="tiny top-2-of-4 MoE model with capacity 1.0 for tests and CI (seconds)",
    ),
    "shakespeare-tree": TrainConfig(
        model=_tree(), description="default demo: 4-layer byte GPT, TreeFFN depth 7 x 2 trees (3.1% of units per token)",
    ),
    "shakespeare-dense": TrainConfig(
        model=GPTConfig(mlp="dense"), description="dense baseline of shakespeare-tree (same attention, 512-unit MLP)",
    ),
    "shakespeare-l1": TrainConfig(
        model=_l1(), description="shakespeare-tree with L1-sparse gated FFNs (512 units; L1 0.2 on the gates: ~98% zeros)",
    ),
    "shakespeare-moe": TrainConfig(
        model=_moe(capacity_factor=1.25, balance_coef=0.01),
        description="shakespeare-tree with top-2-of-8 MoE FFNs (64-unit experts, capacity 1.25, balance loss 0.01)",
    ),
    "shakespeare-tree-gpu": TrainConfig(
        model=_tree(seq_len=256, n_layer=8, n_head=8, d_model=512, depth=8, trees=4),
        steps=3000, batch_size=64, lr=1e-3, warmup=100, eval_every=250, eval_batches=20, record_every=25,
        sample_tokens=256, description="GPU size: 8-layer byte GPT, d_model 512, TreeFFN depth 8 x 4 trees",
    ),
    "shakespeare-dense-gpu": TrainConfig(
        model=GPTConfig(seq_len=256, n_layer=8, n_head=8, d_model=512, mlp="dense", dense_width=2048),
        steps=3000, batch_size=64, lr=1e-3, warmup=100, eval_every=250, eval_batches=20, record_every=25,
        sample_tokens=256, description="dense baseline of shakespeare-tree-gpu",
    ),
}  # fmt: skip
DEFAULT_PRESET = "shakespeare-tree"


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """A copy of a preset with top-level fields overridden (e.g. steps=50)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
