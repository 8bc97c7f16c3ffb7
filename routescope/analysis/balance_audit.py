"""Balance-loss audit for MoE layers: is the load-balancing loss the model reports the one its routing implies?

From the recorded counts, per interval and layer, the Switch/GShard loss is L = E · Σ_e f_e · P_e, with f_e the
share of the interval's selections that went to expert e (`coselect`'s diagonal / (k · tokens)) and P_e the
mean router probability of e (`router_prob_sum / tokens`). The model's total is expected at Σ_layers c_l · L_l
(c_l: the layer's `balance_coef`). The reported loss is the run scalar `balance_loss`: record it with
`Recorder(scalars=(..., "balance_loss"))` and `rec.step(balance_loss=aux)` (`routescope record` does).

A mismatch beyond the tolerance is flagged with its likely cause:
- **not added**: the reported loss is about 0 while the layers have a coefficient (an aux loss computed but
  never added, or switched off by default);
- **softmax applied twice**: the reported loss sits at Σ c_l (its value for uniform router probabilities —
  a second softmax over probabilities flattens them) while the routing is measurably unbalanced;
- **wrong scaling**: reported / expected is steady but not 1 (e.g. E, k or 1/E off).
Intervals use the last `balance_loss` logged in them against the interval's aggregate f and P, so each
ratio is noisy: the verdict uses the median over the window's intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from routescope.analysis.families import family_layers

TOLERANCE = 0.15  # relative: a median ratio within 1 ± 0.15 passes


def recomputed_balance(moe: xr.Dataset) -> np.ndarray:
    """(step, layer) E · Σ_e f_e P_e from the recorded selections and router probabilities (NaN without tokens)."""
    layers = family_layers(moe, "moe")
    out = np.full((moe.sizes["step"], len(layers)), np.nan)
    tokens = moe["layer_tokens"].values if "layer_tokens" in moe else np.repeat(moe["tokens"].values[:, None], len(layers), 1)
    for row, layer in enumerate(layers):
        e, k = layer.width, layer.k
        selections = np.diagonal(moe["coselect"].isel(layer=row).values, axis1=-2, axis2=-1)[:, :e].astype(np.float64)
        n = tokens[:, row].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = selections / (k * n[:, None])
            p = moe["router_prob_sum"].isel(layer=row).values[:, :e] / n[:, None]
            out[:, row] = np.where(n > 0, e * (f * p).sum(-1), np.nan)
    return out


def balance_series(moe: xr.Dataset, run: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Per interval of `moe`: each layer's L (step, layer), the expected total Σ c_l · L_l, the reported
    `balance_loss` at the same interval ends (None when not recorded), and Σ c_l (the loss of uniform router
    probabilities: E · Σ f_e / E = 1 per layer)."""
    coefs = np.array([float(layer.config.get("balance_coef", 0.0)) for layer in family_layers(moe, "moe")])
    per_layer = recomputed_balance(moe)
    reported = None
    if "balance_loss" in run and np.isfinite(run["balance_loss"].values).any():
        reported = np.interp(moe["step"].values, run["step"].values, run["balance_loss"].values)
    return per_layer, (per_layer * coefs[None, :]).sum(1), reported, float(coefs.sum())


def balance_audit(moe: xr.Dataset, run: xr.Dataset, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The audit of one run (both Datasets over the same window): status ("ok", "flagged", "not recorded",
    "off"), cause, the median ratio reported / expected, and the means behind it (JSON-ready)."""
    layers = family_layers(moe, "moe")
    per_layer, expected, reported, flat = balance_series(moe, run)
    out: dict[str, Any] = {"status": "not recorded", "cause": None, "ratio": None, "tolerance": tolerance,
                           "expected_mean": _mean(expected), "reported_mean": None, "uniform_value": flat,
                           "recomputed_per_layer": [_mean(per_layer[:, i]) for i in range(len(layers))]}  # fmt: skip
    if reported is None:
        if flat == 0:
            out["status"] = "off"  # no layer has a balance loss, and none is reported
        else:
            out["cause"] = "no balance_loss in the run: record it with Recorder(scalars=(..., 'balance_loss'))"
        return out
    ok = np.isfinite(reported) & np.isfinite(expected)
    out["reported_mean"] = _mean(reported[ok])
    if flat == 0:
        small = np.nanmedian(np.abs(reported[ok])) <= 1e-9
        out.update(status="off" if small else "flagged",
                   cause=None if small else "a balance loss is reported but no layer has a balance_coef")
        return out
    ratio = float(np.median(reported[ok] / expected[ok]))
    out["ratio"] = ratio
    unbalanced = np.median(expected[ok]) > flat * (1 + tolerance)
    if abs(ratio - 1) <= tolerance:
        out["status"] = "ok"
    elif abs(ratio) < tolerance:
        out.update(status="flagged", cause="not added: the reported balance loss is about 0 while the layers have a "
                   "balance_coef (computed but never added to the training loss?)")  # fmt: skip
    elif unbalanced and abs(float(np.median(reported[ok])) / flat - 1) <= tolerance:
        out.update(status="flagged", cause="softmax applied twice: the reported loss sits at its value for uniform "
                   "router probabilities while the recorded routing is unbalanced")  # fmt: skip
    else:
        out.update(status="flagged", cause=f"wrong scaling: the reported loss is {ratio:.3g} × the recomputed one"
                   + _factor_hint(ratio, layers))  # fmt: skip
    return out


def _factor_hint(ratio: float, layers: list[Any]) -> str:
    """Name a likely factor (E, k, 1/E, 1/k) when the ratio is close to one."""
    if not layers:
        return ""
    e, k = layers[0].width, layers[0].k
    for name, value in (("E", e), ("1/E", 1 / e), ("k", k), ("1/k", 1 / k), ("E/k", e / k), ("k/E", k / e)):
        if value != 1 and abs(ratio / value - 1) <= TOLERANCE:
            return f" (about {name} = {value:.3g})"
    return ""


def _mean(values: np.ndarray) -> float | None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else None
