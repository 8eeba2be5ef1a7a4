"""The MiniLM LoRA zoo: deterministic adapters, the minilm-tasks heads, factored task vectors.

The built zoo comes from the session fixture ``minilm_lora`` (``tests/conftest.py``), built once at size
``"ci"`` under ``$WEIGHTLENS_HOME``. The independent reference for an adapter's update is peft's own
``merge_and_unload()`` on transformers' ``BertModel`` (``tests/_peft_models.py``), not weightlens' forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import weightlens as wl  # noqa: E402
from weightlens.io.sources import AdapterCheckpoint  # noqa: E402
from weightlens.zoo import lora, minilm  # noqa: E402

import _peft_models as pm  # noqa: E402

try:
    MINILM = minilm.minilm_dir()
except (ModuleNotFoundError, FileNotFoundError) as exc:  # pragma: no cover - set-up installs it
    pytest.skip(str(exc), allow_module_level=True)

LAYER_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")


# ---------------------------------------------------------------- determinism (seconds, no zoo)

def _short_training(out: Path, seed: int) -> bytes:
    """An adapter trained 2 steps on 32 wn_verb examples through a random head; its safetensors bytes."""
    texts, labels = minilm.task_examples("wn_verb", "train", 32)
    ids, mask = minilm.tokenize(texts, max_length=16)
    g = torch.Generator().manual_seed(0)
    head = (torch.randn(4, 384, generator=g), torch.zeros(4))
    settings = {**lora.SETTINGS, "epochs": 1, "batch_size": 16, "seed": seed}
    lora.train_adapter(load_file(MINILM / "model.safetensors"), head, (ids, mask, torch.tensor(labels)), out,
                       task="wn_verb", settings=settings)
    return (out / "adapter_model.safetensors").read_bytes()


def test_same_seed_gives_bitwise_equal_adapters(tmp_path):
    first = _short_training(tmp_path / "a", seed=0)
    assert _short_training(tmp_path / "b", seed=0) == first
    assert _short_training(tmp_path / "c", seed=1) != first  # the seed reaches lora_A's random init
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == lora.BASE_NAME
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.0)


# ---------------------------------------------------------------- the built zoo (size "ci")

@pytest.mark.slow
def test_zoo_layout_and_manifest(minilm_lora):
    z = minilm_lora
    assert z.name == "minilm-lora" and z.tasks == list(minilm.TASKS) and z.base == MINILM
    for folder in z.finetuned.values():
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert name == lora.BASE_NAME and not Path(name).exists()
    m = z.manifest
    assert m["n_examples"] == {"train": 400, "val": 100, "test": 200}
    assert m["settings"]["steps_per_task"] == 75 and m["settings"]["rank"] == 8
    assert m["versions"]["peft"] and m["timings_s"]["total"] > 0


@pytest.mark.slow
def test_adapters_target_six_matrices_per_layer_and_not_the_pooler(minilm_lora):
    want = {f"encoder.layer.{i}.{m}.weight" for i in range(6) for m in LAYER_TARGETS}
    for folder in minilm_lora.finetuned.values():
        adapter = wl.load(folder)
        assert isinstance(adapter, AdapterCheckpoint)
        assert set(adapter.lora_keys) == want


@pytest.mark.slow
def test_adapters_are_factored_task_vectors(minilm_lora):
    tv = wl.TaskVectors(minilm_lora.base, minilm_lora.finetuned)
    key = "encoder.layer.2.intermediate.dense.weight"
    for task in minilm_lora.tasks:
        assert tv.is_factored(task)
        f = tv.factors(task, key)
        assert f.A.shape == (8, 384) and f.B.shape == (1536, 8) and f.scale == 2.0
        assert tv.factors(task, "pooler.dense.weight").A.shape[0] == 0  # rank 0: untouched
        assert torch.count_nonzero(tv.delta(task, "pooler.dense.weight")) == 0


@pytest.mark.slow
def test_heads_are_the_minilm_tasks_heads_bitwise(minilm_lora, minilm_zoo):
    ours = load_file(minilm_lora.folder / "heads.safetensors")
    theirs = load_file(minilm_zoo.folder / "heads.safetensors")
    assert set(ours) == set(theirs) == {f"{t}.{p}" for t in minilm.TASKS for p in ("weight", "bias")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert minilm_lora.manifest["metrics"]["base"] == minilm_zoo.manifest["metrics"]["base"]


@pytest.mark.slow
def test_evaluate_reproduces_the_manifest(minilm_lora):
    z = minilm_lora
    tv = z.task_vectors()
    metrics = z.manifest["metrics"]
    for task in z.tasks:
        got = z.evaluate(tv.finetuned_weights(task), task, "test")
        assert got["accuracy"] == pytest.approx(metrics["finetuned"][task]["test"]["accuracy"], abs=1e-9)
        assert got["loss"] == pytest.approx(metrics["finetuned"][task]["test"]["loss"], abs=1e-6)
    base = load_file(z.base / "model.safetensors")
    merged = {k: (base[k].float() + 0.3 * tv.deltas(k).sum(0)) if k in tv.keys else v for k, v in base.items()}
    got = z.evaluate(merged, "wn_noun", "val")
    assert got["accuracy"] == pytest.approx(metrics["task_arithmetic"]["0.3"]["wn_noun"]["val"]["accuracy"])


@pytest.mark.slow
def test_task_vector_is_merge_and_unload_minus_base(minilm_lora):
    task = "wn_noun"
    merged = pm.merged_weights(minilm_lora.base, minilm_lora.finetuned[task])  # transformers BertModel + peft
    base = load_file(minilm_lora.base / "model.safetensors")
    tv = minilm_lora.task_vectors([task])
    for key in tv.keys:
        want = merged[key] - base[key].double()
        got = tv.delta(task, key).double()
        assert torch.allclose(got, want, atol=1e-6, rtol=0), key
    assert sum(bool(torch.count_nonzero(tv.delta(task, k))) for k in tv.keys) == 36


@pytest.mark.slow
def test_lora_beats_the_base_on_val(minilm_lora):
    # Measured on the CI build (rank 8, lr 2e-3), val accuracy base -> LoRA: wn_noun 0.89 -> 0.92, wn_noun_b
    # 0.95 -> 0.96, wn_verb 0.74 -> 0.77, fortunes 0.82 -> 0.83 (100 examples each: one example is 0.01, so
    # one task may tie on a build with another thread count).
    m = minilm_lora.manifest["metrics"]
    better = [t for t in minilm_lora.tasks
              if m["finetuned"][t]["val"]["accuracy"] > m["base"][t]["val"]["accuracy"]]
    assert len(better) >= 3, better
    s = minilm_lora.manifest["summary_accuracy"]
    assert s["finetuned_val"] > s["base_val"]


def test_the_tour_offers_the_lora_zoo(monkeypatch):
    from weightlens import _tour
    from weightlens.errors import InvalidParameterError

    monkeypatch.delenv("WEIGHTLENS_TOUR_ZOO", raising=False)
    assert _tour.TOUR_ZOOS == ("minilm-tasks",) and "minilm-lora" in _tour.TOUR_CHOICES
    monkeypatch.setenv("WEIGHTLENS_TOUR_ZOO", "minilm-lora")
    assert _tour.TOUR_ZOOS == ("minilm-lora",)
    monkeypatch.setenv("WEIGHTLENS_TOUR_ZOO", "digits-pairs")
    with pytest.raises(InvalidParameterError, match="WEIGHTLENS_TOUR_ZOO must be one of minilm-tasks, minilm-lora"):
        _tour.tour_zoo()
