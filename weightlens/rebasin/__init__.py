"""Git Re-Basin: permutation specs, weight and activation matching, MergeMany.

Independently trained networks compute the same function under many orderings of their hidden
units. Re-basin finds the permutation of one model's units that brings it closest to another, so
that the two can be interpolated or merged (Ainsworth, Hayase & Srinivasa, ICLR 2023).

Examples
--------
>>> import torch
>>> from weightlens import rebasin
>>> a = {"fc1.weight": torch.randn(16, 4), "fc1.bias": torch.randn(16), "fc2.weight": torch.randn(3, 16)}
>>> spec = rebasin.mlp_spec(a)
>>> b = rebasin.Permutations.random(spec, a, seed=0).apply(a)
>>> found = rebasin.weight_matching(a, b, spec)
>>> torch.equal(found.apply(b)["fc1.weight"], a["fc1.weight"])
True
"""

from weightlens.rebasin.builders import TransformerLayout, mlp_spec, resnet_spec, transformer_spec, vgg_spec
from weightlens.rebasin.diagnostics import SingularAlignment, layer_distances, singular_alignment
from weightlens.rebasin.matching import (
    ActivationOptions,
    MatchingOptions,
    MergeManyResult,
    activation_matching,
    merge_many,
    weight_matching,
)
from weightlens.rebasin.spec import HeadGroup, HeadPerm, Permutations, PermutationSpec, Seg
from weightlens.rebasin.trace import spec_from_module

__all__ = [
    "ActivationOptions",
    "HeadGroup",
    "HeadPerm",
    "MatchingOptions",
    "MergeManyResult",
    "PermutationSpec",
    "Permutations",
    "Seg",
    "SingularAlignment",
    "TransformerLayout",
    "activation_matching",
    "layer_distances",
    "merge_many",
    "mlp_spec",
    "resnet_spec",
    "singular_alignment",
    "spec_from_module",
    "transformer_spec",
    "vgg_spec",
    "weight_matching",
]
