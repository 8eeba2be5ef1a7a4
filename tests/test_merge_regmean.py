"""``regmean`` and the data hook: against a float64 re-implementation (Grams from a hand-run forward), identities,
FusionBench's own results (``tests/peer_references/data/fusionbench_regmean_*``), caching, errors, recipes, digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import weightlens as wl
from weightlens.errors import InvalidParameterError, KeyMismatchError
from weightlens.merge import MergeData, get_method, merge, sweep
from weightlens.merge.data import gram_matrices

from _merge_data import load_reference, merge_data, random_case, reference_cases

CPU = {"device": "cpu"}


# ------------------------------------------------------------------------------ float64 reference
def _ref_grams(tv: wl.TaskVectors, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """Per task: the inputs of l1 and l2 of fine-tune t on its data, by hand, and their Grams X^T X / N."""
    out = {}
    for t in tv.names:
        w = {k: v.double().numpy() for k, v in tv.finetuned_weights(t).items()}
        x1 = inputs[t].double().numpy()
        x2 = np.tanh(x1 @ w["l1.weight"].T + w["l1.bias"])
        out[t] = {"l1.weight": x1.T @ x1 / len(x1), "l2.weight": x2.T @ x2 / len(x2)}
    return out


def _ref_regmean(tv: wl.TaskVectors, grams: dict, ratio: float) -> dict[str, np.ndarray]:
    """The paper's closed form on full weights: W = (sum_t W_t G_t)(sum_t G_t)^-1; other keys: the mean."""
    out = {}
    for key in tv.keys:
        ws = [tv.finetuned_weights(t)[key].double().numpy() for t in tv.names]
        if key not in grams[tv.names[0]]:
            out[key] = np.mean(ws, axis=0)
            continue
        gs = []
        for t in tv.names:
            g = grams[t][key].copy()
            g[~np.eye(len(g), dtype=bool)] *= ratio
            gs.append(g)
        out[key] = sum(w @ g for w, g in zip(ws, gs)) @ np.linalg.inv(sum(gs))
    return out


def _close(got: torch.Tensor, want: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol * 0.1 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("ratio", [0.95, 1.0, 0.0, 0.3])
def test_regmean_matches_the_float64_closed_form(ratio):
    tv, inputs = random_case(3, seed=1)
    got = merge(tv, method="regmean", data=merge_data(inputs), reduce_non_diagonal_ratio=ratio, **CPU)
    want = _ref_regmean(tv, _ref_grams(tv, inputs), ratio)
    assert got.params == {"reduce_non_diagonal_ratio": ratio, "alpha": 1.0}
    for key in tv.keys:
        _close(got[key], want[key])
    assert got.notes.empty  # every matrix has its Grams; biases and shift are averages by definition


def test_the_hook_computes_x_transpose_x_over_the_rows_of_every_batch_and_position():
    class Seq(nn.Module):  # (batch, length, 5) -> a linear layer on every position -> mean over positions
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.head(self.proj(x * scale[:, None, None]).mean(1))

    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(v.shape, generator=g) for k, v in Seq().state_dict().items()}
    tv = wl.TaskVectors(base, {"a": {k: v + 0.1 for k, v in base.items()}})
    x, scale = torch.randn(10, 4, 5, generator=g), torch.rand(10, generator=g) + 0.5
    module = Seq()
    data = MergeData(("a",), lambda task, w: (module.load_state_dict(dict(w)), module)[1],
                     lambda task: [(x[:6], scale[:6]), (x[6:], scale[6:])])
    grams = gram_matrices(data, tv, "a")
    rows = (x * scale[:, None, None]).reshape(-1, 5).double()
    torch.testing.assert_close(grams["proj.weight"].double(), rows.T @ rows / 40, rtol=1e-6, atol=1e-7)
    hidden = torch.nn.functional.linear(x * scale[:, None, None], base["proj.weight"] + 0.1, base["proj.bias"] + 0.1)
    pooled = hidden.mean(1).double()
    torch.testing.assert_close(grams["head.weight"].double(), pooled.T @ pooled / 10, rtol=1e-6, atol=1e-7)
    assert set(grams) == {"proj.weight", "head.weight"} and grams["proj.weight"].dtype == torch.float32


# ------------------------------------------------------------------------------ identities
def test_one_task_gives_back_its_finetune():
    tv, inputs = random_case(1, seed=2)
    got = merge(tv, method="regmean", data=merge_data(inputs), **CPU)
    for key in tv.keys:
        torch.testing.assert_close(got[key], tv.finetuned_weights("t0")[key], rtol=1e-5, atol=1e-6)


class Single(nn.Module):
    """One linear layer: its input Gram is the data's alone, whatever the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(x)


@pytest.mark.parametrize("ratio", [0.95, 1.0])
def test_identical_grams_give_the_simple_average(ratio):
    g = torch.Generator().manual_seed(3)
    base = {"l1.weight": torch.randn(4, 5, generator=g), "l1.bias": torch.randn(4, generator=g)}
    tv = wl.TaskVectors(base, {f"t{i}": {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
                               for i in range(3)})
    x = torch.randn(20, 5, generator=g)
    got = merge(tv, method="regmean", data=merge_data({t: x for t in tv.names}, cls=Single),
                reduce_non_diagonal_ratio=ratio, **CPU)
    for key in tv.keys:
        mean = torch.stack([tv.finetuned_weights(t)[key] for t in tv.names]).mean(0)
        torch.testing.assert_close(got[key], mean, rtol=1e-5, atol=1e-5)


def test_with_the_diagonal_alone_each_input_column_is_a_gram_weighted_average():
    tv, inputs = random_case(2, seed=4)
    got = merge(tv, method="regmean", data=merge_data(inputs), reduce_non_diagonal_ratio=0.0, **CPU)
    grams = _ref_grams(tv, inputs)
    d = [np.diag(grams[t]["l1.weight"]) for t in tv.names]
    w = [tv.finetuned_weights(t)["l1.weight"].double().numpy() for t in tv.names]
    _close(got["l1.weight"], (w[0] * d[0] + w[1] * d[1]) / (d[0] + d[1]))


def test_an_input_feature_zero_on_every_task_gets_the_average_with_a_note():
    tv, inputs = random_case(3, seed=5)
    dead = {t: x.clone().index_fill_(1, torch.tensor([2]), 0.0) for t, x in inputs.items()}
    got = merge(tv, method="regmean", data=merge_data(dead), reduce_non_diagonal_ratio=1.0, **CPU)
    mean = torch.stack([tv.finetuned_weights(t)["l1.weight"] for t in tv.names]).mean(0)
    torch.testing.assert_close(got["l1.weight"][:, 2], mean[:, 2], rtol=1e-6, atol=1e-6)
    live = [0, 1, 3, 4]  # the others: the closed form without the dead column
    grams = _ref_grams(tv, dead)
    g = [grams[t]["l1.weight"][np.ix_(live, live)] for t in tv.names]
    w = [tv.finetuned_weights(t)["l1.weight"].double().numpy()[:, live] for t in tv.names]
    _close(got["l1.weight"][:, live], sum(a @ b for a, b in zip(w, g)) @ np.linalg.inv(sum(g)))
    assert got.notes.set_index("key").loc["l1.weight", "note"] == (
        "RegMean: 1 input feature(s) of this layer are zero on every task's data (the reference's inverse fails "
        "there); their weights are the average of the fine-tunes.")


# ------------------------------------------------------------------------------ FusionBench
@pytest.mark.parametrize("path", reference_cases("regmean"), ids=lambda p: p.stem)
def test_regmean_matches_fusionbench(path):
    tv, data, expected, meta = load_reference(path)
    assert meta["peer"] == "fusion-bench==0.2.33" and meta["method"] == "regmean"
    got = merge(tv, method="regmean", data=data, **meta["params"], **CPU)
    assert set(expected) == set(tv.keys)
    for key, want in expected.items():
        _close(got[key], want.double().numpy())
        assert not torch.allclose(got[key], tv.finetuned_weights("t0")[key], atol=1e-3)  # not a trivial case


def test_there_are_fusionbench_references_for_three_ratios():
    ratios = sorted(load_reference(p)[3]["params"]["reduce_non_diagonal_ratio"] for p in reference_cases("regmean"))
    assert ratios == [0.1, 0.95, 1.0]
    assert get_method("regmean").defaults() == {"reduce_non_diagonal_ratio": 0.95, "alpha": 1.0}


# ------------------------------------------------------------------------------ caching
def test_statistics_are_computed_once_per_task_and_reused_across_parameters():
    tv, inputs = random_case(3, seed=6)
    calls: list[str] = []
    data = merge_data(inputs, calls=calls)
    first = merge(tv, method="regmean", data=data, **CPU).materialize()
    assert calls == list(tv.names)
    other = merge(tv, method="regmean", data=data, reduce_non_diagonal_ratio=0.5, alpha=0.5, **CPU).materialize()
    again = merge(tv, method="regmean", data=data, **CPU)
    assert calls == list(tv.names)  # no model built, no batch run: every Gram came from tv.cache
    assert all(torch.equal(again[k], first[k]) for k in tv.keys)
    assert not torch.equal(other["l1.weight"], first["l1.weight"])
    sub = merge(tv.subset(["t0", "t2"]), method="regmean", data=data, **CPU)
    assert sub.state["grams"]["t0"] is first.state["grams"]["t0"] and calls == list(tv.names)


def test_other_data_recompute_and_merge_differently():
    tv, inputs = random_case(2, seed=7)
    a = merge(tv, method="regmean", data=merge_data(inputs), **CPU)
    b = merge(tv, method="regmean", data=merge_data({t: x * 2 + 1 for t, x in inputs.items()}), **CPU)
    assert a.data.fingerprint() != b.data.fingerprint()
    assert not torch.allclose(a["l1.weight"], b["l1.weight"], atol=1e-4)
    assert merge_data(inputs).fingerprint() == a.data.fingerprint()  # the batches' bytes, not the object


# ------------------------------------------------------------------------------ errors
def test_without_data_the_error_says_what_to_pass():
    tv, _ = random_case(2)
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="regmean")
    assert str(err.value) == (
        "regmean needs data=...: the input Gram matrices of each linear layer, computed from each task's model on "
        "that task's inputs. Pass data=zoo.merge_data() for a zoo's task vectors, or a weightlens.merge.MergeData "
        "(per task: a model factory and input batches).")
    with pytest.raises(InvalidParameterError, match=r"The 'data' parameter of regmean must be a weightlens.merge."
                                                    r"MergeData \(e.g. zoo.merge_data\(\)\). Got dict instead."):
        merge(tv, method="regmean", data={})
    assert "needs data= (the input Gram matrices" in get_method("regmean").describe()


def test_data_for_other_tasks_names_them():
    tv, inputs = random_case(3)
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="regmean", data=merge_data({"t0": inputs["t0"], "x": inputs["t1"]}))
    assert str(err.value) == (
        "regmean: data= has no batches for task(s) 't1', 't2' (it covers 't0', 'x'); pass data for every merged "
        "task, e.g. zoo.merge_data() of the zoo these task vectors come from.")


def test_a_model_whose_names_are_not_the_keys_is_refused():
    tv, inputs = random_case(2)

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    data = MergeData(tv.names, lambda task, w: Renamed(), lambda task: [inputs[task]])
    with pytest.raises(KeyMismatchError, match=r"regmean: the data's models gave no Gram matrix \(an nn.Linear "
                                               r"layer's inputs\) for any task-vector key \(keys \['shift', 'l1.weight', "):
        merge(tv, method="regmean", data=data)


def test_a_layer_one_task_does_not_reach_names_the_key_and_tasks():
    tv, inputs = random_case(2)

    class Skip(nn.Module):  # t1's model never calls l2
        def __init__(self, use_l2: bool) -> None:
            super().__init__()
            self.use_l2 = use_l2
            self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 4)
            self.shift = nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.l1(x))
            return (self.l2(h) if self.use_l2 else h[:, :4]) + self.shift

    data = MergeData(tv.names, lambda task, w: Skip(task == "t0"), lambda task: [inputs[task]])
    merged = merge(tv, method="regmean", data=data, **CPU)
    with pytest.raises(KeyMismatchError) as err:
        merged["l2.weight"]
    assert "merge(method='regmean') on key 'l2.weight': RegMean has Gram matrices of 'l2.weight' for task(s) t0 " \
           "but not for t1" in str(err.value)


# ------------------------------------------------------------------------------ sweep, recipe
def test_sweep_passes_the_data_and_refuses_a_data_method_without_it_before_scoring():
    tv, inputs = random_case(2, seed=8)
    data = merge_data(inputs)
    scored: list[str] = []

    def evaluate(weights, task, split):
        scored.append(task)
        return {"accuracy": 1.0 / (1.0 + float((weights["l1.weight"] - tv.base["l1.weight"]).abs().sum()))}

    with pytest.raises(InvalidParameterError, match="regmean needs data="):
        sweep(tv, "regmean", None, evaluate, progress=False, device="cpu")
    assert scored == []
    sw = sweep(tv, "regmean", None, evaluate, progress=False, device="cpu", data=data)
    assert sw.best_alpha == 1.0 and sw.params == {"reduce_non_diagonal_ratio": 0.95}
    want = merge(tv, method="regmean", data=data, **CPU)
    assert sw.best["accuracy"].iloc[0] == pytest.approx(
        1.0 / (1.0 + float((want["l1.weight"] - tv.base["l1.weight"]).abs().sum())))


def test_export_writes_no_recipe_and_records_the_data_fingerprint(tmp_path):
    tv, inputs = random_case(2, seed=9)
    base, fts = tmp_path / "base", {t: tmp_path / t for t in tv.names}
    wl.export(tv.base, base, progress=False)
    for t in tv.names:
        wl.export(tv.finetuned_weights(t), fts[t], progress=False)
    on_disk = wl.TaskVectors(base, fts)
    merged = merge(on_disk, method="regmean", data=merge_data(inputs), **CPU)
    rec = merged.export_recipe(out=tmp_path / "out")
    assert rec.recipe is None and rec.why_not.startswith(
        "the regmean merge read data= (test inputs; SHA-256 ")
    assert rec.metadata["data"] == {"description": "test inputs", "sha256": merged.data.fingerprint(tv.names)}
    out = wl.export(merged, tmp_path / "out", progress=False)
    assert not (out / "weightlens_recipe.yaml").exists()
    assert all(torch.equal(wl.load(out)[k], merged[k]) for k in tv.keys)
    plain = merge(on_disk, method="task_arithmetic", data=merge_data(inputs), **CPU)  # ignored by data-free methods
    assert plain.data is None and plain.export_recipe(out=tmp_path / "ta").recipe is not None


# ------------------------------------------------------------------------------ digits
def test_regmean_beats_task_arithmetic_and_the_base_on_digits(digits_merges):
    """Measured on the CI zoo: base 0.952, task arithmetic (alpha 0.3) 0.967, RegMean 0.989 (mean normalized
    accuracy on test); RegMean is above task arithmetic on every task."""
    mean = {m: float(np.mean(list(v.values()))) for m, v in digits_merges.items()}
    assert mean["regmean"] > mean["task_arithmetic"] + 0.01 > mean["base"] + 0.01
    assert all(digits_merges["regmean"][t] > digits_merges["task_arithmetic"][t] for t in digits_merges["base"])


# ------------------------------------------------------------------------------ what-if
def test_the_whatif_leaves_data_methods_out_without_data_and_runs_them_with_the_diagnosed_merges():
    tv, inputs = random_case(3, seed=10)
    plain = wl.diagnose(tv, merge(tv, method="task_arithmetic", **CPU), whatif="all", progress=False, device="cpu")
    assert not {"regmean", "fisher"} & set(plain.whatif["method"])
    assert [n for n in plain.notes if "left out" in n] == [
        "What-if: regmean, fisher left out: they need data= (per task a model and inputs: diagnose a merge made "
        "with data=zoo.merge_data() to include them)"]
    named = wl.diagnose(tv, merge(tv, method="task_arithmetic", **CPU), whatif=["regmean"], progress=False,
                        device="cpu")
    assert named.notes[0].startswith("What-if: regmean skipped: regmean needs data=...")
    data = merge_data(inputs)

    def evaluate(weights, task, split):  # closer to the task's own fine-tune is better
        gap = sum(float((weights[k] - tv.finetuned_weights(task)[k]).abs().sum()) for k in tv.keys)
        return {"accuracy": 1.0 / (1.0 + gap)}

    d = wl.diagnose(tv, merge(tv, method="regmean", data=data, **CPU), evaluate=evaluate, whatif=["fisher", "ties"],
                    whatif_points=1, progress=False, device="cpu")
    assert set(d.whatif["method"]) == {"regmean", "fisher", "ties", "task_arithmetic"} and not any(
        "What-if" in n for n in d.notes)
    assert d.suggestion is not None and d.whatif.query("method == 'fisher'")["accuracy"].notna().all()


@pytest.mark.slow
def test_the_minilm_zoo_gives_grams_of_its_36_linear_layers_and_fishers_of_its_parameters(minilm_zoo):
    tv, data = minilm_zoo.task_vectors(), minilm_zoo.merge_data(n=8, batch_size=4)
    assert data.tasks == tuple(tv.names) and "minilm train, 8 examples per task" in repr(data)
    reg = merge(tv, method="regmean", data=data, **CPU)
    grams = reg.state["grams"][tv.names[0]]
    assert len(grams) == 36 and all(k.startswith("encoder.layer.") for k in grams)
    assert sorted(reg.notes.key) == ["embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
                                     "embeddings.word_embeddings.weight", "pooler.dense.weight"]
    fisher = merge(tv, method="fisher", data=data, **CPU).state["fishers"][tv.names[0]]
    assert float(fisher["encoder.layer.0.attention.self.query.weight"].sum()) > 0
    assert float(fisher["pooler.dense.weight"].abs().sum()) == 0  # never reached: the average there


# ------------------------------------------------------------------------------ command line, recipes
def test_the_command_line_takes_the_data_from_the_zoo_and_refuses_files(digits_zoo, monkeypatch, capsys):
    from weightlens.cli import main

    monkeypatch.setenv("WEIGHTLENS_ZOO_SIZE", "ci")
    assert main(["sweep", "--zoo", "digits-tasks", "--method", "regmean", "-q"]) == 0
    assert "chosen alpha: 1 " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["diagnose", str(digits_zoo.base), *map(str, digits_zoo.finetuned.values()), "--method", "fisher", "-q"])
    assert exit_.value.code == 2 and ("diagnose --method fisher needs data (the diagonal Fisher of each parameter, "
                                      "from squared gradients), which the command line takes from a zoo: use --zoo "
                                      "NAME") in " ".join(capsys.readouterr().err.split())


def test_a_recipe_of_a_data_method_is_refused_with_the_way_out(tmp_path):
    from weightlens.io import Recipe
    from weightlens.merge import run_recipe

    tv, _ = random_case(2)
    base, fts = tmp_path / "base", {t: tmp_path / t for t in tv.names}
    wl.export(tv.base, base, progress=False)
    for t in tv.names:
        wl.export(tv.finetuned_weights(t), fts[t], progress=False)
    recipe = Recipe(method="regmean", params={}, base=str(base), finetuned={t: str(p) for t, p in fts.items()})
    with pytest.raises(InvalidParameterError, match=r"^the recipe: regmean reads data= \(the input Gram matrices of "
                                                    r"each linear layer\), and the recipe records none"):
        run_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_recipe_of_a_zoo_data_merge_records_the_data_and_re_runs_bitwise(digits_zoo, tmp_path, monkeypatch):
    """A zoo's merge_data() records how it was made: the export writes a recipe whose ``data`` names the zoo,
    ``merge_data_of`` makes the same data again (same SHA-256), and the re-run (Python and command line)
    writes the same bytes; other data, or none, is refused before anything is written."""
    from weightlens.cli import main
    from weightlens.errors import ReproducibilityError
    from weightlens.io import load_recipe
    from weightlens.merge import run_recipe
    from weightlens.zoo import merge_data_of

    tv = digits_zoo.task_vectors(["rot90", "hflip"])
    data = digits_zoo.merge_data(n=64)
    out = wl.export(merge(tv, method="regmean", data=data, **CPU), tmp_path / "first", progress=False)
    recipe = load_recipe(out / "weightlens_recipe.yaml")
    assert recipe.data["zoo"] == {"zoo": "digits-tasks", "size": digits_zoo.manifest["size"], "options": {},
                                  "split": "train", "n": 64, "batch_size": 32, "seed": 0}
    assert recipe.data["sha256"] == data.fingerprint(tv.names)
    again = run_recipe(out / "weightlens_recipe.yaml", tmp_path / "again", data=merge_data_of(recipe.data["zoo"]),
                       progress=False)  # verify=True: every file's sha256 equals the recipe's expect
    assert recipe.check(again) == []
    with pytest.raises(InvalidParameterError, match=r"pass data=weightlens.zoo.merge_data_of\(recipe.data\['zoo'\]\)"):
        run_recipe(out / "weightlens_recipe.yaml", tmp_path / "none", progress=False)
    with pytest.raises(ReproducibilityError, match="is not the data the recipe's merge read"):
        run_recipe(out / "weightlens_recipe.yaml", tmp_path / "other", data=digits_zoo.merge_data(n=32), progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "other").exists()
    monkeypatch.setenv("WEIGHTLENS_ZOO_SIZE", digits_zoo.manifest["size"])
    assert main(["merge", str(out / "weightlens_recipe.yaml"), "--out", str(tmp_path / "cli"), "-q"]) == 0
    assert recipe.check(tmp_path / "cli") == []


def test_the_studio_offers_data_methods_only_with_data():
    pytest.importorskip("ipywidgets")
    from weightlens.widgets import MergeStudio

    tv, inputs = random_case(2, seed=11)
    plain = MergeStudio(tv)
    assert not {"regmean", "fisher"} & {o[1] for o in plain.method.options}
    with pytest.raises(InvalidParameterError, match=r"MergeStudio: method 'regmean' needs data= \(the input Gram "
                                                    r"matrices of each linear layer\); pass MergeStudio\(tv, data="):
        MergeStudio(tv, method="regmean")
    studio = MergeStudio(tv, method="regmean", data=merge_data(inputs), debounce=0.0)
    assert {"regmean", "fisher"} <= {o[1] for o in studio.method.options}
    assert studio.wait(60) and studio.last_error is None
    want = merge(tv, method="regmean", data=merge_data(inputs), **CPU)
    assert all(torch.equal(studio.merged[k], want[k]) for k in tv.keys)


def test_restoration_by_weight_merges_again_with_the_same_data():
    tv, inputs = random_case(3, seed=12)
    merged = merge(tv, method="regmean", data=merge_data(inputs), **CPU)
    states: list[dict] = []

    def evaluate(state, task, split):
        states.append({k: state[k].clone() for k in tv.keys})
        return {"accuracy": 0.5, "loss": 1.0}

    wl.diagnose(tv, merged, evaluate=evaluate, restore=1, controls=0, restore_by="weight", weight=1.0,
                progress=False, device="cpu")
    assert len(states) > len(tv.names)  # the merge, then the restoration tests: weight 1 gives the merge back
    for state in states:
        for key in tv.keys:
            torch.testing.assert_close(state[key], merged[key], rtol=1e-6, atol=1e-7)
