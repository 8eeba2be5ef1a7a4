"""Parse a safetensors JSON header by the rules of the reference ``safetensors`` library.

``safetensors`` (Rust) reads the header with ``serde_json`` into a fixed schema; a file it rejects
must not be read here either, or two tools would see different weights in one file. The rules,
taken from ``safetensors/src/tensor.rs`` (``HashMetadata``, ``TensorInfo``, ``Dtype``; v0.8) and
``serde_json``, and checked against ``safe_open`` of safetensors 0.8.0
(``tests/test_safetensors_differential.py`` keeps them in step):

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


class _Pairs(list):
    """A decoded JSON object: its ``(key, value)`` pairs in order, repeated keys kept."""


def _as_dict(pairs: _Pairs) -> tuple[dict[str, Any], list[str]]:
    """``(dict of pairs (last wins), keys given more than once)``."""
    out = dict(pairs)
    if len(out) == len(pairs):
        return out, []
    seen: set[str] = set()
    dups: dict[str, None] = {}
    for key, _ in pairs:
        if key in seen:
            dups[key] = None
        seen.add(key)
    return out, list(dups)


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


_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs, parse_int=_int, parse_float=_float,
                            parse_constant=_constant)


def _decode(path: Path, raw: bytes) -> Any:
    """Decode ``raw`` as strict JSON (serde_json's rules) or raise a CheckpointError."""
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        value, why = None, f"nested deeper than {_MAX_DEPTH} levels"
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and _Rejected are ValueErrors
        value, why = None, str(exc)
    else:  # a lone surrogate can only come from a \u escape
        why = "a lone UTF-16 surrogate escape in a string" if b"\\u" in raw and _has_surrogate(value) else ""
    if why:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({why}); the file is corrupt or was not "
            "written by a safetensors writer: re-download or re-export it."
        )
    return value


def _has_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in the decoded ``value`` holds a lone surrogate."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return True
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, tuple):  # a (key, value) pair of a _Pairs
            stack.extend(node)
    return False


def _too_deep(value: Any, depth: int) -> bool:
    """Whether ``value``, a container at nesting ``depth``, nests past serde_json's limit."""
    stack = [(value, depth)]
    while stack:
        node, level = stack.pop()
        if level > _MAX_DEPTH:
            return True
        items = (v for _, v in node) if isinstance(node, _Pairs) else node
        stack.extend((v, level + 1) for v in items if isinstance(v, list))
    return False


def parse_header(path: Path, raw: bytes) -> tuple[dict[str, Spec], dict[str, str]]:
    """Parse the JSON header ``raw`` of ``path``: ``({key: Spec}, metadata)``."""
    header = _decode(path, raw)
    if not isinstance(header, _Pairs):
        raise CheckpointError(
            f"{path}: the safetensors header is {_show(header, 30)}, not a JSON object; the file is corrupt or "
            "not safetensors: re-download or re-export it."
        )
    top, dups = _as_dict(header)
    if dups:
        raise CheckpointError(
            f"{path}: the header names key {dups[0]!r} more than once, so readers may disagree on "
            "which tensor it is; refusing the file. Re-export it with one entry per key."
        )
    metadata = _metadata(path, top.pop("__metadata__", None))
    return {key: _spec(path, key, value) for key, value in top.items()}, metadata


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    bad, out = "", {}
    if not isinstance(value, _Pairs):
        bad = f"is {_show(value)}, not an object"
    else:
        out, dups = _as_dict(value)
        bad = next((f"value of {k!r} is {_show(v)}, not a string" for k, v in value if not isinstance(v, str)),
                   f"names {dups[0]!r} twice" if dups else "")
    if bad:
        raise CheckpointError(
            f"{path}: the header's __metadata__ {bad}; safetensors allows only an object of strings "
            "(each key once). The file is corrupt: re-export it."
        )
    return out


def _fields(value: Any) -> list[Any] | str:
    """``[dtype, shape, data_offsets]`` of a tensor entry, or why the entry's form is wrong."""
    if isinstance(value, _Pairs):
        info, dups = _as_dict(value)
        dup = next((f for f in dups if f in _FIELDS), None)
        missing = next((f for f in _FIELDS if f not in info), None)
        if dup or missing:
            return f"field {dup!r} is given twice" if dup else f"field {missing!r} is missing"
        if any(_too_deep(v, 3) for k, v in value if k not in _FIELDS and isinstance(v, list)):
            return f"an unknown field nests deeper than {_MAX_DEPTH} levels"
        return [info[f] for f in _FIELDS]
    if isinstance(value, list) and len(value) == 3:
        return value
    return f"the header entry is {_show(value)}, not an object"


def _spec(path: Path, key: str, value: Any) -> Spec:
    """Check one tensor entry's form: fields present once, dtype known, integers in range."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: key {key!r}: {what}; expected {{\"dtype\": CODE, \"shape\": [int, ...], "
            f"\"data_offsets\": [begin, end]}} with integers in [0, 2**64). The file is corrupt: re-export it."
        )

    fields = _fields(value)
    if isinstance(fields, str):
        raise bad(fields)
    code, shape, offsets = fields
    if isinstance(code, _Pairs) and len(code) == 1 and code[0][1] is None:
        code = code[0][0]
    if not isinstance(code, str) or code not in BITS:
        raise bad(f"dtype {_show(code)} is not a safetensors dtype ({', '.join(BITS)})")
    if not isinstance(shape, list) or isinstance(shape, _Pairs):
        raise bad(f"shape {_show(shape)} is not a list")
    odd = [d for d in shape if not _is_u64(d)]
    if odd:
        why = "negative" if type(odd[0]) is int and odd[0] < 0 else "not an integer below 2**64"
        raise bad(f"shape {_show(shape)} has dimension {_show(odd[0])}, which is {why}")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise bad(f"data_offsets {_show(offsets)} is not a pair of non-negative integers")
    return Spec(code, tuple(shape), offsets[0], offsets[1])


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value < _U64


def _show(value: Any, limit: int = 60) -> str:
    """Short JSON text of a decoded value, for messages."""
    text = json.dumps(_plain(value), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` with objects as dicts, cut off a few levels down."""
    if not isinstance(value, list):
        return value
    if depth > 3:
        return "..."
    if isinstance(value, _Pairs):
        return {str(k): _plain(v, depth + 1) for k, v in value}
    return [_plain(v, depth + 1) for v in value]
