"""The ``weightlens`` command line.

Examples
--------
  weightlens report base/ math=ft/math code=ft/code --html report.html --csv tables/
  weightlens sweep --zoo digits-tasks --method ties --alphas 0.5,1.0      # alpha chosen on validation
  weightlens sweep base/ math=ft/math code=ft/code --evaluate scoring.py:evaluate --method tsv
  weightlens merge merged/weightlens_recipe.yaml --out merged-again/      # re-run a recipe, bitwise
  weightlens merge --base base/ --ft math=ft/math --ft code=ft/code --method ties \\
                   --param density=0.2 --param alpha=1.0 --out merged/
  weightlens rebasin a.safetensors b.safetensors --out b-aligned/       # MLP spec inferred from keys
  weightlens lmc --zoo digits-pairs --width 128 --rebasin
  weightlens zoo build --size ci          # train the CI-size zoo (about 2 minutes on 2 cores)
  weightlens zoo list                     # what is built, with base and fine-tuned accuracies
  weightlens tour --headless --out reports/tour.html   # from any folder

Exit codes: 0 success, 1 error (one line naming the file or key; --debug shows the traceback),
2 usage error. Progress bars go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightlens.errors import CheckpointError, InvalidParameterError, WeightlensError

_EPILOG = __doc__.split("Examples\n--------\n", 1)[1]
_LMC_HELP = (
    "lmc needs an evaluator: a model and data that score the interpolated weights. From the command line "
    "the zoo's are available: weightlens lmc --zoo digits-pairs --width 128 (build it first with "
    "weightlens zoo build --names digits-pairs). For your own models, in Python: "
    "weightlens.lmc.curve(a, b, weightlens.lmc.Evaluator(module, {'test': (x, y)}))."
)
_LMC_ZOOS = ("digits-pairs",)
# zoos with a base, fine-tunes and evaluate(weights, task, split)
_TASK_ZOOS = ("digits-tasks", "minilm-tasks", "minilm-lora")
# weightlens.zoo.NAMES (a test keeps them equal)
_ZOO_NAMES = ("digits-pairs", "digits-tasks", "minilm-tasks", "minilm-lora")
_ZOO_HOME = ("$WEIGHTLENS_HOME when set, else $XDG_CACHE_HOME/weightlens, else ~/.cache/weightlens: one default "
             "location, the same for Python, the command line, the notebooks and dev.sh")
# weightlens._executor.EXECUTORS (a test keeps them equal)
_EXECUTORS = ("local", "ray")
_EXECUTOR_HELP = (": local (this process, the default) or ray (Ray tasks, the same results bitwise; joins the "
                  "cluster at $RAY_ADDRESS, else starts a local one; needs pip install 'weightlens[ray]'; see "
                  "docs/scale.md)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # a task name in NAME=PATH
_SCALARS = (bool, int, float, str, type(None))


class UsageError(Exception):
    """Arguments that parse but do not fit together (exit code 2)."""


def _one_named(item: str, what: str) -> tuple[str | None, str]:
    """``(name, path)`` of ``NAME=PATH``, ``(None, item)`` of a plain path.

    An existing path is a path even when it holds ``=``; ``NAME=PATH`` needs a plain NAME (letters,
    digits, ``_ . + -``) and splits at the first ``=``, so ``NAME=runs/lr=1e-4/ckpt`` names such a path.
    """
    name, sep, path = item.partition("=")
    as_named = bool(sep) and bool(path) and _NAME.fullmatch(name) is not None
    if os.path.exists(item):
        if as_named and os.path.exists(path):
            raise UsageError(f"{what}: {item!r} is ambiguous: an existing path, and NAME=PATH naming {path!r}. "
                             f"Write ./{item} for the path, or NAME={item} to name it.")
        return None, item
    if as_named:
        return name, path
    if sep:
        raise UsageError(f"{what}: {item!r} is no existing file or folder, nor NAME=PATH with a plain NAME "
                         f"(letters, digits, _ . + -). To name a path that holds '=', write NAME={item}.")
    return None, item


def _named(items: list[str], what: str) -> dict[str, str] | list[str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}``; plain paths stay a list (names from file names)."""
    pairs = [_one_named(i, what) for i in items]
    named = [(n, p) for n, p in pairs if n is not None]
    if named and len(named) != len(items):
        raise UsageError(f"{what}: give every fine-tune as NAME=PATH or none of them; got {items}.")
    if len({n for n, _ in named}) != len(named):
        raise UsageError(f"{what}: each NAME in NAME=PATH must be different; got {items}.")
    return dict(named) if named else [p for _, p in pairs]


def _params(items: list[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` items as ``{key: value}``: plain YAML values (no tags, anchors or aliases)."""
    from weightlens.io.recipe import plain_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--param takes KEY=VALUE with KEY a parameter name (e.g. --param density=0.2); "
                             f"got {item[:80]!r}.")
        try:
            parsed = plain_yaml(value, f"--param {key}") if value else None
        except InvalidParameterError as err:
            raise UsageError(str(err)) from None
        scalars = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(x, _SCALARS) for x in scalars):
            raise UsageError(f"--param {key}: the value must be a number, string, true/false, null or a list of "
                             f"them; got {value[:80]!r}.")
        out[key] = parsed
    return out


def _out_dir(value: str | None) -> str | None:
    """``--out``; an empty one is refused (it would mean the current folder)."""
    if value is not None and not value.strip():
        raise InvalidParameterError("--out is an empty string: give the output folder (e.g. --out merged/).")
    return value


# ---------------------------------------------------------------------------------------- zoo, tour
def _zoo_build(args: argparse.Namespace) -> int:
    from weightlens import zoo

    folders = zoo.build(size=args.size, names=args.names or None, force=args.force, progress=not args.quiet)
    for name, folder in folders.items():
        sys.stdout.write(f"{name}: {folder}\n")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from weightlens import zoo
    from weightlens.zoo._common import read_manifest, zoo_dir

    for size in zoo.SIZES:
        for name in zoo.NAMES:
            folder = zoo_dir(name, size)
            state = "built" if (folder / "manifest.json").is_file() else "not built"
            line = f"{size:5s} {name:14s} {state:10s} {folder}"
            if state == "built":
                summary = read_manifest(folder).get("summary")
                line += f"  {summary}" if summary else ""
            sys.stdout.write(line + "\n")
    return 0


def _tour(args: argparse.Namespace) -> int:
    from weightlens import zoo
    from weightlens._tour import TOUR_ZOOS, run_tour, tour_notebook

    notebook = Path(args.notebook) if args.notebook else tour_notebook()
    if not notebook.is_file():
        raise FileNotFoundError(f"--notebook {args.notebook}: no such notebook.")
    if args.headless:
        for name in TOUR_ZOOS:  # a missing zoo: one line that says how to build it, before a kernel starts
            zoo.load(name)
    out = run_tour(notebook, Path(args.out), headless=args.headless)
    sys.stdout.write(f"{out}\n")
    return 0


# ---------------------------------------------------------------------------------------- report
def report_tables(report: Any) -> dict[str, Any]:
    """Every table of a ``Report`` as a DataFrame with plain columns, by name (what --csv/--json write).

    The tidy tables (``spectra``, ``alignment``, ``pairs``, ``interference``, ``signs``,
    ``singular_values``), ``cosines`` (task x task, its rows named in a ``task`` column), and the
    aggregates ``summary()`` (a ``metric`` column) and ``by_block()`` (a ``block`` column).
    """
    import pandas as pd

    tables = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)
              if isinstance(getattr(report, f.name), pd.DataFrame)}
    tables["summary"], tables["by_block"] = report.summary(), report.by_block()
    out = {}
    for name, table in tables.items():
        if not isinstance(table.index, pd.RangeIndex):
            table = table.rename_axis(table.index.name or "task").reset_index()
        out[name] = table.reset_index(drop=True)
    return out


def _plain(value: Any) -> Any:
    """A table cell for JSON: NaN, NA and NaT become null, numpy scalars Python ones."""
    import pandas as pd

    if value is None or (not isinstance(value, list | tuple | dict) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write_tables(report: Any, csv_dir: str | None, json_file: str | None) -> None:
    """``--csv DIR``: ``DIR/<table>.csv`` per table; ``--json FILE``: ``{tasks, notes, tables: {name: rows}}``."""
    from weightlens.io._atomic import atomic_write_text

    tables = report_tables(report)
    if csv_dir is not None:
        folder = Path(csv_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--csv {csv_dir}: that is a file; --csv takes a folder (one CSV per table).")
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            atomic_write_text(folder / f"{name}.csv", table.to_csv(index=False))
    if json_file is not None:
        path = Path(json_file).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"--json {json_file}: that is a folder; --json takes a file (all tables in one).")
        doc = {"tasks": list(report.tasks), "notes": list(report.notes),
               "tables": {name: [{k: _plain(v) for k, v in row.items()} for row in table.to_dict("records")]
                          for name, table in tables.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def _report(args: argparse.Namespace) -> int:
    from weightlens.analysis import analyze
    from weightlens.taskvectors import TaskVectors

    if not (args.html or args.csv or args.json):
        raise UsageError("report needs somewhere to write: --html FILE, --csv DIR or --json FILE (or several).")
    tv = TaskVectors(args.base, _named(args.finetuned, "report"), include=args.include, exclude=args.exclude)
    report = analyze(tv, device=args.device, progress=not args.quiet, executor=args.executor)
    written = [report.to_html(args.html)] if args.html else []
    _write_tables(report, args.csv, args.json)
    written += [Path(x) for x in (args.csv, args.json) if x]
    summary = report.summary()
    cols = [c for c in ("plain", "weighted", "chance") if c in summary.columns]
    sys.stdout.write(summary[cols].to_string(float_format=lambda v: f"{v:.4g}") + "\n")
    sys.stdout.write("".join(f"{w}\n" for w in written))
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from weightlens.diagnosis import diagnose
    from weightlens.io._atomic import atomic_write_text
    from weightlens.merge import merge

    if args.evaluate == "" and args.zoo is None:
        raise UsageError("diagnose --evaluate without --zoo needs MODULE:FUNCTION (your scorer).")
    tv, scorer = _task_inputs(args, "diagnose", need_evaluate=False)
    merged = merge(tv, method=args.method, device=args.device, data=_merge_data(args, args.method, "diagnose"),
                   **_params(args.param))
    options = {"restore": args.restore} if args.restore is not None else {}
    options.update(restore_by=args.restore_by, weight=args.weight)
    if args.whatif is not None:
        options["whatif"] = "all" if args.whatif == "all" else tuple(m for m in args.whatif.split(",") if m)
    d = diagnose(tv, merged, evaluate=scorer if args.evaluate is not None else None, progress=not args.quiet,
                 device=args.device, split=args.split, **options)
    written: list[Path] = []
    if args.html:
        d.to_html(args.html)
        written.append(Path(args.html))
    if args.csv:
        folder = Path(args.csv).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--csv {args.csv}: that is a file; --csv takes a folder (one CSV per table).")
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("blocks", "tasks", "checks") + (("whatif",) if args.whatif is not None else ()):
            atomic_write_text(folder / f"{name}.csv", getattr(d, name).to_csv(index=False))
        written.append(folder)
    sys.stdout.write(d.summary() + "\n" + "".join(f"{w}\n" for w in written))
    return 0


def _task_inputs(args: argparse.Namespace, command: str, *, need_evaluate: bool) -> tuple[Any, Any]:
    """The task vectors and the scorer of ``sweep``/``diagnose``: ``--zoo NAME`` (its files and scorer; ``--evaluate``
    replaces the scorer) or ``BASE FT...`` with ``--evaluate MODULE:FUNCTION`` (required when ``need_evaluate``)."""
    from weightlens.taskvectors import TaskVectors

    if args.zoo is not None:
        if args.base is not None:
            raise UsageError(f"{command} takes --zoo NAME or BASE FT..., not both.")
        from weightlens import zoo

        z = zoo.load(args.zoo, size=args.size)
        return z.task_vectors(), (load_function(args.evaluate) if args.evaluate else z.evaluate)
    if args.base is None or not args.finetuned or (need_evaluate and not args.evaluate):
        needs = " with --evaluate MODULE:FUNCTION (your scorer)" if need_evaluate else ""
        raise UsageError(f"{command} needs --zoo NAME ({', '.join(_TASK_ZOOS)}), or BASE FT [FT ...]{needs}; see "
                         f"weightlens {command} --help.")
    tv = TaskVectors(args.base, _named(args.finetuned, command))
    return tv, (load_function(args.evaluate) if args.evaluate else None)


def _merge_data(args: argparse.Namespace, method: str, command: str) -> Any:
    """The data of a data-based method (``regmean``, ``fisher``): the zoo's ``merge_data()`` with ``--zoo``; None
    for the other methods; from files (no data hook on the command line) a usage error."""
    from weightlens.merge import get_method

    spec = get_method(method)
    if not spec.needs_data:
        return None
    if args.zoo is None:
        raise UsageError(f"{command} --method {method} needs data ({spec.needs_data}), which the command line "
                         f"takes from a zoo: use --zoo NAME ({', '.join(_TASK_ZOOS)}), or call "
                         f"wl.merge(tv, method={method!r}, data=MergeData(...)) from Python.")
    from weightlens import zoo

    return zoo.load(args.zoo, size=args.size).merge_data()


# ---------------------------------------------------------------------------------------- sweep
def load_function(spec: str, what: str = "--evaluate") -> Callable[..., Any]:
    """The function ``MODULE:NAME`` names: an importable module (``pkg.scoring:evaluate``, the current
    folder included) or a Python file (``path/to/scoring.py:evaluate``); NAME defaults to ``evaluate``.

    This imports that module, that is, it runs the user's code: the user named it.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not name.isidentifier():
        target, name = spec, "evaluate"
    if not target:
        raise UsageError(f"{what} {spec!r}: give MODULE:FUNCTION or path/to/file.py:FUNCTION.")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"{what} {spec!r}: no Python file {target}.")
        sys.path.insert(0, str(path.parent))  # as python runs a script: its folder's modules import
        module_spec = importlib.util.spec_from_file_location(f"_weightlens_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as err:
            if err.name != target.split(".")[0] and err.name != target:
                raise
            raise UsageError(f"{what} {spec!r}: no module {target!r} on the path or in the current folder; "
                             f"give a file instead: path/to/{target.rsplit('.', 1)[-1]}.py:{name}.") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{what} {spec!r}: {target} has no function {name!r}.")
    return fn


def _alphas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--alphas takes numbers separated by commas (e.g. --alphas 0.5,1.0); got {text!r}.") \
            from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--alphas takes finite numbers separated by commas (e.g. --alphas 0.5,1.0); got {text!r}.")
    return values


def _sweep(args: argparse.Namespace) -> int:
    from weightlens.merge import sweep

    tv, evaluate = _task_inputs(args, "sweep", need_evaluate=True)
    sw = sweep(tv, args.method, _alphas(args.alphas), evaluate, select_on=args.select_on,
               report_on=args.report_on, progress=not args.quiet, device=args.device,
               data=_merge_data(args, args.method, "sweep"), **_params(args.param))
    sys.stdout.write(sw.summary().to_string(index=False, formatters={"alpha": "{:g}".format},
                                            float_format=lambda v: f"{v:.4f}") + "\n")
    line, on = sw.report(), args.report_on
    sys.stdout.write(
        f"chosen alpha: {sw.best_alpha:g} (highest mean normalized accuracy on {args.select_on}); on {on}: "
        f"accuracy {line[f'{on}_accuracy']:.4f}, normalized {line[f'{on}_normalized_accuracy']:.4f} "
        f"(base {line[f'base_{on}_accuracy']:.4f}, fine-tuned {line[f'finetuned_{on}_accuracy']:.4f})\n"
    )
    return 0


# ---------------------------------------------------------------------------------------- merge
def _recipe_from_flags(args: argparse.Namespace) -> Any:
    from weightlens.io import Recipe, load
    from weightlens.io.recipe import name_paths
    from weightlens.linalg import resolve_device

    missing = [f for f, v in (("--base", args.base), ("--ft", args.ft), ("--method", args.method),
                              ("--out", args.out)) if not v]
    if missing:
        raise UsageError(f"merge needs a recipe file, or {', '.join(missing)} (see weightlens merge --help).")
    ft = _named(args.ft, "--ft")
    if isinstance(ft, list):
        ft = name_paths(ft)
    if args.head is not None and args.head not in ft:
        raise UsageError(f"--head {args.head}: not one of the fine-tunes ({', '.join(ft)}); name one given by --ft.")
    load(args.base)  # a missing or unreadable base is reported before anything else
    return Recipe(
        base=os.path.abspath(args.base), finetuned={n: os.path.abspath(p) for n, p in ft.items()},
        method=args.method, params=_params(args.param), include=args.include, exclude=args.exclude,
        vocab=args.vocab, head=args.head,
        device=str(resolve_device(args.device or "auto")), dtype=args.dtype, shard_size=args.shard_size or "5GB",
        like=os.path.abspath(args.like) if args.like else None, output=os.path.abspath(args.out),
    )


def _sources(items: list[str]) -> dict[str, str]:
    """``--source NAME=PATH`` items as ``{name: path}`` (the path may hold '=')."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not _NAME.fullmatch(name) or not path:
            raise UsageError(f"--source takes NAME=PATH, NAME being base, like or a task of the recipe "
                             f"(e.g. --source base=models/base); got {item[:80]!r}.")
        if name in out:
            raise UsageError(f"--source {name}= is given twice.")
        out[name] = path
    return out


def _merge(args: argparse.Namespace) -> int:
    from weightlens.io import load_recipe
    from weightlens.merge import run_recipe

    _out_dir(args.out)
    if args.recipe:
        given = [f for f, v in (("--base", args.base), ("--ft", args.ft), ("--method", args.method),
                                ("--param", args.param), ("--include", args.include), ("--exclude", args.exclude),
                                ("--like", args.like), ("--dtype", args.dtype), ("--shard-size", args.shard_size),
                                ("--vocab", args.vocab), ("--head", args.head))
                 if v]
        if given:
            raise UsageError(f"merge: {', '.join(given)} cannot be combined with a recipe file; edit the recipe "
                             "(and drop its 'expect') or give the merge by flags alone.")
        recipe = load_recipe(args.recipe)
    elif args.source:
        raise UsageError("merge: --source points a recipe's re-run at moved inputs; give the recipe file, or "
                         "--base and --ft for a merge by flags.")
    else:
        recipe = _recipe_from_flags(args)
    if not args.source:  # moved inputs are found by run_recipe
        _plan_first(recipe, args.device, args.quiet)
    data = None
    if recipe.data is not None and "zoo" in recipe.data:  # a zoo's data: made again (the zoo must be built)
        from weightlens.zoo import merge_data_of

        data = merge_data_of(recipe.data["zoo"])
    out = run_recipe(recipe, args.out, sources=_sources(args.source), overwrite=args.overwrite,
                     progress=not args.quiet, device=args.device, data=data, verify=args.verify,
                     check_inputs=not args.ignore_changed_inputs, fingerprint=args.fingerprint,
                     overwrite_any=args.overwrite_any, executor=args.executor)
    if recipe.expect:
        _say_reproduced(recipe, out, verified=args.verify, device=args.device)
    sys.stdout.write(f"{out}\n")
    return 0


def _say_reproduced(recipe: Any, out: Path, *, verified: bool, device: str | None) -> None:
    """One stderr line on how the re-run compares with the recipe's sha256 (and why when it differs)."""
    from weightlens.merge.recipes import why_differs

    n = len(recipe.expect)
    if verified:  # run_recipe raised unless every file matched
        sys.stderr.write(f"weightlens: {n} of {n} weight file(s) match the recipe's sha256: reproduced bitwise.\n")
        return
    bad = recipe.check(out)
    sys.stderr.write(
        f"weightlens: {n - len(bad)} of {n} weight file(s) match the recipe's sha256"
        f"{' (' + ', '.join(bad) + ' differ)' if bad else ': reproduced bitwise'}.\n"
        + (f"weightlens: {why_differs(recipe, device=device)}\n" if bad else "")
    )


# ---------------------------------------------------------------------------------------- rebasin
def _config_heads(a: Any) -> int | None:
    """``num_attention_heads`` from the config.json beside A's weights (``None`` when there is none)."""
    config = a.hf_dir / "config.json" if a.hf_dir is not None else None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{config}: not valid JSON ({' '.join(str(exc).split())[:120]}); fix the file or "
                              "pass --heads N.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config}: holds a JSON {type(data).__name__}, not an object; fix the file or "
                              "pass --heads N.")
    heads = data.get("num_attention_heads")
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise CheckpointError(f"{config}: 'num_attention_heads' must be a positive integer, got "
                              f"{str(heads)[:40]!r}; fix the file or pass --heads N.")
    return heads


def _spec(args: argparse.Namespace, a: Any) -> Any:
    from weightlens import rebasin

    heads = args.heads if args.spec == "mlp" or args.heads is not None else _config_heads(a)
    try:
        if args.spec == "mlp":
            return rebasin.mlp_spec(a)
        if heads is None:
            raise UsageError("--spec transformer needs --heads N (no num_attention_heads in a config.json "
                             "next to the weights).")
        return rebasin.transformer_spec(a, int(heads))
    except WeightlensError as err:
        raise type(err)(
            f"{a.source}: cannot build a {args.spec} permutation spec from its keys ({err}). The command line "
            "handles MLPs (--spec mlp: Linear layers in a chain) and transformers (--spec transformer); for "
            "CNNs use weightlens.rebasin.resnet_spec, vgg_spec or spec_from_module in Python."
        ) from None


def _rebasin(args: argparse.Namespace) -> int:
    from weightlens import rebasin
    from weightlens.io import export, load

    _out_dir(args.out)
    a, b = load(args.a), load(args.b)
    spec = _spec(args, a)
    perms = rebasin.weight_matching(a, b, spec, seed=args.seed, max_iter=args.max_iter, progress=not args.quiet)
    hist = perms.objective_history
    note = (f"{b.source} permuted by Git Re-Basin weight matching into the basis of {a.source} "
            f"({args.spec} spec, {len(spec.units)} permutations); objective <a, pi(b)> "
            f"{hist[0]:.6g} -> {hist[-1]:.6g} in {len(hist) - 1} sweep(s). The function is unchanged.")
    out = export(perms.apply(b), args.out, like=b.hf_dir or False, recipe=False, overwrite=args.overwrite,
                 overwrite_any=args.overwrite_any, progress=not args.quiet,
                 card={"title": f"{b.name} aligned to {a.name}", "notes": note})
    sys.stdout.write(f"objective <a, pi(b)>: {hist[0]:.6g} -> {hist[-1]:.6g} ({len(hist) - 1} sweep(s))\n{out}\n")
    return 0


# ---------------------------------------------------------------------------------------- lmc
def _lmc(args: argparse.Namespace) -> int:
    from weightlens import lmc, rebasin, zoo
    from weightlens.io import load

    if args.zoo is None:
        raise UsageError(_LMC_HELP)
    if args.zoo not in _LMC_ZOOS:
        raise UsageError(f"--zoo {args.zoo!r}: lmc evaluators exist for {', '.join(_LMC_ZOOS)}. {_LMC_HELP}")
    if (args.a is None) != (args.b is None):
        raise UsageError("lmc takes two checkpoints A B, or none (then the zoo's own pair).")
    pair = zoo.load(args.zoo, size=args.size, width=args.width)
    a, b = load(args.a or pair.a), load(args.b or pair.b)
    ev = lmc.Evaluator(pair.make_module(), {s: pair.data(s) for s in ("train", "test")})
    curves = [lmc.curve(a, b, ev, points=args.points, progress=not args.quiet, label="naive")]
    if args.rebasin:
        perms = rebasin.weight_matching(a, b, rebasin.mlp_spec(a), progress=not args.quiet)
        curves.append(lmc.curve(a, perms.apply(b), ev, points=args.points, progress=not args.quiet,
                                label="weight matching"))
    sys.stdout.write(f"{'curve':16s} {'split':6s} {'loss barrier':>13s} {'acc barrier':>12s}\n")
    for c in curves:
        for split in c.splits:
            sys.stdout.write(f"{c.label:16s} {split:6s} {c.barrier[split]:13.4f} "
                             f"{lmc.accuracy_barrier(c.alphas, c.accuracy[split]):12.4f}\n")
    if args.html:
        from weightlens.figures.lmc import figure_lmc

        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        figure_lmc(curves, title=f"LMC {a.name} - {b.name}").write_html(args.html, include_plotlyjs=True)
        sys.stdout.write(f"{args.html}\n")
    return 0


# ---------------------------------------------------------------------------------------- parser
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    return common


class _MethodsHelp(argparse.RawDescriptionHelpFormatter):
    """Fills ``{methods}`` in a help text with the registered merge methods, only when help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        if "{methods}" in text:
            from weightlens.merge import list_methods

            *rest, last = list_methods()
            text = text.replace("{methods}", f"{', '.join(rest)} or {last}" if rest else last)
        return text


def _sub(sub: Any, name: str, help_: str, examples: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=help_, parents=[common],
                          epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_merge(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "merge", "merge fine-tunes of one base and export the result (from a recipe or flags)",
             "  weightlens merge merged/weightlens_recipe.yaml --out again/   # checks inputs and sha256\n"
             "  weightlens merge moved/weightlens_recipe.yaml --source base=models/base --out again/\n"
             "  weightlens merge --base base/ --ft math=ft/math --ft code=ft/code --method task_arithmetic \\\n"
             "                   --param alpha=0.3 --out merged/ --dtype bfloat16\n", common)
    p.add_argument("recipe", nargs="?", help="a weightlens_recipe.yaml (as written by export)")
    p.add_argument("--base", help="base checkpoint (file or HF folder)")
    p.add_argument("--ft", action="append", default=[], metavar="NAME=PATH",
                   help="a fine-tune, PATH or NAME=PATH (repeat); an existing path is a path even with '=' in "
                        "it, and NAME=runs/lr=1e-4/ckpt names one")
    p.formatter_class = _MethodsHelp  # the method list is read from the registry when help is shown
    p.add_argument("--method", help="{methods}")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a method parameter (repeat)")
    p.add_argument("--include", action="append", metavar="GLOB", help="merge only matching keys (repeat)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="keep the base for matching keys (repeat)")
    p.add_argument("--like", help="HF folder whose config/tokenizer files are copied (default: the head's or the "
                                  "base's)")
    p.add_argument("--vocab", choices=("base", "union"),
                   help="fine-tunes with added tokens: merge the base's rows (base) or every token (union: the "
                        "export writes the union tokenizer); default: refuse them")
    p.add_argument("--head", metavar="TASK",
                   help="carry that fine-tune's head: its key names, the keys only it has (e.g. a classifier) and "
                        "its config.json (default: none, the base's layout)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                   help="a recipe's input that moved: base, like or a task name, and its path now (repeat); "
                        "checked against the recipe's fingerprints")
    p.add_argument("--dtype", help="export dtype: float32, bfloat16, float16 (default: the base's)")
    p.add_argument("--shard-size", help="largest shard, e.g. 5GB (default) or 500MB")
    p.add_argument("--device", help="where the merge runs: auto, cpu, cuda (default: the recipe's; flags: auto)")
    p.add_argument("--executor", choices=_EXECUTORS, default="local",
                   help="where the merge's keys are computed while the export writes them" + _EXECUTOR_HELP
                        + "; an adapter recipe runs locally only")
    p.add_argument("--out", help="output folder (default: the recipe's output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder (a weightlens export) atomically")
    p.add_argument("--overwrite-any", action="store_true",
                   help="also replace a non-empty folder that is not a weightlens export")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="a recipe's re-run must give the sha256 recorded in its 'expect', or exit 1 leaving no "
                        "output (default); --no-verify keeps a differing re-run and says which files differ")
    p.add_argument("--ignore-changed-inputs", action="store_true",
                   help="merge even when the inputs differ from the recipe's fingerprints (size, header)")
    p.add_argument("--fingerprint", choices=("header", "full"),
                   help="how the written recipe fingerprints the inputs: size and header sha256 (header) or also "
                        "a full sha256 of every file (full, reads every byte); default: header for a merge by "
                        "flags, the recipe's own for a re-run")
    p.set_defaults(func=_merge)


def _add_analysis(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "report", "interference report of task vectors (spectra, alignment, sign conflicts): an HTML "
             "page and/or the tidy tables",
             "  weightlens report base/ math=ft/math code=ft/code --html report.html\n"
             "  weightlens report base/ ft/math ft/code --csv tables/ --json report.json   # the tables only\n", common)
    p.add_argument("base", help="base checkpoint (file or HF folder)")
    p.add_argument("finetuned", nargs="+", metavar="FT",
                   help="fine-tunes: PATH or NAME=PATH (an existing path is a path even with '=' in it)")
    p.add_argument("--html", metavar="FILE", help="write the standalone HTML page (plotly inlined) here")
    p.add_argument("--csv", metavar="DIR",
                   help="write every table of the report as DIR/<table>.csv: the tidy spectra, alignment, pairs, "
                        "interference, signs and singular_values, cosines (task x task), summary and by_block")
    p.add_argument("--json", metavar="FILE",
                   help="write the same tables to one JSON file: {\"tasks\", \"notes\", \"tables\": {name: [row, "
                        "...]}}, NaN as null")
    p.add_argument("--include", action="append", metavar="GLOB", help="analyse only matching keys (repeat)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave matching keys out (repeat)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--executor", choices=_EXECUTORS, default="local",
                   help="where each key is analysed" + _EXECUTOR_HELP)
    p.set_defaults(func=_report)

    p = _sub(sub, "rebasin", "permute B's hidden units into A's basis (Git Re-Basin weight matching)",
             "  weightlens rebasin a.safetensors b.safetensors --out b-aligned/\n"
             "  weightlens rebasin bert-a/ bert-b/ --spec transformer --out b-aligned/\n", common)
    p.add_argument("a", help="reference checkpoint")
    p.add_argument("b", help="checkpoint to permute")
    p.add_argument("--out", required=True, help="output folder for permuted B")
    p.add_argument("--spec", choices=("mlp", "transformer"), default="mlp",
                   help="mlp: inferred from Linear keys (default); transformer: BERT/Llama/CLIP layouts")
    p.add_argument("--heads", type=int, help="attention heads (transformer; default: config.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order units are matched in (default 0)")
    p.add_argument("--max-iter", type=int, default=100, help="most sweeps over the units (default 100)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder (a weightlens export) atomically")
    p.add_argument("--overwrite-any", action="store_true",
                   help="also replace a non-empty folder that is not a weightlens export")
    p.set_defaults(func=_rebasin)

    p = _sub(sub, "lmc", "loss and accuracy barriers along the line between two models",
             "  weightlens lmc --zoo digits-pairs --width 128 --rebasin --html lmc.html\n\n" + _LMC_HELP + "\n",
             common)
    p.add_argument("a", nargs="?", help="checkpoint A (default: the zoo pair's)")
    p.add_argument("b", nargs="?", help="checkpoint B (default: the zoo pair's)")
    p.add_argument("--zoo", help=f"evaluator from a zoo: {', '.join(_LMC_ZOOS)}")
    p.add_argument("--width", type=int, default=128, help="digits-pairs width (default 128)")
    p.add_argument("--size", choices=("ci", "demo"), help="zoo size (default: demo when built, else ci)")
    p.add_argument("--points", type=int, default=25, help="alphas on the line (default 25)")
    p.add_argument("--rebasin", action="store_true", help="also the curve after weight matching")
    p.add_argument("--html", help="write the figure here")
    p.set_defaults(func=_lmc)


def _add_task_inputs(p: argparse.ArgumentParser) -> None:
    """The inputs :func:`_task_inputs` reads: ``BASE FT...`` or ``--zoo NAME`` (and its ``--size``)."""
    p.add_argument("base", nargs="?", help="base checkpoint (file or HF folder); or use --zoo")
    p.add_argument("finetuned", nargs="*", metavar="FT",
                   help="fine-tunes: PATH or NAME=PATH (the task names evaluate receives)")
    p.add_argument("--zoo", choices=_TASK_ZOOS, help="a task zoo: its base, fine-tunes and scorer")
    p.add_argument("--size", choices=("ci", "demo"), help="zoo size (default: demo when built, else ci)")


def _add_plan(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "plan", "what a merge will read, decompose, hold and take, from the headers alone; refuses "
             "(exit status 1, with the reason) a merge that cannot fit in memory",
             "  weightlens plan base/ a=ft/a b=ft/b --method tsv\n"
             "  weightlens plan --zoo digits-tasks --method ties --keys          # + the per-key table\n"
             "  weightlens plan base/ ft/a ft/b --method iso_c --memory-limit 8GB\n\n"
             "Time comes from rates measured on this machine once (about two seconds, cached under the weightlens\n"
             "home) and recorded estimates for H100 and H200 GPUs. weightlens merge prints the plan first when\n"
             "the run is estimated to take over a minute, and refuses one that cannot fit (docs/plan.md).\n", common)
    p.formatter_class = _MethodsHelp
    _add_task_inputs(p)
    p.add_argument("--method", required=True, help="{methods}")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the method (repeat)")
    p.add_argument("--device", default="auto", help="where the merge would run: auto (CUDA when present), cpu or cuda")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="host memory the run may hold, bytes or e.g. 8GB (default: what this machine has free)")
    p.add_argument("--keys", action="store_true", help="also print the per-key table")
    p.set_defaults(func=_plan, evaluate=None)


def _plan(args: argparse.Namespace) -> int:
    from weightlens.planning import plan

    tv, _ = _task_inputs(args, "plan", need_evaluate=False)
    p = plan(tv, args.method, device=args.device, memory_limit=args.memory_limit, **_params(args.param))
    sys.stdout.write(p.summary() + "\n")
    if args.keys:
        sys.stdout.write(p.keys.to_string(index=False) + "\n")
    return 0 if p.fits else 1


def _plan_first(recipe: Any, device: str | None, quiet: bool) -> None:
    """Refuse a merge that cannot fit; print its plan (stderr) when it is estimated to take over a minute."""
    from weightlens.planning import long_run_plan
    from weightlens.taskvectors import TaskVectors

    from weightlens.errors import WeightlensError

    try:
        tv = TaskVectors(recipe.base, recipe.finetuned, include=recipe.include, exclude=recipe.exclude,
                         key_map=recipe.key_map, vocab=recipe.vocab)
    except (WeightlensError, OSError):
        return  # inputs the run itself reports on (moved, changed): no plan
    params = dict(recipe.params or {})
    p = long_run_plan(tv, recipe.method, device=device or recipe.device or "auto", **params)
    if p is not None and not quiet:
        sys.stderr.write(p.summary() + "\n")


def _add_sweep(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "sweep", "merge at each coefficient alpha and score every task: alpha chosen on validation, "
             "reported on test",
             "  weightlens sweep --zoo digits-tasks --method ties --alphas 0.5,1.0\n"
             "  weightlens sweep --zoo minilm-tasks --method tsv            # the method's own grid\n"
             "  weightlens sweep base/ math=ft/math code=ft/code --evaluate scoring.py:evaluate --method ties \\\n"
             "                   --param density=0.2\n\n"
             "--evaluate names your scorer, evaluate(weights, task, split) -> {'accuracy': ..., 'loss': ...}\n"
             "(weights: a mapping of key -> tensor; task: a fine-tune's name; split: 'val' or 'test'). The\n"
             "command imports that module, which runs its code: name only code you trust.\n"
             "It prints the mean over tasks per alpha and split (SweepResult.summary()) and the chosen alpha.\n",
             common)
    p.formatter_class = _MethodsHelp
    _add_task_inputs(p)
    p.add_argument("--evaluate", metavar="MODULE:FUNCTION",
                   help="your scorer: an importable module (pkg.scoring:evaluate; the current folder is searched) "
                        "or a file (path/to/scoring.py:evaluate); FUNCTION defaults to evaluate. Imports and runs "
                        "that code. With --zoo it replaces the zoo's scorer")
    p.add_argument("--method", required=True, help="{methods}")
    p.add_argument("--alphas", metavar="A,B,...",
                   help="coefficients separated by commas, e.g. 0.5,1.0 (default: the method's validation grid, "
                        "weightlens.merge.alpha_grid)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="another parameter of the method, not alpha (repeat)")
    p.add_argument("--select-on", default="val", metavar="SPLIT", help="split that chooses alpha (default val)")
    p.add_argument("--report-on", default="test", metavar="SPLIT",
                   help="split reported at the chosen alpha (default test)")
    p.add_argument("--device", default="auto", help="where the merges run: auto (CUDA when present), cpu or cuda")
    p.set_defaults(func=_sweep)


def _add_diagnose(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "diagnose", "why a merge loses a task: per task and block what the merge kept, who crowds or "
             "opposes it, whose signs won; with a scorer, restoration tests that measure it",
             "  weightlens diagnose --zoo digits-tasks --method task_arithmetic --param alpha=0.5\n"
             "  weightlens diagnose --zoo minilm-tasks --method ties --evaluate --html why.html   # + restoration\n"
             "  weightlens diagnose base/ math=ft/math code=ft/code --method tsv --csv tables/\n"
             "  weightlens diagnose --zoo digits-tasks --evaluate --whatif all   # + which method to use instead\n"
             "  weightlens diagnose base/ math=ft/math code=ft/code --method tsv --evaluate scoring.py:evaluate\n\n"
             "Without --evaluate it reads the weights alone. With it (the zoo's scorer, or your\n"
             "evaluate(weights, task, split) -> {'accuracy': ...}, which it imports and runs), each task's top\n"
             "blocks and a control block are restored to the task's own weights in the merge and scored.\n", common)
    p.formatter_class = _MethodsHelp
    _add_task_inputs(p)
    p.add_argument("--method", default="task_arithmetic", help="the merge to diagnose: {methods}")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the method, alpha included (repeat)")
    p.add_argument("--evaluate", nargs="?", const="", metavar="MODULE:FUNCTION",
                   help="run restoration tests with this scorer (alone, with --zoo: the zoo's); imports and runs "
                        "that code")
    p.add_argument("--restore", type=int, help="blocks restored per task (default 3)")
    p.add_argument("--restore-by", choices=("own", "weight"), default="own",
                   help="own: a tested block gets the task's own weights (default); weight: the merge is made again "
                        "with the task's vector times --weight in that block")
    p.add_argument("--weight", type=float, default=2.0, help="with --restore-by weight, the factor (default 2)")
    p.add_argument("--split", default="val", help="split the restoration tests (and the what-if) score (default val)")
    p.add_argument("--whatif", metavar="all|M1,M2", help="compare other merge methods (all, or names); with "
                                                           "--evaluate, suggest the one whose worst task keeps most")
    p.add_argument("--html", metavar="FILE", help="write the diagnosis page here")
    p.add_argument("--csv", metavar="DIR", help="write blocks.csv, tasks.csv and checks.csv (and whatif.csv) into DIR")
    p.add_argument("--device", default="auto", help="where the merge runs: auto (CUDA when present), cpu or cuda")
    p.set_defaults(func=_diagnose)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="weightlens",
        description="Weight-space geometry of neural networks: analyse, merge, export.",
        epilog="examples:\n" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common()
    _add_analysis(sub, common)
    _add_sweep(sub, common)
    _add_diagnose(sub, common)
    _add_merge(sub, common)
    _add_plan(sub, common)
    _add_zoo_and_tour(sub)
    return parser


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _add_zoo_and_tour(sub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    zoo_p = sub.add_parser("zoo", help="build or list the offline model zoo",
                           description=_wrap(f"The model zoo: small real models trained here, cached under {_ZOO_HOME}."),
                           formatter_class=raw)
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser(
        "build", help="train and cache the zoo (skips what is built)", formatter_class=raw,
        description=_wrap("Train the model zoo on this machine (seeded, deterministic; data ships inside packages, "
                          "nothing is downloaded) and cache it, one folder per size and zoo: "
                          "<home>/zoo/<size>/<name>. A zoo already built by this weightlens is skipped; one built by "
                          f"an older recipe is rebuilt. <home> is {_ZOO_HOME}. zoo.load() and weightlens zoo list "
                          "look there."),
        epilog="zoos:\n"
               "  digits-pairs   independently trained MLPs on sklearn digits, widths 16/128/512 (+2048 at demo size)\n"
               "  digits-tasks   an MLP pretrained on digits and 4 fine-tunes (task vectors, merging)\n"
               "  minilm-tasks   all-MiniLM-L6-v2 and 4 fine-tunes on WordNet and fortunes (the tour's)\n"
               "  minilm-lora    LoRA adapters (peft) of all-MiniLM-L6-v2 on the same tasks, same heads\n"
               "examples:\n"
               "  weightlens zoo build --size ci                             # all four, for the tests\n"
               "  weightlens zoo build --size demo --names minilm-tasks      # what the tour loads\n"
               "  WEIGHTLENS_HOME=/data/wl weightlens zoo build               # elsewhere\n")
    build.add_argument("--size", choices=("ci", "demo"), default="ci",
                       help="ci: small, a few minutes on 2 cores (what the tests use; default); demo: larger, for "
                            "the tour and notebooks (zoo.load takes demo when it is built)")
    build.add_argument("--names", nargs="*", metavar="NAME",
                       help=f"zoos to build, of {', '.join(_ZOO_NAMES)} (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even when built by the current recipe")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_zoo_build)
    zoo_sub.add_parser("list", help="show each zoo and size: built or not, its folder, accuracies",
                       description=_wrap(f"Each zoo at each size: built or not, its folder and its accuracies. "
                                         f"The zoo lives under {_ZOO_HOME}."),
                       formatter_class=raw).set_defaults(func=_zoo_list)

    tour = sub.add_parser(
        "tour", help="execute the tour notebook into a standalone HTML report", formatter_class=raw,
        description=_wrap("Execute the tour notebook (notebooks/00_tour.ipynb of the checkout weightlens is "
                          "installed from, found from the package, so it works from any folder) in a fresh kernel "
                          "and write it as one standalone HTML page (plotly inlined, no CDN). It loads the "
                          "minilm-tasks zoo: build it first (weightlens zoo build --size demo --names minilm-tasks, "
                          "or --size ci). WEIGHTLENS_TOUR_ZOO=minilm-lora takes the tour through the LoRA zoo "
                          "instead."),
        epilog="examples:\n"
               "  weightlens tour --headless                          # writes reports/tour.html here\n"
               "  weightlens tour --headless --out /tmp/tour.html\n"
               "  ./dev.sh tour                                       # the interactive tour in JupyterLab\n")
    tour.add_argument("--headless", action="store_true",
                      help="execute the notebook and write --out (no browser); without it, says how to open the "
                           "interactive tour")
    tour.add_argument("--notebook", metavar="PATH",
                      help="the notebook to execute (default: the checkout's notebooks/00_tour.ipynb)")
    tour.add_argument("--out", default="reports/tour.html", metavar="FILE",
                      help="HTML file to write, relative to the current folder (default reports/tour.html)")
    tour.set_defaults(func=_tour)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, (WeightlensError, OSError)) else f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 error with a one-line message, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        parser.exit(2, f"{parser.prog} {args.command}: usage error: {err}\n")
    except KeyboardInterrupt:
        sys.stderr.write("weightlens: interrupted\n")
        return 130
    except Exception as err:  # the boundary: one line per error, the traceback only with --debug
        if getattr(args, "debug", False):
            raise
        hint = "" if isinstance(err, (WeightlensError, OSError)) else " (run with --debug for the traceback)"
        sys.stderr.write(f"weightlens: error: {_one_line(err)}{hint}\n")
        return 1
    return 0  # pragma: no cover  (parser.exit raises)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
