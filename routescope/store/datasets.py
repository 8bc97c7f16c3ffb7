"""Creating a run file's datasets: growing variables, dimension scales (netCDF dimensions) and attributes.

The writer builds every group of a new run file from these (docs/file-format.md); chunking follows
format.py's COMPRESS_MIN_BYTES rule.
"""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

from routescope.store.format import (
    ALL_TRACE_VARIABLES,
    COMPRESS_MIN_BYTES,
    COMPRESSION,
    MAX_CHUNK_BYTES,
    SMALL_CHUNK_BYTES,
    row_bytes,
)


def attr_value(value: Any) -> Any:
    """Numbers stay numbers, strings (and str subclasses such as torch's version) become plain str, the rest JSON."""
    if isinstance(value, (bool, int, float)):
        return value
    return str(value) if isinstance(value, str) else json.dumps(value)


def create_growing(
    group: h5py.Group, name: str, dims: tuple[str, ...], dtype: str, sizes: dict[str, int], rows_per_write: int = 1
) -> h5py.Dataset:
    """A dataset resizable along its first dimension, fixed elsewhere, chunked as COMPRESS_MIN_BYTES explains."""
    row = tuple(sizes[d] for d in dims[1:])
    dt = np.dtype(dtype)
    # A chunk is allocated whole, however few rows arrive: never more than MAX_CHUNK_BYTES (a huge
    # sample_tokens once allocated gigabytes for a handful of sampled tokens).
    rows_per_write = max(1, min(rows_per_write, MAX_CHUNK_BYTES // row_bytes(row, dt.itemsize)))
    write_bytes = rows_per_write * row_bytes(row, dt.itemsize)
    if write_bytes >= COMPRESS_MIN_BYTES:
        rows, options = rows_per_write, COMPRESSION
    else:
        rows, options = max(rows_per_write, SMALL_CHUNK_BYTES // row_bytes(row, dt.itemsize)), {}
    # h5py cannot chunk a fixed dimension of size 0 (a depth-0 tree has no decision nodes).
    maxshape = (None, *(s if s > 0 else None for s in row))
    chunks = (rows, *(max(s, 1) for s in row))
    fill = np.nan if dt.kind == "f" else -1 if name in ALL_TRACE_VARIABLES else 0
    return group.create_dataset(name, shape=(0, *row), maxshape=maxshape, chunks=chunks, dtype=dt,
                                fillvalue=fill, **options)  # fmt: skip


def make_coordinate(group: h5py.Group, name: str, values: np.ndarray | None = None) -> None:
    """A netCDF dimension: a dimension-scale dataset named like the dimension (values = its labels)."""
    if values is None:  # growing dimension
        dset = group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(SMALL_CHUNK_BYTES // 8,), dtype="i8")
    else:
        dset = group.create_dataset(name, data=values)
    dset.make_scale(name)


def attach_dims(group: h5py.Group, dset: h5py.Dataset, dims: tuple[str, ...]) -> None:
    """Attach the group's dimension scales to a dataset's axes, so netCDF tools and xarray see its dims."""
    for axis, dim in enumerate(dims):
        dset.dims[axis].attach_scale(group[dim])
