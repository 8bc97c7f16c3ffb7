"""Sparse FFN kernels and their plain-PyTorch references (no HDF5, no nn.Modules here)."""

from .tree_reference import (
    ACTIVATIONS,
    accumulate_tree_stats,
    leaf_mlp_forward,
    neuron_forward,
)

__all__ = ["ACTIVATIONS", "accumulate_tree_stats", "leaf_mlp_forward", "neuron_forward"]
