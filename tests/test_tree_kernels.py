"""Triton tree kernels against the torch reference: outputs, every gradient, exact counts.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), at
small shapes with small tiles so that every loop runs several chunks and every mask matters. Inputs
are fresh random draws each run; the seed is in every failure message.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from routescope import TreeFFN
from routescope.kernels import tree_ops
from routescope.kernels import tree_triton as tt
from routescope.kernels.tree_reference import accumulate_tree_stats, neuron_forward, new_tree_stats

pytestmark = pytest.mark.skipif(not tt.available(), reason="triton is not installed")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Interpreter: 16-wide tiles, so d_in 20 / d_out 13 / 37 tokens take several partial chunks.
SMALL = tt.KernelConfig(block_m=16, block_k=16, block_o=16, sub_levels=2, num_warps=1, num_stages=1)



def make_params(trees: int, depth: int, d_in: int, d_out: int, bias: bool, dtype: torch.dtype = torch.float32):
    """Random parameters as leaf tensors that collect gradients; biases large enough to route both ways."""
    units = 2 ** (depth + 1) - 1
    w = (torch.randn(trees, units, d_in, device=DEVICE) / d_in**0.5).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(trees, units, device=DEVICE)).to(dtype).requires_grad_() if bias else None
    u = torch.randn(trees, units, d_out, device=DEVICE).to(dtype).requires_grad_()
    return w, b, u


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (METHOD.md's measure)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_both(x, w, b, u, depth, activation, placement, config):
    """Kernel forward+backward, then the reference with the kernel's routing held fixed; same dy."""
    stats = new_tree_stats(w.shape[0], depth, device=x.device)
    y, leaf, z = tree_ops.tree_ffn(x, w, b, u, depth, activation, placement, stats, config)
    dy = torch.randn_like(y)
    params = [p for p in (x, w, b, u) if p is not None]
    grads = torch.autograd.grad(y, params, dy)
    path = tt.leaf_to_path(leaf, depth)
    y_ref, routing = neuron_forward(x, w, b, u, depth, activation, placement, path=path)
    grads_ref = torch.autograd.grad(y_ref, params, dy.to(y_ref.dtype))
    return (y, leaf, z, grads, stats), (y_ref, routing, grads_ref)


CASES = [
    # n, d_in, d_out, depth, trees, activation, placement, bias, sub_levels (top levels = depth + 1 − sub_levels)
    (37, 20, 13, 3, 2, "gelu", "node", True, 2),  # tokens not a multiple of the block, odd widths
    (1, 16, 16, 1, 1, "relu", "output", False, 1),  # one token, depth 1
    (50, 33, 17, 4, 3, "silu", "output", True, 3),  # several trees (fp32 sums), placement "output"
    (70, 24, 24, 5, 1, "tanh", "node", True, 6),  # the whole tree is one subtree: one launch
    (29, 18, 9, 2, 2, "identity", "node", True, 1),  # subtrees are single leaves
    (33, 17, 21, 3, 1, "gelu_tanh", "output", True, 2),
    (45, 16, 16, 4, 2, "sigmoid", "node", False, 2),  # 8 subtrees, several blocks in some
    (19, 12, 7, 0, 2, "gelu", "node", True, 3),  # depth 0: one neuron per tree, no decisions
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-d{c[3]}-T{c[4]}-{c[5]}-{c[6]}-sub{c[8]}")
def test_forward_backward_and_counts_match_reference(case: tuple, seed: int) -> None:
    n, d_in, d_out, depth, trees, activation, placement, bias, sub = case
    # 16-row blocks and chunks: several blocks per subtree, several chunks per row
    tiles = (16, 16, 16, sub, 1, 1) if not ON_GPU else (16, 32, 32, sub, 4, 2)
    config = tt.KernelConfig(*tiles)
    x = torch.randn(n, d_in, device=DEVICE, requires_grad=True)
    w, b, u = make_params(trees, depth, d_in, d_out, bias)
    (y, leaf, z, grads, stats), (y_ref, routing, grads_ref) = run_both(x, w, b, u, depth, activation, placement, config)
    msg = f"seed {seed}"
    # Routing decided by the kernel equals the reference's own decisions (ties at z == 0 aside).
    _, free = neuron_forward(x.detach(), w.detach(), None if b is None else b.detach(), u.detach(), depth, activation, placement)
    assert torch.equal(tt.leaf_to_path(leaf, depth), free.path), msg
    torch.testing.assert_close(z, routing.z.detach(), rtol=1e-5, atol=1e-5, msg=msg)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5, msg=msg)
    for name, g, g_ref in zip("xwbu" if bias else "xwu", grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, f"d{name}: {rel_err(g, g_ref):.2e} ({msg})"
    expected = new_tree_stats(trees, depth, device=x.device)
    accumulate_tree_stats(expected, free, depth)
    for name, value in expected.items():
        if value.dtype == torch.int64:
            assert torch.equal(stats[name], value), f"{name} ({msg})"
        else:
            torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-5, msg=f"{name} ({msg})")


def test_counts_accumulate_across_calls_and_only_when_recording(seed: int) -> None:
    depth, trees = 3, 2
    w, b, u = make_params(trees, depth, 20, 12, True)
    stats = new_tree_stats(trees, depth, device=DEVICE)
    expected = new_tree_stats(trees, depth, device=DEVICE)
    with torch.no_grad():
        for n in (5, 40):
            x = torch.randn(n, 20, device=DEVICE)
            tt.tree_forward(x, w, b, u, depth, stats=stats, config=SMALL)
            tt.tree_forward(x, w, b, u, depth, stats=None, config=SMALL)  # not recording: adds nothing
            accumulate_tree_stats(expected, neuron_forward(x, w, b, u, depth)[1], depth)
    assert int(stats["tokens"]) == 45, f"seed {seed}"
    for name in ("node_visits", "node_right", "node_fires", "leaf_visits", "leaf_fires"):
        assert torch.equal(stats[name], expected[name]), f"{name} (seed {seed})"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in the interpreter's numpy
def test_nonfinite_z_is_counted_per_tree_and_kept_out_of_the_sums(seed: int) -> None:
    """NaN/inf inputs: counted once per token and tree, sums equal the finite tokens' sums; a NaN or inf
    bias deep in the tree (subtree launch) or at a top node (route-top launch) flags only its visitors."""
    depth, trees, n, d_in = 4, 2, 45, 20
    config = tt.KernelConfig(block_m=16, block_k=16, block_o=16, sub_levels=2, num_warps=1, num_stages=1)  # TOP = 3
    w, b, u = (p.detach() for p in make_params(trees, depth, d_in, 12, True))
    x = torch.randn(n, d_in, device=DEVICE)
    bad_rows = torch.tensor([3, 17, 18, 40])
    x[bad_rows[:3]] = float("nan")
    x[bad_rows[3], 5] = float("inf")
    stats = new_tree_stats(trees, depth, device=DEVICE)
    tt.tree_forward(x, w, b, u, depth, stats=stats, config=config)
    keep = torch.ones(n, dtype=torch.bool)
    keep[bad_rows] = False
    expected = new_tree_stats(trees, depth, device=DEVICE)
    accumulate_tree_stats(expected, neuron_forward(x[keep], w, b, u, depth)[1], depth)
    msg = f"seed {seed}"
    assert stats["nonfinite_tokens"].tolist() == [4, 4], msg
    for name in ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum"):
        assert torch.isfinite(stats[name]).all(), f"{name} ({msg})"
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"{name} ({msg})")
    assert int(stats["node_visits"][:, 0].sum()) == 2 * n, msg  # bad tokens are still routed and counted
    # Non-finite biases: node 1 (top level 1: inf, routes right) and node 9 (level 3, in a subtree: NaN)
    x = torch.randn(n, d_in, device=DEVICE)
    b = b.clone()
    b[0, 1], b[1, 9] = float("inf"), float("nan")
    stats = new_tree_stats(trees, depth, device=DEVICE)
    tt.tree_forward(x, w, b, u, depth, stats=stats, config=config)
    routing = neuron_forward(x, w, b, u, depth)[1]
    expected = new_tree_stats(trees, depth, device=DEVICE)
    accumulate_tree_stats(expected, routing, depth)
    through = [int((routing.path[:, 0] == 1).any(-1).sum()), int((routing.path[:, 1] == 9).any(-1).sum())]
    assert stats["nonfinite_tokens"].tolist() == through == expected["nonfinite_tokens"].tolist(), msg
    for name, value in expected.items():
        if value.dtype == torch.int64:
            assert torch.equal(stats[name], value), f"{name} ({msg})"
        else:
            torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-5, msg=f"{name} ({msg})")


def test_half_precision_inputs_and_fp32_weights(seed: int) -> None:
    """fp16 activations with fp32 weights (the autocast case): fp32 accumulation keeps errors at fp16 level."""
    n, d_in, d_out, depth = 40, 32, 24, 4
    w, b, u = make_params(2, depth, d_in, d_out, True)
    x = torch.randn(n, d_in, device=DEVICE).half().requires_grad_()
    y, leaf, _ = tree_ops.tree_ffn(x, w, b, u, depth, "gelu", "node", None, SMALL if not ON_GPU else None)
    assert y.dtype == torch.float16
    y_ref, _ = neuron_forward(x.float(), w, b, u, depth, "gelu", "node", path=tt.leaf_to_path(leaf, depth))
    assert rel_err(y, y_ref) < 5e-3, f"seed {seed}"
    (dx,) = torch.autograd.grad(y.float().sum(), [x])
    assert dx.dtype == torch.float16 and torch.isfinite(dx).all()


def test_layer_triton_backend_matches_torch_backend(seed: int) -> None:
    """The module on backend='triton': outputs, parameter gradients, accumulators and traces."""
    ref = TreeFFN(24, 16, 4, trees=2, backend="torch")
    fast = TreeFFN(24, 16, 4, trees=2, backend="triton")
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(DEVICE), fast.to(DEVICE)
    x = torch.randn(3, 11, 24, device=DEVICE)
    for layer in (ref, fast):
        layer.recording = layer.trace_next = True
        layer(x).pow(2).sum().backward()
    assert fast.uses_triton(x) and not ref.uses_triton(x)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert rel_err(p_fast.grad, p_ref.grad) < 1e-5, f"{name} (seed {seed})"
    for name, value in ref.routing_stats().items():
        # sums: the kernel adds fp32 partials per block into the float64 accumulators
        torch.testing.assert_close(fast.routing_stats()[name], value, rtol=1e-5, atol=1e-5, msg=f"{name} (seed {seed})")
    assert torch.equal(fast.last_trace.path, ref.last_trace.path)
    assert torch.equal(fast.last_trace.fired, ref.last_trace.fired)
    torch.testing.assert_close(fast.last_trace.z, ref.last_trace.z.float())


def test_backend_choice_and_errors() -> None:
    cpu = torch.zeros(2, 8)
    assert not TreeFFN(8, 8, 2, backend="auto").uses_triton(cpu)  # auto: the reference off CUDA
    assert not TreeFFN(8, 8, 2, variant="leaf_mlp", leaf_width=2, backend="auto").uses_triton(cpu)
    with pytest.raises(ValueError, match="neuron"):
        TreeFFN(8, 8, 2, variant="leaf_mlp", leaf_width=2, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        TreeFFN(8, 8, 2, backend="cuda")


def test_empty_batch() -> None:
    w, b, u = make_params(1, 2, 8, 8, True)
    y, leaf, z, _, _ = tt.tree_forward(torch.zeros(0, 8, device=DEVICE), w, b, u, 2, config=SMALL)
    assert y.shape == (0, 8) and leaf.shape == (0, 1) and z.shape == (0, 1, 3)


def test_leaf_to_path_is_the_heap_path() -> None:
    depth = 3
    leaf = torch.arange(2**depth).view(-1, 1)
    path = tt.leaf_to_path(leaf, depth)
    assert torch.equal(path[:, 0, 0], torch.zeros(2**depth, dtype=torch.long))  # root
    assert torch.equal(path[:, 0, -1], leaf[:, 0] + 2**depth - 1)  # the leaf's heap index
    parent, child = path[:, 0, :-1], path[:, 0, 1:]
    assert torch.all((child == 2 * parent + 1) | (child == 2 * parent + 2))


def test_register_cap_reaches_the_gpu_launch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_registers becomes Triton's `maxnreg` launch option on the GPU; the interpreter, which has no
    registers, never sees it (and a capped config runs there unchanged)."""
    capped = tt.KernelConfig(block_m=16, block_k=16, block_o=16, sub_levels=2, num_warps=1, num_stages=1, max_registers=80)
    gpu = torch.cuda.is_available()  # conftest runs the suite interpreted only where there is no GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert capped.launch_options() == {"num_warps": 1}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert capped.launch_options() == {"num_warps": 1, "maxnreg": 80}
    assert tt.KernelConfig().launch_options() == {"num_warps": 4}
    assert tt.default_config(16384, 768, 768, 11).max_registers == 96  # the forward's GPU default (BENCHMARKS run 8)
    assert tt.default_config(16384, 768, 768, 11, backward=True).max_registers is None
    monkeypatch.setenv("TRITON_INTERPRET", "0" if gpu else "1")  # the launch this machine really makes
    torch.manual_seed(3)
    x, w, b, u = (t.to("cuda" if gpu else "cpu") for t in (torch.randn(20, 8), torch.randn(1, 15, 8), torch.randn(1, 15),
                                                             torch.randn(1, 15, 8)))  # fmt: skip
    plain = tt.tree_forward(x, w, b, u, 3, config=dataclasses.replace(capped, max_registers=None))
    res = tt.tree_forward(x, w, b, u, 3, config=capped)
    assert torch.equal(res.leaf, plain.leaf) and torch.equal(res.y, plain.y)


@pytest.mark.parametrize("depth,trees", [(2, 1), (4, 3)])
def test_forced_routing_matches_the_reference(seed: int, depth: int, trees: int) -> None:
    """Nodes held to one side (a pruned tree): the kernels route, count node_right and compute y as the reference
    does with the same `force`; free nodes still route by the sign of z."""
    x = torch.randn(37, 20, device=DEVICE)
    w, b, u = make_params(trees, depth, 20, 13, bias=True)
    force = torch.randint(-1, 2, (trees, 2**depth - 1), device=DEVICE, dtype=torch.int8)
    stats = new_tree_stats(trees, depth, device=DEVICE)
    with torch.no_grad():
        y, leaf, z = tree_ops.tree_ffn(x, w, b, u, depth, "gelu", "node", stats, SMALL if not ON_GPU else None, force=force)
        y_ref, routing = neuron_forward(x, w, b, u, depth, "gelu", "node", force=force)
    assert torch.equal(tt.leaf_to_path(leaf, depth), routing.path), f"seed {seed}"
    assert rel_err(y, y_ref) < 1e-5, f"seed {seed}"
    expected = new_tree_stats(trees, depth, device=DEVICE)
    accumulate_tree_stats(expected, routing._replace(z=z.double()), depth)
    for name in ("tokens", "node_visits", "node_right", "leaf_visits"):
        assert torch.equal(stats[name], expected[name]), f"{name} (seed {seed})"
    held = force >= 0  # every token through a held node went its way
    visits, right = stats["node_visits"], stats["node_right"]
    assert torch.equal(right[held & (force == 1)], visits[held & (force == 1)])
    assert torch.equal(right[held & (force == 0)], torch.zeros_like(right[held & (force == 0)]))
