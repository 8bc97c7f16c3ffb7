"""Training-step time of the project's GPT, tree vs its dense twin, side by side in one run (CUDA).

    python benchmarks/train_step.py                       # both configs, every mode
    python benchmarks/train_step.py --config gpu --steps 10
    python benchmarks/train_step.py --config gpu --profile "bf16 eager"   # where a tree step's time goes

For each configuration and arm (tree / dense of the same width) and each mode (fp32 eager; bf16 autocast
eager; bf16 + torch.compile; bf16 + compile + a Recorder writing an interval every 25 steps, tree only):
median ms per step over `--steps` timed steps after `--warmup` (CUDA events around forward, backward, clip
and a fused AdamW step; random byte batches made on the device), tokens/s, MFU against the device's dense
bf16 peak (routescope.trainers.train.BF16_PEAK_FLOPS), and peak memory. Prints a table and writes JSON.
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
MODES = ("fp32 eager", "bf16 eager", "bf16 compiled", "bf16 compiled + record/25")


def training_step(cfg: GPTConfig, batch: int, mode: str) -> tuple[GPT, str, Callable[[], torch.Tensor]]:
    """A fresh model on the GPU and one training step of it in `mode` (forward under the mode's precision,
    backward, clip, fused AdamW) on a fixed random batch; returns (model, precision, step -> loss)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT(cfg).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    precision = "fp32" if mode.startswith("fp32") else "bf16"
    forward = torch.compile(model) if "compiled" in mode else model
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


def step_times(cfg: GPTConfig, batch: int, mode: str, steps: int, warmup: int, out: Path) -> dict[str, float]:
    """Median ms per training step of one model in one mode, and its peak memory (GiB)."""
    model, precision, step = training_step(cfg, batch, mode)
    dev = torch.device("cuda")
    recorder = Recorder(model, out, every=25, sample_tokens=0, overwrite=True) if "record" in mode else None
    if recorder is not None:
        recorder.start()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        if recorder is not None:
            recorder.step(loss=loss)
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    if recorder is not None:
        recorder.close("finished")
    ms = statistics.median(s.elapsed_time(e) for s, e in times)
    peak = peak_flops(dev, precision) if precision == "bf16" else None
    tokens = batch * cfg.seq_len
    return {"ms": ms, "tokens_per_s": tokens / ms * 1e3, "mfu": (tokens / ms * 1e3 * model.flops_per_token() / peak) if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


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
            arms = {"tree": tree, "dense": replace(tree, mlp="dense", dense_width=width)}
            for mode in args.modes:
                result = {}
                for arm, cfg in arms.items():
                    if "record" in mode and arm == "dense":
                        continue
                    t0 = time.perf_counter()
                    result[arm] = step_times(cfg, batch, mode, args.steps, args.warmup, Path(tmp) / f"{name}-{arm}.h5")
                    result[arm]["wall_s"] = time.perf_counter() - t0
                    torch.cuda.empty_cache()
                rows.append({"config": name, "mode": mode, **result})
                Console().print(f"{name} {mode}: " + ", ".join(f"{a} {r['ms']:.1f} ms" for a, r in result.items()))
    table = Table(title=f"training step, {torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.steps} "
                        f"steps after {args.warmup}")  # fmt: skip
    for column in ("config", "mode", "tree ms", "dense ms", "dense / tree", "tree MFU", "dense MFU", "tree GiB", "dense GiB"):
        table.add_column(column, justify="right")
    for row in rows:
        tree, dense = row.get("tree"), row.get("dense")

        def pct(r: dict | None) -> str:
            return "–" if not r or r["mfu"] is None else f"{100 * r['mfu']:.1f}%"

        table.add_row(row["config"], row["mode"], f"{tree['ms']:.1f}" if tree else "–", f"{dense['ms']:.1f}" if dense else "–",
                      f"{dense['ms'] / tree['ms']:.2f}" if tree and dense else "–", pct(tree), pct(dense),
                      f"{tree['peak_gib']:.1f}" if tree else "–", f"{dense['peak_gib']:.1f}" if dense else "–")  # fmt: skip
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
