"""The pre-registered study's decision rules (notebooks/study/PROTOCOL.md, R1–R4), evaluated on run summaries
(`analysis.run_summary`). Written and tested before any study run, so the rules are code, not a reading.

Per run, a metric is the mean over tree layers of its `window_*` value ("end": the last quarter); ΔSF is the
static fraction at the end minus the quarter before; the drift slope is the Theil–Sen slope of the layers'
mean median μ_n/σ_n over interval ends. The tests are exact: a one-sided permutation test over every split of
two groups, and a one-sided sign-flip test over every sign pattern.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from routescope.analysis.groups import compare

CONTROLS = ("tanh-node", "identity-node", "gelu-output")
ASYMMETRIC = ("gelu-node", "relu-node")
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class RunValues:
    """One run's numbers for the rules; rss is NaN when no node was frozen."""

    arm: str
    seed: int
    rss: float
    sf: float
    dsf: float
    len_: float
    drift_slope: float
    val_loss: float


def arm_of(config: dict[str, Any]) -> str:
    """The study arm of a run's stored config: 'dense', or '<activation>-<placement>'."""
    model = config["preset"]["model"]
    return "dense" if model["mlp"] == "dense" else f"{model['activation']}-{model['placement']}"


def _layer_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def run_values(summary: xr.Dataset) -> RunValues:
    """The rules' inputs from one run summary (a dense run has only its val loss)."""
    config = json.loads(summary.attrs["config"])
    val = summary["val_loss"].values
    val_loss = float(val[np.isfinite(val)][-1]) if np.isfinite(val).any() else math.nan
    arm, seed = arm_of(config), int(config["preset"]["seed"])
    if "window_static_fraction" not in summary:
        return RunValues(arm, seed, *(math.nan,) * 5, val_loss)
    end, prev = (summary.sel(window=w) for w in ("end", "previous"))
    median = summary["drift_quantile"].sel(quantile=0.5).mean("layer", skipna=True).values
    steps = summary["step"].values.astype(np.float64)
    ok = np.isfinite(median)
    slope = float(stats.theilslopes(median[ok], steps[ok])[0]) if ok.sum() >= 2 else math.nan
    sf = _layer_mean(end["window_static_fraction"].values)
    return RunValues(arm, seed, _layer_mean(end["window_right_starved_share"].values), sf,
                     sf - _layer_mean(prev["window_static_fraction"].values),
                     _layer_mean(end["window_leaf_entropy_norm"].values), slope, val_loss)  # fmt: skip


def permutation_p(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided exact p of mean(a) − mean(b) ≥ observed, over every split of the pooled values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled, n = np.concatenate([a, b]), len(a)
    observed = a.mean() - b.mean()
    total = pooled.sum()
    diffs = [pooled[list(idx)].sum() / n - (total - pooled[list(idx)].sum()) / len(b)
             for idx in itertools.combinations(range(len(pooled)), n)]  # fmt: skip
    return float(np.mean(np.asarray(diffs) >= observed - 1e-12))


def sign_flip_p(d: np.ndarray) -> float:
    """One-sided exact p of mean(d) ≥ observed under sign symmetry, over every sign pattern."""
    d = np.asarray(d, dtype=np.float64)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float(np.mean((signs * d).mean(axis=1) >= d.mean() - 1e-12))


def welch(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """mean(a) − mean(b) with its Welch 95% interval and two-sided p (`groups.compare`, the report's statistics);
    with no spread the interval collapses to the difference."""
    c = compare("a", "b", np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), permutation=False)
    diff = c["diff"]
    p = c["welch_p"] if c["welch_p"] is not None else (0.0 if diff else 1.0)
    low = c["diff_low"] if c["diff_low"] is not None else diff
    return {"diff": diff, "low": low, "high": c["diff_high"] if c["diff_high"] is not None else diff, "p": p}


@dataclass
class Outcome:
    """A rule's verdict and the numbers behind it (JSON-ready through `as_dict`)."""

    rule: str
    outcome: str
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _by_arm(runs: list[RunValues], field: str) -> dict[str, np.ndarray]:
    arms: dict[str, list[float]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(getattr(run, field))
    return {arm: np.asarray(v, dtype=np.float64) for arm, v in arms.items()}


def _mechanism_fails(rss: dict[str, np.ndarray], slope: dict[str, np.ndarray]) -> tuple[dict[str, int], ...]:
    """R1's per-seed conditions, failing seeds per arm present: (a) RSS ≥ 0.6 (NaN fails) and (b) drift slope < 0
    for the asymmetric arms; (c) RSS in [0.4, 0.6] or no frozen nodes (NaN) for the controls."""
    fails_a = {arm: int(np.sum(~(rss[arm] >= 0.6))) for arm in ASYMMETRIC if arm in rss}
    fails_b = {arm: int(np.sum(~(slope[arm] < 0))) for arm in ASYMMETRIC if arm in slope}
    fails_c = {arm: int(np.sum(~(np.isnan(rss[arm]) | ((rss[arm] >= 0.4) & (rss[arm] <= 0.6))))) for arm in CONTROLS
               if arm in rss}  # fmt: skip
    return fails_a, fails_b, fails_c


def _one_sided(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """mean(a) − mean(b): its Welch interval and p, and the exact one-sided permutation p of a > b."""
    return {**welch(a, b), "permutation_p": permutation_p(a, b)}


def rule_mechanism(runs: list[RunValues]) -> Outcome:
    """R1: RSS ≥ 0.6 and drift slope < 0 in every seed of gelu-node and relu-node; RSS in [0.4, 0.6] or no frozen
    nodes in every seed of each control. Not supported when (a) or (c) fails in two or more seeds of an arm."""
    rss, slope = _by_arm(runs, "rss"), _by_arm(runs, "drift_slope")
    fails_a, fails_b, fails_c = _mechanism_fails(rss, slope)
    missing = [arm for arm in (*ASYMMETRIC, *CONTROLS) if arm not in rss]
    if missing:
        return Outcome("R1", INCONCLUSIVE, {"missing_arms": missing})
    if not any(fails_a.values()) and not any(fails_b.values()) and not any(fails_c.values()):
        verdict = SUPPORTED
    elif any(v >= 2 for v in (*fails_a.values(), *fails_c.values())):
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    details = {"seeds_failing_rss": {**fails_a, **fails_c}, "seeds_failing_drift": fails_b,
               "rss": {a: v.tolist() for a, v in rss.items() if a != "dense"},
               "drift_slope": {a: slope[a].tolist() for a in ASYMMETRIC}}  # fmt: skip
    return Outcome("R1", verdict, details)


def rule_auto_pruning(runs: list[RunValues]) -> Outcome:
    """R2: SF(gelu-node) > SF(control) for every control (exact permutation p < 0.05 each) and ΔSF(gelu-node) > 0
    (exact sign-flip p < 0.05); not supported when a mean difference or mean ΔSF is ≤ 0."""
    sf, dsf = _by_arm(runs, "sf"), _by_arm(runs, "dsf")
    if "gelu-node" not in sf or any(c not in sf for c in CONTROLS):
        return Outcome("R2", INCONCLUSIVE, {"missing_arms": [a for a in ("gelu-node", *CONTROLS) if a not in sf]})
    gelu = sf["gelu-node"]
    tests = {c: _one_sided(gelu, sf[c]) for c in CONTROLS}
    rising = {"mean": float(dsf["gelu-node"].mean()), "sign_flip_p": sign_flip_p(dsf["gelu-node"])}
    ps = [t["permutation_p"] for t in tests.values()] + [rising["sign_flip_p"]]
    if all(p < 0.05 for p in ps):
        verdict = SUPPORTED
    elif any(t["diff"] <= 0 for t in tests.values()) or rising["mean"] <= 0:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return Outcome("R2", verdict, {"against": tests, "rising": rising})


def rule_balance(runs: list[RunValues]) -> Outcome:
    """R3: LEN(gelu-output) > LEN(gelu-node), exact permutation p < 0.05; not supported when the mean difference ≤ 0."""
    ent = _by_arm(runs, "len_")
    if "gelu-output" not in ent or "gelu-node" not in ent:
        return Outcome("R3", INCONCLUSIVE, {"missing_arms": [a for a in ("gelu-output", "gelu-node") if a not in ent]})
    test = _one_sided(ent["gelu-output"], ent["gelu-node"])
    verdict = SUPPORTED if test["permutation_p"] < 0.05 else NOT_SUPPORTED if test["diff"] <= 0 else INCONCLUSIVE
    return Outcome("R3", verdict, test)


def rule_quality(runs: list[RunValues], margin: float = 0.05) -> Outcome:
    """R4 (descriptive): val loss of each tree arm − dense, Welch 95% interval; 'within 0.05 nats of dense' when the
    upper end < 0.05, 'worse than dense' when the lower end > 0, else 'not distinguished'."""
    loss = _by_arm(runs, "val_loss")
    if "dense" not in loss:
        return Outcome("R4", INCONCLUSIVE, {"missing_arms": ["dense"]})
    rows = {}
    for arm, values in loss.items():
        if arm == "dense":
            continue
        w = welch(values, loss["dense"])
        w["reading"] = "worse than dense" if w["low"] > 0 else f"within {margin} nats of dense" if w["high"] < margin \
            else "not distinguished"  # fmt: skip
        rows[arm] = w
    return Outcome("R4", "descriptive", rows)


def separated(a: np.ndarray, b: np.ndarray) -> bool:
    """True when every value of a exceeds every value of b (the direction holds in every pair of seeds)."""
    return bool(len(a) and len(b) and np.nanmin(a) > np.nanmax(b))


def replication(runs: list[RunValues]) -> list[Outcome]:
    """R1–R3 at the replication size (PROTOCOL.md: 3 seeds, fewer arms): each rule's direction checked in every
    seed of the arms that were run, p-values reported but not used. "replicated" when the direction holds in
    every seed, "not replicated" otherwise; R1 uses its own per-seed conditions on the arms present."""
    rss, slope, sf, dsf, ent = (_by_arm(runs, f) for f in ("rss", "drift_slope", "sf", "dsf", "len_"))
    out = []
    asym = [a for a in ASYMMETRIC if a in rss]
    controls = [c for c in CONTROLS if c in rss]
    if asym and controls:
        fails_a, drift, fails_c = _mechanism_fails(rss, slope)
        fails = {**fails_a, **fails_c}
        held = not any(fails.values()) and not any(drift.values())
        out.append(Outcome("R1", "replicated" if held else "not replicated", {
            "arms": asym + controls, "seeds_failing_rss": fails, "seeds_failing_drift": drift,
            "rss": {a: rss[a].tolist() for a in asym + controls}}))  # fmt: skip
    if "gelu-node" in sf and controls:
        against = {c: {**_one_sided(sf["gelu-node"], sf[c]), "every_seed": separated(sf["gelu-node"], sf[c])}
                   for c in controls}  # fmt: skip
        rising = {"mean": float(dsf["gelu-node"].mean()), "every_seed": bool(np.all(dsf["gelu-node"] > 0)),
                  "sign_flip_p": sign_flip_p(dsf["gelu-node"])}  # fmt: skip
        held = all(t["every_seed"] for t in against.values()) and rising["every_seed"]
        out.append(Outcome("R2", "replicated" if held else "not replicated", {"against": against, "rising": rising}))
    if "gelu-output" in ent and "gelu-node" in ent:
        test = {**_one_sided(ent["gelu-output"], ent["gelu-node"]),
                "every_seed": separated(ent["gelu-output"], ent["gelu-node"])}
        out.append(Outcome("R3", "replicated" if test["every_seed"] else "not replicated", test))
    return out + [rule_quality(runs)]


def regime_cell(summary: xr.Dataset) -> dict[str, Any]:
    """A regime-grid run's cell (activation, learning rate, tokens per step) and its end-of-training SF."""
    preset = json.loads(summary.attrs["config"])["preset"]
    return {"activation": preset["model"]["activation"], "lr": float(preset["lr"]),
            "tokens": int(preset["batch_size"] * preset["model"]["seq_len"]), "sf": run_values(summary).sf}  # fmt: skip


def regime_effects(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Exploratory (PROTOCOL.md, Regime): per activation, the main effect on SF of the higher learning rate and
    of the larger batch (mean over the other factor's levels), each a Welch difference with its 95% interval."""
    out: dict[str, Any] = {}
    for activation in sorted({c["activation"] for c in cells}):
        part = [c for c in cells if c["activation"] == activation]
        effects = {}
        for factor in ("lr", "tokens"):
            low, high = min(c[factor] for c in part), max(c[factor] for c in part)
            effects[factor] = {"from": low, "to": high, **welch([c["sf"] for c in part if c[factor] == high],
                                                                [c["sf"] for c in part if c[factor] == low])}  # fmt: skip
        out[activation] = effects
    return out


def evaluate(runs: list[RunValues]) -> list[Outcome]:
    """R1–R4 on the runs of one size."""
    return [rule_mechanism(runs), rule_auto_pruning(runs), rule_balance(runs), rule_quality(runs)]
