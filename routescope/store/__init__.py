"""The run file (HDF5, SWMR, netCDF4-compatible): its format, reader, writer, repair, lock and resume.

The only package that touches h5py. Readers go through `RunFile` (reader.py); the recorder through
`RunWriter` (writer.py). The format itself is described for users in docs/file-format.md.
"""

from routescope.store.format import SCHEMA_VERSION, LayerLayout, RunFileError
from routescope.store.reader import RunFile, describe, open_run

__all__ = ["SCHEMA_VERSION", "LayerLayout", "RunFile", "RunFileError", "describe", "open_run"]
