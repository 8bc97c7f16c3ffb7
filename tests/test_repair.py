"""`routescope repair`: a killed run file opens with plain h5py afterwards, with the same data; unsafe cases refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli
from test_cli import assert_user_error

from routescope.store import RunFileError
from routescope.store.repair import FLAGS_AT, clear_open_flags, lookup3

# A writer that appends intervals and then dies without closing (os._exit: like SIGKILL, no cleanup),
# or, with "wait", stays alive holding the file open until killed.
WRITER = """
import os, sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from test_store import synthetic_rows
from routescope.store import LayerLayout
from routescope.store.writer import RunWriter
layers = [LayerLayout("a", 3, 2, {{"depth": 3, "trees": 2}}), LayerLayout("b", 2, 1, {{"depth": 2, "trees": 1}})]
writer = RunWriter({path!r}, layers, {{}}, scalars=("train_loss",))
rng = np.random.default_rng(0)
for step in range(1, 6):
    writer.append_interval(step, synthetic_rows(rng, layers, writer.sizes), {{"train_loss": 1.0}})
print("written", flush=True)
if {wait!r}:
    time.sleep(120)
os._exit(0)
"""


def killed_writer(path: Path, wait: bool = False) -> subprocess.Popen:
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), wait=wait)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def killed(tmp_path: Path) -> Path:
    path = tmp_path / "killed.h5"
    proc = killed_writer(path)
    assert proc.communicate(timeout=60)[0].strip() == "written" and proc.returncode == 0
    return path


def test_lookup3_matches_hdf5(killed: Path, debug_run: Path) -> None:
    """Our checksum equals the one HDF5 stored, on a killed and on a cleanly closed file."""
    for path in (killed, debug_run):
        block = path.read_bytes()[:48]
        assert lookup3(block[:44]) == int.from_bytes(block[44:48], "little")


def test_repair_makes_plain_h5py_open_the_same_data(killed: Path) -> None:
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(killed, "r")
    with h5py.File(killed, "r", libver="latest", swmr=True) as f:
        before = {name: f["tree"][name][:] for name in ("step", "node_visits", "leaf_visits", "tokens")}
    raw = killed.read_bytes()
    assert raw[FLAGS_AT] != 0
    result = run_cli("repair", str(killed))
    assert result.returncode == 0 and "cleared" in result.stdout, result.stderr
    after_raw = killed.read_bytes()
    assert len(after_raw) == len(raw) and after_raw[FLAGS_AT] == 0
    assert after_raw[48:] == raw[48:] and after_raw[:FLAGS_AT] == raw[:FLAGS_AT]  # only flags and checksum changed
    with h5py.File(killed, "r") as f:  # plain, non-SWMR
        for name, values in before.items():
            np.testing.assert_array_equal(f["tree"][name][:], values)
        assert int(f["run_state"][()]) == 0
        assert list(f["tree/step"][:]) == [1, 2, 3, 4, 5]  # synthetic rows: random counts, no invariants
    assert clear_open_flags(killed) is False  # a second repair has nothing to do
    assert killed.read_bytes() == after_raw


def test_repair_leaves_a_closed_file_alone(debug_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "closed.h5"
    shutil.copy(debug_run, path)
    result = run_cli("repair", str(path))
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert path.read_bytes() == debug_run.read_bytes()


def test_repair_refuses_a_file_still_open_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "live.h5"
    proc = killed_writer(path, wait=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        before = path.read_bytes()
        with pytest.raises(RunFileError, match=f"open in process {proc.pid}"):
            clear_open_flags(path)
        assert path.read_bytes() == before
    finally:
        proc.kill()
        proc.wait()


def test_repair_refuses_a_damaged_superblock(killed: Path) -> None:
    data = bytearray(killed.read_bytes())
    data[20] ^= 0x01  # inside the superblock's base address: HDF5 and we both see a checksum mismatch
    killed.write_bytes(bytes(data))
    result = run_cli("repair", str(killed))
    assert_user_error(result)
    assert killed.read_bytes() == bytes(data)


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_repair_bad_input(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.h5"
    if kind == "text":
        path.write_text("not hdf5\n")
    assert_user_error(run_cli("repair", str(path)), contains=str(path))
    assert kind != "text" or path.read_text() == "not hdf5\n"
    assert not (kind == "missing" and os.path.exists(path))
