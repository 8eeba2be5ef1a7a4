"""A merge method is one file: registered from this test module, it appears in the CLI, the studio,
``sweep`` (with its own grid) and export's recipes (its mergekit equivalent too), and re-runs bitwise."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
import yaml

import weightlens as wl
from weightlens.cli import main
from weightlens.io import load_recipe
from weightlens.io.recipe import Mergekit
from weightlens.merge import (
    Interval,
    KeyUpdate,
    alpha_grid,
    get_method,
    list_methods,
    merge,
    register_merge,
    run_recipe,
    sweep,
)
from weightlens.merge.registry import unregister

from test_export import write_task_files

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ipywidgets' Layout(gap=...)
NAME = "plugin_scaled_sum"


def scaled_sum(ctx, key, *, gain: Annotated[float, Interval(0, None, "neither")] = 2.0) -> KeyUpdate:
    """``gain * sum_t tau_t``: task arithmetic with a gain, for the test."""
    return KeyUpdate(gain * ctx.deltas(key).sum(0))


@pytest.fixture
def plugin():
    register_merge(
        NAME, alpha=0.5, pretty_name="Plugin Sum", reference="this test", alpha_grid=(0.25, 0.5),
        mergekit=lambda p: Mergekit("task_arithmetic", {"weight": p.get("alpha", 0.5) * p.get("gain", 2.0)},
                                    {"normalize": False}),
    )(scaled_sum)
    yield NAME
    unregister(NAME)
    assert NAME not in list_methods()


def test_registered_method_is_listed_with_its_declarations(plugin):
    assert list_methods()[-1] == plugin
    method = get_method(plugin)
    assert method.pretty_name == "Plugin Sum" and method.describe() == "gain=2.0, alpha=0.5"
    assert alpha_grid(plugin, 3) == [0.25, 0.5] and alpha_grid(plugin, 3, combine="ties") == [0.25, 0.5]


def test_cli_help_and_validation_name_it(plugin, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert f"{list_methods()[-2]} or {plugin}" in " ".join(capsys.readouterr().out.split())
    base, fts = write_task_files(tmp_path)
    code = main(["merge", "--base", str(base), *(f"--ft={n}={p}" for n, p in fts.items()), "--method", "nope",
                 "--out", str(tmp_path / "bad"), "--device", "cpu", "-q"])
    assert code == 1 and plugin in capsys.readouterr().err


def test_cli_merge_writes_a_recipe_and_mergekit_config_that_rerun_bitwise(plugin, tmp_path, capsys):
    base, fts = write_task_files(tmp_path, hf=True)
    first = tmp_path / "first"
    code = main(["merge", "--base", str(base), *(f"--ft={n}={p}" for n, p in fts.items()), "--method", plugin,
                 "--param", "gain=3", "--out", str(first), "--device", "cpu", "-q"])
    assert code == 0
    recipe = load_recipe(first / "weightlens_recipe.yaml")
    assert recipe.method == plugin and recipe.params == {"gain": 3.0, "alpha": 0.5}
    mk = yaml.safe_load((first / "mergekit_config.yml").read_text())
    assert mk["merge_method"] == "task_arithmetic" and mk["models"][0]["parameters"] == {"weight": 1.5}
    written, expected = wl.load(first), merge(base, fts, method=plugin, gain=3.0, device="cpu")
    assert all(torch.equal(written[k], expected[k]) for k in expected.keys())
    again = run_recipe(first / "weightlens_recipe.yaml", tmp_path / "again", progress=False)
    assert load_recipe(again / "weightlens_recipe.yaml").expect == recipe.expect
    rerun = wl.load(again)
    assert all(torch.equal(written[k], rerun[k]) for k in written.keys())


def test_sweep_scores_its_declared_grid(plugin, tmp_path):
    base, fts = write_task_files(tmp_path)
    tv = wl.TaskVectors(base, fts)

    def evaluate(weights, task, split):
        return {"accuracy": 1.0 / (1.0 + float((weights["fc1.weight"] - tv.finetuned[task]["fc1.weight"]).norm()))}

    sw = sweep(tv, plugin, None, evaluate, gain=1.0, progress=False)
    assert sorted(set(sw.table.loc[sw.table["split"] == "val", "alpha"])) == [0.25, 0.5]
    assert sw.params == {"gain": 1.0}


def test_studio_lists_it_with_its_controls(plugin, tmp_path):
    pytest.importorskip("ipywidgets")
    from weightlens.widgets import MergeStudio

    base, fts = write_task_files(tmp_path)
    studio = MergeStudio(wl.TaskVectors(base, fts))
    assert ("Plugin Sum", plugin) in list(studio.method.options)
    controls = studio.params[plugin]
    assert list(controls) == ["gain", "alpha"] and controls["alpha"].value == 0.5
    assert controls["alpha"].max == 1.0  # max(its grid, twice its default alpha)
