"""The public surface: ``import weightlens`` stays light, and every documented name resolves."""

from __future__ import annotations

import subprocess
import sys

import weightlens as wl


def test_import_is_light():
    code = (
        "import sys, weightlens as wl; wl.load({}) ; "
        "heavy = [m for m in ('plotly', 'ipywidgets', 'pandas', 'scipy', 'sklearn', 'ray') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_documented_names_resolve():
    for name in ("load", "Checkpoint", "TaskVectors", "analyze", "merge", "compare", "diagnose", "Diagnosis", "sweep",
                 "lmc", "rebasin", "zoo"):
        assert getattr(wl, name) is not None, name
    assert callable(wl.analyze) and callable(wl.merge)
    assert set(wl._LAZY) <= set(dir(wl))


def test_importing_the_merge_subpackage_keeps_wl_merge_a_function():
    import weightlens.merge.compare  # noqa: F401  (binds the subpackage on its parent)
    from weightlens.merge import merge

    assert wl.merge is merge and callable(wl.merge)


def test_every_figure_builder_is_exported_from_weightlens_figures():
    import importlib
    import inspect
    import pkgutil

    import weightlens.figures as figures

    defined = set()
    for info in pkgutil.iter_modules(figures.__path__):
        module = importlib.import_module(f"weightlens.figures.{info.name}")
        defined |= {n for n, f in inspect.getmembers(module, inspect.isfunction)
                    if n.startswith("figure_") and f.__module__ == module.__name__}
    assert defined and defined <= set(figures.__all__)
    assert all(callable(getattr(figures, n)) for n in figures.__all__)
