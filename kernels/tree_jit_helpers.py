"""Triton @jit helpers shared by the tree FFN's forward and backward kernels.

Activations and their derivatives in fp32 (codes: `tree_triton.ACT_CODES`), and the layout of a
launch: heap indices on a token's path, the units of a subtree block, a program's block of tokens.
The design is in the module doc of `tree_triton.py`; imported only where Triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def jit_tanh(z):
    """tanh via exp of −2|z| (no overflow; tl has no tanh on every supported version)."""
    e = tl.exp(-2.0 * tl.abs(z))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0.0, th, -th)

@triton.jit
def jit_act(z, ACT: tl.constexpr):
    """act(z) in fp32 for the activation code ACT (see ACT_CODES)."""
    if ACT == 0:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        out = 0.5 * z * (1.0 + jit_tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 2:
        out = tl.maximum(z, 0.0)
    elif ACT == 3:
        out = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        out = jit_tanh(z)
    elif ACT == 5:
        out = 1.0 / (1.0 + tl.exp(-z))
    else:
        out = z
    return out

@triton.jit
def jit_dact(z, ACT: tl.constexpr):
    """act'(z) in fp32 (relu'(0) = 0, as torch)."""
    if ACT == 0:
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        th = jit_tanh(inner)
        out = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 2:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 3:
        sg = 1.0 / (1.0 + tl.exp(-z))
        out = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 4:
        th = jit_tanh(z)
        out = 1.0 - th * th
    elif ACT == 5:
        sg = 1.0 / (1.0 + tl.exp(-z))
        out = sg * (1.0 - sg)
    else:
        out = z * 0.0 + 1.0
    return out

@triton.jit
def unit_out(z, ACT: tl.constexpr, PLACE_OUT: tl.constexpr):
    """A unit's contribution before the output sum: act(z) (placement "node") or z ("output")."""
    if PLACE_OUT:
        out = z
    else:
        out = jit_act(z, ACT)
    return out

@triton.jit
def unit_grad(g, z, ACT: tl.constexpr, PLACE_OUT: tl.constexpr):
    """dL/dz of a unit from g = dL/d(contribution): g·act'(z) ("node") or g ("output")."""
    if PLACE_OUT:
        out = g
    else:
        out = g * jit_dact(z, ACT)
    return out

@triton.jit
def path_node(leaf, level: tl.constexpr, DEPTH: tl.constexpr):
    """Heap index of the level-`level` unit on the path to `leaf` (leaf numbered 0 .. 2^DEPTH-1)."""
    return ((leaf + (1 << DEPTH)) >> (DEPTH - level)) - 1

@triton.jit
def subtree_units(root, SUBL: tl.constexpr, SUBW: tl.constexpr):
    """Columns of a subtree block: local heap index c, its global heap index, relative level, validity."""
    c = tl.arange(0, SUBW)
    lev = tl.zeros((SUBW,), dtype=tl.int32)
    for k in tl.static_range(1, SUBL):
        lev += (c + 1 >= (1 << k)).to(tl.int32)
    width = tl.full((SUBW,), 1, dtype=tl.int32) << lev  # nodes at that level of the subtree
    heap = (root + 1) * width - 1 + (c - (width - 1))
    return c, heap, lev, c < (1 << SUBL) - 1

@triton.jit
def block_tokens(pid, t, cnt_ptr, perm_ptr, n, TOP: tl.constexpr, NBP: tl.constexpr, BM: tl.constexpr):
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
