"""weightlens' safetensors reader against the reference library, file by file.

On a corpus of hand-made files (valid ones of many dtypes and shapes, and one of each known kind
of damage) and on a few thousand seeded random mutations of valid files, ``wl.load`` (then reading
every key) and ``safetensors.safe_open(framework="pt")`` (then ``get_tensor`` of every key) must
accept and reject the same files, and where both accept return the same keys, dtypes, shapes,
bytes and metadata. weightlens rejects only with its own errors, in one line that starts with the
file's path. The allowed differences are deliberate and narrow (see ``_allowed``): weightlens
refuses duplicate keys (``safetensors`` keeps the last one) and complex (C64) or packed float4
(F4) tensors with a DTypeError."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

import weightlens as wl

CODES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
         "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
MUTATIONS = 4000
SEED = 20261206


# ---------------------------------------------------------------------------------- file builders
def raw_file(header: str | bytes, data: bytes = b"", pad: bytes = b"") -> bytes:
    """A safetensors file from a literal header text (padded with ``pad``) and data bytes."""
    raw = (header.encode() if isinstance(header, str) else header) + pad
    return struct.pack("<Q", len(raw)) + raw + data


def header_file(header: dict, data: bytes, pad: bytes = b"") -> bytes:
    """A safetensors file from a header dict (serialised compactly) and data bytes."""
    return raw_file(json.dumps(header, separators=(",", ":")), data, pad)


def split(blob: bytes) -> tuple[bytes, bytes]:
    """``(header text, data)`` of a well-formed file."""
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8:8 + n], blob[8 + n:]


def _valid_files() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    mixed = {
        "embed.weight": torch.randn(5, 3, generator=g),
        "layer.0.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(4, generator=g).to(torch.float16),
        "count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }
    ints = {"i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(6, dtype=torch.uint8),
            "i16": torch.arange(4, dtype=torch.int16).reshape(2, 2), "i32": torch.arange(3, dtype=torch.int32),
            "u16": torch.tensor([1, 65535]).to(torch.uint16), "u32": torch.tensor([2, 7]).to(torch.uint32),
            "u64": torch.tensor([3, 9]).to(torch.uint64), "f64": torch.randn(2, 1, 2, generator=g).double()}
    fp8 = {"e4m3": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
           "e5m2": torch.randn(2, 2, generator=g).to(torch.float8_e5m2)}
    files = {
        "mixed": save_bytes(mixed),
        "mixed+metadata": save_bytes(mixed, metadata={"format": "pt", "note": "ünïcode"}),
        "ints": save_bytes(ints),
        "fp8": save_bytes(fp8),
        "scalar": save_bytes({"s": torch.tensor(2.5)}),
        "only-empty": save_bytes({"e": torch.zeros(0), "f": torch.zeros(2, 0, 3, dtype=torch.int32)}),
        "no-tensors": raw_file("{}"),
    }
    head, data = split(files["mixed"])
    files["space-padded"] = raw_file(head.rstrip(b" "), data, pad=b" " * 13)  # as weightlens' export pads
    files["whitespace-padded"] = raw_file(b"\n\t " + head.rstrip(b" "), data, pad=b"\r\n")
    return files


VALID = _valid_files()
F32_1 = b"\x00\x00\x80\x3f"


def _entry(dtype: str = "F32", shape: str = "[1]", offsets: str = "[0,4]", extra: str = "") -> str:
    return f'{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}{extra}}}'


def _one(key: str = '"a"', **kw: str) -> str:
    return "{" + f"{key}:{_entry(**kw)}" + "}"


def _json_cases() -> dict[str, bytes]:
    """One file per JSON rule: each is accepted or rejected by both readers (or an allowed difference)."""
    return {
        "info-as-list": raw_file('{"a":["F32",[1],[0,4]]}', F32_1),
        "dtype-as-map": raw_file(_one(dtype='{"F32":null}'), F32_1),
        "dtype-map-two-keys": raw_file(_one(dtype='{"F32":null,"F16":null}'), F32_1),
        "unknown-field": raw_file(_one(extra=',"z":[1,{"q":null}]'), F32_1),
        "unknown-field-depth-127": raw_file(_one(extra=',"z":' + "[" * 125 + "]" * 125), F32_1),
        "unknown-field-depth-128": raw_file(_one(extra=',"z":' + "[" * 126 + "]" * 126), F32_1),
        "unknown-field-deep-then-repeated": raw_file(_one(extra=',"z":' + "[" * 126 + "]" * 126 + ',"z":1'), F32_1),
        "unknown-field-repeated": raw_file(_one(extra=',"z":1,"z":2'), F32_1),
        "deep-shape": raw_file(_one(shape="[" * 130 + "]" * 130), F32_1),
        "deep-dtype": raw_file(_one(dtype='{"F32":' + "[" * 130 + "]" * 130 + "}"), F32_1),
        "very-deep": raw_file(_one(extra=',"z":' + "[" * 5000 + "]" * 5000), F32_1),
        "unknown-field-nan": raw_file(_one(extra=',"z":NaN'), F32_1),
        "unknown-field-1e400": raw_file(_one(extra=',"z":1e400'), F32_1),
        "unknown-field-bigint": raw_file(_one(extra=',"z":' + "9" * 400), F32_1),
        "unknown-field-minus-zero": raw_file(_one(extra=',"z":-0'), F32_1),
        "unknown-field-lone-surrogate": raw_file(_one(extra=',"z":"\\udc00"'), F32_1),
        "key-surrogate-pair": raw_file(_one(key='"\\ud83d\\ude00"'), F32_1),
        "key-lone-surrogate": raw_file(_one(key='"\\ud800"'), F32_1),
        "key-control-char": raw_file(_one(key='"a\x01"'), F32_1),
        "key-empty": raw_file(_one(key='""'), F32_1),
        "dup-key": raw_file('{"a":%s,"a":%s}' % (_entry(), _entry(dtype='"I32"')), F32_1),
        "dup-key-escaped": raw_file('{"ab":%s,"a\\u0062":%s}' % (_entry(), _entry()), F32_1),
        "dup-metadata": raw_file('{"__metadata__":{},"__metadata__":{},"a":%s}' % _entry(), F32_1),
        "dup-metadata-key": raw_file('{"__metadata__":{"x":"1","x":"2"}}'),
        "dup-field": raw_file(_one(extra=',"dtype":"F32"'), F32_1),
        "metadata-null": raw_file('{"__metadata__":null}'),
        "metadata-list": raw_file('{"__metadata__":["x"]}'),
        "metadata-int-value": raw_file('{"__metadata__":{"x":1}}'),
        "metadata-null-value": raw_file('{"__metadata__":{"x":null}}'),
        "metadata-escaped-name": raw_file('{"\\u005f_metadata__":{"x":"y"}}'),
        "shape-float": raw_file(_one(shape="[1.0]"), F32_1),
        "shape-exponent": raw_file(_one(shape="[1e0]"), F32_1),
        "shape-negative": raw_file(_one(shape="[-1]"), F32_1),
        "shape-minus-zero": raw_file(_one(shape="[-0]", offsets="[0,0]")),
        "shape-string": raw_file(_one(shape='["1"]'), F32_1),
        "shape-bool": raw_file(_one(shape="[true]"), F32_1),
        "shape-2**64": raw_file(_one(shape=f"[{2**64},0]", offsets="[0,0]")),
        "shape-2**63": raw_file(_one(shape=f"[0,{2**63}]", offsets="[0,0]")),
        "shape-2**63-1": raw_file(_one(shape=f"[0,{2**63 - 1}]", offsets="[0,0]")),
        "shape-overflow": raw_file(_one(shape=f"[{2**32},{2**32},0]", offsets="[0,0]")),
        "shape-zero-first": raw_file(_one(shape=f"[0,{2**32},{2**32}]", offsets="[0,0]")),
    }


def _layout_cases() -> dict[str, bytes]:
    """One file per byte-layout rule (offsets, lengths, padding) and per dtype."""
    cases = {
        "offsets-three": raw_file(_one(offsets="[0,4,4]"), F32_1),
        "offsets-float": raw_file(_one(offsets="[0,4.0]"), F32_1),
        "offsets-reversed": raw_file(_one(shape="[0]", offsets="[4,0]"), F32_1),
        "offsets-too-short": raw_file(_one(shape="[2,2]", offsets="[0,12]"), bytes(12)),
        "gap": raw_file(_one(offsets="[4,8]"), F32_1 * 2),
        "overlap": raw_file('{"a":%s,"b":%s}' % (_entry(), _entry()), F32_1),
        "empty-tensors-share-offset": raw_file('{"a":%s,"b":%s}' % (_entry(shape="[0]", offsets="[0,0]"),
                                                                    _entry(shape="[0]", offsets="[0,0]"))),
        "empty-tensor-past-end": raw_file('{"a":%s,"b":%s}' % (_entry(), _entry(shape="[0]", offsets="[8,8]")),
                                          F32_1),
        "trailing-bytes": raw_file(_one(), F32_1 + b"x"),
        "truncated-data": raw_file(_one(shape="[2]", offsets="[0,8]"), F32_1),
        "pad-nul": raw_file(_one(), F32_1, pad=b"\x00"),
        "pad-formfeed": raw_file(_one(), F32_1, pad=b"\x0c"),
        "bom": raw_file(b"\xef\xbb\xbf" + _one().encode(), F32_1),
        "invalid-utf8": raw_file(_one(key='"\xff"').encode("latin-1"), F32_1),
        "top-level-list": raw_file("[]"),
        "top-level-null": raw_file("null"),
        "header-empty": raw_file(""),
        "header-too-long": struct.pack("<Q", 100_000_001) + b"{}",
        "header-past-end": struct.pack("<Q", 64) + b"{}",
        "file-empty": b"",
        "file-7-bytes": b"\x02\x00\x00\x00\x00\x00\x00",
        "dtype-lowercase": raw_file(_one(dtype='"f32"'), F32_1),
        "dtype-null": raw_file(_one(dtype="null"), F32_1),
        "bool-byte-2": raw_file(_one(dtype='"BOOL"', offsets="[0,1]"), b"\x02"),
    }
    for code, bits in (("C64", 64), ("F4", 4), ("F6_E2M3", 6), ("F8_E8M0", 8), ("F8_E4M3FNUZ", 8),
                       ("F8_E5M2FNUZ", 8), ("U16", 16), ("U32", 32), ("U64", 64)):
        n = 4 * bits // 8
        cases[f"dtype-{code}"] = raw_file(_one(dtype=f'"{code}"', shape="[4]", offsets=f"[0,{n}]"), bytes(range(n)))
    cases["dtype-F4-odd-last-dim"] = raw_file(_one(dtype='"F4"', shape="[2,3]", offsets="[0,3]"), b"\x01\x02\x03")
    cases["dtype-F4-scalar"] = raw_file(_one(dtype='"F4"', shape="[]", offsets="[0,0]"))
    return cases


HAND_MADE = {**_json_cases(), **_layout_cases()}


# --------------------------------------------------------------------------------------- outcomes
def _bytes_of(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def run_weightlens(path: Path) -> tuple:
    """``("ok", tensors, metadata)`` or ``("error", class name, message)``."""
    try:
        ckpt = wl.load(path)
        tensors = {k: (ckpt[k].dtype, tuple(ckpt[k].shape), _bytes_of(ckpt[k])) for k in ckpt}
        return ("ok", tensors, dict(ckpt.metadata))
    except wl.WeightlensError as exc:
        return ("error", type(exc).__name__, str(exc))
    except Exception as exc:  # noqa: BLE001 - any other exception is itself a finding
        return ("crash", type(exc).__name__, str(exc))


def run_reference(path: Path) -> tuple:
    """The same for ``safetensors.safe_open``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {}
            for k in f.keys():
                t = f.get_tensor(k)
                tensors[k] = (t.dtype, tuple(t.shape), _bytes_of(t))
            return ("ok", tensors, dict(f.metadata() or {}))
    except Exception as exc:  # noqa: BLE001 - the reference raises several classes
        return ("error", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def has_duplicate_keys(blob: bytes) -> bool:
    """Whether the header's top level or its ``__metadata__`` names a key twice (read by Python's json)."""
    try:
        head, _ = split(blob)
        top = json.loads(head.decode("utf-8"), object_pairs_hook=Obj)
    except Exception:  # noqa: BLE001 - the rule only concerns headers that parse
        return False
    if not isinstance(top, Obj):
        return False
    objects = [top, *(v for k, v in top if k == "__metadata__" and isinstance(v, Obj))]
    return any(len({k for k, _ in obj}) != len(obj) for obj in objects)


def _allowed(blob: bytes, ours: tuple, ref: tuple) -> bool:
    """The deliberate differences: weightlens refuses duplicate keys, complex and packed float4."""
    if ours[0] != "error" or ref[0] != "ok":
        return False
    if ours[1] == "DTypeError":
        return any(d in (torch.complex64, torch.float4_e2m1fn_x2) for d, _, _ in ref[1].values())
    return ("more than once" in ours[2] or "twice" in ours[2]) and has_duplicate_keys(blob)


def disagreement(path: Path, blob: bytes) -> str | None:
    """Why the two readers disagree on ``blob`` (written to ``path``), or ``None``."""
    path.write_bytes(blob)
    try:
        ours, ref = run_weightlens(path), run_reference(path)
    finally:
        path.unlink()
    if ours[0] == "crash":
        return f"weightlens raised a non-weightlens error: {ours[1]}: {ours[2][:300]}"
    if ours[0] == "error" and (not ours[2].startswith(f"{path}: ") or "\n" in ours[2]):
        return f"weightlens' message is not one line starting with the file: {ours[2][:300]!r}"
    if ours[0] == ref[0] == "error" or ours == ref or _allowed(blob, ours, ref):
        return None
    return f"weightlens: {_show(ours)}\n    safetensors: {_show(ref)}"


def _show(outcome: tuple) -> str:
    if outcome[0] != "ok":
        return f"{outcome[1]}: {outcome[2][:300]}"
    return "accepted " + ", ".join(f"{k!r} {d} {list(s)} {b[:16].hex()}" for k, (d, s, b) in
                                   list(outcome[1].items())[:6]) + f"; metadata {outcome[2]}"


# --------------------------------------------------------------------------------- the corpus test
@pytest.mark.parametrize("name", [*VALID, *HAND_MADE])
def test_corpus_file_agrees_with_safetensors(tmp_path, name):
    blob = VALID.get(name) or HAND_MADE[name]
    why = disagreement(tmp_path / f"{name}.safetensors", blob)
    assert why is None, f"{name}: the readers disagree\n    {why}"


def test_valid_corpus_files_are_read_identically(tmp_path):
    for name, blob in VALID.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        ours, ref = run_weightlens(path), run_reference(path)
        assert ours[0] == "ok" and ours == ref, f"{name}: {_show(ours)} vs {_show(ref)}"


# ------------------------------------------------------------------------------ random mutations
class Raw(str):
    """JSON text written verbatim (for what ``json.dumps`` cannot write: -0, NaN, bad escapes)."""


class Obj(list):
    """A JSON object as a list of ``[key, value]`` pairs, so keys may repeat."""


def dump(value: object) -> str:
    """JSON text of ``value`` (``Raw`` verbatim, ``Obj`` with its repeated keys)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def _parse(blob: bytes) -> tuple[Obj, bytes] | None:
    if len(blob) < 8 or struct.unpack("<Q", blob[:8])[0] > len(blob) - 8:
        return None
    head, data = split(blob)
    try:
        top = json.loads(head.decode("utf-8"), object_pairs_hook=lambda p: Obj([list(kv) for kv in p]))
    except ValueError:
        return None
    return (top, data) if isinstance(top, Obj) else None


def _field(entry: object, name: str) -> list | None:
    return next((kv for kv in entry if kv[0] == name), None) if isinstance(entry, Obj) else None


_ODD_VALUES = [-1, 0, 1, 3, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 1.0, 1.5, "2", True, None, [],
               Raw("-0"), Raw("1e0"), Raw("NaN"), Raw("1e400")]
_ODD_JSON = [Raw("[" * 126 + "]" * 126), Raw("[" * 125 + "]" * 125), Raw("NaN"), Raw("1e400"), Raw("-0"),
             Raw('"\\ud800"'), Raw('"\\ud83d\\ude00"'), Raw("9" * 400), Raw('{"q":1,"q":2}'), "x", None]

def _bits(code: str) -> int:
    special = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
    return special.get(code) or int("".join(ch for ch in code.split("_")[0] if ch.isdigit()))


def _edit_dup(rng: random.Random, top: Obj, kv: list, kind: str) -> str:
    copy = Obj([list(f) for f in kv[1]])
    if rng.random() < 0.5 and _field(copy, "dtype"):
        _field(copy, "dtype")[1] = rng.choice(CODES)
    top.insert(rng.randrange(len(top) + 1), [kv[0], copy])
    return f"duplicate key {kv[0]!r}"


def _edit_shape(rng: random.Random, top: Obj, kv: list, kind: str) -> str:
    shape = _field(kv[1], "shape")
    if shape is None or not isinstance(shape[1], list):
        return "no shape to edit"
    old = list(shape[1])
    if kind == "reshape" and all(type(d) is int and d >= 0 for d in old):  # same size: both should accept
        n = 1
        for d in old:
            n *= d
        shape[1] = rng.choice([[n], [1, n], old[::-1], old + [1], [1] + old, [n, 1, 1]])
    elif old and rng.random() < 0.8:
        shape[1][rng.randrange(len(old))] = rng.choice(_ODD_VALUES)
    else:
        shape[1] = old + [rng.choice(_ODD_VALUES)] if rng.random() < 0.5 else old[:-1]
    return f"shape of {kv[0]!r}: {old} -> {dump(shape[1])[:60]}"


def _edit_offsets(rng: random.Random, top: Obj, kv: list, kind: str) -> str:
    offsets = _field(kv[1], "data_offsets")
    if offsets is None or not isinstance(offsets[1], list) or len(offsets[1]) != 2:
        return "no offsets to edit"
    old = list(offsets[1])
    if kind == "swap-offsets":
        other = _field(rng.choice([e for e in top if isinstance(e[1], Obj)])[1], "data_offsets")
        if other is not None:
            offsets[1], other[1] = other[1], offsets[1]
    elif rng.random() < 0.6 and all(type(o) is int for o in old):
        offsets[1][rng.randrange(2)] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 2**64])
    else:
        offsets[1] = rng.choice([old + [old[1]], old[:1], old[::-1], [old[0], rng.choice(_ODD_VALUES)]])
    return f"data_offsets of {kv[0]!r}: {old} -> {dump(offsets[1])[:60]}"


def _edit_dtype(rng: random.Random, top: Obj, kv: list, kind: str) -> str:
    dtype = _field(kv[1], "dtype")
    if dtype is None or not isinstance(dtype[1], str):
        return "no dtype to edit"
    old = dtype[1]
    if kind == "dtype-same-size" and old in CODES:  # same byte count: both should accept
        dtype[1] = rng.choice([c for c in CODES if _bits(c) == _bits(old)])
    else:
        dtype[1] = rng.choice([*CODES, old.lower(), "F128", 32, None, Obj([[old, None]]), Obj([[old, 1]])])
    return f"dtype of {kv[0]!r}: {old} -> {dump(dtype[1])}"


def _edit_metadata(rng: random.Random, top: Obj, kv: list | None, kind: str) -> str:
    top[:] = [p for p in top if p[0] != "__metadata__"]
    value = rng.choice([None, Obj(), Obj([["k", "v"]]), Obj([["k", 1]]), Obj([["k", None]]), [], "s",
                        Obj([["k", "v"], ["k", "w"]]), Obj([["", ""]]), Raw('{"k":"\\ud800"}')])
    if rng.random() < 0.9:
        top.insert(rng.randrange(len(top) + 1), ["__metadata__", value])
    return f"__metadata__ -> {dump(value)}"


def _edit_fields(rng: random.Random, top: Obj, kv: list | None, kind: str) -> str:
    if kind == "drop-field":
        name = rng.choice(["dtype", "shape", "data_offsets"])
        kv[1][:] = [f for f in kv[1] if f[0] != name]
        return f"drop {name} of {kv[0]!r}"
    if kind == "extra-field" or kv is None:
        target = kv[1] if kv is not None else top
        value = rng.choice(_ODD_JSON)
        target.insert(rng.randrange(len(target) + 1), [rng.choice(["z", "dtype", "shape"]), value])
        return f"extra field {dump(value)[:40]} in {kv[0] if kv else 'top level'!r}"
    fields = [(_field(kv[1], f) or [f, None])[1] for f in ("dtype", "shape", "data_offsets")]
    kv[1] = fields + ([0] if rng.random() < 0.2 else [])
    return f"entry {kv[0]!r} as the list {dump(kv[1])[:60]}"


def _edit_entry(rng: random.Random, top: Obj, kv: list, kind: str) -> str:
    if kind == "drop-entry":
        top.remove(kv)
        return f"drop entry {kv[0]!r}"
    new = rng.choice(["", kv[0] + "\u00e9", Raw('"\\u0061"'), "__metadata__", top[0][0]])
    old, kv[0] = kv[0], new
    return f"rename {old!r} -> {dump(new)}"


_EDITS = {"dup": _edit_dup, "shape": _edit_shape, "reshape": _edit_shape, "offset": _edit_offsets,
          "swap-offsets": _edit_offsets, "dtype": _edit_dtype, "dtype-same-size": _edit_dtype,
          "metadata": _edit_metadata, "drop-field": _edit_fields, "extra-field": _edit_fields,
          "as-list": _edit_fields, "drop-entry": _edit_entry, "rename": _edit_entry}


def _json_edit(rng: random.Random, top: Obj) -> str:
    """Edit ``top`` in place, one way chosen by ``rng``; returns what was done."""
    tensors = [kv for kv in top if kv[0] != "__metadata__" and isinstance(kv[1], Obj)]
    kind = rng.choice(sorted(_EDITS))
    if not tensors and kind not in ("metadata", "extra-field"):
        kind = "metadata"
    return _EDITS[kind](rng, top, rng.choice(tensors) if tensors else None, kind)


def _byte_edit(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    kind = rng.choice(["flip-header", "flip-data", "flip-length", "truncate", "extend", "pad"])
    if kind.startswith("flip") and blob:
        lo, hi = {"flip-header": (8, min(8 + n, len(blob))), "flip-data": (min(8 + n, len(blob)), len(blob)),
                  "flip-length": (0, min(8, len(blob)))}[kind]
        if hi > lo:
            pos, bit = rng.randrange(lo, hi), rng.randrange(8)
            return f"flip bit {bit} of byte {pos}", blob[:pos] + bytes([blob[pos] ^ (1 << bit)]) + blob[pos + 1:]
    if kind == "truncate" and blob:
        cut = rng.randrange(len(blob))
        return f"truncate to {cut} bytes", blob[:cut]
    parsed = _parse(blob)
    if kind == "pad" and parsed is not None:
        pad = rng.choice([b" ", b"\t", b"\n", b"\r", b"\x00", b"\x0c", b"\xc2\xa0"]) * rng.randint(1, 9)
        head, data = split(blob)
        new = raw_file(pad + head if rng.random() < 0.3 else head + pad, data)
        return f"pad header with {pad[:3]!r}", new
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return f"append {len(extra)} bytes", blob + extra


def mutate(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    """One random edit of ``blob``: a JSON-level edit of its header or a byte-level one."""
    parsed = _parse(blob)
    if parsed is not None and rng.random() < 0.7:
        top, data = parsed
        what = _json_edit(rng, top)
        return what, raw_file(dump(top), data)
    return _byte_edit(rng, blob)


def mutation_cases(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` seeded mutants of the valid corpus: 1 to 3 edits each."""
    names = sorted(VALID)
    for i in range(count):
        rng = random.Random(seed * 100_003 + i)
        name = rng.choice(names)
        blob, steps = VALID[name], []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            what, blob = mutate(rng, blob)
            steps.append(what)
        yield f"#{i} {name}: " + "; ".join(steps), blob


@pytest.mark.parametrize("part", range(4))
def test_random_mutations_agree_with_safetensors(tmp_path, part):
    outcomes = {"ok": 0}
    problems = []
    for what, blob in mutation_cases(MUTATIONS // 4, SEED + part):
        why = disagreement(tmp_path / "mutant.safetensors", blob)
        if why is None:
            path = tmp_path / "mutant.safetensors"
            path.write_bytes(blob)
            outcomes["ok"] += run_reference(path)[0] == "ok"
            path.unlink()
        else:
            problems.append(f"{what}\n    {why}")
    assert not problems, f"{len(problems)} disagreements, e.g.:\n" + "\n".join(problems[:8])
    assert outcomes["ok"] > MUTATIONS // 40, f"too few mutants are valid to test reading: {outcomes}"
