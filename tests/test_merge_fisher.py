"""``fisher`` (Fisher merging): against float64 Fishers computed here with plain autograd (both estimators),
identities, FusionBench's own results (``tests/peer_references/data/fusionbench_fisher_*``), caching, errors, digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import get_method, merge
from weightlens.merge import fisher as fisher_module

from _merge_data import Net, load_reference, merge_data, net, random_case, reference_cases

CPU = {"device": "cpu"}


# ------------------------------------------------------------------------------ float64 reference
def _ref_fisher(tv: wl.TaskVectors, inputs: dict[str, torch.Tensor], estimator: str, batch: int = 8
                ) -> dict[str, dict[str, np.ndarray]]:
    """Per task, in float64: ``"batch"``: sum over batches of (d sum_x sum_c sqrt(p_c) log p_c)^2, over N;
    ``"example"``: mean over x of sum_c p_c (d log p_c)^2, one backward per example and class."""
    out = {}
    for t in tv.names:
        model = net(tv.finetuned_weights(t)).double()
        params = dict(model.named_parameters())
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        x = inputs[t].double()
        for xb in x.split(batch):
            log_p = torch.log_softmax(model(xb), -1)
            p = log_p.detach().exp()
            if estimator == "batch":
                grads = torch.autograd.grad((p.sqrt() * log_p).sum(), list(params.values()))
                for k, g in zip(params, grads):
                    total[k] += g**2
                continue
            for i in range(len(xb)):
                for c in range(p.shape[1]):
                    grads = torch.autograd.grad(log_p[i, c], list(params.values()), retain_graph=True)
                    for k, g in zip(params, grads):
                        total[k] += p[i, c] * g**2
        out[t] = {k: (v / len(x)).numpy() for k, v in total.items()}
    return out


def _ref_merge(tv: wl.TaskVectors, fishers: dict, normalize: bool, eps: float) -> dict[str, np.ndarray]:
    """FusionBench's formula on full weights: w_t = (1/T) c_t (F_t + eps); c_t from the whole-model L2 norms."""
    names = list(tv.names)
    norms = np.array([np.sqrt(sum(np.sum(f**2) for f in fishers[t].values())) for t in names])
    c = np.full(len(names), 1 / len(names))
    if normalize:
        inv = 1 / (norms + eps)
        c = c * inv / inv.sum()
    out = {}
    for key in tv.keys:
        w = [c[i] * (fishers[t][key] + eps) for i, t in enumerate(names)]
        theta = [tv.finetuned_weights(t)[key].double().numpy() for t in names]
        out[key] = sum(a * b for a, b in zip(w, theta)) / sum(w)
    return out


def _close(got: torch.Tensor, want: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol * 0.1 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("estimator,normalize,eps", [("batch", True, 1e-6), ("batch", False, 1e-6),
                                                     ("batch", True, 1e-2), ("example", True, 1e-6)])
def test_fisher_matches_float64_autograd(estimator, normalize, eps):
    tv, inputs = random_case(3, seed=11, n=16)
    got = merge(tv, method="fisher", data=merge_data(inputs, dtype=torch.float64), estimator=estimator,
                normalize_fisher_weight=normalize, minimal_fisher_weight=eps, **CPU)
    fishers = _ref_fisher(tv, inputs, estimator)
    want = _ref_merge(tv, fishers, normalize, eps)
    for key in tv.keys:
        _close(got[key], want[key])
    for t in tv.names:
        for key, f in fishers[t].items():
            _close(got.state["fishers"][t][key], f, rtol=1e-4)


def test_the_estimators_differ_and_the_batch_one_depends_on_the_batch_size():
    tv, inputs = random_case(2, seed=12, n=16)
    f = {(e, b): merge(tv, method="fisher", data=merge_data(inputs, batch_size=b), estimator=e, **CPU).state["fishers"]
         for e, b in (("batch", 8), ("batch", 4), ("example", 8), ("example", 4))}
    key = "l1.weight"
    assert not torch.allclose(f["batch", 8]["t0"][key], f["example", 8]["t0"][key], rtol=1e-2)
    assert not torch.allclose(f["batch", 8]["t0"][key], f["batch", 4]["t0"][key], rtol=1e-2)
    torch.testing.assert_close(f["example", 8]["t0"][key], f["example", 4]["t0"][key], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------ identities
def test_one_task_gives_back_its_finetune():
    tv, inputs = random_case(1, seed=13)
    got = merge(tv, method="fisher", data=merge_data(inputs), **CPU)
    for key in tv.keys:
        torch.testing.assert_close(got[key], tv.finetuned_weights("t0")[key], rtol=1e-6, atol=1e-6)


def _given_fishers(monkeypatch, fishers: dict[str, dict[str, torch.Tensor]]) -> None:
    """The merge reads these Fishers instead of computing them (the formula alone is under test)."""
    monkeypatch.setattr(fisher_module, "task_statistics", lambda tv, data, kind, task, estimator: fishers[task])


def test_equal_fishers_give_the_simple_average(monkeypatch):
    tv, inputs = random_case(3, seed=14)
    g = torch.Generator().manual_seed(0)
    same = {k: torch.rand(tv.shape(k), generator=g) for k in tv.keys}
    _given_fishers(monkeypatch, {t: same for t in tv.names})
    got = merge(tv, method="fisher", data=merge_data(inputs), **CPU)
    for key in tv.keys:
        mean = torch.stack([tv.finetuned_weights(t)[key] for t in tv.names]).mean(0)
        torch.testing.assert_close(got[key], mean, rtol=1e-6, atol=1e-6)


def test_normalization_makes_the_merge_blind_to_a_task_fishers_overall_scale(monkeypatch):
    tv, inputs = random_case(2, seed=15)
    g = torch.Generator().manual_seed(1)
    fishers = {t: {k: torch.rand(tv.shape(k), generator=g) for k in tv.keys} for t in tv.names}
    scaled = {**fishers, "t1": {k: 100 * v for k, v in fishers["t1"].items()}}
    runs = {}
    for name, given in (("plain", fishers), ("scaled", scaled)):
        _given_fishers(monkeypatch, given)
        for normalize in (True, False):  # fresh task vectors: the given Fishers bypass the cache's key
            runs[name, normalize] = merge(random_case(2, seed=15)[0], method="fisher", data=merge_data(inputs), minimal_fisher_weight=0.0,
                                          normalize_fisher_weight=normalize, **CPU)
    for key in tv.keys:
        torch.testing.assert_close(runs["plain", True][key], runs["scaled", True][key], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(runs["plain", False][key], runs["scaled", False][key], atol=1e-3)
    t1 = runs["scaled", False]["l1.weight"] - tv.finetuned_weights("t1")["l1.weight"]  # t1 now dominates
    t0 = runs["plain", False]["l1.weight"] - tv.finetuned_weights("t1")["l1.weight"]
    assert float(t1.abs().mean()) < 0.1 * float(t0.abs().mean())


# ------------------------------------------------------------------------------ FusionBench
@pytest.mark.parametrize("path", reference_cases("fisher"), ids=lambda p: p.stem)
def test_fisher_matches_fusionbench(path):
    tv, data, expected, meta = load_reference(path)
    assert meta["peer"] == "fusion-bench==0.2.33" and meta["method"] == "fisher"
    got = merge(tv, method="fisher", data=data, **meta["params"], **CPU)
    assert set(expected) == set(tv.keys)
    for key, want in expected.items():
        _close(got[key], want.double().numpy())
    mean = {k: torch.stack([tv.finetuned_weights(t)[k] for t in tv.names]).mean(0) for k in tv.keys}
    assert any(not torch.allclose(got[k], mean[k], atol=1e-4) for k in tv.keys)  # not the plain average


def test_there_are_fusionbench_references_with_and_without_normalization():
    params = [load_reference(p)[3]["params"] for p in reference_cases("fisher")]
    assert sorted((p["normalize_fisher_weight"], p["minimal_fisher_weight"]) for p in params) == [
        (False, 1e-6), (True, 1e-6), (True, 1e-2)]
    assert get_method("fisher").defaults() == {"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6,
                                               "estimator": "batch", "alpha": 1.0}


# ------------------------------------------------------------------------------ caching, errors
def test_fishers_are_computed_once_per_task_and_estimator():
    tv, inputs = random_case(2, seed=16)
    calls: list[str] = []
    data = merge_data(inputs, calls=calls)
    first = merge(tv, method="fisher", data=data, **CPU)
    merge(tv, method="fisher", data=data, normalize_fisher_weight=False, minimal_fisher_weight=1e-3, **CPU)
    assert calls == list(tv.names)
    merge(tv, method="fisher", data=data, estimator="example", **CPU)
    assert calls == list(tv.names) * 2  # another estimator: other statistics
    assert set(first.state["coefficients"]) == set(tv.names)
    assert sum(first.state["coefficients"].values()) == pytest.approx(1 / len(tv))


def test_errors_name_the_method_and_what_to_pass():
    tv, inputs = random_case(2)
    with pytest.raises(InvalidParameterError, match=r"^fisher needs data=\.\.\.: the diagonal Fisher of each "
                                                    r"parameter, from squared gradients, computed from each task's"):
        merge(tv, method="fisher")
    with pytest.raises(InvalidParameterError, match=r"The 'estimator' parameter of fisher must be one of 'batch', "
                                                    r"'example'. Got 'sampled' instead."):
        merge(tv, method="fisher", data=merge_data(inputs), estimator="sampled")

    class OneLogit(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[:, :1]

    with pytest.raises(InvalidParameterError, match=r"fisher: the model of task 't0' returned logits of shape "
                                                    r"\(8, 1\); the Fisher of a classifier needs"):
        merge(tv, method="fisher", data=merge_data(inputs, cls=OneLogit))


# ------------------------------------------------------------------------------ digits
def test_fisher_beats_task_arithmetic_and_the_base_on_digits(digits_merges):
    """Measured on the CI zoo: base 0.952, task arithmetic (alpha 0.3) 0.967, Fisher merging 0.972 (mean
    normalized accuracy on test): a smaller margin than RegMean's (0.989)."""
    mean = {m: float(np.mean(list(v.values()))) for m, v in digits_merges.items()}
    assert mean["fisher"] > mean["task_arithmetic"] > mean["base"] + 0.01
    assert mean["regmean"] > mean["fisher"]
