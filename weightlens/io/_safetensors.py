"""Read safetensors files lazily: the header gives keys, shapes and dtypes; data is read per tensor.

The format is an 8-byte little-endian header length, a JSON header, then raw little-endian tensor
bytes at ``data_offsets`` relative to the end of the header. Parsing the header ourselves lets
``wl.load`` check a file completely (truncation, overlapping or out-of-range offsets, unknown
dtypes) before any tensor is read, and report the file and key at fault.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlens.errors import CheckpointError, DTypeError

__all__ = ["DTYPES", "Entry", "read_header", "read_tensor"]

#: safetensors dtype code -> torch dtype (the codes torch can represent).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives inside a safetensors file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and check the header of ``path``: ``({key: Entry}, metadata)``; reads no tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?).")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} does not fit in a file of {size} bytes; "
                    "the file is truncated or not safetensors."
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}).") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc}); file corrupt?") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; file corrupt?")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    entries: dict[str, Entry] = {}
    for key, spec in header.items():
        entries[key] = _entry(path, key, spec, data_start, data_len)
    _check_no_overlap(path, entries)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _entry(path: Path, key: str, spec: object, data_start: int, data_len: int) -> Entry:
    try:
        code, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]  # type: ignore[index]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: header entry for key {key!r} is malformed ({spec!r}).") from exc
    if code not in DTYPES:
        raise DTypeError(
            f"{path}: key {key!r} has safetensors dtype {code!r}, which this torch cannot represent; "
            f"supported: {', '.join(DTYPES)}."
        )
    dtype = DTYPES[code]
    want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != want or begin < 0:
        raise CheckpointError(
            f"{path}: key {key!r} has data_offsets [{begin}, {end}) ({end - begin} bytes) but shape "
            f"{shape} of {code} needs {want} bytes; file corrupt?"
        )
    if end > data_len:
        raise CheckpointError(
            f"{path}: key {key!r} ends at byte {end} of the data section but the file holds only "
            f"{data_len} data bytes: the file is truncated (an interrupted download or copy?)."
        )
    return Entry(shape, dtype, data_start + begin, want)


def _check_no_overlap(path: Path, entries: dict[str, Entry]) -> None:
    spans = sorted((e.start, e.start + e.nbytes, k) for k, e in entries.items() if e.nbytes)
    for (_, end, key), (start, _, nxt) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {key!r} and {nxt!r} overlap in the file; file corrupt?")


def read_tensor(path: Path, key: str, entry: Entry) -> torch.Tensor:
    """Read one tensor (CPU, stored dtype) from ``path``."""
    buf = bytearray(entry.nbytes)
    try:
        with open(path, "rb") as f:
            f.seek(entry.start)
            got = f.readinto(buf)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read key {key!r} ({exc.strerror or exc}).") from exc
    if got != entry.nbytes:
        raise CheckpointError(
            f"{path}: key {key!r} needs {entry.nbytes} bytes at offset {entry.start} but only {got} "
            "could be read: the file was truncated after it was opened."
        )
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)
