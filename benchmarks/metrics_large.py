"""How fast `routescope report` streams through a large run: a synthetic file written with the real
writer, then the full report (window metrics of every layer), timed, as seconds per GB of file.

    python benchmarks/metrics_large.py                       # 24 layers x depth 12, 400 intervals
    python benchmarks/metrics_large.py --intervals 10000     # the full-size run of issue 4 (many GB)

The routing is synthetic but consistent (node counts are summed from leaf counts, so every docs/file-format.md
invariant holds) and drifts over training: leaves die at random, as auto-pruning makes them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from routescope.analysis.report import build_report
from routescope.analysis.window import ALL, LAST_QUARTER
from routescope.store import LayerLayout
from routescope.store.writer import RunWriter


def consistent_counts(leaves: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Node visits and right counts implied by leaf visits (..., 2^d), one vectorised pass per level."""
    heap = np.zeros(leaves.shape[:-1] + (2 ** (depth + 1) - 1,), dtype=np.int64)
    heap[..., 2**depth - 1 :] = leaves
    for level in range(depth - 1, -1, -1):
        lo, hi = 2**level - 1, 2 ** (level + 1) - 1
        heap[..., lo:hi] = heap[..., 2 * lo + 1 : 2 * hi + 1 : 2] + heap[..., 2 * lo + 2 : 2 * hi + 2 : 2]
    nodes = 2**depth - 1
    return heap[..., :nodes], heap[..., 2 * np.arange(nodes) + 2]


def write_synthetic(path: Path, intervals: int, layers: int, depth: int, trees: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layouts = [LayerLayout(f"blocks.{i}.mlp", depth, trees, {"family": "tree", "variant": "neuron", "depth": depth})
               for i in range(layers)]  # fmt: skip
    writer = RunWriter(path, layouts, {"config": {"synthetic": True}}, overwrite=True)
    weights = rng.dirichlet(np.full(2**depth, 0.5), size=(layers, trees))  # (L, T, leaves)
    for i in track(range(intervals), description="writing"):
        weights *= rng.random(weights.shape) > 0.0005  # leaves die as training goes on
        weights[..., 0] = np.maximum(weights[..., 0], 1e-3)  # one leaf always survives (long runs)
        weights /= weights.sum(-1, keepdims=True)
        leaves = rng.multinomial(tokens, weights.reshape(-1, 2**depth)).reshape(layers, trees, -1)
        visits, right = consistent_counts(leaves, depth)
        z = rng.normal(size=visits.shape)
        row = {
            "tokens": tokens, "layer_tokens": np.full(layers, tokens), "node_visits": visits, "node_right": right,
            "node_fires": visits, "node_act_sum": z * visits, "node_act_sqsum": (z**2 + 1) * visits,
            "leaf_visits": leaves, "leaf_fires": leaves, "leaf_act_sum": rng.normal(size=leaves.shape) * leaves,
            "leaf_act_sqsum": 2.0 * leaves,
        }  # fmt: skip
        writer.append_interval((i + 1) * 10, row, {"train_loss": 2.0})
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, default=400)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--trees", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per interval")
    parser.add_argument("--keep", type=Path, help="write the file here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "large.h5"
        start = time.perf_counter()
        write_synthetic(path, args.intervals, args.layers, args.depth, args.trees, args.tokens)
        write_s = time.perf_counter() - start
        size_gb = os.path.getsize(path) / 1e9
        timings = []
        for name, window in (("all (--window all)", ALL), ("last quarter (default)", LAST_QUARTER)):
            start = time.perf_counter()
            report = build_report(path, window)
            timings.append((name, time.perf_counter() - start, len(report["layers"])))
    table = Table(title=f"report on a synthetic run: {args.intervals} intervals x {args.layers} layers x depth "
                        f"{args.depth} x {args.trees} tree(s), {os.cpu_count()} CPU cores")  # fmt: skip
    for column in ("window", "file GB", "write s", "report s", "report s/GB of file", "layers reported"):
        table.add_column(column, justify="right")
    for name, report_s, layers in timings:
        table.add_row(name, f"{size_gb:.2f}", f"{write_s:.1f}", f"{report_s:.1f}", f"{report_s / size_gb:.1f}", str(layers))
    Console().print(table)


if __name__ == "__main__":
    main()
