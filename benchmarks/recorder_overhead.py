"""What recording costs: training step time with and without the recorder, side by side, as ratios.

    python benchmarks/recorder_overhead.py                   # default preset, CPU or GPU
    python benchmarks/recorder_overhead.py --config shakespeare-tree-gpu --steps 100

Modes run interleaved in rounds (off, every=10, every=1, off, ...) on identical models, so drifts
of the machine hit every mode alike; the table reports the median step time of each mode.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from routescope import Recorder
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT
from routescope.trainers.presets import get_preset
from routescope.trainers.train import resolve_device

MODES = {  # name: Recorder keyword arguments (None: no recorder)
    "off": None,
    "accumulate only (never written)": {"every": 10**9, "sample_tokens": 0},
    "every=10, 64 traces": {"every": 10, "sample_tokens": 64},
    "every=1, 64 traces": {"every": 1, "sample_tokens": 64},
}


def time_steps(model: GPT, corpus: Corpus, cfg, device: torch.device, steps: int, recorder_kwargs, out: Path) -> list[float]:
    """Seconds per optimizer step for `steps` steps (after 3 warm-up steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    times: list[float] = []
    rec = Recorder(model, out, overwrite=True, **recorder_kwargs) if recorder_kwargs is not None else None
    if rec is not None:
        rec.start()
    try:
        for i in range(steps + 3):
            x, y = corpus.batch("train", cfg.batch_size, cfg.model.seq_len, g)
            x, y = x.to(device), y.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rec is not None:
                rec.step(loss=loss, token_ids=x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
    finally:
        if rec is not None:
            rec.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shakespeare-tree")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    cfg = get_preset(args.config)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    base = GPT(cfg.model).to(device)
    corpus = Corpus.shakespeare()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode, kwargs in MODES.items():
                times[mode] += time_steps(copy.deepcopy(base), corpus, cfg, device, args.steps, kwargs, Path(tmp) / "b.h5")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"recorder overhead: {args.config} on {name}, torch {torch.__version__}, "
                        f"{args.rounds}x{args.steps} steps per mode")  # fmt: skip
    for column in ("mode", "median ms/step", "p90 ms/step", "ratio to off"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    reference = statistics.median(times["off"])
    for mode, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        table.add_row(mode, f"{median * 1e3:.2f}", f"{p90 * 1e3:.2f}", f"{median / reference:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
