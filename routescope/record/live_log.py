"""Live logging into the trackers users watch: `Recorder(..., log_to="tensorboard" | "wandb" | writer | callable)`.

At each interval end the writer thread, which already holds the interval's counts on the host, computes a
bounded set of version-2 metrics per layer over the last K intervals (as `analysis.timeseries` does) and hands
them to the tracker under `routescope/<family>/layer<L>/<metric>`: a few keys per layer, never one per unit,
and no extra device sync.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from routescope.analysis.calibrated import DEFAULT, PERSISTENCE, Thresholds
from routescope.analysis.families import l1_metrics_numpy, moe_metrics_numpy
from routescope.analysis.tree import LayerInfo, layer_slice, tree_metrics_numpy
from routescope.store.schema import active_bin_edges

LIVE_METRICS = {
    "tree": ("static_fraction", "dead_fraction", "frozen_fraction", "leaf_entropy_norm", "right_starved_share"),
    "l1": ("active_fraction", "dead_fraction"),
    "moe": ("load_cv", "dead_experts", "router_entropy_norm", "drop_fraction"),
}
Emit = Callable[[dict[str, float], int], None]


def tag(family: str, layer: int, metric: str) -> str:
    """The stable key of one layer's metric (the same names `routescope export --to tensorboard` writes)."""
    return f"routescope/{family}/layer{layer}/{metric}"


class LiveLog:
    """Turns each interval's host counts into the bounded metric set (rolling K intervals) and emits it."""

    def __init__(self, layers: list[tuple[str, Any]], emit: Emit, rolling: int = PERSISTENCE, th: Thresholds = DEFAULT,
                 close: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.emit, self.th, self._close = emit, th, close
        self.history: dict[str, deque[dict[str, np.ndarray]]] = {}
        self.rolling = rolling
        self.layers: dict[str, list[Any]] = {}
        for _, layer in layers:
            self.layers.setdefault(layer.family, []).append(layer)

    def __call__(self, step: int, groups: dict[str, dict[str, np.ndarray]], scalars: dict[str, float]) -> None:
        values: dict[str, float] = {}
        for family, rows in groups.items():
            window = self.history.setdefault(family, deque(maxlen=self.rolling))
            window.append({k: np.asarray(v) for k, v in rows.items()})
            sums = {k: sum(w[k] for w in window) for k in window[0]}
            for index, layer in enumerate(self.layers.get(family, [])):
                for metric, value in self.metrics(family, index, layer, sums).items():
                    if np.isfinite(value):
                        values[tag(family, index, metric)] = value
        for name in ("train_loss", "val_loss"):
            if np.isfinite(scalars.get(name, np.nan)):
                values[f"routescope/run/{name}"] = float(scalars[name])
        self.emit(values, int(step))

    def metrics(self, family: str, index: int, layer: Any, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """One layer's live metrics from window-summed group rows (its row `index`)."""
        spec = layer.spec
        if family == "tree":
            info = LayerInfo(index, "", "tree", spec.depth, spec.trees, spec.variant, spec.leaf_width)
            per_tree = tree_metrics_numpy(layer_slice({**sums, "tokens": sums["layer_tokens"][index]}, info, 0), info, self.th)
            with np.errstate(invalid="ignore"):
                return {m: float(np.nanmean(per_tree[m])) if np.isfinite(per_tree[m]).any() else np.nan
                        for m in LIVE_METRICS["tree"]}  # fmt: skip
        mine = {k: (v[index] if np.ndim(v) else v) for k, v in sums.items()}
        mine["tokens"] = sums["layer_tokens"][index]
        if family == "l1":
            out = l1_metrics_numpy(mine, spec.d_hidden, active_bin_edges(spec.d_hidden)[:-1], self.th)
        else:
            out = moe_metrics_numpy(mine, spec.experts, spec.k, self.th)
        return {m: float(out[m]) for m in LIVE_METRICS[family]}

    def emit_safely(self, step: int, groups: dict[str, dict[str, np.ndarray]], scalars: dict[str, float]) -> LiveLog | None:
        """Log one interval; a tracker's failure warns once and returns None (the recorder drops the live log)
        instead of stopping the recording."""
        try:
            self(step, groups, scalars)
        except Exception as err:  # noqa: BLE001 - a tracker's failure must not stop the recording
            from routescope.record.packing import reason

            warnings.warn(f"live logging stopped ({reason(err)}); the run file is still written", RuntimeWarning, stacklevel=2)
            return None
        return self

    def close(self) -> None:
        if self._close is not None:
            self._close()


def check_log_to(log_to: Any) -> None:
    """Refuse a `log_to` that cannot work before any file is opened (ValueError, one line)."""
    if log_to is None or (not isinstance(log_to, str) and (hasattr(log_to, "add_scalar") or callable(log_to))):
        return
    if log_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("log_to='tensorboard' needs the tensorboard package: pip install 'routescope[tensorboard]'") from None
        return
    if log_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise ValueError("log_to='wandb' needs the wandb package: pip install 'routescope[wandb]'") from None
        if wandb.run is None:
            raise ValueError("log_to='wandb' logs into the active run: call wandb.init(...) before creating the Recorder")
        return
    raise ValueError(f"log_to must be 'tensorboard', 'wandb', a SummaryWriter or a callable(values, step); got {log_to!r}")


def make_live_log(log_to: Any, run_path: Path, layers: list[tuple[str, Any]], rolling: int = PERSISTENCE) -> LiveLog | None:
    """A LiveLog for `log_to`: "tensorboard" (event files in RUN.tb/ beside the run file), "wandb" (the active
    `wandb.run`), a SummaryWriter-like object (`add_scalar`), or a callable(values, step)."""
    if log_to is None:
        return None
    check_log_to(log_to)
    if log_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_path.with_suffix(".tb")))
        return LiveLog(layers, lambda values, step: [writer.add_scalar(k, v, step) for k, v in values.items()] and None,
                       rolling, close=writer.close)  # fmt: skip
    if log_to == "wandb":
        import wandb

        run = wandb.run
        return LiveLog(layers, lambda values, step: run.log({**values, "routescope/step": step}), rolling)
    if hasattr(log_to, "add_scalar"):
        return LiveLog(layers, lambda values, step: [log_to.add_scalar(k, v, step) for k, v in values.items()] and None,
                       rolling)  # fmt: skip
    return LiveLog(layers, log_to, rolling)
