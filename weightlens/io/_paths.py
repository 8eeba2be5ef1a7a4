"""Where an export may write: the paths it refuses whatever the options, and what it may replace.

Refused always (``UnsafePathError``): an empty or blank path, the current folder or any folder
above it, the home folder or any folder above it, a filesystem root, and a folder that is or holds
an input of the export (base, fine-tunes, the ``like`` folder). Paths are compared as real paths
and by inode, so symbolic links, ``..`` and case-insensitive disks do not get around these rules.

An existing target is used as is when it is an empty folder. ``overwrite=True`` replaces it only
when it looks like a previous weightlens export; ``overwrite_any=True`` replaces any other folder
or file (still never one of the paths above).

A previous weightlens export is a folder (not a symbolic link) whose top level holds at least one
``*.safetensors`` file and in which every ``*.safetensors`` file, and ``model.safetensors.index.json``
when there is one, carries ``weightlens_version`` in its header metadata: export stamps it into
every shard and the index, with or without a recipe. Only headers are read. A
``weightlens_recipe.yaml`` alone does not count: people keep recipe files in their project folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from weightlens.errors import TargetExistsError, UnsafePathError, WeightlensError
from weightlens.io import _safetensors as st
from weightlens.io._layout import INDEX

__all__ = ["check_inputs", "check_output_path", "check_replaceable", "is_weightlens_export"]

_STAMP = "weightlens_version"
_OVERWRITE = "overwrite=True (command line: --overwrite)"
_OVERWRITE_ANY = "overwrite_any=True (command line: --overwrite-any)"


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _same(a: Path, b: Path) -> bool:
    """Whether two real paths are one file or folder (also by inode: case-insensitive disks, bind mounts)."""
    if a == b:
        return True
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def _above(path: Path, other: Path) -> bool:
    """Whether ``path`` is one of the folders above ``other`` (both real paths)."""
    return path in other.parents or (os.path.exists(path) and any(_same(path, p) for p in other.parents))


def _protected() -> list[tuple[Path, str]]:
    """The current and home folders (real paths): neither they nor a folder above them is replaced."""
    places = [(_real(Path.home()), "your home folder")]
    try:
        places.insert(0, (_real(os.getcwd()), "the current folder"))
    except OSError:  # the current folder was deleted: nothing left there to protect
        pass
    return places


def check_output_path(target: str | os.PathLike[str]) -> Path:
    """The absolute target; ``UnsafePathError`` for a path whose replacement would lose the user's files."""
    if not os.fspath(target).strip():
        raise UnsafePathError(
            f"Refusing to export to {os.fspath(target)!r} (an empty path): it would mean the current folder, "
            "which the export would replace; name a new folder for the export, e.g. 'merged'."
        )
    real, shown = _real(target), os.fspath(target)
    for place, what in _protected():
        if _same(real, place):
            raise UnsafePathError(f"Refusing to export to {shown!r}: it is {what} ({place}), which the export "
                                  "would replace; name a new folder inside it instead.")
        if _above(real, place):
            raise UnsafePathError(f"Refusing to export to {shown!r}: it holds {what} ({place}), which the "
                                  "export would replace; name a new folder for the export instead.")
    if real == real.parent:
        raise UnsafePathError(f"Refusing to export to {shown!r}: it is a filesystem root; name a new folder "
                              "for the export instead.")
    return Path(os.path.abspath(os.path.expanduser(target)))


def check_inputs(target: Path, inputs: Iterable[tuple[str, str | os.PathLike[str]]]) -> None:
    """``UnsafePathError`` when ``target`` is, or holds, one of ``inputs`` (``(role, path)`` pairs)."""
    real = _real(target)
    for role, src in inputs:
        if not isinstance(src, (str, os.PathLike)) or not os.path.lexists(src):
            continue  # an input given in memory: no folder to protect
        if _same(real, _real(src)) or _above(real, _real(src)):
            raise UnsafePathError(
                f"Refusing to export into {target}: it holds an input of this merge ({role} {src}); replacing "
                "it would delete that input. Choose another output folder."
            )


def _metadata_stamped(path: Path) -> bool:
    """Whether a safetensors file is valid and its header metadata carries the weightlens stamp."""
    try:
        return _STAMP in st.read_header(path)[1]
    except WeightlensError:  # unreadable, corrupt or not a regular file: not an export of ours
        return False


def _index_stamped(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    meta = data.get("metadata") if isinstance(data, dict) else None
    return isinstance(meta, dict) and _STAMP in meta


def is_weightlens_export(folder: Path) -> bool:
    """Whether ``folder`` looks like a previous weightlens export (reads only headers; see the module)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    weights = [p for p in folder.iterdir() if p.name.endswith(".safetensors")]
    if not weights or not all(p.is_file() and not p.is_symlink() and _metadata_stamped(p) for p in weights):
        return False
    index = folder / INDEX
    return not os.path.lexists(index) or _index_stamped(index)


def _describe(target: Path) -> str:
    if target.is_symlink():
        return "is a symbolic link"
    if not target.is_dir():
        return "is a file"
    return "is a folder that holds files but no weights stamped by weightlens (not an earlier export)"


def check_replaceable(target: Path, *, overwrite: bool, overwrite_any: bool) -> None:
    """Refuse an existing, non-empty ``target`` that the options do not allow replacing."""
    if not os.path.lexists(target) or overwrite_any:
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    if is_weightlens_export(target):
        if overwrite:
            return
        raise TargetExistsError(
            f"{target}: the folder exists and is not empty; pass {_OVERWRITE} to replace this earlier "
            "export atomically, or choose another output folder."
        )
    cls = UnsafePathError if overwrite else TargetExistsError
    raise cls(
        f"{target}: it exists and {_describe(target)}; overwrite=True replaces only an earlier weightlens "
        f"export. Choose another output folder, or pass {_OVERWRITE_ANY} to replace it and all it holds."
    )
