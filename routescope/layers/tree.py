"""The tree FFN layer (README, "Layer families"): TreeFFN, its spec, and the fastfeedforward converter.

The layer updates its accumulators inside its own forward when `recording` is on: no hooks (which
torch.compile drops) and no host sync; the recorder reads and zeroes them at interval ends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from routescope.kernels import tree_ops, tree_triton
from routescope.kernels.tree_reference import (
    ACTIVATIONS,
    TreeRouting,
    accumulate_tree_stats,
    leaf_mlp_forward,
    neuron_forward,
    new_tree_stats,
)
from routescope.store.schema import layer_sizes

VARIANTS = ("neuron", "leaf_mlp")
PLACEMENTS = ("node", "output")
BACKENDS = ("torch", "triton", "auto")


@dataclass(frozen=True)
class TreeSpec:
    """What the recorder and the file need to know about one tree layer (root attribute `layers`)."""

    family: str
    d_in: int
    d_out: int
    depth: int
    trees: int
    variant: str
    leaf_width: int
    activation: str
    placement: str
    bias: bool

    @property
    def units(self) -> int:
        """Units in one tree: neurons (neuron form) or hidden units of all leaf MLPs (leaf-MLP form)."""
        if self.variant == "neuron":
            return 2 ** (self.depth + 1) - 1
        return 2**self.depth * self.leaf_width

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "units_per_tree": self.units}


class TreeFFN(nn.Module):
    """Tree-structured fast feed-forward layer (README, "Layer families"), a drop-in for an MLP block.

    Each of `trees` binary trees of depth `depth` sends every token down one root-to-leaf path by hard
    decisions (right where z = w·x + b > 0). variant="neuron": every node and leaf is one neuron and
    y = Σ_path act(z)·u (placement "node") or act(Σ_path z·u) (placement "output"); variant="leaf_mlp":
    decision nodes only route and each leaf is an MLP of `leaf_width` units.
    """

    family = "tree"  # the run file's group (routescope.schema.TREE)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        depth: int,
        trees: int = 1,
        variant: str = "neuron",
        leaf_width: int | None = None,
        activation: str = "gelu",
        placement: str = "node",
        bias: bool = True,
        backend: str = "torch",
    ) -> None:
        """backend: "torch" (the reference), "triton" (the fused kernels; neuron variant) or "auto"
        (Triton on CUDA tensors when the variant is "neuron", the reference elsewhere)."""
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if variant == "leaf_mlp" and placement != "node":
            raise ValueError("placement='output' applies to the neuron variant only")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and variant != "neuron":
            raise ValueError("backend='triton' covers variant='neuron' only; leaf_mlp runs on backend='torch' or 'auto'")
        if backend == "triton" and not tree_triton.available():
            raise ValueError("backend='triton' needs the triton package (pip install triton); use 'torch' or 'auto'")
        if min(d_in, d_out, trees) < 1 or depth < 0:
            raise ValueError("d_in, d_out and trees must be >= 1 and depth >= 0")
        if variant == "leaf_mlp" and (leaf_width is None or leaf_width < 1):
            raise ValueError("variant='leaf_mlp' needs leaf_width >= 1")
        self.spec = TreeSpec(
            family="tree", d_in=d_in, d_out=d_out, depth=depth, trees=trees, variant=variant,
            leaf_width=leaf_width if variant == "leaf_mlp" else 1, activation=activation,
            placement=placement, bias=bias,
        )  # fmt: skip
        self.backend = backend
        nodes, leaves = 2**depth - 1, 2**depth
        if variant == "neuron":
            neurons = nodes + leaves
            self.w = nn.Parameter(torch.empty(trees, neurons, d_in))  # (T, N, d_in) heap order
            self.b = nn.Parameter(torch.zeros(trees, neurons)) if bias else None  # (T, N)
            self.u = nn.Parameter(torch.empty(trees, neurons, d_out))  # (T, N, d_out)
        else:
            k = leaf_width
            self.w = nn.Parameter(torch.empty(trees, nodes, d_in))  # (T, 2^d-1, d_in)
            self.b = nn.Parameter(torch.zeros(trees, nodes)) if bias else None
            self.leaf_w1 = nn.Parameter(torch.empty(trees, leaves, d_in, k))
            self.leaf_b1 = nn.Parameter(torch.zeros(trees, leaves, k)) if bias else None
            self.leaf_w2 = nn.Parameter(torch.empty(trees, leaves, k, d_out))
            self.leaf_b2 = nn.Parameter(torch.zeros(trees, leaves, d_out)) if bias else None
        self.reset_parameters()
        self.init_recording()

    def init_recording(self) -> None:
        """The accumulators (non-persistent buffers: they follow .to(device) but stay out of checkpoints) and the
        recorder's switches, off."""
        for name, tensor in new_tree_stats(self.spec.trees, self.spec.depth).items():
            self.register_buffer(name, tensor, persistent=False)
        self.recording = False  # set by the recorder; accumulate in forward while True
        self.record_eval = False  # also accumulate in eval mode (off: validation passes stay out)
        self.trace_next = False  # keep the next forward's per-token routing in `last_trace`
        self.last_trace: TreeRouting | None = None
        self.keep_leaf = False  # keep each forward's leaf per token in `last_leaf` (the routing-stability probe)
        self.last_leaf: Tensor | None = None

    def reset_parameters(self) -> None:
        """Uniform fan-in init as nn.Linear: input weights by d_in, output weights by active units."""
        spec = self.spec
        bound_in = 1.0 / math.sqrt(spec.d_in)
        nn.init.uniform_(self.w, -bound_in, bound_in)
        if spec.variant == "neuron":
            bound_out = 1.0 / math.sqrt(spec.trees * (spec.depth + 1))
            nn.init.uniform_(self.u, -bound_out, bound_out)
        else:
            nn.init.uniform_(self.leaf_w1, -bound_in, bound_in)
            bound_out = 1.0 / math.sqrt(spec.trees * spec.leaf_width)
            nn.init.uniform_(self.leaf_w2, -bound_out, bound_out)

    @property
    def depth(self) -> int:
        return self.spec.depth

    @property
    def trees(self) -> int:
        return self.spec.trees

    def extra_repr(self) -> str:
        s = self.spec
        extra = f", leaf_width={s.leaf_width}" if s.variant == "leaf_mlp" else f", placement={s.placement!r}"
        return (
            f"d_in={s.d_in}, d_out={s.d_out}, depth={s.depth}, trees={s.trees}, variant={s.variant!r}"
            f"{extra}, activation={s.activation!r}, bias={s.bias}"
        )

    def heap_weights(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(w, b, u) of the neuron variant in full heap order (T, 2^(d+1) − 1, ·): the parameters themselves here;
        a pruned layer (`routescope.prune`) expands its live rows into this shape."""
        return self.w, self.b, self.u

    def route_force(self) -> Tensor | None:
        """(T, 2^d − 1) int8 sides that nodes are held to (0 left, 1 right, −1 free), or None: free routing here;
        a pruned layer holds a node to its live child."""
        return None

    def route_and_compute(self, x: Tensor, path: Tensor | None = None) -> tuple[Tensor, TreeRouting]:
        """x (n, d_in) -> (y (n, d_out), routing); `path` (n, T, d+1) holds the routing fixed."""
        s = self.spec
        if s.variant == "neuron":
            w, b, u = self.heap_weights()
            return neuron_forward(x, w, b, u, s.depth, s.activation, s.placement, path, self.route_force())
        return leaf_mlp_forward(
            x, self.w, self.b, self.leaf_w1, self.leaf_b1, self.leaf_w2, self.leaf_b2,
            s.depth, s.activation, path,
        )  # fmt: skip

    def uses_triton(self, x: Tensor) -> bool:
        """Whether a forward on `x` runs the Triton kernels: always for "triton", on CUDA for "auto"
        (float32/16-bit inputs: the kernels' dense dots have no float64 form)."""
        if self.backend == "triton":
            return True
        return (
            self.backend == "auto" and self.spec.variant == "neuron" and x.is_cuda and tree_triton.available()
            and x.dtype in tree_triton.DTYPES and next(self.parameters()).dtype in tree_triton.DTYPES
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> y (..., d_out); updates the accumulators when recording."""
        s = self.spec
        if x.shape[-1] != s.d_in:
            raise ValueError(f"TreeFFN expects inputs of shape (..., {s.d_in}), got {tuple(x.shape)}")
        leading = x.shape[:-1]
        flat = x.reshape(-1, s.d_in)
        record = self.recording and (self.training or self.record_eval)
        if self.uses_triton(x):
            if torch.is_autocast_enabled(x.device.type):  # run the kernel in the autocast dtype
                flat = flat.to(torch.get_autocast_dtype(x.device.type))
            stats = self.routing_stats() if record else None
            w, b, u = self.heap_weights()
            y, leaf, z = tree_ops.tree_ffn(flat, w, b, u, s.depth, s.activation, s.placement, stats,
                                           force=self.route_force())  # fmt: skip
            if self.keep_leaf:
                self.last_leaf = leaf
            if record and self.trace_next:
                act = ACTIVATIONS[s.activation]
                fired = (act(z) if s.placement == "node" else z) != 0
                self.last_trace = TreeRouting(tree_triton.leaf_to_path(leaf, s.depth), z, fired.long())
            return y.reshape(*leading, s.d_out)
        y, routing = self.route_and_compute(flat)
        if self.keep_leaf:
            self.last_leaf = routing.path[:, :, -1] - (2**s.depth - 1)
        if record:
            accumulate_tree_stats(self.routing_stats(), routing, s.depth)
            if self.trace_next:
                self.last_trace = TreeRouting(routing.path.detach(), routing.z.detach(), routing.fired)
        return y.reshape(*leading, s.d_out)

    def routing_stats(self) -> dict[str, Tensor]:
        """The accumulator buffers by file variable name (docs/file-format.md) (`tokens`, `node_visits`, ...)."""
        return {name: getattr(self, name) for name in new_tree_stats(1, 0)}

    def reset_routing_stats(self) -> None:
        """Zero the accumulators in place (keeps buffer identity, so compiled graphs stay valid)."""
        torch._foreach_zero_(list(self.routing_stats().values()))  # one launch per dtype group, not one per buffer

    def stat_sizes(self) -> dict[str, int]:
        """This layer's dimension sizes in the file (tree, node, leaf, level)."""
        return layer_sizes("tree", self.spec.to_dict())

    def traced_tokens(self) -> int | None:
        """Tokens in `last_trace` (None when the last forward kept no trace)."""
        return None if self.last_trace is None else self.last_trace.path.shape[0]

    def trace_rows(self, index: Tensor) -> dict[str, Tensor]:
        """The sampled tokens' rows of the trace variables: leaf (k, T) and path_act (k, T, d+1)."""
        trace, nodes = self.last_trace, 2**self.depth - 1
        return {"leaf": trace.path[index, :, self.depth] - nodes, "path_act": trace.z[index]}

    @classmethod
    def from_fastfeedforward(cls, fff: nn.Module, output_bias: bool = False) -> TreeFFN:
        """Convert a `fastfeedforward.FFF` (0.2.1) to an equivalent leaf-MLP TreeFFN.

        fastfeedforward's hard-routed `eval_forward` leaves out the leaves' output bias `b2s` (its
        `training_forward` adds it); the default matches `eval_forward`, output_bias=True keeps b2s.
        Ties differ only where z is exactly 0 (FFF goes right at z >= 0, TreeFFN at z > 0).
        """
        activation = _activation_name(fff.activation)
        depth = int(fff.depth.item())
        layer = cls(
            fff.input_width, fff.output_width, depth, trees=1, variant="leaf_mlp",
            leaf_width=fff.leaf_width, activation=activation, bias=True,
        )  # fmt: skip
        with torch.no_grad():
            layer.w.copy_(fff.node_weights.unsqueeze(0))
            layer.b.copy_(fff.node_biases.reshape(1, -1))
            layer.leaf_w1.copy_(fff.w1s.unsqueeze(0))
            layer.leaf_b1.copy_(fff.b1s.unsqueeze(0))
            layer.leaf_w2.copy_(fff.w2s.unsqueeze(0))
            layer.leaf_b2.copy_(fff.b2s.unsqueeze(0) if output_bias else torch.zeros_like(layer.leaf_b2))
        return layer.to(fff.node_weights.device)


def _activation_name(module: nn.Module) -> str:
    """Map an activation nn.Module (as fastfeedforward stores it) to a TreeFFN activation name."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
    for kind, name in names.items():
        if isinstance(module, kind):
            return name
    raise ValueError(f"cannot convert activation {module!r}; supported: GELU, ReLU, SiLU, Tanh, Sigmoid, Identity")
