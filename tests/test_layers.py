"""TreeFFN against a naive per-token reference, its gradients, accumulators, compile and FFF conversion."""

from __future__ import annotations

import itertools

import pytest
import torch

from routescope import TreeFFN
from routescope.kernels.tree_reference import ACTIVATIONS


def naive_tree(layer: TreeFFN, x: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """One token and one tree at a time, straight from DESIGN.md: returns y (n, d_out) and the paths."""
    s = layer.spec
    act = ACTIVATIONS[s.activation]
    ys, paths = [], []
    for xi in x:
        y = torch.zeros(s.d_out, dtype=x.dtype)
        token_paths = []
        for t in range(s.trees):
            node, path, hidden = 0, [], torch.zeros(s.d_out, dtype=x.dtype)
            for level in range(s.depth + 1):
                path.append(node)
                if s.variant == "leaf_mlp" and level == s.depth:
                    j = node - (2**s.depth - 1)
                    h = xi @ layer.leaf_w1[t, j] + (layer.leaf_b1[t, j] if s.bias else 0)
                    hidden = hidden + act(h) @ layer.leaf_w2[t, j] + (layer.leaf_b2[t, j] if s.bias else 0)
                    break
                z = xi @ layer.w[t, node] + (layer.b[t, node] if s.bias else 0)
                if s.variant == "neuron":
                    hidden = hidden + (act(z) if s.placement == "node" else z) * layer.u[t, node]
                if level < s.depth:
                    node = 2 * node + 1 + int(z > 0)
            y = y + hidden
            token_paths.append(path)
        ys.append(act(y) if s.placement == "output" else y)
        paths.append(token_paths)
    return torch.stack(ys), paths


NEURON_CASES = list(itertools.product([0, 1, 4], [1, 3], ["gelu", "relu", "tanh", "identity"], ["node", "output"], [True, False]))


@pytest.mark.parametrize("depth,trees,activation,placement,bias", NEURON_CASES)
def test_neuron_forward_matches_naive(depth: int, trees: int, activation: str, placement: str, bias: bool) -> None:
    torch.manual_seed(depth * 100 + trees)
    layer = TreeFFN(6, 5, depth, trees=trees, activation=activation, placement=placement, bias=bias).double()
    if bias:
        torch.nn.init.normal_(layer.b, std=0.5)  # non-zero biases must shift the routing too
    x = torch.randn(2, 7, 6, dtype=torch.float64)  # any leading shape
    y = layer(x)
    expected, _ = naive_tree(layer, x.reshape(-1, 6))
    assert y.shape == (2, 7, 5)
    torch.testing.assert_close(y.reshape(-1, 5), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("depth,trees,bias", [(0, 1, True), (1, 2, True), (3, 1, False), (3, 2, True)])
def test_leaf_mlp_forward_matches_naive(depth: int, trees: int, bias: bool) -> None:
    torch.manual_seed(7 + depth)
    layer = TreeFFN(4, 3, depth, trees=trees, variant="leaf_mlp", leaf_width=5, activation="relu", bias=bias).double()
    if bias:
        for p in (layer.b, layer.leaf_b1, layer.leaf_b2):
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(19, 4, dtype=torch.float64)
    expected, _ = naive_tree(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def _margin_inputs(layer: TreeFFN, n: int, seed: int) -> torch.Tensor:
    """Inputs whose path pre-activations all stay away from 0, so finite differences cannot flip a route."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(n, layer.spec.d_in, dtype=torch.float64, generator=g)
        _, routing = layer.route_and_compute(x)
        if routing.z.abs().min() > 1e-3:
            return x


@pytest.mark.parametrize("placement", ["node", "output"])
def test_neuron_gradcheck_with_fixed_routing(placement: str) -> None:
    torch.manual_seed(0)
    layer = TreeFFN(4, 3, 2, trees=2, placement=placement).double()
    torch.nn.init.normal_(layer.b, std=0.3)
    x = _margin_inputs(layer, 6, seed=1).requires_grad_()
    _, routing = layer.route_and_compute(x)
    path = routing.path

    def f(x, w, b, u):
        from routescope.kernels.tree_reference import neuron_forward

        return neuron_forward(x, w, b, u, 2, "gelu", placement, path=path)[0]

    params = [p.detach().clone().requires_grad_() for p in (layer.w, layer.b, layer.u)]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_leaf_mlp_gradcheck_with_fixed_routing() -> None:
    torch.manual_seed(1)
    layer = TreeFFN(3, 2, 2, trees=1, variant="leaf_mlp", leaf_width=3, activation="gelu").double()
    x = _margin_inputs(layer, 5, seed=2).requires_grad_()
    path = layer.route_and_compute(x)[1].path
    names = ("w", "b", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2")
    params = [getattr(layer, n).detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        from routescope.kernels.tree_reference import leaf_mlp_forward

        return leaf_mlp_forward(x, *ps, 2, "gelu", path=path)[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_gradients_reach_only_visited_neurons_and_not_the_choice() -> None:
    torch.manual_seed(3)
    layer = TreeFFN(8, 4, 4, trees=2).double()
    x = torch.randn(3, 8, dtype=torch.float64)  # 3 tokens cannot visit all 31 neurons of a tree
    y, routing = layer.route_and_compute(x)
    y.sum().backward()
    visited = torch.zeros(2, 31, dtype=torch.bool)
    for t in range(2):
        visited[t, routing.path[:, t, :].reshape(-1)] = True
    assert visited.sum() < 62
    for grad in (layer.w.grad, layer.u.grad):
        assert torch.all(grad[~visited] == 0) and torch.all(grad[visited].abs().sum(-1) > 0)
    # routing decided inside the forward gives the same gradients as routing held fixed
    grads = [p.grad.clone() for p in (layer.w, layer.b, layer.u)]
    layer.zero_grad()
    layer.route_and_compute(x, path=routing.path)[0].sum().backward()
    for before, p in zip(grads, (layer.w, layer.b, layer.u)):
        torch.testing.assert_close(p.grad, before)


def test_accumulators_match_naive_counts_and_sums() -> None:
    torch.manual_seed(4)
    depth, trees = 3, 2
    layer = TreeFFN(5, 5, depth, trees=trees, activation="relu").double()
    torch.nn.init.normal_(layer.b, std=0.5)
    layer.recording = True
    xs = [torch.randn(11, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)]
    visits = torch.zeros(trees, 2**depth - 1, dtype=torch.int64)
    right, fires = torch.zeros_like(visits), torch.zeros_like(visits)
    act_sum = torch.zeros(trees, 2**depth - 1, dtype=torch.float64)
    leaves = torch.zeros(trees, 2**depth, dtype=torch.int64)
    leaf_sum = torch.zeros(trees, 2**depth, dtype=torch.float64)
    for x in xs:
        layer(x)
        for xi in x.reshape(-1, 5):
            for t in range(trees):
                node = 0
                for level in range(depth):
                    z = xi @ layer.w[t, node] + layer.b[t, node]
                    visits[t, node] += 1
                    right[t, node] += int(z > 0)
                    fires[t, node] += int(torch.relu(z) != 0)
                    act_sum[t, node] += z
                    node = 2 * node + 1 + int(z > 0)
                leaves[t, node - (2**depth - 1)] += 1
                leaf_sum[t, node - (2**depth - 1)] += xi @ layer.w[t, node] + layer.b[t, node]
    stats = layer.routing_stats()
    assert int(stats["tokens"]) == 19
    assert torch.equal(stats["node_visits"], visits)
    assert torch.equal(stats["node_right"], right)
    assert torch.equal(stats["node_fires"], fires)
    assert torch.equal(stats["leaf_visits"], leaves)
    torch.testing.assert_close(stats["node_act_sum"], act_sum.detach())
    torch.testing.assert_close(stats["leaf_act_sum"], leaf_sum.detach())
    layer.reset_routing_stats()
    assert all(int(t.abs().sum()) == 0 for t in layer.routing_stats().values())


def test_accumulates_only_when_recording_and_training() -> None:
    layer = TreeFFN(4, 4, 2)
    x = torch.randn(10, 4)
    layer(x)
    assert int(layer.tokens) == 0  # recording is off by default
    layer.recording = True
    layer.eval()
    layer(x)
    assert int(layer.tokens) == 0  # validation passes stay out of the counts
    layer.record_eval = True
    layer(x)
    layer.train()
    layer(x)
    assert int(layer.tokens) == 20


def test_trace_keeps_the_path_of_the_armed_forward() -> None:
    torch.manual_seed(5)
    layer = TreeFFN(4, 4, 3, trees=2)
    layer.recording = layer.trace_next = True
    x = torch.randn(3, 5, 4)
    layer(x)
    trace = layer.last_trace
    assert trace.path.shape == (15, 2, 4) and trace.z.shape == (15, 2, 4)
    _, routing = layer.route_and_compute(x.reshape(-1, 4))
    assert torch.equal(trace.path, routing.path)


def test_works_under_torch_compile() -> None:
    """No hooks: the accumulators update inside the compiled forward exactly as in eager mode."""
    torch.manual_seed(6)
    eager = TreeFFN(8, 8, 3, trees=2)
    compiled_layer = TreeFFN(8, 8, 3, trees=2)
    compiled_layer.load_state_dict(eager.state_dict())
    for layer in (eager, compiled_layer):
        layer.recording = True
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)  # no graph break
    for _ in range(3):
        x = torch.randn(32, 8)
        torch.testing.assert_close(compiled(x), eager(x))
    for name, value in eager.routing_stats().items():
        torch.testing.assert_close(compiled_layer.routing_stats()[name], value, msg=name)
    assert int(compiled_layer.tokens) == 96
    compiled_layer.trace_next = eager.trace_next = True  # the recorder arms traces the same way
    x = torch.randn(16, 8)
    compiled(x), eager(x)
    assert torch.equal(compiled_layer.last_trace.path, eager.last_trace.path)


@pytest.mark.parametrize(
    "kwargs",
    [{"variant": "moe"}, {"activation": "swish2"}, {"placement": "input"}, {"backend": "cuda"},
     {"variant": "leaf_mlp"}, {"variant": "leaf_mlp", "leaf_width": 4, "placement": "output"}, {"depth": -1}],
)  # fmt: skip
def test_bad_options_are_rejected(kwargs: dict) -> None:
    args = {"d_in": 4, "d_out": 4, "depth": 2, **kwargs}
    with pytest.raises(ValueError):
        TreeFFN(**args)


def test_wrong_input_width_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        TreeFFN(4, 4, 2)(torch.randn(3, 5))


# ------------------------------------------------------------------ fastfeedforward conversion

fastfeedforward = pytest.importorskip("fastfeedforward")


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("activation", [torch.nn.ReLU(), torch.nn.GELU()])
def test_from_fastfeedforward_matches_eval_forward(depth: int, activation: torch.nn.Module) -> None:
    torch.manual_seed(depth)
    fff = fastfeedforward.FFF(12, 6, 9, depth, activation=activation).eval()
    layer = TreeFFN.from_fastfeedforward(fff).eval()
    x = torch.randn(4, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fff(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_from_fastfeedforward_with_output_bias_matches_hard_training_forward(depth: int) -> None:
    """fastfeedforward's eval path fails at depth 0; its hardened training path is the reference there."""
    torch.manual_seed(10 + depth)
    fff = fastfeedforward.FFF(8, 4, 5, depth)
    layer = TreeFFN.from_fastfeedforward(fff, output_bias=True)
    x = torch.randn(33, 8)
    with torch.no_grad():
        expected = fff.training_forward(x, use_hard_decisions=True)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
