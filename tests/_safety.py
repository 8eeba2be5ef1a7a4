"""Shared tools of the bad-input corpus (tests/test_safety_*.py): what a hostile input may not do.

Every corpus test asserts three things besides the error class and message: nothing was written,
nothing was deleted, nothing ran. ``snapshot`` records a folder tree (type, size, sha256 and link
targets) so a test compares it before and after; the payload builders write a pickle or a YAML
document that, if ever executed, would create a marker file, so a test checks the marker is absent.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

__all__ = ["assert_unchanged", "pickle_payload", "snapshot", "yaml_payloads"]


def snapshot(root: str | os.PathLike[str]) -> dict[str, tuple[str, object]]:
    """``{relative path: (kind, detail)}`` of everything under ``root`` (symlinks are not followed)."""
    root = Path(root)
    out: dict[str, tuple[str, object]] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", None)
            elif path.is_file():
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", path.lstat().st_mode)
    return out


def assert_unchanged(before: dict[str, tuple[str, object]], root: str | os.PathLike[str]) -> None:
    """Fail with the paths added, removed or changed under ``root`` since ``before`` was taken."""
    after = snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed} under {root}"


class _Touch:
    """Unpickling this creates ``marker`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(marker: str | os.PathLike[str]) -> bytes:
    """A pickle whose loading runs ``touch marker``: a test asserts the marker never appears."""
    return pickle.dumps({"w": _Touch(str(marker))})


def yaml_payloads(marker: str | os.PathLike[str]) -> list[str]:
    """YAML values carrying tags that, in an unsafe loader, would run ``touch marker``."""
    return [
        f'!!python/object/apply:os.system ["touch {marker}"]',
        f'!!python/object/new:os.system ["touch {marker}"]',
        f'!!python/name:os.system',
    ]
