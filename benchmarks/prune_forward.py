"""Forward (and forward + backward) time of a pruned tree layer against the layer it was cut from, side by side.

    python benchmarks/prune_forward.py                  # CUDA when present (Triton kernels), else the CPU reference
    python benchmarks/prune_forward.py --removed 0.5    # share of each tree's subtrees removed

A pruned layer expands its live rows into the full heap on every call (one gather of w, b and u) and holds
the parents of removed subtrees to their live side (HAS_FORCE in the kernels); this measures what that costs
at the training configs' layer shapes. Median ms over repeated calls after warm-up; ratio pruned / original.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from routescope.analysis.calibrated import DEAD, LIVE
from routescope.layers import TreeFFN
from routescope.pruning.cut import cut_tree
from routescope.pruning.plan import tree_cut

SHAPES = {"d512 4x8": (512, 4, 8), "d768 12x7": (768, 12, 7), "d768 1x11": (768, 1, 11)}


def timed(fn, device: torch.device, reps: int) -> float:  # noqa: ANN001
    """Median ms of `fn` (CUDA events on a GPU, wall time on the CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def states_removing(trees: int, depth: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """States marking dead a random `share` of the subtrees rooted two levels below each tree's root."""
    states = np.full((trees, 2 ** (depth + 1) - 1), LIVE, dtype=np.int8)
    level = min(depth, 2)
    first = 2**level - 1
    for t in range(trees):
        for unit in rng.choice(np.arange(first, 2 * first + 1), size=int(round(share * 2**level)), replace=False):
            states[t, unit] = DEAD
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--removed", type=float, default=0.25)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (torch reference)"
    table = Table(title=f"pruned vs original tree layer, {args.tokens} tokens, {args.removed:.0%} of level-2 subtrees "
                        f"removed, {name}, torch {torch.__version__}")  # fmt: skip
    for column in ("shape", "units kept", "fwd ms", "pruned fwd ms", "ratio", "fwd+bwd ms", "pruned fwd+bwd ms", "ratio "):
        table.add_column(column, justify="right")
    rng = np.random.default_rng(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for label, (d, trees, depth) in SHAPES.items():
        tokens = args.tokens if device.type == "cuda" else min(args.tokens, 2048)
        layer = TreeFFN(d, d, depth=depth, trees=trees, backend="auto").to(device)
        keep, held = tree_cut(states_removing(trees, depth, args.removed, rng))
        pruned = cut_tree(layer, keep, held)
        x = torch.randn(tokens, d, device=device, requires_grad=True)
        row = [label, f"{int(keep.sum())} / {keep.size}"]
        for backward in (False, True):
            def step(module: torch.nn.Module, backward: bool = backward) -> None:
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    y = module(x)
                if backward:
                    y.float().sum().backward()

            with torch.set_grad_enabled(backward):
                base = timed(lambda: step(layer), device, args.reps)
                cut = timed(lambda: step(pruned), device, args.reps)
            row += [f"{base:.3f}", f"{cut:.3f}", f"{cut / base:.2f}"]
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
