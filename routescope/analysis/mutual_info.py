"""Token↔leaf mutual information on the sampled traces beside its shuffled-pairs null (metrics v2).

The plug-in Miller–Madow estimate of I(token; leaf) is biased upward when there are few samples per
distinct token, so it is reported with the mean of its permutation null (the same estimate on pairs
whose leaves were shuffled), the excess over that null, a bootstrap 95% interval and a permutation
p-value. Everything is vectorised over permutations and resamples, so a report stays fast:

- when the contingency table is small next to the sample (padded tokens × leaves <= samples / 2, e.g.
  byte tokens), shuffled tables are drawn directly from their multivariate hypergeometric law and
  bootstrap tables from a multinomial over the observed cells, at a cost independent of the sample count;
- otherwise each permutation shuffles the leaf column (`rng.permuted`, row by row) and each resample
  draws sample indices, and all histograms of a chunk come from one `np.bincount` (or one sort when
  the table is too large to hold densely).
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from routescope.analysis.window import Window, describe_window, in_window

MI_KEYS = ("mi_bits", "mi_null_bits", "mi_null_p95", "mi_excess_bits", "mi_excess_low", "mi_excess_high",
           "mi_p_value", "samples")  # fmt: skip
BITS_KEYS = ("mi_bits", "mi_null_bits", "mi_null_p95", "mi_excess_bits", "mi_excess_low", "mi_excess_high")
CHUNK_ELEMENTS = 1 << 22  # elements of the largest (rows × samples or rows × bins) array built at once
TIE_TOLERANCE = 1e-12  # bits: a null draw this close below the observed MI counts as >= it (rounding)
LN2 = math.log(2.0)


def mi_with_null(tokens: np.ndarray, leaves: np.ndarray, permutations: int = 200, bootstrap: int = 200,
                 seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Miller–Madow I(token; leaf) in bits for one set of paired labels, beside its shuffled-pairs null.

    `tokens` and `leaves` are paired integer labels (already filtered to valid entries). Returns
    `mi_bits` = H(T) + H(L) − H(T, L), each entropy Miller–Madow corrected; `mi_null_bits` and
    `mi_null_p95`, the mean and 95th percentile of that estimate over `permutations` shufflings of the
    leaf column (the marginals stay fixed; only the pairing is broken); `mi_excess_bits` = mi_bits −
    mi_null_bits; `mi_p_value` = (1 + #{null >= mi_bits}) / (1 + permutations); `samples`.

    The interval [`mi_excess_low`, `mi_excess_high`] is a basic (pivotal) bootstrap interval from
    `bootstrap` resamples of the pairs with replacement: low = excess − q97.5(d), high = excess − q2.5(d)
    with d = MI(resample) − mean over resamples of MI(resample). The bootstrap is used for the spread
    only: a resample duplicates pairs, so its MI is biased upward by about the plug-in bias, and an
    uncentred percentile interval of MI(resample) − mi_null_bits would exclude 0 for independent
    labels. The bias is what the null removes; a fresh null per resample would cost
    bootstrap × permutations tables. Near MI = 0 the interval is conservative (the spread of the
    estimate at the slightly dependent empirical law is wider than at independence); it does not
    cover the estimator's residual bias under dependence.

    Reproducible for a given `seed` (np.random.default_rng). With fewer than 2 samples every value
    is NaN and `samples` is the count given. On the sample-level path the k-th null draw pairs the
    tokens with what the k-th `rng.permutation(leaves)` call would give.
    """
    tokens, leaves = np.asarray(tokens).ravel(), np.asarray(leaves).ravel()
    if tokens.shape != leaves.shape:
        raise ValueError(f"tokens ({tokens.size}) and leaves ({leaves.size}) must pair one to one")
    if permutations < 0 or bootstrap < 0:
        raise ValueError("permutations and bootstrap must be >= 0")
    n = int(tokens.size)
    out = {key: math.nan for key in MI_KEYS}
    out["samples"] = n
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    uniq_t, t_code = np.unique(tokens, return_inverse=True)
    uniq_l, l_code = np.unique(leaves, return_inverse=True)
    n_t, n_l = len(uniq_t), len(uniq_l)
    t_code, l_code = t_code.ravel().astype(np.int64), l_code.ravel().astype(np.int64)
    xlogx = _xlogx_table(n)
    a, b = np.bincount(t_code, minlength=n_t), np.bincount(l_code, minlength=n_l)
    cell_ids, cell_code, cell_counts = np.unique(
        t_code * n_l + l_code, return_inverse=True, return_counts=True
    )
    h_t, h_l = (float(_mm_entropy(c[None], n, xlogx)[0]) for c in (a, b))
    mi = h_t + h_l - float(_mm_entropy(cell_counts[None], n, xlogx)[0])
    tables = _pow2(n_t) * _pow2(n_l) <= n // 2

    if permutations > 0:
        if tables:
            null = _null_tables(a, b, permutations, rng, xlogx)
        else:
            null = _null_samples(t_code, l_code, n_l, permutations, rng, xlogx)
        null = h_t + h_l - null
        mean_null = float(null.mean())
        exceed = int(np.count_nonzero(null >= mi - TIE_TOLERANCE))
        out.update(mi_null_bits=mean_null, mi_null_p95=float(np.quantile(null, 0.95)),
                   mi_excess_bits=mi - mean_null, mi_p_value=(1 + exceed) / (1 + permutations))  # fmt: skip
        if bootstrap > 0:
            if tables:
                boot = _boot_tables(cell_ids, cell_counts, n_t, n_l, bootstrap, rng, xlogx)
            else:
                boot = _boot_samples(
                    t_code, l_code, cell_code.ravel(), (n_t, n_l, len(cell_ids)), bootstrap, rng, xlogx
                )
            d = boot - boot.mean()
            out["mi_excess_low"] = out["mi_excess_bits"] - float(np.quantile(d, 0.975))
            out["mi_excess_high"] = out["mi_excess_bits"] - float(np.quantile(d, 0.025))
    out["mi_bits"] = mi
    return out


def mutual_information_table(traces: xr.Dataset, window: Window = (None, None), permutations: int = 200,
                             bootstrap: int = 200, seed: int = 0) -> xr.Dataset:  # fmt: skip
    """`mi_with_null` per (layer, tree) of the sampled traces in the window, as `tree_<key>` (layer, tree),
    and per layer (layer,): the mean over trees of the bits values, interval bounds included (the mean
    of the per-tree bounds: an interval for the layer's mean only if the trees' errors move together),
    the largest per-tree p-value as `mi_p_value` (a valid p-value for "every tree's MI exceeds its
    null") and the mean usable samples per tree. Samples filter as in `tree.mutual_information`:
    `sample_step` in the window, `token_id` and `leaf` >= 0. Tree (l, t) draws from seed [seed, l, t]."""
    keep = in_window(traces["sample_step"].values, window)
    tokens = traces["token_id"].values[keep]
    leaves = traces["leaf"].values[keep]  # (sample, layer, tree)
    n_layers, n_trees = leaves.shape[1], leaves.shape[2]
    per_tree = {key: np.full((n_layers, n_trees), np.nan) for key in MI_KEYS}
    per_tree["samples"] = np.zeros((n_layers, n_trees), dtype=np.int64)
    valid_tokens = tokens >= 0
    for layer in range(n_layers):
        for tree in range(n_trees):
            leaf = leaves[:, layer, tree]
            ok = valid_tokens & (leaf >= 0)
            tree_seed = int(np.random.SeedSequence([seed, layer, tree]).generate_state(1)[0])
            result = mi_with_null(tokens[ok], leaf[ok], permutations, bootstrap, tree_seed)
            for key, value in result.items():
                per_tree[key][layer, tree] = value
    with np.errstate(invalid="ignore", divide="ignore"):
        has_value = np.isfinite(per_tree["mi_bits"])
        layer_data = {key: _nan_mean(per_tree[key]) for key in BITS_KEYS}
        p = per_tree["mi_p_value"]
        layer_data["mi_p_value"] = np.where(
            np.isfinite(p).any(1), np.where(np.isfinite(p), p, -np.inf).max(1), np.nan
        )
        layer_data["samples"] = np.where(
            has_value.any(1), (per_tree["samples"] * has_value).sum(1) / has_value.sum(1), 0.0
        )
    tree_coord = traces["tree"].values if "tree" in traces.coords else np.arange(n_trees)
    data = {key: (("layer",), layer_data[key]) for key in MI_KEYS}
    data.update({f"tree_{key}": (("layer", "tree"), per_tree[key]) for key in MI_KEYS})
    attrs = {"window": describe_window(window), "permutations": permutations, "bootstrap": bootstrap,
             "seed": seed, "trace_samples": int(keep.sum())}  # fmt: skip
    return xr.Dataset(data, coords={"layer": traces["layer"].values, "tree": tree_coord}, attrs=attrs)


# ---------------------------------------------------------------------------------------------- internals


def _nan_mean(values: np.ndarray) -> np.ndarray:
    """Mean over trees (axis 1) leaving out NaN trees; NaN when a layer has none."""
    ok = np.isfinite(values)
    return np.where(ok.any(1), np.where(ok, values, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


def _pow2(k: int) -> int:
    """The smallest power of two >= k (1 for k <= 1)."""
    return 1 << max(0, int(k) - 1).bit_length()


def _xlogx_table(n: int) -> np.ndarray:
    """c·log2(c) for c = 0..n (0 at 0): entropy sums by lookup, identical for identical counts."""
    c = np.arange(n + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, c * np.log2(c), 0.0)


def _mm_entropy(counts: np.ndarray, n: int, xlogx: np.ndarray) -> np.ndarray:
    """Miller–Madow entropy (bits) of each row of a (rows, bins) count array whose rows sum to n."""
    s = xlogx[counts].sum(axis=1)
    m = np.count_nonzero(counts, axis=1)
    return np.log2(n) - s / n + (m - 1) / (2 * n * LN2)


def _chunks(total: int, width: int) -> list[int]:
    """Row counts per chunk so that rows × width stays within CHUNK_ELEMENTS."""
    size = max(1, CHUNK_ELEMENTS // max(1, width))
    return [min(size, total - start) for start in range(0, total, size)]


def _row_entropies(codes: np.ndarray, bins: int, xlogx: np.ndarray) -> np.ndarray:
    """Miller–Madow entropy of each row of codes (rows, n) in [0, bins): one bincount, or one sort when
    a dense (rows, bins) histogram would be much larger than the codes."""
    rows, n = codes.shape
    keys = codes + (np.arange(rows, dtype=np.int64) * bins)[:, None]
    if bins <= 4 * n:
        counts = np.bincount(keys.ravel(), minlength=rows * bins).reshape(rows, bins)
        return _mm_entropy(counts, n, xlogx)
    keys = np.sort(keys.ravel())
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    run = np.diff(np.r_[starts, keys.size])
    row = keys[starts] // bins
    s = np.bincount(row, weights=xlogx[run], minlength=rows)
    m = np.bincount(row, minlength=rows)
    return np.log2(n) - s / n + (m - 1) / (2 * n * LN2)


def _null_samples(t_code: np.ndarray, l_code: np.ndarray, n_l: int, permutations: int,
                  rng: np.random.Generator, xlogx: np.ndarray) -> np.ndarray:  # fmt: skip
    """H(T, L) of `permutations` shufflings of the leaf column (row k = the k-th rng.permutation)."""
    n = t_code.size
    bins = int(t_code.max() + 1) * n_l
    out = []
    for rows in _chunks(permutations, max(n, bins if bins <= 4 * n else n)):
        shuffled = rng.permuted(np.broadcast_to(l_code, (rows, n)), axis=1)
        out.append(_row_entropies(t_code * n_l + shuffled, bins, xlogx))
    return np.concatenate(out)


def _boot_samples(t_code: np.ndarray, l_code: np.ndarray, cell_code: np.ndarray, sizes: tuple[int, int, int],
                  bootstrap: int, rng: np.random.Generator, xlogx: np.ndarray) -> np.ndarray:  # fmt: skip
    """MI of `bootstrap` resamples of the pairs (sample indices drawn with replacement)."""
    n = t_code.size
    n_t, n_l, n_cells = sizes
    out = []
    for rows in _chunks(bootstrap, n):
        idx = rng.integers(0, n, size=(rows, n))
        out.append(_row_entropies(t_code[idx], n_t, xlogx) + _row_entropies(l_code[idx], n_l, xlogx)
                   - _row_entropies(cell_code[idx], n_cells, xlogx))  # fmt: skip
    return np.concatenate(out)


def _mvh(pool: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multivariate hypergeometric draws: per row of pool (rows, W), W a power of two, a uniformly random
    sub-multiset of `draws` items, by halving the categories (one vectorised hypergeometric per level)."""
    levels = [pool]  # pairwise sums up to the total: levels[k] has W / 2^k columns
    while levels[-1].shape[1] > 1:
        levels.append(levels[-1][:, 0::2] + levels[-1][:, 1::2])
    taken = draws.reshape(-1, 1).astype(np.int64)
    for level in reversed(levels[:-1]):
        left = rng.hypergeometric(level[:, 0::2], level[:, 1::2], taken)
        split = np.empty(level.shape, dtype=np.int64)
        split[:, 0::2], split[:, 1::2] = left, taken - left
        taken = split
    return taken


def _pairing_tables(a: np.ndarray, b: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Contingency tables (rows, len(a), len(b)) of uniformly random pairings of a token multiset with
    counts a and a leaf multiset with counts b (same total): the law of the joint histogram of shuffled
    pairs. Token groups are halved recursively; each half takes a multivariate hypergeometric share of
    its group's leaves."""
    wt, wl = _pow2(len(a)), _pow2(len(b))
    a_pad, b_pad = np.zeros(wt, dtype=np.int64), np.zeros(wl, dtype=np.int64)
    a_pad[: len(a)], b_pad[: len(b)] = a, b
    comp = np.broadcast_to(b_pad, (rows, 1, wl)).copy()  # leaf composition of each token group
    width = wt
    while width > 1:
        half, groups = width // 2, wt // width
        left_sizes = a_pad.reshape(groups, width)[:, :half].sum(1)
        pool = comp.reshape(rows * groups, wl)
        left = _mvh(pool, np.broadcast_to(left_sizes, (rows, groups)).ravel(), rng)
        comp = np.stack((left, pool - left), axis=1).reshape(rows, 2 * groups, wl)
        width = half
    return comp[:, : len(a), : len(b)]


def _null_tables(a: np.ndarray, b: np.ndarray, permutations: int, rng: np.random.Generator,
                 xlogx: np.ndarray) -> np.ndarray:  # fmt: skip
    """H(T, L) of `permutations` shuffled-pairs tables drawn directly (cost independent of sample count)."""
    n, cells = int(a.sum()), _pow2(len(a)) * _pow2(len(b))
    out = []
    for rows in _chunks(permutations, cells):
        out.append(_mm_entropy(_pairing_tables(a, b, rows, rng).reshape(rows, -1), n, xlogx))
    return np.concatenate(out)


def _boot_tables(cell_ids: np.ndarray, cell_counts: np.ndarray, n_t: int, n_l: int, bootstrap: int,
                 rng: np.random.Generator, xlogx: np.ndarray) -> np.ndarray:  # fmt: skip
    """MI of `bootstrap` resamples of the pairs, as multinomial tables over the observed cells."""
    n = int(cell_counts.sum())
    out = []
    for rows in _chunks(bootstrap, n_t * n_l):
        table = np.zeros((rows, n_t * n_l), dtype=np.int64)
        table[:, cell_ids] = rng.multinomial(n, cell_counts / n, size=rows)
        table = table.reshape(rows, n_t, n_l)
        out.append(_mm_entropy(table.sum(2), n, xlogx) + _mm_entropy(table.sum(1), n, xlogx)
                   - _mm_entropy(table.reshape(rows, -1), n, xlogx))  # fmt: skip
    return np.concatenate(out)
