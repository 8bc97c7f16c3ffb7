"""Swap the MLP blocks of a Hugging Face causal LM for routed layers, so its routing can be recorded.

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256))
    replaced = routescope.patch(model, family="tree", depth=5, trees=2)   # {name: the old MLP}

Architectures are recognised by their MLP class name, so transformers itself is never imported:
GPT-2 (`GPT2MLP`), OPT (fc1, activation_fn and fc2 live on `OPTDecoderLayer`) and Llama
(`LlamaMLP`). Each routed layer has the replaced block's input and output width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from routescope.record import distributed


@dataclass(frozen=True)
class Family:
    """A routed-layer family: its class in routescope.layers (looked up when used) and how to build it."""

    class_name: str
    build: Callable[[type, int, int, dict[str, Any]], nn.Module]  # (cls, width, hidden, options) -> layer


def _build_tree(cls: type, width: int, hidden: int, options: dict[str, Any]) -> nn.Module:
    if "depth" not in options:
        raise ValueError("family='tree' needs depth=..., e.g. routescope.patch(model, depth=6, trees=2)")
    return cls(width, width, **options)


def _build_l1(cls: type, width: int, hidden: int, options: dict[str, Any]) -> nn.Module:
    options = dict(options)
    return cls(width, options.pop("d_hidden", hidden), width, **options)  # default: the replaced MLP's hidden width


def _build_moe(cls: type, width: int, hidden: int, options: dict[str, Any]) -> nn.Module:
    return cls(width, width, **options)


FAMILIES: dict[str, Family] = {
    "tree": Family("TreeFFN", _build_tree),  # TreeFFN(d, d, depth=..., trees=..., ...)
    "l1": Family("L1SparseFFN", _build_l1),  # L1SparseFFN(d, d_hidden, d, ...); d_hidden defaults to the MLP's
    "moe": Family("TopKMoE", _build_moe),  # TopKMoE(d, d, experts=..., k=..., ...)
}


def layer_class(family: str) -> type:
    """The routed-layer class of a family, looked up in routescope.layers when asked for."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {sorted(FAMILIES)}")
    from routescope import layers

    cls = getattr(layers, FAMILIES[family].class_name, None)
    if cls is None:
        raise ImportError(
            f"family {family!r} needs routescope.layers.{FAMILIES[family].class_name}, which this version of "
            "routescope does not have"
        )
    return cls


@dataclass
class _Site:
    """One MLP block found in the model: where the routed layer goes and what it replaces."""

    name: str  # qualified name the routed layer will have
    widths: tuple[int, int, int]  # (d_in, hidden, d_out) of the replaced block
    replaced: nn.Module  # the block as one module (OPT: nn.Sequential(fc1, activation_fn, fc2))
    install: Callable[[nn.Module], None]


def _gpt2(name: str, module: nn.Module, parent: nn.Module, attr: str) -> _Site:
    d_in, hidden = module.c_fc.weight.shape  # Conv1D keeps its weight as (in, out)
    d_out = module.c_proj.weight.shape[1]
    return _Site(name, (d_in, hidden, d_out), module, lambda new: setattr(parent, attr, new))


def _llama(name: str, module: nn.Module, parent: nn.Module, attr: str) -> _Site:
    widths = (module.gate_proj.in_features, module.gate_proj.out_features, module.down_proj.out_features)
    return _Site(name, widths, module, lambda new: setattr(parent, attr, new))


def _opt(name: str, module: nn.Module, parent: nn.Module, attr: str) -> _Site:
    """OPT's decoder layer calls fc2(activation_fn(fc1(x))) itself: the routed layer takes fc1's place
    and the other two become identities, so the layer's own forward (and its residual) is unchanged."""
    replaced = nn.Sequential(module.fc1, module.activation_fn, module.fc2)

    def install(new: nn.Module) -> None:
        module.fc1, module.activation_fn, module.fc2 = new, nn.Identity(), nn.Identity()

    widths = (module.fc1.in_features, module.fc1.out_features, module.fc2.out_features)
    return _Site(f"{name}.fc1" if name else "fc1", widths, replaced, install)


# MLP-bearing class name -> how to find the block in it. Matched along each module's class hierarchy.
ARCHITECTURES: dict[str, Callable[[str, nn.Module, nn.Module, str], _Site]] = {
    "GPT2MLP": _gpt2,
    "OPTDecoderLayer": _opt,
    "LlamaMLP": _llama,
}
SUPPORTED = "GPT-2 (GPT2MLP), OPT (OPTDecoderLayer fc1/fc2) and Llama (LlamaMLP)"


def find_mlp_blocks(model: nn.Module) -> list[_Site]:
    """Every MLP block of a supported architecture in the model, in module order."""
    sites = []
    for name, module in model.named_modules():
        kind = next((ARCHITECTURES[c.__name__] for c in type(module).__mro__ if c.__name__ in ARCHITECTURES), None)
        if kind is None:
            continue
        if not name and kind is not _opt:
            raise ValueError(f"the model itself is a {type(module).__name__}; patch the model that contains it")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        sites.append(kind(name, module, parent, attr))
    return sites


def patch(
    model: nn.Module, family: str = "tree", modules: Iterable[str | int] | None = None, **options: Any
) -> dict[str, nn.Module]:
    """Replace the model's MLP blocks (all, or `modules`: names as returned, or block indices) by routed
    layers of `family` built with `options`, in place; returns {routed layer's name: the replaced block}."""
    cls = layer_class(family)
    sites = find_mlp_blocks(model)
    if not sites:
        raise ValueError(f"routescope.patch supports {SUPPORTED}; found none of them in {type(model).__name__}")
    if modules is not None:
        sites = _select(sites, list(modules))
    replaced = {}
    for site in sites:
        d_in, hidden, d_out = site.widths
        if d_in != d_out:
            raise ValueError(f"{site.name}: input width {d_in} != output width {d_out}; a routed block needs both equal")
        layer = FAMILIES[family].build(cls, d_in, hidden, options)
        _match_placement(layer, site.replaced)
        site.install(layer)
        replaced[site.name] = site.replaced
    distributed.ignore_accumulators(model)  # so DDP, wrapped after this, keeps each rank's counts
    return replaced


def _select(sites: list[_Site], wanted: list[str | int]) -> list[_Site]:
    names = [site.name for site in sites]
    for item in wanted:
        if isinstance(item, int) and not -len(sites) <= item < len(sites):
            raise ValueError(f"block index {item} out of range: the model has {len(sites)} MLP blocks")
        if isinstance(item, str) and item not in names:
            raise ValueError(f"no MLP block named {item!r}; blocks: {names}")
        if not isinstance(item, (str, int)):
            raise ValueError(f"modules takes block names or indices, got {item!r}")
    picked = {names[i] for i in wanted if isinstance(i, int)} | {n for n in wanted if isinstance(n, str)}
    return [site for site in sites if site.name in picked]


def _match_placement(layer: nn.Module, old: nn.Module) -> None:
    """Put the new layer on the old block's device, its parameters in the old dtype, in the same mode.
    Only parameters change dtype: the accumulators keep int64/float64 (exact counts and sums)."""
    reference = next(old.parameters(), None)
    if reference is not None:
        layer.to(reference.device)
        for param in layer.parameters():
            if param.is_floating_point() and param.dtype != reference.dtype:
                param.data = param.data.to(reference.dtype)
    layer.train(old.training)
