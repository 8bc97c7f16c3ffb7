"""A small GPT whose MLP blocks are routed layers (tree, L1-sparse or top-k MoE) or dense. Byte-level tokens.

Read top-down: config, attention, MLP choice, block, model. Shapes: B batch, S sequence, C d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes: no tokenizer to download
    seq_len: int = 128  # context length in bytes
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp: str = "tree"  # "tree" (TreeFFN), "l1" (L1SparseFFN), "moe" (TopKMoE) or "dense" (the baseline)
    dense_width: int = 512  # hidden units of the dense baseline and of the L1 layer (4 x d_model, as in GPT-2)
    depth: int = 7  # tree depth d: decisions per token; a token uses d+1 of 2^(d+1)-1 neurons per tree
    trees: int = 2  # trees per layer; 2 trees of depth 7 hold 510 neurons (the dense width), 16 active (3.1%)
    variant: str = "neuron"  # "neuron" (seed paper, UltraFastBERT) or "leaf_mlp" (Belcak's FFF)
    leaf_width: int = 8  # units per leaf MLP (variant "leaf_mlp" only)
    activation: str = "gelu"  # the asymmetry of GELU is what drives auto-pruning
    placement: str = "node"  # "node": act per neuron before the path sum; "output": act after it
    bias: bool = True
    backend: str = "auto"  # TreeFFN backend: Triton kernels on CUDA, the torch reference on CPU
    l1_coef: float = 0.2  # mlp="l1": L1 weight on the gates (× mean |g|); 0.2: ~98.5% zeros at +0.03 val loss (CPU demo)
    experts: int = 8  # mlp="moe": experts per layer
    k: int = 2  # mlp="moe": experts per token
    expert_width: int = 64  # mlp="moe": hidden units per expert (k x 64 = 128 active of 512, a quarter)
    capacity_factor: float | None = None  # mlp="moe": None = no capacity limit (no token dropped)
    balance_coef: float = 0.0  # mlp="moe": Switch load-balancing loss weight (0: off, routing left free)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # each (B, S, C)
        q, k, v = (t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, S, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


def make_mlp(cfg: GPTConfig) -> nn.Module:
    """The block's feed-forward part: a routed layer (tree, l1, moe) or the dense baseline."""
    if cfg.mlp == "dense":
        return nn.Sequential(nn.Linear(cfg.d_model, cfg.dense_width), nn.GELU(), nn.Linear(cfg.dense_width, cfg.d_model))
    if cfg.mlp == "tree":
        return TreeFFN(
            cfg.d_model, cfg.d_model, cfg.depth, trees=cfg.trees, variant=cfg.variant, leaf_width=cfg.leaf_width,
            activation=cfg.activation, placement=cfg.placement if cfg.variant == "neuron" else "node", bias=cfg.bias,
            backend=cfg.backend,
        )  # fmt: skip
    if cfg.mlp == "l1":
        return L1SparseFFN(cfg.d_model, cfg.dense_width, cfg.d_model, l1_coef=cfg.l1_coef, bias=cfg.bias)
    if cfg.mlp == "moe":
        return TopKMoE(
            cfg.d_model, cfg.d_model, experts=cfg.experts, k=cfg.k, expert_width=cfg.expert_width,
            capacity_factor=cfg.capacity_factor, activation=cfg.activation, bias=cfg.bias, balance_coef=cfg.balance_coef,
        )  # fmt: skip
    raise ValueError(f"mlp must be 'tree', 'l1', 'moe' or 'dense', got {cfg.mlp!r}")


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = make_mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying, as GPT-2
        for name, p in self.named_parameters():
            if name.endswith(("qkv.weight", "proj.weight")) or name in ("wte.weight", "wpe.weight"):
                nn.init.normal_(p, std=0.02 if not name.endswith("proj.weight") else 0.02 / math.sqrt(2 * cfg.n_layer))

    def flops_per_token(self) -> float:
        """Model FLOPs of one token's forward and backward: 6 × the weights a token multiplies with (a tree: its
        depth + 1 neurons per tree, or its path's decisions and one leaf MLP; MoE: the router and k experts)
        plus 12 · layers · d_model · seq_len for attention (the PaLM convention). For the MFU line."""
        c = self.cfg
        mlp = 0
        for block in self.blocks:
            layer = block.mlp
            if isinstance(layer, TreeFFN):
                s = layer.spec
                per_tree = (s.depth + 1) * (s.d_in + s.d_out) if s.variant == "neuron" else (
                    s.depth * s.d_in + s.leaf_width * (s.d_in + s.d_out))  # fmt: skip
                mlp += s.trees * per_tree
            elif isinstance(layer, TopKMoE):
                mlp += c.d_model * c.experts + c.k * c.expert_width * 2 * c.d_model
            else:  # dense and L1 (its gates are computed densely)
                mlp += sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        attention = c.n_layer * 4 * c.d_model**2
        head = c.d_model * c.vocab_size
        return 6.0 * (mlp + attention + head) + 12.0 * c.n_layer * c.d_model * c.seq_len

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, S) byte ids -> logits (B, S, vocab), and the mean cross-entropy if targets are given."""
        S = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(S, device=idx.device))  # (B, S, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
