"""Fused, instrumented Triton kernels for the neuron-per-node tree FFN: forward and backward.

The specification is `tree_reference.neuron_forward` (same math, same heap numbering). One program
handles a block of BM tokens for all T trees:

- the top `TOP` decision levels (few nodes, many tokens each) run as dense `tl.dot` against the
  contiguous rows 0 .. 2^TOP - 2 of each tree, so x is read once for all of them and their weights
  once per block; the deeper levels gather each token's own row (w[t, node] and u[t, node]);
- when `RECORD` is set, the forward adds the DESIGN.md per-node statistics of the batch straight into
  the layer's int64 / float64 accumulators: block-reduced (one atomic per node and block) for the top
  levels, one atomic per token below, where few tokens share a node: no second pass over anything;
- the routing leaves as a by-product: the leaf per token and tree (the path is implied by it) and the
  pre-activation z at each unit of the path, which the backward reuses with the routing held fixed.

The backward computes dx, dw, db and du: weight gradients of the top levels as dense block
reductions (`tl.dot` of the one-hot path matrix with dy or x), deeper ones as per-token atomics.
Float atomics make gradients and float sums non-deterministic in the last bits; counts are exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
# Statistic buffers the forward kernel adds into, in the order of its pointer arguments.
FORWARD_STATS = (
    "tokens", "node_visits", "node_right", "node_fires", "node_act_sum", "node_act_sqsum",
    "leaf_visits", "leaf_fires", "leaf_act_sum", "leaf_act_sqsum",
)  # fmt: skip


def available() -> bool:
    """True when Triton is importable (compiled on CUDA, or the CPU interpreter)."""
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch: BM tokens per program, BK/BO chunk of d_in/d_out, dense top levels."""

    block_m: int = 16
    block_k: int = 64
    block_o: int = 64
    dense_levels: int = 0  # decision levels computed as dense dots (capped by depth); 0 = all gathered
    num_warps: int = 4
    x_in_registers: bool = False  # hold the block's x rows across levels (needs block_m·d_in small)
    stat_width: int = 16  # levels of at most this many nodes add their statistics once per block


SMALL_BATCH = 2048  # tokens up to which a launch is latency-bound: whole rows per chunk


def default_config(n: int, d_in: int, d_out: int, depth: int, backward: bool = False) -> KernelConfig:
    """Tiles for the GPU (best of `benchmarks/tree_kernels.py --sweep` on an H100), small ones in the interpreter.

    Small batches are latency-bound (each level waits for the previous level's gather), so they take
    whole rows per chunk: one round trip per level instead of one per chunk.
    """
    if interpreting():
        return KernelConfig(block_m=16, block_k=16, block_o=16, dense_levels=2, num_warps=1)
    if n <= SMALL_BATCH:
        wide_k, wide_o = min(triton.next_power_of_2(d_in), 1024), min(triton.next_power_of_2(d_out), 512)
        if backward:
            return KernelConfig(block_m=16, block_k=min(wide_k, 512), block_o=wide_o, num_warps=8)
        return KernelConfig(block_m=16, block_k=wide_k, block_o=wide_o, num_warps=8, x_in_registers=d_in <= 1024)
    if backward:
        return KernelConfig(block_m=16, block_k=128, block_o=128) if d_in < 1536 else KernelConfig(block_m=16)
    if d_in < 1536:
        return KernelConfig(block_m=16, block_k=64, block_o=64)
    return KernelConfig(block_m=32, block_k=128, block_o=128, num_warps=8)


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
    def _tree_fwd_kernel(
        x_ptr, w_ptr, b_ptr, u_ptr, y_ptr, s_ptr, leaf_ptr, z_ptr,
        tok_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, lv_ptr, lf_ptr, las_ptr, laq_ptr,
        n, D, O, T,
        DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        RECORD: tl.constexpr, SAVE_S: tl.constexpr, TOP: tl.constexpr, TOPW: tl.constexpr,
        STATW: tl.constexpr, XREG: tl.constexpr, DP: tl.constexpr,
        DOT_PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
    ):  # fmt: skip
        """Route BM tokens through all T trees, then y = Σ act(z)·u (or act(Σ z·u)); see module doc."""
        pid = tl.program_id(0)
        rm = pid * BM + tl.arange(0, BM)
        valid = rm < n
        rows = rm.to(tl.int64)
        rk = tl.arange(0, BK)
        ro = tl.arange(0, BO)
        col = tl.arange(0, TOPW)  # heap node of each dense column (top levels)
        NNODE: tl.constexpr = (1 << DEPTH) - 1  # decision nodes per tree
        NUNIT: tl.constexpr = 2 * NNODE + 1  # neurons per tree
        NTOP: tl.constexpr = (1 << TOP) - 1  # nodes in the dense top levels
        PATH: tl.constexpr = DEPTH + 1
        scol = tl.arange(0, STATW)  # node within a narrow level (block-reduced statistics)
        if XREG:  # the block's rows of x stay in registers for every gathered level
            kd = tl.arange(0, DP)
            x_all = tl.load(x_ptr + rows[:, None] * D + kd[None, :], mask=valid[:, None] & (kd[None, :] < D), other=0.0)
        if RECORD:
            if pid == 0:
                first = tl.arange(0, 1)
                tl.atomic_add(tok_ptr + first, tl.zeros((1,), dtype=tl.int64) + n, sem="relaxed")
        # ---- phase 1: routing, per tree; z of every path unit goes to z_ptr (n, T, DEPTH+1) ----
        for t in range(T):
            w_t = w_ptr + t * NUNIT * D
            zrow = z_ptr + (rows * T + t) * PATH
            idx = tl.zeros((BM,), dtype=tl.int32)
            if TOP > 0:
                zz = tl.zeros((BM, TOPW), dtype=tl.float32)
                for k0 in range(0, D, BK):
                    kk = k0 + rk
                    xk = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=valid[:, None] & (kk[None, :] < D), other=0.0)
                    wk = tl.load(w_t + col[:, None] * D + kk[None, :], mask=(col[:, None] < NTOP) & (kk[None, :] < D), other=0.0)
                    zz += tl.dot(xk, tl.trans(wk.to(xk.dtype)), input_precision=DOT_PREC)
                if HAS_BIAS:
                    zz += tl.load(b_ptr + t * NUNIT + col, mask=col < NTOP, other=0.0).to(tl.float32)[None, :]
                onpath = tl.zeros((BM, TOPW), dtype=tl.int1)
                for level in tl.static_range(TOP):
                    sel = col[None, :] == idx[:, None]
                    z = tl.sum(tl.where(sel, zz, 0.0), axis=1)
                    tl.store(zrow + level, z, mask=valid)
                    onpath = onpath | sel
                    idx = 2 * idx + 1 + (z > 0.0).to(tl.int32)
                if RECORD:
                    hit = onpath & valid[:, None]
                    if PLACE_OUT:
                        fired = zz != 0.0
                    else:
                        fired = _act(zz, ACT) != 0.0
                    top_mask = col < NTOP
                    stat = t * NNODE + col
                    tl.atomic_add(nv_ptr + stat, tl.sum(hit.to(tl.int32), axis=0).to(tl.int64), mask=top_mask, sem="relaxed")
                    tl.atomic_add(nr_ptr + stat, tl.sum((hit & (zz > 0.0)).to(tl.int32), axis=0).to(tl.int64), mask=top_mask, sem="relaxed")
                    tl.atomic_add(nf_ptr + stat, tl.sum((hit & fired).to(tl.int32), axis=0).to(tl.int64), mask=top_mask, sem="relaxed")
                    zhit = tl.where(hit, zz, 0.0)
                    tl.atomic_add(nas_ptr + stat, tl.sum(zhit, axis=0).to(tl.float64), mask=top_mask, sem="relaxed")
                    tl.atomic_add(naq_ptr + stat, tl.sum(zhit * zhit, axis=0).to(tl.float64), mask=top_mask, sem="relaxed")
            for level in tl.static_range(TOP, DEPTH + 1):
                z = tl.zeros((BM,), dtype=tl.float32)
                wrow = w_t + idx.to(tl.int64) * D
                if XREG:
                    wk = tl.load(wrow[:, None] + kd[None, :], mask=valid[:, None] & (kd[None, :] < D), other=0.0)
                    z += tl.sum(x_all.to(tl.float32) * wk.to(tl.float32), axis=1)
                else:
                    for k0 in range(0, D, BK):
                        kk = k0 + rk
                        kmask = valid[:, None] & (kk[None, :] < D)
                        xk = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=kmask, other=0.0)
                        wk = tl.load(wrow[:, None] + kk[None, :], mask=kmask, other=0.0)
                        z += tl.sum(xk.to(tl.float32) * wk.to(tl.float32), axis=1)
                if HAS_BIAS:
                    z += tl.load(b_ptr + t * NUNIT + idx, mask=valid, other=0.0).to(tl.float32)
                tl.store(zrow + level, z, mask=valid)
                if RECORD:
                    if PLACE_OUT:
                        fired = (z != 0.0).to(tl.int64)
                    else:
                        fired = (_act(z, ACT) != 0.0).to(tl.int64)
                    one = tl.full((BM,), 1, dtype=tl.int64)
                    if (level < DEPTH) and ((1 << level) <= STATW):
                        # narrow level: many tokens per node, so sum over the block, one atomic per node
                        first = (1 << level) - 1
                        hit = (scol[None, :] == (idx - first)[:, None]) & valid[:, None]  # (BM, STATW)
                        stat = t * NNODE + first + scol
                        smask = scol < (1 << level)
                        zhit = tl.where(hit, z[:, None], 0.0)
                        tl.atomic_add(nv_ptr + stat, tl.sum(hit.to(tl.int32), axis=0).to(tl.int64), mask=smask, sem="relaxed")
                        tl.atomic_add(nr_ptr + stat, tl.sum((hit & (z > 0.0)[:, None]).to(tl.int32), axis=0).to(tl.int64), mask=smask, sem="relaxed")
                        tl.atomic_add(nf_ptr + stat, tl.sum(tl.where(hit, fired[:, None], 0), axis=0), mask=smask, sem="relaxed")
                        tl.atomic_add(nas_ptr + stat, tl.sum(zhit, axis=0).to(tl.float64), mask=smask, sem="relaxed")
                        tl.atomic_add(naq_ptr + stat, tl.sum(zhit * zhit, axis=0).to(tl.float64), mask=smask, sem="relaxed")
                    elif level < DEPTH:
                        stat = t * NNODE + idx
                        tl.atomic_add(nv_ptr + stat, one, mask=valid, sem="relaxed")
                        tl.atomic_add(nr_ptr + stat, (z > 0.0).to(tl.int64), mask=valid, sem="relaxed")
                        tl.atomic_add(nf_ptr + stat, fired, mask=valid, sem="relaxed")
                        tl.atomic_add(nas_ptr + stat, z.to(tl.float64), mask=valid, sem="relaxed")
                        tl.atomic_add(naq_ptr + stat, (z * z).to(tl.float64), mask=valid, sem="relaxed")
                    else:
                        stat = t * (NNODE + 1) + idx - NNODE
                        tl.atomic_add(lv_ptr + stat, one, mask=valid, sem="relaxed")
                        tl.atomic_add(lf_ptr + stat, fired, mask=valid, sem="relaxed")
                        tl.atomic_add(las_ptr + stat, z.to(tl.float64), mask=valid, sem="relaxed")
                        tl.atomic_add(laq_ptr + stat, (z * z).to(tl.float64), mask=valid, sem="relaxed")
                if level < DEPTH:
                    idx = 2 * idx + 1 + (z > 0.0).to(tl.int32)
            tl.store(leaf_ptr + rows * T + t, idx - NNODE, mask=valid)
        tl.debug_barrier()  # phase 2 reads z and leaf written by other threads of this program
        # ---- phase 2: output, per chunk of d_out ----
        for o0 in range(0, O, BO):
            oo = o0 + ro
            omask = oo < O
            acc = tl.zeros((BM, BO), dtype=tl.float32)
            for t in range(T):
                u_t = u_ptr + t * NUNIT * O
                zrow = z_ptr + (rows * T + t) * PATH
                leaf = tl.load(leaf_ptr + rows * T + t, mask=valid, other=0)
                if TOP > 0:
                    a_top = tl.zeros((BM, TOPW), dtype=tl.float32)
                    for level in tl.static_range(TOP):
                        z = tl.load(zrow + level, mask=valid, other=0.0)
                        a = _unit_out(z, ACT, PLACE_OUT)
                        node = _path_node(leaf, level, DEPTH)
                        a_top += tl.where((col[None, :] == node[:, None]) & valid[:, None], a[:, None], 0.0)
                    ut = tl.load(u_t + col[:, None] * O + oo[None, :], mask=(col[:, None] < NTOP) & omask[None, :], other=0.0)
                    acc += tl.dot(a_top.to(ut.dtype), ut, input_precision=DOT_PREC)
                for level in tl.static_range(TOP, DEPTH + 1):
                    z = tl.load(zrow + level, mask=valid, other=0.0)
                    a = _unit_out(z, ACT, PLACE_OUT)
                    node = _path_node(leaf, level, DEPTH).to(tl.int64)
                    uk = tl.load(u_t + node[:, None] * O + oo[None, :], mask=valid[:, None] & omask[None, :], other=0.0)
                    acc += a[:, None] * uk.to(tl.float32)
            if PLACE_OUT:
                if SAVE_S:
                    tl.store(s_ptr + rows[:, None] * O + oo[None, :], acc, mask=valid[:, None] & omask[None, :])
                acc = _act(acc, ACT)
            tl.store(y_ptr + rows[:, None] * O + oo[None, :], acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & omask[None, :])

    @triton.jit
    def _segments(leaf, prev_leaf, level: tl.constexpr, DEPTH: tl.constexpr, valid, BM: tl.constexpr):
        """Tokens sorted by leaf share a node at every level in runs: the node, each token's run
        number, the (run × token) one-hot matrix, each run's node and which runs exist."""
        node = _path_node(leaf, level, DEPTH)
        starts = ((node != _path_node(prev_leaf, level, DEPTH)) | (tl.arange(0, BM) == 0)) & valid
        run = tl.cumsum(starts.to(tl.int32), axis=0) - 1
        runs = tl.arange(0, BM)
        onehot = (runs[:, None] == run[None, :]) & valid[None, :]  # (run, token)
        run_node = tl.sum(tl.where(onehot & starts[None, :], node[None, :], 0), axis=1)
        return node, onehot, run_node, runs < tl.sum(starts.to(tl.int32), axis=0)

    @triton.jit
    def _tree_bwd_kernel(
        x_ptr, w_ptr, u_ptr, dy_ptr, s_ptr, sleaf_ptr, perm_ptr, z_ptr, dz_ptr,
        dx_ptr, dw_ptr, db_ptr, du_ptr,
        n, D, O, T,
        DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        DX_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
    ):  # fmt: skip
        """Gradients for one tree and BM tokens taken in leaf-sorted order (routing held fixed).

        Sorted by leaf, the tokens of a block form a few runs per level that share a node; each run's
        weight-gradient rows are summed in the block (one-hot `tl.dot`) before one atomic add per run.
        """
        pid = tl.program_id(0)
        t = tl.program_id(1)
        pos = pid * BM + tl.arange(0, BM)
        valid = pos < n
        leaf = tl.load(sleaf_ptr + t * n + pos, mask=valid, other=0)
        prev_leaf = tl.load(sleaf_ptr + t * n + pos - 1, mask=valid & (pos > 0), other=0)
        rows = tl.load(perm_ptr + t * n + pos, mask=valid, other=0).to(tl.int64)  # token of each sorted slot
        rk = tl.arange(0, BK)
        ro = tl.arange(0, BO)
        NNODE: tl.constexpr = (1 << DEPTH) - 1
        NUNIT: tl.constexpr = 2 * NNODE + 1
        PATH: tl.constexpr = DEPTH + 1
        u_t = u_ptr + t * NUNIT * O
        du_t = du_ptr + t * NUNIT * O
        zrow = z_ptr + (rows * T + t) * PATH
        dzrow = dz_ptr + (rows * T + t) * PATH
        # ---- phase A: g = dy·u per path unit -> dz; du += a·dy and db += dz, summed per run ----
        for level in tl.static_range(DEPTH + 1):
            node, onehot, run_node, has_run = _segments(leaf, prev_leaf, level, DEPTH, valid, BM)
            sel = onehot.to(tl.float32)
            z = tl.load(zrow + level, mask=valid, other=0.0)
            a = tl.where(valid, _unit_out(z, ACT, PLACE_OUT), 0.0)
            unit = node.to(tl.int64)
            g = tl.zeros((BM,), dtype=tl.float32)
            for o0 in range(0, O, BO):
                oo = o0 + ro
                m2 = valid[:, None] & (oo[None, :] < O)
                dyk = tl.load(dy_ptr + rows[:, None] * O + oo[None, :], mask=m2, other=0.0).to(tl.float32)
                if PLACE_OUT:
                    sk = tl.load(s_ptr + rows[:, None] * O + oo[None, :], mask=m2, other=0.0)
                    dyk = dyk * _dact(sk, ACT)
                uk = tl.load(u_t + unit[:, None] * O + oo[None, :], mask=m2, other=0.0).to(tl.float32)
                g += tl.sum(dyk * uk, axis=1)
                du_run = tl.dot(sel, a[:, None] * dyk, input_precision=DOT_PREC)  # (run, BO)
                tl.atomic_add(
                    du_t + run_node.to(tl.int64)[:, None] * O + oo[None, :], du_run,
                    mask=has_run[:, None] & (oo[None, :] < O), sem="relaxed",
                )  # fmt: skip
            dz = tl.where(valid, _unit_grad(g, z, ACT, PLACE_OUT), 0.0)
            tl.store(dzrow + level, dz, mask=valid)
            if HAS_BIAS:
                tl.atomic_add(db_ptr + t * NUNIT + run_node, tl.sum(sel * dz[None, :], axis=1), mask=has_run, sem="relaxed")
        tl.debug_barrier()  # phase B reads dz written by other threads of this program
        # ---- phase B: dx = Σ dz·w, dw += dz·x (summed per run), per chunk of d_in ----
        w_t = w_ptr + t * NUNIT * D
        dw_t = dw_ptr + t * NUNIT * D
        for k0 in range(0, D, BK):
            kk = k0 + rk
            m2 = valid[:, None] & (kk[None, :] < D)
            xk = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=m2, other=0.0).to(tl.float32)
            dxk = tl.zeros((BM, BK), dtype=tl.float32)
            for level in tl.static_range(DEPTH + 1):
                node, onehot, run_node, has_run = _segments(leaf, prev_leaf, level, DEPTH, valid, BM)
                dz = tl.load(dzrow + level, mask=valid, other=0.0)
                wk = tl.load(w_t + node.to(tl.int64)[:, None] * D + kk[None, :], mask=m2, other=0.0).to(tl.float32)
                dxk += dz[:, None] * wk
                dw_run = tl.dot(onehot.to(tl.float32), dz[:, None] * xk, input_precision=DOT_PREC)
                tl.atomic_add(
                    dw_t + run_node.to(tl.int64)[:, None] * D + kk[None, :], dw_run,
                    mask=has_run[:, None] & (kk[None, :] < D), sem="relaxed",
                )  # fmt: skip
            if DX_ATOMIC:  # several trees add into the same rows of dx
                tl.atomic_add(dx_ptr + rows[:, None] * D + kk[None, :], dxk, mask=m2, sem="relaxed")
            else:
                tl.store(dx_ptr + rows[:, None] * D + kk[None, :], dxk.to(dx_ptr.dtype.element_ty), mask=m2)


def _top_levels(depth: int, cfg: KernelConfig) -> tuple[int, int]:
    """(TOP, TOPW): dense decision levels and the padded width of their node block (≥ 16 for tl.dot)."""
    top = max(0, min(cfg.dense_levels, depth))
    return top, max(16, triton.next_power_of_2(2**top)) if top else 16


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
    if x.dim() != 2 or w.dim() != 3 or u.dim() != 3 or w.shape[1] != 2 ** (depth + 1) - 1:
        raise ValueError("expected x (n, d_in), w (T, 2^(d+1)-1, d_in), u (T, 2^(d+1)-1, d_out)")


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
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Forward of the neuron-per-node tree FFN in one kernel launch.

    Returns y (n, d_out) in x's dtype, leaf (n, T) int32, z (n, T, d+1) fp32 pre-activations along
    the path, and, for placement "output" with `save_preact`, s = Σ z·u (n, d_out) fp32 for the
    backward. With `stats` (the layer's accumulators by DESIGN.md name) the batch's counts and sums
    are added into them inside the same kernel.
    """
    _check(x, w, u, depth)
    cfg = config or default_config(x.shape[0], x.shape[1], u.shape[2], depth)
    x, w, u = x.contiguous(), w.contiguous(), u.contiguous()
    b = b.contiguous() if b is not None else None
    n, d_in = x.shape
    trees, _, d_out = u.shape
    top, topw = _top_levels(depth, cfg)
    y = torch.empty((n, d_out), device=x.device, dtype=x.dtype)
    leaf = torch.empty((n, trees), device=x.device, dtype=torch.int32)
    z = torch.empty((n, trees, depth + 1), device=x.device, dtype=torch.float32)
    place_out = placement == "output"
    s = torch.empty((n, d_out), device=x.device, dtype=torch.float32) if place_out and save_preact else None
    record = stats is not None
    stat_ptrs = [stats[name] for name in FORWARD_STATS] if record else [y] * len(FORWARD_STATS)
    if n == 0:
        return y, leaf, z, s
    grid = (triton.cdiv(n, cfg.block_m),)
    _tree_fwd_kernel[grid](
        x, w, b if b is not None else w, u, y, s if s is not None else y, leaf, z,
        *stat_ptrs,
        n, d_in, d_out, trees,
        DEPTH=depth, ACT=ACT_CODES.index(activation), PLACE_OUT=place_out, HAS_BIAS=b is not None,
        RECORD=record, SAVE_S=s is not None, TOP=top, TOPW=topw, STATW=cfg.stat_width,
        XREG=cfg.x_in_registers, DP=triton.next_power_of_2(d_in), DOT_PREC=_dot_precision(x.dtype),
        BM=cfg.block_m, BK=cfg.block_k, BO=cfg.block_o, num_warps=cfg.num_warps,
    )  # fmt: skip
    return y, leaf, z, s


def tree_backward(
    dy: Tensor,
    x: Tensor,
    w: Tensor,
    u: Tensor,
    leaf: Tensor,
    z: Tensor,
    s: Tensor | None,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    has_bias: bool = True,
    config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Gradients (dx, dw, db, du) for the routing recorded by `tree_forward` (held fixed).

    Tokens are sorted by leaf per tree first (one `torch.sort`), so that the kernel can sum the
    weight-gradient rows of tokens sharing a node before adding them atomically.
    """
    cfg = config or default_config(x.shape[0], x.shape[1], u.shape[2], depth, backward=True)
    n, d_in = x.shape
    trees, units, d_out = u.shape
    dy = dy.contiguous()
    dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32) if trees > 1 else torch.empty_like(x)
    dw = torch.zeros((trees, units, d_in), device=x.device, dtype=torch.float32)
    du = torch.zeros((trees, units, d_out), device=x.device, dtype=torch.float32)
    db = torch.zeros((trees, units), device=x.device, dtype=torch.float32) if has_bias else None
    if n == 0:
        return dx.to(x.dtype), dw, db, du
    sorted_leaf, perm = torch.sort(leaf.t().contiguous(), dim=1)  # (T, n) each
    dz = torch.empty_like(z)
    block_m = max(16, cfg.block_m)  # tl.dot needs 16 rows
    _tree_bwd_kernel[(triton.cdiv(n, block_m), trees)](
        x, w, u, dy, s if s is not None else dy, sorted_leaf, perm.to(torch.int32), z, dz,
        dx, dw, db if db is not None else dw, du,
        n, d_in, d_out, trees,
        DEPTH=depth, ACT=ACT_CODES.index(activation), PLACE_OUT=placement == "output",
        HAS_BIAS=has_bias, DX_ATOMIC=trees > 1, DOT_PREC=_dot_precision(x.dtype),
        BM=block_m, BK=cfg.block_k, BO=cfg.block_o, num_warps=cfg.num_warps,
    )  # fmt: skip
    return dx.to(x.dtype), dw, db, du


class TreeFFNFunction(torch.autograd.Function):
    """Autograd wrapper: forward kernel, then the backward kernel with the routing held fixed."""

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
        y, leaf, z, s = tree_forward(
            x, w, b, u, depth, activation, placement, stats, save_preact=needs_grad, config=config
        )
        ctx.save_for_backward(x, w, u, leaf, z, s)
        ctx.meta = (depth, activation, placement, b is not None, config, w.dtype, b.dtype if b is not None else None)
        ctx.mark_non_differentiable(leaf, z)
        return y, leaf, z

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dleaf: Tensor, _dz: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, u, leaf, z, s = ctx.saved_tensors
        depth, activation, placement, has_bias, config, w_dtype, b_dtype = ctx.meta
        dx, dw, db, du = tree_backward(dy, x, w, u, leaf, z, s, depth, activation, placement, has_bias, config)
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
