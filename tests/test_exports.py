"""`routescope export` (issue 22): Parquet, Zarr and TensorBoard read back with pandas, xarray and TensorBoard's
own event reader equal the run's numbers and counts; bad input is one line."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import run_cli

import routescope
from routescope.analysis import timeseries
from routescope.exports import ExportError, export
from routescope.exports.tables import groups, metric_table
from routescope.trainers.presets import get_preset
from routescope.trainers.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for preset in ("debug", "debug-moe", "debug-l1"):
        out[preset] = folder / f"{preset}.h5"
        train(get_preset(preset, steps=12, record_every=2), out=out[preset], device="cpu", show_progress=False)
    return out


def test_parquet_round_trips_metrics_and_counts(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = runs["debug"]
    export(path, "parquet", tmp_path / "pq")
    metrics = pd.read_parquet(tmp_path / "pq" / "metrics.parquet")
    ts = timeseries(routescope.open(path))
    got = metrics[(metrics.metric == "static_fraction")].pivot(index="step", columns="layer", values="value")
    np.testing.assert_array_equal(got.to_numpy(), ts["static_fraction"].values)
    nodes = pd.read_parquet(tmp_path / "pq" / "tree_nodes.parquet")
    ds = routescope.open(path)
    rebuilt = np.zeros(ds["node_visits"].shape, dtype=np.int64)
    steps = {int(s): i for i, s in enumerate(ds["step"].values)}
    rebuilt[nodes.step.map(steps), nodes.layer, nodes.tree, nodes.node] = nodes.node_visits
    np.testing.assert_array_equal(rebuilt, ds["node_visits"].values)  # padding is zero in the file as well
    depth = ds["layer_depth"].values
    assert (nodes.node < 2 ** depth[nodes.layer] - 1).all(), "padding rows left out"
    run = pd.read_parquet(tmp_path / "pq" / "run.parquet")
    np.testing.assert_array_equal(run.val_loss.to_numpy(), routescope.open(path, group="run")["val_loss"].values)


def test_zarr_round_trips_every_group(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    for preset, path in runs.items():
        export(path, "zarr", tmp_path / preset)
        family = {"debug": "tree", "debug-moe": "moe", "debug-l1": "l1"}[preset]
        for group in (family, "run"):
            back = xr.open_zarr(tmp_path / preset, group=group, consolidated=False).load()
            original = routescope.open(path, group=group).load()
            xr.testing.assert_equal(back, original)
            assert back.attrs["layers"] == original.attrs["layers"] if "layers" in original.attrs else True


def test_tensorboard_scalars_and_exact_histograms(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for preset, family, counts_of in (("debug", "tree", "leaf"), ("debug-moe", "moe", "expert")):
        path = runs[preset]
        export(path, "tensorboard", tmp_path / preset)
        events = EventAccumulator(str(tmp_path / preset), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
        events.Reload()
        ds = routescope.open(path, group=family)
        metrics = metric_table(groups(path))
        metric = "static_fraction" if family == "tree" else "load_cv"
        want = metrics[(metrics.metric == metric) & (metrics.layer == 0)].dropna()
        got = events.Scalars(f"routescope/{family}/layer0/{metric}")
        assert [e.step for e in got] == want.step.tolist()
        np.testing.assert_allclose([e.value for e in got], want.value.to_numpy(), rtol=1e-6)  # TensorBoard stores float32
        tag = f"routescope/{family}/layer0/{'leaf_visits' if family == 'tree' else 'expert_selections'}"
        hist = events.Histograms(tag)
        assert len(hist) == ds.sizes["step"]
        last = hist[-1].histogram_value
        if family == "tree":
            depth, trees = int(ds["layer_depth"][0]), int(ds["layer_trees"][0])
            exact = ds["leaf_visits"].isel(layer=0, step=-1).values[:trees, : 2**depth].reshape(-1)
        else:
            exact = np.diagonal(ds["coselect"].isel(layer=0, step=-1).values)[: int(ds["layer_experts"][0])]
        np.testing.assert_array_equal(np.asarray(last.bucket, dtype=np.int64), exact)  # one bucket per leaf / expert
        assert events.Tags()["images"], "a heatmap per layer"
        assert events.Scalars("routescope/run/val_loss")


def test_export_bad_input(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    result = run_cli("export", str(runs["debug"]), "--to", "parquet", "--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5" * 100)
    result = run_cli("export", str(bad), "--to", "zarr", "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("export", str(runs["debug"]), "--to", "csv", "--out", str(tmp_path / "z"))
    assert result.returncode == 2 and "--to must be one of" in result.stderr
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_a_live_run_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import h5py

    live = tmp_path / "live.h5"
    shutil.copy(runs["debug"], live)
    with h5py.File(live, "r+") as f:
        f["run_state"][()] = 0  # "running", and just modified
    os.utime(live, (time.time(), time.time()))
    with pytest.raises(ExportError, match="still being written"):
        export(live, "parquet", tmp_path / "out")


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from routescope.exports.writers import MissingExtra, require

    real = importlib.import_module

    def fake(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "zarr":
            raise ImportError("no zarr")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtra, match=r"pip install 'routescope\[zarr\]'"):
        require("zarr")


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file, parsed with wandb's own protobuf Record over the file's
    LevelDB-log framing (7-byte header; 32 KiB blocks of crc32c, length, type records)."""
    import json

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []

    def parse(raw: bytes) -> None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})

    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            parse(chunk)
        elif kind in (2, 3):
            pending = chunk if kind == 2 else pending + chunk
        elif kind == 4:
            parse(pending + chunk)
    return rows


def test_wandb_offline_run_holds_the_bounded_keys_and_exact_tables(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    import json

    from routescope.exports.writers import WANDB_METRICS

    path = runs["debug"]
    (written,) = export(path, "wandb", tmp_path / "wb")
    rows = wandb_history(written)
    metrics = metric_table(groups(path))
    want = metrics[(metrics.metric == "leaf_entropy_norm") & (metrics.layer == 1)].dropna()
    got = {r["_step"]: r["routescope/tree/layer1/leaf_entropy_norm"] for r in rows if "routescope/tree/layer1/leaf_entropy_norm" in r}
    assert sorted(got) == want.step.tolist()
    np.testing.assert_allclose([got[s] for s in want.step], want.value.to_numpy(), rtol=1e-12)
    scalar_keys = {k for r in rows for k in r if not k.startswith("_") and k.count("/") == 3}
    layers = routescope.open(path).sizes["layer"]
    assert len(scalar_keys) <= layers * len(WANDB_METRICS["tree"]) + 2, "a few keys per layer, not one per unit"
    (table_file,) = written.parent.glob("files/media/table/routescope/tree/layer0/unit_counts*.table.json")
    table = json.loads(table_file.read_text())
    ds = routescope.open(path)
    last = [row for row in table["data"] if row[0] == int(ds["step"][-1])]
    depth, trees = int(ds["layer_depth"][0]), int(ds["layer_trees"][0])
    exact = ds["leaf_visits"].isel(layer=0, step=-1).values[:trees, : 2**depth].reshape(-1)
    assert [row[2] for row in sorted(last, key=lambda r: r[1])] == exact.tolist()
