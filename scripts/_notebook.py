"""What every ``make_*.py`` notebook script shares: cells as ``("md" | "code", source)`` pairs into a notebook file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def build(cells: Sequence[tuple[str, str]], prefix: str) -> nbformat.NotebookNode:
    """The notebook, outputs empty; cell ids ``<prefix>-NN`` (stable: regenerating changes only what was edited)."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"{prefix}-{i:02d}"
    return nb


def write(cells: Sequence[tuple[str, str]], out: Path, prefix: str) -> None:
    """Write :func:`build`'s notebook to ``out`` and print its path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(build(cells, prefix), out)
    print(out)
