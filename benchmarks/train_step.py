"""Training-step time of the project's GPT, tree vs its dense twin, side by side in one run (CUDA).

    python benchmarks/train_step.py                       # both configs, every mode
    python benchmarks/train_step.py --config gpu --steps 10
    python benchmarks/train_step.py --config gpu --profile "bf16 eager"   # where a tree step's time goes

For each configuration and arm (tree / dense of the same width) and each mode (fp32 eager; bf16 autocast
eager; bf16 + torch.compile(fullgraph); the same with CUDA graphs (mode="reduce-overhead"); and, tree only,
the compiled modes with a Recorder writing an interval every 25 steps): median ms per step over `--steps`
timed steps after `--warmup` (CUDA events around forward, backward, clip and a fused AdamW step; random byte
batches made on the device), tokens/s, MFU against the device's dense bf16 peak
(routescope.trainers.train.BF16_PEAK_FLOPS), and peak memory (parameters, optimizer state and the step's
transient peak). The arms of a mode are timed in turns of 3 steps in one process, so the ratio between them
is a side-by-side one. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from routescope.record.recorder import Recorder
from routescope.trainers.model import GPT, GPTConfig
from routescope.trainers.train import autocast, peak_flops

CONFIGS = {  # name: (tree model, dense width, batch size)
    "gpu": (GPTConfig(mlp="tree", n_layer=8, n_head=8, d_model=512, seq_len=256, depth=8, trees=4), 2048, 64),
    "opt125m": (GPTConfig(mlp="tree", n_layer=12, n_head=12, d_model=768, seq_len=1024, depth=7, trees=12), 3072, 16),
}
MODES = ("fp32 eager", "bf16 eager", "bf16 compiled", "bf16 compiled + record/25", "bf16 cudagraphs",
         "bf16 cudagraphs + record/25")  # fmt: skip


def training_step(cfg: GPTConfig, batch: int, mode: str) -> tuple[GPT, str, Callable[[], torch.Tensor]]:
    """A fresh model on the GPU and one training step of it in `mode` (forward under the mode's precision,
    backward, clip, fused AdamW) on a fixed random batch; returns (model, precision, step -> loss)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT(cfg).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    precision = "fp32" if mode.startswith("fp32") else "bf16"
    if "cudagraphs" in mode:  # the whole forward as one graph, replayed as CUDA graphs (backward too)
        forward = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    elif "compiled" in mode:
        forward = torch.compile(model, fullgraph=True)
    else:
        forward = model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=dev)

    def step() -> torch.Tensor:
        with autocast(dev, precision):
            _, loss = forward(x[:, :-1], x[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    return model, precision, step


class Arm:
    """One model in one mode, ready to step: its timings (CUDA events), step peak memory and recorder."""

    def __init__(self, cfg: GPTConfig, batch: int, mode: str, out: Path) -> None:
        before = torch.cuda.memory_allocated()
        self.model, self.precision, self.step = training_step(cfg, batch, mode)
        self.cfg, self.batch, self.mode = cfg, batch, mode
        self.recorder = Recorder(self.model, out, every=25, sample_tokens=0, overwrite=True) if "record" in mode else None
        if self.recorder is not None:
            self.recorder.start()
        self.times: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.resident = torch.cuda.memory_allocated() - before  # parameters and optimizer state
        self.transient = 0

    def run(self, steps: int, timed: bool = True) -> None:
        """`steps` training steps; timed ones record CUDA events and the peak memory above what was allocated."""
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = self.step()
            if self.recorder is not None:
                self.recorder.step(loss=loss)
            end.record()
            if timed:
                self.times.append((start, end))
        self.transient = max(self.transient, torch.cuda.max_memory_allocated() - base)

    def result(self) -> dict[str, float]:
        """Median ms per step, tokens/s, MFU (bf16 only) and peak GiB (resident + the step's transient)."""
        torch.cuda.synchronize()
        if self.recorder is not None:
            self.recorder.close("finished")
        ms = statistics.median(s.elapsed_time(e) for s, e in self.times)
        peak = peak_flops(torch.device("cuda"), self.precision) if self.precision == "bf16" else None
        tokens_s = self.batch * self.cfg.seq_len / ms * 1e3
        return {"ms": ms, "tokens_per_s": tokens_s, "mfu": tokens_s * self.model.flops_per_token() / peak if peak else None,
                "peak_gib": (self.resident + self.transient) / 2**30}  # fmt: skip


def interleaved(arms: dict[str, Arm], steps: int, warmup: int, block: int = 3) -> dict[str, dict[str, float]]:
    """Warm every arm, then time them in turns of `block` steps until each has `steps`: slow drifts of the
    device (clocks, temperature, other tenants) fall on every arm alike, so their ratios hold."""
    for arm in arms.values():
        arm.run(warmup, timed=False)
    while any(len(arm.times) < steps for arm in arms.values()):
        for arm in arms.values():
            arm.run(min(block, steps - len(arm.times)))
    return {name: arm.result() for name, arm in arms.items()}


def profile_step(cfg: GPTConfig, batch: int, mode: str, rows: int = 14) -> None:
    """torch.profiler over 5 steps of one mode: device time per kernel family, and how much of the step's wall
    time the GPU is busy (the rest is the host launching, or waiting)."""
    from torch.profiler import ProfilerActivity, profile

    _, _, step = training_step(cfg, batch, mode)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5 * 1e3
    events = prof.key_averages()
    device_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 5 / 1e3
    print(f"{cfg.mlp} {mode}: wall {wall:.1f} ms/step, GPU busy {device_ms:.1f} ms/step ({100 * device_ms / wall:.0f}%)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--profile", choices=MODES[:3], help="profile this mode (tree and dense) instead of timing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_step.py needs a CUDA device")
    names = list(CONFIGS) if args.config == "all" else [args.config]
    if args.profile:
        for name in names:
            tree, width, batch = CONFIGS[name]
            for cfg in (tree, replace(tree, mlp="dense", dense_width=width)):
                profile_step(cfg, batch, args.profile)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            tree, width, batch = CONFIGS[name]
            dense = replace(tree, mlp="dense", dense_width=width)
            for mode in args.modes:
                t0 = time.perf_counter()
                arms = {"tree": Arm(tree, batch, mode, Path(tmp) / f"{name}-tree.h5")}
                if "record" in mode:  # recording is a tree feature: its row compares with the tree not recording
                    arms["unrecorded"] = Arm(tree, batch, mode.split(" + ")[0], Path(tmp) / f"{name}-base.h5")
                else:
                    arms["dense"] = Arm(dense, batch, mode, Path(tmp) / f"{name}-dense.h5")
                result = interleaved(arms, args.steps, args.warmup)
                rows.append({"config": name, "mode": mode, **result, "wall_s": time.perf_counter() - t0})
                Console().print(f"{name} {mode}: " + ", ".join(f"{a} {r['ms']:.2f} ms" for a, r in result.items()))
                del arms
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    table = Table(title=f"training step, {torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.steps} "
                        f"steps after {args.warmup}")  # fmt: skip
    columns = ("config", "mode", "tree ms", "dense ms", "dense / tree", "recording cost", "tree MFU", "dense MFU",
               "tree GiB", "dense GiB")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        tree, dense, base = row.get("tree"), row.get("dense"), row.get("unrecorded")

        def pct(r: dict | None) -> str:
            return "–" if not r or r["mfu"] is None else f"{100 * r['mfu']:.1f}%"

        table.add_row(row["config"], row["mode"], f"{tree['ms']:.2f}", f"{dense['ms']:.2f}" if dense else "–",
                      f"{dense['ms'] / tree['ms']:.2f}" if dense else "–",
                      f"{100 * (tree['ms'] / base['ms'] - 1):+.1f}%" if base else "–", pct(tree), pct(dense),
                      f"{tree['peak_gib']:.1f}", f"{dense['peak_gib']:.1f}" if dense else "–")  # fmt: skip
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
