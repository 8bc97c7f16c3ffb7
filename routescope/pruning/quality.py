"""The quality check every prune prints: per layer, units and parameters before / after, the share of held-out
tokens that reached a removed unit in the original model (what the cut reroutes there) and the share whose
path or unit set changed end to end in the pruned model (upstream cuts change later layers' inputs too),
beside what the run's window predicted; and the held-out loss before and after."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN, find_routed_layers
from routescope.pruning.plan import LayerPlan


@dataclass
class LayerResult:
    """One layer's line of the quality check (shares of held-out tokens; NaN without held-out data)."""

    name: str
    family: str
    units_before: int
    units_after: int
    params_before: int
    params_after: int
    window_reach: float
    bound: float
    reached_removed: float = float("nan")
    rerouted: float = float("nan")
    notes: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    """What a prune removed and what it cost; `as_dict()` is the `prune --json` object."""

    window: str
    thresholds: dict[str, Any]
    layers: list[LayerResult]
    loss_before: float | None = None
    loss_after: float | None = None
    tokens: int = 0
    delta_loss_ci: tuple[float, float] | None = None  # 95% t interval of the per-batch (after − before) differences

    @property
    def removed_units(self) -> int:
        return sum(r.units_before - r.units_after for r in self.layers)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["removed_units"] = self.removed_units
        out["delta_loss"] = None if self.loss_before is None or self.loss_after is None else self.loss_after - self.loss_before
        return out


def unit_sets(layer: nn.Module, x: Tensor) -> Tensor:
    """(n, units) bool: the units each token uses, in the layer's full (recorded) numbering: tree heap units per
    tree, L1 units that fire, MoE experts chosen (and kept)."""
    if isinstance(layer, TreeFFN):
        path = layer.route_and_compute(x)[1].path  # (n, T, d+1)
        units = 2 ** (layer.spec.depth + 1) - 1
        used = torch.zeros(x.shape[0], layer.spec.trees, units, dtype=torch.bool, device=x.device)
        used.scatter_(2, path, True)
        return used.reshape(x.shape[0], -1)
    if isinstance(layer, L1SparseFFN):
        return layer.hidden(x)[0] != 0
    if isinstance(layer, TopKMoE):
        _, chosen, _, kept = layer.route(x)
        used = torch.zeros(x.shape[0], layer.spec.experts, dtype=torch.bool, device=x.device)
        return used.scatter_(1, torch.where(kept, chosen, chosen[:, :1]), True)
    raise TypeError(f"not a routed layer: {type(layer).__name__}")


def _capture(model: nn.Module, names: set[str]) -> tuple[dict[str, list[Tensor]], list[Any]]:
    """Forward pre-hooks keeping each named routed layer's input (flattened to tokens)."""
    seen: dict[str, list[Tensor]] = {name: [] for name in names}
    handles = []
    for name, layer in find_routed_layers(model):
        if name in names:
            def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            handles.append(layer.register_forward_pre_hook(hook))
    return seen, handles


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """`model(*batch)` (a tuple) or `model(batch)`; a (logits, loss) output gives its loss, a scalar itself."""
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    if isinstance(out, (tuple, list)):
        out = next(o for o in out if isinstance(o, Tensor) and o.dim() == 0)
    return out


@torch.no_grad()
def held_out(model: nn.Module, batches: list[Any], names: set[str],
             loss: Callable[[nn.Module, Any], Tensor]) -> tuple[list[float], dict[str, list[Tensor]]]:  # fmt: skip
    """The loss of each of `batches` in eval mode, and each named layer's inputs."""
    was_training = model.training
    model.eval()
    seen, handles = _capture(model, names)
    try:
        losses = [float(loss(model, batch)) for batch in batches]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return losses, seen


def paired_interval(before: list[float], after: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The t interval of the mean per-batch difference after − before (None with fewer than two batches)."""
    from scipy import stats

    diff = np.asarray(after) - np.asarray(before)
    if len(diff) < 2:
        return None
    half = stats.t.ppf(0.5 + confidence / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return float(diff.mean() - half), float(diff.mean() + half)


def _full_numbering(plan: LayerPlan, used: Tensor) -> Tensor:
    """A pruned L1/MoE layer's unit sets spread back over the original units (removed columns False)."""
    if plan.family == "tree":
        return used
    full = torch.zeros(used.shape[0], plan.keep.size, dtype=torch.bool, device=used.device)
    full[:, torch.from_numpy(np.flatnonzero(plan.keep)).to(used.device)] = used
    return full


def compare(original: nn.Module, pruned: nn.Module, plans: list[LayerPlan], batches: Iterable[Any] | None,
            loss: Callable[[nn.Module, Any], Tensor] = default_loss) -> tuple[list[LayerResult], list[float], list[float], int]:  # fmt: skip
    """Per-layer results, the per-batch held-out losses before and after (empty without batches), tokens checked."""
    before_layers, after_layers = dict(find_routed_layers(original)), dict(find_routed_layers(pruned))
    results = [LayerResult(p.name, p.family, p.units_before, p.units_after,
                           sum(t.numel() for t in before_layers[p.name].parameters()),
                           sum(t.numel() for t in after_layers[p.name].parameters()), p.window_reach, p.bound,
                           notes=list(p.notes)) for p in plans]  # fmt: skip
    if batches is None:
        return results, [], [], 0
    batches = list(batches)
    names = {p.name for p in plans}
    loss_before, inputs_before = held_out(original, batches, names, loss)
    loss_after, inputs_after = held_out(pruned, batches, names, loss)
    tokens = 0
    with torch.no_grad():
        for plan, result in zip(plans, results):
            if not inputs_before[plan.name]:
                continue
            x0, x1 = torch.cat(inputs_before[plan.name]), torch.cat(inputs_after[plan.name])
            used0 = unit_sets(before_layers[plan.name], x0)
            used1 = _full_numbering(plan, unit_sets(after_layers[plan.name], x1))
            removed = torch.from_numpy(~plan.keep.reshape(-1)).to(used0.device)
            result.reached_removed = float((used0 & removed).any(-1).float().mean())
            result.rerouted = float((used0 != used1).any(-1).float().mean())
            tokens = max(tokens, x0.shape[0])
    return results, loss_before, loss_after, tokens
