"""A run file that cannot be written: the writer's errors and what it does after one (README, "Disk full").

`DiskSpaceError`: the free-space reserve stopped the writer before any write. `WriteFailedError`: a
write failed anyway (the file was detached, `RunWriter._abandon`). `mark_detached` then records the
final state in place where it can.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np

from routescope.store import RUN_STATES, RunFileError, _first_line


class DiskSpaceError(OSError):
    """The writer stopped before the disk (or the file-size limit) could be reached: every written interval is complete."""


class WriteFailedError(OSError):
    """Writing an interval failed (the file is detached, `RunWriter._abandon`); one line naming the OS error."""

    def __init__(self, path: Path, step: int, row: int, cause: BaseException) -> None:
        code = getattr(cause, "errno", None)
        if code is None:  # HDF5 reports the OS error inside its message: "..., errno = 28, error message = '...'"
            found = re.search(r"errno = (\d+)", str(cause))
            code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else _first_line(cause)
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
    from routescope.repair import clear_open_flags

    try:
        clear_open_flags(path)
        f = h5py.File(path, "r+", rdcc_nbytes=0)
    except (OSError, RunFileError):
        return
    try:
        f["run_state"][()] = np.int8(RUN_STATES.index(state))
        f.flush()
        if failure and _room(path) >= 2**20:  # an attribute may need new space: only where there is plenty
            f.attrs["failure"] = failure
        f.close()
    except Exception:  # noqa: BLE001 - best effort: detach this handle too, never crash at exit
        try:
            with tempfile.TemporaryFile() as scratch:
                os.dup2(scratch.fileno(), f.id.get_vfd_handle())
            f.close()
        except Exception:  # noqa: BLE001
            pass


def _room(path: Path) -> int:
    """Bytes the file may still grow by: free space on its disk, or less under `ulimit -f`."""
    import shutil

    room = shutil.disk_usage(path.parent).free
    limit = file_size_limit()
    return room if limit is None else min(room, limit - path.stat().st_size)
