"""Atomic folders and files: build beside the target, fsync, rename in one step; clean up after killed runs.

A temporary folder is named ``.<target>.weightlens-tmp-<pid>-<random>`` beside the target, so a
later run can tell a dead run's leftovers (its process is gone) from a live one's and remove them.
Replacing an existing folder swaps the two in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
elsewhere it falls back to two renames. Whatever the caller allows, the target is never the current
folder, the home folder, a folder above either, or a filesystem root (``UnsafePathError``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from weightlens.errors import TargetExistsError
from weightlens.io._paths import check_output_path

__all__ = ["atomic_folder", "atomic_write_text", "clean_stale", "fsync_dir", "write_text"]

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.weightlens-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def fsync_dir(path: Path) -> None:
    """fsync a folder, so renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a hidden temporary file beside ``path``, then rename it onto ``path``.

    A failure leaves the earlier file (or nothing) and no temporary file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write_text(tmp, text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove hidden temporary folders of earlier exports to ``parent/name`` whose process is gone."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            m = _TMP_RE.match(entry.name)
            if m and m.group("name") == name and not _pid_alive(int(m.group("pid"))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _non_empty(target: Path) -> bool:
    if not os.path.lexists(target):
        return False
    return not target.is_dir() or target.is_symlink() or any(target.iterdir())


def _refuse_existing(target: Path) -> TargetExistsError:
    what = "folder" if target.is_dir() else "file"
    return TargetExistsError(
        f"{target}: the {what} exists and is not empty; pass overwrite=True (command line: --overwrite) "
        "to replace it atomically, or choose another output folder."
    )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0


Check = Callable[[Path], None]


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str], *, overwrite: bool, check: Check | None = None) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``target``; on success it becomes ``target`` at once.

    ``check(target)``, when given, is called on an existing non-empty target before anything is
    written and again just before the swap, and raises to refuse replacing it. On an exception the
    temporary folder is removed and ``target`` is left as it was.
    """
    target = check_output_path(target)
    parent = target.parent
    _refuse_if_needed(target, overwrite, check)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, target.name)
    tmp = parent / f".{target.name}.weightlens-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        _commit(tmp, target, overwrite, check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_if_needed(target: Path, overwrite: bool, check: Check | None) -> None:
    if not _non_empty(target):
        return
    if check is not None:
        check(target)
    if not overwrite:
        raise _refuse_existing(target)


def _commit(tmp: Path, target: Path, overwrite: bool, check: Check | None) -> None:
    if _non_empty(target):
        _refuse_if_needed(target, overwrite, check)
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        else:
            old = target.parent / f".{target.name}.weightlens-old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
            os.rename(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    else:
        os.rename(tmp, target)  # replaces an empty folder in one step
    fsync_dir(target.parent)
