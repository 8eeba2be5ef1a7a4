"""Parse a safetensors JSON header by the rules of the reference ``safetensors`` library.

``safetensors`` (Rust) reads the header with ``serde_json`` into a fixed schema; a file it rejects
must not be read here either, or two tools would see different weights in one file. The rules,
taken from ``safetensors/src/tensor.rs`` (``HashMetadata``, ``TensorInfo``, ``Dtype``) and
``serde_json``, and checked against ``safe_open``:

* strict JSON: no NaN/Infinity, no number outside the float64 range, no lone UTF-16 surrogate
  escape, at most 127 nested arrays/objects, only space, tab, CR and LF as padding;
* the top level is an object; ``__metadata__`` is ``null`` or an object of strings, given once;
* every other key is a tensor: an object with ``dtype``, ``shape`` and ``data_offsets`` (each
  once; other fields are ignored) or the list ``[dtype, shape, data_offsets]``; ``dtype`` is a
  safetensors code (or ``{"CODE": null}``), ``shape`` a list and ``data_offsets`` a pair of
  integers in ``[0, 2**64)`` written without a fraction, exponent or minus sign.

One rule is stricter than ``safetensors``: a tensor name or metadata key given twice is refused
(``safetensors`` keeps the last), since two parsers could then read different tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightlens.errors import CheckpointError

__all__ = ["BITS", "Spec", "parse_header"]

#: Every safetensors dtype code and its size in bits (``Dtype::bitsize``).
BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_U64 = 2**64
_MAX_DEPTH = 127  # serde_json's recursion limit, as safetensors sees it
_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Spec:
    """One tensor's header entry, checked for form but not yet against the file."""

    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _Rejected(ValueError):
    """JSON that ``serde_json`` refuses although Python's ``json`` would read it."""


class _Obj(dict):
    """A JSON object that remembers the keys it was given more than once."""

    dups: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _Obj:
        """Build from the decoder's key/value pairs (last value wins, duplicates noted)."""
        obj = cls(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            dups: dict[str, None] = {}
            for key, _ in pairs:
                if key in seen:
                    dups[key] = None
                seen.add(key)
            obj.dups = tuple(dups)
        return obj


def _int(text: str) -> int | float:
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float
    if len(text) > 25:  # beyond 64 bits: serde_json falls back to a float
        return _float(text)
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Rejected(f"number {text[:30]}... is out of range")
    return value


def _constant(text: str) -> None:
    raise _Rejected(f"{text} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_Obj.from_pairs, parse_int=_int, parse_float=_float,
                            parse_constant=_constant)


def _decode(path: Path, raw: bytes) -> Any:
    """Decode ``raw`` as strict JSON (serde_json's rules) or raise a CheckpointError."""
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        value, why = None, f"nested deeper than {_MAX_DEPTH} levels"
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and _Rejected are ValueErrors
        value, why = None, str(exc)
    else:
        why = _check_tree(value, check_text=b"\\u" in raw)
    if why:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({why}); the file is corrupt or was not "
            "written by a safetensors writer: re-download or re-export it."
        )
    return value


def _check_tree(value: Any, *, check_text: bool) -> str | None:
    """Why ``value`` breaks serde_json's depth or surrogate rules, or ``None``."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if check_text and _SURROGATE.search(node):
                return "a lone UTF-16 surrogate escape in a string"
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > _MAX_DEPTH:
            return f"nested deeper than {_MAX_DEPTH} levels"
        items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        stack.extend((item, depth + 1) for item in items)
    return None


def parse_header(path: Path, raw: bytes) -> tuple[dict[str, Spec], dict[str, str]]:
    """Parse the JSON header ``raw`` of ``path``: ``({key: Spec}, metadata)``."""
    header = _decode(path, raw)
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is {_show(header, 30)}, not a JSON object; the file is corrupt or "
            "not safetensors: re-download or re-export it."
        )
    if header.dups:
        raise CheckpointError(
            f"{path}: the header names key {header.dups[0]!r} more than once, so readers may disagree on "
            "which tensor it is; refusing the file. Re-export it with one entry per key."
        )
    metadata = _metadata(path, header.pop("__metadata__", None))
    return {key: _spec(path, key, value) for key, value in header.items()}, metadata


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        bad = f"is {_show(value)}, not an object"
    elif value.dups:
        bad = f"names {value.dups[0]!r} twice"
    else:
        bad = next((f"value of {k!r} is {_show(v)}, not a string" for k, v in value.items()
                    if not isinstance(v, str)), "")
    if bad:
        raise CheckpointError(
            f"{path}: the header's __metadata__ {bad}; safetensors allows only an object of strings "
            "(each key once). The file is corrupt: re-export it."
        )
    return dict(value)


def _spec(path: Path, key: str, value: Any) -> Spec:
    """Check one tensor entry's form: fields present once, dtype known, integers in range."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: key {key!r}: {what}; expected {{\"dtype\": CODE, \"shape\": [int, ...], "
            f"\"data_offsets\": [begin, end]}} with integers in [0, 2**64). The file is corrupt: re-export it."
        )

    if isinstance(value, list) and len(value) == 3:
        fields = value
    elif isinstance(value, dict):
        dup = next((f for f in value.dups if f in _FIELDS), None)
        missing = next((f for f in _FIELDS if f not in value), None)
        if dup or missing:
            raise bad(f"field {dup!r} is given twice" if dup else f"field {missing!r} is missing")
        fields = [value[f] for f in _FIELDS]
    else:
        raise bad(f"the header entry is {_show(value)}, not an object")
    code, shape, offsets = fields
    if isinstance(code, dict) and len(code) == 1 and not code.dups and None in code.values():
        code = next(iter(code))
    if not isinstance(code, str) or code not in BITS:
        raise bad(f"dtype {_show(code)} is not a safetensors dtype ({', '.join(BITS)})")
    if not isinstance(shape, list):
        raise bad(f"shape {_show(shape)} is not a list")
    odd = [d for d in shape if not _is_u64(d)]
    if odd:
        why = "negative" if type(odd[0]) is int and odd[0] < 0 else "not an integer below 2**64"
        raise bad(f"shape {_show(shape)} has dimension {_show(odd[0])}, which is {why}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise bad(f"data_offsets {_show(offsets)} is not a pair of non-negative integers")
    return Spec(code, tuple(shape), offsets[0], offsets[1])


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value < _U64


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
