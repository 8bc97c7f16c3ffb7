"""Every notebook executes top to bottom in a real Jupyter kernel, on the tiny sweep settings.

The notebooks share one folder of runs (made by the sweep runner on first use), as a user's would.
Parameters are injected after the cell tagged "parameters", as papermill does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebook-runs")


def test_the_notebooks_are_committed_without_outputs() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["01_auto_pruning", "02_balance", "03_sparsity_and_quality", "04_token_paths",
                                           "05_study"]  # fmt: skip
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} carries outputs"
        assert path.stat().st_size < 100_000
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        assert book.cells[0].cell_type == "markdown" and "Question" in book.cells[0].source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_leaves_figures(path: Path, runs_dir: Path, tmp_path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    tagged = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f'RUNS_DIR = {str(runs_dir)!r}\nSIZE = "tiny"\nSEEDS = 2\nSTEPS = None\nDEVICE = "cpu"')
    book.cells.insert(book.cells.index(tagged) + 1, injected)
    client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if PLOTLY in o.get("data", {})]
    assert len(figures) >= 2, f"{path.name} left {len(figures)} Plotly figures in its outputs"
    for fig in figures:  # labelled axes on every cartesian figure
        layout = fig["data"][PLOTLY]["layout"]
        for axis in ("xaxis", "yaxis"):
            if axis in layout and layout[axis].get("visible", True) and "title" in layout[axis]:
                assert layout[axis]["title"].get("text"), f"unlabelled {axis} in {path.name}"
    tables = [o["data"].get("text/html", "") + o["data"].get("text/plain", "") for o in outputs if "data" in o]
    assert not [t for t in tables if "<lambda" in t or "&lt;lambda" in t], f"{path.name} shows a column named after a lambda"
    if path.stem == "05_study":  # the committed GPU study summaries are what it shows, every size and figure kind
        text = "".join(o.get("text", "") for o in outputs)
        assert all(f"{size}: {n} runs" in text for size, n in (("small-gpu", 30), ("gpu", 12), ("cpu", 30), ("regime", 24)))
        titles = " | ".join(fig["data"][PLOTLY]["layout"].get("title", {}).get("text", "") for fig in figures)
        for kind in ("static fraction", "right-starved share", "μ_n/σ_n", "leaf entropy", "validation loss minus dense",
                     "regime grid"):
            assert kind in titles, f"05_study drew no {kind!r} figure"
        assert "min–max over seeds" in titles  # the seed bands
        rules = "".join(o["data"].get("text/plain", "") for o in outputs if "data" in o)
        assert "replicated" in rules and "supported" in rules
