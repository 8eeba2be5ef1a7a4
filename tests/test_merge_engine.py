"""The merge engine: full weights, dtypes, copied keys, caching, TIES scopes, DARE, degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens import linalg
from weightlens.merge import merge
from weightlens.analysis.signs import streaming_thresholds as global_thresholds
from weightlens.merge.arithmetic import dare_mask

from test_merge_methods import SHAPES, T, float_keys, make_models


@pytest.fixture
def models():
    return make_models(seed=1)


@pytest.fixture
def tv(models):
    return wl.TaskVectors(*models)


# ------------------------------------------------------------------------------ result shape
def test_result_is_a_mapping_of_full_weights(models, tv):
    base, fts = models
    merged = merge(tv, method="task_arithmetic")
    assert list(merged) == list(base)
    assert merged.method == "task_arithmetic" and merged.params == {"alpha": 0.3}
    assert torch.equal(merged["steps"], base["steps"]) and merged["steps"].dtype == torch.int64
    for k in float_keys(base):
        want = base[k] + 0.3 * sum(ft[k] - base[k] for ft in fts.values())
        torch.testing.assert_close(merged[k], want)
        torch.testing.assert_close(merged.update(k), want - base[k], atol=1e-6, rtol=1e-5)
    with pytest.raises(KeyError, match="copied from the base"):
        merged.update("steps")
    assert merged.notes.empty and list(merged.notes.columns) == ["key", "method", "note"]
    assert merged.recipe["method"] == "task_arithmetic" and merged.recipe["tasks"] == tv.names


def test_base_and_finetuned_form_equals_task_vectors_form(models, tv):
    base, fts = models
    a = merge(base, fts, method="tsv", alpha=0.7)
    b = merge(tv, method="tsv", alpha=0.7)
    for k in base:
        torch.testing.assert_close(a[k], b[k])


def test_keys_outside_the_task_vectors_are_copied_from_base(models):
    base, fts = models
    tv = wl.TaskVectors(base, fts, exclude=["enc.*"])
    merged = merge(tv, method="iso_c")
    assert torch.equal(merged["enc.weight"], base["enc.weight"])
    assert merged["enc.weight"].data_ptr() != base["enc.weight"].data_ptr()
    assert not torch.equal(merged["dec.weight"], base["dec.weight"])


def test_low_precision_bases_are_cast_back(models):
    base, fts = models
    to16 = lambda sd: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    tv = wl.TaskVectors(to16(base), {n: to16(ft) for n, ft in fts.items()})
    merged = merge(tv, method="ties", alpha=1.0)
    assert merged["enc.weight"].dtype == torch.bfloat16 and merged.update("enc.weight").dtype == torch.float32


def test_merge_needs_finetuned_or_task_vectors(models, tv):
    with pytest.raises(wl.InvalidParameterError, match="needs the fine-tuned"):
        merge(models[0], method="tsv")
    with pytest.raises(wl.InvalidParameterError, match="either"):
        merge(tv, models[1], method="tsv")


# ------------------------------------------------------------------------------ caching
@pytest.mark.parametrize("method", ["tsv", "iso_cts", "ties", "star"])
def test_alpha_only_change_computes_nothing_new(tv, method):
    first = merge(tv, method=method, alpha=1.0).materialize()
    misses, entries = tv.cache.misses, len(tv.cache)
    second = merge(tv, method=method, alpha=0.25).materialize()
    assert tv.cache.misses == misses and len(tv.cache) == entries
    for k in tv.keys:
        torch.testing.assert_close(second.update(k), 0.25 * first.update(k))


def _cached(tv, op):
    return {k for k in tv.cache._entries if k[0] == op}


def test_method_switch_reuses_decompositions(tv):
    merge(tv, method="star").materialize()
    svds = _cached(tv, "svd")
    merge(tv, method="star", eta=20.0).materialize()  # per-task SVDs reused
    assert svds and _cached(tv, "svd") == svds
    # TSV-M on the CPU takes each task's leading triplets alone (its own entries, whatever is cached), none of
    # "tiny.weight" (r = 2 < T: zero update); another TSV-M of the same tasks reuses them
    merge(tv, method="tsv").materialize()
    tops = _cached(tv, "topk_svd_eigh")
    assert tops and "tiny.weight" not in {k[2] for k in tops} and _cached(tv, "svd") == svds
    merge(tv, method="tsv", fallback="mean").materialize()
    assert _cached(tv, "topk_svd_eigh") == tops
    merge(tv, method="iso_c").materialize()
    sums = {k for k in tv.cache._entries if k[0] == "svd_sum"}
    merge(tv, method="iso_cts").materialize()  # the sum SVD reused
    assert {k for k in tv.cache._entries if k[0] == "svd_sum"} == sums


def test_task_subsets_are_cached_apart(tv):
    full = merge(tv, method="iso_c")
    sub = merge(tv.subset(tv.names[:2]), method="iso_c")
    assert not torch.equal(full["enc.weight"], sub["enc.weight"])


# ------------------------------------------------------------------------------ TIES scopes
def test_global_thresholds_equal_kthvalue_of_the_flattened_model(tv):
    flat = torch.cat([tv.deltas(k).reshape(T, -1) for k in tv.keys], 1).abs()
    P = flat.shape[1]
    for density in (0.01, 0.2, 0.5, 0.99):
        want = flat.kthvalue(P - int(P * density), dim=1).values
        assert torch.equal(global_thresholds(tv, density), want)
    assert torch.equal(global_thresholds(tv, 1.0), torch.zeros(T))


def test_global_thresholds_with_ties_and_zeros():
    base = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    ft = {"a": torch.tensor([[0.5, 0.5, 0.5, 0.0], [0.5, 2.0, 0.0, 0.0], [1.0, 0.5, 0.0, -0.5]]),
          "b": torch.tensor([0.0, 0.0, 3.0, -0.5, 0.5])}
    tv = wl.TaskVectors(base, {"t": ft})
    flat = torch.cat([ft["a"].reshape(-1), ft["b"]]).abs()
    for density in (0.1, 0.2, 0.3, 0.5, 0.7):
        want = flat.kthvalue(17 - int(17 * density)).values
        assert float(global_thresholds(tv, density)[0]) == float(want)


def test_ties_global_and_tensor_scopes_differ_as_documented():
    # One task. Key "big" holds all the large entries, key "small" only tiny ones; several ties.
    base = {"big": torch.zeros(10), "small": torch.zeros(10)}
    big = torch.tensor([5.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    small = torch.full((10,), 0.25)
    tv = wl.TaskVectors(base, {"t": {"big": big, "small": small}})
    # global: P = 20, keep int(20 * 0.1) = 2 -> threshold = 18th smallest = 5.0 -> keeps all three 5.0 (ties)
    g = merge(tv, method="ties", density=0.1)
    assert int((g["big"] != 0).sum()) == 3 and int((g["small"] != 0).sum()) == 0
    # tensor: exactly floor(0.1 * 10) = 1 per tensor, the first of the tied 5.0s; "small" keeps one too
    t = merge(tv, method="ties", density=0.1, scope="tensor")
    assert t["big"].tolist() == [5.0] + [0.0] * 9
    assert t["small"].tolist() == [0.25] + [0.0] * 9


def test_ties_zero_vote_coordinates_take_the_whole_model_majority_sign():
    # coordinate 0 of "a": votes +1 and -1 cancel exactly; the rest of the model votes positive,
    # so the positive entry wins there under the global scope.
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    fts = {"x": {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0, 1.0])},
           "y": {"a": torch.tensor([-1.0, 0.0]), "b": torch.tensor([1.0, 1.0, 0.0])}}
    tv = wl.TaskVectors(base, fts)
    g = merge(tv, method="ties", density=1.0)
    assert g["a"].tolist() == [1.0, 0.0]
    # tensor scope (mergekit): a zero vote sum counts as positive, whatever the rest of the model says
    t = merge(tv, method="ties", density=1.0, scope="tensor")
    assert t["a"].tolist() == [1.0, 0.0]
    # with a negative-majority model the negative entry wins
    neg = {n: {k: -v if k == "b" else v for k, v in ft.items()} for n, ft in fts.items()}
    assert merge(base, neg, method="ties", density=1.0)["a"].tolist() == [-1.0, 0.0]
    assert merge(base, neg, method="ties", density=1.0, scope="tensor")["a"].tolist() == [1.0, 0.0]


def test_ties_tensor_scope_keeps_one_entry_where_the_density_rounds_to_none_and_notes_it(tv):
    # mergekit 0.1.5 keeps max(1, floor(density * n)) entries of a non-empty tensor: a 1-element tensor
    # keeps its entry, so its update is the elected disjoint mean of the tasks' values
    merged = merge(tv, method="ties", density=0.2, scope="tensor")
    noted = set(merged.notes["key"])
    assert noted == {"scale"}  # floor(0.2 * 1) = 0; every other tensor keeps at least one entry anyway
    d = tv.deltas("scale").reshape(-1)
    sign = 1.0 if float(d.sum()) >= 0 else -1.0
    agree = d[torch.sign(d) == sign]
    assert float(merged.update("scale")) == pytest.approx(float(agree.mean()) if len(agree) else 0.0, rel=1e-6)


# ------------------------------------------------------------------------------ DARE
def test_dare_is_seeded_and_reproducible(tv):
    a = merge(tv, method="dare", seed=3, alpha=1.0)
    b = merge(tv, method="dare", seed=3, alpha=1.0)
    c = merge(tv, method="dare", seed=4, alpha=1.0)
    assert all(torch.equal(a[k], b[k]) for k in tv.keys)
    assert not torch.equal(a["enc.weight"], c["enc.weight"])
    # masks do not depend on the other tasks merged alongside
    sub = merge(tv.subset(["task0"]), method="dare", seed=3, alpha=1.0)
    mask = dare_mask(SHAPES["enc.weight"], 0.5, 3, "task0", "enc.weight")
    torch.testing.assert_close(sub.update("enc.weight"), tv.delta("task0", "enc.weight") * mask / 0.5)


def test_dare_mask_keeps_density_on_average():
    mask = dare_mask((200, 200), 0.3, 0, "t", "k")
    assert abs(float(mask.double().mean()) - 0.3) < 0.01


def test_dare_is_unbiased_in_expectation(tv):
    want = {k: tv.deltas(k).sum(0).double() for k in tv.keys}
    seeds = range(400)
    mean = {k: torch.zeros_like(v) for k, v in want.items()}
    for s in seeds:
        merged = merge(tv, method="dare", density=0.5, seed=s, alpha=1.0)
        for k in tv.keys:
            mean[k] += merged.update(k).double() / len(seeds)
    for k in ("enc.weight", "dec.weight", "conv.weight"):
        # each entry: sum of 4 independent tau*B/p terms; std of the seed mean ~ ||tau|| / sqrt(400)
        err = float((mean[k] - want[k]).norm() / want[k].norm())
        assert err < 0.1, f"{k}: {err:.3f}"


# ------------------------------------------------------------------------------ degenerate cases
def test_tsv_rank_below_tasks_gives_zero_update_and_a_note(models, tv):
    merged = merge(tv, method="tsv")
    assert torch.equal(merged["tiny.weight"], models[0]["tiny.weight"])
    notes = merged.notes
    assert list(notes["key"]) == ["tiny.weight"]
    assert "r=2 < T=4" in notes["note"].iloc[0] and "zero update" in notes["note"].iloc[0]


@pytest.mark.parametrize("fallback", ["mean", "sum"])
def test_tsv_fallback_is_opt_in_and_noted(tv, fallback):
    merged = merge(tv, method="tsv", fallback=fallback, alpha=1.0)
    d = tv.deltas("tiny.weight")
    want = d.mean(0) if fallback == "mean" else d.sum(0)
    torch.testing.assert_close(merged.update("tiny.weight"), want)
    assert f"fallback={fallback!r}" in merged.notes["note"].iloc[0]


def test_iso_cts_without_task_specific_room_is_iso_c_and_noted():
    # r = 5, T = 4, f = 0.8: k0 = 4, round(1/4) = 0 -> s = 0
    base, fts = make_models(seed=2, shapes={"w": (5, 7)})
    tv = wl.TaskVectors(base, fts)
    cts = merge(tv, method="iso_cts")
    torch.testing.assert_close(cts["w"], merge(tv, method="iso_c")["w"], atol=0, rtol=0)
    assert "s=0" in cts.notes["note"].iloc[0] and "Iso-C" in cts.notes["note"].iloc[0]


def test_rank_deficient_sums_are_flagged_for_iso():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(16, 12)}
    # LoRA-like: each task is rank 1 -> the sum has rank 2 of 12
    fts = {f"t{i}": {"w": torch.randn(16, 1, generator=g) @ torch.randn(1, 12, generator=g)} for i in range(2)}
    tv = wl.TaskVectors(base, fts)
    for method in ("iso_c", "iso_cts"):
        merged = merge(tv, method=method)
        assert merged.notes["note"].str.contains("rank-deficient .numerical rank 2 of 12", regex=True).any()
    restricted = merge(tv, method="iso_c", restrict_to_numerical_rank=True)
    S = torch.linalg.svdvals(restricted.update("w").double())
    assert int((S > 1e-4 * S[0]).sum()) == 2 and "kept only" in restricted.notes["note"].iloc[0]
    full = merge(tv, method="iso_c")
    S_full = torch.linalg.svdvals(full.update("w").double())
    assert torch.allclose(S_full, S_full[0].expand_as(S_full), rtol=1e-4)  # flat over all 12


def test_zero_task_matrices_are_noted_and_star_skips_them():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(6, 4)}
    fts = {"moved": {"w": torch.randn(6, 4, generator=g)}, "still": {"w": torch.zeros(6, 4)}}
    tv = wl.TaskVectors(base, fts)
    star = merge(tv, method="star", eta=100)
    assert "'still' has an all-zero matrix" in star.notes["note"].iloc[0]
    torch.testing.assert_close(star["w"], fts["moved"]["w"] / 2, atol=1e-6, rtol=1e-5)
    assert "'still'" in merge(tv, method="tsv").notes["note"].iloc[0]
    zero = wl.TaskVectors(base, {"a": {"w": torch.zeros(6, 4)}, "b": {"w": torch.zeros(6, 4)}})
    for method in ("tsv", "iso_c", "iso_cts", "star"):
        out = merge(zero, method=method)
        assert torch.equal(out["w"], base["w"]), method
        assert "every task matrix is zero here" in out.notes["note"].iloc[0]
    assert not any(k[0] in ("svd", "svd_sum") for k in zero.cache._entries)  # no decomposition taken
    # tasks that cancel exactly: the sum is zero, the tasks are not
    g2 = torch.randn(6, 4, generator=g)
    cancel = wl.TaskVectors(base, {"a": {"w": g2}, "b": {"w": -g2}})
    iso = merge(cancel, method="iso_c")
    assert torch.equal(iso["w"], base["w"]) and "sum is zero" in iso.notes["note"].iloc[0]
    assert not math.isnan(float(merge(cancel, method="iso_cts")["w"].sum()))


def test_non_matrix_convention(models, tv):
    base, fts = models
    mean = tv.deltas("conv.weight").mean(0)
    for method in ("tsv", "iso_c", "iso_cts"):
        torch.testing.assert_close(merge(tv, method=method, alpha=0.5).update("conv.weight"), 0.5 * mean)
    # STAR's alpha multiplies a sum: at its default 1/T the non-matrix tensors get the plain mean
    torch.testing.assert_close(merge(tv, method="star").update("conv.weight"), mean, atol=1e-6, rtol=1e-5)


def test_text_projection_keys_are_averaged_like_the_reference():
    base, fts = make_models(seed=4, shapes={"text_projection": (8, 6), "w": (8, 6)})
    tv = wl.TaskVectors(base, fts)
    merged = merge(tv, method="iso_c")
    torch.testing.assert_close(merged.update("text_projection"), tv.deltas("text_projection").mean(0))
    assert not torch.allclose(merged.update("w"), tv.deltas("w").mean(0))


def test_progress_bar_runs(tv, capsys):
    merged = merge(tv, method="ties", progress=True)  # computes no key, so shows no bar
    assert "merge ties" not in capsys.readouterr().err
    merged.materialize()  # the bar of the merge's progress setting
    assert "merge ties" in capsys.readouterr().err


def test_results_do_not_alias_the_cache(tv):
    merged = merge(tv, method="tsv", alpha=1.0)
    merged["enc.weight"].add_(1.0)
    again = merge(tv, method="tsv", alpha=1.0)
    assert not torch.equal(merged["enc.weight"], again["enc.weight"])
    assert np.isfinite(again["enc.weight"].numpy()).all()


# ------------------------------------------------------------------------------ lazy / streaming
@pytest.mark.parametrize("method", ["ties", "dare", "iso_cts"])
def test_lazy_result_equals_eager_and_computes_on_access(models, method):
    base, fts = models
    eager = merge(wl.TaskVectors(base, fts), method=method, combine="ties") if method == "dare" else \
        merge(wl.TaskVectors(base, fts), method=method)
    tv = wl.TaskVectors(base, fts)
    lazy = merge(tv, method=method, lazy=True, **({"combine": "ties"} if method == "dare" else {}))
    assert lazy.lazy and "lazy" in repr(lazy)
    assert not any(k[1] == "update" for k in tv.cache._entries if k[0] == "merge")  # nothing merged yet
    assert "enc.weight" in lazy and "nope" not in lazy and len(lazy) == len(base)
    for k in reversed(list(lazy)):  # any order: global statistics were found before the first key
        torch.testing.assert_close(lazy[k], eager[k], atol=0, rtol=0)
    assert lazy.lazy and not lazy._weights  # holds nothing
    pd_notes = lazy.notes
    assert list(pd_notes["key"]) == list(eager.notes["key"])
    assert lazy.materialize() is lazy and not lazy.lazy and len(lazy._weights) == len(base)


def test_ties_global_statistics_are_found_before_the_walk(tv):
    merged = merge(tv, method="ties", lazy=True)
    tags = [k[2] for k in tv.cache._entries if k[0] == "merge" and k[1] == "global"]
    assert tags == ["ties_thresholds", "ties_majority"]
    assert merged._ctx.state["majority"] in (-1, 1) and merged._ctx.state["thresholds"].shape == (T,)
    with pytest.raises(KeyError, match="not in the merged model"):
        merged["nope"]


def test_errors_inside_a_method_name_the_method_and_key(tv):
    from weightlens.merge.registry import register_merge, unregister, KeyUpdate

    @register_merge("test_failing")
    def failing(ctx, key) -> KeyUpdate:
        if key == "dec.weight":
            raise wl.ShapeMismatchError("inner problem")
        return KeyUpdate(ctx.deltas(key).sum(0))

    @register_merge("test_bad_shape")
    def bad_shape(ctx, key) -> KeyUpdate:
        return KeyUpdate(torch.zeros(1))

    try:
        with pytest.raises(wl.ShapeMismatchError, match=r"^merge\(method='test_failing'\) on key 'dec.weight': "
                                                       r"inner problem$"):
            merge(tv, method="test_failing").materialize()  # keys are computed when read
        with pytest.raises(wl.ShapeMismatchError, match=r"returned shape \(1,\) for key 'enc.weight'; expected"):
            merge(tv, method="test_bad_shape").materialize()
    finally:
        unregister("test_failing")
        unregister("test_bad_shape")


def test_iso_cts_size_guard_is_noted():
    # r = 5, T = 8 tasks, f = 0.1: round(5/8) = 1 would need 8 > 5 task directions -> s = floor(5/8) = 0
    base, fts = make_models(seed=7, tasks=8, shapes={"w": (5, 9)})
    merged = merge(wl.TaskVectors(base, fts), method="iso_cts", common_fraction=0.1)
    notes = list(merged.notes["note"])
    assert "negative common size" in notes[0] and "no task-specific room" in notes[1]


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_methods_hand_over_an_svd_of_their_update(tv, method):
    merged = merge(tv, method=method, alpha=0.7)
    for key in ("enc.weight", "dec.weight"):
        factors = merged.key_update(key).factors
        assert factors is not None, key
        U, S, Vh = (t.double() for t in merged.update_svd(key))
        want = merged.update(key).double()
        r = min(want.shape)
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, want, rtol=0, atol=1e-5 * float(want.abs().max()))
        torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(Vh @ Vh.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)
        ref = torch.linalg.svdvals(want)  # independent: float64 LAPACK on the materialised update
        torch.testing.assert_close(S, ref, rtol=0, atol=1e-5 * float(ref[0]))
    assert not any(k[0] == "update_svd" for k in tv.cache._entries)  # nothing was decomposed


def test_factors_of_the_wrong_shape_are_rejected(tv):
    from weightlens import linalg
    from weightlens.merge.registry import KeyUpdate, register_merge, unregister

    @register_merge("test_bad_factors")
    def bad_factors(ctx, key) -> KeyUpdate:
        total = ctx.deltas(key).sum(0)
        if total.ndim != 2:
            return KeyUpdate(total)
        U, S, Vh = linalg.svd(total)
        return KeyUpdate(total, (), linalg.SVD(U[:, :1], S[:1], Vh[:2]))  # one left vector, two right ones

    try:
        with pytest.raises(wl.ShapeMismatchError, match=r"test_bad_factors.*factors of shapes.*key 'enc.weight'"):
            merge(tv, method="test_bad_factors").update_svd("enc.weight")
    finally:
        unregister("test_bad_factors")


def test_fewer_factors_than_the_rank_bound_are_completed_on_request(tv):
    # A method whose update has rank p < min(m, n) may hand over p triplets; update_svd completes them with
    # zero values and orthonormal directions orthogonal to the p given ones (no decomposition of the update).
    from weightlens import linalg
    from weightlens.merge.registry import KeyUpdate, register_merge, unregister

    @register_merge("test_thin_factors")
    def thin_factors(ctx, key) -> KeyUpdate:
        total = ctx.deltas(key).sum(0).double()
        if total.ndim != 2:
            return KeyUpdate(total.float())
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        U, S, Vh = U[:, :2].float(), S[:2].float(), Vh[:2].float()
        return KeyUpdate((U * S) @ Vh, (), linalg.SVD(U, S, Vh))

    try:
        result = merge(tv, method="test_thin_factors", alpha=-0.5)
        m, n = result.key_update("enc.weight").update.shape
        U, S, Vh = result.update_svd("enc.weight")
        r = min(m, n)
        assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
        assert torch.equal(S[2:], torch.zeros(r - 2)) and bool((S[:2] > 0).all())
        torch.testing.assert_close((U * S) @ Vh, result.update("enc.weight"), rtol=0, atol=1e-6)
        torch.testing.assert_close(U.mT @ U, torch.eye(r), rtol=0, atol=1e-5)
        torch.testing.assert_close(Vh @ Vh.mT, torch.eye(r), rtol=0, atol=1e-5)
    finally:
        unregister("test_thin_factors")


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "tsv"])
def test_update_left_gives_the_updates_left_singular_side_by_one_route_whatever_is_cached(tv, method):
    # compare and diagnose project on the merged update's leading left directions: from an eigensolve of the
    # Gram matrix (dense methods), the sum's SVD (task arithmetic) or the method's factors (TSV-M); checked
    # against float64 LAPACK on the materialised update, and unchanged after update_svd has been cached.
    from weightlens.analysis.alignment import leading_vectors

    merged = merge(tv, method=method, alpha=-0.7)
    key = "enc.weight"
    first = merged.update_left(key)
    want = merged.update(key).double()
    U, S, _ = torch.linalg.svd(want, full_matrices=False)
    torch.testing.assert_close(first.S.double(), S, rtol=0, atol=1e-5 * float(S[0]))
    k = linalg.numerical_rank(first.S, tuple(want.shape))
    got = leading_vectors(first, k).double()
    # the same span: each reference vector lies in it (the signs of singular vectors are arbitrary)
    inside = (got.mT @ U[:, :k]).square().sum(0)
    torch.testing.assert_close(inside, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-4)
    merged.update_svd(key)  # cached now: update_left must not switch to it
    again = merged.update_left(key)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert isinstance(first, linalg.LeftSVD) == (method == "ties")


def test_a_decomposition_redone_after_a_failed_attempt_is_in_the_keys_notes(tv, monkeypatch):
    # A float32 SVD that does not converge is redone in float64 (linalg's fallback plan); the merge says so
    # in that key's notes, naming what failed and what was accepted, and only there.
    import weightlens.linalg.backend as backend

    real = backend.svd_kernel

    def flaky(x, driver):
        if x.dtype == torch.float32 and tuple(x.shape[-2:]) == tuple(tv.shape("enc.weight")):
            raise torch.linalg.LinAlgError("planted: the algorithm failed to converge")
        return real(x, driver)

    monkeypatch.setattr(backend, "svd_kernel", flaky)
    merged = merge(tv, method="iso_c")
    notes = merged.notes
    retried = notes[notes["note"].str.contains("was retried")]
    assert list(retried["key"]) == ["enc.weight"]
    (note,) = retried["note"]
    assert note.startswith("Iso-C: svd of 'enc.weight'") and "planted: the algorithm failed to converge" in note
    assert "accepted cpu/float64" in note
    monkeypatch.setattr(backend, "svd_kernel", real)
    fresh = merge(wl.TaskVectors(tv.base, tv.finetuned), method="iso_c")
    torch.testing.assert_close(merged.update("enc.weight"), fresh.update("enc.weight"), rtol=0, atol=1e-5)
    assert not fresh.notes["note"].str.contains("was retried").any()


def test_a_merge_is_bitwise_the_same_whatever_ran_before_it():
    # Merges reuse cached decompositions (analysis, the studio's background comparison). LAPACK's results
    # depend on the intra-op thread count in the last bits, so those must be computed as a fresh merge
    # would be, or a recipe's recorded sha256 would not match its re-run. Matrices large enough for
    # LAPACK to use both threads.
    import threading

    from weightlens.analysis import analyze
    from weightlens.merge import compare

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(384, 256, generator=g), "v": torch.randn(256, 384, generator=g)}
    fts = {f"t{i}": {k: b + 0.01 * torch.randn(b.shape, generator=g) for k, b in base.items()} for i in range(3)}
    with linalg.torch_threads(2):
        used = wl.TaskVectors(base, fts)
        analyze(used, device="cpu", progress=False)
        studio = threading.Thread(target=lambda: compare(used, merge(used, method="iso_cts", lazy=True)))
        studio.start()
        studio.join()
        fresh = wl.TaskVectors(base, fts)
        for method in ("tsv", "star", "iso_c", "iso_cts"):
            a, b = merge(used, method=method), merge(fresh, method=method)
            assert all(torch.equal(a[k], b[k]) for k in base), method


def test_an_export_reads_each_base_tensor_once(tv, tmp_path, monkeypatch):
    # The deltas, the merged weights and the card's figure share one read of the base per key
    # (TaskVectors.base_wide keeps the last key's): 1 read instead of 3, the same bytes written.
    from collections import Counter

    reads: Counter = Counter()
    ckpt_type = type(tv.base)
    real = ckpt_type.__getitem__

    def counted(self, key):
        if self is tv.base:
            reads[key] += 1
        return real(self, key)

    want = merge(wl.TaskVectors(tv.base, tv.finetuned), method="task_arithmetic").materialize()
    monkeypatch.setattr(ckpt_type, "__getitem__", counted)
    wl.export(merge(tv, method="task_arithmetic"), tmp_path / "out", progress=False)
    assert set(tv.keys) <= set(reads) and set(reads.values()) == {1}  # (other keys: copied, read once too)
    monkeypatch.setattr(ckpt_type, "__getitem__", real)
    again = wl.load(tmp_path / "out")
    assert all(torch.equal(again[k], want[k]) for k in tv.keys)
