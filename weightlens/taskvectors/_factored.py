"""Task vectors of PEFT LoRA adapters: factored deltas, exactly zero where an adapter changes nothing.

A task given as an adapter (:class:`weightlens.io.sources.AdapterCheckpoint`) is aligned to the base
by its base model keys (``lora_keys`` and ``full_keys``), with the same key maps and prefixes as a
full fine-tune, and may lack base keys: its delta there is exactly zero. Its delta of a LoRA key is
``(B @ A * scale).reshape(shape)`` in fp32 (factors upcast before multiplying); of a full key, the
stored tensor minus the base; of a key in both (an embedding peft saves beside its LoRA), their sum.
:func:`factors` hands the low-rank form out unmaterialised: rank-0 factors where the adapter leaves a
key unchanged, ``None`` where a full tensor takes part (that delta is not low-rank by construction),
except a stored tensor equal to the base's (peft saves a targeted embedding or LM head beside its
LoRA; it equals the base unless the vocabulary was resized), which adds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from weightlens._finite import count_nonfinite
from weightlens.errors import CheckpointError, DTypeError, InvalidParameterError, KeyMismatchError, NonFiniteError
from weightlens.errors import ShapeMismatchError
from weightlens.io import Checkpoint
from weightlens.io.sources import AdapterCheckpoint, LoraFactors
from weightlens.taskvectors import _keys
from weightlens.taskvectors._keys import listing, where

__all__ = ["align", "base_of", "delta", "factors", "validate"]


def base_of(finetuned: Mapping[str, Checkpoint]) -> Path:
    """The local folder the adapters' configs name as their base (``base=None``); one for all of them."""
    adapters = {n: c for n, c in finetuned.items() if isinstance(c, AdapterCheckpoint)}
    if not adapters:
        raise InvalidParameterError(
            "TaskVectors got base=None, which takes the base from PEFT adapters' base_model_name_or_path, but "
            f"none of the fine-tunes {list(finetuned)} is an adapter; pass base= (a path, state dict or model)."
        )
    paths: dict[str, Path] = {}
    for name, adapter in adapters.items():
        path = adapter.base_path
        if path is None:
            raise CheckpointError(
                f"TaskVectors got base=None, and adapter {name!r} ({adapter.folder}) names its base "
                f"{adapter.base_model_name_or_path!r}, which is not a local folder (weightlens never downloads); "
                "pass base= the base model's folder or file."
            )
        paths[name] = path.resolve()
    if len(set(paths.values())) > 1:
        shown = ", ".join(f"{n!r}: {str(p)!r}" for n, p in paths.items())
        raise InvalidParameterError(
            f"TaskVectors got base=None, but the adapters name different bases ({shown}); pass base= the one "
            "their task vectors should share."
        )
    return next(iter(paths.values()))


def align(base: Checkpoint, adapter: AdapterCheckpoint, wanted: Sequence[str], key_map: _keys.KeyMap | None,
          include: list[str] | None, exclude: list[str] | None) -> _keys.Alignment:
    """The adapter's base model keys matched to the base's; ``own`` holds every matched key."""
    own = list(dict.fromkeys([*adapter.lora_keys, *adapter.full_keys]))
    a = _keys.align(base, adapter, wanted, key_map, include, exclude, own=own, partial=True)
    lora = set(adapter.lora_keys)
    stray = [k for k in a.extras if k in lora]
    if stray:
        raise KeyMismatchError(
            f"Adapter {where(adapter)} changes {len(stray)} key(s) that base {where(base)} lacks: "
            f"{listing(stray)}. Pass the base it was trained on (its config names "
            f"{adapter.base_model_name_or_path!r}), or map its keys to the base's with key_map=..."
        )
    return a


def validate(base: Checkpoint, adapter: AdapterCheckpoint, matched: Mapping[str, str]) -> None:
    """Every matched update has the base tensor's shape, and floating-point values."""
    lora = set(adapter.lora_keys)
    for key, own in matched.items():
        b = base.info(key)
        stored = []
        if own in lora:
            m = adapter.lora(own)
            stored += [(f"its LoRA update of {own!r}", m.shape, adapter.dtype(m.a_key), m.layout)]
        if own in adapter.full_keys:
            file_key = adapter.full_keys[own]
            stored += [(f"its stored tensor {file_key!r}", adapter.shape(file_key), adapter.dtype(file_key), None)]
        for what, shape, dtype, layout in stored:
            if shape != b.shape:
                raise ShapeMismatchError(
                    f"Shape mismatch for key {key!r}: base {where(base)} has {b.shape}, adapter {where(adapter)} "
                    f"{what} has {shape}{_why(shape, b.shape, layout, adapter)}. Pass the base the adapter was "
                    f"trained on (its config names {adapter.base_model_name_or_path!r})."
                )
            if not dtype.is_floating_point:
                raise DTypeError(
                    f"Dtype mismatch for key {key!r}: adapter {where(adapter)} {what} has {dtype}; a task vector "
                    "needs floating-point tensors."
                )


def _why(got: tuple[int, ...], want: tuple[int, ...], layout: str | None, adapter: AdapterCheckpoint) -> str:
    if layout in ("linear", "fan_in_fan_out") and got[::-1] == want:
        return (f" (its transpose: the config's fan_in_fan_out={bool(adapter.config.get('fan_in_fan_out'))} does "
                "not fit this base layer)")
    if len(got) == len(want) and got[1:] == want[1:]:
        return (" (other vocabulary rows: an adapter trained on resized embeddings is read after peft's "
                "merge_and_unload(), as a full fine-tune with vocab=...)")
    return ""


# ---------------------------------------------------------------------------------------- data
def checked_factors(adapter: AdapterCheckpoint, own: str) -> LoraFactors:
    """``adapter.factors(own)``, refusing NaN or Inf (factors are small: scanned on every read)."""
    f = adapter.factors(own)
    bad = count_nonfinite(f.A) + count_nonfinite(f.B)
    if bad or not math.isfinite(f.scale):
        m = adapter.lora(own)
        raise NonFiniteError(
            f"{where(adapter)} key {own!r}: {bad} values of its LoRA factors ({m.a_key}, {m.b_key}) are NaN or Inf "
            f"(scale {f.scale}). Fix or drop that adapter (or exclude the key with exclude=...)."
        )
    return f


def delta(adapter: AdapterCheckpoint, own: str | None, shape: tuple[int, ...], base: Callable[[], torch.Tensor],
          upcast: Callable[[Checkpoint, str], torch.Tensor]) -> torch.Tensor:
    """fp32 delta of one key: zero, ``stored - base()``, the LoRA update, or the sum of the last two.

    ``shape`` is the task vectors' shape of the key; rows past the adapter's (``vocab="union"``) are zero.
    ``base()`` reads the upcast base on the base's own rows; ``upcast`` reads and checks a stored tensor.
    """
    if own is None:
        return torch.zeros(shape, dtype=torch.float32)
    out = None
    if own in adapter.full_keys:
        out = upcast(adapter, adapter.full_keys[own]) - base()
    if own in adapter.lora_keys:
        update = checked_factors(adapter, own).dense().reshape(adapter.lora(own).shape)
        out = update if out is None else out + update
    out = out.to(torch.float32)
    if tuple(out.shape) != tuple(shape):  # added vocabulary rows: unchanged by the adapter
        out = torch.cat([out, out.new_zeros((shape[0] - out.shape[0], *out.shape[1:]))])
    return out


def factors(adapter: AdapterCheckpoint, own: str | None, shape: tuple[int, ...],
            stored_is_base: Callable[[], bool]) -> LoraFactors | None:
    """The key's delta as ``(A, B, scale)`` on the task vectors' rows; rank 0 where the adapter leaves the
    key unchanged. ``None`` for 0/1-D keys and where a stored full tensor takes part, unless the key also
    has a LoRA update and ``stored_is_base()`` (the stored tensor equals the base's: then it adds nothing)."""
    if len(shape) < 2:
        return None
    if own is not None and own in adapter.full_keys and not (own in adapter.lora_keys and stored_is_base()):
        return None
    m, n = shape[0], math.prod(shape[1:])
    if own is None:
        return LoraFactors(torch.zeros((0, n)), torch.zeros((m, 0)), 1.0)
    f = checked_factors(adapter, own)
    if f.B.shape[0] < m:  # added vocabulary rows: zero rows of B
        f = f._replace(B=torch.cat([f.B, f.B.new_zeros((m - f.B.shape[0], f.B.shape[1]))]))
    return f
