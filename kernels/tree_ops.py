"""The Triton tree kernels as registered torch operators: `routescope::tree_fwd` and `routescope::tree_bwd`.

Registered through `torch.library.custom_op` with fake (shape-only) implementations and an autograd formula,
so `torch.compile` captures a model of `TreeFFN` layers as one graph (`fullgraph=True`), CUDA graphs
(`mode="reduce-overhead"`) replay it, and the batch's routing statistics come back as outputs that the
caller adds into the layer's accumulators, in the graph (the recorded counts equal eager's). Eager calls take
a plain `autograd.Function` over the same forward and backward instead: no operator dispatch on the host, and
the kernels add the statistics straight into the accumulators.
"""

from __future__ import annotations

import math
from typing import Any, Optional  # Optional: the operator schemas' spelling, which every torch >= 2.4 parses

import torch
from torch import Tensor

from .tree_reference import SUM_STATS
from .tree_triton import (
    FORWARD_STATS,
    Grouping,
    KernelConfig,
    default_sub_levels,
    tree_backward,
    tree_forward,
)

# The accumulators by dtype: counts int64, sums float64 (`new_tree_stats`).
SUM_NAMES = tuple(name for name in FORWARD_STATS if name in SUM_STATS)
COUNT_NAMES = tuple(name for name in FORWARD_STATS if name not in SUM_NAMES)

# A KernelConfig crosses the operator boundary as a list of ints (schemas take no dataclasses); [] = the defaults.
_CONFIG_FIELDS = ("block_m", "block_k", "block_o", "sub_levels", "num_warps", "num_stages", "max_registers")


def config_to_list(config: KernelConfig | None) -> list[int]:
    """[] for None, else the fields in `_CONFIG_FIELDS` order (max_registers None as -1)."""
    if config is None:
        return []
    return [(-1 if v is None else int(v)) for v in (getattr(config, f) for f in _CONFIG_FIELDS)]


def config_from_list(values: list[int]) -> KernelConfig | None:
    """Inverse of `config_to_list`."""
    if not values:
        return None
    fields = dict(zip(_CONFIG_FIELDS, values))
    fields["max_registers"] = None if fields["max_registers"] < 0 else fields["max_registers"]
    return KernelConfig(**fields)


def _buckets(depth: int, config: list[int]) -> int:
    """Subtrees the forward sorts tokens into: 2^TOP, or 1 when the tree is one subtree (TOP = 0)."""
    sub = config[_CONFIG_FIELDS.index("sub_levels")] if config else default_sub_levels()
    top = max(0, depth + 1 - max(1, sub))
    return 2**top if top else 1


def stat_layout(trees: int, depth: int) -> tuple[list[tuple[str, tuple[int, ...], int, bool]], int, int]:
    """Where each FORWARD_STATS variable sits in the two flat buffers the forward returns: (name, shape, offset,
    is_count) per variable, then the int64 and float64 lengths. Shapes and dtypes are `new_tree_stats`'s; plain
    arithmetic, so torch.compile traces it without tensors (integer indices only: dynamo in torch 2.11 refuses a
    bool as a list index)."""
    layout, sizes = [], [0, 0]
    for name in FORWARD_STATS:
        if name == "tokens":
            shape: tuple[int, ...] = ()
        elif name == "nonfinite_tokens":
            shape = (trees,)
        else:
            shape = (trees, 2**depth - 1 if name.startswith("node_") else 2**depth)
        is_count = name not in SUM_STATS
        buffer = 0 if is_count else 1
        layout.append((name, shape, sizes[buffer], is_count))
        sizes[buffer] += math.prod(shape)
    return layout, sizes[0], sizes[1]


def stat_views(counts: Tensor, sums: Tensor, trees: int, depth: int) -> dict[str, Tensor]:
    """The per-variable views of the two flat buffers (`stat_layout`), by file variable name."""
    layout, _, _ = stat_layout(trees, depth)
    views = {}
    for name, shape, offset, is_count in layout:
        flat = counts if is_count else sums
        views[name] = flat[offset : offset + math.prod(shape)].view(shape)
    return views


@torch.library.custom_op("routescope::tree_fwd", mutates_args=())
def tree_fwd(
    x: Tensor, w: Tensor, b: Optional[Tensor], u: Tensor, force: Optional[Tensor], depth: int, activation: str,
    placement: str, keep_s: bool, record: bool, config: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, leaf, z, s, perm, counts, stat_counts, stat_sums). s is (0,) unless `keep_s` (placement "output" under
    autograd: the backward needs the fp32 pre-activation sum). With `record`, the batch's routing statistics come
    back in two flat buffers (int64 counts, float64 sums; `stat_views` names them) for the caller to add into the
    layer's accumulators: a functional operator, which autograd and torch.compile both require."""
    trees = u.shape[0]
    _, n_counts, n_sums = stat_layout(trees, depth)
    stat_counts = torch.zeros((n_counts if record else 0,), device=x.device, dtype=torch.int64)
    stat_sums = torch.zeros((n_sums if record else 0,), device=x.device, dtype=torch.float64)
    stats = stat_views(stat_counts, stat_sums, trees, depth) if record else None
    res = tree_forward(x, w, b, u, depth, activation, placement, stats, save_preact=keep_s,
                       config=config_from_list(config), force=force)  # fmt: skip
    s = res.s if keep_s and placement == "output" and res.s is not None else x.new_empty((0,), dtype=torch.float32)
    return res.y, res.leaf, res.z, s, res.grouping.perm, res.grouping.counts, stat_counts, stat_sums


@tree_fwd.register_fake
def _tree_fwd_fake(x, w, b, u, force, depth, activation, placement, keep_s, record, config):  # type: ignore[no-untyped-def]
    n, trees, d_out, depth = x.shape[0], int(u.shape[0]), u.shape[2], int(depth)  # trees, depth: static sizes
    buckets = _buckets(depth, config)
    _, n_counts, n_sums = stat_layout(trees, depth)
    f32 = torch.float32
    return (
        x.new_empty((n, d_out)),
        x.new_empty((n, trees), dtype=torch.int32),
        x.new_empty((n, trees, depth + 1), dtype=f32),
        x.new_empty((n, d_out) if keep_s and placement == "output" else (0,), dtype=f32),
        x.new_empty((trees, buckets, n) if buckets > 1 else (0,), dtype=torch.int32),
        x.new_empty((trees, buckets), dtype=torch.int32),
        x.new_empty((n_counts if record else 0,), dtype=torch.int64),
        x.new_empty((n_sums if record else 0,), dtype=torch.float64),
    )


@torch.library.custom_op("routescope::tree_bwd", mutates_args=())
def tree_bwd(
    dy: Tensor, x: Tensor, w: Tensor, u: Tensor, leaf: Tensor, z: Tensor, s: Tensor, perm: Tensor, counts: Tensor,
    depth: int, activation: str, placement: str, has_bias: bool, config: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dw, db, du) for the routing `tree_fwd` recorded; dw/db/du fp32, db (0,) without a bias."""
    given = config_from_list(config)
    sub = given.sub_levels if given is not None else default_sub_levels()
    grouping = Grouping(perm, counts, KernelConfig(sub_levels=sub))
    dx, dw, db, du = tree_backward(dy, x, w, u, leaf, z, s if s.numel() else None, grouping, depth, activation,
                                   placement, has_bias, config=given)  # fmt: skip
    return dx, dw, db if db is not None else dw.new_empty((0,)), du


@tree_bwd.register_fake
def _tree_bwd_fake(dy, x, w, u, leaf, z, s, perm, counts, depth, activation, placement, has_bias, config):  # type: ignore[no-untyped-def]
    trees, units = u.shape[0], u.shape[1]
    f32 = torch.float32
    return (
        torch.empty_like(x),
        x.new_empty((trees, units, x.shape[1]), dtype=f32),
        x.new_empty((trees, units) if has_bias else (0,), dtype=f32),
        x.new_empty((trees, units, u.shape[2]), dtype=f32),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, w, b, u, _force, depth, activation, placement, _keep_s, _record, config = inputs
    _y, leaf, z, s, perm, counts, stat_counts, stat_sums = output
    ctx.save_for_backward(x, w, u, leaf, z, s, perm, counts)
    # Only y carries gradients: the float by-products (z, s, the statistics' sums) must not drag the graph along,
    # or the accumulators they are added into would hold it from one step to the next.
    ctx.mark_non_differentiable(leaf, z, s, perm, counts, stat_counts, stat_sums)
    ctx.meta = (depth, activation, placement, b is not None, config, w.dtype, None if b is None else b.dtype)


def _backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
    x, w, u, leaf, z, s, perm, counts = ctx.saved_tensors
    depth, activation, placement, has_bias, config, w_dtype, b_dtype = ctx.meta
    dx, dw, db, du = torch.ops.routescope.tree_bwd(dy, x, w, u, leaf, z, s, perm, counts, depth, activation,
                                                   placement, has_bias, config)  # fmt: skip
    return dx, dw.to(w_dtype), db.to(b_dtype) if has_bias else None, du.to(u.dtype), *(None,) * 7


tree_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerTreeFFN(torch.autograd.Function):
    """`tree_fwd` / `tree_bwd` without the operator dispatch, for eager calls: the custom-op layer (alias checks,
    dispatcher, fake-mode hooks) cost ~0.6 ms of host time per call on torch 2.11 (H200 profile, BENCHMARKS.md),
    and the flat statistics buffers an extra allocation and add; here the kernels write the accumulators."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, u: Tensor, force: Tensor | None, depth: int,  # type: ignore[override]
                activation: str, placement: str, keep_s: bool, stats: dict[str, Tensor] | None,
                config: KernelConfig | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        res = tree_forward(x, w, b, u, depth, activation, placement, stats, save_preact=keep_s, config=config,
                           force=force)  # fmt: skip
        ctx.save_for_backward(x, w, u, res.leaf, res.z, res.s if keep_s and placement == "output" else None)
        ctx.grouping = res.grouping
        ctx.meta = (depth, activation, placement, b is not None, config, None if b is None else b.dtype)
        ctx.mark_non_differentiable(res.leaf, res.z)
        return res.y, res.leaf, res.z

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, u, leaf, z, s = ctx.saved_tensors
        depth, activation, placement, has_bias, config, b_dtype = ctx.meta
        dx, dw, db, du = tree_backward(dy, x, w, u, leaf, z, s, ctx.grouping, depth, activation, placement,
                                       has_bias, config=config)  # fmt: skip
        return dx, dw.to(w.dtype), db.to(b_dtype) if has_bias else None, du.to(u.dtype), *(None,) * 7


def tree_ffn(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    u: Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    stats: dict[str, Tensor] | None = None,
    config: KernelConfig | None = None,
    force: Tensor | None = None,
    via_op: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable tree FFN on the Triton kernels: (y, leaf (n, T) int32, z (n, T, d+1) fp32).

    `stats` (the layer's accumulators by file variable name, as `new_tree_stats` makes them) receive the batch's
    counts and sums in place. `force` (T, 2^d − 1) int8 holds nodes to one side (a pruned tree; −1 free).
    `via_op`: True goes through the registered operators, False through `_EagerTreeFFN`; None (the default)
    takes the operators only while torch.compile traces (tests and benchmarks compare the two).
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b, u))
    keep_s = needs_grad and placement == "output"
    if not (torch.compiler.is_compiling() if via_op is None else via_op):
        return _EagerTreeFFN.apply(x, w, b, u, force, depth, activation, placement, keep_s, stats, config)
    record = stats is not None
    y, leaf, z, _s, _perm, _counts, stat_counts, stat_sums = torch.ops.routescope.tree_fwd(
        x, w, b, u, force, depth, activation, placement, keep_s, record, config_to_list(config)
    )
    if record:  # one multi-tensor add per dtype into the accumulators
        views = stat_views(stat_counts, stat_sums, u.shape[0], depth)
        for group in (COUNT_NAMES, SUM_NAMES):
            torch._foreach_add_([stats[name] for name in group], [views[name] for name in group])
    return y, leaf, z
