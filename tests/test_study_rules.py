"""The study's decision rules (PROTOCOL.md R1–R4) on constructed runs whose verdict is known, and the exact
tests on cases counted by hand."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from routescope.analysis.study_rules import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    RunValues,
    permutation_p,
    regime_effects,
    replication,
    rule_auto_pruning,
    rule_balance,
    rule_mechanism,
    rule_quality,
    sign_flip_p,
    welch,
)  # fmt: skip

ARMS = ("gelu-node", "relu-node", "tanh-node", "identity-node", "gelu-output", "dense")


def test_permutation_p_counts_splits() -> None:
    # 5 + 5 fully separated: only the observed split is as extreme -> 1 / C(10, 5)
    assert permutation_p(np.arange(5, 10), np.arange(5)) == pytest.approx(1 / 252)
    # 3 + 3 separated: the floor is 1 / 20 = 0.05 (why the protocol needs 5 seeds)
    assert permutation_p([4, 5, 6], [1, 2, 3]) == pytest.approx(0.05)
    # identical groups: every split is as extreme
    assert permutation_p([1, 1, 1], [1, 1, 1]) == 1.0
    # brute force on a small case
    a, b = np.array([0.3, 0.9, 0.5]), np.array([0.1, 0.4, 0.2, 0.6])
    pooled = np.concatenate([a, b])
    from itertools import combinations

    ext = [pooled[list(i)].mean() - np.delete(pooled, list(i)).mean() >= a.mean() - b.mean() - 1e-12
           for i in combinations(range(7), 3)]  # fmt: skip
    assert permutation_p(a, b) == pytest.approx(np.mean(ext))


def test_sign_flip_p() -> None:
    assert sign_flip_p([1, 2, 3, 4, 5]) == pytest.approx(1 / 32)
    d = np.array([2.0, -1.0, 0.5])
    ext = [np.mean(np.array(s) * d) >= d.mean() - 1e-12 for s in product((1, -1), repeat=3)]
    assert sign_flip_p(d) == pytest.approx(np.mean(ext))


def test_welch_matches_scipy() -> None:
    from scipy import stats

    a, b = np.array([1.0, 2.0, 4.0, 3.5]), np.array([0.5, 0.7, 1.9])
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue) and w["low"] < w["diff"] < w["high"]
    ci = ref.confidence_interval(0.95)
    assert (w["low"], w["high"]) == pytest.approx((ci.low, ci.high))


def runs(overrides: dict[str, dict[str, list[float]]] | None = None, seeds: int = 5) -> list[RunValues]:
    """Constructed runs: the mechanism holds, gelu-node prunes more and still rising, output is more balanced."""
    base = {
        "gelu-node": {"rss": 0.8, "sf": 0.30, "dsf": 0.02, "len_": 0.70, "drift_slope": -0.01, "val_loss": 1.50},
        "relu-node": {"rss": 0.75, "sf": 0.25, "dsf": 0.01, "len_": 0.72, "drift_slope": -0.02, "val_loss": 1.52},
        "tanh-node": {"rss": 0.5, "sf": 0.05, "dsf": 0.0, "len_": 0.9, "drift_slope": 0.0, "val_loss": 1.49},
        "identity-node": {"rss": math.nan, "sf": 0.02, "dsf": 0.0, "len_": 0.95, "drift_slope": 0.0, "val_loss": 1.55},
        "gelu-output": {"rss": 0.45, "sf": 0.04, "dsf": 0.0, "len_": 0.92, "drift_slope": 0.0, "val_loss": 1.48},
        "dense": {"rss": math.nan, "sf": math.nan, "dsf": math.nan, "len_": math.nan, "drift_slope": math.nan,
                  "val_loss": 1.45},
    }  # fmt: skip
    out = []
    for arm in ARMS:
        for seed in range(seeds):
            values = {k: v + (0.001 * seed if k in ("sf", "len_", "val_loss", "dsf") else 0) for k, v in base[arm].items()}
            for key, per_seed in (overrides or {}).get(arm, {}).items():
                values[key] = per_seed[seed]
            out.append(RunValues(arm, seed, **values))
    return out


def test_rules_on_a_world_where_every_claim_holds() -> None:
    data = runs()
    assert rule_mechanism(data).outcome == SUPPORTED
    r2 = rule_auto_pruning(data)
    assert r2.outcome == SUPPORTED and all(t["permutation_p"] == pytest.approx(1 / 252) for t in r2.details["against"].values())
    assert rule_balance(data).outcome == SUPPORTED
    quality = rule_quality(data).details
    assert quality["gelu-node"]["reading"] == "worse than dense"  # 1.50 + ... vs 1.45 + ..., no spread difference


def test_mechanism_fails_on_two_seeds_and_is_inconclusive_on_one() -> None:
    two = {"tanh-node": {"rss": [0.9, 0.85, 0.5, 0.5, 0.5]}}
    assert rule_mechanism(runs(two)).outcome == NOT_SUPPORTED
    one = {"tanh-node": {"rss": [0.9, 0.5, 0.5, 0.5, 0.5]}}
    assert rule_mechanism(runs(one)).outcome == INCONCLUSIVE
    no_frozen = {"gelu-node": {"rss": [math.nan, math.nan, 0.8, 0.8, 0.8]}}  # "no frozen nodes" fails (a)
    assert rule_mechanism(runs(no_frozen)).outcome == NOT_SUPPORTED
    rising_drift = {"relu-node": {"drift_slope": [0.1, -1, -1, -1, -1]}}  # (b) alone: inconclusive
    assert rule_mechanism(runs(rising_drift)).outcome == INCONCLUSIVE


def test_auto_pruning_verdicts() -> None:
    below = {"gelu-node": {"sf": [0.01] * 5}}  # less pruned than a control: not supported
    assert rule_auto_pruning(runs(below)).outcome == NOT_SUPPORTED
    flat = {"gelu-node": {"dsf": [-0.01, -0.02, 0.0, -0.01, 0.0]}}  # no longer rising: not supported
    assert rule_auto_pruning(runs(flat)).outcome == NOT_SUPPORTED
    mixed = {"gelu-node": {"sf": [0.30, 0.01, 0.30, 0.02, 0.30]}}  # ahead on average, not separated: inconclusive
    r2 = rule_auto_pruning(runs(mixed))
    assert r2.outcome == INCONCLUSIVE and r2.details["against"]["tanh-node"]["permutation_p"] >= 0.05


def test_balance_and_missing_arms() -> None:
    worse = {"gelu-output": {"len_": [0.5] * 5}}
    assert rule_balance(runs(worse)).outcome == NOT_SUPPORTED
    three = runs(seeds=3)  # 3 + 3 runs cannot reach p < 0.05
    assert rule_balance(three).outcome == INCONCLUSIVE
    partial = [r for r in runs() if r.arm != "identity-node"]
    assert rule_mechanism(partial).outcome == INCONCLUSIVE and rule_auto_pruning(partial).outcome == INCONCLUSIVE


def replication_runs(overrides: dict[str, dict[str, list[float]]] | None = None) -> list[RunValues]:
    """The replication size's world: 3 seeds of gelu-node, tanh-node, gelu-output and dense only."""
    return [r for r in runs(overrides, seeds=3) if r.arm in ("gelu-node", "tanh-node", "gelu-output", "dense")]


def test_replication_checks_direction_in_every_seed_with_the_arms_present() -> None:
    verdicts = {o.rule: o for o in replication(replication_runs())}
    assert [verdicts[r].outcome for r in ("R1", "R2", "R3")] == ["replicated"] * 3
    assert verdicts["R1"].details["arms"] == ["gelu-node", "tanh-node", "gelu-output"]  # relu and identity absent
    # 3 + 3 separated runs: the p-value sits at its floor 0.05 and is reported, not used
    assert verdicts["R3"].details["permutation_p"] == pytest.approx(0.05)
    assert verdicts["R4"].outcome == "descriptive"


@pytest.mark.parametrize("overrides,rule", [
    ({"tanh-node": {"rss": [0.5, 0.7, 0.5]}}, "R1"),            # one control seed outside [0.4, 0.6]
    ({"gelu-node": {"drift_slope": [-1, 0.1, -1]}}, "R1"),      # one asymmetric seed with rising drift
    ({"gelu-node": {"sf": [0.30, 0.30, 0.04]}}, "R2"),          # one seed below a control's best seed
    ({"gelu-node": {"dsf": [0.02, -0.001, 0.02]}}, "R2"),       # one seed no longer rising
    ({"gelu-output": {"len_": [0.92, 0.92, 0.69]}}, "R3"),      # one output seed less even than a node seed
])  # fmt: skip
def test_one_seed_against_the_direction_fails_the_replication(overrides: dict, rule: str) -> None:
    verdicts = {o.rule: o.outcome for o in replication(replication_runs(overrides))}
    assert verdicts[rule] == "not replicated"
    assert all(v == "replicated" for r, v in verdicts.items() if r not in (rule, "R4"))


def test_regime_effects_recover_constructed_main_effects() -> None:
    # SF = 0.2 + 0.3 [lr high] - 0.1 [batch large] (+ seed jitter): the main effects are +0.3 and -0.1 exactly
    cells = [{"activation": "gelu", "lr": lr, "tokens": tokens, "sf": 0.2 + 0.3 * (lr == 3e-3) - 0.1 * (tokens == 16384) + j}
             for lr in (1e-3, 3e-3) for tokens in (1536, 16384) for j in (-0.01, 0.0, 0.01)]  # fmt: skip
    effects = regime_effects(cells)["gelu"]
    assert effects["lr"]["diff"] == pytest.approx(0.3) and effects["lr"]["low"] > 0
    # the lr effect is spread inside each batch level, so the batch effect's interval is wide but holds it
    assert effects["tokens"]["diff"] == pytest.approx(-0.1) and effects["tokens"]["low"] < -0.1 < effects["tokens"]["high"]
    assert (effects["lr"]["from"], effects["lr"]["to"]) == (1e-3, 3e-3)
