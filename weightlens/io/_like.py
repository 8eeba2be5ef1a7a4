"""The files an export copies from an HF model folder (``like=``): an allowlist, from its top level only.

An export copies what an HF model folder needs besides its weights and nothing else, so a shared
recipe's ``like`` cannot carry other files of the user's (credentials, notes) into a folder that is
then uploaded. Only regular files are copied; a symbolic link is followed only when it resolves
inside the folder, or, for a Hugging Face cache snapshot (``models--*/snapshots/<rev>``), into that
repository's ``blobs`` folder, where the cache keeps the files its snapshots link to.

The export of a merge may take two groups of these files from other folders, under the same rules:
``config.json`` from the carried head's folder (:func:`with_config`), and the tokenizer files
(:data:`TOKENIZER_FILES`) from the base's folder when the vocabulary was cut to the base's rows
(:func:`with_tokenizer`); a union tokenizer written by the merge replaces them altogether.
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

__all__ = ["LIKE_FILES", "TOKENIZER_FILES", "LikePlan", "copy_like", "is_tokenizer_file", "like_folder", "plan_like",
           "with_config", "with_tokenizer"]

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
#: The tokenizer files among them (and chat templates, which belong to a tokenizer): what a vocabulary
#: other than the ``like`` folder's replaces.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model", "*.tiktoken", "tiktoken.model",
    "chat_template.jinja", "chat_template.json",
)


@dataclass
class LikePlan:
    """What will be copied from ``folder``: ``{name: real path}``, and allowlisted names passed over."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # a link leaving the folder, or not a regular file
    config: dict[str, Any] = field(default_factory=dict)  # fields set in the config.json written
    origins: dict[str, Path] = field(default_factory=dict)  # files taken from another folder: name -> folder
    union_from: Path | None = None  # the base tokenizer the merge's union tokenizer extends (written instead)


def like_folder(like: Any, merged: Any, *, default: Path | None = None) -> Path | None:
    """The HF folder whose non-weight files are copied (``like``; by default ``default``, else the merge
    base's)."""
    if like is False:
        return None
    if like is None:
        if default is not None:
            return default
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


def _wanted(name: str, patterns: tuple[str, ...] = LIKE_FILES) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), pattern.lower()) for pattern in patterns)


def is_tokenizer_file(name: str) -> bool:
    """Whether ``name`` is one of :data:`TOKENIZER_FILES`."""
    return _wanted(name, TOKENIZER_FILES)


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


def with_config(plan: LikePlan, folder: Path) -> LikePlan:
    """``plan`` with the ``config.json`` of ``folder`` (checked as :func:`plan_like` checks it) instead of its
    own; unchanged when ``folder`` has none it may copy."""
    other = plan_like(folder)
    if _CONFIG in other.files:
        plan.files[_CONFIG] = other.files[_CONFIG]
        plan.origins[_CONFIG] = other.folder
    elif _CONFIG in other.skipped:
        plan.skipped.append(f"{_CONFIG} (of the head's folder)")
    return plan


def with_tokenizer(plan: LikePlan, folder: Path | None) -> LikePlan:
    """``plan`` without its tokenizer files, and with those of ``folder`` (None: none)."""
    for name in [n for n in plan.files if is_tokenizer_file(n)]:
        del plan.files[name]
    if folder is None:
        return plan
    other = plan_like(folder)
    for name, real in other.files.items():
        if is_tokenizer_file(name):
            plan.files[name] = real
            plan.origins[name] = other.folder
    plan.skipped += [f"{n} (of the base's folder)" for n in other.skipped if is_tokenizer_file(n)]
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
    ``from_pretrained(..., torch_dtype="auto")`` reads). The fields of ``plan.config`` are set in it too
    (in its ``text_config`` when only that has the field).
    """
    for name, real in plan.files.items():
        if name == _CONFIG and (dtype is not None or plan.config):
            config = read_config(real, shown=plan.origins.get(name, plan.folder) / name)
            if dtype is not None:
                present = [f for f in ("torch_dtype", "dtype") if f in config] or ["torch_dtype"]
                config.update({f: dtype_name(dtype) for f in present})
            for key, value in plan.config.items():
                inner = config.get("text_config")
                target = inner if key not in config and isinstance(inner, dict) and key in inner else config
                target[key] = value
            write_text(dst / name, json.dumps(config, indent=2) + "\n")
            continue
        shutil.copyfile(real, dst / name)
        with open(dst / name, "rb") as f:
            os.fsync(f.fileno())
    return list(plan.files)
