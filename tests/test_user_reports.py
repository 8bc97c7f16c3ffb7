"""What a new user hit on a fresh clone: each case reproduced as they met it, through the command line
(one `error:` or `warning:` line, exit code 2 for errors, no traceback, nothing destroyed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

import routescope
from routescope import analysis


def one_clean_line(result: subprocess.CompletedProcess, says: str) -> None:
    """Exit code 2, one `error:` line containing `says`, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---- resource bounds ----------------------------------------------------------------------------------


def test_sample_tokens_beyond_a_step_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    one_clean_line(run_cli("record", "--config", "debug", "--steps", "5", "--sample-tokens", "100000000", "--out", str(out)),
                   "at most 256")  # debug: 8 sequences × 32 tokens per step
    assert not out.exists()


CHILD = """
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))  # a leak fails here instead of filling the machine
import routescope
torch.manual_seed(0)
model = torch.nn.Sequential(routescope.TreeFFN(8, 8, depth=3))
with routescope.Recorder(model, sys.argv[1], every=1, sample_tokens=100_000_000) as rec:
    for _ in range(3):
        model(torch.randn(64, 8)).sum().backward()
        rec.step(loss=0.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_huge_sample_allocates_what_the_data_needs(tmp_path: Path) -> None:
    """Recorder(sample_tokens=10**8) on 64 tokens a step: chunks follow the data (≤ 4 MiB), memory stays small."""
    limit = 3 * 2**30
    out = tmp_path / "run.h5"
    child = subprocess.run([sys.executable, "-c", CHILD.format(limit=limit), str(out)], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout.split()[-1]) * 1024 < 2 * 2**30  # peak resident memory, KiB on Linux
    with h5py.File(out, "r") as f:
        assert f["traces/sample"].shape == (3 * 64,)
        for name, dset in f["traces"].items():
            if dset.chunks:
                assert np.prod(dset.chunks) * dset.dtype.itemsize <= 4 * 2**20, name


# ---- files the user cannot write ---------------------------------------------------------------------


def test_sweep_out_on_a_read_only_filesystem(readonly_dir) -> None:
    folder = readonly_dir()
    one_clean_line(run_cli("sweep", "depth", "--seeds", "1", "--steps", "2", "--out", str(folder / "runs")),
                   "choose a writable --out folder")


def killed_run(path: Path, check_live=None) -> Path:
    """`routescope record` killed (SIGKILL) once it has flushed some intervals; `check_live(path)` runs
    while it still writes."""
    rec = subprocess.Popen([sys.executable, "-m", "routescope.cli", "record", "--config", "debug", "--steps", "100000",
                            "--every", "1", "--out", str(path), "--device", "cpu"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(600):
            if path.exists() and path.stat().st_size > 100_000:
                break
            subprocess.run(["sleep", "0.1"])
        if check_live is not None:
            check_live(path)
    finally:
        rec.kill()
        rec.wait()
    return path


def test_repair_on_a_read_only_filesystem(readonly_dir, tmp_path: Path) -> None:
    """A killed run's file on a read-only disk: repair says so in one line and changes nothing."""
    killed = killed_run(tmp_path / "killed.h5")
    folder = readonly_dir({"killed.h5": killed})
    before = (folder / "killed.h5").read_bytes()
    one_clean_line(run_cli("repair", str(folder / "killed.h5")), "copy the file to a writable folder")
    assert (folder / "killed.h5").read_bytes() == before


def test_record_out_a_folder_or_read_only(tmp_path: Path, readonly_dir) -> None:
    one_clean_line(run_cli("record", "--config", "debug", "--steps", "2", "--out", str(tmp_path)), "is a folder")
    folder = readonly_dir()
    result = run_cli("record", "--config", "debug", "--steps", "2", "--out", str(folder / "run.h5"))
    one_clean_line(result, "not writable")
    assert "--resume" not in result.stderr  # no advice that cannot apply: nothing was created


# ---- reports and info --------------------------------------------------------------------------------


def test_report_events_follow_layer(debug_run: Path) -> None:
    ds = routescope.open(debug_run)
    events = analysis.pruning_events(ds)
    for layer in (0, 1):
        report = json.loads(run_cli("report", str(debug_run), "--events", "--json", "--layer", str(layer)).stdout)
        mine = events[(events["layer"] == layer) & (events["status"] == "event")]
        assert report["events"]["died"] == int((mine["kind"] == "died").sum())
        assert report["events"]["froze"] == int((mine["kind"] == "froze").sum())
        warning = analysis.early_warnings(ds, layers=[layer])
        assert set(warning.flags["layer"]) <= {layer}
        assert report["events"]["early_warning"]["verdict"] == warning.verdict
        if warning.trivial is not None:
            assert report["events"]["early_warning"]["trivial"]["flags"] == warning.trivial.flags
    everything = json.loads(run_cli("report", str(debug_run), "--events", "--json").stdout)["events"]
    final = events[events["status"] == "event"]
    assert everything["died"] == int((final["kind"] == "died").sum())


def test_report_says_its_window_rounds_alike_and_reports_a_layer_once(debug_run: Path) -> None:
    both = run_cli("report", str(debug_run), str(debug_run), "--window", "10:")
    assert both.returncode == 0 and "window 10:" in both.stdout
    assert "the last quarter of each run" in run_cli("report", str(debug_run), str(debug_run)).stdout
    assert "whole runs" in run_cli("report", str(debug_run), str(debug_run), "--window", "all").stdout
    single = run_cli("report", str(debug_run), "--events", "--window", "all")
    for line in single.stdout.splitlines():
        if line.strip().startswith(("predictor ", "trivial rule", "random")):
            for number in line.split(")")[-1].replace(",", "").split()[1:]:
                assert number == "–" or len(number.split(".")[-1]) <= 3, line
    twice = json.loads(run_cli("report", str(debug_run), "--layer", "1", "--layer", "1", "--json").stdout)
    assert [layer["layer"] for layer in twice["layers"]] == [1]


def test_report_on_a_run_that_ended_before_its_first_interval(tmp_path: Path) -> None:
    from routescope.store import LayerLayout
    from routescope.store.writer import RunWriter

    path = tmp_path / "failed.h5"
    RunWriter(path, [LayerLayout("l", 2, 1)], {}).close("failed", failure="out of memory at step 1")
    one_clean_line(run_cli("report", str(path)), "ended (failed) before its first interval")


def test_dense_baseline_warns_in_one_line_and_info_shows_its_losses(tmp_path: Path) -> None:
    out = tmp_path / "dense.h5"
    result = run_cli("record", "--config", "shakespeare-dense", "--steps", "4", "--every", "2", "--out", str(out),
                     "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "warning: the model has no routed layers (TreeFFN, L1SparseFFN, TopKMoE): only losses are recorded"]
    info = run_cli("info", str(out))
    assert info.returncode == 0 and "loss: train" in info.stdout
    losses = json.loads(run_cli("info", str(out), "--json").stdout)["losses"]
    with h5py.File(out, "r") as f:
        assert losses["train_loss"]["last"] == pytest.approx(float(f["run/train_loss"][-1]))
    pointed = run_cli("report", str(out))
    assert pointed.returncode == 2 and f"routescope info {out}" in pointed.stderr


def test_dash_on_a_host_that_does_not_resolve_or_a_taken_port(debug_run: Path) -> None:
    import socket

    one_clean_line(run_cli("dash", str(debug_run), "--host", "nonexistent.invalid", timeout=60),
                   "cannot serve on --host nonexistent.invalid")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        one_clean_line(run_cli("dash", str(debug_run), "--port", str(port), timeout=60), f"cannot serve on 127.0.0.1:{port}")


# ---- sweeps reuse only what they asked for ---------------------------------------------------------------


def test_sweep_reuses_only_the_same_configuration(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ("sweep", "depth", "--seeds", "1", "--out", str(out), "--device", "cpu")
    first = run_cli(*args, "--steps", "2")
    assert first.returncode == 0 and "(0 reused" in first.stdout, first.stderr
    files = sorted(out.glob("depth-*.h5"))
    assert files and all(routescope.store.describe(p)["last_step"] == 2 for p in files)
    again = run_cli(*args, "--steps", "2")
    assert f"reusing {len(files)} finished run" in again.stdout and f"({len(files)} reused, 0 trained)" in again.stdout
    longer = run_cli(*args, "--steps", "3")
    assert f"(0 reused, {len(files)} trained)" in longer.stdout
    assert all(routescope.store.describe(p)["last_step"] == 3 for p in files)


def test_sweep_refuses_to_overwrite_a_foreign_file(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    from routescope.trainers.sweep import sweep_configs

    foreign = out / f"{next(iter(sweep_configs('depth', 'tiny', 1, 2)))}.h5"  # the name the sweep's first run takes
    foreign.write_text("my notes, not a run")
    one_clean_line(run_cli("sweep", "depth", "--seeds", "1", "--steps", "2", "--out", str(out), "--device", "cpu"),
                   f"refusing to overwrite {foreign}")
    assert foreign.read_text() == "my notes, not a run"


# ---- files every HDF5 tool reads -------------------------------------------------------------------------


def _hdf5_tools() -> str | None:
    """Why the distribution's HDF5/netCDF tools are missing (installed with apt-get where possible), or None."""
    import os

    if all(shutil.which(t) for t in ("h5dump", "h5ls", "ncdump")):
        return None
    if os.environ.get("ROUTESCOPE_NO_APT") or not shutil.which("apt-get") or os.geteuid() != 0:
        return "h5dump/ncdump missing: run `apt-get install hdf5-tools netcdf-bin` (as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", "install", "-y", "-q", "hdf5-tools", "netcdf-bin"], env=env, capture_output=True,
                          timeout=900)  # fmt: skip
    if done.returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(["apt-get", "install", "-y", "-q", "hdf5-tools", "netcdf-bin"], env=env, capture_output=True,
                              timeout=900)  # fmt: skip
    return None if done.returncode == 0 else f"apt-get could not install hdf5-tools netcdf-bin: {done.stderr[-200:]!r}"


@pytest.mark.slow
def test_the_distributions_hdf5_and_netcdf_tools_read_a_run(debug_run: Path, family_runs: dict[str, Path],
                                                             tmp_path: Path) -> None:  # fmt: skip
    missing = _hdf5_tools()
    if missing:
        pytest.skip(missing)
    def readable_by_the_tools(path: Path) -> bool:
        for tool in (["h5dump", "-H"], ["h5ls", "-r"], ["ncdump", "-h"]):
            done = subprocess.run([*tool, str(path)], capture_output=True, text=True, timeout=120)
            if done.returncode or "ERROR" in done.stdout or "error" in done.stderr.lower():
                return False
        return True

    for path in (debug_run, *family_runs.values()):
        assert readable_by_the_tools(path), path
    assert "node_visits" in subprocess.run(["ncdump", "-h", str(debug_run)], capture_output=True, text=True).stdout

    def live(path: Path) -> None:
        # While written, HDF5 admits SWMR readers only (the 1.10 tools have no SWMR mode): routescope reads it.
        assert routescope.open(path).sizes["step"] > 0
        assert not readable_by_the_tools(path)

    killed = killed_run(tmp_path / "killed.h5", check_live=live)
    assert run_cli("repair", str(killed)).returncode == 0
    assert readable_by_the_tools(killed)  # a killed run, once repaired, opens in every tool



def test_threshold_options_reach_the_report_and_bad_ones_are_one_line(debug_run: Path, tmp_path: Path) -> None:
    """Depth 1, 200 tokens, all sent left: the silent right leaf is dead at α = 0.05 ((1 − δ/2)^200 < 0.05) but
    only undetermined at α = 0.001 ((1 − δ/2)^200 > 0.001): the option reaches the tests."""
    from test_metrics import write_run

    assert 0.975**200 < 0.05 and 0.975**200 > 0.001
    path = write_run(tmp_path / "edge.h5", 1, [np.array([[200, 0]])])
    default = json.loads(run_cli("report", str(path), "--json").stdout)
    strict = json.loads(run_cli("report", str(path), "--json", "--alpha", "0.001").stdout)
    assert default["thresholds"]["alpha"] == 0.05 and strict["thresholds"]["alpha"] == 0.001
    assert default["layers"][0]["static_fraction"] == pytest.approx(1 / 3) and strict["layers"][0]["static_fraction"] == 0
    for command, option, message in (("report", "--alpha=2", "alpha"), ("report", "--persistence=0", "persistence"),
                                      ("dash", "--delta=0", "delta"), ("info", "--window=x", "START:END")):  # fmt: skip
        result = run_cli(command, str(debug_run), option)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_info_says_how_the_run_routes_now(debug_run: Path) -> None:
    """`info` summarises the calibrated states over the last quarter, the same numbers `report` gives."""
    info = json.loads(run_cli("info", str(debug_run), "--json").stdout)["routing"]
    report = json.loads(run_cli("report", str(debug_run), "--json").stdout)
    assert info["window"] == report["window"] and info["window"]["span"] == "last-quarter"
    assert info["families"]["tree"] == {key: report["families"]["tree"][key] for key in info["families"]["tree"]}
    assert set(info["families"]["tree"]) == {"dead_fraction", "undetermined_fraction", "frozen_fraction", "static_fraction"}
    text = run_cli("info", str(debug_run)).stdout
    assert "the last quarter" in text and "undetermined fraction" in text


def test_events_on_a_run_without_tree_layers_say_so(family_runs: dict[str, Path]) -> None:
    for family in ("l1", "moe"):
        result = run_cli("report", str(family_runs[family]), "--events")
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert "about tree layers; this report has none" in result.stdout
        as_json = json.loads(run_cli("report", str(family_runs[family]), "--events", "--json").stdout)
        assert "events" not in as_json  # documented: only with at least one reported tree layer
