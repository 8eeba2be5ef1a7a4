"""Export merged weights as files the ecosystem loads: safetensors shards, index, config, card, recipe.

``export(merged, out_dir, like=base)`` streams the weights key by key into safetensors shards (HF
names: ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json``), copies the config, tokenizer, processor, chat template and
licence files of the ``like`` HF folder (an allowlist, ``weightlens.io._like.LIKE_FILES``, from its
top level only), and writes a model card ``README.md``, a figure, a
``weightlens_recipe.yaml`` that ``weightlens merge`` re-runs bitwise, and for task arithmetic, TIES
and DARE a ``mergekit_config.yml``. The recipe, the mergekit YAML and the card name the inputs relative
to the export folder when they share a project folder with it (``weightlens.io.recipe.relative_path``).

A merge result says what else its folder holds (``MergeResult.export_layout()``, plain data): with a
head (``merged.with_head(task)``) the merged keys are written under that fine-tune's names, with the
keys only it has (its classifier) and its ``config.json``; a resized vocabulary sets ``vocab_size``,
and ``vocab="union"`` writes the union tokenizer instead of the ``like`` folder's tokenizer files
(``vocab="base"``: the base's tokenizer files).

Atomic: everything is written into a hidden folder beside the target
(``.<name>.weightlens-tmp-<pid>-<random>``), each file fsynced, then renamed onto the target in
one step. An exception leaves nothing; a kill leaves only that hidden folder, which the next export
beside it removes. Streaming: when shapes and dtypes are known from headers (a lazy merge, a
``Checkpoint``, a dict of tensors) each shard's header is written first and every tensor goes to
disk as soon as it is computed, so memory holds one merged key (plus one key of every input while
the merge computes it); other mappings are buffered one output shard at a time. With
``executor="ray"`` a merge result computes its keys as Ray tasks a few keys ahead of the writer
(``MergeResult.stream``), which writes them in the same order: the same bytes as the serial path.

Safe targets (``weightlens.io._paths``): an export never replaces the current or home folder, a
folder above either, a filesystem root or a folder holding one of its inputs; ``overwrite=True``
replaces only an earlier weightlens export, ``overwrite_any=True`` any other folder or file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from weightlens._executor import check_executor
from weightlens._finite import count_nonfinite, finite
from weightlens._options import resolve_options
from weightlens._progress import bar
from weightlens.errors import (
    CheckpointError,
    DTypeError,
    InvalidParameterError,
    NonFiniteError,
    ShapeMismatchError,
    TargetExistsError,
    WeightlensError,
)
from weightlens.io import _paths
from weightlens.io import _safetensors as st
from weightlens.io._atomic import atomic_folder, write_text
from weightlens.io._layout import INDEX, ExportLayout, WrittenWeights, dtype_name, parse_dtype, parse_size
from weightlens.io._like import LikePlan, copy_like, like_folder, plan_like, with_config, with_tokenizer
from weightlens.io.sources import Checkpoint, load

__all__ = ["ExportOptions", "TargetExistsError", "export", "parse_dtype", "parse_size"]

_CODES = {dtype: code for code, dtype in st.DTYPES.items()}
_SAMPLE = 1 << 20  # entries per tensor used to measure how far a key moved (the card's figure)


# ---------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Entry:
    """One tensor to write: its name in the folder and where it comes from (a merged key, or an extra
    tensor of the carried head when ``key`` is None)."""

    name: str
    key: str | None


@dataclass(frozen=True)
class _Item:
    key: str  # as written
    shape: tuple[int, ...]
    dtype: torch.dtype  # as written (after the dtype option)
    src: str | None = None  # the merged key (None: an extra tensor of the head)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and dtype.is_floating_point else dtype


def _known_info(merged: Mapping[str, Any], key: str) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of ``merged[key]`` without computing it, when the mapping can tell."""
    tv = getattr(merged, "task_vectors", None)
    if tv is not None and hasattr(tv, "base"):  # a MergeResult: every key in the base's dtype
        info = tv.base.info(key)
        return tuple(info.shape), info.dtype
    if isinstance(merged, Checkpoint):
        info = merged.info(key)
        return tuple(info.shape), info.dtype
    if isinstance(merged, dict) and isinstance(merged.get(key), torch.Tensor):
        t = merged[key]
        return tuple(t.shape), t.dtype
    return None


def _entries(merged: Mapping[str, Any], layout: ExportLayout) -> list[_Entry]:
    """What is written, in order: the merged keys (renamed or left out for a head), then the head's extras."""
    dropped = set(layout.dropped)
    found = [_Entry(layout.rename.get(str(k), str(k)), str(k)) for k in merged if k not in dropped]
    found += [_Entry(name, None) for name in layout.extras]
    seen: set[str] = set()
    for e in found:
        if e.name in seen:
            raise CheckpointError(f"export: two tensors would be written as {e.name!r} (head={layout.head!r}); "
                                  "the merge's key map gives two keys one name. Export without the head.")
        seen.add(e.name)
    return found


def _plan(merged: Mapping[str, Any], entries: list[_Entry], layout: ExportLayout, target: torch.dtype | None,
          max_bytes: int) -> list[list[_Item]] | None:
    """Keys split into shards greedily (HF rule: a new shard when the next tensor would not fit)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for e in entries:
        known = layout.extras[e.name] if e.key is None else _known_info(merged, e.key)
        if known is None:
            return None
        item = _Item(e.name, tuple(known[0]), _out_dtype(known[1], target), e.key)
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """HF file names of ``n`` shards."""
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# ---------------------------------------------------------------------------------------- writing
class _Shard:
    """One safetensors file written front to back: header first, then each tensor's bytes in order."""

    def __init__(self, path: Path, items: list[_Item], metadata: Mapping[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        for it in items:
            if it.dtype not in _CODES:
                raise DTypeError(f"Key {it.key!r} has dtype {it.dtype}, which safetensors cannot store.")
            header[it.key] = {"dtype": _CODES[it.dtype], "shape": list(it.shape),
                              "data_offsets": [offset, offset + it.nbytes]}
            offset += it.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
        self.path, self.items, self.sha256, self.size = path, items, hashlib.sha256(), 0
        self._next = 0
        self._file = open(path, "xb")
        try:
            self._write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def write(self, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan (its shape and dtype must match the header)."""
        it = self.items[self._next]
        if tuple(tensor.shape) != it.shape or tensor.dtype != it.dtype:
            raise ShapeMismatchError(
                f"{self.path.name}: key {it.key!r} was planned as {it.shape} {it.dtype} from the "
                f"checkpoint headers but computed as {tuple(tensor.shape)} {tensor.dtype}."
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> str:
        """Flush, fsync and close; returns the sha256 of the file."""
        if self._next != len(self.items):
            raise CheckpointError(f"{self.path.name}: closed after {self._next} of {len(self.items)} tensors.")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()
        return self.sha256.hexdigest()

    def abort(self) -> None:
        """Close without the checks (after an error: a failing flush must not hide that error)."""
        with contextlib.suppress(OSError):
            self._file.close()


class _WeightWriter:
    """Streams the merged keys into shards, checking each tensor and measuring its change."""

    def __init__(self, merged: Mapping[str, Any], folder: Path, target: torch.dtype | None,
                 metadata: Mapping[str, str], where: str, layout: ExportLayout) -> None:
        self.merged, self.folder, self.target, self.metadata, self.where = merged, folder, target, metadata, where
        self.layout = layout
        self.stream: Any = None  # (key, tensor) in the order written, from an executor (MergeResult.stream)
        self.out = WrittenWeights()
        tv = getattr(merged, "task_vectors", None)
        updated = getattr(merged, "updated_keys", None)
        self._tv = tv if tv is not None and updated is not None else None  # its base: the card's figure
        self._updated = set(updated or ())

    def tensor(self, key: str | None, name: str = "") -> torch.Tensor:
        """``merged[key]`` (``key`` None: the head's extra tensor ``name``) cast to the output dtype and
        checked: finite, a tensor."""
        extra = key is None
        if extra:
            key, t = name, self.layout.read_extra(name)
        else:
            t = self._read(key)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{self.where}: merged[{key!r}] is a {type(t).__name__}, not a tensor.")
        orig = t
        t = t.to(_out_dtype(t.dtype, self.target))
        if not finite(t):
            bad = count_nonfinite(t)
            cast = (f" after the cast from {orig.dtype} to {t.dtype} (values out of range?)"
                    if orig.dtype != t.dtype and finite(orig) else "")
            raise NonFiniteError(
                f"{self.where}: {'head' if extra else 'merged'} key {key!r} has {bad} NaN/Inf value(s) of "
                f"{t.numel()}{cast}; nothing was written. Check the inputs of that key or the merge parameters "
                "(e.g. a smaller alpha), or export in a wider dtype."
            )
        if not extra and self._tv is not None and key in self._updated:
            self.out.moved[key] = _moved(t, self._tv.base_wide(key))  # the base the merge just read
        return t

    def _read(self, key: str) -> Any:
        if self.stream is None:
            return getattr(self.merged, "peek", self.merged.__getitem__)(key)  # a MergeResult keeps nothing
        got, t = next(self.stream)
        if got != key:  # the stream follows the entries' order; anything else is a bug here
            raise RuntimeError(f"{self.where}: the executor returned key {got!r} where {key!r} was due.")
        return t

    def write_planned(self, shards: list[list[_Item]], bar: tqdm) -> None:
        names = shard_names(len(shards))
        for name, items in zip(names, shards):
            shard = _Shard(self.folder / name, items, self.metadata)
            try:
                for it in items:
                    shard.write(self.tensor(it.src, it.key))
                    bar.update(it.nbytes)
            except BaseException:
                shard.abort()
                raise
            self._record(name, shard.close(), items, shard.size)

    def write_buffered(self, entries: list[_Entry], max_bytes: int, bar: tqdm) -> None:
        """For mappings that cannot tell shapes ahead: hold one output shard, then write it."""
        parts: list[tuple[Path, str, list[_Item], int]] = []
        held: dict[str, torch.Tensor] = {}

        def flush() -> None:
            items = [_Item(k, tuple(t.shape), t.dtype) for k, t in held.items()]
            path = self.folder / f"part-{len(parts) + 1:05d}.safetensors"
            shard = _Shard(path, items, self.metadata)
            try:
                for t in held.values():
                    shard.write(t)
            except BaseException:
                shard.abort()
                raise
            parts.append((path, shard.close(), items, shard.size))
            held.clear()

        size = 0
        for e in entries:
            t = self.tensor(e.key, e.name)
            nbytes = t.numel() * t.element_size()
            if held and size + nbytes > max_bytes:
                flush()
                size = 0
            held[e.name] = t
            size += nbytes
            bar.update(nbytes)
        if held or not parts:
            flush()
        for name, (path, sha, items, nbytes) in zip(shard_names(len(parts)), parts):
            path.rename(self.folder / name)
            self._record(name, sha, items, nbytes)

    def _record(self, name: str, sha: str, items: list[_Item], nbytes: int) -> None:
        self.out.files[name] = sha
        self.out.weight_map.update({it.key: name for it in items})
        self.out.total_size += sum(it.nbytes for it in items)
        self.out.n_tensors += len(items)


def _moved(new: torch.Tensor, old: torch.Tensor) -> tuple[float, float]:
    """``(||new - old||^2, ||old||^2)`` for the card's figure, scaled to the whole tensor.

    Exact up to ``_SAMPLE`` entries; larger tensors use every s-th entry, s coprime with the last
    dimension so that the sample walks across rows and columns (the figure needs no more, and the
    exact sums cost a fifth of a large export's time).
    """
    a, b = new.reshape(-1), old.reshape(-1)
    n = a.numel()
    step = max(1, -(-n // _SAMPLE))
    while step > 1 and math.gcd(step, new.shape[-1] if new.ndim else 1) != 1:
        step += 1
    y = b[::step].float()
    d = a[::step].float() - y
    scale = n / max(1, y.numel())
    return float(torch.dot(d, d)) * scale, float(torch.dot(y, y)) * scale


def write_index(folder: Path, written: WrittenWeights, metadata: Mapping[str, Any]) -> None:
    """``model.safetensors.index.json`` (HF layout) with weightlens metadata and shard sha256."""
    meta = {"total_size": written.total_size, **metadata, "sha256": dict(written.files)}
    write_text(folder / INDEX, json.dumps({"metadata": meta, "weight_map": written.weight_map}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- inputs
def _inputs(merged: Mapping[str, Any], like_dir: Path | None) -> list[tuple[str, str | Path]]:
    """``(role, path)`` of every input the export reads: the ``like`` folder, base and fine-tunes."""
    found: list[tuple[str, str | Path]] = [("like folder", like_dir)] if like_dir is not None else []
    tv = getattr(merged, "task_vectors", None)
    if tv is not None:
        found.append(("base", tv.base.source))
        found += [(f"fine-tune {name!r}", c.source) for name, c in tv.finetuned.items()]
        found += [(f"{role} folder", c.hf_dir) for role, c in (("base", tv.base), *tv.finetuned.items())
                  if getattr(c, "hf_dir", None) is not None]
    elif isinstance(merged, Checkpoint):
        found.append(("checkpoint", merged.source))
    return found


# ---------------------------------------------------------------------------------------- entry point
@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export` writes beside the weights, and its expert safety knobs (all have defaults).

    Attributes
    ----------
    recipe : None, False, Recipe or mapping
        ``None`` (default): derive ``weightlens_recipe.yaml`` from a ``MergeResult`` whose inputs are
        files; ``False``: write none; a ``Recipe`` (or its mapping) is written as given.
    fingerprint : {"header", "full"}
        How the derived recipe fingerprints each input file: its size and a sha256 of its header
        (``"header"``, the default, cheap), or also a sha256 of the whole file (``"full"``, reads
        every byte); a re-run refuses inputs that changed. A recipe given as ``recipe=`` keeps its own.
    card : mapping, optional
        Extras for the model card: ``"title"``, ``"metrics"`` (``{task: {metric: value}}`` or a
        DataFrame), ``"report"`` (an analysis ``Report`` or its ``summary()``), ``"notes"`` (text).
    executor : {"local", "ray"} or None
        Where a merge result's per-key work runs while it is written (None, the default: the
        ``executor`` given to ``merge``); ``"ray"``: Ray tasks a few keys ahead of the shard writer,
        written in the same order (the same bytes). Other mappings hold finished tensors: ``"ray"``
        is refused for them.
    verify : callable, optional
        Called with ``{weight file: sha256}`` once the weights are written, before anything else is
        and before the folder is moved into place; an exception it raises leaves no output behind
        (``run_recipe`` checks a re-run against the recipe's recorded sha256 this way).
    overwrite_any : bool
        Replace any existing ``out_dir``, folder or file, whatever it holds (default False). Never
        the current or home folder, a folder above either, a filesystem root, or a folder holding an input.
    """

    recipe: Any = None
    fingerprint: str = "header"
    card: Mapping[str, Any] | None = None
    verify: Callable[[Mapping[str, str]], None] | None = None
    overwrite_any: bool = False
    executor: str | None = None

    def __post_init__(self) -> None:
        from weightlens.io import _card, recipe as _recipe

        _card.check_extras(self.card)
        if self.recipe is not False:  # no recipe: no fingerprints
            _recipe.check_fingerprint_mode(self.fingerprint)
        if self.executor is not None:
            check_executor(self.executor, caller="export")
        if self.verify is not None and not callable(self.verify):
            raise InvalidParameterError(
                f"The 'verify' parameter must be a callable or None. Got {self.verify!r} instead."
            )


def export(
    merged: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    like: Any = None,
    shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    options: ExportOptions | None = None,
    **overrides: Any,
) -> Path:
    """Write merged weights as an HF-style model folder, atomically and key by key.

    Parameters
    ----------
    merged : Mapping[str, Tensor]
        A ``MergeResult`` (``merge(..., lazy=True)`` streams: one key computed at a time), a
        ``Checkpoint`` or a state dict.
    out_dir : path
        Target folder; created atomically (a temporary sibling renamed at the end).
    like : path, Checkpoint, False or None
        HF model folder whose config, generation config, tokenizer, processor, chat template and
        licence files are copied (an allowlist, from its top level, regular files only; never its
        weights); with ``dtype`` its ``config.json`` names the new dtype. ``None``: the folder of the
        head the merge carries (``merged.with_head(task)``), else the merge base's folder when it has
        one. With a head, ``config.json`` is the head's whatever ``like`` says; a merged vocabulary
        brings its own tokenizer files (the union tokenizer, or the base's unless ``like`` is given)
        and sets ``vocab_size``. ``False``: copy and write no such file.
    shard_size : int or str, default="5GB"
        Largest shard in bytes (``"5GB"`` = 5e9, ``"2GiB"`` = 2**31); one file when all fits.
    dtype : torch.dtype or str, optional
        Cast floating tensors (``"bf16"``, ``torch.float16``, ...); integer buffers are kept.
    overwrite : bool, default=False
        Replace an existing non-empty ``out_dir`` atomically when it is an earlier weightlens export
        (its ``*.safetensors`` headers carry ``weightlens_version``); otherwise it is refused.
    progress : bool or None, default=None
        A bar over the bytes written; None follows ``weightlens.config.progress`` (auto: in notebooks
        and terminals, once the export has run a second).
    options : ExportOptions, optional
        What is written beside the weights and the expert safety knobs; ``**overrides`` set its
        fields directly: ``recipe`` (None: derived from a merge result; False: none),
        ``fingerprint`` (``"header"`` or ``"full"``), ``card`` (model-card extras), ``verify`` (a
        check of the written weights' sha256), ``overwrite_any`` (replace any existing
        ``out_dir``) and ``executor`` (``"local"`` or ``"ray"``: where a merge result's keys are
        computed; default: the merge's own), e.g. ``export(merged, out, recipe=False)``.
        ``as_adapter=True`` (with ``rank=None`` or an int) writes the merged update as a PEFT LoRA
        adapter folder instead (:func:`weightlens.io.export_adapter`, which says what it writes and
        refuses); full weights stay the default.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    UnsafePathError
        ``out_dir`` is empty, the current or home folder, a folder above either, a filesystem root
        or holds an input; or ``overwrite=True`` would replace something that is not an export.
    TargetExistsError
        ``out_dir`` is not empty and neither ``overwrite`` nor ``overwrite_any`` allows replacing it.
    CheckpointError
        The ``like`` folder's ``config.json`` is not a JSON object (nothing is written).
    OSError
        Writing failed (e.g. the disk is full); the message names the target, nothing is left.
    NonFiniteError
        A merged tensor holds NaN or Inf (the key is named); nothing is written.

    Notes
    -----
    A merge result is read key by key without being kept (``MergeResult.peek``): memory holds one
    merged key plus what the method caches in ``tv.cache`` (per-task SVDs for TSV-M, Iso and STAR),
    bounded by its ``max_bytes`` (by default 1/8 of the available memory, 256 MiB to 2 GiB); build the
    ``TaskVectors`` with a smaller ``DecompositionCache(max_bytes=...)`` to bound it further.

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> from weightlens.io import export
    >>> out = export({"w": torch.ones(2, 2)}, "/tmp/wl-doc-export", overwrite=True, progress=False)
    >>> wl.load(out)["w"].sum().item()
    4.0
    """
    from weightlens.io import recipe as _recipe

    if overrides.pop("as_adapter", False):
        return _as_adapter(merged, out_dir, overrides, like=like, shard_size=shard_size, dtype=dtype,
                           overwrite=overwrite, progress=progress, options=options)
    opts = resolve_options(ExportOptions, options, overrides, caller="export")
    overwrite_any = opts.overwrite_any
    if not isinstance(merged, Mapping):
        merged = load(merged)
    extras = opts.card if opts.card is not None else {}
    max_bytes, target = parse_size(shard_size), parse_dtype(dtype)
    executor = _executor_for(merged, opts.executor)
    _paths.check_output_path(out_dir)
    out = Path(out_dir).expanduser()
    layout = _layout_of(merged)
    like_dir = like_folder(like, merged, default=layout.config_dir)
    _paths.check_inputs(out, _inputs(merged, like_dir))
    check = functools.partial(_paths.check_replaceable, overwrite=overwrite, overwrite_any=overwrite_any)
    check(out)  # before the recipe reads its inputs' fingerprints
    like_plan = _plan_like(like_dir, layout, given=like is not None)
    recorded = like_dir if like is not None and like is not False else like  # None: the default folder
    rec = _recipe.recipe_for(merged, opts.recipe, out=out, like=recorded, dtype=target, shard_size=shard_size,
                             fingerprint=opts.fingerprint)
    job = _Job(merged, out, target, max_bytes, _recipe.file_metadata(rec), rec, like_plan, extras,
               opts.verify, progress, layout, executor)
    try:
        with atomic_folder(out, overwrite=overwrite or overwrite_any, check=check) as tmp:
            _write_folder(job, tmp)
    except OSError as err:
        if isinstance(err, WeightlensError):
            raise
        raise _os_failure(out, err) from None
    return out


def _as_adapter(merged: Any, out_dir: Any, overrides: dict[str, Any], **given: Any) -> Path:
    """``export(..., as_adapter=True, rank=...)``: the adapter export, refusing the full-weight settings it ignores."""
    from weightlens.io._adapter_export import export_adapter

    rank = overrides.pop("rank", None)
    ignored = [k for k, default in (("like", None), ("shard_size", "5GB"), ("dtype", None)) if given[k] != default]
    if ignored:
        raise InvalidParameterError(
            f"export(..., as_adapter=True) writes a PEFT adapter; {ignored} are settings of the full-weight export. "
            "Drop them, or export the full weights."
        )
    return export_adapter(merged, out_dir, rank=rank, overwrite=given["overwrite"], progress=given["progress"],
                          options=given["options"], **overrides)


@dataclass(frozen=True)
class _Job:
    """One export, its options checked: what :func:`_write_folder` writes."""

    merged: Mapping[str, Any]
    out: Path
    target: torch.dtype | None
    max_bytes: int
    meta: dict[str, Any]
    recipe: Any  # an ExportRecipe
    like: LikePlan | None
    extras: Mapping[str, Any]
    verify: Callable[[Mapping[str, str]], None] | None
    progress: bool | None
    layout: ExportLayout
    executor: str = "local"


def _executor_for(merged: Mapping[str, Any], executor: str | None) -> str:
    """The executor of an export: the one asked for, else the merge result's own, else ``"local"``."""
    if executor is None:
        return getattr(merged, "executor", "local")
    if executor != "local" and not callable(getattr(merged, "stream", None)):
        raise InvalidParameterError(
            f"export(executor={executor!r}) computes a merge result's keys; this {type(merged).__name__} holds "
            "finished tensors, so there is nothing to run. Drop executor=, or export wl.merge(...)'s result."
        )
    return executor


def _layout_of(merged: Mapping[str, Any]) -> ExportLayout:
    """What a merge result says about its folder beyond the merged keys (head, vocabulary); else the default."""
    build = getattr(merged, "export_layout", None)
    layout = build() if callable(build) else None
    return layout if isinstance(layout, ExportLayout) else ExportLayout()


def _plan_like(like_dir: Path | None, layout: ExportLayout, *, given: bool) -> LikePlan | None:
    """The files copied beside the weights: the ``like`` folder's, with the head's ``config.json`` and
    the vocabulary's tokenizer files (the base's, or none when the union tokenizer is written)."""
    if like_dir is None:
        return None
    plan = plan_like(like_dir)
    if layout.config_dir is not None and Path(os.path.realpath(layout.config_dir)) != plan.folder:
        with_config(plan, layout.config_dir)
    if layout.write_tokenizer is not None:
        with_tokenizer(plan, None)
        source = layout.union_from or (like_dir if given and (like_dir / "tokenizer.json").is_file() else None)
        if source is None:
            raise CheckpointError(
                "The merge keeps the fine-tunes' added tokens (vocab='union'), and its union tokenizer extends the "
                "base's tokenizer.json, which the base's folder lacks. Pass like=<a folder with the base's tokenizer "
                "files>, or like=False to write no config or tokenizer files."
            )
        plan.union_from = source
    elif layout.tokenizer_dir is not None and not given:
        with_tokenizer(plan, layout.tokenizer_dir)
    plan.config.update(layout.config)
    return plan


def _write_folder(job: _Job, tmp: Path) -> None:
    """Weights, index, like files, recipes and card into the temporary folder ``tmp``."""
    from weightlens.io import _card, recipe as _recipe

    meta = {k: _as_str(v) for k, v in job.meta.items()}
    writer = _WeightWriter(job.merged, tmp, job.target, meta, f"export to {job.out}", job.layout)
    entries = _entries(job.merged, job.layout)
    plan = _plan(job.merged, entries, job.layout, job.target, job.max_bytes)
    total = sum(it.nbytes for s in plan for it in s) if plan is not None else None
    if callable(getattr(job.merged, "stream", None)):  # a merge result: its walk, in the order written (Ray
        # tasks a few keys ahead; locally each key when read, its decompositions batched ahead on CUDA)
        writer.stream = job.merged.stream([e.key for e in entries if e.key is not None],  # type: ignore[attr-defined]
                                          executor=job.executor)
    closing = contextlib.closing(writer.stream) if writer.stream is not None else contextlib.nullcontext()
    with closing, bar(total=total, progress=job.progress, desc=f"export {job.out.name}", unit="B",
                      unit_scale=True, file=sys.stderr) as shown:
        if plan is not None:
            writer.write_planned(plan, shown)
        else:
            writer.write_buffered(entries, job.max_bytes, shown)
    written = writer.out
    if job.verify is not None:
        job.verify(dict(written.files))
    if len(written.files) > 1:
        write_index(tmp, written, job.meta)
    like = job.like
    copied = copy_like(like, tmp, job.target) if like is not None else []
    union = (_write_union_tokenizer(job.layout, like.union_from, tmp)
             if like is not None and like.union_from is not None else [])
    base_dtype = _main_dtype(job.merged, job.target)
    rec = _recipe.portable(job.recipe, job.out)  # paths relative to the folder when the inputs are near it
    _recipe.write_recipes(tmp, rec, written, base_dtype=base_dtype)
    files = _card.CardFiles(written, job.target, copied, like.skipped if like is not None else [], job.layout,
                            {n: str(p) for n, p in like.origins.items()} if like is not None else {}, union)
    _card.write_card(tmp, job.merged, rec, files, job.extras, base_dtype=base_dtype)


def _write_union_tokenizer(layout: ExportLayout, source: Path, tmp: Path) -> list[str]:
    """The merge's union tokenizer written into ``tmp``, each file fsynced; the names written."""
    names = []
    for path in layout.write_tokenizer(tmp, base_tokenizer=source):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        names.append(Path(path).name)
    return names


def _os_failure(out: Path, err: OSError) -> OSError:
    """One error for a failed write (disk full, permissions): the target, the cause, what to do."""
    code = errno.errorcode.get(err.errno or 0, "")
    cause = f"{err.strerror or err}{f' ({code})' if code else ''}{f' at {err.filename}' if err.filename else ''}"
    todo = ("free space on that disk or choose a folder on another one" if err.errno == errno.ENOSPC
            else "check that folder's permissions and free space")
    return OSError(err.errno, f"export to {out} failed: {cause}; nothing was left behind and any earlier "
                              f"{out.name} is as it was. To fix: {todo}, then run the export again.")


def _main_dtype(merged: Mapping[str, Any], target: torch.dtype | None) -> str | None:
    """Name of the dtype of the first floating key (for the mergekit config), when known."""
    if target is not None:
        return dtype_name(target)
    for key in merged:
        known = _known_info(merged, key)
        if known is None:
            return None
        if known[1].is_floating_point:
            return dtype_name(known[1])
    return None


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
