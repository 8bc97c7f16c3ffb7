"""A tree layer with its dead units removed (`routescope.prune`): only live units' rows are stored.

A removed unit takes its whole subtree with it. A decision node that lost one child subtree keeps its own
neuron (every path through it still uses it) but sends every token to the live child: `route_force()` holds it
there, in the reference and in the Triton kernels alike. The file layout stays the full heap, so the layer
records, trains and resumes as any TreeFFN; removed units are simply never visited.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routescope.layers.tree import TreeFFN, TreeSpec


class PrunedTreeFFN(TreeFFN):
    """TreeFFN (neuron variant) storing the rows of its `live` units only: w_live (L, d_in), b_live (L,),
    u_live (L, d_out), with `unit_row` (T, units) mapping heap units to rows (removed: L, a zero row) and
    `held_side` (T, nodes) int8 the side each node is held to (0 left, 1 right, −1 free)."""

    def __init__(self, spec: TreeSpec, live: Tensor, held_side: Tensor, backend: str = "auto") -> None:
        nn.Module.__init__(self)
        if spec.variant != "neuron":
            raise ValueError("pruning covers the neuron variant of TreeFFN; leaf-MLP trees are left as they are")
        units, nodes = 2 ** (spec.depth + 1) - 1, 2**spec.depth - 1
        if tuple(live.shape) != (spec.trees, units) or tuple(held_side.shape) != (spec.trees, nodes):
            raise ValueError(f"live must be ({spec.trees}, {units}) and held_side ({spec.trees}, {nodes})")
        self.spec, self.backend = spec, backend
        live = live.bool().cpu()
        count = int(live.sum())
        rows = torch.full(live.shape, count, dtype=torch.long)
        rows[live] = torch.arange(count)
        self.register_buffer("unit_row", rows)
        self.register_buffer("held_side", held_side.to(torch.int8).cpu())
        self.w_live = nn.Parameter(torch.zeros(count, spec.d_in))
        self.b_live = nn.Parameter(torch.zeros(count)) if spec.bias else None
        self.u_live = nn.Parameter(torch.zeros(count, spec.d_out))
        self._heap_cache: tuple[tuple, tuple[Tensor, Tensor | None, Tensor]] | None = None
        self.init_recording()

    @classmethod
    def from_layer(cls, layer: TreeFFN, live: Tensor, held_side: Tensor) -> PrunedTreeFFN:
        """The pruned copy of `layer` (same device and dtype) keeping the rows where `live` (T, units) is True."""
        pruned = cls(layer.spec, live, held_side, layer.backend)
        w, b, u = layer.heap_weights()
        mask = live.bool().to(w.device)
        pruned = pruned.to(device=w.device)
        with torch.no_grad():
            for param in pruned.parameters():  # the weights' dtype; the accumulators keep theirs (int64, float64)
                param.data = param.data.to(w.dtype)
            pruned.w_live.copy_(w[mask])
            pruned.u_live.copy_(u[mask])
            if b is not None:
                pruned.b_live.copy_(b[mask])
        return pruned

    @property
    def live_units(self) -> int:
        """Units kept, over all trees."""
        return self.w_live.shape[0]

    def live_mask(self) -> Tensor:
        """(T, units) bool: which heap units are stored."""
        return self.unit_row < self.live_units

    def heap_weights(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """The live rows expanded into the full heap (removed units read as zero rows), differentiable. Without
        autograd (inference, evaluation) the expansion is kept until a weight changes (its version counter),
        so a pruned layer's forward costs the kernels alone."""
        params = [p for p in (self.w_live, self.b_live, self.u_live) if p is not None]
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling():
            return self._expand()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._heap_cache is None or self._heap_cache[0] != key:
            with torch.no_grad():
                self._heap_cache = (key, self._expand())
        return self._heap_cache[1]

    def _expand(self) -> tuple[Tensor, Tensor | None, Tensor]:
        trees, units = self.unit_row.shape
        index = self.unit_row.reshape(-1)

        def expand(rows: Tensor) -> Tensor:
            padded = torch.cat([rows, rows.new_zeros((1, *rows.shape[1:]))])
            return padded.index_select(0, index).reshape(trees, units, *rows.shape[1:])

        b = expand(self.b_live) if self.b_live is not None else None
        return expand(self.w_live), b, expand(self.u_live)

    def route_force(self) -> Tensor:
        return self.held_side

    def reset_parameters(self) -> None:
        """A pruned layer's weights come from the layer it was cut from; nothing to draw."""

    def extra_repr(self) -> str:
        units = self.spec.trees * (2 ** (self.spec.depth + 1) - 1)
        return f"{super().extra_repr()}, live_units={self.live_units} of {units}"
