"""Where the tree kernels' time goes at one shape (needs a CUDA GPU): device time per kernel from
torch.profiler, and host time per call (launch overhead), forward, forward + stats and backward.

    python benchmarks/profile_tree.py 768 11 [tokens]
    ncu --clock-control none -k regex:"_route|_subtree|_weight" --launch-skip 20 --launch-count 7 \\
        --section SpeedOfLight python benchmarks/profile_tree.py 768 11 --ncu
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from routescope.kernels import tree_triton as tt
from routescope.kernels.tree_reference import new_tree_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("d", type=int)
    parser.add_argument("depth", type=int)
    parser.add_argument("tokens", type=int, nargs="?", default=16384)
    parser.add_argument("--ncu", action="store_true", help="only run the workload (under ncu)")
    args = parser.parse_args()
    d, depth, n = args.d, args.depth, args.tokens
    torch.manual_seed(0)
    units = 2 ** (depth + 1) - 1
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(1, units, d, device="cuda") / d**0.5).bfloat16()
    b = (0.1 * torch.randn(1, units, device="cuda")).bfloat16()
    u = (torch.randn(1, units, d, device="cuda") / (depth + 1) ** 0.5).bfloat16()
    dy = torch.randn_like(x)
    stats = new_tree_stats(1, depth, device="cuda")

    def round_trip() -> None:
        with torch.no_grad():
            tt.tree_forward(x, w, b, u, depth)
            res = tt.tree_forward(x, w, b, u, depth, stats=stats)
            tt.tree_backward(dy, x, w, u, res.leaf, res.z, None, res.grouping, depth)

    for _ in range(3):
        round_trip()
    torch.cuda.synchronize()
    if args.ncu:
        return
    with torch.no_grad():
        for name, fn in (
            ("forward", lambda: tt.tree_forward(x, w, b, u, depth)),
            ("forward+stats", lambda: tt.tree_forward(x, w, b, u, depth, stats=stats)),
        ):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            host = (time.perf_counter() - t0) / 50 * 1e3
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) / 50 * 1e3
            print(f"{name}: host {host:.4f} ms/call to enqueue, {total:.4f} ms/call until done")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            round_trip()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
