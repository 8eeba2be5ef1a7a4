"""``emr`` (EMR-Merging): against a float64 re-implementation of the paper's formulas and the reference code's
steps (``harveyhuang18/EMR_Merging``, ``emr_merge``), identities, per-task models, ``sweep`` and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import MergeResult, get_method, merge, sweep

from _merge_inputs import noise_task_vectors

CPU = {"device": "cpu"}


# ------------------------------------------------------------------------------ float64 reference
def _stack(tv: wl.TaskVectors, key: str) -> np.ndarray:
    return np.stack([tv.delta(t, key).double().numpy() for t in tv.names])


def _ref_elect(taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's per-key steps: flag = (sum > 0) * 2 - 1; mask = tau * flag > 0; max |mask * tau| * flag."""
    flag = (taus.sum(0) > 0) * 2.0 - 1.0
    masks = taus * flag > 0
    return np.abs(masks * taus).max(0) * flag, masks


def _ref_emr(tv: wl.TaskVectors, rescale: str) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """``(tau_uni per key, {task: {key: lambda_t * M_t * tau_uni}})`` in float64.

    model_mean: scales[m] += mean|tau_m|, new_scales[m] += mean|tau_uni * M_m| (the reference code);
    model_sum: the paper's sum|tau_t| / sum|M_t tau_uni| over the model; key: that ratio per key."""
    uni, masks, a, b = {}, {}, np.zeros(len(tv)), np.zeros(len(tv))
    for key in tv.keys:
        taus = _stack(tv, key)
        uni[key], masks[key] = _ref_elect(taus)
        for m in range(len(tv)):
            size = np.abs(taus[m]).sum(), np.abs(uni[key] * masks[key][m]).sum()
            n = taus[m].size if rescale == "model_mean" else 1
            a[m] += size[0] / n
            b[m] += size[1] / n
    out: dict[str, dict[str, np.ndarray]] = {}
    for m, task in enumerate(tv.names):
        out[task] = {}
        for key in tv.keys:
            masked = uni[key] * masks[key][m]
            lam = a[m] / b[m]
            if rescale == "key":
                lam = np.abs(_stack(tv, key)[m]).sum() / np.abs(masked).sum()
            out[task][key] = lam * masked
    return uni, out


def _close(got: torch.Tensor, want: np.ndarray) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))


# ------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("rescale", ["model_mean", "model_sum", "key"])
def test_emr_matches_the_float64_formulas(rescale):
    tv = noise_task_vectors(4, shape=(30, 20), seed=3)
    uni, per_task = _ref_emr(tv, rescale)
    got = merge(tv, method="emr", rescale=rescale, **CPU)
    assert got.params == {"rescale": rescale, "alpha": 1.0} and got.has_task_models
    for key in tv.keys:
        _close(got.update(key), uni[key])
        for task in tv.names:
            _close(got.for_task(task).update(key), per_task[task][key])
    if rescale != "key":
        assert list(got.state["rescalers"]) == list(tv.names)
    assert get_method("emr").alpha_grid({}, 4) == [1.0]


def test_the_rescalers_of_paper_and_code_differ_when_tensor_sizes_differ():
    tv = noise_task_vectors(3, shape=(40, 3), seed=1)  # w: 120 entries, b: 3
    code = merge(tv, method="emr", **CPU).state["rescalers"]
    paper = merge(tv, method="emr", rescale="model_sum", **CPU).state["rescalers"]
    assert all(abs(code[t] - paper[t]) > 1e-4 for t in tv.names)


def test_planted_coordinates():
    base = {"w": torch.zeros(4)}
    tv = wl.TaskVectors(base, {"a": {"w": torch.tensor([1.0, -2.0, 0.0, 3.0])},
                               "b": {"w": torch.tensor([2.0, 1.0, -1.0, -4.0])}})
    got = merge(tv, method="emr", **CPU)
    # sum (3, -1, -1, -1): elected signs (+, -, -, -); magnitudes: max over the agreeing tasks
    assert got["w"].tolist() == [2.0, -2.0, -1.0, -4.0]
    assert got.state["rescalers"] == {"a": 1.5, "b": 8 / 7}  # mean|a| 1.5 / 1; mean|b| 2 / (7 / 4)
    assert got.for_task("a")["w"].tolist() == [3.0, -3.0, 0.0, 0.0]
    assert got.for_task("b").update("w").tolist() == pytest.approx([16 / 7, 0.0, -8 / 7, -32 / 7])
    # a zero sum elects the negative sign (the reference's (sum > 0) * 2 - 1)
    tie = wl.TaskVectors({"w": torch.zeros(1)}, {"a": {"w": torch.tensor([1.0])}, "b": {"w": torch.tensor([-1.0])}})
    assert merge(tie, method="emr", **CPU)["w"].tolist() == [-1.0]


# ------------------------------------------------------------------------------ identities
def _dyadic(n_tasks: int, same: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """Base and fine-tunes on a grid of 1/8: base + (ft - base) is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randint(-40, 40, (6, 5), generator=g) / 8.0, "b": torch.randint(-40, 40, (5,), generator=g) / 8.0}
    first = {k: v + torch.randint(-9, 9, v.shape, generator=g) / 8.0 for k, v in base.items()}
    fts = {f"t{i}": (first if same or i == 0 else {k: v + torch.randint(-9, 9, v.shape, generator=g) / 8.0
                                                   for k, v in base.items()}) for i in range(n_tasks)}
    return base, fts


@pytest.mark.parametrize("rescale", ["model_mean", "model_sum", "key"])
@pytest.mark.parametrize("n_tasks", [1, 2])
def test_one_task_or_equal_tasks_give_back_the_finetune_exactly(rescale, n_tasks):
    base, fts = _dyadic(n_tasks, same=True)
    got = merge(wl.TaskVectors(base, fts), method="emr", rescale=rescale, **CPU)
    for task in fts:
        model = got.for_task(task)
        assert all(torch.equal(model[k], fts[task][k]) for k in base), task
    assert all(torch.equal(got[k], fts["t0"][k]) for k in base)  # the shared model too
    if rescale != "key":
        assert set(got.state["rescalers"].values()) == {1.0}


@pytest.mark.parametrize("rescale", ["model_mean", "key"])
def test_a_task_model_differs_from_the_rescaled_shared_one_exactly_where_its_mask_is_off(rescale):
    tv = noise_task_vectors(3, shape=(12, 8), seed=5)
    got = merge(tv, method="emr", rescale=rescale, **CPU)
    for task in tv.names:
        model = got.for_task(task)
        for key in tv.keys:
            uni = got.update(key)
            mask = tv.delta(task, key) * uni > 0
            lam = float(model.update(key)[mask][0] / uni[mask][0])
            shared = merge(tv, method="emr", rescale=rescale, alpha=lam, **CPU)  # theta_0 + lambda_t * tau_uni
            same = torch.isclose(model[key], shared[key], rtol=1e-6, atol=1e-7)
            assert torch.equal(same, mask | (uni == 0)), (task, key)
            assert torch.equal(model[key][~mask], tv.base[key][~mask])  # masked out: the base
            assert 0 < mask.sum() < mask.numel()


def test_a_task_that_agrees_nowhere_keeps_the_base_and_is_noted():
    base = {"w": torch.zeros(3)}
    tv = wl.TaskVectors(base, {"a": {"w": torch.tensor([4.0, 4.0, 4.0])}, "b": {"w": torch.tensor([-1.0, -1.0, 0.0])}})
    got = merge(tv, method="emr", **CPU)
    assert got.state["rescalers"]["b"] == 1.0  # the reference divides by zero here (NaN weights)
    assert got.for_task("b")["w"].tolist() == [0.0, 0.0, 0.0]
    assert got.for_task("b").notes.note.tolist() == [
        "EMR: task 'b' agrees with the elected sign nowhere on this key: its update here is 0."]
    assert got.for_task("a")["w"].tolist() == [4.0, 4.0, 4.0] and got.notes.empty


def test_alpha_scales_shared_and_task_models_and_results_are_deterministic():
    tv = noise_task_vectors(3, shape=(10, 6), seed=2)
    one, half = merge(tv, method="emr", **CPU), merge(tv, method="emr", alpha=0.5, **CPU)
    again = merge(noise_task_vectors(3, shape=(10, 6), seed=2), method="emr", **CPU)
    for key in tv.keys:
        assert torch.equal(half.update(key), 0.5 * one.update(key))
        assert torch.equal(half.for_task("t1").update(key), 0.5 * one.for_task("t1").update(key))
        assert torch.equal(again.for_task("t2")[key], one.for_task("t2")[key])
    model = one.for_task("t0")
    assert model.task == "t0" and one.task is None and "task 't0'" in repr(model)
    assert model.for_task("t1").task == "t1" and torch.equal(model.for_task("t1")["w"], one.for_task("t1")["w"])


# ------------------------------------------------------------------------------ sweep and export
def test_sweep_scores_each_task_on_its_own_model():
    tv = noise_task_vectors(3, shape=(8, 4), seed=4)
    seen: list[tuple[str, str, object]] = []

    def evaluate(weights, task, split):
        seen.append((task, split, weights))
        return {"accuracy": 1.0 / (1.0 + float((weights["w"] - tv.base["w"]).abs().sum()))}

    sw = sweep(tv, "emr", None, evaluate, progress=False, device="cpu")
    merged = [(t, w) for t, s, w in seen if isinstance(w, MergeResult)]
    assert [t for t, _ in merged] == list(tv.names) * 2  # val, then test at the chosen alpha
    assert all(w.task == t and w.method == "emr" for t, w in merged)
    emr = merge(tv, method="emr", **CPU)
    want = {t: 1.0 / (1.0 + float((emr.for_task(t)["w"] - tv.base["w"]).abs().sum())) for t in tv.names}
    assert sw.best.set_index("task")["accuracy"].to_dict() == pytest.approx(want)
    assert sw.best_alpha == 1.0 and sw.params == {"rescale": "model_mean"}
    seen.clear()
    sweep(tv, "task_arithmetic", [0.3], evaluate, progress=False, device="cpu", reference=sw.reference)
    assert all(w.task is None for _, _, w in seen)  # one model for every task


def test_the_studio_scores_each_task_on_its_own_model():
    from weightlens.widgets.studio import score_merge

    class Job:  # the studio's job, always current
        current = True
        start = say = advance = lambda self, *args, **kwargs: None

    tv = noise_task_vectors(3, shape=(8, 4), seed=4)
    merged = merge(tv, method="emr", **CPU)

    def evaluate(weights, task, split):
        return {"accuracy": float(weights["w"].sum())}

    got = score_merge(evaluate, merged, "val", {}, Job()).query("model == 'merged'").set_index("task")["accuracy"]
    assert got.to_dict() == pytest.approx({t: float(merged.for_task(t)["w"].sum()) for t in tv.names})


def test_export_of_a_task_model_writes_its_weights_without_a_recipe(tmp_path):
    tv = noise_task_vectors(2, shape=(6, 4), seed=8)
    got = merge(tv, method="emr", **CPU)
    wl.export(got.for_task("t1"), tmp_path / "t1")
    wl.export(got, tmp_path / "shared")
    t1, shared = wl.load(tmp_path / "t1"), wl.load(tmp_path / "shared")
    assert all(torch.equal(t1[k], got.for_task("t1")[k]) and torch.equal(shared[k], got[k]) for k in tv.keys)
    why = got.for_task("t1").export_recipe(out=tmp_path / "x").why_not
    assert why.startswith("these weights are the model of task 't1' (for_task); a recipe re-runs the merge")


# ------------------------------------------------------------------------------ errors
def test_bad_parameters_and_tasks_are_named():
    tv = noise_task_vectors(2)
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="emr", rescale="model")
    assert str(err.value) == ("The 'rescale' parameter of emr must be one of 'model_mean', 'model_sum', 'key'. "
                              "Got 'model' instead.")
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="emr", **CPU).for_task("t9")
    assert str(err.value) == "The 'task' parameter of for_task must be one of the merged tasks (t0, t1). Got 't9' instead."
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="ties", **CPU).for_task("t0")
    assert str(err.value) == ("for_task: merge method 'ties' gives one model for all tasks; per-task models come "
                              "from methods registered with per_task= (emr).")
    assert not merge(tv, method="ties", **CPU).has_task_models


# ------------------------------------------------------------------------------ digits
@pytest.mark.slow
def test_emr_task_models_beat_task_arithmetic_on_digits(digits_zoo):
    """EMR's per-task models against task arithmetic at its validated alpha (docs/methods.md#emr)."""
    tv = digits_zoo.task_vectors()
    ta = sweep(tv, "task_arithmetic", None, digits_zoo.evaluate, progress=False, device="cpu")
    emr = sweep(tv, "emr", None, digits_zoo.evaluate, progress=False, device="cpu", reference=ta.reference)
    assert emr.report()["test_normalized_accuracy"] > ta.report()["test_normalized_accuracy"]
