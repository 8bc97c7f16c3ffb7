"""`routescope record --data PATH` (issue 20, item 4): a user's text file or folder (bytes) or a nanoGPT uint16
.bin with its vocabulary size; every bad corpus is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

from routescope.trainers.user_data import DataError, load_corpus

TEXT = "Über allen Gipfeln ist Ruh — in allen Wipfeln spürest du kaum einen Hauch.\n" * 40


def test_text_file_holds_out_its_last_tenth(tmp_path: Path) -> None:
    path = tmp_path / "poem.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = load_corpus(path, seq_len=16)
    raw = TEXT.encode()
    cut = int(len(raw) * 0.9)
    assert bytes(corpus.train.numpy()) == raw[:cut] + b"\n\n" and bytes(corpus.val.numpy()) == raw[cut:] + b"\n\n"


def test_folder_reads_every_visible_file_in_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("b" * 400)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a" * 400)
    (tmp_path / ".hidden").write_bytes(b"\xff\xfe not text")  # skipped: hidden
    corpus = load_corpus(tmp_path, seq_len=8)
    train = bytes(corpus.train.numpy())
    assert train == b"b" * 360 + b"\n\n" + b"a" * 360 + b"\n\n"  # sorted paths: b.txt < sub/a.txt


def test_bin_uses_its_val_sibling_and_checks_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 998, 500).astype(np.uint16), rng.integers(0, 1000, 100).astype(np.uint16)
    train[10] = 999
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    corpus = load_corpus(tmp_path / "train.bin", seq_len=32, vocab_size=1000)
    assert np.array_equal(corpus.train.numpy(), train) and np.array_equal(corpus.val.numpy(), val)
    with pytest.raises(DataError, match=r"token id 999 \(first out-of-range id at position 10\) is not below --vocab-size 999"):
        load_corpus(tmp_path / "train.bin", seq_len=32, vocab_size=999)
    single = tmp_path / "all.bin"
    train.tofile(single)
    corpus = load_corpus(single, seq_len=32, vocab_size=1000)
    assert len(corpus.train) == 450 and np.array_equal(corpus.val.numpy(), train[450:])


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"), ("empty_text", "empty"), ("short", "fewer than one sequence"),
    ("latin1", "not UTF-8 text \\(byte 3\\)"), ("odd_bin", "not a whole number of uint16"),
    ("empty_folder", "holds no files"), ("bin_no_vocab", "--vocab-size"), ("text_with_vocab", "drop --vocab-size"),
])  # fmt: skip
def test_bad_corpora_are_named(tmp_path: Path, case: str, match: str) -> None:
    path, vocab = tmp_path / "data.txt", None
    if case == "empty_text":
        path.write_text("")
    elif case == "short":
        path.write_text("x" * 50)
    elif case == "latin1":
        path.write_bytes("abc\xe9t\xe9".encode("latin-1") * 100)
    elif case == "odd_bin":
        path, vocab = tmp_path / "data.bin", 100
        path.write_bytes(b"\x01\x00\x02")
    elif case == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "bin_no_vocab":
        path = tmp_path / "data.bin"
        np.zeros(100, np.uint16).tofile(path)
    elif case == "text_with_vocab":
        path.write_text(TEXT)
        vocab = 50257
    with pytest.raises(DataError, match=match):
        load_corpus(path, seq_len=32, vocab_size=vocab)


def test_record_on_a_text_file_and_on_a_bin(tmp_path: Path) -> None:
    """End to end: the run's config names the corpus, the model takes the .bin's vocabulary, the last line
    says how many epochs of the training split the run saw."""
    text = tmp_path / "poem.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "text.h5"
    result = run_cli("record", "--config", "debug", "--device", "cpu", "--steps", "4", "--every", "2",
                     "--data", str(text), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "epochs of the training split" in result.stdout
    with h5py.File(out, "r") as f:
        preset = json.loads(f.attrs["config"])["preset"]
    assert preset["data"] == str(text.resolve()) and preset["model"]["vocab_size"] == 256
    ids = np.random.default_rng(1).integers(0, 700, 3000).astype(np.uint16)
    ids.tofile(tmp_path / "tok.bin")
    out = tmp_path / "bin.h5"
    result = run_cli("record", "--config", "debug", "--device", "cpu", "--steps", "2", "--every", "2", "--data",
                     str(tmp_path / "tok.bin"), "--vocab-size", "700", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["config"])["preset"]["model"]["vocab_size"] == 700


@pytest.mark.parametrize("args,words", [
    (("--data", "{tmp}/nothing.txt"), ("no such file",)),
    (("--data", "{tmp}/tok.bin"), ("--vocab-size",)),
    (("--vocab-size", "100"), ("give --data",)),
    (("--data", "{tmp}/tok.bin", "--vocab-size", "10"), ("not below --vocab-size 10",)),
])  # fmt: skip
def test_record_data_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "tok.bin")
    result = run_cli("record", "--config", "debug", "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "r.h5"),
                     *(a.format(tmp=tmp_path) for a in args))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert not (tmp_path / "r.h5").exists()
