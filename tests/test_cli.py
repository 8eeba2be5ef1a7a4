"""The command line: help with examples, clear one-line errors and exit codes; merge, report, sweep, rebasin, lmc,
tour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

import weightlens as wl
from weightlens.cli import build_parser, main
from weightlens.io import load_recipe


def test_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("zoo", "tour", "weightlens zoo build --size ci"):
        assert word in out


def test_unknown_zoo_is_a_one_line_error_with_exit_code_1(capsys):
    assert main(["zoo", "build", "--names", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("weightlens: error: Unknown zoo 'nope'") and "digits-tasks" in err
    assert "\n" not in err


def test_zoo_list_reports_built_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTLENS_HOME", str(tmp_path))
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "digits-tasks" in out and "not built" in out and str(tmp_path) in out


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "weightlens.cli", "zoo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "build" in done.stdout


def test_parser_choices_are_the_zoo_sizes():
    from weightlens.zoo import SIZES

    build = build_parser()._subparsers._group_actions[0].choices["zoo"]
    sizes = build._subparsers._group_actions[0].choices["build"]._option_string_actions["--size"].choices
    assert tuple(sizes) == SIZES


# ------------------------------------------------------------------------------------ merge, report, rebasin, lmc


def mlp_files(folder: Path, n: int = 2) -> tuple[Path, list[Path]]:
    """An MLP base and ``n`` fine-tunes as safetensors files (fc1/fc2 keys)."""
    g = torch.Generator().manual_seed(0)
    base = {"fc1.weight": torch.randn(16, 8, generator=g), "fc1.bias": torch.randn(16, generator=g),
            "fc2.weight": torch.randn(3, 16, generator=g), "fc2.bias": torch.randn(3, generator=g)}
    save_file(base, str(folder / "base.safetensors"))
    fts = []
    for i in range(n):
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(folder / f"ft{i}.safetensors"))
        fts.append(folder / f"ft{i}.safetensors")
    return folder / "base.safetensors", fts


def test_help_shows_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("report", "sweep", "merge", "rebasin", "lmc", "zoo", "weightlens merge --base", "Exit codes"):
        assert word in out
    for command in ("merge", "report", "sweep", "diagnose", "rebasin", "lmc"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and "examples:" in capsys.readouterr().out


def test_merge_by_flags_then_rerun_of_its_recipe_is_bitwise(tmp_path, capsys):
    base, (a, b) = mlp_files(tmp_path)
    first = tmp_path / "first"
    code = main(["merge", "--base", str(base), "--ft", f"a={a}", "--ft", f"b={b}", "--method", "ties",
                 "--param", "density=0.5", "--param", "scope=tensor", "--out", str(first), "--device", "cpu", "-q"])
    assert code == 0 and capsys.readouterr().out.strip() == str(first)
    recipe = first / "weightlens_recipe.yaml"
    assert main(["merge", str(recipe), "--out", str(tmp_path / "again"), "--verify", "-q"]) == 0
    captured = capsys.readouterr()
    assert "1 of 1 weight file(s) match the recipe's sha256: reproduced bitwise" in captured.err
    x, y = wl.load(first), wl.load(tmp_path / "again")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert load_recipe(recipe).params == {"density": 0.5, "scope": "tensor", "merge_func": "mean", "alpha": 1.0}
    assert yaml.safe_load((first / "mergekit_config.yml").read_text())["merge_method"] == "ties"


def test_merge_usage_errors_exit_2(tmp_path, capsys):
    base, (a,) = mlp_files(tmp_path, 1)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--base", str(base), "--method", "ties"])
    assert exit_.value.code == 2 and "--ft, --out" in capsys.readouterr().err
    main(["merge", "--base", str(base), "--ft", f"a={a}", "--method", "task_arithmetic", "--out",
          str(tmp_path / "m"), "-q"])
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(tmp_path / "m" / "weightlens_recipe.yaml"), "--method", "ties"])
    assert exit_.value.code == 2 and "cannot be combined with a recipe file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--base", str(base), "--ft", f"a={a}", "--method", "ties", "--param", "density",
              "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_errors_are_one_line_naming_the_file_with_exit_1(tmp_path, capsys):
    base, (a,) = mlp_files(tmp_path, 1)
    missing = tmp_path / "nope.safetensors"
    assert main(["merge", "--base", str(base), "--ft", f"x={missing}", "--method", "ties", "--out",
                 str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weightlens: error:") and str(missing) in err and err.count("\n") == 1
    out = tmp_path / "o2"
    assert main(["merge", "--base", str(base), "--ft", f"a={a}", "--method", "task_arithmetic", "--out",
                 str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["merge", str(out / "weightlens_recipe.yaml"), "-q"]) == 1  # its own output exists
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err and err.count("\n") == 1
    with pytest.raises(wl.CheckpointError):
        main(["--debug", "merge", "--base", str(base), "--ft", f"x={missing}", "--method", "ties",
              "--out", str(tmp_path / "o3"), "-q"])


def test_rebasin_writes_a_permuted_model_that_computes_the_same_function(tmp_path, capsys):
    base, (a, b) = mlp_files(tmp_path)
    assert main(["rebasin", str(a), str(b), "--out", str(tmp_path / "aligned"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "objective <a, pi(b)>" in out
    original, permuted = wl.load(b), wl.load(tmp_path / "aligned")
    x = torch.randn(5, 8)

    def mlp(sd):
        return torch.relu(x @ sd["fc1.weight"].T + sd["fc1.bias"]) @ sd["fc2.weight"].T + sd["fc2.bias"]

    assert torch.allclose(mlp(original), mlp(permuted), atol=1e-5)
    assert "aligned to" in (tmp_path / "aligned" / "README.md").read_text()


def test_rebasin_explains_what_it_supports(tmp_path, capsys):
    save_file({"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}, str(tmp_path / "c.safetensors"))
    c = str(tmp_path / "c.safetensors")
    assert main(["rebasin", c, c, "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "cannot build a mlp permutation spec" in err and "spec_from_module" in err


def test_report_writes_html(tmp_path, capsys):
    base, (a, b) = mlp_files(tmp_path)
    html = tmp_path / "report.html"
    assert main(["report", str(base), f"a={a}", f"b={b}", "--html", str(html), "--device", "cpu", "-q"]) == 0
    assert html.is_file() and "conflict rate" in capsys.readouterr().out


def test_lmc_without_an_evaluator_is_a_usage_error_that_explains(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lmc", "a.safetensors", "b.safetensors"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "needs an evaluator" in err and "--zoo digits-pairs" in err and "weightlens.lmc.curve" in err


def test_lmc_with_a_zoo_pair_prints_barriers(tmp_path, monkeypatch, capsys):
    from weightlens import zoo
    from weightlens.zoo._common import PairZoo

    g = torch.Generator().manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))  # noqa: E731
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        save_file(make().state_dict(), str(tmp_path / f"{name}.safetensors"))
    pair = PairZoo(name="digits-pairs", folder=tmp_path, a=tmp_path / "a.safetensors", b=tmp_path / "b.safetensors",
                   manifest={}, evaluate=None, make_module=make, data=lambda split: (x, y))
    monkeypatch.setattr(zoo, "load", lambda name, **kw: pair)
    html = tmp_path / "lmc.html"
    assert main(["lmc", "--zoo", "digits-pairs", "--points", "5", "--rebasin", "--html", str(html), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["curve", "split"] and lines[-1] == str(html) and html.is_file()
    assert {ln.split()[0] for ln in lines[1:-1]} == {"naive", "weight"} and len(lines) == 6


def test_merge_flags_with_include_and_dtype_round_trip_through_the_recipe(tmp_path, capsys):
    base, fts = mlp_files(tmp_path)
    first = tmp_path / "first"
    assert main(["merge", "--base", str(base), *[a for f in fts for a in ("--ft", str(f))], "--method", "dare",
                 "--param", "density=0.7", "--include", "fc1.*", "--dtype", "bfloat16", "--shard-size", "300",
                 "--out", str(first), "-q"]) == 0
    recipe = load_recipe(first / "weightlens_recipe.yaml")
    assert list(recipe.finetuned) == ["ft0", "ft1"] and recipe.include == ["fc1.*"] and recipe.dtype == "bfloat16"
    merged, original = wl.load(first), wl.load(base)
    assert merged.dtype("fc1.weight") == torch.bfloat16
    assert torch.equal(merged["fc2.weight"], original["fc2.weight"].to(torch.bfloat16))  # excluded: the base
    assert not torch.equal(merged["fc1.weight"], original["fc1.weight"].to(torch.bfloat16))
    assert main(["merge", str(first / "weightlens_recipe.yaml"), "--out", str(tmp_path / "again"), "--verify",
                 "-q"]) == 0
    assert "reproduced bitwise" in capsys.readouterr().err


def test_a_recipe_that_does_not_reproduce_says_why(tmp_path, capsys):
    base, (a, b) = mlp_files(tmp_path)
    first = tmp_path / "first"
    assert main(["merge", "--base", str(base), "--ft", f"a={a}", "--ft", f"b={b}", "--method", "tsv",
                 "--out", str(first), "--device", "cpu", "-q"]) == 0
    path = first / "weightlens_recipe.yaml"
    data = yaml.safe_load(path.read_text())
    data["expect"] = {name: "0" * 64 for name in data["expect"]}  # as if written elsewhere
    data["weightlens_version"] = "0.0.1"
    path.write_text(yaml.safe_dump(data))
    assert main(["merge", str(path), "--out", str(tmp_path / "again"), "--no-verify", "-q"]) == 0
    err = capsys.readouterr().err
    assert "0 of 1 weight file(s) match" in err
    assert "this recipe: weightlens 0.0.1, here: " in err and "LAPACK" in err
    assert main(["merge", str(path), "--out", str(tmp_path / "third"), "-q"]) != 0  # the check is the default
    assert "differ from the sha256 recorded" in capsys.readouterr().err and not (tmp_path / "third").exists()


# ------------------------------------------------------------------------------------ help, tour, report tables, sweep


def _subparsers(parser):
    """``{"zoo build": parser, ...}``: every command's parser, nested ones included."""
    import argparse

    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


def test_every_option_of_every_command_is_described_in_its_help(capsys):
    commands = _subparsers(build_parser())
    assert {"report", "sweep", "merge", "rebasin", "lmc", "zoo build", "zoo list", "tour"} <= set(commands)
    for name, parser in commands.items():
        if name == "zoo":
            continue
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert parser.description, f"weightlens {name} --help has no description"
        for action in parser._actions:
            if action.option_strings and "--help" not in action.option_strings:
                assert (action.help or "").strip(), f"weightlens {name}: {action.option_strings} has no help text"
                assert action.option_strings[-1] in text


def test_zoo_build_and_tour_help_say_what_they_do(capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("--size", "ci:", "demo:", "--names", "digits-pairs", "digits-tasks", "minilm-tasks", "--force",
                 "~/.cache/weightlens", "$WEIGHTLENS_HOME", "examples:"):
        assert word in text, word
    with pytest.raises(SystemExit):
        main(["tour", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("--headless", "--notebook", "--out", "reports/tour.html", "any folder", "minilm-tasks", "examples:"):
        assert word in text, word


def test_zoo_names_in_the_help_are_the_registry_s():
    from weightlens import cli, zoo

    assert cli._ZOO_NAMES == zoo.NAMES
    assert set(cli._TASK_ZOOS) < set(zoo.NAMES)


def test_tour_finds_its_notebook_from_any_folder(tmp_path, monkeypatch, capsys):
    import weightlens._tour as tour
    from weightlens import zoo

    root = Path(__file__).resolve().parents[1]
    assert tour.tour_notebook() == root / "notebooks" / "00_tour.ipynb"
    ran, loaded = [], []
    monkeypatch.setattr(tour, "run_tour", lambda nb, out, headless: ran.append((nb, out, headless)) or out)
    monkeypatch.setattr(zoo, "load", lambda name, **kw: loaded.append(name))
    monkeypatch.chdir(tmp_path)
    assert main(["tour", "--headless", "--out", "t.html"]) == 0
    assert ran == [(root / "notebooks" / "00_tour.ipynb", Path("t.html"), True)] and loaded == ["minilm-tasks"]
    assert capsys.readouterr().out.strip() == "t.html"


def test_tour_without_its_zoo_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTLENS_HOME", str(tmp_path))
    monkeypatch.delenv("WEIGHTLENS_ZOO_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["tour", "--headless"]) == 1
    err = capsys.readouterr().err
    assert "minilm-tasks" in err and "weightlens zoo build" in err and err.count("\n") == 1
    assert not (tmp_path / "reports").exists()


def test_report_csv_and_json_write_the_report_s_tables(tmp_path, capsys):
    import json

    import pandas as pd

    from weightlens.cli import report_tables

    base, (a, b) = mlp_files(tmp_path)
    tables, doc = tmp_path / "tables", tmp_path / "out" / "report.json"
    assert main(["report", str(base), f"a={a}", f"b={b}", "--csv", str(tables), "--json", str(doc),
                 "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [str(tables), str(doc)]
    report = wl.analyze(wl.TaskVectors(base, {"a": a, "b": b}), device="cpu", progress=False)
    expected = report_tables(report)
    assert {"spectra", "alignment", "pairs", "interference", "signs", "singular_values", "cosines", "summary",
            "by_block"} <= set(expected)
    assert sorted(p.stem for p in tables.iterdir()) == sorted(expected)
    data = json.loads(doc.read_text())
    assert data["tasks"] == ["a", "b"] and sorted(data["tables"]) == sorted(expected)

    def same(df):  # CSV writes "" and NaN alike; dtypes as read back
        return df.replace("", None).convert_dtypes()

    for name, table in expected.items():
        from_csv = pd.read_csv(tables / f"{name}.csv", keep_default_na=False, na_values=[""])
        from_json = pd.DataFrame(data["tables"][name], columns=table.columns)
        for got in (from_csv, from_json):
            pd.testing.assert_frame_equal(same(got), same(table), check_dtype=False, check_exact=True, obj=name)
    assert report_tables(report)["cosines"].columns[0] == "task"
    assert report_tables(report)["summary"].columns[0] == "metric"


def test_report_needs_an_output(tmp_path, capsys):
    base, (a,) = mlp_files(tmp_path, 1)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(base), str(a)])
    assert exit_.value.code == 2 and "--html FILE, --csv DIR or --json FILE" in capsys.readouterr().err


def test_sweep_from_the_command_line_chooses_the_python_sweep_s_alpha(digits_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTLENS_ZOO_SIZE", "ci")
    expected = wl.sweep(digits_zoo.task_vectors(), "ties", [0.5, 1.0, 1.5], digits_zoo.evaluate, progress=False)
    assert main(["sweep", "--zoo", "digits-tasks", "--method", "ties", "--alphas", "0.5,1,1.5", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["alpha", "split", "accuracy", "loss", "normalized_accuracy", "nai"]
    assert len(out) == 1 + len(expected.summary()) + 1
    assert out[-1].startswith(f"chosen alpha: {expected.best_alpha:g} (highest mean normalized accuracy on val)")
    test_acc = expected.report()["test_accuracy"]
    assert f"accuracy {test_acc:.4f}" in out[-1]

    # the user's own scorer, from a file and from a module in the current folder (imports leave no trace)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("scoring", "_weightlens_user_scoring"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "scoring.py").write_text(
        "from weightlens import zoo\n_zoo = zoo.load('digits-tasks', size='ci')\n"
        "def score(weights, task, split):\n    return _zoo.evaluate(weights, task, split)\n")
    fts = [f"{t}={digits_zoo.finetuned[t]}" for t in digits_zoo.tasks]
    for spec in (f"{tmp_path / 'scoring.py'}:score", "scoring:score"):
        monkeypatch.chdir(tmp_path)
        assert main(["sweep", str(digits_zoo.base), *fts, "--evaluate", spec, "--method", "ties",
                     "--alphas", "0.5,1,1.5", "-q"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == out[-1], spec


def test_sweep_usage_errors(tmp_path, capsys):
    base, (a,) = mlp_files(tmp_path, 1)
    for argv, says in (
        (["sweep", "--method", "ties"], "sweep needs --zoo NAME"),
        (["sweep", str(base), str(a), "--method", "ties"], "--evaluate MODULE:FUNCTION"),
        (["sweep", str(base), str(a), "--method", "ties", "--evaluate", "no_such_module_x"], "no module"),
        (["sweep", str(base), str(a), "--method", "ties", "--evaluate", f"{tmp_path / 'none.py'}:f"], "no Python"),
        (["sweep", "--zoo", "digits-tasks", "--method", "ties", "--alphas", "0.5,x"], "--alphas takes numbers"),
        (["sweep", "--zoo", "digits-tasks", str(base), "--method", "ties"], "not both"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and says in capsys.readouterr().err, argv


def test_diagnose_from_the_command_line_is_the_python_diagnosis(digits_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTLENS_ZOO_SIZE", "ci")
    tv = digits_zoo.task_vectors()
    expected = wl.diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.5), progress=False)
    args = ["diagnose", "--zoo", "digits-tasks", "--method", "task_arithmetic", "--param", "alpha=0.5", "-q"]
    assert main([*args, "--csv", str(tmp_path / "tables"), "--html", str(tmp_path / "why.html")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(expected.summary()) and str(tmp_path / "why.html") in out
    blocks = pd.read_csv(tmp_path / "tables" / "blocks.csv")
    assert list(blocks.columns) == list(expected.blocks.columns) and len(blocks) == len(expected.blocks)
    assert (tmp_path / "tables" / "checks.csv").is_file() and "<html" in (tmp_path / "why.html").read_text().lower()
    # with the zoo's scorer: restoration tests, one block per task
    assert main([*args, "--evaluate", "--restore", "1", "--split", "val"]) == 0
    assert "restoring" in capsys.readouterr().out
    assert main([*args, "--evaluate", "--restore", "1", "--restore-by", "weight", "--weight", "3",
                 "--csv", str(tmp_path / "r")]) == 0
    raised = wl.diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.5), evaluate=digits_zoo.evaluate,
                         restore=1, restore_by="weight", weight=3.0, progress=False)
    measured = pd.read_csv(tmp_path / "r" / "blocks.csv").dropna(subset=["measured_gain"])
    assert measured["measured_gain"].tolist() == pytest.approx(raised.blocks.dropna(subset=["measured_gain"])[
        "measured_gain"].tolist())
    # --whatif from the weights: the other method's kept shares, in the summary and whatif.csv
    assert main([*args, "--whatif", "ties", "--csv", str(tmp_path / "w")]) == 0
    assert "What-if from the weights" in capsys.readouterr().out
    assert set(pd.read_csv(tmp_path / "w" / "whatif.csv")["method"]) == {"task_arithmetic", "ties"}
    # from files, a bare --evaluate needs the user's scorer
    assert_usage = pytest.raises(SystemExit)
    with assert_usage as exit_:
        main(["diagnose", str(digits_zoo.base), *map(str, digits_zoo.finetuned.values()), "--evaluate", "-q"])
    assert exit_.value.code == 2 and "needs MODULE:FUNCTION" in capsys.readouterr().err


def test_executor_names_in_the_help_are_the_executor_module_s():
    from weightlens import _executor, cli

    assert cli._EXECUTORS == _executor.EXECUTORS


def test_executor_flag_reaches_the_merge_s_export_and_the_report(tmp_path, monkeypatch, capsys):
    """``--executor ray`` takes the Ray path (the tasks' functions, each key through ``map_keys``), run here in
    this process: the weights and tables are the local ones."""
    from weightlens._executor import map_keys
    from weightlens.analysis import report as report_module
    from weightlens.merge import engine

    base, (a, b) = mlp_files(tmp_path)
    asked = []

    def here(fn, keys, *, executor="local", shared=None, gpus=0, window=None):
        asked.append(executor)
        return map_keys(fn, keys, shared=shared)

    merge_flags = ["merge", "--base", str(base), "--ft", f"a={a}", "--ft", f"b={b}", "--method", "ties",
                   "--device", "cpu", "-q"]
    report_flags = ["report", str(base), f"a={a}", f"b={b}", "--device", "cpu", "-q"]
    assert main([*merge_flags, "--out", str(tmp_path / "local")]) == 0
    assert main([*report_flags, "--json", str(tmp_path / "local.json")]) == 0
    monkeypatch.setattr(engine, "map_keys", here)
    monkeypatch.setattr(report_module, "map_keys", here)
    assert main([*merge_flags, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert asked == ["ray"]
    assert main([*report_flags, "--json", str(tmp_path / "ray.json"), "--executor", "ray"]) == 0
    assert asked == ["ray", "ray"]
    capsys.readouterr()
    local, remote = wl.load(tmp_path / "local"), wl.load(tmp_path / "ray")
    assert list(local) == list(remote) and all(torch.equal(local[k], remote[k]) for k in local)
    assert (tmp_path / "local.json").read_text() == (tmp_path / "ray.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        main([*report_flags, "--json", str(tmp_path / "x.json"), "--executor", "dask"])
    assert exit_.value.code == 2 and "invalid choice: 'dask'" in capsys.readouterr().err
