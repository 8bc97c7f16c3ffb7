"""routescope: record, measure and see the routing dynamics of sparse feed-forward layers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("routescope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

from routescope.layers import TreeFFN
from routescope.recorder import Recorder
from routescope.store import RunFileError, open_run as open

__all__ = ["Recorder", "RunFileError", "TreeFFN", "__version__", "open"]
