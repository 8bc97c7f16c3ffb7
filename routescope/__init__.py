"""routescope: record, measure and see the routing dynamics of sparse feed-forward layers.

Stages, in the order data flows (each a subpackage): `layers` (routed nn.Modules over `kernels`),
`record` (the Recorder), `store` (the run file), `analysis` (metrics, events, report),
`integrations` (HF / Lightning callbacks, `patch`), `dashboards`, `pruning` (`prune`: a smaller model from what
a run measured); `cli` is the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routescope.store import RunFile, RunFileError
from routescope.store import open_run as open
from routescope.version import __version__

if TYPE_CHECKING:
    from routescope.integrations.patch import patch
    from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN
    from routescope.pruning import load_pruned, prune, save_pruned
    from routescope.record.recorder import Recorder

__all__ = ["L1SparseFFN", "Recorder", "RunFile", "RunFileError", "TopKMoE", "TreeFFN", "__version__", "load_pruned",
           "open", "patch", "prune", "save_pruned"]  # fmt: skip
_LAYERS = ("TreeFFN", "L1SparseFFN", "TopKMoE")


def __getattr__(name: str) -> Any:
    """Import torch-dependent parts on first use, so reading files (and the CLI's `info`) stays fast."""
    if name in _LAYERS:
        from routescope import layers

        return getattr(layers, name)
    if name == "Recorder":
        from routescope.record.recorder import Recorder

        return Recorder
    if name == "patch":
        from routescope.integrations.patch import patch

        return patch
    if name in ("prune", "load_pruned", "save_pruned"):
        from routescope import pruning

        return getattr(pruning, name)
    raise AttributeError(f"module 'routescope' has no attribute {name!r}")
