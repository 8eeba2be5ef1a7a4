"""Which keys task vectors have: the base's selected keys, each fine-tune's keys named as the base's.

Selection (``include``/``exclude``) runs on the base's keys before anything is compared, so a key
left out is never validated. Each fine-tune is then aligned to the base from its header alone: an
explicit ``key_map`` first, then, for the selected base keys still unmatched, one prefix found from
the keys themselves (``bert.``, ``model.``, ``transformer.``, ``base_model.model.``: stripped from
the fine-tune's keys, or added to them when the base carries it). Keys only the fine-tune has are
its extras (task heads), kept per task and out of the shared merge. A PEFT adapter is aligned by
its base model keys and may lack base keys (those it leaves unchanged).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from weightlens.errors import DTypeError, InvalidParameterError, KeyMismatchError
from weightlens.io import Checkpoint

__all__ = ["Alignment", "KeyMapWarning", "align", "as_patterns", "key_maps_per_task", "listing", "select_keys",
           "selected", "where"]

#: A fine-tune key -> base key mapping: a dict (keys absent from it keep their names) or a function
#: of the fine-tune key; a value of ``None`` leaves that fine-tune key out.
KeyMap = Union[Mapping[str, Union[str, None]], Callable[[str], Union[str, None]]]

_SHOWN = 5  # keys listed in one message
_PREFIX_DEPTH = 4  # dotted components a prefix may have ("base_model.model." is two)


class KeyMapWarning(UserWarning):
    """A fine-tune's keys were matched to the base's by a prefix found in their names."""


def where(ckpt: Checkpoint) -> str:
    """``'name' (source)`` of a checkpoint, for messages."""
    return f"{ckpt.name!r} ({ckpt.source})" if ckpt.source != ckpt.name else repr(ckpt.name)


def listing(keys: Iterable[str]) -> str:
    """At most a few keys, quoted, then how many more."""
    keys = sorted(keys, key=_natural)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _natural(key: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key)]


# ---------------------------------------------------------------------------------------- selection
def as_patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    """``include``/``exclude`` as a list of glob patterns (``None`` stays ``None``)."""
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def selected(key: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether ``key`` passes ``include`` (when given) and no ``exclude`` pattern."""
    if include is not None and not any(fnmatch.fnmatchcase(key, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(key, p) for p in exclude)


def select_keys(base: Checkpoint, include: list[str] | None, exclude: list[str] | None,
                is_float: Callable[[str], bool]) -> list[str]:
    """The base's floating-point keys that ``include``/``exclude`` keep, in checkpoint order."""
    keys = []
    for key in base.keys():
        if not selected(key, include, exclude):
            continue
        if not is_float(key):
            if include is not None and key in include:  # named exactly, yet not float
                raise DTypeError(
                    f"include={include} selects key {key!r} of dtype {base.dtype(key)} in {where(base)}; "
                    "task vectors need floating-point tensors."
                )
            continue
        keys.append(key)
    if not keys:
        raise KeyMismatchError(
            f"No floating-point keys left in {where(base)} after include={include} exclude={exclude}."
        )
    return keys


# ---------------------------------------------------------------------------------------- key maps
def key_maps_per_task(key_map: Any, names: Sequence[str]) -> dict[str, KeyMap | None]:
    """``key_map`` for each task: one map for all, or ``{task: map}`` when every key is a task name."""
    if key_map is None:
        return dict.fromkeys(names)
    if isinstance(key_map, Mapping) and key_map and all(
            k in names and (isinstance(v, Mapping) or callable(v)) for k, v in key_map.items()):
        return {n: key_map.get(n) for n in names}
    if isinstance(key_map, Mapping) or callable(key_map):
        return dict.fromkeys(names, key_map)
    raise InvalidParameterError(
        f"The 'key_map' parameter of TaskVectors must be a dict {{fine-tune key: base key}}, a function of the "
        f"fine-tune key, or {{task: either}}. Got {type(key_map).__name__} instead."
    )


def _explicit(ft: Checkpoint, own: Sequence[str], key_map: KeyMap | None, base_keys: set[str]
              ) -> dict[str, str | None]:
    """``{fine-tune key: base key or None}`` for the keys (``own``) the user's map renames or leaves out."""
    out: dict[str, str | None] = {}
    if key_map is None:
        return out
    pairs = ((f, key_map[f]) for f in own if f in key_map) if isinstance(key_map, Mapping) else (
        (f, key_map(f)) for f in own)
    for f, b in pairs:
        if b is not None and not isinstance(b, str):
            raise InvalidParameterError(
                f"key_map maps key {f!r} of fine-tuned {where(ft)} to {b!r}; a base key name (str) or None "
                "(leave the key out) was expected."
            )
        if b == f and not isinstance(key_map, Mapping):
            continue  # a function returning the key itself keeps it
        if b is not None and isinstance(key_map, Mapping) and b not in base_keys:
            raise KeyMismatchError(
                f"key_map maps key {f!r} of fine-tuned {where(ft)} to {b!r}, which base has not"
                f"{_close(b, base_keys)}. Map it to one of the base's keys, or to None to leave it out."
            )
        out[f] = b
    return out


def _close(key: str, keys: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(keys), n=3)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


# ---------------------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Alignment:
    """How one fine-tune's keys meet the base's.

    ``own``: base key -> the fine-tune's key, for the selected keys whose names differ (every matched
    key when aligned with ``partial``, as adapters are);
    ``renamed``: fine-tune key -> base key, every key the map or the prefix renamed;
    ``extras``: the fine-tune's keys that no base key matches (after include/exclude);
    ``prefix``: ``(stripped, added)`` when a prefix was found in the names, and how many keys it renamed.
    """

    own: dict[str, str]
    renamed: dict[str, str]
    extras: tuple[str, ...]
    prefix: tuple[str, str] | None = None
    n_prefixed: int = 0


def align(base: Checkpoint, ft: Checkpoint, wanted: Sequence[str], key_map: KeyMap | None,
          include: list[str] | None, exclude: list[str] | None, *, own: Sequence[str] | None = None,
          partial: bool = False) -> Alignment:
    """Match ``ft``'s keys to the base's ``wanted`` keys (headers only); raise on gaps and clashes.

    ``own``: the fine-tune's key names when they are not its Mapping's (a PEFT adapter's base model
    keys); ``partial``: the fine-tune may lack wanted keys (an adapter changes only some), so the
    ``own`` map then holds every matched key, renamed or not.
    """
    base_keys = set(base.keys())
    own = list(ft) if own is None else list(own)
    explicit = _explicit(ft, own, key_map, base_keys)
    names = {f: explicit.get(f, f) for f in own}
    owner = _owners(ft, names, wanted, "key_map")
    prefix, n_prefixed = None, 0
    missing = [b for b in wanted if b not in owner]
    if missing:
        free = [f for f in own if f not in explicit and f not in base_keys]
        prefix = _find_prefix(ft, missing, free)
        if prefix is not None:
            strip, add = prefix
            for f in free:
                if f.startswith(strip) and add + f[len(strip):] in base_keys:
                    names[f] = add + f[len(strip):]
                    n_prefixed += 1
            owner = _owners(ft, names, wanted, f"prefix {_describe(prefix)}")
            missing = [b for b in wanted if b not in owner]
    if missing and not partial:
        raise _missing_error(base, ft, missing, prefix, len(wanted))
    extras = tuple(f for f in own if names[f] is not None and names[f] not in base_keys
                   and selected(f, include, exclude))
    renamed = {f: b for f, b in names.items() if b is not None and b != f}
    matched = {b: f for b, f in owner.items() if partial or b != f}
    return Alignment(matched, renamed, extras, prefix, n_prefixed)


def _owners(ft: Checkpoint, names: Mapping[str, str | None], wanted: Sequence[str], how: str) -> dict[str, str]:
    """``{base key: fine-tune key}`` for the wanted keys; two fine-tune keys on one base key raise."""
    wanted_set = set(wanted)
    owner: dict[str, str] = {}
    for f, b in names.items():
        if b is None or b not in wanted_set:
            continue
        if b in owner:
            first, second = sorted((owner[b], f), key=lambda k: (k != b, k))
            raise KeyMismatchError(
                f"Fine-tuned {where(ft)}: keys {first!r} and {second!r} both stand for base key {b!r} "
                f"(after the {how}). Keep one: pass key_map={{{second!r}: None}} to leave the other out, "
                "or map it to another base key."
            )
        owner[b] = f
    return owner


def _find_prefix(ft: Checkpoint, missing: Sequence[str], free: Sequence[str]) -> tuple[str, str] | None:
    """The prefix that, stripped from ``free`` fine-tune keys or added to them, matches the most
    ``missing`` base keys; ``None`` when none matches any; two equally good ones raise."""
    missing_set, free_set = set(missing), set(free)
    scores: dict[tuple[str, str], int] = {}
    for f in free:  # the fine-tune's keys carry a prefix the base's lack: 'bert.' + base key
        for cut in _cuts(f):
            if f[cut:] in missing_set:
                scores[(f[:cut], "")] = scores.get((f[:cut], ""), 0) + 1
    for b in missing:  # the base's keys carry one: 'model.' + fine-tune key
        for cut in _cuts(b):
            if b[cut:] in free_set:
                scores[("", b[:cut])] = scores.get(("", b[:cut]), 0) + 1
    if not scores:
        return None
    best = max(scores.values())
    top = sorted(p for p, s in scores.items() if s == best)
    if len(top) > 1:
        raise KeyMismatchError(
            f"Fine-tuned {where(ft)}: its keys meet {best} base keys equally well under "
            f"{' and '.join(_describe(p) for p in top[:3])}. Pass key_map= (a dict or a function from its keys "
            "to the base's) to say which."
        )
    return top[0]


def _cuts(key: str) -> list[int]:
    """Positions just after each of the first few dots of ``key`` (a prefix ends with a dot)."""
    cuts, start = [], 0
    while len(cuts) < _PREFIX_DEPTH:
        dot = key.find(".", start)
        if dot < 0 or dot == len(key) - 1:
            break
        cuts.append(dot + 1)
        start = dot + 1
    return cuts


def _describe(prefix: tuple[str, str]) -> str:
    strip, add = prefix
    return f"{strip!r} on the fine-tune's keys" if strip else f"{add!r} on the base's keys"


def _missing_error(base: Checkpoint, ft: Checkpoint, missing: Sequence[str], prefix: tuple[str, str] | None,
                   n_wanted: int) -> KeyMismatchError:
    found = ""
    if prefix is not None:
        found = (f" The prefix {_describe(prefix)} matches {n_wanted - len(missing)} of the {n_wanted} "
                 "selected base keys, not these.")
    example = missing[0]
    return KeyMismatchError(
        f"Fine-tuned {where(ft)} lacks {len(missing)} key(s) of base {where(base)}: {listing(missing)}.{found} "
        f"Leave them out with exclude=[...] (e.g. exclude=[{example!r}]), or map the fine-tune's keys to them "
        f"with key_map={{'<its key>': {example!r}}}{_close(example, ft.keys())}; if the key is absent "
        "altogether, check that both checkpoints come from the same architecture."
    )
