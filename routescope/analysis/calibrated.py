"""Calibrated unit states (metrics version 2): a zero count is evidence only when enough tokens could
have arrived, so states come from one-sided Clopper–Pearson bounds, never from `visits == 0` alone.

In a window, a unit (decision node or leaf) at level ℓ (root 0, leaves d) of a tree that N tokens
entered got V of them; its balanced share is s = 2^-ℓ. With U, L the one-sided (1 − α) upper and
lower bounds of the reach V/N: **dead** when U < δ·s, **live** when L > δ·s, else **undetermined**.
A live decision node whose minority child got m = min(R, V − R) of its V tokens is **frozen** when
U(m, V) < ε, starving the child that gets the minority. Numpy on any leading shape (..., T, units).

The bounds are never inverted for the states: by the Clopper–Pearson duality U(V, N) < t exactly when
P(Bin(N, t) ≤ V) < α, and L(V, N) > t exactly when P(Bin(N, t) ≥ V) < α, two regularized incomplete
beta functions (five times faster than the quantile, which the time series needs on every interval).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import betainc, betaincinv

from routescope.analysis.stats import binary_entropy, right_share
from routescope.analysis.window import MetricsError

DELTA = 0.05  # starvation level: a unit is dead when it provably gets under 5% of its balanced share
ALPHA = 0.05  # one-sided error of each bound
EPSILON = 0.01  # frozen: the minority child provably gets under 1% of the node's tokens
PERSISTENCE = 5  # K: intervals per rolling window, and windows a death or freeze must persist
DEAD, UNDETERMINED, LIVE = 0, 1, 2
STATE_NAMES = ("dead", "undetermined", "live")


@dataclass(frozen=True)
class Thresholds:
    """The v2 tests' parameters (δ, α, ε, K): options of every command, written into the report."""

    delta: float = DELTA
    alpha: float = ALPHA
    epsilon: float = EPSILON
    persistence: int = PERSISTENCE

    def __post_init__(self) -> None:
        for name, low, high in (("delta", 0, 1), ("alpha", 0, 0.5), ("epsilon", 0, 0.5)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and low < value < high and math.isfinite(value)):
                raise MetricsError(f"{name} = {value!r} must lie strictly between {low} and {high}")
        if not (isinstance(self.persistence, int) and self.persistence >= 1):
            raise MetricsError(f"persistence = {self.persistence!r} must be a whole number of intervals, at least 1")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"delta", "alpha", "epsilon", "persistence"}."""
        return asdict(self)

    def zero_visit_floor(self, level: int) -> int:
        """The fewest tokens into the tree for which V = 0 at `level` proves a unit dead (≈ 2^ℓ·ln(1/α)/δ)."""
        share = self.delta * 2.0**-level
        return math.ceil(math.log(self.alpha) / math.log1p(-share) + 1e-12)

    def frozen_floor(self) -> int:
        """The fewest visits for which a node whose minority got no token is frozen (299 at ε = 0.01)."""
        return math.ceil(math.log(self.alpha) / math.log1p(-self.epsilon) + 1e-12)


DEFAULT = Thresholds()


def _pair(successes: Any, trials: Any) -> tuple[np.ndarray, np.ndarray]:
    v, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64))
    return v, n


def upper_bound(successes: Any, trials: Any, alpha: float = ALPHA) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound of a proportion: BetaInv(1 − α; V + 1, N − V), 1 where V = N
    (NaN where N = 0: nothing can be said). For display; the states use `below`."""
    v, n = _pair(successes, trials)
    with np.errstate(invalid="ignore"):
        bound = betaincinv(v + 1, np.maximum(n - v, 1e-300), 1 - alpha)
    return np.where(n <= 0, np.nan, np.where(v >= n, 1.0, bound))


def lower_bound(successes: Any, trials: Any, alpha: float = ALPHA) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound of a proportion: BetaInv(α; V, N − V + 1), 0 where V = 0."""
    v, n = _pair(successes, trials)
    with np.errstate(invalid="ignore"):
        bound = betaincinv(np.maximum(v, 1e-300), n - v + 1, alpha)
    return np.where(n <= 0, np.nan, np.where(v <= 0, 0.0, bound))


def below(successes: Any, trials: Any, share: Any, alpha: float = ALPHA) -> np.ndarray:
    """U(V, N) < share, decided as P(Bin(N, share) ≤ V) = I_{1−share}(N − V, V + 1) < α (False where V = N or N = 0)."""
    v, n = _pair(successes, trials)
    ok = (n > 0) & (v < n)
    with np.errstate(invalid="ignore"):
        tail = betainc(np.where(ok, n - v, 1.0), v + 1, 1 - np.asarray(share, dtype=np.float64))
    return ok & (tail < alpha)


def above(successes: Any, trials: Any, share: Any, alpha: float = ALPHA) -> np.ndarray:
    """L(V, N) > share, decided as P(Bin(N, share) ≥ V) = I_share(V, N − V + 1) < α (False where V = 0)."""
    v, n = _pair(successes, trials)
    ok = (n > 0) & (v > 0)
    with np.errstate(invalid="ignore"):
        tail = betainc(np.where(ok, v, 1.0), np.maximum(n - v + 1, 1.0), np.asarray(share, dtype=np.float64))
    return ok & (tail < alpha)


def heap_levels(units: int) -> np.ndarray:
    """The level of each unit in heap order (root 0; a tree's leaves follow its decision nodes)."""
    return np.floor(np.log2(np.arange(units) + 1)).astype(np.int64)


def unit_states(visits: Any, tokens: Any, levels: Any, delta: float = DELTA, alpha: float = ALPHA) -> np.ndarray:
    """DEAD / UNDETERMINED / LIVE per unit: visits (..., units), tokens (...) into the tree, levels (units,)."""
    n = np.asarray(tokens, dtype=np.float64)[..., None]
    threshold = delta * np.exp2(-np.asarray(levels, dtype=np.float64))
    dead = below(visits, n, threshold, alpha)
    live = above(visits, n, threshold, alpha)
    return np.where(dead, DEAD, np.where(live, LIVE, UNDETERMINED)).astype(np.int8)


def frozen_side(visits: Any, right: Any, live: np.ndarray, epsilon: float = EPSILON,
                alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(frozen, starves_right) per decision node: live, with U(min(R, V − R), V) < ε; the starved child is
    the right one when R < V − R."""
    visits, right = np.asarray(visits, dtype=np.float64), np.asarray(right, dtype=np.float64)
    minority = np.minimum(right, visits - right)
    frozen = live & below(minority, visits, epsilon, alpha)
    return frozen, frozen & (right < visits - right)


@dataclass
class TreeStates:
    """Every unit's state in one window (..., T, 2^(d+1) − 1, heap order: leaf j is unit 2^d − 1 + j), and
    per decision node whether it is frozen and whether its starved child is the right one."""

    states: np.ndarray
    frozen: np.ndarray
    starves_right: np.ndarray

    @property
    def nodes(self) -> int:
        return self.frozen.shape[-1]


def tree_states(node_visits: np.ndarray, node_right: np.ndarray, leaf_visits: np.ndarray, tokens: np.ndarray,
                th: Thresholds = DEFAULT) -> TreeStates:  # fmt: skip
    """The calibrated states of every unit of window-summed counts: node_* (..., T, 2^d − 1), leaf_visits
    (..., T, 2^d), tokens (...)."""
    nodes, leaves = node_visits.shape[-1], leaf_visits.shape[-1]
    units = np.concatenate([node_visits, leaf_visits], axis=-1)
    per_tree = np.asarray(tokens, dtype=np.float64)[..., None]  # (..., 1): the same tokens enter every tree
    states = unit_states(units, per_tree, heap_levels(nodes + leaves), th.delta, th.alpha)
    frozen, starves_right = frozen_side(node_visits, node_right, states[..., :nodes] == LIVE, th.epsilon, th.alpha)
    return TreeStates(states, frozen, starves_right)


def pruning_roots(states: np.ndarray) -> np.ndarray:
    """Per unit (heap order, last axis): dead with a live parent, i.e. the root of one pruning (the root unit never)."""
    units = states.shape[-1]
    parents = (np.arange(1, units) - 1) // 2
    roots = (states[..., 1:] == DEAD) & (states[..., parents] == LIVE)
    return np.concatenate([np.zeros(states.shape[:-1] + (1,), dtype=bool), roots], axis=-1)


def calibrated_tree_numpy(node_visits: np.ndarray, node_right: np.ndarray, leaf_visits: np.ndarray, tokens: np.ndarray,
                          variant: str = "neuron", th: Thresholds = DEFAULT,
                          states: TreeStates | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The version-2 state metrics of window-summed counts: node_* (..., T, 2^d − 1), leaf_visits (..., T, 2^d),
    tokens (...). Returns arrays (..., T). `states`: tree_states of the same counts, where already computed."""
    st = states if states is not None else tree_states(node_visits, node_right, leaf_visits, tokens, th)
    nodes = st.nodes
    node_states = st.states[..., :nodes]
    live_nodes = node_states == LIVE
    dead = st.states == DEAD
    roots = pruning_roots(st.states).sum(-1)
    counted = dead[..., nodes:] if variant == "leaf_mlp" else dead  # leaf MLPs: only the leaves are units
    p = right_share(node_visits, node_right)
    weight = np.where(live_nodes, np.asarray(node_visits, dtype=np.float64), 0.0)
    frozen = st.frozen.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "dead_fraction": (node_states == DEAD).sum(-1) / nodes,
            "undetermined_fraction": (node_states == UNDETERMINED).sum(-1) / nodes,
            "frozen_fraction": frozen / nodes,
            "zero_visit_fraction": (np.asarray(node_visits) == 0).sum(-1) / nodes,
            "static_fraction": counted.sum(-1) / counted.shape[-1],
            "pruned_roots": roots.astype(np.float64),
            "cascade_dead": (dead.sum(-1) - roots).astype(np.float64),
            "right_starved_share": np.where(frozen > 0, st.starves_right.sum(-1) / frozen, np.nan),
            "balance": (weight * (1 - np.abs(2 * np.nan_to_num(p) - 1))).sum(-1) / weight.sum(-1),
            "routing_entropy": np.where(live_nodes, binary_entropy(p), 0.0).sum(-1) / live_nodes.sum(-1),
        }
