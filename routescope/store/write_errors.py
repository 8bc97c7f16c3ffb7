"""A run file that cannot be written: the writer's errors and what it does after one (README, "Disk full").

`DiskSpaceError`: the free-space reserve stopped the writer before any write. `WriteFailedError`: a
write failed anyway (the file was detached, `RunWriter._abandon`). `mark_detached` then records the
final state in place where it can.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from routescope.store.format import RUN_STATES, RunFileError, first_line
from routescope.store.repair import clear_open_flags


class DiskSpaceError(OSError):
    """The writer stopped before the disk (or the file-size limit) could be reached: every written interval is complete."""


class WriteFailedError(OSError):
    """Writing an interval failed (the file is detached, `RunWriter._abandon`); one line naming the OS error."""

    def __init__(self, path: Path, step: int, row: int, cause: BaseException) -> None:
        code = getattr(cause, "errno", None)
        if code is None:  # HDF5 reports the OS error inside its message: "..., errno = 28, error message = '...'"
            found = re.search(r"errno = (\d+)", str(cause))
            code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else first_line(cause)
        super().__init__(code or errno.EIO, f"writing step {step} to {path} failed ({reason}); its {row} earlier "
                         "intervals are intact and the file is closed")  # fmt: skip


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE in bytes, or None where there is none (or no `resource` module)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def mark_detached(path: Path, state: str, failure: str | None = None) -> None:
    """Best effort after a failed write: clear the open-for-write flags and record `state` in the detached
    file (both in place: no new space), and `failure` where the disk has room for it. Where this fails,
    the file stays as a killed run's is, readable with routescope and fixable with `routescope repair`."""
    try:
        clear_open_flags(path)
        f = h5py.File(path, "r+", rdcc_nbytes=0)
    except (OSError, RunFileError):
        return
    try:
        f["run_state"][()] = np.int8(RUN_STATES.index(state))
        f.flush()
        if failure and room_for(path)[0] >= 2**20:  # an attribute may need new space: only where there is plenty
            f.attrs["failure"] = failure
        f.close()
    except Exception:  # noqa: BLE001 - best effort: detach this handle too, never crash at exit
        detach_and_close(f)


def room_for(path: Path) -> tuple[int, str]:
    """Bytes a file may still grow by, and what bounds it: the free space on its disk, or (when less) what
    is left under this process's file-size limit (`ulimit -f`)."""
    room, where = shutil.disk_usage(path.parent).free, "free on its disk"
    limit = file_size_limit()
    if limit is not None:
        try:
            left = max(0, limit - path.stat().st_size)
        except OSError:  # not created yet
            left = limit
        if left < room:
            room, where = left, "left under this process's file-size limit (ulimit -f)"
    return room, where


def detach_and_close(f: h5py.File) -> None:
    """Close an HDF5 file whose writes fail, without writing to it again: its descriptor is first pointed at
    an anonymous scratch file (memfd; a temporary file where there is none), which takes HDF5's remaining
    writes, so the close can neither fail nor crash and the file on disk stays as it was."""
    if not f.id.valid:
        return
    try:
        fd = f.id.get_vfd_handle()
        with tempfile.TemporaryFile() if not hasattr(os, "memfd_create") else os.fdopen(
                os.memfd_create("routescope-detached"), "w+b") as scratch:  # fmt: skip
            os.dup2(scratch.fileno(), fd)
    except (OSError, ValueError):  # no descriptor to redirect (not the default driver): close as it is
        pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the caller reports the write error that brought it here
        pass
