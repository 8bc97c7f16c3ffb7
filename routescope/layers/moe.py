"""The top-k mixture-of-experts FFN (README, "Layer families"): the familiar baseline, recorded like the others.

A linear router scores E experts per token; the softmax's top k are kept and their probabilities
renormalised to sum to 1; each chosen expert (an MLP d_in -> expert_width -> d_out) adds its output
times that weight. With a capacity factor c, an expert takes at most ceil(c · n · k / E) of a
forward's n tokens; the rest of its selections are dropped (they add nothing; the residual path
carries the token). Drop order, deterministic: selections are served rank by rank (every token's
first choice before any second choice) and, within a rank, in the order of the flattened input.

The expert dispatch loops over experts and gathers each one's tokens, as Hugging Face's Mixtral
block does; sizing those gathers syncs with the host. The recording itself adds no sync.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routescope.kernels.tree_reference import ACTIVATIONS
from routescope.store.schema import layer_sizes


@dataclass(frozen=True)
class MoESpec:
    """What the recorder and the file need to know about one MoE layer (root attribute `layers`)."""

    family: str
    d_in: int
    d_out: int
    experts: int
    k: int
    expert_width: int
    capacity_factor: float | None
    activation: str
    bias: bool
    renormalize: bool
    balance_coef: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TopKMoE(nn.Module):
    """Top-k of `experts` expert MLPs per token, softmax router, optional capacity; a drop-in for an MLP block.

    expert_width defaults to 4·d_in / k (a token's active units match a 4× dense FFN). renormalize=False
    weighs experts by their raw softmax probability (Switch style: with k = 1 the renormalised weight
    is always 1 and the router would learn only through the balance loss). balance_coef > 0 makes
    `aux_loss()` the Switch load-balancing loss balance_coef · E · Σ_e f_e P_e (f_e: share of the
    selections, P_e: mean router probability); 0 (the default) turns it off.
    """

    family = "moe"  # the run file's group (routescope.schema.MOE)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        experts: int = 8,
        k: int = 2,
        expert_width: int | None = None,
        capacity_factor: float | None = None,
        activation: str = "gelu",
        bias: bool = True,
        renormalize: bool = True,
        balance_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if min(d_in, d_out) < 1:
            raise ValueError(f"d_in and d_out must be >= 1, got {d_in}, {d_out}")
        if experts < 1 or not 1 <= k <= experts:
            raise ValueError(f"need experts >= 1 and 1 <= k <= experts, got experts={experts}, k={k}")
        width = expert_width if expert_width is not None else max(1, 4 * d_in // k)
        if width < 1:
            raise ValueError(f"expert_width must be >= 1, got {expert_width}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if not balance_coef >= 0:
            raise ValueError(f"balance_coef must be >= 0, got {balance_coef}")
        cf = None if capacity_factor is None else float(capacity_factor)
        self.spec = MoESpec("moe", d_in, d_out, experts, k, width, cf, activation, bias, renormalize, float(balance_coef))
        self.router = nn.Linear(d_in, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, d_in, width))  # (E, d_in, w)
        self.b1 = nn.Parameter(torch.zeros(experts, width)) if bias else None  # (E, w)
        self.w2 = nn.Parameter(torch.empty(experts, width, d_out))  # (E, w, d_out)
        self.b2 = nn.Parameter(torch.zeros(experts, d_out)) if bias else None  # (E, d_out)
        self.reset_parameters()
        # Accumulators: non-persistent buffers, so they follow .to(device) but stay out of checkpoints.
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("expert_tokens", torch.zeros(experts, dtype=torch.int64), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("coselect", torch.zeros(experts, experts, dtype=torch.int64), persistent=False)
        self.register_buffer("router_entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("router_prob_sum", torch.zeros(experts, dtype=torch.float64), persistent=False)
        self.register_buffer("nonfinite_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.recording = False  # set by the recorder; accumulate in forward while True
        self.record_eval = False  # also accumulate in eval mode (off: validation passes stay out)
        self.trace_next = False  # keep the next forward's choices in `last_trace`
        self.last_trace: tuple[Tensor, Tensor, Tensor] | None = None  # (experts, weights, kept), each (n, k)
        self._balance: Tensor | None = None  # E · Σ f_e P_e of the last forward, in the graph

    def reset_parameters(self) -> None:
        """Uniform fan-in init as nn.Linear, per expert."""
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.spec.d_in), 1 / math.sqrt(self.spec.d_in))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.spec.expert_width), 1 / math.sqrt(self.spec.expert_width))

    @property
    def experts(self) -> int:
        return self.spec.experts

    @property
    def k(self) -> int:
        return self.spec.k

    def extra_repr(self) -> str:
        s = self.spec
        return (f"d_in={s.d_in}, d_out={s.d_out}, experts={s.experts}, k={s.k}, expert_width={s.expert_width}, "
                f"capacity_factor={s.capacity_factor}, activation={s.activation!r}")  # fmt: skip

    def capacity(self, tokens: int) -> int | None:
        """Selections one expert takes in a forward of `tokens` tokens (None: unlimited)."""
        s = self.spec
        return None if s.capacity_factor is None else math.ceil(s.capacity_factor * tokens * s.k / s.experts)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (n, d_in) -> router probabilities (n, E) float32, chosen experts (n, k), their weights (n, k)
        and kept (n, k) bool (False where dropped over capacity)."""
        return self._route(self.router(x))

    def _route(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`route` from the router's logits (n, E)."""
        s = self.spec
        probs = logits.float().softmax(-1)
        weights, chosen = probs.topk(s.k, dim=-1)  # best first
        if s.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        cap = self.capacity(logits.shape[0])
        if cap is None:
            return probs, chosen, weights, torch.ones_like(chosen, dtype=torch.bool)
        rank_major = F.one_hot(chosen.t().reshape(-1), s.experts)  # (k*n, E): rank 0 of all tokens first
        position = (rank_major.cumsum(0) * rank_major).sum(-1) - 1  # place of each selection in its expert's queue
        kept = (position < cap).view(s.k, -1).t()  # (n, k)
        return probs, chosen, weights, kept

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> y (..., d_out); updates the accumulators when recording."""
        s = self.spec
        if x.shape[-1] != s.d_in:
            raise ValueError(f"TopKMoE expects inputs of shape (..., {s.d_in}), got {tuple(x.shape)}")
        leading = x.shape[:-1]
        flat = x.reshape(-1, s.d_in)
        logits = self.router(flat)
        probs, chosen, weights, kept = self._route(logits)
        act = ACTIVATIONS[s.activation]
        dtype = torch.promote_types(flat.dtype, self.w1.dtype)  # under autocast: bf16 expert outputs add up in fp32
        y = torch.zeros(flat.shape[0], s.d_out, dtype=dtype, device=x.device)
        for e in range(s.experts):
            token, rank = torch.where((chosen == e) & kept)
            if token.numel() == 0:
                continue
            h = flat.index_select(0, token) @ self.w1[e]
            h = act(h + self.b1[e] if self.b1 is not None else h)
            out = h @ self.w2[e]
            out = out + self.b2[e] if self.b2 is not None else out
            y.index_add_(0, token, (out * weights[token, rank].unsqueeze(-1)).to(dtype))
        share = F.one_hot(chosen, s.experts).sum(1).float().mean(0) / s.k  # f_e: no gradient, as in Switch
        self._balance = s.experts * (share * probs.mean(0)).sum()
        if self.recording and (self.training or self.record_eval):
            self._accumulate(probs.detach(), chosen, weights.detach(), kept, torch.isfinite(logits.detach()).all(-1))
        return y.to(x.dtype).reshape(*leading, s.d_out)

    @torch.no_grad()
    def _accumulate(self, probs: Tensor, chosen: Tensor, weights: Tensor, kept: Tensor, finite: Tensor) -> None:
        """Add one batch's routing to the accumulators in place (no host sync).

        Tokens with a NaN/inf router logit (finite[i] False) are counted in `nonfinite_tokens` and left
        out of the router sums; the selection counts still count them where topk put them.
        """
        n, k, experts = chosen.shape[0], self.spec.k, self.spec.experts
        self.nonfinite_tokens.add_((~finite).sum())
        probs = torch.where(finite[:, None], probs, 0.0)  # also zeroes the entropy of those tokens
        self.tokens.add_(n)
        self.expert_tokens.index_add_(0, chosen.reshape(-1), kept.reshape(-1).long())
        self.dropped_tokens.add_(n * k - kept.sum())
        pairs = (chosen[:, :, None] * experts + chosen[:, None, :]).reshape(-1)  # every ordered pair of choices
        self.coselect.view(-1).index_add_(0, pairs, torch.ones_like(pairs))
        entropy = -torch.special.xlogy(probs, probs).sum(-1) / math.log(2)  # (n,) bits
        # Through a 1-element view: AOTAutograd (torch.compile, torch 2.13) drops an in-place add_ on a
        # 0-dim float64 buffer in a training graph; the view's update is kept.
        self.router_entropy_sum.view(1).add_(entropy.double().sum().reshape(1))
        self.router_prob_sum.add_(probs.double().sum(0))
        if self.trace_next:
            self.last_trace = (chosen, weights, kept)

    def aux_loss(self) -> Tensor:
        """balance_coef × the Switch load-balancing loss of the last forward (zero when the coef is 0)."""
        if self._balance is None or self.spec.balance_coef == 0:
            return self.router.weight.new_zeros(())
        return self.spec.balance_coef * self._balance

    def routing_stats(self) -> dict[str, Tensor]:
        """The accumulator buffers by run-file variable name (`tokens`, `expert_tokens`, ...)."""
        names = ("tokens", "expert_tokens", "dropped_tokens", "coselect", "router_entropy_sum", "router_prob_sum",
                 "nonfinite_tokens")
        return {name: getattr(self, name) for name in names}

    def reset_routing_stats(self) -> None:
        """Zero the accumulators in place (keeps buffer identity, so compiled graphs stay valid)."""
        torch._foreach_zero_(list(self.routing_stats().values()))

    def stat_sizes(self) -> dict[str, int]:
        """This layer's dimension sizes in the file (expert, other_expert, choice)."""
        return layer_sizes("moe", self.spec.to_dict())

    def traced_tokens(self) -> int | None:
        """Tokens in `last_trace` (None when the last forward kept no trace)."""
        return None if self.last_trace is None else self.last_trace[0].shape[0]

    def trace_rows(self, index: Tensor) -> dict[str, Tensor]:
        """The sampled tokens' rows of the trace variables: moe_expert, moe_weight, moe_kept (k_sampled, k)."""
        chosen, weights, kept = self.last_trace
        return {"moe_expert": chosen[index], "moe_weight": weights[index], "moe_kept": kept[index].long()}
