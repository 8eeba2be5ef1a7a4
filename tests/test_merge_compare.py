"""compare(): alignment, spectra and sign conflicts against hand-computed values; the figure builders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import weightlens as wl
from weightlens.figures.merge import (
    figure_merge_spectrum,
    figure_retained_alignment,
    figure_merge_conflicts,
    figure_sweep,
)
from weightlens.merge import compare, merge, sweep
from weightlens.analysis.alignment import sar
from weightlens.merge.compare import sign_outcomes

from test_merge_methods import make_models


@pytest.fixture
def tv():
    return wl.TaskVectors(*make_models(seed=5))


def test_tables_have_the_documented_columns(tv):
    cmp = compare(tv, merge(tv, method="tsv"))
    assert cmp.method == "tsv" and cmp.params["alpha"] == 1.0
    assert list(cmp.per_task.columns) == ["task", "which", "sar", "kept", "cos", "agreement"]
    assert set(cmp.per_task["which"]) == {"merged", "task_arithmetic"}
    assert len(cmp.per_task) == 2 * len(tv)
    matrices = tv.keys_of_kind("matrix")
    assert set(cmp.alignment["key"]) == set(matrices) == set(cmp.spectrum["key"])
    assert set(cmp.signs["key"]) == set(tv.keys)
    assert {"conflict_rate", "chance_rate", "zeroed", "mass_side_won", "opposing_mass"} <= set(cmp.signs.columns)
    assert list(cmp.conflicts()["which"]) == ["merged", "task_arithmetic"]


def test_task_arithmetic_merge_at_alpha_one_equals_its_reference_rows(tv):
    cmp = compare(tv, merge(tv, method="task_arithmetic", alpha=1.0))
    pt = cmp.per_task.set_index(["task", "which"])
    for task in tv.names:
        a, b = pt.loc[(task, "merged")], pt.loc[(task, "task_arithmetic")]
        assert np.allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float), rtol=1e-5, equal_nan=True)


def test_sar_and_kept_against_numpy(tv):
    merged = merge(tv, method="iso_c", alpha=0.8)
    cmp = compare(tv, merged, criterion="paper", eps=0.05)
    key, task = "enc.weight", tv.names[1]
    upd = merged.update(key).double().numpy()
    d = tv.delta(task, key).double().numpy()
    u, s, _ = np.linalg.svd(upd, full_matrices=False)
    e = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(1 - e <= 0.05**2 * (1 + 1e-12))) + 1  # Iso Eq. 6
    row = cmp.alignment.set_index(["task", "key", "which"]).loc[(task, key, "merged")]
    assert row["k"] == k
    assert row["sar"] == pytest.approx(np.linalg.norm(u[:, :k].T @ d) / np.linalg.norm(d), rel=1e-4)
    assert row["kept"] == pytest.approx(np.sum(d * upd) / np.sum(d * d), rel=1e-5)
    assert row["cos"] == pytest.approx(np.sum(d * upd) / np.linalg.norm(d) / np.linalg.norm(upd), rel=1e-5)


def test_sar_of_a_matrix_against_itself_is_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 5, generator=g)
    U = torch.linalg.svd(a, full_matrices=False).U
    assert sar(a, U) == pytest.approx(1.0)  # the analysis SAR, which compare uses
    assert math.isnan(sar(torch.zeros(9, 5), U))


def test_spectrum_rows_are_the_singular_values(tv):
    merged = merge(tv, method="star")
    spec = compare(tv, merged).spectrum
    rows = spec[(spec["key"] == "dec.weight") & (spec["which"] == "merged")]
    want = torch.linalg.svdvals(merged.update("dec.weight").double())
    assert np.allclose(rows["sigma"].to_numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    ta = spec[(spec["key"] == "dec.weight") & (spec["which"] == "task_arithmetic")]
    assert np.allclose(ta["sigma"].to_numpy(), torch.linalg.svdvals(tv.deltas("dec.weight").sum(0).double()).numpy(),
                       rtol=1e-4, atol=1e-6)


def test_sign_outcomes_by_hand():
    # 3 tasks x 4 coordinates
    d = torch.tensor([[1.0, 2.0, 1.0, 0.0],
                      [1.0, -1.0, 1.0, 0.0],
                      [-3.0, 0.0, 1.0, 5.0]])
    # coordinate 0: +1 +1 -3 (conflict, sum -1); coordinate 1: +2 -1 (conflict, sum +1);
    # coordinate 2: all + (contested, no conflict); coordinate 3: one entry (not contested)
    update = torch.tensor([1.0, 0.0, 3.0, 5.0])
    s = sign_outcomes(d, update)
    assert (s["coords"], s["contested"], s["conflicting"]) == (4, 3, 2)
    assert s["zeroed"] == 0.5  # coordinate 1 zeroed
    assert s["mass_side_won"] == 0.0  # coordinate 0 went with +, the sum is -; coordinate 1 is 0
    # opposing mass at conflicting coordinates: coordinate 0 (update +): |-3| = 3; coordinate 1 (update 0): none
    assert s["opposing_mass"] == pytest.approx(3 / (1 + 1 + 3 + 2 + 1))


def test_ties_settles_more_conflicts_than_task_arithmetic(tv):
    cmp = compare(tv, merge(tv, method="ties", density=0.3))
    c = cmp.conflicts().set_index("which")
    assert c.loc["merged", "chance_rate"] == pytest.approx(1 - 2 ** (1 - len(tv)))
    assert c.loc["task_arithmetic", "zeroed"] == 0.0 and c.loc["task_arithmetic", "mass_side_won"] == 1.0
    # TIES drops the minority sign where it keeps anything; trimming also zeroes coordinates
    assert c.loc["merged", "zeroed"] > 0
    ta_agree = cmp.per_task.query("which == 'task_arithmetic'")["agreement"]
    assert ((ta_agree > 0.5) & (ta_agree < 1)).all()


def test_compare_accepts_plain_weights_and_checks_tasks(tv):
    merged = merge(tv, method="tsv", alpha=0.5)
    plain = compare(tv, dict(merged))
    via = compare(tv, merged)
    assert plain.method == "weights"
    assert np.allclose(plain.per_task["sar"], via.per_task["sar"], rtol=1e-4)
    with pytest.raises(wl.InvalidParameterError, match="tasks"):
        compare(tv.subset(tv.names[:2]), merged)
    with pytest.raises(wl.InvalidParameterError, match="criterion"):
        compare(tv, merged, criterion="energy")
    only = compare(tv, merged, keys=["dec.weight"])
    assert set(only.signs["key"]) == {"dec.weight"}


def test_figures_are_built_from_the_tables(tv):
    comps = {m: compare(tv, merge(tv, method=m)) for m in ("tsv", "ties")}
    fig = figure_merge_spectrum(comps["tsv"], "enc.weight", normalize=True)
    assert isinstance(fig, go.Figure) and [t.name for t in fig.data] == ["task arithmetic (sum)", "tsv"]
    assert max(fig.data[1].y) == pytest.approx(1.0)
    fig = figure_retained_alignment(comps, metric="kept")
    assert [t.name for t in fig.data] == ["task arithmetic (sum)", "tsv", "ties"]
    assert list(fig.data[1].x) == tv.names
    fig = figure_merge_conflicts(comps)
    assert list(fig.data[0].x) == ["task arithmetic (sum)", "tsv", "ties"] and len(fig.data) == 3
    with pytest.raises(ValueError, match="metric"):
        figure_retained_alignment(comps, metric="nope")

    def evaluate(weights, task, split):
        return {"accuracy": 0.5, "loss": 1.0}

    sw = sweep(tv, "iso_c", [0.5, 1.0], evaluate, progress=False)
    fig = figure_sweep({"iso_c": sw})
    assert len(fig.data) == 3  # val, test, chosen marker


def test_alpha_only_change_reuses_the_merged_svd(tv):
    a = compare(tv, merge(tv, method="iso_cts", alpha=1.0))
    misses = tv.cache.misses
    b = compare(tv, merge(tv, method="iso_cts", alpha=-0.5))
    assert tv.cache.misses == misses  # no decomposition (and no update) recomputed
    sa, sb = a.spectrum.query("which == 'merged'"), b.spectrum.query("which == 'merged'")
    assert np.allclose(sb["sigma"].to_numpy(), 0.5 * sa["sigma"].to_numpy())
    # SAR does not depend on the scale; kept flips sign with alpha
    pa, pb = a.per_task.query("which == 'merged'"), b.per_task.query("which == 'merged'")
    assert np.allclose(pa["sar"], pb["sar"]) and np.allclose(pb["kept"], -0.5 * pa["kept"].to_numpy())


@pytest.mark.parametrize("method", ["tsv", "ties"])
def test_rescaled_comparison_equals_a_fresh_compare_at_the_new_alpha(tv, method):
    at_half = compare(tv, merge(tv, method=method, alpha=0.5))
    moved = at_half.rescaled(1.25)
    fresh = compare(tv, merge(tv, method=method, alpha=1.25))
    assert moved.params["alpha"] == 1.25
    for table, cols in (("per_task", ["sar", "kept", "cos"]), ("spectrum", ["sigma"]), ("alignment", ["sar", "kept"])):
        a, b = getattr(moved, table), getattr(fresh, table)
        np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-4, atol=1e-6)
    with pytest.raises(wl.InvalidParameterError, match="positive"):
        at_half.rescaled(0.0)


def test_the_task_arithmetic_half_is_computed_once_per_task_set(tv):
    first = compare(tv, merge(tv, method="ties", density=0.5))
    tags = {k for k in tv.cache._entries if k[0] == "compare_task_arithmetic"}
    assert len(tags) == len(tv.keys)
    second = compare(tv, merge(tv, method="tsv"))  # another merge: only its own half is computed
    assert {k for k in tv.cache._entries if k[0] == "compare_task_arithmetic"} == tags
    other = wl.TaskVectors(*make_models(seed=5))  # the same task vectors, an empty cache
    fresh = compare(other, merge(other, method="tsv"))
    for table in ("alignment", "spectrum", "signs", "task_signs", "per_task"):
        ta = [getattr(c, table).query("which == 'task_arithmetic'").reset_index(drop=True) for c in (first, second, fresh)]
        pd.testing.assert_frame_equal(ta[0], ta[1])
        pd.testing.assert_frame_equal(ta[1], ta[2], check_exact=False, rtol=1e-6)


# ------------------------------------------------------------------------------ ComparisonCache
@pytest.fixture
def counted(monkeypatch):
    """The comparisons ComparisonCache computes (compare() calls), in order."""
    from weightlens.merge import comparisons

    calls = []

    def counting(tv, merged, **kwargs):
        calls.append((merged.method, dict(merged.params), kwargs.get("keys")))
        return compare(tv, merged, **kwargs)

    monkeypatch.setattr(comparisons, "compare", counting)
    return calls


def test_cache_rescales_to_a_new_alpha_what_a_fresh_compare_computes(tv, counted):
    from weightlens.merge.comparisons import ComparisonCache

    cache = ComparisonCache()
    first = cache.compare(merge(tv, method="tsv", alpha=0.5, lazy=True))
    moved = cache.compare(merge(tv, method="tsv", alpha=1.25, lazy=True))
    assert len(counted) == 1 and moved.params["alpha"] == 1.25 and first.params["alpha"] == 0.5
    other = wl.TaskVectors(*make_models(seed=5))  # an empty cache: nothing shared with the rescale
    fresh = compare(other, merge(other, method="tsv", alpha=1.25))
    for table in ("per_task", "alignment", "spectrum", "signs", "task_signs"):
        pd.testing.assert_frame_equal(getattr(moved, table), getattr(fresh, table), check_exact=False,
                                      rtol=1e-6, atol=1e-7)


def test_cache_hit_is_the_same_object_and_a_parameter_change_recomputes(tv, counted):
    from weightlens.merge.comparisons import ComparisonCache

    cache = ComparisonCache()
    merged = merge(tv, method="ties", alpha=0.8, density=0.3, lazy=True)
    comp = cache.compare(merged)
    assert cache.compare(merged) is comp and cache.get(merge(tv, method="ties", alpha=0.8, density=0.3)) is comp
    denser = cache.compare(merge(tv, method="ties", alpha=0.8, density=0.6, lazy=True))
    assert len(counted) == 2 and counted[1][1]["density"] == 0.6
    want = compare(tv, merge(tv, method="ties", alpha=0.8, density=0.6))
    pd.testing.assert_frame_equal(denser.per_task, want.per_task)
    cache.compare(merge(tv, method="dare", alpha=0.8, density=0.3, lazy=True))  # another method
    cache.compare(merge(tv.subset(tv.names[:2]), method="ties", alpha=0.8, density=0.3, lazy=True))  # other tasks
    cache.compare(merged, keys=["dec.weight"])  # other keys
    assert len(counted) == 5 and len(cache) == 5
    assert cache.get(merged) is comp  # still there


def test_cache_never_keeps_or_rescales_to_a_zero_alpha(tv, counted):
    from weightlens.merge.comparisons import ComparisonCache

    cache = ComparisonCache(size=2)
    cache.compare(merge(tv, method="task_arithmetic", alpha=0.5, lazy=True))
    zero = merge(tv, method="task_arithmetic", alpha=0.0, lazy=True)
    assert cache.get(zero) is None
    at_zero = cache.compare(zero)
    assert at_zero.params["alpha"] == 0.0 and len(counted) == 2 and len(cache) == 1
    assert cache.get(zero) is None
    for density in (0.2, 0.4):  # two more: the least recently used is dropped
        cache.compare(merge(tv, method="ties", density=density, lazy=True))
    assert len(cache) == 2 and cache.get(merge(tv, method="task_arithmetic", alpha=0.5, lazy=True)) is None
    with pytest.raises(wl.InvalidParameterError, match="size"):
        ComparisonCache(size=0)
    with pytest.raises(wl.InvalidParameterError, match="MergeResult"):
        cache.get(dict(merge(tv, method="tsv")))


def test_comparison_knows_which_merges_it_rescales_to(tv):
    comp = compare(tv, merge(tv, method="ties", alpha=0.8, density=0.3))
    assert comp.tasks == tv.names
    assert comp.can_rescale_to(merge(tv, method="ties", alpha=2.0, density=0.3, lazy=True))
    assert not comp.can_rescale_to(merge(tv, method="ties", alpha=2.0, density=0.4, lazy=True))
    assert not comp.can_rescale_to(merge(tv, method="ties", alpha=0.0, density=0.3, lazy=True))
    assert not comp.can_rescale_to(merge(tv, method="dare", alpha=0.8, density=0.3, lazy=True))
    assert not comp.can_rescale_to(merge(tv.subset(tv.names[1:]), method="ties", alpha=0.8, density=0.3))
    assert not compare(tv, merge(tv, method="ties", alpha=0.0)).can_rescale_to(merge(tv, method="ties"))
    assert not compare(tv, dict(merge(tv, method="tsv"))).can_rescale_to(merge(tv, method="tsv"))
