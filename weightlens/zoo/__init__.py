"""Real small models trained here from data that ships inside packages (no downloads).

Four zoos, each at two sizes (``"ci"``: minutes on 2 cores for tests; ``"demo"``: the tour):

* ``"digits-pairs"``: pairs of independently trained MLPs on sklearn's digits at several widths
  (linear mode connectivity, Git Re-Basin). ``load("digits-pairs", width=128)``.
* ``"digits-tasks"``: an MLP pretrained on digits and 4 fine-tunes on transformed digits.
* ``"minilm-tasks"``: all-MiniLM-L6-v2 (real pretrained transformer) and 4+ fine-tunes on WordNet
  and fortunes text classification.
* ``"minilm-lora"``: LoRA adapters (``peft``, rank 8) of all-MiniLM-L6-v2 on the same tasks, with
  the same frozen heads as ``"minilm-tasks"``; they load as factored task vectors.

Examples
--------
>>> from weightlens import zoo
>>> zoo.build(size="ci", names=["digits-tasks"])            # doctest: +SKIP
>>> z = zoo.load("digits-tasks", size="ci")                  # doctest: +SKIP
>>> z.evaluate(wl.load(z.base), z.tasks[0], "test")          # doctest: +SKIP
{'accuracy': 0.93, 'loss': 0.24}
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from weightlens.errors import InvalidParameterError
from weightlens.io._atomic import atomic_folder
from weightlens.zoo._common import (
    SIZES,
    PairZoo,
    TaskZoo,
    home,
    read_manifest,
    write_manifest,
    zoo_dir,
)

__all__ = ["NAMES", "SIZES", "PairZoo", "TaskZoo", "build", "home", "load", "merge_data_of"]

# name -> (module, builder, loader). Builders: f(folder, *, size, progress) -> manifest dict.
# Loaders: f(folder, **kwargs) -> TaskZoo | PairZoo. Each module's RECIPE_VERSION is written into the
# manifest: a zoo built by an older recipe is rebuilt by build() and refused by load().
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "digits-pairs": ("weightlens.zoo.digits", "build_pairs", "load_pairs"),
    "digits-tasks": ("weightlens.zoo.digits", "build_tasks", "load_tasks"),
    "minilm-tasks": ("weightlens.zoo.minilm", "build_tasks", "load_tasks"),
    "minilm-lora": ("weightlens.zoo.lora", "build_tasks", "load_tasks"),
}
NAMES = tuple(_REGISTRY)


def _entry(name: str, part: int):
    if name not in _REGISTRY:
        raise InvalidParameterError(
            f"Unknown zoo {name!r}. Available: {', '.join(NAMES)}."
        )
    module = importlib.import_module(_REGISTRY[name][0])
    return getattr(module, _REGISTRY[name][part])


def _recipe(name: str) -> int:
    """The zoo's recipe version: its module's ``RECIPE_VERSION`` (an int, or a dict by zoo name)."""
    version = getattr(importlib.import_module(_REGISTRY[name][0]), "RECIPE_VERSION", 1)
    return int(version[name] if isinstance(version, dict) else version)


def _built(folder: Path, name: str) -> bool:
    """Whether ``folder`` holds a complete build of ``name`` by the current recipe."""
    if not (folder / "manifest.json").is_file():
        return False
    return int(read_manifest(folder).get("recipe_version", 1)) == _recipe(name)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise InvalidParameterError(f"The 'size' parameter must be one of {SIZES}. Got {size!r} instead.")


def build(
    size: str = "ci",
    *,
    names: Iterable[str] | None = None,
    root: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Train and cache the zoos (skipping those already built by the current recipe unless ``force``).

    Builds are deterministic (seeded) and atomic: an interrupted build leaves nothing behind. A zoo
    built by an older recipe of weightlens is rebuilt.
    Returns ``{name: folder}``.
    """
    _check_size(size)
    chosen = list(names) if names is not None else list(NAMES)
    for name in chosen:
        _entry(name, 1)  # validates the name before any training starts
    folders = {}
    for name in chosen:
        folder = zoo_dir(name, size, Path(root) if root is not None else None)
        if force or not _built(folder, name):
            with atomic_folder(folder, overwrite=True) as tmp:
                manifest = _entry(name, 1)(tmp, size=size, progress=progress)
                write_manifest(tmp, {"name": name, "size": size, "recipe_version": _recipe(name), **manifest})
        folders[name] = folder
    return folders


def load(
    name: str, *, size: str | None = None, root: str | Path | None = None, **kwargs: Any
) -> TaskZoo | PairZoo:
    """Open a built zoo.

    ``size=None`` takes ``$WEIGHTLENS_ZOO_SIZE`` when set, else ``"demo"`` when built, else ``"ci"``.
    """
    loader = _entry(name, 2)
    root_path = Path(root) if root is not None else None
    size = size or os.environ.get("WEIGHTLENS_ZOO_SIZE") or None
    if size is None:
        demo = zoo_dir(name, "demo", root_path)
        size = "demo" if (demo / "manifest.json").is_file() else "ci"
    _check_size(size)
    folder = zoo_dir(name, size, root_path)
    built = int(read_manifest(folder).get("recipe_version", 1))  # clear error when missing
    if built != _recipe(name):
        raise FileNotFoundError(
            f"The {name!r} zoo at {folder} was built by recipe {built}; this weightlens uses recipe "
            f"{_recipe(name)} (its scorer would not match the files). Rebuild it with: weightlens zoo "
            f"build --size {size} --names {name}"
        )
    opened = loader(folder, **kwargs)
    if isinstance(opened, TaskZoo):
        opened = dataclasses.replace(opened, opened={"size": size, **kwargs})
    return opened


def merge_data_of(spec: Mapping[str, Any]) -> Any:
    """The ``MergeData`` a zoo's ``merge_data`` made, again, from its ``spec`` (what a recipe records):
    ``load(spec["zoo"], size=spec["size"], **spec["options"]).merge_data(split, n=, batch_size=, seed=)``."""
    z = load(spec["zoo"], size=spec["size"], **dict(spec.get("options") or {}))
    return z.merge_data(spec["split"], n=spec["n"], batch_size=spec["batch_size"], seed=spec["seed"])
