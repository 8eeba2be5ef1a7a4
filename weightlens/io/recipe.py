"""Merge recipes: a small YAML file from which ``weightlens merge`` repeats a merge and its export bitwise.

Schema (``weightlens_recipe: 1``)::

    weightlens_recipe: 1
    weightlens_version: 0.2.0
    base: ../models/base               # any source wl.load accepts (file or HF folder)
    finetuned: {math: ../models/math, code: /data/ft/code}   # order matters (it is the task order)
    method: ties
    params: {density: 0.2, scope: global, merge_func: mean, alpha: 1.0}
    include: null                      # glob patterns on tensor keys, or null
    exclude: null
    key_map: null                      # {task: {fine-tune key: base key or null}}: how keys were matched
    vocab: null                        # added vocabulary rows: null (none), base or union
    head: null                         # the task whose head the export carries (null: none)
    adapter: {rank: 16}                # only for an export as a PEFT adapter (rank null: each key's own)
    data:                              # only for a data-based merge (regmean, fisher): what it read
      description: digits-tasks train, 256 examples per task, batches of 32
      sha256: <sha256>                 # MergeData.fingerprint of the merged tasks: a re-run must match it
      zoo: {zoo: digits-tasks, size: ci, options: {}, split: train, n: 256, batch_size: 32, seed: 0}
    device: cpu                        # where the merge ran (cuda results differ in the last bits)
    threads: 2                         # torch's CPU threads then: LAPACK's last bits depend on it
    dtype: null                        # export dtype (null: the base's)
    shard_size: 5GB
    like: null                         # HF folder whose config and tokenizer are copied (null: the
                                       # default, the head's or the base's folder; false: none)
    output: .                          # default output folder of `weightlens merge`
    expect: {model.safetensors: <sha256>}   # what the run that wrote the recipe produced
    fingerprints:                      # the inputs as they were (optional; older recipes have none)
      base: {base.safetensors: {size: 1234, header: <sha256>}}        # sha256: <...> too in "full" mode
      finetuned: {math: {model.safetensors: {size: 1234, header: <sha256>}}}

Relative paths are taken relative to the recipe file's folder. An export records a path relative to
its folder when the input and the export share a project folder (:func:`relative_path`), else
absolute; ``weightlens.merge.run_recipe(..., sources={name: path})`` points a re-run at moved inputs.
``key_map`` is the resolved renaming of every task, whatever ``key_map=`` (a dict, a function, or a
prefix found in the names) the task vectors were built with. The file is plain YAML: anchors,
aliases, tags, values nested over 16 levels and files over 8 MiB are refused (nothing expands or
runs, nothing blocks), and every field's type is checked. ``fingerprints`` are defined in
``weightlens.io._fingerprint`` (size and a sha256 of the safetensors header per file read; a full
sha256 with ``export(..., fingerprint="full")``). ``weightlens.merge.run_recipe`` refuses inputs
that changed, treats ``expect`` as a check (a mismatch leaves no output), and merges lazily and
exports key by key, on ``threads`` CPU threads when the recipe records them and the machine
has the cores (a CPU SVD's last bits depend on the thread count: this is what lets a re-run on another
machine come out bitwise); ``Recipe.check(folder)`` compares the weight files with ``expect``.
This module only reads, validates and writes recipes (it imports nothing above ``weightlens.io``).

Also here: what an export writes about a merge (:class:`ExportRecipe`: the recipe, its
:class:`Mergekit` equivalent and the shard metadata, plain data that a merge result builds with
``export_recipe``; ``weightlens.merge`` translates the methods registered with
``@register_merge(mergekit=...)``), and the mergekit YAML written from it.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from weightlens.errors import CheckpointError, InvalidParameterError
from weightlens.io import _fingerprint as _fp
from weightlens.io._atomic import write_text
from weightlens.io._layout import MERGEKIT, RECIPE, parse_dtype, parse_size

__all__ = [
    "ExportRecipe", "Mergekit", "Recipe", "check_fingerprint_mode", "given_recipe", "load_recipe", "mergekit_config",
    "name_paths", "plain_yaml", "portable", "recipe_metadata", "relative_path",
]

RECIPE_VERSION = 1
_REQUIRED = ("base", "finetuned", "method")
_OPTIONAL = ("params", "include", "exclude", "key_map", "vocab", "head", "adapter", "data", "device", "threads", "dtype",
             "shard_size", "like", "output", "expect", "fingerprints", "weightlens_recipe", "weightlens_version")
_SCALARS = (bool, int, float, str, type(None))
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_BYTES = 8 * 2**20  # a recipe is a few KiB (fingerprints of 1000 shards: about 200 KiB)
_MAX_DEPTH = 16  # the deepest field, fingerprints.finetuned.<task>.<file>.size, is 5 levels down
_VOCAB = (None, "base", "union")
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def _version() -> str:
    from weightlens._version import __version__

    return __version__


def _short(value: Any) -> str:
    """A bounded repr for messages (a hostile value never makes a long or slow message)."""
    return _SHORT.repr(value)


# ---------------------------------------------------------------------------------------- plain YAML
class _Refused(yaml.YAMLError):
    """A YAML construct a recipe may not use."""

    def __init__(self, what: str, mark: Any) -> None:
        super().__init__(f"line {mark.line + 1}: {what}" if mark is not None else what)


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases or explicit tags: plain data in, nothing expanded or run."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102
        event = self.peek_event()
        if self.depth >= _MAX_DEPTH:
            raise _Refused(f"values nested more than {_MAX_DEPTH} levels deep", event.start_mark)
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"alias *{event.anchor} (YAML anchors and aliases are not allowed: they can "
                           "expand a small file into an enormous value)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(f"anchor &{event.anchor} (YAML anchors and aliases are not allowed: they can "
                           "expand a small file into an enormous value)", event.start_mark)
        if getattr(event, "tag", None) not in (None, "!"):
            raise _Refused(f"tag {event.tag} (YAML tags are not allowed: write plain values)", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def plain_yaml(text: str, where: str) -> Any:
    """Parse ``text`` as YAML without anchors, aliases or tags; errors name ``where``.

    Raises ``InvalidParameterError`` naming ``where``, the line and what is not allowed.
    """
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 (a SafeLoader that also refuses more)
    except _Refused as exc:
        raise InvalidParameterError(f"{where}: {exc}.") from None
    except yaml.YAMLError as exc:
        text = " ".join(str(exc).replace('in "<unicode string>", ', "").split())
        raise InvalidParameterError(f"{where}: not valid YAML ({text[:200]}).") from None


# ---------------------------------------------------------------------------------------- field types
def _patterns(value: Any, name: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidParameterError(
        f"{where}: '{name}' must be a glob pattern, a list of them or null. Got {_short(value)}.")


def _text(data: Mapping[str, Any], name: str, where: str, *, null: bool = False, path: bool = False) -> str | None:
    """Field ``name`` as a string (``None`` when absent and ``null``); anything else is refused."""
    value = data.get(name)
    if value is None and null:
        return None
    if path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        kind = "a string (a path)" if path else "a string"
        raise InvalidParameterError(f"{where}: '{name}' must be {kind}{' or null' if null else ''}. "
                                    f"Got {_short(value)} ({type(value).__name__}).")
    return value


def _finetuned(value: Any, where: str) -> dict[str, str]:
    """``finetuned``: ``{name: path}`` or a list of paths (names from the file names)."""
    if isinstance(value, list) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return name_paths([os.fspath(v) for v in value])
    if (isinstance(value, Mapping) and all(isinstance(k, str) and k for k in value)
            and all(isinstance(v, (str, os.PathLike)) for v in value.values())):
        return {k: os.fspath(v) for k, v in value.items()}
    raise InvalidParameterError(
        f"{where}: 'finetuned' must map task names (strings) to paths, or list paths. Got {_short(value)}.")


def _key_map(value: Any, finetuned: Mapping[str, str], where: str) -> dict[str, dict[str, str | None]] | None:
    """``key_map``: ``{task: {fine-tune key: base key or null}}`` for some of the recipe's tasks."""
    if value is None:
        return None
    shape = ("'key_map' must map the recipe's task names to {fine-tune key: base key or null} (written by "
             "export; a function cannot be written)")
    if not isinstance(value, Mapping) or not all(isinstance(t, str) and t in finetuned for t in value):
        raise InvalidParameterError(f"{where}: {shape}. Got {_short(value)}.")
    for task, renames in value.items():
        if not isinstance(renames, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in renames.items()):
            raise InvalidParameterError(f"{where}: {shape}; key_map.{task} is {_short(renames)}.")
    return {t: dict(m) for t, m in value.items()} or None


def _choice(value: Any, name: str, allowed: tuple[Any, ...], where: str) -> Any:
    if value not in allowed or isinstance(value, bool):
        raise InvalidParameterError(f"{where}: '{name}' must be one of {', '.join(map(repr, allowed))}. "
                                    f"Got {_short(value)}.")
    return value


def _head(value: Any, finetuned: Mapping[str, str], where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in finetuned):
        raise InvalidParameterError(f"{where}: 'head' must be null or one of the recipe's tasks "
                                    f"({', '.join(finetuned)}). Got {_short(value)}.")
    return value


def _adapter(value: Any, where: str) -> dict[str, int | None] | None:
    """``None`` (full weights) or ``{"rank": None | positive int}`` (an export as a PEFT adapter)."""
    if value is None:
        return None
    rank = value.get("rank") if isinstance(value, Mapping) else None
    if (not isinstance(value, Mapping) or set(value) != {"rank"}
            or not (rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0))):
        raise InvalidParameterError(
            f"{where}: 'adapter' must be null (full weights) or {{rank: null or a positive integer}} (an export as a "
            f"PEFT adapter). Got {_short(value)}.")
    return {"rank": rank}


def _like(data: Mapping[str, Any], where: str) -> str | bool | None:
    """``like``: a folder, null (the default folder) or false (copy nothing)."""
    if data.get("like") is False:
        return False
    value = data.get("like")
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else os.fspath(value)
    raise InvalidParameterError(f"{where}: 'like' must be a string (a path), null (the default folder) or false "
                                f"(copy no files). Got {_short(value)} ({type(value).__name__}).")


def _params(value: Any, where: str) -> dict[str, Any]:
    """``params``: ``{name: scalar or list of scalars}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"{where}: 'params' must map parameter names to values. Got {_short(value)}.")
    for key, v in value.items():
        if not isinstance(key, str):
            raise InvalidParameterError(f"{where}: 'params' names must be strings. Got {_short(key)}.")
        if not (isinstance(v, _SCALARS) or isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v)):
            raise InvalidParameterError(
                f"{where}: params.{key} must be a number, string, bool, null or a list of them. Got {_short(v)}.")
    return dict(value)


def _expect(value: Any, where: str) -> dict[str, str]:
    """``expect``: ``{weight file name: sha256}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"{where}: 'expect' must map weight file names to sha256. Got {_short(value)}.")
    for name, sha in value.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise InvalidParameterError(f"{where}: 'expect' keys must be plain file names. Got {_short(name)}.")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise InvalidParameterError(
                f"{where}: expect[{name!r}] must be a sha256 (64 lowercase hex digits). Got {_short(sha)}.")
    return dict(value)


def _fingerprints(value: Any, finetuned: Mapping[str, str], where: str) -> dict[str, Any]:
    """``fingerprints``: ``{base: {file: fp}, finetuned: {task: {file: fp}}}`` (see ``_fingerprint``)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not set(value) <= {"base", "finetuned"}:
        raise InvalidParameterError(
            f"{where}: 'fingerprints' must be a mapping with 'base' and 'finetuned'. Got {_short(value)}.")
    out: dict[str, Any] = {}
    if "base" in value:
        out["base"] = _fp.check_shape(value["base"], f"{where}: fingerprints.base")
    tasks = value.get("finetuned") or {}
    if not isinstance(tasks, Mapping) or not set(tasks) <= set(finetuned):
        raise InvalidParameterError(
            f"{where}: fingerprints.finetuned must map the recipe's task names ({', '.join(finetuned)}) to "
            f"file fingerprints. Got {_short(tasks)}.")
    out["finetuned"] = {n: _fp.check_shape(tasks[n], f"{where}: fingerprints.finetuned.{n}") for n in tasks}
    return out


def _threads(value: Any, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidParameterError(
            f"{where}: 'threads' must be a positive integer (torch's CPU thread count) or null. Got {_short(value)}.")
    return value


def _shard_size(value: Any, where: str) -> str | int:
    value = "5GB" if value is None else value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidParameterError(f"{where}: 'shard_size' must be a size like '5GB' or bytes. Got {_short(value)}.")
    try:
        parse_size(value)
    except InvalidParameterError as err:
        raise InvalidParameterError(f"{where}: {err}") from None
    return value


def _dtype(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidParameterError(f"{where}: 'dtype' must be a dtype name such as bfloat16, or null. "
                                    f"Got {_short(value)}.")
    try:
        dtype = parse_dtype(value)
    except InvalidParameterError as err:
        raise InvalidParameterError(f"{where}: {err}") from None
    return None if dtype is None else str(dtype).removeprefix("torch.")


_ZOO_DATA = {"zoo": str, "size": str, "options": Mapping, "split": str, "n": int, "batch_size": int, "seed": int}


def _data(value: Any, where: str) -> dict[str, Any] | None:
    """``None`` or what a data-based merge read: ``{description, sha256[, zoo: {zoo, size, options, split, n,
    batch_size, seed}]}`` (the zoo part: how ``weightlens.zoo.merge_data_of`` makes the data again)."""
    if value is None:
        return None
    zoo = value.get("zoo") if isinstance(value, Mapping) else None
    ok = (isinstance(value, Mapping) and set(value) <= {"description", "sha256", "zoo"}
          and isinstance(value.get("sha256"), str) and _SHA256.fullmatch(value["sha256"]) is not None
          and isinstance(value.get("description", ""), str))
    if ok and zoo is not None:
        ok = (isinstance(zoo, Mapping) and set(zoo) == set(_ZOO_DATA)
              and all(isinstance(zoo[k], t) and not isinstance(zoo[k], bool) for k, t in _ZOO_DATA.items())
              and all(isinstance(v, _SCALARS) for v in zoo["options"].values())
              and zoo["n"] > 0 and zoo["batch_size"] > 0 and zoo["seed"] >= 0)
    if not ok:
        raise InvalidParameterError(
            f"{where}: 'data' must be null or {{description: text, sha256: <64 hex digits>, zoo: {{zoo, size, "
            f"options, split, n, batch_size, seed}} (optional)}} (what a data-based merge read). Got {_short(value)}.")
    out: dict[str, Any] = {"description": value.get("description", ""), "sha256": value["sha256"]}
    if zoo is not None:
        out["zoo"] = {k: dict(zoo[k]) if k == "options" else zoo[k] for k in _ZOO_DATA}
    return out


def _check_fields(data: Any, where: str) -> None:
    """A mapping with the required fields, no unknown ones, and a recipe version this weightlens reads."""
    if not isinstance(data, Mapping):
        raise InvalidParameterError(f"{where}: a recipe is a YAML mapping with {', '.join(_REQUIRED)}.")
    unknown = [k for k in data if k not in _REQUIRED + _OPTIONAL]
    missing = [k for k in _REQUIRED if data.get(k) is None or data.get(k) in ("", {}, [])]
    if unknown or missing:
        problem = (f"unknown field(s) {', '.join(_short(k) for k in unknown[:5])}" if unknown
                   else f"missing field(s) {', '.join(map(repr, missing))}")
        raise InvalidParameterError(
            f"{where}: {problem}. Fields: {', '.join(_REQUIRED)} (required), {', '.join(_OPTIONAL[:-2])}."
        )
    version = data.get("weightlens_recipe", RECIPE_VERSION)
    if isinstance(version, bool) or version != RECIPE_VERSION:
        raise InvalidParameterError(
            f"{where}: weightlens_recipe {_short(version)} is not supported (this weightlens "
            f"reads version {RECIPE_VERSION}); upgrade weightlens."
        )


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
    ...            params={"alpha": 0.5}, weightlens_version="0.2.0")
    >>> Recipe.from_mapping(plain_yaml(r.to_yaml(), "r.yaml")) == r
    True
    """

    base: str
    finetuned: dict[str, str]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None
    key_map: dict[str, dict[str, str | None]] | None = None
    vocab: str | None = None
    head: str | None = None
    adapter: dict[str, int | None] | None = None
    data: dict[str, Any] | None = None
    device: str = "cpu"
    threads: int | None = None
    dtype: str | None = None
    shard_size: str | int = "5GB"
    like: str | bool | None = None
    output: str | None = None
    expect: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    weightlens_version: str = ""
    root: Path | None = field(default=None, compare=False, repr=False)
    file: Path | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_mapping(cls, data: Any, *, where: str = "recipe", root: Path | None = None,
                     file: Path | None = None) -> Recipe:
        """Validate a parsed recipe field by field; errors name ``where`` (the file) and the field."""
        _check_fields(data, where)
        ft = _finetuned(data["finetuned"], where)
        return cls(
            base=_text(data, "base", where, path=True), finetuned=ft, method=_text(data, "method", where),
            params=_params(data.get("params"), where), include=_patterns(data.get("include"), "include", where),
            exclude=_patterns(data.get("exclude"), "exclude", where),
            key_map=_key_map(data.get("key_map"), ft, where), vocab=_choice(data.get("vocab"), "vocab", _VOCAB, where),
            head=_head(data.get("head"), ft, where), adapter=_adapter(data.get("adapter"), where),
            data=_data(data.get("data"), where),
            device=_text(data, "device", where, null=True) or "cpu", threads=_threads(data.get("threads"), where),
            dtype=_dtype(data.get("dtype"), where), shard_size=_shard_size(data.get("shard_size"), where),
            like=_like(data, where),
            output=_text(data, "output", where, null=True, path=True),
            expect=_expect(data.get("expect"), where),
            fingerprints=_fingerprints(data.get("fingerprints"), ft, where),
            weightlens_version=_text(data, "weightlens_version", where, null=True) or "", root=root, file=file,
        )

    def checked(self) -> Recipe:
        """This recipe validated as if read from a file (for one built in Python)."""
        data = {k: v for k, v in self.to_dict().items() if k != "weightlens_version"}
        data["weightlens_version"] = self.weightlens_version or None
        return Recipe.from_mapping(data, where=self.where, root=self.root, file=self.file)

    @property
    def where(self) -> str:
        """The recipe file for messages (``"the recipe"`` for one built in Python)."""
        return str(self.file) if self.file is not None else "the recipe"

    def to_dict(self) -> dict[str, Any]:
        """The YAML fields, in order."""
        return {
            "weightlens_recipe": RECIPE_VERSION, "weightlens_version": self.weightlens_version or _version(),
            "base": self.base, "finetuned": dict(self.finetuned), "method": self.method, "params": dict(self.params),
            "include": self.include, "exclude": self.exclude,
            "key_map": {t: dict(m) for t, m in self.key_map.items()} if self.key_map else None,
            "vocab": self.vocab, "head": self.head, **({"adapter": dict(self.adapter)} if self.adapter else {}),
            **({"data": _data(self.data, self.where)} if self.data else {}),
            "device": self.device, "threads": self.threads,
            "dtype": self.dtype, "shard_size": self.shard_size, "like": self.like, "output": self.output,
            "expect": dict(self.expect), **({"fingerprints": self.fingerprints} if self.fingerprints else {}),
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
        """``value`` as a path, relative ones taken from the recipe file's folder (``..`` resolved there)."""
        p = Path(value).expanduser()
        return str(p if p.is_absolute() or self.root is None else os.path.normpath(self.root / p))

    def check(self, folder: str | os.PathLike[str]) -> list[str]:
        """Weight files in ``folder`` whose sha256 differs from ``expect`` (empty: reproduced)."""
        bad = []
        for name, sha in self.expect.items():
            path = Path(folder) / name
            if not path.is_file() or _fp.sha256_file(path) != sha:
                bad.append(name)
        return bad


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe YAML file (relative paths in it are relative to its folder).

    The file is parsed without YAML anchors, aliases or tags (refused with the line), so a small file
    cannot expand into an enormous value and no tag constructs an object; every field's type is checked.
    """
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.is_file():
            raise CheckpointError(f"{path}: cannot read the recipe (not a regular file).")
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
        if len(raw) > _MAX_BYTES:
            raise CheckpointError(f"{path}: cannot read the recipe (larger than {_MAX_BYTES // 2**20} MiB; a "
                                  "recipe is a few KiB). Is this the right file?")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"{path}: cannot read the recipe ({why}).") from None
    data = plain_yaml(text, str(path))
    return Recipe.from_mapping(data, where=str(path), root=Path(os.path.realpath(path.parent)), file=path)


# ---------------------------------------------------------------------------------------- for an export
NOT_A_MERGE = "the weights were not produced by weightlens.merge (no method or inputs to record)"


@dataclass(frozen=True)
class ExportRecipe:
    """What an export writes about how its weights were made, as plain data: the recipe (``None``:
    none, ``why_not`` says why), its mergekit equivalent (``from_merge``: looked up by the merge that
    built this; io alone knows no method's) and the metadata of every shard."""

    recipe: Recipe | None
    mergekit: Mergekit | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    why_not: str = NOT_A_MERGE
    from_merge: bool = False


def recipe_metadata(recipe: Recipe) -> dict[str, Any]:
    """The shard metadata of a merge a recipe describes: method, parameters, tasks."""
    return {"method": recipe.method, "parameters": dict(recipe.params), "tasks": list(recipe.finetuned)}


def check_fingerprint_mode(mode: Any) -> None:
    """Refuse a fingerprint mode other than ``"header"`` or ``"full"``."""
    if mode not in _fp.MODES:
        raise InvalidParameterError(
            f"The 'fingerprint' parameter must be one of {', '.join(_fp.MODES)}. Got {_short(mode)}.")


def given_recipe(recipe: Any, out: Path) -> Recipe | None:
    """The ``recipe=`` of an export validated, its ``output`` set to ``out`` (``None`` for None or False)."""
    output = str(Path(os.path.abspath(out)))
    if recipe is None or recipe is False:
        return None
    if isinstance(recipe, Recipe):
        return replace(recipe.checked(), output=output, expect={})
    if isinstance(recipe, Mapping):
        return replace(Recipe.from_mapping(recipe, where="recipe="), output=output, expect={})
    raise InvalidParameterError(
        f"The 'recipe' parameter must be None, False, a Recipe or a mapping. Got {type(recipe).__name__} instead."
    )


def recipe_for(merged: Any, recipe: Any, *, out: Path, like: Path | None, dtype: torch.dtype | None,
               shard_size: int | str, fingerprint: str = "header") -> ExportRecipe:
    """What an export of ``merged`` writes about it: what ``merged.export_recipe(...)`` builds (a merge
    result), else the recipe given (validated; no mergekit equivalent: io knows no merge methods)."""
    build = getattr(merged, "export_recipe", None)
    if callable(build):  # checks the fingerprint mode itself
        return build(recipe, out=out, like=like, dtype=dtype, shard_size=shard_size, fingerprint=fingerprint)
    if recipe is not False:
        check_fingerprint_mode(fingerprint)
    given = given_recipe(recipe, out)
    return ExportRecipe(given, metadata=recipe_metadata(given) if given is not None else {})


def file_metadata(plan: ExportRecipe) -> dict[str, Any]:
    """Metadata stored in every shard and the index (deterministic: no paths, no times)."""
    return {"format": "pt", "weightlens_version": _version(), **plan.metadata}


def _near(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, its folder's symbolic links resolved (not its own: an HF cache links files to blobs)."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    return Path(os.path.realpath(p.parent)) / p.name


def relative_path(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> str:
    """``path`` as a recipe in ``folder`` records it: relative to ``folder`` when both lie in one project
    folder, else absolute.

    One project folder: their deepest common folder (symbolic links resolved) is at least two levels
    below the filesystem root (so not ``/`` or ``/tmp``) and is neither the home folder nor above it.
    Moving that project folder keeps such a recipe working; a recipe with absolute paths, or one moved
    alone, runs with ``run_recipe(..., sources={name: path})``.

    Examples
    --------
    >>> relative_path("/work/proj/models/base", "/work/proj/merged")
    '../models/base'
    >>> relative_path("/data/base", "/work/proj/merged")
    '/data/base'
    """
    p, f = _near(path), Path(os.path.realpath(os.path.abspath(os.path.expanduser(folder))))
    given = os.path.abspath(os.path.expanduser(path))
    try:
        common = Path(os.path.commonpath([p, f]))
    except ValueError:  # another drive
        return given
    home = Path(os.path.realpath(Path.home()))
    if len(common.parts) < 3 or common == home or common in home.parents:
        return given
    return Path(os.path.relpath(p, f)).as_posix()


def portable(plan: ExportRecipe, folder: Path) -> ExportRecipe:
    """``plan`` with its recipe's paths as a recipe file in ``folder`` records them (:func:`relative_path`)."""
    r = plan.recipe
    if r is None:
        return plan

    def rel(value: str) -> str:
        return relative_path(r.path(value), folder)

    recipe = replace(r, base=rel(r.base), finetuned={n: rel(p) for n, p in r.finetuned.items()},
                     like=rel(r.like) if isinstance(r.like, str) else r.like,
                     output=rel(r.output) if r.output else r.output,
                     root=Path(os.path.realpath(os.path.abspath(folder))))
    return replace(plan, recipe=recipe)


def write_recipes(folder: Path, plan: ExportRecipe, written: Any, base_dtype: str | None = None) -> None:
    """``weightlens_recipe.yaml`` (with the sha256 of what was written) and ``mergekit_config.yml``."""
    if plan.recipe is None:
        return
    write_text(folder / RECIPE, replace(plan.recipe, expect=dict(written.files)).to_yaml())
    mk = mergekit_config(plan.recipe, plan.mergekit, base_dtype=base_dtype)
    if mk is not None:
        write_text(folder / MERGEKIT, mk[0])


# ---------------------------------------------------------------------------------------- mergekit
def _model_path(source: str, resolved: str) -> tuple[str, bool]:
    """The HF folder mergekit should load for ``source`` (found at ``resolved``), and whether there is one."""
    p, real = Path(source), Path(resolved)
    if real.is_file() or real.suffix in (".safetensors", ".json", ".bin", ".pt"):
        return (str(p.parent), True) if (real.parent / "config.json").is_file() else (str(p), False)
    return str(p), True


#: Architectures (``config.json`` ``architectures``) on which the pinned mergekit (0.1.5) fails, and why.
MERGEKIT_FAILS = {
    "BertModel": (
        "mergekit 0.1.5 cannot run this: its BertModel table marks embeddings.position_ids optional with "
        "aliases, and planning an optional weight joins a list with that tuple (TypeError in mergekit/plan.py); "
        "task models such as BertForSequenceClassification are not affected"
    ),
}


def _architectures(folder: str) -> list[str]:
    """``architectures`` of the ``config.json`` in ``folder`` (empty when there is none or it is unreadable)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    found = config.get("architectures") if isinstance(config, dict) else None
    return [a for a in found if isinstance(a, str)] if isinstance(found, list) else []


@dataclass(frozen=True)
class Mergekit:
    """A method's mergekit equivalent for some parameters: mergekit's method name, the parameters of
    each fine-tune (``per_model``) and of the merge (``parameters``), and caveats (``notes``).
    ``per_task``, when given, holds one more dict per fine-tune (in the recipe's order) that updates
    ``per_model`` for that fine-tune (e.g. ``linear``'s weights)."""

    method: str
    per_model: dict[str, Any]
    parameters: dict[str, Any]
    notes: tuple[str, ...] = ()
    per_task: tuple[dict[str, Any], ...] = ()


def mergekit_config(recipe: Recipe, mk: Mergekit | None, *, base_dtype: str | None = None) -> tuple[str, str] | None:
    """``(mergekit YAML, how exact it is)`` for ``recipe`` and its method's mergekit equivalent ``mk``
    (``None`` when there is none)."""
    if mk is None:
        return None
    notes = ["mergekit sums in the checkpoint dtype and in its own order, so weights agree up to "
             "floating-point rounding, not bitwise", *mk.notes]
    if recipe.include or recipe.exclude:
        notes.append(f"weightlens merged only the keys selected by include={recipe.include} "
                     f"exclude={recipe.exclude}; mergekit merges every tensor")
    sources = (recipe.base, *recipe.finetuned.values())
    paths = [_model_path(src, recipe.path(src)) for src in sources]
    if not all(ok for _, ok in paths):
        notes.append("mergekit loads HF model folders (weights and config.json); replace the bare file "
                     "paths with such folders")
    base_dir = recipe.path(paths[0][0])
    fails = {MERGEKIT_FAILS[a] for a in _architectures(base_dir) if a in MERGEKIT_FAILS}
    notes.extend(sorted(fails))
    config = {
        "merge_method": mk.method,
        "base_model": paths[0][0],
        "models": [{"model": path, "parameters": {**mk.per_model, **(mk.per_task[i] if mk.per_task else {})}}
                   for i, (path, _) in enumerate(paths[1:])],
        "parameters": dict(mk.parameters),
        "dtype": recipe.dtype or base_dtype or "float32",
    }
    note = "; ".join(notes) + "."
    relative = [p for p, _ in paths if not Path(p).expanduser().is_absolute()]
    where = (" from this folder (its model paths are relative to it, and mergekit reads them from the working "
             "directory)") if relative else ""
    head = (f"# mergekit equivalent of this weightlens {recipe.method} merge ({mk.method}). Run{where}: "
            f"mergekit-yaml mergekit_config.yml OUT_DIR\n# Note: {note}\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=False), note
