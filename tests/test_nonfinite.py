"""NaN/inf activations: counted per layer and interval in `nonfinite_tokens`, kept out of the float sums,
flagged by the recorder (one warning) and by `routescope report` (a line per layer, a JSON key)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import check_tree_invariants, run_cli
from torch import Tensor, nn

import routescope
from routescope import Recorder, TreeFFN
from routescope.analysis.report import build_report
from routescope.kernels import tree_triton
from routescope.layers import L1SparseFFN, TopKMoE

D = 8
BAD = [2, 5, 11]  # token rows set to NaN
INF = 7  # one entry of this row set to +inf


def poisoned(n: int = 16, seed: int = 0) -> Tensor:
    """n tokens of width D: rows BAD are NaN, row INF has one +inf, the rest are finite."""
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    x[BAD] = float("nan")
    x[INF, 3] = float("inf")
    return x


def finite_rows(x: Tensor) -> Tensor:
    """The rows of x without NaN or inf."""
    return x[torch.isfinite(x).all(-1)]


def fed(layer: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """A recording copy of `layer` after one forward on x: its accumulators."""
    layer = copy.deepcopy(layer)
    layer.recording = True
    layer(x)
    return layer.routing_stats()


@pytest.mark.parametrize("variant", ["neuron", "leaf_mlp"])
def test_tree_counts_bad_tokens_per_tree_and_sums_only_finite_ones(variant: str) -> None:
    torch.manual_seed(0)
    layer = TreeFFN(D, 5, depth=3, trees=2, variant=variant, leaf_width=3 if variant == "leaf_mlp" else None)
    x = poisoned()
    got, clean = fed(layer, x), fed(layer, finite_rows(x))
    assert got["nonfinite_tokens"].tolist() == [len(BAD) + 1] * 2
    assert clean["nonfinite_tokens"].tolist() == [0, 0]
    for name in ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum"):
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], clean[name], msg=name)
    # every token is still routed and counted: NaN > 0 is false, so the NaN rows go left at every node
    assert got["node_visits"][:, 0].tolist() == [16, 16] and got["leaf_visits"].sum(-1).tolist() == [16, 16]
    assert (got["leaf_visits"][:, 0] - clean["leaf_visits"][:, 0] >= len(BAD)).all()


@pytest.mark.skipif(not tree_triton.available(), reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in the interpreter's numpy
def test_tree_triton_backend_counts_like_the_reference() -> None:
    """The layer on the Triton kernels (on the GPU where there is one, else Triton's CPU interpreter) records
    what the reference records on the CPU."""
    torch.manual_seed(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take CUDA tensors only
    ref = TreeFFN(D, 5, depth=4, trees=2)
    fast = copy.deepcopy(ref).to(device)
    fast.backend = "triton"
    x = poisoned(n=40)
    got, expected = {k: v.cpu() for k, v in fed(fast, x.to(device)).items()}, fed(ref, x)
    assert got["nonfinite_tokens"].tolist() == expected["nonfinite_tokens"].tolist() == [len(BAD) + 1] * 2
    for name, value in expected.items():
        if value.dtype == torch.int64:
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_l1_and_moe_count_bad_tokens_and_keep_router_sums_finite() -> None:
    torch.manual_seed(1)
    x = poisoned()
    l1 = L1SparseFFN(D, 24, D)
    got, clean = fed(l1, x), fed(l1, finite_rows(x))
    assert int(got["nonfinite_tokens"]) == len(BAD) + 1 and int(clean["nonfinite_tokens"]) == 0
    nan_only = x.clone()
    nan_only[INF, 3] = 0.0
    got_nan = fed(l1, nan_only)  # a NaN gate does not fire: the firing counts are the finite tokens'
    assert torch.equal(got_nan["unit_fires"], fed(l1, finite_rows(nan_only))["unit_fires"])
    assert int(got_nan["tokens"]) == 16 and int(got_nan["active_hist"][0]) >= len(BAD)

    moe = TopKMoE(D, D, experts=4, k=2)
    got, clean = fed(moe, x), fed(moe, finite_rows(x))
    assert int(got["nonfinite_tokens"]) == len(BAD) + 1 and int(clean["nonfinite_tokens"]) == 0
    for name in ("router_entropy_sum", "router_prob_sum"):
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], clean[name], msg=name)
    assert int(got["expert_tokens"].sum()) == 2 * 16  # bad tokens still count where topk put them


class Mixed(nn.Module):
    """One layer of each family, side by side on the same tokens (a bad token stays one token)."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = TreeFFN(D, D, depth=3, trees=2)
        self.sparse = L1SparseFFN(D, 16, D)
        self.moe = TopKMoE(D, D, experts=4, k=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.tree(x) + self.sparse(x) + self.moe(x)


def record(path: Path, poison_step: int | None, steps: int = 4, every: int = 2) -> None:
    """Record `steps` steps of Mixed on 2×8 tokens per step; the batch of `poison_step` carries bad tokens."""
    torch.manual_seed(0)
    model = Mixed()
    with Recorder(model, path, every=every, sample_tokens=4) as rec:
        for step in range(1, steps + 1):
            x = poisoned(seed=step) if step == poison_step else torch.randn(16, D)
            model(x.view(2, 8, D))
            rec.step(loss=1.0)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[warnings.WarningMessage]]:
    """A run whose step 3 (the second interval) fed NaN/inf tokens; the warnings the recording raised."""
    path = tmp_path_factory.mktemp("nonfinite") / "nan.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record(path, poison_step=3)
    return path, [w for w in caught if "non-finite" in str(w.message)]


def test_file_counts_and_finite_sums(nan_run) -> None:
    path, _ = nan_run
    bad = len(BAD) + 1
    with h5py.File(path, "r") as f:
        assert f["tree/nonfinite_tokens"][:].tolist() == [[[0, 0]], [[bad, bad]]]  # (step, layer, tree)
        assert f["l1/nonfinite_tokens"][:].tolist() == [[0], [bad]]
        assert f["moe/nonfinite_tokens"][:].tolist() == [[0], [bad]]
        for name in ("tree/node_act_sum", "tree/node_act_sqsum", "tree/leaf_act_sum", "tree/leaf_act_sqsum",
                     "moe/router_entropy_sum", "moe/router_prob_sum"):  # fmt: skip
            assert np.isfinite(f[name][:]).all(), name
        assert f["tree/tokens"][:].tolist() == [32, 32]
    assert check_tree_invariants(path) == 2  # counts still add up: bad tokens were routed


def test_recorder_warns_once_naming_layers_and_step(nan_run) -> None:
    _, caught = nan_run
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "step 4" in message and all(name in message for name in ("tree", "sparse", "moe")), message


def test_report_json_and_table_flag_the_layers(nan_run) -> None:
    path, _ = nan_run
    report = build_report(path)
    assert [(e["family"], e["nonfinite_tokens"]) for e in report["layers"]] == [("tree", 4), ("l1", 4), ("moe", 4)]
    assert [e["nonfinite_tokens"] for e in build_report(path, window=(0, 3))["layers"]] == [0, 0, 0]
    result = run_cli("report", str(path))
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    flagged = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(flagged) == 3 and all("4 tokens with NaN/inf" in line for line in flagged), result.stdout
    assert "(sparse)" in flagged[1] and "(moe)" in flagged[2], flagged
    result = run_cli("report", str(path), "--json", "--window", "0:3")
    assert result.returncode == 0, result.stderr
    assert [e["nonfinite_tokens"] for e in json.loads(result.stdout)["layers"]] == [0, 0, 0]


def test_clean_run_has_no_flag_and_old_files_still_read(tmp_path: Path) -> None:
    path = tmp_path / "clean.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no non-finite warning on a clean run
        record(path, poison_step=None)
    assert [e["nonfinite_tokens"] for e in build_report(path)["layers"]] == [0, 0, 0]
    with h5py.File(path, "r+") as f:  # as written before the variable existed
        for group in ("tree", "l1", "moe"):
            del f[f"{group}/nonfinite_tokens"]
    assert "nonfinite_tokens" not in routescope.open(path)
    assert [e["nonfinite_tokens"] for e in build_report(path)["layers"]] == [None, None, None]
    result = run_cli("report", str(path))
    assert result.returncode == 0 and "warning:" not in result.stdout, result.stdout + result.stderr
