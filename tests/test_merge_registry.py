"""The merge registry: names, schemas from signatures, documented defaults, exact error messages."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
import torch

import weightlens as wl
from weightlens.errors import InvalidParameterError
from weightlens.merge import KeyUpdate, get_method, list_methods, merge, register_merge
from weightlens.merge.registry import Interval, unregister

# docs/methods.md (one table per method): names and defaults must stay exactly these.
DESIGN_DEFAULTS = {
    "task_arithmetic": {"alpha": 0.3},
    "ties": {"density": 0.2, "scope": "global", "merge_func": "mean", "alpha": 1.0},
    "dare": {"density": 0.5, "seed": 0, "combine": "task_arithmetic", "rescale": "density", "alpha": None},
    "tsv": {"fallback": "zero", "alpha": 1.0},
    "iso_c": {"restrict_to_numerical_rank": False, "alpha": 1.0},
    "iso_cts": {"common_fraction": 0.8, "restrict_to_numerical_rank": False, "alpha": 1.0},
    "star": {"eta": 40, "alpha": None},
}


@pytest.fixture
def tv():
    base = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    fts = {n: {"w": torch.randn(4, 3), "b": torch.randn(3)} for n in ("a", "b")}
    return wl.TaskVectors(base, fts)


def test_the_seven_methods_are_registered_with_the_design_defaults():
    assert list_methods()[:7] == list(DESIGN_DEFAULTS)
    for name, defaults in DESIGN_DEFAULTS.items():
        assert get_method(name).defaults() == defaults


def test_options_are_the_design_options():
    ties = get_method("ties").params
    assert ties["scope"].options == ("global", "tensor")
    assert ties["merge_func"].options == ("mean", "sum", "max")
    assert get_method("dare").params["combine"].options == ("task_arithmetic", "ties")


def test_computed_alpha_defaults(tv):
    assert merge(tv, method="star").params["alpha"] == 0.5
    assert merge(tv, method="dare").params["alpha"] == 0.3
    assert merge(tv, method="dare", combine="ties").params["alpha"] == 1.0
    assert merge(tv, method="star", alpha=2.0).params["alpha"] == 2.0


def test_unknown_method_lists_the_valid_ones(tv):
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="tie")
    assert str(err.value) == ("Unknown merge method 'tie'. Available: task_arithmetic, ties, dare, tsv, "
                              "iso_c, iso_cts, star, knots_ties, knots_ta, peft_cat, peft_svd, linear, slerp, model_stock, breadcrumbs, breadcrumbs_ties, della, della_linear, consensus_ta, consensus_ties, pcb, emr, wudi, regmean, fisher.")


def test_unknown_parameter_lists_valid_parameters_and_defaults(tv):
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method="ties", k=20)
    assert str(err.value) == (
        "Unknown parameter(s) 'k' for merge method 'ties'. Valid parameters (defaults): density=0.2, "
        "scope='global', merge_func='mean', alpha=1.0."
    )
    with pytest.raises(InvalidParameterError, match=r"alpha=1/T"):
        merge(tv, method="star", lam=1)


@pytest.mark.parametrize("method,param,value,allowed", [
    ("ties", "density", 1.5, "in (0, 1]"),
    ("ties", "density", 0, "in (0, 1]"),
    ("dare", "density", -0.1, "in (0, 1]"),
    ("star", "eta", 0, "in (0, 100]"),
    ("star", "eta", 100.5, "in (0, 100]"),
    ("iso_cts", "common_fraction", 0.0, "in (0, 1]"),
    ("iso_cts", "common_fraction", 1.2, "in (0, 1]"),
    ("ties", "scope", "layer", "one of 'global', 'tensor'"),
    ("ties", "merge_func", "median", "one of 'mean', 'sum', 'max'"),
    ("dare", "combine", "sum", "one of 'task_arithmetic', 'ties'"),
    ("tsv", "alpha", "1", "a real number"),
    ("tsv", "alpha", float("nan"), "a real number"),
    ("dare", "seed", 1.5, "an int"),
    ("iso_c", "restrict_to_numerical_rank", 1, "a bool"),
    ("ties", "density", True, "in (0, 1]"),
])
def test_out_of_range_values_raise_the_sklearn_style_message(tv, method, param, value, allowed):
    with pytest.raises(InvalidParameterError) as err:
        merge(tv, method=method, **{param: value})
    assert str(err.value) == f"The {param!r} parameter of {method} must be {allowed}. Got {value!r} instead."
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


def test_the_example_message_from_the_brief(tv):
    with pytest.raises(InvalidParameterError, match=r"^The 'density' parameter of ties must be in \(0, 1\]\. "
                                                    r"Got 1\.5 instead\.$"):
        merge(tv, method="ties", density=1.5)


def test_registering_a_method_derives_its_schema_and_runs_it(tv):
    @register_merge("test_scaled_sum", alpha=0.5, pretty_name="Scaled sum")
    def scaled(ctx, key, *, gain: Annotated[float, Interval(0, None, "neither")] = 2.0,
               mode: Literal["a", "b"] = "a") -> KeyUpdate:
        return KeyUpdate(gain * ctx.deltas(key).sum(0), notes=(f"mode {mode}",))

    try:
        spec = get_method("test_scaled_sum")
        assert spec.defaults() == {"gain": 2.0, "mode": "a", "alpha": 0.5}
        assert spec.params["gain"].interval == Interval(0, None, "neither")
        merged = merge(tv, method="test_scaled_sum", gain=3)
        torch.testing.assert_close(merged.update("w"), 1.5 * tv.deltas("w").sum(0))
        assert set(merged.notes["note"]) == {"mode a"}
        with pytest.raises(InvalidParameterError, match=r"must be in \(0, inf\)\. Got 0 instead"):
            merge(tv, method="test_scaled_sum", gain=0)
    finally:
        unregister("test_scaled_sum")
    assert "test_scaled_sum" not in list_methods()


def test_duplicate_names_raise():
    with pytest.raises(InvalidParameterError, match="'tsv' is already registered"):
        @register_merge("tsv")
        def again(ctx, key) -> KeyUpdate:  # pragma: no cover - never registered
            raise AssertionError


@pytest.mark.parametrize("source,match", [
    ("def f(ctx, key, *, x=1.0): ...", "annotation and a default"),
    ("def f(ctx, key, *, x: float): ...", "annotation and a default"),
    ("def f(ctx, key, *, alpha: float = 1.0): ...", "declare alpha on"),
    ("def f(key, ctx): ...", "must start with"),
    ("def f(ctx, key, extra): ...", "must start with"),
    ("def f(ctx, key, *, x: list = None): ...", "unsupported annotation"),
    ("def f(ctx, key, *, lazy: bool = False): ...", "reserved for merge"),
    ("def f(ctx, key, *, x: 'Nope' = 1): ...", "cannot resolve"),
])
def test_bad_signatures_fail_when_the_decorator_runs(source, match):
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - builds the signature under test
    with pytest.raises(TypeError, match=match):
        register_merge("test_bad")(namespace["f"])
    assert "test_bad" not in list_methods()


def test_interval_text_and_membership():
    assert str(Interval(0, 1, "right")) == "(0, 1]" and str(Interval(0, None, "left")) == "[0, inf)"
    assert 1 in Interval(0, 1, "right") and 0 not in Interval(0, 1, "right")
