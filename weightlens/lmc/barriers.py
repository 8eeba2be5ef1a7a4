"""Barrier definitions and the result objects of an LMC evaluation (pure numpy, no torch).

Definitions (``docs/methods.md#lmc-barriers``), for a curve ``L(alpha)`` on a grid containing 0 and 1:

* Entezari et al. (ICLR 2022), ``.barrier``: ``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]``,
  the largest excess over the chord. Since the chord meets the curve at the endpoints it is >= 0.
* Git Re-Basin / Frankle et al., ``.barrier_midpoint``: ``max_alpha L(alpha) - (L(0) + L(1)) / 2``;
  negative when every interpolated model beats the mean of the endpoints. Both agree when
  ``L(0) == L(1)``.
* Accuracy barriers: the same with ``L`` replaced by the error ``1 - acc``, i.e.
  ``max_alpha [((1 - alpha) acc(0) + alpha acc(1)) - acc(alpha)]`` and
  ``(acc(0) + acc(1)) / 2 - min_alpha acc(alpha)``.
* N endpoints with weights ``w`` on the simplex (merge barrier): ``L(sum_i w_i theta_i) - sum_i w_i
  L(theta_i)``, reported at the centroid ``w = 1/N``.

Values are reported raw (never clipped at 0). With the endpoints on the grid both loss barriers are
>= 0 by construction (a path entirely below its chord gives exactly 0); ``.midpoint_excess``,
``L(1/2) - (L(0) + L(1)) / 2``, is the signed value that goes negative when the midpoint beats the
endpoints (as for MNIST MLPs after matching).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from typing import TYPE_CHECKING

import numpy as np

from weightlens.errors import InvalidParameterError

if TYPE_CHECKING:  # pandas is imported only when a frame is asked for
    import pandas as pd

__all__ = [
    "LMCCurve",
    "MergeBarrier",
    "accuracy_barrier",
    "accuracy_barrier_midpoint",
    "barrier",
    "barrier_midpoint",
    "relative_reduction",
]


def _check_curve(alphas: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.shape != v.shape or len(a) < 2:
        raise InvalidParameterError(
            f"alphas and values must be 1-D of equal length >= 2; got shapes {a.shape} and {v.shape}."
        )
    if a[0] != 0.0 or a[-1] != 1.0 or np.any(np.diff(a) <= 0):
        raise InvalidParameterError(
            f"alphas must increase strictly from 0 to 1 (the endpoints define the chord); got {a[0]} .. "
            f"{a[-1]} with {len(a)} points."
        )
    return a, v


def chord(alphas: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The straight line ``(1 - alpha) v(0) + alpha v(1)`` on the grid."""
    a, v = _check_curve(alphas, values)
    return (1.0 - a) * v[0] + a * v[-1]


def barrier(alphas: np.ndarray, losses: np.ndarray) -> float:
    """Entezari et al.: largest loss above the chord, ``max_alpha [L(alpha) - chord(alpha)]``.

    Examples
    --------
    >>> barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])  # chord 1.5 at alpha 1/2
    1.5
    """
    return float(np.max(np.asarray(losses, dtype=np.float64) - chord(alphas, losses)))


def barrier_midpoint(alphas: np.ndarray, losses: np.ndarray) -> float:
    """Git Re-Basin: ``max_alpha L(alpha) - (L(0) + L(1)) / 2``.

    Examples
    --------
    >>> barrier_midpoint([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])
    1.5
    >>> barrier_midpoint([0.0, 0.5, 1.0], [1.0, 1.2, 3.0])  # the endpoint B is the maximum
    1.0
    """
    _, v = _check_curve(alphas, losses)
    return float(np.max(v) - 0.5 * (v[0] + v[-1]))


def accuracy_barrier(alphas: np.ndarray, accuracies: np.ndarray) -> float:
    """Largest accuracy drop below the chord, ``max_alpha [chord(alpha) - acc(alpha)]``."""
    return float(np.max(chord(alphas, accuracies) - np.asarray(accuracies, dtype=np.float64)))


def accuracy_barrier_midpoint(alphas: np.ndarray, accuracies: np.ndarray) -> float:
    """``(acc(0) + acc(1)) / 2 - min_alpha acc(alpha)`` (error barrier, midpoint definition)."""
    _, v = _check_curve(alphas, accuracies)
    return float(0.5 * (v[0] + v[-1]) - np.min(v))


def relative_reduction(before: object, after: object) -> float | dict[str, float]:
    """``1 - after / before`` for barriers: floats, ``{split: float}`` dicts, or curves (``.barrier``).

    Returns NaN where ``before == 0``. With dicts (or curves) the result is per shared split.

    Examples
    --------
    >>> relative_reduction(0.5, 0.1)
    0.8
    """
    b = before.barrier if isinstance(before, LMCCurve) else before
    a = after.barrier if isinstance(after, LMCCurve) else after
    if isinstance(b, Mapping) and isinstance(a, Mapping):
        return {s: relative_reduction(b[s], a[s]) for s in b if s in a}
    if isinstance(b, Mapping) or isinstance(a, Mapping):
        raise InvalidParameterError("relative_reduction takes two floats or two {split: float} dicts (or curves).")
    b, a = float(b), float(a)
    return float("nan") if b == 0.0 else 1.0 - a / b


@dataclass(frozen=True, eq=False)
class LMCCurve:
    """Loss and accuracy along ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``, per split.

    Attributes
    ----------
    alphas : ndarray
        Grid from 0 to 1 (endpoints included).
    metrics : dict
        ``{split: {"loss": ndarray, "accuracy": ndarray, ...}}`` on the grid.
    label : str
        Display name (e.g. ``"naive"``, ``"weight matching"``), used by figures.
    endpoints : tuple of str
        Names of A and B.
    normalization : str
        ``"none"``, ``"bn_reset"``, ``"repair"`` or ``"repair+bn_reset"``.
    """

    alphas: np.ndarray
    metrics: dict[str, dict[str, np.ndarray]]
    label: str = "interpolation"
    endpoints: tuple[str, str] = ("a", "b")
    normalization: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", np.asarray(self.alphas, dtype=np.float64))
        for split, arrays in self.metrics.items():
            if "loss" not in arrays:
                raise InvalidParameterError(f"Split {split!r} has no 'loss' values; got {sorted(arrays)}.")
            for name, values in arrays.items():
                _check_curve(self.alphas, values)

    def __repr__(self) -> str:
        barriers = ", ".join(f"{s}={v:.4g}" for s, v in self.barrier.items())
        return f"LMCCurve({self.label!r}, {len(self.alphas)} points, barrier: {barriers})"

    @property
    def splits(self) -> list[str]:
        """Split names, in evaluation order."""
        return list(self.metrics)

    @property
    def loss(self) -> dict[str, np.ndarray]:
        """``{split: loss per alpha}``."""
        return {s: m["loss"] for s, m in self.metrics.items()}

    @property
    def accuracy(self) -> dict[str, np.ndarray]:
        """``{split: accuracy per alpha}`` (NaN where the evaluation gave none)."""
        return {s: m.get("accuracy", np.full(len(self.alphas), np.nan)) for s, m in self.metrics.items()}

    @property
    def barrier(self) -> dict[str, float]:
        """``{split: Entezari barrier}``: largest loss above the chord."""
        return {s: barrier(self.alphas, v) for s, v in self.loss.items()}

    @property
    def barrier_midpoint(self) -> dict[str, float]:
        """``{split: Git Re-Basin barrier}``: ``max L - (L(0) + L(1)) / 2``."""
        return {s: barrier_midpoint(self.alphas, v) for s, v in self.loss.items()}

    @property
    def accuracy_barrier(self) -> dict[str, float]:
        """``{split: largest accuracy drop below the chord}``."""
        return {s: accuracy_barrier(self.alphas, v) for s, v in self.accuracy.items()}

    @property
    def accuracy_barrier_midpoint(self) -> dict[str, float]:
        """``{split: (acc(0) + acc(1)) / 2 - min acc}``."""
        return {s: accuracy_barrier_midpoint(self.alphas, v) for s, v in self.accuracy.items()}

    @property
    def midpoint_excess(self) -> dict[str, float]:
        """``{split: L(1/2) - (L(0) + L(1)) / 2}``, signed (NaN when 0.5 is not on the grid)."""
        hit = np.flatnonzero(np.isclose(self.alphas, 0.5, rtol=0.0, atol=1e-12))
        return {s: float(v[hit[0]] - 0.5 * (v[0] + v[-1])) if len(hit) else float("nan")
                for s, v in self.loss.items()}

    @property
    def barrier_alpha(self) -> dict[str, float]:
        """``{split: alpha where the loss is highest above the chord}``."""
        return {s: float(self.alphas[np.argmax(v - chord(self.alphas, v))]) for s, v in self.loss.items()}

    def with_label(self, label: str) -> LMCCurve:
        """The same curve under another display name."""
        return replace(self, label=label)

    def summary(self) -> pd.DataFrame:
        """One row per split: both loss barriers, both accuracy barriers, endpoint and midpoint values."""
        import pandas as pd
        mid = int(np.argmin(np.abs(self.alphas - 0.5)))
        rows = {}
        for s in self.splits:
            loss, acc = self.loss[s], self.accuracy[s]
            rows[s] = {
                "barrier": self.barrier[s], "barrier_midpoint": self.barrier_midpoint[s],
                "midpoint_excess": self.midpoint_excess[s],
                "accuracy_barrier": self.accuracy_barrier[s],
                "accuracy_barrier_midpoint": self.accuracy_barrier_midpoint[s],
                "loss_a": loss[0], "loss_b": loss[-1], "loss_mid": loss[mid],
                "accuracy_a": acc[0], "accuracy_b": acc[-1], "accuracy_mid": acc[mid],
            }
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "split"
        return frame

    def to_frame(self) -> pd.DataFrame:
        """Tidy frame: one row per (split, metric, alpha) with ``value`` and the ``chord`` value."""
        import pandas as pd
        parts = []
        for s, arrays in self.metrics.items():
            for m, v in arrays.items():
                parts.append(pd.DataFrame({
                    "label": self.label, "split": s, "metric": m, "alpha": self.alphas,
                    "value": np.asarray(v, dtype=np.float64), "chord": chord(self.alphas, v),
                }))
        return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True, eq=False)
class MergeBarrier:
    """Barrier of merging N endpoints at weights ``w`` (default the centroid), plus pairwise curves.

    Attributes
    ----------
    names : list of str
        Endpoint names.
    weights : ndarray
        Merge weights ``(N,)`` on the simplex.
    endpoint_metrics : dict
        ``{split: {metric: ndarray (N,)}}`` of each endpoint.
    merged_metrics : dict
        ``{split: {metric: float}}`` of the merged model ``sum_i w_i theta_i``.
    pairwise : dict
        ``{(name_i, name_j): LMCCurve}`` for every pair ``i < j``.
    sample_weights : ndarray
        ``(S, N)`` random simplex points (Dirichlet(1)), possibly empty.
    sample_metrics : dict
        ``{split: {metric: ndarray (S,)}}`` at the samples.
    """

    names: list[str]
    weights: np.ndarray
    endpoint_metrics: dict[str, dict[str, np.ndarray]]
    merged_metrics: dict[str, dict[str, float]]
    pairwise: dict[tuple[str, str], LMCCurve]
    sample_weights: np.ndarray
    sample_metrics: dict[str, dict[str, np.ndarray]]

    def __repr__(self) -> str:
        b = ", ".join(f"{s}={v:.4g}" for s, v in self.barrier.items())
        return f"MergeBarrier({len(self.names)} endpoints, barrier: {b})"

    @property
    def splits(self) -> list[str]:
        """Split names."""
        return list(self.merged_metrics)

    def _excess(self, split: str, metric: str, merged: float, weights: np.ndarray) -> float:
        values = np.asarray(self.endpoint_metrics[split].get(metric, np.full(len(self.names), np.nan)))
        return float(merged - weights @ values)

    @property
    def barrier(self) -> dict[str, float]:
        """``{split: L(merged) - sum_i w_i L_i}``."""
        return {s: self._excess(s, "loss", m["loss"], self.weights) for s, m in self.merged_metrics.items()}

    @property
    def accuracy_barrier(self) -> dict[str, float]:
        """``{split: sum_i w_i acc_i - acc(merged)}``."""
        return {s: -self._excess(s, "accuracy", m.get("accuracy", np.nan), self.weights)
                for s, m in self.merged_metrics.items()}

    @property
    def mean_pairwise_barrier(self) -> dict[str, float]:
        """``{split: mean over pairs of the Entezari barrier}``."""
        return {s: float(np.mean([c.barrier[s] for c in self.pairwise.values()])) for s in self.splits}

    @property
    def max_sampled_barrier(self) -> dict[str, float]:
        """``{split: max over the random simplex samples of the excess loss}`` (NaN without samples)."""
        out = {}
        for s in self.splits:
            losses = self.sample_metrics.get(s, {}).get("loss", np.empty(0))
            excess = [self._excess(s, "loss", float(v), w) for v, w in zip(losses, self.sample_weights)]
            out[s] = float(np.max(excess)) if excess else float("nan")
        return out

    def summary(self) -> pd.DataFrame:
        """One row per split: merge barrier, accuracy barrier, mean pairwise and sampled barriers."""
        import pandas as pd
        frame = pd.DataFrame({
            "barrier": self.barrier, "accuracy_barrier": self.accuracy_barrier,
            "mean_pairwise_barrier": self.mean_pairwise_barrier,
            "max_sampled_barrier": self.max_sampled_barrier,
            "loss_merged": {s: m["loss"] for s, m in self.merged_metrics.items()},
            "accuracy_merged": {s: m.get("accuracy", np.nan) for s, m in self.merged_metrics.items()},
        })
        frame.index.name = "split"
        return frame
