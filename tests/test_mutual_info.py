"""Token↔leaf mutual information beside its shuffled-pairs null (analysis/mutual_info.py): answers
from formulas written here (scipy entropies, hypergeometric moments, exhaustive permutations)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from routescope.analysis import mutual_info
from routescope.analysis.mutual_info import MI_KEYS, mi_with_null, mutual_information_table


def h_mm(labels: np.ndarray) -> float:
    """Miller–Madow entropy in bits: plug-in from scipy plus (m - 1) / (2 N ln 2)."""
    counts = np.unique(labels, return_counts=True, axis=0)[1]
    return float(stats.entropy(counts, base=2) + (len(counts) - 1) / (2 * counts.sum() * math.log(2)))


def mi_mm(tokens: np.ndarray, leaves: np.ndarray) -> float:
    """H_MM(T) + H_MM(L) - H_MM(T, L)."""
    return h_mm(tokens) + h_mm(leaves) - h_mm(np.stack([tokens, leaves], axis=1))


def null_sd(tokens: np.ndarray, leaves: np.ndarray) -> float:
    """Spread of the plug-in MI under independence: 2 N ln2 · I ~ chi2 with (|T| - 1)(|L| - 1) dof."""
    dof = (len(np.unique(tokens)) - 1) * (len(np.unique(leaves)) - 1)
    return math.sqrt(2 * dof) / (2 * len(tokens) * math.log(2))


def test_independent_labels_give_no_excess() -> None:
    rng = np.random.default_rng(11)
    tokens, leaves = rng.integers(0, 50, 4000), rng.integers(0, 8, 4000)
    r = mi_with_null(tokens, leaves, seed=3)
    sd = null_sd(tokens, leaves)
    assert r["samples"] == 4000
    assert r["mi_bits"] == pytest.approx(mi_mm(tokens, leaves), abs=1e-12)
    assert r["mi_excess_low"] <= 0 <= r["mi_excess_high"]
    assert abs(r["mi_excess_bits"]) < 4 * sd and abs(r["mi_bits"] - r["mi_null_bits"]) < 4 * sd
    assert r["mi_null_bits"] < r["mi_null_p95"] < r["mi_null_bits"] + 4 * sd
    assert r["mi_p_value"] > 0.01


def test_sparse_independent_labels_show_the_bias_the_null_removes() -> None:
    """Few samples per token: Miller–Madow MI is far above 0 on independent labels, and so is the null."""
    rng = np.random.default_rng(12)
    tokens, leaves = rng.integers(0, 400, 2000), rng.integers(0, 8, 2000)
    r = mi_with_null(tokens, leaves, seed=4)
    sd = null_sd(tokens, leaves)
    assert r["mi_bits"] > 0.3 and r["mi_null_bits"] > 0.3
    assert abs(r["mi_bits"] - r["mi_null_bits"]) < 4 * sd
    assert r["mi_excess_low"] <= 0 <= r["mi_excess_high"]
    assert r["mi_p_value"] > 0.01


def test_leaf_determined_by_token() -> None:
    rng = np.random.default_rng(13)
    tokens = rng.integers(0, 16, 4000)
    leaves = tokens % 8
    permutations = 200
    r = mi_with_null(tokens, leaves, permutations=permutations, seed=5)
    # H(T, L) = H(T) with the same number of cells, so the MM estimate is exactly H_MM(L) ≈ 3 bits.
    assert r["mi_bits"] == pytest.approx(h_mm(leaves), abs=1e-12)
    assert r["mi_bits"] == pytest.approx(3, abs=0.01)
    assert r["mi_null_bits"] < 0.02 and r["mi_excess_bits"] == pytest.approx(3, abs=0.03)
    assert 2.9 < r["mi_excess_low"] <= r["mi_excess_bits"] <= r["mi_excess_high"] < 3.1
    assert r["mi_p_value"] == 1 / (1 + permutations)


def test_plug_in_value_matches_scipy() -> None:
    rng = np.random.default_rng(14)
    tokens = rng.choice([-3, 7, 1000, 42, 5], size=500, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    leaves = np.where(rng.random(500) < 0.5, tokens % 3, rng.integers(0, 6, 500)) * 10
    r = mi_with_null(tokens, leaves, permutations=20, bootstrap=20)
    counts_t = np.unique(tokens, return_counts=True)[1]
    counts_l = np.unique(leaves, return_counts=True)[1]
    counts_tl = np.unique(np.stack([tokens, leaves], 1), axis=0, return_counts=True)[1]
    n, ln2 = 500, math.log(2)
    expected = sum(sign * (stats.entropy(c, base=2) + (len(c) - 1) / (2 * n * ln2))
                   for sign, c in ((1, counts_t), (1, counts_l), (-1, counts_tl)))  # fmt: skip
    assert r["mi_bits"] == pytest.approx(expected, abs=1e-12)


def test_reproducible_and_seeded() -> None:
    rng = np.random.default_rng(15)
    tokens, leaves = rng.integers(0, 30, 1000), rng.integers(0, 4, 1000)
    a, b = mi_with_null(tokens, leaves, seed=7), mi_with_null(tokens, leaves, seed=7)
    assert a == b and set(a) == set(MI_KEYS)
    c = mi_with_null(tokens, leaves, seed=8)
    assert c["mi_bits"] == a["mi_bits"] and c["mi_null_bits"] != a["mi_null_bits"]


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_samples_is_nan(n: int) -> None:
    r = mi_with_null(np.arange(n), np.arange(n))
    assert r["samples"] == n
    assert all(math.isnan(r[k]) for k in MI_KEYS if k != "samples")


def test_null_mean_equals_a_slow_permutation_loop() -> None:
    """Sample-level path (many tokens): the k-th null draw is the k-th rng.permutation of the leaves."""
    rng = np.random.default_rng(16)
    tokens, leaves = rng.integers(0, 100, 300), rng.integers(0, 8, 300)
    permutations, seed = 150, 21
    r = mi_with_null(tokens, leaves, permutations=permutations, bootstrap=10, seed=seed)
    loop = np.random.default_rng(seed)
    null = np.array([mi_mm(tokens, loop.permutation(leaves)) for _ in range(permutations)])
    assert r["mi_null_bits"] == pytest.approx(null.mean(), abs=1e-12)
    assert r["mi_null_p95"] == pytest.approx(np.quantile(null, 0.95), abs=1e-12)
    observed = mi_mm(tokens, leaves)
    assert r["mi_p_value"] == (1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + permutations)


def test_null_tables_agree_with_a_slow_permutation_loop() -> None:
    """Table path (few tokens and leaves): the null's mean matches permutations within sampling error."""
    rng = np.random.default_rng(17)
    tokens, leaves = rng.integers(0, 16, 3000), rng.integers(0, 8, 3000)
    r = mi_with_null(tokens, leaves, permutations=400, bootstrap=10, seed=1)
    loop = np.random.default_rng(2)
    null = np.array([mi_mm(tokens, loop.permutation(leaves)) for _ in range(400)])
    se = null.std() * math.sqrt(2 / 400)
    assert abs(r["mi_null_bits"] - null.mean()) < 4 * se


def test_pairing_tables_follow_the_exact_permutation_law() -> None:
    """Every table of a random pairing, enumerated over all 6! permutations, against 20000 draws."""
    tokens, leaves = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 0, 0, 1, 1, 2])
    exact: dict[tuple[int, ...], int] = {}
    for perm in itertools.permutations(range(6)):
        table = np.zeros((3, 3), dtype=int)
        np.add.at(table, (tokens, leaves[list(perm)]), 1)
        exact[tuple(table.ravel())] = exact.get(tuple(table.ravel()), 0) + 1
    drawn = mutual_info._pairing_tables(
        np.array([2, 1, 3]), np.array([3, 2, 1]), 20000, np.random.default_rng(0)
    )
    assert (drawn.sum(2) == [2, 1, 3]).all() and (drawn.sum(1) == [3, 2, 1]).all()
    keys = [tuple(t) for t in drawn.reshape(20000, -1)]
    assert set(keys) <= set(exact)
    observed = np.array([keys.count(k) for k in exact])
    expected = np.array(list(exact.values())) / 720 * 20000
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_pairing_tables_have_hypergeometric_cells() -> None:
    a, b = np.array([3, 5, 2, 10, 0, 7]), np.array([4, 6, 10, 7])
    n = a.sum()
    drawn = mutual_info._pairing_tables(a, b, 20000, np.random.default_rng(1)).astype(float)
    mean = np.outer(a, b) / n
    var = np.outer(a * (n - a), b * (n - b)) / (n**2 * (n - 1))
    assert (np.abs(drawn.mean(0) - mean) <= 5 * np.sqrt(var / 20000) + 1e-12).all()
    assert np.allclose(drawn.var(0), var, rtol=0.1, atol=1e-9)


@pytest.mark.parametrize("bins", [12, 5000])  # dense bincount and sort paths
def test_row_entropies_match_scipy(bins: int) -> None:
    codes = np.random.default_rng(2).integers(0, bins, (7, 200))
    n = codes.shape[1]
    got = mutual_info._row_entropies(codes, bins, mutual_info._xlogx_table(n))
    assert got == pytest.approx([h_mm(row) for row in codes], abs=1e-12)


def make_traces(rng: np.random.Generator, n: int = 3000) -> xr.Dataset:
    """Two layers × two trees: layer 0 leaf = token % 4 inside steps [2, 8) and random outside; layer 1
    random; missing tokens and one tree's missing leaves."""
    steps = rng.integers(0, 10, n)
    tokens = rng.integers(0, 12, n)
    tokens[rng.random(n) < 0.05] = -1
    inside = (steps >= 2) & (steps < 8)
    leaf = rng.integers(0, 4, (n, 2, 2))
    leaf[inside, 0, :] = (tokens[inside] % 4)[:, None]
    leaf[rng.random(n) < 0.1, 1, 1] = -1
    return xr.Dataset(
        {"token_id": (("sample",), tokens), "sample_step": (("sample",), steps),
         "leaf": (("sample", "layer", "tree"), leaf.astype(np.int32))},
        coords={"layer": [0, 1], "tree": [0, 1]},
    )  # fmt: skip


def test_mutual_information_table() -> None:
    traces = make_traces(np.random.default_rng(18))
    table = mutual_information_table(traces, window=(2, 8), permutations=200, bootstrap=100, seed=0)
    tokens, steps, leaf = (traces[k].values for k in ("token_id", "sample_step", "leaf"))
    keep = (steps >= 2) & (steps < 8)
    expected_mi = np.zeros((2, 2))
    expected_samples = np.zeros((2, 2), dtype=int)
    for layer, tree in itertools.product(range(2), range(2)):
        ok = keep & (tokens >= 0) & (leaf[:, layer, tree] >= 0)
        expected_samples[layer, tree] = ok.sum()
        expected_mi[layer, tree] = mi_mm(tokens[ok], leaf[ok, layer, tree])
    assert table["tree_samples"].dims == ("layer", "tree") and table["mi_bits"].dims == ("layer",)
    assert (table["tree_samples"].values == expected_samples).all()
    assert table["tree_mi_bits"].values == pytest.approx(expected_mi, abs=1e-12)
    assert table["mi_bits"].values == pytest.approx(expected_mi.mean(1), abs=1e-12)
    assert table["mi_bits"].values[0] == pytest.approx(2, abs=0.01)  # leaf = token % 4 over uniform tokens
    assert (table["tree_mi_excess_low"].values[0] > 1.9).all()
    assert (table["tree_mi_excess_low"].values[1] <= 0).all() and (
        table["tree_mi_excess_high"].values[1] >= 0
    ).all()
    assert (table["tree_mi_p_value"].values[0] == 1 / 201).all() and table["mi_p_value"].values[1] > 0.01
    for key in ("mi_null_bits", "mi_excess_bits", "mi_excess_low", "mi_excess_high"):
        assert table[key].values == pytest.approx(table[f"tree_{key}"].values.mean(1), abs=1e-12)
    assert table.attrs["window"] == "2:8" and table.attrs["permutations"] == 200
    # the whole run mixes in random leaves outside the window: less information
    whole = mutual_information_table(traces, permutations=20, bootstrap=20)
    assert whole["mi_bits"].values[0] < 1.5


def test_mutual_information_table_is_nan_without_samples() -> None:
    traces = make_traces(np.random.default_rng(19), n=50)
    traces["leaf"][:, 1, 1] = -1
    table = mutual_information_table(traces, permutations=10, bootstrap=10)
    assert table["tree_samples"].values[1, 1] == 0 and np.isnan(table["tree_mi_bits"].values[1, 1])
    assert np.isfinite(table["mi_bits"].values).all()  # the layer mean leaves the empty tree out
