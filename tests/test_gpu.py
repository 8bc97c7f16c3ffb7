"""On a CUDA device: the layer and the recorder's asynchronous copies agree with the CPU. Skipped without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import check_tree_invariants

import routescope
from routescope import Recorder, TreeFFN

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]


def test_layer_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    cpu = TreeFFN(64, 32, 6, trees=3).double()
    gpu = TreeFFN(64, 32, 6, trees=3).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    for layer in (cpu, gpu):
        layer.recording = True
    x = torch.randn(4096, 64, dtype=torch.float64)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x))
    for name, value in cpu.routing_stats().items():
        torch.testing.assert_close(gpu.routing_stats()[name].cpu(), value, msg=name)


def test_bf16_autocast_forward_and_backward() -> None:
    torch.manual_seed(1)
    layer = TreeFFN(256, 256, 8, trees=2).cuda()
    layer.recording = True
    x = torch.randn(8, 512, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).mean().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    stats = layer.routing_stats()
    assert int(stats["tokens"]) == 4096 and torch.equal(stats["node_visits"][:, 0], torch.full((2,), 4096, device="cuda"))


def test_recorder_on_cuda(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(TreeFFN(32, 32, 5, trees=2), TreeFFN(32, 32, 4)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "cuda.h5"
    with Recorder(model, path, every=4, sample_tokens=16) as rec:
        for _ in range(20):
            ids = torch.randint(0, 256, (8, 64), device="cuda")
            loss = model(torch.randn(8, 64, 32, device="cuda")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss, token_ids=ids)
    assert check_tree_invariants(path) == 5
    ds = routescope.open(path)
    assert np.all(ds["tokens"].values == 4 * 512)
    assert routescope.open(path, group="traces").sizes["sample"] == 5 * 16


# ---- Triton kernels at real shapes (tolerances: METHOD.md's ‖out − ref‖/‖ref‖) ----
REAL_SHAPES = [
    # tokens, d_model, depth, trees, activation, placement, dtype, tolerance
    (16384, 768, 11, 1, "gelu", "node", torch.bfloat16, 1e-2),
    (8192, 2048, 12, 1, "gelu", "node", torch.bfloat16, 1e-2),
    (16384, 768, 11, 1, "gelu", "node", torch.float32, 1e-4),
    (12000, 512, 8, 4, "relu", "output", torch.bfloat16, 1e-2),
    (4099, 256, 6, 2, "silu", "node", torch.float16, 1e-2),
]


@pytest.mark.parametrize("case", REAL_SHAPES, ids=lambda c: f"n{c[0]}-d{c[1]}-depth{c[2]}-T{c[3]}-{c[4]}-{c[5]}-{str(c[6])[6:]}")
def test_triton_kernels_at_real_shapes(case: tuple) -> None:
    from routescope.kernels import tree_ops
    from routescope.kernels import tree_triton as tt
    from routescope.kernels.tree_reference import accumulate_tree_stats, neuron_forward, new_tree_stats

    n, d, depth, trees, activation, placement, dtype, tol = case
    torch.manual_seed(n + d)
    units = 2 ** (depth + 1) - 1
    x = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(trees, units, d, device="cuda") / d**0.5).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(trees, units, device="cuda")).to(dtype).requires_grad_()
    u = (torch.randn(trees, units, d, device="cuda") / (trees * (depth + 1)) ** 0.5).to(dtype).requires_grad_()
    stats = new_tree_stats(trees, depth, device="cuda")
    y, leaf, z = tree_ops.tree_ffn(x, w, b, u, depth, activation, placement, stats)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b, u], dy)
    # Reference in float64 on upcast inputs, with the kernel's routing held fixed.
    params64 = [p.detach().double().requires_grad_() for p in (x, w, b, u)]
    path = tt.leaf_to_path(leaf, depth)
    y_ref, routing = neuron_forward(*params64[:3], params64[3], depth, activation, placement, path=path)
    grads_ref = torch.autograd.grad(y_ref, params64, dy.double())

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return float((a.detach().double() - ref.detach()).norm() / ref.detach().norm())

    assert rel(y, y_ref) < tol
    for name, g, g_ref in zip("xwbu", grads, grads_ref):
        assert rel(g, g_ref) < tol, f"d{name}: {rel(g, g_ref):.2e}"
    # Where the kernel's routing differs from the float64 reference's own, z must be a near-tie.
    z_ref = routing.z.detach()
    went_right = path[:, :, 1:] == 2 * path[:, :, :-1] + 2
    disagree = went_right != (z_ref[:, :, :-1] > 0)
    near_ties = z_ref[:, :, :-1][disagree].abs()
    assert near_ties.numel() == 0 or float(near_ties.max()) < 1e-3
    # Counts: exact against the reference's accumulation of the same routing.
    expected = new_tree_stats(trees, depth, device="cuda")
    accumulate_tree_stats(expected, routing._replace(z=z.double()), depth)
    for name in ("tokens", "node_visits", "node_right", "leaf_visits"):
        assert torch.equal(stats[name], expected[name]), name
    for name in ("node_act_sum", "node_act_sqsum", "leaf_act_sum", "leaf_act_sqsum"):
        assert rel(stats[name], expected[name]) < 1e-5, name


def test_layer_auto_backend_uses_triton_and_records() -> None:
    layer = TreeFFN(256, 256, 8, trees=2, backend="auto").cuda()
    ref = TreeFFN(256, 256, 8, trees=2, backend="torch").cuda()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 300, 256, device="cuda")
    assert layer.uses_triton(x) and not ref.uses_triton(x)
    for m in (layer, ref):
        m.recording = True
        m(x).sum().backward()
    for name in ("tokens", "node_visits", "node_right", "leaf_visits"):
        assert torch.equal(layer.routing_stats()[name], ref.routing_stats()[name]), name
    torch.testing.assert_close(layer.w.grad, ref.w.grad, rtol=1e-3, atol=1e-4)


def test_compiled_cuda_graphs_record_as_eager() -> None:
    """torch.compile(fullgraph=True, mode="reduce-overhead") of tree layers under bf16 autocast: CUDA graphs are
    used (no cudagraph skip), and over steps that replay them the accumulators equal eager's (counts exactly;
    float sums to atomics' rounding). The layers' inputs are bit-identical in both (a single-tree first layer
    has no atomic sums), so every routing decision agrees."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(3)
    eager = torch.nn.Sequential(TreeFFN(256, 256, 8, backend="triton"), TreeFFN(256, 256, 7, trees=3, backend="triton"))
    eager = eager.cuda()
    graphed = copy.deepcopy(eager)
    for layer in (*eager, *graphed):
        layer.recording = True
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(graphed, fullgraph=True, mode="reduce-overhead")
    for _ in range(6):
        x = torch.randn(2048, 256, device="cuda")
        for model in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(x)
            y.float().square().mean().backward()
    torch.cuda.synchronize()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for layer_e, layer_g in zip(eager, graphed):
        for name, value in layer_e.routing_stats().items():
            got = layer_g.routing_stats()[name]
            if value.dtype == torch.int64:
                assert torch.equal(got, value), name
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-3, msg=name)
        assert int(layer_g.tokens) == 6 * 2048
    for p_e, p_g in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(p_g.grad, p_e.grad, rtol=2e-2, atol=1e-3)
