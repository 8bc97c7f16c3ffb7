"""The early warning of pruning deaths, scored on held-out later intervals of the run itself against two
baselines: the trivial rule "the minority child got ≤ 1 token in the last interval" and a random flagger
with the same number of flags (docs/metrics.md, "Early warning").

Candidates are (interval, child) pairs under a live parent; the predictor is a logistic model of the
parent's split fitted on the earlier half of the scorable intervals. Its flags are shown only when the
95% bootstrap interval of its F1 gain over the trivial rule excludes zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy.optimize import minimize
from scipy.special import expit, gammaln

from routescope.analysis.calibrated import DEFAULT, LIVE, Thresholds
from routescope.analysis.events import History, death_intervals, history, pick_at

FLAG_COLUMNS = ["step", "layer", "tree", "node", "child", "score", "child_died"]
HORIZON = 5  # intervals ahead in which a flagged child must die for the flag to count


@dataclass
class Score:
    """How a set of flags did on the scored intervals: flags are (interval, child) pairs."""

    flags: int
    true_flags: int  # flags whose child died (pruning root) within the horizon after
    deaths: int  # pruning-root deaths a flag could have predicted (some candidate pair in their horizon)
    detected: int  # of those, deaths with at least one true flag
    expected: bool = False  # a random flagger's expectation, not a count

    @property
    def precision(self) -> float:
        return self.true_flags / self.flags if self.flags else float("nan")

    @property
    def recall(self) -> float:
        return self.detected / self.deaths if self.deaths else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else (0.0 if self.flags else float("nan"))

    def as_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {"flags": self.flags, "true_flags": self.true_flags, "deaths": self.deaths, "detected": self.detected,
                "precision": num(self.precision), "recall": num(self.recall), "f1": num(self.f1)}  # fmt: skip


@dataclass
class WarningReport:
    """The early warning's evaluation on held-out later intervals, with both baselines, and the flags shown."""

    flags: pd.DataFrame  # FLAG_COLUMNS: the predictor's flags if it beats the trivial rule, else the trivial rule's
    source: str  # "predictor" or "trivial rule": whose flags `flags` holds
    verdict: str  # one line for the report and the dashboard
    horizon: int
    train_steps: tuple[int, int] | None
    test_steps: tuple[int, int] | None
    predictor: Score | None
    trivial: Score | None
    random: Score | None  # a random flagger with the predictor's number of flags (its expectation)
    random_trivial: Score | None = None  # ... with the trivial rule's number of flags
    coefficients: dict[str, float] = field(default_factory=dict)
    comparison: dict[str, float] = field(default_factory=dict)  # F1(predictor) − F1(trivial), interval, p

    @property
    def beats_trivial(self) -> bool:
        return self.source == "predictor"

    @property
    def precision(self) -> float:
        shown = self.predictor if self.beats_trivial else self.trivial
        return shown.precision if shown else float("nan")

    @property
    def recall(self) -> float:
        shown = self.predictor if self.beats_trivial else self.trivial
        return shown.recall if shown else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: verdict, scores, lifts and the split."""

        def lift(a: Score | None, b: Score | None) -> float | None:
            if a is None or b is None or not (a.precision > 0 or b.precision > 0) or not b.precision > 0:
                return None
            return float(a.precision / b.precision)

        return {
            "verdict": self.verdict, "flags_shown": self.source, "horizon": self.horizon,
            "train_steps": list(self.train_steps) if self.train_steps else None,
            "test_steps": list(self.test_steps) if self.test_steps else None,
            "predictor": self.predictor.as_dict() if self.predictor else None,
            "trivial": self.trivial.as_dict() if self.trivial else None,
            "random": self.random.as_dict() if self.random else None,
            "random_trivial": self.random_trivial.as_dict() if self.random_trivial else None,
            "lift_over_random": lift(self.predictor, self.random),
            "lift_over_trivial": lift(self.predictor, self.trivial),
            "trivial_lift_over_random": lift(self.trivial, self.random_trivial),
            "coefficients": self.coefficients,
            "predictor_vs_trivial": self.comparison or None,
        }  # fmt: skip


FEATURES = ("log_child_last", "log_child_window", "child_share_window", "log_parent_last", "parent_drift_toward",
            "parent_drift_trend", "trivial_rule")  # fmt: skip


@dataclass
class Pairs:
    """Candidate (interval, child) pairs: a child not yet dead under a parent live in that interval's window."""

    index: np.ndarray  # (P, 4): interval, layer, tree, child unit
    features: np.ndarray  # (P, len(FEATURES))
    label: np.ndarray  # died (pruning root) within the horizon after the interval
    known: np.ndarray  # the label is known: the horizon (and K confirming windows) fit inside the run
    trivial: np.ndarray  # the trivial rule's flag


def candidate_pairs(h: History, horizon: int) -> Pairs:
    """Every candidate pair of the run, its features, label and the trivial rule's flag."""
    n, k = len(h.steps), h.th.persistence
    units = h.state.shape[-1]
    parents = np.maximum((np.arange(units) - 1) // 2, 0)
    start, confirmed = death_intervals(h)
    parent_live_at_death = pick_at(h.state[..., parents], start) == LIVE
    root_death = np.where(confirmed & parent_live_at_death, start, -1)  # (layer, tree, unit)
    interval = np.arange(n)[:, None, None, None]
    alive_yet = (start < 0) | (interval < start)
    cand = (h.state[..., parents] == LIVE) & (h.state >= 0) & alive_yet
    cand[..., 0] = False
    idx = np.argwhere(cand)
    i, lay, tr, c = idx.T
    p = parents[c]
    sibling = np.where(c % 2 == 1, c + 1, c - 1)
    child_last = h.visits[i, lay, tr, c].astype(np.float64)
    sibling_last = h.visits[i, lay, tr, sibling].astype(np.float64)
    parent_last = h.visits[i, lay, tr, p].astype(np.float64)
    child_window, parent_window = h.rolling_visits[i, lay, tr, c], h.rolling_visits[i, lay, tr, p]
    toward = np.where(c % 2 == 0, 1.0, -1.0)  # z > 0 goes right (even units are right children)
    drift_now = h.drift[i, lay, tr, p].astype(np.float64) * toward
    drift_then = h.drift[np.maximum(i - k, 0), lay, tr, p].astype(np.float64) * toward
    trivial = (child_last <= 1) & (child_last <= sibling_last) & (parent_last > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(parent_window > 0, child_window / parent_window, 0.5)
    features = np.stack([np.log1p(child_last), np.log1p(child_window), share, np.log1p(parent_last),
                         np.nan_to_num(drift_now), np.nan_to_num(drift_now - drift_then), trivial.astype(np.float64)], 1)  # fmt: skip
    death = root_death[lay, tr, c]
    label = (death > i) & (death <= i + horizon)
    known = i + horizon <= n - k  # a death after the horizon's end could not be confirmed before the run's end
    return Pairs(idx, features, label, known | label, trivial)


def _score(flagged: np.ndarray, pairs: Pairs, rows: np.ndarray) -> Score:
    """The flags among `rows` against the pairs' labels; deaths are counted per child unit."""
    f, y = flagged[rows], pairs.label[rows]
    child = [tuple(r) for r in pairs.index[rows][:, 1:]]
    deaths = {c for c, pos in zip(child, y) if pos}
    detected = {c for c, pos, fl in zip(child, y, f) if pos and fl}
    return Score(int(f.sum()), int((f & y).sum()), len(deaths), len(detected))


def f1_difference(a: np.ndarray, b: np.ndarray, pairs: Pairs, rows: np.ndarray, resamples: int = 2000,
                  seed: int = 0) -> dict[str, float]:  # fmt: skip
    """F1(a) − F1(b) of two flag sets on the same rows, with a 95% bootstrap interval and one-sided p-value
    (P(difference ≤ 0)) that resample child units, the independent clusters of pairs, with replacement."""
    _, unit = np.unique(pairs.index[rows][:, 1:], axis=0, return_inverse=True)
    unit = unit.ravel()
    units = int(unit.max()) + 1 if len(unit) else 0
    y = pairs.label[rows]

    def per_unit(flagged: np.ndarray) -> np.ndarray:  # flags, true flags, death, detected per child unit
        f = flagged[rows]
        cols = [np.bincount(unit, weights=w.astype(np.float64), minlength=units) for w in (f, f & y, y, f & y)]
        cols[2], cols[3] = cols[2] > 0, cols[3] > 0
        return np.stack(cols, 1).astype(np.float64)

    stats_a, stats_b = per_unit(a), per_unit(b)

    def f1(totals: np.ndarray) -> np.ndarray:
        flags, true, deaths, detected = np.moveaxis(totals, -1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            p, r = true / flags, detected / deaths
            return np.nan_to_num(2 * p * r / (p + r))

    observed = float(f1(stats_a.sum(0)) - f1(stats_b.sum(0)))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, 250):  # chunks keep the weight matrix small
        w = rng.multinomial(units, np.full(units, 1 / units), size=min(250, resamples - start)).astype(np.float64)
        diffs.append(f1(w @ stats_a) - f1(w @ stats_b))
    d = np.concatenate(diffs) if units else np.zeros(1)
    low, high = np.quantile(d, [0.025, 0.975])
    return {"f1_difference": observed, "f1_difference_low": float(low), "f1_difference_high": float(high),
            "p_value": float((1 + (d <= 0).sum()) / (1 + len(d)))}  # fmt: skip


def _random_score(flags: int, pairs: Pairs, rows: np.ndarray) -> Score:
    """A random flagger's expectation with `flags` flags among these rows: precision = the positive share;
    a death is detected unless none of its positive pairs is drawn (hypergeometric)."""
    total, y = len(rows), pairs.label[rows]
    child = [tuple(r) for r in pairs.index[rows][:, 1:]]
    per_death: dict[tuple[int, ...], int] = {}
    for c, pos in zip(child, y):
        if pos:
            per_death[c] = per_death.get(c, 0) + 1
    flags = min(flags, total)

    def miss(h: int) -> float:  # C(total − h, flags) / C(total, flags)
        if flags > total - h:
            return 0.0
        return math.exp(gammaln(total - h + 1) - gammaln(total - h - flags + 1) - gammaln(total + 1) + gammaln(total - flags + 1))

    detected = sum(1 - miss(h) for h in per_death.values())
    true_flags = flags * y.mean() if total else 0.0
    return Score(flags, true_flags, len(per_death), detected, expected=True)  # type: ignore[arg-type]


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logistic regression on standardized features (L-BFGS, L2 penalty): (weights with bias, mean, scale)."""
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = z @ w
        p = expit(s)
        value = np.logaddexp(0, s).sum() - (y * s).sum() + l2 * (w[:-1] ** 2).sum()
        grad = z.T @ (p - y) + np.concatenate([2 * l2 * w[:-1], [0.0]])
        return float(value), grad

    w = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return w, mean, scale


def _predict(x: np.ndarray, model: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    w, mean, scale = model
    return expit(np.hstack([(x - mean) / scale, np.ones((len(x), 1))]) @ w)


def _best_threshold(score: np.ndarray, y: np.ndarray) -> float:
    """The score threshold with the highest F1 on the training pairs."""
    order = np.argsort(-score)
    tp = np.cumsum(y[order])
    flagged = np.arange(1, len(order) + 1)
    f1 = 2 * tp / (flagged + y.sum())
    best = int(np.argmax(f1))
    return float(score[order][best])


def early_warnings(ds: xr.Dataset, horizon: int = HORIZON, th: Thresholds = DEFAULT,
                   layers: list[int] | None = None) -> WarningReport:  # fmt: skip
    """Fit the warning on the earlier half of the run's scorable intervals, score it and both baselines on
    the later half, and return the flags to show (the predictor's only if it beats the trivial rule)."""
    h = history(ds, th, layers)
    pairs = candidate_pairs(h, horizon)
    i = pairs.index[:, 0]
    scorable = np.unique(i[pairs.known])
    trivial_flags = _flag_table(h, pairs, pairs.trivial, pairs.trivial.astype(np.float64))
    if len(scorable) < 2 or not pairs.label.any():
        why = "no pruning-root death to predict" if not pairs.label.any() else "too few intervals to hold any out"
        return WarningReport(trivial_flags, "trivial rule", f"not evaluated ({why}); showing the trivial rule's flags",
                             horizon, None, None, None, None, None)  # fmt: skip
    cut = scorable[len(scorable) // 2]
    train, test = np.flatnonzero(pairs.known & (i < cut)), np.flatnonzero(pairs.known & (i >= cut))
    split = (int(h.steps[scorable[0]]), int(h.steps[cut - 1])), (int(h.steps[cut]), int(h.steps[scorable[-1]]))
    trivial = _score(pairs.trivial, pairs, test)
    random_trivial = _random_score(trivial.flags, pairs, test)
    if pairs.label[train].sum() < 2:
        verdict = "no better than the trivial rule (under 2 deaths to learn from in the earlier half); showing its flags"
        return WarningReport(trivial_flags, "trivial rule", verdict, horizon, *split, None, trivial, None, random_trivial)
    model = _fit_logistic(pairs.features[train], pairs.label[train].astype(np.float64))
    prob = _predict(pairs.features, model)
    flagged = prob >= _best_threshold(prob[train], pairs.label[train])
    predictor = _score(flagged, pairs, test)
    random = _random_score(predictor.flags, pairs, test)
    comparison = f1_difference(flagged, pairs.trivial, pairs, test)
    beats = comparison["f1_difference_low"] > 0  # the 95% interval of the F1 difference excludes zero
    coefficients = {name: float(w) for name, w in zip((*FEATURES, "bias"), model[0])}
    gap = (f"F1 {predictor.f1:.2f} vs {trivial.f1:.2f}, difference 95% interval [{comparison['f1_difference_low']:.2f}, "
           f"{comparison['f1_difference_high']:.2f}], p = {comparison['p_value']:.3g}")  # fmt: skip
    if beats:
        verdict = f"beats the trivial rule on held-out steps {split[1][0]}–{split[1][1]}: {gap}"
        flags = _flag_table(h, pairs, flagged, prob)
    else:
        verdict = (f"no better than the trivial rule on held-out steps {split[1][0]}–{split[1][1]} ({gap}); showing the "
                   "trivial rule's flags")  # fmt: skip
        flags = trivial_flags
    return WarningReport(flags, "predictor" if beats else "trivial rule", verdict, horizon, *split, predictor, trivial, random,
                         random_trivial, coefficients, comparison)  # fmt: skip


def _flag_table(h: History, pairs: Pairs, flagged: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    """The first flag of each child (FLAG_COLUMNS); child_died is None where the outcome is not known yet."""
    rows = np.flatnonzero(flagged)
    seen: set[tuple[int, int, int]] = set()
    out = []
    for r in rows[np.lexsort((pairs.index[rows, 0],))]:
        i, lay, tr, c = (int(v) for v in pairs.index[r])
        if (lay, tr, c) in seen:
            continue
        seen.add((lay, tr, c))
        died = bool(pairs.label[r]) if pairs.known[r] else None
        out.append([int(h.steps[i]), lay, tr, (c - 1) // 2, c, float(score[r]), died])
    return pd.DataFrame(out, columns=FLAG_COLUMNS)
