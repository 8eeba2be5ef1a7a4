"""Fingerprints of a recipe's input checkpoints: what lets a re-run notice that its inputs changed.

An input's fingerprint covers every file ``wl.load`` reads for it (a single file; an index and each of
its shards; an HF folder's weights file or files), keyed by the file's path relative to the input's
anchor (the input itself when it is a folder, else its folder). Per file::

    size:   the size in bytes
    header: sha256 of the safetensors header (its 8-byte length and the JSON after it) for a
            safetensors file; for any other file (a pickle, an index) sha256 of the first and last
            MiB, which is the whole file up to 2 MiB (a torch zip keeps its directory, names and
            offsets at the end; a JSON index is small)
    sha256: sha256 of the whole file (only in mode "full")

``"header"`` (the default) is cheap and catches a re-saved, re-sharded, renamed, truncated or
extended file; only ``"full"`` catches a changed data byte in a file of unchanged size and header.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from weightlens.errors import InvalidParameterError
from weightlens.io._adapter import ADAPTER_CONFIG
from weightlens.io._safetensors import MAX_HEADER
from weightlens.io.sources import AdapterCheckpoint

__all__ = ["MODES", "anchor_of", "check_shape", "checkpoint_files", "difference", "fingerprint_file",
           "fingerprint_files", "mode_of", "sha256_file"]

MODES = ("header", "full")
_EDGE = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"size", "header", "sha256"}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidParameterError(f"The 'fingerprint' parameter must be one of {', '.join(MODES)}. Got {mode!r}.")
    return mode


def _header_bytes(f: Any, size: int) -> bytes | None:
    """The safetensors header (length and JSON) of an open file, or ``None`` when it is not one."""
    head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        return None
    return head + f.read(n - 1)


def fingerprint_file(path: Path, mode: str) -> dict[str, Any]:
    """``{"size", "header"[, "sha256"]}`` of one file (see the module docstring)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header = _header_bytes(f, size)
        if header is not None:
            h.update(header)
        else:
            f.seek(0)
            h.update(f.read(_EDGE))
            if size > _EDGE:
                f.seek(max(_EDGE, size - _EDGE))
                h.update(f.read(_EDGE))
    out: dict[str, Any] = {"size": size, "header": h.hexdigest()}
    if mode == "full":
        out["sha256"] = sha256_file(path)
    return out


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a whole file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: Any) -> list[Path]:
    """The files ``wl.load`` read for a checkpoint: its source file, then each tensor file, once each; for a
    PEFT adapter also ``adapter_config.json`` (its alpha, rank and patterns scale the update)."""
    files = [str(ckpt.source)] + [ckpt.info(k).file for k in ckpt]
    if isinstance(ckpt, AdapterCheckpoint):
        files.append(str(ckpt.folder / ADAPTER_CONFIG))
    return [Path(f) for f in dict.fromkeys(f for f in files if f and Path(f).is_file())]


def anchor_of(path: str | os.PathLike[str]) -> Path:
    """The folder an input's file names are relative to: the input when it is a folder, else its folder."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def _name(file: Path, anchor: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(file), os.path.abspath(anchor))).as_posix()


def fingerprint_files(files: Iterable[Path], anchor: Path, mode: str,
                      known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``{name relative to anchor: fingerprint}``; ``known`` ones (by name, same mode) are reused."""
    _check_mode(mode)
    known = known or {}
    out = {}
    for file in files:
        name = _name(file, anchor)
        prior = known.get(name)
        reuse = prior is not None and (mode == "header" or "sha256" in prior)
        out[name] = dict(prior) if reuse else fingerprint_file(file, mode)
    return out


def mode_of(recorded: Mapping[str, Mapping[str, Any]]) -> str:
    """``"full"`` when a recorded fingerprint carries sha256, else ``"header"``."""
    return "full" if any("sha256" in fp for fp in recorded.values()) else "header"


def difference(name: str, recorded: Mapping[str, Any], anchor: Path) -> tuple[str, dict[str, Any] | None]:
    """What changed in the file ``name`` since ``recorded`` (``""``: nothing), and its fingerprint now."""
    path = anchor / name
    if not path.is_file():
        return f"{path} is missing", None
    now = fingerprint_file(path, "full" if "sha256" in recorded else "header")
    if now["size"] != recorded["size"]:
        return f"{path}: size changed from {recorded['size']} to {now['size']} bytes", now
    if now["header"] != recorded["header"]:
        return (f"{path}: header changed (tensor names, shapes, dtypes, offsets or metadata; for a "
                "non-safetensors file its first or last MiB)"), now
    if "sha256" in recorded and now["sha256"] != recorded["sha256"]:
        return f"{path}: contents changed (same size and header, another sha256)", now
    return "", now


def check_shape(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """Validate one input's recorded fingerprints: ``{file name: {size, header[, sha256]}}``."""
    if not isinstance(value, Mapping):
        raise InvalidParameterError(
            f"{where} must map file names to {{size, header, sha256}}. Got {type(value).__name__}.")
    out = {}
    for name, fp in value.items():
        at = f"{where}[{name!r}]"
        if not isinstance(name, str) or not name:
            raise InvalidParameterError(f"{where}: file names must be non-empty strings. Got {name!r}.")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InvalidParameterError(
                f"{where}: file name {name!r} leaves the input's folder; a recipe records only the files "
                "weightlens read inside it. Remove that entry (or the whole 'fingerprints' field).")
        if not isinstance(fp, Mapping) or not {"size", "header"} <= set(fp) <= _FIELDS:
            raise InvalidParameterError(f"{at} must be a mapping with size, header and optionally sha256.")
        size = fp["size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidParameterError(f"{at}: 'size' must be a non-negative integer (bytes).")
        for key in ("header", "sha256"):
            if key in fp and not (isinstance(fp[key], str) and _HEX64.fullmatch(fp[key])):
                raise InvalidParameterError(f"{at}: {key!r} must be a sha256 (64 lowercase hex digits).")
        out[name] = dict(fp)
    return out
