"""Zoo bookkeeping: skipping built zoos, rebuilding and refusing zoos built by an older recipe; where it lives."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from weightlens import zoo


@pytest.fixture
def fake_zoo(monkeypatch, tmp_path):
    """A registered zoo whose builder writes one file and counts its calls."""
    module = types.ModuleType("fake_zoo_module")
    module.RECIPE_VERSION = 1
    module.calls = 0

    def build(folder, *, size, progress):
        module.calls += 1
        (folder / "weights.txt").write_text(f"recipe {module.RECIPE_VERSION}")
        return {"built": module.calls}

    module.build = build
    module.load = lambda folder: folder
    monkeypatch.setitem(sys.modules, "fake_zoo_module", module)
    monkeypatch.setitem(zoo._REGISTRY, "fake", ("fake_zoo_module", "build", "load"))
    return module, tmp_path


def test_build_skips_a_zoo_built_by_the_current_recipe(fake_zoo):
    module, root = fake_zoo
    folder = zoo.build("ci", names=["fake"], root=root, progress=False)["fake"]
    zoo.build("ci", names=["fake"], root=root, progress=False)
    assert module.calls == 1
    assert zoo.load("fake", size="ci", root=root) == folder
    assert zoo._common.read_manifest(folder)["recipe_version"] == 1


def test_a_newer_recipe_refuses_the_old_build_then_rebuilds_it(fake_zoo):
    module, root = fake_zoo
    folder = zoo.build("ci", names=["fake"], root=root, progress=False)["fake"]
    module.RECIPE_VERSION = 2
    with pytest.raises(FileNotFoundError, match=r"built by recipe 1; this weightlens uses recipe 2.*"
                                                r"weightlens zoo build --size ci --names fake"):
        zoo.load("fake", size="ci", root=root)
    zoo.build("ci", names=["fake"], root=root, progress=False)
    assert module.calls == 2
    assert (folder / "weights.txt").read_text() == "recipe 2"
    assert zoo.load("fake", size="ci", root=root) == folder


def test_a_manifest_without_a_recipe_version_counts_as_recipe_1(fake_zoo):
    module, root = fake_zoo
    folder = zoo.build("ci", names=["fake"], root=root, progress=False)["fake"]
    manifest = zoo._common.read_manifest(folder)
    del manifest["recipe_version"]
    zoo._common.write_manifest(folder, manifest)
    assert zoo.load("fake", size="ci", root=root) == folder


# ------------------------------------------------------------------------------------ one default location


def test_home_is_weightlens_home_then_xdg_cache_then_dot_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    monkeypatch.delenv("WEIGHTLENS_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert zoo.home() == tmp_path / "me" / ".cache" / "weightlens"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    assert zoo.home() == tmp_path / "me" / ".cache" / "weightlens"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.home() == tmp_path / "xdg" / "weightlens"
    monkeypatch.setenv("WEIGHTLENS_HOME", str(tmp_path / "wl"))
    assert zoo.home() == tmp_path / "wl"
    assert zoo._common.zoo_dir("digits-tasks", "ci") == tmp_path / "wl" / "zoo" / "ci" / "digits-tasks"


def test_dev_sh_leaves_the_zoo_location_to_weightlens():
    """``dev.sh`` and plain Python find the same zoo: the script sets no WEIGHTLENS_HOME of its own."""
    script = (Path(__file__).resolve().parents[1] / "dev.sh").read_text()
    assert not [ln for ln in script.splitlines() if "WEIGHTLENS_HOME=" in ln and not ln.lstrip().startswith("#")]


def test_the_default_location_is_documented_where_users_look(capsys):
    from weightlens.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "~/.cache/weightlens" in readme and "$WEIGHTLENS_HOME" in readme
    with pytest.raises(SystemExit):
        main(["zoo", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "~/.cache/weightlens" in text and "WEIGHTLENS_HOME" in text
