"""Fused, instrumented Triton kernels for the neuron-per-node tree FFN: forward and backward.

The specification is `tree_reference.neuron_forward` (same math, same heap numbering). The kernels
split each tree of depth d at level TOP = d + 1 − `sub_levels`: the top levels (2^TOP − 1 nodes) and
2^TOP subtrees of `sub_levels` levels (2^sub_levels − 1 units each, at most 64 by default).

Forward, two launches:
1. `_route_top_kernel` (skipped when TOP = 0): per block of tokens, z of every top node as one dense
   `tl.dot` against the contiguous rows 0 .. 2^TOP − 2, the routing through the top levels, and a
   counting sort of the tokens by the subtree they enter (one atomic per subtree and block).
2. `_subtree_kernel`: per block of tokens that share a subtree, z of all its units as one dense
   `tl.dot` against the subtree's rows, the routing inside it, then y = A·U with A the (tokens ×
   units) matrix of act(z) on the path: tensor-core work on rows read once per block, not per token.
   The top levels' contributions are rank-1 updates, since every token of the block took that path.

With `stats=`, both launches add the DESIGN.md per-node counts and sums of the batch into the layer's
int64 / float64 accumulators, reduced over the block first (one atomic per unit and block): no
second pass. Non-finite z (NaN/inf) stays out of the sums; the subtree launch counts, per tree, the
tokens with a non-finite z anywhere on their path (top levels read back from z) with one atomic per
block. Counts still count such a token where it went: NaN > 0 is false, so a NaN z routes left. By-products: the leaf per token and tree and z along the path (the backward reuses them).

Backward, one launch in the forward's grouping (`_subtree_bwd_kernel`): per block, dz on the path
and dx = dZ·W (dense dots again), and the block's sums du += Aᵀ·dy, dw += dZᵀ·x, db += Σ dz, added
with one atomic per row and block. Float atomics make gradients and float sums non-deterministic in
the last bits; counts are exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

try:  # Triton is a Linux dependency; elsewhere the layer stays on the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

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


def default_config(n: int, d_in: int, d_out: int, depth: int, backward: bool = False) -> KernelConfig:
    """Tiles for the GPU (best of `benchmarks/tree_kernels.py --sweep` on an H100 at 16k tokens; see
    BENCHMARKS.md), small ones in the interpreter. The backward may differ in tiles, not in subtree size."""
    if interpreting():
        return KernelConfig(block_m=16, block_k=16, block_o=16, sub_levels=3, num_warps=1, num_stages=1)
    if backward:  # bigger blocks: fewer atomic row adds per subtree
        return KernelConfig(block_m=64, num_warps=8)
    if n <= 64 or d_in >= 1536:  # small batches: latency; wide rows: registers
        return KernelConfig(block_m=16)
    return KernelConfig(block_m=32)


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


if triton is not None:

    @triton.jit
    def _tanh(z):
        """tanh via exp of −2|z| (no overflow; tl has no tanh on every supported version)."""
        e = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - e) / (1.0 + e)
        return tl.where(z >= 0.0, th, -th)

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        """act(z) in fp32 for the activation code ACT (see ACT_CODES)."""
        if ACT == 0:
            out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACT == 1:
            out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
        elif ACT == 2:
            out = tl.maximum(z, 0.0)
        elif ACT == 3:
            out = z / (1.0 + tl.exp(-z))
        elif ACT == 4:
            out = _tanh(z)
        elif ACT == 5:
            out = 1.0 / (1.0 + tl.exp(-z))
        else:
            out = z
        return out

    @triton.jit
    def _dact(z, ACT: tl.constexpr):
        """act'(z) in fp32 (relu'(0) = 0, as torch)."""
        if ACT == 0:
            out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        elif ACT == 1:
            inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            th = _tanh(inner)
            out = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        elif ACT == 2:
            out = tl.where(z > 0.0, 1.0, 0.0)
        elif ACT == 3:
            sg = 1.0 / (1.0 + tl.exp(-z))
            out = sg * (1.0 + z * (1.0 - sg))
        elif ACT == 4:
            th = _tanh(z)
            out = 1.0 - th * th
        elif ACT == 5:
            sg = 1.0 / (1.0 + tl.exp(-z))
            out = sg * (1.0 - sg)
        else:
            out = z * 0.0 + 1.0
        return out

    @triton.jit
    def _unit_out(z, ACT: tl.constexpr, PLACE_OUT: tl.constexpr):
        """A unit's contribution before the output sum: act(z) (placement "node") or z ("output")."""
        if PLACE_OUT:
            out = z
        else:
            out = _act(z, ACT)
        return out

    @triton.jit
    def _unit_grad(g, z, ACT: tl.constexpr, PLACE_OUT: tl.constexpr):
        """dL/dz of a unit from g = dL/d(contribution): g·act'(z) ("node") or g ("output")."""
        if PLACE_OUT:
            out = g
        else:
            out = g * _dact(z, ACT)
        return out

    @triton.jit
    def _path_node(leaf, level: tl.constexpr, DEPTH: tl.constexpr):
        """Heap index of the level-`level` unit on the path to `leaf` (leaf numbered 0 .. 2^DEPTH-1)."""
        return ((leaf + (1 << DEPTH)) >> (DEPTH - level)) - 1

    @triton.jit
    def _path_node(leaf, level: tl.constexpr, DEPTH: tl.constexpr):
        """Heap index of the level-`level` unit on the path to `leaf` (leaf numbered 0 .. 2^DEPTH-1)."""
        return ((leaf + (1 << DEPTH)) >> (DEPTH - level)) - 1

    @triton.jit
    def _subtree_units(root, SUBL: tl.constexpr, SUBW: tl.constexpr):
        """Columns of a subtree block: local heap index c, its global heap index, relative level, validity."""
        c = tl.arange(0, SUBW)
        lev = tl.zeros((SUBW,), dtype=tl.int32)
        for k in tl.static_range(1, SUBL):
            lev += (c + 1 >= (1 << k)).to(tl.int32)
        width = tl.full((SUBW,), 1, dtype=tl.int32) << lev  # nodes at that level of the subtree
        heap = (root + 1) * width - 1 + (c - (width - 1))
        return c, heap, lev, c < (1 << SUBL) - 1

    @triton.jit
    def _block_tokens(pid, t, cnt_ptr, perm_ptr, n, TOP: tl.constexpr, NBP: tl.constexpr, BM: tl.constexpr):
        """The tokens of program `pid` of tree t: one block of one subtree's tokens (or of all, TOP = 0).

        Programs are laid out subtree after subtree, cdiv(count, BM) each; the grid has room for the
        worst case, and programs past the last block get no valid token (and skip their loops).
        """
        if TOP > 0:
            NB: tl.constexpr = 1 << TOP
            bcol = tl.arange(0, NBP)
            cnts = tl.load(cnt_ptr + t * NB + bcol, mask=bcol < NB, other=0)
            blocks = (cnts + BM - 1) // BM
            cum = tl.cumsum(blocks, axis=0)  # inclusive
            bucket = tl.sum((cum <= pid).to(tl.int32), axis=0)
            here = bcol == bucket
            count = tl.sum(tl.where(here, cnts, 0), axis=0)
            first_block = tl.sum(tl.where(here, cum - blocks, 0), axis=0)
            slot = (pid - first_block) * BM + tl.arange(0, BM)
            valid = slot < count  # count is 0 past the last subtree
            rows = tl.load(perm_ptr + (t * NB + bucket).to(tl.int64) * n + slot, mask=valid, other=0).to(tl.int64)
            root = NB - 1 + tl.minimum(bucket, NB - 1)  # idle programs: any real subtree, nothing valid
        else:
            rm = pid * BM + tl.arange(0, BM)
            valid = rm < n
            rows = rm.to(tl.int64)
            root = pid * 0
        return rows, valid, root, tl.sum(valid.to(tl.int32), axis=0) > 0

    @triton.jit
    def _finite(z):
        """True where z is neither NaN nor ±inf."""
        return (z == z) & (tl.abs(z) <= 3.4028234663852886e38)  # NaN != NaN; |inf| > the largest float32

    @triton.jit
    def _add_unit_stats(
        zs, hit, cols, is_node, stat_node, stat_leaf, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr,
        lv_ptr, lf_ptr, las_ptr, laq_ptr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr,
    ):  # fmt: skip
        """Per-unit counts and sums over a block (hit: tokens × units on the path), one atomic each;
        the sums leave out non-finite z (NaN, inf), the counts do not."""
        if PLACE_OUT:
            fired = zs != 0.0
        else:
            fired = _act(zs, ACT) != 0.0
        visits = tl.sum(hit.to(tl.int32), axis=0)
        right = tl.sum((hit & (zs > 0.0)).to(tl.int32), axis=0).to(tl.int64)
        fires = tl.sum((hit & fired).to(tl.int32), axis=0).to(tl.int64)
        zhit = tl.where(hit & _finite(zs), zs, 0.0)
        zsum = tl.sum(zhit, axis=0).to(tl.float64)
        zsq = tl.sum(zhit * zhit, axis=0).to(tl.float64)
        node = cols & is_node & (visits > 0)
        leaf = cols & (~is_node) & (visits > 0)
        tl.atomic_add(nv_ptr + stat_node, visits.to(tl.int64), mask=node, sem="relaxed")
        tl.atomic_add(nr_ptr + stat_node, right, mask=node, sem="relaxed")
        tl.atomic_add(nf_ptr + stat_node, fires, mask=node, sem="relaxed")
        tl.atomic_add(nas_ptr + stat_node, zsum, mask=node, sem="relaxed")
        tl.atomic_add(naq_ptr + stat_node, zsq, mask=node, sem="relaxed")
        tl.atomic_add(lv_ptr + stat_leaf, visits.to(tl.int64), mask=leaf, sem="relaxed")
        tl.atomic_add(lf_ptr + stat_leaf, fires, mask=leaf, sem="relaxed")
        tl.atomic_add(las_ptr + stat_leaf, zsum, mask=leaf, sem="relaxed")
        tl.atomic_add(laq_ptr + stat_leaf, zsq, mask=leaf, sem="relaxed")

    @triton.jit
    def _route_top_kernel(
        x_ptr, w_ptr, b_ptr, z_ptr, perm_ptr, cnt_ptr,
        tok_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr,
        n, D, T,
        DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        RECORD: tl.constexpr, TOP: tl.constexpr, TOPW: tl.constexpr, NBP: tl.constexpr,
        DOT_PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Route BM tokens through the top TOP levels of tree t and file them under their subtree."""
        pid = tl.program_id(0)
        t = tl.program_id(1)
        rm = pid * BM + tl.arange(0, BM)
        valid = rm < n
        rows = rm.to(tl.int64)
        rk = tl.arange(0, BK)
        col = tl.arange(0, TOPW)  # heap node of each column
        NNODE: tl.constexpr = (1 << DEPTH) - 1
        NUNIT: tl.constexpr = 2 * NNODE + 1
        NTOP: tl.constexpr = (1 << TOP) - 1
        NB: tl.constexpr = 1 << TOP
        w_t = w_ptr + t * NUNIT * D
        zz = tl.zeros((BM, TOPW), dtype=tl.float32)
        for k0 in tl.range(0, D, BK, num_stages=STAGES):
            kk = k0 + rk
            xk = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=valid[:, None] & (kk[None, :] < D), other=0.0)
            wk = tl.load(w_t + col[:, None] * D + kk[None, :], mask=(col[:, None] < NTOP) & (kk[None, :] < D), other=0.0)
            zz += tl.dot(xk, tl.trans(wk.to(xk.dtype)), input_precision=DOT_PREC)
        if HAS_BIAS:
            zz += tl.load(b_ptr + t * NUNIT + col, mask=col < NTOP, other=0.0).to(tl.float32)[None, :]
        zrow = z_ptr + (rows * T + t) * (DEPTH + 1)
        idx = tl.zeros((BM,), dtype=tl.int32)
        onpath = tl.zeros((BM, TOPW), dtype=tl.int1)
        for level in tl.static_range(TOP):
            sel = col[None, :] == idx[:, None]
            z = tl.sum(tl.where(sel, zz, 0.0), axis=1)
            tl.store(zrow + level, z, mask=valid)
            onpath = onpath | sel
            idx = 2 * idx + 1 + (z > 0.0).to(tl.int32)
        # counting sort: rank within the block per subtree, then one atomic per subtree for the base
        bucket = idx - NTOP
        bcol = tl.arange(0, NBP)
        inb = (bcol[None, :] == bucket[:, None]) & valid[:, None]  # (BM, NBP)
        per_bucket = tl.sum(inb.to(tl.int32), axis=0)
        rank = tl.sum(tl.where(inb, tl.cumsum(inb.to(tl.int32), axis=0) - 1, 0), axis=1)
        base = tl.atomic_add(cnt_ptr + t * NB + bcol, per_bucket, mask=(bcol < NB) & (per_bucket > 0), sem="relaxed")
        slot = tl.sum(tl.where(inb, base[None, :], 0), axis=1) + rank
        tl.store(perm_ptr + (t * NB + bucket).to(tl.int64) * n + slot, rm, mask=valid)
        if RECORD:
            if (pid == 0) & (t == 0):
                first = tl.arange(0, 1)
                tl.atomic_add(tok_ptr + first, tl.zeros((1,), dtype=tl.int64) + n, sem="relaxed")
            stat = t * NNODE + col
            _add_unit_stats(
                zz, onpath & valid[:, None], col < NTOP, col >= 0, stat, stat,
                nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, ACT, PLACE_OUT,
            )  # fmt: skip

    @triton.jit
    def _subtree_kernel(
        x_ptr, w_ptr, b_ptr, u_ptr, y_ptr, s_ptr, leaf_ptr, z_ptr, perm_ptr, cnt_ptr,
        tok_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, lv_ptr, lf_ptr, las_ptr, laq_ptr, bad_ptr,
        n, D, O, T,
        DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        RECORD: tl.constexpr, SAVE_S: tl.constexpr, Y_ATOMIC: tl.constexpr, SPLIT_A: tl.constexpr,
        TOP: tl.constexpr, TOPW: tl.constexpr, NBP: tl.constexpr, SUBL: tl.constexpr, SUBW: tl.constexpr, DOT_PREC: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Route one block of a subtree's tokens through it and write y (see module doc)."""
        pid = tl.program_id(0)
        t = tl.program_id(1)
        NNODE: tl.constexpr = (1 << DEPTH) - 1
        NUNIT: tl.constexpr = 2 * NNODE + 1
        PATH: tl.constexpr = DEPTH + 1
        rows, valid, root, busy = _block_tokens(pid, t, cnt_ptr, perm_ptr, n, TOP, NBP, BM)
        c, heap, lev, cols = _subtree_units(root, SUBL, SUBW)
        rk = tl.arange(0, BK)
        ro = tl.arange(0, BO)
        w_t = w_ptr + t * NUNIT * D
        u_t = u_ptr + t * NUNIT * O
        k_end = tl.where(busy, D, 0)  # idle programs skip their loops
        o_end = tl.where(busy, O, 0)
        zs = tl.zeros((BM, SUBW), dtype=tl.float32)
        for k0 in tl.range(0, k_end, BK, num_stages=STAGES):
            kk = k0 + rk
            xk = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=valid[:, None] & (kk[None, :] < D), other=0.0)
            wk = tl.load(w_t + heap[:, None] * D + kk[None, :], mask=cols[:, None] & (kk[None, :] < D), other=0.0)
            zs += tl.dot(xk, tl.trans(wk.to(xk.dtype)), input_precision=DOT_PREC)
        if HAS_BIAS:
            zs += tl.load(b_ptr + t * NUNIT + heap, mask=cols & (c < tl.where(busy, SUBW, 0)), other=0.0).to(tl.float32)[None, :]
        zrow = z_ptr + (rows * T + t) * PATH
        loc = tl.zeros((BM,), dtype=tl.int32)
        onpath = tl.zeros((BM, SUBW), dtype=tl.int1)
        for level in tl.static_range(SUBL):
            sel = c[None, :] == loc[:, None]
            z = tl.sum(tl.where(sel, zs, 0.0), axis=1)
            tl.store(zrow + TOP + level, z, mask=valid)
            onpath = onpath | sel
            if level < SUBL - 1:
                loc = 2 * loc + 1 + (z > 0.0).to(tl.int32)
        leaf_heap = tl.sum(tl.where(c[None, :] == loc[:, None], heap[None, :], 0), axis=1)
        tl.store(leaf_ptr + rows * T + t, leaf_heap - NNODE, mask=valid)
        hit = onpath & valid[:, None]
        if RECORD:
            if TOP == 0:
                if (pid == 0) & (t == 0):
                    first = tl.arange(0, 1)
                    tl.atomic_add(tok_ptr + first, tl.zeros((1,), dtype=tl.int64) + n, sem="relaxed")
            _add_unit_stats(
                zs, hit, cols, lev < SUBL - 1, t * NNODE + heap, t * (NNODE + 1) + heap - NNODE,
                nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, lv_ptr, lf_ptr, las_ptr, laq_ptr, ACT, PLACE_OUT,
            )  # fmt: skip
            # tokens of the block with a non-finite z on their path: subtree levels here, top levels from z
            bad = tl.sum((hit & ~_finite(zs)).to(tl.int32), axis=1) > 0
            tcol_b = tl.arange(0, TOPW)
            ztop_b = tl.load(zrow[:, None] + tcol_b[None, :], mask=valid[:, None] & (tcol_b[None, :] < TOP), other=0.0)
            bad = valid & (bad | (tl.sum((~_finite(ztop_b)).to(tl.int32), axis=1) > 0))
            nbad = tl.sum(bad.to(tl.int64), axis=0)
            nbad1 = tl.zeros((1,), dtype=tl.int64) + nbad
            tl.atomic_add(bad_ptr + t + tl.arange(0, 1), nbad1, mask=nbad1 > 0, sem="relaxed")
        CDT = x_ptr.dtype.element_ty
        a = tl.where(hit, _unit_out(zs, ACT, PLACE_OUT), 0.0)
        a_hi = a.to(CDT)
        a_lo = (a - a_hi.to(tl.float32)).to(CDT)  # SPLIT_A: a = hi + lo keeps s = Σ z·u near fp32
        tcol = tl.arange(0, TOPW)  # the block's shared top path: column = level
        atop = _unit_out(tl.load(zrow[:, None] + tcol[None, :], mask=valid[:, None] & (tcol[None, :] < TOP), other=0.0),
                         ACT, PLACE_OUT)  # fmt: skip
        for o0 in tl.range(0, o_end, BO, num_stages=STAGES):
            oo = o0 + ro
            omask = oo < O
            uk = tl.load(u_t + heap[:, None] * O + oo[None, :], mask=cols[:, None] & omask[None, :], other=0.0).to(CDT)
            acc = tl.dot(a_hi, uk, input_precision=DOT_PREC)
            if SPLIT_A:
                acc += tl.dot(a_lo, uk, input_precision=DOT_PREC)
            for level in tl.static_range(TOP):  # rank-1 updates
                anc = ((root + 1) >> (TOP - level)) - 1
                al = tl.sum(tl.where(tcol[None, :] == level, atop, 0.0), axis=1)
                ul = tl.load(u_t + anc * O + oo, mask=omask, other=0.0).to(tl.float32)
                acc += al[:, None] * ul[None, :]
            m2 = valid[:, None] & omask[None, :]
            if Y_ATOMIC:  # several trees add into the same rows: an fp32 sum, finished on the host
                tl.atomic_add(s_ptr + rows[:, None] * O + oo[None, :], acc, mask=m2, sem="relaxed")
            else:
                if PLACE_OUT:
                    if SAVE_S:
                        tl.store(s_ptr + rows[:, None] * O + oo[None, :], acc, mask=m2)
                    acc = _act(acc, ACT)
                tl.store(y_ptr + rows[:, None] * O + oo[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _subtree_bwd_kernel(
        x_ptr, w_ptr, u_ptr, dy_ptr, leaf_ptr, z_ptr, perm_ptr, cnt_ptr, dx_ptr, dw_ptr, db_ptr, du_ptr,
        atop_ptr, dztop_ptr, n, D, O, T,
        DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        DX_ATOMIC: tl.constexpr, TOP: tl.constexpr, TOPW: tl.constexpr, NBP: tl.constexpr,
        SUBL: tl.constexpr, SUBW: tl.constexpr, DOT_PREC: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Gradients of one block of a subtree's tokens (routing fixed): dx = dZ·W per token; the
        subtree rows' du += Aᵀ·dy, dw += dZᵀ·x, db += Σ dz summed over the block, one atomic add per row.
        For the top rows, which every block shares, it writes each token's A and dZ (columns = top
        nodes) for dense products on the host instead of contended atomics."""
        pid = tl.program_id(0)
        t = tl.program_id(1)
        NNODE: tl.constexpr = (1 << DEPTH) - 1
        NUNIT: tl.constexpr = 2 * NNODE + 1
        PATH: tl.constexpr = DEPTH + 1
        CDT = x_ptr.dtype.element_ty
        rows, valid, root, busy = _block_tokens(pid, t, cnt_ptr, perm_ptr, n, TOP, NBP, BM)
        c, heap, lev, cols = _subtree_units(root, SUBL, SUBW)
        tcol = tl.arange(0, TOPW)  # top levels: column = level
        rk = tl.arange(0, BK)
        ro = tl.arange(0, BO)
        w_t = w_ptr + t * NUNIT * D
        u_t = u_ptr + t * NUNIT * O
        zrow = z_ptr + (rows * T + t) * PATH
        leaf = tl.load(leaf_ptr + rows * T + t, mask=valid, other=0)
        # the path inside the subtree as (tokens × units), with its z; the shared top path's z by level
        onpath = tl.zeros((BM, SUBW), dtype=tl.int1)
        zpath = tl.zeros((BM, SUBW), dtype=tl.float32)
        for level in tl.static_range(SUBL):
            local = _path_node(leaf, TOP + level, DEPTH) - root * (1 << level)
            sel = (c[None, :] == local[:, None]) & valid[:, None]
            onpath = onpath | sel
            zpath += tl.where(sel, tl.load(zrow + TOP + level, mask=valid, other=0.0)[:, None], 0.0)
        ztop = tl.load(zrow[:, None] + tcol[None, :], mask=valid[:, None] & (tcol[None, :] < TOP), other=0.0)
        apath = tl.where(onpath, _unit_out(zpath, ACT, PLACE_OUT), 0.0)
        atop = tl.where(valid[:, None], _unit_out(ztop, ACT, PLACE_OUT), 0.0)
        apath_c = apath.to(CDT)
        touched = cols & (tl.sum(onpath.to(tl.int32), axis=0) > 0)  # rows this block adds into
        g = tl.zeros((BM, SUBW), dtype=tl.float32)  # dL/d(unit output) = dy·u
        gtop = tl.zeros((BM, TOPW), dtype=tl.float32)
        for o0 in tl.range(0, tl.where(busy, O, 0), BO, num_stages=STAGES):
            oo = o0 + ro
            omask = oo < O
            dyk = tl.load(dy_ptr + rows[:, None] * O + oo[None, :], mask=valid[:, None] & omask[None, :], other=0.0)
            uk = tl.load(u_t + heap[:, None] * O + oo[None, :], mask=cols[:, None] & omask[None, :], other=0.0)
            g += tl.dot(dyk, tl.trans(uk.to(dyk.dtype)), input_precision=DOT_PREC)
            du_sub = tl.dot(tl.trans(apath_c), dyk.to(CDT), input_precision=DOT_PREC)  # (SUBW, BO)
            tl.atomic_add(du_ptr + (t * NUNIT + heap).to(tl.int64)[:, None] * O + oo[None, :], du_sub,
                          mask=touched[:, None] & omask[None, :], sem="relaxed")  # fmt: skip
            dyf = dyk.to(tl.float32)
            for level in tl.static_range(TOP):
                anc = ((root + 1) >> (TOP - level)) - 1
                ul = tl.load(u_t + anc * O + oo, mask=omask, other=0.0).to(tl.float32)
                gtop += tl.where(tcol[None, :] == level, tl.sum(dyf * ul[None, :], axis=1)[:, None], 0.0)
        dzs = tl.where(onpath, _unit_grad(g, zpath, ACT, PLACE_OUT), 0.0)
        dztop = tl.where(valid[:, None] & (tcol[None, :] < TOP), _unit_grad(gtop, ztop, ACT, PLACE_OUT), 0.0)
        if HAS_BIAS:
            tl.atomic_add(db_ptr + t * NUNIT + heap, tl.sum(dzs, axis=0), mask=touched, sem="relaxed")
        if TOP > 0:  # top rows: A and dZ by top node (column = heap index), zeros off the path
            a_nodes = tl.zeros((BM, TOPW), dtype=tl.float32)
            dz_nodes = tl.zeros((BM, TOPW), dtype=tl.float32)
            for level in tl.static_range(TOP):
                anc = ((root + 1) >> (TOP - level)) - 1
                here = tcol[None, :] == level
                a_nodes += tl.where(tcol[None, :] == anc, tl.sum(tl.where(here, atop, 0.0), axis=1)[:, None], 0.0)
                dz_nodes += tl.where(tcol[None, :] == anc, tl.sum(tl.where(here, dztop, 0.0), axis=1)[:, None], 0.0)
            top_rows = (t * n + rows)[:, None] * TOPW + tcol[None, :]
            tl.store(atop_ptr + top_rows, a_nodes.to(atop_ptr.dtype.element_ty), mask=valid[:, None])
            tl.store(dztop_ptr + top_rows, dz_nodes.to(dztop_ptr.dtype.element_ty), mask=valid[:, None])
        dzs_c = dzs.to(CDT)
        for k0 in tl.range(0, tl.where(busy, D, 0), BK, num_stages=STAGES):
            kk = k0 + rk
            kmask = kk < D
            wk = tl.load(w_t + heap[:, None] * D + kk[None, :], mask=cols[:, None] & kmask[None, :], other=0.0)
            xk = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(dzs_c, wk.to(CDT), input_precision=DOT_PREC)
            dw_sub = tl.dot(tl.trans(dzs_c), xk, input_precision=DOT_PREC)  # (SUBW, BK)
            tl.atomic_add(dw_ptr + (t * NUNIT + heap).to(tl.int64)[:, None] * D + kk[None, :], dw_sub,
                          mask=touched[:, None] & kmask[None, :], sem="relaxed")  # fmt: skip
            for level in tl.static_range(TOP):
                anc = ((root + 1) >> (TOP - level)) - 1
                wl = tl.load(w_t + anc * D + kk, mask=kmask, other=0.0).to(tl.float32)
                dzl = tl.sum(tl.where(tcol[None, :] == level, dztop, 0.0), axis=1)
                acc += dzl[:, None] * wl[None, :]
            m2 = valid[:, None] & kmask[None, :]
            if DX_ATOMIC:  # several trees add into the same rows of dx
                tl.atomic_add(dx_ptr + rows[:, None] * D + kk[None, :], acc, mask=m2, sem="relaxed")
            else:
                tl.store(dx_ptr + rows[:, None] * D + kk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m2)


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
) -> ForwardResult:
    """Forward of the neuron-per-node tree FFN (two launches; one where the tree is a single subtree).

    With `stats` (the layer's accumulators by DESIGN.md name) the batch's counts and sums are added
    into them inside the same launches. No host sync: the launches are CUDA-graph capturable.
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
    common = dict(DEPTH=depth, ACT=ACT_CODES.index(activation), PLACE_OUT=place_out, HAS_BIAS=b is not None,
                  RECORD=record, TOP=split.top, NBP=split.nbp, DOT_PREC=_dot_precision(x.dtype),
                  BM=cfg.block_m, BK=cfg.block_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps)  # fmt: skip
    bias = b if b is not None else w
    if split.top:
        _route_top_kernel[(triton.cdiv(n, cfg.block_m), trees)](
            x, w, bias, z, perm, counts, *st[:6], n, d_in, trees, TOPW=split.topw, **common,
        )  # fmt: skip
    _subtree_kernel[(_grid_blocks(n, split, cfg.block_m), trees)](
        x, w, bias, u, y, s if s is not None else y, leaf, z, perm, counts, *st, n, d_in, d_out, trees,
        SAVE_S=s is not None, Y_ATOMIC=y_atomic, SPLIT_A=place_out and x.dtype != torch.float32,
        TOPW=split.topw, SUBL=split.subl, SUBW=split.subw, BO=cfg.block_o, **common,
    )  # fmt: skip
    if y_atomic:
        y.copy_(_finish(s, activation) if place_out else s)
    return ForwardResult(y, leaf, z, s, grouping)


def _finish(s: Tensor, activation: str) -> Tensor:
    """act(s) for placement "output" when several trees summed into s on the device."""
    from routescope.kernels.tree_reference import ACTIVATIONS

    return ACTIVATIONS[activation](s)


def _output_grad(dy: Tensor, s: Tensor, activation: str) -> Tensor:
    """dL/ds = dy · act'(s) for placement "output" (one fused autograd call over s)."""
    from routescope.kernels.tree_reference import ACTIVATIONS

    with torch.enable_grad():
        s_ = s.detach().requires_grad_()
        (ds,) = torch.autograd.grad(ACTIVATIONS[activation](s_), s_, dy.float())
    return ds


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
    _subtree_bwd_kernel[(_grid_blocks(n, split, cfg.block_m), trees)](
        x, w, u, dy, leaf, z, grouping.perm, grouping.counts, dx, dw, db if db is not None else dx, du,
        atop, dztop, n, d_in, d_out, trees, DEPTH=depth, ACT=ACT_CODES.index(activation), PLACE_OUT=place_out,
        HAS_BIAS=has_bias, DX_ATOMIC=trees > 1, TOP=split.top, TOPW=split.topw, NBP=split.nbp, SUBL=split.subl,
        SUBW=split.subw, DOT_PREC=_dot_precision(x.dtype), BM=cfg.block_m, BK=cfg.block_k, BO=cfg.block_o,
        STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    if ntop:
        du[:, :ntop] = torch.matmul(atop.transpose(1, 2)[:, :ntop], dy)  # (T, ntop, d_out)
        dw[:, :ntop] = torch.matmul(dztop.transpose(1, 2)[:, :ntop], x)
        if db is not None:
            db[:, :ntop] = dztop[:, :, :ntop].float().sum(1)
    return dx.to(x.dtype), dw, db, du


class TreeFFNFunction(torch.autograd.Function):
    """Autograd wrapper: forward launches, then the backward ones with the routing held fixed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        u: Tensor,
        depth: int,
        activation: str,
        placement: str,
        stats: dict[str, Tensor] | None,
        config: KernelConfig | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        needs_grad = any(ctx.needs_input_grad[:4])
        y, leaf, z, s, grouping = tree_forward(
            x, w, b, u, depth, activation, placement, stats, save_preact=needs_grad, config=config
        )
        keep = s if placement == "output" else None  # s of several trees' "node" sums is not needed
        ctx.save_for_backward(x, w, u, leaf, z, keep, grouping.perm, grouping.counts)
        ctx.meta = (depth, activation, placement, b is not None, grouping.config, w.dtype, b.dtype if b is not None else None)
        ctx.fixed_config = config  # a config given by the caller holds for the backward too
        ctx.mark_non_differentiable(leaf, z)
        return y, leaf, z

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dleaf: Tensor, _dz: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, u, leaf, z, s, perm, counts = ctx.saved_tensors
        depth, activation, placement, has_bias, config, w_dtype, b_dtype = ctx.meta
        grouping = Grouping(perm, counts, config)
        dx, dw, db, du = tree_backward(dy, x, w, u, leaf, z, s, grouping, depth, activation, placement, has_bias,
                                       config=None if ctx.fixed_config is None else config)  # fmt: skip
        return (
            dx, dw.to(w_dtype), db.to(b_dtype) if db is not None else None, du.to(u.dtype),
            None, None, None, None, None,
        )  # fmt: skip


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable tree FFN on the Triton kernels: (y, leaf (n, T) int32, z (n, T, d+1) fp32)."""
    return TreeFFNFunction.apply(x, w, b, u, depth, activation, placement, stats, config)


def leaf_to_path(leaf: Tensor, depth: int) -> Tensor:
    """(n, T) leaf numbers -> (n, T, d+1) int64 heap indices of the path (root first), as the reference."""
    shifts = torch.arange(depth, -1, -1, device=leaf.device)  # d, d-1, ..., 0
    return ((leaf.long().unsqueeze(-1) + 2**depth) >> shifts) - 1
