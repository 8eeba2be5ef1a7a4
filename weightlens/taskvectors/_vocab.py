"""Vocabulary rows: fine-tunes whose embeddings and LM heads gained rows (added tokens).

A key is a *vocabulary key* when a fine-tune's shape differs from the base's in the first dimension
only, by the same row counts in every such key of that fine-tune (embeddings, tied or untied LM heads,
an MLM head's bias). ``vocab`` on :class:`~weightlens.TaskVectors` says what to do with them:

* ``None``: refuse, naming the key, both shapes and the two options below;
* ``"base"``: the task vectors hold the base's rows only (a fine-tune's rows past them are dropped);
* ``"union"``: the task vectors hold the union vocabulary: the base's rows, then one row per token
  string that some fine-tune added (read from its tokenizer files; two fine-tunes that add the same
  string share the row, whatever ids they gave it). A row the base lacks has no base value; it takes
  the mean of the rows of the fine-tunes that have it, and a fine-tune without the token has a zero
  delta there. A merge of such a row is therefore a merge over the fine-tunes that have it, around
  their mean: task arithmetic gives that mean for any ``alpha`` (a token only one fine-tune has
  keeps that fine-tune's row). mergekit's ``tokenizer_source: union`` builds the same inputs: every
  model's embedding is laid out on the union vocabulary, and a model without a token gets, there,
  the mean of the rows of the models that have it (one model's row when only one has it). Rows of
  a fine-tune that no token names (padding from ``pad_to_multiple_of``) are dropped.

Analysis reads only the base's rows (:meth:`TaskVectors.shared_rows`); :class:`VocabInfo` says how
many rows were set aside, and :meth:`VocabInfo.write_tokenizer` writes the union tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from weightlens.errors import CheckpointError, InvalidParameterError, ShapeMismatchError
from weightlens.io import Checkpoint
from weightlens.taskvectors._keys import listing, where

__all__ = ["VOCAB_MODES", "VocabInfo", "VocabPlan", "plan_vocab"]

VOCAB_MODES = (None, "base", "union")
_TOKENIZER_FILES = ("tokenizer.json", "added_tokens.json")
# Files copied verbatim next to the union tokenizer.json (those present in the base's folder).
_COPIED = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
           "chat_template.jinja", "chat_template.json")
_ATTRS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(frozen=True)
class VocabInfo:
    """How task vectors treat fine-tunes with added vocabulary rows (``tv.vocab``).

    Attributes
    ----------
    mode : {"base", "union"}
        The ``vocab`` option in force.
    keys : tuple of str
        Base names of the vocabulary keys (one row per token: embeddings, LM heads).
    shared_rows : int
        The base's rows, which every fine-tune has; analysis reads only these.
    rows : int
        Rows of the vocabulary keys in the task vectors: ``shared_rows`` ("base") or the union size.
    task_rows : dict
        ``{task: rows of that fine-tune}``.
    added : dict
        ``"union"``: ``{token string: row}`` of the rows past ``shared_rows``, in row order; ``"base"``: empty.
    tokenizer_dir : Path or None
        The base's tokenizer folder, which :meth:`write_tokenizer` extends.
    dropped : dict
        ``{task: rows of that fine-tune left out of the task vectors}``: every row past the base's
        ("base"), the rows no token of its tokenizer names ("union": padding).
    token_attrs : dict
        ``"union"``: ``{token string: its tokenizer.json attributes}`` (``special``, ``lstrip``, ...),
        from the first fine-tune that adds it.
    """

    mode: Literal["base", "union"]
    keys: tuple[str, ...]
    shared_rows: int
    rows: int
    task_rows: Mapping[str, int]
    added: Mapping[str, int] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    dropped: Mapping[str, int] = field(default_factory=dict)
    token_attrs: Mapping[str, Mapping[str, bool]] = field(default_factory=dict, repr=False)

    @property
    def set_aside(self) -> int:
        """Rows outside the shared ones: the union's added rows ("union", merged per row but left out
        of analysis), or the most rows one fine-tune has past the base's ("base", dropped)."""
        if self.mode == "union":
            return self.rows - self.shared_rows
        return max((n - self.shared_rows for n in self.task_rows.values()), default=0)

    def summary(self) -> str:
        """One sentence for reports: which rows are merged and analysed, and how many were set aside."""
        per_task = ", ".join(f"{n - self.shared_rows} of {t!r}" for t, n in self.task_rows.items()
                             if n != self.shared_rows)
        if self.mode == "base":
            return (f"Vocabulary (vocab='base'): the base's {self.shared_rows} rows of {len(self.keys)} key(s) are "
                    f"merged and analysed; rows past them are dropped ({per_task}).")
        padding = ", ".join(f"{n} of {t!r}" for t, n in self.dropped.items() if n)
        return (f"Vocabulary (vocab='union'): {self.rows} rows of {len(self.keys)} key(s), the base's "
                f"{self.shared_rows} and {self.set_aside} added token(s) ({per_task} rows past the base's); "
                f"analysis reads the {self.shared_rows} shared rows and sets {self.set_aside} aside, each merged "
                "over the fine-tunes that have it" + (f"; padding rows without a token dropped: {padding}." if padding
                                                       else "."))

    def write_tokenizer(self, folder: str | Path, *, base_tokenizer: str | Path | None = None) -> list[Path]:
        """Write the union tokenizer into ``folder``: the base's tokenizer plus the added tokens at
        their rows (``self.added``). Returns the files written.

        Parameters
        ----------
        folder : the output folder (made if missing); tokenizer files in it are replaced.
        base_tokenizer : folder of the base's tokenizer files, when the base was not loaded from one.
        """
        if self.mode != "union":
            raise InvalidParameterError(
                "write_tokenizer writes the union tokenizer of vocab='union'; with vocab='base' the base's own "
                "tokenizer fits the merged weights (export with like=<base folder> copies it)."
            )
        source = Path(base_tokenizer) if base_tokenizer is not None else self.tokenizer_dir
        if source is None or not (source / "tokenizer.json").is_file():
            raise CheckpointError(
                f"The union tokenizer extends the base's tokenizer.json, and "
                f"{'the base was not loaded from a folder with one' if source is None else f'{source} has none'}. "
                "Pass write_tokenizer(folder, base_tokenizer=<folder with the base's tokenizer.json>)."
            )
        return _write_union(source, Path(folder), self)


@dataclass(frozen=True)
class VocabPlan:
    """The vocabulary rows of task vectors: what ``tv.vocab`` reports, and for ``"union"`` each
    task's ``(union rows, its rows)`` index pair for the added tokens it has."""

    info: VocabInfo
    rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def plan_vocab(base: Checkpoint, finetuned: Mapping[str, Checkpoint],
               diffs: Mapping[str, Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]],
               mode: str | None) -> VocabPlan | None:
    """The vocabulary rows from the keys whose first dimension differs (``diffs``: ``{task: {base key:
    (base shape, fine-tune shape)}}``); ``None`` when no key differs. Raises what cannot be merged."""
    diffs = {t: d for t, d in diffs.items() if d}
    if not diffs:
        return None
    counts = {t: _row_counts(base, finetuned[t], d) for t, d in diffs.items()}
    shared = {b for b, _ in counts.values()}
    keys = tuple(dict.fromkeys(k for d in diffs.values() for k in d))
    if len(shared) > 1:
        raise ShapeMismatchError(
            f"Base {where(base)}: keys {listing(keys)} differ from the fine-tunes' in their first dimension, "
            f"with {sorted(shared)} rows in the base; a vocabulary resize changes keys of one row count. "
            "Exclude the keys that are not vocabulary rows with exclude=[...]."
        )
    n_base = shared.pop()
    for task, (_, n_task) in counts.items():
        _check_resize(base, finetuned[task], diffs[task], keys, n_base, n_task, mode)
    task_rows = {t: counts[t][1] if t in counts else n_base for t in finetuned}
    if mode == "base":
        info = VocabInfo("base", keys, n_base, n_base, task_rows, dropped={t: n - n_base for t, n in task_rows.items()})
        return VocabPlan(info, {})
    return _union(base, finetuned, keys, n_base, task_rows)


def _row_counts(base: Checkpoint, ft: Checkpoint, diff: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]
                ) -> tuple[int, int]:
    """``(base rows, fine-tune rows)``, one pair for every differing key of a fine-tune."""
    pairs = {(b[0], f[0]) for b, f in diff.values()}
    if len(pairs) > 1:
        shown = "; ".join(f"{k!r}: {b} vs {f}" for k, (b, f) in list(diff.items())[:5])
        raise ShapeMismatchError(
            f"Fine-tuned {where(ft)} differs from base {where(base)} in the first dimension of {len(diff)} keys, "
            f"by different row counts ({shown}); only a vocabulary resize (the same rows added to every embedding "
            "and LM-head key) is merged row by row. Exclude the other keys with exclude=[...]."
        )
    return pairs.pop()


def _check_resize(base: Checkpoint, ft: Checkpoint, diff: Mapping[str, Any], keys: tuple[str, ...],
                  n_base: int, n_task: int, mode: str | None) -> None:
    key = next(iter(diff))
    b_shape, f_shape = diff[key]
    head = (f"Shape mismatch for key {key!r}: base {where(base)} has {b_shape}, fine-tuned {where(ft)} has "
            f"{f_shape}")
    for ckpt, rows in ((base, n_base), (ft, n_task)):
        size = _config_vocab_size(ckpt)
        if size is not None and size != rows:
            raise ShapeMismatchError(
                f"{head}, and the config.json of {where(ckpt)} gives vocab_size {size}, not {rows}: the first "
                "dimension is not the vocabulary. Task vectors need equal shapes; exclude the key with exclude=[...]."
            )
    if n_task < n_base:
        raise ShapeMismatchError(
            f"{head}: the fine-tune has fewer vocabulary rows ({n_task}) than the base ({n_base}), and task "
            "vectors need every base row. Use a fine-tune of this base, or exclude the key with exclude=[...]."
        )
    unresized = [k for k in keys if k not in diff]  # every selected key is in every fine-tune
    if unresized:
        raise ShapeMismatchError(
            f"{head}, yet its {listing(unresized)} keep the base's {n_base} rows: a vocabulary resize changes "
            "every embedding and LM-head key alike. Exclude the keys that are not vocabulary rows with exclude=[...]."
        )
    if mode is None:
        raise ShapeMismatchError(
            f"{head}: its vocabulary has {n_task - n_base} more rows (added tokens). Pass vocab='base' to merge "
            f"the base's {n_base} rows and drop the added ones, or vocab='union' to keep every token (a row "
            "only some fine-tunes have is merged over those fine-tunes; the union tokenizer is built from the "
            "fine-tunes' tokenizer files)."
        )


def _config_vocab_size(ckpt: Checkpoint) -> int | None:
    if ckpt.hf_dir is None or not (ckpt.hf_dir / "config.json").is_file():
        return None
    try:
        size = json.loads((ckpt.hf_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


# ---------------------------------------------------------------------------------------- union
def _union(base: Checkpoint, finetuned: Mapping[str, Checkpoint], keys: tuple[str, ...], n_base: int,
           task_rows: Mapping[str, int]) -> VocabPlan:
    """Union rows: the base's, then each added token string once, in task order then id order."""
    added: dict[str, int] = {}
    attrs: dict[str, dict[str, bool]] = {}
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dropped: dict[str, int] = {}
    for task, ft in finetuned.items():
        n_task = task_rows[task]
        tokens = _added_tokens(ft, task, n_base, n_task) if n_task > n_base else {}
        union_idx, task_idx, seen = [], [], set()
        for row in sorted(tokens):
            text, attr = tokens[row]
            if text in seen:
                continue
            seen.add(text)
            if text not in added:
                added[text], attrs[text] = n_base + len(added), attr
            union_idx.append(added[text])
            task_idx.append(row)
        rows[task] = (torch.tensor(union_idx, dtype=torch.long), torch.tensor(task_idx, dtype=torch.long))
        dropped[task] = n_task - n_base - len(union_idx)
    info = VocabInfo("union", keys, n_base, n_base + len(added), dict(task_rows), added, tokenizer_dir(base),
                     dropped, attrs)
    return VocabPlan(info, rows)


def tokenizer_dir(ckpt: Checkpoint) -> Path | None:
    """The folder holding ``ckpt``'s tokenizer files: its HF folder, or the folder of its weights."""
    folders = [ckpt.hf_dir]
    source = Path(str(ckpt.source))
    if source.exists():
        folders.append(source if source.is_dir() else source.parent)
    for folder in folders:
        if folder is not None and any((folder / n).is_file() for n in _TOKENIZER_FILES):
            return folder
    return None


def _added_tokens(ft: Checkpoint, task: str, lo: int, hi: int) -> dict[int, tuple[str, dict[str, bool]]]:
    """``{row: (token string, its attributes)}`` for the rows ``lo <= row < hi`` that ``ft``'s tokenizer names."""
    folder = tokenizer_dir(ft)
    if folder is None:
        raise CheckpointError(
            f"vocab='union' reads the added tokens of fine-tuned {task!r} ({ft.source}) from its tokenizer files, "
            f"and there are none ({' or '.join(_TOKENIZER_FILES)}) beside its weights. Put its tokenizer files "
            "there, or pass vocab='base' to drop its added rows."
        )
    out: dict[int, tuple[str, dict[str, bool]]] = {}
    path = folder / "tokenizer.json"
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            for text, row in _model_vocab(data).items():
                if lo <= row < hi:
                    out[row] = (text, {})
            for entry in data.get("added_tokens") or []:
                row = entry["id"]
                if lo <= row < hi:
                    out[row] = (entry["content"], {a: bool(entry[a]) for a in _ATTRS if a in entry})
        else:
            path = folder / "added_tokens.json"
            for text, row in json.loads(path.read_text(encoding="utf-8")).items():
                if lo <= int(row) < hi:
                    out[int(row)] = (str(text), {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable tokenizer file ({exc}); vocab='union' needs it.") from exc
    return out


def _model_vocab(data: Mapping[str, Any]) -> dict[str, int]:
    """``{token: id}`` of a tokenizer.json's model (WordPiece, BPE, WordLevel: a dict; Unigram: a list)."""
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, list):
        return {str(entry[0]): i for i, entry in enumerate(vocab)}
    return {str(k): int(v) for k, v in vocab.items()}


def _write_union(source: Path, out: Path, info: VocabInfo) -> list[Path]:
    """The base's tokenizer files from ``source`` with ``info.added`` appended, written into ``out``."""
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    known = _model_vocab(data) | {e["content"]: e["id"] for e in data.get("added_tokens") or []}
    size = max(known.values(), default=-1) + 1
    if size != info.shared_rows:
        raise ShapeMismatchError(
            f"{source / 'tokenizer.json'} has {size} tokens and the base's vocabulary keys {info.shared_rows} rows; "
            "the union tokenizer puts the added tokens at rows from the base's row count on, which needs the two "
            "to agree. Pass base_tokenizer= a folder whose tokenizer fits the base's embedding."
        )
    clash = [t for t in info.added if t in known]
    if clash:
        raise CheckpointError(
            f"{source / 'tokenizer.json'} already has token(s) {listing(clash)}, which fine-tunes added at new rows; "
            "the union tokenizer cannot give one string two ids. Merge with vocab='base' instead."
        )
    entries = [{"id": row, "content": text, **_attributes(info.token_attrs.get(text, {}))}
               for text, row in info.added.items()]
    data["added_tokens"] = list(data.get("added_tokens") or []) + entries
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_json(out / "tokenizer.json", data)]
    specials = [e["content"] for e in entries if e["special"]]
    config = source / "tokenizer_config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"].update({str(e["id"]): {k: v for k, v in e.items() if k != "id"}
                                                for e in entries})
        for name in ("extra_special_tokens", "additional_special_tokens"):
            if specials and isinstance(cfg.get(name), list):
                cfg[name] = cfg[name] + [s for s in specials if s not in cfg[name]]
        written.append(_write_json(out / "tokenizer_config.json", cfg))
    special_map = source / "special_tokens_map.json"
    if special_map.is_file():
        smap = json.loads(special_map.read_text(encoding="utf-8"))
        if specials and isinstance(smap.get("additional_special_tokens"), list):
            smap["additional_special_tokens"] += [s for s in specials if s not in smap["additional_special_tokens"]]
        written.append(_write_json(out / "special_tokens_map.json", smap))
    if (source / "added_tokens.json").is_file():
        extra = json.loads((source / "added_tokens.json").read_text(encoding="utf-8"))
        written.append(_write_json(out / "added_tokens.json", {**extra, **info.added}))
    for name in _COPIED:
        if (source / name).is_file():
            written.append(Path(shutil.copyfile(source / name, out / name)))
    return written


def _attributes(given: Mapping[str, bool]) -> dict[str, bool]:
    """An added token's attributes as tokenizer.json stores them (defaults: those of ``add_tokens``)."""
    special = bool(given.get("special", False))
    defaults = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": not special, "special": special}
    return {a: bool(given.get(a, defaults[a])) for a in _ATTRS}


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
