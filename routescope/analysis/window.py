"""Windows of steps and layer choices: what every metric of every family is summed over.

A window [start, end) picks the intervals whose closing step lies in it; counts are summed over it
(`window_counts`) or over a rolling window per interval (`rolling_sums`), streamed block by block so
that no whole variable is ever loaded. One implementation for every family, the report, the
dashboard and the notebooks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import xarray as xr

BLOCK_BYTES = 64 * 1024 * 1024  # rows of the file read at once when streaming

Window = tuple[int | None, int | None] | str  # (start, end) of steps, or LAST_QUARTER
T = TypeVar("T")
LAST_QUARTER = "last-quarter"  # the default window: the last quarter of the run's intervals (at least one)
ALL = (None, None)


class MetricsError(ValueError):
    """A bad window or layer selection; the message says what is wrong and what to do."""


def parse_window(text: str | None) -> Window:
    """'a:b', 'a:', ':b' -> (start, end) of a half-open window of steps [start, end); 'all' or ':' -> the
    whole run; None or 'last-quarter' -> LAST_QUARTER (the default: how the run routes now)."""
    if text is None or text.strip().lower() == LAST_QUARTER:
        return LAST_QUARTER
    if text.strip().lower() in ("all", "", ":"):
        return ALL
    parts = text.split(":")
    if len(parts) != 2:
        raise MetricsError(f"window {text!r} must look like START:END (either may be left out, e.g. 100:500), "
                           "'all' or 'last-quarter'")
    try:
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise MetricsError(f"window {text!r} must hold integer steps, e.g. 100:500") from None
    return start, end


def last_quarter(steps: np.ndarray) -> tuple[int | None, int | None]:
    """The window of the last quarter of these intervals, rounded up to at least one interval."""
    if len(steps) == 0:
        return ALL
    return (int(steps[len(steps) - max(1, -(-len(steps) // 4))]), None)


def resolve_window(steps: np.ndarray, window: Window) -> tuple[int | None, int | None]:
    """(start, end) of any window for a run whose intervals close at `steps` (LAST_QUARTER made concrete)."""
    if isinstance(window, str):
        if window != LAST_QUARTER:
            return resolve_window(steps, parse_window(window))
        return last_quarter(steps)
    return window


def describe_window(window: Window) -> str:
    """How a window was asked for, for headers and JSON: 'last-quarter', 'all' or 'START:END'."""
    if isinstance(window, str):
        return window
    start, end = window
    if start is None and end is None:
        return "all"
    return f"{'' if start is None else start}:{'' if end is None else end}"


def in_window(steps: np.ndarray, window: Window) -> np.ndarray:
    """Boolean mask of the steps inside the half-open window [start, end) (None: unbounded)."""
    start, end = resolve_window(steps, window)
    keep = np.ones(len(steps), dtype=bool)
    if start is not None:
        keep &= steps >= start
    if end is not None:
        keep &= steps < end
    return keep


def select_window(ds: xr.Dataset, window: Window = (None, None)) -> xr.Dataset:
    """The intervals whose closing step lies in [start, end); clear errors for empty or bad windows."""
    steps = ds["step"].values
    start, end = window = resolve_window(steps, window)
    if len(steps) == 0:
        state = ds.attrs.get("run_state", "running")
        if state in ("finished", "interrupted", "failed"):
            raise MetricsError(f"the run ended ({state}) before its first interval was written: there is nothing to "
                               "report; record it again")  # fmt: skip
        raise MetricsError("the run has no complete interval yet; wait for the first one to be written")
    if start is not None and end is not None and start >= end:
        raise MetricsError(f"window {start}:{end} is empty or reversed; the start must be below the end")
    keep = in_window(steps, window)
    if not keep.any():
        raise MetricsError(
            f"window {'' if start is None else start}:{'' if end is None else end} holds no interval; "
            f"the run's intervals close at steps {steps[0]}..{steps[-1]}"
        )
    return ds.isel(step=np.flatnonzero(keep))


def window_bounds(ds: xr.Dataset) -> dict[str, int]:
    """First and last closing step and interval count of a (windowed) Dataset: a summary's attributes."""
    steps = ds["step"].values
    return {"window_first_step": int(steps[0]), "window_last_step": int(steps[-1]), "intervals": len(steps)}


def window_counts(ds: xr.Dataset, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Counts summed over all intervals of `ds` (streamed by dask, one pass), as numpy arrays without `step`."""
    import dask

    present = [n for n in names if n in ds]
    summed = dask.compute(*[ds[n].data.sum(axis=0) if hasattr(ds[n].data, "dask") else ds[n].values.sum(0) for n in present])
    return dict(zip(present, (np.asarray(s) for s in summed)))


def blocks(ds: xr.Dataset, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive blocks of whole intervals, as numpy, about BLOCK_BYTES per variable."""
    row_bytes = max(ds[n].dtype.itemsize * int(np.prod(ds[n].shape[1:])) for n in names)
    rows = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, ds.sizes["step"], rows):
        block = ds.isel(step=slice(start, start + rows))
        yield {n: block[n].values for n in names}


def rolling_sums(ds: xr.Dataset, names: Sequence[str], rolling: int | None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per interval, each variable summed over the last `rolling` intervals up to it (None: from the
    start of `ds`), streamed: yields (position of the block's first interval, {name: (rows, ...)})."""
    names = [n for n in names if n in ds]
    history: dict[str, np.ndarray] | None = None
    at = 0
    for block in blocks(ds, names):
        n = len(next(iter(block.values())))
        if history is None:  # cumulative sums through the `rolling` intervals before this block
            history = {k: np.zeros(((rolling or 1),) + v.shape[1:], dtype=v.dtype) for k, v in block.items()}
        sums = {}
        for k, v in block.items():
            cum = history[k][-1] + np.cumsum(v, axis=0)
            if rolling is None:
                sums[k] = cum
                history[k] = cum[-1:]
            else:
                both = np.concatenate([history[k], cum])
                sums[k] = cum - both[:n]
                history[k] = both[-rolling:]
        yield at, sums
        at += n


def pick_layers(infos: list[T], layers: list[int] | None, what: str = "layer") -> list[T]:
    """The chosen entries of `infos` (all when `layers` is None); a clear error naming a bad index."""
    if layers is None:
        return infos
    bad = [i for i in layers if not 0 <= i < len(infos)]
    if bad:
        raise MetricsError(f"no {what} {bad[0]} in this run; it has {what}s 0..{len(infos) - 1}")
    return [infos[i] for i in dict.fromkeys(layers)]  # a layer asked for twice is reported once


def layer_configs(ds: xr.Dataset) -> list[dict[str, Any]]:
    """The per-layer spec dicts of a family group (its `layers` attribute), one per layer."""
    configs = json.loads(ds.attrs.get("layers", "[]"))
    return [configs[i] if i < len(configs) else {} for i in range(ds.sizes["layer"])]
