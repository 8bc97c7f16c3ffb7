"""Host (CPU) time of one eager `TreeFFN` forward + backward on CUDA, against a dense FFN of the same width.

    python benchmarks/host_overhead.py                 # the issue's shapes, bf16, recording on and off
    python benchmarks/host_overhead.py --profile 12    # plus cProfile's top functions per shape

At a small token count the GPU finishes each kernel before the host has launched the next, so the wall time
of a loop of calls, divided by the calls, is the host's cost per call: launches, allocations and Python. The
GPU time of the same call (CUDA events, in a separate loop) is printed beside it; where it is the larger the
host time reads as GPU-bound and is marked so.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from rich.console import Console
from rich.table import Table

from routescope import TreeFFN

SHAPES = {  # name: (d_model, trees, depth, dense width)
    "d512 4x8": (512, 4, 8, 2048),
    "d768 12x7": (768, 12, 7, 3072),
    "d768 1x11": (768, 1, 11, 3072),
    "d2048 16x7": (2048, 16, 7, 8192),
}


def dense_ffn(d: int, width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.GELU(), torch.nn.Linear(width, d))


def per_call(layer: torch.nn.Module, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """(host ms, GPU ms) per forward + backward: wall time of `calls` unsynchronised calls, and CUDA events."""
    def call() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
        y.backward(torch.ones_like(y))

    for _ in range(10):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls


def profile_calls(layer: torch.nn.Module, x: torch.Tensor, calls: int, rows: int) -> str:
    """cProfile's top functions (by own time) over `calls` forward + backward calls."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
        y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print cProfile's top ROWS functions")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_overhead.py needs a CUDA device")
    table = Table(title=f"host ms per forward + backward, {args.tokens} tokens, bf16 autocast, "
                        f"{torch.cuda.get_device_name()}, torch {torch.__version__}")  # fmt: skip
    for column in ("shape", "layer", "host ms", "GPU ms", "bound by"):
        table.add_column(column, justify="right")
    for name, (d, trees, depth, width) in SHAPES.items():
        x = torch.randn(args.tokens, d, device="cuda", requires_grad=True)
        tree = TreeFFN(d, d, depth=depth, trees=trees, backend="triton").cuda()
        layers = {"dense": dense_ffn(d, width).cuda(), "tree": tree, "tree, recording": tree}
        for label, layer in layers.items():
            tree.recording = label == "tree, recording"
            host, gpu = per_call(layer, x, args.calls)
            table.add_row(name, label, f"{host:.3f}", f"{gpu:.3f}", "GPU" if gpu >= 0.9 * host else "host")
            if args.profile and label != "dense":
                print(f"== {name}, {label}\n" + profile_calls(layer, x, args.calls // 4, args.profile))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
