"""What a permutation did: per-layer distances and singular-vector alignment, before and after.

Both functions compare model ``a`` with model ``b`` as given ("before") and with ``pi(b)`` ("after"),
for every floating key of the spec with a permuted axis. They return tidy pandas tables for
:mod:`weightlens.figures.rebasin`.

* :func:`layer_distances`: ``||a - b||_F`` and ``||a - pi(b)||_F`` per key, and the same divided by
  ``sqrt(||a||^2 + ||b||^2)``, which is 1 for two unrelated tensors (orthogonal, any norms) and 0 for
  equal ones. Permutations do not change norms, so only the inner product ``<a, pi(b)>`` moves.
* :func:`singular_alignment`: for each weight matrix (a conv kernel ``(out, in, *k)`` as ``(out, in*prod(k))``)
  the cosines ``|<u_i^A, u_i^B>|`` of the top-``k`` left singular vectors and ``|<v_i^A, v_i^B>|`` of the
  right ones, and the overlap ``||U_k^A.T U_k^B||_F^2 / k`` of the top-``k`` subspaces (1 when they
  coincide, ``k / d`` on average for random ones). A permutation only reorders the rows of ``U_B``
  (and ``V_B``), so ``b`` is decomposed once: ``pi(b) = P_out B P_in^T`` has ``U = P_out U_B`` and the
  same singular values.

Per-vector cosines are exact only for well separated singular values: where two are close the
vectors can rotate inside their shared plane and a cosine drops although the subspace is aligned;
the subspace overlap does not have this problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.rebasin._cost import as_state_dict
from weightlens.rebasin.spec import Permutations, PermutationSpec, permute_tensor

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SingularAlignment", "layer_distances", "singular_alignment"]

StateDict = Mapping[str, torch.Tensor]


def _kind(shape: tuple[int, ...]) -> str:
    return {0: "scalar", 1: "vector", 2: "matrix"}.get(len(shape), "conv")


def _keys(spec: PermutationSpec, a: StateDict, keys: Sequence[str] | None, min_ndim: int) -> list[str]:
    """Spec keys with a permuted axis, floating, at least ``min_ndim`` axes (or the given ones, checked)."""
    if keys is not None:
        unknown = [k for k in keys if k not in spec]
        if unknown:
            raise KeyMismatchError(
                f"Keys {unknown[:5]} are not in the permutation spec; choose among {spec.keys[:8]}..."
            )
        return list(keys)
    out = []
    for key, axes in spec.axes.items():
        t = a[key]
        if t.is_floating_point() and t.ndim >= min_ndim and any(ax is not None for ax in axes):
            out.append(key)
    return out


def _resolve(a: object, b: object, spec: PermutationSpec, permutations: Permutations | None) -> tuple:
    if not isinstance(spec, PermutationSpec):
        raise InvalidParameterError(f"The 'spec' parameter must be a PermutationSpec. Got {type(spec).__name__}.")
    a, b = as_state_dict(a), as_state_dict(b)
    if permutations is None:
        permutations = Permutations.identity(spec, b)
    elif not isinstance(permutations, Permutations):
        raise InvalidParameterError(
            f"The 'permutations' parameter must be a Permutations (from weight_matching) or None. Got "
            f"{type(permutations).__name__} instead."
        )
    return a, b, permutations


def layer_distances(
    a: object,
    b: object,
    spec: PermutationSpec,
    permutations: Permutations | None = None,
    *,
    keys: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Distance of every permuted tensor of ``b`` to ``a``, before and after permuting ``b``.

    Parameters
    ----------
    a, b : checkpoint sources or state dicts of one architecture.
    spec : the permutation spec.
    permutations : what to apply to ``b`` (``None``: identity, so before == after).
    keys : keys to report (default: every floating spec key with a permuted axis).

    Returns
    -------
    pandas.DataFrame
        One row per key: ``key``, ``kind`` (``"matrix"``, ``"vector"``, ``"conv"``), ``numel``,
        ``norm_a``, ``norm_b``, ``before``, ``after`` (Frobenius distances), ``relative_before``,
        ``relative_after`` (divided by ``sqrt(norm_a^2 + norm_b^2)``) and ``reduction``
        (``1 - after / before``).

    Examples
    --------
    >>> import torch
    >>> from weightlens.rebasin import PermutationSpec, Permutations
    >>> spec = PermutationSpec({"w1": ("h", None), "w2": (None, "h")})
    >>> a = {"w1": torch.randn(4, 3), "w2": torch.randn(2, 4)}
    >>> p = Permutations.random(spec, a, seed=1)
    >>> d = layer_distances(a, p.apply(a), spec, p.inverse())
    >>> float(d["after"].max())
    0.0
    """
    import pandas as pd

    a, b, perms = _resolve(a, b, spec, permutations)
    rows = []
    for key in _keys(spec, a, keys, min_ndim=1):
        ta, tb = a[key].detach().double(), b[key].detach().double()
        tp = permute_tensor(tb, spec.axes[key], perms.perms)
        na, nb = float(ta.norm()), float(tb.norm())
        before, after = float((ta - tb).norm()), float((ta - tp).norm())
        scale = math.sqrt(na * na + nb * nb) or 1.0
        rows.append({
            "key": key, "kind": _kind(tuple(ta.shape)), "numel": ta.numel(), "norm_a": na, "norm_b": nb,
            "before": before, "after": after, "relative_before": before / scale, "relative_after": after / scale,
            "reduction": 1.0 - after / before if before > 0 else float("nan"),
        })
    return pd.DataFrame(rows, columns=["key", "kind", "numel", "norm_a", "norm_b", "before", "after",
                                       "relative_before", "relative_after", "reduction"])


@dataclass(frozen=True, eq=False)
class SingularAlignment:
    """Alignment of the top singular vectors of ``a`` and ``b`` per layer, before and after matching.

    Attributes
    ----------
    vectors : pandas.DataFrame
        One row per (``key``, ``side`` in {"left", "right"}, ``index`` i): ``sigma_a``, ``sigma_b`` (the
        i-th singular values), ``before`` = ``|<u_i^A, u_i^B>|`` and ``after`` = ``|<u_i^A, u_i^{pi(B)}>|``
        (``v`` for the right side).
    layers : pandas.DataFrame
        One row per (``key``, ``side``): ``k``, ``dim``, ``mean_before``, ``mean_after`` (mean cosine over
        the top ``k``), ``overlap_before``, ``overlap_after`` (``||U_k^A.T U_k^B||_F^2 / k``) and
        ``chance`` (``k / dim``, the expected overlap of random subspaces).
    k : int
        Singular vectors compared per layer (at most).
    """

    vectors: pd.DataFrame
    layers: pd.DataFrame
    k: int

    def __repr__(self) -> str:
        after = self.layers["overlap_after"].mean() if len(self.layers) else float("nan")
        before = self.layers["overlap_before"].mean() if len(self.layers) else float("nan")
        return (f"SingularAlignment({self.layers['key'].nunique()} layers, top {self.k}, mean subspace overlap "
                f"{before:.3f} -> {after:.3f})")


def _index_along(shape: tuple[int, ...], axes: tuple, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Where each entry of a flattened ``shape`` comes from after permuting ``axes`` (gather index)."""
    flat = torch.arange(math.prod(shape)).reshape(shape)
    return permute_tensor(flat, axes, perms).reshape(-1)


def _side_rows(key: str, side: str, ua: torch.Tensor, ub: torch.Tensor, ubp: torch.Tensor,
               sa: torch.Tensor, sb: torch.Tensor, k: int) -> tuple[list[dict], dict]:
    """Rows of one side: ``ua``, ``ub``, ``ubp`` are (dim, k) singular vectors of a, b and pi(b)."""
    before = (ua * ub).sum(0).abs()
    after = (ua * ubp).sum(0).abs()
    rows = [{"key": key, "side": side, "index": i, "sigma_a": float(sa[i]), "sigma_b": float(sb[i]),
             "before": float(before[i]), "after": float(after[i])} for i in range(k)]
    dim = ua.shape[0]
    layer = {
        "key": key, "side": side, "k": k, "dim": dim,
        "mean_before": float(before.mean()), "mean_after": float(after.mean()),
        "overlap_before": float((ua.T @ ub).square().sum()) / k,
        "overlap_after": float((ua.T @ ubp).square().sum()) / k, "chance": k / dim,
    }
    return rows, layer


def singular_alignment(
    a: object,
    b: object,
    spec: PermutationSpec,
    permutations: Permutations | None = None,
    *,
    k: int = 16,
    keys: Sequence[str] | None = None,
    device: str | torch.device = "auto",
) -> SingularAlignment:
    """Cosines of the top-``k`` singular vectors of each layer of ``a`` and ``b``, before and after.

    Parameters
    ----------
    a, b : checkpoint sources or state dicts of one architecture.
    spec : the permutation spec.
    permutations : what to apply to ``b`` (``None``: identity).
    k : top singular vectors per layer (fewer where the matrix is smaller).
    keys : weight keys (2-D or more) to report (default: every one with a permuted axis).
    device : where to decompose (see :func:`weightlens.linalg.svd`).

    Returns
    -------
    SingularAlignment
        ``.vectors`` per singular vector and ``.layers`` per layer (see the class).

    Examples
    --------
    >>> import torch
    >>> from weightlens.rebasin import PermutationSpec, Permutations
    >>> spec = PermutationSpec({"w1": ("h", None), "w2": (None, "h")})
    >>> a = {"w1": torch.randn(6, 5), "w2": torch.randn(3, 6)}
    >>> p = Permutations.random(spec, a, seed=1)
    >>> al = singular_alignment(a, p.apply(a), spec, p.inverse(), k=3)
    >>> bool((al.vectors["after"] > 0.999).all())
    True
    """
    from weightlens.linalg import svd

    import pandas as pd

    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise InvalidParameterError(f"The 'k' parameter must be an int >= 1. Got {k!r} instead.")
    a, b, perms = _resolve(a, b, spec, permutations)
    rows: list[dict] = []
    layers: list[dict] = []
    for key in _keys(spec, a, keys, min_ndim=2):
        ta, tb = a[key].detach(), b[key].detach()
        shape = tuple(tb.shape)
        if len(shape) < 2:
            raise InvalidParameterError(f"singular_alignment needs weight matrices; {key!r} has shape {shape}.")
        fa, sa, vha = svd(ta.reshape(shape[0], -1), device=device, dtype=torch.float64, name=key)
        fb, sb, vhb = svd(tb.reshape(shape[0], -1), device=device, dtype=torch.float64, name=key)
        fa, sa, va, fb, sb, vb = (t.cpu() for t in (fa, sa, vha.mT, fb, sb, vhb.mT))
        axes = spec.axes[key]
        rows_idx = _index_along(shape[:1], axes[:1], perms.perms)
        cols_idx = _index_along(shape[1:], axes[1:], perms.perms)
        kk = min(k, sa.numel())
        for side, ua, ub, idx in (("left", fa, fb, rows_idx), ("right", va, vb, cols_idx)):
            r, layer = _side_rows(key, side, ua[:, :kk], ub[:, :kk], ub[idx, :kk], sa, sb, kk)
            rows += r
            layers.append(layer)
    return SingularAlignment(pd.DataFrame(rows, columns=["key", "side", "index", "sigma_a", "sigma_b", "before",
                                                         "after"]),
                             pd.DataFrame(layers, columns=["key", "side", "k", "dim", "mean_before", "mean_after",
                                                           "overlap_before", "overlap_after", "chance"]), k)
