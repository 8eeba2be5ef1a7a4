"""RegMean: per linear layer, the weights that best fit every task's inputs at once (``docs/methods.md#regmean``).

Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(arXiv:2212.09849); reference implementation FusionBench ``fusion_bench/method/regmean`` (``regmean.py``,
``merging_with_regmean_weights``; from MergeLM).

For a linear layer ``y = W x`` (torch's ``W``: ``(out, in)``) fine-tuned to ``W_t`` on task ``t`` whose inputs
there are the rows of ``X_t``, RegMean minimises ``sum_t ||X_t W^T - X_t W_t^T||^2``:
``W^T = (sum_t G_t)^{-1} sum_t G_t W_t^T`` with ``G_t = X_t^T X_t / N_t`` (FusionBench's mean over the rows
it saw; a common factor would cancel, a per-task one does not). Off-diagonal entries of every ``G_t`` are
multiplied by ``reduce_non_diagonal_ratio`` first (the paper's ``alpha``, which we call by the reference's
name since ``alpha`` is our coefficient; 1 is the plain least-squares solution). Every other key (biases,
LayerNorm, embeddings, a linear layer the data never reaches) gets the plain average of the fine-tunes, as the
reference does. As ``sum_t G_t W_0^T = (sum_t G_t) W_0^T``, the update is ``(sum_t tau_t G_t)(sum_t G_t)^{-1}``
with ``tau_t = W_t - W_0``, solved here in float64 (the reference inverts in the model's dtype).

An input feature that is zero on every task's data (a dead ReLU unit) makes ``sum_t G_t`` singular, and the
reference's ``torch.inverse`` fails; any weight on it fits every input, so its column gets the average of
the fine-tunes (with a note) and the rest is solved without it. The statistics come from ``merge(...,
data=MergeData)`` (:mod:`weightlens.merge.data`), computed once per task.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from weightlens.errors import ShapeMismatchError
from weightlens.merge.data import check_matched, stacked_statistic, task_statistics
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge

__all__ = ["regmean", "regmean_update", "reduce_non_diagonal"]

_NO_GRAM = ("RegMean: no Gram matrix for this matrix (not the weight of an nn.Linear layer the data reached): "
            "the average of the fine-tunes, as FusionBench.")


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``ratio`` (the diagonal unchanged)."""
    scale = torch.full_like(gram, ratio)
    scale.diagonal().fill_(1.0)
    return gram * scale


def regmean_update(deltas: torch.Tensor, grams: torch.Tensor, ratio: float) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``((sum_t tau_t G_t)(sum_t G_t)^{-1}, dead)`` in float64 for task vectors ``(T, out, in)`` and Grams
    ``(T, in, in)`` (off-diagonals scaled by ``ratio``); ``dead``: input features with a zero diagonal in every
    task, whose columns get the mean of ``tau_t`` instead."""
    d = deltas.double()
    g = torch.stack([reduce_non_diagonal(x.double(), ratio) for x in grams])
    total = g.sum(0)
    live = total.diagonal() != 0
    out = d.mean(0)
    if live.any():
        rhs = torch.einsum("toi,tij->oj", d[:, :, live], g[:, live][:, :, live])  # sum_t tau_t G_t on live inputs
        out[:, live] = torch.linalg.solve(total[live][:, live], rhs, left=False)
    return out, tuple(int(i) for i in torch.nonzero(~live).flatten())


def _prepare(ctx: MergeContext, **_: Any) -> dict:
    """Each task's Gram matrices (cached per task in ``tv.cache``)."""
    grams = {t: task_statistics(ctx.tv, ctx.data, "gram", t) for t in ctx.tasks}
    check_matched(grams, ctx.tv, "regmean", "Gram matrix (an nn.Linear layer's inputs)")
    return {"grams": grams}


@register_merge(
    "regmean", alpha=1.0, pretty_name="RegMean", reference="Jin et al., ICLR 2023", prepare=_prepare,
    alpha_grid=(1.0,), needs_data="the input Gram matrices of each linear layer",
)
def regmean(ctx: MergeContext, key: str, *,
            reduce_non_diagonal_ratio: Annotated[float, Interval(0, 1)] = 0.95) -> KeyUpdate:
    """RegMean: per linear weight ``W^T = (sum_t G_t)^{-1} sum_t G_t W_t^T``; other keys: the average.

    Needs ``data=`` (``zoo.merge_data()``, a :class:`~weightlens.merge.data.MergeData`).

    Parameters
    ----------
    reduce_non_diagonal_ratio : float in [0, 1], default=0.95
        Factor of the Grams' off-diagonal entries (the paper's alpha; FusionBench's CLIP default 0.95; its
        GPT-2 config uses 0.6; 0 gives a per-input-feature weighted average, 1 the plain least squares).
    alpha : float, default=1.0
        ``theta = theta_0 + alpha * (theta_regmean - theta_0)``: 1 is RegMean (tuning-free).
    """
    deltas = ctx.deltas(key)
    stacked = stacked_statistic(ctx.tasks, key, ctx.state["grams"], method="RegMean", what="Gram matrices",
                                needs="reach the same linear layers")
    if stacked is None:  # biases, norms: the average by definition; a matrix: noted (an embedding, an unreached layer)
        return KeyUpdate(deltas.mean(0), (_NO_GRAM,) if ctx.is_matrix(key) else ())
    n_in = deltas.shape[-1]
    if deltas.dim() != 3 or tuple(stacked.shape[1:]) != (n_in, n_in):
        raise ShapeMismatchError(
            f"RegMean: the Gram matrix of {key!r} has shape {tuple(stacked.shape[1:])}; the key's shape "
            f"{tuple(deltas.shape[1:])} needs ({n_in}, {n_in}) (torch Linear weights are (out, in))."
        )
    update, dead = regmean_update(deltas, stacked, reduce_non_diagonal_ratio)
    notes = () if not dead else (
        f"RegMean: {len(dead)} input feature(s) of this layer are zero on every task's data (the reference's "
        "inverse fails there); their weights are the average of the fine-tunes.",)
    return KeyUpdate(update.float(), notes)
