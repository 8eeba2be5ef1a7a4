"""Shared pieces of the tests that run mergekit itself on weightlens' exported ``mergekit_config.yml``.

Import the fixtures into a test module (``from _mergekit_peers import llama_models, mergekit``) and mark
the tests that use ``mergekit`` ``@pytest.mark.peers``: they skip where ``.venv-peers`` is absent and fail
in CI. ``llama_models`` is a tiny Llama (grouped-query attention) and three fine-tunes: two trained for a
few steps on token tasks (``plus1``, ``plus3``; their updates are nearly colinear with the base) and one
far from the base (``far``: noise of the weights' own scale added, so SLERP takes its spherical branch).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import weightlens as wl

PEERS = Path(os.environ.get("WEIGHTLENS_PEERS", Path(__file__).resolve().parents[1] / ".venv-peers"))
MERGEKIT = PEERS / "bin" / "mergekit-yaml"


@pytest.fixture(scope="module")
def mergekit() -> Path:  # only the tests marked peers ask for it
    if not MERGEKIT.is_file():
        reason = f"mergekit not found at {MERGEKIT} (./dev.sh test installs it into .venv-peers)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the mergekit parity tests must run in CI: {reason}")
        pytest.skip(reason)
    return MERGEKIT


def _train(model: torch.nn.Module, shift: int, steps: int = 12) -> None:
    """A few Adam steps on "next token = token + shift (mod vocab)": a real, if tiny, fine-tune."""
    g = torch.Generator().manual_seed(shift)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    vocab = model.config.vocab_size
    model.train()
    for _ in range(steps):
        start = torch.randint(0, vocab, (8, 1), generator=g)
        ids = (start + shift * torch.arange(16)) % vocab
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _far(model: torch.nn.Module, seed: int) -> None:
    """Add noise as large as each weight's own spread (norm weights: 0.5): cosines well below 0.9995."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.5
            p.add_(scale * torch.randn(p.shape, generator=g))


_BUILT: dict[str, tuple[Path, dict[str, Path]]] = {}  # one build per test session (every module shares it)


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """``(base folder, {"plus1": folder, "plus3": folder, "far": folder})``, HF Llama folders in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if "llama" in _BUILT and _BUILT["llama"][0].is_dir():
        return _BUILT["llama"]
    root = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    finetuned = {}
    for name, shift in (("plus1", 1), ("plus3", 3), ("far", None)):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        _train(model, shift) if shift is not None else _far(model, 7)
        model.save_pretrained(root / name)
        finetuned[name] = root / name
    _BUILT["llama"] = (root / "base", finetuned)
    return _BUILT["llama"]


_SERVER = """
import json, os, sys, traceback
from mergekit.scripts.run_yaml import main
for line in sys.stdin:
    try:
        for folder, out, extra in json.loads(line):
            os.chdir(folder)
            main.main(args=["mergekit_config.yml", out, *extra], standalone_mode=False)
        reply = {"ok": True}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc()[-3000:]}
    print("@@mergekit@@" + json.dumps(reply), flush=True)
"""
_PROCESS: list[subprocess.Popen] = []  # one mergekit process for the whole test session


def _server(python: Path) -> subprocess.Popen:
    if _PROCESS and _PROCESS[0].poll() is None:
        return _PROCESS[0]
    proc = subprocess.Popen([str(python), "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    _PROCESS[:] = [proc]
    atexit.register(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_mergekit(mergekit: Path, jobs: list[tuple[Path, Path, tuple[str, ...]]]) -> list[wl.io.Checkpoint]:
    """Run ``mergekit-yaml mergekit_config.yml OUT [options]`` in each export folder, in one process of the
    peers' Python kept for the session (mergekit's start-up, 4-5 s of imports, is paid once); the merged
    checkpoints, in order."""
    proc = _server(mergekit.parent / "python")
    proc.stdin.write(json.dumps([[str(f), str(o), list(x)] for f, o, x in jobs]) + "\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith("@@mergekit@@"):
            reply = json.loads(line[len("@@mergekit@@"):])
            break
    else:
        raise AssertionError(f"mergekit's process ended (exit code {proc.wait()}) on {[str(f) for f, _, _ in jobs]}")
    assert reply["ok"], f"mergekit failed on {[str(f) for f, _, _ in jobs]}:\n{reply['error']}"
    return [wl.load(o) for _, o, _ in jobs]


def export_and_run(mergekit: Path, merges: list, tmp_path: Path, like: Path,
                   extra: tuple[str, ...] = ()) -> list[tuple[wl.io.Checkpoint, wl.io.Checkpoint, str]]:
    """Export each merge (with its mergekit YAML) and run mergekit on the YAMLs: ``[(ours, theirs, yaml)]``."""
    folders = [wl.export(m, tmp_path / f"ours{i}", like=like, progress=False) for i, m in enumerate(merges)]
    theirs = run_mergekit(mergekit, [(f, tmp_path / f"theirs{i}", extra) for i, f in enumerate(folders)])
    return [(wl.load(f), t, (f / "mergekit_config.yml").read_text()) for f, t in zip(folders, theirs)]


def max_relative_error(ours, theirs, keys=None) -> float:
    """Largest ``max|a - b| / max|b|`` over the keys (the same key set is required)."""
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for k in keys or ours:
        a, b = ours[k].double(), theirs[k].double()
        worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30))
    return worst


def assert_recipe_reruns_bitwise(merged, tmp_path: Path, like: Path) -> None:
    """Export ``merged``; ``run_recipe`` on the written recipe gives the same tensors, bit for bit."""
    from weightlens.io import load_recipe
    from weightlens.merge import run_recipe

    first = wl.export(merged, tmp_path / "first", like=like, progress=False)
    recipe = load_recipe(first / "weightlens_recipe.yaml")
    assert recipe.method == merged.method and recipe.params == merged.params
    again = run_recipe(recipe, tmp_path / "again", progress=False)
    assert recipe.check(again) == []
    a, b = wl.load(first), wl.load(again)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
