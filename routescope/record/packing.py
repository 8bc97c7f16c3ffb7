"""Packing a model's routing statistics into flat buffers and back: the recorder's data layout.

At an interval end the recorder concatenates every layer's accumulators into one int64 and one
float64 buffer (in `packing_order`), copies them to the host without a sync, and the writer thread
unpacks them here into one padded array per file variable (routescope.store.schema).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from routescope.store.format import LayerLayout
from routescope.store.schema import FAMILIES, Family
from routescope.store.writer import RunWriter


def packing_order(family: Family) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The order a layer's statistics take in the flat buffers: (int64 names, float64 names)."""
    ints = ("tokens", *(name for name, v in family.stats.items() if v.dtype.startswith("i")))
    return ints, tuple(name for name, v in family.stats.items() if v.dtype.startswith("f"))


@dataclass
class Interval:
    """One interval on its way to the writer thread: host buffers (maybe still being filled) and their layout."""

    step: int
    ints: Tensor
    floats: Tensor
    ready: torch.cuda.Event | None
    scalars: dict[str, float]
    scalar_names: tuple[str, ...]  # names of the trailing entries of `floats`
    trace_count: int
    has_token_ids: bool
    id_tokens: int
    elapsed_s: float
    probe: dict[str, Tensor] | None = None  # the routing-stability probe's rows (record/probe.py), on the host



def take_into(rows: dict[str, np.ndarray], names: tuple[str, ...], family: Family, at: int, sizes: dict[str, int],
               flat: np.ndarray, start: int) -> int:  # fmt: skip
    """Copy one layer's statistics out of a flat host buffer into their padded rows at layer position `at`."""
    for name in names:
        shape = family.layer_shape(name, sizes)
        size = int(np.prod(shape, dtype=np.int64))
        rows[name][(at, *(slice(0, s) for s in shape))] = flat[start : start + size].reshape(shape)
        start += size
    return start


def layout_of(name: str, layer: nn.Module) -> LayerLayout:
    """What the writer needs to know about one routed layer."""
    spec = layer.spec.to_dict()
    if layer.family == "tree":
        return LayerLayout(name, layer.depth, layer.trees, spec)
    return LayerLayout(name, config=spec, family=layer.family)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """Move a small host tensor to the device without a sync: a pageable copy to CUDA would block."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(flat: Tensor) -> Tensor:
    """Start a copy to host memory; pinned and asynchronous on CUDA (the writer waits on an event)."""
    if flat.device.type != "cuda":
        return flat.cpu()
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    return host


def unpack_traces(item: Interval, ints: np.ndarray, floats: np.ndarray, i: int, f: int, writer: RunWriter,
              placed: list[tuple[str, int, dict[str, int]]], context: int) -> tuple[dict[str, np.ndarray], int, int]:
    """The sampled tokens' trace rows of one interval out of the flat host buffers (from positions i, f);
    `placed`: per recorded layer, its family, its index in the family group and its dimension sizes."""
    k = item.trace_count
    traces: dict[str, np.ndarray] = {"sample_step": np.full(k, item.step)}
    for name in writer.families:
        family, sizes = FAMILIES[name], writer.group_sizes[name]
        for var, v in family.traces.items():
            shape = (k, sizes["layer"], *family.trace_shape(var, sizes))
            traces[var] = np.full(shape, -1 if v.dtype.startswith("i") else np.nan, dtype=np.dtype(v.dtype))
    for family_name, at, sizes in placed:
        family = FAMILIES[family_name]
        for var, v in family.traces.items():
            shape = (k, *family.trace_shape(var, sizes))
            size = int(np.prod(shape))
            if v.dtype.startswith("i"):
                values, i = ints[i : i + size], i + size
            else:
                values, f = floats[f : f + size], f + size
            traces[var][(slice(None), at, *(slice(0, s) for s in shape[1:]))] = values.reshape(shape)
    if item.has_token_ids:
        sequence, position = ints[i : i + k], ints[i + k : i + 2 * k]
        context = ints[i + 2 * k : i + 2 * k + k * context].reshape(k, context)
        i += 2 * k + k * context
        traces.update(sequence=sequence, position=position, token_id=context[:, -1], context_ids=context)
    else:
        traces.update({name: np.full(k, -1) for name in ("sequence", "position", "token_id")})
        traces["context_ids"] = np.full((k, context), -1)
    return traces, i, f


def unpack_groups(ints: np.ndarray, floats: np.ndarray, placed: list[tuple[str, int, dict[str, int]]],
                  group_sizes: dict[str, dict[str, int]]) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, int, int]:  # fmt: skip
    """Every layer's statistics out of the flat host buffers into one padded array per statistic of each
    family group (layers of the family, largest layer's shape); also each layer's token count and the
    buffer positions where the traces start."""
    groups = {name: {var: np.zeros((sizes["layer"], *FAMILIES[name].layer_shape(var, sizes)), dtype=np.dtype(v.dtype))
                     for var, v in FAMILIES[name].stats.items()}
              for name, sizes in group_sizes.items()}  # fmt: skip
    layer_tokens = np.zeros(len(placed), dtype=np.int64)
    i = f = 0
    for li, (family_name, at, sizes) in enumerate(placed):
        family, rows = FAMILIES[family_name], groups[family_name]
        int_names, float_names = packing_order(family)
        layer_tokens[li] = ints[i]
        i = take_into(rows, int_names[1:], family, at, sizes, ints, i + 1)
        f = take_into(rows, float_names, family, at, sizes, floats, f)
    return groups, layer_tokens, i, f


def nonfinite_layers(names: list[str], placed: list[tuple[str, int, dict[str, int]]],
                     groups: dict[str, dict[str, np.ndarray]]) -> list[str]:  # fmt: skip
    """"NAME (N tokens)" for each layer whose `nonfinite_tokens` is non-zero in this interval (tree: max over trees)."""
    bad = []
    for name, (family_name, at, _) in zip(names, placed):
        rows = groups[family_name].get("nonfinite_tokens")
        count = 0 if rows is None else int(np.max(rows[at], initial=0))
        if count:
            bad.append(f"{name} ({count} tokens)")
    return bad


def pack_traces(layers: list[nn.Module], ints: list[Tensor], floats: list[Tensor], device: torch.device, sample_tokens: int,
                generator: torch.Generator, token_ids: Tensor | None, context: int) -> tuple[int, bool]:  # fmt: skip
    """Append a random sample of the last forward's tokens (at most `sample_tokens`): each layer's trace rows
    (its family's trace variables), then with `token_ids` (batch, seq) their sequence, position and context
    ids, to the flat buffers. Returns (tokens sampled, whether ids were packed)."""
    counts = [layer.traced_tokens() for layer in layers]
    if sample_tokens <= 0 or not counts or any(c is None for c in counts):
        return 0, False
    n = counts[0]
    if any(c != n for c in counts) or n == 0:
        return 0, False
    count = min(sample_tokens, n)
    picked = torch.randperm(n, generator=generator)[:count].sort().values  # (k,) flat token index
    index = to_device(picked, device)
    for layer in layers:
        rows = layer.trace_rows(index)
        for name, var in FAMILIES[layer.family].traces.items():
            target = ints if var.dtype.startswith("i") else floats
            target.append(rows[name].reshape(-1).to(torch.int64 if target is ints else torch.float64))
    ids = token_ids
    has_ids = ids is not None and ids.dim() == 2 and ids.numel() == n
    if has_ids:
        seq_len = ids.shape[1]
        sequence, position = picked // seq_len, picked % seq_len
        ctx_pos = position[:, None] - torch.arange(context - 1, -1, -1)  # (k, C)
        valid = ctx_pos >= 0
        flat = to_device(sequence[:, None] * seq_len + ctx_pos.clamp(min=0), ids.device)
        context = torch.where(to_device(valid, ids.device), ids.reshape(-1)[flat], -1)
        ints += [to_device(sequence, device), to_device(position, device), context.reshape(-1).to(device)]
    return count, has_ids


def reason(err: BaseException) -> str:
    """An error as one line for the user: an OSError's own words (without "[Errno N]"), else its first line."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return (text.splitlines() or [type(err).__name__])[0]


def warn_nonfinite(step: int, names: list[str], placed: list[tuple[str, int, dict[str, int]]],
                   groups: dict[str, dict[str, np.ndarray]]) -> bool:  # fmt: skip
    """Warn naming the layers whose `nonfinite_tokens` is non-zero in this interval (host data only); True if it did."""
    bad = nonfinite_layers(names, placed, groups)
    if bad:
        warnings.warn(f"non-finite activations (NaN/inf) at step {step} in {', '.join(bad)}: counted in "
                      "nonfinite_tokens and left out of the sums (warned once)", RuntimeWarning, stacklevel=1)  # fmt: skip
    return bool(bad)
