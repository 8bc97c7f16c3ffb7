"""The run file (HDF5, SWMR, netCDF4-compatible): its schema and its reader (the writer: routescope.writer).

With routescope.writer (and repair's checks), the only code that touches h5py (DESIGN.md, "The file
format"). It knows nothing of torch: the recorder hands the writer numpy arrays. Rows are appended along `step` (groups `tree`, `run`) and along
`sample` (group `traces`); the coordinate of the growing dimension is written last in each interval,
so a reader (or a crash) never sees a row whose coordinate exists and whose data does not.
"""

from __future__ import annotations

import functools
import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from routescope._swmr import open_swmr
from routescope.schema import COMMON_TRACES, FAMILIES, TREE, Variable, layer_sizes

F = TypeVar("F", bound=Callable[..., Any])

SCHEMA_VERSION = 1
RUN_STATES = ("running", "finished", "interrupted", "failed")
COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
# Chunking along the growing dimension. A compressed chunk rewritten with more rows changes size and
# HDF5 cannot reuse the old space, so a file would grow quadratically. Hence: rows of one write that
# are large enough to compress well get chunks of exactly one write (never rewritten); small rows
# are stored uncompressed in fixed-size chunks, which HDF5 rewrites in place.
COMPRESS_MIN_BYTES = 4096
SMALL_CHUNK_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024 * 1024  # dask chunks when reading: many file chunks per task
TRUNCATION_SLACK = 1 << 20  # space HDF5 may have reserved past the last byte it wrote before a kill

# name: (dims, dtype, meaning). Names and dims are the public contract (DESIGN.md); declared in schema.py.
def _as_tuples(variables: dict[str, Variable]) -> dict[str, tuple[tuple[str, ...], str, str]]:
    return {name: (v.dims, v.dtype, v.meaning) for name, v in variables.items()}


TREE_VARIABLES = _as_tuples(TREE.group_variables())
L1_VARIABLES = _as_tuples(FAMILIES["l1"].group_variables())
MOE_VARIABLES = _as_tuples(FAMILIES["moe"].group_variables())
TRACE_VARIABLES = _as_tuples({**COMMON_TRACES, **TREE.traces})  # the tree family's traces (other families': schema)
ALL_TRACE_VARIABLES = {**COMMON_TRACES, **{n: v for fam in FAMILIES.values() for n, v in fam.traces.items()}}
RUN_FIXED_SCALARS: dict[str, str] = {"tokens_seen": "i8", "elapsed_s": "f8"}


class RunFileError(Exception):
    """A path that is not a readable routescope run; the message says what is wrong and what to do."""


@dataclass
class LayerLayout:
    """Per-layer information the writer needs: name, family and shape (the rest of its config is an attribute).

    A tree layer gives depth and trees; a layer of another family gives its spec dict as `config`
    (the keys routescope.schema.layer_sizes reads: d_hidden; experts and k).
    """

    name: str
    depth: int = 0
    trees: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    family: str = "tree"

    @property
    def sizes(self) -> dict[str, int]:
        """This layer's dimension sizes (tree: tree, node, leaf, level; l1: unit, bin; moe: expert, ...)."""
        if self.family == "tree":
            return layer_sizes("tree", {"depth": self.depth, "trees": self.trees})
        return layer_sizes(self.family, self.config)

    def value(self, key: str) -> Any:
        """A per-layer descriptor (schema Family.layer_vars): depth and trees from the fields, the rest from config."""
        return getattr(self, key) if key in ("depth", "trees") else self.config.get(key)


def _row_bytes(row_shape: tuple[int, ...], itemsize: int) -> int:
    return max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)


# ---------------------------------------------------------------------------------------------- reading


def open_h5(path: str | Path) -> h5py.File:
    """Open a run file read-only (SWMR, so it works while a run writes and after a crash), or explain why not."""
    p = Path(path)
    if not p.exists():
        raise RunFileError(f"{p}: no such file; check the path (record a run with `routescope record`)")
    if p.is_dir():
        raise RunFileError(f"{p} is a directory; give the path of a run file (.h5)")
    if p.stat().st_size == 0:
        raise RunFileError(f"{p} is empty (0 bytes); the recording that made it never wrote: record it again")
    if not h5py.is_hdf5(p):
        raise RunFileError(f"{p} is not an HDF5 file; give a run file written by `routescope record`")
    try:
        f = h5py.File(p, "r")  # a run that was closed: its metadata is final
    except OSError as err:
        if "already open for write" not in str(err):
            raise RunFileError(f"{p} is a truncated or corrupt HDF5 file ({_first_line(err)}); it cannot be read") from None
        # Still being written, or killed while writing: the superblock says "open for write", which
        # only an SWMR reader accepts. Everything flushed before the kill is readable that way.
        f = open_swmr(p)  # retries bounded: a damaged killed file fails in about 1 s, not minutes (_swmr.py)
        if p.stat().st_size + TRUNCATION_SLACK < f.id.get_filesize():
            f.close()
            raise RunFileError(f"{p} is truncated (shorter than its own header says); it cannot be read")
    try:
        _check_layout(f, p)
    except RunFileError:
        f.close()
        raise
    except Exception as err:  # any failure to read the metadata means a damaged file
        f.close()
        raise RunFileError(f"{p} is a damaged run file ({_first_line(err)}); it cannot be read") from None
    return f


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _check_layout(f: h5py.File, p: Path) -> None:
    if "schema_version" not in f.attrs:
        raise RunFileError(f"{p} is an HDF5 file but not a routescope run (no schema_version attribute)")
    version = int(f.attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise RunFileError(
            f"{p} was written with schema version {version}, newer than this routescope reads "
            f"({SCHEMA_VERSION}); upgrade routescope"
        )
    expected = ["run/step"] + [f"{group}/{name}" for group, family in FAMILIES.items() if group in f
                               for name, var in {"step": None, **family.group_variables()}.items()
                               if var is None or not var.optional]  # fmt: skip
    missing = [name for name in expected if name not in f]
    if missing:
        raise RunFileError(f"{p} has a routescope schema_version but lacks {missing[0]}; it is not a complete run file")


def _dims_of(dset: h5py.Dataset) -> tuple[str, ...]:
    """Dimension names of a dataset, from the dimension scales attached to it (a scale names itself)."""
    if h5py.h5ds.is_scale(dset.id):
        return (dset.name.rsplit("/", 1)[-1],)
    return tuple(dset.dims[axis][0].name.rsplit("/", 1)[-1] for axis in range(dset.ndim))


def _read_chunks(dset: h5py.Dataset) -> tuple[int, ...]:
    """Dask chunks: whole rows, as many file chunks along the growing dimension as fit READ_CHUNK_BYTES."""
    per_file_chunk = dset.chunks[0]
    rows = max(1, READ_CHUNK_BYTES // _row_bytes(dset.shape[1:], dset.dtype.itemsize)) // per_file_chunk * per_file_chunk
    return (max(rows, per_file_chunk), *dset.shape[1:])


def group_dataset(f: h5py.File, group: str = "tree"):
    """A lazy xarray Dataset over one group of an open run file, cut to its complete rows."""
    import dask.array as da
    import xarray as xr

    if group not in f:
        hint = " (no routed layers were recorded: a dense baseline?)" if group != "run" else ""
        raise RunFileError(f"{f.filename} has no group {group!r}{hint}; groups: {', '.join(k for k in f if k != 'run_state')}")
    g = f[group]
    growing = "sample" if group == "traces" else "step"
    live = f.swmr_mode  # opened while written (or after a kill): see the latest flushed rows
    dims_by_name = {name: _dims_of(dset) for name, dset in g.items()}
    growing_sets = [g[name] for name, dims in dims_by_name.items() if dims[:1] == (growing,)]
    for dset in growing_sets if live else ():
        dset.refresh()
    # Complete rows: those present in every variable. The writer writes the coordinate last, but
    # HDF5 may flush metadata in any order, so after a kill any variable can be one row short.
    rows = min(d.shape[0] for d in growing_sets)
    coords: dict[str, Any] = {}
    data_vars: dict[str, Any] = {}
    for name, dset in g.items():
        dims = dims_by_name[name]
        if dims and dims[0] == growing:
            values = dset[:rows] if name == growing else da.from_array(dset, chunks=_read_chunks(dset), lock=True)[:rows]
        else:
            values = dset.asstr()[()] if h5py.check_string_dtype(dset.dtype) else dset[()]
        target = coords if name in dims else data_vars
        target[name] = xr.Variable(dims, values, attrs={k: v for k, v in dset.attrs.items() if k == "long_name"})
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if "layers" in g.attrs:  # a family group lists its own layers (the root attribute lists all of them)
        attrs["layers"] = g.attrs["layers"]
    attrs["run_state"] = RUN_STATES[int(f["run_state"][()])] if "run_state" in f else "unknown"
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _release_handles() -> None:
    """Finalize the HDF5 objects a failed read left in reference cycles, here and now: left to a later
    garbage collection, their close can run inside another thread's h5py call (the recorder's writer)
    and deadlock there (seen in the test suite after reading damaged files)."""
    gc.collect()


def reads_run_file(*passthrough: type[BaseException]) -> Callable[[F], F]:
    """Decorator for functions whose first argument is a run file: any failure while reading it
    (a damaged file makes h5py, json or numpy fail in many ways) becomes one RunFileError line.
    Exceptions of the `passthrough` types (the caller's own user errors) are left alone."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(path: str | Path, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(path, *args, **kwargs)
            except (RunFileError, *passthrough):
                _release_handles()
                raise
            except Exception as err:
                _release_handles()
                raise RunFileError(
                    f"{path} is a damaged run file ({type(err).__name__}: {_first_line(err)}); it cannot be read"
                ) from err

        return wrapper  # type: ignore[return-value]

    return wrap


@reads_run_file()
def open_run(path: str | Path, group: str = "tree"):
    """Open a run file as a lazy (dask-backed) xarray Dataset of one group: "tree", "l1", "moe", "run" or "traces".

    Works on finished runs, runs still being written (SWMR) and runs killed mid-interval. A damaged
    file raises RunFileError here; damage inside data chunks surfaces when they are read (h5py's OSError).
    """
    f = open_h5(path)
    try:
        return group_dataset(f, group)
    except BaseException:
        f.close()  # a damaged layout: close now, not at some later garbage collection
        raise


@reads_run_file()
def describe(path: str | Path) -> dict[str, Any]:
    """A summary of what a run file holds (for `routescope info`)."""
    f = open_h5(path)
    try:
        run = group_dataset(f, "run")  # every run has it; `tree` is absent for a dense baseline
        steps = run["step"].values
        present = [name for name in FAMILIES if name in f]
        tree = group_dataset(f, present[0]) if present else None  # the first family group present
        if tree is not None:
            steps = tree["step"].values  # may be one row ahead of `run` after a kill mid-interval
        summary = {
            "path": str(path),
            "size_bytes": Path(path).stat().st_size,
            "schema_version": int(f.attrs["schema_version"]),
            "run_state": run.attrs["run_state"],
            "intervals": int(len(steps)),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "tokens": int(tree["tokens"].sum().compute()) if tree is not None else int(run["tokens_seen"].values.max(initial=0)),
            "layers": json.loads(f.attrs.get("layers", "[]")),
            "families": {name: int(f[name]["layer"].shape[0]) for name in present},
            "config": json.loads(f.attrs["config"]) if "config" in f.attrs else {},
            "samples": int(f["traces/sample"].shape[0]) if "traces" in f else 0,
            "versions": {k: str(f.attrs[k]) for k in ("routescope_version", "torch_version") if k in f.attrs},
            "failure": str(f.attrs["failure"]) if "failure" in f.attrs else None,  # why a failed run stopped
        }
    finally:
        f.close()
    return summary


def __getattr__(name: str) -> Any:
    """`routescope.store.RunWriter` still works (the writer moved to routescope.writer)."""
    if name == "RunWriter":
        from routescope.writer import RunWriter

        return RunWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
