"""Opening a run file with HDF5's SWMR reader, with a bounded metadata retry (found by benchmarks/crash_soak.py).

An SWMR reader that meets a metadata block whose checksum fails retries the read, assuming the writer
is halfway through flushing it. HDF5's default is 100 attempts with a doubling sleep capped at 18 s,
so a *damaged* killed file made every reader wait up to about 20 minutes per bad block (the soak saw
7 "hangs" in 240 damaged copies). H5Pset_metadata_read_attempts bounds that; h5py does not expose it,
so it is called through ctypes on the libhdf5 that h5py loaded. 30 attempts sleep about 1 s in all
(1 ns doubling), ample for a live writer's flush. Where the library cannot be found, h5py's default applies.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from pathlib import Path

import h5py
from h5py import h5f, h5p

READ_ATTEMPTS = 30  # ~1.07 s of retrying per unreadable metadata block (sum of 2^k ns, k < 30)


@functools.lru_cache(maxsize=1)
def _set_read_attempts() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """H5Pset_metadata_read_attempts of the libhdf5 h5py uses (the one loaded in this process), or None."""
    candidates = []
    try:
        with open("/proc/self/maps") as maps:  # Linux: the exact library already loaded
            candidates += sorted({line.split()[-1] for line in maps if "/libhdf5" in line and "_hl" not in line})
    except OSError:
        pass
    candidates += glob.glob(os.path.join(os.path.dirname(h5py.__file__), os.pardir, "h5py.libs", "libhdf5-*"))
    for path in candidates:
        try:
            fn = ctypes.CDLL(path).H5Pset_metadata_read_attempts
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
        return fn
    return None


def open_swmr(path: str | Path) -> h5py.File:
    """h5py.File(path, "r", libver="latest", swmr=True), with metadata retries bounded to READ_ATTEMPTS."""
    setter = _set_read_attempts()
    if setter is None:
        return h5py.File(path, "r", libver="latest", swmr=True)
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    if setter(fapl.id, READ_ATTEMPTS) < 0:
        return h5py.File(path, "r", libver="latest", swmr=True)
    return h5py.File(h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ, fapl=fapl))
