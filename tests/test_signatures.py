"""Short signatures: no public callable takes more than 8 parameters, and the option objects that keep
them short are pure regroupings (issue 13, item 8).

Every ``def`` under ``weightlens/`` that is public (its name, and the names of the classes around it, do
not start with ``_``; ``__init__`` counts for its class) is read with ``ast``; private modules count
too, since their public names are the package's internal API. Parameters are the positional and
keyword-only ones, ``self``/``cls`` excluded; ``*args`` and ``**overrides`` are not counted.

Each option object must then be a regrouping and nothing more: its defaults are the defaults the
function's keywords had, the keyword call forms and the ``options=`` form give identical results on
real inputs (the digits zoos of ``tests/conftest.py``), unknown keywords are refused naming the valid
ones, and values outside the documented range raise ``InvalidParameterError``.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import weightlens as wl
from weightlens import lmc, rebasin
from weightlens._options import resolve_options
from weightlens.errors import InvalidParameterError
from weightlens.io import ExportOptions, export
from weightlens.io.recipe import RECIPE
from weightlens.linalg import TopkOptions
from weightlens.lmc import MergeBarrierOptions
from weightlens.merge import RunRecipeOptions, SweepOptions, merge, run_recipe, sweep
from weightlens.rebasin import ActivationOptions, MatchingOptions

PKG = Path(wl.__file__).parent
LIMIT = 8

#: Callables that keep more than LIMIT parameters, and why. An entry that no longer exceeds the limit
#: (or no longer exists) fails the test: drop it.
ALLOWED = {
    "weightlens.merge.registry.register_merge": (
        "a decorator written once per merge method, every parameter keyword-only with a default; its "
        "four alpha_* keywords already read as one group, and an alpha object would give the plugin API "
        "two spellings or change every registration and the documented example"
    ),
    "weightlens.merge.compare.compare": (
        "the rank rule (criterion, eps), keys, device and progress are those of every table builder; visit and "
        "task_arithmetic let diagnose walk the same pass without its baseline half; an options object would "
        "make compare() read unlike alignment_to_merged() and the studio's ComparisonCache"
    ),
    "weightlens.analysis.alignment.alignment_to_merged": (
        "a table builder whose rank-rule keywords (criterion, eps) and device are those of compare(); "
        "an options object for two floats would make the two calls read differently"
    ),
}


# ------------------------------------------------------------------------------------- the census
def _count(fn: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    args = fn.args
    n = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    return n - 1 if in_class and not static and (args.posonlyargs or args.args) else n


def _public_callables() -> dict[str, int]:
    """``{qualified name: parameter count}`` of every public function, method and ``__init__``."""
    found: dict[str, int] = {}

    def walk(body: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                walk(node.body, f"{prefix}.{node.name}", True)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name == "__init__" or not node.name.startswith("_"):
                    found[f"{prefix}.{node.name}"] = _count(node, in_class)

    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        walk(ast.parse(path.read_text()).body, module, False)
    return found


def test_the_census_counts_positional_and_keyword_only_parameters_without_self():
    tree = ast.parse("class A:\n def __init__(self, a, /, b, *c, d, **e): ...\n @staticmethod\n def s(x, y): ...\n"
                     "def f(a, b=1, *, c): ...")
    cls, fn = tree.body
    assert _count(cls.body[0], True) == 3 and _count(cls.body[1], True) == 2 and _count(fn, False) == 3
    found = _public_callables()
    assert found["weightlens.io.export.export"] <= LIMIT and "weightlens.widgets.lmc.LMCExplorer.__init__" in found
    assert "weightlens.io._card.write_card" in found  # a private module's public names count


def test_no_public_callable_takes_more_than_eight_parameters():
    found = _public_callables()
    long = {name: n for name, n in found.items() if n > LIMIT and name not in ALLOWED}
    assert not long, (f"public callables with more than {LIMIT} parameters: {long}. Group settings that travel "
                      "together into a frozen option object (weightlens._options.resolve_options), or add an "
                      "entry with its reason to ALLOWED.")
    stale = sorted(name for name in ALLOWED if found.get(name, 0) <= LIMIT)
    assert not stale, f"ALLOWED entries that are within the limit now (or gone): {stale}; drop them."


# ------------------------------------------------------------------- the option objects: defaults
def _widgets():
    pytest.importorskip("ipywidgets")
    from weightlens.widgets.lmc import LMCExplorer, LMCExplorerOptions, LMCExplorerResults

    return LMCExplorer, LMCExplorerOptions, LMCExplorerResults


#: The keyword parameters and defaults each function had before its options were grouped; ``progress``
#: became None everywhere since (auto: ``weightlens.config.progress`` decides, issue 14 item 7).
OLD_DEFAULTS = {
    "weight_matching": {"seed": 0, "max_iter": 100, "tol": 1e-12, "init": None, "device": None,
                        "progress": None, "lap": "scipy"},
    "activation_matching": {"hooks": None, "correlation": "moment", "batch_size": 500, "device": None,
                            "lap": "scipy"},
    "merge_barrier": {"weights": None, "points": 25, "samples": 0, "seed": 0, "bn_loader": None, "repair": None,
                      "progress": None},
    "sweep": {"select_on": "val", "report_on": "test", "report_all": False, "reference": None, "device": "auto",
              "progress": None, "data": None},  # data: added as an option field (issue 17, regmean and fisher)
    "export": {"like": None, "recipe": None, "shard_size": "5GB", "dtype": None, "overwrite": False,
               "overwrite_any": False, "progress": None, "card": None, "verify": None, "fingerprint": "header",
               "executor": None},  # executor: added as an option field (issue 18, item 3)
    "run_recipe": {"out": None, "overwrite": False, "overwrite_any": False, "progress": None, "device": None,
                   "verify": True, "check_inputs": True, "fingerprint": None,
                   "executor": "local"},  # executor: added as an option field (the CLI's --executor)
    "LMCExplorer": {"permutations": None, "points": 25, "seed": 0, "bn_loader": None, "repair": None, "k": 16,
                    "naive": None, "matched": None, "distances": None, "alignment": None},
}


def _grouped():
    LMCExplorer, LMCExplorerOptions, LMCExplorerResults = _widgets()
    return {
        "weight_matching": (rebasin.weight_matching, [MatchingOptions]),
        "activation_matching": (rebasin.activation_matching, [ActivationOptions]),
        "merge_barrier": (lmc.merge_barrier, [MergeBarrierOptions]),
        "sweep": (sweep, [SweepOptions]),
        "export": (export, [ExportOptions]),
        "run_recipe": (run_recipe, [RunRecipeOptions]),
        "LMCExplorer": (LMCExplorer.__init__, [LMCExplorerOptions, LMCExplorerResults]),
    }


@pytest.mark.parametrize("name", sorted(OLD_DEFAULTS))
def test_every_old_keyword_keeps_its_default_in_the_signature_or_an_option_object(name):
    fn, classes = _grouped()[name]
    params = inspect.signature(fn).parameters
    fields = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
    for cls in classes:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert "Attributes" in (cls.__doc__ or ""), cls
        assert params["options" if cls is classes[0] else "results"].default is None
    assert not set(params) & set(fields), "a setting is both a parameter and an option field"
    for key, old in OLD_DEFAULTS[name].items():
        new = params[key].default if key in params else fields[key]
        assert new == old, (name, key, new, old)
    assert set(fields) <= set(OLD_DEFAULTS[name]), "an option object has a field the function never took"


def test_the_option_objects_are_exported_where_their_function_is():
    LMCExplorer, LMCExplorerOptions, LMCExplorerResults = _widgets()
    assert rebasin.MatchingOptions is MatchingOptions and "ActivationOptions" in rebasin.__all__
    assert lmc.MergeBarrierOptions is MergeBarrierOptions and "MergeBarrierOptions" in lmc.__all__
    import importlib

    io, merge_pkg, widgets = (importlib.import_module(f"weightlens.{m}") for m in ("io", "merge", "widgets"))

    assert io.ExportOptions is ExportOptions and "ExportOptions" in io.__all__
    assert merge_pkg.SweepOptions is SweepOptions and merge_pkg.RunRecipeOptions is RunRecipeOptions
    assert {"SweepOptions", "RunRecipeOptions"} <= set(merge_pkg.__all__)
    assert widgets.LMCExplorerOptions is LMCExplorerOptions and widgets.LMCExplorerResults is LMCExplorerResults


# ---------------------------------------------------------------- the option objects: bad values
BAD = [
    (MatchingOptions, {"seed": "0"}, "'seed'"),
    (MatchingOptions, {"max_iter": 0}, "'max_iter'"),
    (MatchingOptions, {"tol": -1.0}, "'tol'"),
    (MatchingOptions, {"lap": "greedy"}, "'lap'"),
    (ActivationOptions, {"batch_size": 0}, "'batch_size'"),
    (ActivationOptions, {"lap": "greedy"}, "'lap'"),
    (MergeBarrierOptions, {"samples": -1}, "'samples'"),
    (MergeBarrierOptions, {"seed": -1}, "'seed'"),
    (SweepOptions, {"report_all": "yes"}, "'report_all'"),
    (SweepOptions, {"reference": {"task": []}}, "'reference'"),
    (SweepOptions, {"device": 0}, "'device'"),
    (ExportOptions, {"card": {"colour": "red"}}, "'card'"),
    (ExportOptions, {"fingerprint": "sha1"}, "'fingerprint'"),
    (ExportOptions, {"verify": "yes"}, "'verify'"),
    (RunRecipeOptions, {"fingerprint": "sha1"}, "'fingerprint'"),
]


@pytest.mark.parametrize(("cls", "values", "named"), BAD, ids=lambda x: getattr(x, "__name__", str(x)))
def test_values_outside_the_documented_range_are_refused(cls, values, named):
    with pytest.raises(InvalidParameterError, match=f"The {named} parameter must be .+ Got "):
        cls(**values)
    assert cls() == cls()  # the defaults are valid


def test_widget_option_objects_refuse_bad_values():
    _, LMCExplorerOptions, LMCExplorerResults = _widgets()
    with pytest.raises(InvalidParameterError, match="The 'k' parameter must be an int >= 1. Got 0 instead"):
        LMCExplorerOptions(k=0)
    with pytest.raises(InvalidParameterError, match="'seed'"):
        LMCExplorerOptions(seed="1")
    with pytest.raises(InvalidParameterError, match="The 'naive' parameter must be a LMCCurve or None"):
        LMCExplorerResults(naive=[0.1, 0.2])


def test_export_options_without_a_recipe_need_no_fingerprint_mode():
    # export(..., recipe=False) never fingerprints: its mode is not checked, as before
    assert ExportOptions(recipe=False, fingerprint="sha1").fingerprint == "sha1"


def test_the_generic_resolver_names_the_caller_the_class_and_the_valid_options():
    assert resolve_options(TopkOptions, None, {"seed": 3}, caller="f") == TopkOptions(seed=3)
    given = TopkOptions(method="exact")
    assert resolve_options(TopkOptions, given, {}, caller="f") == given
    assert resolve_options(TopkOptions, given, {"niter": 1}, caller="f") == TopkOptions(method="exact", niter=1)
    with pytest.raises(InvalidParameterError) as err:
        resolve_options(TopkOptions, None, {"sede": 1, "iters": 2}, caller="f")
    assert str(err.value) == ("f() got unknown option(s) ['iters', 'sede']; valid options: ['approximate', "
                              "'method', 'niter', 'oversample', 'seed'] (see TopkOptions).")
    with pytest.raises(InvalidParameterError, match=r"The 'options' parameter of f must be a TopkOptions or None"):
        resolve_options(TopkOptions, {"seed": 1}, {}, caller="f")


# ------------------------------------------------------- keyword forms == options forms, real inputs
@pytest.fixture(scope="module")
def pair(digits_pairs):
    p = digits_pairs[16]
    a, b = wl.load(p.a), wl.load(p.b)
    a, b = {k: a[k] for k in a}, {k: b[k] for k in b}
    return p, a, b, rebasin.mlp_spec(a)


def test_weight_matching_keywords_and_options_agree(pair):
    _, a, b, spec = pair
    by_keywords = rebasin.weight_matching(a, b, spec, seed=3, max_iter=7, tol=1e-9, lap="scipy", device=None)
    opts = MatchingOptions(seed=3, max_iter=7, tol=1e-9)
    by_object = rebasin.weight_matching(a, b, spec, options=opts)
    mixed = rebasin.weight_matching(a, b, spec, options=MatchingOptions(seed=9, max_iter=7), seed=3, tol=1e-9)
    for found in (by_object, mixed):
        assert found.equals(by_keywords) and found.objective_history == by_keywords.objective_history
    with pytest.raises(InvalidParameterError, match=r"weight_matching\(\) got unknown option\(s\) \['sede'\]; "
                                                     r"valid options: \['device', 'lap', 'max_iter'"):
        rebasin.weight_matching(a, b, spec, sede=1)
    with pytest.raises(InvalidParameterError, match="'options' parameter of weight_matching must be a "
                                                    "MatchingOptions"):
        rebasin.weight_matching(a, b, spec, options=ActivationOptions())


def test_activation_matching_keywords_and_options_agree(pair):
    p, a, b, spec = pair
    data = p.data("train")
    by_keywords = rebasin.activation_matching(a, b, spec, p.make_module, data, correlation="pearson",
                                              batch_size=128, lap="scipy")
    by_object = rebasin.activation_matching(a, b, spec, p.make_module, data, correlation="pearson",
                                            options=ActivationOptions(batch_size=128))
    assert by_object.equals(by_keywords) and by_object.objective_history == by_keywords.objective_history
    with pytest.raises(InvalidParameterError, match=r"activation_matching\(\) got unknown option\(s\) \['seed'\]"):
        rebasin.activation_matching(a, b, spec, p.make_module, data, seed=1)


def _evaluator(p) -> lmc.Evaluator:
    return lmc.Evaluator(p.make_module(), {"test": p.data("test")}, F.cross_entropy)


def test_merge_barrier_keywords_and_options_agree(pair):
    p, a, b, _ = pair
    ev = _evaluator(p)
    by_keywords = lmc.merge_barrier({"a": a, "b": b}, ev, points=5, samples=3, seed=2)
    by_object = lmc.merge_barrier({"a": a, "b": b}, ev, points=5, options=MergeBarrierOptions(samples=3, seed=2))
    assert np.array_equal(by_object.sample_weights, by_keywords.sample_weights)
    assert by_object.sample_metrics["test"]["loss"].tolist() == by_keywords.sample_metrics["test"]["loss"].tolist()
    assert by_object.barrier == by_keywords.barrier and by_object.max_sampled_barrier == by_keywords.max_sampled_barrier
    with pytest.raises(InvalidParameterError, match=r"merge_barrier\(\) got unknown option\(s\) \['sample'\]"):
        lmc.merge_barrier({"a": a, "b": b}, ev, sample=3)


def test_lmc_explorer_keywords_and_objects_agree(pair):
    LMCExplorer, LMCExplorerOptions, LMCExplorerResults = _widgets()
    p, a, b, spec = pair
    ev = _evaluator(p)
    by_keywords = LMCExplorer(a, b, ev, spec, points=5, seed=2, k=4)
    by_object = LMCExplorer(a, b, ev, spec, options=LMCExplorerOptions(points=5, seed=2, k=4))
    assert by_object.permutations_.equals(by_keywords.permutations_)
    for side in ("naive_", "matched_"):
        assert getattr(by_object, side).loss["test"].tolist() == getattr(by_keywords, side).loss["test"].tolist()
    assert by_object.summary_html() == by_keywords.summary_html() and by_object.options.k == 4
    assert by_object.alignment_.layers.equals(by_keywords.alignment_.layers)
    given = {"naive": by_keywords.naive_, "matched": by_keywords.matched_, "distances": by_keywords.distances_}
    shown = LMCExplorer(a, b, None, spec, permutations=by_keywords.permutations_, k=4, **given)
    held = LMCExplorer(a, b, None, spec, permutations=by_keywords.permutations_,
                       results=LMCExplorerResults(**given), options=LMCExplorerOptions(k=4))
    for x in (shown, held):
        assert x.naive_ is by_keywords.naive_ and x.distances_ is by_keywords.distances_
        assert x.summary_html() == by_keywords.summary_html()
    with pytest.raises(InvalidParameterError, match=r"LMCExplorer\(\) got unknown option\(s\) \['naiv'\]; valid "
                                                    r"options: .*'k'.* and .*'naive'"):
        LMCExplorer(a, b, ev, spec, naiv=by_keywords.naive_)


def test_sweep_keywords_and_options_agree(digits_zoo):
    tv = digits_zoo.task_vectors()
    args = (tv, "task_arithmetic", [0.2, 0.4], digits_zoo.evaluate)
    by_keywords = sweep(*args, report_all=True, device="cpu", progress=False)
    by_object = sweep(*args, progress=False, options=SweepOptions(report_all=True, device="cpu"))
    pd.testing.assert_frame_equal(by_object.table, by_keywords.table, check_exact=True)
    reused = sweep(*args, reference=by_keywords.reference, device="cpu", progress=False)
    held = sweep(*args, progress=False, options=SweepOptions(reference=by_keywords.reference, device="cpu"))
    pd.testing.assert_frame_equal(held.table, reused.table, check_exact=True)
    assert held.reference is by_keywords.reference
    ties = sweep(tv, "ties", [1.0], digits_zoo.evaluate, density=0.5, device="cpu", progress=False)
    assert ties.params["density"] == 0.5  # method parameters still reach the merge


def _files(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def test_export_keywords_and_options_agree(digits_zoo, tmp_path):
    merged = merge(digits_zoo.task_vectors(), method="ties", device="cpu")
    card = {"title": "digits", "notes": "same either way"}
    seen: list[dict[str, str]] = []
    by_keywords = export(merged, tmp_path / "kw", recipe=False, card=card, verify=seen.append, progress=False)
    opts = ExportOptions(recipe=False, card=card, verify=seen.append)
    by_object = export(merged, tmp_path / "opt", progress=False, options=opts)
    assert _files(by_object) == _files(by_keywords) and seen[0] == seen[1]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not an export")
    assert export(merged, tmp_path / "other", progress=False, recipe=False, overwrite_any=True).is_dir()
    with pytest.raises(InvalidParameterError, match=r"export\(\) got unknown option\(s\) \['finger_print'\]"):
        export(merged, tmp_path / "bad", finger_print="full")


def test_run_recipe_keywords_and_options_agree(digits_zoo, tmp_path):
    merged = merge(digits_zoo.task_vectors(), method="task_arithmetic", device="cpu")
    recipe = export(merged, tmp_path / "first", progress=False) / RECIPE
    by_keywords = run_recipe(recipe, tmp_path / "kw", progress=False, fingerprint="full", check_inputs=True)
    by_object = run_recipe(recipe, tmp_path / "opt", progress=False, options=RunRecipeOptions(fingerprint="full"))
    weights = {n: h for n, h in _files(by_keywords).items() if n.endswith(".safetensors")}
    assert weights and weights == {n: h for n, h in _files(by_object).items() if n.endswith(".safetensors")}
    assert weights == {n: h for n, h in _files(tmp_path / "first").items() if n.endswith(".safetensors")}
    with pytest.raises(InvalidParameterError, match=r"run_recipe\(\) got unknown option\(s\) \['verfy'\]"):
        run_recipe(recipe, tmp_path / "bad", verfy=False)


def test_merge_many_still_validates_its_matching_settings(pair):
    _, a, b, spec = pair
    with pytest.raises(InvalidParameterError, match="'max_iter'"):
        rebasin.merge_many([a, b], spec, max_iter=0)
    with pytest.raises(InvalidParameterError, match="'lap'"):
        rebasin.merge_many([a, b], spec, lap="greedy")
    torch.manual_seed(0)  # merge_many uses its own generator: the global one must not matter
    assert rebasin.merge_many([a, b], spec, seed=1, max_iter=2).rounds <= 2
