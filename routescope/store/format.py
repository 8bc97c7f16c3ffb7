"""The run file's format: schema version, run states, storage constants, the reader's error and a layer's layout.

Plain data and small helpers shared by the reader, the writer, repair and resume (no h5py here).
The variables themselves are declared per family in routescope.store.schema; users read
docs/file-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routescope.store.schema import COMMON_TRACES, FAMILIES, TREE, Variable, layer_sizes

SCHEMA_VERSION = 1
# HDF5 object formats the writer may use: those of HDF5 1.10, the first with SWMR. The h5py wheel bundles
# a newer HDF5 (2.0), whose "latest" formats the distributions' h5dump, h5ls and ncdump (HDF5 1.10-1.14)
# cannot read; bounded like this, every HDF5 >= 1.10 tool opens the file.
FORMAT_BOUNDS = ("v110", "v110")
RUN_STATES = ("running", "finished", "interrupted", "failed")
COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
# Chunking along the growing dimension. A compressed chunk rewritten with more rows changes size and
# HDF5 cannot reuse the old space, so a file would grow quadratically. Hence: rows of one write that
# are large enough to compress well get chunks of exactly one write (never rewritten); small rows
# are stored uncompressed in fixed-size chunks, which HDF5 rewrites in place.
COMPRESS_MIN_BYTES = 4096
SMALL_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # no chunk larger: HDF5 allocates a chunk whole in memory and on disk
READ_CHUNK_BYTES = 64 * 1024 * 1024  # dask chunks when reading: many file chunks per task
TRUNCATION_SLACK = 1 << 20  # space HDF5 may have reserved past the last byte it wrote before a kill

# name: (dims, dtype, meaning). Names and dims are the public contract (docs/file-format.md); declared in schema.py.
def as_tuples(variables: dict[str, Variable]) -> dict[str, tuple[tuple[str, ...], str, str]]:
    """{name: (dims, dtype, meaning)}: the plain-tuple view of schema variables."""
    return {name: (v.dims, v.dtype, v.meaning) for name, v in variables.items()}


TREE_VARIABLES = as_tuples(TREE.group_variables())
L1_VARIABLES = as_tuples(FAMILIES["l1"].group_variables())
MOE_VARIABLES = as_tuples(FAMILIES["moe"].group_variables())
TRACE_VARIABLES = as_tuples({**COMMON_TRACES, **TREE.traces})  # the tree family's traces (other families': schema)
ALL_TRACE_VARIABLES = {**COMMON_TRACES, **{n: v for fam in FAMILIES.values() for n, v in fam.traces.items()}}
RUN_FIXED_SCALARS: dict[str, str] = {"tokens_seen": "i8", "elapsed_s": "f8"}


class RunFileError(Exception):
    """A path that is not a readable routescope run; the message says what is wrong and what to do."""


class ForeignFileError(RunFileError):
    """A path that holds something else than a routescope run (a folder, another format, another HDF5 file):
    never to be overwritten by a tool that would otherwise replace a damaged run."""


@dataclass
class LayerLayout:
    """Per-layer information the writer needs: name, family and shape (the rest of its config is an attribute).

    A tree layer gives depth and trees; a layer of another family gives its spec dict as `config`
    (the keys routescope.schema.layer_sizes reads: d_hidden; experts and k).
    """

    name: str
    depth: int = 0
    trees: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    family: str = "tree"

    @property
    def sizes(self) -> dict[str, int]:
        """This layer's dimension sizes (tree: tree, node, leaf, level; l1: unit, bin; moe: expert, ...)."""
        if self.family == "tree":
            return layer_sizes("tree", {"depth": self.depth, "trees": self.trees})
        return layer_sizes(self.family, self.config)

    def value(self, key: str) -> Any:
        """A per-layer descriptor (schema Family.layer_vars): depth and trees from the fields, the rest from config."""
        return getattr(self, key) if key in ("depth", "trees") else self.config.get(key)


def row_bytes(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of one row (at least 1: a zero-size row still takes a chunk slot)."""
    return max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): errors are one line."""
    return (str(err).splitlines() or [type(err).__name__])[0]
