"""Pruning by construction (issue 21): a tree whose right subtree under node 2 is dead, an L1 layer with dead
units, an MoE layer with a dead expert. Tokens that never reached a removed unit keep their path and their
output; exactly the tokens that did are rerouted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routescope.analysis.calibrated import DEAD, LIVE
from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN
from routescope.layers.pruned_tree import PrunedTreeFFN
from routescope.pruning.cut import cut_l1, cut_moe, cut_tree
from routescope.pruning.plan import removed_roots, tree_cut


def states_with_dead(trees: int, depth: int, dead: dict[int, list[int]]) -> np.ndarray:
    states = np.full((trees, 2 ** (depth + 1) - 1), LIVE, dtype=np.int8)
    for tree, units in dead.items():
        states[tree, units] = DEAD
    return states


def test_tree_cut_removes_subtrees_and_holds_the_parent() -> None:
    keep, held = tree_cut(states_with_dead(2, 3, {0: [6]}))  # node 6 = right child of node 2; its leaves 13, 14
    assert sorted(np.flatnonzero(~keep[0])) == [6, 13, 14] and keep[1].all()
    assert held[0].tolist() == [-1, -1, 0, -1, -1, -1, -1] and (held[1] == -1).all()
    assert removed_roots(keep)[0].nonzero()[0].tolist() == [6]
    # only node 6 marked dead, not its leaves: the subtree still goes; both children of node 2 dead: node 2 goes
    keep, held = tree_cut(states_with_dead(1, 3, {0: [5, 6]}))
    assert sorted(np.flatnonzero(~keep[0])) == [2, 5, 6, 11, 12, 13, 14] and held[0, 0] == 0
    # a dead root is ignored (the root sees every token)
    keep, _ = tree_cut(states_with_dead(1, 2, {0: [0]}))
    assert keep.all()


@pytest.mark.parametrize("backend,trees", [("torch", 2), ("triton", 1), ("triton", 3)])
def test_pruned_tree_reroutes_exactly_the_tokens_that_reached_the_dead_subtree(seed: int, backend: str, trees: int) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    layer = TreeFFN(12, 7, depth=3, trees=trees, backend=backend)
    with torch.no_grad():
        layer.b.normal_(0, 0.5)
        layer.b[0, [0, 2]] = 0.0  # unbiased root and node 2 in tree 0: about a quarter of the tokens reach node 6
    keep, held = tree_cut(states_with_dead(trees, 3, {0: [6]}))
    pruned = cut_tree(layer, keep, held)
    assert isinstance(pruned, PrunedTreeFFN) and pruned.live_units == trees * 15 - 3
    x = torch.randn(400, 12)
    for module in (layer, pruned):
        module.recording = True
    with torch.no_grad():
        y0, y1 = layer(x), pruned(x)
        path0 = layer.route_and_compute(x)[1].path
        path1 = pruned.route_and_compute(x)[1].path
    reached = (path0[:, 0, :] == 6).any(-1)
    assert reached.any() and (~reached).any(), f"seed {seed}: the draw must route both ways"
    assert torch.equal(path1[~reached], path0[~reached]) and torch.equal(y1[~reached], y0[~reached]), f"seed {seed}"
    assert (path1[reached, 0, 2] == 5).all() and torch.equal(path1[reached, 1:], path0[reached, 1:]), f"seed {seed}"
    assert not (path1[:, 0, :, None] == torch.tensor([6, 13, 14])).any()
    # recorded with the full layout: removed units are never visited, node 2 sends everything left
    visits = pruned.node_visits[0]
    assert visits[6] == 0 and pruned.leaf_visits[0, [6, 7]].sum() == 0 and pruned.node_right[0, 2] == 0
    assert int(pruned.node_visits[0, 5]) == int(layer.node_visits[0, 5]) + int(reached.sum())


def test_pruned_tree_trains_and_round_trips(seed: int) -> None:
    layer = TreeFFN(6, 4, depth=2, trees=2)
    keep, held = tree_cut(states_with_dead(2, 2, {1: [4]}))
    pruned = cut_tree(layer, keep, held)
    pruned(torch.randn(50, 6)).square().sum().backward()
    assert pruned.w_live.grad is not None and pruned.w_live.grad.shape == (13, 6)
    again = PrunedTreeFFN(layer.spec, torch.from_numpy(keep), torch.from_numpy(held))
    again.load_state_dict(pruned.state_dict())
    x = torch.randn(30, 6)
    assert torch.equal(again(x), pruned(x))
    # cutting a pruned layer again keeps both cuts
    keep2, held2 = tree_cut(states_with_dead(2, 2, {0: [3]}))
    twice = cut_tree(pruned, keep2, held2)
    assert twice.live_units == 14 - 2 and not twice.live_mask()[1, 4] and not twice.live_mask()[0, 3]


def test_l1_cut_changes_only_tokens_that_fired_a_removed_unit(seed: int) -> None:
    layer = L1SparseFFN(8, 16, 5)
    with torch.no_grad():
        layer.gate.weight[3] = 0.0  # dead by construction: relu(0) never fires
    keep = np.ones(16, dtype=bool)
    keep[[3, 9]] = False  # 9 is alive: tokens that fire it must change
    cut = cut_l1(layer, keep)
    x = torch.randn(300, 8)
    with torch.no_grad():
        y0, y1 = layer(x), cut(x)
        fired9 = layer.hidden(x)[0][:, 9] != 0
    assert cut.spec.d_hidden == 14 and fired9.any() and (~fired9).any()
    torch.testing.assert_close(y1[~fired9], y0[~fired9], rtol=1e-6, atol=1e-6)  # BLAS may reorder the sum
    assert ((y1[fired9] - y0[fired9]).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_cut_keeps_the_choices_of_tokens_that_never_chose_the_expert(seed: int, renormalize: bool) -> None:
    layer = TopKMoE(8, 5, experts=4, k=2, renormalize=renormalize)
    keep = np.array([True, True, True, False])
    cut = cut_moe(layer, keep)
    x = torch.randn(300, 8)
    with torch.no_grad():
        probs, chosen, _, _ = layer.route(x)
        _, chosen_cut, _, _ = cut.route(x)
        y0, y1 = layer(x), cut(x)
    never = ~(chosen == 3).any(-1)
    assert never.any() and (~never).any()
    assert torch.equal(chosen_cut[never].sort(-1).values, chosen[never].sort(-1).values)
    if renormalize:  # weights p_i / Σ_top-k p: the dropped expert's mass cancels
        torch.testing.assert_close(y1[never], y0[never], rtol=1e-5, atol=1e-6)
    else:  # raw softmax weights grow by 1 / (1 − p_3) for every token
        scale = 1 / (1 - probs[never, 3:4])
        torch.testing.assert_close(y1[never], y0[never] * scale, rtol=1e-5, atol=1e-6)
    assert cut.router.weight.shape == (3, 8) and cut.w1.shape[0] == 3


def test_inference_reuses_the_expanded_heap_until_a_weight_changes(seed: int) -> None:
    layer = TreeFFN(6, 4, depth=2, trees=2)
    pruned = cut_tree(layer, *tree_cut(states_with_dead(2, 2, {1: [4]})))
    x = torch.randn(40, 6)
    with torch.no_grad():
        first, again = pruned.heap_weights(), pruned.heap_weights()
        assert all(a is b for a, b in zip(first, again))  # no new expansion per call
        y0 = pruned(x)
        pruned.u_live.mul_(2.0)  # an in-place update (as an optimizer step makes) bumps the version
        changed = pruned.heap_weights()
        assert changed[2] is not first[2] and torch.equal(changed[2], 2 * first[2])
        assert torch.allclose(pruned(x), 2 * y0)
    # under autograd the expansion is rebuilt each call and carries the gradient to the stored rows
    w, _, _ = pruned.heap_weights()
    assert w.requires_grad and w is not changed[0]
    pruned(x).sum().backward()
    assert pruned.u_live.grad is not None and pruned.u_live.grad.abs().sum() > 0
    # a state_dict load (in-place copy) is seen too
    other = cut_tree(TreeFFN(6, 4, depth=2, trees=2), *tree_cut(states_with_dead(2, 2, {1: [4]})))
    with torch.no_grad():
        before = pruned(x)
        pruned.load_state_dict(other.state_dict())
        assert torch.equal(pruned(x), other(x)) and not torch.equal(pruned(x), before)
