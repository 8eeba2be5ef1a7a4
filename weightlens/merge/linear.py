"""Linear merge: the weighted average of the fine-tuned weights (model soup) (``docs/methods.md#linear``).

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022 (arXiv:2203.05482); reference implementation mergekit ``linear``
(``mergekit/merge_methods/linear.py``).

mergekit's ``linear`` returns ``sum_i w_i theta_i / sum_i w_i`` (``normalize: true``, its default) or
``sum_i w_i theta_i`` (``normalize: false``) of the full weights of its inputs, for every tensor alike
(matrices, vectors, embeddings). Here the inputs are the fine-tunes (``theta_i = theta_0 + tau_i``) and
the merge is ``theta_0 + alpha * update`` with

* ``normalize=True``: ``update = sum_i (w_i / W) tau_i`` (``W = sum_i w_i``), which is mergekit's
  average minus the base (the base's coefficients sum to 1, so it cancels exactly in real arithmetic);
* ``normalize=False``: ``update = sum_i w_i tau_i + (W - 1) theta_0``, mergekit's weighted sum minus the base.

So ``alpha=1`` (the default) is mergekit's ``linear`` of the fine-tunes; other ``alpha`` move along the
line from the base to it. The exported ``mergekit_config.yml`` lists each fine-tune with its ``weight``
and gives the base (mergekit adds ``base_model`` to the inputs of every method) the global weight
``1 - alpha`` with ``normalize: false`` when ``alpha != 1`` (and 0 with the recipe's ``normalize`` when
``alpha == 1``), the same merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from weightlens.errors import InvalidParameterError
from weightlens.io.recipe import Mergekit
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import KeyUpdate, register_merge

__all__ = ["linear", "parse_weights"]

#: ``alpha`` from the base (0.1) to the soup (1.0).
_LINEAR_GRID = tuple(round(0.1 * i, 10) for i in range(1, 11))


def parse_weights(weights: str | None, tasks: tuple[str, ...] | list[str], method: str = "linear") -> list[float]:
    """``weights`` (``"0.7,0.3"``: one real number per fine-tune, in task order; None or blank: all 1) as floats.

    Raises
    ------
    InvalidParameterError
        If the count is not the number of fine-tunes or a value is not a finite number.
    """
    if weights is None or not weights.strip():  # a blank text box (the studio) is None
        return [1.0] * len(tasks)
    parts = [p.strip() for p in weights.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(tasks) or not all(math.isfinite(v) for v in values):
        raise InvalidParameterError(
            f"The 'weights' parameter of {method} must be {len(tasks)} comma-separated finite numbers, one "
            f"per fine-tune in the order {', '.join(map(repr, tasks))} (e.g. {','.join(['1'] * len(tasks))!r}). "
            f"Got {weights!r} instead."
        )
    return values


def _linear_prepare(ctx: MergeContext, *, weights: str | None, normalize: bool) -> dict:
    """Parse and check the weights once, before any key is read."""
    w = parse_weights(weights, ctx.tasks)
    if normalize and abs(sum(w)) < 1e-8:
        raise InvalidParameterError(
            f"linear with normalize=True divides by the sum of the weights, which is {sum(w)!r} for "
            f"weights={weights!r}; give weights with a non-zero sum or normalize=False."
        )
    return {"weights": w}


def _linear_mergekit(p: Mapping[str, Any], merged: Any = None) -> Mergekit | None:
    """mergekit's ``linear``: each fine-tune's ``weight``; the base (an input of every mergekit merge with a
    ``base_model``) weighs ``1 - alpha`` through the global ``weight`` (0 at ``alpha=1``). With no
    ``weights`` and ``alpha != 1`` the fine-tunes' weights need their count, known from ``merged``."""
    alpha, weights, normalize = float(p.get("alpha", 1.0)), p.get("weights"), bool(p.get("normalize", True))
    weights = None if isinstance(weights, str) and not weights.strip() else weights
    if alpha == 1.0 and weights is None:
        return Mergekit("linear", {"weight": 1.0}, {"weight": 0.0, "normalize": normalize})
    if not isinstance(weights, (str, type(None))) or (weights is None and merged is None):
        return None
    tasks = merged.task_vectors.names if weights is None else [str(i) for i in range(len(weights.split(",")))]
    try:
        w = parse_weights(weights, tasks)
    except InvalidParameterError:
        return None
    if alpha == 1.0:
        return Mergekit("linear", {}, {"weight": 0.0, "normalize": normalize}, (), tuple({"weight": v} for v in w))
    if normalize and abs(sum(w)) < 1e-8:
        return None
    scale = alpha / sum(w) if normalize else alpha
    return Mergekit("linear", {}, {"weight": 1.0 - alpha, "normalize": False}, (),
                    tuple({"weight": scale * v} for v in w))


@register_merge(
    "linear", alpha=1.0, pretty_name="Linear (model soup)", reference="Wortsman et al., ICML 2022",
    prepare=_linear_prepare, alpha_grid=_LINEAR_GRID, mergekit=_linear_mergekit,
)
def linear(ctx: MergeContext, key: str, *, weights: str | None = None, normalize: bool = True) -> KeyUpdate:
    """Weighted average (``normalize=True``) or weighted sum of the fine-tuned weights, as mergekit ``linear``.

    Parameters
    ----------
    weights : str or None, default=None
        One weight per fine-tune, comma-separated in task order (``"0.7,0.3"``); None: all 1 (the
        uniform soup). mergekit's per-model ``weight``.
    normalize : bool, default=True
        Divide by the sum of the weights (mergekit's ``normalize``).
    alpha : float, default=1.0
        ``theta = theta_0 + alpha * (theta_linear - theta_0)``: 1 is mergekit's linear merge.
    """
    w = ctx.state["weights"]
    deltas = ctx.deltas(key)
    coeff = torch.tensor([v / sum(w) for v in w] if normalize else w, dtype=torch.float32)
    update = torch.tensordot(coeff, deltas, dims=1)
    if not normalize and sum(w) != 1.0:
        update += (sum(w) - 1.0) * ctx.tv.base_tensor(key).float()
    return KeyUpdate(update)
