"""Numeric cores shared by every family's metrics: entropies, Gini, node drift and version 1's frozen count
(the calibrated v2 states are in calibrated.py).

Plain numpy on arrays of any leading shape, so one function serves a window summary (one row), a
time series (one row per interval) and the dashboard's single-interval views alike.
"""

from __future__ import annotations

import numpy as np

FROZEN_EPSILON = 0.01  # version 1: a visited decision node was frozen when min(p, 1 - p) < epsilon


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in bits with H(0) = H(1) = 0 (NaN stays NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 1.0 - p
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return np.where(np.isnan(p), np.nan, h)


def entropy_bits(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (bits) of the distribution proportional to `counts` along `axis` (NaN if empty)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = counts / total
        terms = np.where(q > 0, q * np.log2(q), 0.0)
    h = -terms.sum(axis=axis)
    return np.where(np.squeeze(total, axis=axis) > 0, h, np.nan)


def entropy_miller_madow(counts: np.ndarray) -> float:
    """Plug-in entropy (bits) with the Miller-Madow bias correction (m - 1) / (2N ln 2)."""
    counts = counts[counts > 0]
    total = counts.sum()
    if total == 0:
        return float("nan")
    return float(entropy_bits(counts) + (len(counts) - 1) / (2 * total * np.log(2)))


def gini(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Gini coefficient along `axis`: 0 when all equal, (n-1)/n when one holds everything."""
    x = np.sort(np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1), axis=-1)
    n = x.shape[-1]
    total = x.sum(-1)
    rank = np.arange(1, n + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (2.0 * (rank * x).sum(-1)) / (n * total) - (n + 1.0) / n
    return np.where(total > 0, g, np.nan)


def right_share(visits: np.ndarray, right: np.ndarray) -> np.ndarray:
    """p_n = right / visits per decision node; NaN where a node got no tokens."""
    visits = np.asarray(visits, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(visits > 0, np.asarray(right, dtype=np.float64) / visits, np.nan)


def is_frozen(visits: np.ndarray, right: np.ndarray, epsilon: float = FROZEN_EPSILON) -> np.ndarray:
    """Version 1's frozen count (no test): a visited node whose minority share min(p, 1 - p) < epsilon. Kept for
    comparisons (benchmarks/window_stability.py); v2's calibrated test is calibrated.frozen_side."""
    p = right_share(visits, right)
    with np.errstate(invalid="ignore"):
        return (np.asarray(visits) > 0) & (np.minimum(p, 1 - p) < epsilon)


def node_moments(visits: np.ndarray, act_sum: np.ndarray, act_sqsum: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Node drift: mu_n = act_sum / visits and sigma_n = sqrt(act_sqsum / visits - mu_n^2) (NaN where
    unvisited; sigma None without act_sqsum). The one place μ_n and σ_n are computed."""
    visits = np.asarray(visits, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = np.where(visits > 0, np.asarray(act_sum, dtype=np.float64) / visits, np.nan)
        if act_sqsum is None:
            return mu, None
        second = np.where(visits > 0, np.asarray(act_sqsum, dtype=np.float64) / visits, np.nan)
        return mu, np.sqrt(np.maximum(second - mu**2, 0))
