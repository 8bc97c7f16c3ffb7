"""One writer per run file: an exclusive `flock` on a sidecar `RUN.h5.lock` holding the writer's PID.

HDF5's own file locking cannot serve: an SWMR writer drops its lock once SWMR mode is on (so that
readers can open the file), and `HDF5_USE_FILE_LOCKING=FALSE` switches it off altogether. The sidecar
is never touched by readers, so `info`, `report`, `dash` and `routescope.open` are not blocked. The
kernel releases a flock when its process dies (even by SIGKILL), so a stale lock file is harmless.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from routescope.store.format import RunFileError


class RunLockedError(RunFileError):
    """Another process is writing this run file."""


def lock_path(path: str | Path) -> Path:
    """The sidecar lock file of a run file: RUN.h5.lock."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


class WriterLock:
    """An exclusive, non-blocking lock on a run file's sidecar; `release()` unlocks and removes it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sidecar = lock_path(path)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        """Take the lock at once or raise RunLockedError naming the other writer's PID."""
        while True:
            fd = os.open(self.sidecar, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {other}" if other.isdigit() else "another process"
                raise RunLockedError(
                    f"{self.path} is being written by {who} (lock {self.sidecar}); one writer per file: "
                    "wait for it to end or write elsewhere"
                ) from None
            # The previous holder may have removed the sidecar between our open and our flock: retry on the new one.
            try:
                same = os.stat(self.sidecar).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the sidecar and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.sidecar.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
