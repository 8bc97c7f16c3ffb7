"""Ablation sweeps for the seed paper's questions: named grids of TreeFFN options × seeds.

`routescope sweep activation --seeds 3 --out runs/` trains GELU, ReLU and tanh trees on the
embedded corpus, one file per (variant, seed), named `<sweep>-<variant>-s<seed>.h5`. A finished
file is reused, so an interrupted sweep resumes and notebooks that share a folder share runs.
Sizes: "tiny" (seconds a run on a laptop CPU; the notebooks' default and CI), "cpu" (the demo
preset, about a minute a run), "small-gpu" (the study's primary size) and "gpu" (the GPU preset).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from routescope.trainers.model import GPTConfig
from routescope.trainers.presets import TrainConfig, get_preset


@dataclass(frozen=True)
class Variant:
    """One arm of a sweep: a name and the model options it changes."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (lr, batch_size) the arm changes


# The pre-registered study's arms (notebooks/study/PROTOCOL.md): activation x placement, and the dense twin.
STUDY_ARMS = [
    Variant("gelu-node", {"activation": "gelu"}), Variant("relu-node", {"activation": "relu"}),
    Variant("tanh-node", {"activation": "tanh"}), Variant("identity-node", {"activation": "identity"}),
    Variant("gelu-output", {"activation": "gelu", "placement": "output"}), Variant("dense", {"mlp": "dense"}),
]  # fmt: skip
STUDY_REGIME = [
    Variant(f"{act}-lr{lr_name}-b{batch}", {"activation": act}, {"lr": lr, "batch_size": batch})
    for act in ("gelu", "tanh") for lr_name, lr in (("1e-3", 1e-3), ("3e-3", 3e-3)) for batch in (6, 64)
]  # fmt: skip


SWEEPS: dict[str, tuple[str, list[Variant]]] = {
    "activation": ("GELU vs ReLU vs a symmetric nonlinearity (tanh), placement node", [
        Variant("gelu", {"activation": "gelu"}), Variant("relu", {"activation": "relu"}),
        Variant("tanh", {"activation": "tanh"}),
    ]),
    "placement": ("nonlinearity per node (before the path sum) vs after the sparse sum, GELU", [
        Variant("node", {"placement": "node"}), Variant("output", {"placement": "output"}),
    ]),
    "bias": ("node biases on vs off, GELU", [Variant("bias", {"bias": True}), Variant("nobias", {"bias": False})]),
    "depth": ("depth 5, 7, 9 with 2 trees", [Variant(f"d{d}", {"depth": d, "trees": 2}) for d in (5, 7, 9)]),
    "trees": ("about the same neurons in 1, 2 or 4 trees (depth 8, 7, 6)", [
        Variant("t1", {"depth": 8, "trees": 1}), Variant("t2", {"depth": 7, "trees": 2}),
        Variant("t4", {"depth": 6, "trees": 4}),
    ]),
    "dense": ("tree vs the dense baseline of the same width", [Variant("tree", {}), Variant("dense", {"mlp": "dense"})]),
    "study": ("the pre-registered study's arms (notebooks/study/PROTOCOL.md)", STUDY_ARMS),
    "study-gpu": ("the study's arms at the GPU preset", [v for v in STUDY_ARMS if v.name in
                                                         ("gelu-node", "gelu-output", "tanh-node", "dense")]),
    "study-regime": ("the study's regime grid: learning rate x batch (sequences of 256 at small-gpu)", STUDY_REGIME),
}  # fmt: skip

SIZES: dict[str, Callable[[], TrainConfig]] = {
    # tiny: the notebooks' default and CI; small enough for seconds a run, big enough to prune
    "tiny": lambda: replace(
        get_preset("shakespeare-tree"), steps=120, batch_size=8, eval_every=60, eval_batches=2, record_every=5,
        sample_tokens=32, warmup=10,
        model=GPTConfig(seq_len=64, n_layer=2, n_head=2, d_model=64, dense_width=256, depth=6, trees=2),
    ),
    "cpu": lambda: get_preset("shakespeare-tree"),
    # small-gpu: the study's primary size (PROTOCOL.md), 16k tokens a step; minutes a run on one GPU
    "small-gpu": lambda: replace(
        get_preset("shakespeare-tree-gpu"), steps=600, warmup=50, eval_every=100, record_every=10,
        model=GPTConfig(seq_len=256, n_layer=4, n_head=4, d_model=256, dense_width=1024, depth=7, trees=4),
    ),
    "gpu": lambda: get_preset("shakespeare-tree-gpu"),
}  # fmt: skip


def sweep_configs(sweep: str, size: str = "tiny", seeds: int = 2, steps: int | None = None,
                  shard: tuple[int, int] = (0, 1)) -> dict[str, TrainConfig]:  # fmt: skip
    """{run name: TrainConfig} of a sweep: every variant × seeds 0 .. seeds-1 at one size (`shard_of` the
    shard)."""
    if sweep not in SWEEPS:
        raise KeyError(f"unknown sweep {sweep!r}; sweeps: {', '.join(SWEEPS)}")
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
    base = SIZES[size]()
    out = {}
    for variant in SWEEPS[sweep][1]:
        options = dict(variant.model)
        if options.get("mlp") == "dense":
            options.setdefault("dense_width", 4 * base.model.d_model)
        model = replace(base.model, **options)
        for seed in range(seeds):
            cfg = replace(base, **variant.train, model=model, seed=seed, steps=steps or base.steps,
                          description=f"sweep {sweep}, size {size}: {variant.name}, seed {seed}")  # fmt: skip
            out[f"{sweep}-{variant.name}-s{seed}"] = cfg
    return shard_of(out, shard)


STILL_WRITING_S = 120.0  # a "running" file modified this recently belongs to a live process


def reusable(path: Path, cfg: TrainConfig) -> bool:
    """True for a run file that closed normally with exactly this training configuration (a later sweep
    reuses it); a missing, damaged, unfinished or differently configured run is trained again. A file that
    is no routescope run at all, or that another process is still writing, is an error, never replaced."""
    from routescope.store import describe
    from routescope.store.format import ForeignFileError, RunFileError

    if not path.exists():
        return False
    try:
        summary = describe(path)
    except ForeignFileError as err:
        raise ValueError(f"refusing to overwrite {path}: {err}; move it away or use another --out folder") from None
    except (RunFileError, OSError):  # damaged (e.g. two writers once clashed): train it again
        return False
    if summary["run_state"] == "running" and time.time() - path.stat().st_mtime < STILL_WRITING_S:
        raise ValueError(f"{path} is being written by another process (modified {time.time() - path.stat().st_mtime:.0f} s ago); "
                         "wait for it to finish, or use another --out folder")  # fmt: skip
    stored = summary["config"].get("preset")
    return summary["run_state"] == "finished" and stored == json.loads(json.dumps(cfg.to_dict()))


def run_sweep(
    sweep: str,
    out: str | Path,
    size: str = "tiny",
    seeds: int = 2,
    steps: int | None = None,
    device: str = "auto",
    show_progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Path]:
    """Train every run of a sweep into `out`, reusing finished runs of the same configuration; returns
    {run name: file}. `shard=(i, n)` takes every n-th run from the i-th, so n processes can share one GPU."""
    from routescope.trainers.train import train

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cfg in sweep_configs(sweep, size, seeds, steps, shard).items():
        path = folder / f"{name}.h5"
        if not reusable(path, cfg):
            if show_progress:
                print(f"training {name} -> {path}", flush=True)
            train(cfg, out=path, device=device, overwrite=True, show_progress=show_progress)
        paths[name] = path
    return paths


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), with 0 <= I < N; anything else is a ValueError naming the form."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(index), int(count)


def shard_of(runs: dict[str, TrainConfig], shard: tuple[int, int]) -> dict[str, TrainConfig]:
    """The runs of shard (i, n): every n-th from the i-th, in the sweep's order."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: give I/N with 0 <= I < N, e.g. 0/4")
    return dict(list(runs.items())[index::count])


def variant_of(run_name: str) -> str:
    """'activation-gelu-s1' -> 'gelu'; 'study-gelu-node-s1' -> 'gelu-node' (the longest sweep name that prefixes it)."""
    stem = re.sub(r"-s\d+$", "", run_name)
    prefixes = [name for name in SWEEPS if stem.startswith(name + "-")]
    return stem[len(max(prefixes, key=len)) + 1 :] if prefixes else stem.split("-")[1]
