"""The run file: round trip through plain h5py, routescope.open and xarray's h5netcdf engine; live reads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from conftest import check_tree_invariants, open_plain

import routescope
from routescope.store.format import SCHEMA_VERSION, TREE_VARIABLES, LayerLayout, RunFileError
from routescope.store.reader import open_h5
from routescope.store.writer import RunWriter


def synthetic_rows(rng: np.random.Generator, layers: list[LayerLayout], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """One interval of random values, padded the way the recorder pads layers of different shapes."""
    shape = (len(layers), sizes["tree"])
    row = {name: rng.integers(0, 100, shape + (sizes[name.split("_")[0]],)) for name in TREE_VARIABLES
           if name.split("_")[0] in ("node", "leaf")}  # fmt: skip
    row["nonfinite_tokens"] = rng.integers(0, 3, shape)
    for name in ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum"):
        row[name] = rng.normal(size=row[name].shape)
    row["tokens"] = np.int64(rng.integers(1, 1000))
    row["layer_tokens"] = np.full(len(layers), row["tokens"])
    return row


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]], list[int]]:
    layers = [LayerLayout("blocks.0.mlp", 3, 2, {"depth": 3}), LayerLayout("blocks.1.mlp", 2, 1, {"depth": 2})]
    path = tmp_path / "synthetic.h5"
    writer = RunWriter(path, layers, {"config": {"lr": 0.1}, "torch_version": "x"}, scalars=("train_loss", "val_loss"))
    rng = np.random.default_rng(0)
    rows, steps = [], [5, 10, 15, 17]
    for step in steps:
        rows.append(synthetic_rows(rng, layers, writer.sizes))
        writer.append_interval(step, rows[-1], {"train_loss": step / 10})
    with pytest.raises(ValueError, match="steps must increase"):
        writer.append_interval(17, rows[-1], {})
    writer.close()
    return path, rows, steps


def test_round_trip_plain_h5py(written) -> None:
    path, rows, steps = written
    with h5py.File(path, "r") as f:  # a closed run opens with plain h5py
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert json.loads(f.attrs["config"]) == {"lr": 0.1}
        assert list(f["tree/step"][:]) == steps
        for name in TREE_VARIABLES:
            np.testing.assert_array_equal(f["tree"][name][:], np.stack([r[name] for r in rows]))
        assert f["tree/node_visits"].dtype == np.int64
        assert np.isnan(f["run/val_loss"][:]).all()
        np.testing.assert_allclose(f["run/train_loss"][:], np.array(steps) / 10)


def test_round_trip_routescope_open_and_xarray(written) -> None:
    path, rows, steps = written
    ds = routescope.open(path)
    assert ds["node_visits"].dims == ("step", "layer", "tree", "node")
    assert ds["leaf_visits"].dims == ("step", "layer", "tree", "leaf")
    assert ds.sizes == {"step": 4, "layer": 2, "tree": 2, "node": 7, "leaf": 8}
    assert list(ds["layer_name"].values) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert ds.attrs["run_state"] == "finished"
    np.testing.assert_array_equal(ds["node_visits"].sel(step=15, layer=1).values, rows[2]["node_visits"][1])
    assert hasattr(ds["node_visits"].data, "dask")  # lazy
    plain = xr.open_dataset(path, engine="h5netcdf", group="tree")  # no routescope needed
    for name in TREE_VARIABLES:
        np.testing.assert_array_equal(plain[name].values, ds[name].values)
    assert list(plain["step"].values) == steps
    run = routescope.open(path, group="run")
    assert run["train_loss"].dims == ("step",)


def test_refuses_to_overwrite(written) -> None:
    path, _, _ = written
    before = path.read_bytes()
    with pytest.raises(RunFileError, match="already exists"):
        RunWriter(path, [LayerLayout("x", 1, 1)], {})
    assert path.read_bytes() == before


def test_partial_row_after_a_crash_is_not_shown(tmp_path: Path) -> None:
    """Data rows written before their step coordinate (a kill mid-interval) stay invisible."""
    path = tmp_path / "partial.h5"
    layers = [LayerLayout("l", 2, 1)]
    writer = RunWriter(path, layers, {})
    rows = synthetic_rows(np.random.default_rng(1), layers, writer.sizes)
    writer.append_interval(1, rows, {})
    dset = writer.file["tree/node_visits"]
    dset.resize(2, axis=0)  # as if killed after the data and before the coordinate
    writer.file.flush()
    writer.close("interrupted")
    ds = routescope.open(path)
    assert ds.sizes["step"] == 1 and ds["node_visits"].shape[0] == 1
    assert ds.attrs["run_state"] == "interrupted"


def test_dense_run_has_no_tree_group(tmp_path: Path) -> None:
    path = tmp_path / "dense.h5"
    writer = RunWriter(path, [], {}, scalars=("train_loss",))
    writer.append_interval(1, {}, {"train_loss": 2.0})
    writer.close()
    assert float(routescope.open(path, group="run")["train_loss"][0]) == 2.0
    with pytest.raises(RunFileError, match="dense baseline"):
        routescope.open(path)


def test_newer_schema_is_refused(written, tmp_path: Path) -> None:
    path, _, _ = written
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RunFileError, match="upgrade routescope"):
        open_h5(path)


@pytest.mark.slow
def test_read_while_a_run_is_writing(tmp_path: Path) -> None:
    """SWMR: a second process reads complete, growing intervals from a run that is still recording."""
    path = tmp_path / "live.h5"
    cmd = [sys.executable, "-m", "routescope.cli", "record", "--config", "debug", "--steps", "100000", "--every", "1",
           "--out", str(path), "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = []
        deadline = time.monotonic() + 90
        while len(seen) < 3 and time.monotonic() < deadline:
            try:
                ds = routescope.open(path)
            except RunFileError:
                time.sleep(0.2)
                continue
            assert ds.attrs["run_state"] == "running"
            visits, tokens = ds["node_visits"].values, ds["tokens"].values
            assert np.all(visits[:, :, :, 0] == tokens[:, None, None])  # complete rows only
            assert np.all(np.diff(ds["step"].values) > 0)
            if not seen or ds.sizes["step"] > seen[-1]:
                seen.append(ds.sizes["step"])
            ds.close()
            time.sleep(0.3)
        assert len(seen) >= 3, f"the reader never saw the run grow: {seen}"
    finally:
        proc.kill()
        proc.wait()
    assert check_tree_invariants(path) >= seen[-1]
    with open_plain(path) as f:
        assert f["tree/step"].shape[0] >= seen[-1]


def test_corrupted_copies_give_clean_errors_only(debug_run: Path, tmp_path: Path) -> None:
    """Seeded fuzz: 40 copies of a real run with random byte flips. Every reader either works or
    raises RunFileError (one line for the CLI), never another exception. Issue 9's soak runs more."""
    from routescope.analysis.report import build_report
    from routescope.dashboards.app import Dashboard
    from routescope.store import RunFileError, describe

    data = debug_run.read_bytes()
    rng = np.random.default_rng(1234)
    outcomes = {"read": 0, "clean error": 0}
    for case in range(40):
        damaged = bytearray(data)
        for pos in rng.integers(1024, len(damaged), size=int(rng.integers(1, 40))):
            damaged[pos] ^= int(rng.integers(1, 256))
        path = tmp_path / f"fuzz{case}.h5"
        path.write_bytes(bytes(damaged))
        for reader in (describe, build_report, lambda p: Dashboard([p])):
            try:
                reader(path)
                outcomes["read"] += 1
            except RunFileError as err:
                assert "\n" not in str(err) and str(path) in str(err)
                outcomes["clean error"] += 1
    assert outcomes["clean error"] > 0  # the fuzz did reach damaged metadata


# ---- RunFile: the one front door ---------------------------------------------------------------------------


def test_runfile_groups_state_and_attributes(written) -> None:
    path, rows, steps = written
    with routescope.RunFile.open(path) as run:
        assert run.schema_version == SCHEMA_VERSION and run.state == "finished" and run.failure is None
        assert run.config == {"lr": 0.1} and [layer["name"] for layer in run.layers] == ["blocks.0.mlp", "blocks.1.mlp"]
        assert run.families == ("tree",) and set(run.groups) == {"tree", "run"} and "tree" in run and "l1" not in run
        assert run.samples == 0 and run.complete_rows("tree") == len(steps) and not run.live
        ds = run.dataset("tree")
        assert ds is run.dataset("tree")  # opened once, cached
        assert list(ds["step"].values) == steps
        for name in ("node_visits", "leaf_act_sum", "nonfinite_tokens"):
            np.testing.assert_array_equal(ds[name].values, np.stack([r[name] for r in rows]))
        assert run.describe()["intervals"] == len(steps) and run.describe()["last_step"] == steps[-1]
        with pytest.raises(RunFileError, match="no group 'l1'"):
            run.dataset("l1")
    with pytest.raises(Exception):  # closed with the `with`: its Datasets stop working
        ds["node_visits"].values


def test_runfile_direct_reads_match_the_dataset(written) -> None:
    """The dashboard's fast path: one interval's hyperslab equals the Dataset's row; rows are bounded."""
    path, rows, steps = written
    with routescope.RunFile.open(path) as run:
        for i in range(len(steps)):
            np.testing.assert_array_equal(run.read("tree", "node_visits", i, 1, slice(0, 1), slice(0, 3)),
                                          rows[i]["node_visits"][1, :1, :3])  # fmt: skip
        np.testing.assert_array_equal(run.read("tree", "leaf_visits", slice(1, None), 0), np.stack([r["leaf_visits"][0] for r in rows[1:]]))
        for bad in (len(steps), -1):
            with pytest.raises(IndexError, match="complete rows"):
                run.read("tree", "node_visits", bad)


def test_runfile_never_shows_a_partial_row(tmp_path: Path) -> None:
    path = tmp_path / "partial.h5"
    layers = [LayerLayout("l", 2, 1)]
    writer = RunWriter(path, layers, {})
    writer.append_interval(1, synthetic_rows(np.random.default_rng(1), layers, writer.sizes), {})
    writer.file["tree/node_visits"].resize(2, axis=0)  # data one row ahead of the coordinate, as after a kill
    writer.file.flush()
    writer.close("interrupted")
    with routescope.RunFile.open(path) as run:
        assert run.complete_rows("tree") == 1 and run.state == "interrupted"
        assert run.read("tree", "node_visits", slice(None)).shape[0] == 1
        with pytest.raises(IndexError):
            run.read("tree", "node_visits", 1)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("not hdf5"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").close(), "not a routescope run"),
])  # fmt: skip
def test_runfile_refuses_with_one_line(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "x.h5"
    make(path)
    with pytest.raises(RunFileError, match=message) as err:
        routescope.RunFile.open(path)
    assert "\n" not in str(err.value)
