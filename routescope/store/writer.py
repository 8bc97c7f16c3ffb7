"""Writing run files: `RunWriter` creates a file (or reopens one to resume) and appends one interval at a time.

The layout is docs/file-format.md's. A failed write must never leave a
half-written interval, crash the process at exit or fail silently, so the writer (a) keeps a reserve of
free space and stops cleanly before the disk fills, (b) writes data through no chunk cache and keeps
its dataset handles open, so every HDF5 write error surfaces in the call that caused it (not in a
destructor, where h5py can only print it), and (c) after a failed write, detaches the file (`_abandon`)
so that it stays as the failure left it: readable up to its last complete interval, like a killed run.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from routescope.store.datasets import attach_dims, attr_value, create_growing, make_coordinate
from routescope.store.format import (
    FORMAT_BOUNDS,
    RUN_FIXED_SCALARS,
    RUN_STATES,
    SCHEMA_VERSION,
    LayerLayout,
    RunFileError,
    first_line,
)
from routescope.store.lock import WriterLock
from routescope.store.repair import clear_open_flags
from routescope.store.resume import check_same_run, complete_rows, truncate
from routescope.store.schema import COMMON_TRACES, FAMILIES, PROBE, PROBE_FAMILIES, Family, coordinate_values
from routescope.store.write_errors import (
    DiskSpaceError,
    WriteFailedError,
    detach_and_close,
    mark_detached,
    mib,
    room_for,
)

RESERVE_MIN_BYTES = 1 << 20  # free space always kept: the final close's flush, with room to spare
RESERVE_INTERVALS = 2  # ... plus this many of the largest intervals written so far (new chunks included)


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
        reserve_bytes: int | None = None,
        fsync: bool = False,
        probe_tokens: int = 0,
    ) -> None:
        self.path = Path(path)
        self.probe_tokens = probe_tokens  # tokens of the routing-stability probe per interval (group `probe`; 0: none)
        # Free space the writer never uses: None keeps RESERVE_MIN_BYTES plus RESERVE_INTERVALS of the largest
        # interval so far; 0 switches the check off (a write can then meet a full disk).
        self.reserve_bytes = reserve_bytes
        self.fsync = fsync  # after each interval's flush, make the OS write it to the disk (survives a power loss)
        self._largest_interval = 0  # bytes the file grew by in its largest interval so far
        self.abandoned = False  # a write failed and the file was detached (`_abandon`)
        self._dsets: dict[str, h5py.Dataset] = {}
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
        self.file = h5py.File(self.path, "w", libver=FORMAT_BOUNDS, rdcc_nbytes=0)  # no chunk cache: module docstring
        f = self.file
        f.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "layers": json.dumps([{"name": layer.name, "family": layer.family, **layer.config} for layer in layers]),
                **{k: attr_value(v) for k, v in attrs.items()},
            }
        )
        state = f.create_dataset("run_state", data=np.int8(0))
        state.attrs.update({"flag_values": np.arange(len(RUN_STATES), dtype="i1"), "flag_meanings": " ".join(RUN_STATES)})

        # A run without routed layers (a dense baseline) records the `run` group only.
        for name, group in self.families.items():
            self._create_family_group(FAMILIES[name], group, self.group_sizes[name])

        run = f.create_group("run")
        make_coordinate(run, "step")
        for name, dtype in {**RUN_FIXED_SCALARS, **{s: "f8" for s in self.scalars}}.items():
            dset = create_growing(run, name, ("step",), dtype, sizes)
            attach_dims(run, dset, ("step",))

        self.trace_names: tuple[str, ...] = ()
        if sample_tokens > 0 and layers:
            self._create_traces_group(context)
        if self.probe_tokens > 0 and any(PROBE_FAMILIES[v] in self.families for v in PROBE):
            self._create_probe_group()
        f.swmr_mode = True  # every dataset exists by now: SWMR forbids creating more

    def _reopen(self, layers: list[LayerLayout], attrs: dict[str, Any], context: int, resume_step: int | None,
                config_may_differ: tuple[str, ...]) -> None:  # fmt: skip
        """Resume: check the file records the same layers and settings, cut it to its complete rows, reopen for SWMR writing."""
        p = self.path
        if not p.exists():
            raise RunFileError(f"{p}: no such file to resume; record a new run instead")
        clear_open_flags(p)  # a killed writer left HDF5's open-for-write flags set (a clean file: no-op)
        try:
            f = h5py.File(p, "r+", libver=FORMAT_BOUNDS, rdcc_nbytes=0)
        except OSError as err:  # e.g. HDF5's own lock, held by a plain (non-SWMR) reader
            raise RunFileError(f"cannot reopen {p} to resume it ({first_line(err)}); close the programs reading it") from None
        self.file = f
        try:
            check_same_run(f, p, layers, attrs, self.scalars, config_may_differ)
            rows = complete_rows(f, resume_step)
            truncate(f, rows)
            if rows:
                run = f["run"]
                self.resumed_from = (int(run["step"][rows - 1]), int(run["tokens_seen"][rows - 1]),
                                     float(run["elapsed_s"][rows - 1]))  # fmt: skip
            history = json.loads(f.attrs.get("resumed", "[]"))
            history.append({"after_step": self.resumed_from[0] if self.resumed_from else 0,
                            "at": attrs.get("created", "")})  # fmt: skip
            f.attrs["resumed"] = json.dumps(history)
            if "config" in attrs:
                f.attrs["config"] = attr_value(attrs["config"])  # the new end (steps) of the resumed run
            f["run_state"][()] = np.int8(0)
            self.trace_names = tuple(n for n in _trace_variable_names(self.families)) if "traces" in f else ()
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise

    def _create_family_group(self, family: Family, layers: list[LayerLayout], sizes: dict[str, int]) -> None:
        group = self.file.create_group(family.name)
        group.attrs["layers"] = json.dumps([{"name": layer.name, "family": layer.family, **layer.config} for layer in layers])
        make_coordinate(group, "step")
        for dim in ("layer", *family.stat_dims):
            make_coordinate(group, dim, coordinate_values(dim, sizes[dim]))
        layer_sets = [group.create_dataset("layer_name", data=[layer.name for layer in layers], dtype=h5py.string_dtype())]
        for name, (key, dtype, meaning) in family.layer_vars.items():
            values = [np.nan if layer.value(key) is None else layer.value(key) for layer in layers]
            layer_sets.append(group.create_dataset(name, data=np.array(values, dtype=dtype)))
            layer_sets[-1].attrs["long_name"] = meaning
        for dset in layer_sets:
            attach_dims(group, dset, ("layer",))
        for name, var in family.group_variables().items():
            dset = create_growing(group, name, var.dims, var.dtype, sizes)
            dset.attrs["long_name"] = var.meaning
            attach_dims(group, dset, var.dims)
        if "bin" in family.stat_dims:  # the fixed histogram bins, as edges (bin b: [edges[b], edges[b+1]))
            group["active_hist"].attrs["bin_edges"] = coordinate_values("bin", sizes["bin"] + 1)

    def _create_traces_group(self, context: int) -> None:
        traces = self.file.create_group("traces")
        make_coordinate(traces, "sample")
        variables = dict(COMMON_TRACES)
        sizes: dict[str, int] = {"sample": 0, "context": context}
        for name, group in self.families.items():
            family = FAMILIES[name]
            sizes[family.trace_layer_dim] = len(group)
            sizes.update({dim: self.group_sizes[name][dim] for dim in family.trace_dims})
            variables.update(family.traces)
        for dim in dict.fromkeys(d for v in variables.values() for d in v.dims[1:]):
            make_coordinate(traces, dim, np.arange(sizes[dim]))
        for name, var in variables.items():
            dset = create_growing(traces, name, var.dims, var.dtype, sizes, rows_per_write=self.sample_tokens)
            dset.attrs["long_name"] = var.meaning
            attach_dims(traces, dset, var.dims)
        self.trace_names = tuple(variables)

    def _create_probe_group(self) -> None:
        """Group `probe`: per interval, each probe token's leaf per tree layer and tree, and its experts per MoE layer."""
        probe = self.file.create_group("probe")
        make_coordinate(probe, "step")
        sizes = {"probe": self.probe_tokens, "layer": len(self.families.get("tree", [])),
                 "tree": self.sizes["tree"], "moe_layer": len(self.families.get("moe", [])),
                 "choice": max((layer.value("k") or 0 for layer in self.families.get("moe", [])), default=0)}  # fmt: skip
        variables = {name: var for name, var in PROBE.items() if PROBE_FAMILIES[name] in self.families}
        for dim in dict.fromkeys(d for v in variables.values() for d in v.dims[1:]):
            make_coordinate(probe, dim, np.arange(sizes[dim]))
        for name, var in variables.items():
            dset = create_growing(probe, name, var.dims, var.dtype, sizes)
            dset.attrs["long_name"] = var.meaning
            attach_dims(probe, dset, var.dims)

    @property
    def intervals(self) -> int:
        return self._dset("run/step").shape[0]

    def _dset(self, name: str) -> h5py.Dataset:
        """A dataset by path, its handle kept open for the run: closing one can flush it, and an error there
        would only be printed by h5py's destructor, never raised (a full disk would then go unnoticed)."""
        dset = self._dsets.get(name)
        if dset is None:
            dset = self._dsets[name] = self.file[name]
        return dset

    def append_interval(
        self,
        step: int,
        tree: dict[str, np.ndarray] | None,
        scalars: dict[str, float],
        traces: dict[str, np.ndarray] | None = None,
        groups: dict[str, dict[str, np.ndarray]] | None = None,
        probe: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append one interval. `groups` maps each family group to {variable: row (layer, ...)} as in
        routescope.schema; `tree` is the tree group's rows (shorthand for groups["tree"]); `probe` the probe
        group's rows (`leaf`, `experts`; missing ones are written as -1).

        Raises DiskSpaceError before writing anything when less than the reserve is free; any error while
        writing detaches the file (`_abandon`) and is re-raised: the writer takes no more intervals.
        """
        if self.abandoned:
            raise RunFileError(f"{self.path}: an earlier write failed; this writer takes no more intervals")
        groups = {**({"tree": tree} if tree is not None else {}), **(groups or {})}
        row = self.intervals
        if row and step <= int(self._dset("run/step")[row - 1]):
            raise ValueError(f"steps must increase: {step} after {int(self._dset('run/step')[row - 1])}")
        self._check_space()
        size = self._file_size()
        try:
            self._append(row, step, groups, scalars, traces, probe)
        except BaseException as err:
            self._abandon()
            if isinstance(err, Exception):
                raise WriteFailedError(self.path, step, row, err) from err
            raise
        self._largest_interval = max(self._largest_interval, self._file_size() - size)

    def _append(self, row: int, step: int, groups: dict[str, dict[str, np.ndarray]], scalars: dict[str, float],
                traces: dict[str, np.ndarray] | None, probe: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
        f = self.file
        for name in self.families:
            for var, v in FAMILIES[name].group_variables().items():
                if var not in f[name]:  # a resumed older file lacks variables added since (`optional`)
                    continue
                dset = self._dset(f"{name}/{var}")
                _append_row(dset, row, groups[name][var] if var in groups[name] or not v.optional
                            else np.zeros(dset.shape[1:], dset.dtype))  # an optional variable not given: zeros
        for name in f["run"]:
            if name != "step":
                dset = self._dset(f"run/{name}")
                _append_row(dset, row, scalars.get(name, np.nan if dset.dtype.kind == "f" else -1))
        coords = [(self._dset(f"{group}/step"), row, step) for group in (*self.families, "run")]
        if "probe" in f:
            for name in (n for n in PROBE if n in f["probe"]):
                dset = self._dset(f"probe/{name}")
                given = (probe or {}).get(name)
                _append_row(dset, row, given if given is not None else np.full(dset.shape[1:], -1, dset.dtype))
            coords.append((self._dset("probe/step"), row, step))
        if traces is not None and "traces" in f:
            first = self._dset("traces/sample").shape[0]
            count = len(traces["sample_step"])
            for name in self.trace_names:
                _append_rows(self._dset(f"traces/{name}"), first, traces[name])
            coords.append((self._dset("traces/sample"), first, np.arange(first, first + count)))
        for dset, at, value in coords:  # coordinates last: they make the rows visible
            _append_rows(dset, at, np.atleast_1d(value))
        f.flush()
        if self.fsync:
            os.fsync(f.id.get_vfd_handle())

    # ------------------------------------------------------------------ running out of space
    def _file_size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:  # removed under us: the interval's writes will say so
            return 0

    def _check_space(self) -> None:
        """Raise DiskSpaceError (nothing written yet) when the disk, or the process's file-size limit
        (`ulimit -f`), leaves less room for this file than the reserve."""
        if self.reserve_bytes == 0:
            return
        reserve = self.reserve_bytes or RESERVE_MIN_BYTES + RESERVE_INTERVALS * self._largest_interval
        room, where = room_for(self.path)
        if room < reserve:
            raise DiskSpaceError(errno.ENOSPC, f"only {mib(room)} {where}: the writer stopped before the "
                                 f"last {mib(reserve)} (its reserve), so every interval written is complete")  # fmt: skip

    def _abandon(self) -> None:
        """Detach the file after a failed write (`write_errors.detach_and_close`): HDF5's remaining writes
        (its dirty metadata, which may fail again) go to a scratch file, so the file on disk stays as the
        failure left it: like a killed run's, readable up to its last complete interval."""
        self.abandoned = True
        self._dsets.clear()
        detach_and_close(self.file)

    def close(self, state: str = "finished", failure: str | None = None) -> None:
        """Record the final run state (and, for a failed run, `failure`: one line saying why, as the root
        attribute `failure`), close the file and release the writer lock (idempotent).

        After a failed write (`abandoned`) the state is recorded only where that is still possible
        (`_mark_detached`). A close that fails detaches the file as a failed write does, then raises.
        """
        try:
            if self.abandoned:
                if self._lock.held:  # the first close of a detached file (still ours: no other writer yet)
                    mark_detached(self.path, state, failure)
                return
            if not self.file.id.valid:
                return
            try:
                self._dset("run_state")[()] = np.int8(RUN_STATES.index(state))
                if failure:
                    self.file.attrs["failure"] = failure
                self._dsets.clear()
                self.file.flush()
                self.file.close()
            except BaseException:
                self._abandon()
                raise
        finally:
            if self._lock.held:
                self._lock.release()


def _trace_variable_names(families: dict[str, list[LayerLayout]]) -> list[str]:
    """The trace variables a run with these family groups has, in the order the writer creates them."""
    names = dict.fromkeys(COMMON_TRACES)
    for name in families:
        names.update(dict.fromkeys(FAMILIES[name].traces))
    return list(names)


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
