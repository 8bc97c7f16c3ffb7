"""Live logging (issue 22, item 2): `Recorder(log_to=...)` hands a bounded metric set per layer to a tracker at
each interval end, equal to the analysis' rolling curves over the same intervals, read back from TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import routescope
from routescope import Recorder, TopKMoE, TreeFFN
from routescope.analysis import family_timeseries, timeseries
from routescope.record.live_log import LIVE_METRICS


def record(path: Path, log_to, steps: int = 14) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    model = torch.nn.Sequential(TreeFFN(8, 8, depth=3, trees=2), TopKMoE(8, 8, experts=4, k=2))
    with Recorder(model, path, every=2, sample_tokens=0, log_to=log_to) as rec:
        for _ in range(steps):
            loss = model(torch.randn(64, 8)).square().mean()
            rec.step(loss=loss)
    return model


def test_callable_sink_gets_the_rolling_curves(tmp_path: Path) -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    record(tmp_path / "run.h5", lambda values, step: seen.append((step, dict(values))))
    steps = [s for s, _ in seen]
    tree = timeseries(routescope.open(tmp_path / "run.h5"), rolling=5)
    moe = family_timeseries(routescope.open(tmp_path / "run.h5", group="moe"), "moe", rolling=5)
    assert steps == tree["step"].values.tolist()
    for row, (step, values) in enumerate(seen):
        assert len(values) <= len(LIVE_METRICS["tree"]) + len(LIVE_METRICS["moe"]) + 2  # bounded: a few keys a layer
        for metric in LIVE_METRICS["tree"]:
            want = float(tree[metric].values[row, 0])
            key = f"routescope/tree/layer0/{metric}"
            assert (key not in values and not np.isfinite(want)) or values[key] == pytest.approx(want), (step, metric)
        for metric in LIVE_METRICS["moe"]:
            want = float(moe[metric].values[row, 0])
            key = f"routescope/moe/layer0/{metric}"
            assert (key not in values and not np.isfinite(want)) or values[key] == pytest.approx(want), (step, metric)
        assert values["routescope/run/train_loss"] > 0


def test_tensorboard_event_files_beside_the_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record(tmp_path / "run.h5", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run.tb"), size_guidance={"scalars": 0})
    events.Reload()
    tree = timeseries(routescope.open(tmp_path / "run.h5"), rolling=5)
    got = events.Scalars("routescope/tree/layer0/leaf_entropy_norm")
    assert [e.step for e in got] == tree["step"].values.tolist()
    np.testing.assert_allclose([e.value for e in got], tree["leaf_entropy_norm"].values[:, 0], rtol=1e-6)


def test_a_failing_tracker_warns_and_the_run_is_still_written(tmp_path: Path) -> None:
    def broken(values, step):  # noqa: ANN001, ANN202
        raise ConnectionError("tracker down")

    with pytest.warns(RuntimeWarning, match="live logging stopped \\(tracker down\\)"):
        record(tmp_path / "run.h5", broken)
    assert routescope.open(tmp_path / "run.h5").sizes["step"] == 7


def test_bad_log_to_is_refused_before_any_file_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_to must be"):
        record(tmp_path / "run.h5", 42)
    assert not (tmp_path / "run.h5").exists()


def test_wandb_live_logging_into_the_active_offline_run(tmp_path: Path) -> None:
    wandb = pytest.importorskip("wandb")
    from test_exports import wandb_history

    run = wandb.init(dir=str(tmp_path), project="t", settings=wandb.Settings(mode="offline", silent=True, console="off"))
    try:
        record(tmp_path / "run.h5", "wandb")
    finally:
        run.finish()
    (written,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in wandb_history(written) if "routescope/step" in r]
    tree = timeseries(routescope.open(tmp_path / "run.h5"), rolling=5)
    assert [r["routescope/step"] for r in rows] == tree["step"].values.tolist()
    np.testing.assert_allclose([r["routescope/tree/layer0/leaf_entropy_norm"] for r in rows],
                               tree["leaf_entropy_norm"].values[:, 0], rtol=1e-12)  # fmt: skip


def test_wandb_without_an_active_run_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    with pytest.raises(ValueError, match="call wandb.init"):
        record(tmp_path / "run.h5", "wandb")
    assert not (tmp_path / "run.h5").exists()
