"""Merging fine-tunes of one base model: one registry, one engine, twenty-five methods.

``merge(tv, method=..., **params)`` returns the full merged weights; ``compare(tv, merged)`` shows
what the merge kept of each task and which sign conflicts it settled; ``sweep`` scores a grid of
coefficients (chosen on validation, reported on test); ``run_recipe`` repeats a recorded merge
and its export.

Methods (``list_methods()``): ``task_arithmetic``, ``ties``, ``dare`` (:mod:`.arithmetic`);
``tsv``, ``iso_c``, ``iso_cts``, ``star`` (:mod:`.spectral`); ``knots_ties``, ``knots_ta``
(:mod:`.knots`); ``peft_cat``, ``peft_svd`` (:mod:`.peft_modes`: PEFT's ``add_weighted_adapter``
modes); mergekit's ``linear`` (:mod:`.linear`), ``slerp`` (:mod:`.slerp`), ``model_stock``
(:mod:`.model_stock`), ``breadcrumbs``, ``breadcrumbs_ties`` (:mod:`.breadcrumbs`), ``della``,
``della_linear`` (:mod:`.della`), ``consensus_ta``, ``consensus_ties`` (:mod:`.consensus`: TALL masks); ``pcb`` (:mod:`.pcb`: PCB-Merging); ``emr`` (:mod:`.emr`:
EMR-Merging, one model per task: ``MergeResult.for_task``); ``wudi`` (:mod:`.wudi`: WUDI-Merging); the data-based ``regmean`` (:mod:`.regmean`) and ``fisher``
(:mod:`.fisher`), which read ``merge(..., data=MergeData)`` (:mod:`.data`: per task a model and input batches; a zoo's ``merge_data()``). A method is one module whose functions carry :func:`register_merge` (schema, alpha grid,
display name, mergekit equivalent); the modules are listed once, in :data:`METHOD_MODULES`, and
everything else (CLI, studio, ``sweep``, recipes) reads the registry. A method defined outside the package only needs its module imported.
"""

import importlib

from weightlens.merge.registry import (
    Interval,
    KeyUpdate,
    MergeMethod,
    get_method,
    list_methods,
    register_merge,
)
from weightlens.merge.engine import MergeContext, MergeResult, merge
from weightlens.merge.data import MergeData
from weightlens.merge.compare import Comparison, compare
from weightlens.merge.recipes import RunRecipeOptions, merge_recipe, run_recipe
from weightlens.merge.sweep import SweepOptions, SweepResult, alpha_grid, reference_scores, sweep

#: The modules that define the built-in methods, in the order ``list_methods()`` gives them; a new
#: method file is one more name here.
METHOD_MODULES = ("arithmetic", "spectral", "knots", "peft_modes", "linear", "slerp", "model_stock", "breadcrumbs", "della",
                  "consensus", "pcb", "emr", "wudi", "regmean", "fisher")
for _module in METHOD_MODULES:
    importlib.import_module(f"{__name__}.{_module}")  # each registers its methods on import

__all__ = [
    "METHOD_MODULES",
    "Comparison",
    "Interval",
    "KeyUpdate",
    "MergeContext",
    "MergeData",
    "MergeMethod",
    "MergeResult",
    "RunRecipeOptions",
    "SweepOptions",
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
