"""Cutting layers to a plan: each routed layer of a model is replaced by its smaller copy, found by name."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from routescope.analysis.calibrated import DEAD, LIVE
from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN, find_routed_layers
from routescope.layers.pruned_tree import PrunedTreeFFN
from routescope.pruning.plan import LayerPlan, tree_cut


class PruneError(ValueError):
    """A model and a run (or a pruned checkpoint) that do not fit together; the message is one line."""


def cut_tree(layer: TreeFFN, keep: np.ndarray, held: np.ndarray) -> PrunedTreeFFN:
    """`layer` without the units `keep` leaves out (a pruned layer is cut further: both cuts hold)."""
    if layer.spec.variant != "neuron":
        raise PruneError(f"pruning covers neuron-variant trees; {layer.spec.variant!r} layers are left whole")
    if isinstance(layer, PrunedTreeFFN):
        keep = keep & layer.live_mask().cpu().numpy()
        keep, held = tree_cut(np.where(keep, LIVE, DEAD).astype(np.int8))
    return PrunedTreeFFN.from_layer(layer, torch.from_numpy(keep), torch.from_numpy(held))


def cut_l1(layer: L1SparseFFN, keep: np.ndarray) -> L1SparseFFN:
    """An L1 layer of the kept hidden units: rows of gate/up, columns of down."""
    s = layer.spec
    index = torch.from_numpy(np.flatnonzero(keep)).to(layer.gate.weight.device)
    new = L1SparseFFN(s.d_in, len(index), s.d_out, s.l1_coef, s.bias, s.gated).to(layer.gate.weight)
    with torch.no_grad():
        for old, cut in ((layer.gate, new.gate), (layer.up, new.up)):
            if old is not None:
                cut.weight.copy_(old.weight[index])
                if old.bias is not None:
                    cut.bias.copy_(old.bias[index])
        new.down.weight.copy_(layer.down.weight[:, index])
        if layer.down.bias is not None:
            new.down.bias.copy_(layer.down.bias)
    return new


def cut_moe(layer: TopKMoE, keep: np.ndarray) -> TopKMoE:
    """An MoE layer of the kept experts; the router loses the others' rows (k shrinks if fewer than k remain)."""
    s = layer.spec
    index = torch.from_numpy(np.flatnonzero(keep)).to(layer.w1.device)
    new = TopKMoE(s.d_in, s.d_out, len(index), min(s.k, len(index)), s.expert_width, s.capacity_factor, s.activation,
                  s.bias, s.renormalize, s.balance_coef).to(layer.w1)  # fmt: skip
    with torch.no_grad():
        new.router.weight.copy_(layer.router.weight[index])
        for name in ("w1", "b1", "w2", "b2"):
            if getattr(layer, name) is not None:
                getattr(new, name).copy_(getattr(layer, name)[index])
    return new


def expected_shape(layer: nn.Module) -> tuple[int, ...]:
    """The shape of a plan's `keep` for this layer: (T, units), (hidden,) or (experts,)."""
    if isinstance(layer, TreeFFN):
        return (layer.spec.trees, 2 ** (layer.spec.depth + 1) - 1)
    if isinstance(layer, L1SparseFFN):
        return (layer.spec.d_hidden,)
    return (layer.spec.experts,)


def apply_plans(model: nn.Module, plans: list[LayerPlan]) -> nn.Module:
    """Replace every planned layer of `model` (in place; returns it, or the cut layer when the model is one) by its
    cut; a layer missing from the model, of another family or another shape is a PruneError naming it."""
    layers = dict(find_routed_layers(model))
    for plan in plans:
        layer = layers.get(plan.name)
        if layer is None:
            raise PruneError(f"the run recorded a layer {plan.name!r} that the model does not have (its routed layers: "
                             f"{', '.join(layers) or 'none'}); is this the run's model?")  # fmt: skip
        if layer.family != plan.family or expected_shape(layer) != plan.keep.shape:
            raise PruneError(f"layer {plan.name!r}: the run recorded a {plan.family} layer of shape {plan.keep.shape}, "
                             f"the model has a {layer.family} layer of shape {expected_shape(layer)}; is this the "
                             "run's model?")  # fmt: skip
        if plan.family == "tree":
            new = cut_tree(layer, plan.keep, plan.held_side)
        elif plan.family == "l1":
            new = cut_l1(layer, plan.keep)
        else:
            new = cut_moe(layer, plan.keep)
        if plan.name:
            model.set_submodule(plan.name, new)
        else:  # the model is the layer itself
            model = new
    return model
