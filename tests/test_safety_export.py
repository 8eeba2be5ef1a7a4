"""Bad-input corpus for export: it never loses or leaks the user's data.

Every case asserts the error class, that the message names the path, and that nothing was
written, deleted or copied (a tree snapshot of the folders involved, the current folder included
where a test moves into one, before and after). The corpus is built here by small builders: tiny
HF model folders, a user's folder that is not an export, a hostile ``like`` folder (credentials,
nested folders, links leading out of it, a FIFO), and untrusted names for the model card.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import weightlens as wl
from weightlens.analysis import analyze
from weightlens.errors import CheckpointError, InvalidParameterError, TargetExistsError, UnsafePathError
from weightlens.io import export
from weightlens.io._like import LIKE_FILES
from weightlens.merge import merge, run_recipe

from _safety import assert_unchanged, snapshot

export_mod = importlib.import_module("weightlens.io.export")
paths_mod = importlib.import_module("weightlens.io._paths")
atomic_mod = importlib.import_module("weightlens.io._atomic")
card_mod = importlib.import_module("weightlens.io._card")
like_mod = importlib.import_module("weightlens.io._like")

SECRET = "hunter2-do-not-upload"
OPTIONS = [{}, {"overwrite": True}, {"overwrite_any": True}, {"overwrite": True, "overwrite_any": True}]


# ---------------------------------------------------------------------------------------- builders
def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(6, 4, generator=g), "fc1.bias": torch.randn(6, generator=g)}


def hf_folder(folder: Path, seed: int = 0, config: dict | None = None) -> Path:
    """An HF model folder: ``model.safetensors`` (not stamped by weightlens), config and tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights(seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "mlp"}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def hf_inputs(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A base and two fine-tunes, each an HF folder, under ``folder``."""
    return hf_folder(folder / "base"), {n: hf_folder(folder / f"ft_{n}", seed=i + 1) for i, n in enumerate("ab")}


def user_folder(folder: Path) -> Path:
    """A folder of the user's that is not an export: notes, a subfolder, unstamped weights, a recipe file."""
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "src" / "train.py").write_text("print('hi')")
    save_file(weights(), str(folder / "model.safetensors"))
    (folder / "weightlens_recipe.yaml").write_text("method: ties\n")  # a recipe alone is no export
    return folder


def hostile_like(folder: Path, outside: Path) -> Path:
    """An HF folder that also holds credentials, nested folders, links out of it and a FIFO."""
    hf_folder(folder)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.json").write_text(json.dumps({"token": SECRET}))
    for name in (".env", "credentials.json", "id_rsa", ".git-credentials", "wandb_api_key.txt"):
        (folder / name).write_text(SECRET)
    (folder / "private").mkdir()
    (folder / "private" / "config.json").write_text(json.dumps({"token": SECRET}))
    (folder / "private" / "LICENSE").write_text(SECRET)
    (folder / "generation_config.json").write_text("{}")
    (folder / "LICENSE.txt").write_text("Apache-2.0")
    (folder / "real_vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "vocab.txt").symlink_to("real_vocab.txt")  # stays inside: copied
    (folder / "tokenizer_config.json").symlink_to(outside / "secret.json")  # leads out: skipped
    (folder / "special_tokens_map.json").symlink_to("../" + outside.name + "/secret.json")  # so does this
    (folder / "NOTICE").symlink_to(folder / "private")  # a folder, not a file: skipped
    os.mkfifo(folder / "merges.txt")  # a copy that read it would hang
    return folder


def export_here(folder: Path, **kwargs) -> Path:
    """An earlier export (sharded, with an index, no recipe) at ``folder``."""
    big = {f"k{i}": torch.full((100,), float(i)) for i in range(4)}
    return export(big, folder, shard_size=800, recipe=False, progress=False, **kwargs)


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".weightlens-" in p.name)


# ---------------------------------------------------------------------------------------- paths refused always
@pytest.mark.parametrize("options", OPTIONS)
def test_an_empty_path_is_refused_whatever_overwrite_says(tmp_path, monkeypatch, options):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for blank in ("", " ", "\t"):
        with pytest.raises(UnsafePathError, match=r"Refusing to export to .* \(an empty path\).*current folder") as err:
            export(weights(), blank, progress=False, **options)
        assert repr(blank) in str(err.value)
    with pytest.raises(UnsafePathError, match="''"):  # the last line of defence refuses it too
        with atomic_mod.atomic_folder("", overwrite=True):
            pass
    assert_unchanged(before, tmp_path)


def test_an_empty_out_in_run_recipe_is_refused(tmp_path, monkeypatch):
    base, fts = hf_inputs(tmp_path / "in")
    recipe = export(merge(base, fts, method="task_arithmetic", device="cpu"), tmp_path / "first",
                    progress=False) / "weightlens_recipe.yaml"
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="empty"):  # UnsafePathError from export, or run_recipe's own check
        run_recipe(recipe, "", overwrite=True, progress=False)
    assert_unchanged(before, tmp_path)


def test_the_current_folder_and_every_folder_above_it_are_refused(tmp_path, monkeypatch):
    cwd = user_folder(tmp_path / "a" / "b" / "c")
    (tmp_path / "link").symlink_to(cwd)
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    for target in (".", str(cwd), "./", "../c", "..", "../..", str(tmp_path / "a" / "b" / ".." / "b"),
                   str(tmp_path / "link"), str(tmp_path / "link" / ".."), "/"):
        with pytest.raises(UnsafePathError, match="current folder") as err:
            export(weights(), target, overwrite_any=True, progress=False)
        assert repr(target) in str(err.value) and str(cwd) in str(err.value)
    with pytest.raises(UnsafePathError, match="current folder"):
        with atomic_mod.atomic_folder(cwd, overwrite=True):
            pass
    assert_unchanged(before, tmp_path)


def test_the_home_folder_and_the_folders_above_it_are_refused(tmp_path, monkeypatch):
    home = user_folder(tmp_path / "users" / "me")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    for target in ("~", "~/", str(home), str(tmp_path / "users"), "~/..", str(tmp_path)):
        with pytest.raises(UnsafePathError, match="home folder") as err:
            export(weights(), target, overwrite_any=True, progress=False)
        assert repr(target) in str(err.value) and str(home) in str(err.value)
    assert_unchanged(before, tmp_path)
    out = export(weights(), "~/merged", progress=False)  # a new folder inside home is fine
    assert out == home / "merged" and (out / "model.safetensors").is_file()


def test_a_filesystem_root_is_refused(tmp_path, monkeypatch):
    """Only the root rule is left to answer (no current or home folder), and nothing may be written."""
    def never(*args, **kwargs):
        raise AssertionError("export went on to write")

    monkeypatch.setattr(paths_mod, "_protected", lambda: [])
    monkeypatch.setattr(export_mod, "atomic_folder", never)
    monkeypatch.setattr(export_mod, "_WeightWriter", never)
    for target in ("/", "//", "/.", "/tmp/.."):
        with pytest.raises(UnsafePathError, match="is a filesystem root") as err:
            export(weights(), target, overwrite_any=True, progress=False)
        assert repr(target) in str(err.value)


def test_a_folder_that_holds_an_input_is_refused(tmp_path):
    base, fts = hf_inputs(tmp_path / "in")
    like = hf_folder(tmp_path / "like")
    (tmp_path / "to_base").symlink_to(base)
    m = merge(base, fts, method="task_arithmetic", lazy=True)
    before = snapshot(tmp_path)
    cases = [(base, "base"), (tmp_path / "in", "base"), (fts["b"], "fine-tune 'b'"),
             (tmp_path / "to_base", "base"), (tmp_path / "in" / "ft_a" / ".." / "base", "base"),
             (like, "like folder")]
    for target, role in cases:
        with pytest.raises(UnsafePathError, match="holds an input of this merge") as err:
            export(m, target, like=like, overwrite_any=True, progress=False)
        assert str(target) in str(err.value) and role in str(err.value)
    assert_unchanged(before, tmp_path)
    one = wl.load(base / "model.safetensors")
    with pytest.raises(UnsafePathError, match="holds an input"):  # a checkpoint exported onto itself
        export(one, base, overwrite_any=True, progress=False)
    assert_unchanged(before, tmp_path)


# ---------------------------------------------------------------------------------------- what overwrite replaces
def test_overwrite_replaces_an_earlier_export_but_not_a_foreign_folder(tmp_path):
    foreign = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    with pytest.raises(TargetExistsError, match="overwrite_any=True") as err:
        export(weights(), foreign, progress=False)
    assert str(foreign) in str(err.value)
    with pytest.raises(UnsafePathError, match="not an earlier export.*--overwrite-any") as err:
        export(weights(), foreign, overwrite=True, progress=False)
    assert str(foreign) in str(err.value)
    assert_unchanged(before, tmp_path)

    earlier = export_here(tmp_path / "earlier")  # sharded, recipe=False: the stamps are in the headers
    assert (earlier / "model.safetensors.index.json").is_file()
    export(weights(), earlier, overwrite=True, progress=False)
    assert sorted(wl.load(earlier)) == sorted(weights()) and hidden_leftovers(tmp_path) == []

    export(weights(), foreign, overwrite_any=True, progress=False)
    assert not (foreign / "notes.txt").exists() and sorted(wl.load(foreign)) == sorted(weights())
    assert hidden_leftovers(tmp_path) == []


def test_a_folder_mixing_stamped_and_foreign_weights_is_not_an_export(tmp_path):
    mixed = export_here(tmp_path / "mixed")
    save_file(weights(), str(mixed / "extra.safetensors"))  # no weightlens stamp
    stale_index = export_here(tmp_path / "index")
    (stale_index / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    before = snapshot(tmp_path)
    for folder in (mixed, stale_index):
        with pytest.raises(UnsafePathError, match="overwrite_any") as err:
            export(weights(), folder, overwrite=True, progress=False)
        assert str(folder) in str(err.value)
    assert_unchanged(before, tmp_path)


def test_a_file_or_a_link_as_target_needs_overwrite_any(tmp_path):
    a_file = tmp_path / "model.bin"
    a_file.write_text(SECRET)
    pointed = export_here(tmp_path / "pointed")
    link = tmp_path / "link"
    link.symlink_to(pointed)
    before = snapshot(tmp_path)
    for target, what in ((a_file, "is a file"), (link, "is a symbolic link")):
        with pytest.raises(UnsafePathError, match=what) as err:
            export(weights(), target, overwrite=True, progress=False)
        assert str(target) in str(err.value)
    assert_unchanged(before, tmp_path)
    export(weights(), a_file, overwrite_any=True, progress=False)
    assert a_file.is_dir() and hidden_leftovers(tmp_path) == []


def test_an_empty_folder_is_used_without_any_option(tmp_path):
    (tmp_path / "empty").mkdir()
    export(weights(), tmp_path / "empty", progress=False)
    assert sorted(wl.load(tmp_path / "empty")) == sorted(weights())


# ---------------------------------------------------------------------------------------- like=
def test_like_copies_only_the_allowlisted_files_at_its_top_level(tmp_path):
    like = hostile_like(tmp_path / "hf", tmp_path / "outside")
    before = {name: snapshot(tmp_path / name) for name in ("hf", "outside")}
    out = export(weights(), tmp_path / "out", like=like, progress=False)
    for name, tree in before.items():
        assert_unchanged(tree, tmp_path / name)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["LICENSE.txt", "README.md", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "vocab.txt"]
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert all(SECRET not in p.read_text(errors="replace") for p in out.iterdir())
    card = (out / "README.md").read_text()
    assert "config.json, generation_config.json, LICENSE.txt, tokenizer.json, vocab.txt." in card
    assert "Not copied" in card and "merges.txt, NOTICE, special_tokens_map.json, tokenizer_config.json." in card
    assert "credentials" not in card and "id_rsa" not in card  # skipped private names are not published


def test_like_follows_links_of_a_hugging_face_cache_snapshot(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "blobs" / "c0ffee").write_text(json.dumps({"model_type": "mlp", "torch_dtype": "float32"}))
    (snap / "config.json").symlink_to("../../blobs/c0ffee")
    (tmp_path / "elsewhere.json").write_text("{}")
    (snap / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")  # out of the cache: skipped
    out = export(weights(), tmp_path / "out", like=snap, progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mlp"
    assert not (out / "tokenizer.json").exists()


def test_the_allowlist_names_the_files_of_an_hf_model_folder():
    names = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
             "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "qwen.tiktoken",
             "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
             "chat_template.jinja", "chat_template.json", "LICENSE", "LICENSE.md", "license.txt",
             "NOTICE", "USE_POLICY.md"}
    refused = {".env", "credentials.json", "id_rsa", "model.safetensors", "pytorch_model.bin", "README.md",
               "modules.json", "train.py", "config.yaml", "tokenizer.json.bak"}
    assert all(like_mod._wanted(n) for n in names)
    assert not any(like_mod._wanted(n) for n in refused)
    assert isinstance(LIKE_FILES, tuple)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe{}", b'"a string"'])
def test_a_bad_config_json_is_an_error_naming_it_before_any_write(tmp_path, content):
    like = hf_folder(tmp_path / "hf")
    (like / "config.json").write_bytes(content)
    earlier = export_here(tmp_path / "out")
    reads = []

    class Counting(dict):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="config.json") as err:
        export(Counting(weights()), earlier, like=like, overwrite=True, progress=False)
    assert str(like / "config.json") in str(err.value) and "like=False" in str(err.value)
    assert reads == []  # refused before any weight was computed or written
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("config, fields", [
    ({"model_type": "mlp", "torch_dtype": "float32"}, {"torch_dtype": "bfloat16"}),
    ({"model_type": "mlp", "dtype": "float32"}, {"dtype": "bfloat16"}),
    ({"model_type": "mlp", "torch_dtype": "float32", "dtype": "float32"}, {"torch_dtype": "bfloat16",
                                                                          "dtype": "bfloat16"}),
    ({"model_type": "mlp"}, {"torch_dtype": "bfloat16"}),  # none: torch_dtype is added
])
def test_a_cast_export_names_its_dtype_in_the_config(tmp_path, config, fields):
    like = hf_folder(tmp_path / "hf", config=config)
    out = export(weights(), tmp_path / "out", like=like, dtype="bf16", progress=False)
    assert json.loads((out / "config.json").read_text()) == {**config, **fields}
    assert wl.load(out).dtype("fc1.weight") == torch.bfloat16
    same = export(weights(), tmp_path / "same", like=like, progress=False)  # no cast: copied as is
    assert (same / "config.json").read_bytes() == (like / "config.json").read_bytes()


# ---------------------------------------------------------------------------------------- the card
HOSTILE = {"<img src=x onerror=alert(1)>": "a", "x|y [z](javascript:alert(1)) `c`\nnext": "b"}


def test_the_card_escapes_untrusted_text(tmp_path):
    markdown_it = pytest.importorskip("markdown_it")
    base, fts = hf_inputs(tmp_path / "in<b>|[x]")
    m = merge(base, {name: fts[f] for name, f in HOSTILE.items()}, method="ties", density=0.5)
    extras = {"title": "<script>alert(1)</script>", "notes": "one <b>\n\n[two](javascript:x) | `three`",
              "metrics": {"<i>t</i>": {"acc|x": 0.5, "note": "<svg onload=alert(1)>"}}}
    out = export(m, tmp_path / "out", card=extras, progress=False)
    card = (out / "README.md").read_text()
    for raw in ("<img", "<script", "<b>", "<i>", "<svg", "[z](javascript", "`c`", "`three`"):
        assert raw not in card
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(card)
    bad = ("<img src=x", "<script", "<svg", "<b>", "<i>", "href=\"javascript")  # the figure is an <img> of ours
    assert [tag for tag in bad if tag in page] == [] and page.count("<img") == 1
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    sources = page.split("<h2>Sources</h2>")[1].split("</table>")[0]
    assert sources.count("<tr>") == 4 and sources.count("<td>") == 9  # header + 3 rows of 3 cells
    assert "x|y [z](javascript:alert(1)) `c` next" in sources  # shown as text, on one line
    assert "<h1>&lt;script&gt;alert(1)&lt;/script&gt;</h1>" in page


def test_the_card_reads_well_for_normal_names(tmp_path):
    base, fts = hf_inputs(tmp_path / "in")
    m = merge(base, {"wn_noun": fts["a"], "fortunes-2": fts["b"]}, method="ties", density=0.5)
    out = export(m, tmp_path / "out", progress=False, card={
        "title": "My merge (v2)", "notes": "First paragraph.\n\nSecond one, with a 'quote'.",
        "metrics": {"wn_noun": {"accuracy": 0.9}}})
    card = (out / "README.md").read_text()
    assert "\n# My merge (v2)\n" in card
    assert "| fine-tune wn_noun | wn_noun |" in card and "| fine-tune fortunes-2 | fortunes-2 |" in card
    assert "| wn_noun | 0.9 |" in card
    assert "First paragraph.\n\nSecond one, with a 'quote'.\n" in card
    assert "Copied from the `like` model folder" in card and ": config.json, tokenizer.json." in card
    assert "- ties\n" in card  # the method's tag in the front matter


def test_md_text_neutralises_markup_and_keeps_plain_text():
    assert card_mod.md_text("wn_noun") == "wn_noun"
    assert card_mod.md_text("a|b") == "a\\|b" and card_mod.md_text("[l](u)") == "\\[l\\](u)"
    assert card_mod.md_text("`x`") == "\\`x\\`" and card_mod.md_text("a\\|b") == "a\\\\\\|b"
    assert card_mod.md_text("<a href='x'>&") == "&lt;a href='x'&gt;&amp;"
    assert card_mod.md_text("one\ntwo\r\nthree\u2028four") == "one two three four"


def test_a_method_name_from_outside_the_registry_cannot_add_front_matter_or_markup():
    recipe = SimpleNamespace(method="x\nlicense: evil\n<img src=x onerror=alert(1)>")
    lines = card_mod._header(None, recipe, ["config.json"], {})
    front = lines[:lines.index("---", 1) + 1]
    assert front == ["---", "library_name: transformers", "tags:", "- weightlens", "- merge", "---"]
    assert lines[-2] == "# x license: evil &lt;img src=x onerror=alert(1)&gt; merge"
    assert card_mod._method_line("<b>`m`</b>", object()) == "&lt;b&gt;\\`m\\`&lt;/b&gt;"


# ---------------------------------------------------------------------------------------- disk full
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["weights", "index", "like", "card", "swap"])
def test_a_full_disk_is_one_error_naming_the_target_and_leaves_nothing(tmp_path, monkeypatch, where):
    like = hf_folder(tmp_path / "hf")
    earlier = export_here(tmp_path / "out")
    target = {"weights": (export_mod._Shard, "_write"), "index": (export_mod, "write_index"),
              "like": (like_mod.shutil, "copyfile"), "card": (card_mod, "write_text"),
              "swap": (atomic_mod, "fsync_dir")}[where]
    before = snapshot(tmp_path)
    monkeypatch.setattr(*target, _no_space)
    with pytest.raises(OSError) as err:
        export_here(earlier, like=like, overwrite=True)
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and str(earlier) in message and "No space left" in message
    assert "\n" not in message and err.value.__suppress_context__  # one error, one line
    assert not isinstance(err.value, wl.WeightlensError)
    assert_unchanged(before, tmp_path)  # the earlier export untouched, no hidden leftovers


def test_a_permission_error_is_reported_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod._Shard, "_write", lambda *a: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError, match="export to .*out failed: Permission denied.*permissions"):
        export(weights(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- report.to_html
@pytest.fixture
def small_report(tmp_path):
    base, fts = hf_inputs(tmp_path / "in")
    return analyze(wl.TaskVectors(base, fts), device="cpu", progress=False)


def test_to_html_onto_a_folder_fails_and_leaves_no_temporary_file(tmp_path, small_report):
    folder = user_folder(tmp_path / "reports")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidParameterError, match="is a folder") as err:
        small_report.to_html(folder)
    assert str(folder) in str(err.value)
    assert_unchanged(before, tmp_path)


def test_to_html_failing_midway_keeps_the_old_page_and_no_temporary_file(tmp_path, small_report, monkeypatch):
    page = small_report.to_html(tmp_path / "r" / "report.html")
    before = snapshot(tmp_path)
    monkeypatch.setattr(Path, "replace", _no_space)
    with pytest.raises(OSError, match="No space left"):
        small_report.to_html(page)
    assert_unchanged(before, tmp_path)
