"""The v2 early warning: scored on held-out later intervals against the trivial rule and a random flagger,
on runs whose flags and deaths are known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_metrics import write_run

import routescope
from routescope.analysis.events import history
from routescope.analysis.warning import Pairs, _random_score, candidate_pairs, early_warnings, f1_difference

TREES, INTERVALS = 20, 30


def starving_run(tmp_path: Path) -> Path:
    """Depth 1, 20 trees, 30 intervals of 2,000 tokens a tree. Trees 0–9: the right leaf gets 1,000 tokens a
    interval until interval 9, then none (it dies for good). Trees 10–19: the right leaf gets none in every
    third interval (i % 3 == 2) and 1,000 otherwise (every 5-interval window holds its tokens: it never dies)."""
    intervals = []
    for i in range(INTERVALS):
        right = np.array([(0 if i >= 10 else 1_000) if t < 10 else (0 if i % 3 == 2 else 1_000) for t in range(TREES)])
        intervals.append(np.stack([2_000 - right, right], 1))
    return write_run(tmp_path / "starve.h5", 1, intervals)


def test_trivial_rule_and_random_baseline_known_by_construction(tmp_path: Path) -> None:
    """Scorable intervals: i + horizon ≤ 30 − K, i.e. 0..20; the held-out half is 10..20. Trees 0–9: the right
    leaf's first empty K-window ends at interval 14 (its death), so the trivial rule flags it at 10, 11, 12, 13:
    40 true flags, every death detected. Trees 10–19: flags at 11, 14, 17, 20: 40 false flags. Candidates in the
    held-out half: 10 × (4 + 11) + 10 × 22 = 370 pairs, 40 positive."""
    warning = early_warnings(routescope.open(starving_run(tmp_path)))
    assert warning.test_steps == (11, 21) and warning.train_steps == (1, 10)
    trivial = warning.trivial
    assert trivial is not None
    assert (trivial.flags, trivial.true_flags, trivial.deaths, trivial.detected) == (80, 40, 10, 10)
    assert trivial.precision == 0.5 and trivial.recall == 1.0
    random = warning.random_trivial
    assert random is not None and random.precision == pytest.approx(40 / 370) and random.flags == 80
    # the earlier half holds only the pairs at interval 9 as positives, and the child still got 1,000 tokens then:
    # whatever the fit, it cannot beat a rule that is perfect in recall here, so the trivial rule's flags are shown
    assert warning.source == "trivial rule" and "no better than the trivial rule" in warning.verdict
    shown = warning.flags
    assert set(shown["child"]) == {2} and len(shown) == TREES  # the first flag of each tree's right leaf
    by_tree = shown.set_index("tree").sort_index()
    assert by_tree["child_died"].loc[:9].all() and not by_tree["child_died"].loc[10:].any()
    assert (by_tree["step"].loc[:9] == 11).all() and (by_tree["step"].loc[10:] == 3).all()


def test_nothing_to_predict_says_so(tmp_path: Path) -> None:
    ds = routescope.open(write_run(tmp_path / "calm.h5", 2, [np.full((3, 4), 500)] * 20))
    warning = early_warnings(ds)
    assert warning.predictor is None and warning.trivial is None and "no pruning-root death" in warning.verdict
    assert warning.as_dict()["predictor"] is None


def _hand_score(flagged: np.ndarray, pairs: Pairs, rows: np.ndarray) -> tuple[float, float]:
    """Precision and recall written out here: per pair, and per child unit."""
    f, y = flagged[rows], pairs.label[rows]
    units = [tuple(u) for u in pairs.index[rows][:, 1:]]
    deaths = {u for u, pos in zip(units, y) if pos}
    found = {u for u, pos, fl in zip(units, y, f) if pos and fl}
    return (f & y).sum() / max(f.sum(), 1), len(found) / len(deaths)


def test_random_flagger_expectation_matches_simulation(tmp_path: Path) -> None:
    h = history(routescope.open(starving_run(tmp_path)))
    pairs = candidate_pairs(h, 5)
    rows = np.flatnonzero(pairs.known)
    rng = np.random.default_rng(0)
    for flags in (5, 60):
        expected = _random_score(flags, pairs, rows)
        draws = []
        for _ in range(3000):
            flagged = np.zeros(len(pairs.label), dtype=bool)
            flagged[rng.choice(rows, flags, replace=False)] = True
            draws.append(_hand_score(flagged, pairs, rows))
        precision, recall = np.mean(draws, 0)
        se = np.std(draws, 0) / np.sqrt(len(draws))
        assert abs(expected.precision - precision) < 4 * se[0] + 1e-9
        assert abs(expected.recall - recall) < 4 * se[1] + 1e-9


def test_f1_difference_interval(tmp_path: Path) -> None:
    h = history(routescope.open(starving_run(tmp_path)))
    pairs = candidate_pairs(h, 5)
    rows = np.flatnonzero(pairs.known)
    same = f1_difference(pairs.trivial, pairs.trivial, pairs, rows)
    assert same["f1_difference"] == 0 and same["f1_difference_low"] == 0 == same["f1_difference_high"]
    assert same["p_value"] == 1.0  # every resampled difference is 0: no evidence for a gain
    perfect = f1_difference(pairs.label.copy(), pairs.trivial, pairs, rows)
    precision, recall = _hand_score(pairs.trivial, pairs, rows)
    trivial_f1 = 2 * precision * recall / (precision + recall)
    assert perfect["f1_difference"] == pytest.approx(1 - trivial_f1)
    assert 0 < perfect["f1_difference_low"] <= perfect["f1_difference"] <= perfect["f1_difference_high"]
    assert perfect["p_value"] < 0.01


def test_report_events_json_has_both_baselines(tmp_path: Path) -> None:
    path = starving_run(tmp_path)
    result = run_cli("report", str(path), "--json", "--events")
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)["events"]
    assert events["died"] == 10 and events["pruned_roots"] == 10 and events["died_right"] == 10
    assert events["span_steps"] == [1, 30]  # events cover the whole run, not the default last quarter
    w = events["early_warning"]
    assert w["trivial"]["precision"] == 0.5 and w["random_trivial"]["precision"] == pytest.approx(40 / 370)
    assert w["trivial_lift_over_random"] == pytest.approx(0.5 / (40 / 370))
    assert w["flags_shown"] == "trivial rule"
    table = run_cli("report", str(path), "--events")
    assert "no better than the trivial rule" in table.stdout and "random" in table.stdout


def test_report_group_cli(tmp_path: Path, debug_run: Path) -> None:
    """`report --group` on real files: a copy of a run is the same run (counted once, and said so); bad specs
    and empty globs are one error line each."""
    import shutil

    shutil.copy(debug_run, tmp_path / "copy.h5")
    result = run_cli("report", "--group", f"a={debug_run}", "--group", f"b={tmp_path}/*.h5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["groups"]["a"]["n"] == 1 and out["groups"]["b"]["n"] == 0
    assert out["duplicates"][0]["path"].endswith("copy.h5") and out["thresholds"]["alpha"] == 0.05
    table = run_cli("report", "--group", f"a={debug_run}", "--group", f"b={tmp_path}/*.h5")
    assert table.returncode == 0 and "counted once" in table.stdout
    for args, message in ((["--group", "nonsense"], "NAME=GLOB"), (["--group", f"x={tmp_path}/none-*.h5"], "none-*"),
                          ([str(debug_run), "--group", f"a={debug_run}"], "not both"), ([], "--group")):  # fmt: skip
        bad = run_cli("report", *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and message in lines[0], bad.stderr
