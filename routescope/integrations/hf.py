"""A Hugging Face `transformers.Trainer` callback that records routing with a routescope Recorder.

    from routescope.integrations.hf import RoutescopeCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RoutescopeCallback("run.h5", every=10)])
    trainer.train()

One row per `every` optimizer steps: `on_step_end` fires once per optimizer step, after all of its
gradient-accumulation micro-batches, and the layers' counters hold every micro-batch's tokens.
"""

from __future__ import annotations

import atexit
import statistics
import sys
import weakref
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from routescope.integrations.common import missing, token_ids
from routescope.record.distributed import ignore_accumulators
from routescope.record.recorder import Recorder

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise missing("transformers", "hf", err) from err

_OPEN: weakref.WeakSet[RoutescopeCallback] = weakref.WeakSet()  # callbacks with a run file open
_previous_excepthook = None


class RoutescopeCallback(TrainerCallback):
    """Starts a Recorder on train begin, closes it on train end; the trainer's loss, learning rate and
    eval loss (from `on_log`) become the run's `train_loss`, `lr` and `val_loss`.

    every: optimizer steps per row. Other keywords go to `routescope.Recorder` (sample_tokens, modules,
    overwrite, ...). Every rank runs it; under torch.distributed rank 0 writes (see routescope.distributed).
    If train() raises, the file is closed as "failed" (KeyboardInterrupt: "interrupted") when the
    exception ends the program, at the next train(), or at interpreter exit.
    """

    def __init__(self, path: str | Path, every: int = 10, **recorder_options: Any) -> None:
        self.path = Path(path)
        self.every = every
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._pending = 0  # optimizer steps ended but not yet handed to the recorder (logs come after)
        self._losses: list[float] = []  # logged losses within the current row
        self._in_row = 0  # steps handed to the recorder within the current row
        self._lr: float | None = None
        self._ids: Tensor | None = None
        self._hook: Any = None

    # ------------------------------------------------------------------ trainer events
    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Before the Trainer wraps the model in DDP: keep the accumulators out of its buffer broadcast."""
        if model is not None:
            ignore_accumulators(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.recorder is not None:  # the previous train() raised before its on_train_end
            self.close("failed")
        if model is None:
            raise ValueError("RoutescopeCallback needs the Trainer's model")
        config = {
            "trainer": "transformers", "model": type(model).__name__, "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_steps": state.max_steps,
        }  # fmt: skip
        options = {"config": config, **self.recorder_options}
        self.recorder = Recorder(model, self.path, every=self.every, **options)
        self.recorder.global_step = state.global_step  # a resumed run keeps the trainer's step numbers
        self.recorder.start()
        self._pending, self._losses, self._in_row, self._lr = 0, [], 0, None
        self._hook = model.register_forward_pre_hook(self._keep_ids, with_kwargs=True)
        _OPEN.add(self)
        _install_exit_hooks()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Once per optimizer step. Handed to the recorder at the next step's begin (or train end), so
        the logs of this step (`on_log` runs after `on_step_end`) land in its row."""
        if self.recorder is not None:
            self._pending += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.recorder is None or not logs:
            return
        if "loss" in logs:
            self._losses.append(float(logs["loss"]))
        if "learning_rate" in logs:
            self._lr = float(logs["learning_rate"])
        if "eval_loss" in logs and "val_loss" in self.recorder.scalar_names:
            self.recorder.log(val_loss=float(logs["eval_loss"]))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close("finished")

    # ------------------------------------------------------------------ internals
    def close(self, state: str = "finished") -> None:
        """Hand over the finished steps and close the file with `state` (finished, interrupted, failed)."""
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        _OPEN.discard(self)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        try:
            self._flush(recorder)
        finally:
            recorder.close(state)

    def _flush(self, recorder: Recorder | None = None) -> None:
        recorder = recorder or self.recorder
        if recorder is None:
            return
        for _ in range(self._pending):
            scalars = {}
            if self._losses and "train_loss" in recorder.scalar_names:
                scalars["train_loss"] = statistics.fmean(self._losses)
            if self._lr is not None and "lr" in recorder.scalar_names:
                scalars["lr"] = self._lr
            recorder.step(token_ids=self._ids, **scalars)
            self._in_row += 1
            if self._in_row == recorder.every:  # the row closed: start the next one's loss mean afresh
                self._losses, self._in_row = [], 0
        self._pending = 0

    def _keep_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: keep a training micro-batch's input ids (a reference, no copy) to label traces."""
        if module.training:  # eval batches run between a step's end and its hand-over; they are not traced
            self._ids = token_ids(kwargs if "input_ids" in kwargs else args)


def _close_open(state: str) -> None:
    for callback in list(_OPEN):
        try:
            callback.close(state)
        except Exception as err:  # noqa: BLE001 - closing at exit must not mask the original error
            print(f"routescope: could not close {callback.path}: {err}", file=sys.stderr)


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """An exception that ends the program closes open run files as failed (Ctrl-C: interrupted)."""
    _close_open("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")
    (_previous_excepthook or sys.__excepthook__)(kind, value, tb)


def _install_exit_hooks() -> None:
    """The Trainer has no exception event: chain sys.excepthook and an atexit handler, once."""
    global _previous_excepthook
    if _previous_excepthook is None:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook
        atexit.register(_close_open, "interrupted")
