"""Every tutorial notebook runs top to bottom in a fresh kernel, and its plots render.

The notebooks are stored as jupytext percent-format scripts (``tutorials/NN_*.py``); each test converts one
to a notebook, executes it with nbclient in ``tutorials/`` (where Jupyter runs it), and fails on the first
cell that raises. A cell tagged ``plot`` must produce at least one ``image/png`` output. Runs go to a
temporary directory (``GPTLAB_TUTORIAL_OUT``), and the hub is off (``HF_HUB_OFFLINE=1``): the weights
tutorial then shows what to do offline instead of downloading 500 MB. The executed notebook, outputs
included, is written to the test's ``tmp_path``.
"""
from __future__ import annotations

import time
from pathlib import Path

import jupytext  # these four come with the dev extra
import nbclient
import nbformat
import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
TUTORIALS = sorted(TUTORIALS_DIR.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 180  # the hard cap of the whole notebook, too (see test_tutorial_runs)


def test_the_tutorials_are_all_here():
    names = [p.stem for p in TUTORIALS]
    assert names == ["01_tokenization", "02_attention", "03_gpt_model", "04_pretraining", "05_decoding",
                     "06_weights", "07_classification", "08_instruction_tuning"]


def _png_count(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path: Path, tmp_path: Path, monkeypatch, record_property):
    notebook = jupytext.read(path)
    plot_cells = [c for c in notebook.cells if "plot" in c.metadata.get("tags", [])]
    assert plot_cells, f"{path.name}: no cell is tagged 'plot'"
    monkeypatch.setenv("GPTLAB_TUTORIAL_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first error
    finally:
        elapsed = time.perf_counter() - start
        record_property("seconds", round(elapsed, 1))
        nbformat.write(notebook, tmp_path / f"{path.stem}.ipynb")
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < CELL_TIMEOUT_S, f"{path.name} took {elapsed:.0f} s; a tutorial must finish within 3 minutes"
    for cell in plot_cells:
        assert _png_count(cell) >= 1, f"{path.name}: the plot cell did not draw a PNG:\n{cell.source}"
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
