"""The run file (HDF5, SWMR, netCDF4-compatible): its schema, its writer and its reader.

This is the only module that touches h5py (DESIGN.md, "The file format"). It knows nothing of torch:
the recorder hands it numpy arrays. Rows are appended along `step` (groups `tree`, `run`) and along
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
from routescope.schema import COMMON_TRACES, FAMILIES, TREE, Family, Variable, coordinate_values, layer_sizes

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


def _attr_value(value: Any) -> Any:
    """Numbers stay numbers, strings (and str subclasses such as torch's version) become plain str, the rest JSON."""
    if isinstance(value, (bool, int, float)):
        return value
    return str(value) if isinstance(value, str) else json.dumps(value)


def _row_bytes(row_shape: tuple[int, ...], itemsize: int) -> int:
    return max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)


def _create_growing(
    group: h5py.Group, name: str, dims: tuple[str, ...], dtype: str, sizes: dict[str, int], rows_per_write: int = 1
) -> h5py.Dataset:
    """A dataset resizable along its first dimension, fixed elsewhere, chunked as COMPRESS_MIN_BYTES explains."""
    row = tuple(sizes[d] for d in dims[1:])
    dt = np.dtype(dtype)
    write_bytes = rows_per_write * _row_bytes(row, dt.itemsize)
    if write_bytes >= COMPRESS_MIN_BYTES:
        rows, options = rows_per_write, COMPRESSION
    else:
        rows, options = max(rows_per_write, SMALL_CHUNK_BYTES // _row_bytes(row, dt.itemsize)), {}
    # h5py cannot chunk a fixed dimension of size 0 (a depth-0 tree has no decision nodes).
    maxshape = (None, *(s if s > 0 else None for s in row))
    chunks = (rows, *(max(s, 1) for s in row))
    fill = np.nan if dt.kind == "f" else -1 if name in ALL_TRACE_VARIABLES else 0
    return group.create_dataset(name, shape=(0, *row), maxshape=maxshape, chunks=chunks, dtype=dt,
                                fillvalue=fill, **options)  # fmt: skip


def _make_coordinate(group: h5py.Group, name: str, values: np.ndarray | None = None) -> None:
    """A netCDF dimension: a dimension-scale dataset named like the dimension (values = its labels)."""
    if values is None:  # growing dimension
        dset = group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(SMALL_CHUNK_BYTES // 8,), dtype="i8")
    else:
        dset = group.create_dataset(name, data=values)
    dset.make_scale(name)


def _attach_dims(group: h5py.Group, dset: h5py.Dataset, dims: tuple[str, ...]) -> None:
    for axis, dim in enumerate(dims):
        dset.dims[axis].attach_scale(group[dim])


class RunWriter:
    """Creates a run file and appends one interval at a time; flushes after each (SWMR readers see it).

    One group per layer family present (`tree`, `l1`, `moe`; routescope.schema), each with its own
    `layer` dimension, plus `run` and (with sample_tokens > 0) `traces`.
    """

    def __init__(
        self,
        path: str | Path,
        layers: list[LayerLayout],
        attrs: dict[str, Any],
        scalars: tuple[str, ...] = (),
        sample_tokens: int = 0,
        context: int = 32,
        overwrite: bool = False,
        resume: bool = False,
        resume_step: int | None = None,
        config_may_differ: tuple[str, ...] = (),
    ) -> None:
        from routescope.lock import WriterLock

        self.path = Path(path)
        self._lock = WriterLock(self.path).acquire()  # one writer per file: a second one fails here, at once
        try:
            self._init(layers, attrs, scalars, sample_tokens, context, overwrite, resume, resume_step, config_may_differ)
        except BaseException:
            self._lock.release()
            raise

    def _init(self, layers: list[LayerLayout], attrs: dict[str, Any], scalars: tuple[str, ...], sample_tokens: int,
              context: int, overwrite: bool, resume: bool, resume_step: int | None,
              config_may_differ: tuple[str, ...]) -> None:  # fmt: skip
        """Create the file (or reopen it to resume) while holding the writer lock."""
        if self.path.exists() and not overwrite and not resume:
            raise RunFileError(f"{self.path} already exists; choose another output path or pass overwrite")
        unknown = sorted({layer.family for layer in layers} - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown layer family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
        self.scalars = tuple(scalars)
        self.layers = layers
        self.families = {name: [lay for lay in layers if lay.family == name] for name in FAMILIES}
        self.families = {name: group for name, group in self.families.items() if group}
        self.group_sizes = {name: _group_sizes(group) for name, group in self.families.items()}
        # `sizes`: the tree group's (empty when there is none), plus the traces' context length.
        tree_layers = self.families.get("tree", [])
        max_depth = max((layer.depth for layer in tree_layers), default=0)
        sizes = {
            "layer": len(tree_layers), "tree": max((layer.trees for layer in tree_layers), default=0),
            "node": 2**max_depth - 1, "leaf": 2**max_depth, "level": max_depth + 1, "context": context,
        }  # fmt: skip
        self.sample_tokens = sample_tokens
        self.sizes = sizes
        # Where a resumed run continues: (last step, tokens_seen, elapsed_s) of its last complete interval.
        self.resumed_from: tuple[int, int, float] | None = None
        if resume:
            self._reopen(layers, attrs, context, resume_step, config_may_differ)
            return
        self.file = h5py.File(self.path, "w", libver="latest")
        f = self.file
        f.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "layers": json.dumps([{"name": layer.name, "family": layer.family, **layer.config} for layer in layers]),
                **{k: _attr_value(v) for k, v in attrs.items()},
            }
        )
        state = f.create_dataset("run_state", data=np.int8(0))
        state.attrs.update({"flag_values": np.arange(len(RUN_STATES), dtype="i1"), "flag_meanings": " ".join(RUN_STATES)})

        # A run without routed layers (a dense baseline) records the `run` group only.
        for name, group in self.families.items():
            self._create_family_group(FAMILIES[name], group, self.group_sizes[name])

        run = f.create_group("run")
        _make_coordinate(run, "step")
        for name, dtype in {**RUN_FIXED_SCALARS, **{s: "f8" for s in self.scalars}}.items():
            dset = _create_growing(run, name, ("step",), dtype, sizes)
            _attach_dims(run, dset, ("step",))

        self.trace_names: tuple[str, ...] = ()
        if sample_tokens > 0 and layers:
            self._create_traces_group(context)
        f.swmr_mode = True  # every dataset exists by now: SWMR forbids creating more

    def _reopen(self, layers: list[LayerLayout], attrs: dict[str, Any], context: int, resume_step: int | None,
                config_may_differ: tuple[str, ...]) -> None:  # fmt: skip
        """Resume: check the file records the same layers and settings, cut it to its complete rows, reopen for SWMR writing."""
        from routescope.repair import clear_open_flags

        p = self.path
        if not p.exists():
            raise RunFileError(f"{p}: no such file to resume; record a new run instead")
        clear_open_flags(p)  # a killed writer left HDF5's open-for-write flags set (a clean file: no-op)
        try:
            f = h5py.File(p, "r+", libver="latest")
        except OSError as err:  # e.g. HDF5's own lock, held by a plain (non-SWMR) reader
            raise RunFileError(f"cannot reopen {p} to resume it ({_first_line(err)}); close the programs reading it") from None
        self.file = f
        try:
            _check_same_run(f, p, layers, attrs, self.scalars, config_may_differ)
            rows = _complete_rows(f, resume_step)
            _truncate(f, rows)
            if rows:
                run = f["run"]
                self.resumed_from = (int(run["step"][rows - 1]), int(run["tokens_seen"][rows - 1]),
                                     float(run["elapsed_s"][rows - 1]))  # fmt: skip
            history = json.loads(f.attrs.get("resumed", "[]"))
            history.append({"after_step": self.resumed_from[0] if self.resumed_from else 0,
                            "at": attrs.get("created", "")})  # fmt: skip
            f.attrs["resumed"] = json.dumps(history)
            if "config" in attrs:
                f.attrs["config"] = _attr_value(attrs["config"])  # the new end (steps) of the resumed run
            f["run_state"][()] = np.int8(0)
            self.trace_names = tuple(n for n in _trace_variable_names(self.families)) if "traces" in f else ()
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise

    def _create_family_group(self, family: Family, layers: list[LayerLayout], sizes: dict[str, int]) -> None:
        group = self.file.create_group(family.name)
        group.attrs["layers"] = json.dumps([{"name": layer.name, "family": layer.family, **layer.config} for layer in layers])
        _make_coordinate(group, "step")
        for dim in ("layer", *family.stat_dims):
            _make_coordinate(group, dim, coordinate_values(dim, sizes[dim]))
        layer_sets = [group.create_dataset("layer_name", data=[layer.name for layer in layers], dtype=h5py.string_dtype())]
        for name, (key, dtype, meaning) in family.layer_vars.items():
            values = [np.nan if layer.value(key) is None else layer.value(key) for layer in layers]
            layer_sets.append(group.create_dataset(name, data=np.array(values, dtype=dtype)))
            layer_sets[-1].attrs["long_name"] = meaning
        for dset in layer_sets:
            _attach_dims(group, dset, ("layer",))
        for name, var in family.group_variables().items():
            dset = _create_growing(group, name, var.dims, var.dtype, sizes)
            dset.attrs["long_name"] = var.meaning
            _attach_dims(group, dset, var.dims)
        if "bin" in family.stat_dims:  # the fixed histogram bins, as edges (bin b: [edges[b], edges[b+1]))
            group["active_hist"].attrs["bin_edges"] = coordinate_values("bin", sizes["bin"] + 1)

    def _create_traces_group(self, context: int) -> None:
        traces = self.file.create_group("traces")
        _make_coordinate(traces, "sample")
        variables = dict(COMMON_TRACES)
        sizes: dict[str, int] = {"sample": 0, "context": context}
        for name, group in self.families.items():
            family = FAMILIES[name]
            sizes[family.trace_layer_dim] = len(group)
            sizes.update({dim: self.group_sizes[name][dim] for dim in family.trace_dims})
            variables.update(family.traces)
        for dim in dict.fromkeys(d for v in variables.values() for d in v.dims[1:]):
            _make_coordinate(traces, dim, np.arange(sizes[dim]))
        for name, var in variables.items():
            dset = _create_growing(traces, name, var.dims, var.dtype, sizes, rows_per_write=self.sample_tokens)
            dset.attrs["long_name"] = var.meaning
            _attach_dims(traces, dset, var.dims)
        self.trace_names = tuple(variables)

    @property
    def intervals(self) -> int:
        return self.file["run/step"].shape[0]

    def append_interval(
        self,
        step: int,
        tree: dict[str, np.ndarray] | None,
        scalars: dict[str, float],
        traces: dict[str, np.ndarray] | None = None,
        groups: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> None:
        """Append one interval. `groups` maps each family group to {variable: row (layer, ...)} as in
        routescope.schema; `tree` is the tree group's rows (shorthand for groups["tree"])."""
        f = self.file
        groups = {**({"tree": tree} if tree is not None else {}), **(groups or {})}
        row = self.intervals
        if row and step <= int(f["run/step"][row - 1]):
            raise ValueError(f"steps must increase: {step} after {int(f['run/step'][row - 1])}")
        for name in self.families:
            for var, v in FAMILIES[name].group_variables().items():
                if var not in f[name]:  # a resumed older file lacks variables added since (`optional`)
                    continue
                dset = f[name][var]
                _append_row(dset, row, groups[name][var] if var in groups[name] or not v.optional
                            else np.zeros(dset.shape[1:], dset.dtype))  # an optional variable not given: zeros
        for name in f["run"]:
            if name != "step":
                missing = np.nan if f["run"][name].dtype.kind == "f" else -1
                _append_row(f["run"][name], row, scalars.get(name, missing))
        coords = [(f[f"{group}/step"], row, step) for group in (*self.families, "run")]
        if traces is not None and "traces" in f:
            group, first = f["traces"], f["traces/sample"].shape[0]
            count = len(traces["sample_step"])
            for name in self.trace_names:
                _append_rows(group[name], first, traces[name])
            coords.append((group["sample"], first, np.arange(first, first + count)))
        for dset, at, value in coords:  # coordinates last: they make the rows visible
            _append_rows(dset, at, np.atleast_1d(value))
        f.flush()

    def close(self, state: str = "finished") -> None:
        """Record the final run state, close the file and release the writer lock (idempotent)."""
        try:
            if not self.file.id.valid:
                return
            self.file["run_state"][()] = np.int8(RUN_STATES.index(state))
            self.file.flush()
            self.file.close()
        finally:
            self._lock.release()


def _trace_variable_names(families: dict[str, list[LayerLayout]]) -> list[str]:
    """The trace variables a run with these family groups has, in the order the writer creates them."""
    names = dict.fromkeys(COMMON_TRACES)
    for name in families:
        names.update(dict.fromkeys(FAMILIES[name].traces))
    return list(names)


def _first_difference(old: Any, new: Any, ignore: tuple[str, ...], prefix: str = "") -> str | None:
    """The first dotted key where two JSON values differ (keys in `ignore` skipped), or None."""
    if prefix.rstrip(".") in ignore:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), ignore, f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.') or 'value'}: {old!r} in the file, {new!r} now"


def _check_same_run(f: h5py.File, p: Path, layers: list[LayerLayout], attrs: dict[str, Any], scalars: tuple[str, ...],
                    config_may_differ: tuple[str, ...]) -> None:  # fmt: skip
    """Refuse to resume a run recorded with other layers or settings (one line naming the first difference)."""
    if "schema_version" not in f.attrs or "run" not in f:
        raise RunFileError(f"{p} is not a routescope run file; cannot resume it")
    old_layers = json.loads(f.attrs.get("layers", "[]"))
    new_layers = [{"name": layer.name, "family": layer.family, **layer.config} for layer in layers]
    if [d["name"] for d in old_layers] != [d["name"] for d in new_layers]:
        raise RunFileError(f"cannot resume {p}: its layers are {[d['name'] for d in old_layers]}, "
                           f"the model's are {[d['name'] for d in new_layers]}")  # fmt: skip
    for old, new in zip(old_layers, new_layers):
        diff = _first_difference(json.loads(json.dumps(old)), json.loads(json.dumps(new)), ())
        if diff:
            raise RunFileError(f"cannot resume {p}: layer {old['name']} differs ({diff})")
    for key in ("record_every", "sample_tokens"):
        if key in attrs and key in f.attrs and int(f.attrs[key]) != int(attrs[key]):
            raise RunFileError(f"cannot resume {p}: {key} is {int(f.attrs[key])} in the file, {attrs[key]} now")
    if "config" in attrs and "config" in f.attrs:
        diff = _first_difference(json.loads(f.attrs["config"]), json.loads(attrs["config"]) if isinstance(attrs["config"], str)
                                 else json.loads(json.dumps(attrs["config"])), config_may_differ)  # fmt: skip
        if diff:
            raise RunFileError(f"cannot resume {p}: its configuration differs ({diff})")
    for layer in layers:  # a file from a routescope whose schema lacked a variable this one writes
        missing = [v for v in FAMILIES[layer.family].group_variables() if f"{layer.family}/{v}" not in f]
        if missing:
            raise RunFileError(f"cannot resume {p}: it has no {layer.family}/{missing[0]} (recorded by an older "
                               "routescope); record a new run")  # fmt: skip
    expected = set(RUN_FIXED_SCALARS) | set(scalars) | {"step"}
    if set(f["run"]) != expected:
        raise RunFileError(f"cannot resume {p}: it records scalars {sorted(set(f['run']) - {'step'})}, "
                           f"the recorder {sorted(expected - {'step'})}")  # fmt: skip


def _step_groups(f: h5py.File) -> list[h5py.Group]:
    return [f[name] for name in (*FAMILIES, "run") if name in f]


def _growing(group: h5py.Group, dim: str) -> list[h5py.Dataset]:
    return [d for d in group.values() if d.ndim >= 1 and _dims_of(d)[:1] == (dim,)]


def _complete_rows(f: h5py.File, resume_step: int | None) -> int:
    """Intervals every variable of every group has (a kill can leave some one row longer), cut to steps <= resume_step."""
    rows = min(d.shape[0] for g in _step_groups(f) for d in _growing(g, "step"))
    if resume_step is not None:
        rows = int(np.searchsorted(f["run/step"][:rows], resume_step, side="right"))
    return rows


def _truncate(f: h5py.File, rows: int) -> None:
    """Cut every step-growing variable to `rows`, and the traces to the samples of the kept steps."""
    for group in _step_groups(f):
        for dset in _growing(group, "step"):
            dset.resize(rows, axis=0)
    if "traces" in f:
        traces = _growing(f["traces"], "sample")
        samples = min(d.shape[0] for d in traces)
        last = int(f["run/step"][rows - 1]) if rows else -1
        sample_step = f["traces/sample_step"][:samples]
        samples = int(np.count_nonzero(sample_step <= last)) if len(sample_step) else 0
        for dset in traces:
            dset.resize(samples, axis=0)


def _group_sizes(layers: list[LayerLayout]) -> dict[str, int]:
    """A family group's dimension sizes: its layer count and, per dimension, the largest layer's size."""
    sizes: dict[str, int] = {"layer": len(layers)}
    for layer in layers:
        for dim, size in layer.sizes.items():
            sizes[dim] = max(sizes.get(dim, 0), size)
    return sizes


def _append_row(dset: h5py.Dataset, row: int, value: Any) -> None:
    _append_rows(dset, row, np.asarray(value, dtype=dset.dtype)[None])


def _append_rows(dset: h5py.Dataset, first: int, values: np.ndarray) -> None:
    values = np.asarray(values)
    dset.resize(first + values.shape[0], axis=0)
    dset[first : first + values.shape[0]] = values


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
        }
    finally:
        f.close()
    return summary
