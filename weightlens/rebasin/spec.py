"""Permutation specs: which permutation acts on which axis of which tensor, and applying them.

A :class:`PermutationSpec` maps every parameter key to a tuple with one entry per tensor axis. An entry
is ``None`` (the axis is not permuted), a permutation name, a :class:`Seg` (a permutation acting on
blocks of ``inner`` consecutive entries, as after flattening ``(C, H, W)`` into ``C*H*W``), or a tuple
of those (an axis made of consecutive segments, e.g. Q, K and V stacked in ``in_proj_weight``).

Head-structured attention is a :class:`HeadGroup`: one head permutation shared by Q, K, V and O, a
within-head permutation shared by Q and K rows, and another shared by V rows and O columns. Its axes
are named by the group's *views* ``"<group>.q"``, ``".k"``, ``".v"`` and ``".o"``.

Convention (Git Re-Basin): a permutation ``perm`` acts on an axis by index selection, so new position
``i`` holds old unit ``perm[i]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError

__all__ = [
    "HeadGroup", "HeadPerm", "PermutationSpec", "Permutations", "Seg",
    "axis_index", "head_dims", "permute_tensor", "shape_of",
]

VIEWS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Seg:
    """A permutation ``name`` acting on blocks of ``inner`` consecutive entries of an axis."""

    name: str
    inner: int = 1


Axis = tuple[Seg, ...] | None


@dataclass(frozen=True)
class HeadGroup:
    """Head-structured permutation of one attention block.

    Parameters
    ----------
    name : name of the group; its axes are named ``name + ".q"``, ``".k"``, ``".v"``, ``".o"``.
    n_heads : number of query heads.
    n_kv_heads : number of key/value heads (``None``: ``n_heads``; fewer for GQA, 1 for MQA).
    rope : rotary embeddings fix the within-head order of Q and K (sigma_qk is the identity).
    """

    name: str
    n_heads: int
    n_kv_heads: int | None = None
    rope: bool = False

    def __post_init__(self) -> None:
        kv = self.kv_heads
        if not (isinstance(self.n_heads, int) and self.n_heads > 0 and isinstance(kv, int) and kv > 0):
            raise InvalidParameterError(
                f"Head group {self.name!r}: n_heads and n_kv_heads must be positive integers; got "
                f"{self.n_heads!r} and {self.n_kv_heads!r}."
            )
        if self.n_heads % kv:
            raise InvalidParameterError(
                f"Head group {self.name!r}: n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}."
            )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (groups)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def q_per_group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.kv_heads

    def view(self, part: str) -> str:
        """Axis name of ``part`` in ``{"q", "k", "v", "o"}``."""
        return f"{self.name}.{part}"


@dataclass(frozen=True)
class HeadPerm:
    """Parts of one head-structured permutation (indexed by *new* group position ``g``).

    New query head ``(g, t)`` holds old head ``(group[g], qhead[g, t])``; inside it, new Q/K dim ``j``
    holds old dim ``qk[g, j]`` and new V/O dim ``j`` holds old dim ``vo[g, j]``.
    """

    group: torch.Tensor  # (G,)
    qhead: torch.Tensor  # (G, r)
    qk: torch.Tensor  # (G, d_qk)
    vo: torch.Tensor  # (G, d_vo)

    def views(self) -> dict[str, torch.Tensor]:
        """Flat index of each view ``{"q", "k", "v", "o"}`` (what :meth:`Permutations.apply` uses)."""
        g, r = self.qhead.shape
        d_qk, d_vo = self.qk.shape[1], self.vo.shape[1]
        head = self.group[:, None] * r + self.qhead  # old query head of new (g, t)
        return {
            "q": (head[:, :, None] * d_qk + self.qk[:, None, :]).reshape(-1),
            "k": (self.group[:, None] * d_qk + self.qk).reshape(-1),
            "v": (self.group[:, None] * d_vo + self.vo).reshape(-1),
            "o": (head[:, :, None] * d_vo + self.vo[:, None, :]).reshape(-1),
        }

    def inverse(self) -> HeadPerm:
        """The head permutation that undoes this one."""
        inv_group = torch.argsort(self.group)
        old = inv_group  # new group g of the inverse holds this one's group inv_group[g]
        return HeadPerm(
            inv_group,
            torch.argsort(self.qhead[old], dim=1),
            torch.argsort(self.qk[old], dim=1),
            torch.argsort(self.vo[old], dim=1),
        )


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _norm_axis(entry: object, key: str, axis: int) -> Axis:
    if entry is None:
        return None
    parts = entry if isinstance(entry, tuple | list) else (entry,)
    segs = []
    for part in parts:
        seg = Seg(part) if isinstance(part, str) else part
        if not (isinstance(seg, Seg) and isinstance(seg.name, str) and isinstance(seg.inner, int)
                and seg.inner > 0):
            raise InvalidParameterError(
                f"Axis {axis} of {key!r}: expected None, a permutation name, a Seg or a tuple of those; "
                f"got {entry!r}."
            )
        segs.append(seg)
    if not segs:
        raise InvalidParameterError(f"Axis {axis} of {key!r} is an empty tuple; use None for no permutation.")
    return tuple(segs)


def shape_of(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """Shape of one entry without reading it when the mapping knows shapes (a ``Checkpoint``)."""
    shape = getattr(state_dict, "shape", None)
    if callable(shape):
        return tuple(shape(key))
    return tuple(state_dict[key].shape)


class PermutationSpec:
    """Which permutation acts on each axis of each tensor.

    Parameters
    ----------
    axes : ``{key: (entry per axis)}``; entry: ``None``, a name, a :class:`Seg`, or a tuple of those.
        0-d tensors (``num_batches_tracked``) take ``()``.
    heads : head groups whose views (``"<group>.q"`` etc.) appear among the names.

    Examples
    --------
    >>> spec = PermutationSpec({"fc1.weight": ("h", None), "fc1.bias": ("h",), "fc2.weight": (None, "h")})
    >>> spec.perm_to_axes["h"]
    [('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)]
    """

    def __init__(
        self, axes: Mapping[str, Sequence[object]], heads: Iterable[HeadGroup] = ()
    ) -> None:
        norm: dict[str, tuple[Axis, ...]] = {}
        for key, entries in axes.items():
            if not isinstance(entries, tuple | list):
                raise InvalidParameterError(
                    f"Spec entry of {key!r} must be a tuple with one entry per tensor axis, e.g. "
                    f"({entries!r},) for a vector; got {entries!r}."
                )
            norm[key] = tuple(_norm_axis(e, key, i) for i, e in enumerate(entries))
        self._axes = norm
        self._heads: dict[str, HeadGroup] = {}
        for group in heads:
            if group.name in self._heads:
                raise InvalidParameterError(f"Head group {group.name!r} is declared twice.")
            self._heads[group.name] = group
        self._view_of = {g.view(p): (g.name, p) for g in self._heads.values() for p in VIEWS}
        self._check_names()
        self.perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for key, entries in self._axes.items():
            for i, axis in enumerate(entries):
                for name in dict.fromkeys(s.name for s in axis or ()):
                    self.perm_to_axes.setdefault(name, []).append((key, i))

    def _check_names(self) -> None:
        for key, entries in self._axes.items():
            seen: dict[str, int] = {}
            for i, axis in enumerate(entries):
                for seg in axis or ():
                    if seg.name in self._heads:
                        raise InvalidParameterError(
                            f"Axis {i} of {key!r} names the head group {seg.name!r}; name one of its "
                            f"views instead: {', '.join(self._heads[seg.name].view(p) for p in VIEWS)}."
                        )
                    unit = self.unit_of(seg.name)
                    if seen.get(unit, i) != i:
                        raise InvalidParameterError(
                            f"Permutation {unit!r} acts on two axes ({seen[unit]} and {i}) of {key!r}; one "
                            f"permutation may appear on only one axis of a tensor."
                        )
                    seen[unit] = i

    # ------------------------------------------------------------------ views of the spec
    @property
    def axes(self) -> Mapping[str, tuple[Axis, ...]]:
        """Normalised entries: ``{key: (None or tuple of Seg, ...)}``."""
        return self._axes

    @property
    def heads(self) -> Mapping[str, HeadGroup]:
        """Head groups by name."""
        return self._heads

    @property
    def keys(self) -> list[str]:
        """Keys the spec covers, in spec order."""
        return list(self._axes)

    @property
    def units(self) -> list[str]:
        """What matching solves: plain permutation names, then head-group names."""
        plain = [n for n in self.perm_to_axes if n not in self._view_of]
        return plain + list(self._heads)

    def unit_of(self, name: str) -> str:
        """The unit an axis name belongs to: its head group for a view, else itself."""
        view = self._view_of.get(name)
        return view[0] if view else name

    def __contains__(self, key: object) -> bool:
        return key in self._axes

    def __len__(self) -> int:
        return len(self._axes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._axes)

    def __or__(self, other: PermutationSpec) -> PermutationSpec:
        both = set(self._axes) & set(other._axes)
        if both:
            raise InvalidParameterError(
                f"Cannot combine specs that both cover {sorted(both)[:5]}; give each key once."
            )
        return PermutationSpec({**self._axes, **other._axes}, [*self._heads.values(), *other._heads.values()])

    def __repr__(self) -> str:
        return (
            f"PermutationSpec({len(self._axes)} keys, {len(self.units) - len(self._heads)} permutations, "
            f"{len(self._heads)} head groups)"
        )

    def describe(self) -> str:
        """One line per key: ``key: (axis entries)``."""

        def fmt(axis: Axis) -> str:
            if axis is None:
                return "-"
            return "+".join(s.name if s.inner == 1 else f"{s.name}x{s.inner}" for s in axis)

        return "\n".join(f"{k}: ({', '.join(fmt(a) for a in v)})" for k, v in self._axes.items())

    # ------------------------------------------------------------------ validation
    def sizes(self, state_dict: Mapping[str, torch.Tensor], *, name: str = "state dict") -> dict[str, int]:
        """Check the spec against a state dict and return the size of every axis name.

        Raises
        ------
        KeyMismatchError
            Spec keys missing from the state dict.
        ShapeMismatchError
            An entry count that is not the tensor's ``ndim``, or axes that disagree on a size.
        """
        missing = [k for k in self._axes if k not in state_dict]
        if missing:
            raise KeyMismatchError(
                f"The permutation spec names {len(missing)} key(s) missing from the {name}: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Build the spec from this "
                f"checkpoint (or one with the same keys)."
            )
        shapes = {k: shape_of(state_dict, k) for k in self._axes}
        for key, entries in self._axes.items():
            if len(entries) != len(shapes[key]):
                raise ShapeMismatchError(
                    f"The spec gives {len(entries)} axis entries for {key!r} but the {name} has shape "
                    f"{shapes[key]} ({len(shapes[key])} axes)."
                )
        return _solve_sizes(self, shapes, name)


def _coefficients(spec: PermutationSpec, seg: Seg) -> tuple[str, int]:
    """Unknown variable of a segment and its coefficient: size(seg) = coef * inner * var."""
    view = spec._view_of.get(seg.name)
    if view is None:
        return seg.name, seg.inner
    group = spec.heads[view[0]]
    per = group.n_heads if view[1] in "qo" else group.kv_heads
    return f"{group.name}#{'qk' if view[1] in 'qk' else 'vo'}", per * seg.inner


def _solve_sizes(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], name: str) -> dict[str, int]:
    """Solve every axis's ``length = sum(coef * var)`` for the unknown sizes, one unknown at a time."""
    eqs = []
    for key, entries in spec.axes.items():
        for i, axis in enumerate(entries):
            if axis is not None:
                eqs.append((key, i, shapes[key][i], [_coefficients(spec, s) for s in axis]))
    value: dict[str, tuple[int, str]] = {}
    pending = eqs
    while pending:
        left = []
        for key, i, length, terms in pending:
            unknown = {v for v, _ in terms if v not in value}
            known = sum(c * value[v][0] for v, c in terms if v in value)
            if not unknown:
                if known != length:
                    detail = "; ".join(f"{v.split('#')[0]} = {value[v][0]} from {value[v][1]}" for v, _ in terms)
                    raise ShapeMismatchError(
                        f"Axis {i} of {key!r} in the {name} has length {length} but the spec implies {known} "
                        f"({detail}). Check the spec entries for these keys."
                    )
            elif len(unknown) == 1:
                var = unknown.pop()
                coef = sum(c for v, c in terms if v == var)
                size, rest = divmod(length - known, coef)
                if rest or size <= 0:
                    raise ShapeMismatchError(
                        f"Axis {i} of {key!r} in the {name} has length {length}, which does not split into "
                        f"the segments the spec gives ({', '.join(v.split('#')[0] for v, _ in terms)})."
                    )
                value[var] = (size, f"axis {i} of {key!r}")
            else:
                left.append((key, i, length, terms))
        if len(left) == len(pending):
            key, i = left[0][0], left[0][1]
            raise ShapeMismatchError(
                f"Cannot infer the sizes of {sorted({v for _, _, _, t in left for v, _ in t if v not in value})} "
                f"(first at axis {i} of {key!r}): each needs an axis where it is the only unknown."
            )
        pending = left
    sizes = {n: value[n][0] for n in spec.perm_to_axes if n not in spec._view_of}
    for group in spec.heads.values():
        for part in VIEWS:
            var = f"{group.name}#{'qk' if part in 'qk' else 'vo'}"
            if var in value:
                per = group.n_heads if part in "qo" else group.kv_heads
                sizes[group.view(part)] = per * value[var][0]
    return sizes


def head_dims(spec: PermutationSpec, sizes: Mapping[str, int], group: str) -> tuple[int, int]:
    """``(d_qk, d_vo)`` of a head group (0 where no axis of the spec uses those views)."""
    g = spec.heads[group]
    d_qk = sizes[g.view("k")] // g.kv_heads if g.view("k") in sizes else sizes.get(g.view("q"), 0) // g.n_heads
    d_vo = sizes[g.view("v")] // g.kv_heads if g.view("v") in sizes else sizes.get(g.view("o"), 0) // g.n_heads
    return d_qk, d_vo


# ---------------------------------------------------------------------------------- permutations


def axis_index(axis: tuple[Seg, ...], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Full index along one axis: each segment's permutation expanded by its ``inner`` block size."""
    parts, offset = [], 0
    for seg in axis:
        perm = perms[seg.name]
        idx = (perm[:, None] * seg.inner + torch.arange(seg.inner)).reshape(-1) + offset
        parts.append(idx)
        offset += perm.numel() * seg.inner
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def permute_tensor(
    t: torch.Tensor, axes: tuple[Axis, ...], perms: Mapping[str, torch.Tensor], skip: int | None = None
) -> torch.Tensor:
    """Apply ``perms`` along every permuted axis of ``t`` (except axis ``skip``)."""
    for i, axis in enumerate(axes):
        if axis is not None and i != skip:
            t = t.index_select(i, axis_index(axis, perms).to(t.device))
    return t


@dataclass(frozen=True, eq=False)
class Permutations:
    """One permutation per name of a spec, as found by matching (or drawn at random).

    Attributes
    ----------
    spec : the spec the permutations follow.
    perms : ``{axis name: LongTensor}`` for plain permutations and every head-group view.
    heads : ``{group: HeadPerm}``, the structured parts of each head group.
    objective_history : ``<a, pi(b)>`` (float64, over the spec's float keys) at the start and after
        each sweep; empty when not produced by matching.
    """

    spec: PermutationSpec
    perms: dict[str, torch.Tensor]
    heads: dict[str, HeadPerm] = field(default_factory=dict)
    objective_history: tuple[float, ...] = ()

    @classmethod
    def from_parts(
        cls, spec: PermutationSpec, plain: Mapping[str, torch.Tensor], heads: Mapping[str, HeadPerm],
        objective_history: Sequence[float] = (),
    ) -> Permutations:
        """Assemble from plain permutations and head parts (computes the flat view indices)."""
        perms = {n: p.long().cpu() for n, p in plain.items()}
        for name, hp in heads.items():
            for part, idx in hp.views().items():
                perms[spec.heads[name].view(part)] = idx
        return cls(spec, perms, dict(heads), tuple(float(v) for v in objective_history))

    @classmethod
    def identity(cls, spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> Permutations:
        """Identity permutations with the sizes ``state_dict`` gives."""
        return cls.random(spec, state_dict, seed=None)

    @classmethod
    def random(
        cls, spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], *, seed: int | None = 0
    ) -> Permutations:
        """Uniformly random permutations that honour head structure, RoPE and GQA (``seed=None``: identity)."""
        sizes = spec.sizes(state_dict)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def draw(*shape: int) -> torch.Tensor:
            base = torch.arange(shape[-1]).expand(*shape).clone()
            if gen is None:
                return base
            return torch.argsort(torch.rand(*shape, generator=gen), dim=-1)

        plain = {n: draw(sizes[n]) for n in spec.units if n not in spec.heads}
        heads = {}
        for name, g in spec.heads.items():
            d_qk, d_vo = head_dims(spec, sizes, name)
            qk = torch.arange(d_qk).expand(g.kv_heads, d_qk).clone() if g.rope else draw(g.kv_heads, d_qk)
            heads[name] = HeadPerm(draw(g.kv_heads), draw(g.kv_heads, g.q_per_group), qk, draw(g.kv_heads, d_vo))
        return cls.from_parts(spec, plain, heads)

    @property
    def objective(self) -> float | None:
        """Last value of :attr:`objective_history` (``None`` when empty)."""
        return self.objective_history[-1] if self.objective_history else None

    def inverse(self) -> Permutations:
        """The permutations that undo these: ``p.inverse().apply(p.apply(sd)) == sd``."""
        plain = {n: torch.argsort(p) for n, p in self.perms.items() if self.spec.unit_of(n) == n}
        heads = {n: hp.inverse() for n, hp in self.heads.items()}
        return Permutations.from_parts(self.spec, plain, heads)

    def compose(self, first: Permutations) -> Permutations:
        """Permutations equal to applying ``first``, then ``self``."""
        plain = {n: first.perms[n][p] for n, p in self.perms.items() if self.spec.unit_of(n) == n}
        heads = {}
        for n, hp in self.heads.items():
            f = first.heads[n]
            g = hp.group
            heads[n] = HeadPerm(f.group[g], torch.gather(f.qhead[g], 1, hp.qhead),
                                torch.gather(f.qk[g], 1, hp.qk), torch.gather(f.vo[g], 1, hp.vo))
        return Permutations.from_parts(self.spec, plain, heads)

    def equals(self, other: Permutations) -> bool:
        """Whether every permutation is the same."""
        return self.perms.keys() == other.perms.keys() and all(
            torch.equal(p, other.perms[n]) for n, p in self.perms.items()
        )

    def is_identity(self) -> bool:
        """Whether every permutation is the identity."""
        return all(torch.equal(p, torch.arange(p.numel())) for p in self.perms.values())

    def apply(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Permute every key of the spec; other keys are passed through unchanged.

        Raises
        ------
        KeyMismatchError, ShapeMismatchError
            The state dict lacks spec keys or its sizes differ from these permutations'.
        """
        sizes = self.spec.sizes(state_dict)
        for n, size in sizes.items():
            if n in self.perms and self.perms[n].numel() != size:
                key, axis = self.spec.perm_to_axes[n][0]
                raise ShapeMismatchError(
                    f"Permutation {n!r} has size {self.perms[n].numel()} but axis {axis} of {key!r} implies "
                    f"{size}: these permutations were found for models of another shape."
                )
        out = {}
        for key in state_dict:
            t = state_dict[key]
            out[key] = permute_tensor(t, self.spec.axes[key], self.perms) if key in self.spec else t
        return out

    def __repr__(self) -> str:
        moved = sum(int((p != torch.arange(p.numel())).sum()) for n, p in self.perms.items()
                    if self.spec.unit_of(n) == n)
        return (f"Permutations({len(self.perms)} axis names, {len(self.heads)} head groups, "
                f"{moved} units moved, objective={self.objective})")

