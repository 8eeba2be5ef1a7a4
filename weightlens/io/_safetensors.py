"""Read safetensors files lazily: the header gives keys, shapes and dtypes; data is read per tensor.

The format is an 8-byte little-endian header length, a JSON header, then raw little-endian tensor
bytes at ``data_offsets`` relative to the end of the header. Parsing the header ourselves lets
``wl.load`` check a file completely before any tensor is read and report the file and key at fault.
A file is accepted exactly when the reference ``safetensors`` library accepts it (see
``_st_header`` for the JSON rules and :func:`_layout` for the byte layout), except that duplicate
keys are refused and dtypes this torch cannot hold (or that weightlens refuses: complex, packed
float4) raise :class:`DTypeError`.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from weightlens.errors import CheckpointError, DTypeError
from weightlens.io._st_header import BITS, Spec, parse_header

__all__ = ["DTYPES", "MAX_HEADER", "Entry", "check_regular", "open_regular", "read_header", "read_tensor"]

#: safetensors dtype code -> torch dtype (the codes weightlens reads and writes).
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
                     ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)

MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE, in bytes
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_U64 = 2**64
_REFUSED = {"C64": "complex tensors are not read (a merge would drop the imaginary part)",
            "F4": "packed float4 is not read (torch stores two values per element)"}
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"))


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives inside a safetensors file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset in the file
    nbytes: int


def _not_regular(path: Path, mode: int) -> CheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return CheckpointError(
        f"{path}: is {kind}, not a regular file; weightlens reads weights only from regular files "
        "(reading a pipe or device could block forever). Pass the real checkpoint file."
    )


def check_regular(path: Path) -> None:
    """Raise unless ``path`` is a regular file (symlinks followed); opens nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}).") from exc
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading without blocking, and only if it is a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}).") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and check the header of ``path``: ``({key: Entry}, metadata)``; reads no tensor data."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?).")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                limit = f"the format's limit of {MAX_HEADER} bytes" if n > MAX_HEADER else f"{size} bytes"
                raise CheckpointError(
                    f"{path}: header length {n} exceeds {limit}; the file is truncated or not safetensors."
                )
            raw = f.read(n)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}).") from exc
    if len(raw) != n:
        raise CheckpointError(f"{path}: the file shrank while its header was read; try again.")
    specs, metadata = parse_header(path, raw)
    _layout(path, specs, size - 8 - n)
    return {key: _entry(path, key, spec, 8 + n) for key, spec in specs.items()}, metadata


def _layout(path: Path, specs: dict[str, Spec], data_len: int) -> None:
    """Check tensors tile the data section as safetensors' ``Metadata::validate`` demands.

    Sorted by ``(begin, end)``, each tensor starts where the previous one ended (the first at 0),
    spans exactly its shape's bytes, and the last one ends at the end of the file.
    """
    start, last = 0, None
    for key, spec in sorted(specs.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        where = f"{path}: key {key!r} has data_offsets [{spec.begin}, {spec.end}]"
        if spec.end < spec.begin:
            raise CheckpointError(f"{where}, which end before they begin; the file is corrupt: re-export it.")
        if spec.begin != start:
            after = f"tensor {last!r} ends at {start}" if last is not None else "the data section starts at 0"
            what = ("overlaps the tensor before it" if spec.begin < start
                    else f"leaves a gap of {spec.begin - start} bytes")
            raise CheckpointError(
                f"{where} but {after}: it {what}. safetensors requires tensors back to back; the file is "
                "corrupt: re-export it."
            )
        want = _nbytes(path, key, spec)
        if spec.end - spec.begin != want:
            raise CheckpointError(
                f"{where} ({spec.end - spec.begin} bytes) but shape {list(spec.shape)} of {spec.code} needs "
                f"{want} bytes; the file is corrupt: re-export it."
            )
        if spec.end > data_len:
            raise CheckpointError(
                f"{path}: key {key!r} ends at byte {spec.end} of the data section but the file holds only "
                f"{data_len} data bytes: the file is truncated (an interrupted download or copy?)."
            )
        start, last = spec.end, key
    if start != data_len:
        after = (f"the last tensor ({last!r}, ending at data byte {start})" if last is not None
                 else "a header that lists no tensors")
        raise CheckpointError(
            f"{path}: {data_len - start} bytes follow {after}; safetensors refuses trailing data. The file is "
            "corrupt or was appended to: re-export it."
        )


def _nbytes(path: Path, key: str, spec: Spec) -> int:
    """Bytes of ``spec`` as safetensors computes them (overflow past 64 bits is an error)."""
    count = 1
    for dim in spec.shape:
        count *= dim
        if count >= _U64:
            break
    bits = count * BITS[spec.code]
    if count >= _U64 or bits >= _U64:
        raise CheckpointError(
            f"{path}: key {key!r} has shape {list(spec.shape)}, whose size overflows 64 bits; the file is "
            "corrupt: re-export it."
        )
    if bits % 8:
        raise CheckpointError(
            f"{path}: key {key!r} holds {count} {spec.code} values ({bits} bits), not a whole number of "
            "bytes; the file is corrupt: re-export it."
        )
    return bits // 8


def _entry(path: Path, key: str, spec: Spec, data_start: int) -> Entry:
    dtype = DTYPES.get(spec.code)
    if dtype is None:
        why = _REFUSED.get(spec.code, "this torch cannot represent it")
        raise DTypeError(
            f"{path}: key {key!r} has safetensors dtype {spec.code!r}: {why}. Supported: {', '.join(DTYPES)}; "
            "convert the tensor to one of them before loading."
        )
    big = max(spec.shape, default=0)
    if big > _MAX_DIM:
        raise CheckpointError(
            f"{path}: key {key!r} has shape {list(spec.shape)}: dimension {big} is beyond torch's limit "
            f"of {_MAX_DIM}; the file is corrupt: re-export it."
        )
    return Entry(spec.shape, dtype, data_start + spec.begin, spec.end - spec.begin)


def read_tensor(path: Path, key: str, entry: Entry) -> torch.Tensor:
    """Read one tensor (CPU, stored dtype) from ``path``."""
    buf = bytearray(entry.nbytes)
    with open_regular(path) as f:
        try:
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
