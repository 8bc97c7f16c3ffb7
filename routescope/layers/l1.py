"""The L1-sparse gated FFN (README, "Layer families"): ReLU-gated units that an L1 penalty drives to exact zeros.

The recipe of "sparser-faster-llms" (arXiv 2603.23198): a standard gated FFN, h = relu(W_g x) * (W_u x),
y = W_d h, trained with an L1 penalty on the gate activations g = relu(W_g x). A unit "fires" for a
token where g > 0; everything the recorder keeps is about which units fire. The penalty is on the gate
(not on h) because that is what makes h exactly zero: shrinking W_u would lower |h| without zeros.

    layer = L1SparseFFN(256, 1024, 256, l1_coef=1e-2)
    loss = task_loss + layer.l1_loss()          # or routescope.layers.aux_loss(model) for every layer
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routescope.store.schema import active_bin_edges, layer_sizes


@dataclass(frozen=True)
class L1Spec:
    """What the recorder and the file need to know about one L1-sparse layer (root attribute `layers`)."""

    family: str
    d_in: int
    d_hidden: int
    d_out: int
    l1_coef: float
    bias: bool
    gated: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class L1SparseFFN(nn.Module):
    """Gated FFN d_in -> d_hidden -> d_out with ReLU gates and an L1 penalty on them, a drop-in for an MLP block.

    gated=True: h = relu(W_g x + b_g) * (W_u x + b_u); gated=False: h = relu(W_g x + b_g) (a plain
    ReLU MLP). `l1_loss()` is l1_coef × mean over tokens and units of |g| of the last forward, a
    tensor in the autograd graph: add it to the loss. The mean (not the per-token sum) keeps l1_coef
    independent of d_hidden; the recipe's λ on Σ_units |g| equals l1_coef / d_hidden.
    """

    family = "l1"  # the run file's group (routescope.schema.L1)

    def __init__(self, d_in: int, d_hidden: int, d_out: int, l1_coef: float = 1e-2, bias: bool = False,
                 gated: bool = True) -> None:  # fmt: skip
        super().__init__()
        if min(d_in, d_hidden, d_out) < 1:
            raise ValueError(f"d_in, d_hidden and d_out must be >= 1, got {d_in}, {d_hidden}, {d_out}")
        if not l1_coef >= 0:
            raise ValueError(f"l1_coef must be >= 0, got {l1_coef}")
        self.spec = L1Spec("l1", d_in, d_hidden, d_out, float(l1_coef), bias, gated)
        self.gate = nn.Linear(d_in, d_hidden, bias=bias)
        self.up = nn.Linear(d_in, d_hidden, bias=bias) if gated else None
        self.down = nn.Linear(d_hidden, d_out, bias=bias)
        edges = torch.as_tensor(active_bin_edges(d_hidden))
        # Interior edges: bucketize(count, them, right=True) is the bin index (schema.active_bin_edges).
        self.register_buffer("bin_inner_edges", edges[1:-1].clone(), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("unit_fires", torch.zeros(d_hidden, dtype=torch.int64), persistent=False)
        self.register_buffer("active_sum", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("active_hist", torch.zeros(len(edges) - 1, dtype=torch.int64), persistent=False)
        self.register_buffer("nonfinite_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.recording = False  # set by the recorder; accumulate in forward while True
        self.record_eval = False  # also accumulate in eval mode (off: validation passes stay out)
        self.trace_next = False  # keep the next forward's per-token active counts in `last_trace`
        self.last_trace: Tensor | None = None  # (n,) int64 active units per token
        self._gate_l1: Tensor | None = None  # mean |g| of the last forward, in the graph

    @property
    def l1_coef(self) -> float:
        return self.spec.l1_coef

    def extra_repr(self) -> str:
        s = self.spec
        return f"d_in={s.d_in}, d_hidden={s.d_hidden}, d_out={s.d_out}, l1_coef={s.l1_coef}, bias={s.bias}, gated={s.gated}"

    def hidden(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (n, d_in) -> (gate g (n, d_hidden), hidden h (n, d_hidden)); g >= 0 and h = 0 where g = 0."""
        return self._hidden(x)[1:]

    def _hidden(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (n, d_in) -> (gate pre-activation, g, h), each (n, d_hidden)."""
        pre = self.gate(x)
        g = F.relu(pre)
        return pre, g, (g * self.up(x) if self.up is not None else g)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> y (..., d_out); updates the accumulators when recording."""
        s = self.spec
        if x.shape[-1] != s.d_in:
            raise ValueError(f"L1SparseFFN expects inputs of shape (..., {s.d_in}), got {tuple(x.shape)}")
        leading = x.shape[:-1]
        pre, g, h = self._hidden(x.reshape(-1, s.d_in))
        self._gate_l1 = g.abs().mean() if g.numel() else g.sum()
        if self.recording and (self.training or self.record_eval):
            self._accumulate(g.detach(), ~(torch.isfinite(pre.detach()) & torch.isfinite(h.detach())).any(-1))
        return self.down(h).reshape(*leading, s.d_out)

    @torch.no_grad()
    def _accumulate(self, g: Tensor, nonfinite: Tensor) -> None:
        """Add one batch's firing pattern to the accumulators in place (no host sync).

        nonfinite (n,) bool: tokens with a NaN/inf gate pre-activation or hidden activation, counted in
        `nonfinite_tokens`; a NaN gate does not fire (NaN > 0 is false), an inf one does.
        """
        self.nonfinite_tokens.add_(nonfinite.sum())
        fired = g > 0  # (n, H)
        active = fired.sum(-1)  # (n,) int64 units that fired per token
        self.tokens.add_(g.shape[0])
        self.unit_fires.add_(fired.sum(0))
        self.active_sum.add_(active.sum())
        bins = torch.bucketize(active, self.bin_inner_edges, right=True)  # (n,) bin of each token
        self.active_hist.index_add_(0, bins, torch.ones_like(bins))
        if self.trace_next:
            self.last_trace = active

    def l1_loss(self) -> Tensor:
        """l1_coef × mean |g| of the last forward (a graph tensor; zero before any forward)."""
        if self._gate_l1 is None:
            return self.gate.weight.new_zeros(())
        return self.spec.l1_coef * self._gate_l1

    def aux_loss(self) -> Tensor:
        """The term this layer adds to the training loss: its L1 penalty."""
        return self.l1_loss()

    def routing_stats(self) -> dict[str, Tensor]:
        """The accumulator buffers by run-file variable name (`tokens`, `unit_fires`, ...)."""
        names = ("tokens", "unit_fires", "active_sum", "active_hist", "nonfinite_tokens")
        return {name: getattr(self, name) for name in names}

    def reset_routing_stats(self) -> None:
        """Zero the accumulators in place (keeps buffer identity, so compiled graphs stay valid)."""
        torch._foreach_zero_(list(self.routing_stats().values()))

    def stat_sizes(self) -> dict[str, int]:
        """This layer's dimension sizes in the file (unit, bin)."""
        return layer_sizes("l1", self.spec.to_dict())

    def traced_tokens(self) -> int | None:
        """Tokens in `last_trace` (None when the last forward kept no trace)."""
        return None if self.last_trace is None else self.last_trace.shape[0]

    def trace_rows(self, index: Tensor) -> dict[str, Tensor]:
        """The sampled tokens' rows of the trace variables: l1_active (k,)."""
        return {"l1_active": self.last_trace[index]}
