"""Across-run group statistics (routescope.analysis.groups): expected values computed here from scipy/numpy formulas."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from routescope.analysis.groups import (
    GroupSpecError,
    collect_groups,
    config_identity,
    expand_groups,
    group_statistics,
    group_table,
    run_identity,
)


def report(path: str, *values: float | None, metric: str = "balance", family: str = "tree") -> dict[str, Any]:
    """A fabricated build_report dict: one layer per value of `metric`; the run mean over the finite ones."""
    layers = [{"layer": i, "name": f"h.{i}", "family": family, "depth": 3, "trees": 2, metric: v} for i, v in enumerate(values)]
    finite = [v for v in values if v is not None]
    return {"schema_version": 1, "path": path, "window": {"span": "last-quarter"}, "layers": layers,
            "run": {metric: float(np.mean(finite)) if finite else None},
            "families": {family: {metric: float(np.mean(finite)) if finite else None}}}  # fmt: skip


def groups_of(**values: list[float | None]) -> dict[str, list[dict[str, Any]]]:
    """{name: one single-layer report per value}, paths NAME-i.h5."""
    return {name: [report(f"{name}-{i}.h5", v) for i, v in enumerate(vs)] for name, vs in values.items()}


def entry(result: dict[str, Any], layer: int | None = 0, metric: str = "balance") -> dict[str, Any]:
    rows = result["run"] if layer is None else result["metrics"]
    return next(e for e in rows if e["layer"] == layer and e["metric"] == metric)


def exact_permutation_p(x: list[float], y: list[float]) -> float:
    """Two-sided exact permutation p of mean(x) − mean(y) over every split of the pooled values (scipy's definition:
    twice the smaller one-sided p, at most 1)."""
    pooled, n = np.array(x + y, dtype=float), len(x)
    observed = np.mean(x) - np.mean(y)
    diffs = []
    for chosen in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), bool)
        mask[list(chosen)] = True
        diffs.append(pooled[mask].mean() - pooled[~mask].mean())
    diffs = np.array(diffs)
    tol = 1e-12 * max(1.0, abs(observed))
    greater, less = np.mean(diffs >= observed - tol), np.mean(diffs <= observed + tol)
    return min(1.0, 2 * min(greater, less))


def test_group_means_intervals_and_welch_match_the_formulas() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 5.0, 7.0, 9.0]
    result = group_statistics(groups_of(A=a, B=b))
    e = entry(result)
    for name, x in (("A", a), ("B", b)):
        g, n = e["groups"][name], len(x)
        mean, sd = np.mean(x), np.std(x, ddof=1)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        assert g["n"] == n and g["values"] == x
        assert g["mean"] == pytest.approx(mean, rel=1e-12) and g["sd"] == pytest.approx(sd, rel=1e-12)
        assert g["ci_low"] == pytest.approx(mean - half, rel=1e-12) and g["ci_high"] == pytest.approx(mean + half, rel=1e-12)
    (c,) = e["comparisons"]
    assert (c["a"], c["b"]) == ("A", "B")
    welch = stats.ttest_ind(a, b, equal_var=False)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 3)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert c["diff"] == pytest.approx(-3.5, rel=1e-12)
    assert c["welch_t"] == pytest.approx(welch.statistic, rel=1e-12) and c["welch_p"] == pytest.approx(welch.pvalue, rel=1e-12)
    assert c["welch_df"] == pytest.approx(df, rel=1e-12)
    assert c["diff_low"] == pytest.approx(-3.5 - half, rel=1e-12) and c["diff_high"] == pytest.approx(-3.5 + half, rel=1e-12)
    assert c["exact"] is True and c["permutation_p"] == pytest.approx(exact_permutation_p(a, b), rel=1e-9)
    assert result["groups"] == {"A": {"runs": [f"A-{i}.h5" for i in range(4)], "files": 4, "n": 4, "configs": None},
                                "B": {"runs": [f"B-{i}.h5" for i in range(4)], "files": 4, "n": 4, "configs": None}}  # fmt: skip
    # The run-level means get the same treatment; the whole result is plain JSON (no NaN, no numpy types).
    assert entry(result, None)["groups"]["B"]["mean"] == pytest.approx(6.0)
    json.dumps(result, allow_nan=False)


def test_permutation_p_is_exact_for_small_groups() -> None:
    separated = group_statistics(groups_of(A=[1, 2, 3, 4, 5], B=[11, 12, 13, 14, 15]))
    (c,) = entry(separated)["comparisons"]
    assert c["exact"] is True and c["permutation_p"] == pytest.approx(2 / math.comb(10, 5), rel=1e-12)
    same = group_statistics(groups_of(A=[1, 2, 3], B=[1, 2, 3]))
    (c,) = entry(same)["comparisons"]
    assert c["diff"] == 0 and c["permutation_p"] == pytest.approx(1.0) and c["welch_p"] == pytest.approx(1.0)


def test_large_groups_use_seeded_random_permutations() -> None:
    rng = np.random.default_rng(3)
    values = {"A": list(rng.normal(0, 1, 12)), "B": list(rng.normal(0.5, 1, 12))}  # C(24, 12) > 9999
    first, again = (entry(group_statistics(groups_of(**values)))["comparisons"][0] for _ in range(2))
    assert first["exact"] is False and first["permutation_p"] == again["permutation_p"]
    assert first["welch_p"] == pytest.approx(stats.ttest_ind(values["A"], values["B"], equal_var=False).pvalue, rel=1e-12)
    assert abs(first["permutation_p"] - first["welch_p"]) < 0.1  # both test the same difference


def test_duplicates_are_counted_once_and_listed() -> None:
    groups = groups_of(A=[1.0, 2.0, 3.0], B=[5.0, 6.0, 7.0])
    groups["A"].append(report("A-copy.h5", 100.0))  # a copy of A-0 (same identity): dropped, not averaged in
    groups["B"].append(report("A-1.h5", 100.0))  # the same file given in both groups
    identities = {f"{g}-{i}.h5": (i if g == "A" else 10 + i, "cfg") for g in "AB" for i in range(3)}
    identities["A-copy.h5"] = (0, "cfg")
    result = group_statistics(groups, identities)
    assert result["duplicates"] == [{"path": "A-copy.h5", "same_as": "A-0.h5", "group": "A"},
                                    {"path": "A-1.h5", "same_as": "A-1.h5", "group": "B"}]  # fmt: skip
    assert {n: g["n"] for n, g in result["groups"].items()} == {"A": 3, "B": 3}
    assert result["groups"]["A"]["files"] == 4 and result["groups"]["A"]["configs"] == 1
    assert entry(result)["groups"]["A"]["mean"] == pytest.approx(2.0)
    assert entry(result)["groups"]["B"]["mean"] == pytest.approx(6.0)
    # The same config with another seed is another run; runs without a seed are never taken for each other.
    seedless = group_statistics(groups_of(A=[1.0, 2.0]), {"A-0.h5": (None, "cfg"), "A-1.h5": (None, "cfg")})
    assert seedless["duplicates"] == [] and seedless["groups"]["A"]["n"] == 2
    assert seedless["unknown_seed"] == ["A-0.h5", "A-1.h5"]
    text = render(result)
    assert "2 runs identical to others (same seed and config hash) were counted once: A-copy.h5 = A-0.h5" in text


def test_groups_mixing_configurations_are_flagged() -> None:
    identities = {"A-0.h5": (0, "cfg"), "A-1.h5": (1, "cfg"), "B-0.h5": (2, "cfg"), "B-1.h5": (3, "other")}
    result = group_statistics(groups_of(A=[1.0, 2.0], B=[3.0, 4.0]), identities)
    assert result["duplicates"] == [] and {n: g["configs"] for n, g in result["groups"].items()} == {"A": 1, "B": 2}
    assert "differ in configuration, not only in seed: B (2)" in render(result)


def test_missing_values_are_dropped_and_single_runs_get_no_interval() -> None:
    result = group_statistics(groups_of(A=[1.0, None, 3.0, float("nan")], B=[2.0], C=[None]))
    e = entry(result)
    assert e["groups"]["A"]["n"] == 2 and e["groups"]["A"]["mean"] == pytest.approx(2.0)
    assert e["groups"]["B"] == {"n": 1, "values": [2.0], "mean": 2.0, "sd": None, "ci_low": None, "ci_high": None}
    assert e["groups"]["C"]["n"] == 0 and e["groups"]["C"]["mean"] is None
    ab, ac, bc = e["comparisons"]
    assert (ab["a"], ab["b"], ab["diff"]) == ("A", "B", pytest.approx(0.0))
    assert all(ab[k] is None for k in ("diff_low", "diff_high", "welch_t", "welch_df", "welch_p", "permutation_p"))
    assert ac["diff"] is None and bc["diff"] is None
    # A metric no run has is left out; one group alone: intervals, no comparisons.
    assert group_statistics(groups_of(A=[None, None]))["metrics"] == []
    alone = entry(group_statistics(groups_of(A=[1.0, 2.0, 4.0])))
    assert alone["comparisons"] == [] and alone["groups"]["A"]["ci_low"] is not None
    json.dumps(result, allow_nan=False)


def test_constant_groups_have_no_welch_test_but_a_permutation_p() -> None:
    (c,) = entry(group_statistics(groups_of(A=[0.0, 0.0, 0.0], B=[1.0, 1.0, 1.0])))["comparisons"]
    assert c["diff"] == -1.0 and c["welch_t"] is None and c["welch_p"] is None and c["diff_low"] is None
    assert c["permutation_p"] == pytest.approx(2 / math.comb(6, 3))


def render(result: dict[str, Any]) -> str:
    console = Console(record=True, width=250)
    console.print(group_table(result))
    return console.export_text()


def test_table_rows_and_pairs() -> None:
    groups = groups_of(A=[1.0, 2.0, 3.0, 4.0], B=[3.0, 5.0, 7.0, 9.0], C=[2.0])
    text = render(group_statistics(groups))
    assert "2.500 [0.446, 4.554] (4)" in text  # 2.5 ± t(0.975, 3) · sd / 2
    assert "A − B" in text and "A − C" in text and "B − C" in text
    assert "balance" in text and "mean" in text  # the layer's row and the run-level row
    assert "C: under 2 runs" in text


def test_config_identity_leaves_out_volatile_keys() -> None:
    base = {"preset": {"model": {"d_model": 32, "backend": "auto"}, "steps": 30, "seed": 0, "description": "x"},
            "device": "cpu"}  # fmt: skip
    seed, digest = config_identity(base)
    assert seed == 0 and len(digest) == 16
    elsewhere = {"preset": {**base["preset"], "description": "y", "model": {"d_model": 32, "backend": "triton"}},
                 "device": "cuda", "output_dir": "/elsewhere", "torch_version": "9"}  # fmt: skip
    assert config_identity(elsewhere) == (0, digest)
    assert config_identity({**base, "preset": {**base["preset"], "seed": 4}}) == (4, digest)
    assert config_identity({**base, "preset": {**base["preset"], "steps": 31}})[1] != digest
    assert config_identity({"trainer": "lightning", "max_steps": 5})[0] is None


def test_expand_groups(tmp_path: Path) -> None:
    for name in ("b.h5", "a.h5", "sub/deep/c.h5", "sub/d.h5"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    groups = expand_groups([f"top={tmp_path}/*.h5", f" all = {tmp_path}/**/*.h5"])
    assert list(groups) == ["top", "all"]
    assert groups["top"] == [tmp_path / "a.h5", tmp_path / "b.h5"]
    assert groups["all"] == sorted(tmp_path / n for n in ("a.h5", "b.h5", "sub/deep/c.h5", "sub/d.h5"))
    assert expand_groups([f"one={tmp_path}/a.h5"]) == {"one": [tmp_path / "a.h5"]}
    for bad in ("runs/*.h5", "=runs/*.h5", "name="):
        with pytest.raises(GroupSpecError, match="expected NAME=GLOB") as err:
            expand_groups([bad])
        assert repr(bad) in str(err.value)
    with pytest.raises(GroupSpecError, match=r"'x': '.*/nothing-\*\.h5' matches no file"):
        expand_groups([f"a={tmp_path}/a.h5", f"x={tmp_path}/nothing-*.h5"])
    with pytest.raises(GroupSpecError, match="matches only folders"):
        expand_groups([f"x={tmp_path}/su*"])
    with pytest.raises(GroupSpecError, match="given twice"):
        expand_groups([f"a={tmp_path}/a.h5", f"a={tmp_path}/b.h5"])
    assert issubclass(GroupSpecError, ValueError)


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three 10-step debug runs recorded in-process: seed 0 twice (separate recordings) and seed 1. One torch
    thread: a model this small trains in a fraction of a second so, and is not slowed by a busy machine's other work."""
    import torch

    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import train

    folder = tmp_path_factory.mktemp("seed-runs")
    paths = {"s0": folder / "s0.h5", "s0-again": folder / "s0-again.h5", "s1": folder / "s1.h5"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, path in paths.items():
            train(get_preset("debug", steps=10, seed=1 if name == "s1" else 0), out=path, device="cpu", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return paths


def test_real_runs(seed_runs: dict[str, Path], tmp_path: Path) -> None:
    """Recorded runs: a second recording of seed 0 and a copy of the first are the same run, counted once; seed 1 is another."""
    first, again, other, copy = (tmp_path / f"{n}.h5" for n in ("s0", "s0-again", "s1", "s0-copy"))
    for name, path in seed_runs.items():
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(first, copy)
    seed0, seed1 = run_identity(first), run_identity(other)
    assert run_identity(copy) == seed0 == run_identity(again)  # `created` and the versions are not in the identity
    assert seed0[0] == 0 and seed1[0] == 1 and seed0[1] == seed1[1]  # the same configuration with another seed
    groups = expand_groups([f"a={tmp_path}/s0*.h5", f"b={tmp_path}/s1.h5"])
    assert groups == {"a": [again, copy, first], "b": [other]}
    result = collect_groups(groups)
    assert result["duplicates"] == [{"path": str(copy), "same_as": str(again), "group": "a"},
                                    {"path": str(first), "same_as": str(again), "group": "a"}]  # fmt: skip
    assert {n: g["n"] for n, g in result["groups"].items()} == {"a": 1, "b": 1}
    assert {e["family"] for e in result["metrics"]} == {"tree"} and result["run"]
    json.dumps(result, allow_nan=False)
    assert "2 runs identical to others" in render(result)
