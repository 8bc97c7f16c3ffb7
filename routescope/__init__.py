"""routescope: record, measure and see the routing dynamics of sparse feed-forward layers."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from routescope.store import RunFileError, open_run as open

try:
    __version__ = version("routescope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from routescope.layers import L1SparseFFN, TopKMoE, TreeFFN
    from routescope.patch import patch
    from routescope.recorder import Recorder

__all__ = ["L1SparseFFN", "Recorder", "RunFileError", "TopKMoE", "TreeFFN", "__version__", "open", "patch"]
_LAYERS = ("TreeFFN", "L1SparseFFN", "TopKMoE")


def __getattr__(name: str) -> Any:
    """Import torch-dependent parts on first use, so reading files (and the CLI's `info`) stays fast."""
    if name in _LAYERS:
        from routescope import layers

        return getattr(layers, name)
    if name == "Recorder":
        from routescope.recorder import Recorder

        return Recorder
    if name == "patch":
        from routescope.patch import patch

        globals()["patch"] = patch  # importing routescope.patch just bound the module under this name
        return patch
    raise AttributeError(f"module 'routescope' has no attribute {name!r}")
