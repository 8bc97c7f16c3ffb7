"""The routing-stability probe (`Recorder(probe=...)`): a fixed batch of held-out inputs routed at each interval
end, in eval mode and without gradients, with the layers' counting off, so that the file records where each
probe token goes over training (group `probe`; `analysis.stability` reads it).

Tree layers give each token's leaf per tree, MoE layers its chosen experts (ascending). The routing of a layer is
recomputed from its captured input by the reference rule (`route_paths`: decisions only; MoE `route`): the
same rule as the kernels', so only an exact tie of z could differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from routescope.kernels.tree_reference import route_paths

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

    hooks = [layer.register_forward_pre_hook(keep(name)) for name, layer in probed]
    switches = [(layer, layer.recording, layer.trace_next) for _, layer in layers]
    was_training = model.training
    for layer, _, _ in switches:
        layer.recording = layer.trace_next = False
    model.eval()
    try:
        _call(model, probe)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, recording, trace_next in switches:
            layer.recording, layer.trace_next = recording, trace_next
        model.train(was_training)
    leaves, experts = [], []
    for name, layer in probed:
        x = captured[name]
        if layer.family == "tree":
            w, b, _ = layer.heap_weights() if layer.spec.variant == "neuron" else (layer.w, layer.b, None)
            path = route_paths(x.to(w.dtype), w, b, layer.spec.depth, layer.route_force())  # decisions only
            leaves.append(path[:, :, -1] - (2**layer.spec.depth - 1))
        else:
            experts.append(layer.route(x)[1].sort(-1).values)
    out = {}
    for key, rows in (("leaf", leaves), ("experts", experts)):
        if rows:
            width = max(r.shape[1] for r in rows)
            padded = torch.full((len(rows), rows[0].shape[0], width), -1, dtype=torch.int32, device=rows[0].device)
            for i, r in enumerate(rows):
                padded[i, :, : r.shape[1]] = r.to(torch.int32)
            out[key] = padded
    return out
