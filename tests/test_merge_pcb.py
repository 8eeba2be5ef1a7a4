"""``pcb`` (PCB-Merging): against float64 re-implementations of the authors' ``PCB_merge`` (duguodong7/pcb-merging)
and of the paper's equations 2-6, the streaming order statistics, planted coordinates, identities, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge

from _merge_inputs import flat_deltas, noise_task_vectors, unflat

CPU = {"device": "cpu"}


# ------------------------------------------------------------------------------ float64 references


def _clamp(x: np.ndarray, min_ratio: float, max_ratio: float) -> np.ndarray:
    """The reference's clamp: per row, between sorted[int(d * min_ratio)] and sorted[int(d * (1 - max_ratio) - 1)]."""
    d = x.shape[1]
    s = np.sort(x, axis=1)
    return np.clip(x, s[:, [int(d * min_ratio)]], s[:, [int(d * (1 - max_ratio) - 1)]])


def _normalize(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    return (x - lo) / (hi - lo)


def _ref_code(flat: np.ndarray, ratio: float, clip: float) -> np.ndarray:
    """The authors' PCB_merge(flat_task_checks, pcb_ratio) step by step, float64."""
    n = flat.shape[0]
    a = _clamp(np.abs(flat), clip, clip)
    clamped = np.sign(flat) * a
    intra = np.exp(n * _normalize(a) ** 2)
    inter = np.tanh(flat * flat.sum(0))
    scale = _normalize(_clamp(intra * inter, 1 - ratio, 0))
    return (clamped * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _ref_paper(flat: np.ndarray, ratio: float) -> np.ndarray:
    """Equations 2-6: beta_intra = Softmax(N Norm(tau_i^2)), beta_inter = sum_j Softmax(Norm(tau_i tau_j)),
    m = beta >= sorted(beta)[int((1 - r) d)], tau_m = sum m beta tau / sum m beta; float64 (beta ranked in float32)."""
    n, d = flat.shape
    norm = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
    beta = np.stack([_softmax(n * norm(flat[i] ** 2)) * sum(_softmax(norm(flat[i] * flat[j])) for j in range(n))
                     for i in range(n)])
    beta32 = beta.astype(np.float32)
    cut = np.sort(beta32, axis=1)[:, [int(d * (1 - ratio))]]
    w = np.where(beta32 >= cut, beta32.astype(np.float64), 0.0)
    den = w.sum(0)
    return np.where(den > 0, (w * flat).sum(0) / np.where(den > 0, den, 1), 0.0)


def _close(got: torch.Tensor, want: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


# ------------------------------------------------------------------------------ the references
@pytest.mark.parametrize("ratio, clip", [(0.1, 0.0001), (0.3, 0.05), (1.0, 0.0001), (0.05, 0.0)])
def test_code_variant_matches_the_authors_pcb_merge_in_float64(ratio, clip):
    tv = noise_task_vectors(3, shape=(40, 30), scale=0.1, seed=1)
    keys = list(tv.keys)
    want = unflat(tv, keys, _ref_code(flat_deltas(tv, keys), ratio, clip))
    got = merge(tv, method="pcb", ratio=ratio, clip=clip, alpha=1.0, **CPU)
    for key in keys:
        _close(got.update(key), want[key])


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_paper_variant_matches_equations_2_to_6_in_float64(ratio):
    tv = noise_task_vectors(3, shape=(30, 20), scale=0.1, seed=2)
    keys = list(tv.keys)
    want = unflat(tv, keys, _ref_paper(flat_deltas(tv, keys), ratio))
    got = merge(tv, method="pcb", variant="paper", ratio=ratio, alpha=1.0, **CPU)
    for key in keys:
        _close(got.update(key), want[key])


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_tensor_scope_is_the_reference_applied_to_each_key_alone(variant):
    tv = noise_task_vectors(4, shape=(20, 25), scale=0.1, seed=3)
    got = merge(tv, method="pcb", variant=variant, scope="tensor", ratio=0.2, alpha=1.0, **CPU)
    glob = merge(tv, method="pcb", variant=variant, ratio=0.2, alpha=1.0, **CPU)
    for key in tv.keys:
        flat = flat_deltas(tv, [key])
        want = _ref_code(flat, 0.2, 0.0001) if variant == "code" else _ref_paper(flat, 0.2)
        _close(got.update(key), want.reshape(tv.shape(key)))
    assert not torch.allclose(got.update("b"), glob.update("b"))  # the bias alone: other statistics


def test_alpha_scales_the_update_and_the_defaults_are_the_references():
    tv = noise_task_vectors(2, scale=0.1)
    m, one = merge(tv, method="pcb", alpha=0.5, **CPU), merge(tv, method="pcb", **CPU)
    assert m.params == {"ratio": 0.1, "variant": "code", "scope": "global", "clip": 0.0001, "alpha": 0.5}
    assert one.params["alpha"] == 1.0
    torch.testing.assert_close(m["w"], tv.base_tensor("w").float() + 0.5 * one.update("w"))
    assert get_method("pcb").alpha_grid({}, 2) == pytest.approx([0.1 * i for i in range(8, 26)])
    assert get_method("pcb").mergekit is None


# ------------------------------------------------------------------------------ identities and planted answers
@pytest.mark.parametrize("variant", ["code", "paper"])
def test_one_task_keeps_its_largest_entries_unchanged_and_equal_tasks_merge_to_that_task(variant):
    one = noise_task_vectors(1, shape=(30, 20), scale=0.1, seed=4)
    tau = {k: one.delta("t0", k) for k in one.keys}
    P = sum(v.numel() for v in tau.values())
    got = merge(one, method="pcb", variant=variant, ratio=0.2, clip=0.0, alpha=1.0, **CPU)
    kept = torch.cat([(got.update(k) != 0).reshape(-1) for k in one.keys])
    size = torch.cat([tau[k].abs().reshape(-1) for k in one.keys])
    # the importance rises with |tau| for one task: the kept entries are the largest; "code" gives the
    # threshold entry weight 0, "paper" keeps it (>=)
    n_kept = P - int(P * 0.8) - (1 if variant == "code" else 0)
    assert int(kept.sum()) == n_kept
    assert torch.equal(kept, size >= torch.sort(size, descending=True).values[n_kept - 1])
    for k in one.keys:
        upd = got.update(k)
        torch.testing.assert_close(upd[upd != 0], tau[k][upd != 0])
    base = {k: one.base_tensor(k) for k in one.keys}
    same = wl.TaskVectors(base, {f"c{i}": {k: base[k] + tau[k] for k in one.keys} for i in range(3)})
    equal = merge(same, method="pcb", variant=variant, ratio=0.2, clip=0.0, alpha=1.0, **CPU)
    for k in one.keys:
        torch.testing.assert_close(equal.update(k), got.update(k))


def test_planted_agreement_and_conflict():
    """Coordinate 0: both tasks agree (kept, their mean); 1: task a large, b small and opposed (b's importance is
    negative: b dropped, a kept); 2: both tiny (dropped); the rest: small noise."""
    g = torch.Generator().manual_seed(5)
    a, b = 0.01 * torch.randn(200, generator=g), 0.01 * torch.randn(200, generator=g)
    a[:3], b[:3] = torch.tensor([1.0, 1.2, 1e-6]), torch.tensor([0.8, -0.1, -1e-6])
    tv = wl.TaskVectors({"x": torch.zeros(200)}, {"a": {"x": a}, "b": {"x": b}})
    for variant in ("code", "paper"):
        upd = merge(tv, method="pcb", variant=variant, ratio=0.05, clip=0.0, alpha=1.0, **CPU).update("x")
        assert float(upd[1]) == pytest.approx(1.2, rel=1e-6), variant
        assert 0.8 < float(upd[0]) < 1.0 and float(upd[2]) == 0.0, variant


def test_factored_task_vectors_merge_as_their_dense_products(tmp_path):
    pytest.importorskip("safetensors")
    from test_merge_peft_modes import write_adapter  # noqa: PLC0415

    g = torch.Generator().manual_seed(8)
    base = {"lin.weight": torch.zeros(12, 10), "lin.bias": torch.zeros(12)}
    paths = {f"a{i}": write_adapter(tmp_path / f"a{i}", base, {"lin": (12, 10)}, r, 2 * r, g)
             for i, r in enumerate((2, 3))}
    tv = wl.TaskVectors(base, paths)
    dense = wl.TaskVectors(base, {t: {k: tv.delta(t, k) for k in base} for t in tv.names})
    for variant in ("code", "paper"):
        a = merge(tv, method="pcb", variant=variant, ratio=0.3, **CPU)
        b = merge(dense, method="pcb", variant=variant, ratio=0.3, **CPU)
        assert torch.equal(a.update("lin.weight"), b.update("lin.weight"))


def test_deterministic_and_degenerate_inputs_give_finite_updates():
    tv = noise_task_vectors(3, scale=0.1, seed=6)
    first = merge(tv, method="pcb", ratio=0.4, **CPU)
    again = merge(tv, method="pcb", ratio=0.4, **CPU)
    assert all(torch.equal(first.update(k), again.update(k)) for k in tv.keys)
    flat = wl.TaskVectors({"x": torch.zeros(5)}, {"a": {"x": torch.ones(5)}, "z": {"x": torch.zeros(5)}})
    for variant in ("code", "paper"):
        upd = merge(flat, method="pcb", variant=variant, ratio=1.0, **CPU).update("x")
        assert torch.isfinite(upd).all()


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("param, value, allowed", [
    ("ratio", 1.5, "in (0, 1]"), ("ratio", 0, "in (0, 1]"), ("clip", 0.5, "in [0, 0.5)"),
    ("variant", "fusion", "one of 'code', 'paper'"), ("scope", "layer", "one of 'global', 'tensor'"),
])
def test_errors_name_the_parameter(param, value, allowed):
    with pytest.raises(InvalidParameterError) as err:
        merge(noise_task_vectors(2), method="pcb", **{param: value})
    assert str(err.value) == f"The {param!r} parameter of pcb must be {allowed}. Got {value!r} instead."
