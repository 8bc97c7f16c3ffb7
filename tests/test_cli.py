"""The `routescope` command line, run as a user runs it (a subprocess): help, presets, record, info, user errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import check_tree_invariants, run_cli

from routescope.trainers.presets import PRESETS, get_preset

DEBUG = get_preset("debug")
DEBUG_INTERVALS = -(-DEBUG.steps // DEBUG.record_every)  # the last, partial interval is recorded too
DEBUG_TOKENS_PER_STEP = DEBUG.batch_size * DEBUG.model.seq_len
UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def assert_user_error(result, *, contains: str | None = None) -> str:
    """Exit code 2, exactly one non-empty stderr line starting with 'error:', no traceback anywhere."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("error:") and line[len("error:") :].strip(), line
    if contains is not None:
        assert contains in line, line
    return line


# ------------------------------------------------------------------------------------------ help, version


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["record", "info", "--version", "--help"]),
        (("record",), ["--config", "--steps", "--out", "--every", "--device", "--seed", "--sample-tokens",
                       "--overwrite", "--list"]),  # fmt: skip
        (("info",), ["--json", "path"]),
        (("dash",), ["--host", "--port", "--interval", "127.0.0.1"]),
    ],
    ids=["top", "record", "info", "dash"],
)
def test_help(args: tuple[str, ...], expected: list[str]) -> None:
    result = run_cli(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    for word in expected:
        assert word in result.stdout, f"{word!r} missing from `{' '.join(args)} --help`:\n{result.stdout}"
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == version("routescope")
    assert re.fullmatch(r"\d+(\.\d+)*\S*", result.stdout.strip())


def test_record_list() -> None:
    result = run_cli("record", "--list")
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    for name in ("debug", "shakespeare-tree", "shakespeare-dense"):
        assert name in names, result.stdout
    assert set(PRESETS) <= names
    debug_line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["debug"])
    assert debug_line.split()[1:3] == [str(DEBUG.steps), str(DEBUG_TOKENS_PER_STEP)]


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    """`routescope record --config debug --out tmp/run.h5 --device cpu`, run in a fresh folder."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "tmp").mkdir()
    result = run_cli("record", "--config", "debug", "--out", "tmp/run.h5", "--device", "cpu", cwd=cwd)
    return cwd, cwd / "tmp" / "run.h5", result


def test_record_end_to_end(recorded) -> None:
    cwd, path, result = recorded
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert path.is_file()
    out = result.stdout
    assert "tmp/run.h5" in out
    # the size it prints matches the file's size
    match = re.search(r"wrote tmp/run\.h5 \((\d+(?:\.\d+)?) (B|KB|MB|GB)\)", out)
    assert match, out
    printed = float(match.group(1)) * UNITS[match.group(2)]
    size = path.stat().st_size
    assert abs(printed - size) <= 0.05 * UNITS[match.group(2)] + 0.5, (printed, size)
    # and the next command to run
    next_lines = [line for line in out.splitlines() if "routescope info" in line]
    assert next_lines and "tmp/run.h5" in next_lines[0], out
    # the file is a valid run: every invariant, every interval
    assert check_tree_invariants(path) == DEBUG_INTERVALS
    with h5py.File(path, "r") as f:  # closed cleanly: plain (non-SWMR) h5py opens it
        assert list(f["tree/step"][:]) == list(range(DEBUG.record_every, DEBUG.steps + 1, DEBUG.record_every))
        assert np.all(f["tree/tokens"][:] == DEBUG.record_every * DEBUG_TOKENS_PER_STEP)


def test_info_human(recorded) -> None:
    cwd, path, _ = recorded
    result = run_cli("info", "tmp/run.h5", cwd=cwd)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "finished" in out
    assert f"{DEBUG_INTERVALS} intervals" in out, out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+blocks\.", line)]
    assert len(rows) == DEBUG.model.n_layer, out
    header = next(line.split() for line in out.splitlines() if line.split()[:2] == ["layer", "name"])
    for i, row in enumerate(rows):
        assert row[0] == str(i)
        assert row[header.index("depth")] == str(DEBUG.model.depth)
        assert row[header.index("trees")] == str(DEBUG.model.trees)


def test_info_json(recorded) -> None:
    cwd, path, _ = recorded
    result = run_cli("info", str(path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["intervals"] == DEBUG_INTERVALS > 0
    assert summary["first_step"] == DEBUG.record_every and summary["last_step"] == DEBUG.steps
    assert summary["tokens"] == DEBUG.steps * DEBUG_TOKENS_PER_STEP
    assert summary["run_state"] == "finished"
    assert summary["schema_version"] == 1
    assert summary["size_bytes"] == path.stat().st_size
    assert len(summary["layers"]) == DEBUG.model.n_layer == 2
    for layer in summary["layers"]:
        assert layer["depth"] == DEBUG.model.depth == 3
        assert layer["trees"] == DEBUG.model.trees == 2
        assert layer["family"] == "tree"
    assert summary["config"]["preset"]["steps"] == DEBUG.steps
    assert summary["config"]["device"] == "cpu"


# ------------------------------------------------------------------------------------------ record: user errors


def test_record_refuses_to_overwrite(tmp_path: Path, debug_run: Path) -> None:
    out = tmp_path / "existing.h5"
    shutil.copy(debug_run, out)
    before = out.read_bytes()
    result = run_cli("record", "--config", "debug", "--out", str(out), "--device", "cpu")
    line = assert_user_error(result, contains="--overwrite")
    assert "already exists" in line
    assert out.read_bytes() == before


def test_record_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "existing.h5"
    out.write_text("not a run file\n")
    result = run_cli("record", "--config", "debug", "--steps", "4", "--every", "2", "--out", str(out),
                     "--device", "cpu", "--overwrite")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert check_tree_invariants(out) == 2


def test_record_unknown_preset(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    result = run_cli("record", "--config", "no-such-preset", "--out", str(out), "--device", "cpu")
    line = assert_user_error(result, contains="no-such-preset")
    assert "debug" in line  # says what to choose instead
    assert not out.exists()


# ------------------------------------------------------------------------------------------ info: user errors


def _missing(tmp: Path, run: Path) -> Path:
    return tmp / "does-not-exist.h5"


def _directory(tmp: Path, run: Path) -> Path:
    (tmp / "folder.h5").mkdir()
    return tmp / "folder.h5"


def _empty(tmp: Path, run: Path) -> Path:
    (tmp / "empty.h5").write_bytes(b"")
    return tmp / "empty.h5"


def _text(tmp: Path, run: Path) -> Path:
    (tmp / "notes.h5").write_text("step,loss\n1,5.5\n2,5.1\n")
    return tmp / "notes.h5"


def _truncated(tmp: Path, run: Path) -> Path:
    data = run.read_bytes()
    (tmp / "truncated.h5").write_bytes(data[: len(data) // 3])
    return tmp / "truncated.h5"


def _foreign(tmp: Path, run: Path) -> Path:
    with h5py.File(tmp / "foreign.h5", "w") as f:
        f.create_dataset("x", data=np.arange(10))
    return tmp / "foreign.h5"


def _newer_schema(tmp: Path, run: Path) -> Path:
    shutil.copy(run, tmp / "newer.h5")
    with h5py.File(tmp / "newer.h5", "r+") as f:
        f.attrs["schema_version"] = 999
    return tmp / "newer.h5"


def _schema_only(tmp: Path, run: Path) -> Path:
    with h5py.File(tmp / "hollow.h5", "w") as f:
        f.attrs["schema_version"] = 1
        f.create_dataset("x", data=np.arange(3))
    return tmp / "hollow.h5"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_missing, "no such file"),
        (_directory, "directory"),
        (_empty, "empty"),
        (_text, "not an HDF5 file"),
        (_truncated, "truncated"),
        (_foreign, "not a routescope run"),
        (_newer_schema, "999"),
        (_schema_only, "not a complete run file"),
    ],
    ids=["missing", "directory", "empty", "text", "truncated", "foreign-hdf5", "newer-schema", "no-groups"],
)
@pytest.mark.parametrize("command", ["info", "report", "dash"])
def test_bad_input(tmp_path: Path, debug_run: Path, make, says: str, command: str) -> None:
    path = make(tmp_path, debug_run)
    result = run_cli(command, str(path))
    assert_user_error(result, contains=says)
    assert result.stdout.strip() == ""


# ------------------------------------------------------------------------------------------ dense baseline


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--sample-tokens", "0"]], ids=["traces-on", "traces-off"])
def test_dense_baseline(tmp_path: Path, extra: list[str]) -> None:
    """A dense model has no routed layers: record still works (losses only) and info says so,
    with trace sampling on and off (off isolates `info` from the recorder's trace path)."""
    out = tmp_path / "dense.h5"
    result = run_cli("record", "--config", "shakespeare-dense", "--steps", "3", "--every", "1", *extra,
                     "--out", str(out), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    with h5py.File(out, "r") as f:
        assert "tree" not in f
        assert list(f["run/step"][:]) == [1, 2, 3]
    info = run_cli("info", str(out))
    assert info.returncode == 0, info.stderr
    assert "no routed layers" in info.stdout
    as_json = run_cli("info", str(out), "--json")
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["layers"] == []
    assert summary["run_state"] == "finished"


# ------------------------------------------------------------------------------------------ dash server


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_dash_serves_the_run_and_warns_when_exposed(debug_run: Path, host: str) -> None:
    """`routescope dash` serves the app; binding anything but loopback prints a loud warning."""
    import urllib.request

    port = _free_port()
    args = [sys.executable, "-m", "routescope.cli", "dash", str(debug_run), "--port", str(port), "--host", host]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.time() + 60, ""
        while time.time() < deadline and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
        assert "routescope" in body, "the dashboard did not answer"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/" in out
    assert ("anyone who can reach this machine" in err) == (host == "0.0.0.0"), err
    assert "Traceback" not in err
