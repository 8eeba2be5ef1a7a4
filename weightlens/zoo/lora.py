"""The ``"minilm-lora"`` zoo: LoRA fine-tunes of all-MiniLM-L6-v2 on the ``"minilm-tasks"`` tasks.

The same four tasks, splits and sizes as ``weightlens.zoo.minilm``, and the same frozen heads: each is
fitted by that module's own code (:func:`weightlens.zoo.minilm.task_head`, same seed), so the heads
are bitwise those of ``"minilm-tasks"``. Instead of the whole encoder, a LoRA adapter (``peft``:
rank 8, ``lora_alpha`` 16, no dropout) on every attention projection (query, key, value,
``attention.output.dense``) and both FFN matrices (``intermediate.dense``, ``output.dense``) of the
6 layers is trained through the frozen head, by the same loop, schedule, epochs and batch order as
the full fine-tunes (``minilm.train_through_head``) at a learning rate suited to LoRA (chosen on val,
``SETTINGS["lr"]``). ``lora_A`` starts random: torch is seeded before ``get_peft_model``, so a
build is repeatable bit for bit.

On disk: ``<task>/`` is a PEFT adapter folder written by ``save_pretrained``
(``adapter_config.json``, ``adapter_model.safetensors``; its ``base_model_name_or_path`` is the hub
name of the base, whose key names the adapter shares); ``heads.safetensors`` as in
``"minilm-tasks"``. ``wl.TaskVectors(z.base, z.finetuned)`` keeps the adapters factored, and
``z.evaluate`` takes full state dicts (``tv.finetuned_weights(task)``, a merge's weights).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from weightlens.taskvectors import TaskVectors
from weightlens.zoo import minilm
from weightlens.zoo._common import TaskZoo

__all__ = ["SETTINGS", "TARGETS", "build_tasks", "load_tasks", "train_adapter"]

NAME = "minilm-lora"
#: Bumped when a change to the recipe changes the files or the scorer (see weightlens.zoo.build).
RECIPE_VERSION = 2
PEFT_COMMAND = "pip install 'weightlens[zoo]'  (or: pip install 'peft>=0.13')"
#: Every attention projection and both FFN matrices of the 6 layers; the pooler is not a target.
TARGETS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
           r"|intermediate\.dense|output\.dense)")
BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # the adapters' base_model_name_or_path
SETTINGS: dict[str, Any] = {
    **{k: minilm.SETTINGS[k] for k in ("max_length", "epochs", "batch_size", "warmup_fraction",
                                       "weight_decay", "grad_clip", "seed")},
    # lr chosen on val at CI size, rank 8, with recipe 2's heads of minilm-tasks (mean val accuracy over the
    # tasks): 1e-3 0.863, 2e-3 0.870. With the zero-shot heads (recipe 3): val 0.860 (full fine-tunes 0.870),
    # test 0.856 (full 0.862), base 0.716.
    "lr": 2e-3, "lr_grid_on_val": [1e-3, 2e-3],
    "rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS,
    "head": "the minilm-tasks zero-shot heads, built by weightlens.zoo.minilm.task_head (bitwise equal)",
    "frozen": ["all base weights", "heads"], "pooling": minilm.SETTINGS["pooling"],
}


def _peft() -> Any:
    try:
        import peft
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"The LoRA zoo trains its adapters with peft; install it with: {PEFT_COMMAND}"
        ) from None
    return peft


def train_adapter(base: Mapping[str, Tensor], head: tuple[Tensor, Tensor], data: tuple[Tensor, Tensor, Tensor],
                  out: Path, *, task: str, settings: Mapping[str, Any] | None = None, progress: bool = False) -> Path:
    """Train one LoRA adapter of the MiniLM ``base`` through the frozen ``head``; save it in ``out``.

    ``data`` is ``(ids, mask, labels)``; ``task`` picks the batch-order seed (``minilm.train_seed``);
    torch is seeded with ``settings["seed"]`` before ``get_peft_model`` (the random ``lora_A``).
    Returns ``out`` (``adapter_config.json`` + ``adapter_model.safetensors``).
    """
    peft, s = _peft(), dict(settings or SETTINGS)
    model = minilm.load_encoder(base).eval()  # eval(): no dropout anywhere (lora_dropout is 0 too)
    config = peft.LoraConfig(r=s["rank"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                             target_modules=s["target_modules"], bias="none")
    torch.manual_seed(s["seed"])
    wrapped = peft.get_peft_model(model, config)  # injects LoRA layers into ``model`` in place
    wrapped.peft_config["default"].base_model_name_or_path = BASE_NAME
    params = [p for p in model.parameters() if p.requires_grad]
    minilm.train_through_head(model, params, head, data, seed=minilm.train_seed(task), settings=s,
                              desc=task, progress=progress)
    # save_embedding_layers=False: no embedding is a target, and "auto" would look the base up on the hub
    wrapped.save_pretrained(str(out), save_embedding_layers=False)
    return Path(out)


def _train_all(folder: Path, scorer: minilm._Scorer, base: dict[str, Tensor], progress: bool,
               timings: dict[str, float]) -> tuple[dict, dict]:
    """Heads, adapters and their metrics for every task; writes ``heads.safetensors``."""
    base_model = minilm.load_encoder(base)
    heads, head_fit, metrics = {}, {}, {"base": {}, "finetuned": {}}
    for task in tqdm(minilm.TASKS, desc=NAME, disable=not progress):
        t0 = time.perf_counter()
        head, head_fit[task], metrics["base"][task] = minilm.task_head(base_model, scorer, task)
        heads[f"{task}.weight"], heads[f"{task}.bias"] = head
        t1 = time.perf_counter()
        train_adapter(base, head, scorer.data(task, "train"), folder / task, task=task, progress=progress)
        t2 = time.perf_counter()
        tv = TaskVectors(scorer.hf_dir, {task: folder / task})
        metrics["finetuned"][task] = scorer.all(tv.finetuned_weights(task), [task], ("val", "test"))[task]
        timings[f"head_{task}"], timings[f"lora_{task}"] = t1 - t0, t2 - t1
        timings[f"eval_{task}"] = time.perf_counter() - t2
    save_file(heads, str(folder / "heads.safetensors"), metadata={"format": "pt"})
    return metrics, head_fit


def _arithmetic(folder: Path, scorer: minilm._Scorer, alpha: float) -> dict:
    """Task arithmetic of the four adapters: ``base + alpha * sum_t delta_t``, scored on every task."""
    tv = TaskVectors(scorer.hf_dir, {t: folder / t for t in minilm.TASKS})
    base = load_file(scorer.hf_dir / "model.safetensors")
    merged = dict(base)
    for key in tv.keys:
        merged[key] = base[key].float() + alpha * tv.deltas(key).sum(0)
    return scorer.all(merged, list(minilm.TASKS), ("val", "test"))


def build_tasks(folder: Path, *, size: str, progress: bool) -> dict[str, Any]:
    """Fit the heads, train a LoRA adapter per task into ``folder``; returns the manifest."""
    minilm.check_size(size)
    peft = _peft()
    start = time.perf_counter()
    hf_dir, n = minilm.minilm_dir(), minilm.N_EXAMPLES[size]
    timings: dict[str, float] = {}
    with minilm._threads() as threads:
        base = load_file(hf_dir / "model.safetensors")
        scorer = minilm._Scorer({}, n, hf_dir)
        metrics, head_fit = _train_all(folder, scorer, base, progress, timings)
        t0 = time.perf_counter()
        metrics["task_arithmetic"] = {str(a): _arithmetic(folder, scorer, a) for a in minilm.TA_ALPHAS}
        timings["task_arithmetic"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    steps = SETTINGS["epochs"] * -(-n["train"] // SETTINGS["batch_size"])
    provenance = minilm._provenance(hf_dir)
    provenance["versions"]["peft"] = peft.__version__
    return {
        "tasks": list(minilm.TASKS),
        "labels": {t: minilm.text_tasks()["tasks"][t]["labels"] for t in minilm.TASKS},
        "n_examples": n,
        "finetuned": {t: t for t in minilm.TASKS},
        "metrics": metrics,
        "summary_accuracy": minilm._summary(metrics),
        "task_arithmetic_alphas": list(minilm.TA_ALPHAS),
        "settings": {**SETTINGS, "steps_per_task": steps, "head_fit": head_fit, "torch_threads": threads},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **provenance,
    }


def load_tasks(folder: Path) -> TaskZoo:
    """Open a built ``"minilm-lora"`` zoo: base = the package folder, fine-tunes = adapter folders."""
    return minilm.open_zoo(folder, NAME)
