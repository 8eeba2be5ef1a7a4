"""Every merge method against an independent float64 implementation written here from the definitions.

The references below follow ``docs/methods.md`` (one section per method) literally, in numpy
float64, on whole state dicts (TIES global flattens the whole model, as the reference code).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.merge import merge
from weightlens.merge.spectral import iso_cts_sizes

T = 4
SHAPES = {
    "enc.weight": (12, 8),
    "enc.bias": (12,),
    "dec.weight": (6, 10),
    "conv.weight": (3, 2, 2, 2),
    "tiny.weight": (3, 2),  # r = 2 < T = 4: TSV degenerate
    "scale": (),
}


def make_models(seed: int = 0, tasks: int = T, shapes=SHAPES, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["steps"] = torch.tensor([7], dtype=torch.int64)  # skip-class buffer
    fts = {}
    for t in range(tasks):
        ft = {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
              for k, v in base.items()}
        fts[f"task{t}"] = ft
    return base, fts


@pytest.fixture
def models():
    return make_models()


@pytest.fixture
def tv(models):
    base, fts = models
    return wl.TaskVectors(base, fts)


# ------------------------------------------------------------------------------ float64 references
def deltas64(base, fts, keys):
    return {k: np.stack([(ft[k].double() - base[k].double()).numpy() for ft in fts.values()]) for k in keys}


def float_keys(base):
    return [k for k, v in base.items() if v.is_floating_point()]


def ref_ta(d, alpha):
    return {k: alpha * v.sum(0) for k, v in d.items()}


def ref_disjoint(trimmed, gamma, merge_func):
    agree = (np.sign(trimmed) == gamma) & (trimmed != 0)
    sel = np.where(agree, trimmed, 0.0)
    if merge_func == "mean":
        return sel.sum(0) / np.maximum(agree.sum(0), 1)
    if merge_func == "sum":
        return sel.sum(0)
    return np.abs(sel).max(0) * gamma


def ref_ties_global(d, density, merge_func, alpha):
    """TIES reference code: flatten the whole model, kthvalue threshold, majority sign for zeros."""
    keys = list(d)
    flat = np.concatenate([d[k].reshape(d[k].shape[0], -1) for k in keys], axis=1)
    P = flat.shape[1]
    if density < 1:
        k_keep = int(P * density)
        kth = np.sort(np.abs(flat), axis=1)[:, P - k_keep - 1][:, None]  # (P - k_keep)-th smallest
        flat = np.where(np.abs(flat) >= kth, flat, 0.0)
    gamma = np.sign(flat.sum(0))
    gamma[gamma == 0] = np.sign(gamma.sum())
    merged = ref_disjoint(flat, gamma, merge_func)
    out, i = {}, 0
    for k in keys:
        n = int(np.prod(d[k].shape[1:]))
        out[k] = alpha * merged[i:i + n].reshape(d[k].shape[1:])
        i += n
    return out


def ref_ties_tensor(d, density, merge_func, alpha):
    out = {}
    for k, v in d.items():
        flat = v.reshape(v.shape[0], -1)
        n = flat.shape[1]
        keep = max(1, int(n * density))  # mergekit 0.1.5's magnitude(): at least one entry
        trimmed = np.zeros_like(flat)
        for t in range(flat.shape[0]):
            idx = np.argsort(-np.abs(flat[t]), kind="stable")[:keep]
            trimmed[t, idx] = flat[t, idx]
        gamma = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)  # mergekit: sign_weight >= 0 -> +1
        out[k] = alpha * ref_disjoint(trimmed, gamma, merge_func).reshape(v.shape[1:])
    return out


def polar64(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def ref_tsv(v):
    n_tasks, m, n = v.shape
    r = min(m, n)
    k = r // n_tasks
    U, S, V = np.zeros((m, r)), np.zeros(r), np.zeros((n, r))
    for t in range(n_tasks):
        u, s, vt = np.linalg.svd(v[t], full_matrices=False)
        U[:, t * k:(t + 1) * k], S[t * k:(t + 1) * k], V[:, t * k:(t + 1) * k] = u[:, :k], s[:k], vt[:k].T
    return polar64(U) @ np.diag(S) @ polar64(V).T


def ref_iso_c(v):
    u, s, vt = np.linalg.svd(v.sum(0), full_matrices=False)
    return s.mean() * u @ vt


def ref_iso_cts(v, f):
    n_tasks, m, n = v.shape
    u, s, vt = np.linalg.svd(v.sum(0), full_matrices=False)
    r = len(s)
    k0 = int(f * r)
    s_tot = n_tasks * round((r - k0) / n_tasks)
    kc = r - s_tot
    st = s_tot // n_tasks
    if st == 0:
        return ref_iso_c(v)
    Uc = u[:, :kc]
    Us, Vs, sig = [Uc], [vt[:kc].T], [s[:kc]]
    for t in range(n_tasks):
        R = v[t] - Uc @ Uc.T @ v[t]
        ur, sr, vtr = np.linalg.svd(R, full_matrices=False)
        Us.append(ur[:, :st]), Vs.append(vtr[:st].T), sig.append(sr[:st])
    return np.concatenate(sig).mean() * polar64(np.concatenate(Us, 1)) @ polar64(np.concatenate(Vs, 1)).T


def ref_star(v, eta):
    out = np.zeros(v.shape[1:])
    for t in range(v.shape[0]):
        u, s, vt = np.linalg.svd(v[t], full_matrices=False)
        r = min(int(np.searchsorted(np.cumsum(s), s.sum() * eta / 100.0)) + 1, len(s))
        out += u[:, :r] @ np.diag(s[:r] * s.sum() / s[:r].sum()) @ vt[:r]
    return out


def ref_spectral(d, method, alpha, **kw):
    """Matrices through ``method``; non-matrix tensors: mean (tsv/iso) or sum (star), times alpha."""
    out = {}
    n_tasks = next(iter(d.values())).shape[0]
    for k, v in d.items():
        if v.ndim != 3:
            out[k] = alpha * (v.sum(0) if method == "star" else v.mean(0))
        elif method == "tsv":
            out[k] = alpha * (ref_tsv(v) if min(v.shape[1:]) >= n_tasks else np.zeros(v.shape[1:]))
        elif method == "iso_c":
            out[k] = alpha * ref_iso_c(v)
        elif method == "iso_cts":
            out[k] = alpha * ref_iso_cts(v, kw.get("common_fraction", 0.8))
        else:
            out[k] = alpha * ref_star(v, kw.get("eta", 40.0))
    return out


def assert_merged(merged, base, ref_updates, rtol=2e-4):
    """Full weights = base + reference update (relative Frobenius error per key)."""
    for k, upd in ref_updates.items():
        want = base[k].double().numpy() + upd
        got = merged[k].double().numpy()
        err = np.linalg.norm(got - want) / max(np.linalg.norm(upd), 1e-12)
        assert err < rtol or np.allclose(got, want, atol=1e-6), f"{k}: relative error {err:.2e}"


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_task_arithmetic_matches_reference(models, tv, alpha):
    base, fts = models
    merged = merge(tv, method="task_arithmetic", alpha=alpha)
    assert_merged(merged, base, ref_ta(deltas64(base, fts, tv.keys), alpha), rtol=1e-6)


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties_global_matches_reference(models, tv, merge_func, density):
    base, fts = models
    merged = merge(tv, method="ties", density=density, merge_func=merge_func, alpha=1.3)
    assert_merged(merged, base, ref_ties_global(deltas64(base, fts, tv.keys), density, merge_func, 1.3), 1e-6)


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("density", [0.2, 0.55])
def test_ties_tensor_matches_reference(models, tv, merge_func, density):
    base, fts = models
    merged = merge(tv, method="ties", density=density, scope="tensor", merge_func=merge_func, alpha=0.7)
    assert_merged(merged, base, ref_ties_tensor(deltas64(base, fts, tv.keys), density, merge_func, 0.7), 1e-6)


@pytest.mark.parametrize("method,kw", [
    ("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("iso_cts", {"common_fraction": 0.5}),
    ("star", {}), ("star", {"eta": 75.0}),
])
def test_spectral_methods_match_reference(models, tv, method, kw):
    base, fts = models
    merged = merge(tv, method=method, alpha=1.1, **kw)
    assert_merged(merged, base, ref_spectral(deltas64(base, fts, tv.keys), method, 1.1, **kw))


def test_spectral_methods_on_bigger_matrices_and_more_tasks():
    shapes = {"w1": (40, 24), "w2": (24, 40), "b": (24,)}
    base, fts = make_models(seed=3, tasks=5, shapes=shapes)
    tv = wl.TaskVectors(base, fts)
    d = deltas64(base, fts, tv.keys)
    for method in ("tsv", "iso_c", "iso_cts", "star"):
        assert_merged(merge(tv, method=method, alpha=0.9), base, ref_spectral(d, method, 0.9))
    # r = 24, T = 5, f = 0.5: k0 = 12, s = round(2.4) = 2, k = 14 (the common + task-specific path)
    assert_merged(merge(tv, method="iso_cts", common_fraction=0.5), base,
                  ref_spectral(d, "iso_cts", 1.0, common_fraction=0.5))


def test_tsv_takes_each_tasks_leading_triplets_from_the_gram_eigensolve_and_matches_float64(monkeypatch):
    # On the CPU, with k = floor(r/T) at most r/4 and r >= 128, TSV-M takes each task's leading triplets from
    # the float64 Gram eigensolve (MergeContext.task_top, linalg.topk_svd's "eigh"), not a full SVD: checked
    # that it does, and that the update matches the float64 reference built from full SVDs.
    import weightlens.linalg.topk as topk

    calls = []
    real = topk._eigh_kernel
    monkeypatch.setattr(topk, "_eigh_kernel", lambda x, driver, k: calls.append((tuple(x.shape), k)) or real(
        x, driver, k=k))
    shapes = {"wide": (160, 300), "tall": (260, 140), "b": (160,)}
    base, fts = make_models(seed=5, tasks=5, shapes=shapes)
    tv = wl.TaskVectors(base, fts)
    merged = merge(tv, method="tsv", device="cpu")
    d = deltas64(base, fts, tv.keys)
    for key in ("wide", "tall"):
        want = ref_tsv(d[key])
        got = merged.update(key).double().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, key
    assert sorted(calls) == sorted([((160, 300), 32)] * 5 + [((260, 140), 28)] * 5)


def test_tsv_notes_an_orthogonalisation_that_is_not_unique():
    # Two tasks whose updates live in the same 6 of 8 output rows: their top-4 left vectors stack to 8 columns
    # spanning 6 dimensions, so polar(U_hat) is not unique there; TSV-M says so on that key, not on a key where
    # the tasks' directions are independent.
    g = torch.Generator().manual_seed(4)
    live = torch.zeros(8, 1)
    live[:6] = 1.0
    base = {"shared_rows": torch.zeros(8, 8), "free": torch.zeros(8, 8)}
    fts = {f"t{i}": {"shared_rows": live * torch.randn(8, 8, generator=g), "free": torch.randn(8, 8, generator=g)}
           for i in range(2)}
    notes = merge(base, fts, method="tsv").notes
    spans = notes[notes["note"].str.contains("stacked here span")]
    assert list(spans["key"]) == ["shared_rows"]
    assert "8 left singular vectors stacked here span 6 dimensions" in spans["note"].item()


def test_star_default_alpha_is_one_over_t(models, tv):
    base, fts = models
    merged = merge(tv, method="star")
    assert merged.params["alpha"] == pytest.approx(1 / T)
    assert_merged(merged, base, ref_spectral(deltas64(base, fts, tv.keys), "star", 1 / T))


def test_dare_ties_combine_matches_reference_with_same_masks(models, tv):
    from weightlens.merge.arithmetic import dare_mask

    base, fts = models
    d = deltas64(base, fts, tv.keys)
    for k, v in d.items():
        for t, task in enumerate(tv.names):
            v[t] = v[t] * dare_mask(tuple(v.shape[1:]), 0.6, 5, task, k).numpy() / 0.6
    merged = merge(tv, method="dare", density=0.6, seed=5, combine="ties")
    assert merged.params["alpha"] == 1.0
    assert_merged(merged, base, ref_ties_global(d, 1.0, "mean", 1.0), 1e-6)
    merged_ta = merge(tv, method="dare", density=0.6, seed=5)
    assert merged_ta.params["alpha"] == 0.3
    assert_merged(merged_ta, base, ref_ta(d, 0.3), 1e-6)


# ------------------------------------------------------------------------------ identities
def test_tsv_with_one_task_returns_the_task_vector(models):
    base, fts = models
    merged = merge(base, {"only": fts["task0"]}, method="tsv")
    for k in float_keys(base):
        torch.testing.assert_close(merged[k], fts["task0"][k], atol=2e-5, rtol=1e-5)


def test_star_with_eta_100_is_the_plain_average(models, tv):
    base, fts = models
    merged = merge(tv, method="star", eta=100)
    for k in float_keys(base):
        avg = torch.stack([ft[k] for ft in fts.values()]).mean(0)
        torch.testing.assert_close(merged[k], avg, atol=2e-5, rtol=1e-5)


def test_iso_cts_with_common_fraction_one_equals_iso_c(tv):
    a = merge(tv, method="iso_cts", common_fraction=1.0)
    b = merge(tv, method="iso_c")
    for k in tv.keys:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    # every matrix key (enc, dec, tiny) is noted as falling back to Iso-C
    assert sorted(a.notes.loc[a.notes["note"].str.startswith("Iso-CTS: no task-specific room"), "key"]) == [
        "dec.weight", "enc.weight", "tiny.weight"]


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_with_density_one_and_one_task_returns_the_task_vector(models, scope):
    base, fts = models
    merged = merge(base, {"only": fts["task1"]}, method="ties", density=1.0, scope=scope)
    for k in float_keys(base):
        torch.testing.assert_close(merged[k], fts["task1"][k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("r,n_tasks,expected", [
    (768, 8, (616, 19)), (768, 14, (614, 11)), (768, 20, (608, 8)),
    (1024, 8, (816, 26)), (1024, 14, (814, 15)), (1024, 20, (824, 10)),
    (50, 20, (50, 0)),
    # r = 50 at 8 and 14 tasks, from the formula by hand: k0 = int(0.8 * 50) = 40;
    # T=8: round(10/8 = 1.25) = 1 -> s_tot 8, k 42; T=14: round(10/14 = 0.71) = 1 -> s_tot 14, k 36.
    (50, 8, (42, 1)), (50, 14, (36, 1)),
])
def test_iso_cts_size_table(r, n_tasks, expected):
    assert iso_cts_sizes(r, n_tasks, 0.8) == expected


def test_iso_cts_sizes_use_bankers_rounding():
    # r=10, T=4, f=0.8: k0 = 8, (10-8)/4 = 0.5 -> round(0.5) = 0 (half to even) -> Iso-C
    assert iso_cts_sizes(10, 4, 0.8) == (10, 0)
    # r=14, T=4, f=0.5: k0 = 7, 7/4 = 1.75 -> 2; r=26, T=4, f=0.5: 13/4 = 3.25 -> 3
    assert iso_cts_sizes(14, 4, 0.5) == (6, 2)
    # 2.5 -> 2 (half to even), not 3: r=20, T=4, f=0.5 -> k0 = 10, 10/4 = 2.5
    assert iso_cts_sizes(20, 4, 0.5) == (12, 2)
    # rounding up past r keeps k >= 0: r=5, T=8, f=0.1 -> round(5/8) = 1 would need 8 > 5 columns
    assert iso_cts_sizes(5, 8, 0.1) == (5, 0)


def test_iso_c_with_one_task_is_sigma_bar_times_the_polar_factor(models):
    base, fts = models
    merged = merge(base, {"only": fts["task2"]}, method="iso_c")
    for k in ("enc.weight", "dec.weight", "tiny.weight"):
        d = (fts["task2"][k].double() - base[k].double()).numpy()
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        upd = merged.update(k).double().numpy()
        np.testing.assert_allclose(upd, s.mean() * polar64(d), atol=1e-5)
        assert np.linalg.norm(upd) == pytest.approx(s.mean() * np.sqrt(len(s)), rel=1e-5)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 0.93, 1.0])
def test_tensor_trim_keeps_what_a_stable_sort_keeps_among_many_ties(density):
    # Quantised deltas tie everywhere: the kept set must be the first floor(density * n) of a stable
    # descending sort of |tau| (lower index first among equals), as numpy's stable argsort gives.
    from weightlens.merge.arithmetic import trim_tensor

    g = torch.Generator().manual_seed(3)
    deltas = (torch.randn(3, 37, 29, generator=g) * 2).round() / 4  # about a dozen distinct magnitudes
    got = trim_tensor(deltas, density)
    flat = deltas.reshape(3, -1).numpy()
    keep = max(1, int(flat.shape[1] * density)) if density > 0 else 0  # mergekit keeps at least one
    want = np.zeros_like(flat)
    for t in range(3):
        idx = np.argsort(-np.abs(flat[t]), kind="stable")[:keep]
        want[t, idx] = flat[t, idx]
    assert torch.equal(got.reshape(3, -1), torch.from_numpy(want))
