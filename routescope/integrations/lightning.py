"""A PyTorch Lightning callback that records routing with a routescope Recorder.

    from routescope.integrations.lightning import RoutescopeCallback
    trainer = lightning.Trainer(max_steps=1000, callbacks=[RoutescopeCallback("run.h5", every=10)])
    trainer.fit(module, data)

Steps are optimizer steps (`trainer.global_step`): `on_train_batch_end` runs once per micro-batch,
and the recorder is stepped only when the global step has moved, so with accumulate_grad_batches=k
one step's row holds all k micro-batches' tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from routescope.integrations.common import missing, token_ids
from routescope.record.distributed import ignore_accumulators
from routescope.record.recorder import Recorder

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise missing("lightning", "lightning", err) from err


class RoutescopeCallback(pl.Callback):
    """Starts a Recorder when training starts and closes it when training ends (on an exception: as
    "failed", or "interrupted" for Ctrl-C). The mean training loss of each step's micro-batches, the
    first optimizer's learning rate and a logged `val_loss` go into the run's scalars.

    every: optimizer steps per row. Other keywords go to `routescope.Recorder` (sample_tokens, modules,
    overwrite, ...). Every rank runs it; under torch.distributed rank 0 writes (see routescope.distributed).
    """

    def __init__(self, path: str | Path, every: int = 10, **recorder_options: Any) -> None:
        self.path = Path(path)
        self.every = every
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._losses: list[Tensor] = []  # this step's micro-batch losses (on the device, no sync)
        self._last_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Runs before the strategy wraps the module in DDP: keep the accumulators out of its broadcast."""
        ignore_accumulators(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = {
            "trainer": "lightning", "model": type(pl_module).__name__, "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }  # fmt: skip
        options = {"config": config, **self.recorder_options}
        if options.get("log_to") == "trainer":  # the Trainer's own logger(s): TensorBoard, W&B, CSV, ...
            if not trainer.loggers:
                raise ValueError("log_to='trainer' needs a Lightning logger; give Trainer(logger=...) or another log_to")
            options["log_to"] = lambda values, step: [lg.log_metrics(values, step) for lg in trainer.loggers] and None
        self.recorder = Recorder(pl_module, self.path, every=self.every, **options)
        self.recorder.global_step = self._last_step = trainer.global_step  # resumed runs keep their steps
        self._losses = []
        self.recorder.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # automatic optimization hands back loss / accumulate_grad_batches; undo it for the mean
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._losses.append(loss.detach().float().reshape(()) * scale)
        steps = trainer.global_step - self._last_step  # optimizer steps taken since the last call
        if steps <= 0:
            return  # an accumulating micro-batch: its tokens stay in the layers' counters
        self._last_step = trainer.global_step
        mean_loss = torch.stack(self._losses).mean() if self._losses else None
        self._losses = []
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        scalars = {"lr": float(lr)} if lr is not None and "lr" in self.recorder.scalar_names else {}
        for _ in range(steps):  # more than one only with several optimizers in manual optimization
            self.recorder.step(loss=mean_loss, token_ids=token_ids(batch), **scalars)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if self.recorder is not None and value is not None and "val_loss" in self.recorder.scalar_names:
            self.recorder.log(val_loss=float(value))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close("finished")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")

    def close(self, state: str = "finished") -> None:
        """Close the run file with `state` (finished, interrupted, failed); the partial last row is kept."""
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close(state)
