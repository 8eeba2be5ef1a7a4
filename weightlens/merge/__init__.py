"""Merging fine-tunes of one base model: one registry, one engine, seven methods.

``merge(tv, method=..., **params)`` returns the full merged weights; ``compare(tv, merged)`` shows
what the merge kept of each task and which sign conflicts it settled; ``sweep`` scores a grid of
coefficients (chosen on validation, reported on test); ``run_recipe`` repeats a recorded merge
and its export.

Methods (``list_methods()``): ``task_arithmetic``, ``ties``, ``dare`` (:mod:`.arithmetic`);
``tsv``, ``iso_c``, ``iso_cts``, ``star`` (:mod:`.spectral`). Add one with
:func:`register_merge`.
"""

from weightlens.merge.registry import (
    Interval,
    KeyUpdate,
    MergeMethod,
    get_method,
    list_methods,
    register_merge,
)
from weightlens.merge.engine import MergeContext, MergeResult, merge
from weightlens.merge import arithmetic as _arithmetic  # noqa: F401  (registers the methods)
from weightlens.merge import spectral as _spectral  # noqa: F401
from weightlens.merge.compare import Comparison, compare
from weightlens.merge.recipes import merge_recipe, run_recipe
from weightlens.merge.sweep import SweepResult, alpha_grid, reference_scores, sweep

__all__ = [
    "Comparison",
    "Interval",
    "KeyUpdate",
    "MergeContext",
    "MergeMethod",
    "MergeResult",
    "SweepResult",
    "alpha_grid",
    "compare",
    "get_method",
    "list_methods",
    "merge",
    "merge_recipe",
    "reference_scores",
    "register_merge",
    "run_recipe",
    "sweep",
]
