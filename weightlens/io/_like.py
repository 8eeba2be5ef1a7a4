"""The files an export copies from an HF model folder (``like=``): an allowlist, from its top level only.

An export copies what an HF model folder needs besides its weights and nothing else, so a shared
recipe's ``like`` cannot carry other files of the user's (credentials, notes) into a folder that is
then uploaded. Only regular files are copied; a symbolic link is followed only when it resolves
inside the folder, or, for a Hugging Face cache snapshot (``models--*/snapshots/<rev>``), into that
repository's ``blobs`` folder, where the cache keeps the files its snapshots link to.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightlens.errors import CheckpointError, InvalidParameterError
from weightlens.io._atomic import write_text
from weightlens.io._layout import dtype_name
from weightlens.io.sources import Checkpoint

__all__ = ["LIKE_FILES", "LikePlan", "copy_like", "like_folder", "plan_like"]

# The files copied from the `like` folder: shell patterns, matched case-insensitively against the
# names at its top level. Model and generation configs; tokenizers (fast, WordPiece, BPE,
# sentencepiece, tiktoken); image, video and audio processor configs; chat templates; licences.
LIKE_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model", "*.tiktoken", "tiktoken.model",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",
    "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*",
)
_CONFIG = "config.json"


@dataclass
class LikePlan:
    """What will be copied from ``folder``: ``{name: real path}``, and allowlisted names passed over."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # a link leaving the folder, or not a regular file


def like_folder(like: Any, merged: Any) -> Path | None:
    """The HF folder whose non-weight files are copied (``like``; by default the merge base's)."""
    if like is False:
        return None
    if like is None:
        tv = getattr(merged, "task_vectors", None)
        return getattr(getattr(tv, "base", None), "hf_dir", None) or getattr(merged, "hf_dir", None)
    if isinstance(like, Checkpoint):
        return like.hf_dir
    tv = getattr(like, "task_vectors", None)
    if tv is not None:
        return tv.base.hf_dir
    if isinstance(like, (str, os.PathLike)):
        path = Path(like).expanduser()
        if not path.exists():
            raise CheckpointError(f"like={str(like)!r}: no such folder (expected an HF model folder).")
        return path if path.is_dir() else path.parent
    raise InvalidParameterError(
        "The 'like' parameter must be an HF model folder (path), a file inside one, a Checkpoint, "
        f"False or None. Got {type(like).__name__} instead."
    )


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), pattern.lower()) for pattern in LIKE_FILES)


def _allowed_target(real: Path, folder: Path) -> bool:
    """Whether a link in ``folder`` (a real path) may be followed to ``real``."""
    if folder in real.parents:
        return True
    repo = folder.parent.parent
    return folder.parent.name == "snapshots" and repo.name.startswith("models--") and real.parent == repo / "blobs"


def plan_like(src: Path) -> LikePlan:
    """The allowlisted regular files at the top level of ``src``, each checked where it leads."""
    folder = Path(os.path.realpath(src))
    plan = LikePlan(folder)
    for entry in sorted(folder.iterdir(), key=lambda p: (p.name.lower(), p.name)):
        if not _wanted(entry.name):
            continue
        real = Path(os.path.realpath(entry))
        try:
            regular = stat.S_ISREG(os.stat(real).st_mode)
        except OSError:
            regular = False
        if not regular or (entry.is_symlink() and not _allowed_target(real, folder)):
            plan.skipped.append(entry.name)
        else:
            plan.files[entry.name] = real
    if _CONFIG in plan.files:
        read_config(plan.files[_CONFIG], shown=folder / _CONFIG)
    return plan


def read_config(path: Path, *, shown: Path | None = None) -> dict[str, Any]:
    """An HF ``config.json`` as a dict; ``CheckpointError`` naming the file when it is not a JSON object."""
    shown = shown or path
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{shown}: the like folder's config.json cannot be read as JSON ({err}); transformers could not "
            "load the export with it. Fix that file, or pass like=False to copy nothing."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{shown}: the like folder's config.json holds a JSON {type(config).__name__}, not an object; "
            "transformers could not load the export with it. Fix that file, or pass like=False to copy nothing."
        )
    return config


def copy_like(plan: LikePlan, dst: Path, dtype: torch.dtype | None) -> list[str]:
    """Copy the planned files into ``dst`` (fsynced); returns their names.

    With ``dtype``, the copied ``config.json`` names it: ``torch_dtype`` and ``dtype`` are updated
    where present, and ``torch_dtype`` is added when the config has neither (what
    ``from_pretrained(..., torch_dtype="auto")`` reads).
    """
    for name, real in plan.files.items():
        if name == _CONFIG and dtype is not None:
            config = read_config(real, shown=plan.folder / name)
            present = [f for f in ("torch_dtype", "dtype") if f in config] or ["torch_dtype"]
            config.update({f: dtype_name(dtype) for f in present})
            write_text(dst / name, json.dumps(config, indent=2) + "\n")
            continue
        shutil.copyfile(real, dst / name)
        with open(dst / name, "rb") as f:
            os.fsync(f.fileno())
    return list(plan.files)
