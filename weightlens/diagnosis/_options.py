"""``DiagnoseOptions``: the settings of :func:`weightlens.diagnosis.diagnose` beyond its inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightlens.analysis.spectra import check_criterion
from weightlens.errors import InvalidParameterError

__all__ = ["DiagnoseOptions", "lower_is_better"]


def lower_is_better(metric: str) -> bool:
    """Whether a smaller ``metric`` is better: its name holds ``loss``, ``error`` or ``perplexity``."""
    name = metric.lower()
    return any(word in name for word in ("loss", "error", "perplexity"))


def _count(name: str, value: object, *, none: bool = False) -> None:
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "a non-negative int or None" if none else "a non-negative int"
        raise InvalidParameterError(f"The '{name}' parameter of diagnose must be {allowed}. Got {value!r} instead.")


@dataclass(frozen=True)
class DiagnoseOptions:
    """How :func:`~weightlens.diagnosis.diagnose` reads the weights and, with ``evaluate=``, what it measures.

    Attributes
    ----------
    criterion : {"paper", "iso_script"}, default="paper"
        Rank rule of every top-k subspace (the merged update's and each task's), at tolerance ``eps``
        (``docs/methods.md#sar``).
    eps : float, default=0.05
        Tolerance of the rank rule, in (0, 1).
    device : str or torch.device, default="auto"
        Where decompositions run for plain merged weights; a merge result's own device otherwise.
    restore : int, default=3
        With ``evaluate``: restoration tests per task on its blocks ranked 1..``restore``.
    controls : int, default=1
        With ``evaluate``: restoration tests per task on its ``controls`` lowest-ranked blocks that hold
        some of its update (energy > 0), the control set.
    restore_by : {"own", "weight"}, default="own"
        How a restoration test restores task ``t`` in block ``b``: ``"own"`` sets ``b``'s keys to ``t``'s own
        fine-tuned weights; ``"weight"`` merges again with ``t``'s task vector times ``weight`` in ``b``'s
        keys (every other key and task as merged; the merge must be a ``wl.merge`` result), which asks
        what a larger coefficient for ``t`` there would give without leaving the merge.
    weight : float, default=2.0
        With ``restore_by="weight"``: the factor on the task's vector in the restored block (> 0).
    split : str, default="val"
        The split ``evaluate`` scores on.
    metric : str, default="accuracy"
        The entry of ``evaluate``'s result that is compared; a name holding ``loss``, ``error`` or
        ``perplexity`` counts as lower-is-better (gains are then decreases).
    max_evals : int or None, default=None
        At most this many ``evaluate`` calls of the restoration tests; tests that would exceed it are
        skipped (NaN). The what-if's evaluations are not counted (``whatif_points`` bounds them).
    whatif : None, "all" or sequence of str, default=None
        Merge methods to compare with the diagnosed one (``.whatif``): None for none, ``"all"`` for every
        registered method, or their names. Task arithmetic (the baseline) and the diagnosed method are
        always among them. With ``evaluate`` each is scored at ``whatif_points`` coefficients and the
        best is suggested (``.suggestion``).
    whatif_points : int, default=3
        With ``evaluate``: coefficients scored per method besides its default (and given) one: that many
        quantiles of its ``alpha`` grid (3: 1/6, 1/2, 5/6 of it).
    report_split : str, default="test"
        With ``whatif`` and ``evaluate``: the split each method's chosen coefficient and the suggestion
        are reported on (chosen on ``split``).
    """

    criterion: str = "paper"
    eps: float = 0.05
    device: str | torch.device = "auto"
    restore: int = 3
    controls: int = 1
    restore_by: str = "own"
    weight: float = 2.0
    split: str = "val"
    metric: str = "accuracy"
    max_evals: int | None = None
    whatif: str | tuple[str, ...] | None = None
    whatif_points: int = 3
    report_split: str = "test"

    def __post_init__(self) -> None:
        check_criterion(self.criterion)
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
            raise InvalidParameterError(
                f"The 'eps' parameter of diagnose must be a float in (0, 1). Got {eps!r} instead.")
        if not isinstance(self.device, (str, torch.device)):
            raise InvalidParameterError(
                f"The 'device' parameter of diagnose must be a str or torch.device. Got {self.device!r} instead.")
        if self.restore_by not in ("own", "weight"):
            raise InvalidParameterError(
                f"The 'restore_by' parameter of diagnose must be one of 'own', 'weight'. Got {self.restore_by!r} instead.")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < float(w) < 1e6:
            raise InvalidParameterError(
                f"The 'weight' parameter of diagnose must be a float in (0, 1e6). Got {w!r} instead.")
        _count("restore", self.restore)
        _count("controls", self.controls)
        _count("max_evals", self.max_evals, none=True)
        _count("whatif_points", self.whatif_points)
        if self.whatif_points < 1:
            raise InvalidParameterError(
                f"The 'whatif_points' parameter of diagnose must be a positive int. Got {self.whatif_points!r} instead.")
        if self.whatif is not None and self.whatif != "all":
            names = (self.whatif,) if isinstance(self.whatif, str) else self.whatif
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise InvalidParameterError(
                    "The 'whatif' parameter of diagnose must be None, 'all' or a sequence of merge method names. "
                    f"Got {self.whatif!r} instead.")
            from weightlens.merge.registry import get_method

            for name in names:
                get_method(name)  # an unknown name: its own error, listing the registered methods
            object.__setattr__(self, "whatif", tuple(names))
        for name in ("split", "metric", "report_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidParameterError(
                    f"The '{name}' parameter of diagnose must be a non-empty str. Got {value!r} instead.")
