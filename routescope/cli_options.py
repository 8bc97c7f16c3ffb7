"""What several commands share, declared once: the one-line error exit, and the calibrated tests' thresholds
(docs/metrics.md, "Thresholds") of `report`, `dash` and `prune`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

errors = Console(stderr=True)


def fail(message: str) -> None:
    """Print one line saying what is wrong and what to do, then exit with code 2."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# The calibrated tests' thresholds (docs/metrics.md, "Thresholds"), options of `report` and `dash`
DeltaOption = Annotated[Optional[float], typer.Option(help="Dead: the reach is provably under DELTA of the balanced share "
                                                           "(default 0.05).")]  # fmt: skip
AlphaOption = Annotated[Optional[float], typer.Option(help="One-sided error of each Clopper–Pearson bound (default 0.05).")]
EpsilonOption = Annotated[Optional[float], typer.Option(help="Frozen: the minority child provably gets under EPSILON "
                                                             "(default 0.01).")]  # fmt: skip
PersistenceOption = Annotated[Optional[int], typer.Option(help="K: intervals per rolling window, and windows a death must "
                                                               "persist (default 5).")]  # fmt: skip


def thresholds(delta: float | None, alpha: float | None, epsilon: float | None, persistence: int | None):  # type: ignore[no-untyped-def]
    """analysis.Thresholds from the options given (the defaults for the rest); MetricsError when out of range."""
    from routescope.analysis.calibrated import Thresholds

    given = {"delta": delta, "alpha": alpha, "epsilon": epsilon, "persistence": persistence}
    return Thresholds(**{k: v for k, v in given.items() if v is not None})
