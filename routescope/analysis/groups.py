"""Across-run statistics for `routescope report --group NAME=GLOB ...`: groups of runs compared metric by metric.

Each group is a set of run files (replicates, e.g. seeds of one configuration). Per (family, layer,
metric) and per group: n, mean, sd and a 95% t interval of the mean; per pair of groups: the
difference of means with its Welch 95% interval, Welch's t-test and a permutation test. A run
present twice (a copied file, the same seed and configuration) is counted once and listed as such.

`group_statistics` returns (JSON-ready: floats at full precision or None)::

    {"confidence": 0.95, "permutations": 9999, "window": "last-quarter" | ...,
     "groups": {name: {"runs": [paths counted], "files": int, "n": int, "configs": int | None}},
     "duplicates": [{"path", "same_as", "group"}],      # counted once: same seed and config hash
     "unknown_seed": [paths],                          # no seed in their config: never taken as duplicates
     "run": [ENTRY, ...],      # run-level means over layers, per family (ENTRY's "layer" is None)
     "metrics": [ENTRY, ...]}  # one per (family, layer, metric) that has a value in some run
    ENTRY = {"family", "layer", "metric",
             "groups": {name: {"n", "values", "mean", "sd", "ci_low", "ci_high"}},
             "comparisons": [{"a", "b", "diff", "diff_low", "diff_high", "welch_t", "welch_df", "welch_p",
                              "permutation_p", "exact"}]}  # all pairs (a, b) in group order; diff = mean a − mean b
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import itertools
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from scipy import stats

from routescope.analysis.calibrated import DEFAULT, Thresholds
from routescope.analysis.family import FAMILY_ANALYSES
from routescope.analysis.window import LAST_QUARTER, Window

CONFIDENCE = 0.95
PERMUTATIONS = 9999  # random permutations when the exact test would need more
PERMUTATION_SEED = 0  # fixed: the same files give the same p-values
BATCH_VALUES = 4_000_000  # permuted values held at once in a batch of permutation tests (32 MB)

# Config keys (at any depth) left out of a run's identity: where its output went, when and with which library
# versions it ran, free text, and the device and kernel backend, none of which changes what was trained (the
# device and backend change floating-point rounding, not the run: the same seed on another device is the
# same experiment, not an independent replicate). The seed is compared apart from the hash.
VOLATILE_KEYS = frozenset({
    "out", "output", "out_dir", "output_dir", "output_path", "logdir", "log_dir", "logging_dir", "run_dir",
    "save_dir", "checkpoint_dir", "ckpt_dir", "created", "timestamp", "date", "start_time", "end_time", "hostname",
    "host", "pid", "user", "version", "versions", "device", "backend", "description",
})  # fmt: skip
VOLATILE_SUFFIXES = ("_version",)

RunIdentity = tuple[int | None, str]  # (seed or None, config hash)


class GroupSpecError(ValueError):
    """A bad --group specification or a glob that matches no file; the message says which and why."""


# ---------------------------------------------------------------------------------------------- identity
def run_identity(path: str | Path) -> RunIdentity:
    """(seed, config hash) of a run file: two runs with equal identities are the same run, counted once."""
    from routescope.store.reader import RunFile

    with RunFile.open(path) as run:
        return config_identity(run.config)


def config_identity(config: dict[str, Any]) -> RunIdentity:
    """(seed, first 16 hex of the sha256 of the canonical config JSON without the seed and volatile keys)."""
    config = json.loads(json.dumps(config, default=str))  # a deep copy with JSON types
    seed = None
    # `routescope record` keeps the seed in the preset; a config handed to Recorder may have it on top. Both
    # leave the hash; the preset's is the run's seed where there are two.
    for holder in (config, config.get("preset")):
        if isinstance(holder, dict) and "seed" in holder:
            seed = holder.pop("seed")
    if seed is not None and not isinstance(seed, (int, str)):
        seed = str(seed)
    text = json.dumps(_stable(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return seed, hashlib.sha256(text.encode()).hexdigest()[:16]


def _stable(value: Any) -> Any:
    """The value without VOLATILE_KEYS and *_version keys, at any depth."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if k.lower() not in VOLATILE_KEYS and not k.lower().endswith(VOLATILE_SUFFIXES)}  # fmt: skip
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- groups
def expand_groups(specs: Iterable[str]) -> dict[str, list[Path]]:
    """{name: sorted run files} of "NAME=GLOB" specs (`**` matches folders at any depth), in the order given."""
    groups: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not name or not pattern:
            raise GroupSpecError(f"bad group {spec!r}: expected NAME=GLOB, e.g. gelu='runs/activation-gelu-s*.h5'")
        if name in groups:
            raise GroupSpecError(f"group {name!r} is given twice ({spec!r}); give each group one NAME=GLOB")
        matches = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            what = "only folders" if matches else "no file"
            raise GroupSpecError(f"group {name!r}: {pattern!r} matches {what}; give a glob of run files, "
                                 f"e.g. {name}='runs/*.h5' (quote it so that the shell does not expand it)")  # fmt: skip
        groups[name] = files
    if not groups:
        raise GroupSpecError("no groups: give at least one NAME=GLOB")
    return groups


def collect_groups(groups: dict[str, list[Path]], window: Window = LAST_QUARTER, layers: list[int] | None = None,
                   th: Thresholds = DEFAULT) -> dict[str, Any]:  # fmt: skip
    """The group statistics of run files: a report and an identity per file, then `group_statistics`."""
    from rich.progress import track

    from routescope.analysis.report import build_report

    files = [p for paths in groups.values() for p in paths]
    jobs = [(name, p) for name, paths in groups.items() for p in paths]
    reports: dict[str, list[dict[str, Any]]] = {name: [] for name in groups}
    for name, p in track(jobs, description="reports", transient=True, disable=len(jobs) < 4):
        reports[name].append(build_report(p, window, layers, th=th))
    identities = {str(p): run_identity(p) for p in files}
    result = group_statistics(reports, identities)
    result["thresholds"] = th.as_dict()
    return result


# ---------------------------------------------------------------------------------------------- statistics
def group_statistics(groups: dict[str, list[dict[str, Any]]], identities: dict[str, RunIdentity] | None = None,
                     ) -> dict[str, Any]:  # fmt: skip
    """Per-group summaries and pairwise tests of every metric of `build_report` reports (module docstring).

    identities: {report path: run_identity}; runs with equal identities (or the same path) are counted once,
    the first one kept. A run without a seed is never taken for another (replicates may share a config).
    """
    identities = identities or {}
    kept: dict[str, list[dict[str, Any]]] = {}
    seen: dict[Any, str] = {}
    duplicates, unknown_seed = [], []
    for name, reports in groups.items():
        kept[name] = []
        for report in reports:
            path = str(report["path"])
            identity = identities.get(path)
            if identity is not None and identity[0] is None and path not in unknown_seed:
                unknown_seed.append(path)
            keys: list[tuple[str, Any]] = [("path", str(Path(path).resolve()))]  # the same file, however named
            if identity is not None and identity[0] is not None:
                keys.append(("identity", tuple(identity)))
            first = next((seen[k] for k in keys if k in seen), None)
            if first is not None:
                duplicates.append({"path": path, "same_as": first, "group": name})
                continue
            for k in keys:
                seen[k] = path
            kept[name].append(report)
    names = list(kept)
    window = next((r["window"].get("span") for rs in kept.values() for r in rs if r.get("window")), None)
    metric_rows, run_rows = [], []
    pending: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []  # comparisons awaiting their permutation p
    for family in FAMILY_ANALYSES.values():
        keys = tuple(m.key for m in (*family.metrics, *family.extra_columns))
        indices = sorted({lay["layer"] for rs in kept.values() for r in rs for lay in r["layers"]
                          if lay["family"] == family.name})  # fmt: skip
        for index in indices:
            for key in keys:
                values = {name: [_layer_value(r, family.name, index, key) for r in kept[name]] for name in names}
                entry = _entry(family.name, index, key, values, pending)
                if entry is not None:
                    metric_rows.append(entry)
        for key in family.keys:
            values = {name: [r.get("families", {}).get(family.name, {}).get(key) for r in kept[name]] for name in names}
            entry = _entry(family.name, None, key, values, pending)
            if entry is not None:
                run_rows.append(entry)
    for (comparison, _, _), p in zip(pending, permutation_pvalues([(x, y) for _, x, y in pending])):
        comparison["permutation_p"] = p
    return {
        "confidence": CONFIDENCE,
        "permutations": PERMUTATIONS,
        "window": window,
        "groups": {name: {"runs": [str(r["path"]) for r in kept[name]], "files": len(groups[name]), "n": len(kept[name]),
                          "configs": _configs(kept[name], identities)} for name in names},  # fmt: skip
        "duplicates": duplicates,
        "unknown_seed": unknown_seed,
        "run": run_rows,
        "metrics": metric_rows,
    }


def _configs(reports: list[dict[str, Any]], identities: dict[str, RunIdentity]) -> int | None:
    """How many configurations (config hashes) the runs of a group have; None where some run's is unknown."""
    hashes = [identities.get(str(r["path"])) for r in reports]
    return len({h[1] for h in hashes}) if all(h is not None for h in hashes) else None


def _layer_value(report: dict[str, Any], family: str, index: int, key: str) -> Any:
    """A metric of one layer of a report (None where the layer or the metric is missing)."""
    return next((lay.get(key) for lay in report["layers"] if lay["family"] == family and lay["layer"] == index), None)


def _entry(family: str, layer: int | None, key: str, values: dict[str, list[Any]],
           pending: list[tuple[dict[str, Any], np.ndarray, np.ndarray]]) -> dict[str, Any] | None:  # fmt: skip
    """One metric's per-group summaries and pairwise comparisons, their permutation tests left to `pending`
    (run in batches: one scipy call for every metric of the same group sizes); None when no run has a value."""
    samples = {name: _finite(v) for name, v in values.items()}
    if not any(len(s) for s in samples.values()):
        return None
    comparisons = []
    for a, b in itertools.combinations(samples, 2):
        comparisons.append(compare(a, b, samples[a], samples[b], permutation=False))
        if comparisons[-1]["exact"] is not None:
            pending.append((comparisons[-1], samples[a], samples[b]))
    return {"family": family, "layer": layer, "metric": key, "groups": {name: summarize(s) for name, s in samples.items()},
            "comparisons": comparisons}  # fmt: skip


def _finite(values: Iterable[Any]) -> np.ndarray:
    """The finite values (None, NaN and inf dropped) as float64."""
    out = np.array([v for v in values if v is not None], dtype=float)
    return out[np.isfinite(out)]


def summarize(x: np.ndarray) -> dict[str, Any]:
    """n, the values, mean, sd and the t interval of the mean (sd and interval None under 2 values)."""
    n = len(x)
    out: dict[str, Any] = {"n": n, "values": [float(v) for v in x], "mean": float(np.mean(x)) if n else None,
                           "sd": None, "ci_low": None, "ci_high": None}  # fmt: skip
    if n >= 2:
        sd = float(np.std(x, ddof=1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def compare(a: str, b: str, x: np.ndarray, y: np.ndarray, permutation: bool = True) -> dict[str, Any]:
    """Mean of a − mean of b, its Welch interval, Welch's t-test and a two-sided permutation test of it.

    Under 2 values in either group only the difference (None without values); where both groups are
    constant Welch's statistics are undefined (None) and the permutation test still answers (permutation=False:
    left None, for `permutation_pvalues` to fill in).
    """
    out: dict[str, Any] = {"a": a, "b": b, "diff": float(np.mean(x) - np.mean(y)) if len(x) and len(y) else None,
                           "diff_low": None, "diff_high": None, "welch_t": None, "welch_df": None, "welch_p": None,
                           "permutation_p": None, "exact": None}  # fmt: skip
    nx, ny = len(x), len(y)
    if nx < 2 or ny < 2:
        return out
    vx, vy = np.var(x, ddof=1) / nx, np.var(y, ddof=1) / ny
    se = math.sqrt(vx + vy)
    if se > 0:
        df = float((vx + vy) ** 2 / (vx**2 / (nx - 1) + vy**2 / (ny - 1)))  # Welch–Satterthwaite
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
        with warnings.catch_warnings():  # near-identical values: scipy warns of cancellation, the answer stands
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_ind(x, y, equal_var=False)
        out.update(diff_low=out["diff"] - half, diff_high=out["diff"] + half, welch_t=_float(test.statistic),
                   welch_df=df, welch_p=_float(test.pvalue))  # fmt: skip
    out["exact"] = math.comb(nx + ny, nx) <= PERMUTATIONS
    if permutation:
        out["permutation_p"] = permutation_pvalues([(x, y)])[0]
    return out


def permutation_pvalues(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[float | None]:
    """Two-sided permutation p-values of mean(x) − mean(y), exact up to PERMUTATIONS splits, else PERMUTATIONS
    seeded random ones. Pairs of the same sizes go through one scipy call, as columns of one array (fast: one
    set of permutations for every metric)."""
    out: list[float | None] = [None] * len(pairs)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(pairs):
        by_size.setdefault((len(x), len(y)), []).append(i)
    for (nx, ny), rows in by_size.items():
        xs, ys = np.stack([pairs[i][0] for i in rows], axis=1), np.stack([pairs[i][1] for i in rows], axis=1)
        batch = max(1, BATCH_VALUES // ((nx + ny) * len(rows)))  # permutations at once: bounded memory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.permutation_test((xs, ys), _mean_difference, permutation_type="independent", vectorized=True,
                                          n_resamples=PERMUTATIONS, batch=batch, alternative="two-sided", axis=0,
                                          **{_RNG: np.random.default_rng(PERMUTATION_SEED)})  # fmt: skip
        for i, p in zip(rows, np.atleast_1d(test.pvalue)):
            out[i] = _float(p)
    return out


# scipy >= 1.15 takes `rng`; older releases (the project allows 1.10) `random_state`
_RNG = "rng" if "rng" in inspect.signature(stats.permutation_test).parameters else "random_state"


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _float(value: Any) -> float | None:
    """A float for JSON; None for NaN or inf."""
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- table
def _num(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _p(value: float | None) -> str:
    return "–" if value is None else "<0.001" if value < 0.001 else f"{value:.3f}"


def _interval(mean: float | None, low: float | None, high: float | None) -> str:
    return _num(mean) if low is None else f"{_num(mean)} [{_num(low)}, {_num(high)}]"


def group_table(result: dict[str, Any]) -> Group:
    """One row per (layer, metric): per group "mean [95% CI] (n)"; per pair the difference, its interval and
    the Welch and permutation p-values; then notes on duplicates and runs without a seed."""
    names = list(result["groups"])
    pairs = list(itertools.combinations(names, 2))
    span = {"last-quarter": "the last quarter of each run", "all": "whole runs"}.get(result.get("window") or "",
                                                                                    f"window {result.get('window')}")
    sizes = ", ".join(f"{name}: {g['n']} run{'s' * (g['n'] != 1)}" for name, g in result["groups"].items())
    table = Table(title=f"groups over {span} ({sizes})", box=None, padding=(0, 1), collapse_padding=True)
    table.add_column("layer", justify="right")
    table.add_column("metric")
    for name in names:
        table.add_column(f"{name}\nmean [95% CI] (n)", justify="right")
    for a, b in pairs:
        table.add_column(f"{a} − {b}\n[95% Welch CI]", justify="right")
        table.add_column("p\nWelch / perm.", justify="right")
    shown = {family.name: {m.key: m.short for m in family.columns} for family in FAMILY_ANALYSES.values()}
    for family in FAMILY_ANALYSES.values():
        rows = [e for e in result["metrics"] if e["family"] == family.name]
        rows += [e for e in result["run"] if e["family"] == family.name]
        for entry in rows:
            short = shown[family.name].get(entry["metric"])
            if short is None:  # a metric the report's table leaves out too (it is in the JSON)
                continue
            index = "mean" if entry["layer"] is None else str(entry["layer"])
            layer = index if family.name == "tree" else f"{family.name} {index}"
            cells = []
            for name in names:
                g = entry["groups"][name]
                cells.append(f"{_interval(g['mean'], g['ci_low'], g['ci_high'])} ({g['n']})" if g["n"] else "–")
            for c in entry["comparisons"]:
                cells.append(_interval(c["diff"], c["diff_low"], c["diff_high"]))
                cells.append("–" if c["permutation_p"] is None else f"{_p(c['welch_p'])} / {_p(c['permutation_p'])}")
            table.add_row(layer, short, *cells)
    notes: list[Any] = [table]
    if pairs:
        notes.append(Text(f"layer 'mean': the run's mean over its layers. p: Welch's t-test / a two-sided permutation "
                          f"test of the difference in means (exact up to {PERMUTATIONS} permutations, else "
                          f"{PERMUTATIONS} random ones).", style="dim"))  # fmt: skip
    mixed = [f"{name} ({g['configs']})" for name, g in result["groups"].items() if (g.get("configs") or 0) > 1]
    if mixed:
        notes.append(Text(f"groups whose runs differ in configuration, not only in seed: {', '.join(mixed)}.",
                          style="yellow"))  # fmt: skip
    small = [name for name, g in result["groups"].items() if g["n"] < 2]
    if small:
        notes.append(Text(f"{', '.join(small)}: under 2 runs, so no interval and no tests.", style="yellow"))
    dups = result["duplicates"]
    if dups:
        listed = ", ".join(f"{d['path']} = {d['same_as']}" for d in dups)
        notes.append(Text(f"{len(dups)} run{'s' * (len(dups) != 1)} identical to others (same seed and config hash) "
                          f"{'were' if len(dups) != 1 else 'was'} counted once: {listed}", style="yellow"))  # fmt: skip
    if result.get("unknown_seed"):
        notes.append(Text(f"{len(result['unknown_seed'])} run(s) have no seed in their config: copies of them cannot "
                          "be told from replicates, so each was counted.", style="dim"))  # fmt: skip
    return Group(*notes)
