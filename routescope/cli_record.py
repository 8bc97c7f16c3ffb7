"""`routescope record`'s configuration steps that are more than option parsing: the config a resumed run
continues with, and a user corpus (`--data`, `--vocab-size`) folded into a preset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from routescope.store.format import RunFileError
from routescope.trainers.presets import TrainConfig


class ConfigError(ValueError):
    """A record configuration that cannot be used; the message is the one line the CLI prints."""


def resumed_config(path: Path, preset: str | None, overrides: dict[str, object]) -> TrainConfig:
    """The training config to resume `path` with: the file's own (or the named preset's), with the overrides given."""
    from routescope.store import RunFile
    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import config_from_dict

    try:
        with RunFile.open(path) as run:
            stored = run.config.get("preset")
    except RunFileError as err:
        raise ConfigError(str(err)) from None
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"{path} has an unreadable config attribute ({err}); cannot resume it") from None
    if not stored:
        raise ConfigError(f"{path} was not recorded by `routescope record` (no preset in its config); it cannot be "
                          "resumed from the CLI")  # fmt: skip
    if preset is not None:
        return get_preset(preset, **overrides)  # compared with the file's when the recorder reopens it
    try:
        return replace(config_from_dict(stored), **{k: v for k, v in overrides.items() if v is not None})
    except TypeError as err:
        raise ConfigError(f"{path} holds a preset this routescope does not know ({err}); cannot resume it") from None


def with_data(cfg: TrainConfig, data: Path | None, vocab_size: int | None) -> TrainConfig:
    """`cfg` training on the user's corpus `data` (an absolute path in the run's config, so a resume finds it);
    a tokenized `.bin` needs `vocab_size`, which becomes the model's vocabulary."""
    if data is None:
        if vocab_size is not None:
            raise ConfigError("--vocab-size applies to a tokenized --data .bin file; give --data too, or drop it")
        return cfg
    if data.suffix == ".bin" and data.is_file() and vocab_size is None:
        raise ConfigError(f"--data {data} holds token ids: give the vocabulary size with --vocab-size (nanoGPT's "
                          "meta.pkl has it; GPT-2's is 50257)")  # fmt: skip
    model = replace(cfg.model, vocab_size=vocab_size) if vocab_size is not None else cfg.model
    return replace(cfg, data=str(data.resolve()), model=model)
