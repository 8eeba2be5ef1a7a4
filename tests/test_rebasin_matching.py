"""Weight matching, activation matching and MergeMany against planted answers and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_rebasin_builders import ATOL, VGG, ResNet, TinyBert, TinyLlama, make_mlp, max_diff, randomize, tokens

from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.rebasin import (
    HeadGroup,
    HeadPerm,
    Permutations,
    PermutationSpec,
    activation_matching,
    merge_many,
    mlp_spec,
    resnet_spec,
    transformer_spec,
    vgg_spec,
    weight_matching,
)


def sq_norm(sd, spec) -> float:
    return sum(float((sd[k].double() ** 2).sum()) for k in spec.keys if sd[k].is_floating_point())


def assert_recovers(sd, spec, seed: int = 7) -> Permutations:
    """b = planted(a); matching must map b back onto a exactly, with objective ||a||^2."""
    planted = Permutations.random(spec, sd, seed=seed)
    b = planted.apply(sd)
    found = weight_matching(sd, b, spec)
    back = found.apply(b)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert found.compose(planted).is_identity()
    assert found.objective == pytest.approx(sq_norm(sd, spec), rel=1e-12)
    assert np.all(np.diff(found.objective_history) >= 0)
    return found


@pytest.mark.parametrize(
    "make, builder",
    [(lambda: make_mlp(sizes=(20, 64, 48, 32, 5)), mlp_spec), (lambda: randomize(ResNet(), 0), resnet_spec),
     (lambda: randomize(VGG(), 0), vgg_spec)],
    ids=["mlp", "resnet", "vgg"],
)
def test_weight_matching_recovers_a_planted_permutation(make, builder):
    sd = make().state_dict()
    assert_recovers(sd, builder(sd))


@pytest.mark.parametrize("make", [lambda: TinyBert(), lambda: TinyLlama(kv=2), lambda: TinyLlama(kv=1, rope=False)],
                         ids=["bert", "llama-gqa-rope", "mqa"])
def test_weight_matching_recovers_planted_head_structured_permutations(make):
    sd = randomize(make(), 0).state_dict()
    assert_recovers(sd, transformer_spec(sd, n_heads=4), seed=11)


def test_single_permutation_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    a = {"w1": torch.randn(5, 3, generator=gen), "w2": torch.randn(2, 5, generator=gen)}
    b = {"w1": torch.randn(5, 3, generator=gen), "w2": torch.randn(2, 5, generator=gen)}
    spec = PermutationSpec({"w1": ("h", None), "w2": (None, "h")})
    best = max(float((a["w1"].double() * b["w1"].double()[list(p)]).sum()
                     + (a["w2"].double() * b["w2"].double()[:, list(p)]).sum())
               for p in itertools.permutations(range(5)))
    assert weight_matching(a, b, spec).objective == pytest.approx(best, rel=1e-12)


def test_head_group_matches_brute_force_over_head_structured_permutations():
    g = HeadGroup("a", n_heads=2)
    spec = PermutationSpec({"q": ("a.q", None), "k": ("a.k", None), "v": ("a.v", None), "o": (None, "a.o")}, [g])
    gen = torch.Generator().manual_seed(1)
    shapes = {"q": (4, 3), "k": (4, 3), "v": (6, 3), "o": (3, 6)}  # 2 heads, d_qk = 2, d_vo = 3
    a = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    best = -np.inf
    for grp in itertools.permutations(range(2)):
        for qk in itertools.product(itertools.permutations(range(2)), repeat=2):
            for vo in itertools.product(itertools.permutations(range(3)), repeat=2):
                qhead = torch.zeros(2, 1, dtype=torch.long)
                hp = HeadPerm(torch.tensor(grp), qhead, torch.tensor(qk), torch.tensor(vo))
                pb = Permutations.from_parts(spec, {}, {"a": hp}).apply(b)
                best = max(best, sum(float((a[k].double() * pb[k].double()).sum()) for k in a))
    assert weight_matching(a, b, spec).objective == pytest.approx(best, rel=1e-12)


def test_independent_models_objective_increases_and_seed_is_reproducible():
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    spec = mlp_spec(a)
    first, again = weight_matching(a, b, spec, seed=3), weight_matching(a, b, spec, seed=3)
    assert first.equals(again)
    hist = np.array(first.objective_history)
    assert hist[-1] > hist[0] and np.all(np.diff(hist) >= 0)


def test_warm_start_from_a_solution_changes_nothing():
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    spec = mlp_spec(a)
    found = weight_matching(a, b, spec)
    again = weight_matching(a, b, spec, init=found, seed=9)
    assert again.equals(found) and len(again.objective_history) == 2


def test_max_iter_bounds_the_sweeps():
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    assert len(weight_matching(a, b, mlp_spec(a), max_iter=1).objective_history) == 2


def test_device_cpu_gives_the_same_result():
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    spec = mlp_spec(a)
    assert weight_matching(a, b, spec, device="cpu").equals(weight_matching(a, b, spec))


def test_matching_options_and_inputs_are_validated():
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    spec = mlp_spec(a)
    with pytest.raises(InvalidParameterError, match="max_iter"):
        weight_matching(a, b, spec, max_iter=0)
    with pytest.raises(InvalidParameterError, match="tol"):
        weight_matching(a, b, spec, tol=-1.0)
    with pytest.raises(KeyMismatchError, match="second model"):
        weight_matching(a, {k: v for k, v in b.items() if k != "2.bias"}, spec)
    wide = make_mlp(1, sizes=(12, 33, 24, 5)).state_dict()
    with pytest.raises(ShapeMismatchError):
        weight_matching(a, wide, spec)
    with pytest.raises(InvalidParameterError, match="init"):
        weight_matching(a, b, spec, init=Permutations.identity(mlp_spec(wide), wide))


# ------------------------------------------------------------------------------ activation matching


@pytest.mark.parametrize("correlation", ["moment", "pearson"])
def test_activation_matching_recovers_a_planted_permutation(correlation):
    model = make_mlp(sizes=(12, 32, 24, 5))
    a = model.state_dict()
    spec = mlp_spec(a)
    planted = Permutations.random(spec, a, seed=2)
    b = planted.apply(a)
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    found = activation_matching(a, b, spec, lambda: make_mlp(sizes=(12, 32, 24, 5)), (x, None),
                                correlation=correlation, batch_size=64)
    assert found.compose(planted).is_identity()
    before, after = found.objective_history
    assert after > before


def test_activation_matching_rejects_head_groups_and_unknown_hooks():
    model = randomize(TinyBert(layers=1), 0)
    sd = model.state_dict()
    with pytest.raises(InvalidParameterError, match="weight_matching"):
        activation_matching(sd, sd, transformer_spec(sd, n_heads=4), TinyBert, tokens())
    mlp = make_mlp().state_dict()
    with pytest.raises(KeyMismatchError, match="nope"):
        activation_matching(mlp, mlp, mlp_spec(mlp), make_mlp, torch.randn(4, 12), hooks={"0": "nope"})
    with pytest.raises(InvalidParameterError, match="'9'"):
        activation_matching(mlp, mlp, mlp_spec(mlp), make_mlp, torch.randn(4, 12), hooks={"9": "0"})
    with pytest.raises(KeyMismatchError, match="missing"):
        activation_matching(mlp, mlp, mlp_spec(mlp), lambda: make_mlp(sizes=(12, 32, 5)), torch.randn(4, 12))


# ------------------------------------------------------------------------------ MergeMany


def test_merge_many_of_permuted_copies_is_the_original_function():
    model = make_mlp(sizes=(12, 32, 24, 5))
    a = model.state_dict()
    spec = mlp_spec(a)
    copies = [Permutations.random(spec, a, seed=s).apply(a) for s in (1, 2, 3)]
    result = merge_many(copies, spec, seed=0)
    aligned = [p.apply(c) for p, c in zip(result.permutations, copies, strict=True)]
    assert all(torch.allclose(aligned[0][k], other[k]) for other in aligned[1:] for k in a)
    merged = make_mlp(sizes=(12, 32, 24, 5))
    merged.load_state_dict(result.state_dict)
    x = torch.randn(16, 12)
    with torch.no_grad():
        assert max_diff(model(x), merged(x)) < ATOL


def test_merge_many_of_independent_models_keeps_keys_and_dtypes():
    models = [make_mlp(s).state_dict() for s in range(3)]
    result = merge_many(models, mlp_spec(models[0]), max_iter=5)
    assert list(result.state_dict) == list(models[0])
    assert all(result.state_dict[k].dtype == models[0][k].dtype for k in models[0])
    assert 1 <= result.rounds <= 5
    with pytest.raises(InvalidParameterError, match="at least 2"):
        merge_many(models[:1], mlp_spec(models[0]))


@pytest.mark.slow
def test_weight_matching_recovers_a_planted_permutation_of_real_minilm():
    from test_rebasin_builders import minilm_state

    sd, _ = minilm_state()
    assert_recovers(sd, transformer_spec(sd, n_heads=12), seed=3)
