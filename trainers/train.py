"""The training loop: a preset, the embedded corpus, AdamW, and (optionally) a routescope Recorder.

    python -m routescope.trainers.train --help     # or: routescope record --config shakespeare-tree
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from routescope.layers import aux_loss
from routescope.recorder import Recorder
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT
from routescope.trainers.presets import TrainConfig

LOG_EVERY = 10  # steps between progress-bar loss updates (each one is a host sync)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    initial_val_loss: float
    final_val_loss: float
    final_train_loss: float
    path: Path | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when there is one; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but this machine has no CUDA device; use --device cpu")
    return torch.device(device)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr / 10 at the last step."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(1, cfg.warmup)
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, cfg: TrainConfig, device: torch.device) -> float:
    """Mean validation loss over cfg.eval_batches fixed batches (same batches every call)."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = corpus.batch("val", cfg.batch_size, cfg.model.seq_len, generator)
        losses.append(model(x.to(device), y.to(device))[1])
    model.train()
    return torch.stack(losses).mean().item()


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train the preset's model on the corpus; record routing to `out` when given."""
    torch.manual_seed(cfg.seed)
    dev = resolve_device(device)
    corpus = Corpus.shakespeare()
    model = GPT(cfg.model).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.model.seq_len
    initial_val = evaluate(model, corpus, cfg, dev)
    val = initial_val
    recorder = (
        Recorder(model, out, every=cfg.record_every, sample_tokens=cfg.sample_tokens,
                 config={"preset": cfg.to_dict(), "device": str(dev)}, overwrite=overwrite)  # fmt: skip
        if out is not None
        else None
    )
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not show_progress,
    )  # fmt: skip
    train_loss = float("nan")
    start = time.perf_counter()
    with recorder if recorder is not None else contextlib.nullcontext() as rec, progress:
        task = progress.add_task("train", total=cfg.steps, info=f"val {initial_val:.3f}")
        for step in range(1, cfg.steps + 1):
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = corpus.batch("train", cfg.batch_size, cfg.model.seq_len, generator)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            # The routed layers' own terms (L1 penalty, MoE balance loss); the recorded loss is the task's alone.
            (loss + aux_loss(model)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = evaluate(model, corpus, cfg, dev)
                if rec is not None:
                    rec.log(val_loss=val)
            if rec is not None:
                rec.step(loss=loss, token_ids=x, lr=lr)
            if step % LOG_EVERY == 0 or step == cfg.steps:
                train_loss = loss.item()
                rate = step * tokens_per_step / (time.perf_counter() - start)
                info = f"loss {train_loss:.3f} · val {val:.3f} · {rate / 1000:.1f}k tok/s"
                progress.update(task, completed=step, info=info)
            else:
                progress.update(task, completed=step)
    seconds = time.perf_counter() - start
    return TrainResult(cfg.steps, cfg.steps * tokens_per_step, seconds, initial_val, val, train_loss,
                       Path(out) if out is not None else None)  # fmt: skip
