"""`routescope repair`: let plain h5py open a run file whose writer was killed (HDF5's `h5clear -s`, in Python).

A writer that dies without closing leaves HDF5's "file consistency flags" set in the superblock
(open for write, SWMR write), and HDF5 then refuses every non-SWMR open. With SWMR the file's
metadata is consistent after every flush, so clearing those flags is all `h5clear -s` does. This
module does the same, refusing whenever that is not known to be safe: the superblock must be version
2 or 3 with a valid checksum (recomputed here with HDF5's lookup3 hash and checked against the stored
one first), the file must be a readable routescope run, and no other process may have it open (Linux
/proc; elsewhere it refuses). After the 5-byte write the file must open with plain h5py, or the
original bytes are put back.
"""

from __future__ import annotations

import os
from pathlib import Path

from routescope.store.format import RunFileError
from routescope.store.reader import open_h5

SIGNATURE = b"\x89HDF\r\n\x1a\n"
FLAGS_AT = 11  # superblock v2/v3: signature (8), version, size of offsets, size of lengths, consistency flags
_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`, the checksum HDF5 stores after its superblock (H5_checksum_lookup3)."""
    length, i = len(data), 0
    a = b = c = (0xDEADBEEF + length + initval) & _M
    while length - i > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M
        for shift in ((4, 6, 8), (16, 19, 4)):  # lookup3's mix(): two rounds of three rotations
            a = ((a - c) & _M) ^ _rot(c, shift[0])
            c = (c + b) & _M
            b = ((b - a) & _M) ^ _rot(a, shift[1])
            a = (a + c) & _M
            c = ((c - b) & _M) ^ _rot(b, shift[2])
            b = (b + a) & _M
        i += 12
    if length == i:
        return c
    tail = data[i:] + bytes(12 - (length - i))
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    c = (c ^ b) - _rot(b, 14) & _M
    a = (a ^ c) - _rot(c, 11) & _M
    b = (b ^ a) - _rot(a, 25) & _M
    c = (c ^ b) - _rot(b, 16) & _M
    a = (a ^ c) - _rot(c, 4) & _M
    b = (b ^ a) - _rot(a, 14) & _M
    c = (c ^ b) - _rot(b, 24) & _M
    return c


def _superblock(path: Path) -> tuple[bytes, int]:
    """The superblock's bytes (with its checksum) and its length; refuses layouts this module does not know."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:8] != SIGNATURE:
            raise RunFileError(f"{path} has no HDF5 superblock at its start; it cannot be repaired")
        if head[8] not in (2, 3):
            raise RunFileError(f"{path} has HDF5 superblock version {head[8]} (not 2 or 3, as routescope writes)")
        length = 12 + 4 * head[9] + 4
        fh.seek(0)
        block = fh.read(length)
    if len(block) < length or lookup3(block[:-4]) != int.from_bytes(block[-4:], "little"):
        raise RunFileError(f"{path} has a damaged HDF5 superblock (checksum mismatch); it cannot be repaired")
    return block, length


def _holders(path: Path) -> list[int]:
    """Other processes with the file open (Linux /proc); None where that cannot be known."""
    target = os.path.realpath(path)
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        raise RunFileError(f"cannot check whether another process writes {path} (no /proc); repair refused")
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.path.realpath(fd) == target for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:  # a process that ended, or one we may not look into
            continue
    return pids


def clear_open_flags(path: str | Path) -> bool:
    """Clear HDF5's open-for-write flags of a killed run file; True if cleared, False if they were clear already.

    Raises RunFileError (one line) when the file is not a readable run, is open in another process,
    or has a superblock this function does not know how to rewrite safely.
    """
    p = Path(path)
    open_h5(p).close()  # a readable routescope run (SWMR reader), not truncated, or a clean error
    block, length = _superblock(p)
    if block[FLAGS_AT] == 0:
        return False
    holders = _holders(p)
    if holders:
        raise RunFileError(f"{p} is open in process {holders[0]} (a recording still running?); stop it, then repair")
    patched = bytearray(block)
    patched[FLAGS_AT] = 0
    patched[-4:] = lookup3(bytes(patched[:-4])).to_bytes(4, "little")
    try:
        fd = os.open(p, os.O_RDWR)
    except OSError as err:  # a read-only filesystem or file: nothing was written
        raise RunFileError(f"cannot write to {p} ({err.strerror}); repair changes 5 bytes in place: copy the file "
                           "to a writable folder and repair the copy") from None  # fmt: skip
    try:
        os.pwrite(fd, bytes(patched), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        import h5py

        h5py.File(p, "r").close()
    except OSError as err:
        fd = os.open(p, os.O_RDWR)
        try:
            os.pwrite(fd, block, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        raise RunFileError(f"{p}: plain h5py still refuses it after clearing the flags ({err}); left unchanged") from None
    return True
