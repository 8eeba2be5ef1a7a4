"""Task vectors: a base checkpoint and named fine-tunes, read as fp32 deltas one key at a time.

``TaskVectors`` selects the base's keys (``include``/``exclude``), matches each fine-tune's keys to
them (a ``key_map``, then a prefix found in the names), and checks shapes and dtypes of what is
left, all from the checkpoint headers when it is built (no tensor data is read). It classifies every
key (matrix / vector / conv / skip) and computes ``finetuned - base`` per key on demand, upcasting
to fp32 *before* subtracting so bf16/fp16 checkpoints keep their small deltas. Keys only a fine-tune
has (task heads) are its extras; vocabulary rows that fine-tunes added follow ``vocab``
(``weightlens.taskvectors._vocab``). A fine-tune given as a PEFT LoRA adapter stays factored: its delta
is its low-rank update on the keys it targets and exactly zero elsewhere (``weightlens.taskvectors._factored``).
It also carries the decomposition cache that analysis, merges and widgets share.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from weightlens._finite import count_nonfinite
from weightlens.errors import DTypeError, InvalidParameterError, KeyMismatchError, NonFiniteError, ShapeMismatchError
from weightlens.io import Checkpoint, TensorInfo, load
from weightlens.io.sources import AdapterCheckpoint, LoraFactors
from weightlens.linalg import DecompositionCache
from weightlens.taskvectors import _factored, _keys, _vocab
from weightlens.taskvectors._keys import KeyMapWarning, where
from weightlens.taskvectors._vocab import VocabInfo

__all__ = ["TaskVectors", "parameter_kind"]

Kind = Literal["matrix", "vector", "conv", "skip"]


def parameter_kind(shape: Sequence[int], dtype: torch.dtype) -> Kind:
    """Class of a parameter, which decides how each merge treats it.

    ``"matrix"``: 2-D float (Linear weights, embeddings, projections); ``"vector"``: 0/1-D float
    (biases, norms); ``"conv"``: float with 3 or more dims; ``"skip"``: integer/bool buffers.
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return "skip"
    ndim = len(shape)
    if ndim == 2:
        return "matrix"
    return "vector" if ndim < 2 else "conv"


_HOW = ("Pass them as a list of sources, TaskVectors(base, ['ft/a', 'ft/b']), or by name, "
        "TaskVectors(base, {'a': 'ft/a'}).")


def _named_checkpoints(finetuned: Any) -> dict[str, Checkpoint]:
    """``{name: Checkpoint}`` from a mapping of sources or a list (names from file/folder names)."""
    empty = finetuned is None or (isinstance(finetuned, (Mapping, Sequence)) and not isinstance(finetuned, str)
                                  and len(finetuned) == 0)
    if empty:
        got = "None" if finetuned is None else f"an empty {type(finetuned).__name__}"
        raise InvalidParameterError(f"TaskVectors needs at least one fine-tuned checkpoint; got {got}. {_HOW}")
    if isinstance(finetuned, Mapping) and not all(isinstance(v, torch.Tensor) for v in finetuned.values()):
        return {str(name): _with_name(load(src), str(name)) for name, src in finetuned.items()}
    if isinstance(finetuned, (str, os.PathLike, Mapping, torch.nn.Module, Checkpoint)):
        finetuned = [finetuned]
    named: dict[str, Checkpoint] = {}
    for i, src in enumerate(finetuned):
        ckpt = load(src)
        stem = ckpt.name if ckpt.name not in ("state_dict", "") else f"task{i}"
        name, n = stem, 2
        while name in named:
            name, n = f"{stem}_{n}", n + 1
        named[name] = _with_name(ckpt, name)
    if not named:  # an empty iterator
        raise InvalidParameterError(f"TaskVectors needs at least one fine-tuned checkpoint; got none. {_HOW}")
    return named


def _with_name(ckpt: Checkpoint, name: str) -> Checkpoint:
    """``ckpt`` displayed as ``name`` (a shallow copy; the caller's object is left alone)."""
    return ckpt if ckpt.name == name else ckpt.renamed(name)


class TaskVectors:
    """A base checkpoint and named fine-tunes of it, read as fp32 deltas per key.

    Parameters
    ----------
    base : any source ``wl.load`` accepts (path, state dict, ``nn.Module``, ``Checkpoint``), or ``None``
        when the fine-tunes are PEFT adapters whose configs name one local base folder
        (``base_model_name_or_path``; nothing is downloaded).
    finetuned : a list of sources (names from their file or folder names) or ``{name: source}``. A
        source may be a PEFT LoRA adapter folder: its delta is ``scale * B @ A`` on the keys it targets,
        its stored full tensors minus the base (``modules_to_save``, trained biases), zero elsewhere;
        :meth:`factors` gives the low-rank form without materialising it.
    include, exclude : glob patterns (``fnmatch``) on tensor keys, e.g. ``"*.attention.*"``.
        ``include`` keeps only matching keys, ``exclude`` drops matching keys. Both run before any
        key is compared, on the base's names (and on a fine-tune's own names for its extras).
    key_map : how a fine-tune's keys name the base's where names differ by more than a prefix:
        a dict ``{fine-tune key: base key}`` (``None`` as a value leaves that key out), a function of
        the fine-tune key returning a base key or ``None``, or ``{task: either}``. A prefix that
        makes the remaining base keys match (``bert.``, ``model.``, ``base_model.model.``) is found
        from the headers and reported once (a :class:`KeyMapWarning`); ``key_maps`` lists the renames.
    vocab : {None, "base", "union"}, default=None
        Fine-tunes whose embeddings and LM heads gained rows (added tokens): ``None`` refuses them,
        ``"base"`` merges the base's rows and drops the added ones, ``"union"`` keeps every token
        (see :class:`VocabInfo` and ``weightlens.taskvectors._vocab``).
    cache : decomposition cache to share; a new one by default.

    Attributes
    ----------
    names, keys : task names; the selected floating-point base keys (every fine-tune has them).
    extras : ``{task: [keys only that fine-tune has]}``, e.g. classification heads (an adapter's
        ``modules_to_save`` the base lacks); never merged.
    key_maps : ``{task: {fine-tune key: base key}}`` for the keys whose names differ.
    vocab : :class:`VocabInfo` when fine-tunes have vocabulary rows the base lacks, else ``None``.

    Raises
    ------
    KeyMismatchError, ShapeMismatchError, DTypeError
        When a fine-tune lacks a selected base key, or its shapes or dtype classes differ from the
        base's; the message names both checkpoints, the keys and what to pass instead.

    Examples
    --------
    >>> import torch, warnings, weightlens as wl
    >>> base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    >>> tv = wl.TaskVectors(base, {"a": {"w": torch.ones(2, 2), "b": torch.ones(2)}})
    >>> tv.names, tv.keys, tv.kind("w")
    (['a'], ['w', 'b'], 'matrix')
    >>> tv.delta("a", "w").sum().item()
    4.0
    >>> head = {"bert.w": torch.ones(2, 2), "bert.b": torch.ones(2), "classifier.w": torch.ones(3, 2)}
    >>> with warnings.catch_warnings(record=True):  # says once that 'bert.' was stripped
    ...     tv = wl.TaskVectors(base, {"a": head})
    >>> tv.extras, tv.key_maps["a"]["bert.w"], tv.delta("a", "w").sum().item()
    ({'a': ['classifier.w']}, 'w', 4.0)
    """

    def __init__(
        self,
        base: Any,
        finetuned: Any,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        key_map: Any = None,
        vocab: Literal["base", "union"] | None = None,
        cache: DecompositionCache | None = None,
    ) -> None:
        if vocab not in _vocab.VOCAB_MODES:
            raise InvalidParameterError(
                f"The 'vocab' parameter of TaskVectors must be None, 'base' or 'union'. Got {vocab!r} instead."
            )
        if base is not None:
            self.base = load(base)
        self.finetuned = _named_checkpoints(finetuned)
        if base is None:
            self.base = load(_factored.base_of(self.finetuned))
        self.include = _keys.as_patterns(include)
        self.exclude = _keys.as_patterns(exclude)
        self.cache = cache if cache is not None else DecompositionCache()
        self._finite: set[tuple[int, str]] = set()
        self._last_base: tuple[Any, str, torch.Tensor] | None = None  # base_wide's one-key memo
        # Filter first, then validate what is left: a key left out is never compared.
        self.keys = _keys.select_keys(self.base, self.include, self.exclude, self._is_float)
        self._align(key_map)
        self._base = self.base  # as loaded; with vocab="union", self.base becomes a view on the union rows
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # "union": per task, its added rows
        self._sliced: frozenset[str] = frozenset()  # vocabulary keys whose fine-tunes are read on the base's rows
        self.vocab: VocabInfo | None = None
        self._validate(vocab)

    # ------------------------------------------------------------------ structure
    @property
    def names(self) -> list[str]:
        """Task names, in order."""
        return list(self.finetuned)

    @property
    def extras(self) -> dict[str, list[str]]:
        """``{task: keys only that fine-tune has}`` (its own names), e.g. classification heads.

        They are left out of ``keys`` (so of merges and analysis); :meth:`extra` reads one.
        """
        return {n: list(self._extras[n]) for n in self.finetuned}

    @property
    def key_maps(self) -> dict[str, dict[str, str]]:
        """``{task: {fine-tune key: base key}}`` for the keys whose names differ (empty: same names)."""
        return {n: dict(self._renamed[n]) for n in self.finetuned}

    def __len__(self) -> int:
        return len(self.finetuned)

    def kind(self, key: str) -> Kind:
        """Parameter class of ``key``: ``"matrix"``, ``"vector"``, ``"conv"`` or ``"skip"``."""
        info = self.base.info(key)
        return parameter_kind(info.shape, info.dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` in the task vectors (shared by the base and every fine-tune)."""
        return tuple(self.base.shape(key))

    def keys_of_kind(self, *kinds: Kind) -> list[str]:
        """Selected keys of the given classes, in checkpoint order."""
        return [k for k in self.keys if self.kind(k) in kinds]

    def numel(self, key: str) -> int:
        """Number of entries of ``key``."""
        n = 1
        for d in self.shape(key):
            n *= d
        return n

    def subset(self, names: Iterable[str]) -> TaskVectors:
        """The same task vectors restricted to ``names`` (order kept), sharing the cache.

        A task's deltas do not change: with ``vocab="union"`` the added rows keep the base values
        found over every task of ``self``.
        """
        names = list(names)
        unknown = [n for n in names if n not in self.finetuned]
        if unknown or not names:
            raise KeyMismatchError(
                f"Unknown task(s) {unknown} for subset; tasks are {self.names}." if unknown
                else "subset() needs at least one task name."
            )
        new = object.__new__(TaskVectors)
        new.__dict__.update(self.__dict__)
        new.finetuned = {n: self.finetuned[n] for n in names}
        return new

    def shared_rows(self) -> TaskVectors:
        """These task vectors on the base's vocabulary rows only: what analysis reads.

        ``self`` when every key already has the base's rows (no added vocabulary, or ``vocab="base"``).
        With ``vocab="union"``: a view whose vocabulary keys hold the base's rows (``self.vocab`` says
        how many rows were set aside); it has its own cache, since its deltas of those keys differ.
        """
        if not self._rows:
            return self
        new = object.__new__(TaskVectors)
        new.__dict__.update(self.__dict__)
        new.base = self._base
        new._rows = {}
        new._sliced = frozenset(self.vocab.keys)
        new.cache = DecompositionCache(self.cache.max_bytes)
        return new

    def __repr__(self) -> str:
        kinds = {k: 0 for k in ("matrix", "vector", "conv")}
        for key in self.keys:
            kinds[self.kind(key)] += 1
        counts = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
        extras = sum(len(self._extras[n]) for n in self.finetuned)
        more = f"; {extras} extra key(s)" if extras else ""
        more += f"; vocab={self.vocab.mode!r}, {self.vocab.rows} rows" if self.vocab is not None else ""
        return f"TaskVectors(base={self.base.name!r}, tasks={self.names}, keys: {counts}{more})"

    # ------------------------------------------------------------------ data
    def base_tensor(self, key: str) -> torch.Tensor:
        """The base tensor of ``key`` in its stored dtype (``vocab="union"``: on the union rows)."""
        self._check_key(key)
        return self.base[key]

    def base_wide(self, key: str) -> torch.Tensor:
        """The base tensor of ``key`` as the deltas subtract it: float32 (float64 for a float64 base), checked
        finite. The last key's is kept, so a walk reads each base tensor once for its deltas, the merged
        weights and the export's card figure. Read-only: callers must not modify it."""
        self._check_key(key)
        last = self._last_base
        if last is not None and last[0] is self.base and last[1] == key:  # (a subset may have another base view)
            return last[2]
        t = self._upcast(self.base, key)
        self._last_base = (self.base, key, t)
        return t

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_last_base"] = None  # a memo: not shipped (Ray) or pickled
        return state

    def delta(self, task: str, key: str) -> torch.Tensor:
        """``finetuned[task][key] - base[key]`` in fp32 on the CPU (upcast before subtracting).

        The fine-tune's own key is read (see ``key_maps``); vocabulary keys follow ``vocab``.
        """
        self._check_key(key)
        self._check_task(task)
        if task in self._adapted:
            return self._adapter_delta(task, key)
        base = self.base_wide(key)
        diff = self._task_tensor(task, key, base) - base
        return diff if diff.dtype == torch.float32 else diff.to(torch.float32)

    def deltas(self, key: str) -> torch.Tensor:
        """Deltas of every task for ``key``, stacked: shape ``(T, *shape)``, fp32, CPU."""
        self._check_key(key)
        base = None  # read only when a full fine-tune needs it
        out = torch.empty((len(self.finetuned), *self.shape(key)), dtype=torch.float32)
        for i, task in enumerate(self.finetuned):  # filled in place: no list + stack copy
            if task in self._adapted:
                out[i] = self._adapter_delta(task, key)
                continue
            base = self.base_wide(key) if base is None else base
            torch.sub(self._task_tensor(task, key, base), base, out=out[i])
        return out

    def factors(self, task: str, key: str) -> LoraFactors | None:
        """The delta of ``task`` at ``key`` in low-rank form, without materialising it, or ``None``.

        For a task given as a PEFT adapter and a key with 2 or more dims: ``(A, B, scale)`` with
        ``delta(task, key) == (B @ A * scale).reshape(shape(key))`` (``A`` is ``(r, n)``, ``B`` is ``(m, r)``,
        fp32, in the base tensor's orientation; convolutions as ``(out, in * kernel)`` matrices); rank 0
        (``r == 0``) where the adapter leaves the key unchanged. ``None`` for full fine-tunes, 0/1-D keys
        and keys whose full tensor the adapter stores (a ``modules_to_save`` head), unless that tensor
        equals the base's and the key has a LoRA update (peft saves a targeted embedding or LM head beside
        its LoRA): that is read once to compare. See :meth:`is_factored`.
        """
        self._check_key(key)
        self._check_task(task)
        if task not in self._adapted:
            return None
        own = self._adapted[task].get(key)
        return _factored.factors(self.finetuned[task], own, self.shape(key),
                                 lambda: self._stored_is_base(task, key, own))

    def is_factored(self, task: str) -> bool:
        """Whether :meth:`factors` gives ``task``'s delta on every selected key with 2 or more dims: a PEFT
        adapter that stores no full matrix other than its LoRA'd embeddings' unchanged base weights."""
        self._check_task(task)
        if task not in self._adapted:
            return False
        ft, adapted = self.finetuned[task], self._adapted[task]
        return not any(len(self.shape(k)) >= 2 and adapted.get(k) in ft.full_keys
                       and not (adapted[k] in ft.lora_keys and self._stored_is_base(task, k, adapted[k]))
                       for k in self.keys)

    def _stored_is_base(self, task: str, key: str, own: str) -> bool:
        """Whether adapter ``task``'s stored full tensor of ``key`` equals the base's (cached per task and key)."""
        if (task, key) not in self._stored_base:
            ft = self.finetuned[task]
            stored, base = ft[ft.full_keys[own]], self._base[key]
            self._stored_base[task, key] = stored.dtype == base.dtype and torch.equal(stored, base)
        return self._stored_base[task, key]

    def _adapter_delta(self, task: str, key: str) -> torch.Tensor:
        """fp32 delta of adapter ``task`` at ``key`` (zero where it changes nothing), on the task vectors' rows."""
        return _factored.delta(self.finetuned[task], self._adapted[task].get(key), self.shape(key),
                               lambda: self._upcast(self._base, key), self._upcast)

    def finetuned_weights(self, task: str) -> Mapping[str, torch.Tensor]:
        """The weights of fine-tune ``task`` as a model holds them, for scoring it (``evaluate``).

        A full fine-tune: its checkpoint as given. A PEFT adapter: a lazy view of the base's keys, each
        ``base + delta`` in the base dtype (what ``merge_and_unload()`` gives), plus the task's extras
        (``modules_to_save`` heads) under their own names.
        """
        self._check_task(task)
        if task not in self._adapted:
            return self.finetuned[task]
        return _AppliedAdapter(self, task)

    def extra(self, task: str, key: str) -> torch.Tensor:
        """Tensor ``key`` that only fine-tune ``task`` has (one of ``extras[task]``), in its stored dtype."""
        self._check_task(task)
        if key not in self._extras[task]:
            raise KeyMismatchError(
                f"Key {key!r} is not an extra of task {task!r} ({self.finetuned[task].source}); its extras "
                f"(keys only it has) are {_keys.listing(self._extras[task]) or 'none'}."
            )
        ft = self.finetuned[task]
        return ft[ft.full_keys[key]] if isinstance(ft, AdapterCheckpoint) else ft[key]

    def _task_tensor(self, task: str, key: str, base: torch.Tensor) -> torch.Tensor:
        """Fine-tune ``task``'s ``key`` (upcast) on the task vectors' rows; ``base`` is the upcast base."""
        ft = self._upcast(self.finetuned[task], self._own[task].get(key, key))
        if key in self._sliced:
            return ft[: self.vocab.shared_rows]
        if self._rows and key in self.vocab.keys:
            n = self.vocab.shared_rows
            full = base.clone()  # rows this task lacks keep the base value: a zero delta there
            full[:n] = ft[:n]
            union_idx, task_idx = self._rows[task]
            full[union_idx] = ft[task_idx].to(full.dtype)
            return full
        return ft

    def _upcast(self, ckpt: Checkpoint, key: str) -> torch.Tensor:
        t = ckpt[key]
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(wide)
        # The scan is one reduction (weightlens._finite); a tensor found finite once is not scanned again
        # (checkpoints are read-only, and the set is shared with subset()s).
        seen = (id(ckpt._reader), key)
        if seen in self._finite:
            return t
        bad = count_nonfinite(t)
        if bad:
            raise NonFiniteError(
                f"{where(ckpt)} key {key!r}: {bad} of {t.numel()} values are NaN or Inf. "
                "Fix or drop that checkpoint (or exclude the key with exclude=...)."
            )
        self._finite.add(seen)
        return t

    def _check_key(self, key: str) -> None:
        if key not in self.base:
            raise KeyMismatchError(f"Key {key!r} is not in the base checkpoint {where(self.base)}.")
        if self.kind(key) == "skip":
            raise DTypeError(
                f"Key {key!r} of {where(self.base)} has dtype {self.base.dtype(key)}; task vectors "
                "need floating-point tensors (integer/bool buffers are skipped)."
            )

    def _check_task(self, task: str) -> None:
        if task not in self.finetuned:
            raise KeyMismatchError(f"Unknown task {task!r}; tasks are {self.names}.")

    def _is_float(self, key: str) -> bool:
        return self.kind(key) != "skip"

    # ------------------------------------------------------------------ construction
    def _align(self, key_map: Any) -> None:
        """Match every fine-tune's keys to the selected base keys; report a prefix found once."""
        maps = _keys.key_maps_per_task(key_map, self.names)
        self._own: dict[str, dict[str, str]] = {}
        self._renamed: dict[str, dict[str, str]] = {}
        self._extras: dict[str, tuple[str, ...]] = {}
        self._adapted: dict[str, dict[str, str]] = {}  # adapters: {base key: its key} of the keys it changes
        self._stored_base: dict[tuple[str, str], bool] = {}  # (adapter, key): its stored full tensor is the base's
        found = []
        for name, ft in self.finetuned.items():
            if isinstance(ft, AdapterCheckpoint):
                a = _factored.align(self.base, ft, self.keys, maps[name], self.include, self.exclude)
                self._adapted[name] = a.own
                a_own = {b: f for b, f in a.own.items() if b != f}
            else:
                a = _keys.align(self.base, ft, self.keys, maps[name], self.include, self.exclude)
                a_own = a.own
            self._own[name], self._renamed[name], self._extras[name] = a_own, a.renamed, a.extras
            if a.prefix is not None:
                strip, add = a.prefix
                how = f"'{strip}' + base key" if strip else f"the base key without '{add}'"
                extras = f", and {len(a.extras)} key(s) only it has: {_keys.listing(a.extras)}" if a.extras else ""
                found.append(f"{name!r}: {a.n_prefixed} keys named {how}{extras}")
        if found:
            warnings.warn(
                f"TaskVectors matched the fine-tunes' keys to base {where(self.base)} by prefix: "
                f"{'; '.join(found)}. Keys only a fine-tune has are kept per task, out of the merge. See "
                "tv.key_maps and tv.extras; pass key_map= to map keys otherwise.",
                KeyMapWarning, stacklevel=3,
            )

    def _validate(self, vocab: str | None) -> None:
        """Shapes and dtypes of the selected keys; first-dimension differences go to the vocabulary plan."""
        diffs: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for name, ft in self.finetuned.items():
            diffs[name] = {}
            if name in self._adapted:  # an adapter: its updates have the base's shapes, vocabulary rows too
                _factored.validate(self.base, ft, self._adapted[name])
                continue
            for key in self.keys:
                own = self._own[name].get(key, key)
                b, f = self.base.info(key), ft.info(own)
                if b.shape != f.shape:
                    if len(b.shape) != len(f.shape) or not b.shape or b.shape[1:] != f.shape[1:]:
                        raise ShapeMismatchError(
                            f"Shape mismatch for key {key!r}: base {where(self.base)} has {b.shape}, fine-tuned "
                            f"{where(ft)} has {f.shape}" + (f" (its key {own!r})" if own != key else "")
                            + ". Task vectors need equal shapes; leave the key out with exclude=[...] if it "
                            "differs by design."
                        )
                    diffs[name][key] = (b.shape, f.shape)
                if not f.dtype.is_floating_point:
                    raise DTypeError(
                        f"Dtype mismatch for key {key!r}: base {where(self.base)} has {b.dtype}, fine-tuned "
                        f"{where(ft)} has {f.dtype}; a task vector needs floating-point tensors on both sides."
                    )
        plan = _vocab.plan_vocab(self.base, self.finetuned, diffs, vocab)
        if plan is None:
            return
        self.vocab = plan.info
        if plan.info.rows > plan.info.shared_rows:  # "union" with added tokens
            self._rows = dict(plan.rows)
            self.base = _union_base(self._base, dict(self.finetuned), self._own, plan, self._upcast)
        else:  # "base", or a union that no tokenizer adds to: the fine-tunes are read on the base's rows
            self._sliced = frozenset(plan.info.keys)


def _union_base(base: Checkpoint, finetuned: dict[str, Checkpoint], own: dict[str, dict[str, str]],
                plan: _vocab.VocabPlan, upcast: Any) -> Checkpoint:
    """The base on the union rows: its own rows, then for each added token the mean (float64, cast to
    the base dtype) of the rows of the fine-tunes that have it. Computed per key on first read."""
    info, n = plan.info, plan.info.shared_rows
    infos = {k: base.info(k) for k in base}
    for key in info.keys:
        old = infos[key]
        infos[key] = TensorInfo((info.rows, *old.shape[1:]), old.dtype, old.file)
    added: dict[str, torch.Tensor] = {}  # key -> the added rows, kept (small: added tokens x width)

    def read(key: str) -> torch.Tensor:
        t = base[key]
        if key not in info.keys:
            return t
        if key not in added:
            total = torch.zeros((info.rows - n, *t.shape[1:]), dtype=torch.float64)
            count = torch.zeros(info.rows - n, dtype=torch.float64)
            for task, ft in finetuned.items():
                union_idx, task_idx = plan.rows[task]
                if len(union_idx):
                    total[union_idx - n] += upcast(ft, own[task].get(key, key))[task_idx].to(torch.float64)
                    count[union_idx - n] += 1
            added[key] = (total / count.reshape(-1, *[1] * (t.dim() - 1))).to(t.dtype)
        return torch.cat([t, added[key]])

    return Checkpoint(infos, read, name=base.name, source=base.source, hf_dir=base.hf_dir, metadata=base.metadata)


class _AppliedAdapter(Mapping[str, torch.Tensor]):
    """Base weights with one adapter applied (:meth:`TaskVectors.finetuned_weights`), computed per key read."""

    def __init__(self, tv: TaskVectors, task: str) -> None:
        self._tv, self._task = tv, task
        self._keys = [*tv.base, *(k for k in tv.extras[task] if k not in tv.base)]

    def __getitem__(self, key: str) -> torch.Tensor:
        tv = self._tv
        if key in tv.extras[self._task] and key not in tv.base:
            return tv.extra(self._task, key)
        base = tv.base[key]
        if key not in tv.keys:
            return base
        return (base.to(torch.float32) + tv.delta(self._task, key)).to(base.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
