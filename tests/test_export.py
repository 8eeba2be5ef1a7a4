"""Export: bitwise round trips, HF sharding, atomicity (exception and SIGKILL), recipes, cards, transformers."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightlens as wl
from weightlens import linalg
from weightlens.errors import InvalidParameterError, NonFiniteError, UnsafePathError
from weightlens.io import Recipe, TargetExistsError, export, load_recipe
from weightlens.io.export import parse_size
from weightlens.merge import merge, run_recipe
from weightlens.merge.recipes import mergekit_config

export_mod = importlib.import_module("weightlens.io.export")  # the module (``weightlens.io.export`` is the function)

def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.weight": torch.randn(16, 8, generator=g),
        "layers.0.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "layers.1.weight": torch.randn(4, 16, generator=g).to(torch.float16),
        "layers.10.weight": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "steps": torch.tensor(7),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def write_task_files(folder: Path, n_tasks: int = 2, hf: bool = False) -> tuple[Path, dict[str, Path]]:
    """A base and fine-tunes as safetensors files (HF folders with config.json when ``hf``)."""
    g = torch.Generator().manual_seed(1)
    base = {"fc1.weight": torch.randn(12, 6, generator=g), "fc1.bias": torch.randn(12, generator=g),
            "fc2.weight": torch.randn(5, 12, generator=g), "fc2.bias": torch.randn(5, generator=g),
            "count": torch.tensor([3])}

    def save(sd: dict[str, torch.Tensor], name: str) -> Path:
        if not hf:
            save_file(sd, str(folder / f"{name}.safetensors"))
            return folder / f"{name}.safetensors"
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(folder / name / "model.safetensors"), metadata={"format": "pt"})
        (folder / name / "config.json").write_text(json.dumps({"model_type": "mlp", "torch_dtype": "float32"}))
        return folder / name

    base_path = save(base, "base")
    fts = {}
    for i in range(n_tasks):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        fts[f"task{i}"] = save(ft, f"task{i}")
    return base_path, fts


def hidden_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".weightlens-" in p.name]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ round trips
def test_single_file_round_trip_is_bitwise(tmp_path):
    sd = mixed_state()
    out = export(sd, tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    back, raw = wl.load(out), load_file(out / "model.safetensors")
    assert set(back) == set(sd) and set(raw) == set(sd)
    for key, t in sd.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
        assert raw[key].dtype == t.dtype and torch.equal(raw[key], t), key
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["weightlens_version"] == wl.__version__


def test_sharding_follows_hf_layout_and_records_sha256(tmp_path):
    sd = {f"layers.{i}.weight": torch.full((10, 10), float(i)) for i in range(7)}  # 400 bytes each
    out = export(sd, tmp_path / "out", shard_size=1000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = sorted({*index["weight_map"].values()})
    assert names == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert index["metadata"]["total_size"] == 7 * 400
    for name in names:
        assert index["metadata"]["sha256"][name] == sha256(out / name)
        part = load_file(out / name)
        assert sum(t.numel() * 4 for t in part.values()) <= 1000
        assert all(index["weight_map"][k] == name for k in part)
    back = wl.load(out)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_a_tensor_larger_than_the_shard_size_gets_its_own_shard(tmp_path):
    sd = {"a": torch.ones(2), "big": torch.ones(100), "c": torch.ones(2)}
    out = export(sd, tmp_path / "out", shard_size="64", progress=False)
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({wm["a"], wm["big"], wm["c"]}) == 3


@pytest.mark.parametrize("size, expected", [(123, 123), ("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                            ("2GiB", 2 * 2**30), ("1.5KB", 1500), ("1000", 1000)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def test_bad_shard_size_and_dtype_are_refused(tmp_path):
    with pytest.raises(InvalidParameterError, match="shard_size"):
        export({"w": torch.ones(1)}, tmp_path / "o", shard_size="five", progress=False)
    with pytest.raises(InvalidParameterError, match="dtype"):
        export({"w": torch.ones(1)}, tmp_path / "o", dtype="int8", progress=False)
    assert not (tmp_path / "o").exists()


class LazyMapping(Mapping):
    """A mapping that computes tensors on access and cannot tell shapes ahead (buffered path)."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __getitem__(self, key: str) -> torch.Tensor:
        self.reads += 1
        return torch.full((5,), float(key.split(".")[1]))

    def __iter__(self) -> Iterator[str]:
        return (f"k.{i}" for i in range(self.n))

    def __len__(self) -> int:
        return self.n


def test_mappings_without_headers_are_buffered_one_shard_at_a_time(tmp_path):
    lazy = LazyMapping(6)
    out = export(lazy, tmp_path / "out", shard_size=40, progress=False)  # two 20-byte tensors per shard
    assert lazy.reads == 6
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    back = wl.load(out)
    assert all(torch.equal(back[f"k.{i}"], torch.full((5,), float(i))) for i in range(6))


def test_dtype_casts_floats_only_and_updates_config(tmp_path):
    base, fts = write_task_files(tmp_path, hf=True)
    m = merge(base, fts, method="task_arithmetic", lazy=True)
    out = export(m, tmp_path / "out", dtype="bf16", progress=False)
    back = wl.load(out)
    assert back.dtype("fc1.weight") == torch.bfloat16 and back.dtype("count") == torch.int64
    assert torch.equal(back["fc1.weight"], m["fc1.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_recipe(out / "weightlens_recipe.yaml").dtype == "bfloat16"


def test_lazy_merge_export_matches_the_eager_merge_and_stays_lazy(tmp_path):
    base, fts = write_task_files(tmp_path)
    lazy = merge(base, fts, method="ties", density=0.5, lazy=True)
    eager = merge(base, fts, method="ties", density=0.5)
    out = export(lazy, tmp_path / "out", progress=False)
    assert lazy.lazy
    back = wl.load(out)
    assert all(torch.equal(back[k], eager[k]) for k in eager)


# ------------------------------------------------------------------------------------ checks
def test_nan_names_the_key_and_writes_nothing(tmp_path):
    sd = {"a": torch.ones(3), "b.weight": torch.tensor([1.0, float("nan"), 2.0]), "c": torch.ones(2)}
    with pytest.raises(NonFiniteError, match=r"'b.weight' has 1 NaN/Inf value\(s\) of 3.*nothing was written"):
        export(sd, tmp_path / "out", shard_size=8, progress=False)
    assert not (tmp_path / "out").exists() and hidden_leftovers(tmp_path) == []


def test_overflow_in_the_cast_is_reported_as_such(tmp_path):
    with pytest.raises(NonFiniteError, match="after the cast from torch.float32 to torch.float16"):
        export({"w": torch.tensor([1e6])}, tmp_path / "out", dtype=torch.float16, progress=False)
    assert not (tmp_path / "out").exists()


def test_overwrite_rules(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    export({"w": torch.ones(2)}, target, progress=False)  # an empty folder is fine
    with pytest.raises(TargetExistsError, match="exists and is not empty; pass overwrite=True") as err:
        export({"w": torch.zeros(2)}, target, progress=False)
    assert isinstance(err.value, FileExistsError)
    assert torch.equal(wl.load(target)["w"], torch.ones(2))
    (target / "stale.txt").write_text("old")
    export({"w": torch.zeros(2)}, target, overwrite=True, progress=False)
    assert torch.equal(wl.load(target)["w"], torch.zeros(2)) and not (target / "stale.txt").exists()
    assert hidden_leftovers(tmp_path) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TargetExistsError):
        export({"w": torch.ones(1)}, a_file, progress=False)
    with pytest.raises(UnsafePathError, match="is a file; overwrite=True replaces only an earlier weightlens"):
        export({"w": torch.ones(1)}, a_file, overwrite=True, progress=False)  # not an export: kept
    assert a_file.read_text() == "x"
    export({"w": torch.ones(1)}, a_file, overwrite_any=True, progress=False)
    assert a_file.is_dir()


def test_exporting_into_an_input_folder_is_refused(tmp_path):
    base, fts = write_task_files(tmp_path, hf=True)
    m = merge(base, fts, method="task_arithmetic", lazy=True)
    with pytest.raises(UnsafePathError, match="holds an input of this merge"):
        export(m, base, overwrite=True, progress=False)
    assert (base / "model.safetensors").is_file()


def test_an_exception_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real, calls = export_mod._Shard.write, []

    def failing(self, tensor):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(self, tensor)

    monkeypatch.setattr(export_mod._Shard, "write", failing)
    sd = {f"k{i}": torch.ones(4) for i in range(5)}
    with pytest.raises(RuntimeError, match="disk on fire"):
        export(sd, tmp_path / "out", shard_size=16, progress=False)
    assert not (tmp_path / "out").exists() and hidden_leftovers(tmp_path) == []
    export({"w": torch.ones(1)}, tmp_path / "kept", progress=False)
    calls.clear()
    with pytest.raises(RuntimeError, match="disk on fire"):
        export(sd, tmp_path / "kept", overwrite=True, progress=False)
    assert torch.equal(wl.load(tmp_path / "kept")["w"], torch.ones(1)) and hidden_leftovers(tmp_path) == []


_KILLER = textwrap.dedent("""
    import importlib, os, signal, sys, torch
    mod = importlib.import_module("weightlens.io.export")
    real_close = mod._Shard.close
    def close_then_die(self):
        real_close(self)
        os.kill(os.getpid(), signal.SIGKILL)   # dies after the first shard is on disk
    mod._Shard.close = close_then_die
    sd = {f"k{i}": torch.ones(1000) for i in range(6)}
    mod.export(sd, sys.argv[1], shard_size=8000, progress=False, overwrite=len(sys.argv) > 2)
""")


@pytest.mark.parametrize("existing", [False, True])
def test_a_killed_export_leaves_no_target_and_the_next_export_cleans_up(tmp_path, existing):
    target = tmp_path / "out"
    if existing:
        export({"old": torch.ones(1)}, target, progress=False)
    args = [sys.executable, "-c", _KILLER, str(target)] + (["--overwrite"] if existing else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    if existing:
        assert list(wl.load(target)) == ["old"]  # untouched
    else:
        assert not target.exists()
    leftovers = hidden_leftovers(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.weightlens-tmp-")
    export({"w": torch.ones(1)}, target, overwrite=True, progress=False)
    assert hidden_leftovers(tmp_path) == [] and list(wl.load(target)) == ["w"]


# ------------------------------------------------------------------------------------ like, card
def test_like_copies_the_hf_files_at_the_top_level_and_no_weights(tmp_path):
    like = tmp_path / "hf"
    (like / "1_Pooling").mkdir(parents=True)
    (like / "onnx").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja", "special_tokens_map.json", "1_Pooling/config.json", "README.md",
                 "onnx/config.json"):
        (like / name).write_text("{}")
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", "onnx/model.onnx", ".hidden"):
        (like / name).write_text("weights")
    out = export({"w": torch.ones(2)}, tmp_path / "out", like=like, progress=False)
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == sorted(["README.md", "chat_template.jinja", "config.json",  # not 1_Pooling/ (a subfolder)
                             "generation_config.json", "model.safetensors", "special_tokens_map.json",
                             "tokenizer.json", "tokenizer_config.json"])
    assert "weightlens" in (out / "README.md").read_text()  # our card, not the like folder's README
    assert (out / "model.safetensors").read_bytes() != b"weights"


def test_card_has_method_sources_metrics_interference_and_figure(tmp_path):
    base, fts = write_task_files(tmp_path)
    m = merge(base, fts, method="ties", density=0.3)
    summary = {"conflict rate": {"plain": 0.31, "weighted": 0.29, "chance": 0.5}}
    metrics = {"task0": {"accuracy": 0.9, "finetuned": 0.95}, "task1": {"accuracy": 0.8, "finetuned": 0.9}}
    out = export(m, tmp_path / "out", progress=False,
                 card={"title": "my merge", "metrics": metrics, "report": summary})
    card = (out / "README.md").read_text()
    for text in ("# my merge", "TIES-Merging", "| density | 0.3 |", "../base.safetensors", "../task1.safetensors",
                 "## Evaluation", "| task0 | 0.9 | 0.95 |", "## Interference", "| conflict rate | 0.31 | 0.29 | 0.5 |",
                 "update_norms.svg", "weightlens merge weightlens_recipe.yaml", "mergekit-yaml",
                 sha256(out / "model.safetensors")):
        assert text in card, text
    svg = ET.parse(out / "update_norms.svg").getroot()
    assert svg.tag.endswith("svg") and len([e for e in svg.iter() if e.tag.endswith("rect")]) == 2  # fc1, fc2
    with pytest.raises(InvalidParameterError, match="'card' parameter"):
        export(m, tmp_path / "o2", card={"metrix": {}}, progress=False)


def _front_matter(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])


def test_the_front_matter_names_the_merged_models_and_a_rebasin_output_is_no_merge(tmp_path):
    base, fts = write_task_files(tmp_path, hf=True)
    merged = export(merge(base, fts, method="ties"), tmp_path / "merged", progress=False)
    assert _front_matter(merged) == {"base_model": ["../base", "../task0", "../task1"],
                                     "base_model_relation": "merge", "library_name": "transformers",
                                     "tags": ["weightlens", "merge", "ties"]}
    from weightlens.cli import main

    g = torch.Generator().manual_seed(2)
    for name in ("a", "b"):  # two MLPs in HF folders (a config.json): the Re-Basin output copies b's
        (tmp_path / name).mkdir()
        save_file({"fc1.weight": torch.randn(8, 4, generator=g), "fc1.bias": torch.randn(8, generator=g),
                   "fc2.weight": torch.randn(3, 8, generator=g)}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "mlp"}))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["rebasin", str(a), str(b), "--spec", "mlp", "--out", str(tmp_path / "aligned"), "-q"]) == 0
    assert _front_matter(tmp_path / "aligned") == {"library_name": "transformers", "tags": ["weightlens"]}
    plain = export({"w": torch.ones(2)}, tmp_path / "plain", progress=False)
    assert _front_matter(plain) == {"tags": ["weightlens"]}  # no config.json: no library named


def test_in_memory_inputs_give_no_recipe_and_the_card_says_why(tmp_path):
    base = {"w": torch.zeros(2, 2)}
    m = merge(base, {"a": {"w": torch.ones(2, 2)}}, method="task_arithmetic")
    out = export(m, tmp_path / "out", progress=False)
    assert not (out / "weightlens_recipe.yaml").exists()
    assert "the base was given in memory" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("method, params", [("ties", {"density": 0.4}), ("dare", {"density": 0.5, "seed": 3}),
                                            ("tsv", {"alpha": 0.7}), ("task_arithmetic", {"alpha": 0.3})])
def test_recipe_rerun_reproduces_identical_tensors(tmp_path, method, params):
    base, fts = write_task_files(tmp_path, n_tasks=3)
    m = merge(base, fts, method=method, **params)
    first = export(m, tmp_path / "first", shard_size=300, progress=False)
    recipe = load_recipe(first / "weightlens_recipe.yaml")
    assert recipe.params == m.params and list(recipe.finetuned) == ["task0", "task1", "task2"]
    again = run_recipe(recipe, tmp_path / "again", progress=False)
    assert recipe.check(again) == []
    a, b = wl.load(first), wl.load(again)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], m[k]) for k in m)


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path):
    base, fts = write_task_files(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "base": "base.safetensors", "finetuned": {"t0": "task0.safetensors", "t1": "task1.safetensors"},
        "method": "task_arithmetic", "params": {"alpha": 0.5}, "output": "merged"}))
    out = run_recipe(tmp_path / "r.yaml", progress=False)  # a path works as well as a Recipe
    assert out == tmp_path / "merged"
    want = merge(base, {"t0": fts["task0"], "t1": fts["task1"]}, method="task_arithmetic", alpha=0.5)
    assert torch.equal(wl.load(out)["fc1.weight"], want["fc1.weight"])


def write_wide_task_files(folder: Path) -> tuple[Path, dict[str, Path]]:
    """Two fine-tunes of one 384 x 384 layer: large enough for LAPACK to use several threads."""
    g = torch.Generator().manual_seed(5)
    base = {"proj.weight": torch.randn(384, 384, generator=g)}
    save_file(base, str(folder / "base.safetensors"))
    fts = {}
    for i in range(2):
        save_file({"proj.weight": base["proj.weight"] + 0.01 * torch.randn(384, 384, generator=g)},
                  str(folder / f"t{i}.safetensors"))
        fts[f"t{i}"] = folder / f"t{i}.safetensors"
    return folder / "base.safetensors", fts


def test_a_recipe_records_its_thread_count_and_reruns_bitwise_on_another(tmp_path):
    if linalg.available_cores() < 2:
        pytest.skip("needs two cores")
    base, fts = write_wide_task_files(tmp_path)
    with linalg.torch_threads(2):
        first = export(merge(base, fts, method="tsv", device="cpu"), tmp_path / "first", progress=False)
    with linalg.torch_threads(1):
        one_thread = merge(base, fts, method="tsv", device="cpu")["proj.weight"]
    if torch.equal(one_thread, wl.load(first)["proj.weight"]):
        pytest.skip("this LAPACK gives the same bits on 1 and 2 threads: nothing to reproduce")
    recipe = load_recipe(first / "weightlens_recipe.yaml")
    assert recipe.threads == 2
    with linalg.torch_threads(1):  # a re-run from a session with another thread count
        again = run_recipe(recipe, tmp_path / "again", progress=False)
        assert torch.get_num_threads() == 1  # restored
    assert recipe.check(again) == []
    assert load_recipe(again / "weightlens_recipe.yaml").threads == 2


def test_a_recipe_from_a_bigger_machine_runs_on_this_ones_threads_and_says_so(tmp_path):
    base, fts = write_task_files(tmp_path)
    first = export(merge(base, fts, method="tsv", device="cpu"), tmp_path / "first", progress=False)
    cores = linalg.available_cores()
    recipe = replace(load_recipe(first / "weightlens_recipe.yaml"), threads=cores + 1)
    with pytest.warns(RuntimeWarning, match=f"ran on {cores + 1} CPU threads and this machine has {cores} cores"):
        again = run_recipe(recipe, tmp_path / "again", progress=False)
    assert load_recipe(again / "weightlens_recipe.yaml").threads == torch.get_num_threads()


@pytest.mark.parametrize("data, match", [
    ({"base": "b", "finetuned": {"a": "a"}, "method": "ties", "alpah": 1}, r"unknown field\(s\) 'alpah'"),
    ({"base": "b", "method": "ties"}, r"missing field\(s\) 'finetuned'"),
    ({"base": "b", "finetuned": {"a": "a"}, "method": "ties", "dtype": "int4"}, "'dtype' parameter"),
    ({"base": "b", "finetuned": {"a": "a"}, "method": "ties", "weightlens_recipe": 9}, "not supported"),
    ({"base": "b", "finetuned": {"a": "a"}, "method": "ties", "threads": 0}, "'threads' must be a positive"),
])
def test_recipe_validation_names_the_file_and_field(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InvalidParameterError, match=match) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_mergekit_configs_match_the_methods():
    r = Recipe(base="/m/base", finetuned={"a": "/m/a", "b": "/m/b"}, method="task_arithmetic", params={"alpha": 0.3})
    cfg = yaml.safe_load(mergekit_config(r)[0])
    assert cfg["merge_method"] == "task_arithmetic" and cfg["base_model"] == "/m/base"
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [0.3, 0.3] and cfg["parameters"]["normalize"] is False
    ties = Recipe(base="/m/base", finetuned={"a": "/m/a"}, method="ties",
                  params={"density": 0.2, "scope": "tensor", "merge_func": "mean", "alpha": 0.8})
    text, note = mergekit_config(ties)
    cfg = yaml.safe_load(text)
    assert cfg["parameters"] == {"lambda": 0.8, "normalize": True} and cfg["models"][0]["parameters"]["density"] == 0.2
    assert "approximate" not in note
    assert "approximate" in mergekit_config(Recipe("/b", {"a": "/a"}, "ties", {"scope": "global"}))[1]
    assert mergekit_config(Recipe("/b", {"a": "/a"}, "ties", {"merge_func": "max"})) is None
    dare = yaml.safe_load(mergekit_config(Recipe("/b", {"a": "/a"}, "dare", {"combine": "ties", "alpha": 1.0}))[0])
    assert dare["merge_method"] == "dare_ties" and dare["parameters"]["normalize"] is True
    assert yaml.safe_load(mergekit_config(Recipe("/b", {"a": "/a"}, "dare", {}))[0])["merge_method"] == "dare_linear"
    assert mergekit_config(Recipe("/b", {"a": "/a"}, "tsv", {})) is None


def test_mergekit_config_is_written_beside_the_recipe_only_for_its_methods(tmp_path):
    base, fts = write_task_files(tmp_path, hf=True)
    ta = export(merge(base, fts, method="task_arithmetic"), tmp_path / "ta", progress=False)
    text = (ta / "mergekit_config.yml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["base_model"] == "../base" and cfg["dtype"] == "float32"  # mergekit reads it from its cwd:
    assert "Run from this folder" in text.splitlines()[0]                  # the export folder, as it says
    tsv = export(merge(base, fts, method="tsv"), tmp_path / "tsv", progress=False)
    assert (tsv / "weightlens_recipe.yaml").is_file() and not (tsv / "mergekit_config.yml").exists()


# ------------------------------------------------------------------------------------ transformers
@pytest.mark.slow
def test_minilm_merge_loads_in_transformers_with_the_same_outputs(minilm_zoo, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    tasks = minilm_zoo.tasks[:2]
    m = merge(minilm_zoo.base, {t: minilm_zoo.finetuned[t] for t in tasks}, method="task_arithmetic", alpha=0.5,
              lazy=True)
    out = export(m, tmp_path / "merged", like=minilm_zoo.base, shard_size="30MB", progress=False)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    model = transformers.AutoModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.AutoModel.from_pretrained(minilm_zoo.base).eval()
    result = reference.load_state_dict({k: m[k] for k in m}, strict=False)
    assert result.missing_keys == []
    batch = tok(["a dog is a domestic animal", "the committee voted against it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = model(**batch).last_hidden_state, reference(**batch).last_hidden_state
    assert torch.equal(got, want)
    from weightlens.zoo.minilm import load_encoder

    ours = load_encoder({k: m[k] for k in m})  # weightlens' own BERT forward, an independent check
    with torch.no_grad():
        hidden = ours(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert torch.allclose(hidden[real], got[real], atol=1e-4)


def test_overwrite_without_an_atomic_swap_falls_back_to_two_renames(tmp_path, monkeypatch):
    atomic = importlib.import_module("weightlens.io._atomic")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    export({"w": torch.ones(1)}, tmp_path / "out", progress=False)
    export({"w": torch.zeros(1)}, tmp_path / "out", overwrite=True, progress=False)
    assert torch.equal(wl.load(tmp_path / "out")["w"], torch.zeros(1)) and hidden_leftovers(tmp_path) == []


def test_recipe_lists_of_fine_tunes_get_distinct_names(tmp_path):
    base, fts = write_task_files(tmp_path, hf=True)
    data = {"base": str(base), "finetuned": [str(fts["task0"]), str(fts["task1"])], "method": "task_arithmetic"}
    assert list(Recipe.from_mapping(data).finetuned) == ["task0", "task1"]
    (tmp_path / "x" / "m").mkdir(parents=True)
    (tmp_path / "y" / "m").mkdir(parents=True)
    data["finetuned"] = [str(tmp_path / "x" / "m"), str(tmp_path / "y" / "m")]
    assert list(Recipe.from_mapping(data).finetuned) == ["m", "m_2"]
