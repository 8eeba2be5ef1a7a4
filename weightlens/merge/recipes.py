"""Running a merge recipe: the merge it describes, then the export, key by key.

Recipes are read, validated and written by :mod:`weightlens.io.recipe`; running one needs the merge
engine, so it lives here (``weightlens merge recipe.yaml`` calls :func:`run_recipe`).

Examples
--------
>>> from weightlens.merge import run_recipe
>>> run_recipe("merged/weightlens_recipe.yaml", "again/")       # doctest: +SKIP
PosixPath('again')
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from weightlens.errors import InvalidParameterError
from weightlens.io.export import export
from weightlens.io.recipe import Recipe, load_recipe
from weightlens.linalg import DecompositionCache, available_cores, torch_threads
from weightlens.merge.engine import MergeResult, merge
from weightlens.taskvectors import TaskVectors

__all__ = ["merge_recipe", "run_recipe"]

_RUN_CACHE_BYTES = 256 * 2**20  # a lazy export reads each update once; keep the cache small


def _as_recipe(recipe: Recipe | str | os.PathLike[str]) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def merge_recipe(recipe: Recipe | str | os.PathLike[str], *, device: str | None = None,
                 progress: bool = False) -> MergeResult:
    """The merge a recipe (or recipe file) describes, lazy: keys are computed when read.

    ``device`` overrides the recipe's; a recipe recorded on CUDA needs CUDA unless overridden.
    """
    recipe = _as_recipe(recipe)
    device = device or recipe.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(
            f"The recipe's merge ran on {device!r}, and no CUDA device is present here; pass "
            "device='cpu' (command line: --device cpu). The weights may then differ from the recorded "
            "sha256 in the last bits."
        )
    tv = TaskVectors(recipe.path(recipe.base), {n: recipe.path(p) for n, p in recipe.finetuned.items()},
                     include=recipe.include, exclude=recipe.exclude, cache=DecompositionCache(_RUN_CACHE_BYTES))
    return merge(tv, method=recipe.method, device=device, progress=progress, lazy=True, **recipe.params)


def run_recipe(recipe: Recipe | str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               overwrite: bool = False, progress: bool = True, device: str | None = None) -> Path:
    """Merge and export into ``out`` (default: the recipe's ``output``); returns the folder.

    The export is atomic and writes the recipe it ran (parameters resolved) beside the weights;
    ``Recipe.check(folder)`` then compares the weight files with the recipe's ``expect``.
    """
    recipe = _as_recipe(recipe)
    target = out if out is not None else (recipe.path(recipe.output) if recipe.output else None)
    if target is None:
        raise InvalidParameterError("The recipe has no 'output' folder; pass one (command line: --out DIR).")
    merged = merge_recipe(recipe, device=device)
    like: Any = recipe.path(recipe.like) if recipe.like else False
    threads = _threads_for(recipe) if torch.device(device or recipe.device).type == "cpu" else None
    done = replace(recipe, params=dict(merged.params), device=device or recipe.device, threads=threads)
    with torch_threads(threads or torch.get_num_threads()):  # the merge is lazy: it runs during the export
        return export(merged, target, like=like, recipe=done,
                      shard_size=recipe.shard_size, dtype=recipe.dtype, overwrite=overwrite, progress=progress)


def _threads_for(recipe: Recipe) -> int:
    """The recipe's thread count when this machine has the cores for it, else torch's current one.

    More OpenMP threads than cores does not change the bits but spins: 16 threads on 2 cores made
    SVDs 270x slower (measured), so a recipe from a bigger machine runs on this one's threads, with a
    warning that SVD-based weights may then differ in the last bits.
    """
    if not recipe.threads:
        return torch.get_num_threads()
    cores = available_cores()
    if recipe.threads <= cores:
        return recipe.threads
    warnings.warn(
        f"The recipe's merge ran on {recipe.threads} CPU threads and this machine has {cores} cores; running on "
        f"{torch.get_num_threads()} threads instead, so weights built on SVDs (TSV-M, Iso-C, Iso-CTS, STAR) may "
        "differ from the recorded sha256 in the last bits.",
        RuntimeWarning, stacklevel=3,
    )
    return torch.get_num_threads()
