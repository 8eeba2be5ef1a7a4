"""mergekit reproduces what weightlens writes: run the exported ``mergekit_config.yml`` with mergekit itself.

mergekit (pinned in ``peers.txt``) lives in its own environment, ``.venv-peers`` (``./dev.sh test`` sets it
up and exports ``WEIGHTLENS_PEERS``): it pins its own transformers and pydantic. The models are a tiny
Llama with grouped-query attention built from a ``transformers`` config and two fine-tunes trained here
for a few steps on two token tasks. Task arithmetic must agree exactly, TIES with ``scope="tensor"`` too
(both sum in float32 in the same order on the CPU); TIES with the default ``scope="global"`` has no
mergekit equivalent and the YAML says in how many entries the nearest one may differ: checked here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

import weightlens as wl

from _mergekit_peers import export_and_run, mergekit  # noqa: F401  (fixtures)
from _mergekit_peers import llama_models as _llama_models  # noqa: F401  (fixture: base and three fine-tunes)


@pytest.fixture(scope="module")
def llama_models(_llama_models) -> tuple[Path, dict[str, Path]]:
    """The shared tiny Llama and its two fine-tunes trained on token tasks (``plus1``, ``plus3``)."""
    base, finetuned = _llama_models
    return base, {k: finetuned[k] for k in ("plus1", "plus3")}


def _max_abs_diff(a, b) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.peers
@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"alpha": 0.5}),
    ("ties", {"alpha": 1.0, "density": 0.3, "scope": "tensor"}),
])
def test_mergekit_reproduces_the_export_exactly(mergekit, llama_models, tmp_path, method, params):
    base, finetuned = llama_models
    [(ours, theirs, yaml_text)] = export_and_run(mergekit, [wl.merge(base, finetuned, method=method, **params)],
                                                 tmp_path, like=base)
    assert "approximate" not in yaml_text
    assert _max_abs_diff(ours, theirs) == 0.0


@pytest.mark.peers
def test_ties_global_says_how_far_mergekit_is_and_mergekit_stays_within_it(mergekit, llama_models, tmp_path):
    base, finetuned = llama_models
    [(mine, theirs, yaml_text)] = export_and_run(
        mergekit, [wl.merge(base, finetuned, method="ties", alpha=1.0, density=0.3)], tmp_path, like=base)
    head = yaml_text.split("merge_method:")[0]
    found = re.search(r"keep different entries at (\d+) of (\d+) coordinates \(([\d.]+)%\)", head)
    assert "approximate" in head and found, head
    bound, entries = int(found[1]), int(found[2])
    assert 0 < bound < entries
    tv = wl.TaskVectors(base, finetuned)
    assert entries == sum(tv.numel(k) for k in tv.keys)
    differing = sum(int((mine[k] != theirs[k]).sum()) for k in tv.keys)
    assert 0 < differing <= bound


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory) -> Path:
    """A task-arithmetic export of two BertModel variants (shapes only matter: mergekit fails at planning)."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    for seed in (1, 2):
        model = BertModel(cfg)
        model.load_state_dict(base.state_dict())
        _perturbed(model, seed).save_pretrained(root / f"ft{seed}")
    merged = wl.merge(root / "base", {"a": root / "ft1", "b": root / "ft2"}, method="task_arithmetic")
    return wl.export(merged, root / "out", like=root / "base", progress=False)


def test_a_bert_model_export_says_mergekit_cannot_run_it(bert_export):
    head = (bert_export / "mergekit_config.yml").read_text().split("merge_method:")[0]
    assert "mergekit 0.1.5 cannot run this" in head and "position_ids" in head


@pytest.mark.peers
def test_mergekit_fails_on_bert_model_as_the_note_says(mergekit, bert_export, tmp_path):
    """If a newer pinned mergekit runs it, the note in ``weightlens.io.recipe.MERGEKIT_FAILS`` must go."""
    done = subprocess.run([str(mergekit), "mergekit_config.yml", str(tmp_path / "theirs")], cwd=bert_export,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "mergekit/plan.py" in done.stderr, done.stderr[-2000:]
    assert 'TypeError: can only concatenate list (not "tuple") to list' in done.stderr, done.stderr[-2000:]
