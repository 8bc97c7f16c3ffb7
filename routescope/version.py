"""The installed routescope's version (recorded in every run file)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("routescope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
