"""Decompositions batched by shape (``linalg.svd_many``, ``decompositions.prefetch`` / ``ahead``, ``config.batch``).

On the CPU ``torch.linalg.svd`` runs LAPACK once per matrix of a batch, so a batched result is bitwise the
per-matrix one: the tests force batching on (``config.batch = True``) and compare bitwise, merges and
``analyze`` included, and count the batched calls so that a path that never batches fails. The CUDA variants
(marked ``gpu``) compare to float32 tolerance and skip without CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import weightlens as wl
from weightlens import config, decompositions, linalg
from weightlens.errors import InvalidParameterError, NonFiniteError
from weightlens.linalg import batched

HAS_CUDA = torch.cuda.is_available()
SHAPES = {"b.0.q": (24, 16), "b.0.o": (16, 16), "b.0.fc": (32, 16), "b.0.proj": (16, 32), "b.0.bias": (16,),
          "b.1.q": (24, 16), "b.1.o": (16, 16), "b.1.fc": (32, 16), "b.1.proj": (16, 32), "b.1.frozen": (16, 16)}
MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]


def _inputs(tasks: str = "abcd", seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) if k != "b.1.frozen" else v.clone()
               for k, v in base.items()} for t in tasks}
    return base, fts


@pytest.fixture
def batches(monkeypatch):
    """The sizes of the batched calls made (one entry per call of more than one matrix)."""
    sizes: list[int] = []
    real = batched.first_attempt

    def counting(a, *args, **kwargs):
        sizes.append(a.shape[0])
        return real(a, *args, **kwargs)

    monkeypatch.setattr(batched, "first_attempt", counting)
    return sizes


@pytest.fixture
def batch_on(monkeypatch):
    monkeypatch.setattr(config, "batch", True)


def _same(a: linalg.SVD, b: linalg.SVD) -> bool:
    return all(torch.equal(x, y) and x.stride() == y.stride() for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ svd_many
def test_svd_many_groups_shapes_and_is_bitwise_the_serial_svd_on_cpu(batches):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g) for s in [(30, 20), (20, 30), (30, 20), (20, 30), (30, 20), (7, 3)]]
    xs.append(torch.zeros(5, 5))  # the zero shortcut of svd, not a batch
    found = linalg.svd_many(xs, device="cpu")
    assert sorted(batches) == [2, 3]  # tall and wide grouped apart; the lone and the zero matrix alone
    assert all(_same(f, linalg.svd(x, device="cpu")) for f, x in zip(found, xs))
    assert all(f.U.untyped_storage().nbytes() == f.U.numel() * 4 for f in found)  # own storage, not a slice


def test_svd_many_budget_below_one_matrix_goes_matrix_by_matrix(batches):
    xs = [torch.randn(40, 30) for _ in range(4)]
    one = batched._working_bytes((40, 30), torch.float32)
    found = linalg.svd_many(xs, device="cpu", max_batch_bytes=one - 1)
    assert batches == []
    assert all(_same(f, linalg.svd(x, device="cpu")) for f, x in zip(found, xs))
    linalg.svd_many(xs, device="cpu", max_batch_bytes=2 * one)
    assert batches == [2, 2]  # the budget bounds each batch


def test_svd_many_redoes_a_rejected_batch_matrix_by_matrix(monkeypatch):
    calls: list[tuple[int, ...]] = []
    real = batched.svd_kernel

    def failing_on_batches(x, driver):
        calls.append(tuple(x.shape))
        if x.ndim == 3:
            raise torch.linalg.LinAlgError("batch did not converge")
        return real(x, driver)

    monkeypatch.setattr(batched, "svd_kernel", failing_on_batches)
    xs = [torch.randn(12, 10) for _ in range(3)]
    found = linalg.svd_many(xs, device="cpu")
    assert calls[0] == (3, 12, 10)
    assert all(_same(f, linalg.svd(x, device="cpu")) for f, x in zip(found, xs))


def test_svd_many_errors_are_those_of_svd():
    bad = torch.ones(4, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'w2'"):
        linalg.svd_many([torch.eye(4), bad, torch.eye(4)], device="cpu", names=["w1", "w2", "w3"])
    with pytest.raises(InvalidParameterError, match="2 matrices and 1 names"):
        linalg.svd_many([torch.eye(2), torch.eye(2)], device="cpu", names=["w"])


def test_first_attempt_is_one_attempt_or_none():
    from weightlens.linalg import guard

    x = torch.randn(3, 6, 4)
    found = guard.first_attempt(x, batched.svd_kernel, op="svd", device="cpu", dtype=torch.float32)
    assert torch.equal(found.S, torch.linalg.svd(x, full_matrices=False).S)  # one LAPACK call per matrix
    x[1, 0, 0] = float("inf")
    assert guard.first_attempt(x, batched.svd_kernel, op="svd", device="cpu", dtype=torch.float32) is None


def test_batching_pays_on_cuda_only():
    assert linalg.batching_pays("cpu") is False
    assert linalg.default_batch_bytes("cpu") == batched.CPU_BATCH_BYTES
    assert linalg.svd_nbytes((6, 4)) == (6 * 4 + 4 + 4 * 4) * 4


# ------------------------------------------------------------------------------------------ prefetch
def _cache_of(tv: wl.TaskVectors) -> dict:
    return {k: v for k, v in tv.cache.items()}


def test_prefetch_stores_what_svd_would_under_the_same_keys(batches):
    base, fts = _inputs()
    tv, ref = wl.TaskVectors(base, fts), wl.TaskVectors(base, fts)
    n = decompositions.prefetch(tv, tv.keys, device="cpu")
    assert n == 8 * 5  # 8 matrices x (4 tasks + sum); the frozen key's zero tasks and sum are left to svd
    assert batches == [10, 10, 10, 10]  # per shape: two blocks x (4 tasks + sum)
    for key in MATRICES[:-1]:
        for of in (*tv.names, tuple(tv.names)):
            decompositions.svd(ref, key, of, device="cpu")
    got, want = _cache_of(tv), _cache_of(ref)
    assert set(got) == set(want)
    assert all(_same(got[k], want[k]) for k in want)
    assert decompositions.prefetch(tv, tv.keys, device="cpu") == 0  # all cached: nothing computed again


def test_prefetch_of_tasks_or_sum_only_and_bad_of():
    base, fts = _inputs()
    tv = wl.TaskVectors(base, fts)
    assert decompositions.prefetch(tv, ["b.0.q"], of=("sum",), device="cpu") == 1
    assert [k[0] for k, _ in tv.cache.items()] == ["svd_sum"]
    assert decompositions.prefetch(tv, ["b.0.q", "b.0.bias"], of="tasks", device="cpu") == 4
    with pytest.raises(InvalidParameterError, match=r"subset of \('tasks', 'sum'\)"):
        decompositions.prefetch(tv, ["b.0.q"], of=("concat",))


def test_prefetch_stays_within_half_the_cache():
    base, fts = _inputs()
    tv = wl.TaskVectors(base, fts)
    one = linalg.svd_nbytes((32, 16))
    tv.cache = linalg.DecompositionCache(max_bytes=2 * 3 * one + 1)  # room for 3 results of 32 x 16
    assert decompositions.prefetch(tv, ["b.0.fc", "b.1.fc"], of="tasks", device="cpu") == 3
    assert len(tv.cache) == 3 and tv.cache.evictions == 0


def test_prefetch_leaves_factored_subjects_to_their_own_path(monkeypatch, batches):
    base, fts = _inputs("abc")
    tv = wl.TaskVectors(base, fts)
    real = tv.factors
    monkeypatch.setattr(tv, "factors", lambda task, key: object() if task == "a" else real(task, key))
    decompositions.prefetch(tv, ["b.0.q", "b.1.q"], device="cpu")
    held = {(k[0], k[1]) for k, _ in tv.cache.items()}
    # "a" (factored) untouched; the sum of a factored and dense tasks is dense, so batched
    assert held == {("svd", "b"), ("svd", "c"), ("svd_sum", ("a", "b", "c"))}
    assert batches == [6]  # one shape: b, c and the sum at two keys


# ------------------------------------------------------------------------------------------ ahead, merges, analyze
def test_ahead_follows_config_batch(monkeypatch):
    tv = wl.TaskVectors(*_inputs())
    assert decompositions.ahead(tv, tv.keys, lambda k: ("tasks",), device="cpu") is None  # "auto" on the CPU
    monkeypatch.setattr(config, "batch", True)
    assert callable(decompositions.ahead(tv, tv.keys, lambda k: ("tasks",), device="cpu"))
    monkeypatch.setattr(config, "batch", "yes")
    with pytest.raises(InvalidParameterError, match="config.batch must be True, False or 'auto'"):
        decompositions.ahead(tv, tv.keys, lambda k: ("tasks",), device="cpu")


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star"])
def test_batched_merge_is_bitwise_the_per_key_merge(method, monkeypatch, batches):
    # TSV-M on the CPU computes each task's leading triplets alone (MergeContext.task_top): nothing to batch
    base, fts = _inputs()
    serial_tv = wl.TaskVectors(base, fts)
    serial = wl.merge(serial_tv, method=method, device="cpu").materialize()
    assert batches == []  # "auto" on the CPU: per key
    monkeypatch.setattr(config, "batch", True)
    tv = wl.TaskVectors(base, fts)
    merged = wl.merge(tv, method=method, device="cpu").materialize()
    # per shape: 2 blocks x 4 tasks, or 2 sums
    assert batches == ([] if method == "tsv" else [8 if method == "star" else 2] * 4)
    assert all(torch.equal(merged[k], serial[k]) for k in SHAPES)
    assert {k for k, _ in tv.cache.items()} == {k for k, _ in serial_tv.cache.items()}
    assert merged.notes.equals(serial.notes)


def test_batched_export_windows_follow_the_cache_bound(monkeypatch, batches, tmp_path):
    base, fts = _inputs()
    serial = wl.merge(wl.TaskVectors(base, fts), method="star", device="cpu").materialize()
    monkeypatch.setattr(config, "batch", True)
    tv = wl.TaskVectors(base, fts)
    tv.cache = linalg.DecompositionCache(max_bytes=2 * 8 * linalg.svd_nbytes((32, 16)))  # about a block's tasks
    calls = []
    real = decompositions._prefetch
    monkeypatch.setattr(decompositions, "_prefetch", lambda tv, window, *a: calls.append([k for k, _ in window])
                        or real(tv, window, *a))
    out = wl.merge(tv, method="star", device="cpu")
    wl.export(out, tmp_path / "star", progress=False)
    assert len(calls) > 1 and all(len(w) < len(SHAPES) for w in calls)  # windows, not the whole model
    assert [k for w in calls for k in w] == list(SHAPES)  # each key in one window, in order
    again = wl.load(tmp_path / "star")
    assert all(torch.equal(again[k], serial[k]) for k in SHAPES)


def test_batched_analyze_equals_the_per_key_analyze(monkeypatch, batches):
    base, fts = _inputs()
    serial = wl.analyze(wl.TaskVectors(base, fts), device="cpu", progress=False)
    monkeypatch.setattr(config, "batch", True)
    report = wl.analyze(wl.TaskVectors(base, fts), device="cpu", progress=False)
    assert batches and max(batches) == 10  # 2 blocks x (4 tasks + sum) per shape
    for name in ("spectra", "alignment", "pairs", "interference", "signs", "singular_values", "cosines"):
        assert getattr(report, name).equals(getattr(serial, name)), name


def test_batched_compare_equals_the_per_key_compare(monkeypatch, batches):
    from weightlens.merge import compare

    base, fts = _inputs()
    tv = wl.TaskVectors(base, fts)
    serial = compare(tv, wl.merge(tv, method="tsv", device="cpu"), device="cpu", progress=False)
    assert batches == []
    monkeypatch.setattr(config, "batch", True)
    tv = wl.TaskVectors(base, fts)
    found = compare(tv, wl.merge(tv, method="tsv", device="cpu"), device="cpu", progress=False)
    assert batches == [2, 2, 2, 2]  # the task sums: per shape one per block
    for name in ("per_task", "alignment", "spectrum", "signs", "task_signs"):
        assert getattr(found, name).equals(getattr(serial, name)), name


def test_batched_analyze_without_pairwise_prefetches_the_sums_only(monkeypatch, batches):
    monkeypatch.setattr(config, "batch", True)
    tv = wl.TaskVectors(*_inputs())
    wl.analyze(tv, device="cpu", progress=False, pairwise=False)
    assert batches == [2, 2, 2, 2]  # one sum per block and shape
    assert not any(k[0] == "svd" for k, _ in tv.cache.items())  # the tasks: singular values alone


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (300, 260)], ids=["tall", "wide", "gesvda"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_svd_many_matches_serial_svd(shape, batches):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(shape, generator=g) for _ in range(5)]
    found = linalg.svd_many(xs, device="cuda")
    assert batches == [5]
    for f, x in zip(found, xs):
        one = linalg.svd(x, device="cuda")
        assert f.U.device.type == "cuda"
        torch.testing.assert_close(f.S, one.S, rtol=1e-4, atol=1e-5)
        recon = f.U @ torch.diag(f.S) @ f.Vh
        torch.testing.assert_close(recon.cpu(), x, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "star"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_batched_merge_matches_per_key_merge(method, monkeypatch, batches):
    base, fts = _inputs()
    monkeypatch.setattr(config, "batch", False)
    serial = wl.merge(wl.TaskVectors(base, fts), method=method, device="cuda").materialize()
    monkeypatch.setattr(config, "batch", "auto")
    merged = wl.merge(wl.TaskVectors(base, fts), method=method, device="cuda").materialize()
    assert batches  # "auto" batches on CUDA
    for k in SHAPES:
        torch.testing.assert_close(merged[k], serial[k], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_batched_analyze_matches_per_key(monkeypatch, batches):
    base, fts = _inputs()
    monkeypatch.setattr(config, "batch", False)
    serial = wl.analyze(wl.TaskVectors(base, fts), device="cuda", progress=False)
    monkeypatch.setattr(config, "batch", "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = wl.analyze(wl.TaskVectors(base, fts), device="cuda", progress=False)
    assert batches
    cols = ["sigma_max", "frob", "stable_rank", "erank"]
    torch.testing.assert_close(torch.tensor(report.spectra[cols].to_numpy()),
                               torch.tensor(serial.spectra[cols].to_numpy()), rtol=1e-4, atol=1e-5, equal_nan=True)


# ------------------------------------------------------------------------------------------ LoRA adapters
def test_batched_merge_of_adapters_keeps_their_factored_path(tmp_path, monkeypatch, batches):
    """Two PEFT adapters and a full fine-tune: the adapters' task SVDs come from their factors (not batched),
    the full fine-tune's and the (dense) sums' are batched, and TSV-M and Iso-C are bitwise the per-key merges."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import _hf_models as hf
    import _peft_models as pm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama = hf.tiny_llama(tmp_path)
        config_ = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
        sources = {f"a{i}": pm.train_adapter(llama, tmp_path / f"a{i}", config_, seed=i) for i in range(2)}
        sources["full"] = hf.finetune(llama, tmp_path / "full", seed=5)

        def build() -> wl.TaskVectors:
            return wl.TaskVectors(llama, sources)

        serial = {m: wl.merge(build(), method=m, device="cpu").materialize() for m in ("tsv", "iso_c")}
        monkeypatch.setattr(config, "batch", True)
        tv = build()
        q = next(k for k in tv.keys if k.endswith("self_attn.q_proj.weight"))
        decompositions.prefetch(tv, [q], device="cpu")
        held = {k[:2] for k, _ in tv.cache.items()}
        assert held == {("svd", "full"), ("svd_sum", ("a0", "a1", "full"))}  # the adapters left to their factors
        found = {m: wl.merge(build(), method=m, device="cpu").materialize() for m in ("tsv", "iso_c")}
    assert batches
    for m in found:
        assert all(torch.equal(found[m][k], serial[m][k]) for k in serial[m]), m
