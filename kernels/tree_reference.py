"""Plain-PyTorch reference for the tree FFN: hard routing, outputs and per-node routing statistics.

This file is the specification every fast kernel must match (see the README, "Layer
families"). Tokens are routed down binary trees numbered in heap order (root 0, children of n are
2n+1 left and 2n+2 right); a token goes right where z_n = w_n·x + b_n > 0. Everything is vectorised
over tokens and trees; the only Python loop runs over the depth + 1 levels of a path.

Shapes: n tokens, T trees, depth d, N = 2^(d+1) - 1 neurons per tree (neuron-per-node form).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}

# Names of the per-tree statistics a routed tree layer accumulates (docs/file-format.md, group `tree`).
COUNT_STATS = ("node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires")
SUM_STATS = ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum")


class TreeRouting(NamedTuple):
    """What one forward pass decided, per token and tree; the by-product the recorder aggregates."""

    path: Tensor  # (n, T, d+1) int64 heap index of each unit on the path; [..., d] is the leaf
    z: Tensor  # (n, T, d+1) pre-activation at each unit on the path (leaf MLP: mean over its units)
    fired: Tensor  # (n, T, d+1) int64 output units on the path whose output was non-zero


def _gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """table (T, N, ...) and index (n, T) -> table[t, index[i, t]] of shape (n, T, ...)."""
    trees, units = table.shape[:2]
    offsets = torch.arange(trees, device=index.device) * units  # (T,)
    flat = table.reshape(trees * units, *table.shape[2:]).index_select(0, (index + offsets).reshape(-1))
    return flat.reshape(*index.shape, *table.shape[2:])  # index_select: its backward is one index_add


def neuron_forward(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    u: Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    path: Tensor | None = None,
    force: Tensor | None = None,
) -> tuple[Tensor, TreeRouting]:
    """Neuron-per-node tree FFN: y = Σ_trees Σ_path act(z)·u ("node") or act(Σ_trees Σ_path z·u) ("output").

    x (n, d_in), w (T, N, d_in), b (T, N) or None, u (T, N, d_out). If `path` (n, T, d+1) is given
    the routing is held fixed to it (used for gradient checks); otherwise it is decided here by the
    sign of z, except at nodes that `force` (T, 2^d − 1) int8 holds to one side (0 left, 1 right, −1 free:
    a pruned tree). Gradients reach x, w, b and u of visited neurons through z only, never the choice.
    """
    act = ACTIVATIONS[activation]
    n, trees = x.shape[0], w.shape[0]
    index = torch.zeros((n, trees), dtype=torch.long, device=x.device)  # (n, T) current unit: the root
    y: Tensor | None = None  # (n, d_out)
    indices, zs = [], []
    for level in range(depth + 1):
        if path is not None:
            index = path[:, :, level]
        # Elementwise products, not einsum: per-token dot products as bmm are slow on CPU.
        z = (x.unsqueeze(1) * _gather_rows(w, index)).sum(-1)  # (n, T)
        if b is not None:
            z = z + _gather_rows(b, index)
        contribution = act(z) if placement == "node" else z
        term = (contribution.unsqueeze(-1) * _gather_rows(u, index)).sum(1)  # (n, d_out)
        y = term if y is None else y + term
        indices.append(index)
        zs.append(z)
        if path is None and level < depth:
            right = z.detach() > 0
            if force is not None:
                held = _gather_rows(force, index)  # (n, T)
                right = torch.where(held >= 0, held == 1, right)
            index = 2 * index + 1 + right.long()
    if placement == "output":
        y = act(y)
    z_path = torch.stack(zs, dim=-1)  # (n, T, d+1)
    with torch.no_grad():
        # "fired": the neuron's own output was non-zero; with placement "output" a neuron
        # contributes z·u before the nonlinearity, so it fires where z != 0.
        fired = (act(z_path) if placement == "node" else z_path) != 0
    return y, TreeRouting(torch.stack(indices, dim=-1), z_path, fired.long())


def leaf_mlp_forward(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    leaf_w1: Tensor,
    leaf_b1: Tensor | None,
    leaf_w2: Tensor,
    leaf_b2: Tensor | None,
    depth: int,
    activation: str = "gelu",
    path: Tensor | None = None,
) -> tuple[Tensor, TreeRouting]:
    """Leaf-MLP tree FFN (Belcak's FFF): decision nodes only route; leaf j is act(x·W1_j + b1_j)·W2_j + b2_j.

    x (n, d_in), w (T, 2^d-1, d_in), b (T, 2^d-1), leaf_w1 (T, 2^d, d_in, k), leaf_b1 (T, 2^d, k),
    leaf_w2 (T, 2^d, k, d_out), leaf_b2 (T, 2^d, d_out); outputs of the T trees are summed.
    """
    act = ACTIVATIONS[activation]
    n, trees = x.shape[0], leaf_w1.shape[0]
    index = torch.zeros((n, trees), dtype=torch.long, device=x.device)
    indices, zs = [], []
    for level in range(depth):
        if path is not None:
            index = path[:, :, level]
        z = (x.unsqueeze(1) * _gather_rows(w, index)).sum(-1)  # (n, T)
        if b is not None:
            z = z + _gather_rows(b, index)
        indices.append(index)
        zs.append(z)
        index = 2 * index + 1 + (z.detach() > 0).long()
    if path is not None:
        index = path[:, :, depth]
    leaf = index - (2**depth - 1)  # (n, T) leaf number j
    hidden_pre = torch.einsum("nd,ntdk->ntk", x, _gather_rows(leaf_w1, leaf))  # (n, T, k)
    if leaf_b1 is not None:
        hidden_pre = hidden_pre + _gather_rows(leaf_b1, leaf)
    hidden = act(hidden_pre)
    out = torch.einsum("ntk,ntko->nto", hidden, _gather_rows(leaf_w2, leaf))  # (n, T, d_out)
    if leaf_b2 is not None:
        out = out + _gather_rows(leaf_b2, leaf)
    y = out.sum(dim=1)
    indices.append(index)
    zs.append(hidden_pre.mean(dim=-1))
    with torch.no_grad():
        fired = torch.zeros((n, trees, depth + 1), dtype=torch.long, device=x.device)
        fired[:, :, depth] = (hidden != 0).sum(dim=-1)  # decision nodes are not output units
    return y, TreeRouting(torch.stack(indices, dim=-1), torch.stack(zs, dim=-1), fired)


def new_tree_stats(trees: int, depth: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zeroed accumulators for one layer: counts int64, sums float64 (exact over long intervals)."""
    nodes, leaves = 2**depth - 1, 2**depth
    stats = {"tokens": torch.zeros((), dtype=torch.int64, device=device)}
    for name in COUNT_STATS + SUM_STATS:
        width = nodes if name.startswith("node_") else leaves
        dtype = torch.int64 if name in COUNT_STATS else torch.float64
        stats[name] = torch.zeros((trees, width), dtype=dtype, device=device)
    stats["nonfinite_tokens"] = torch.zeros(trees, dtype=torch.int64, device=device)
    return stats


@torch.no_grad()
def accumulate_tree_stats(stats: Mapping[str, Tensor], routing: TreeRouting, depth: int) -> None:
    """Add one batch's routing to the accumulators in place (no host sync; compile-friendly).

    Non-finite z (NaN/inf) is left out of the sums and counted per tree in `nonfinite_tokens` (tokens
    with any non-finite z on their path); the counts still count the token where it was routed.
    """
    path, z, fired = routing.path, routing.z.detach().to(torch.float64), routing.fired
    finite = torch.isfinite(z)  # (n, T, d+1)
    stats["nonfinite_tokens"].add_((~finite).any(-1).sum(0))
    z = torch.where(finite, z, 0.0)
    n, trees = path.shape[:2]
    nodes = 2**depth - 1
    tree = torch.arange(trees, device=path.device).view(1, trees, 1)  # (1, T, 1)
    if depth > 0:
        node_index = (tree * nodes + path[:, :, :depth]).reshape(-1)  # (n*T*d,)
        went_right = path[:, :, 1:] == 2 * path[:, :, :-1] + 2  # (n, T, d)
        node_z = z[:, :, :depth].reshape(-1)
        stats["node_visits"].view(-1).index_add_(0, node_index, torch.ones_like(node_index))
        stats["node_right"].view(-1).index_add_(0, node_index, went_right.reshape(-1).long())
        stats["node_fires"].view(-1).index_add_(0, node_index, fired[:, :, :depth].reshape(-1))
        stats["node_act_sum"].view(-1).index_add_(0, node_index, node_z)
        stats["node_act_sqsum"].view(-1).index_add_(0, node_index, node_z * node_z)
    leaf_index = (tree[..., 0] * (nodes + 1) + path[:, :, depth] - nodes).reshape(-1)  # (n*T,)
    leaf_z = z[:, :, depth].reshape(-1)
    stats["leaf_visits"].view(-1).index_add_(0, leaf_index, torch.ones_like(leaf_index))
    stats["leaf_fires"].view(-1).index_add_(0, leaf_index, fired[:, :, depth].reshape(-1))
    stats["leaf_act_sum"].view(-1).index_add_(0, leaf_index, leaf_z)
    stats["leaf_act_sqsum"].view(-1).index_add_(0, leaf_index, leaf_z * leaf_z)
    stats["tokens"].add_(n)
