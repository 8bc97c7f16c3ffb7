"""routescope.patch: Hugging Face GPT-2, OPT and Llama with routed MLP blocks, trained and recorded."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch
from conftest import check_tree_invariants
from torch import nn

import routescope
from routescope import Recorder, TreeFFN, layers
from routescope.trainers.data import Corpus

transformers = pytest.importorskip("transformers", reason="patch tests need the [hf] extra")


def tiny(arch: str) -> nn.Module:
    """A 2-layer, 64-wide causal LM over bytes, built from a config (nothing downloaded)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64))
    if arch == "opt":
        config = transformers.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=2,
                                        vocab_size=256, word_embed_proj_dim=64, max_position_embeddings=64)  # fmt: skip
        return transformers.OPTForCausalLM(config)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


EXPECTED = {
    "gpt2": ["transformer.h.0.mlp", "transformer.h.1.mlp"],
    "opt": ["model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"],
    "llama": ["model.layers.0.mlp", "model.layers.1.mlp"],
}


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_patch_replaces_every_mlp_and_records(arch: str, tmp_path: Path) -> None:
    """Train a few steps on Shakespeare bytes (GPT-2: 6 steps; OPT, Llama: 2) with a Recorder."""
    model = tiny(arch)
    replaced = routescope.patch(model, depth=3, trees=2)
    assert list(replaced) == EXPECTED[arch]
    routed = dict(model.named_modules())
    for name in replaced:
        assert isinstance(routed[name], TreeFFN) and (routed[name].spec.d_in, routed[name].spec.d_out) == (64, 64)
    if arch == "opt":  # the old block as one module: fc2(act(fc1(x)))
        old = replaced["model.decoder.layers.0.fc1"]
        assert isinstance(old, nn.Sequential) and isinstance(old[0], nn.Linear) and old[0].out_features == 128
        assert isinstance(model.model.decoder.layers[0].fc2, nn.Identity)
    corpus, g = Corpus.shakespeare(), torch.Generator().manual_seed(0)
    steps = 6 if arch == "gpt2" else 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = tmp_path / f"{arch}.h5"
    model.train()
    with Recorder(model, path, every=2, sample_tokens=8) as rec:
        for _ in range(steps):
            ids, _ = corpus.batch("train", 4, 32, g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, token_ids=ids)
    assert check_tree_invariants(path) == steps // 2
    with h5py.File(path, "r") as f:
        assert list(f["tree/tokens"][:]) == [2 * 4 * 32] * (steps // 2)
        assert [n.decode() if isinstance(n, bytes) else n for n in f["tree/layer_name"][:]] == EXPECTED[arch]
        assert torch.isfinite(torch.from_numpy(f["run/train_loss"][:])).all()


def test_patch_selected_blocks_and_dtype() -> None:
    model = tiny("gpt2").to(torch.float64)
    replaced = routescope.patch(model, modules=[1], depth=2)
    assert list(replaced) == ["transformer.h.1.mlp"]
    assert type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"
    layer = model.transformer.h[1].mlp
    assert layer.w.dtype == torch.float64 and layer.node_visits.dtype == torch.int64
    with pytest.raises(ValueError, match="no MLP block named"):
        routescope.patch(tiny("gpt2"), modules=["transformer.h.9.mlp"], depth=2)


def test_patch_clear_errors() -> None:
    with pytest.raises(ValueError, match="GPT-2.*OPT.*Llama"):
        routescope.patch(nn.Sequential(nn.Linear(4, 4)), depth=2)
    with pytest.raises(ValueError, match="needs depth"):
        routescope.patch(tiny("gpt2"))
    with pytest.raises(ValueError, match="unknown family"):
        routescope.patch(tiny("gpt2"), family="dense")


@pytest.mark.parametrize("family,cls,options", [("l1", "L1SparseFFN", {}), ("moe", "TopKMoE", {"experts": 4, "k": 1})])
def test_other_families_are_looked_up_when_used(family: str, cls: str, options: dict) -> None:
    """Works once routescope.layers has the family's class; until then a clear ImportError."""
    model = tiny("llama")
    if not hasattr(layers, cls):
        with pytest.raises(ImportError, match=cls):
            routescope.patch(model, family=family, **options)
        return
    replaced = routescope.patch(model, family=family, **options)
    assert all(isinstance(model.get_submodule(name), getattr(layers, cls)) for name in replaced)
    ids = torch.randint(0, 256, (2, 8))
    assert model(input_ids=ids).logits.shape == (2, 8, 256)
