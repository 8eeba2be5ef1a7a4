"""PermutationSpec validation and the algebra of Permutations (apply, inverse, compose)."""

from __future__ import annotations

import pytest
import torch

from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.rebasin import HeadGroup, Permutations, PermutationSpec, Seg


def mlp_state(sizes=(5, 8, 6, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd, axes = {}, {}
    for i in range(len(sizes) - 1):
        out = f"h{i}" if i < len(sizes) - 2 else None
        inp = f"h{i - 1}" if i else None
        sd[f"l{i}.weight"] = torch.randn(sizes[i + 1], sizes[i], generator=gen)
        sd[f"l{i}.bias"] = torch.randn(sizes[i + 1], generator=gen)
        axes[f"l{i}.weight"], axes[f"l{i}.bias"] = (out, inp), (out,)
    return sd, PermutationSpec(axes)


def test_perm_to_axes_and_units():
    sd, spec = mlp_state()
    assert spec.perm_to_axes == {"h0": [("l0.weight", 0), ("l0.bias", 0), ("l1.weight", 1)],
                                 "h1": [("l1.weight", 0), ("l1.bias", 0), ("l2.weight", 1)]}
    assert spec.units == ["h0", "h1"]
    assert spec.sizes(sd) == {"h0": 8, "h1": 6}
    assert "l0.weight" in spec and len(spec) == 6


def test_a_permutation_on_two_axes_of_one_tensor_is_rejected_naming_the_key():
    with pytest.raises(InvalidParameterError, match=r"'p' acts on two axes \(0 and 1\) of 'w'"):
        PermutationSpec({"w": ("p", "p")})


def test_head_views_of_one_group_on_two_axes_are_rejected():
    with pytest.raises(InvalidParameterError, match="'attn' acts on two axes"):
        PermutationSpec({"w": ("attn.q", "attn.o")}, [HeadGroup("attn", 2)])


def test_naming_a_group_instead_of_a_view_is_rejected():
    with pytest.raises(InvalidParameterError, match="attn.q"):
        PermutationSpec({"w": ("attn", None)}, [HeadGroup("attn", 2)])


def test_size_mismatch_across_axes_names_both_places():
    spec = PermutationSpec({"a": ("p", None), "b": (None, "p")})
    with pytest.raises(ShapeMismatchError, match=r"Axis 1 of 'b' .* length 5 .* implies 4 .*axis 0 of 'a'"):
        spec.sizes({"a": torch.zeros(4, 2), "b": torch.zeros(3, 5)})


def test_missing_keys_are_named():
    _, spec = mlp_state()
    with pytest.raises(KeyMismatchError, match="l2.bias"):
        spec.sizes({k: torch.zeros(1) for k in spec.keys if k != "l2.bias"}, name="model b")


def test_wrong_number_of_axes_is_named():
    spec = PermutationSpec({"w": ("p",)})
    with pytest.raises(ShapeMismatchError, match=r"1 axis entries for 'w' .* shape \(2, 3\)"):
        spec.sizes({"w": torch.zeros(2, 3)})


def test_a_bare_string_entry_is_rejected():
    with pytest.raises(InvalidParameterError, match=r"\('p',\)"):
        PermutationSpec({"b": "p"})


def test_stacked_axis_sizes_are_inferred_from_head_structure():
    # open_clip: in_proj (3d x d) stacks q, k, v; out_proj (d x d) gives v/o.
    g = HeadGroup("attn", n_heads=2)
    spec = PermutationSpec({"in_proj": (("attn.q", "attn.k", "attn.v"), "res"), "out": ("res", "attn.o")}, [g])
    sizes = spec.sizes({"in_proj": torch.zeros(24, 8), "out": torch.zeros(8, 8)})
    assert sizes == {"res": 8, "attn.q": 8, "attn.k": 8, "attn.v": 8, "attn.o": 8}


def test_flattened_segments_and_gqa_sizes():
    spec = PermutationSpec({"conv": ("c", None), "fc": (None, Seg("c", 4))})
    assert spec.sizes({"conv": torch.zeros(3, 2), "fc": torch.zeros(5, 12)}) == {"c": 3}
    g = HeadGroup("a", n_heads=4, n_kv_heads=2)
    spec = PermutationSpec({"q": ("a.q", None), "k": ("a.k", None), "v": ("a.v", None), "o": (None, "a.o")}, [g])
    sd = {"q": torch.zeros(12, 1), "k": torch.zeros(6, 1), "v": torch.zeros(4, 1), "o": torch.zeros(1, 8)}
    sizes = spec.sizes(sd)
    assert sizes == {"a.q": 12, "a.k": 6, "a.v": 4, "a.o": 8}
    with pytest.raises(ShapeMismatchError, match="'k'"):
        spec.sizes({"q": torch.zeros(12, 1), "k": torch.zeros(5, 1), "v": torch.zeros(4, 1), "o": torch.zeros(1, 8)})
    with pytest.raises(InvalidParameterError, match="multiple"):
        HeadGroup("b", n_heads=3, n_kv_heads=2)


def test_apply_matches_explicit_indexing_and_passes_other_keys_through():
    sd, spec = mlp_state()
    sd["extra"] = torch.randn(2)
    p = Permutations.random(spec, sd, seed=1)
    out = p.apply(sd)
    h0, h1 = p.perms["h0"], p.perms["h1"]
    assert torch.equal(out["l1.weight"], sd["l1.weight"][h1][:, h0])
    assert torch.equal(out["l0.bias"], sd["l0.bias"][h0])
    assert out["extra"] is sd["extra"]


def test_apply_to_a_model_of_another_width_fails_clearly():
    sd, spec = mlp_state()
    p = Permutations.random(spec, sd, seed=1)
    other, _ = mlp_state(sizes=(5, 9, 6, 3))
    with pytest.raises(ShapeMismatchError, match="'h0' has size 8"):
        p.apply(other)


def test_inverse_and_compose_with_heads():
    g = HeadGroup("a", n_heads=4, n_kv_heads=2)
    spec = PermutationSpec({"q": ("a.q", "r"), "k": ("a.k", "r"), "v": ("a.v", "r"), "o": ("r", "a.o")}, [g])
    sd = {"q": torch.randn(12, 5), "k": torch.randn(6, 5), "v": torch.randn(4, 5), "o": torch.randn(5, 8)}
    p, q = Permutations.random(spec, sd, seed=1), Permutations.random(spec, sd, seed=2)
    back = p.inverse().apply(p.apply(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    both = q.compose(p).apply(sd)
    step = q.apply(p.apply(sd))
    assert all(torch.equal(both[k], step[k]) for k in sd)
    assert p.inverse().compose(p).is_identity()
    assert Permutations.identity(spec, sd).is_identity()


def test_random_honours_rope():
    g = HeadGroup("a", n_heads=2, rope=True)
    spec = PermutationSpec({"q": ("a.q", None), "k": ("a.k", None)}, [g])
    p = Permutations.random(spec, {"q": torch.zeros(8, 1), "k": torch.zeros(8, 1)}, seed=0)
    assert torch.equal(p.heads["a"].qk, torch.arange(4).expand(2, 4))


def test_combine_specs():
    a = PermutationSpec({"x": ("p",)})
    b = PermutationSpec({"y": ("q",)})
    assert (a | b).keys == ["x", "y"]
    with pytest.raises(InvalidParameterError, match="'x'"):
        a | a
