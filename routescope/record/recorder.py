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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routescope.layers import select_routed_layers
from routescope.record import distributed
from routescope.record.live_log import check_log_to, make_live_log
from routescope.record.packing import (
    Interval,
    layout_of,
    pack_traces,
    packing_order,
    reason,
    to_host,
    unpack_groups,
    unpack_traces,
    warn_nonfinite,
)
from routescope.record.probe import probe_routing
from routescope.store.schema import FAMILIES
from routescope.store.writer import RunWriter
from routescope.version import __version__


class RecorderError(RuntimeError):
    """The background writer failed; recording has stopped (training itself can go on)."""

    def __init__(self, message: str, recorder: Recorder | None = None) -> None:
        super().__init__(message)
        self.recorder = recorder  # whose stopped_message() the CLI words its own way


class Recorder:
    """Records the routing of a model's routed layers (tree, L1, MoE) into one HDF5 run file (README, "Recording").

    every: optimizer steps per interval (one row of the file). sample_tokens: tokens per interval
    whose full path is kept in group `traces`. modules: names or modules to record (default: all
    routed layers). scalars: per-interval values passed to `step()`/`log()` (NaN where not given).
    on_error: what a failed write (disk full, ...) does at the next `step()`: "raise" a RecorderError
    (again at `close()`), or "stop": warn once, close the file marked failed, and make later calls
    no-ops so that training goes on without recording. Rows flushed before the failure stay intact.
    reserve_bytes: free space the recorder leaves on the file's disk (and under `ulimit -f`): with less,
    it stops as on a failed write, before HDF5 can meet a full disk. None: 1 MiB plus two of the
    largest intervals so far; 0: no check (README, "Disk full"). fsync: after each interval's flush,
    wait until the OS has written it to the disk, so that it survives a power loss or kernel crash too
    (a flush alone survives a killed process); costs a disk sync per interval, in the writer thread.
    resume: append to an existing run from its last complete interval (README, "How resume works"):
    `global_step`, tokens_seen and elapsed_s continue; a file recording other layers, `every`,
    `sample_tokens` or `config` (keys in `config_may_differ`, dotted, excepted) is refused with
    RunFileError. resume_step: cut the file to the intervals closing at or before this step first
    (the step of the training checkpoint being resumed). Only one Recorder may write a file at a time.
    probe: held-out inputs (what the model's forward takes; a tuple for several arguments) routed in eval mode at
    each interval end into group `probe`, for routing stability over training (analysis.stability).
    log_to: also hand a few metrics per layer to a tracker at each interval end (record/live_log.py):
    "tensorboard" (event files in RUN.tb/), "wandb" (the active run), a SummaryWriter, or callable(values, step).
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
        on_error: str = "raise",
        resume: bool = False,
        resume_step: int | None = None,
        config_may_differ: tuple[str, ...] = (),
        reserve_bytes: int | None = None,
        fsync: bool = False,
        log_to: Any = None,
        probe: Any = None,
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        if on_error not in ("raise", "stop"):
            raise ValueError(f"on_error must be 'raise' or 'stop', got {on_error!r}")
        self.on_error = on_error
        self.layers = select_routed_layers(model, modules)
        distributed.ignore_accumulators(model)  # DDP must not broadcast rank 0's counts over the others'
        self.path = Path(path)
        self.every = every
        self.sample_tokens = sample_tokens
        self.config = dict(config or {})
        self.scalar_names = tuple(dict.fromkeys(("train_loss", *scalars)))
        self.include_eval = include_eval
        self.context = context
        self.overwrite = overwrite
        self.resume = resume
        self.resume_step = resume_step
        self.config_may_differ = tuple(config_may_differ)
        if reserve_bytes is not None and reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0 (0: no free-space check), got {reserve_bytes}")
        self.reserve_bytes = reserve_bytes
        self.fsync = fsync
        check_log_to(log_to)
        self.log_to = log_to  # live metrics for a tracker (record/live_log.py): "tensorboard", "wandb", a writer, a callable
        self._live: Any = None
        self.model, self.probe = model, probe  # probe: inputs routed at each interval end (record/probe.py)
        self.global_step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._writer: RunWriter | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Interval | None] = queue.Queue(maxsize=16)
        self._error: BaseException | None = None  # the writer's failure (rank 0), or rank 0's reported to this rank
        self._halted = False  # under torch.distributed: every rank has learnt of the writer's failure
        self._failure_flag: tuple[Tensor, Any] | None = None  # last interval's reduced failure flag, on its way to the host
        self._sizes = [layer.stat_sizes() for _, layer in self.layers]  # per-layer dimension sizes
        # Each layer's position among the layers of its family (its index on that group's `layer` axis).
        self._family_index = [sum(other.family == layer.family for _, other in self.layers[:i])
                              for i, (_, layer) in enumerate(self.layers)]  # fmt: skip
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
        layouts = [layout_of(name, layer) for name, layer in self.layers]
        attrs = {
            "config": json.dumps(self.config),
            "record_every": self.every,
            "sample_tokens": self.sample_tokens,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "routescope_version": __version__,
            "torch_version": torch.__version__,
            "world_size": distributed.world_size(),
        }
        if self.probe is not None:
            routing = probe_routing(self.model, self.probe, self.layers)
            if not routing:
                raise ValueError("probe= routes tokens through tree or MoE layers; this model records none")
            attrs["probe_tokens"] = next(iter(routing.values())).shape[1]
        resume = {"resume": True, "resume_step": self.resume_step, "config_may_differ": self.config_may_differ} if self.resume else {}

        def make() -> RunWriter:
            return RunWriter(self.path, layouts, attrs, scalars=self.scalar_names, sample_tokens=self.sample_tokens,
                             context=self.context, overwrite=self.overwrite, reserve_bytes=self.reserve_bytes,
                             fsync=self.fsync, probe_tokens=int(attrs.get("probe_tokens", 0)), **resume)  # fmt: skip

        # Only rank 0 writes; every rank learns whether it could open the file and where a resumed run goes on.
        writer, resumed = distributed.open_on_writer(make, lambda w: w.resumed_from)
        self._writer = writer if writer is not None else distributed.NullWriter()
        if writer is not None:
            self._live = make_live_log(self.log_to, self.path, self.layers)
        step, tokens, elapsed = resumed if resumed is not None else (0, 0, 0.0)
        if self.resume:
            self.global_step = self.resume_step if self.resume_step is not None else step
        for _, layer in self.layers:
            layer.reset_routing_stats()
            layer.recording = True
            layer.record_eval = self.include_eval
        self._t0 = time.monotonic() - elapsed
        self._tokens_seen = tokens
        self._thread = threading.Thread(target=self._write_loop, name="routescope-writer", daemon=True)
        self._thread.start()
        self._arm_traces()

    def close(self, state: str = "finished") -> None:
        """Write the last (partial) interval, stop the writer and close the file with its final state."""
        if self._writer is None:
            return
        try:
            if self._steps_in_interval > 0 and not self._failed() and not self._torn(state):
                self._close_interval()
        finally:
            for _, layer in self.layers:
                layer.recording = layer.trace_next = False
                layer.last_trace = None
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            writer, self._writer = self._writer, None
            if self._live is not None:
                self._live.close()
            try:
                writer.close("failed" if self._error is not None and state == "finished" else state,
                             failure=reason(self._error) if self._error is not None else None)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - the final flush failed (a full disk): report it like a write
                self._error = self._error or err
        if self._error is not None and self.on_error == "stop":
            warnings.warn(f"{self.stopped_message()}; training goes on without it",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        elif self._error is not None:
            raise RecorderError(self.stopped_message(), self) from self._error

    def _torn(self, state: str) -> bool:
        """An interrupted or failed step can stop between two layers' forwards: their token counts then differ and
        the partial interval mixes an unfinished step in; it is left out (the recorded intervals stay whole)."""
        if state == "finished" or len(self.layers) < 2:
            return False
        return len({int(layer.routing_stats()["tokens"]) for _, layer in self.layers}) > 1

    def stopped_message(self, hint: bool = True) -> str:
        """One line for a writer failure: what failed, and (hint) how to continue once the disk has room."""
        line = f"recording to {self.path} stopped: {reason(self._error)}" if self._error is not None else ""
        if hint and isinstance(self._error, OSError):
            line += "; make room, then continue the run with Recorder(..., resume=True)"
        return line

    # ------------------------------------------------------------------ per step
    def step(self, loss: Tensor | float | None = None, token_ids: Tensor | None = None, **scalars: float | Tensor) -> None:
        """Call once per optimizer step. `loss` is averaged over the interval on the device (no sync);
        `token_ids` (the batch's input ids, shape (batch, seq)) label the sampled traces."""
        if self._failed() and self.on_error == "stop":
            self.close("failed")  # warns, once: the writer is gone afterwards and close() returns at once
            return
        if self._failed():
            raise RecorderError(self.stopped_message(), self) from self._error
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
    def _failed(self) -> bool:
        """Whether recording has stopped on a writer failure: at once in one process; under torch.distributed
        only once every rank knows (routescope/distributed.py), so that no rank leaves the others waiting."""
        return self._halted if distributed.is_active() else self._error is not None

    def _learn_agreed_failure(self) -> bool:
        """Read the failure flag reduced at the previous interval end (every rank reads the same value at the
        same interval end); True, and halted, when rank 0's writer had failed."""
        pending, self._failure_flag = self._failure_flag, None
        if pending is None:
            return False
        flag, ready = pending
        if ready is not None:
            ready.synchronize()  # recorded an interval ago: long done
        if int(flag.item()) == 0:
            return False
        self._halted = True
        if self._error is None:
            self._error = RuntimeError("the run file's writer (rank 0) failed; rank 0 reports why")
        return True

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
        if distributed.is_active() and self._learn_agreed_failure():
            self._reset_interval()  # every rank stops here alike: no more collectives
            return
        device = self.layers[0][1].routing_stats()["tokens"].device if self.layers else torch.device("cpu")
        if self._loss_sum is not None and not self.layers:
            device = self._loss_sum.device
        ints: list[Tensor] = []
        floats: list[Tensor] = []
        for _, layer in self.layers:
            stats = layer.routing_stats()
            int_names, float_names = packing_order(FAMILIES[layer.family])
            ints += [stats[name].reshape(-1) for name in int_names]
            floats += [stats[name].reshape(-1) for name in float_names]
        summed_ints, summed_floats = sum(t.numel() for t in ints), sum(t.numel() for t in floats)
        trace_count, has_ids = pack_traces([layer for _, layer in self.layers], ints, floats, device, self.sample_tokens,
                                            self._generator, self._token_ids, self.context)
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
        probe = probe_routing(self.model, self.probe, self.layers) if self.probe is not None else None
        flat_ints, flat_floats, failed = distributed.reduce_interval(flat_ints, flat_floats, summed_ints, summed_floats,
                                                                     len(tensor_scalars), self._error is not None)  # fmt: skip
        if failed is not None:
            ready = None
            if failed.device.type == "cuda":
                failed, ready = to_host(failed), torch.cuda.Event()
                ready.record()
            self._failure_flag = (failed, ready)
        if not distributed.is_writer():
            self._reset_interval()
            return
        host_ints, host_floats, ready = to_host(flat_ints), to_host(flat_floats), None
        host_probe = {k: to_host(v) for k, v in probe.items()} if probe is not None else None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        item = Interval(
            step=self.global_step, ints=host_ints, floats=host_floats, ready=ready, scalars=scalar_values,
            scalar_names=tuple(k for k, _ in tensor_scalars), trace_count=trace_count, has_token_ids=has_ids,
            id_tokens=self._id_tokens, elapsed_s=time.monotonic() - self._t0, probe=host_probe,
        )  # fmt: skip
        self._reset_interval()
        self._queue.put(item)

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

    _warned_nonfinite = False  # the writer thread warns about NaN/inf activations once per recorder

    def _placed(self) -> list[tuple[str, int, dict[str, int]]]:
        """Per recorded layer: its family, its index in the family's group and its dimension sizes."""
        return [(layer.family, self._family_index[li], self._sizes[li]) for li, (_, layer) in enumerate(self.layers)]

    def _write(self, item: Interval) -> None:
        if item.ready is not None:
            item.ready.synchronize()
        ints, floats = item.ints.numpy(), item.floats.numpy()
        groups, layer_tokens, i, f = unpack_groups(ints, floats, self._placed(), self._writer.group_sizes)
        traces = None
        if item.trace_count:
            traces, i, f = unpack_traces(item, ints, floats, i, f, self._writer, self._placed(), self.context)
        scalars = {"train_loss": np.nan, **{k: float(v) for k, v in item.scalars.items()}}
        scalars.update(zip(item.scalar_names, floats[f:].tolist()))
        if len(layer_tokens) and layer_tokens.min() != layer_tokens.max():
            warnings.warn(f"layers saw different token counts at step {item.step}: {layer_tokens.tolist()}", stacklevel=1)
        self._tokens_seen += int(layer_tokens.max()) if len(layer_tokens) else item.id_tokens
        for name, rows in groups.items():
            mine = np.array([layer.family == name for _, layer in self.layers], dtype=bool)
            rows["layer_tokens"] = layer_tokens[mine]
            rows["tokens"] = layer_tokens[mine].max(initial=0)
        scalars.update(tokens_seen=self._tokens_seen, elapsed_s=item.elapsed_s)
        if not self._warned_nonfinite:
            self._warned_nonfinite = warn_nonfinite(item.step, [name for name, _ in self.layers], self._placed(), groups)
        probe = {k: v.numpy() for k, v in item.probe.items()} if item.probe is not None else None
        self._writer.append_interval(item.step, None, scalars, traces, groups=groups, probe=probe)
        self._live = self._live and self._live.emit_safely(item.step, groups, scalars)

