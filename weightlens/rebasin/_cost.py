"""Cost matrices of weight matching, kept up to date incrementally.

For an axis name ``P`` the cost is ``C_P = sum over sites of A_site @ B_site.T``: one site per
(key, axis, segment) that ``P`` permutes, ``A_site`` the rows of ``a[key]`` along that axis and
``B_site`` those of ``b[key]`` with every *other* permutation applied. Each site's contribution is
cached with the index of the other permuted axis it was built with:

* no other permuted axis (first layer, biases, norms): computed once;
* one other permuted axis (almost every weight): when ``k`` of its entries changed since, the
  contribution is corrected by a rank-``k`` product instead of rebuilt (exact up to rounding);
  more than half changed: rebuilt;
* two or more other permuted axes: rebuilt at every visit.

The same caches give ``<a, pi(b)>`` in O(n) per key whenever a site of the key is current.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from weightlens.errors import ShapeMismatchError
from weightlens.rebasin.spec import PermutationSpec, axis_index, permute_tensor

StateDict = Mapping[str, torch.Tensor]


def as_state_dict(source: object) -> StateDict:
    """A mapping passes through; any other checkpoint source goes through ``weightlens.load``."""
    if isinstance(source, Mapping):
        return source
    from weightlens.io import load

    return load(source)


def work_device(device: str | torch.device | None) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the cost matrices: the CPU in float64 unless a device is named."""
    if device is None:
        return torch.device("cpu"), torch.float64
    from weightlens.linalg import resolve_device

    dev = resolve_device(device)
    return dev, (torch.float64 if dev.type == "cpu" else torch.float32)


@dataclass(eq=False)
class Site:
    """One (key, axis, segment) an axis name permutes, with its cached contribution."""

    key: str
    name: str
    axis: int
    start: int
    length: int
    n: int
    others: tuple[int, ...]  # other permuted axes of the key
    c: torch.Tensor | None = None
    idx: torch.Tensor | None = None  # index of the one other axis when ``c`` was built


class Problem:
    """Float tensors of ``a`` and ``b`` on the working device, their sites and cached costs."""

    def __init__(self, spec: PermutationSpec, a: StateDict, b: StateDict, device: str | torch.device | None):
        self.spec = spec
        self.sizes = spec.sizes(a, name="first model (a)")
        spec.sizes(b, name="second model (b)")
        self.device, self.dtype = work_device(device)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for key in spec.keys:
            ta, tb = a[key], b[key]
            if ta.shape != tb.shape:
                raise ShapeMismatchError(
                    f"{key!r} has shape {tuple(ta.shape)} in a but {tuple(tb.shape)} in b; matching needs "
                    f"two models of one architecture."
                )
            if ta.is_floating_point():
                self.a[key] = ta.detach().to(self.device, self.dtype)
                self.b[key] = tb.detach().to(self.device, self.dtype)
        self.sites: dict[str, list[Site]] = {}
        self.by_key: dict[str, dict[int, list[Site]]] = {}
        self._constant: dict[str, float] = {}
        deps: dict[str, set[str]] = {u: set() for u in spec.units}
        for key in self.a:
            self._add_sites(key, deps)
        self.deps = {u: tuple(sorted(d)) for u, d in deps.items()}

    def _add_sites(self, key: str, deps: dict[str, set[str]]) -> None:
        entries = self.spec.axes[key]
        permuted = [i for i, ax in enumerate(entries) if ax is not None]
        here = {self.spec.unit_of(s.name) for ax in entries for s in ax or ()}
        for i in permuted:
            start = 0
            for seg in entries[i]:  # type: ignore[union-attr]
                n = self.sizes[seg.name]
                site = Site(key, seg.name, i, start, n * seg.inner, n, tuple(j for j in permuted if j != i))
                self.sites.setdefault(seg.name, []).append(site)
                self.by_key.setdefault(key, {}).setdefault(i, []).append(site)
                start += n * seg.inner
                unit = self.spec.unit_of(seg.name)
                deps[unit] |= here - {unit}

    # ------------------------------------------------------------------ contributions
    def _rows(self, t: torch.Tensor, s: Site) -> torch.Tensor:
        return t.narrow(s.axis, s.start, s.length)

    def _blocks(self, t: torch.Tensor, s: Site) -> torch.Tensor:
        """``(n, inner, d_other, rest)`` view of a site with one other permuted axis."""
        moved = self._rows(t, s).movedim((s.axis, s.others[0]), (0, 1))
        return moved.reshape(s.n, s.length // s.n, moved.shape[1], -1)

    def _contribution(self, s: Site, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a, b = self.a[s.key], self.b[s.key]
        if not s.others:
            if s.c is None:
                s.c = self._rows(a, s).movedim(s.axis, 0).reshape(s.n, -1) @ \
                    self._rows(b, s).movedim(s.axis, 0).reshape(s.n, -1).T
            return s.c
        if len(s.others) > 1:
            pb = permute_tensor(b, self.spec.axes[s.key], perms, skip=s.axis)
            return self._rows(a, s).movedim(s.axis, 0).reshape(s.n, -1) @ \
                self._rows(pb, s).movedim(s.axis, 0).reshape(s.n, -1).T
        idx = axis_index(self.spec.axes[s.key][s.others[0]], perms).to(self.device)  # type: ignore[arg-type]
        a4, b4 = self._blocks(a, s), self._blocks(b, s)
        if s.c is not None:
            changed = torch.nonzero(idx != s.idx).squeeze(1)
            if changed.numel() == 0:
                return s.c
            if 2 * changed.numel() <= idx.numel():
                da = a4.index_select(2, changed).reshape(s.n, -1)
                db = (b4.index_select(2, idx[changed]) - b4.index_select(2, s.idx[changed])).reshape(s.n, -1)
                s.c.addmm_(da, db.T)
                s.idx = idx
                return s.c
        s.c = a4.reshape(s.n, -1) @ b4.index_select(2, idx).reshape(s.n, -1).T
        s.idx = idx
        return s.c

    def cost(self, name: str, perms: Mapping[str, torch.Tensor]) -> np.ndarray:
        """``C`` of one axis name (n x n, float64 NumPy, a copy) with all other permutations applied."""
        n = self.sizes.get(name, 0)
        total = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        for s in self.sites.get(name, ()):
            total += self._contribution(s, perms)
        return total.to("cpu", torch.float64).numpy()

    # ------------------------------------------------------------------ objective
    def _fresh(self, s: Site, perms: Mapping[str, torch.Tensor]) -> bool:
        if s.c is None or len(s.others) > 1:
            return False
        if not s.others:
            return True
        idx = axis_index(self.spec.axes[s.key][s.others[0]], perms).to(self.device)  # type: ignore[arg-type]
        return torch.equal(idx, s.idx)

    def _key_value(self, key: str, perms: Mapping[str, torch.Tensor]) -> float:
        for sites in self.by_key.get(key, {}).values():
            if all(self._fresh(s, perms) for s in sites):
                return sum(float(s.c.gather(1, perms[s.name].to(self.device)[:, None]).double().sum()) for s in sites)
        if key not in self.by_key:  # no permuted axis: a constant
            if key not in self._constant:
                a, b = self.a[key].reshape(-1).double(), self.b[key].reshape(-1).double()
                self._constant[key] = float(torch.dot(a, b))
            return self._constant[key]
        pb = permute_tensor(self.b[key], self.spec.axes[key], perms)
        return float(torch.dot(self.a[key].reshape(-1).double(), pb.reshape(-1).double()))

    def objective(self, perms: Mapping[str, torch.Tensor]) -> float:
        """``sum_key <a[key], pi(b)[key]>`` (float64 sums; O(n) per key whose cached cost is current)."""
        return sum(self._key_value(key, perms) for key in self.a)
