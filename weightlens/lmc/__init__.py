"""Linear mode connectivity: loss and accuracy along straight lines between checkpoints.

``curve(a, b, evaluate)`` interpolates ``(1 - alpha) * theta_A + alpha * theta_B`` on a grid (25
points by default, endpoints included) and returns an :class:`LMCCurve` with, per split, the
Entezari barrier (``.barrier``, loss above the chord), the Git Re-Basin barrier
(``.barrier_midpoint``, ``max L - (L_A + L_B) / 2``) and the accuracy barriers. Pass an
:class:`Evaluator` (module, data, loss) to score all alphas in batched ``vmap`` passes, optionally
with BatchNorm statistics reset (``bn_loader``) or REPAIR (``repair``) at every alpha; any
``evaluate(state_dict)`` callable also works, one alpha at a time. ``merge_barrier`` extends the
barrier to N endpoints at the centroid.

Examples
--------
>>> import weightlens as wl                                                    # doctest: +SKIP
>>> from weightlens import zoo                                                 # doctest: +SKIP
>>> p = zoo.load("digits-pairs", size="ci", width=128)                          # doctest: +SKIP
>>> ev = wl.lmc.Evaluator(p.make_module(), {s: p.data(s) for s in ("train", "test")})  # doctest: +SKIP
>>> naive = wl.lmc.curve(p.a, p.b, ev, label="naive")                          # doctest: +SKIP
>>> naive.barrier                                                              # doctest: +SKIP
{'train': 0.56, 'test': 0.53}
>>> repaired = wl.lmc.curve(p.a, p.b, ev, repair=p.data("train"), label="REPAIR")  # doctest: +SKIP
>>> wl.lmc.relative_reduction(naive, repaired)                                 # doctest: +SKIP
"""

from weightlens.lmc.barriers import (
    LMCCurve,
    MergeBarrier,
    accuracy_barrier,
    accuracy_barrier_midpoint,
    barrier,
    barrier_midpoint,
    relative_reduction,
)
from weightlens.lmc.curve import MergeBarrierOptions, curve, curve_many, merge_barrier
from weightlens.lmc.evaluator import Evaluator
from weightlens.lmc.norm import ChannelStats, Repair, channel_stats, mix_stats, repair, repair_layers, reset_batchnorm

__all__ = [
    "ChannelStats",
    "Evaluator",
    "LMCCurve",
    "MergeBarrier",
    "MergeBarrierOptions",
    "Repair",
    "accuracy_barrier",
    "accuracy_barrier_midpoint",
    "barrier",
    "barrier_midpoint",
    "channel_stats",
    "curve",
    "curve_many",
    "merge_barrier",
    "mix_stats",
    "relative_reduction",
    "repair",
    "repair_layers",
    "reset_batchnorm",
]
