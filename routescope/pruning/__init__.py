"""`routescope.prune` (this package, `routescope.pruning`): turn the static sparsity a run measured into a smaller model, with a quality check.

    pruned, report = routescope.prune(model, "run.h5", batches=val_batches)   # the model is left as it was
    routescope.save_pruned(pruned, "pruned.pt")
    model = routescope.load_pruned("pruned.pt", model=fresh_model)          # or load_pruned(path) for `record` runs

The run's routed layers are matched to the model's by name. What is removed, and why, is in `plan.py`; how
layers are cut in `cut.py`; the quality check in `quality.py`.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routescope.analysis.calibrated import DEFAULT, Thresholds
from routescope.analysis.window import LAST_QUARTER, Window
from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN, TreeSpec, find_routed_layers
from routescope.layers.pruned_tree import PrunedTreeFFN
from routescope.pruning.cut import PruneError, apply_plans
from routescope.pruning.plan import LayerPlan, plan_run
from routescope.pruning.quality import LayerResult, PruneReport, compare, default_loss, paired_interval

PRUNED_FORMAT, PRUNED_VERSION = "routescope-pruned", 1

__all__ = ["LayerPlan", "LayerResult", "PruneError", "PruneReport", "load_pruned", "plan_run", "prune", "save_pruned"]


def prune(model: nn.Module, run: str | Path, window: Window = LAST_QUARTER, th: Thresholds = DEFAULT,
          batches: Iterable[Any] | None = None,
          loss: Callable[[nn.Module, Any], Tensor] = default_loss) -> tuple[nn.Module, PruneReport]:  # fmt: skip
    """A copy of `model` without the units `run` shows calibrated-dead in `window`, and the quality check on
    `batches` (held-out inputs: `model(*batch)` or `model(batch)`, scored by `loss`; none: no check)."""
    plans, described = plan_run(run, window, th)
    if not plans:
        raise PruneError(f"{run} recorded no routed layer that can be pruned (tree neuron-variant, L1 or MoE layers)")
    pruned = apply_plans(copy.deepcopy(model), plans)
    results, before, after, tokens = compare(model, pruned, plans, batches, loss)
    mean = (lambda values: float(np.mean(values)) if values else None)  # noqa: E731
    return pruned, PruneReport(described, th.as_dict(), results, mean(before), mean(after), tokens,
                               paired_interval(before, after))  # fmt: skip


def layer_structure(layer: nn.Module) -> dict[str, Any]:
    """What rebuilding a routed layer's shape needs (its spec, and a pruned tree's live units and held sides)."""
    out: dict[str, Any] = {"family": layer.family, "kind": type(layer).__name__, "spec": asdict(layer.spec)}
    if isinstance(layer, PrunedTreeFFN):
        out.update(live=layer.live_mask().cpu(), held_side=layer.held_side.cpu(), backend=layer.backend)
    return out


def build_layer(structure: dict[str, Any]) -> nn.Module:
    """A fresh layer of the stored shape (weights come from the state dict)."""
    spec = {k: v for k, v in structure["spec"].items() if k != "family"}
    if structure["kind"] == "PrunedTreeFFN":
        return PrunedTreeFFN(TreeSpec(family="tree", **spec), structure["live"], structure["held_side"], structure["backend"])
    if structure["kind"] == "L1SparseFFN":  # the specs' fields are the constructors' arguments
        return L1SparseFFN(**spec)
    if structure["kind"] == "TopKMoE":
        return TopKMoE(**spec)
    raise PruneError(f"cannot rebuild a {structure['kind']} layer from a pruned checkpoint")


def save_pruned(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write a pruned model's weights and layer shapes atomically (a temp file, then a rename: a failure leaves
    no half-written file); `extra` (e.g. the run's config, the report) is stored beside them."""
    path = Path(path)
    state = {"format": PRUNED_FORMAT, "version": PRUNED_VERSION, "state_dict": model.state_dict(),
             "layers": {name: layer_structure(layer) for name, layer in find_routed_layers(model)
                        if not type(layer) is TreeFFN}, **extra}  # fmt: skip (an unpruned tree keeps its shape)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_pruned(path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """A pruned model in one call: `model` (a fresh instance of the unpruned architecture) gets the stored layer
    shapes and weights; without it, a checkpoint written by `routescope prune` rebuilds the trainer's GPT."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise PruneError(f"cannot read {path} ({str(err).splitlines()[0]}); is it a file written by routescope prune?") from None
    if not isinstance(state, dict) or state.get("format") != PRUNED_FORMAT:
        raise PruneError(f"{path} is not a pruned checkpoint (written by routescope prune / save_pruned)")
    if model is None:
        preset = state.get("config", {}).get("preset")
        if preset is None:
            raise PruneError(f"{path} holds a user model's pruning; pass that model: load_pruned(path, model=...)")
        from routescope.trainers.model import GPT, GPTConfig

        model = GPT(GPTConfig(**preset["model"]))
    for name, structure in state["layers"].items():
        layer = build_layer(structure)
        if name:
            model.set_submodule(name, layer)
        else:
            model = layer
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise PruneError(f"{path} does not fit this model ({str(err).splitlines()[0]})") from None
    return model
