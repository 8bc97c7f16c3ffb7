"""routescope.analysis.family: every family behind one interface, checked on real recorded runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import routescope
from routescope import analysis
from routescope.analysis.family import FAMILY_ANALYSES, legend
from routescope.analysis.report import build_report
from routescope.analysis.window import ALL


def test_interface_keys_are_the_metrics() -> None:
    assert FAMILY_ANALYSES["tree"].keys == analysis.TREE_METRICS
    assert FAMILY_ANALYSES["l1"].keys == analysis.L1_METRICS
    assert FAMILY_ANALYSES["moe"].keys == analysis.MOE_METRICS
    assert list(FAMILY_ANALYSES) == list(routescope.store.schema.FAMILIES)  # one analysis per file family, same order
    labels = [label for label, _ in legend(list(FAMILY_ANALYSES))]
    assert len(labels) == len(set(labels)) and "MI excess" in labels


@pytest.fixture(scope="module")
def runs(debug_run: Path, family_runs: dict[str, Path]) -> dict[str, Path]:
    return {"tree": debug_run, **family_runs}


@pytest.mark.parametrize("family", list(FAMILY_ANALYSES))
def test_whole_run_summary_is_the_last_cumulative_point(runs: dict[str, Path], family: str) -> None:
    """Known by construction: counts summed over the whole run are the cumulative sums at its last interval,
    so every family's summary equals the last row of its cumulative time series."""
    fam = FAMILY_ANALYSES[family]
    with routescope.RunFile.open(runs[family]) as run:
        ds = run.dataset(family)
        summary = fam.summary(ds, ALL)
        cumulative = fam.timeseries(ds, rolling=None)
        per_interval = fam.timeseries(ds, rolling=1)
        window = fam.summary(ds, (int(ds["step"].values[-1]), None))  # the last interval alone
        assert len(fam.layers(ds)) == ds.sizes["layer"] >= 1
        for key in fam.keys:
            np.testing.assert_allclose(cumulative[key].values[-1], summary[key].values, rtol=1e-12, equal_nan=True)
            np.testing.assert_allclose(per_interval[key].values[-1], window[key].values, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("family", list(FAMILY_ANALYSES))
def test_report_entries_carry_every_key(runs: dict[str, Path], family: str) -> None:
    report = build_report(runs[family], layers=[0])
    (entry,) = report["layers"]
    fam = FAMILY_ANALYSES[family]
    assert entry["family"] == family and set(fam.keys) <= set(entry) and "nonfinite_tokens" in entry
    assert fam.shape(entry)  # the table can print its shape
    assert set(report["families"]) == {family} and set(report["run"]) == set(fam.keys)


def test_report_table_prints_a_legend(debug_run: Path) -> None:
    out = run_cli("report", str(debug_run))
    assert out.returncode == 0, out.stderr
    assert "route H: routing entropy" in out.stdout and "docs/metrics.md" in out.stdout
