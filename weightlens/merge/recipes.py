"""A merge's recipe: built from a merge result for its export, and run (the merge it describes, then
the export, key by key).

Recipes are read, validated and written by :mod:`weightlens.io.recipe`, which knows no merge methods;
building one from a merge (inputs, fingerprints, device, threads, the mergekit equivalent from the
method's registration) and running one need the merge engine, so they live here
(``MergeResult.export_recipe`` calls :func:`export_recipe`; ``weightlens merge recipe.yaml`` calls
:func:`run_recipe`).

Examples
--------
>>> from weightlens.merge import run_recipe
>>> run_recipe("merged/weightlens_recipe.yaml", "again/")       # doctest: +SKIP
PosixPath('again')
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from weightlens._version import __version__
from weightlens._options import resolve_options
from weightlens.errors import InvalidParameterError, ReproducibilityError
from weightlens.io import _fingerprint as _fp
from weightlens.io.export import ExportOptions, export
from weightlens.io.recipe import (
    ExportRecipe,
    Recipe,
    check_fingerprint_mode,
    given_recipe,
    load_recipe,
    recipe_metadata,
)
from weightlens.io.recipe import mergekit_config as _mergekit_yaml
from weightlens.linalg import DecompositionCache, available_cores, torch_threads
from weightlens.merge.engine import MergeResult, merge
from weightlens.merge.registry import get_method, list_methods, mergekit_of
from weightlens.taskvectors import TaskVectors

__all__ = [
    "RunRecipeOptions",
    "export_recipe",
    "input_fingerprints",
    "merge_recipe",
    "mergekit_config",
    "not_reproducible",
    "run_recipe",
]

_RUN_CACHE_BYTES = 256 * 2**20  # a lazy export reads each update once; keep the cache small


# ---------------------------------------------------------------------------------------- building
def input_fingerprints(tv: TaskVectors, base: str, finetuned: Mapping[str, str], mode: str,
                       known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``fingerprints`` field for task vectors loaded from ``base`` and ``finetuned`` (paths).

    ``known`` (a recipe's recorded fingerprints) are reused for files whose fingerprint in ``mode`` was
    just checked, so no file is hashed twice.
    """
    known = known or {}

    def one(ckpt: Any, path: str, prior: Mapping[str, Any] | None) -> dict[str, Any]:
        return _fp.fingerprint_files(_fp.checkpoint_files(ckpt), _fp.anchor_of(path), mode, prior)

    return {
        "base": one(tv.base, base, known.get("base")),
        "finetuned": {n: one(tv.finetuned[n], p, (known.get("finetuned") or {}).get(n))
                      for n, p in finetuned.items()},
    }


def not_reproducible(merged: MergeResult) -> str | None:
    """Why no recipe can be derived from ``merged`` (``None`` when one can: every input is a file)."""
    tv = merged.task_vectors
    for role, ckpt in (("base", tv.base), *((f"fine-tune {n!r}", c) for n, c in tv.finetuned.items())):
        if not Path(str(ckpt.source)).exists():
            return (f"the {role} was given in memory ({ckpt.source}), not as a file; save it (e.g. "
                    "wl.export(state_dict, folder)) and merge from the file to get a re-runnable recipe")
    return None


def mergekit_config(recipe: Recipe, *, base_dtype: str | None = None) -> tuple[str, str] | None:
    """``(mergekit YAML, how exact it is)`` for a recipe whose method is registered with a mergekit
    equivalent (task_arithmetic, ties, dare); ``None`` otherwise."""
    return _mergekit_yaml(recipe, mergekit_of(recipe.method, recipe.params), base_dtype=base_dtype)


def _derived(merged: MergeResult, *, out: Path, like: Path | None, dtype: torch.dtype | None,
             shard_size: int | str, fingerprint: str) -> Recipe:
    """The recipe of ``merged`` (its inputs are files), fingerprinted in mode ``fingerprint``."""
    tv, device = merged.task_vectors, merged.device
    base = os.path.abspath(tv.base.source)
    finetuned = {n: os.path.abspath(c.source) for n, c in tv.finetuned.items()}
    return Recipe(
        base=base, finetuned=finetuned,
        method=merged.method, params=dict(merged.params), include=tv.include, exclude=tv.exclude,
        device=device, threads=torch.get_num_threads() if torch.device(device).type == "cpu" else None,
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        shard_size=shard_size, like=None if like is None else os.path.abspath(like),
        output=str(Path(os.path.abspath(out))),
        fingerprints=input_fingerprints(tv, base, finetuned, fingerprint), weightlens_version=__version__,
    )


def export_recipe(merged: MergeResult, recipe: Any = None, *, out: Path, like: Path | None = None,
                  dtype: torch.dtype | None = None, shard_size: int | str = "5GB",
                  fingerprint: str = "header") -> ExportRecipe:
    """What ``wl.export(merged, out, recipe=recipe, ...)`` writes about the merge: the recipe given
    (validated) or derived from ``merged`` (``None`` for ``recipe=False`` or inputs given in memory),
    its mergekit equivalent and the shard metadata."""
    if recipe is not False:
        check_fingerprint_mode(fingerprint)
    why = not_reproducible(merged)
    done = given_recipe(recipe, out)
    if recipe is None and why is None:
        done = _derived(merged, out=out, like=like, dtype=dtype, shard_size=shard_size, fingerprint=fingerprint)
    if done is None:
        r = merged.recipe
        meta = {"method": r["method"], "parameters": r["params"], "tasks": r["tasks"]}
        return ExportRecipe(None, metadata=meta, why_not=why or "no recipe was requested (recipe=False)",
                            from_merge=True)
    return ExportRecipe(done, mergekit_of(done.method, done.params), recipe_metadata(done), from_merge=True)


# ---------------------------------------------------------------------------------------- running
def _as_recipe(recipe: Recipe | str | os.PathLike[str]) -> Recipe:
    return recipe.checked() if isinstance(recipe, Recipe) else load_recipe(recipe)


def _inputs(recipe: Recipe, *, check: bool, mode: str | None = None) -> tuple[TaskVectors, dict[str, Any]]:
    """The recipe's task vectors and their inputs' fingerprints now (in ``mode``; default: the recipe's).

    With ``check``, recorded files are compared before anything is loaded, and the files loaded must be
    the recorded ones (``ReproducibilityError`` naming the input, the file and what changed).
    """
    recorded = recipe.fingerprints
    mode = mode or _fp.mode_of({f"{r}/{n}": f for r, _, fps in _roles(recipe, recorded) for n, f in fps.items()})
    if check:
        _check_recorded(recipe)
    paths = {n: recipe.path(p) for n, p in recipe.finetuned.items()}
    tv = TaskVectors(recipe.path(recipe.base), paths, include=recipe.include, exclude=recipe.exclude,
                     cache=DecompositionCache(_RUN_CACHE_BYTES))
    current = input_fingerprints(tv, recipe.path(recipe.base), paths, mode, recorded if check else None)
    if check:
        _check_same_files(recipe, current)
    return tv, current


def _merge(recipe: Recipe, tv: TaskVectors, device: str | None, progress: bool) -> MergeResult:
    device = device or recipe.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(
            f"The recipe's merge ran on {device!r}, and no CUDA device is present here; pass "
            "device='cpu' (command line: --device cpu). The weights may then differ from the recorded "
            "sha256 in the last bits."
        )
    return merge(tv, method=recipe.method, device=device, progress=progress, lazy=True, **recipe.params)


def merge_recipe(recipe: Recipe | str | os.PathLike[str], *, device: str | None = None,
                 progress: bool = False, check_inputs: bool = True) -> MergeResult:
    """The merge a recipe (or recipe file) describes, lazy: keys are computed when read.

    ``device`` overrides the recipe's; a recipe recorded on CUDA needs CUDA unless overridden. Inputs
    that differ from the recipe's fingerprints raise ``ReproducibilityError`` unless ``check_inputs=False``.
    """
    recipe = _as_recipe(recipe)
    return _merge(recipe, _inputs(recipe, check=check_inputs)[0], device, progress)


@dataclass(frozen=True)
class RunRecipeOptions:
    """The reproducibility and safety checks of :func:`run_recipe` (all have defaults).

    Attributes
    ----------
    verify : check the written weights against the recipe's ``expect`` before the folder is moved
        into place (default True); a mismatch raises ``ReproducibilityError`` leaving no output.
    check_inputs : compare the inputs with the recipe's ``fingerprints`` before anything is merged
        (default True); False merges changed inputs anyway.
    fingerprint : how the recipe written beside the weights fingerprints the inputs, ``"header"``
        or ``"full"`` (default None: the recipe's own mode).
    overwrite_any : replace a non-empty output folder that is not a weightlens export (default False).
    """

    verify: bool = True
    check_inputs: bool = True
    fingerprint: str | None = None
    overwrite_any: bool = False

    def __post_init__(self) -> None:
        if self.fingerprint is not None:
            check_fingerprint_mode(self.fingerprint)


def run_recipe(recipe: Recipe | str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               overwrite: bool = False, progress: bool = True, device: str | None = None,
               options: RunRecipeOptions | None = None, **overrides: Any) -> Path:
    """Merge and export into ``out`` (default: the recipe's ``output``); returns the folder.

    Before anything is merged, the inputs are compared with the recipe's ``fingerprints`` (a changed
    one raises ``ReproducibilityError``; ``check_inputs=False`` merges them anyway; a recipe without
    fingerprints has nothing to check). The export is atomic; with ``verify`` (the default) the weights
    are checked against the recipe's ``expect`` before the folder is moved into place, and a mismatch
    raises ``ReproducibilityError`` leaving no output. The recipe written beside the weights records the
    inputs as they are now (``fingerprint``: "header" or "full"; default: the recipe's own mode).
    ``overwrite_any`` replaces a non-empty folder that is not a weightlens export. These four are the
    fields of ``options`` (a :class:`RunRecipeOptions`), and ``**overrides`` set them directly, e.g.
    ``run_recipe(path, out, verify=False)``.
    """
    opts = resolve_options(RunRecipeOptions, options, overrides, caller="run_recipe")
    check_inputs = opts.check_inputs
    recipe = _as_recipe(recipe)
    target = _target(recipe, out)
    tv, current = _inputs(recipe, check=check_inputs, mode=opts.fingerprint)
    merged = _merge(recipe, tv, device, progress=False)
    like: Any = recipe.path(recipe.like) if recipe.like else False
    threads = _threads_for(recipe) if torch.device(device or recipe.device).type == "cpu" else None
    paths = {n: recipe.path(p) for n, p in recipe.finetuned.items()}
    done = replace(recipe, base=recipe.path(recipe.base), finetuned=paths, like=like or None,
                   params=dict(merged.params), device=device or recipe.device, threads=threads, fingerprints=current)
    checked = bool(recipe.fingerprints) and check_inputs
    check = _verifier(recipe, target, device, checked) if opts.verify and recipe.expect else None
    written = ExportOptions(recipe=done, verify=check, overwrite_any=opts.overwrite_any)
    with torch_threads(threads or torch.get_num_threads()):  # the merge is lazy: it runs during the export
        return export(merged, target, like=like, shard_size=recipe.shard_size, dtype=recipe.dtype,
                      overwrite=overwrite, progress=progress, options=written)


def _target(recipe: Recipe, out: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    """The output folder: ``out``, else the recipe's ``output``; an empty one is refused."""
    if isinstance(out, str) and not out.strip():
        raise InvalidParameterError("The output folder is an empty string; give a folder (command line: --out DIR).")
    if out is not None:
        return out
    if not recipe.output or not recipe.output.strip():
        raise InvalidParameterError(f"{recipe.where}: the recipe has no 'output' folder; pass one "
                                    "(command line: --out DIR).")
    return recipe.path(recipe.output)


# ---------------------------------------------------------------------------------------- inputs
def _roles(recipe: Recipe, fingerprints: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """``(role, path, {file: fingerprint})`` for each input with fingerprints (role: ``"base"`` or
    ``"fine-tune 'name'"``)."""
    if "base" in fingerprints:
        yield "base", recipe.path(recipe.base), fingerprints["base"]
    for name, fps in (fingerprints.get("finetuned") or {}).items():
        yield f"fine-tune {name!r}", recipe.path(recipe.finetuned[name]), fps


def _changed(recipe: Recipe, role: str, what: str) -> ReproducibilityError:
    return ReproducibilityError(
        f"{recipe.where}: the {role} input changed since the recipe was written: {what}. A re-run would not "
        "reproduce the recorded merge; restore the input, or pass check_inputs=False (command line: "
        "--ignore-changed-inputs) to merge it as it is now."
    )


def _check_recorded(recipe: Recipe) -> None:
    """Every recorded input file still has its size, header (and sha256): checked before any loading."""
    for role, path, fps in _roles(recipe, recipe.fingerprints):
        anchor = _fp.anchor_of(path)
        for name, fp in fps.items():
            what, _ = _fp.difference(name, fp, anchor)
            if what:
                raise _changed(recipe, role, what)


def _check_same_files(recipe: Recipe, current: Mapping[str, Any]) -> None:
    """Each input is read from the files the recipe recorded, no more and no fewer."""
    now_by_role = {role: fps for role, _, fps in _roles(recipe, current)}
    for role, path, was in _roles(recipe, recipe.fingerprints):
        now = now_by_role[role]
        new = [n for n in now if n not in was]
        gone = [n for n in was if n not in now]
        if new or gone:
            anchor = _fp.anchor_of(path)
            what = (f"it now reads {anchor / new[0]}, which the recipe does not record" if new
                    else f"it no longer reads {anchor / gone[0]}")
            raise _changed(recipe, role, what)


# ---------------------------------------------------------------------------------------- outputs
def _verifier(recipe: Recipe, target: Any, device: str | None, inputs_checked: bool) -> Any:
    """The ``export(verify=...)`` check of the written weights against ``recipe.expect``."""

    def verify(written: Mapping[str, str]) -> None:
        names = list(dict.fromkeys([*recipe.expect, *written]))
        bad = [n for n in names if recipe.expect.get(n) != written.get(n)]
        if not bad:
            return
        first = bad[0]
        what = (f"{first} was not written" if first not in written else
                f"{first} was written but is not in 'expect'" if first not in recipe.expect else f"{first} differs")
        raise ReproducibilityError(
            f"{recipe.where}: the re-run's weights differ from the sha256 recorded in 'expect': {what}"
            f"{f' ({len(bad)} of {len(names)} files differ)' if len(bad) > 1 else ''}. "
            f"{why_differs(recipe, device=device, inputs_checked=inputs_checked)} Nothing was written to "
            f"{target}; pass verify=False (command line: --no-verify) to keep such a re-run."
        )

    return verify


def why_differs(recipe: Recipe, *, device: str | None = None, inputs_checked: bool = False) -> str:
    """The likely causes of a re-run whose weights differ from ``expect``, naming what this run changed."""
    svd = _uses_svd(recipe.method)
    causes = []
    if not svd and recipe.weightlens_version and recipe.weightlens_version != __version__:
        causes.append(f"another weightlens version wrote the recipe (this recipe: weightlens "
                      f"{recipe.weightlens_version}, here: {__version__})")
    if device and device != recipe.device:
        causes.append(f"this run merged on {device}, the recipe's merge on {recipe.device}")
    if not inputs_checked:
        causes.append("the inputs changed since the recipe was written (this run checked no fingerprints)")
    causes.append("the recipe's 'dtype', 'shard_size' or other fields were edited after it was written")
    if not svd:
        return "Likely causes: " + "; ".join(causes) + "."
    return f"{_why_bits_differ(recipe)} Other likely causes: " + "; ".join(causes) + "."


def _why_bits_differ(recipe: Recipe) -> str:
    """What makes a re-run of an SVD-based method differ in the last bits, naming what this run changed."""
    versions = (f" (this recipe: weightlens {recipe.weightlens_version}, here: {__version__})"
                if recipe.weightlens_version and recipe.weightlens_version != __version__ else "")
    threads = "" if recipe.threads else " and torch thread counts (this recipe records none)"
    return (f"Methods built on SVDs ({_svd_methods()}) differ in the last bits across weightlens "
            f"versions{versions}, devices, CPU LAPACK builds{threads}.")


def _uses_svd(method: str) -> bool:
    """Whether the registry says ``method`` builds its updates from SVDs (an unknown name: no)."""
    return method in list_methods() and get_method(method).uses_svd


def _svd_methods() -> str:
    """``"TSV-M, Iso-C, ..."``: the registered methods built on SVDs, by display name."""
    return ", ".join(get_method(m).pretty_name for m in list_methods() if get_method(m).uses_svd)


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
        f"{torch.get_num_threads()} threads instead, so weights built on SVDs ({_svd_methods()}) may "
        "differ from the recorded sha256 in the last bits.",
        RuntimeWarning, stacklevel=3,
    )
    return torch.get_num_threads()
