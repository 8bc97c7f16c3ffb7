"""Fused, instrumented Triton kernels for the neuron-per-node tree FFN: forward and backward.

The specification is `tree_reference.neuron_forward` (same math, same heap numbering). The kernels
split each tree of depth d at level TOP = d + 1 − `sub_levels`: the top levels (2^TOP − 1 nodes) and
2^TOP subtrees of `sub_levels` levels (2^sub_levels − 1 units each, at most 64 by default).

Forward, two launches:
1. `route_top_kernel` (skipped when TOP = 0): per block of tokens, z of every top node as one dense
   `tl.dot` against the contiguous rows 0 .. 2^TOP − 2, the routing through the top levels, and a
   counting sort of the tokens by the subtree they enter (one atomic per subtree and block).
2. `subtree_kernel`: per block of tokens that share a subtree, z of all its units as one dense
   `tl.dot` against the subtree's rows, the routing inside it, then y = A·U with A the (tokens ×
   units) matrix of act(z) on the path: tensor-core work on rows read once per block, not per token.
   The top levels' contributions are rank-1 updates, since every token of the block took that path.

With `stats=`, both launches add the per-node counts (docs/file-format.md) and sums of the batch into the layer's
int64 / float64 accumulators, reduced over the block first (one atomic per unit and block): no
second pass. Non-finite z (NaN/inf) stays out of the sums; the subtree launch counts, per tree, the
tokens with a non-finite z anywhere on their path (top levels read back from z) with one atomic per
block. Counts still count such a token where it went: NaN > 0 is false, so a NaN z routes left.
By-products: the leaf per token and tree and z along the path (the backward reuses them).

Backward, one launch in the forward's grouping (`subtree_bwd_kernel`): per block, dz on the path
and dx = dZ·W (dense dots again), and the block's sums du += Aᵀ·dy, dw += dZᵀ·x, db += Σ dz, added
with one atomic per row and block. Float atomics make gradients and float sums non-deterministic in
the last bits; counts are exact.

This module is the host side (configs, checks, launches); `tree_ops.py` registers them as torch operators
with autograd. The kernels live in
`tree_fwd_kernels.py` (forward), `tree_bwd_kernels.py` (backward) and `tree_jit_helpers.py` (the
@triton.jit helpers both share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

try:  # Triton is a Linux dependency; elsewhere the layer stays on the torch reference.
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Activation codes shared by host and kernels (index in this tuple).
ACT_CODES = ("gelu", "gelu_tanh", "relu", "silu", "tanh", "sigmoid", "identity")
# Input dtypes the kernels take (fp32 accumulation; float64 stays on the torch reference).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Statistic buffers the forward kernels add into, in the order of their pointer arguments.
FORWARD_STATS = (
    "tokens", "node_visits", "node_right", "node_fires", "node_act_sum", "node_act_sqsum",
    "leaf_visits", "leaf_fires", "leaf_act_sum", "leaf_act_sqsum", "nonfinite_tokens",
)  # fmt: skip


def available() -> bool:
    """True when Triton is importable (compiled on CUDA, or the CPU interpreter)."""
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the launches: BM tokens per program, BK / BO chunks of d_in / d_out, subtree size."""

    block_m: int = 64
    block_k: int = 64
    block_o: int = 64
    sub_levels: int = 6  # levels per subtree, leaf level included: 2^6 − 1 = 63 units per dense block
    num_warps: int = 4
    num_stages: int = 3
    max_registers: int | None = None  # cap per thread for the subtree launches (spills past it); None: Triton's choice

    def launch_options(self) -> dict[str, int]:
        """Keyword options of the subtree launches: warps, and the register cap where set (not in the interpreter)."""
        options = {"num_warps": self.num_warps}
        if self.max_registers is not None and not interpreting():
            options["maxnreg"] = self.max_registers
        return options


def default_sub_levels() -> int:
    """Levels per subtree of the default configs (small in the interpreter); the tree ops' shapes depend on it."""
    return 3 if interpreting() else KernelConfig.sub_levels


def default_config(n: int, d_in: int, d_out: int, depth: int, backward: bool = False) -> KernelConfig:
    """Tiles for the GPU (best of `benchmarks/tree_kernels.py --sweep` on an H100 at 16k tokens; see
    BENCHMARKS.md), small ones in the interpreter. The backward may differ in tiles, not in subtree size."""
    if interpreting():
        return KernelConfig(block_m=16, block_k=16, block_o=16, sub_levels=default_sub_levels(), num_warps=1, num_stages=1)
    if backward:  # bigger blocks: fewer atomic row adds per subtree
        return KernelConfig(block_m=64, num_warps=8)
    # Forward register cap 96 (Triton picks 128-147): occupancy for a latency-bound kernel; H100 at 16k tokens,
    # BENCHMARKS.md run 8: forward -11% at (768, 11), recording -10% at both shapes; the backward gains nothing.
    if n <= 64 or d_in >= 1536:  # small batches: latency; wide rows: registers
        return KernelConfig(block_m=16, max_registers=96)
    return KernelConfig(block_m=32, max_registers=96)


class Split(NamedTuple):
    """How a launch splits the trees: TOP levels on top, subtrees of SUBL levels, their padded widths."""

    top: int
    subl: int
    topw: int
    subw: int
    nbp: int


def split_levels(depth: int, cfg: KernelConfig) -> Split:
    """TOP = d + 1 − sub_levels (at least 0); widths padded to powers of two of at least 16 (tl.dot)."""
    top = max(0, depth + 1 - max(1, cfg.sub_levels))
    subl = depth + 1 - top
    return Split(top, subl, max(16, 2**top), max(16, 2**subl), max(16, 2**top))


if triton is not None:  # the kernels this module launches
    from .tree_bwd_kernels import subtree_bwd_kernel
    from .tree_fwd_kernels import route_top_kernel, subtree_kernel


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision in dense dots; bf16/fp16 use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x: Tensor, w: Tensor, u: Tensor, depth: int) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to use Triton's "
            "CPU interpreter, or use backend='torch'"
        )
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton tree kernels take {[str(d) for d in DTYPES]} inputs, got {x.dtype}; use backend='torch'")
    if x.dim() != 2 or w.dim() != 3 or u.dim() != 3 or w.shape[1] != 2 ** (depth + 1) - 1:
        raise ValueError("expected x (n, d_in), w (T, 2^(d+1)-1, d_in), u (T, 2^(d+1)-1, d_out)")


class Grouping(NamedTuple):
    """The forward's sort of tokens by subtree, reused by the backward: perm (T, 2^TOP, n), counts (T, 2^TOP)."""

    perm: Tensor
    counts: Tensor
    config: KernelConfig


class ForwardResult(NamedTuple):
    """y (n, d_out), leaf (n, T) int32, z (n, T, d+1) fp32 along the path, s = Σ z·u (placement "output"
    or several trees; fp32, for the backward) and the token grouping."""

    y: Tensor
    leaf: Tensor
    z: Tensor
    s: Tensor | None
    grouping: Grouping


def _grid_blocks(n: int, split: Split, block_m: int) -> int:
    """Programs per tree that cover every subtree's blocks: Σ cdiv(count_b, BM) ≤ cdiv(n, BM) + 2^TOP."""
    return triton.cdiv(n, block_m) + (2**split.top if split.top else 0)


def tree_forward(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    u: Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    stats: dict[str, Tensor] | None = None,
    save_preact: bool = False,
    config: KernelConfig | None = None,
    force: Tensor | None = None,
) -> ForwardResult:
    """Forward of the neuron-per-node tree FFN (two launches; one where the tree is a single subtree).

    With `stats` (the layer's accumulators by file variable name) the batch's counts and sums are added
    into them inside the same launches. `force` (T, 2^d − 1) int8 holds decision nodes to one side (0 left,
    1 right; −1 free): a pruned tree's routing. No host sync: the launches are CUDA-graph capturable.
    """
    _check(x, w, u, depth)
    cfg = config or default_config(x.shape[0], x.shape[1], u.shape[2], depth)
    x, w, u = x.contiguous(), w.contiguous(), u.contiguous()
    b = b.contiguous() if b is not None else None
    n, d_in = x.shape
    trees, _, d_out = u.shape
    split = split_levels(depth, cfg)
    dev = x.device
    place_out = placement == "output"
    y_atomic = trees > 1  # trees add into the same rows: an fp32 sum s, finished below
    keep_s = y_atomic or (place_out and save_preact)
    y = torch.empty((n, d_out), device=dev, dtype=x.dtype)
    s = (torch.zeros if y_atomic else torch.empty)((n, d_out), device=dev, dtype=torch.float32) if keep_s else None
    leaf = torch.empty((n, trees), device=dev, dtype=torch.int32)
    z = torch.empty((n, trees, depth + 1), device=dev, dtype=torch.float32)
    buckets = 2**split.top if split.top else 1
    counts = torch.zeros((trees, buckets), device=dev, dtype=torch.int32)
    perm = torch.empty((trees, buckets, n) if split.top else (0,), device=dev, dtype=torch.int32)
    grouping = Grouping(perm, counts, cfg)
    if n == 0:
        return ForwardResult(y, leaf, z, s, grouping)
    record = stats is not None
    st = [stats[name] for name in FORWARD_STATS] if record else [z] * len(FORWARD_STATS)
    force_arg = force.contiguous() if force is not None else leaf
    common = dict(DEPTH=depth, ACT=ACT_CODES.index(activation), PLACE_OUT=place_out, HAS_BIAS=b is not None,
                  RECORD=record, HAS_FORCE=force is not None, TOP=split.top, NBP=split.nbp, DOT_PREC=_dot_precision(x.dtype),
                  BM=cfg.block_m, BK=cfg.block_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps)  # fmt: skip
    bias = b if b is not None else w
    if split.top:
        route_top_kernel[(triton.cdiv(n, cfg.block_m), trees)](
            x, w, bias, z, perm, counts, *st[:6], force_arg, n, d_in, trees, TOPW=split.topw, **common,
        )  # fmt: skip
    subtree_kernel[(_grid_blocks(n, split, cfg.block_m), trees)](
        x, w, bias, u, y, s if s is not None else y, leaf, z, perm, counts, *st, force_arg, n, d_in, d_out, trees,
        SAVE_S=s is not None, Y_ATOMIC=y_atomic, SPLIT_A=place_out and x.dtype != torch.float32,
        TOPW=split.topw, SUBL=split.subl, SUBW=split.subw, BO=cfg.block_o, **{**common, **cfg.launch_options()},
    )  # fmt: skip
    if y_atomic:
        y.copy_(_finish(s, activation) if place_out else s)
    return ForwardResult(y, leaf, z, s, grouping)


def _finish(s: Tensor, activation: str) -> Tensor:
    """act(s) for placement "output" when several trees summed into s on the device."""
    from routescope.kernels.tree_reference import ACTIVATIONS

    return ACTIVATIONS[activation](s)


def _output_grad(dy: Tensor, s: Tensor, activation: str) -> Tensor:
    """dL/ds = dy · act'(s) for placement "output", from aten's activation backward ops: they run where autograd
    does not (inside a registered operator)."""
    dy = dy.float()
    aten = torch.ops.aten
    if activation in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(dy, s, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "relu":
        return dy * (s > 0)
    if activation == "silu":
        return aten.silu_backward(dy, s)
    if activation == "tanh":
        return aten.tanh_backward(dy, torch.tanh(s))
    if activation == "sigmoid":
        return aten.sigmoid_backward(dy, torch.sigmoid(s))
    return dy  # identity


def tree_backward(
    dy: Tensor,
    x: Tensor,
    w: Tensor,
    u: Tensor,
    leaf: Tensor,
    z: Tensor,
    s: Tensor | None,
    grouping: Grouping,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    has_bias: bool = True,
    config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Gradients (dx, dw, db, du) for the routing and grouping recorded by `tree_forward` (held fixed).

    `config` may pick other tiles than the forward's; the subtree size is always the forward's.
    """
    cfg = config or default_config(x.shape[0], x.shape[1], u.shape[2], depth, backward=True)
    cfg = replace(cfg, sub_levels=grouping.config.sub_levels)
    n, d_in = x.shape
    trees, units, d_out = u.shape
    split = split_levels(depth, cfg)
    dev = x.device
    place_out = placement == "output"
    if place_out:
        dy = _output_grad(dy, s, activation).to(x.dtype)
    dy = dy.contiguous()
    dx = torch.zeros(x.shape, device=dev, dtype=torch.float32) if trees > 1 else torch.empty_like(x)
    dw = torch.zeros((trees, units, d_in), device=dev, dtype=torch.float32)
    du = torch.zeros((trees, units, d_out), device=dev, dtype=torch.float32)
    db = torch.zeros((trees, units), device=dev, dtype=torch.float32) if has_bias else None
    if n == 0:
        return dx.to(x.dtype), dw, db, du
    ntop = 2**split.top - 1
    # every token's A and dZ at the top nodes (T, n, TOPW): dense products below give their rows
    atop = torch.empty((trees, n, split.topw) if ntop else (0,), device=dev, dtype=x.dtype)
    dztop = torch.empty_like(atop)
    subtree_bwd_kernel[(_grid_blocks(n, split, cfg.block_m), trees)](
        x, w, u, dy, leaf, z, grouping.perm, grouping.counts, dx, dw, db if db is not None else dx, du,
        atop, dztop, n, d_in, d_out, trees, DEPTH=depth, ACT=ACT_CODES.index(activation), PLACE_OUT=place_out,
        HAS_BIAS=has_bias, DX_ATOMIC=trees > 1, TOP=split.top, TOPW=split.topw, NBP=split.nbp, SUBL=split.subl,
        SUBW=split.subw, DOT_PREC=_dot_precision(x.dtype), BM=cfg.block_m, BK=cfg.block_k, BO=cfg.block_o,
        STAGES=cfg.num_stages, **cfg.launch_options(),
    )  # fmt: skip
    if ntop:
        # One 2-D product over every tree's top units, not one batched product per tree: with M = TOPW rows and
        # K = n tokens, a batched GEMM fills a handful of tiles (0.19 ms a call on an H200 at 16k tokens, 20% of a
        # bf16 training step's GPU time at the GPU preset); the 2-D one lets cuBLAS split the long token axis.
        a2 = atop.permute(1, 0, 2).reshape(n, trees * split.topw)
        dz2 = dztop.permute(1, 0, 2).reshape(n, trees * split.topw)
        du[:, :ntop] = (a2.t() @ dy).view(trees, split.topw, d_out)[:, :ntop]  # (T, ntop, d_out)
        dw[:, :ntop] = (dz2.t() @ x).view(trees, split.topw, d_in)[:, :ntop]
        if db is not None:
            db[:, :ntop] = dztop[:, :, :ntop].float().sum(1)
    return dx.to(x.dtype), dw, db, du


def leaf_to_path(leaf: Tensor, depth: int) -> Tensor:
    """(n, T) leaf numbers -> (n, T, d+1) int64 heap indices of the path (root first), as the reference."""
    shifts = torch.arange(depth, -1, -1, device=leaf.device)  # d, d-1, ..., 0
    return ((leaf.long().unsqueeze(-1) + 2**depth) >> shifts) - 1
