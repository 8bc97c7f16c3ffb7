"""The training loop: a preset, the embedded corpus, AdamW, and (optionally) a routescope Recorder.

    python -m routescope.trainers.train --help     # or: routescope record --config shakespeare-tree
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from routescope.layers import TopKMoE, aux_loss
from routescope.record.recorder import Recorder
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT, GPTConfig
from routescope.trainers.presets import TrainConfig
from routescope.trainers.user_data import load_corpus

LOG_EVERY = 10  # steps between progress-bar loss updates (each one is a host sync)
CHECKPOINT_MINUTES = 10.0  # wall time between training checkpoints (and one at the end)
PROBE_TOKENS = 256  # validation tokens routed at each interval end for routing stability (the `probe` group)
PROBE_SEED = 1234  # the probe's sequences: the same in every run of a corpus
PRECISIONS = ("auto", "bf16", "fp32")
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) for the MFU line, by a substring of the device name
BF16_PEAK_FLOPS = (("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100", 989.4e12), ("A100", 312e12), ("L40S", 362.1e12))


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    initial_val_loss: float
    final_val_loss: float
    final_train_loss: float
    path: Path | None
    precision: str = "fp32"
    flops_per_token: float = float("nan")  # model FLOPs of one token's forward and backward (6 × active weights + attention)
    peak_flops: float | None = None  # the device's dense peak at this precision, where known
    epochs: float = float("nan")  # training tokens seen / tokens in the training split

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None where the peak is unknown)."""
        return self.tokens_per_second * self.flops_per_token / self.peak_flops if self.peak_flops else None


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when there is one; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but this machine has no CUDA device; use --device cpu")
    return torch.device(device)


def resolve_precision(precision: str, dev: torch.device) -> str:
    """'auto' is bf16 autocast on CUDA and fp32 on the CPU; bf16 on the CPU is refused (no fast path there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if dev.type == "cuda" else "fp32"
    if precision == "bf16" and dev.type != "cuda":
        raise ValueError("--precision bf16 needs a CUDA device; on the CPU training runs in fp32 (--precision fp32)")
    return precision


def autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision context: bf16 autocast (weights and optimizer stay fp32) or nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def peak_flops(dev: torch.device, precision: str) -> float | None:
    """The device's dense bf16 peak FLOP/s where known (BF16_PEAK_FLOPS); None on the CPU or in fp32."""
    if dev.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((flops for key, flops in BF16_PEAK_FLOPS if key in name), None)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr / 10 at the last step."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(1, cfg.warmup)
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def checkpoint_path(out: str | Path) -> Path:
    """The training checkpoint written beside a run file: RUN.ckpt.pt for RUN.h5."""
    return Path(out).with_suffix(".ckpt.pt")


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its to_dict() form (the `preset` of a run file's `config` attribute)."""
    return TrainConfig(**{**d, "model": GPTConfig(**d["model"])})


def save_checkpoint(path: Path, model: GPT, optimizer: torch.optim.Optimizer, step: int,
                    generator: torch.Generator, val: float, initial_val: float, fsync: bool = False) -> None:  # fmt: skip
    """Write model, optimizer, step and RNG states atomically (a temp file, then os.replace); with fsync,
    synced to the disk (file, then folder) so that the checkpoint survives a power loss as well."""
    state = {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "data_rng": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "val_loss": val, "initial_val_loss": initial_val,
    }  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        if fsync:
            _sync(tmp)
        os.replace(tmp, path)
        if fsync:
            _sync(path.parent)
    except (OSError, RuntimeError) as err:  # a full disk reaches torch.save as "RuntimeError: ... iostream error"
        free = shutil.disk_usage(path.parent).free
        raise OSError(errno.ENOSPC if free < 2**20 else errno.EIO, f"could not write the training checkpoint {path} "
                      f"({str(err).splitlines()[0]}; {free / 2**20:.1f} MiB free on its disk); the previous one is "
                      "kept") from err  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)  # only left when interrupted mid-save


def _sync(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename in it is on the disk too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, cfg: TrainConfig, device: torch.device, precision: str = "fp32") -> float:
    """Mean validation loss over cfg.eval_batches fixed batches (same batches every call)."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = corpus.batch("val", cfg.batch_size, cfg.model.seq_len, generator, device)
        with autocast(device, precision):
            losses.append(model(x, y)[1].float())
    model.train()
    return torch.stack(losses).mean().item()


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
    checkpoint: bool = False,
    resume: bool = False,
    reserve_bytes: int | None = None,
    fsync: bool = False,
    precision: str = "auto",
    compile: bool = False,
    checkpoint_minutes: float = CHECKPOINT_MINUTES,
    probe_tokens: int = PROBE_TOKENS,
) -> TrainResult:
    """Train the preset's model on the corpus; record routing to `out` when given.

    checkpoint: save model, optimizer, step and RNG states to RUN.ckpt.pt at the first interval end after
    every `checkpoint_minutes` of wall time (0: at every interval end) and at the last step.
    resume: continue from that checkpoint, appending to `out` (README, "How resume works").
    reserve_bytes: the Recorder's free-space reserve (None: its default; 0: no check). fsync: the Recorder's.
    precision: "auto" (bf16 autocast on CUDA, fp32 on the CPU), "bf16" or "fp32". compile: torch.compile the
    training forward (inductor). On CUDA the optimizer is the fused AdamW and batches are gathered on the device.
    probe_tokens: at least this many validation tokens (whole sequences, drawn once) are routed at each interval
    end into the file's `probe` group, for routing stability (0: none; a resumed run keeps the probe it had).
    """
    if checkpoint_minutes < 0:
        raise ValueError(f"--checkpoint-minutes must be 0 or more, got {checkpoint_minutes}")
    torch.manual_seed(cfg.seed)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    corpus = Corpus.shakespeare() if cfg.data is None else load_corpus(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
    model = GPT(cfg.model).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                  fused=True if dev.type == "cuda" else None)  # fmt: skip
    forward = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.model.seq_len
    ckpt = checkpoint_path(out) if out is not None else None
    first, state = 1, None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise ValueError(f"cannot resume: no training checkpoint {ckpt} (runs recorded before resume support, "
                             "or with checkpoints off, cannot continue training)")  # fmt: skip
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights and optimizer state to dev.
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["step"] >= cfg.steps:
            raise ValueError(f"cannot resume: the checkpoint is at step {state['step']}, not before the end "
                             f"({cfg.steps}); pass --steps N with N > {state['step']}")  # fmt: skip
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        first = state["step"] + 1
    balanced = [m for m in model.modules() if isinstance(m, TopKMoE) and m.spec.balance_coef > 0]
    if resume and out is not None:
        probe_tokens = recorded_probe_tokens(out)  # the file decides: a resume keeps the group as it was
    probe = probe_batch(corpus, probe_tokens, cfg.model.seq_len, dev) if probe_tokens > 0 and cfg.model.mlp in ("tree", "moe") else None
    recorder = (
        Recorder(model, out, every=cfg.record_every, sample_tokens=cfg.sample_tokens,
                 scalars=("train_loss", "val_loss", "lr", *(("balance_loss",) if balanced else ())),
                 config={"preset": cfg.to_dict(), "device": str(dev), "precision": precision}, overwrite=overwrite,
                 resume=resume, resume_step=first - 1 if resume else None,
                 config_may_differ=("preset.steps", "device", "precision"),
                 reserve_bytes=reserve_bytes, fsync=fsync, probe=probe)  # fmt: skip
        if out is not None
        else None
    )
    if recorder is not None:
        recorder.start()  # takes the writer lock before any work: a second writer fails at once
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not show_progress,
    )  # fmt: skip
    train_loss = float("nan")
    start = time.perf_counter()
    with _started(recorder) as rec, progress:
        if state is None:
            initial_val = evaluate(model, corpus, cfg, dev, precision)
            val = initial_val
        else:
            initial_val, val = state["initial_val_loss"], state["val_loss"]
        task = progress.add_task("train", total=cfg.steps, info=f"val {initial_val:.3f}", completed=first - 1)
        saved_at = time.monotonic()
        for step in range(first, cfg.steps + 1):
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = corpus.batch("train", cfg.batch_size, cfg.model.seq_len, generator, dev)
            with autocast(dev, precision):
                _, loss = forward(x, y)
            optimizer.zero_grad(set_to_none=True)
            # The routed layers' own terms (L1 penalty, MoE balance loss); the recorded loss is the task's alone.
            (loss + aux_loss(model)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = evaluate(model, corpus, cfg, dev, precision)
                if rec is not None:
                    rec.log(val_loss=val)
            if rec is not None:  # balance_loss: what the MoE layers add, for report's balance-loss audit
                balance = {"balance_loss": sum(m.aux_loss() for m in balanced).detach()} if balanced else {}
                rec.step(loss=loss, token_ids=x, lr=lr, **balance)
            due = step % cfg.record_every == 0 and time.monotonic() - saved_at >= checkpoint_minutes * 60
            if checkpoint and ckpt is not None and (due or step == cfg.steps):  # at interval ends: resume needs them
                save_checkpoint(ckpt, model, optimizer, step, generator, val, initial_val, fsync=fsync)
                saved_at = time.monotonic()
            if step % LOG_EVERY == 0 or step == cfg.steps:
                train_loss = loss.item()
                rate = (step - first + 1) * tokens_per_step / (time.perf_counter() - start)
                info = f"loss {train_loss:.3f} · val {val:.3f} · {rate / 1000:.1f}k tok/s"
                progress.update(task, completed=step, info=info)
            else:
                progress.update(task, completed=step)
    seconds = time.perf_counter() - start
    trained = cfg.steps - first + 1
    return TrainResult(trained, trained * tokens_per_step, seconds, initial_val, val, train_loss,
                       Path(out) if out is not None else None, precision, model.flops_per_token(),
                       peak_flops(dev, precision), trained * tokens_per_step / len(corpus.train))  # fmt: skip


def probe_batch(corpus: Corpus, tokens: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """The routing-stability probe: ceil(tokens / seq_len) validation sequences, the same in every run (fixed seed)."""
    x, _ = corpus.batch("val", -(-tokens // seq_len), seq_len, torch.Generator().manual_seed(PROBE_SEED), device)
    return x


def recorded_probe_tokens(path: str | Path) -> int:
    """The probe size a run file was recorded with (0: none, or no readable file: the resume reports that)."""
    from routescope.store import RunFile, RunFileError

    try:
        with RunFile.open(path) as run:
            return int(run.attrs.get("probe_tokens", 0)) if "probe" in run else 0
    except (RunFileError, OSError):
        return 0


@contextlib.contextmanager
def _started(recorder: Recorder | None):  # type: ignore[no-untyped-def]
    """A started recorder as a context (closed as interrupted/failed on an exception), or None."""
    if recorder is None:
        yield None
        return
    try:
        yield recorder
    except BaseException as err:
        recorder.close("interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    recorder.close("finished")
