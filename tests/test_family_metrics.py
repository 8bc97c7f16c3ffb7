"""L1 and MoE metrics on cases with known answers (synthetic files and layers built to route a known way),
and the CLI (record, info, report) on the debug-l1 / debug-moe presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from scipy import stats
from torch import nn

import routescope
from routescope import Recorder, analysis
from routescope.analysis.window import ALL
from routescope.layers import L1SparseFFN, TopKMoE
from routescope.store import LayerLayout
from routescope.store.schema import active_bin_edges
from routescope.store.writer import RunWriter


def l1_row(active_per_token: list[int], fired: list[list[int]], units: int) -> dict[str, np.ndarray]:
    """One interval of one L1 layer: tokens, unit_fires, active_sum and active_hist of the given tokens."""
    bins = len(active_bin_edges(units)) - 1
    hist = np.histogram(active_per_token, bins=active_bin_edges(units))[0]
    fires = np.zeros(units, dtype=np.int64)
    for token_units in fired:
        fires[token_units] += 1
    n = len(active_per_token)
    assert hist.shape == (bins,) and fires.sum() == sum(active_per_token)
    return {"tokens": np.int64(n), "layer_tokens": np.array([n]), "unit_fires": fires[None],
            "active_sum": np.array([sum(active_per_token)]), "active_hist": hist[None]}  # fmt: skip


@pytest.fixture
def l1_file(tmp_path: Path) -> Path:
    """Interval 1 (step 10): 50 tokens fire unit 0, 49 fire units 0-1, 1 fires units 0-5 (units 6, 7 dead).
    Interval 2 (step 20): 10 tokens fire units 0-2."""
    path = tmp_path / "l1.h5"
    writer = RunWriter(path, [LayerLayout("mlp", config={"d_hidden": 8}, family="l1")], {}, scalars=("train_loss",))
    first = l1_row([1] * 50 + [2] * 49 + [6], [[0]] * 50 + [[0, 1]] * 49 + [[0, 1, 2, 3, 4, 5]], 8)
    writer.append_interval(10, None, {}, groups={"l1": first})
    writer.append_interval(20, None, {}, groups={"l1": l1_row([3] * 10, [[0, 1, 2]] * 10, 8)})
    writer.close()
    return path


def test_l1_metrics_known_answers(l1_file: Path) -> None:
    ds = routescope.open(l1_file, group="l1")
    first = analysis.summarize_family(ds, "l1", window=(None, 15)).isel(layer=0)
    assert float(first.active_mean) == pytest.approx(154 / 100)
    assert (float(first.active_p50), float(first.active_p99), float(first.active_max)) == (1, 2, 6)
    # 100 tokens cannot prove units 6, 7 dead (v2): (1 − δ·rate)^100 > α with rate = 1.54 / 8 the mean firing rate
    assert (1 - 0.05 * 1.54 / 8) ** 100 > 0.05
    assert int(first.dead_units) == 0 and int(first.zero_fire_units) == 2 and float(first.dead_fraction) == 0
    # units 2-5 fired once: neither bound clears δ·rate either; units 0, 1 are live
    assert stats.beta.ppf(0.05, 1, 100) < 0.05 * 1.54 / 8 < stats.beta.ppf(0.95, 2, 99)
    assert int(first.undetermined_units) == 6
    assert float(first.active_fraction) == pytest.approx(1.54 / 8)
    np.testing.assert_allclose(first.unit_firing_rate.values, [1, 0.5, 0.01, 0.01, 0.01, 0.01, 0, 0])
    second = analysis.summarize_family(ds, "l1", window=(15, None)).isel(layer=0)
    assert (float(second.active_p50), float(second.active_p99), float(second.active_max)) == (3, 3, 3)
    assert int(second.zero_fire_units) == 5 and int(second.dead_units) == 0  # 10 tokens prove nothing dead
    assert analysis.summarize_family(ds, "l1").attrs["window_first_step"] == 20  # the default: the last quarter
    both = analysis.summarize_family(ds, "l1", window=ALL).isel(layer=0)
    assert float(both.active_mean) == pytest.approx(184 / 110) and int(both.zero_fire_units) == 2
    series = analysis.family_timeseries(ds, "l1", rolling=1)
    assert list(series.active_p50.values[:, 0]) == [1, 3]
    cumulative = analysis.family_timeseries(ds, "l1", rolling=None)
    assert float(cumulative.active_mean.values[-1, 0]) == pytest.approx(float(both.active_mean))


def test_histogram_quantile_reads_lower_edges() -> None:
    edges = active_bin_edges(100)
    hist = np.histogram([20] * 3 + [50], bins=edges)[0]  # 20 and 50 lie in wider bins
    assert analysis.histogram_quantile(hist, edges[:-1], 0.5) == 20  # 20 is an edge
    low = analysis.histogram_quantile(hist, edges[:-1], 0.99)
    assert low <= 50 < edges[np.searchsorted(edges, low) + 1] and low >= 50 / 1.12
    assert np.isnan(analysis.histogram_quantile(np.zeros(4), edges[:4], 0.5))


def moe_row(loads: list[list[int]], selected: list[list[int]], tokens: int, entropy: list[float], experts: int) -> dict:
    """One interval of an MoE group with len(loads) layers padded to `experts`: processed and selected loads."""
    n = len(loads)
    expert_tokens = np.zeros((n, experts), dtype=np.int64)
    coselect = np.zeros((n, experts, experts), dtype=np.int64)
    for i, (load, chosen) in enumerate(zip(loads, selected)):
        expert_tokens[i, : len(load)] = load
        coselect[i, np.arange(len(chosen)), np.arange(len(chosen))] = chosen  # off-diagonal: not used here
    dropped = [sum(c) - sum(lo) for lo, c in zip(loads, selected)]
    return {"tokens": np.int64(tokens), "layer_tokens": np.full(n, tokens), "expert_tokens": expert_tokens,
            "dropped_tokens": np.array(dropped), "coselect": coselect,
            "router_entropy_sum": np.array(entropy), "router_prob_sum": np.zeros((n, experts))}  # fmt: skip


def test_moe_metrics_known_answers(tmp_path: Path) -> None:
    """Layer 0 (E=4, k=1): one expert takes all 100 tokens. Layer 1 (E=6, k=2): 200 selections, 10 dropped."""
    path = tmp_path / "moe.h5"
    layouts = [LayerLayout("a", config={"experts": 4, "k": 1, "capacity_factor": None}, family="moe"),
               LayerLayout("b", config={"experts": 6, "k": 2, "capacity_factor": 1.0}, family="moe")]  # fmt: skip
    writer = RunWriter(path, layouts, {})
    selected = [35, 35, 35, 35, 30, 30]
    row = moe_row([[100, 0, 0, 0], [32, 32, 32, 32, 31, 31]], [[100, 0, 0, 0], selected], 100,
                  [200.0, 100 * math.log2(6)], 6)  # fmt: skip
    writer.append_interval(5, None, {}, groups={"moe": row})
    writer.close()
    with h5py.File(path, "r") as f:
        assert np.isnan(f["moe/layer_capacity_factor"][0]) and f["moe/layer_capacity_factor"][1] == 1.0
    summary = analysis.summarize_family(routescope.open(path, group="moe"), "moe")
    one, balanced = summary.isel(layer=0), summary.isel(layer=1)
    assert float(one.load_cv) == pytest.approx(math.sqrt(3))  # std/mean of (N, 0, 0, 0) = sqrt(E - 1)
    # 100 tokens cannot prove an expert dead at δ·k/E = 1.25%: that needs (1 − 0.0125)^N < α, N ≥ 239
    assert (1 - 0.0125) ** 100 > 0.05 > (1 - 0.0125) ** 239
    assert float(one.max_mean_load) == pytest.approx(4) and int(one.dead_experts) == 0
    assert int(one.zero_selection_experts) == 3 and int(one.undetermined_experts) == 3
    assert float(one.router_entropy) == pytest.approx(2) and float(one.router_entropy_norm) == pytest.approx(1)
    assert float(one.drop_fraction) == 0 and float(one.active_fraction) == pytest.approx(0.25)
    assert list(one.tokens_per_expert.values[:4]) == [100, 0, 0, 0] and np.isnan(one.tokens_per_expert.values[4:]).all()
    assert float(balanced.load_cv) == pytest.approx(np.std(selected) / np.mean(selected))  # before drops
    assert float(balanced.max_mean_load) == pytest.approx(35 / (200 / 6)) and int(balanced.dead_experts) == 0
    assert list(balanced.tokens_per_expert.values) == [32, 32, 32, 32, 31, 31]  # after drops
    assert float(balanced.drop_fraction) == pytest.approx(10 / 200)
    assert float(balanced.router_entropy_norm) == pytest.approx(1)


def test_real_layers_routed_a_known_way(tmp_path: Path) -> None:
    """A uniform router (entropy log2 E), a router that sends everything to expert 0 under capacity 1
    (the first ceil(n/4) tokens kept), and an L1 layer whose last 3 units can never fire."""
    torch.manual_seed(0)
    uniform = TopKMoE(5, 5, experts=4, k=2)
    greedy = TopKMoE(5, 5, experts=4, k=1, capacity_factor=1.0, bias=False)
    sparse = L1SparseFFN(5, 8, 5)
    with torch.no_grad():
        uniform.router.weight.zero_()
        greedy.router.weight.zero_()
        greedy.router.weight[0] = 1.0
        sparse.gate.weight.copy_(torch.cat([torch.eye(5), torch.zeros(3, 5)]))
    model = nn.ModuleDict({"uniform": uniform, "greedy": greedy, "sparse": sparse})
    path = tmp_path / "known.h5"
    n = 30
    with Recorder(model, path, every=2, sample_tokens=0) as rec:
        for _ in range(4):
            x = torch.rand(n, 5) + 0.1  # positive: the greedy router's logit 0 is the largest
            uniform(x)
            y = greedy(x)
            assert torch.all(y[: math.ceil(n / 4)] != 0) and torch.all(y[math.ceil(n / 4) :] == 0)  # drop order
            sparse(torch.randn(n, 5))
            rec.step()
    moe = analysis.summarize_family(routescope.open(path, group="moe"), "moe")
    assert moe.router_entropy.values[0] == pytest.approx(2.0) and moe.router_entropy_norm.values[0] == pytest.approx(1)
    assert moe.load_cv.values[1] == pytest.approx(math.sqrt(3)) and int(moe.zero_selection_experts.values[1]) == 3
    assert int(moe.dead_experts.values[1]) == 0  # 60 tokens in the last quarter: too few to prove them dead
    assert moe.drop_fraction.values[1] == pytest.approx((n - math.ceil(n / 4)) / n)
    l1 = analysis.summarize_family(routescope.open(path, group="l1"), "l1")
    assert int(l1.zero_fire_units.values[0]) == 3 and list(l1.unit_firing_rate.values[0, 5:]) == [0, 0, 0]


def test_family_metrics_clear_errors(l1_file: Path) -> None:
    ds = routescope.open(l1_file, group="l1")
    with pytest.raises(analysis.MetricsError, match="not a 'moe' group"):
        analysis.summarize_family(ds, "moe")
    with pytest.raises(analysis.MetricsError, match="no l1 layer 3"):
        analysis.summarize_family(ds, "l1", layers=[3])
    with pytest.raises(analysis.MetricsError, match="holds no interval"):
        analysis.summarize_family(ds, "l1", window=(100, 200))


# ------------------------------------------------------------------------------------------ CLI


def test_record_writes_valid_family_files(family_runs: dict[str, Path]) -> None:
    with h5py.File(family_runs["l1"], "r") as f:
        assert "tree" not in f and "l1" in f and list(f["l1/step"][:]) == [5, 10, 15, 20, 25, 30]
        l1 = f["l1"]
        assert np.array_equal(l1["unit_fires"][:].sum(-1), l1["active_sum"][:])
        assert np.array_equal(l1["active_hist"][:].sum(-1), l1["layer_tokens"][:])
        assert np.all(l1["tokens"][:] == 5 * 8 * 32)
        assert f["traces/l1_active"].shape == (6 * 16, 2)
    with h5py.File(family_runs["moe"], "r") as f:
        moe = f["moe"]
        assert np.array_equal(moe["expert_tokens"][:].sum(-1), 2 * moe["layer_tokens"][:] - moe["dropped_tokens"][:])


def test_info_describes_the_families(family_runs: dict[str, Path]) -> None:
    out = run_cli("info", str(family_runs["moe"]))
    assert out.returncode == 0, out.stderr
    assert "moe (2 layers)" in out.stdout and "experts" in out.stdout and "capacity" in out.stdout
    summary = json.loads(run_cli("info", str(family_runs["l1"]), "--json").stdout)
    assert summary["families"] == {"l1": 2} and summary["tokens"] == 30 * 8 * 32
    assert [layer["family"] for layer in summary["layers"]] == ["l1", "l1"] and summary["layers"][0]["d_hidden"] == 64


@pytest.mark.parametrize("family", ["l1", "moe"])
def test_report_json_and_table(family_runs: dict[str, Path], family: str) -> None:
    result = run_cli("report", str(family_runs[family]), "--json", "--window", "10:")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["window"]["first_step"] == 10 and len(report["layers"]) == 2
    keys = analysis.FAMILY_METRICS[family]
    for layer in report["layers"]:
        assert layer["family"] == family and set(keys) <= set(layer) and layer["depth"] is None
    assert set(report["run"]) == set(keys) and set(report["families"]) == {family}
    if family == "l1":
        assert len(report["layers"][0]["unit_firing_rate"]) == 64
        assert 0 < report["layers"][0]["active_fraction"] < 1
    else:
        assert sum(report["layers"][0]["tokens_per_expert"]) > 0 and report["layers"][0]["k"] == 2
    table = run_cli("report", str(family_runs[family]))
    assert table.returncode == 0 and f"{family} layers" in table.stdout and "blocks.1.mlp" in table.stdout


def test_report_compares_families(family_runs: dict[str, Path], debug_run: Path) -> None:
    """(`routescope dash` on these files: tests/test_dashboard_families.py.)"""
    result = run_cli("report", str(debug_run), str(family_runs["l1"]), str(family_runs["moe"]))
    assert result.returncode == 0, result.stderr
    assert "route H" in result.stdout and "l1 0" in result.stdout and "moe 1" in result.stdout
    bad = run_cli("report", str(family_runs["l1"]), "--layer", "5")
    assert bad.returncode == 2 and "l1 layers 0..1" in bad.stderr
