"""Evaluate the pre-registered decision rules (PROTOCOL.md R1–R4) on one size's run summaries.

    python notebooks/study/evaluate.py notebooks/study/data/small-gpu [--json out.json]
    python notebooks/study/evaluate.py notebooks/study/data/gpu --replication
    python notebooks/study/evaluate.py notebooks/study/data/regime --regime

Prints each rule's outcome (supported / not supported / inconclusive; R4 descriptive) with its numbers; at the
replication size, whether each rule's direction held in every seed; for the regime grid, the main effects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import xarray as xr

from routescope.analysis.study_rules import evaluate, regime_cell, regime_effects, replication, run_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="one size's summaries (*.nc)")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--replication", action="store_true", help="the replication size: direction in every seed")
    mode.add_argument("--regime", action="store_true", help="the regime grid: main effects of lr and batch on SF")
    args = parser.parse_args()
    files = sorted(args.folder.glob("*.nc"))
    if not files:
        raise SystemExit(f"error: no summaries (*.nc) in {args.folder}")
    summaries = []
    for f in files:
        with xr.open_dataset(f, engine="h5netcdf") as summary:
            summaries.append(summary.load())
    if args.regime:
        effects = regime_effects([regime_cell(s) for s in summaries])
        print(json.dumps(effects, indent=1, default=float))
        if args.json:
            args.json.write_text(json.dumps(effects, indent=1, default=float))
        return
    runs = [run_values(s) for s in summaries]
    outcomes = replication(runs) if args.replication else evaluate(runs)
    arms = sorted({r.arm for r in runs})
    print(f"{len(runs)} runs in {args.folder}: " + ", ".join(f"{a} x{sum(r.arm == a for r in runs)}" for a in arms))
    for outcome in outcomes:
        print(f"{outcome.rule}: {outcome.outcome}\n  {json.dumps(outcome.details, default=float)}")
    if args.json:
        args.json.write_text(json.dumps([o.as_dict() for o in outcomes], indent=1, default=float))


if __name__ == "__main__":
    main()
