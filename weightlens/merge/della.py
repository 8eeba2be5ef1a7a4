"""DELLA: drop entries at random with magnitude-ranked probabilities (MagPrune), rescale, merge (``docs/methods.md#della``).

Deep, Bhardwaj, Poria, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv:2406.11617 (2024); reference implementation mergekit ``della`` and ``della_linear``
(``mergekit/sparsify.py::della_magprune``, ``mergekit/merge_methods/generalized_task_arithmetic.py``).

Per tensor and task, as mergekit's ``della_magprune``:

* the entries are ranked by ``|tau|`` along axis 1 (per row of a matrix; a 1-D tensor is one row), ranks
  ``1..n`` mapped to ``r = (rank - 1) / (n - 1)`` in [0, 1] (ties ranked by index; mergekit's ``argsort``
  leaves their order unspecified);
* entry ``i`` is kept with probability ``p_i = density - epsilon + 2 epsilon r_i`` (the smallest at
  ``density - epsilon``, the largest at ``density + epsilon``; both must lie in (0, 1), as mergekit
  requires); ``density = 1`` keeps everything;
* the kept entries are rescaled: ``rescale="l1"`` (mergekit, its ``rescale: true``): the sparsified task
  vector times ``|tau|_1 / |kept|_1`` over the tensor; ``rescale="probability"`` (the paper): each kept
  entry divided by its own ``p_i``, which keeps the expectation of every entry; ``"none"``: not at all.

Then mergekit's generalized task arithmetic with every fine-tune's ``weight`` 1 (:func:`.breadcrumbs.combine`):
``della``: TIES' sign election (``+`` where the sum is 0) and the disjoint mean of the agreeing entries
(``normalize=False``: their sum); ``della_linear``: the sum (``normalize=True``: the mean). The merge is
``theta_0 + alpha * update``: ``alpha`` is mergekit's ``lambda``.

**Randomness.** The keep draws of one task and key come from a generator seeded by a hash of
``(seed, task, key)`` (as DARE): the same seed gives the same merge, whatever the key order. mergekit
draws from torch's global generator in its own order, so its masks are other draws of the same
distribution; the tests compare its keep rates per magnitude rank with these probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch

from weightlens.errors import InvalidParameterError
from weightlens.io.recipe import Mergekit
from weightlens.merge.arithmetic import seeded_generator
from weightlens.merge.breadcrumbs import _alpha, _grid, combine, l1_rescaled
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge

__all__ = ["della", "della_linear", "della_mask", "keep_probabilities"]

Unit = Annotated[float, Interval(0, 1, "right")]
Epsilon = Annotated[float, Interval(0, 0.5, "left")]
Rescale = Literal["l1", "probability", "none"]


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """``p_i = density - epsilon + 2 epsilon r_i``, ``r_i`` the normalised magnitude rank along axis 1 (its shape)."""
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    n = x.shape[1]
    order = torch.argsort(x.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True).to(torch.float32)  # 0 = smallest
    r = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + r * 2 * epsilon).reshape(delta.shape)


def della_mask(probs: torch.Tensor, seed: int, task: str, key: str) -> torch.Tensor:
    """Bernoulli(``probs``) keep-mask of one task and key, reproducible from ``(seed, task, key)``."""
    return torch.rand(probs.shape, generator=seeded_generator(seed, task, key, salt="della")) < probs


def _sparse(ctx: MergeContext, key: str, density: float, epsilon: float, rescale: str, seed: int) -> torch.Tensor:
    deltas = ctx.deltas(key)
    if density >= 1:
        return deltas
    for i, task in enumerate(ctx.tasks):
        probs = keep_probabilities(deltas[i], density, epsilon)
        mask = della_mask(probs, seed, task, key)
        if rescale == "l1":
            deltas[i] = l1_rescaled(deltas[i], mask)
        elif rescale == "probability":
            deltas[i] = deltas[i] * mask / probs
        else:
            deltas[i] = deltas[i] * mask
    return deltas


def _prepare(ctx: MergeContext, *, density: float, epsilon: float, **_: Any) -> dict:
    """mergekit's condition on the probabilities, checked before any key is read."""
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise InvalidParameterError(
            f"{ctx.method}: keep probabilities range over density -/+ epsilon = [{density - epsilon:g}, "
            f"{density + epsilon:g}], which must lie in (0, 1) (as mergekit requires); choose a smaller epsilon "
            f"or another density (got density={density}, epsilon={epsilon})."
        )
    return {}


def _mergekit(name: str) -> Any:
    def translate(p: Mapping[str, Any]) -> Mergekit:
        rescale = p.get("rescale", "l1")
        per_model = {"weight": 1.0, "density": float(p.get("density", 0.5)), "epsilon": float(p.get("epsilon", 0.15))}
        notes = ("mergekit draws its own random masks: the same distribution, other draws",)
        if rescale == "probability":
            notes += ("approximate: weightlens divided each kept entry by its keep probability (the paper); "
                      "mergekit rescales to the L1 norm (rescale: true)",)
        return Mergekit(name, per_model, {"lambda": float(p.get("alpha", 1.0)),
                                          "normalize": bool(p.get("normalize", name == "della")),
                                          "rescale": rescale != "none"}, notes)

    return translate


_DOC = "1.0 (normalize=True) | 0.3 (normalize=False)"


@register_merge(
    "della", alpha=None, alpha_default=_alpha, alpha_doc=_DOC, pretty_name="DELLA",
    reference="Deep et al., arXiv:2406.11617", prepare=_prepare, alpha_grid=_grid, mergekit=_mergekit("della"),
)
def della(ctx: MergeContext, key: str, *, density: Unit = 0.5, epsilon: Epsilon = 0.15, rescale: Rescale = "l1",
          normalize: bool = True, seed: int = 0) -> KeyUpdate:
    """DELLA: MagPrune (magnitude-ranked keep probabilities), rescale, TIES' sign election and disjoint mean.

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Mean keep probability (mergekit's ``density``).
    epsilon : float in [0, 0.5), default=0.15
        Half-width of the keep probabilities, ``density -/+ epsilon`` from the smallest to the largest
        magnitude (mergekit's ``epsilon``).
    rescale : {"l1", "probability", "none"}, default="l1"
        ``"l1"``: mergekit (the sparsified vector rescaled to its L1 norm); ``"probability"``: the paper
        (each kept entry divided by its keep probability); ``"none"``.
    normalize : bool, default=True
        Disjoint mean (True) or sum (False) of the agreeing entries (mergekit's ``normalize``).
    seed : int, default=0
        Masks are drawn per (seed, task, key).
    alpha : float, default=1.0 (0.3 without normalize)
        mergekit's ``lambda``.
    """
    return KeyUpdate(combine(_sparse(ctx, key, density, epsilon, rescale, seed), consensus=True, normalize=normalize))


@register_merge(
    "della_linear", alpha=None, alpha_default=_alpha, alpha_doc=_DOC, pretty_name="DELLA (linear)",
    reference="Deep et al., arXiv:2406.11617", prepare=_prepare, alpha_grid=_grid,
    mergekit=_mergekit("della_linear"),
)
def della_linear(ctx: MergeContext, key: str, *, density: Unit = 0.5, epsilon: Epsilon = 0.15,
                 rescale: Rescale = "l1", normalize: bool = False, seed: int = 0) -> KeyUpdate:
    """DELLA's MagPrune and rescale, then the sum of the task vectors (the mean with ``normalize``).

    Parameters
    ----------
    density, epsilon, rescale, seed : as :func:`della`
    normalize : bool, default=False
        Divide the sum by the number of fine-tunes (mergekit's ``normalize``).
    alpha : float, default=0.3 (1.0 with normalize)
        mergekit's ``lambda``.
    """
    return KeyUpdate(combine(_sparse(ctx, key, density, epsilon, rescale, seed), consensus=False, normalize=normalize))
