"""Every README snippet runs as written, top to bottom, in one fresh kernel once the zoo is built.

The ```python blocks of README.md become the cells of one notebook, executed in order by a fresh Jupyter
kernel in a temporary folder (what they write, report.html and out/, lands there). Then the ```bash block of
the command line runs there, line by line, with this environment's ``weightlens`` entry point. The zoo is
the CI size the fixtures build (``WEIGHTLENS_ZOO_SIZE=ci``, so ``zoo.load`` takes it even where a demo zoo
is built too).

The Python blocks have no placeholders: they run on the zoo's files. The command line keeps the names a
user replaces by their own checkpoints; here they become zoo files:

=============  ==========================================================================
README         replaced by
=============  ==========================================================================
``BASE``       the digits-tasks base
``FT1 FT2``    its ``rot90`` and ``hflip`` fine-tunes (names from the file names)
``A B``        the digits-pairs width-128 pair
``scoring.py`` a file written in the run folder: ``evaluate`` is the digits-tasks zoo's
=============  ==========================================================================

Not run (each bash line must be run or listed here): ``./dev.sh ...`` (sets up .venv; CI runs
``./dev.sh test`` itself), ``weightlens zoo build`` (the fixtures built the zoo) and ``weightlens tour``
(executes the MiniLM tour for minutes: ``tests/test_notebooks.py`` runs that notebook and
``tests/test_cli.py`` the command's path resolution).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from weightlens._tour import execute_notebook

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
NOT_RUN = (("./dev.sh",), ("weightlens", "zoo", "build"), ("weightlens", "tour"))
SCORING = 'from weightlens import zoo\n\nevaluate = zoo.load("digits-tasks").evaluate\n'


def blocks(lang: str) -> list[tuple[int, str]]:
    """``(line, source)`` of each fenced block of README.md in ``lang``, in order (line: of the fence)."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def commands() -> tuple[list[tuple[int, list[str]]], list[str]]:
    """The README's bash lines as argument lists (comments dropped), and the lines not run."""
    run, skipped = [], []
    for start, source in blocks("bash"):
        for i, line in enumerate(source.splitlines(), start + 1):
            args = shlex.split(line, comments=True)
            if not args:
                continue
            if any(tuple(args[: len(prefix)]) == prefix for prefix in NOT_RUN):
                skipped.append(line)
            else:
                run.append((i, args))
    return run, skipped


def test_the_readme_has_the_blocks_this_test_runs():
    python = blocks("python")
    assert len(python) >= 4 and all(src.strip() for _, src in python)
    run, skipped = commands()
    assert all(args[0] == "weightlens" for _, args in run), "a bash line neither run here nor listed in NOT_RUN"
    assert {args[1] for _, args in run} >= {"report", "sweep", "merge", "rebasin", "lmc", "zoo"}
    assert any("tour" in line for line in skipped) and any("zoo build" in line for line in skipped)
    text = README.read_text(encoding="utf-8")
    assert "zoo.evaluate" not in text and "like=base" not in text and "--size ci|demo" not in text


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("weightlens")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "weightlens.cli"]


@pytest.mark.slow
def test_every_snippet_runs_as_written_in_a_fresh_kernel(digits_zoo, digits_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTLENS_ZOO_SIZE", "ci")
    monkeypatch.setenv("WEIGHTLENS_HEADLESS", "1")  # widgets display a static snapshot (no browser here)
    monkeypatch.chdir(tmp_path)

    # 1. the Python blocks, top to bottom, in one fresh kernel (cwd: tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"# README.md line {line}\n{src}") for line, src in blocks("python")]
    nbformat.write(nb, tmp_path / "readme.ipynb")
    executed = execute_notebook(tmp_path / "readme.ipynb", timeout=300)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert (tmp_path / "report.html").is_file()
    assert (tmp_path / "out" / "merged" / "weightlens_recipe.yaml").is_file()
    assert (tmp_path / "out" / "again").is_dir()

    # 2. the command line, in the same folder, with the placeholders of the docstring's table
    pair = digits_pairs[128]
    names = {"BASE": digits_zoo.base, "FT1": digits_zoo.finetuned["rot90"], "FT2": digits_zoo.finetuned["hflip"],
             "A": pair.a, "B": pair.b}
    (tmp_path / "scoring.py").write_text(SCORING)
    weightlens = _entry_point()
    run, _ = commands()
    outputs = {}
    for line, args in run:
        argv = weightlens + [str(names.get(a, a)) for a in args[1:]]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "WEIGHTLENS_ZOO_SIZE": "ci"})
        assert done.returncode == 0, f"README.md line {line}: {shlex.join(args)}\n{done.stderr[-3000:]}"
        outputs[line] = done.stdout
    assert (tmp_path / "tables" / "spectra.csv").is_file()
    assert (tmp_path / "out" / "again-cli").is_dir() and (tmp_path / "out" / "by-flags").is_dir()
    assert (tmp_path / "matched").is_dir()
    assert sum("chosen alpha:" in out for out in outputs.values()) == 2
    shutil.rmtree(tmp_path / "out")  # a few MB
