"""Dashboard responsiveness on a long run: every callback body timed on a 10k-interval file.

    python benchmarks/dashboard_callbacks.py                          # 10,000 intervals, 4 layers, depth 7, 2 trees
    python benchmarks/dashboard_callbacks.py --intervals 2000 --keep /tmp/big.h5

The file is synthetic but consistent (benchmarks/metrics_large.py writes it with the real writer).
Each callback is timed as the app runs it: the `Dashboard` method plus the figure's JSON
serialisation (what Dash sends). "cold" is the first call, which builds a cache over the whole file
(metric curves, one tree's μ_n); "warm" is the median of later calls, which read only what they
show, lazily. The target is ≤ 200 ms per warm callback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import plotly.io as pio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_large import write_synthetic

from routescope.dashboards.app import Dashboard


def _payload(result: object) -> int:
    """Serialise what the callback returns, as Dash would; returns the JSON size in bytes."""
    figures = result if isinstance(result, tuple) else (result,)
    return sum(len(pio.to_json(f)) for f in figures if hasattr(f, "to_plotly_json"))


def timed(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float, int]:
    """(cold ms, warm median ms, payload bytes) of fn including serialisation."""
    start = time.perf_counter()
    size = _payload(fn())
    cold = (time.perf_counter() - start) * 1e3
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        _payload(fn())
        warm.append((time.perf_counter() - start) * 1e3)
    return cold, statistics.median(warm), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--depth", type=int, default=7)
    parser.add_argument("--trees", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the file here and keep it (reused if it exists)")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "long.h5"
        if not path.exists():
            write_synthetic(path, args.intervals, args.layers, args.depth, args.trees, tokens=16384)
        start = time.perf_counter()
        board = Dashboard([path])
        open_ms = (time.perf_counter() - start) * 1e3
        n = board.sources[0].n_steps
        last = args.layers - 1
        cases = {
            "path usage, latest step": lambda: board.paths(0, last, None, False),
            "path usage, step in the middle (log)": lambda: board.paths(0, last, n // 2, True),
            "animation frame (slider advance + path usage)": lambda: board.paths(0, last, board.advance(n // 3, n - 1), False),
            "tree, colour by μ_n": lambda: board.tree(0, last, 1, n // 3, "mu"),
            "curves: heatmap + lines": lambda: board.curves(0, "static_fraction", list(range(args.layers))),
            "node drift, 3 nodes": lambda: board.drift(0, last, 1, [0, 1, 2]),
            "tokens (no traces in file)": lambda: board.tokens(0, 0, 0, 0, "the"),
            "compare runs": lambda: board.compare("balance", last),
            "live tick, nothing new": board.tick,
        }
        table = Table(title=f"dashboard callbacks on a {n}-interval run ({args.layers} layers, depth {args.depth}, "
                            f"{args.trees} trees; {path.stat().st_size / 1e9:.2f} GB); open {open_ms:.0f} ms")  # fmt: skip
        for col in ("callback", "cold ms", "warm ms (median)", "JSON KB", "≤ 200 ms"):
            table.add_column(col, justify="left" if col == "callback" else "right")
        for name, fn in cases.items():
            cold, warm, size = timed(fn)
            table.add_row(name, f"{cold:.0f}", f"{warm:.0f}", f"{size / 1e3:.0f}", "yes" if warm <= 200 else "NO")
        console.print(table)


if __name__ == "__main__":
    main()
