"""What both callbacks share: finding token ids in a batch, and a clear message for a missing framework."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def missing(framework: str, extra: str, err: ImportError) -> ImportError:
    """The ImportError a callback module raises when its framework is not installed."""
    return ImportError(
        f"routescope.integrations.{extra} needs {framework}, which is not installed: "
        f'pip install "routescope[{extra}]"  ({err})'
    )


def token_ids(batch: Any) -> Tensor | None:
    """The (batch, seq) integer input ids of a batch (a tensor, a tuple/list led by one, or a dict with
    `input_ids`), to label the sampled traces; None when there are none."""
    if isinstance(batch, Mapping):
        batch = batch.get("input_ids")
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, Tensor) and batch.dim() == 2 and not batch.is_floating_point():
        return batch
    return None
