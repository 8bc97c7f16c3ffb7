"""The routing-stability probe (issue 22, item 3): a fixed held-out batch routed at each interval end into group
`probe`; stability is exact on constructed cases (a frozen router: 1 throughout), the probe neither counts in
the statistics nor changes training, and resume keeps the group consistent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import routescope
from routescope import Recorder, TopKMoE, TreeFFN
from routescope.analysis.stability import probe_stability
from routescope.store import RunFileError


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(TreeFFN(8, 8, depth=3, trees=2), TopKMoE(8, 8, experts=4, k=2))


def record(path: Path, net: torch.nn.Module, probe: torch.Tensor | None, steps: int = 8, train: bool = False,
           **options) -> None:  # noqa: ANN003
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    with Recorder(net, path, every=2, sample_tokens=0, probe=probe, **options) as rec:
        for _ in range(steps):
            loss = net(torch.randn(64, 8)).square().mean()
            if train:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rec.step(loss=loss)


def test_frozen_router_is_stable_throughout_and_the_probe_is_what_the_model_does(tmp_path: Path) -> None:
    net, probe = model(), torch.randn(40, 8)
    record(tmp_path / "run.h5", net, probe)  # no optimizer step: routing never changes
    ds = routescope.open(tmp_path / "run.h5", group="probe")
    assert ds.sizes["probe"] == 40 and ds.sizes["step"] == 4
    stable = probe_stability(ds)
    assert np.all(stable["tree_stable"].values == 1.0) and np.all(stable["moe_stable"].values == 1.0)
    with torch.no_grad():
        path = net[0].route_and_compute(probe)[1].path
        hidden = net[0](probe)
        experts = net[1].route(hidden)[1].sort(-1).values
    np.testing.assert_array_equal(ds["leaf"].values[-1, 0], (path[:, :, -1] - 7).numpy())
    np.testing.assert_array_equal(ds["experts"].values[-1, 0], experts.numpy())
    counts = routescope.open(tmp_path / "run.h5")["tokens"].values
    assert counts.tolist() == [128] * 4, "probe tokens are not counted in the statistics"


def test_stability_is_one_from_the_interval_routing_stops_changing(tmp_path: Path) -> None:
    """The tree's weights are shaken at every step up to step 6, then left alone: from the interval closing at
    step 6 on, every probe token routes as at the end (1.0); before, some do not."""
    net, path = model(), tmp_path / "run.h5"
    with Recorder(net, path, every=2, sample_tokens=0, probe=torch.randn(64, 8)) as rec:
        for step in range(1, 13):
            net(torch.randn(64, 8))
            if step <= 6:
                with torch.no_grad():
                    net[0].w.add_(0.5 * torch.randn_like(net[0].w))
            rec.step()
    stable = probe_stability(routescope.open(path, group="probe"))["tree_stable"].values[:, 0]
    assert stable.tolist()[2:] == [1.0] * 4 and stable[0] < 1.0 and stable[1] < 1.0


def test_the_probe_does_not_change_training(tmp_path: Path) -> None:
    a, b, probe = model(), model(), torch.randn(16, 8)
    torch.manual_seed(1)
    record(tmp_path / "a.h5", a, probe, train=True)
    torch.manual_seed(1)
    record(tmp_path / "b.h5", b, None, train=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert a.training and a[0].recording is False


def test_resume_needs_the_same_probe(tmp_path: Path) -> None:
    path, probe = tmp_path / "run.h5", torch.randn(16, 8)
    record(path, model(), probe, steps=4)
    with pytest.raises(RunFileError, match="probe of 16 tokens, the recorder has 0"):
        record(path, model(), None, steps=2, resume=True)
    record(path, model(), probe, steps=2, resume=True)
    assert routescope.open(path, group="probe").sizes["step"] == 3


def test_a_model_without_tree_or_moe_layers_refuses_a_probe(tmp_path: Path) -> None:
    from routescope import L1SparseFFN

    with pytest.raises(ValueError, match="tree or MoE layers"):
        record(tmp_path / "run.h5", torch.nn.Sequential(L1SparseFFN(8, 16, 8)), torch.randn(4, 8))


def test_the_dashboard_draws_routing_stability(tmp_path: Path) -> None:
    from routescope.dashboards.app import create_app

    path = tmp_path / "run.h5"
    record(path, model(), torch.randn(32, 8))
    board = create_app([path]).board
    heatmap, lines = board.curves(0, "routing_stability", [0])
    want = probe_stability(routescope.open(path, group="probe"))["tree_stable"].values
    np.testing.assert_allclose(np.asarray(heatmap.data[0].z, dtype=float).T, want)
    record(tmp_path / "plain.h5", model(), None)
    _, lines = create_app([tmp_path / "plain.h5"]).board.curves(0, "routing_stability", [0])
    assert "has no probe group" in lines.layout.annotations[0].text
