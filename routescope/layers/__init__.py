"""Routed FFN layers (nn.Modules) that keep their own routing accumulators for the recorder.

Three families (README, "Layer families"): `TreeFFN` (tree.py), `L1SparseFFN` (l1.py) and
`TopKMoE` (moe.py). Each one updates its accumulators inside its own forward when `recording` is
on (no hooks, which torch.compile drops, and no host sync) and speaks the same protocol to the
recorder: `family` (its run-file group, routescope.schema), `spec.to_dict()`, `routing_stats()`,
`reset_routing_stats()`, `stat_sizes()`, `trace_next` / `last_trace`, `traced_tokens()`,
`trace_rows(index)` and `record_eval`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import Tensor, nn

from routescope.layers.l1 import L1SparseFFN, L1Spec
from routescope.layers.moe import MoESpec, TopKMoE
from routescope.layers.tree import BACKENDS, PLACEMENTS, VARIANTS, TreeFFN, TreeSpec

ROUTED_LAYERS: tuple[type[nn.Module], ...] = (TreeFFN, L1SparseFFN, TopKMoE)

__all__ = ["BACKENDS", "PLACEMENTS", "ROUTED_LAYERS", "VARIANTS", "L1SparseFFN", "L1Spec", "MoESpec", "TopKMoE",
           "TreeFFN", "TreeSpec", "aux_loss", "find_routed_layers"]  # fmt: skip


def find_routed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All routed layers of a model (every family) in module order, with their qualified names."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ROUTED_LAYERS)]


def aux_loss(model: nn.Module) -> Tensor | float:
    """Sum of the routed layers' training-loss terms of the last forward (L1 penalties, MoE balance
    losses): `loss = task_loss + routescope.layers.aux_loss(model)`. 0.0 when there are none."""
    terms = [layer.aux_loss() for _, layer in find_routed_layers(model) if hasattr(layer, "aux_loss")]
    return sum(terms[1:], terms[0]) if terms else 0.0


def select_routed_layers(model: nn.Module, modules: Iterable[str | nn.Module] | None) -> list[tuple[str, nn.Module]]:
    """The routed layers to record: all of them, or those named or given in `modules` (a clear error for others)."""
    found = find_routed_layers(model)
    if modules is not None:
        wanted = list(modules)
        names = {m for m in wanted if isinstance(m, str)}
        objects = {id(m) for m in wanted if isinstance(m, nn.Module)}
        unknown = names - {name for name, _ in found}
        if unknown:
            raise ValueError(f"no routed layer named {sorted(unknown)}; routed layers: {[n for n, _ in found]}")
        found = [(name, layer) for name, layer in found if name in names or id(layer) in objects]
    if not found and modules is not None:
        raise ValueError("none of the given modules is a routed layer (TreeFFN, L1SparseFFN, TopKMoE)")
    if not found:
        warnings.warn("the model has no routed layers (TreeFFN, L1SparseFFN, TopKMoE): only losses are recorded",
                      stacklevel=3)
    return found
