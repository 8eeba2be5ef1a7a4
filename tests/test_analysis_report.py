"""``analyze`` on small synthetic task vectors: every table against float64 NumPy, caching, options, HTML."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import weightlens as wl
from weightlens.analysis import AnalysisOptions, Report, alignment_to_merged, analyze, block_of
from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError

SHAPES = {
    "emb.weight": (20, 8),  # frozen: zero delta in every task
    "enc.layer.0.q.weight": (12, 8),
    "enc.layer.0.q.bias": (12,),
    "enc.layer.1.fc.weight": (16, 12),
    "enc.layer.1.conv": (3, 2, 2),
    "head.weight": (6, 16),
}
TASKS = ("a", "b", "c")


@pytest.fixture(scope="module")
def tv() -> wl.TaskVectors:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = {
        t: {k: v + (0.0 if k == "emb.weight" else 0.1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for t in TASKS
    }
    return wl.TaskVectors(base, fts)


@pytest.fixture(scope="module")
def report(tv) -> Report:
    return analyze(tv, device="cpu", progress=False)


def _deltas(tv, key) -> np.ndarray:
    return np.stack([tv.delta(t, key).double().numpy() for t in TASKS])


def test_block_of():
    assert block_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert block_of("model.layers.10.mlp.up_proj.weight") == "model.layers.10"
    assert block_of("visual.transformer.resblocks.0.attn.in_proj_weight") == "visual.transformer.resblocks.0"
    assert block_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings"
    assert block_of("fc1.weight") == "fc1" and block_of("proj") == "proj"


def test_tables_are_tidy(report):
    matrices = ["emb.weight", "enc.layer.0.q.weight", "enc.layer.1.fc.weight", "head.weight"]
    assert len(report.spectra) == len(matrices) * 4  # 3 tasks + sum
    assert not report.spectra.duplicated(["key", "task"]).any()
    assert len(report.signs) == len(SHAPES)
    assert len(report.pairs) == len(SHAPES) * 3  # 3 unordered pairs
    # per live matrix: vs sum (3 rows) + task x task (9 rows)
    assert len(report.alignment) == 3 * (3 + 9)
    assert set(report.interference["key"]) == set(matrices) - {"emb.weight"}
    assert report.spectra.set_index(["key", "task"]).loc[("emb.weight", "a"), "zero"]


def test_spectra_match_numpy(tv, report):
    key = "enc.layer.1.fc.weight"
    d = _deltas(tv, key)
    for name, mat in [*zip(TASKS, d), ("sum", d.sum(0))]:
        s = np.linalg.svd(mat, compute_uv=False)
        row = report.spectra.set_index(["key", "task"]).loc[(key, name)]
        assert row["sigma_max"] == pytest.approx(s[0], rel=1e-5)
        assert row["stable_rank"] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-5)
        p = s / s.sum()
        assert row["erank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-5)
        assert row["erank_rel"] == pytest.approx(row["erank"] / 12)
        sv = report.singular_values.query("key == @key and task == @name").sort_values("index")["sigma"]
        np.testing.assert_allclose(sv.to_numpy(), s, rtol=1e-5)


def test_sar_against_the_sum_and_other_tasks_match_numpy(tv, report):
    key = "enc.layer.0.q.weight"
    d = _deltas(tv, key)
    u_sum, s_sum, _ = np.linalg.svd(d.sum(0), full_matrices=False)
    k = int(np.argmax(np.sqrt(np.cumsum(s_sum**2) / np.sum(s_sum**2)) > 0.95))  # iso_script rule
    a = report.alignment.set_index(["key", "task", "reference"])
    for i, t in enumerate(TASKS):
        want = np.linalg.norm(u_sum[:, :k].T @ d[i]) / np.linalg.norm(d[i])
        assert a.loc[(key, t, "sum"), "k"] == k
        assert a.loc[(key, t, "sum"), "sar"] == pytest.approx(want, rel=1e-5)
        for j, other in enumerate(TASKS):  # projector from task j, rank from the sum (Iso Fig. 3b)
            u_j = np.linalg.svd(d[j], full_matrices=False)[0]
            want = np.linalg.norm(u_j[:, :k].T @ d[i]) / np.linalg.norm(d[i])
            assert a.loc[(key, t, other), "sar"] == pytest.approx(want, rel=1e-4)
    other = report.alignment.query("reference != 'sum'")
    assert other["sar_paper"].isna().all() and other["k_paper"].isna().all()  # chosen rule only
    paper = analyze(tv, device="cpu", progress=False, sar_criterion="paper").alignment
    full = paper.query("reference == task and k_paper == 8")
    assert len(full) > 0 and full["sar"].to_numpy() == pytest.approx(1.0, abs=1e-5)  # itself at full rank
    k_paper = paper.query("reference == 'sum' and key == @key")["k_paper"].iloc[0]
    for i, t in enumerate(TASKS):
        u_j = np.linalg.svd(d[(i + 1) % 3], full_matrices=False)[0]
        want = np.linalg.norm(u_j[:, :k_paper].T @ d[i]) / np.linalg.norm(d[i])
        row = paper.set_index(["key", "task", "reference"]).loc[(key, t, TASKS[(i + 1) % 3])]
        assert row["k"] == k_paper and row["sar"] == pytest.approx(want, rel=1e-4)


def test_cosines_and_pairs_match_numpy(tv, report):
    flat = np.stack([np.concatenate([tv.delta(t, k).double().numpy().ravel() for k in tv.keys]) for t in TASKS])
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(report.cosines.to_numpy(), flat @ flat.T / np.outer(norms, norms), atol=1e-10)
    key = "head.weight"
    d = _deltas(tv, key).reshape(3, -1)
    row = report.pairs.set_index(["key", "task_a", "task_b"]).loc[(key, "a", "c")]
    assert row["cosine"] == pytest.approx(d[0] @ d[2] / np.linalg.norm(d[0]) / np.linalg.norm(d[2]), rel=1e-9)
    assert row["conflict_pair"] == pytest.approx(np.mean(d[0] * d[2] < 0), rel=1e-12)
    k = 6 // 3  # default subspace k = min(m, n) // T
    ua, ub = (np.linalg.svd(x.reshape(6, 16), full_matrices=False)[0][:, :k] for x in (d[0], d[2]))
    assert row["overlap_left"] == pytest.approx(np.sum((ua.T @ ub) ** 2) / k, rel=1e-4)
    assert row["chance_left"] == k / 6 and row["k_sub"] == k


def test_sti_matches_numpy(tv, report):
    key = "enc.layer.1.fc.weight"
    d = _deltas(tv, key)
    k = 12 // 3
    svds = [np.linalg.svd(x, full_matrices=False) for x in d]
    Uc = np.concatenate([u[:, :k] for u, _, _ in svds], axis=1)
    Vc = np.concatenate([vh[:k].T for _, _, vh in svds], axis=1)
    Sc = np.diag(np.concatenate([s[:k] for _, s, _ in svds]))
    eye = np.eye(3 * k)
    want = np.abs((Uc.T @ Uc - eye) @ Sc @ (Vc.T @ Vc - eye)).sum()
    row = report.interference.set_index("key").loc[key]
    assert row["sti"] == pytest.approx(want, rel=1e-4)
    assert row["sti_normalized"] == pytest.approx(want / np.trace(Sc), rel=1e-4)


def test_signs_match_numpy(tv, report):
    d = _deltas(tv, "enc.layer.0.q.bias")
    row = report.signs.set_index("key").loc["enc.layer.0.q.bias"]
    conflict = (d > 0).any(0) & (d < 0).any(0)
    assert row["conflict_rate"] == pytest.approx(conflict.mean())
    assert row["chance"] == pytest.approx(0.75)
    assert math.isnan(report.signs.set_index("key").loc["emb.weight", "conflict_rate"])


def test_summary_plain_and_weighted_are_what_they_say(report):
    s = report.summary()
    sar = report.alignment.query("reference == 'sum'")
    assert s.loc["SAR task vs sum", "plain"] == pytest.approx(sar["sar"].mean())
    assert s.loc["SAR task vs sum", "weighted"] == pytest.approx(np.average(sar["sar"], weights=sar["numel"]))
    sg = report.signs.dropna(subset=["conflict_rate"])
    assert s.loc["conflict rate", "plain"] == pytest.approx(sg["conflict_rate"].mean())
    assert s.loc["conflict rate", "weighted"] == pytest.approx(sg["n_conflict"].sum() / sg["n_eligible"].sum())
    assert s.loc["conflict rate", "chance"] == pytest.approx(0.75)
    off = report.cosines.to_numpy()[~np.eye(3, dtype=bool)]
    assert s.loc["cosine (mean over pairs)", "weighted"] == pytest.approx(off.mean())
    assert set(s.columns) == {"plain", "weighted", "chance", "weighting", "note"}
    blocks = report.by_block()
    assert list(blocks.index[:3]) == ["emb", "enc.layer.0", "enc.layer.1"]
    l0 = report.signs.query("block == 'enc.layer.0'")
    assert blocks.loc["enc.layer.0", "conflict_rate_pooled"] == pytest.approx(l0.n_conflict.sum() / l0.n_eligible.sum())
    m = report.sar_matrix()
    assert list(m.index) == list(TASKS) and list(m.columns) == [*TASKS, "sum"]


def test_decompositions_are_cached_and_frozen_keys_skipped(tv):
    tv.cache.clear()
    analyze(tv, device="cpu", progress=False)
    live = 3  # matrices with a nonzero delta
    assert tv.cache.misses == live * (len(TASKS) + 1)  # one SVD per task and one of the sum, per key
    misses = tv.cache.misses
    analyze(tv, device="cpu", progress=False, sar_criterion="paper")
    assert tv.cache.misses == misses  # a second report decomposes nothing
    values_only = analyze(tv, device="cpu", progress=False, pairwise=False)
    assert values_only.interference.empty and "overlap_left" not in values_only.pairs


def test_orthogonal_tasks_have_zero_sti_and_overlap():
    rng = np.random.default_rng(1)
    Q, P = np.linalg.qr(rng.standard_normal((12, 12)))[0], np.linalg.qr(rng.standard_normal((9, 9)))[0]
    base = {"l.0.w": torch.zeros(12, 9)}
    fts = {t: {"l.0.w": torch.from_numpy(Q[:, 3 * i:3 * i + 3] @ P[:, 3 * i:3 * i + 3].T).float()} for i, t in enumerate("xyz")}
    rep = analyze(wl.TaskVectors(base, fts), device="cpu", progress=False, subspace_k=3, sti_k=3)
    assert rep.interference["sti"].iloc[0] == pytest.approx(0.0, abs=1e-5)
    assert rep.pairs["overlap_left"].to_numpy() == pytest.approx(0.0, abs=1e-10)
    assert rep.pairs["cosine"].to_numpy() == pytest.approx(0.0, abs=1e-6)
    other = rep.alignment.query("reference != task and reference != 'sum'")
    assert other["sar"].to_numpy() == pytest.approx(0.0, abs=1e-5)


def test_top_n_merged_and_alignment_to_merged(tv):
    merged = {k: tv.base_tensor(k) + tv.deltas(k).mean(0) * 2 for k in tv.keys}  # full merged weights
    rep = analyze(tv, device="cpu", progress=False, merged=merged, top_n=5)
    spec = rep.spectra.query("key == 'enc.layer.1.fc.weight'")
    assert spec["truncated"].all() and spec["n_values"].eq(5).all() and spec["erank"].isna().all()
    d = _deltas(tv, "enc.layer.1.fc.weight")
    s = np.linalg.svd(d[0], compute_uv=False)
    row = spec.set_index("task").loc["a"]
    assert row["energy_at_1"] == pytest.approx(s[0] ** 2 / np.sum(s**2), rel=1e-5)  # exact despite top-5
    assert "merged" in set(rep.alignment["reference"])
    table = alignment_to_merged(tv, merged, device="cpu").set_index(["key", "task"])
    full = analyze(tv, device="cpu", progress=False, merged=merged).alignment.query("reference == 'merged'")
    for _, r in full.iterrows():
        assert table.loc[(r["key"], r["task"]), "sar"] == pytest.approx(r["sar"], rel=1e-6)
    with_sum = alignment_to_merged(tv, device="cpu")
    assert set(with_sum["reference"]) == {"sum"}


def test_tasks_and_keys_selection(tv):
    rep = analyze(tv, device="cpu", progress=False, tasks=["c", "a"], keys=["head.weight", "enc.layer.0.q.bias"])
    assert rep.tasks == ("c", "a") and set(rep.signs["key"]) == {"head.weight", "enc.layer.0.q.bias"}
    assert list(rep.cosines.index) == ["c", "a"]


def test_bad_input_raises_named_errors(tv):
    with pytest.raises(InvalidParameterError, match="unknown option.*sar_crit"):
        analyze(tv, sar_crit="paper")
    with pytest.raises(InvalidParameterError, match="'paper', 'iso_script'"):
        analyze(tv, sar_criterion="eq6")
    with pytest.raises(KeyMismatchError, match="'nope'"):
        analyze(tv, keys=["nope"], progress=False)
    with pytest.raises(ShapeMismatchError, match="head.weight"):
        analyze(tv, merged={"head.weight": torch.zeros(2, 2)}, progress=False)
    with pytest.raises(InvalidParameterError, match="top_n"):
        AnalysisOptions(top_n=0)


def test_to_html_is_standalone(report, tmp_path):
    path = report.to_html(tmp_path / "out" / "report.html")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "SAR task vs sum" in text
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing loaded from a CDN or anywhere else
    assert not re.search(r"<link[^>]*href=['\"]?https?:", text)
    assert text.count("Plotly.newPlot") == len(report.figures())
    # plotly.js is inlined exactly once, not fetched: no CDN script URL anywhere (the URLs left
    # inside the bundle are map-tile and icon defaults of geo traces, which the report has none of).
    assert len(re.findall(r"plotly\.js v\d", text)) == 1
    assert not re.search(r"cdn\.plot\.ly/plotly|cdnjs|unpkg\.com|require\.config", text)
    assert not list(tmp_path.glob("out/*.tmp"))


def test_report_repr_and_figures(report):
    assert "tasks=['a', 'b', 'c']" in repr(report)
    assert set(report.figures()) == {
        "spectra", "sar_matrix", "sar_layers", "cosines", "conflict_matrix", "sign_conflicts", "overlap"
    }
    assert isinstance(report.summary(), pd.DataFrame)


def test_conflict_matrix_pools_counts_over_every_key(tv, report):
    flat = np.stack([np.concatenate([tv.delta(t, k).double().numpy().ravel() for k in tv.keys]) for t in TASKS])
    pooled, plain = report.conflict_matrix(), report.conflict_matrix(weighted=False)
    for i, a in enumerate(TASKS):
        assert pooled.loc[a, a] == 0.0
        for j, b in enumerate(TASKS):
            if i == j:
                continue
            prod = flat[i] * flat[j]
            assert pooled.loc[a, b] == pytest.approx(np.sum(prod < 0) / np.sum(prod != 0), rel=1e-12)
            per_key = [np.mean((d[i] * d[j])[d[i] * d[j] != 0] < 0)
                       for d in (_deltas(tv, k).reshape(3, -1) for k in tv.keys) if np.any(d[i] * d[j] != 0)]
            assert plain.loc[a, b] == pytest.approx(np.mean(per_key), rel=1e-12)


def test_with_one_task_the_sum_is_the_task():
    g = torch.Generator().manual_seed(3)
    base = {"l.0.w": torch.zeros(9, 6), "l.0.b": torch.zeros(6)}
    rep = analyze(wl.TaskVectors(base, {"only": {k: torch.randn(v.shape, generator=g) for k, v in base.items()}}),
                  device="cpu", progress=False)
    a = rep.alignment.set_index("reference")
    assert a.loc["sum", "sar"] == pytest.approx(a.loc["only", "sar"], rel=1e-6)
    spec = rep.spectra.set_index("task")
    assert spec.loc["sum", "sigma_max"] == pytest.approx(spec.loc["only", "sigma_max"], rel=1e-6)
    assert rep.pairs.empty and rep.summary().index.str.contains("SAR").any()
    vectors_only = analyze(wl.TaskVectors({"b": torch.zeros(5)}, {t: {"b": torch.randn(5, generator=g)} for t in "xy"}),
                           device="cpu", progress=False)
    assert vectors_only.alignment.empty and vectors_only.sar_matrix().shape == (2, 0)
    assert set(vectors_only.figures()) == {"cosines", "conflict_matrix", "sign_conflicts"}


def test_wide_singular_values_and_cache_reuse(tv):
    from weightlens import decompositions

    tv.cache.clear()
    key = "head.weight"  # 6 x 16: wide
    want = np.linalg.svd(tv.delta("b", key).double().numpy(), compute_uv=False)
    np.testing.assert_allclose(decompositions.svdvals(tv, key, "b", device="cpu").numpy(), want, rtol=1e-5)
    full = decompositions.svd(tv, key, "c", device="cpu")
    misses = tv.cache.misses
    assert decompositions.svdvals(tv, key, "c", device="cpu") is full.S and tv.cache.misses == misses
    U, S, Vh = decompositions.topk_svd(tv, key, tv.names, 2, device="cpu")
    u, s, vh = np.linalg.svd(_deltas(tv, key).sum(0), full_matrices=False)
    np.testing.assert_allclose(S.numpy(), s[:2], rtol=1e-5)
    np.testing.assert_allclose(np.abs(U.double().numpy().T @ u[:, :2]), np.eye(2), atol=1e-4)


def test_analyze_needs_task_vectors():
    with pytest.raises(InvalidParameterError, match="wl.TaskVectors"):
        analyze({"w": torch.zeros(2, 2)})


def test_sar_of_a_wide_matrix_projected_through_the_task_factors(tv, report):
    key = "head.weight"  # 6 x 16: projected as U_t diag(S_t) instead of the delta
    d = _deltas(tv, key)
    u_sum, s_sum, _ = np.linalg.svd(d.sum(0), full_matrices=False)
    k = int(np.argmax(np.sqrt(np.cumsum(s_sum**2) / np.sum(s_sum**2)) > 0.95))
    a = report.alignment.set_index(["key", "task", "reference"])
    for i, t in enumerate(TASKS):
        want = np.linalg.norm(u_sum[:, :k].T @ d[i]) / np.linalg.norm(d[i])
        assert a.loc[(key, t, "sum"), "sar"] == pytest.approx(want, rel=1e-5)
        u_j = np.linalg.svd(d[(i + 2) % 3], full_matrices=False)[0]
        want = np.linalg.norm(u_j[:, :k].T @ d[i]) / np.linalg.norm(d[i])
        assert a.loc[(key, t, TASKS[(i + 2) % 3]), "sar"] == pytest.approx(want, rel=1e-4)


def _keep_top(x: np.ndarray, density: float) -> np.ndarray:
    """TIES reference trimming: keep |x| >= the (P - int(P density))-th smallest |x|."""
    kth = x.size - int(x.size * density)
    return np.abs(x) >= np.partition(np.abs(x).ravel(), kth - 1)[kth - 1]


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_trimmed_sign_statistics_follow_the_scope(tv, scope):
    rep = analyze(tv, device="cpu", progress=False, sign_density=0.3, trim_scope=scope, pairwise=False)
    flat = {t: np.concatenate([tv.delta(t, k).double().numpy().ravel() for k in tv.keys]) for t in TASKS}
    signs = rep.signs.set_index("key")
    for key in ("enc.layer.0.q.weight", "enc.layer.1.conv", "head.weight"):
        d = _deltas(tv, key).reshape(3, -1)
        if scope == "global":
            thr = [np.partition(np.abs(flat[t]), flat[t].size - int(flat[t].size * 0.3) - 1)[
                flat[t].size - int(flat[t].size * 0.3) - 1] for t in TASKS]
            kept = d * (np.abs(d) >= np.array(thr)[:, None])
        else:
            kept = d * np.stack([_keep_top(row, 0.3) for row in d])
        n = (kept != 0).sum(0)
        conflict = (kept > 0).any(0) & (kept < 0).any(0)
        assert signs.loc[key, "conflict_rate"] == pytest.approx(conflict.sum() / (n >= 2).sum(), rel=1e-12)
        assert signs.loc[key, "kept_fraction"] == pytest.approx((kept != 0).mean(), rel=1e-12)

