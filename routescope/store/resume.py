"""What resuming a run file checks and cuts (`routescope record --resume`, `Recorder(resume=True)`).

`check_same_run` refuses a file recorded with other layers or settings, naming the first difference;
`complete_rows` and `truncate` cut every group to the intervals all its variables have (a killed
writer can leave some one row longer) and to those closing at or before the resume step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from routescope.store.format import RUN_FIXED_SCALARS, LayerLayout, RunFileError
from routescope.store.reader import dims_of
from routescope.store.schema import FAMILIES


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


def check_same_run(f: h5py.File, p: Path, layers: list[LayerLayout], attrs: dict[str, Any], scalars: tuple[str, ...],
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
    probe = int(attrs.get("probe_tokens", 0))
    if ("probe" in f) != (probe > 0) or (probe and int(f.attrs.get("probe_tokens", 0)) != probe):
        had = int(f.attrs.get("probe_tokens", 0)) if "probe" in f else 0
        raise RunFileError(f"cannot resume {p}: it was recorded with a probe of {had} tokens, the recorder has {probe}; "
                           "pass the same probe (or none) as the run had")  # fmt: skip
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
    return [f[name] for name in (*FAMILIES, "run", "probe") if name in f]


def _growing(group: h5py.Group, dim: str) -> list[h5py.Dataset]:
    return [d for d in group.values() if d.ndim >= 1 and dims_of(d)[:1] == (dim,)]


def complete_rows(f: h5py.File, resume_step: int | None) -> int:
    """Intervals every variable of every group has (a kill can leave some one row longer), cut to steps <= resume_step."""
    rows = min(d.shape[0] for g in _step_groups(f) for d in _growing(g, "step"))
    if resume_step is not None:
        rows = int(np.searchsorted(f["run/step"][:rows], resume_step, side="right"))
    return rows


def truncate(f: h5py.File, rows: int) -> None:
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
