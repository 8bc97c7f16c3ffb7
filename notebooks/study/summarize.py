"""Reduce study runs to the summary files the notebooks read (PROTOCOL.md, "What ships").

    python notebooks/study/summarize.py RUNS_FOLDER [--out notebooks/study/data] [--command "routescope sweep ..."]

One `<run>.nc` per finished `<run>.h5` (unfinished ones are listed and skipped) (routescope.analysis.run_summary), each naming the command that trained
it and the commit of this checkout.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from tqdm import tqdm

from routescope.analysis.run_summary import write_summary
from routescope.store import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of study run files (*.h5)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--command", default="", help="the command that trained the runs (kept in each summary)")
    args = parser.parse_args()
    runs = sorted(args.runs.glob("*.h5"))
    if not runs:
        raise SystemExit(f"error: no run files (*.h5) in {args.runs}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    finished = [run for run in runs if describe(run)["run_state"] == "finished"]
    for run in sorted(set(runs) - set(finished)):
        print(f"skipped {run.name}: not finished (train it again; the sweep reuses finished runs)")
    for run in tqdm(finished, desc="summaries"):
        write_summary(run, args.out / f"{run.stem}.nc", command=args.command, commit=commit)
    print(f"{len(finished)} summaries in {args.out}/ (commit {commit[:12] or 'unknown'})")


if __name__ == "__main__":
    main()
