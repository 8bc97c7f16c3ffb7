"""The recorder: reads the routed layers' device accumulators at interval ends and streams them to HDF5.

    with routescope.Recorder(model, "run.h5", every=10) as rec:
        for batch in data:
            loss = model(batch); loss.backward(); opt.step()
            rec.step(loss=loss, token_ids=batch)

Between interval ends `step()` touches no device memory and never syncs. At an interval end the
statistics of all layers are packed on the device into two flat buffers (int64, float64), the
layers' accumulators are zeroed in place, and the buffers are copied to pinned host memory without
blocking; a background thread waits for the copy and appends the interval to the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import queue
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routescope import distributed
from routescope.kernels.tree_reference import COUNT_STATS, SUM_STATS
from routescope.layers import TreeFFN, find_routed_layers
from routescope.store import LayerLayout, RunWriter

INT_STATS = ("tokens", *COUNT_STATS)


class RecorderError(RuntimeError):
    """The background writer failed; recording has stopped (training itself can go on)."""


@dataclass
class _Interval:
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


class Recorder:
    """Records the routing of a model's tree layers into one HDF5 run file (DESIGN.md, "Recording").

    every: optimizer steps per interval (one row of the file). sample_tokens: tokens per interval
    whose full path is kept in group `traces`. modules: names or modules to record (default: all
    routed layers). scalars: per-interval values passed to `step()`/`log()` (NaN where not given).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        every: int = 10,
        sample_tokens: int = 64,
        modules: Iterable[str | nn.Module] | None = None,
        config: dict[str, Any] | None = None,
        scalars: tuple[str, ...] = ("train_loss", "val_loss", "lr"),
        include_eval: bool = False,
        context: int = 32,
        seed: int = 0,
        overwrite: bool = False,
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.layers = _select_layers(model, modules)
        distributed.ignore_accumulators(model)  # DDP must not broadcast rank 0's counts over the others'
        self.path = Path(path)
        self.every = every
        self.sample_tokens = sample_tokens
        self.config = dict(config or {})
        self.scalar_names = tuple(dict.fromkeys(("train_loss", *scalars)))
        self.include_eval = include_eval
        self.context = context
        self.overwrite = overwrite
        self.global_step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._writer: RunWriter | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[_Interval | None] = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._reset_interval()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    def start(self) -> None:
        """Create the file, switch the layers' accumulation on and start the writer thread."""
        layouts = [LayerLayout(name, layer.depth, layer.trees, layer.spec.to_dict()) for name, layer in self.layers]
        attrs = {
            "config": json.dumps(self.config),
            "record_every": self.every,
            "sample_tokens": self.sample_tokens,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "routescope_version": _version(),
            "torch_version": torch.__version__,
            "world_size": distributed.world_size(),
        }
        writer = RunWriter if distributed.is_writer() else distributed.NullWriter  # only rank 0 writes
        self._writer = writer(self.path, layouts, attrs, scalars=self.scalar_names,
                                 sample_tokens=self.sample_tokens, context=self.context, overwrite=self.overwrite)  # fmt: skip
        for _, layer in self.layers:
            layer.reset_routing_stats()
            layer.recording = True
            layer.record_eval = self.include_eval
        self._t0 = time.monotonic()
        self._tokens_seen = 0
        self._thread = threading.Thread(target=self._write_loop, name="routescope-writer", daemon=True)
        self._thread.start()
        self._arm_traces()

    def close(self, state: str = "finished") -> None:
        """Write the last (partial) interval, stop the writer and close the file with its final state."""
        if self._writer is None:
            return
        try:
            if self._steps_in_interval > 0 and self._error is None:
                self._close_interval()
        finally:
            for _, layer in self.layers:
                layer.recording = layer.trace_next = False
                layer.last_trace = None
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            self._writer.close("failed" if self._error is not None and state == "finished" else state)
            self._writer = None
        if self._error is not None:
            raise RecorderError(f"recording to {self.path} stopped: {self._error}") from self._error

    # ------------------------------------------------------------------ per step
    def step(self, loss: Tensor | float | None = None, token_ids: Tensor | None = None, **scalars: float | Tensor) -> None:
        """Call once per optimizer step. `loss` is averaged over the interval on the device (no sync);
        `token_ids` (the batch's input ids, shape (batch, seq)) label the sampled traces."""
        if self._error is not None:
            raise RecorderError(f"recording to {self.path} stopped: {self._error}") from self._error
        self.global_step += 1
        self._steps_in_interval += 1
        if loss is not None:
            value = loss.detach().float().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss))
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value.to(self._loss_sum.device)
        if token_ids is not None:
            self._token_ids = token_ids
            self._id_tokens += token_ids.numel()
        self.log(**scalars)
        if self._steps_in_interval >= self.every:
            self._close_interval()
        self._arm_traces()

    def log(self, **scalars: float | Tensor) -> None:
        """Attach values (e.g. val_loss) to the current interval; names must be among `scalars`."""
        unknown = set(scalars) - set(self.scalar_names)
        if unknown:
            raise ValueError(f"unknown scalar(s) {sorted(unknown)}; declare them in Recorder(scalars=...)")
        self._scalars.update(scalars)

    # ------------------------------------------------------------------ internals
    def _reset_interval(self) -> None:
        self._steps_in_interval = 0
        self._loss_sum: Tensor | None = None
        self._token_ids: Tensor | None = None
        self._id_tokens = 0  # tokens in the ids passed to step(): the count for models without routed layers
        self._scalars: dict[str, float | Tensor] = {}

    def _arm_traces(self) -> None:
        """Keep per-token routing only in the forward that closes the interval."""
        armed = self.sample_tokens > 0 and self._steps_in_interval == self.every - 1
        for _, layer in self.layers:
            layer.trace_next = armed
            if not armed:
                layer.last_trace = None

    def _close_interval(self) -> None:
        device = self.layers[0][1].tokens.device if self.layers else torch.device("cpu")
        if self._loss_sum is not None and not self.layers:
            device = self._loss_sum.device
        ints: list[Tensor] = []
        floats: list[Tensor] = []
        for _, layer in self.layers:
            stats = layer.routing_stats()
            ints += [stats[name].reshape(-1) for name in INT_STATS]
            floats += [stats[name].reshape(-1) for name in SUM_STATS]
        summed_ints, summed_floats = sum(t.numel() for t in ints), sum(t.numel() for t in floats)
        trace_count, has_ids = self._pack_traces(ints, floats, device)
        scalar_values = {k: v for k, v in self._scalars.items() if not isinstance(v, Tensor)}
        tensor_scalars = [(k, v) for k, v in self._scalars.items() if isinstance(v, Tensor)]
        if self._loss_sum is not None:
            tensor_scalars.append(("train_loss", self._loss_sum / self._steps_in_interval))
        floats += [v.detach().to(device, torch.float64).reshape(1) for _, v in tensor_scalars]
        # torch.cat copies, so the accumulators can be zeroed right after (stream order keeps this safe).
        flat_ints = torch.cat([t.to(device) for t in ints]) if ints else torch.zeros(0, dtype=torch.int64)
        flat_floats = torch.cat([t.to(device, torch.float64) for t in floats]) if floats else torch.zeros(0, dtype=torch.float64)
        if self.layers:  # zero every accumulator of every layer in a few launches
            torch._foreach_zero_([t for _, layer in self.layers for t in layer.routing_stats().values()])
        # Under torch.distributed: sum counts/sums over ranks, average tensor scalars (routescope/distributed.py).
        flat_ints, flat_floats = distributed.reduce_interval(flat_ints, flat_floats, summed_ints, summed_floats, len(tensor_scalars))
        if not distributed.is_writer():
            self._reset_interval()
            return
        host_ints, host_floats, ready = _to_host(flat_ints), _to_host(flat_floats), None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        item = _Interval(
            step=self.global_step, ints=host_ints, floats=host_floats, ready=ready, scalars=scalar_values,
            scalar_names=tuple(k for k, _ in tensor_scalars), trace_count=trace_count, has_token_ids=has_ids,
            id_tokens=self._id_tokens, elapsed_s=time.monotonic() - self._t0,
        )  # fmt: skip
        self._reset_interval()
        self._queue.put(item)

    def _pack_traces(self, ints: list[Tensor], floats: list[Tensor], device: torch.device) -> tuple[int, bool]:
        """Append the sampled tokens' leaves, path pre-activations and ids to the flat buffers."""
        traces = [layer.last_trace for _, layer in self.layers]
        if self.sample_tokens <= 0 or not traces or any(t is None for t in traces):
            return 0, False
        n = traces[0].path.shape[0]
        if any(t.path.shape[0] != n for t in traces) or n == 0:
            return 0, False
        count = min(self.sample_tokens, n)
        picked = torch.randperm(n, generator=self._generator)[:count].sort().values  # (k,) flat token index
        index = _to_device(picked, device)
        for (_, layer), trace in zip(self.layers, traces):
            nodes = 2**layer.depth - 1
            ints.append((trace.path[index, :, layer.depth] - nodes).reshape(-1))  # (k*T,) leaf
            floats.append(trace.z[index].reshape(-1))  # (k*T*(d+1),)
        ids = self._token_ids
        has_ids = ids is not None and ids.dim() == 2 and ids.numel() == n
        if has_ids:
            seq_len = ids.shape[1]
            sequence, position = picked // seq_len, picked % seq_len
            ctx_pos = position[:, None] - torch.arange(self.context - 1, -1, -1)  # (k, C)
            valid = ctx_pos >= 0
            flat = _to_device(sequence[:, None] * seq_len + ctx_pos.clamp(min=0), ids.device)
            context = torch.where(_to_device(valid, ids.device), ids.reshape(-1)[flat], -1)
            ints += [_to_device(sequence, device), _to_device(position, device), context.reshape(-1).to(device)]
        return count, has_ids

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: the error is reported to the training thread
            try:
                self._write(item)
            except BaseException as err:  # noqa: BLE001 - any writer failure must reach the trainer
                self._error = err

    def _write(self, item: _Interval) -> None:
        if item.ready is not None:
            item.ready.synchronize()
        ints, floats = item.ints.numpy(), item.floats.numpy()
        sizes = self._writer.sizes
        shape = (len(self.layers), sizes["tree"])
        tree = {name: np.zeros(shape + (sizes[name.split("_")[0]],), dtype=np.int64) for name in COUNT_STATS}
        tree.update({name: np.zeros(shape + (sizes[name.split("_")[0]],)) for name in SUM_STATS})
        layer_tokens = np.zeros(len(self.layers), dtype=np.int64)
        i = f = 0
        for li, (_, layer) in enumerate(self.layers):
            for name in INT_STATS:
                i = _take_into(tree, name, li, layer, ints, i, layer_tokens)
            for name in SUM_STATS:
                f = _take_into(tree, name, li, layer, floats, f, layer_tokens)
        traces = None
        if item.trace_count:
            traces, i, f = self._unpack_traces(item, ints, floats, i, f)
        scalars = {"train_loss": np.nan, **{k: float(v) for k, v in item.scalars.items()}}
        scalars.update(zip(item.scalar_names, floats[f:].tolist()))
        if len(layer_tokens) and layer_tokens.min() != layer_tokens.max():
            warnings.warn(f"layers saw different token counts at step {item.step}: {layer_tokens.tolist()}", stacklevel=1)
        self._tokens_seen += int(layer_tokens.max()) if len(layer_tokens) else item.id_tokens
        tree["tokens"] = layer_tokens.max(initial=0)
        tree["layer_tokens"] = layer_tokens
        scalars.update(tokens_seen=self._tokens_seen, elapsed_s=item.elapsed_s)
        self._writer.append_interval(item.step, tree, scalars, traces)

    def _unpack_traces(self, item: _Interval, ints: np.ndarray, floats: np.ndarray, i: int, f: int):
        k, sizes, n_layers = item.trace_count, self._writer.sizes, len(self.layers)
        leaf = np.full((k, n_layers, sizes["tree"]), -1, dtype=np.int32)
        path_act = np.full((k, n_layers, sizes["tree"], sizes["level"]), np.nan, dtype=np.float32)
        for li, (_, layer) in enumerate(self.layers):
            trees, levels = layer.trees, layer.depth + 1
            leaf[:, li, :trees] = ints[i : i + k * trees].reshape(k, trees)
            path_act[:, li, :trees, :levels] = floats[f : f + k * trees * levels].reshape(k, trees, levels)
            i, f = i + k * trees, f + k * trees * levels
        traces = {"sample_step": np.full(k, item.step), "leaf": leaf, "path_act": path_act}
        if item.has_token_ids:
            sequence, position = ints[i : i + k], ints[i + k : i + 2 * k]
            context = ints[i + 2 * k : i + 2 * k + k * self.context].reshape(k, self.context)
            i += 2 * k + k * self.context
            traces.update(sequence=sequence, position=position, token_id=context[:, -1], context_ids=context)
        else:
            traces.update({name: np.full(k, -1) for name in ("sequence", "position", "token_id")})
            traces["context_ids"] = np.full((k, self.context), -1)
        return traces, i, f


def _take_into(tree: dict, name: str, li: int, layer: TreeFFN, flat: np.ndarray, at: int, tokens: np.ndarray) -> int:
    """Copy one layer's statistic out of a flat host buffer into its padded (layer, tree, x) row."""
    if name == "tokens":
        tokens[li] = flat[at]
        return at + 1
    width = 2**layer.depth - (1 if name.startswith("node_") else 0)
    size = layer.trees * width
    tree[name][li, : layer.trees, :width] = flat[at : at + size].reshape(layer.trees, width)
    return at + size


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Move a small host tensor to the device without a sync: a pageable copy to CUDA would block."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _to_host(flat: Tensor) -> Tensor:
    """Start a copy to host memory; pinned and asynchronous on CUDA (the writer waits on an event)."""
    if flat.device.type != "cuda":
        return flat.cpu()
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    return host


def _select_layers(model: nn.Module, modules: Iterable[str | nn.Module] | None) -> list[tuple[str, TreeFFN]]:
    found = find_routed_layers(model)
    if modules is not None:
        wanted = list(modules)
        names = {m for m in wanted if isinstance(m, str)}
        objects = {id(m) for m in wanted if isinstance(m, nn.Module)}
        unknown = names - {name for name, _ in found}
        if unknown:
            raise ValueError(f"no routed layer named {sorted(unknown)}; routed layers: {[n for n, _ in found]}")
        found = [(name, layer) for name, layer in found if name in names or id(layer) in objects]
    if not found and modules is not None:
        raise ValueError("none of the given modules is a routed layer (routescope.TreeFFN)")
    if not found:
        warnings.warn("the model has no routed layers (routescope.TreeFFN): only losses are recorded", stacklevel=3)
    return found


def _version() -> str:
    from routescope import __version__

    return __version__
