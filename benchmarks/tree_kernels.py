"""Tree FFN kernels against a dense FFN, side by side in one run, as ratios (needs a CUDA GPU).

    python benchmarks/tree_kernels.py                    # the issue's table (bf16, median times)
    python benchmarks/tree_kernels.py --sweep            # also the tile / subtree-size sweep at 16k tokens
    python benchmarks/tree_kernels.py --quick            # fewer sizes, for a smoke run

Rows per (d_model, trees × depth, tokens), for one deep tree and for the many shallow trees of the training
configs (d 512 4×8, d 768 12×7, d 2048 16×7; `--shapes`): dense FFN d→4d→d (cuBLAS through F.linear), the torch reference (`neuron_forward`),
fastfeedforward 0.2.1's eval_forward (a leaf-MLP FFF of the same depth, leaf width 1; where
installed), and our kernel with and without recording. For dense and for ours alike, each time is
the faster of eager calls and CUDA-graph replays (graphs take out the host's launch cost); "kernel
eager" is ours without graphs, as an eager training loop sees it. The bytes floor is the fewest bytes the
tree must move (x read, y written, each weight row it touches read once; the backward also reads
dy and writes dx and the touched gradient rows) over the copy bandwidth measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from rich.console import Console
from rich.table import Table

from routescope.kernels import tree_ops
from routescope.kernels import tree_triton as tt
from routescope.kernels.tree_reference import neuron_forward, new_tree_stats

DTYPE = torch.bfloat16
SHAPES = [(768, 11), (2048, 12)]  # one deep tree: (d_model, depth); also the sweeps' shapes
MANY_TREES = [(512, 4, 8), (768, 12, 7), (2048, 16, 7)]  # (d_model, trees, depth): the training configs' layers
TOKENS = [1, 32, 1024, 16384, 65536]
FFF_MAX_TOKENS = 1024  # fastfeedforward's eval is a Python loop: ~2 s a call at 16k tokens


def bench(fn: Callable[[], object], rep_ms: int = 200) -> float:
    """Median milliseconds of `fn` (events; Triton's do_bench flushes L2 between calls)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture `fn` in a CUDA graph (after a warm-up on a side stream) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def best_of(fn: Callable[[], object]) -> float:
    """The faster of eager calls and CUDA-graph replays: graphs take the host's launch cost out, which
    for Triton's Python launcher (~0.1 ms a forward) would otherwise hide the device time."""
    eager = bench(fn)
    try:
        return min(eager, bench(graphed(fn)))
    except RuntimeError:  # not capturable: eager only
        return eager


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/ms (bytes read + written), 1 GiB buffers."""
    src = torch.empty(2**29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=300)
    return 2 * src.numel() * src.element_size() / ms


def floors(n: int, d: int, trees: int, depth: int, bw: float) -> tuple[float, float]:
    """(forward, forward+backward) bytes floor in ms at copy bandwidth `bw`."""
    item = torch.finfo(DTYPE).bits // 8
    rows = trees * min(2 ** (depth + 1) - 1, n * (depth + 1))  # weight rows the batch touches
    io = n * d * item  # x, or y, or dy, or dx
    weights = rows * 2 * d * item  # rows of w and of u
    fwd = 2 * io + weights
    bwd = 3 * io + 2 * weights  # read x, dy, w, u; write dx, dw, du rows
    return fwd / bw, (fwd + bwd) / bw


def tree_params(d: int, depth: int, requires_grad: bool, trees: int = 1) -> tuple[torch.Tensor, ...]:
    units = 2 ** (depth + 1) - 1
    w = (torch.randn(trees, units, d, device="cuda") / d**0.5).to(DTYPE).requires_grad_(requires_grad)
    b = (0.1 * torch.randn(trees, units, device="cuda")).to(DTYPE).requires_grad_(requires_grad)
    u = (torch.randn(trees, units, d, device="cuda") / (trees * (depth + 1)) ** 0.5).to(DTYPE)
    return w, b, u.requires_grad_(requires_grad)


def dense_times(x: torch.Tensor, xg: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """(forward, forward+backward) ms of the dense FFN d -> 4d -> d (cuBLAS through F.linear)."""
    d = x.shape[1]
    w1 = (torch.randn(4 * d, d, device="cuda") / d**0.5).to(DTYPE).requires_grad_()
    b1 = torch.zeros(4 * d, device="cuda", dtype=DTYPE, requires_grad=True)
    w2 = (torch.randn(d, 4 * d, device="cuda") / (4 * d) ** 0.5).to(DTYPE).requires_grad_()
    b2 = torch.zeros(d, device="cuda", dtype=DTYPE, requires_grad=True)

    def dense() -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def dense_fb() -> None:
        y = F.linear(F.gelu(F.linear(xg, w1, b1)), w2, b2)
        torch.autograd.grad(y, [xg, w1, b1, w2, b2], dy)

    with torch.no_grad():
        fwd = best_of(dense)
    return fwd, best_of(dense_fb)


def time_row(n: int, d: int, depth: int, bw: float, with_fff: bool, cfg: tt.KernelConfig | None, trees: int = 1) -> dict:
    """All variants at one size; returns ms per variant (forward and forward+backward)."""
    torch.manual_seed(0)
    out: dict[str, float | None] = {}
    x = torch.randn(n, d, device="cuda", dtype=DTYPE)
    xg = x.clone().requires_grad_()
    dy = torch.randn(n, d, device="cuda", dtype=DTYPE)
    out["dense"], out["dense_fb"] = dense_times(x, xg, dy)
    # Tree: reference, kernel, kernel + recording.
    w, b, u = tree_params(d, depth, requires_grad=True, trees=trees)
    stats = new_tree_stats(trees, depth, device="cuda")
    with torch.no_grad():
        out["reference"] = bench(lambda: neuron_forward(x, w, b, u, depth))
        kernel = lambda: tt.tree_forward(x, w, b, u, depth, config=cfg)  # noqa: E731
        kernel_rec = lambda: tt.tree_forward(x, w, b, u, depth, stats=stats, config=cfg)  # noqa: E731
        out["kernel"], out["kernel_rec"] = best_of(kernel), best_of(kernel_rec)
        out["kernel_eager"] = bench(kernel)

    def reference_fb() -> None:
        y, _ = neuron_forward(xg, w, b, u, depth)
        torch.autograd.grad(y, [xg, w, b, u], dy)

    def kernel_fb(record: bool) -> Callable[[], None]:
        def run() -> None:
            y, _, _ = tree_ops.tree_ffn(xg, w, b, u, depth, "gelu", "node", stats if record else None, cfg)
            torch.autograd.grad(y, [xg, w, b, u], dy)

        return run

    out["reference_fb"] = bench(reference_fb)
    out["kernel_fb"] = best_of(kernel_fb(False))
    out["kernel_rec_fb"] = best_of(kernel_fb(True))
    out["kernel_eager_fb"] = bench(kernel_fb(False))
    out["fff"] = None
    if with_fff and n <= FFF_MAX_TOKENS and trees == 1:
        from fastfeedforward import FFF

        fff = FFF(d, 1, d, depth).cuda().to(DTYPE).eval()
        with torch.no_grad():
            out["fff"] = bench(lambda: fff(x), rep_ms=50)
    out["floor"], out["floor_fb"] = floors(n, d, trees, depth, bw)
    return out


SWEEP = [  # block_m, block_k, block_o, sub_levels, num_warps, num_stages
    (64, 64, 64, 6, 4, 3), (32, 64, 64, 6, 4, 3), (16, 64, 64, 6, 4, 3), (32, 64, 64, 5, 4, 3),
    (32, 64, 64, 7, 4, 3), (64, 64, 64, 6, 8, 3), (128, 64, 64, 6, 8, 3), (32, 128, 128, 6, 4, 2),
    (64, 64, 64, 5, 4, 3), (128, 64, 64, 5, 8, 3),
]


def sweep_inputs(d: int, depth: int, n: int = 16384) -> tuple:
    """A sweep's inputs at one shape: n, x, dy, the tree's w, b, u (no grad) and fresh statistics buffers."""
    x = torch.randn(n, d, device="cuda", dtype=DTYPE)
    w, b, u = tree_params(d, depth, requires_grad=False)
    return n, x, torch.randn_like(x), w, b, u, new_tree_stats(1, depth, device="cuda")


def sweep(console: Console) -> list[dict]:
    """Forward, forward with recording, and backward alone at 16k tokens for each tile choice."""
    rows = []
    for d, depth in SHAPES:
        n, x, dy, w, b, u, stats = sweep_inputs(d, depth)
        for tiles in SWEEP:
            cfg = tt.KernelConfig(*tiles)
            try:
                with torch.no_grad():
                    fwd = best_of(lambda: tt.tree_forward(x, w, b, u, depth, config=cfg))
                    rec = best_of(lambda: tt.tree_forward(x, w, b, u, depth, stats=stats, config=cfg))
                    res = tt.tree_forward(x, w, b, u, depth, config=cfg)
                    bwd = best_of(lambda: tt.tree_backward(dy, x, w, u, res.leaf, res.z, None, res.grouping, depth,
                                                           config=cfg))  # fmt: skip
            except Exception as err:  # noqa: BLE001 - a tile that does not compile (shared memory) is skipped
                console.print(f"d={d} depth={depth} {tiles}: failed ({str(err).splitlines()[0][:120]})")
                continue
            row = {"d": d, "depth": depth, **cfg.__dict__, "fwd": fwd, "fwd_rec": rec, "bwd": bwd}
            rows.append(row)
            console.print(f"d={d} depth={depth} bm,bk,bo,sub,warps,stages={tiles}: "
                          f"fwd {fwd:.4f}  rec {rec:.4f} ({rec / fwd - 1:+.0%})  bwd {bwd:.4f} ms")  # fmt: skip
    return rows


REGISTER_CAPS = {"fwd": (None, 64, 80, 96, 112), "bwd": (None, 128, 160, 192, 224)}


def register_sweep(console: Console) -> list[dict]:
    """The default tiles with a per-thread register cap (Triton's maxnreg) on the subtree launches, at 16k
    tokens: fewer registers buy occupancy (the kernels are latency-bound, BENCHMARKS.md) at the cost of spills.
    Each capped result is checked against the uncapped one (a cap must not change any output)."""
    rows = []
    for d, depth in SHAPES:
        n, x, dy, w, b, u, stats = sweep_inputs(d, depth)
        base_f, base_b = tt.default_config(n, d, d, depth), tt.default_config(n, d, d, depth, backward=True)
        with torch.no_grad():
            ref = tt.tree_forward(x, w, b, u, depth, config=base_f)
            ref_dx = tt.tree_backward(dy, x, w, u, ref.leaf, ref.z, None, ref.grouping, depth, config=base_b)[0]
        for direction, caps in REGISTER_CAPS.items():
            for cap in caps:
                f_cfg = dataclasses.replace(base_f, max_registers=cap if direction == "fwd" else None)
                b_cfg = dataclasses.replace(base_b, max_registers=cap if direction == "bwd" else None)
                with torch.no_grad():
                    res = tt.tree_forward(x, w, b, u, depth, config=f_cfg)
                    dx = tt.tree_backward(dy, x, w, u, res.leaf, res.z, None, res.grouping, depth, config=b_cfg)[0]
                    same = torch.equal(res.leaf, ref.leaf) and torch.allclose(res.y.float(), ref.y.float(), atol=1e-2) \
                        and torch.allclose(dx.float(), ref_dx.float(), atol=5e-2, rtol=1e-2)  # fmt: skip
                    if direction == "fwd":
                        t = best_of(lambda: tt.tree_forward(x, w, b, u, depth, config=f_cfg))
                        t_rec = best_of(lambda: tt.tree_forward(x, w, b, u, depth, stats=stats, config=f_cfg))
                    else:
                        t = best_of(lambda: tt.tree_backward(dy, x, w, u, res.leaf, res.z, None, res.grouping, depth,
                                                             config=b_cfg))  # fmt: skip
                        t_rec = float("nan")
                rows.append({"d": d, "depth": depth, "direction": direction, "cap": cap, "ms": t, "rec_ms": t_rec,
                             "same": same})  # fmt: skip
                console.print(f"d={d} depth={depth} {direction} maxnreg={cap}: {t:.4f} ms"
                              + (f", with recording {t_rec:.4f}" if direction == "fwd" else "")
                              + ("" if same else "  [red]OUTPUT DIFFERS[/]"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also sweep tiles and subtree sizes at 16k tokens")
    parser.add_argument("--quick", action="store_true", help="tokens 32 and 16384 only")
    parser.add_argument("--registers", action="store_true", help="only sweep a register cap on the subtree launches")
    parser.add_argument("--shapes", choices=("one", "many", "all"), default="all",
                        help="one deep tree per layer, the many-tree layers of the training configs, or both")
    parser.add_argument("--no-fff", action="store_true", help="skip fastfeedforward (slow: a Python loop)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tree_kernels.py needs a CUDA GPU")
    console = Console(width=200)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    console.print(f"{device}, torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {bw / 1e9:.2f} TB/s")
    results: dict = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "copy_tb_s": bw / 1e9}
    if args.sweep:
        results["sweep"] = sweep(console)
    if args.registers:
        results["registers"] = register_sweep(console)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    try:
        import fastfeedforward  # noqa: F401

        with_fff = not args.no_fff
    except ImportError:
        with_fff = False
    rows = []
    shapes = [(d, 1, depth) for d, depth in SHAPES] if args.shapes != "many" else []
    shapes += MANY_TREES if args.shapes != "one" else []
    for d, trees, depth in shapes:
        for n in [32, 16384] if args.quick else TOKENS:
            row = {"d": d, "trees": trees, "depth": depth, "tokens": n,
                   **time_row(n, d, depth, bw, with_fff, None, trees=trees)}  # fmt: skip
            rows.append(row)
            console.print(f"d {d}, {trees}x{depth}, {n} tokens: fwd dense/kernel {row['dense'] / row['kernel']:.2f}, "
                          f"fwd+bwd {row['dense_fb'] / row['kernel_fb']:.2f}")  # fmt: skip
    results["table"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for title, suffix in (("forward", ""), ("forward + backward", "_fb")):
        table = Table(title=f"Tree FFN {title}, {device}, bf16, median ms (ratios: dense / variant; kernel / floor)")
        for name in ("d, trees x depth", "tokens", "dense", "reference", "fff eval", "kernel", "kernel eager", "kernel+rec",
                     "rec cost", "floor", "dense/kernel", "kernel/floor"):  # fmt: skip
            table.add_column(name, justify="right")
        for r in rows:
            k, kr, dn, fl = r["kernel" + suffix], r["kernel_rec" + suffix], r["dense" + suffix], r["floor" + suffix]
            fff = r.get("fff") if not suffix else None
            table.add_row(
                f"{r['d']}, {r['trees']}x{r['depth']}", str(r["tokens"]), f"{dn:.4f}", f"{r['reference' + suffix]:.4f}",
                f"{fff:.2f}" if fff is not None else "-", f"{k:.4f}", f"{r['kernel_eager' + suffix]:.4f}", f"{kr:.4f}",
                f"{kr / k - 1:+.1%}",
                f"{fl:.4f}", f"{dn / k:.1f}x", f"{k / fl:.1f}x",
            )  # fmt: skip
        console.print(table)
    console.print("do_bench medians, L2 flushed before each call; min(eager, CUDA graph) except 'kernel eager'")


if __name__ == "__main__":
    main()
