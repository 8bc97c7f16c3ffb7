"""Calibrated unit states (metrics version 2, groundwork for the report): a zero count is evidence only
when enough tokens could have arrived, so states come from one-sided Clopper–Pearson bounds.

In a window, a unit (decision node or leaf) at level ℓ (root 0, leaves d) of a tree that N tokens
entered got V of them; its balanced share is s = 2^-ℓ. With U, L the one-sided (1 − α) upper and
lower bounds of the reach V/N: **dead** when U < δ·s, **live** when L > δ·s, else **undetermined**.
A live decision node whose minority child got m = min(R, V − R) of its V tokens is **frozen** when
U(m, V) < ε, starving the child that gets the minority. Numpy on any leading shape (..., T, units).
Not yet wired into `report` (report_version 1 keeps the plain counts).
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaincinv

from routescope.analysis.stats import binary_entropy, right_share

DELTA = 0.05  # starvation level: a unit is dead when it provably gets under 5% of its balanced share
ALPHA = 0.05  # one-sided error of each bound
EPSILON = 0.01  # frozen: the minority child provably gets under 1% of the node's tokens
DEAD, UNDETERMINED, LIVE = 0, 1, 2


def upper_bound(successes: np.ndarray, trials: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound of a proportion: BetaInv(1 − α; V + 1, N − V), 1 where V = N
    (NaN where N = 0: nothing can be said)."""
    v, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        bound = betaincinv(v + 1, np.maximum(n - v, 1e-300), 1 - alpha)
    return np.where(n <= 0, np.nan, np.where(v >= n, 1.0, bound))


def lower_bound(successes: np.ndarray, trials: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound of a proportion: BetaInv(α; V, N − V + 1), 0 where V = 0."""
    v, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        bound = betaincinv(np.maximum(v, 1e-300), n - v + 1, alpha)
    return np.where(n <= 0, np.nan, np.where(v <= 0, 0.0, bound))


def heap_levels(units: int) -> np.ndarray:
    """The level of each unit in heap order (root 0; a tree's leaves follow its decision nodes)."""
    return np.floor(np.log2(np.arange(units) + 1)).astype(np.int64)


def unit_states(visits: np.ndarray, tokens: np.ndarray, levels: np.ndarray, delta: float = DELTA,
                alpha: float = ALPHA) -> np.ndarray:  # fmt: skip
    """DEAD / UNDETERMINED / LIVE per unit: visits (..., units), tokens (...) into the tree, levels (units,)."""
    n = np.asarray(tokens, dtype=np.float64)[..., None]
    threshold = delta * np.exp2(-np.asarray(levels, dtype=np.float64))
    dead = upper_bound(visits, n, alpha) < threshold
    live = lower_bound(visits, n, alpha) > threshold
    return np.where(dead, DEAD, np.where(live, LIVE, UNDETERMINED))


def frozen_side(visits: np.ndarray, right: np.ndarray, live: np.ndarray, epsilon: float = EPSILON,
                alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(frozen, starves_right) per decision node: live, with U(min(R, V − R), V) < ε; the starved child is
    the right one when R < V − R."""
    visits, right = np.asarray(visits, dtype=np.float64), np.asarray(right, dtype=np.float64)
    minority = np.minimum(right, visits - right)
    with np.errstate(invalid="ignore"):
        frozen = live & (upper_bound(minority, visits, alpha) < epsilon)
    return frozen, frozen & (right < visits - right)


def calibrated_tree_numpy(node_visits: np.ndarray, node_right: np.ndarray, leaf_visits: np.ndarray, tokens: np.ndarray,
                          variant: str = "neuron", delta: float = DELTA, alpha: float = ALPHA,
                          epsilon: float = EPSILON) -> dict[str, np.ndarray]:  # fmt: skip
    """The version-2 tree metrics of window-summed counts: node_* (..., T, 2^d − 1), leaf_visits (..., T, 2^d),
    tokens (...). Returns arrays (..., T)."""
    nodes, leaves = node_visits.shape[-1], leaf_visits.shape[-1]
    units = np.concatenate([node_visits, leaf_visits], axis=-1)  # heap order: leaf j is unit 2^d − 1 + j
    states = unit_states(units, tokens, heap_levels(nodes + leaves), delta, alpha)
    node_states = states[..., :nodes]
    live_nodes = node_states == LIVE
    frozen, starves_right = frozen_side(node_visits, node_right, live_nodes, epsilon, alpha)
    parents = (np.arange(1, nodes + leaves) - 1) // 2
    dead = states == DEAD
    pruned_roots = (dead[..., 1:] & (states[..., parents] == LIVE)).sum(-1)
    counted = dead[..., nodes:] if variant == "leaf_mlp" else dead  # leaf MLPs: only the leaves are units
    p = right_share(node_visits, node_right)
    weight = np.where(live_nodes, node_visits, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = np.where(live_nodes, binary_entropy(p), 0.0).sum(-1) / live_nodes.sum(-1)
        return {
            "dead_fraction": (node_states == DEAD).sum(-1) / nodes,
            "undetermined_fraction": (node_states == UNDETERMINED).sum(-1) / nodes,
            "frozen_fraction": frozen.sum(-1) / nodes,
            "zero_visit_fraction": (node_visits == 0).sum(-1) / nodes,
            "static_fraction": counted.sum(-1) / counted.shape[-1],
            "pruned_roots": pruned_roots,
            "cascade_dead": dead.sum(-1) - pruned_roots,
            "right_starved_share": np.where(frozen.any(-1), starves_right.sum(-1) / frozen.sum(-1), np.nan),
            "balance": (weight * (1 - np.abs(2 * np.nan_to_num(p) - 1))).sum(-1) / weight.sum(-1),
            "routing_entropy": entropy,
        }
