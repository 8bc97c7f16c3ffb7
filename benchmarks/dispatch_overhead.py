"""Host time of the tree layer's Python around its kernels: the registered-operator path against the eager
`autograd.Function` path, with the Triton launches stubbed out, on the CPU.

    python benchmarks/dispatch_overhead.py              # small shapes, 2,000 calls a path
    python benchmarks/dispatch_overhead.py --calls 5000

On a GPU the kernels run asynchronously, so a layer call's host cost is its Python, its allocations and its
launches. This script removes the launches (each Triton kernel replaced by a no-op) and the arithmetic (a few
tokens), leaving what both paths add around them: argument handling, allocations, autograd and, on the operator
path, torch's custom-op dispatch. Forward + backward per call, recording on and off; median of 5 repeats, the
two paths taken in turns. It measures this machine's CPU and torch, not the GPU image's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

from routescope.kernels import tree_ops, tree_triton
from routescope.kernels.tree_reference import new_tree_stats


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def per_call_us(via_op: bool, record: bool, calls: int, trees: int = 4, depth: int = 8, d: int = 64) -> float:
    """Median µs per forward + backward of `tree_ops.tree_ffn` over 5 repeats of `calls` calls."""
    units = 2 ** (depth + 1) - 1
    x = torch.randn(8, d, requires_grad=True)
    w, b, u = (torch.randn(trees, units, d).requires_grad_(), torch.randn(trees, units).requires_grad_(),
               torch.randn(trees, units, d).requires_grad_())  # fmt: skip
    stats = new_tree_stats(trees, depth) if record else None

    def call() -> None:
        y, _, _ = tree_ops.tree_ffn(x, w, b, u, depth, "gelu", "node", stats, via_op=via_op)
        y.backward(torch.ones_like(y))

    for _ in range(50):
        call()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub = _NoLaunch()
    table = Table(title=f"tree layer host time around the kernels (launches stubbed), CPU, torch {torch.__version__}")
    for column in ("recording", "registered op µs", "eager Function µs", "saved µs"):
        table.add_column(column, justify="right")
    # CPU tensors pass the device check as under the interpreter; no kernel runs
    with mock.patch.multiple(tree_triton, route_top_kernel=stub, subtree_kernel=stub, subtree_bwd_kernel=stub,
                             interpreting=lambda: True):  # fmt: skip
        for record in (False, True):
            op, eager = per_call_us(True, record, args.calls), per_call_us(False, record, args.calls)
            table.add_row("on" if record else "off", f"{op:.0f}", f"{eager:.0f}", f"{op - eager:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
