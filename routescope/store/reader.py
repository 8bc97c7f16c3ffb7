"""Reading run files: `RunFile`, the one front door through which everything else reads a run.

Modelled on xarray's backend stores: `RunFile.open(path)` opens the file once (SWMR, so it works
while a run writes and after a crash) or raises a one-line RunFileError saying what is wrong; then
small verbs give its groups as lazy xarray Datasets cut to their complete rows, direct hyperslab
reads for one interval (the dashboard's fast path), its state and its attributes. With the writer,
repair, lock and resume, the only code that touches h5py; it knows nothing of torch.
"""

from __future__ import annotations

import functools
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from routescope.store.format import (
    READ_CHUNK_BYTES,
    RUN_STATES,
    SCHEMA_VERSION,
    TRUNCATION_SLACK,
    ForeignFileError,
    RunFileError,
    first_line,
    row_bytes,
)
from routescope.store.schema import FAMILIES
from routescope.store.swmr import open_swmr

F = TypeVar("F", bound=Callable[..., Any])


def open_h5(path: str | Path) -> h5py.File:
    """Open a run file read-only (SWMR where it was not closed cleanly), or raise a one-line RunFileError."""
    p = Path(path)
    if not p.exists():
        raise RunFileError(f"{p}: no such file; check the path (record a run with `routescope record`)")
    if p.is_dir():
        raise ForeignFileError(f"{p} is a directory; give the path of a run file (.h5)")
    if p.stat().st_size == 0:
        raise RunFileError(f"{p} is empty (0 bytes); the recording that made it never wrote: record it again")
    if not h5py.is_hdf5(p):
        raise ForeignFileError(f"{p} is not an HDF5 file; give a run file written by `routescope record`")
    try:
        f = h5py.File(p, "r")  # a run that was closed: its metadata is final
    except OSError as err:
        if "already open for write" not in str(err):
            raise RunFileError(f"{p} is a truncated or corrupt HDF5 file ({first_line(err)}); it cannot be read") from None
        # Still being written, or killed while writing: the superblock says "open for write", which
        # only an SWMR reader accepts. Everything flushed before the kill is readable that way.
        f = open_swmr(p)  # retries bounded: a damaged killed file fails in about 1 s, not minutes (swmr.py)
        if p.stat().st_size + TRUNCATION_SLACK < f.id.get_filesize():
            f.close()
            raise RunFileError(f"{p} is truncated (shorter than its own header says); it cannot be read")
    try:
        check_layout(f, p)
    except RunFileError:
        f.close()
        raise
    except Exception as err:  # any failure to read the metadata means a damaged file
        f.close()
        raise RunFileError(f"{p} is a damaged run file ({first_line(err)}); it cannot be read") from None
    return f


def check_layout(f: h5py.File, p: Path) -> None:
    """Refuse a file that is not a complete routescope run this version can read (one line, naming what is missing)."""
    if "schema_version" not in f.attrs:
        raise ForeignFileError(f"{p} is an HDF5 file but not a routescope run (no schema_version attribute)")
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


def dims_of(dset: h5py.Dataset) -> tuple[str, ...]:
    """Dimension names of a dataset, from the dimension scales attached to it (a scale names itself)."""
    if h5py.h5ds.is_scale(dset.id):
        return (dset.name.rsplit("/", 1)[-1],)
    return tuple(dset.dims[axis][0].name.rsplit("/", 1)[-1] for axis in range(dset.ndim))


def read_chunks(dset: h5py.Dataset) -> tuple[int, ...]:
    """Dask chunks: whole rows, as many file chunks along the growing dimension as fit READ_CHUNK_BYTES."""
    per_file_chunk = dset.chunks[0]
    rows = max(1, READ_CHUNK_BYTES // row_bytes(dset.shape[1:], dset.dtype.itemsize)) // per_file_chunk * per_file_chunk
    return (max(rows, per_file_chunk), *dset.shape[1:])


def growing_dim(group: str) -> str:
    """The dimension a group grows along: `sample` for the traces, `step` for every other group."""
    return "sample" if group == "traces" else "step"


class RunFile:
    """One run file, opened once for reading: groups, complete rows, direct reads, state and attributes.

    Use `RunFile.open(path)` (a context manager); the Datasets it hands out stay readable while it is open.
    """

    def __init__(self, handle: h5py.File, path: Path) -> None:
        self.path = path
        self._f = handle
        self._datasets: dict[str, Any] = {}
        self._rows: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | Path) -> RunFile:
        """Open a run file, or raise RunFileError with one line saying what is wrong and what to do."""
        return cls(open_h5(path), Path(path))

    def __enter__(self) -> RunFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent); Datasets read from it stop working."""
        if self._f.id.valid:
            self._f.close()

    # ---- what the file is
    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, strings decoded (configuration and layers stay JSON text)."""
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self._f.attrs.items()}

    @property
    def schema_version(self) -> int:
        return int(self._f.attrs["schema_version"])

    @property
    def state(self) -> str:
        """running / finished / interrupted / failed (unknown for a file without run_state)."""
        return RUN_STATES[int(self._f["run_state"][()])] if "run_state" in self._f else "unknown"

    @property
    def failure(self) -> str | None:
        """Why a failed run stopped (one line), where the writer could record it."""
        return str(self._f.attrs["failure"]) if "failure" in self._f.attrs else None

    @property
    def config(self) -> dict[str, Any]:
        """The run configuration (the `config` attribute's JSON); {} where there is none."""
        return json.loads(self._f.attrs["config"]) if "config" in self._f.attrs else {}

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Every recorded layer's spec (name, family, shape, options), in recording order."""
        return json.loads(self._f.attrs.get("layers", "[]"))

    @property
    def live(self) -> bool:
        """Opened with the SWMR reader: the run is still being written, or was killed while writing."""
        return bool(self._f.swmr_mode)

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups present (`tree`, `l1`, `moe`, `run`, `traces`)."""
        return tuple(k for k in self._f if isinstance(self._f[k], h5py.Group))

    @property
    def families(self) -> tuple[str, ...]:
        """The layer-family groups present, in file order (tree, l1, moe)."""
        return tuple(name for name in FAMILIES if name in self._f)

    def __contains__(self, group: str) -> bool:
        return group in self._f

    def has_variable(self, group: str, name: str) -> bool:
        return group in self._f and name in self._f[group]

    @property
    def samples(self) -> int:
        """Sampled token traces in the file (0 without a `traces` group)."""
        return self.complete_rows("traces") if self.has_variable("traces", "sample") else 0

    # ---- reading
    def complete_rows(self, group: str) -> int:
        """Rows present in every variable of a group that grows (a kill can leave some one row longer)."""
        if group not in self._rows:
            g = self._group(group)
            growing = [d for d in g.values() if d.ndim >= 1 and dims_of(d)[:1] == (growing_dim(group),)]
            if self.live:  # see the latest flushed rows
                for dset in growing:
                    dset.refresh()
            self._rows[group] = min(d.shape[0] for d in growing)
        return self._rows[group]

    def dataset(self, group: str = "tree") -> Any:
        """A lazy (dask-backed) xarray Dataset over one group, cut to its complete rows (cached)."""
        if group not in self._datasets:
            self._datasets[group] = self._build_dataset(group)
        return self._datasets[group]

    def read(self, group: str, name: str, rows: int | slice, *index: int | slice) -> np.ndarray:
        """A hyperslab of one variable straight from HDF5 (no dask, for one interval or a few): rows are
        positions along the growing dimension, bounded by the complete rows; `index` the other axes."""
        total = self.complete_rows(group)
        if isinstance(rows, int):
            if not 0 <= rows < total:
                raise IndexError(f"row {rows} of {total} complete rows in {group!r}")
        else:
            rows = slice(*rows.indices(total))
        return self._group(group)[name][(rows, *index)]

    def variable_attr(self, group: str, name: str, key: str) -> Any:
        """An attribute of one variable (e.g. l1/active_hist's `bin_edges`)."""
        return self._group(group)[name].attrs[key]

    def describe(self) -> dict[str, Any]:
        """A summary of what the file holds (for `routescope info`)."""
        present = self.families
        steps = self.dataset("run")["step"].values  # every run has it; families are absent for a dense baseline
        first = self.dataset(present[0]) if present else None
        if first is not None:
            steps = first["step"].values  # may be one row ahead of `run` after a kill mid-interval
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "schema_version": self.schema_version,
            "run_state": self.state,
            "intervals": int(len(steps)),
            "first_step": int(steps[0]) if len(steps) else None,
            "last_step": int(steps[-1]) if len(steps) else None,
            "tokens": int(first["tokens"].sum().compute()) if first is not None
            else int(self.dataset("run")["tokens_seen"].values.max(initial=0)),
            "layers": self.layers,
            "families": {name: int(self._f[name]["layer"].shape[0]) for name in present},
            "config": self.config,
            "samples": self.samples,
            "versions": {k: str(self._f.attrs[k]) for k in ("routescope_version", "torch_version") if k in self._f.attrs},
            "failure": self.failure,
            "losses": self.losses(),
        }

    def losses(self) -> dict[str, dict[str, float]]:
        """First and last finite value of each loss the `run` group records ({"train_loss": {"first", "last"}, ...});
        a dense baseline's whole result."""
        run = self.dataset("run")
        out = {}
        for name in ("train_loss", "val_loss"):
            values = np.asarray(run[name].values, dtype=np.float64) if name in run else np.zeros(0)
            values = values[np.isfinite(values)]
            if len(values):
                out[name] = {"first": float(values[0]), "last": float(values[-1])}
        return out

    def _group(self, group: str) -> h5py.Group:
        if group not in self._f:
            hint = " (no routed layers were recorded: a dense baseline?)" if group != "run" and not self.families else ""
            raise RunFileError(f"{self.path} has no group {group!r}{hint}; groups: {', '.join(self.groups)}")
        return self._f[group]

    def _build_dataset(self, group: str) -> Any:
        import dask.array as da
        import xarray as xr

        g = self._group(group)
        growing = growing_dim(group)
        rows = self.complete_rows(group)
        coords: dict[str, Any] = {}
        data_vars: dict[str, Any] = {}
        for name, dset in g.items():
            dims = dims_of(dset)
            if dims and dims[0] == growing:
                values = dset[:rows] if name == growing else da.from_array(dset, chunks=read_chunks(dset), lock=True)[:rows]
            else:
                values = dset.asstr()[()] if h5py.check_string_dtype(dset.dtype) else dset[()]
            target = coords if name in dims else data_vars
            target[name] = xr.Variable(dims, values, attrs={k: v for k, v in dset.attrs.items() if k == "long_name"})
        attrs = self.attrs
        if "layers" in g.attrs:  # a family group lists its own layers (the root attribute lists all of them)
            attrs["layers"] = g.attrs["layers"]
        attrs["run_state"] = self.state
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def release_handles() -> None:
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
                release_handles()
                raise
            except Exception as err:
                release_handles()
                raise RunFileError(
                    f"{path} is a damaged run file ({type(err).__name__}: {first_line(err)}); it cannot be read"
                ) from err

        return wrapper  # type: ignore[return-value]

    return wrap


@reads_run_file()
def open_run(path: str | Path, group: str = "tree") -> Any:
    """Open a run file as a lazy (dask-backed) xarray Dataset of one group: "tree", "l1", "moe", "run" or "traces".

    Works on finished runs, runs still being written (SWMR) and runs killed mid-interval. A damaged
    file raises RunFileError here; damage inside data chunks surfaces when they are read (h5py's OSError).
    The file stays open as long as the Dataset is referenced.
    """
    run = RunFile.open(path)
    try:
        return run.dataset(group)
    except BaseException:
        run.close()  # a damaged layout: close now, not at some later garbage collection
        raise


@reads_run_file()
def describe(path: str | Path) -> dict[str, Any]:
    """A summary of what a run file holds (for `routescope info`)."""
    with RunFile.open(path) as run:
        return run.describe()
