"""A merge's recipe: built from a merge result for its export, and run (the merge it describes, then
the export, key by key).

Recipes are read, validated and written by :mod:`weightlens.io.recipe`, which knows no merge methods;
building one from a merge (inputs, fingerprints, device, threads, how the task vectors matched keys and
vocabularies, the head carried, the mergekit equivalent from the method's registration) and running one
need the merge engine, so they live here (``MergeResult.export_recipe`` calls :func:`export_recipe`;
``weightlens merge recipe.yaml`` calls :func:`run_recipe`). So does what the export of a merge writes
beside the merged keys (:func:`export_layout`: the head's key names, tensors and config, the vocabulary's
tokenizer and ``vocab_size``), which io receives as plain data.

Examples
--------
>>> from weightlens.merge import run_recipe
>>> run_recipe("merged/weightlens_recipe.yaml", "again/")       # doctest: +SKIP
PosixPath('again')
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from weightlens._executor import check_executor
from weightlens._version import __version__
from weightlens._options import resolve_options
from weightlens.errors import CheckpointError, InvalidParameterError, ReproducibilityError, ShapeMismatchError
from weightlens.io import _fingerprint as _fp
from weightlens.io import export_adapter
from weightlens.io.export import ExportLayout, ExportOptions, export
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
    "check_head",
    "export_layout",
    "export_recipe",
    "hub_id",
    "input_fingerprints",
    "merge_recipe",
    "mergekit_config",
    "not_reproducible",
    "resolved_key_map",
    "run_recipe",
    "with_sources",
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
    data = getattr(merged, "data", None)
    if data is not None and data.spec is None:
        return (f"the {merged.method} merge read data= ({data.description or 'user data'}; SHA-256 "
                f"{data.fingerprint(tv.names)[:16]}...) that no recipe can make again (a zoo's merge_data() can: "
                "its recipe records how). The export's metadata records the data's fingerprint; merge again with "
                "the same data to repeat it")
    if getattr(merged, "task", None) is not None:
        return (f"these weights are the model of task {merged.task!r} (for_task); a recipe re-runs the merge, whose "
                "weights are the shared model: export the merge itself for a re-runnable recipe")
    for role, ckpt in (("base", tv.base), *((f"fine-tune {n!r}", c) for n, c in tv.finetuned.items())):
        if not Path(str(ckpt.source)).exists():
            return (f"the {role} was given in memory ({ckpt.source}), not as a file; save it (e.g. "
                    "wl.export(state_dict, folder)) and merge from the file to get a re-runnable recipe")
    return None


def mergekit_config(recipe: Recipe, *, base_dtype: str | None = None) -> tuple[str, str] | None:
    """``(mergekit YAML, how exact it is)`` for a recipe whose method is registered with a mergekit
    equivalent (task_arithmetic, ties, dare); ``None`` otherwise."""
    return _mergekit_yaml(recipe, mergekit_of(recipe.method, recipe.params), base_dtype=base_dtype)


def _selected(key: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether ``key`` passes ``include`` (when given) and no ``exclude`` pattern (TaskVectors' rule)."""
    if include is not None and not any(fnmatch.fnmatchcase(key, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(key, p) for p in exclude)


def resolved_key_map(tv: TaskVectors) -> dict[str, dict[str, str | None]] | None:
    """``{task: {fine-tune key: base key or None}}``: a ``key_map`` that matches every fine-tune's keys as
    ``tv`` matched them (whether by a dict, a function or a prefix found in the names); ``None`` when no
    task renames or leaves out a key.

    A fine-tune key is recorded with ``None`` when it was left out: a base key another of its keys stands
    for, or a key that is neither the base's, renamed, nor an extra (though ``include``/``exclude`` keep it).
    """
    base_keys = set(tv.base.keys())
    found: dict[str, dict[str, str | None]] = {}
    for task, ft in tv.finetuned.items():
        # a function's key_map may name keys the base lacks: those keys are extras under their own names
        renames: dict[str, str | None] = {f: b for f, b in tv.key_maps[task].items() if b in base_keys}
        taken, extras = set(renames.values()), set(tv.extras[task])
        for key in ft.keys():
            if key in renames:
                continue
            if key in base_keys:
                if key in taken:
                    renames[key] = None
            elif key not in extras and _selected(key, tv.include, tv.exclude):
                renames[key] = None
        if renames:
            found[task] = renames
    return found or None


def _derived(merged: MergeResult, *, out: Path, like: Path | bool | None, dtype: torch.dtype | None,
             shard_size: int | str, fingerprint: str) -> Recipe:
    """The recipe of ``merged`` (its inputs are files), fingerprinted in mode ``fingerprint``."""
    tv, device = merged.task_vectors, merged.device
    base = os.path.abspath(tv.base.source)
    finetuned = {n: os.path.abspath(c.source) for n, c in tv.finetuned.items()}
    return Recipe(
        base=base, finetuned=finetuned,
        method=merged.method, params=dict(merged.params), include=tv.include, exclude=tv.exclude,
        key_map=resolved_key_map(tv), vocab=tv.vocab.mode if tv.vocab is not None else None, head=merged.head,
        data=_data_record(merged), device=device, threads=torch.get_num_threads() if torch.device(device).type == "cpu" else None,
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        shard_size=shard_size, like=os.path.abspath(like) if isinstance(like, (str, os.PathLike)) else like,
        output=str(Path(os.path.abspath(out))),
        fingerprints=input_fingerprints(tv, base, finetuned, fingerprint), weightlens_version=__version__,
    )


def _data_record(merged: MergeResult) -> dict[str, Any] | None:
    """The recipe's ``data`` field: what a data-based merge read and how to make it again (None: no data)."""
    data = getattr(merged, "data", None)
    if data is None:
        return None
    record = {"description": data.description, "sha256": data.fingerprint(merged.task_vectors.names)}
    return {**record, "zoo": dict(data.spec)} if data.spec is not None else record


def export_recipe(merged: MergeResult, recipe: Any = None, *, out: Path, like: Path | bool | None = None,
                  dtype: torch.dtype | None = None, shard_size: int | str = "5GB",
                  fingerprint: str = "header") -> ExportRecipe:
    """What ``wl.export(merged, out, recipe=recipe, ...)`` writes about the merge: the recipe given
    (validated) or derived from ``merged`` (``None`` for ``recipe=False`` or inputs given in memory),
    its mergekit equivalent and the shard metadata. ``like`` is the export's as given (None: the default
    folder, False: none, else the folder)."""
    if recipe is not False:
        check_fingerprint_mode(fingerprint)
    why = not_reproducible(merged)
    done = given_recipe(recipe, out)
    if recipe is None and why is None:
        done = _derived(merged, out=out, like=like, dtype=dtype, shard_size=shard_size, fingerprint=fingerprint)
    if done is None:
        r = merged.recipe
        meta = {"method": r["method"], "parameters": r["params"], "tasks": r["tasks"]}
        data = _data_record(merged)
        if data is not None:
            meta["data"] = data
        return ExportRecipe(None, metadata=meta, why_not=why or "no recipe was requested (recipe=False)",
                            from_merge=True)
    return ExportRecipe(done, mergekit_of(done.method, done.params, merged), recipe_metadata(done), from_merge=True)


# ---------------------------------------------------------------------------------------- layout
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


def hub_id(ckpt: Any) -> str | None:
    """The Hugging Face Hub id of a checkpoint, when known: from the cache folder it was loaded from
    (``models--org--name/snapshots/<rev>``), else from its ``config.json``'s ``_name_or_path`` when that
    reads as an id (``org/name`` or ``name``), not a path."""
    folder = _folder_of(ckpt)
    if folder is None:
        return None
    for snapshot in (folder, *folder.parents):
        repo = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and repo.name.startswith("models--"):
            found = repo.name.removeprefix("models--").replace("--", "/", 1)
            return found if _HUB_ID.fullmatch(found) else None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and ".." not in name and not name.startswith("."):
        return name
    return None


def _weights_folder(ckpt: Any) -> Path | None:
    """The folder of a checkpoint's weights file (None for one given in memory)."""
    source = Path(str(ckpt.source))
    return _fp.anchor_of(source) if source.exists() else None


def _folder_of(ckpt: Any) -> Path | None:
    """A checkpoint's HF folder, else the folder of its weights file; None for one given in memory."""
    return Path(ckpt.hf_dir) if ckpt.hf_dir is not None else _weights_folder(ckpt)


def _tokenizer_folder(ckpt: Any) -> Path | None:
    """The folder of a checkpoint's tokenizer files: its HF folder, or the folder of its weights."""
    for folder in (ckpt.hf_dir, _weights_folder(ckpt)):
        if folder is not None and any((Path(folder) / n).is_file() for n in _TOKENIZER_FILES):
            return Path(folder)
    return None


def check_head(merged: MergeResult, head: str | None) -> None:
    """Refuse a head that is not one of the merge's tasks, naming them and their extra keys."""
    tv = merged.task_vectors
    if head is None or (isinstance(head, str) and head in tv.finetuned):
        return
    heads = "; ".join(f"{t!r}: {', '.join(k) or 'no extra keys'}" for t, k in tv.extras.items())
    raise InvalidParameterError(
        f"The 'head' parameter must be None (the base's layout) or one of the merge's tasks, whose head (keys "
        f"only its fine-tune has) the export carries. Got {head!r} instead. Tasks: {heads}."
    )


def _head_names(tv: TaskVectors, head: str, keys: list[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """``({merged key: the head fine-tune's name for it}, merged keys it has no name for)``."""
    ft = tv.finetuned[head]
    own, renames = set(ft.keys()), tv.key_maps[head]
    inverse: dict[str, str] = {}
    for f, b in renames.items():
        inverse.setdefault(b, f)
    rename, dropped = {}, []
    for key in keys:
        name = inverse.get(key)
        if name is None and key in own and key not in renames:  # the same name, standing for this key
            name = key
        if name is None:
            dropped.append(key)
        elif name != key:
            rename[key] = name
    return rename, tuple(dropped)


def _check_head_rows(tv: TaskVectors, head: str, extras: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
    """A head key with one row per token of its fine-tune (an LM head) fits the merged vocabulary only when
    that is the fine-tune's own, row for row: the base's rows, or a union to which only it adds tokens."""
    vocab = tv.vocab
    if vocab is None:
        return
    rows = vocab.task_rows[head]
    clash = [k for k, (shape, _) in extras.items() if shape and shape[0] == rows]
    others_add = any(n - vocab.dropped.get(t, 0) > vocab.shared_rows for t, n in vocab.task_rows.items() if t != head)
    same = rows == vocab.rows and (vocab.mode == "base" or not others_add)
    if clash and not same:
        raise ShapeMismatchError(
            f"head={head!r} carries {clash[0]!r} with one row per token of that fine-tune ({rows} rows), and the "
            f"merged vocabulary keys have {vocab.rows} rows (vocab={vocab.mode!r}) in another order or number; "
            "the exported model would not load or would mix tokens up. Export without the head (with_head(None)), "
            "or merge from a base that has that key."
        )


def export_layout(merged: MergeResult) -> ExportLayout:
    """What the export of ``merged`` writes beside the merged keys, as plain data for io.

    The vocabulary: ``vocab_size`` of the merged rows in ``config.json``; with ``vocab="union"`` and added
    tokens the union tokenizer (``VocabInfo.write_tokenizer``) instead of the ``like`` folder's tokenizer
    files, with ``vocab="base"`` the base's tokenizer files. The head (``merged.head``, see
    :meth:`MergeResult.with_head`): the merged keys under that fine-tune's names (the reverse of
    ``tv.key_maps[head]``; base keys it lacks are left out), its extra tensors, its ``config.json``.
    """
    tv, head = merged.task_vectors, merged.head
    check_head(merged, head)
    vocab = tv.vocab
    hub = {role: found for role, ckpt in (("base", tv.base), *tv.finetuned.items())
           if (found := hub_id(ckpt)) is not None}
    common: dict[str, Any] = {"heads": tv.extras, "hub_ids": hub}
    notes = [vocab.summary()] if vocab is not None else []
    if vocab is not None:
        common["config"] = {"vocab_size": vocab.rows}
        if vocab.mode == "union" and vocab.added:
            common["write_tokenizer"], common["union_from"] = vocab.write_tokenizer, vocab.tokenizer_dir
        else:  # the base's rows: the base's tokenizer, whichever folder the config comes from
            common["tokenizer_dir"] = vocab.tokenizer_dir or _tokenizer_folder(tv.base)
    if head is None:
        return ExportLayout(notes=tuple(notes), **common)
    ft = tv.finetuned[head]
    rename, dropped = _head_names(tv, head, list(merged))
    extras = {k: (tuple(ft.info(k).shape), ft.info(k).dtype) for k in tv.extras[head]}
    _check_head_rows(tv, head, extras)
    if ft.hf_dir is None:
        notes.append(f"The fine-tune {head!r} has no config.json beside its weights: the config written is "
                     "the like folder's.")
    if dropped:
        notes.append(f"{len(dropped)} base key(s) that the fine-tune {head!r} lacks are not written: "
                     + ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "") + ".")
    return ExportLayout(head=head, rename=rename, dropped=dropped, extras=extras,
                        read_extra=functools.partial(tv.extra, head), config_dir=ft.hf_dir, notes=tuple(notes),
                        **common)


# ---------------------------------------------------------------------------------------- running
def _as_recipe(recipe: Recipe | str | os.PathLike[str], sources: Mapping[str, Any] | None = None) -> Recipe:
    recipe = recipe.checked() if isinstance(recipe, Recipe) else load_recipe(recipe)
    return with_sources(recipe, sources)


def with_sources(recipe: Recipe, sources: Mapping[str, Any] | None) -> Recipe:
    """``recipe`` with inputs moved: ``sources`` maps ``"base"``, task names and ``"like"`` to their paths now
    (relative ones from the current folder). A ``like`` recorded as the base's folder follows the base.
    The recorded fingerprints still apply: a re-run checks the moved files against them."""
    if not sources:
        return recipe
    names = ["base", *recipe.finetuned, "like"]
    if not isinstance(sources, Mapping) or not all(isinstance(k, str) for k in sources):
        raise InvalidParameterError(f"The 'sources' parameter must map input names ({', '.join(names)}) to paths. "
                                    f"Got {type(sources).__name__} instead.")
    unknown = [k for k in sources if k not in names]
    if unknown:
        raise InvalidParameterError(
            f"sources names {', '.join(map(repr, unknown))}, which {recipe.where} has not; its inputs are "
            f"{', '.join(names)} (command line: --source NAME=PATH).")
    moved: dict[str, str] = {}
    for name, path in sources.items():
        if not isinstance(path, (str, os.PathLike)) or not os.path.exists(os.path.expanduser(path)):
            raise CheckpointError(f"sources[{name!r}] = {str(path)!r}: no such file or folder.")
        moved[name] = os.path.abspath(os.path.expanduser(path))
    like = recipe.like
    if "like" in moved:
        like = moved["like"]
    elif "base" in moved and isinstance(like, str):
        old = recipe.path(recipe.base)
        if recipe.path(like) in (old, os.path.dirname(old)):  # the base's folder: it moved with the base
            like = moved["base"] if os.path.isdir(moved["base"]) else os.path.dirname(moved["base"])
    return replace(recipe, base=moved.get("base", recipe.base), like=like,
                   finetuned={n: moved.get(n, p) for n, p in recipe.finetuned.items()})


def _inputs(recipe: Recipe, *, check: bool, mode: str | None = None) -> tuple[TaskVectors, dict[str, Any]]:
    """The recipe's task vectors and their inputs' fingerprints now (in ``mode``; default: the recipe's).

    With ``check``, recorded files are compared before anything is loaded, and the files loaded must be
    the recorded ones (``ReproducibilityError`` naming the input, the file and what changed).
    """
    recorded = recipe.fingerprints
    mode = mode or _fp.mode_of({f"{r}/{n}": f for r, _, fps in _roles(recipe, recorded) for n, f in fps.items()})
    _check_present(recipe)
    if check:
        _check_recorded(recipe)
    paths = {n: recipe.path(p) for n, p in recipe.finetuned.items()}
    tv = TaskVectors(recipe.path(recipe.base), paths, include=recipe.include, exclude=recipe.exclude,
                     key_map=recipe.key_map, vocab=recipe.vocab, cache=DecompositionCache(_RUN_CACHE_BYTES))
    current = input_fingerprints(tv, recipe.path(recipe.base), paths, mode, recorded if check else None)
    if check:
        _check_same_files(recipe, current)
    return tv, current


def _merge(recipe: Recipe, tv: TaskVectors, device: str | None, progress: bool, data: Any = None,
           check: bool = True) -> MergeResult:
    spec = get_method(recipe.method) if recipe.method in list_methods() else None
    extra: dict[str, Any] = {}
    if spec is not None and spec.needs_data:
        extra["data"] = _recipe_data(recipe, tv, spec.needs_data, data, check)
    device = device or recipe.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(
            f"The recipe's merge ran on {device!r}, and no CUDA device is present here; pass "
            "device='cpu' (command line: --device cpu). The weights may then differ from the recorded "
            "sha256 in the last bits."
        )
    merged = merge(tv, method=recipe.method, device=device, progress=progress, lazy=True, **extra, **recipe.params)
    return merged.with_head(recipe.head) if recipe.head is not None else merged


def _recipe_data(recipe: Recipe, tv: TaskVectors, needs: str, data: Any, check: bool) -> Any:
    """The data a data-based recipe's merge reads: ``data`` as given, else made again from the zoo the recipe
    records (``weightlens.zoo.merge_data_of``, called by the CLI); its fingerprint must be the recorded one."""
    record = recipe.data
    if data is None:
        how = "" if record is None or "zoo" not in record else (
            " The recipe records a zoo's data: pass data=weightlens.zoo.merge_data_of(recipe.data['zoo']) "
            "(weightlens merge RECIPE does it for you).")
        raise InvalidParameterError(
            f"{recipe.where}: {recipe.method} reads data= ({needs}) besides the checkpoint files; pass it to "
            f"run_recipe/merge_recipe (data=MergeData).{how}" if record is not None else
            f"{recipe.where}: {recipe.method} reads data= ({needs}), and the recipe records none (an export of such "
            "a merge from user data writes no recipe). Merge from Python: wl.merge(tv, method=..., data=...)."
        )
    if check and record is not None and data.fingerprint(tv.names) != record["sha256"]:
        raise ReproducibilityError(
            f"{recipe.where}: the data given ({data.description or 'user data'}) is not the data the recipe's merge "
            f"read (SHA-256 {data.fingerprint(tv.names)[:16]}... against {record['sha256'][:16]}...: other examples, "
            "order or batches); the weights would differ. Pass the same data, or check_inputs=False to merge anyway."
        )
    return data


def merge_recipe(recipe: Recipe | str | os.PathLike[str], *, sources: Mapping[str, Any] | None = None,
                 device: str | None = None, progress: bool = False, check_inputs: bool = True,
                 data: Any = None) -> MergeResult:
    """The merge a recipe (or recipe file) describes, lazy: keys are computed when read.

    ``sources`` points at moved inputs (see :func:`run_recipe`). ``device`` overrides the recipe's; a
    recipe recorded on CUDA needs CUDA unless overridden. Inputs that differ from the recipe's
    fingerprints raise ``ReproducibilityError`` unless ``check_inputs=False``. The result carries the
    recipe's head (:meth:`MergeResult.with_head`). ``data``: the ``MergeData`` a data-based recipe's merge reads
    (``weightlens.zoo.merge_data_of(recipe.data["zoo"])`` for a zoo's), checked against its recorded fingerprint.
    """
    recipe = _as_recipe(recipe, sources)
    return _merge(recipe, _inputs(recipe, check=check_inputs)[0], device, progress, data, check_inputs)


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
    executor : where the merge's keys run while the export writes them: ``"local"`` (this process, the
        default) or ``"ray"`` (Ray tasks, bitwise the same weights; ``docs/scale.md``).
    """

    verify: bool = True
    check_inputs: bool = True
    fingerprint: str | None = None
    overwrite_any: bool = False
    executor: str = "local"

    def __post_init__(self) -> None:
        if self.fingerprint is not None:
            check_fingerprint_mode(self.fingerprint)
        check_executor(self.executor, caller="run_recipe")


def run_recipe(recipe: Recipe | str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               sources: Mapping[str, Any] | None = None, overwrite: bool = False, progress: bool | None = None,
               device: str | None = None, data: Any = None, options: RunRecipeOptions | None = None,
               **overrides: Any) -> Path:
    """Merge and export into ``out`` (default: the recipe's ``output``); returns the folder.

    ``data`` is the ``MergeData`` of a data-based method (regmean, fisher), checked against the fingerprint the
    recipe records (``weightlens.zoo.merge_data_of(recipe.data["zoo"])`` makes a zoo's again).
    ``sources`` points at inputs that moved since the recipe was written: ``{"base": path, task: path,
    "like": path}`` (any of them; relative paths from the current folder; a ``like`` recorded as the
    base's folder follows the base). Moved inputs are checked against the recorded fingerprints as
    any other, so a moved export re-runs bitwise.

    Before anything is merged, the inputs are compared with the recipe's ``fingerprints`` (a changed
    one raises ``ReproducibilityError``; ``check_inputs=False`` merges them anyway; a recipe without
    fingerprints has nothing to check). The export is atomic; with ``verify`` (the default) the weights
    are checked against the recipe's ``expect`` before the folder is moved into place, and a mismatch
    raises ``ReproducibilityError`` leaving no output. The recipe written beside the weights records the
    inputs as they are now (``fingerprint``: "header" or "full"; default: the recipe's own mode).
    ``overwrite_any`` replaces a non-empty folder that is not a weightlens export; ``executor="ray"`` runs
    the merge's keys as Ray tasks while the shards are written. These five are the fields of ``options``
    (a :class:`RunRecipeOptions`), and ``**overrides`` set them directly, e.g.
    ``run_recipe(path, out, verify=False)``.
    """
    opts = resolve_options(RunRecipeOptions, options, overrides, caller="run_recipe")
    check_inputs = opts.check_inputs
    recipe = _as_recipe(recipe, sources)
    target = _target(recipe, out)
    tv, current = _inputs(recipe, check=check_inputs, mode=opts.fingerprint)
    merged = _merge(recipe, tv, device, progress=False, data=data, check=check_inputs)
    like: Any = recipe.path(recipe.like) if isinstance(recipe.like, str) else recipe.like  # None: the default
    threads = _threads_for(recipe) if torch.device(device or recipe.device).type == "cpu" else None
    paths = {n: recipe.path(p) for n, p in recipe.finetuned.items()}
    done = replace(recipe, base=recipe.path(recipe.base), finetuned=paths, like=like,
                   params=dict(merged.params), device=device or recipe.device, threads=threads, fingerprints=current,
                   data=_data_record(merged) or recipe.data)
    checked = bool(recipe.fingerprints) and check_inputs
    check = _verifier(recipe, target, device, checked) if opts.verify and recipe.expect else None
    written = ExportOptions(recipe=done, verify=check, overwrite_any=opts.overwrite_any, executor=opts.executor)
    with torch_threads(threads or torch.get_num_threads()):  # the merge is lazy: it runs during the export
        if recipe.adapter is not None:
            return export_adapter(merged, target, rank=recipe.adapter["rank"], overwrite=overwrite,
                                  progress=progress, options=written)
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


def _check_present(recipe: Recipe) -> None:
    """Every input is where the recipe says; one that is not is named with how to point at it."""
    inputs = [("base", recipe.base), *recipe.finetuned.items()]
    inputs += [("like", recipe.like)] if isinstance(recipe.like, str) else []
    for name, value in inputs:
        path = recipe.path(value)
        if not os.path.exists(path):
            moved = " (relative to the recipe's folder)" if not Path(value).expanduser().is_absolute() else ""
            raise CheckpointError(
                f"{recipe.where}: its {name!r} input {path}{moved} is not there. If it moved, pass "
                f"sources={{{name!r}: <its path now>}} (command line: --source {name}=PATH); the recorded "
                "fingerprints are checked against it."
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
