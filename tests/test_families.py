"""The L1-sparse and MoE layer families: layers against plain-torch restatements, their accumulators on
known-by-construction inputs, and recorded files (read back with plain h5py) whose invariants hold."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import check_tree_invariants
from torch import nn

import routescope
from routescope import Recorder, TreeFFN
from routescope.layers import L1SparseFFN, TopKMoE, aux_loss, find_routed_layers
from routescope.store.schema import TREE, active_bin_edges

# ------------------------------------------------------------------------------------------ L1 layer


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_l1_matches_plain_torch(gated: bool, bias: bool) -> None:
    torch.manual_seed(0)
    layer = L1SparseFFN(6, 20, 5, l1_coef=0.3, bias=bias, gated=gated)
    x = torch.randn(2, 7, 6)
    g = F.relu(F.linear(x, layer.gate.weight, layer.gate.bias))
    h = g * F.linear(x, layer.up.weight, layer.up.bias) if gated else g
    expected = F.linear(h, layer.down.weight, layer.down.bias)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.l1_loss(), 0.3 * g.abs().mean())
    layer.l1_loss().backward()  # the penalty is in the graph and reaches the gate
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


def test_l1_accumulators_known_by_construction() -> None:
    """Gate = identity: token i fires exactly the units where its input is positive."""
    layer = L1SparseFFN(8, 8, 3)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(8))
    x = -torch.ones(4, 8)
    x[0, :3] = 1  # 3 units
    x[1, 2:8] = 1  # 6 units
    x[2, 0] = 1  # 1 unit
    # token 3 fires nothing
    layer(x)
    assert int(layer.tokens) == 0, "nothing is accumulated unless recording"
    layer.recording = layer.trace_next = True
    layer(x)
    fires = (x > 0).long().sum(0)
    assert int(layer.tokens) == 4 and int(layer.active_sum) == 10
    assert layer.unit_fires.tolist() == fires.tolist()
    edges = active_bin_edges(8)
    expected = np.histogram([3, 6, 1, 0], bins=edges)[0]
    assert layer.active_hist.tolist() == expected.tolist() and int(layer.active_hist.sum()) == 4
    assert layer.last_trace.tolist() == [3, 6, 1, 0]
    layer.eval()
    layer(x)
    assert int(layer.tokens) == 4, "eval passes stay out unless record_eval"
    layer.record_eval = True
    layer(x)
    assert int(layer.tokens) == 8
    layer.reset_routing_stats()
    assert all(int(t.sum()) == 0 for t in layer.routing_stats().values())


def test_active_bins_are_fixed_and_log_spaced() -> None:
    edges = active_bin_edges(2048)
    assert list(edges[:15]) == list(range(15)) and edges[15] == 16  # one count wide at the bottom
    assert edges[-1] > 2048 >= edges[-2]
    ratio = edges[2:] / edges[1:-1]
    assert np.all(np.diff(edges) > 0) and np.all(ratio[edges[1:-1] >= 16] < 1.12) and np.all(ratio[edges[1:-1] > 500] < 1.095)
    assert list(active_bin_edges(100)) == list(edges[: len(active_bin_edges(100))])  # one fixed sequence


# ------------------------------------------------------------------------------------------ MoE layer


def moe_reference(layer: TopKMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[list[bool]]]:
    """Token-by-token restatement: softmax router, top-k, renormalise, serve rank by rank under capacity."""
    s = layer.spec
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    weights, chosen = probs.topk(s.k, -1)
    weights = weights / weights.sum(-1, keepdim=True) if s.renormalize else weights
    n = x.shape[0]
    cap = math.inf if s.capacity_factor is None else math.ceil(s.capacity_factor * n * s.k / s.experts)
    taken = [0] * s.experts
    kept = [[False] * s.k for _ in range(n)]
    for rank in range(s.k):
        for i in range(n):
            e = int(chosen[i, rank])
            if taken[e] < cap:
                taken[e] += 1
                kept[i][rank] = True
    y = torch.zeros(n, s.d_out)
    for i in range(n):
        for rank in range(s.k):
            if kept[i][rank]:
                e = int(chosen[i, rank])
                h = F.gelu(x[i] @ layer.w1[e] + layer.b1[e])
                y[i] += weights[i, rank] * (h @ layer.w2[e] + layer.b2[e])
    return y, chosen, kept


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_matches_plain_torch(k: int, capacity_factor: float | None) -> None:
    torch.manual_seed(k)
    layer = TopKMoE(6, 5, experts=4, k=k, expert_width=7, capacity_factor=capacity_factor)
    x = torch.randn(3, 9, 6)
    y = layer(x)
    expected, chosen, kept = moe_reference(layer, x.reshape(-1, 6))
    torch.testing.assert_close(y.reshape(-1, 5), expected, rtol=1e-5, atol=1e-6)
    _, chosen_layer, _, kept_layer = layer.route(x.reshape(-1, 6))
    assert torch.equal(chosen_layer, chosen) and kept_layer.tolist() == kept


def test_moe_accumulators_and_invariants() -> None:
    torch.manual_seed(3)
    layer = TopKMoE(6, 6, experts=5, k=2, capacity_factor=0.8)
    layer.recording = layer.trace_next = True
    x = torch.randn(40, 6)
    layer(x)
    _, chosen, kept = moe_reference(layer, x)
    kept = torch.tensor(kept)
    n, k, e = 40, 2, 5
    assert int(layer.tokens) == n
    assert int(layer.expert_tokens.sum()) == k * n - int(layer.dropped_tokens) and int(layer.dropped_tokens) > 0
    expected = torch.zeros(e, dtype=torch.long).index_add_(0, chosen[kept], torch.ones(int(kept.sum()), dtype=torch.long))
    assert layer.expert_tokens.tolist() == expected.tolist()
    assert int(layer.expert_tokens.max()) <= math.ceil(0.8 * n * k / e)
    co = layer.coselect
    assert torch.equal(co, co.t()) and int(co.diagonal().sum()) == k * n
    for i in range(e):
        for j in range(e):
            both = ((chosen == i).any(-1) & (chosen == j).any(-1)).sum()
            assert int(co[i, j]) == int(both)
    with torch.no_grad():
        probs = torch.softmax(x @ layer.router.weight.t(), -1)
    entropy = -(probs * probs.log2()).sum()
    assert float(layer.router_entropy_sum) == pytest.approx(float(entropy), rel=1e-5)
    assert layer.router_prob_sum.sum().item() == pytest.approx(n, rel=1e-6)
    experts, weights, kept_trace = layer.last_trace
    assert torch.equal(experts, chosen) and kept_trace.tolist() == kept.tolist()


def test_moe_uniform_router_and_balance_loss() -> None:
    layer = TopKMoE(4, 4, experts=8, k=2, balance_coef=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer.recording = True
    layer(torch.randn(10, 4))
    assert float(layer.router_entropy_sum) == pytest.approx(10 * 3.0)  # log2 8 bits per token
    # f_e P_e with P_e = 1/8: the balance loss is E * sum_e f_e / 8 = 1 whatever the choices, times the coef
    assert float(layer.aux_loss().detach()) == pytest.approx(0.5)
    assert float(TopKMoE(4, 4, experts=8, k=2).aux_loss()) == 0.0


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: TopKMoE(4, 4, experts=3, k=4), "k <= experts"),
        (lambda: TopKMoE(4, 4, experts=3, k=0), "k <= experts"),
        (lambda: TopKMoE(4, 4, experts=3, k=1, capacity_factor=0), "capacity_factor"),
        (lambda: TopKMoE(4, 4, activation="swish"), "activation"),
        (lambda: TopKMoE(4, 4, expert_width=0), "expert_width"),
        (lambda: L1SparseFFN(4, 0, 4), "d_hidden"),
        (lambda: L1SparseFFN(4, 4, 4, l1_coef=-1), "l1_coef"),
        (lambda: TopKMoE(4, 4)(torch.randn(2, 5)), r"\(\.\.\., 4\)"),
        (lambda: L1SparseFFN(4, 8, 4)(torch.randn(2, 5)), r"\(\.\.\., 4\)"),
    ],
)
def test_bad_input_is_a_clear_value_error(make, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        make()


# ------------------------------------------------------------------------------------------ recorded files


class Mixed(nn.Module):
    """Every family in one model: embedding -> tree -> L1 -> MoE -> L1."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.tree = TreeFFN(8, 8, 2, trees=2)
        self.sparse = L1SparseFFN(8, 24, 8, l1_coef=0.1)
        self.moe = TopKMoE(8, 8, experts=4, k=2, expert_width=8, capacity_factor=0.75)
        self.last = L1SparseFFN(8, 12, 8, gated=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.last(self.moe(self.sparse(self.tree(self.embed(ids)))))


def train_mixed(path: Path, steps: int = 7, every: int = 3, sample_tokens: int = 5) -> tuple[Mixed, list]:
    """Train a Mixed model a few steps under a Recorder; return it and (ids, weights before the step) per step."""
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    history = []
    with Recorder(model, path, every=every, sample_tokens=sample_tokens) as rec:
        for _ in range(steps):
            ids = torch.randint(0, 50, (3, 8), generator=g)
            history.append((ids, copy.deepcopy(model.state_dict())))
            loss = model(ids).pow(2).mean() + aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss, token_ids=ids)
    return model, history


def test_find_routed_layers_and_aux_loss() -> None:
    model = Mixed()
    assert [name for name, _ in find_routed_layers(model)] == ["tree", "sparse", "moe", "last"]
    model(torch.randint(0, 50, (2, 3)))
    expected = model.sparse.l1_loss() + model.last.l1_loss() + model.moe.aux_loss()
    torch.testing.assert_close(aux_loss(model), expected)
    assert aux_loss(nn.Linear(2, 2)) == 0.0


def test_mixed_model_file_invariants_plain_h5py(tmp_path: Path) -> None:
    path = tmp_path / "mixed.h5"
    train_mixed(path)
    assert check_tree_invariants(path) == 3
    with h5py.File(path, "r") as f:
        assert {"tree", "l1", "moe", "run", "traces"} <= set(f)
        l1, moe = f["l1"], f["moe"]
        assert list(l1["step"][:]) == list(moe["step"][:]) == [3, 6, 7]
        assert [s.decode() for s in l1["layer_name"][:]] == ["sparse", "last"] and list(l1["layer_units"][:]) == [24, 12]
        layer_tokens = l1["layer_tokens"][:]  # (step, layer)
        assert np.all(layer_tokens == np.array([72, 72, 24])[:, None]) and list(l1["tokens"][:]) == [72, 72, 24]
        fires = l1["unit_fires"][:]
        assert fires.dtype == np.int64 and fires.shape == (3, 2, 24)
        assert np.all(fires[:, 1, 12:] == 0)  # the narrower layer is padded with zeros
        assert np.array_equal(fires.sum(-1), l1["active_sum"][:])  # Σ_unit unit_fires == active_sum
        assert np.array_equal(l1["active_hist"][:].sum(-1), layer_tokens)  # Σ_bin active_hist == tokens
        edges = l1["active_hist"].attrs["bin_edges"]
        assert list(l1["bin"][:]) == list(edges[:-1]) == list(active_bin_edges(24)[:-1])
        k = int(moe["layer_k"][0])
        assert np.array_equal(moe["expert_tokens"][:].sum(-1), k * moe["layer_tokens"][:] - moe["dropped_tokens"][:])
        assert moe["dropped_tokens"][:].sum() > 0
        co = moe["coselect"][:]
        assert np.array_equal(co, co.transpose(0, 1, 3, 2))
        assert np.array_equal(np.trace(co, axis1=2, axis2=3), k * moe["layer_tokens"][:])
        assert moe["layer_capacity_factor"][0] == 0.75 and moe["layer_experts"][0] == 4
        traces = f["traces"]
        # sampled at the last step of each full interval (the partial last one has none): 2 x 5 tokens
        assert traces["l1_active"].shape == (10, 2) and traces["moe_expert"].shape == (10, 1, 2)
        assert np.all((traces["l1_active"][:, 1] >= 0) & (traces["l1_active"][:, 1] <= 12))
        chosen = traces["moe_expert"][:, 0]
        assert np.all(chosen[:, 0] != chosen[:, 1]) and set(np.unique(traces["moe_kept"][:])) <= {0, 1}
        np.testing.assert_allclose(traces["moe_weight"][:].sum(-1), 1, rtol=1e-5)


def test_recorded_counts_equal_an_independent_replay(tmp_path: Path) -> None:
    """The batches replayed through the model's weights of each step give exactly the recorded counts and traces."""
    path = tmp_path / "replay.h5"
    _, history = train_mixed(path, steps=6, every=2, sample_tokens=4)
    replay = Mixed()
    fires = np.zeros((3, 24), dtype=np.int64)
    expert = np.zeros((3, 4), dtype=np.int64)
    last_active = {}
    for step, (ids, weights) in enumerate(history):
        replay.load_state_dict(weights)
        with torch.no_grad():
            g, _ = replay.sparse.hidden(replay.tree(replay.embed(ids)).reshape(-1, 8))
            _, _, _, kept = replay.moe.route(replay.sparse(replay.tree(replay.embed(ids))).reshape(-1, 8))
            _, chosen, _, _ = replay.moe.route(replay.sparse(replay.tree(replay.embed(ids))).reshape(-1, 8))
        fires[step // 2] += (g > 0).sum(0).numpy()
        np.add.at(expert[step // 2], chosen[kept].numpy(), 1)
        last_active[step + 1] = (g > 0).sum(-1)
    l1 = routescope.open(path, group="l1")
    np.testing.assert_array_equal(l1["unit_fires"].sel(layer=0).values, fires)
    np.testing.assert_array_equal(routescope.open(path, group="moe")["expert_tokens"].sel(layer=0).values, expert)
    traces = routescope.open(path, group="traces")
    for i in range(traces.sizes["sample"]):
        step, seq, pos = (int(traces[v][i]) for v in ("sample_step", "sequence", "position"))
        assert int(traces["l1_active"].sel(l1_layer=0)[i]) == int(last_active[step][seq * 8 + pos])


def test_open_names_the_dims(tmp_path: Path) -> None:
    path = tmp_path / "mixed.h5"
    train_mixed(path, steps=3)
    l1 = routescope.open(path, group="l1")
    assert l1["unit_fires"].dims == ("step", "layer", "unit") and l1["active_hist"].dims == ("step", "layer", "bin")
    assert list(l1["bin"].values[:4]) == [0, 1, 2, 3] and list(l1["layer_name"].values) == ["sparse", "last"]
    moe = routescope.open(path, group="moe")
    assert moe["coselect"].dims == ("step", "layer", "expert", "other_expert")
    assert [layer["name"] for layer in __import__("json").loads(moe.attrs["layers"])] == ["moe"]
    tree = routescope.open(path, group="tree")
    assert list(tree["layer_name"].values) == ["tree"] and tree.sizes["layer"] == 1


TREE_GROUP_BEFORE = {  # the tree group's datasets before the L1/MoE families existed: unchanged
    "step", "layer", "tree", "node", "leaf", "layer_name", "layer_depth", "layer_trees", "tokens", "layer_tokens",
    "node_visits", "node_right", "node_fires", "node_act_sum", "node_act_sqsum", "leaf_visits", "leaf_fires",
    "leaf_act_sum", "leaf_act_sqsum",
}  # fmt: skip
TRACES_BEFORE = {"sample", "layer", "tree", "level", "context", "sample_step", "token_id", "sequence", "position",
                 "context_ids", "leaf", "path_act"}  # fmt: skip


def test_tree_only_files_keep_their_layout(debug_run: Path) -> None:
    with h5py.File(debug_run, "r") as f:
        # `probe` is the optional group added since (routing stability; `record` writes it by default)
        assert set(f) == {"tree", "run", "traces", "run_state", "probe"}
        assert set(f["probe"]) == {"step", "layer", "probe", "tree", "leaf"} and f.attrs["probe_tokens"] > 0
        added = {name for name, var in TREE.stats.items() if var.optional}  # variables added since: allowed
        assert set(f["tree"]) == TREE_GROUP_BEFORE | added and set(f["traces"]) == TRACES_BEFORE
        assert added == {"nonfinite_tokens"}
        assert f.attrs["schema_version"] == 1
        assert f["tree/node_visits"].dims[3][0].name == "/tree/node"


@pytest.mark.parametrize("make", [lambda: L1SparseFFN(8, 32, 8), lambda: TopKMoE(8, 8, experts=4, k=2, capacity_factor=1.0)],
                         ids=["l1", "moe"])  # fmt: skip
def test_counting_survives_torch_compile(make) -> None:
    """The accumulators are updated inside forward, so a compiled layer counts exactly as the eager one."""
    torch.manual_seed(0)
    eager = make()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager")
    eager.recording = compiled_layer.recording = True
    x = torch.randn(3, 10, 8)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    for name, value in eager.routing_stats().items():
        torch.testing.assert_close(compiled_layer.routing_stats()[name], value, rtol=1e-5, atol=0, msg=name)  # counts: exact
    assert int(eager.tokens) == 60
