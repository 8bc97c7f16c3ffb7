"""Crash and corruption soak: many SIGKILLs of real recordings, then a seeded fuzz of damaged copies of real files.

    nice -n 10 python benchmarks/crash_soak.py                  # 51 kills, 30 full disks, 240 damaged copies
    python benchmarks/crash_soak.py --kills 6 --full 6 --fuzz 30  # a quick look

Kills: tests/crashkit.py children (debug, debug-l1, debug-moe, and `routescope record` every fourth
kill) get SIGKILL at a seeded moment 0–2 s after their first flushed interval; each file must open
with h5py (plain or SWMR, counted), with routescope.open, keep every interval reported flushed, and
satisfy the file invariants (docs/file-format.md). Full disks: `routescope record` under a seeded RLIMIT_FSIZE (the kernel
refuses to grow the file, as a full disk does), with the free-space reserve on and off (off: HDF5 meets
the failed write itself); each must exit 2 with one `error:` line and leave a complete file that plain
h5py opens, marked failed, invariant-clean, within the limit. Fuzz: copies of finished and killed run files with bit flips,
truncations, zeroed or random blocks at seeded offsets go through `describe` (info), `build_report`
(report), `routescope.open` of every group, loading every variable, and the Dashboard, in a forked
worker with a timeout; every eighth case also through the `routescope info` and `routescope report`
commands. The only allowed failure is RunFileError (CLI: exit 2, one `error:` line, no traceback),
except that loading a lazily opened dataset may raise h5py's OSError for a damaged data chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU soak; set before anything imports the layers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crashkit import Kill, check_run_file, run_kills  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from routescope.store import RunFileError  # noqa: E402

PRESETS = ("debug", "debug-l1", "debug-moe")
FAMILIES = {"debug": "tree", "debug-l1": "l1", "debug-moe": "moe"}
CASE_TIMEOUT_S = 60.0
CLI_EVERY = 8
OUTCOMES = ("read", "clean error", "chunk OSError", "traceback", "multi-line error", "hang", "crash")
ALLOWED = {"read", "clean error", "chunk OSError"}  # chunk OSError: only ds.load() after routescope.open (lazy)
console = Console(width=130)


# ---------------------------------------------------------------------------------------------- kills


def soak_kills(folder: Path, count: int, seed: int) -> tuple[list[Kill], list[dict], Counter]:
    """SIGKILL `count` real recordings at seeded moments; check each file; return kills, outcomes, failures."""
    rng = random.Random(seed)
    kills = [Kill(folder / f"kill{i:03d}.h5", PRESETS[i % 3], "cli" if i % 4 == 3 else "script", signal.SIGKILL,
                  rng.uniform(0.0, 2.0)) for i in range(count)]  # fmt: skip
    start = time.monotonic()
    for i in range(0, count, 6):  # batches, so a progress line appears now and then
        run_kills(kills[i : i + 6], parallel=2)
        console.print(f"  kills {min(i + 6, count)}/{count} ({time.monotonic() - start:.0f} s)")
    from routescope.store.repair import clear_open_flags

    outcomes, failures = [], Counter()
    for kill in kills:
        try:
            outcome = check_run_file(kill)
            repaired = dataclasses.replace(kill, path=kill.path.with_name(f"repaired-{kill.path.name}"))
            shutil.copy(kill.path, repaired.path)
            clear_open_flags(repaired.path)
            after = check_run_file(repaired)  # the same checks, now through plain h5py
            assert after.plain_open == "plain" and after.rows == outcome.rows, "repair changed what is read"
            outcomes.append({"kill": kill, "rows": outcome.rows, "lost": outcome.lost, "open": outcome.plain_open,
                             "repaired": after.plain_open == "plain"})  # fmt: skip
        except (AssertionError, RunFileError) as err:
            failures[f"{kill.preset}: {str(err).splitlines()[0][:80]}"] += 1
    return kills, outcomes, failures


# ---------------------------------------------------------------------------------------------- full disks


def _limited(limit: int):  # type: ignore[no-untyped-def]
    """preexec_fn: a file-size limit, with SIGXFSZ ignored so that write() fails with EFBIG instead of killing."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def soak_full_disks(folder: Path, count: int, seed: int) -> tuple[list[dict], Counter]:
    """`routescope record` until a seeded file-size limit stops it (reserve on / off alternating); check each file."""
    import h5py
    from conftest import check_tree_invariants
    from crashkit import check_family_invariants

    rng = random.Random(seed + 1)
    cases = [{"preset": PRESETS[i % 3], "guard": i % 2 == 0, "limit": int(rng.uniform(2.5, 6.0) * 2**20),
              "path": folder / f"full{i:03d}.h5"} for i in range(count)]  # fmt: skip
    failures: Counter = Counter()

    def run(case: dict) -> subprocess.Popen:
        reserve = [] if case["guard"] else ["--reserve-mib", "0"]
        return subprocess.Popen([sys.executable, "-m", "routescope.cli", "record", "--config", case["preset"],
                                 "--out", str(case["path"]), "--device", "cpu", "--steps", "100000", "--every", "1",
                                 *reserve], preexec_fn=_limited(case["limit"]), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    start = time.monotonic()
    for i in range(0, count, 2):
        batch = [(case, run(case)) for case in cases[i : i + 2]]
        for case, proc in batch:
            try:
                _, err = proc.communicate(timeout=600)
                lines = [line for line in err.splitlines() if line.strip()]
                assert proc.returncode == 2, f"exit {proc.returncode}: {err[-300:]!r}"
                assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err[-300:]!r}"
                assert "Traceback" not in err
                case["message"] = lines[0]
                path, family = case["path"], FAMILIES[case["preset"]]
                assert path.stat().st_size <= case["limit"], "file larger than the limit"
                with h5py.File(path, "r") as f:  # plain h5py: closed, or flags cleared after a detached failure
                    assert int(f["run_state"][()]) == 3, "not marked failed"
                    rows = len(f["run/step"])
                    if family != "tree":
                        assert len(check_family_invariants(f, family)) == rows
                if family == "tree":
                    assert check_tree_invariants(path) == rows
                case["rows"] = rows
                case["by"] = "reserve" if "its reserve" in lines[0] else "checkpoint" if "checkpoint" in lines[0] else "write failed"
            except (AssertionError, OSError, RunFileError) as err:
                failures[f"{case['preset']} guard={case['guard']}: {str(err).splitlines()[0][:90]}"] += 1
        console.print(f"  full disks {min(i + 2, count)}/{count} ({time.monotonic() - start:.0f} s)")
    return cases, failures


# ---------------------------------------------------------------------------------------------- fuzz


def damage(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One seeded corruption of a file's bytes: bit flips, a truncation, a zeroed or a random block."""
    kind = rng.choice(["bit flips", "truncation", "zeroed block", "random block"])
    out = bytearray(data)
    if kind == "bit flips":
        for _ in range(rng.randint(1, 64)):
            pos = rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
    elif kind == "truncation":
        out = out[: rng.randrange(len(out))]
    else:
        size = rng.choice([8, 64, 512, 4096, 65536])
        pos = rng.randrange(len(out))
        block = bytes(size) if kind == "zeroed block" else rng.randbytes(size)
        out[pos : pos + size] = block[: len(out) - pos]
    return bytes(out), kind


def read_everything(path: str, results: mp.Queue) -> None:
    """Worker: every in-process reader on one damaged file; reports 'read', 'clean' or the unexpected error."""
    from routescope.analysis.report import build_report
    from routescope.dashboards.app import Dashboard
    from routescope.store import RunFileError, describe, open_run
    from routescope.store.schema import FAMILIES as GROUPS

    opened = []

    def open_all(p: str) -> None:
        for group in (*GROUPS, "run", "traces"):
            try:
                opened.append(open_run(p, group))
            except RunFileError as err:
                if "has no group" not in str(err):
                    raise

    def load_all(p: str) -> None:
        for ds in opened:  # lazy: a damaged data chunk surfaces here, as h5py's OSError
            ds.load()

    verdicts = []
    for name, reader in (("info", describe), ("report", build_report), ("open", open_all), ("load", load_all),
                         ("dash", lambda p: Dashboard([p]))):  # fmt: skip
        try:
            reader(path)
            verdicts.append((name, "read", ""))
        except RunFileError as err:
            one_line = "\n" not in str(err) and path in str(err)
            verdicts.append((name, "clean error" if one_line else "multi-line error", str(err)[:120]))
        except OSError as err:
            outcome = "chunk OSError" if name == "load" else "traceback"
            verdicts.append((name, outcome, f"OSError: {str(err).splitlines()[0][:160] if str(err) else ''}"))
        except Exception as err:  # noqa: BLE001 - this is what the soak looks for
            verdicts.append((name, "traceback", f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"))
    results.put(verdicts)


def check_in_process(path: Path) -> list[tuple[str, str, str]]:
    """Run read_everything in a forked worker with a timeout: a hang or a crash of HDF5 is an outcome too."""
    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    worker = ctx.Process(target=read_everything, args=(str(path), results))
    worker.start()
    worker.join(CASE_TIMEOUT_S)
    if worker.is_alive():
        worker.kill()
        worker.join()
        return [("all", "hang", f"> {CASE_TIMEOUT_S:.0f} s")]
    if worker.exitcode != 0:
        return [("all", "crash", f"worker exit code {worker.exitcode}")]
    return results.get(timeout=5)


def check_cli(path: Path) -> list[tuple[str, str, str]]:
    """`routescope info` and `report` as a user runs them: exit 0, or exit 2 with one `error:` line."""
    verdicts = []
    for command in ("info", "report"):
        try:
            result = subprocess.run([sys.executable, "-m", "routescope.cli", command, str(path)], capture_output=True,
                                    text=True, timeout=CASE_TIMEOUT_S, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        except subprocess.TimeoutExpired:
            verdicts.append((f"cli {command}", "hang", ""))
            continue
        lines = result.stderr.strip().splitlines()
        if result.returncode == 0 and "Traceback" not in result.stderr:
            verdicts.append((f"cli {command}", "read", ""))
        elif result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"):
            verdicts.append((f"cli {command}", "clean error", lines[0][:120]))
        else:
            verdicts.append((f"cli {command}", "traceback", f"exit {result.returncode}: {result.stderr[-300:]}"))
    return verdicts


def soak_fuzz(folder: Path, sources: list[Path], count: int, seed: int) -> tuple[Counter, Counter, list[str]]:
    """`count` damaged copies of the source files through every reader; returns outcome counts and problems."""
    rng = random.Random(seed)
    blobs = [(src.name, src.read_bytes()) for src in sources]
    by_case, by_reader, problems = Counter(), Counter(), []
    start = time.monotonic()
    for case in range(count):
        name, data = blobs[case % len(blobs)]
        damaged, kind = damage(data, rng)
        path = folder / f"fuzz{case:03d}.h5"
        path.write_bytes(damaged)
        verdicts = check_in_process(path) + (check_cli(path) if case % CLI_EVERY == 0 else [])
        outcomes = {outcome for _, outcome, _ in verdicts}
        bad = outcomes - ALLOWED
        worst = next(o for o in reversed(OUTCOMES) if o in outcomes)
        by_case[(kind, worst)] += 1
        for reader, outcome, detail in verdicts:
            by_reader[(reader, outcome)] += 1
            if outcome not in ALLOWED:
                problems.append(f"case {case} ({kind} of {name}) {reader}: {outcome} {detail}")
        if bad:
            shutil.copy(path, folder / f"problem{case:03d}.h5")
        path.unlink()
        if (case + 1) % 40 == 0:
            console.print(f"  fuzz {case + 1}/{count} ({time.monotonic() - start:.0f} s)")
    return by_case, by_reader, problems


def finished_sources(folder: Path) -> list[Path]:
    """One finished run of each debug preset, recorded by the installed command."""
    paths = []
    for preset in PRESETS:
        out = folder / f"finished-{preset}.h5"
        subprocess.run([sys.executable, "-m", "routescope.cli", "record", "--config", preset, "--out", str(out),
                        "--device", "cpu"], check=True, capture_output=True, timeout=600)  # fmt: skip
        paths.append(out)
    return paths


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=51)
    parser.add_argument("--full", type=int, default=30, help="record runs stopped by a full disk (file-size limit)")
    parser.add_argument("--fuzz", type=int, default=240)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the files in (default: a temp dir)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="crash_soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    console.print(f"[bold]crash soak[/]: {args.kills} kills, {args.full} full disks, {args.fuzz} damaged copies, seed {args.seed}, in {folder}")

    kills, outcomes, kill_failures = soak_kills(folder, args.kills, args.seed)
    kill_s = time.monotonic() - started
    table = Table("preset", "child", "kills", "files intact", "opened plain / swmr", "plain after repair",
                  "rows min–max", "intervals lost 0/1/2+ (max)", title="SIGKILL at a random moment")  # fmt: skip
    for preset in PRESETS:
        for mode in ("script", "cli"):
            mine = [o for o in outcomes if o["kill"].preset == preset and o["kill"].mode == mode]
            total = sum(k.preset == preset and k.mode == mode for k in kills)
            if not total:
                continue
            rows = [o["rows"] for o in mine]
            lost = Counter(min(o["lost"], 2) for o in mine if o["lost"] >= 0)
            opened = Counter(o["open"] for o in mine)
            worst = max((o["lost"] for o in mine), default=0)
            table.add_row(preset, mode, str(total), str(len(mine)), f"{opened['plain']} / {opened['swmr']}",
                          str(sum(o["repaired"] for o in mine)), f"{min(rows, default=0)}–{max(rows, default=0)}",
                          "–" if mode == "cli" else f"{lost[0]} / {lost[1]} / {lost[2]} ({worst})")  # fmt: skip
    console.print(table)
    for failure, n in kill_failures.items():
        console.print(f"[red]kill check failed ×{n}: {failure}")

    full_start = time.monotonic()
    cases, full_failures = soak_full_disks(folder, args.full, args.seed)
    full_s = time.monotonic() - full_start
    table = Table("preset", "reserve", "runs", "files intact (plain h5py, failed, invariants)", "rows min–max",
                  "stopped by", title="`routescope record` on a full disk (RLIMIT_FSIZE 2.5–6 MiB)")  # fmt: skip
    for preset in PRESETS:
        for guard in (True, False):
            mine = [c for c in cases if c["preset"] == preset and c["guard"] == guard]
            good = [c for c in mine if "rows" in c]
            if not mine:
                continue
            rows = [c["rows"] for c in good]
            by = Counter(c["by"] for c in good)
            table.add_row(preset, "default" if guard else "0 (off)", str(len(mine)), str(len(good)),
                          f"{min(rows, default=0)}–{max(rows, default=0)}", ", ".join(f"{k} {v}" for k, v in by.items()))
    console.print(table)
    for failure, n in full_failures.items():
        console.print(f"[red]full-disk check failed ×{n}: {failure}")

    sources = finished_sources(folder) + [o["kill"].path for o in outcomes[:2]]  # + a killed tree and l1 file
    fuzz_start = time.monotonic()
    by_case, by_reader, problems = soak_fuzz(folder, sources, args.fuzz, args.seed)
    fuzz_s = time.monotonic() - fuzz_start
    table = Table("corruption", *OUTCOMES, title=f"{args.fuzz} damaged copies of {len(sources)} real files "
                  "(worst reader per case)")  # fmt: skip
    for kind in ("bit flips", "truncation", "zeroed block", "random block"):
        table.add_row(kind, *(str(by_case[(kind, o)]) for o in OUTCOMES))
    console.print(table)
    table = Table("reader", *OUTCOMES, title="by reader")
    for reader in sorted({r for r, _ in by_reader}):
        table.add_row(reader, *(str(by_reader[(reader, o)]) for o in OUTCOMES))
    console.print(table)
    for line in problems[:30]:
        console.print(f"[red]{line}")
    total = time.monotonic() - started
    console.print(f"kills {kill_s:.0f} s, full disks {full_s:.0f} s, fuzz {fuzz_s:.0f} s, total {total:.0f} s; "
                  f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()}-core CPU")  # fmt: skip
    if args.keep is None and not problems and not kill_failures and not full_failures:
        shutil.rmtree(folder)
    return 1 if problems or kill_failures or full_failures else 0


if __name__ == "__main__":
    sys.exit(main())
