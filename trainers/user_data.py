"""A user's own corpus for `routescope record --data PATH`: UTF-8 text (a file or a folder, byte level as the demo)
or pre-tokenized uint16 `.bin` files in nanoGPT's layout (flat little-endian token ids).

Validation split: the last 10% of every text file, as for the plays; for `.bin`, a sibling `val.bin` when
PATH is a `train.bin`, else the last 10% of PATH. Every problem is a `DataError` whose message is one line
saying what is wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from routescope.trainers.data import VAL_FRACTION, Corpus, CorpusError

BYTE_VOCAB = 256  # text is read as bytes: ids 0..255


class DataError(CorpusError):
    """A user corpus that cannot be trained on (missing, empty, too short, not UTF-8, ids out of range)."""


def load_corpus(path: str | Path, seq_len: int, vocab_size: int | None = None) -> Corpus:
    """The train/validation streams of PATH, checked to hold at least one sequence of `seq_len` + 1 tokens in
    each split and (for `.bin`) only ids below `vocab_size`, which `.bin` files require."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_file() and path.suffix == ".bin":
        if vocab_size is None:
            raise DataError(f"--data {path} holds token ids: give the vocabulary size with --vocab-size "
                            "(nanoGPT's meta.pkl has it; GPT-2's is 50257)")  # fmt: skip
        train, val = _bin_splits(path, vocab_size)
    else:
        if vocab_size not in (None, BYTE_VOCAB):
            raise DataError(f"--data {path} is text, read as bytes (vocabulary 256); drop --vocab-size {vocab_size}")
        train, val = _text_splits(path)
    for name, split in (("training", train), ("validation", val)):
        if len(split) < seq_len + 2:
            raise DataError(f"--data {path}: the {name} split has {len(split)} tokens, fewer than one sequence of "
                            f"{seq_len} + 1 (the model's context and its target) needs; give more data")  # fmt: skip
    return Corpus(train=train, val=val)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    if not files:
        raise DataError(f"--data {path}: the folder holds no files")
    return files


def _text_splits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of every file (sorted), the last VAL_FRACTION of each held out; each must be UTF-8."""
    train, val = [], []
    for f in _text_files(path):
        text = f.read_bytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"--data {f}: not UTF-8 text (byte {err.start}); convert it, or pass a tokenized .bin "
                            "with --vocab-size") from None  # fmt: skip
        cut = int(len(text) * (1 - VAL_FRACTION))
        train.append(text[:cut] + b"\n\n")
        val.append(text[cut:] + b"\n\n")
    if not any(len(t) > 2 for t in train):
        raise DataError(f"--data {path}: empty (no text to train on)")
    as_tensor = lambda parts: torch.from_numpy(np.frombuffer(b"".join(parts), dtype=np.uint8).copy())  # noqa: E731
    return as_tensor(train), as_tensor(val)


def _read_bin(path: Path, vocab_size: int) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"--data {path}: empty (no tokens)")
    if size % 2:
        raise DataError(f"--data {path}: {size} bytes is not a whole number of uint16 token ids; is it a nanoGPT .bin?")
    ids = np.fromfile(path, dtype="<u2")
    top = int(ids.max())
    if top >= vocab_size:
        where = int(np.argmax(ids >= vocab_size))
        raise DataError(f"--data {path}: token id {top} (first out-of-range id at position {where}) is not below "
                        f"--vocab-size {vocab_size}; give the tokenizer's vocabulary size")  # fmt: skip
    return ids


def _bin_splits(path: Path, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 streams (uint16 on disk): train.bin with its sibling val.bin, or one file split 90/10."""
    ids = _read_bin(path, vocab_size)
    sibling = path.with_name("val.bin")
    if path.name == "train.bin" and sibling.is_file():
        val = _read_bin(sibling, vocab_size)
    else:
        cut = int(len(ids) * (1 - VAL_FRACTION))
        ids, val = ids[:cut], ids[cut:]
    return torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(val.astype(np.int32))
