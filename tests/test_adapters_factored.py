"""LoRA task vectors stay factored: decompositions from the factors, analysis and every merge on them.

Adapters are trained with peft for a few steps on tiny models (``tests/_peft_models.py``). References:
float64 dense SVDs of the products ``scale * B @ A``, and the same analysis or merge on a second
TaskVectors of full fine-tunes ``base + delta`` (float64, so its deltas equal the adapters' bit for bit).

Three Llama adapters of rank 5 on every linear layer (hidden 16): one task is rank 5 < 16, their sum
rank 15 < 16 (factored), and on the 8 x 16 key/value projections the sum is full rank (dense). With
``T = 3`` tasks, ``floor(16 / 3) = 5`` is the adapters' rank, so TSV-M, STI and the subspace overlaps
are determined by the dense path too and must agree. Iso's unrestricted null-space directions are
arbitrary in the dense path: there the test checks what is determined (the flat value, the
meaningful directions, the notes).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402

import weightlens as wl  # noqa: E402
from weightlens import decompositions  # noqa: E402
from weightlens.analysis.alignment import principal_angles  # noqa: E402
from weightlens.linalg.factored import complete_basis, complete_pair, factored_svdvals  # noqa: E402
from weightlens.merge import get_method, list_methods  # noqa: E402

#: The methods that need no data= (regmean and fisher read a MergeData: tests/test_merge_regmean.py, _fisher.py).
DATA_FREE = [m for m in list_methods() if not get_method(m).needs_data]

import _hf_models as hf  # noqa: E402
import _peft_models as pm  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q = "model.layers.0.self_attn.q_proj.weight"  # 16 x 16
UP = "model.layers.1.mlp.up_proj.weight"  # 32 x 16
DOWN = "model.layers.0.mlp.down_proj.weight"  # 16 x 32
KEY = "model.layers.1.self_attn.k_proj.weight"  # 8 x 16: rank 5 per task, the sum of 3 full rank
C_ATTN = "transformer.h.0.attn.c_attn.weight"  # GPT-2 Conv1D (16, 48), fan_in_fan_out
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("factored")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama, gpt2 = hf.tiny_llama(root), hf.tiny_gpt2(root)
        config = peft.LoraConfig(r=5, lora_alpha=10, target_modules=LINEAR)
        adapters = {f"t{i}": pm.train_adapter(llama, root / f"t{i}", config, seed=i) for i in range(3)}
        conv1d = peft.LoraConfig(r=3, lora_alpha=6, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])
        gpt = {f"g{i}": pm.train_adapter(gpt2, root / f"g{i}", conv1d, seed=i) for i in range(2)}
        full = hf.finetune(llama, root / "full", seed=5)
    return {"llama": llama, "gpt2": gpt2, "adapters": adapters, "gpt": gpt, "full": full}


def _dense_twin(tv: wl.TaskVectors) -> wl.TaskVectors:
    """The same task vectors given densely: full fine-tunes ``base + delta`` in float64 (exact deltas)."""
    base = {k: tv.base[k].double() for k in tv.base}
    fts = {t: {k: base[k] + tv.delta(t, k).double() if k in tv.keys else base[k] for k in base} for t in tv.names}
    return wl.TaskVectors(base, fts)


@pytest.fixture(scope="module")
def tvs(zoo):
    tv = wl.TaskVectors(zoo["llama"], zoo["adapters"])
    return tv, _dense_twin(tv)


def _product(tv: wl.TaskVectors, names, key: str) -> torch.Tensor:
    """float64 ``sum scale * B @ A`` from the factors: the exact matrix."""
    names = [names] if isinstance(names, str) else names
    return sum(f.scale * (f.B.double() @ f.A.double()) for f in (tv.factors(t, key) for t in names))


def _check_svd(got: wl.linalg.SVD, dense: torch.Tensor, rank: int) -> None:
    """Values to 1e-6 relative, the rest of the dense spectrum zero, subspaces equal (principal angles)."""
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    assert got.S.numel() == rank
    np.testing.assert_allclose(got.S.double().numpy(), S[:rank].numpy(), rtol=1e-6)
    if rank < S.numel():
        assert float(S[rank]) < 1e-12 * float(S[0])
    for k in sorted({1, rank // 2, rank} - {0}):
        assert float(principal_angles(got.U[:, :k], U[:, :k]).max()) < 1e-4
        assert float(principal_angles(got.Vh[:k].mT, Vh[:k].mT).max()) < 1e-4
    recon = (got.U.double() * got.S.double()) @ got.Vh.double()
    assert float((recon - dense).abs().max()) < 1e-6 * float(S[0])


# ------------------------------------------------------------------------------------ linear algebra
def test_complete_basis_and_factored_svdvals():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64)).Q
    full = complete_basis(Q, 25)
    assert full.shape == (40, 25) and torch.equal(full[:, :6], Q)
    torch.testing.assert_close(full.mT @ full, torch.eye(25, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(complete_basis(Q, 6), Q) and complete_basis(Q[:, :0], 3).shape == (40, 3)
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.equal(complete_basis(eye[:, :2], 5), eye[:, :5])  # identity reflectors (tau = 0)
    V = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64)).Q
    U_full, V_full, N = complete_pair(Q, V, 25)
    assert torch.equal(U_full, full) and torch.equal(V_full, complete_basis(V, 25))
    torch.testing.assert_close(N, U_full[:, 6:] @ V_full[:, 6:].mT, rtol=0, atol=1e-12)
    B, A = torch.randn(30, 4, generator=g), torch.randn(4, 50, generator=g)
    S = torch.linalg.svdvals(1.5 * (B.double() @ A.double()))
    np.testing.assert_allclose(factored_svdvals(B, A, scale=1.5, device="cpu").double().numpy(), S[:4].numpy(),
                               rtol=1e-6)


# ------------------------------------------------------------------------------------ decompositions
@pytest.mark.parametrize("key", [Q, UP, DOWN, KEY])
def test_one_adapter_is_decomposed_from_its_factors(zoo, key):
    tv = wl.TaskVectors(zoo["llama"], zoo["adapters"])

    def boom(*args):
        raise AssertionError("a factored decomposition read a dense delta")

    tv.delta = tv.deltas = boom  # nothing m x n is formed
    values = decompositions.svdvals(tv, key, "t1", **CPU)  # from the triangular factors alone
    got = decompositions.svd(tv, key, "t1", **CPU)
    np.testing.assert_allclose(values.numpy(), got.S.numpy(), rtol=1e-6)
    _check_svd(got, _product(tv, "t1", key), 5)
    cached = tv.cache.get_or_compute(("svd", "t1", key, "cpu", "torch.float32"), boom)
    assert cached is got and cached.U.shape[1] == 5  # the cache holds the thin factors
    assert torch.equal(decompositions.svdvals(tv, key, "t1", **CPU), got.S)
    top = decompositions.topk_svd(tv, key, "t1", 3, **CPU)
    assert torch.equal(top.S, got.S[:3]) and top.U.shape[1] == 3
    assert decompositions.topk_svd(tv, key, "t1", 9, **CPU).S.numel() == 5  # past the rank: the rank


def test_gpt2_conv1d_adapters_in_the_stored_orientation(zoo):
    tv = wl.TaskVectors(zoo["gpt2"], zoo["gpt"])
    for of, rank in (("g0", 3), (["g0", "g1"], 6)):
        got = decompositions.svd(tv, C_ATTN, of, **CPU)
        assert got.U.shape == (16, rank) and got.Vh.shape == (rank, 48)
        _check_svd(got, _product(tv, of, C_ATTN), rank)
        dense = tv.delta(of, C_ATTN) if isinstance(of, str) else tv.deltas(C_ATTN).sum(0)
        torch.testing.assert_close((got.U * got.S) @ got.Vh, dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("names", [("t0", "t2"), ("t0", "t1", "t2")])
@pytest.mark.parametrize("key", [Q, UP, DOWN])
def test_a_sum_of_adapters_is_decomposed_from_concatenated_factors(tvs, names, key):
    tv = tvs[0]
    got = decompositions.svd(tv, key, names, **CPU)
    _check_svd(got, _product(tv, list(names), key), 5 * len(names))
    S = decompositions.svdvals(tv, key, list(names), **CPU)
    assert torch.equal(S, got.S)


def test_a_full_rank_sum_and_a_mixed_sum_are_dense(zoo, tvs):
    tv = tvs[0]
    full_rank = decompositions.svd(tv, KEY, tv.names, **CPU)  # 3 x 5 > 8: the product is decomposed densely
    assert full_rank.S.numel() == 8
    np.testing.assert_allclose(full_rank.S.double().numpy(),
                               torch.linalg.svdvals(_product(tv, tv.names, KEY)).numpy(), rtol=1e-5)
    mixed = wl.TaskVectors(zoo["llama"], {"t0": zoo["adapters"]["t0"], "full": zoo["full"]})
    assert decompositions.svd(mixed, Q, "t0", **CPU).S.numel() == 5  # the adapter alone: factored
    total = decompositions.svd(mixed, Q, mixed.names, **CPU)  # with a full fine-tune: the dense sum
    want = torch.linalg.svd(mixed.deltas(Q).sum(0).double(), full_matrices=False)
    assert total.S.numel() == 16
    np.testing.assert_allclose(total.S.double().numpy(), want.S.numpy(), rtol=1e-5)


# ------------------------------------------------------------------------------------ analysis
def _same_table(got, want, what: str) -> None:
    assert list(got.columns) == list(want.columns) and got.shape == want.shape, what
    for col in got.columns:
        a, b = got[col], want[col]
        if a.dtype.kind in "fiu" or str(a.dtype) in ("Int64", "Float64"):
            x, y = a.astype(float).to_numpy(), b.astype(float).to_numpy()
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=f"{what}.{col}")
        else:
            assert a.tolist() == b.tolist(), f"{what}.{col}"


def test_analyze_on_adapters_equals_analyze_on_the_dense_deltas(tvs):
    tv, dense = tvs
    got, want = wl.analyze(tv, progress=False, **CPU), wl.analyze(dense, progress=False, **CPU)
    for name in ("spectra", "alignment", "pairs", "interference", "signs", "singular_values"):
        _same_table(getattr(got, name), getattr(want, name), name)
    np.testing.assert_allclose(got.cosines.to_numpy(), want.cosines.to_numpy(), rtol=1e-6)
    spectra = got.spectra.set_index(["key", "task"])
    row = spectra.loc[(Q, "t0")]  # exact: all 16 values, 11 of them zero, nothing truncated
    assert row["n_values"] == 16 and not row["truncated"] and row["numerical_rank"] == 5
    assert row["energy_at_8"] == 1.0 and spectra.loc[(Q, "sum"), "numerical_rank"] == 15
    top = wl.analyze(tv, progress=False, keys=[Q], top_n=8, **CPU).spectra.set_index("task")
    assert not top.loc["t0", "truncated"] and top.loc["t0", "n_values"] == 16  # rank 5 < top_n: complete
    assert top.loc["sum", "truncated"] and top.loc["sum", "n_values"] == 8  # rank 15 > top_n: truncated


def test_alignment_to_the_sum_of_adapters(tvs):
    tv, dense = tvs
    got = wl.analysis.alignment_to_merged(tv, keys=[Q, UP], progress=False, **CPU)
    want = wl.analysis.alignment_to_merged(dense, keys=[Q, UP], progress=False, **CPU)
    _same_table(got, want, "alignment_to_merged")


# ------------------------------------------------------------------------------------ merges
def _updates(result) -> dict[str, torch.Tensor]:
    return {k: result.key_update(k).update for k in result.updated_keys}


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_merge_method_on_adapters_equals_the_dense_merge(tvs, method):
    tv, dense = tvs
    got, want = wl.merge(tv, method=method, **CPU), wl.merge(dense, method=method, **CPU)
    matrices = set(tv.keys_of_kind("matrix"))
    for key, upd in _updates(got).items():
        ref = want.key_update(key).update
        scale = max(float(ref.abs().max()), 1e-12)
        if method in ("iso_c", "iso_cts") and key in matrices and key != KEY and ref.any():
            _check_isotropic(tv, key, upd, ref, method)  # null-space directions: arbitrary in the dense path
            continue
        err = float((upd.double() - ref.double()).abs().max())
        assert err <= 2e-5 * scale, f"{method} {key}: {err:.3g} (scale {scale:.3g})"
    assert got.notes.note.tolist() == want.notes.note.tolist()
    for key in (Q, UP):  # an SVD of every update (TSV-M, Iso from their own factors: min(m, n) triplets)
        svd, upd = got.update_svd(key), got.update(key)
        assert svd.S.numel() == 16
        torch.testing.assert_close((svd.U * svd.S) @ svd.Vh, upd, rtol=0, atol=1e-5 * float(upd.abs().max()))


def test_per_task_models_on_adapters_equal_the_dense_ones(tvs):
    """EMR's per-task models (``for_task``) read adapters one key at a time, as the shared update."""
    tv, dense = tvs
    got, want = wl.merge(tv, method="emr", **CPU), wl.merge(dense, method="emr", **CPU)
    assert got.state["rescalers"] == pytest.approx(want.state["rescalers"], rel=1e-5)
    for task in tv.names:
        for key in tv.keys:
            ref = want.for_task(task).update(key)
            err = float((got.for_task(task).update(key).double() - ref.double()).abs().max())
            assert err <= 2e-5 * max(float(ref.abs().max()), 1e-12), (task, key, err)


def _check_isotropic(tv, key, upd, ref, method) -> None:
    """Iso's update where it is determined: one flat value sigma-bar on all min(m, n) directions, and for
    Iso-C the sum's own directions mapped to each other (``U_R^T u = sigma V_R^T``)."""
    got, want = torch.linalg.svdvals(upd.double()), torch.linalg.svdvals(ref.double())
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.numpy(), float(want[0]), rtol=1e-5)
    if method == "iso_c":
        U, S, Vh = torch.linalg.svd(_product(tv, tv.names, key), full_matrices=False)
        U, Vh = U[:, :15], Vh[:15]
        for u in (upd.double(), ref.double()):
            torch.testing.assert_close(U.mT @ u, float(want[0]) * Vh, rtol=0, atol=1e-5 * float(want[0]))


@pytest.mark.parametrize("tasks, restrict", [(("t0", "t1", "t2"), True), (("t0", "t1"), False), (("t0", "t1"), True)])
def test_iso_cts_of_adapters_is_isotropic_with_the_dense_value(tvs, tasks, restrict):
    """Two adapters (rank 10 < k = 12): the common block has null-space directions and the residuals vanish
    (noted from factors; a dense SVD returns noise there); restricted, only the sum's 10 directions are left.
    Three adapters restricted: 13 common directions, and one residual direction per task."""
    tv, dense = (x.subset(tasks) for x in tvs)
    got = wl.merge(tv, method="iso_cts", restrict_to_numerical_rank=restrict, **CPU)
    want = wl.merge(dense, method="iso_cts", restrict_to_numerical_rank=restrict, **CPU)
    for key in (Q, UP, DOWN):
        a, b = got.update(key).double(), want.update(key).double()
        sa, sb = torch.linalg.svdvals(a), torch.linalg.svdvals(b)
        live = int((sa > 1e-6 * sa[0]).sum())
        assert live == (10 if restrict and len(tasks) == 2 else 16)  # restricted two: the sum's directions alone
        np.testing.assert_allclose(sa[:live].numpy(), float(sa[0]), rtol=1e-5)  # flat
        if not restrict or len(tasks) == 3:  # the dense value matches (noise residuals weigh ~0)
            np.testing.assert_allclose(float(sa[0]), float(sb[0]), rtol=1e-5)
        U = torch.linalg.svd(_product(tv, list(tasks), key), full_matrices=False).U[:, :5 * len(tasks)]
        if len(tasks) == 2:  # the sum's whole column space is in the common block
            torch.testing.assert_close(torch.linalg.svdvals(U.mT @ a), sa[:10], rtol=1e-5, atol=0)
    notes = got.notes.note.tolist()
    if len(tasks) == 2:
        assert any("the residual of task 't0' is rank-deficient (numerical rank 0 of 2)" in n for n in notes)


def test_restricted_iso_on_adapters_equals_the_dense_merge(tvs):
    tv, dense = tvs
    got = wl.merge(tv, method="iso_c", restrict_to_numerical_rank=True, **CPU)
    want = wl.merge(dense, method="iso_c", restrict_to_numerical_rank=True, **CPU)
    for key in tv.keys:
        ref = want.update(key)
        torch.testing.assert_close(got.update(key), ref, rtol=0, atol=2e-5 * max(float(ref.abs().max()), 1e-12))
    svd = got.update_svd(Q)  # 15 flat values, one zero
    assert svd.S.numel() == 16 and float(svd.S[-1]) == 0.0 and float(svd.S[0]) == pytest.approx(float(svd.S[14]))


def test_a_mix_of_adapters_and_a_full_finetune(zoo):
    """The full fine-tune keeps the dense path (its SVD has min(m, n) triplets), the adapters theirs; the sum is
    dense. Analysis and every merge run, TSV-M taking the adapter's 5 directions and the full task's 8."""
    mixed = wl.TaskVectors(zoo["llama"], {"t0": zoo["adapters"]["t0"], "full": zoo["full"]})
    report = wl.analyze(mixed, keys=[Q, UP, "model.norm.weight"], progress=False, **CPU)
    assert report.spectra.set_index(["key", "task"]).loc[(Q, "t0"), "numerical_rank"] == 5
    for method in DATA_FREE:
        upd = wl.merge(mixed, method=method, **CPU).key_update(UP).update
        assert upd.shape == (32, 16) and bool(torch.isfinite(upd).all()) and upd.any(), method
    tsv = wl.merge(mixed, method="tsv", **CPU)
    assert tsv.update_svd(Q).S.numel() == 16 and any("task 't0' has rank 5 < floor(r/T)=8" in n for n in tsv.notes.note)
    assert int((tsv.update_svd(Q).S > 0).sum()) == 13


def test_tsv_of_one_adapter_is_its_own_update(zoo):
    tv = wl.TaskVectors(zoo["llama"], {"t0": zoo["adapters"]["t0"]})
    merged = wl.merge(tv, method="tsv", alpha=1.0, **CPU)
    for key in tv.keys:
        d = tv.delta("t0", key)
        torch.testing.assert_close(merged.update(key), d, rtol=0, atol=1e-6 * max(float(d.abs().max()), 1e-12))
    notes = merged.notes.note.tolist()
    assert any("has rank 5 < floor(r/T)=16" in n for n in notes)


def test_compare_and_widgets_take_adapters(tvs):
    tv = tvs[0]
    for method in ("tsv", "iso_cts"):
        comparison = wl.compare(tv, wl.merge(tv, method=method, **CPU), keys=[Q, UP])
        assert not comparison.alignment.empty and comparison.alignment["sar"].notna().all()
    from weightlens.widgets import InterferenceDashboard, MergeStudio

    dash = InterferenceDashboard(tv, device="cpu")
    assert dash.report.spectra.shape[0] > 0
    studio = MergeStudio(tv, method="tsv")
    assert studio.wait(120) and studio.last_error is None
    assert math.isfinite(float(studio.state["params"]["alpha"]))


def test_the_dashboard_and_the_studio_run_every_method_on_adapters(tvs):
    # The widgets take factored task vectors as they are: every method computes, shows a comparison, no error.
    from weightlens.widgets import InterferenceDashboard, MergeStudio

    tv = tvs[0]
    InterferenceDashboard(tv)
    studio = MergeStudio(tv)
    for method in DATA_FREE:  # the studio offers data-based methods only with data=
        studio.controls["method"].value = method
        assert studio.wait(120), method
        assert "#b00020" not in studio.status.value, (method, studio.status.value)
        assert studio.status.value.startswith(f"<span class='wl-status' style='color:#333'>{method}:"), method


def test_wudi_exact_from_factors_equals_the_dense_solve(tvs):
    # solver="exact" solves from the LoRA factors (nothing n x n formed); the dense twin materialises the matrices
    tv, dense = tvs
    got = wl.merge(tv, method="wudi", solver="exact", **CPU)
    want = wl.merge(dense, method="wudi", solver="exact", **CPU)
    for key in tv.keys_of_kind("matrix"):
        ref = want.key_update(key).update
        scale = max(float(ref.abs().max()), 1e-12)
        assert float((got.key_update(key).update - ref).abs().max()) <= 2e-5 * scale, key
    assert got.notes.note.tolist() == want.notes.note.tolist()
