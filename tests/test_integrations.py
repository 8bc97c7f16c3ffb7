"""The Hugging Face and Lightning callbacks: real trainers, a few CPU steps, files read back with plain h5py."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import check_tree_invariants

import routescope
from routescope.trainers.data import Corpus
from routescope.trainers.model import GPT, GPTConfig

BATCH, SEQ, ACCUMULATE, STEPS, EVERY = 2, 16, 2, 6, 2
ROWS = STEPS // EVERY
TOKENS_PER_ROW = EVERY * ACCUMULATE * BATCH * SEQ  # a step's row holds both micro-batches


def windows(n: int) -> torch.Tensor:
    """n Shakespeare byte windows of SEQ + 1 bytes (inputs and next-byte targets)."""
    corpus = Corpus.shakespeare()
    x, y = corpus.batch("train", n, SEQ, torch.Generator().manual_seed(0))
    return torch.cat([x, y[:, -1:]], dim=1)


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {"step": f["tree/step"][:], "tokens": f["tree/tokens"][:], "train_loss": f["run/train_loss"][:],
                "lr": f["run/lr"][:], "run_state": int(f["run_state"][()])}  # fmt: skip


# ---------------------------------------------------------------------------------------------- transformers
def hf_trainer(tmp_path: Path, callbacks: list, max_steps: int = STEPS):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=SEQ))
    routescope.patch(model, depth=3, trees=2)
    data = [{"input_ids": w[:-1], "labels": w[:-1]} for w in windows(BATCH * ACCUMULATE * max_steps)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=max_steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_hf_callback_rows_tokens_and_logs(tmp_path: Path) -> None:
    from routescope.integrations.hf import RoutescopeCallback

    path = tmp_path / "hf.h5"
    trainer = hf_trainer(tmp_path, [RoutescopeCallback(path, every=EVERY, sample_tokens=4)])
    trainer.train()
    run = read(path)
    assert check_tree_invariants(path) == ROWS
    assert list(run["step"]) == [EVERY * (i + 1) for i in range(ROWS)]
    assert list(run["tokens"]) == [TOKENS_PER_ROW] * ROWS
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    expected = [np.mean(logged[i * EVERY : (i + 1) * EVERY]) for i in range(ROWS)]
    np.testing.assert_allclose(run["train_loss"], expected, rtol=1e-6)  # on_log's losses, per row
    assert np.all(run["lr"] > 0) and run["run_state"] == 1
    with h5py.File(path, "r") as f:
        assert (f["traces/token_id"][:] >= 0).all()  # labelled with the micro-batch's input ids


def test_hf_callback_logs_live_into_a_tracker(tmp_path: Path) -> None:
    """log_to= reaches the Recorder through the HF callback: one bounded set of metrics per interval, at the
    interval's step (log_to="wandb" logs into the same active run HF's own W&B reporting uses)."""
    from routescope.integrations.hf import RoutescopeCallback

    seen: list[tuple[int, dict]] = []
    trainer = hf_trainer(tmp_path, [RoutescopeCallback(tmp_path / "hf.h5", every=EVERY, log_to=lambda v, s: seen.append((s, v)))])
    trainer.train()
    assert [step for step, _ in seen] == [EVERY * (i + 1) for i in range(ROWS)]
    assert all("routescope/tree/layer1/static_fraction" in values for _, values in seen)


def test_hf_callback_marks_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from routescope.integrations import hf

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom")

    path = tmp_path / "hf.h5"
    trainer = hf_trainer(tmp_path, [hf.RoutescopeCallback(path, every=EVERY), Boom()])
    with pytest.raises(RuntimeError, match="boom") as info:
        trainer.train()
    assert sys.excepthook is hf._excepthook
    monkeypatch.setattr(hf, "_previous_excepthook", lambda *exc: None)  # don't print the traceback
    hf._excepthook(RuntimeError, info.value, None)  # what Python does when the exception ends the program
    run = read(path)
    assert run["run_state"] == 3 and list(run["step"]) == [2, 3]  # the steps done before the failure are kept


# ---------------------------------------------------------------------------------------------- lightning
def lightning_fit(path: Path, fail_at: int | None = None, logger: object = False,
                  **options: object) -> tuple[list[float], object]:  # fmt: skip
    """Fit the trainers' tree GPT with accumulate_grad_batches=2; return the raw micro-batch losses."""
    pl = pytest.importorskip("lightning.pytorch")
    from routescope.integrations.lightning import RoutescopeCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = GPTConfig(seq_len=SEQ, n_layer=2, n_head=2, d_model=32, depth=3, trees=2, backend="torch")
            self.gpt, self.losses = GPT(cfg), []

        def training_step(self, batch, batch_idx):
            if batch_idx == fail_at:
                raise RuntimeError("boom")
            _, loss = self.gpt(batch[:, :-1], batch[:, 1:])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module = Module()
    data = torch.utils.data.DataLoader(windows(BATCH * ACCUMULATE * STEPS), batch_size=BATCH)
    trainer = pl.Trainer(
        max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RoutescopeCallback(path, every=EVERY, sample_tokens=4, **options)],
    )  # fmt: skip
    trainer.fit(module, data)
    return module.losses, trainer


def test_lightning_callback_rows_tokens_and_losses(tmp_path: Path) -> None:
    path = tmp_path / "pl.h5"
    losses, _ = lightning_fit(path)
    run = read(path)
    assert check_tree_invariants(path) == ROWS
    assert list(run["step"]) == [EVERY * (i + 1) for i in range(ROWS)]
    assert list(run["tokens"]) == [TOKENS_PER_ROW] * ROWS
    per_row = EVERY * ACCUMULATE  # micro-batches per row
    expected = [np.mean(losses[i * per_row : (i + 1) * per_row]) for i in range(ROWS)]
    np.testing.assert_allclose(run["train_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(run["lr"], 1e-3)
    assert run["run_state"] == 1


def test_lightning_callback_logs_into_the_trainers_logger(tmp_path: Path) -> None:
    """log_to="trainer": the bounded metric set reaches the Trainer's own logger (here a CSVLogger) at each
    interval end, under routescope/<family>/layer<L>/<metric>."""
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    lightning_fit(tmp_path / "pl.h5", logger=CSVLogger(tmp_path / "logs", name="x"), log_to="trainer")
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.csv")
    frame = pd.read_csv(metrics_file)
    column = "routescope/tree/layer0/leaf_entropy_norm"
    assert column in frame and frame[column].notna().sum() == ROWS
    assert sorted(frame.loc[frame[column].notna(), "step"]) == [EVERY * (i + 1) for i in range(ROWS)]


def test_lightning_callback_marks_a_failed_run(tmp_path: Path) -> None:
    path = tmp_path / "pl.h5"
    with pytest.raises(RuntimeError, match="boom"):
        lightning_fit(path, fail_at=9)  # micro-batch 9: steps 1-4 done, step 5 half accumulated
    run = read(path)
    assert run["run_state"] == 3 and list(run["step"]) == [2, 4]


@pytest.mark.parametrize("module,framework,extra", [("hf", "transformers", "hf"), ("lightning", "lightning.pytorch", "lightning")])
def test_missing_framework_is_a_clear_import_error(module: str, framework: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, framework, None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, f"routescope.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf'pip install "routescope\[{extra}\]"'):
        importlib.import_module(f"routescope.integrations.{module}")
