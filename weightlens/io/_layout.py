"""What an export folder holds and how its options are spelled: file names, dtype and size parsing,
and the record of the written weights. A leaf of ``weightlens.io``: the writer, the model card and
the recipe all read it, and it reads none of them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightlens.errors import InvalidParameterError

__all__ = ["CARD", "FIGURE", "INDEX", "MERGEKIT", "RECIPE", "ExportLayout", "WrittenWeights", "dtype_name",
           "parse_dtype", "parse_size"]

CARD, RECIPE, MERGEKIT, FIGURE, INDEX = (
    "README.md", "weightlens_recipe.yaml", "mergekit_config.yml", "update_norms.svg", "model.safetensors.index.json")
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64,
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ---------------------------------------------------------------------------------------- options
def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"5GB"`` (10**9, as HF) / ``"500MiB"`` (2**20) / ``"1000"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise InvalidParameterError(
                f"The 'shard_size' parameter must be an int (bytes) or a string like '5GB', '500MB' or "
                f"'2GiB'. Got {size!r} instead."
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value < 1:
        raise InvalidParameterError(f"The 'shard_size' parameter must be at least 1 byte. Got {size!r} instead.")
    return value


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.dtype`` of ``dtype`` (``None``, a float ``torch.dtype`` or a name such as ``"bf16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise InvalidParameterError(
        f"The 'dtype' parameter must be None, a floating torch.dtype or one of "
        f"{', '.join(sorted(set(_DTYPE_NAMES)))}. Got {dtype!r} instead."
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class WrittenWeights:
    """What was written: ``{file: sha256}``, ``{key: file}``, bytes, and how far each key moved."""

    files: dict[str, str] = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0
    n_tensors: int = 0
    moved: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (|w - w0|^2, |w0|^2)


@dataclass(frozen=True)
class ExportLayout:
    """How the export of a merge lays out its model folder beyond the merged keys, as plain data (built by
    ``MergeResult.export_layout()``: io knows no task vectors). The default lays out the base's model.

    Attributes
    ----------
    head : the fine-tune whose head is carried (its key names, extra tensors and ``config.json``); None: none.
    rename : ``{merged key: key written}`` (the head's names for the base's keys).
    dropped : merged keys not written (the head's model has no such key).
    extras : ``{key: (shape, dtype)}`` of the head's extra tensors, written after the merged keys.
    read_extra : reads one of ``extras`` (a tensor).
    config_dir : folder whose ``config.json`` is written instead of the ``like`` folder's (the head's).
    config : ``config.json`` fields set over the one written (``vocab_size`` of a resized vocabulary).
    tokenizer_dir : folder whose tokenizer files are copied instead of the default ``like`` folder's
        (``vocab="base"``: the base's, whatever the head).
    write_tokenizer : writes the union tokenizer into a folder (``vocab="union"`` with added tokens),
        called as ``write_tokenizer(folder, base_tokenizer=folder or None)``; it replaces the ``like``
        folder's tokenizer files.
    union_from : the base tokenizer folder ``write_tokenizer`` extends (None: the ``like`` folder must have one).
    heads : ``{task: [keys only that fine-tune has]}``, for the card.
    hub_ids : ``{"base" or task: Hugging Face Hub id}`` of the inputs whose id is known, for the card.
    notes : sentences for the card.
    """

    head: str | None = None
    rename: Mapping[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    extras: Mapping[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    read_extra: Callable[[str], torch.Tensor] | None = None
    config_dir: Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    write_tokenizer: Callable[..., Any] | None = None
    union_from: Path | None = None
    heads: Mapping[str, list[str]] = field(default_factory=dict)
    hub_ids: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
