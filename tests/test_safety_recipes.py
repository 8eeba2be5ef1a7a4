"""Bad-input corpus for recipes and the command line: nothing hangs, nothing runs, one clear error each.

Every case asserts the error class (or exit code), that the message names the file (and field or
key), and that nothing was written, deleted or executed (a tree snapshot before and after; marker
files that a YAML tag would create if it ever ran). The corpus is built here by small builders:
tiny safetensors checkpoints (a sharded base with an index, single-file fine-tunes), recipes
written by ``export`` and then edited, and hand-written YAML.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import weightlens as wl
from weightlens.cli import main
from weightlens.errors import CheckpointError, InvalidParameterError, ReproducibilityError
from weightlens.io import Recipe, export, load_recipe
from weightlens.merge import merge, merge_recipe, run_recipe

from _safety import assert_unchanged, snapshot, yaml_payloads

RECIPE = "weightlens_recipe.yaml"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- builders
def write_inputs(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A base sharded in two files with an index (``base/``) and two single-file fine-tunes."""
    g = torch.Generator().manual_seed(0)
    base = {"fc1.weight": torch.randn(6, 4, generator=g), "fc2.weight": torch.randn(3, 6, generator=g),
            "fc2.bias": torch.randn(3, generator=g)}
    (folder / "base").mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": ["fc1.weight"],
              "model-00002-of-00002.safetensors": ["fc2.weight", "fc2.bias"]}
    for file, keys in shards.items():
        save_file({k: base[k] for k in keys}, str(folder / "base" / file), metadata={"note": "a"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    fts = {}
    for name in ("a", "b"):
        fts[name] = folder / f"ft_{name}.safetensors"
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(fts[name]),
                  metadata={"note": "a"})
    return folder / "base", fts


def exported(folder: Path, method: str = "tsv", fingerprint: str = "header") -> Path:
    """Inputs under ``folder/in`` merged and exported to ``folder/first``; returns the recipe file."""
    base, fts = write_inputs(folder / "in")
    out = export(merge(base, fts, method=method, device="cpu"), folder / "first", progress=False,
                 fingerprint=fingerprint)
    return out / RECIPE


def edit_recipe(path: Path, **fields: object) -> Path:
    """Rewrite a recipe file with ``fields`` replaced (``None`` removes one)."""
    data = yaml.safe_load(path.read_text())
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def flip_header_byte(path: Path) -> None:
    """Change one byte of a safetensors header (a metadata value): same size, still loadable."""
    raw = path.read_bytes()
    assert raw.count(b'"note":"a"') == 1
    path.write_bytes(raw.replace(b'"note":"a"', b'"note":"b"'))


def flip_data_byte(path: Path) -> None:
    """Change the last byte of a safetensors file (tensor data): same size, same header."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def billion_laughs(base_line: str = "base: *i") -> str:
    """About 900 bytes of nested aliases that expand to 9**9 strings when turned into a value."""
    lines = ["params:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines + [base_line, "finetuned: {t: *i}", "method: ties", ""])


def cli(*args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    """``weightlens ARGS`` in a subprocess (so a hang fails the test instead of stalling it)."""
    return subprocess.run([sys.executable, "-m", "weightlens.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)


def one_error_line(err: str) -> str:
    assert err.startswith("weightlens: error:") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------------- billion laughs
def test_billion_laughs_is_refused_at_once_and_names_the_file(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 1200
    before = snapshot(tmp_path)
    code = ("import sys; from weightlens.io import load_recipe\n"
            "try:\n    load_recipe(sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=240)
    assert done.stdout.startswith("InvalidParameterError") and str(path) in done.stdout
    assert "anchor" in done.stdout and "line 2" in done.stdout
    done = cli("merge", str(path), "--out", str(tmp_path / "out"), "-q")
    assert done.returncode == 1 and str(path) in one_error_line(done.stderr) and "anchors and aliases" in done.stderr
    assert_unchanged(before, tmp_path)


def deep(path: Path) -> None:
    path.write_text("base: " + "[" * 5000 + "]" * 5000 + "\nfinetuned: {t: t}\nmethod: ties\n")


def huge(path: Path) -> None:
    path.write_text("base: b\nfinetuned: {t: t}\nmethod: ties\n" + "#" * (9 * 2**20) + "\n")


def fifo(path: Path) -> None:
    os.mkfifo(path)  # reading it would block until someone writes


@pytest.mark.parametrize("build, what", [(deep, "nested more than"), (huge, "larger than 8 MiB"),
                                         (fifo, "not a regular file")], ids=["deep", "huge", "fifo"])
def test_recipes_that_would_hang_or_blow_up_are_refused_at_once(tmp_path, build, what):
    path = tmp_path / "r.yaml"
    build(path)
    before = snapshot(tmp_path)
    done = cli("merge", str(path), "--out", str(tmp_path / "out"), "-q")
    assert done.returncode == 1 and str(path) in one_error_line(done.stderr) and what in done.stderr
    assert_unchanged(before, tmp_path)


def test_an_alias_alone_is_refused_too(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("base: &b base.safetensors\nfinetuned: {t: *b}\nmethod: ties\n")
    with pytest.raises(InvalidParameterError, match="anchor &b") as err:
        load_recipe(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------- field types
GOOD = {"base": "base.safetensors", "finetuned": {"t": "t.safetensors"}, "method": "ties"}
HEX = "0" * 64
BAD_FIELDS = [
    ("base", 5), ("base", ["a"]), ("base", {"a": 1}),
    ("finetuned", "t.safetensors"), ("finetuned", {"t": 5}), ("finetuned", [1, 2]), ("finetuned", {1: "t"}),
    ("method", 5), ("method", ["ties"]),
    ("params", ["alpha"]), ("params", {"alpha": {"x": 1}}), ("params", {"alpha": [[1]]}), ("params", {1: 2}),
    ("include", 5), ("include", [1]), ("exclude", {"a": 1}),
    ("device", 5), ("device", ["cpu"]),
    ("threads", "2"), ("threads", 1.5), ("threads", True), ("threads", 0),
    ("dtype", 16), ("dtype", "int4"), ("dtype", ["bf16"]),
    ("shard_size", 1.5), ("shard_size", [1]), ("shard_size", True), ("shard_size", "5 parsecs"),
    ("like", 5), ("like", True), ("output", ["a"]),
    ("key_map", "bert."), ("key_map", {"nope": {}}), ("key_map", {"t": {"a": 5}}), ("key_map", {"t": ["a"]}),
    ("vocab", "all"), ("vocab", True), ("head", "nope"), ("head", 1),
    ("expect", "abc"), ("expect", {"model.safetensors": "xyz"}), ("expect", {"../x.safetensors": HEX}),
    ("expect", {"model.safetensors": 5}),
    ("fingerprints", "abc"), ("fingerprints", {"finetuned": {"nope": {}}}),
    ("fingerprints", {"base": {"b.safetensors": {"size": -1, "header": HEX}}}),
    ("fingerprints", {"base": {"b.safetensors": {"size": 1, "header": "xyz"}}}),
    ("fingerprints", {"base": {"b.safetensors": {"size": 1, "header": HEX, "extra": 1}}}),
    ("fingerprints", {"base": {"../../home/u/.ssh/id_rsa": {"size": 1, "header": HEX}}}),
    ("fingerprints", {"base": {"/etc/passwd": {"size": 1, "header": HEX}}}),
    ("weightlens_version", 0.2), ("weightlens_version", ["0.2.0"]),
    ("weightlens_recipe", "1"), ("weightlens_recipe", True),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_every_field_of_the_wrong_type_is_refused_naming_file_and_field(tmp_path, field, value):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD, field: value}))
    before = snapshot(tmp_path)
    with pytest.raises(InvalidParameterError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and field in str(err.value)
    with pytest.raises(InvalidParameterError) as err:  # a Python mapping: the same checks
        Recipe.from_mapping({**GOOD, field: value}, where="recipe=")
    assert field in str(err.value)
    assert_unchanged(before, tmp_path)


def test_python_callers_get_the_same_checks_with_short_messages(tmp_path):
    with pytest.raises(InvalidParameterError, match="'base'") as err:
        Recipe.from_mapping({**GOOD, "base": list(range(10**6))})
    assert len(str(err.value)) < 400
    with pytest.raises(InvalidParameterError, match="'method'"):
        run_recipe(Recipe(base="b", finetuned={"t": "t"}, method=5), tmp_path / "out")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="recipe=: 'threads'"):
        export({"w": torch.ones(1)}, tmp_path / "o", recipe={**GOOD, "threads": "2"}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_field_is_one_line_with_exit_1_from_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "params": {"alpha": {"nested": [1, 2]}}}))
    before = snapshot(tmp_path)
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert str(path) in err and "params.alpha" in err
    assert_unchanged(before, tmp_path)


# ---------------------------------------------------------------------------------------- YAML tags
@pytest.mark.parametrize("where", ["base", "params"])
def test_yaml_tags_in_a_recipe_never_run(tmp_path, capsys, where):
    marker = tmp_path / "marker"
    for i, payload in enumerate(yaml_payloads(marker)):
        path = tmp_path / f"tagged{i}.yaml"
        value = f"base: {payload}" if where == "base" else f"base: b\nparams:\n  alpha: {payload}"
        path.write_text(f"{value}\nfinetuned: {{t: t}}\nmethod: ties\n")
        before = snapshot(tmp_path)
        with pytest.raises(InvalidParameterError, match="tags are not allowed") as err:
            load_recipe(path)
        assert str(path) in str(err.value)
        assert main(["merge", str(path), "--out", str(tmp_path / "out"), "-q"]) == 1
        assert str(path) in one_error_line(capsys.readouterr().err)
        assert_unchanged(before, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("value", [*yaml_payloads("MARKER"), "&a [1, *a]", "[&x 1, *x]"])
def test_a_param_value_with_a_tag_or_alias_is_a_usage_error(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    base, fts = write_inputs(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--base", str(base), "--ft", f"a={fts['a']}", "--method", "task_arithmetic",
              "--param", f"alpha={value}", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--param alpha" in err and "not allowed" in err and err.count("\n") == 1
    assert_unchanged(before, tmp_path)
    assert not (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------------------------------- changed inputs
def test_a_changed_header_byte_in_a_shard_is_refused_before_merging(tmp_path, capsys):
    recipe = exported(tmp_path)
    shard = tmp_path / "in" / "base" / "model-00002-of-00002.safetensors"
    flip_header_byte(shard)
    before = snapshot(tmp_path)
    with pytest.raises(ReproducibilityError) as err:
        run_recipe(recipe, tmp_path / "again", progress=False)
    msg = str(err.value)
    assert str(recipe) in msg and "the base input changed" in msg and str(shard) in msg and "header changed" in msg
    assert main(["merge", str(recipe), "--out", str(tmp_path / "again"), "-q"]) == 1
    assert "--ignore-changed-inputs" in one_error_line(capsys.readouterr().err)
    assert_unchanged(before, tmp_path)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "again"), "--ignore-changed-inputs", "-q"]) == 0
    rerun = load_recipe(tmp_path / "again" / RECIPE)  # records the inputs as they are now
    assert rerun.fingerprints["base"] != load_recipe(recipe).fingerprints["base"]
    assert run_recipe(rerun, tmp_path / "third", progress=False).is_dir()


def test_a_changed_size_names_the_fine_tune_and_both_sizes(tmp_path):
    recipe = exported(tmp_path, method="task_arithmetic")
    ft = tmp_path / "in" / "ft_b.safetensors"
    size = ft.stat().st_size
    ft.write_bytes(ft.read_bytes() + b"\0" * 8)
    before = snapshot(tmp_path)
    with pytest.raises(ReproducibilityError, match=f"fine-tune 'b' input changed.*size changed from {size} to "
                                                   f"{size + 8} bytes") as err:
        run_recipe(recipe, tmp_path / "again", progress=False)
    assert str(ft) in str(err.value)
    with pytest.raises(ReproducibilityError, match="fine-tune 'b' input changed"):
        merge_recipe(recipe)  # the lazy merge alone checks too
    (tmp_path / "in" / "base" / "model-00001-of-00002.safetensors").unlink()
    gone = "the base input changed.*model-00001-of-00002.safetensors is missing"
    with pytest.raises(ReproducibilityError, match=gone):
        run_recipe(recipe, tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()
    assert set(snapshot(tmp_path)) == set(before) - {"in/base/model-00001-of-00002.safetensors"}


def test_only_a_full_fingerprint_catches_a_changed_data_byte(tmp_path):
    header = exported(tmp_path / "h", method="task_arithmetic")
    full = exported(tmp_path / "f", method="task_arithmetic", fingerprint="full")
    assert "sha256" in next(iter(load_recipe(full).fingerprints["finetuned"]["a"].values()))
    assert "sha256" not in next(iter(load_recipe(header).fingerprints["finetuned"]["a"].values()))
    for root in (tmp_path / "h", tmp_path / "f"):
        flip_data_byte(root / "in" / "ft_a.safetensors")
    before = snapshot(tmp_path / "f")
    with pytest.raises(ReproducibilityError, match="fine-tune 'a' input changed.*contents changed") as err:
        run_recipe(full, tmp_path / "f" / "again", progress=False)
    assert str(tmp_path / "f" / "in" / "ft_a.safetensors") in str(err.value)
    assert_unchanged(before, tmp_path / "f")
    # the header fingerprint cannot see it: the re-run goes on, and the output check catches the change
    with pytest.raises(ReproducibilityError, match="differ from the sha256 recorded in 'expect'"):
        run_recipe(header, tmp_path / "h" / "again", progress=False)
    assert run_recipe(header, tmp_path / "h" / "again", progress=False, verify=False).is_dir()


def test_a_recipe_without_fingerprints_still_runs_and_the_rerun_records_them(tmp_path):
    recipe = edit_recipe(exported(tmp_path, method="task_arithmetic"), fingerprints=None)
    assert load_recipe(recipe).fingerprints == {}
    again = run_recipe(recipe, tmp_path / "again", progress=False)
    assert set(load_recipe(again / RECIPE).fingerprints["base"]) == {
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_a_bad_fingerprint_mode_is_refused(tmp_path):
    base, fts = write_inputs(tmp_path / "in")
    with pytest.raises(InvalidParameterError, match="'fingerprint'"):
        export(merge(base, fts, method="task_arithmetic"), tmp_path / "o", fingerprint="sha1", progress=False)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- output check
@pytest.mark.parametrize("method, cause", [("tsv", "SVDs"), ("task_arithmetic", "'dtype', 'shard_size'")])
def test_a_tampered_expect_fails_by_default_and_leaves_no_folder(tmp_path, capsys, method, cause):
    recipe = exported(tmp_path, method=method)
    data = yaml.safe_load(recipe.read_text())
    (name, sha), = data["expect"].items()
    edit_recipe(recipe, expect={name: ("1" if sha[0] == "0" else "0") + sha[1:]})
    before = snapshot(tmp_path)
    with pytest.raises(ReproducibilityError) as err:
        run_recipe(recipe, tmp_path / "again", progress=False)
    msg = str(err.value)
    assert str(recipe) in msg and f"{name} differs" in msg and cause in msg and "verify=False" in msg
    assert ("SVD" in msg) == (method == "tsv")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "again"), "-q"]) == 1
    err_line = one_error_line(capsys.readouterr().err)
    assert str(recipe) in err_line and "--no-verify" in err_line
    assert_unchanged(before, tmp_path)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "again"), "--no-verify", "-q"]) == 0
    assert f"0 of 1 weight file(s) match the recipe's sha256 ({name} differ)" in capsys.readouterr().err
    assert (tmp_path / "again" / name).is_file()


def test_an_untampered_rerun_passes_the_check_and_says_so(tmp_path, capsys):
    recipe = exported(tmp_path)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "again"), "-q"]) == 0
    assert "reproduced bitwise" in capsys.readouterr().err
    assert load_recipe(recipe).check(tmp_path / "again") == []


# ---------------------------------------------------------------------------------------- the command line
def test_paths_with_equals_signs_are_paths_and_names_stay_unambiguous(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base, fts = write_inputs(tmp_path)
    run = tmp_path / "runs" / "lr=1e-4"
    run.mkdir(parents=True)
    (run / "ckpt.safetensors").write_bytes(fts["a"].read_bytes())
    assert main(["merge", "--base", str(base), "--ft", "./runs/lr=1e-4/ckpt.safetensors", "--ft", str(fts["b"]),
                 "--method", "task_arithmetic", "--out", "m1", "--device", "cpu", "-q"]) == 0
    assert list(load_recipe(tmp_path / "m1" / RECIPE).finetuned) == ["ckpt", "ft_b"]
    assert main(["merge", "--base", str(base), "--ft", "x=runs/lr=1e-4/ckpt.safetensors", "--ft", f"y={fts['b']}",
                 "--method", "task_arithmetic", "--out", "m2", "--device", "cpu", "-q"]) == 0
    assert list(load_recipe(tmp_path / "m2" / RECIPE).finetuned) == ["x", "y"]
    capsys.readouterr()
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(base), "./a=b/ft", "--html", "r.html", "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'./a=b/ft' is no existing file or folder" in err and "NAME=./a=b/ft" in err
    assert_unchanged(before, tmp_path)
    (tmp_path / "ft_a.safetensors").rename(tmp_path / "q=ft_a.safetensors")
    (tmp_path / "ft_a.safetensors").write_bytes(fts["b"].read_bytes())
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(base), "q=ft_a.safetensors", "--html", "r.html", "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "ambiguous" in err and "./q=ft_a.safetensors" in err
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("config, what", [("{not json", "not valid JSON"), ("[1, 2]", "not an object"),
                                          ('{"num_attention_heads": "x"}', "'num_attention_heads'")])
def test_a_bad_config_json_for_rebasin_is_one_line_naming_it(tmp_path, capsys, config, what):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.randn(4, 4)}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(config)
    before = snapshot(tmp_path)
    assert main(["rebasin", str(tmp_path / "a"), str(tmp_path / "b"), "--spec", "transformer",
                 "--out", str(tmp_path / "o"), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "a" / "config.json") in err and what in err and "--heads" in err
    assert_unchanged(before, tmp_path)


def test_an_empty_out_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    recipe = exported(tmp_path / "r", method="task_arithmetic")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert main(["merge", str(recipe), "--out", "", "-q"]) == 1
    assert "--out is an empty string" in one_error_line(capsys.readouterr().err)
    a, b = wl.load(recipe.parent).source, str(tmp_path / "r" / "in" / "ft_a.safetensors")
    assert main(["rebasin", a, b, "--out", " ", "-q"]) == 1
    assert "--out" in one_error_line(capsys.readouterr().err)
    with pytest.raises(InvalidParameterError, match="empty"):
        run_recipe(recipe, "", progress=False)
    assert_unchanged(before, tmp_path)


def test_overwrite_any_reaches_export_from_run_recipe_and_the_cli(tmp_path, capsys):
    recipe = exported(tmp_path / "r", method="task_arithmetic")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a weightlens export")
    before = snapshot(tmp_path)
    assert main(["merge", str(recipe), "--out", str(mine), "--overwrite", "-q"]) == 1
    assert "--overwrite-any" in one_error_line(capsys.readouterr().err)
    a, b = str(recipe.parent), str(tmp_path / "r" / "in" / "ft_a.safetensors")
    assert main(["rebasin", a, b, "--out", str(mine), "--overwrite", "-q"]) == 1
    assert "--overwrite-any" in one_error_line(capsys.readouterr().err)
    assert_unchanged(before, tmp_path)
    assert main(["merge", str(recipe), "--out", str(mine), "--overwrite-any", "-q"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / RECIPE).is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert run_recipe(recipe, tmp_path / "other", overwrite_any=True, progress=False) == tmp_path / "other"
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "notes.txt").write_text("x")
    assert main(["rebasin", a, b, "--out", str(tmp_path / "third"), "--overwrite-any", "-q"]) == 0
    assert not (tmp_path / "third" / "notes.txt").exists()


def test_a_missing_recipe_file_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read the recipe") as err:
        load_recipe(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(err.value)
