"""Calibrated unit states (metrics v2 groundwork): known answers at the thresholds' edges, with the expected
values computed here from the formulas (scipy's beta quantiles), not by the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from routescope.analysis.calibrated import (
    DEAD,
    LIVE,
    UNDETERMINED,
    calibrated_tree_numpy,
    frozen_side,
    heap_levels,
    lower_bound,
    unit_states,
    upper_bound,
)

ALPHA, DELTA, EPSILON = 0.05, 0.05, 0.01


def test_bounds_are_clopper_pearson() -> None:
    for v, n in ((0, 10), (3, 10), (10, 10), (1, 1000), (500, 1000)):
        upper = 1.0 if v == n else stats.beta.ppf(1 - ALPHA, v + 1, n - v)
        lower = 0.0 if v == 0 else stats.beta.ppf(ALPHA, v, n - v + 1)
        assert upper_bound(v, n) == pytest.approx(upper, rel=1e-9)
        assert lower_bound(v, n) == pytest.approx(lower, rel=1e-9)
    assert upper_bound(0, 10) == pytest.approx(1 - ALPHA ** (1 / 10))  # V = 0 in closed form
    assert np.isnan(upper_bound(0, 0)) and np.isnan(lower_bound(0, 0))


@pytest.mark.parametrize("level", [0, 3, 7])
def test_zero_visits_are_dead_only_with_enough_tokens(level: int) -> None:
    """V = 0 is dead iff 1 − α^(1/N) < δ·2^−ℓ, i.e. from N ≈ 2^ℓ·ln(1/α)/δ tokens on."""
    share = DELTA * 2.0**-level
    needed = math.ceil(math.log(ALPHA) / math.log(1 - share) + 1e-12)  # smallest N with 1 − α^(1/N) < share
    assert abs(needed - 2**level * math.log(1 / ALPHA) / DELTA) <= 2**level  # the DESIGN's approximation
    levels = np.array([level])
    assert unit_states(np.array([0]), np.array(needed - 1), levels)[0] == UNDETERMINED
    assert unit_states(np.array([0]), np.array(needed), levels)[0] == DEAD


def test_minority_zero_freezes_from_299_visits() -> None:
    live = np.array([True, True])
    frozen, starves_right = frozen_side(np.array([298, 299]), np.array([298, 0]), live)
    assert frozen.tolist() == [False, True] and starves_right.tolist() == [False, True]
    frozen_left, right = frozen_side(np.array([299]), np.array([299]), np.array([True]))
    assert frozen_left.tolist() == [True] and right.tolist() == [False]  # all went right: the left child starves
    assert not frozen_side(np.array([1000]), np.array([0]), np.array([False]))[0][0]  # only live nodes freeze


def test_a_trickle_at_two_percent_of_its_share_is_dead() -> None:
    """Ample tokens and 2% of the balanced share (under δ = 5%): dead, although its count is far from zero."""
    tokens = 200_000
    levels = np.array([2])
    visits = np.array([int(0.02 * tokens / 4)])  # 1,000 tokens
    assert visits[0] > 0 and unit_states(visits, np.array(tokens), levels)[0] == DEAD
    assert unit_states(np.array([int(0.2 * tokens / 4)]), np.array(tokens), levels)[0] == LIVE


def test_heap_levels() -> None:
    assert heap_levels(15).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]


def _tree_from_leaves(leaf_visits: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Node visits and right-goers summed from leaf counts (heap order), so every invariant holds."""
    counts = list(leaf_visits)
    level_counts = [np.asarray(counts)]
    for _ in range(depth):
        below = level_counts[-1]
        level_counts.append(below[0::2] + below[1::2])
    visits, right = [], []
    for level in range(depth):
        below = level_counts[depth - level - 1]
        visits += list(level_counts[depth - level])
        right += list(below[1::2])
    return np.array(visits), np.array(right)


def test_a_uniform_router_is_all_live_and_balanced() -> None:
    rng = np.random.default_rng(0)
    depth, tokens = 4, 160_000
    leaves = rng.multinomial(tokens, np.full(16, 1 / 16))
    visits, right = _tree_from_leaves(leaves, depth)
    m = calibrated_tree_numpy(visits[None], right[None], leaves[None], np.array(tokens))
    assert m["dead_fraction"][0] == 0 and m["undetermined_fraction"][0] == 0 and m["frozen_fraction"][0] == 0
    assert m["routing_entropy"][0] == pytest.approx(1.0, abs=1e-3) and m["balance"][0] == pytest.approx(1.0, abs=0.01)
    assert np.isnan(m["right_starved_share"][0]) and m["static_fraction"][0] == 0


@pytest.mark.parametrize("starve_right, expected", [(True, 1.0), (False, 0.0)])
def test_frozen_side_decides_right_starved_share(starve_right: bool, expected: float) -> None:
    """Depth 2, 40,000 tokens: the root sends everything to one side; that side splits evenly."""
    depth, tokens = 2, 40_000
    leaves = np.array([20_000, 20_000, 0, 0]) if starve_right else np.array([0, 0, 20_000, 20_000])
    visits, right = _tree_from_leaves(leaves, depth)
    m = calibrated_tree_numpy(visits[None], right[None], leaves[None], np.array(tokens))
    assert m["frozen_fraction"][0] == pytest.approx(1 / 3) and m["right_starved_share"][0] == expected
    # the starved child is dead, and so are its two leaves: one pruning root, two cascading deaths
    assert m["dead_fraction"][0] == pytest.approx(1 / 3) and m["pruned_roots"][0] == 1 and m["cascade_dead"][0] == 2
    assert m["static_fraction"][0] == pytest.approx(3 / 7) and m["zero_visit_fraction"][0] == pytest.approx(1 / 3)


def test_l1_dead_units_are_calibrated_against_the_mean_firing_rate() -> None:
    """8 units, 20,000 tokens: the mean firing rate sets the share; a unit at 1% of it is dead, one at 20% live,
    and with 200 tokens the silent unit is only undetermined. Expected states from scipy's beta quantiles."""
    from routescope.analysis.families import l1_metrics_numpy

    tokens = 20_000
    fires = np.array([10_000, 10_000, 10_000, 10_000, 10_000, 0, 50, 1_000])  # rate 0.5 each; 0; 0.0025; 0.05
    rate = fires.sum() / tokens / 8
    threshold = DELTA * rate
    upper = np.array([1.0 if f == tokens else stats.beta.ppf(0.95, f + 1, tokens - f) for f in fires])
    lower = np.array([0.0 if f == 0 else stats.beta.ppf(0.05, f, tokens - f + 1) for f in fires])
    expected_dead = int((upper < threshold).sum())
    expected_undetermined = int(((upper >= threshold) & (lower <= threshold)).sum())
    counts = {"tokens": np.array(tokens), "unit_fires": fires, "active_sum": np.array(fires.sum()),
              "active_hist": np.array([tokens])}  # fmt: skip
    m = l1_metrics_numpy(counts, 8, np.array([0.0]))
    assert expected_dead == 2 and int(m["dead_units"]) == expected_dead  # the silent unit and the 1% one
    assert int(m["undetermined_units"]) == expected_undetermined == 0 and int(m["zero_fire_units"]) == 1
    few_fires = fires // 200  # 100 tokens: U(0, 100) = 1 − α^(1/100) ≈ 0.030 is above δ·rate ≈ 0.016
    assert 1 - ALPHA ** (1 / 100) > DELTA * few_fires.sum() / 100 / 8
    few = l1_metrics_numpy({**counts, "tokens": np.array(100), "unit_fires": few_fires, "active_sum": np.array(few_fires.sum())},
                           8, np.array([0.0]))  # fmt: skip
    assert int(few["dead_units"]) == 0 and int(few["zero_fire_units"]) == 2  # silent, yet unproven


def test_moe_dead_experts_are_calibrated_against_k_over_e() -> None:
    """E = 8, k = 2, 10,000 tokens: an expert the router picks for 0.5% of tokens (under 5% of its 25% share)
    is dead though it was selected; one never selected is dead; with 100 tokens neither is proven."""
    from routescope.analysis.families import moe_metrics_numpy

    tokens, experts, k = 10_000, 8, 2
    selected = np.array([3_300, 3_300, 3_300, 3_300, 3_300, 3_450, 50, 0])
    assert selected.sum() == k * tokens
    share = DELTA * k / experts
    upper = [1.0 if s == tokens else stats.beta.ppf(0.95, s + 1, tokens - s) for s in selected]
    assert sum(u < share for u in upper) == 2
    counts = {"tokens": np.array(tokens), "expert_tokens": selected, "dropped_tokens": np.array(0),
              "coselect": np.diag(selected), "router_entropy_sum": np.array(0.0)}  # fmt: skip
    m = moe_metrics_numpy(counts, experts, k)
    assert int(m["dead_experts"]) == 2 and int(m["zero_selection_experts"]) == 1 and int(m["undetermined_experts"]) == 0
    few = moe_metrics_numpy({**counts, "tokens": np.array(100), "coselect": np.diag(selected // 100)}, experts, k)
    assert int(few["dead_experts"]) == 0 and int(few["undetermined_experts"]) == 2
