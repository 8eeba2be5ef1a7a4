"""Resolve any checkpoint source to a lazy :class:`Checkpoint`.

Sources: a ``.safetensors`` file; sharded safetensors (``*.safetensors.index.json``); an HF model
folder (safetensors or ``pytorch_model.bin``, sharded or not); a ``.bin``/``.pt`` pickle, read only
through ``torch.load(weights_only=True)``; a state dict; an ``nn.Module``; a ``Checkpoint``; a PEFT
LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``), opened as an
:class:`AdapterCheckpoint` (``weightlens.io._adapter`` reads its config and key names).

Opening reads headers only: keys, shapes and dtypes are known before any tensor data is read, and
a corrupt or truncated file is reported, naming the file and key, before the first tensor is used.
Only regular files are opened (a pipe or device named like a checkpoint is refused, never read); a
shard index must map each tensor to exactly one shard inside its folder; tensors given in memory or
in pickles must be dense, real and materialised (not meta, sparse or complex).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import pickle
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from weightlens.errors import CheckpointError, KeyMismatchError, UnsafeCheckpointError
from weightlens.io import _adapter
from weightlens.io import _safetensors as st
from weightlens.io._adapter import LoraFactors, LoraModule

__all__ = ["AdapterCheckpoint", "Checkpoint", "LoraFactors", "LoraModule", "TensorInfo", "load"]

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Folder contents tried in order; the first present wins.
_FOLDER_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Nested state dicts found in training checkpoints (Lightning, plain torch.save of a dict).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
_GENERIC_STEMS = {"model", "pytorch_model", "diffusion_pytorch_model", "adapter_model"}


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str | None = None


def _did_you_mean(key: object, known: Iterable[str]) -> str:
    """`` Did you mean 'a', 'b'?`` for up to three known names close to ``key``, else ``""``."""
    close = difflib.get_close_matches(str(key), list(known), n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


class Checkpoint(Mapping[str, torch.Tensor]):
    """A lazy, read-only ``Mapping[str, Tensor]``: indexing reads one tensor (CPU, stored dtype).

    Attributes
    ----------
    name : short display name (file stem, folder name, ``"state_dict"``).
    source : what was opened, for messages.
    hf_dir : the HF model folder (config, tokenizer) when there is one, else ``None``.
    metadata : free-form metadata stored with the weights (safetensors ``__metadata__``).
    """

    def __init__(
        self,
        infos: dict[str, TensorInfo],
        reader: Callable[[str], torch.Tensor],
        *,
        name: str,
        source: str,
        hf_dir: Path | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._infos = infos
        self._reader = reader
        self.name = name
        self.source = source
        self.hf_dir = hf_dir
        self.metadata = dict(metadata or {})

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.info(key)
        tensor = self._reader(key)
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointError(
                f"{self._where(key)}: read {tuple(tensor.shape)} {tensor.dtype} but the header promised "
                f"{info.shape} {info.dtype}; the file changed after it was opened."
            )
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    # Metadata without reading data -----------------------------------------------------------
    def info(self, key: str) -> TensorInfo:
        """Shape, dtype and file of ``key``; reads no tensor data."""
        try:
            return self._infos[key]
        except KeyError:
            raise KeyMismatchError(
                f"Key {key!r} is not in checkpoint {self.name!r} ({self.source}; {len(self)} keys)."
                f"{_did_you_mean(key, self._infos)}"
            ) from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self.info(key).dtype

    @property
    def nbytes(self) -> int:
        """Total size of the stored tensors in bytes."""
        return sum(_numel(i.shape) * _itemsize(i.dtype) for i in self._infos.values())

    def renamed(self, name: str) -> Checkpoint:
        """This checkpoint displayed as ``name`` (a shallow copy sharing the reader)."""
        other = copy.copy(self)
        other.name = name
        return other

    def __repr__(self) -> str:
        gb = self.nbytes / 1e9
        size = f"{gb:.2f} GB" if gb >= 0.1 else f"{self.nbytes / 1e6:.1f} MB"
        return f"Checkpoint({self.name!r}, {len(self)} tensors, {size}, source={self.source!r})"

    def _where(self, key: str) -> str:
        file = self._infos[key].file
        return f"{file or self.source} key {key!r}"

    # Pickling (a Ray task's inputs) --------------------------------------------------------------
    _origin: Path | None = None  # the path ``load`` opened, when it opened one

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Opened from a path: pickled as that path and its headers, reopened (headers only) where it is
        unpickled, and refused there if the file changed; in memory: pickled with its tensors."""
        if self._origin is None:
            return super().__reduce_ex__(protocol)
        return (_reopen, (str(self._origin), self.name, self.hf_dir, self._infos))

    def __copy__(self) -> Checkpoint:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


class AdapterCheckpoint(Checkpoint):
    """A PEFT LoRA adapter: the tensors of its weights file (the Mapping, under the file's names) and
    what they change in its base model, named by the base model's keys.

    ``lora_keys`` get the low-rank update ``delta = (B @ A * scale).reshape(shape)`` (:meth:`factors`,
    :meth:`delta`; :meth:`lora` says shape, rank and scale from the headers); ``full_keys`` are stored
    whole (``modules_to_save`` copies, biases trained with ``bias="all"``/``"lora_only"``, embeddings
    peft saves beside their LoRA): the fine-tuned value there is the stored tensor, plus the LoRA update
    when the key is in both. Every other key of the base is unchanged. The base is not part of the
    adapter: pass it to :class:`~weightlens.TaskVectors` (or ``base=None`` there to use
    :attr:`base_path`).

    Attributes
    ----------
    config : dict, the adapter's ``adapter_config.json``.
    folder : Path, the adapter folder.
    base_model_name_or_path : str or None, the base the adapter was trained on, as the config names it.
    lora_keys : tuple of str, base model keys with a low-rank update (peft's ``base_model.model.`` and
        ``.lora_A.weight`` parts removed, e.g. ``'model.layers.0.self_attn.q_proj.weight'``).
    full_keys : dict, ``{base model key: file key}`` of the full tensors the adapter stores.
    """

    def __init__(self, inner: Checkpoint, *, folder: Path, config: dict[str, Any]) -> None:
        super().__init__(inner._infos, inner._reader, name=inner.name, source=inner.source, hf_dir=inner.hf_dir,
                         metadata=inner.metadata)
        where = str(folder)
        _adapter.check_config(config, where)
        layout = _adapter.layout_of(config, {k: i.shape for k, i in inner._infos.items()}, where)
        self.config = config
        self.folder = folder
        self.base_model_name_or_path: str | None = config.get("base_model_name_or_path") or None
        self._modules = layout.modules
        self.lora_keys = tuple(sorted(layout.modules, key=_natural))
        self.full_keys = dict(sorted(layout.full.items(), key=lambda kv: _natural(kv[0])))

    @property
    def base_path(self) -> Path | None:
        """``base_model_name_or_path`` when it names a local folder (relative to the working directory, as
        peft resolves it), else ``None``; nothing is downloaded."""
        name = self.base_model_name_or_path
        return Path(name).expanduser() if name and Path(name).expanduser().is_dir() else None

    def lora(self, key: str) -> LoraModule:
        """Shape, rank, alpha, scale and file keys of the update of base model key ``key``; reads no tensor."""
        try:
            return self._modules[key]
        except KeyError:
            raise KeyMismatchError(
                f"Adapter {self.name!r} ({self.folder}) has no LoRA update of key {key!r}; its lora_keys are "
                f"{len(self._modules)} base model keys.{_did_you_mean(key, self._modules)}"
            ) from None

    def factors(self, key: str) -> LoraFactors:
        """``(A, B, scale)`` of ``key`` in the base tensor's orientation, upcast to fp32 (fp64 stays)."""
        m = self.lora(key)
        a, b = (_wide(self[k]) for k in (m.a_key, m.b_key))
        return m.orient(a, b)

    def delta(self, key: str) -> torch.Tensor:
        """The update of ``key``, ``(B @ A * scale).reshape(shape)``, fp32 (factors upcast before multiplying)."""
        return self.factors(key).dense().reshape(self.lora(key).shape).to(torch.float32)

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self._modules.values()})
        r = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
        full = f" + {len(self.full_keys)} full tensor(s)" if self.full_keys else ""
        return (f"AdapterCheckpoint({self.name!r}, LoRA {r} on {len(self.lora_keys)} keys{full}, "
                f"base={self.base_model_name_or_path!r}, source={self.source!r})")


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def load(source: Any, *, name: str | None = None) -> Checkpoint:
    """Open ``source`` as a lazy :class:`Checkpoint`; reads headers only.

    Parameters
    ----------
    source : path to a ``.safetensors`` file, a ``*.index.json`` of shards, an HF model folder or a
        ``.bin``/``.pt`` file; a ``Mapping[str, Tensor]``; an ``nn.Module``; a ``Checkpoint``. A PEFT
        LoRA adapter folder (or its ``adapter_model.*`` file) opens as an :class:`AdapterCheckpoint`;
        one whose config asks for what weightlens does not model (DoRA, ``lora_bias``, ...) is refused.
    name : display name; defaults to the file stem or folder name.

    Examples
    --------
    >>> import torch, weightlens as wl
    >>> ckpt = wl.load({"w": torch.zeros(2, 3)})
    >>> ckpt.shape("w"), ckpt.dtype("w")
    ((2, 3), torch.float32)
    """
    if isinstance(source, Checkpoint):
        ckpt = source
    elif isinstance(source, torch.nn.Module):
        ckpt = _from_state_dict(source.state_dict(), type(source).__name__, f"<{type(source).__name__}>")
    elif isinstance(source, Mapping):
        ckpt = _from_state_dict(source, "state_dict", "<state dict>")
    elif isinstance(source, (str, os.PathLike)):
        path = _non_empty(source).expanduser()
        ckpt = _from_path(path)
        ckpt._origin = path
    else:
        raise CheckpointError(
            f"Cannot load a checkpoint from {type(source).__name__}: pass a path (file or HF folder), "
            "a state dict (Mapping[str, Tensor]), an nn.Module or a weightlens Checkpoint."
        )
    return ckpt if name is None or name == ckpt.name else ckpt.renamed(name)


def _reopen(path: str, name: str, hf_dir: Path | None, infos: dict[str, TensorInfo]) -> Checkpoint:
    """A pickled checkpoint opened again from ``path``; its headers must be the ones pickled."""
    ckpt = load(path, name=name)
    if ckpt._infos != infos:
        raise CheckpointError(
            f"{path}: its tensors' names, shapes or dtypes changed since it was opened (in another process); "
            "open it again (wl.load, TaskVectors) and rerun."
        )
    ckpt.hf_dir = hf_dir
    return ckpt


# ------------------------------------------------------------------------------------ in memory
def _from_state_dict(sd: Mapping[str, Any], name: str, source: str, file: str | None = None) -> Checkpoint:
    bad = [(k, type(v).__name__) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({t})" for k, t in bad[:5])
        raise CheckpointError(
            f"{file or source}: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not tensors: {shown}. "
            "Pass the state dict itself (e.g. checkpoint['state_dict'])."
        )
    for key, value in sd.items():
        _check_plain_tensor(file or source, str(key), value)
    tensors = {str(k): v.detach() for k, v in sd.items()}
    infos = {k: TensorInfo(tuple(v.shape), v.dtype, file) for k, v in tensors.items()}
    return Checkpoint(infos, lambda key: tensors[key].cpu(), name=name, source=source)


def _check_plain_tensor(where: str, key: str, t: torch.Tensor) -> None:
    """Refuse tensors whose values cannot be read as a dense real array (meta, sparse, complex)."""
    if t.is_meta:
        why = ("is on the meta device (it has a shape but no values); materialise the model first, "
               "e.g. load its weights or call module.to_empty(device='cpu') and initialise it")
    elif t.layout != torch.strided:
        why = f"is a {t.layout} tensor, not a dense one; pass tensor.to_dense() instead"
    elif t.is_complex():
        why = (f"is complex ({t.dtype}); weightlens merges real tensors only and will not drop the imaginary "
               "part: split it with torch.view_as_real(tensor) or leave the key out")
    else:
        return
    raise CheckpointError(f"{where}: key {key!r} {why}.")


# ------------------------------------------------------------------------------------ paths
def _non_empty(source: str | os.PathLike[str]) -> Path:
    """``source`` as a Path, refusing the empty path (which ``Path`` would read as the current folder)."""
    raw = os.fspath(source)
    if not raw or (isinstance(source, PurePath) and not source.parts):
        raise CheckpointError(
            f"Cannot load {source!r}: the path is empty (Path('') means the current folder, which is "
            "rarely what was meant). Pass the checkpoint's file or folder, e.g. wl.load('./my_model')."
        )
    return Path(os.fsdecode(raw))


def _from_path(path: Path) -> Checkpoint:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or folder.") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}).") from exc
    if stat.S_ISDIR(mode):
        return _from_folder(path)
    return _from_file(path)


def _from_file(path: Path) -> Checkpoint:
    """Open a checkpoint file by its suffix (or its first bytes); only regular files are opened."""
    st.check_regular(path)
    hf_dir = path.parent if (path.parent / "config.json").is_file() else None
    name = _display_name(path)
    lower = path.name.lower()
    if path.name in _adapter.ADAPTER_WEIGHTS and (path.parent / _adapter.ADAPTER_CONFIG).is_file():
        return _from_adapter(path.parent, path)
    if lower.endswith(".safetensors.index.json"):
        return _from_safetensors_index(path, name, hf_dir)
    if lower.endswith(".bin.index.json") or lower.endswith(".pt.index.json"):
        return _from_torch_index(path, name, hf_dir)
    if lower.endswith(".safetensors"):
        return _from_safetensors(path, name, hf_dir)
    if lower.endswith(_TORCH_SUFFIXES):
        return _from_torch_file(path, name, hf_dir)
    return _sniff(path, name, hf_dir)


def _display_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    if stem in _GENERIC_STEMS or stem.startswith(("model-", "pytorch_model-")):
        return path.parent.name or stem
    return stem


def _from_folder(folder: Path) -> Checkpoint:
    hf_dir = folder if (folder / "config.json").is_file() else None
    adapter = _adapter.adapter_weights(folder)
    if adapter is not None:
        both = [c for c in _FOLDER_CANDIDATES if os.path.lexists(folder / c)]
        if both:
            raise CheckpointError(
                f"{folder}: holds both full weights ({both[0]}) and a PEFT adapter ({adapter.name}); pass the "
                "file you mean instead of the folder."
            )
        return _from_adapter(folder, adapter)
    for candidate in _FOLDER_CANDIDATES:
        if os.path.lexists(folder / candidate):  # present but unreadable is an error, not a fallback
            return _renamed(_from_file(folder / candidate), folder.name, hf_dir)
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin", "*.pt", "*.pth"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return _renamed(_from_file(found[0]), folder.name, hf_dir)
        if len(found) > 1:
            raise CheckpointError(
                f"{folder}: {len(found)} {pattern} files and no index to say how they fit together "
                f"({', '.join(p.name for p in found[:4])}, ...). Pass one file, or add an index.json."
            )
    raise CheckpointError(
        f"{folder}: no weights found. Looked for {', '.join(_FOLDER_CANDIDATES)}, or a single "
        "*.safetensors / *.bin / *.pt file."
    )


def _from_adapter(folder: Path, weights: Path) -> AdapterCheckpoint:
    """A PEFT adapter folder: its config, then its weights file (headers only)."""
    config = _adapter.read_config(folder)
    st.check_regular(weights)
    hf_dir = folder if (folder / "config.json").is_file() else None
    name = folder.name or weights.stem
    if weights.name.endswith(".safetensors"):
        inner = _from_safetensors(weights, name, hf_dir)
    else:
        inner = _from_torch_file(weights, name, hf_dir)
    return AdapterCheckpoint(inner, folder=folder, config=config)


def _renamed(ckpt: Checkpoint, name: str, hf_dir: Path | None) -> Checkpoint:
    ckpt = ckpt.renamed(name)
    ckpt.hf_dir = hf_dir
    return ckpt


def _sniff(path: Path, name: str, hf_dir: Path | None) -> Checkpoint:
    with st.open_regular(path) as f:
        head = f.read(64)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch zip archive or a legacy pickle
        return _from_torch_file(path, name, hf_dir)
    if head[8:].lstrip(b" \t\r\n")[:1] == b"{":  # a header length, then JSON (possibly after whitespace)
        return _from_safetensors(path, name, hf_dir)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, *.index.json, .bin, .pt or an HF folder)."
    )


# ------------------------------------------------------------------------------- safetensors
def _from_safetensors(path: Path, name: str, hf_dir: Path | None) -> Checkpoint:
    entries, metadata = st.read_header(path)
    # safetensors stores keys sorted by dtype and size; natural order reads like the model.
    infos = {k: TensorInfo(entries[k].shape, entries[k].dtype, str(path)) for k in sorted(entries, key=_natural)}
    return Checkpoint(
        infos, lambda key: st.read_tensor(path, key, entries[key]),
        name=name, source=str(path), hf_dir=hf_dir, metadata=metadata,
    )


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: non-empty, each key once, shards present and regular."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_pairs_once)
        weight_map = raw["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({exc}); it needs a 'weight_map' object.") from exc
    if not weight_map:
        raise CheckpointError(
            f"{index}: the shard index's weight_map is empty, so it names no tensors; the index is damaged "
            "or was written before the shards: re-export the checkpoint."
        )
    for key, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(
                f"{index}: key {key!r} maps to {file!r}; a shard must be a file name relative to the index's "
                "folder (no absolute path, no '..'). Fix or re-download the index."
            )
    missing = sorted({f for f in weight_map.values() if not os.path.lexists(index.parent / f)})
    if missing:
        raise CheckpointError(f"{index}: shard file(s) missing next to the index: {', '.join(missing)}.")
    for file in dict.fromkeys(weight_map.values()):
        st.check_regular(index.parent / file)
    return weight_map


def _pairs_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice (an index must map each tensor to one shard)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _check_one_home(index: Path, weight_map: dict[str, str], held: Mapping[str, Iterable[str]]) -> None:
    """Refuse a tensor that the index maps to one shard while another listed shard also holds it."""
    for file, keys in held.items():
        for key in keys:
            home = weight_map.get(key, file)
            if home != file:
                raise CheckpointError(
                    f"{index}: key {key!r} is mapped to {index.parent / home} but {index.parent / file} also "
                    "holds it, so the checkpoint is ambiguous; remove the stale shard or re-export the checkpoint."
                )


def _from_safetensors_index(index: Path, name: str, hf_dir: Path | None) -> Checkpoint:
    weight_map = _read_index(index)
    headers = {f: st.read_header(index.parent / f) for f in dict.fromkeys(weight_map.values())}
    _check_one_home(index, weight_map, {f: entries for f, (entries, _) in headers.items()})
    infos: dict[str, TensorInfo] = {}
    for key in sorted(weight_map, key=_natural):
        file = weight_map[key]
        entries = headers[file][0]
        if key not in entries:
            raise CheckpointError(
                f"{index}: maps key {key!r} to {file}, but {index.parent / file} has no such tensor."
            )
        e = entries[key]
        infos[key] = TensorInfo(e.shape, e.dtype, str(index.parent / file))

    def read(key: str) -> torch.Tensor:
        file = weight_map[key]
        return st.read_tensor(index.parent / file, key, headers[file][0][key])

    metadata = next((m for _, m in headers.values() if m), {})
    return Checkpoint(infos, read, name=name, source=str(index), hf_dir=hf_dir, metadata=metadata)


# ------------------------------------------------------------------------------ torch pickles
def _torch_load(path: Path) -> Mapping[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped when the file allows; never unpickles code."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors and plain containers, "
            "and weightlens loads pickles only with torch.load(weights_only=True). If you trust the file, "
            "load it yourself and pass the state dict. Details: " + str(exc).splitlines()[0]
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: torch.load failed: the file is corrupt or truncated ({exc}).") from exc
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    if isinstance(obj, torch.nn.Module):  # unreachable with weights_only, kept for clarity
        return obj.state_dict()
    what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path}: holds {what}, not a state dict (a mapping of names to tensors, possibly under "
        f"one of {', '.join(map(repr, _NESTED_KEYS))})."
    )


def _from_torch_file(path: Path, name: str, hf_dir: Path | None) -> Checkpoint:
    ckpt = _from_state_dict(_torch_load(path), name, str(path), file=str(path))
    ckpt.hf_dir = hf_dir
    return ckpt


def _from_torch_index(index: Path, name: str, hf_dir: Path | None) -> Checkpoint:
    weight_map = _read_index(index)
    shards = {f: _torch_load(index.parent / f) for f in dict.fromkeys(weight_map.values())}  # mmap'd
    _check_one_home(index, weight_map, shards)
    infos: dict[str, TensorInfo] = {}
    for key, file in weight_map.items():
        t = shards[file].get(key)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{index}: maps key {key!r} to {file}, but that shard has no such tensor.")
        _check_plain_tensor(str(index.parent / file), key, t)
        infos[key] = TensorInfo(tuple(t.shape), t.dtype, str(index.parent / file))
    return Checkpoint(
        infos, lambda key: shards[weight_map[key]][key].detach().clone(),
        name=name, source=str(index), hf_dir=hf_dir,
    )


def _natural(key: str) -> list[tuple[int, int | str]]:
    """Sort key that orders ``layer.10`` after ``layer.9``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
