"""Settings of :func:`weightlens.analysis.analyze` (:class:`AnalysisOptions`), validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weightlens._options import resolve_options as _resolve
from weightlens.analysis.signs import check_density
from weightlens.analysis.spectra import DEFAULT_ENERGY_RANKS, check_criterion
from weightlens.errors import InvalidParameterError

__all__ = ["AnalysisOptions", "resolve_options"]


@dataclass(frozen=True)
class AnalysisOptions:
    """Settings of :func:`analyze` beyond the data selection (all have defaults).

    Attributes
    ----------
    top_n : keep only the top-N singular triplets of matrices with ``min(m, n) > top_n``
        (``linalg.topk_svd``); energies stay exact (``||delta||_F`` is known), ``erank`` is NaN there.
    sar_criterion : ``"iso_script"`` (default, reproduces the Iso figures) or ``"paper"`` (Eq. 6);
        both are reported against the sum and a merged delta as ``sar_paper`` / ``sar_iso_script``;
        this picks ``sar`` and the one rule of the task x task SAR.
    eps : tolerance of both rank rules and of ``rank_eps`` (0.05).
    sign_density : TIES density for sign statistics (None: no trimming; the paper uses 0.2).
    trim_scope : ``"global"`` (whole-model threshold per task, the paper) or ``"tensor"`` (a threshold
        per tensor, as ``wl.merge(method="ties", scope="tensor")``; ``"local"`` is an alias).
    subspace_k : k of the top-k subspaces compared between tasks (default ``min(m, n) // T``).
    sti_k : per-task truncation for STI: an int, ``"r"`` for full rank, default ``min(m, n) // T``.
    entropy : ``"l1"`` (default) or ``"energy"`` spectral entropy for ``erank``.
    energy_ranks : ranks k of the ``energy_at_<k>`` columns.
    pairwise : compute task x task SAR, STI and subspace overlaps (needs per-task singular vectors).
    dtype : decomposition dtype (float32 or float64).
    """

    top_n: int | None = None
    sar_criterion: str = "iso_script"
    eps: float = 0.05
    sign_density: float | None = None
    trim_scope: str = "global"
    subspace_k: int | None = None
    sti_k: int | str | None = None
    entropy: str = "l1"
    energy_ranks: tuple[int, ...] = DEFAULT_ENERGY_RANKS
    pairwise: bool = True
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "sar_criterion", check_criterion(self.sar_criterion))
        check_density(self.sign_density)
        for name in ("top_n", "subspace_k", "sti_k"):
            value = getattr(self, name)
            if value is None or (name == "sti_k" and value == "r") or _positive_int(value):
                continue
            allowed = "None, 'r' or an int >= 1" if name == "sti_k" else "None or an int >= 1"
            raise InvalidParameterError(f"The {name!r} parameter must be {allowed}. Got {value!r} instead.")
        for name, allowed in (("trim_scope", ("global", "tensor", "local")), ("entropy", ("l1", "energy"))):
            if getattr(self, name) not in allowed:
                raise InvalidParameterError(
                    f"The {name!r} parameter must be one of {allowed}. Got {getattr(self, name)!r} instead."
                )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 < self.eps < 1.0:
            raise InvalidParameterError(f"The 'eps' parameter must be a float in (0, 1). Got {self.eps!r} instead.")
        if self.dtype not in (torch.float32, torch.float64):
            raise InvalidParameterError(
                f"The 'dtype' parameter must be torch.float32 or torch.float64. Got {self.dtype!r} instead."
            )
        object.__setattr__(self, "energy_ranks", tuple(int(k) for k in self.energy_ranks))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def resolve_options(options: AnalysisOptions | None, overrides: Mapping[str, Any]) -> AnalysisOptions:
    """``options`` (defaults when None) with ``overrides`` applied; unknown names raise."""
    return _resolve(AnalysisOptions, options, overrides, caller="analyze")
