"""The run file's variables per layer family (docs/file-format.md), declared once.

The layers size their accumulators from it, the recorder packs and unpacks its flat buffers in its
order, and the store creates one HDF5 group per family from it. No torch, no h5py: plain data.
Every family group holds `step`, `tokens` (step) and `layer_tokens` (step, layer) besides its own
statistics; the per-layer shapes (`tree`, `node`, `unit`, `expert`, ...) are padded to the largest
layer of the family, with zeros (counts and sums alike; the traces with -1 or NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Variable:
    """One dataset: its dimension names (the first is `step` or `sample`), numpy dtype code and meaning."""

    dims: tuple[str, ...]
    dtype: str
    meaning: str
    optional: bool = False  # added after schema 1's first files: older files may lack it (read as absent)


@dataclass(frozen=True)
class Family:
    """A routed-layer family: its group, accumulated statistics, per-layer descriptors and trace variables."""

    name: str  # HDF5 group and `family` in the layers attribute
    stats: dict[str, Variable]  # accumulated by the layer; dims (step, layer, ...)
    layer_vars: dict[str, tuple[str, str, str]]  # variable -> (config key, dtype, meaning); dims (layer,)
    traces: dict[str, Variable]  # in group `traces`; dims (sample, trace_layer_dim, ...)
    trace_layer_dim: str  # the layer dimension of this family's trace variables
    sizes: Callable[[dict[str, Any]], dict[str, int]]  # a layer's spec dict -> its dimension sizes

    @property
    def stat_dims(self) -> tuple[str, ...]:
        """The per-layer dimensions the statistics use (after step and layer), in first-use order."""
        return tuple(dict.fromkeys(d for v in self.stats.values() for d in v.dims[2:]))

    @property
    def trace_dims(self) -> tuple[str, ...]:
        """The per-layer dimensions the trace variables use (after sample and the layer dimension)."""
        return tuple(dict.fromkeys(d for v in self.traces.values() for d in v.dims[2:]))

    def layer_shape(self, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
        """Shape of one layer's statistic (without step and layer), given that layer's dimension sizes."""
        return tuple(sizes[d] for d in self.stats[name].dims[2:])

    def trace_shape(self, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
        """Shape of one sampled token's row of a trace variable for one layer."""
        return tuple(sizes[d] for d in self.traces[name].dims[2:])

    def group_variables(self) -> dict[str, Variable]:
        """Every per-step variable of the family's group, `tokens` and `layer_tokens` first."""
        return {**COMMON_STATS, **self.stats}


COMMON_STATS = {
    "tokens": Variable(("step",), "i8", "tokens that passed through each layer in the interval"),
    "layer_tokens": Variable(("step", "layer"), "i8", "tokens that passed through this layer in the interval"),
}
COMMON_TRACES = {
    "sample_step": Variable(("sample",), "i8", "step of the interval the sampled token was traced in"),
    "token_id": Variable(("sample",), "i4", "id of the sampled token (-1: not given to the recorder)"),
    "sequence": Variable(("sample",), "i4", "row of the token's batch (-1: not given)"),
    "position": Variable(("sample",), "i4", "position of the token in its sequence (-1: not given)"),
    "context_ids": Variable(("sample", "context"), "i4", "ids of the tokens up to and including it (-1: none)"),
}

_NODE, _LEAF = ("step", "layer", "tree", "node"), ("step", "layer", "tree", "leaf")
TREE = Family(
    name="tree",
    stats={
        "node_visits": Variable(_NODE, "i8", "tokens that reached decision node n"),
        "node_right": Variable(_NODE, "i8", "of those, tokens sent to the right child"),
        "node_fires": Variable(_NODE, "i8", "visiting tokens whose node neuron output was non-zero"),
        "node_act_sum": Variable(_NODE, "f8", "sum of z_n over visiting tokens"),
        "node_act_sqsum": Variable(_NODE, "f8", "sum of z_n^2 over visiting tokens"),
        "leaf_visits": Variable(_LEAF, "i8", "tokens whose path ended at leaf j"),
        "leaf_fires": Variable(_LEAF, "i8", "non-zero outputs of leaf j's units, summed over tokens"),
        "leaf_act_sum": Variable(_LEAF, "f8", "sum of the leaf's z (leaf MLP: mean over its units)"),
        "leaf_act_sqsum": Variable(_LEAF, "f8", "sum of the square of the same"),
        "nonfinite_tokens": Variable(("step", "layer", "tree"), "i8",
                                     "tokens with a NaN/inf z on their path in tree t (left out of the sums)", True),
    },
    layer_vars={"layer_depth": ("depth", "i4", "tree depth d"), "layer_trees": ("trees", "i4", "trees T")},
    traces={
        "leaf": Variable(("sample", "layer", "tree"), "i4", "leaf the token's path ended at (the path is implied)"),
        "path_act": Variable(("sample", "layer", "tree", "level"), "f4", "pre-activation z at each level of the path"),
    },
    trace_layer_dim="layer",
    sizes=lambda config: tree_sizes(config),
)

L1 = Family(
    name="l1",
    stats={
        "unit_fires": Variable(("step", "layer", "unit"), "i8", "tokens for which hidden unit u was non-zero"),
        "active_sum": Variable(("step", "layer"), "i8", "sum over tokens of the number of non-zero hidden units"),
        "active_hist": Variable(("step", "layer", "bin"), "i8",
                                "tokens whose active-unit count lies in [bin, next bin) (bin_edges attribute)"),
        "nonfinite_tokens": Variable(("step", "layer"), "i8", "tokens with a NaN/inf gate or hidden activation", True),
    },  # fmt: skip
    layer_vars={"layer_units": ("d_hidden", "i4", "hidden units of the layer")},
    traces={"l1_active": Variable(("sample", "l1_layer"), "i4", "non-zero hidden units of the sampled token")},
    trace_layer_dim="l1_layer",
    sizes=lambda config: l1_sizes(config),
)

_EXPERT = ("step", "layer", "expert")
MOE = Family(
    name="moe",
    stats={
        "expert_tokens": Variable(_EXPERT, "i8", "tokens expert e processed (its selections kept under capacity)"),
        "dropped_tokens": Variable(("step", "layer"), "i8",
                                   "token-expert selections dropped over capacity (sum of expert_tokens = k*tokens - this)"),
        "coselect": Variable(("step", "layer", "expert", "other_expert"), "i8",
                             "tokens that selected both experts (before drops); the diagonal: tokens that selected e"),
        "router_entropy_sum": Variable(("step", "layer"), "f8", "sum over tokens of the router softmax's entropy (bits)"),
        "router_prob_sum": Variable(_EXPERT, "f8", "sum over tokens of the router's softmax probability of e"),
        "nonfinite_tokens": Variable(("step", "layer"), "i8",
                                     "tokens with a NaN/inf router logit (left out of the router sums)", True),
    },  # fmt: skip
    layer_vars={
        "layer_experts": ("experts", "i4", "experts E"),
        "layer_k": ("k", "i4", "experts chosen per token"),
        "layer_capacity_factor": ("capacity_factor", "f4", "capacity factor (NaN: no capacity limit)"),
    },
    traces={
        "moe_expert": Variable(("sample", "moe_layer", "choice"), "i4", "experts the token chose, best first"),
        "moe_weight": Variable(("sample", "moe_layer", "choice"), "f4", "their renormalised router weights"),
        "moe_kept": Variable(("sample", "moe_layer", "choice"), "i1", "1 if the choice was processed, 0 if dropped"),
    },
    trace_layer_dim="moe_layer",
    sizes=lambda config: moe_sizes(config),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (TREE, L1, MOE)}  # file order of the groups

# The optional `probe` group (Recorder(probe=...)): a fixed batch of held-out tokens routed in eval mode at each
# interval end, so that routing stability over training can be read off (analysis.stability).
PROBE = {
    "leaf": Variable(("step", "layer", "probe", "tree"), "i4",
                     "leaf each probe token reached in tree t, in eval mode at the interval's end (-1: padding)"),
    "experts": Variable(("step", "moe_layer", "probe", "choice"), "i4",
                        "experts the router chose for each probe token, ascending (-1: padding)"),
}
PROBE_FAMILIES = {"leaf": "tree", "experts": "moe"}  # the family whose layers fill each probe variable

BINS_PER_OCTAVE = 8


def active_bin_edges(width: int) -> np.ndarray:
    """Fixed log-spaced bin edges for per-token active-unit counts 0..width (int64, length bins + 1).

    Bin b holds counts in [edges[b], edges[b+1]): bin 0 is exactly 0, then the integer parts of
    2^(i/8) (8 bins per octave), so bins are one count wide up to 14 and above that at most 12% of
    their lower edge wide (tending to 9% = 2^(1/8) - 1 for large counts).
    The sequence is the same for every width (a prefix of one fixed list); the last edge exceeds width.
    """
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    top = BINS_PER_OCTAVE * (math.ceil(math.log2(width + 2)) + 1)
    powers = np.floor(np.exp2(np.arange(top + 1) / BINS_PER_OCTAVE)).astype(np.int64)
    edges = np.unique(np.concatenate([[0], powers]))
    last = int(np.searchsorted(edges, width, side="right"))  # first edge above width
    return edges[: last + 1]


def layer_sizes(family: str, config: dict[str, Any]) -> dict[str, int]:
    """Per-layer dimension sizes from a layer's spec dict (`TreeSpec.to_dict()` and the like)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family].sizes(config)


def tree_sizes(config: dict[str, Any]) -> dict[str, int]:
    """A tree layer's sizes: T trees of depth d have 2^d - 1 decision nodes, 2^d leaves, d + 1 path levels."""
    d, t = int(config["depth"]), int(config["trees"])
    return {"tree": t, "node": 2**d - 1, "leaf": 2**d, "level": d + 1}


def l1_sizes(config: dict[str, Any]) -> dict[str, int]:
    """An L1 layer's sizes: its hidden units and the active-count histogram's bins for that width."""
    return {"unit": int(config["d_hidden"]), "bin": len(active_bin_edges(int(config["d_hidden"]))) - 1}


def moe_sizes(config: dict[str, Any]) -> dict[str, int]:
    """An MoE layer's sizes: E experts (both axes of the co-selection matrix) and k choices per token."""
    e = int(config["experts"])
    return {"expert": e, "other_expert": e, "choice": int(config["k"])}


def coordinate_values(dim: str, size: int) -> np.ndarray:
    """Labels of a fixed dimension: positions, except `bin`, labelled by its lower edge."""
    if dim == "bin":
        edges = active_bin_edges(0)
        while len(edges) - 1 < size:  # the fixed sequence, long enough
            edges = active_bin_edges(int(edges[-1]) * 2 + 2)
        return edges[:size]
    return np.arange(size)
