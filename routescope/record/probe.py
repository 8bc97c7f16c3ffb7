"""The routing-stability probe (`Recorder(probe=...)`): a fixed batch of held-out inputs routed at each interval
end, in eval mode and without gradients, with the layers' counting off, so that the file records where each
probe token goes over training (group `probe`; `analysis.stability` reads it).

Tree layers give each token's leaf per tree, kept by the layer's own forward (`TreeFFN.keep_leaf`: no second
routing pass, which cost ~600 small launches a probe on the GPU preset); MoE layers their chosen experts
(ascending), recomputed from the captured input by the layer's `route`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

PROBED = ("tree", "moe")


def _call(model: nn.Module, probe: Any) -> None:
    model(*probe) if isinstance(probe, (tuple, list)) else model(probe)


@torch.no_grad()
def probe_routing(model: nn.Module, probe: Any, layers: list[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """{"leaf": (tree layers, tokens, max trees), "experts": (MoE layers, tokens, max k)} int32, -1 padded; only
    the keys whose family the model has. The model's mode and the layers' recording switches are restored."""
    probed = [(name, layer) for name, layer in layers if layer.family in PROBED]
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        return lambda module, args: captured.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]))

    hooks = [layer.register_forward_pre_hook(keep(name)) for name, layer in probed if layer.family != "tree"]
    switches = [(layer, layer.recording, layer.trace_next) for _, layer in layers]
    was_training = model.training
    for layer, _, _ in switches:
        layer.recording = layer.trace_next = False
    trees = [layer for _, layer in probed if layer.family == "tree"]
    for layer in trees:  # a tree layer's forward keeps its own leaves: no second routing pass
        layer.keep_leaf = True
    model.eval()
    try:
        _call(model, probe)
        leaves = [layer.last_leaf for layer in trees]
    finally:
        for hook in hooks:
            hook.remove()
        for layer, recording, trace_next in switches:
            layer.recording, layer.trace_next = recording, trace_next
        for layer in trees:
            layer.keep_leaf, layer.last_leaf = False, None
        model.train(was_training)
    experts = [layer.route(captured[name])[1].sort(-1).values for name, layer in probed if layer.family != "tree"]
    out = {}
    for key, rows in (("leaf", leaves), ("experts", experts)):
        if rows:
            width = max(r.shape[1] for r in rows)
            padded = torch.full((len(rows), rows[0].shape[0], width), -1, dtype=torch.int32, device=rows[0].device)
            for i, r in enumerate(rows):
                padded[i, :, : r.shape[1]] = r.to(torch.int32)
            out[key] = padded
    return out
