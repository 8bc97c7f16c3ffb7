"""What the routing-stability probe costs: training steps of one preset recorded with and without a probe, in
turns of one interval each (side by side in one run), as the median time per step; and the probe call alone
(median of 20) over one interval's steps, a figure free of the steps' noise.

    python benchmarks/probe_cost.py                                   # the CPU demo preset, 256 probe tokens
    python benchmarks/probe_cost.py --config shakespeare-tree-gpu --device cuda --intervals 12
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from routescope.record.probe import probe_routing
from routescope.record.recorder import Recorder
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT
from routescope.trainers.presets import get_preset
from routescope.trainers.train import autocast, probe_batch, resolve_device, resolve_precision


def arm(cfg, device: torch.device, precision: str, corpus: Corpus, path: Path, probe: torch.Tensor | None):  # noqa: ANN001, ANN201
    """A fresh model with its recorder, and a function running one interval of training steps (seconds per step)."""
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True if device.type == "cuda" else None)
    generator = torch.Generator().manual_seed(0)
    recorder = Recorder(model, path, every=cfg.record_every, sample_tokens=0, overwrite=True, probe=probe)
    recorder.start()

    def interval() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(cfg.record_every):
            x, y = corpus.batch("train", cfg.batch_size, cfg.model.seq_len, generator, device)
            with autocast(device, precision):
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recorder.step(loss=loss)  # the interval's last step runs the probe
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / cfg.record_every

    return recorder, interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shakespeare-tree")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--probe-tokens", type=int, default=256)
    parser.add_argument("--intervals", type=int, default=8, help="timed intervals per arm (after one warm-up)")
    args = parser.parse_args()
    cfg = get_preset(args.config)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    corpus = Corpus.shakespeare()
    probe = probe_batch(corpus, args.probe_tokens, cfg.model.seq_len, device)
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"no probe": arm(cfg, device, precision, corpus, Path(tmp) / "a.h5", None),
                "probe": arm(cfg, device, precision, corpus, Path(tmp) / "b.h5", probe)}  # fmt: skip
        times = {name: [] for name in arms}
        for i in range(args.intervals + 1):
            for name, (_, interval) in arms.items():
                seconds = interval()
                if i:  # the first interval of each arm warms up
                    times[name].append(seconds)
        recorder = arms["probe"][0]
        calls = []
        for _ in range(20):  # the probe alone: what it adds to each interval, free of the steps' noise
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            probe_routing(recorder.model, probe, recorder.layers)
            if device.type == "cuda":
                torch.cuda.synchronize()
            calls.append(time.perf_counter() - t0)
        probe_ms = statistics.median(calls) * 1e3
        for recorder, _ in arms.values():
            recorder.close()
    base, with_probe = (statistics.median(times[n]) * 1e3 for n in ("no probe", "probe"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    table = Table(title=f"probe cost: {args.config}, {args.probe_tokens} probe tokens, interval {cfg.record_every} steps, "
                        f"{name}, torch {torch.__version__}")  # fmt: skip
    for column in ("ms/step, no probe", "ms/step, probe", "cost (step times)", "probe call ms", "cost (probe / interval)"):
        table.add_column(column, justify="right")
    table.add_row(f"{base:.1f}", f"{with_probe:.1f}", f"{100 * (with_probe / base - 1):+.2f}%", f"{probe_ms:.2f}",
                  f"{100 * probe_ms / (cfg.record_every * base):.2f}%")  # fmt: skip
    Console(width=140).print(table)
    print("interval medians over", args.intervals, "intervals per arm, taken in turns")


if __name__ == "__main__":
    main()
