"""Every notebook runs top to bottom headless on the CI-size zoo, and none is committed with outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from weightlens._tour import execute_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert any(p.name == "00_tour.ipynb" for p in NOTEBOOKS), "notebooks/00_tour.ipynb is the main job"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executes_headless(path, digits_zoo, digits_pairs, minilm_zoo, minilm_lora, monkeypatch):
    monkeypatch.setenv("WEIGHTLENS_ZOO_SIZE", "ci")
    monkeypatch.setenv("WEIGHTLENS_HEADLESS", "1")
    nb = execute_notebook(path, timeout=900)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert os.environ.get("WEIGHTLENS_ZOO_SIZE") == "ci"
