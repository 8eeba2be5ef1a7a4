"""Merge recipes: a small YAML file from which ``weightlens merge`` repeats a merge and its export bitwise.

Schema (``weightlens_recipe: 1``)::

    weightlens_recipe: 1
    weightlens_version: 0.2.0
    base: /models/base                 # any source wl.load accepts (file or HF folder)
    finetuned: {math: /models/math, code: /models/code}   # order matters (it is the task order)
    method: ties
    params: {density: 0.2, scope: global, merge_func: mean, alpha: 1.0}
    include: null                      # glob patterns on tensor keys, or null
    exclude: null
    device: cpu                        # where the merge ran (cuda results differ in the last bits)
    threads: 2                         # torch's CPU threads then: LAPACK's last bits depend on it
    dtype: null                        # export dtype (null: the base's)
    shard_size: 5GB
    like: /models/base                 # HF folder whose config and tokenizer are copied
    output: /models/merged             # default output folder of `weightlens merge`
    expect: {model.safetensors: <sha256>}   # what the run that wrote the recipe produced

Relative paths are taken relative to the recipe file's folder. ``weightlens.merge.run_recipe`` merges
lazily and exports key by key, on ``threads`` CPU threads when the recipe records them and the machine
has the cores (a CPU SVD's last bits depend on the thread count: this is what lets a re-run on another
machine come out bitwise); ``Recipe.check(folder)`` compares the weight files with ``expect``.
This module only reads, validates and writes recipes (it imports nothing above ``weightlens.io``).

Also here: the mergekit configuration equivalent to a task arithmetic, TIES or DARE recipe.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from weightlens.errors import CheckpointError, InvalidParameterError
from weightlens.io._atomic import write_text
from weightlens.io._layout import MERGEKIT, RECIPE, parse_dtype, parse_size

__all__ = ["Recipe", "load_recipe", "mergekit_config", "name_paths"]

RECIPE_VERSION = 1
_REQUIRED = ("base", "finetuned", "method")
_OPTIONAL = ("params", "include", "exclude", "device", "threads", "dtype", "shard_size", "like", "output",
             "expect", "weightlens_recipe", "weightlens_version")


def _version() -> str:
    from weightlens._version import __version__

    return __version__


def _patterns(value: Any, name: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidParameterError(f"{where}: '{name}' must be a glob pattern, a list of them or null. Got {value!r}.")


def name_paths(paths: list[str]) -> dict[str, str]:
    """``{name: path}`` with names from file or folder names (``_2``, ``_3`` ... on repeats)."""
    from weightlens.io.sources import _display_name

    named: dict[str, str] = {}
    for path in paths:
        stem = _display_name(Path(path).expanduser()) or "task"
        name, n = stem, 2
        while name in named:
            name, n = f"{stem}_{n}", n + 1
        named[name] = path
    return named


@dataclass(frozen=True)
class Recipe:
    """A merge and its export, as data (see the module docstring for the YAML form).

    Examples
    --------
    >>> r = Recipe(base="base.safetensors", finetuned={"a": "a.safetensors"}, method="task_arithmetic",
    ...            params={"alpha": 0.5})
    >>> Recipe.from_mapping(yaml.safe_load(r.to_yaml())) == r
    True
    """

    base: str
    finetuned: dict[str, str]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None
    device: str = "cpu"
    threads: int | None = None
    dtype: str | None = None
    shard_size: str | int = "5GB"
    like: str | None = None
    output: str | None = None
    expect: dict[str, str] = field(default_factory=dict)
    weightlens_version: str = ""
    root: Path | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_mapping(cls, data: Any, *, where: str = "recipe", root: Path | None = None) -> Recipe:
        """Validate a parsed recipe; errors name ``where`` (the file) and the field."""
        if not isinstance(data, Mapping):
            raise InvalidParameterError(f"{where}: a recipe is a YAML mapping with {', '.join(_REQUIRED)}.")
        unknown = [k for k in data if k not in _REQUIRED + _OPTIONAL]
        missing = [k for k in _REQUIRED if data.get(k) in (None, "", {}, [])]
        if unknown or missing:
            problem = (f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown
                       else f"missing field(s) {', '.join(map(repr, missing))}")
            raise InvalidParameterError(
                f"{where}: {problem}. Fields: {', '.join(_REQUIRED)} (required), {', '.join(_OPTIONAL[:-2])}."
            )
        if data.get("weightlens_recipe", RECIPE_VERSION) != RECIPE_VERSION:
            raise InvalidParameterError(
                f"{where}: weightlens_recipe {data['weightlens_recipe']!r} is not supported (this weightlens "
                f"reads version {RECIPE_VERSION}); upgrade weightlens."
            )
        ft = data["finetuned"]
        if isinstance(ft, list):
            ft = name_paths([str(p) for p in ft])
        if not isinstance(ft, Mapping) or not all(isinstance(v, (str, os.PathLike)) for v in ft.values()):
            raise InvalidParameterError(f"{where}: 'finetuned' must map task names to paths. Got {ft!r}.")
        params = data.get("params") or {}
        if not isinstance(params, Mapping):
            raise InvalidParameterError(f"{where}: 'params' must be a mapping of parameter names to values.")
        expect = data.get("expect") or {}
        threads = data.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidParameterError(
                f"{where}: 'threads' must be a positive integer (torch's CPU thread count) or null. Got {threads!r}."
            )
        try:
            dtype = parse_dtype(data.get("dtype"))
            parse_size(data.get("shard_size") or "5GB")
        except InvalidParameterError as err:
            raise InvalidParameterError(f"{where}: {err}") from None
        return cls(
            base=str(data["base"]), finetuned={str(k): str(v) for k, v in ft.items()}, method=str(data["method"]),
            params=dict(params), include=_patterns(data.get("include"), "include", where),
            exclude=_patterns(data.get("exclude"), "exclude", where), device=str(data.get("device") or "cpu"),
            threads=threads,
            dtype=None if dtype is None else str(dtype).removeprefix("torch."), shard_size=data.get("shard_size") or "5GB",
            like=None if data.get("like") is None else str(data["like"]),
            output=None if data.get("output") is None else str(data["output"]),
            expect={str(k): str(v) for k, v in dict(expect).items()},
            weightlens_version=str(data.get("weightlens_version") or ""), root=root,
        )

    def to_dict(self) -> dict[str, Any]:
        """The YAML fields, in order."""
        return {
            "weightlens_recipe": RECIPE_VERSION, "weightlens_version": self.weightlens_version or _version(),
            "base": self.base, "finetuned": dict(self.finetuned), "method": self.method, "params": dict(self.params),
            "include": self.include, "exclude": self.exclude, "device": self.device, "threads": self.threads,
            "dtype": self.dtype, "shard_size": self.shard_size, "like": self.like, "output": self.output, "expect": dict(self.expect),
        }

    def to_yaml(self) -> str:
        """YAML text with a header saying how to re-run it."""
        head = ("# weightlens merge recipe. Re-run (bitwise identical weights on the same device):\n"
                "#   weightlens merge weightlens_recipe.yaml --out OUT_DIR\n")
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recipe to ``path``."""
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ running
    def path(self, value: str) -> str:
        """``value`` as a path, relative ones taken from the recipe file's folder."""
        p = Path(value).expanduser()
        return str(p if p.is_absolute() or self.root is None else self.root / p)

    def check(self, folder: str | os.PathLike[str]) -> list[str]:
        """Weight files in ``folder`` whose sha256 differs from ``expect`` (empty: reproduced)."""
        bad = []
        for name, sha in self.expect.items():
            path = Path(folder) / name
            if not path.is_file() or _sha256(path) != sha:
                bad.append(name)
        return bad


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe YAML file (relative paths in it are relative to its folder)."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the recipe ({exc.strerror or exc}).") from None
    except yaml.YAMLError as exc:
        raise InvalidParameterError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}).") from None
    return Recipe.from_mapping(data, where=str(path), root=path.parent.absolute())


# ---------------------------------------------------------------------------------------- from a merge
def _is_merge(merged: Any) -> bool:
    return all(hasattr(merged, a) for a in ("method", "params", "task_vectors"))


def _merge_device(merged: Any) -> str:
    device = getattr(merged, "device", None) or getattr(getattr(merged, "_ctx", None), "device", None)
    return str(device) if device is not None else "cpu"


def _cpu_threads(device: str) -> int | None:
    """torch's intra-op thread count for a CPU merge (None on CUDA, where it does not matter)."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else None


def not_reproducible(merged: Any) -> str | None:
    """Why no recipe can be derived from ``merged`` (``None`` when one can)."""
    if not _is_merge(merged):
        return "the weights were not produced by weightlens.merge (no method or inputs to record)"
    tv = merged.task_vectors
    for role, ckpt in (("base", tv.base), *((f"fine-tune {n!r}", c) for n, c in tv.finetuned.items())):
        if not Path(str(ckpt.source)).exists():
            return (f"the {role} was given in memory ({ckpt.source}), not as a file; save it (e.g. "
                    "wl.export(state_dict, folder)) and merge from the file to get a re-runnable recipe")
    return None


def recipe_for(merged: Any, recipe: Any, *, out: Path, like: Path | None, dtype: torch.dtype | None,
               shard_size: int | str) -> Recipe | None:
    """The recipe to write with an export: derived from ``merged``, or the one given."""
    if recipe is False:
        return None
    output = str(Path(os.path.abspath(out)))
    if isinstance(recipe, Recipe):
        return replace(recipe, output=output, expect={})
    if isinstance(recipe, Mapping):
        return replace(Recipe.from_mapping(recipe, where="recipe="), output=output, expect={})
    if recipe is not None:
        raise InvalidParameterError(
            f"The 'recipe' parameter must be None, False, a Recipe or a mapping. Got {type(recipe).__name__} instead."
        )
    if not_reproducible(merged) is not None:
        return None
    tv, device = merged.task_vectors, _merge_device(merged)
    return Recipe(
        base=os.path.abspath(tv.base.source),
        finetuned={n: os.path.abspath(c.source) for n, c in tv.finetuned.items()},
        method=merged.method, params=dict(merged.params), include=tv.include, exclude=tv.exclude,
        device=device, threads=_cpu_threads(device),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        shard_size=shard_size, like=None if like is None else os.path.abspath(like), output=output,
        weightlens_version=_version(),
    )


def file_metadata(merged: Any, recipe: Recipe | None) -> dict[str, Any]:
    """Metadata stored in every shard and the index (deterministic: no paths, no times)."""
    meta: dict[str, Any] = {"format": "pt", "weightlens_version": _version()}
    if recipe is not None:
        meta.update(method=recipe.method, parameters=dict(recipe.params), tasks=list(recipe.finetuned))
    elif _is_merge(merged):
        meta.update(method=merged.method, parameters=dict(merged.params), tasks=list(merged.task_vectors.names))
    return meta


def write_recipes(folder: Path, recipe: Recipe | None, written: Any, base_dtype: str | None = None) -> None:
    """``weightlens_recipe.yaml`` (with the sha256 of what was written) and ``mergekit_config.yml``."""
    if recipe is None:
        return
    write_text(folder / RECIPE, replace(recipe, expect=dict(written.files)).to_yaml())
    mk = mergekit_config(recipe, base_dtype=base_dtype)
    if mk is not None:
        write_text(folder / MERGEKIT, mk[0])


# ---------------------------------------------------------------------------------------- mergekit
def _model_path(source: str) -> tuple[str, bool]:
    """The HF folder mergekit should load for ``source``, and whether there is one."""
    p = Path(source)
    if p.is_file() or p.suffix in (".safetensors", ".json", ".bin", ".pt"):
        return (str(p.parent), True) if (p.parent / "config.json").is_file() else (str(p), False)
    return str(p), True


def mergekit_config(recipe: Recipe, *, base_dtype: str | None = None) -> tuple[str, str] | None:
    """``(mergekit YAML, how exact it is)`` for task_arithmetic, ties and dare; ``None`` otherwise."""
    p, method = recipe.params, recipe.method
    alpha = float(p.get("alpha", 1.0))
    per_model: dict[str, Any] = {"weight": 1.0}
    glob: dict[str, Any] = {"lambda": alpha}
    notes = ["mergekit sums in the checkpoint dtype and in its own order, so weights agree up to "
             "floating-point rounding, not bitwise"]
    if method == "task_arithmetic":
        mk, per_model, glob = "task_arithmetic", {"weight": alpha}, {"normalize": False}
    elif method == "ties":
        if p.get("merge_func", "mean") == "max":
            return None
        mk = "ties"
        per_model["density"] = float(p.get("density", 0.2))
        glob["normalize"] = p.get("merge_func", "mean") == "mean"
        if p.get("scope", "global") == "global":
            notes.append("approximate: weightlens trimmed with one threshold per task over the whole model "
                         "(scope='global'); mergekit trims each tensor (weightlens scope='tensor')")
    elif method == "dare":
        ties = p.get("combine", "task_arithmetic") == "ties"
        mk = "dare_ties" if ties else "dare_linear"
        per_model["density"] = float(p.get("density", 0.5))
        glob.update(rescale=True, normalize=ties)
        notes.append("mergekit draws its own random masks: the same distribution, other draws")
    else:
        return None
    if recipe.include or recipe.exclude:
        notes.append(f"weightlens merged only the keys selected by include={recipe.include} "
                     f"exclude={recipe.exclude}; mergekit merges every tensor")
    paths = [_model_path(src) for src in (recipe.base, *recipe.finetuned.values())]
    if not all(ok for _, ok in paths):
        notes.append("mergekit loads HF model folders (weights and config.json); replace the bare file "
                     "paths with such folders")
    config = {
        "merge_method": mk,
        "base_model": paths[0][0],
        "models": [{"model": path, "parameters": dict(per_model)} for path, _ in paths[1:]],
        "parameters": glob,
        "dtype": recipe.dtype or base_dtype or "float32",
    }
    note = "; ".join(notes) + "."
    head = (f"# mergekit equivalent of this weightlens {method} merge ({mk}). Run: mergekit-yaml "
            f"mergekit_config.yml OUT_DIR\n# Note: {note}\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False), note
