"""The tree kernels as registered torch operators (issue 19, part 2): schema, fake and autograd registrations
(`torch.library.opcheck`), and a `TreeFFN` model captured whole by `torch.compile(fullgraph=True)` that trains
and records exactly as eager does. On the CPU the kernels run in Triton's interpreter at small shapes."""

from __future__ import annotations

import copy

import pytest
import torch

from routescope import TreeFFN
from routescope.kernels import tree_ops
from routescope.kernels import tree_triton as tt

pytestmark = pytest.mark.skipif(not tt.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = tt.KernelConfig(block_m=16, block_k=16, block_o=16, sub_levels=2, num_warps=1, num_stages=1)



def test_config_round_trips_through_the_operator_schema() -> None:
    for cfg in (None, SMALL, tt.KernelConfig(max_registers=96)):
        assert tree_ops.config_from_list(tree_ops.config_to_list(cfg)) == cfg


def test_stat_layout_covers_every_accumulator_once() -> None:
    """The two flat buffers hold each forward statistic at its own offset, with the accumulator's shape and dtype."""
    from routescope.kernels.tree_reference import new_tree_stats

    trees, depth = 3, 4
    layout, n_counts, n_sums = tree_ops.stat_layout(trees, depth)
    ref = new_tree_stats(trees, depth)
    assert [name for name, *_ in layout] == list(tt.FORWARD_STATS)
    counts, sums = torch.arange(n_counts), torch.arange(n_sums, dtype=torch.float64)
    views = tree_ops.stat_views(counts, sums, trees, depth)
    for group, flat in ((tree_ops.COUNT_NAMES, counts), (tree_ops.SUM_NAMES, sums)):
        cat = torch.cat([views[name].reshape(-1) for name in group])
        assert torch.equal(cat.sort().values, flat), "views overlap or leave gaps"
        for name in group:
            assert views[name].shape == ref[name].shape and views[name].dtype == ref[name].dtype, name


@pytest.mark.parametrize("placement,forced", [("node", False), ("output", False), ("node", True)])
@pytest.mark.parametrize("record", [False, True])
def test_opcheck_forward(seed: int, placement: str, forced: bool, record: bool) -> None:
    """torch.library.opcheck: schema, fake tensors (static and dynamic shapes), autograd registration. Its AOT
    dispatch checks compare every output of two calls, and `perm` is a workspace whose tail past each subtree's
    count is left uninitialised (and on a GPU in atomic order): the compile tests below check AOT on what matters."""
    trees, depth, d_in, d_out = 2, 3, 12, 9
    units = 2 ** (depth + 1) - 1
    x = torch.randn(21, d_in, device=DEVICE, requires_grad=True)
    w = (torch.randn(trees, units, d_in, device=DEVICE) / d_in**0.5).requires_grad_()
    b = (0.3 * torch.randn(trees, units, device=DEVICE)).requires_grad_()
    u = torch.randn(trees, units, d_out, device=DEVICE, requires_grad=True)
    force = torch.randint(-1, 2, (trees, 2**depth - 1), device=DEVICE, dtype=torch.int8) if forced else None
    args = (x, w, b, u, force, depth, "gelu", placement, placement == "output", record, tree_ops.config_to_list(SMALL))
    torch.library.opcheck(torch.ops.routescope.tree_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip


@pytest.mark.parametrize("placement,forced", [("node", False), ("output", False), ("node", True)])
def test_eager_function_and_registered_operator_agree(seed: int, placement: str, forced: bool) -> None:
    """Eager calls skip the operator dispatch (`_EagerTreeFFN`); both paths must give the same outputs, gradients
    and recorded statistics, bit for bit on the CPU."""
    from routescope.kernels.tree_reference import new_tree_stats

    trees, depth, d_in, d_out = 3, 3, 12, 9
    units = 2 ** (depth + 1) - 1
    base = [torch.randn(40, d_in), torch.randn(trees, units, d_in) / d_in**0.5, 0.3 * torch.randn(trees, units),
            torch.randn(trees, units, d_out)]  # fmt: skip
    force = torch.randint(-1, 2, (trees, 2**depth - 1), dtype=torch.int8, device=DEVICE) if forced else None
    results = []
    for via_op in (False, True):
        x, w, b, u = (t.to(DEVICE).requires_grad_() for t in base)
        stats = {k: v.to(DEVICE) for k, v in new_tree_stats(trees, depth).items()}
        y, leaf, z = tree_ops.tree_ffn(x, w, b, u, depth, "gelu", placement, stats, SMALL, force, via_op=via_op)
        y.square().sum().backward()
        results.append([y, leaf, z, x.grad, w.grad, b.grad, u.grad, *[stats[k] for k in sorted(stats)]])
    assert all(torch.equal(a, c) for a, c in zip(*results)), f"seed {seed}"
    assert results[0][-1].sum() > 0 or results[0][-2].sum() > 0  # the statistics were written


def _model(trees: int, placement: str) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        TreeFFN(10, 16, depth=4, trees=trees, backend="triton", placement=placement),
        torch.nn.LayerNorm(16),
        TreeFFN(16, 10, depth=3, trees=1, backend="triton"),
    ).to(DEVICE)


def _step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("trees,placement", [(1, "node"), (3, "output")])
def test_fullgraph_compile_trains_and_records_as_eager(seed: int, backend: str, trees: int, placement: str) -> None:
    """The whole model compiles as one graph (fullgraph raises on any break); over three recorded steps the loss,
    every gradient and the accumulators match eager's: counts exactly, float sums to rounding."""
    eager = _model(trees, placement)
    compiled_model = copy.deepcopy(eager)
    for model in (eager, compiled_model):
        for layer in model:
            if isinstance(layer, TreeFFN):
                layer.recording = True
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for _ in range(3):
        x = torch.randn(37, 10, device=DEVICE)
        loss_e, grads_e = _step(eager, x)
        loss_c, grads_c = _step(compiled, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    for layer_e, layer_c in zip(eager, compiled_model):
        if not isinstance(layer_e, TreeFFN):
            continue
        stats_e, stats_c = layer_e.routing_stats(), layer_c.routing_stats()
        assert int(stats_e["tokens"]) == 3 * 37
        for name, value in stats_e.items():
            if value.dtype == torch.int64:
                assert torch.equal(stats_c[name], value), f"{name} (seed {seed})"
            else:
                torch.testing.assert_close(stats_c[name], value, rtol=1e-6, atol=1e-6, msg=f"{name} (seed {seed})")


def test_compiled_layer_stops_recording_when_told(seed: int) -> None:
    """Turning `recording` off after compiling is honoured (a guard, not a baked-in constant): the counts stay put."""
    layer = TreeFFN(10, 10, depth=3, backend="triton").to(DEVICE)
    layer.recording = True
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(20, 10, device=DEVICE))
    assert int(layer.tokens) == 20
    layer.recording = False
    compiled(torch.randn(20, 10, device=DEVICE))
    assert int(layer.tokens) == 20


def test_accumulators_stay_out_of_the_autograd_graph(seed: int) -> None:
    """Only y is differentiable: after a recorded training step no accumulator requires grad, and a second step
    backpropagates on its own (a float by-product left differentiable would chain every step's graph)."""
    layer = TreeFFN(10, 10, depth=3, backend="triton").to(DEVICE)
    layer.recording = True
    for _ in range(2):
        y = layer(torch.randn(20, 10, device=DEVICE))
        y.sum().backward()
        for name, value in layer.routing_stats().items():
            assert not value.requires_grad and value.grad_fn is None, name
