"""Backward Triton kernel of the tree FFN: `subtree_bwd_kernel`.

The design is in the module doc of `tree_triton.py`, whose `tree_backward` launches it; imported
only where Triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tree_jit_helpers import block_tokens, path_node, subtree_units, unit_grad, unit_out


@triton.jit
def subtree_bwd_kernel(
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
    rows, valid, root, busy = block_tokens(pid, t, cnt_ptr, perm_ptr, n, TOP, NBP, BM)
    c, heap, lev, cols = subtree_units(root, SUBL, SUBW)
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
        local = path_node(leaf, TOP + level, DEPTH) - root * (1 << level)
        sel = (c[None, :] == local[:, None]) & valid[:, None]
        onpath = onpath | sel
        zpath += tl.where(sel, tl.load(zrow + TOP + level, mask=valid, other=0.0)[:, None], 0.0)
    ztop = tl.load(zrow[:, None] + tcol[None, :], mask=valid[:, None] & (tcol[None, :] < TOP), other=0.0)
    apath = tl.where(onpath, unit_out(zpath, ACT, PLACE_OUT), 0.0)
    atop = tl.where(valid[:, None], unit_out(ztop, ACT, PLACE_OUT), 0.0)
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
    dzs = tl.where(onpath, unit_grad(g, zpath, ACT, PLACE_OUT), 0.0)
    dztop = tl.where(valid[:, None] & (tcol[None, :] < TOP), unit_grad(gtop, ztop, ACT, PLACE_OUT), 0.0)
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
