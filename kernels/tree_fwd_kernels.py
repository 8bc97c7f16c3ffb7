"""Forward Triton kernels of the tree FFN: `route_top_kernel`, `subtree_kernel`, and their stats helpers.

The design is in the module doc of `tree_triton.py`, whose `tree_forward` launches these; imported
only where Triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tree_jit_helpers import block_tokens, jit_act, subtree_units, unit_out


@triton.jit
def is_finite(z):
    """True where z is neither NaN nor ±inf."""
    return (z == z) & (tl.abs(z) <= 3.4028234663852886e38)  # NaN != NaN; |inf| > the largest float32

@triton.jit
def add_unit_stats(
    zs, hit, right_dec, cols, is_node, stat_node, stat_leaf, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr,
    lv_ptr, lf_ptr, las_ptr, laq_ptr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr,
):  # fmt: skip
    """Per-unit counts and sums over a block (hit: tokens × units on the path; right_dec: where each unit sends
    each token right), one atomic each; the sums leave out non-finite z (NaN, inf), the counts do not."""
    if PLACE_OUT:
        fired = zs != 0.0
    else:
        fired = jit_act(zs, ACT) != 0.0
    visits = tl.sum(hit.to(tl.int32), axis=0)
    right = tl.sum((hit & right_dec).to(tl.int32), axis=0).to(tl.int64)
    fires = tl.sum((hit & fired).to(tl.int32), axis=0).to(tl.int64)
    zhit = tl.where(hit & is_finite(zs), zs, 0.0)
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
def decisions(zs, force_ptr, heap, is_node, HAS_FORCE: tl.constexpr):
    """Where each unit sends each token right: z > 0, or the unit's forced side (force 0 left, 1 right, -1 free;
    a pruned tree's node whose other child subtree was removed)."""
    if HAS_FORCE:
        f = tl.load(force_ptr + heap, mask=is_node, other=-1)
        return tl.where(f[None, :] >= 0, f[None, :] == 1, zs > 0.0)
    else:
        return zs > 0.0


@triton.jit
def route_top_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, perm_ptr, cnt_ptr,
    tok_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, force_ptr,
    n, D, T,
    DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RECORD: tl.constexpr, HAS_FORCE: tl.constexpr, TOP: tl.constexpr, TOPW: tl.constexpr, NBP: tl.constexpr,
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
    dec = decisions(zz, force_ptr + t * NNODE, col, col < NTOP, HAS_FORCE)
    idx = tl.zeros((BM,), dtype=tl.int32)
    onpath = tl.zeros((BM, TOPW), dtype=tl.int1)
    for level in tl.static_range(TOP):
        sel = col[None, :] == idx[:, None]
        z = tl.sum(tl.where(sel, zz, 0.0), axis=1)
        tl.store(zrow + level, z, mask=valid)
        onpath = onpath | sel
        if HAS_FORCE:
            idx = 2 * idx + 1 + tl.sum(tl.where(sel, dec.to(tl.int32), 0), axis=1)
        else:
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
        add_unit_stats(
            zz, onpath & valid[:, None], dec, col < NTOP, col >= 0, stat, stat,
            nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, ACT, PLACE_OUT,
        )  # fmt: skip

@triton.jit
def subtree_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, y_ptr, s_ptr, leaf_ptr, z_ptr, perm_ptr, cnt_ptr,
    tok_ptr, nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, lv_ptr, lf_ptr, las_ptr, laq_ptr, bad_ptr, force_ptr,
    n, D, O, T,
    DEPTH: tl.constexpr, ACT: tl.constexpr, PLACE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RECORD: tl.constexpr, HAS_FORCE: tl.constexpr, SAVE_S: tl.constexpr, Y_ATOMIC: tl.constexpr, SPLIT_A: tl.constexpr,
    TOP: tl.constexpr, TOPW: tl.constexpr, NBP: tl.constexpr, SUBL: tl.constexpr, SUBW: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Route one block of a subtree's tokens through it and write y (see the module doc of tree_triton.py)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    NNODE: tl.constexpr = (1 << DEPTH) - 1
    NUNIT: tl.constexpr = 2 * NNODE + 1
    PATH: tl.constexpr = DEPTH + 1
    rows, valid, root, busy = block_tokens(pid, t, cnt_ptr, perm_ptr, n, TOP, NBP, BM)
    c, heap, lev, cols = subtree_units(root, SUBL, SUBW)
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
    dec = decisions(zs, force_ptr + t * NNODE, heap, cols & (lev < SUBL - 1), HAS_FORCE)
    loc = tl.zeros((BM,), dtype=tl.int32)
    onpath = tl.zeros((BM, SUBW), dtype=tl.int1)
    for level in tl.static_range(SUBL):
        sel = c[None, :] == loc[:, None]
        z = tl.sum(tl.where(sel, zs, 0.0), axis=1)
        tl.store(zrow + TOP + level, z, mask=valid)
        onpath = onpath | sel
        if level < SUBL - 1:
            if HAS_FORCE:
                loc = 2 * loc + 1 + tl.sum(tl.where(sel, dec.to(tl.int32), 0), axis=1)
            else:
                loc = 2 * loc + 1 + (z > 0.0).to(tl.int32)
    leaf_heap = tl.sum(tl.where(c[None, :] == loc[:, None], heap[None, :], 0), axis=1)
    tl.store(leaf_ptr + rows * T + t, leaf_heap - NNODE, mask=valid)
    hit = onpath & valid[:, None]
    if RECORD:
        if TOP == 0:
            if (pid == 0) & (t == 0):
                first = tl.arange(0, 1)
                tl.atomic_add(tok_ptr + first, tl.zeros((1,), dtype=tl.int64) + n, sem="relaxed")
        add_unit_stats(
            zs, hit, dec, cols, lev < SUBL - 1, t * NNODE + heap, t * (NNODE + 1) + heap - NNODE,
            nv_ptr, nr_ptr, nf_ptr, nas_ptr, naq_ptr, lv_ptr, lf_ptr, las_ptr, laq_ptr, ACT, PLACE_OUT,
        )  # fmt: skip
        # tokens of the block with a non-finite z on their path: subtree levels here, top levels from z
        bad = tl.sum((hit & ~is_finite(zs)).to(tl.int32), axis=1) > 0
        tcol_b = tl.arange(0, TOPW)
        ztop_b = tl.load(zrow[:, None] + tcol_b[None, :], mask=valid[:, None] & (tcol_b[None, :] < TOP), other=0.0)
        bad = valid & (bad | (tl.sum((~is_finite(ztop_b)).to(tl.int32), axis=1) > 0))
        nbad = tl.sum(bad.to(tl.int64), axis=0)
        nbad1 = tl.zeros((1,), dtype=tl.int64) + nbad
        tl.atomic_add(bad_ptr + t + tl.arange(0, 1), nbad1, mask=nbad1 > 0, sem="relaxed")
    CDT = x_ptr.dtype.element_ty
    a = tl.where(hit, unit_out(zs, ACT, PLACE_OUT), 0.0)
    a_hi = a.to(CDT)
    a_lo = (a - a_hi.to(tl.float32)).to(CDT)  # SPLIT_A: a = hi + lo keeps s = Σ z·u near fp32
    tcol = tl.arange(0, TOPW)  # the block's shared top path: column = level
    atop = unit_out(tl.load(zrow[:, None] + tcol[None, :], mask=valid[:, None] & (tcol[None, :] < TOP), other=0.0),
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
                acc = jit_act(acc, ACT)
            tl.store(y_ptr + rows[:, None] * O + oo[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)
