"""Damaged or wrong run files of every family: each reader and command fails in one clean line, never a traceback.

tests/test_cli.py covers the generic cases (missing, directory, empty, text, foreign, ...) on a tree run;
here: files with `l1` / `moe` groups, and damage that only shows once a group's layout is read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
from conftest import run_cli
from test_cli import assert_user_error

import routescope
from routescope.store import RunFileError


@pytest.fixture
def family_files(family_runs: dict[str, Path]) -> dict[str, Path]:
    """A finished debug-l1 and debug-moe run (conftest's session-wide recordings)."""
    return family_runs


def _truncated(src: Path, dst: Path, family: str) -> str:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return "truncated"


def _lacks_variable(src: Path, dst: Path, family: str) -> str:
    shutil.copy(src, dst)
    name = {"l1": "unit_fires", "moe": "expert_tokens"}[family]
    with h5py.File(dst, "r+") as f:
        del f[f"{family}/{name}"]
    return name


def _newer_schema(src: Path, dst: Path, family: str) -> str:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs["schema_version"] = 7
    return "upgrade routescope"


def _detached_scale(src: Path, dst: Path, family: str) -> str:
    """A dataset whose step dimension lost its scale (damaged dimension list): its dims cannot be named."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        g = f[family]
        g["layer_tokens"].dims[0].detach_scale(g["step"])
    return "damaged run file"


MAKERS = {"truncated": _truncated, "lacks-variable": _lacks_variable, "newer-schema": _newer_schema,
          "detached-scale": _detached_scale}  # fmt: skip


@pytest.mark.parametrize("damage", MAKERS)
@pytest.mark.parametrize("family", ["l1", "moe"])
def test_open_raises_one_clean_line(family_files: dict[str, Path], tmp_path: Path, family: str, damage: str) -> None:
    """routescope.open (every group) raises RunFileError naming the file, in one line, for each damage."""
    path = tmp_path / f"{family}-{damage}.h5"
    says = MAKERS[damage](family_files[family], path, family)
    with pytest.raises(RunFileError) as caught:
        routescope.open(path, family)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and says in message, message


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "lacks-variable", "detached-scale"])
@pytest.mark.parametrize("family", ["l1", "moe"])
@pytest.mark.parametrize("command", ["info", "report", "dash"])
def test_commands_on_damaged_family_files(family_files: dict[str, Path], tmp_path: Path, family: str, damage: str,
                                          command: str) -> None:  # fmt: skip
    """`routescope info|report|dash` on a damaged l1/moe file: exit 2, one `error:` line, nothing on stdout."""
    path = tmp_path / f"{family}-{damage}.h5"
    MAKERS[damage](family_files[family], path, family)
    result = run_cli(command, str(path), timeout=120)
    assert_user_error(result, contains=str(path))
    assert result.stdout.strip() == ""


def test_undamaged_family_files_read(family_files: dict[str, Path], tmp_path: Path) -> None:
    """Sanity of the fixtures: the undamaged files read, so the errors above come from the damage."""
    for family, path in family_files.items():
        ds = routescope.open(path, family)
        assert ds.sizes["step"] >= 1 and ds.attrs["run_state"] == "finished"


def test_damaged_killed_file_fails_fast(tmp_path: Path) -> None:
    """A killed (SWMR-only) file whose chunk indexes are damaged: a clean error in seconds. HDF5's SWMR
    reader retries a failed metadata checksum 100 times with a doubling sleep (about 20 minutes per
    block) unless routescope bounds it (routescope/_swmr.py); the crash soak met this as 'hangs'."""
    import time

    from test_repair import killed_writer

    path = tmp_path / "killed.h5"
    proc = killed_writer(path)
    assert proc.communicate(timeout=60)[0].strip() == "written"
    data = bytearray(path.read_bytes())
    blocks = [i for i in range(len(data) - 4) if data[i : i + 4] == b"EAIB"]  # extensible-array index blocks
    assert blocks
    for at in blocks:
        data[at + 10] ^= 0xFF  # inside the block: its checksum no longer matches
    path.write_bytes(bytes(data))
    start = time.monotonic()
    result = run_cli("info", str(path), timeout=60)
    assert time.monotonic() - start < 30
    assert_user_error(result, contains="damaged run file")
    start = time.monotonic()
    with pytest.raises(RunFileError, match="damaged run file"):
        routescope.open(path).load()  # noqa: the open or the first read fails, one clean line either way
    assert time.monotonic() - start < 15
