"""How much the state metrics move with the window's length: v1 counts (zero visits, min(p, 1-p) < 1%)
against the v2 calibrated states, for windows of the last 1..8 intervals of a run.

    python benchmarks/window_stability.py RUN.h5 [--max-intervals 8]

Prints a markdown table (run-level means over tree layers) and the range (max − min) of each metric
across the window lengths: a metric that describes how the run routes *now* should not depend much
on how many recent intervals it is summed over.
"""

from __future__ import annotations

import argparse

import numpy as np

import routescope
from routescope import analysis
from routescope.analysis.stats import is_frozen
from routescope.analysis.tree import SUMMARY_VARIABLES, layer_slice
from routescope.analysis.window import select_window, window_counts

V2 = ("dead_fraction", "undetermined_fraction", "frozen_fraction", "static_fraction")


def v1_metrics(ds, window) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The version-1 counts: dead = no visit, frozen = visited with min(p, 1 − p) < 0.01, static = unvisited units."""
    counts = window_counts(select_window(ds, window), SUMMARY_VARIABLES)
    dead, frozen, static = [], [], []
    for info in analysis.layer_infos(ds):
        c = layer_slice(counts, info, leading=0)
        v, r, lv = c["node_visits"], c["node_right"], c["leaf_visits"]
        dead.append(np.mean(v == 0))
        frozen.append(np.mean(is_frozen(v, r, 0.01)))
        static.append((np.sum(v == 0) + np.sum(lv == 0)) / (v.size + lv.size))
    return {"dead_fraction": float(np.mean(dead)), "frozen_fraction": float(np.mean(frozen)), "static_fraction": float(np.mean(static))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--max-intervals", type=int, default=8)
    args = parser.parse_args()
    ds = routescope.open(args.run)
    steps = ds["step"].values
    rows = []
    for k in range(1, args.max_intervals + 1):
        window = (int(steps[-k]), None)
        old = v1_metrics(ds, window)
        new = analysis.summarize(ds, window)
        rows.append((k, old, {key: float(new[key].mean()) for key in V2}))
    print(f"{args.run}: windows of the last k intervals ending at step {steps[-1]} ({len(steps)} intervals in the run)\n")
    print("| k | dead v1 | dead v2 | undetermined v2 | frozen v1 | frozen v2 | static v1 | static v2 |")
    print("|---|---|---|---|---|---|---|---|")
    for k, old, new in rows:
        print(f"| {k} | {old['dead_fraction']:.3f} | {new['dead_fraction']:.3f} | {new['undetermined_fraction']:.3f} | "
              f"{old['frozen_fraction']:.3f} | {new['frozen_fraction']:.3f} | {old['static_fraction']:.3f} | "
              f"{new['static_fraction']:.3f} |")  # fmt: skip

    def spread(values: list[float]) -> str:
        return f"{max(values) - min(values):.3f}"

    print(f"| range | {spread([o['dead_fraction'] for _, o, _ in rows])} | {spread([n['dead_fraction'] for *_, n in rows])} | "
          f"{spread([n['undetermined_fraction'] for *_, n in rows])} | {spread([o['frozen_fraction'] for _, o, _ in rows])} | "
          f"{spread([n['frozen_fraction'] for *_, n in rows])} | {spread([o['static_fraction'] for _, o, _ in rows])} | "
          f"{spread([n['static_fraction'] for *_, n in rows])} |")  # fmt: skip


if __name__ == "__main__":
    main()
