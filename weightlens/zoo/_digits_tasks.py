"""Internals of the ``digits-tasks`` zoo: data per task, scorer, pretraining, probes, fine-tunes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from weightlens.zoo import _digits_data as dd
from weightlens.zoo import _digits_train as tr
from weightlens.zoo._common import Metrics
from weightlens.zoo._digits_data import TASKS

TASK_SETTINGS: dict[str, Any] = {
    "architecture": "body 64-512-512 (ReLU) + frozen linear head per task",
    "width": 512,
    "inputs": "task transform on raw 0..16 pixels, then (x - m) / s with the scalar mean and std of "
              "the original training pixels (one fixed scaling for all tasks)",
    "pretrain": {"optimizer": "Adam", "lr": 1e-3, "epochs": 10, "batch_size": 128, "seed": 0},
    "head": {"method": "L2 logistic regression by full-batch L-BFGS on frozen base features",
             "weight_decay": 3e-2},
    "finetune": {"optimizer": "Adam", "lr": 3e-4, "epochs": 5, "batch_size": 128, "seed": 100},
    "test_size": 0.25,
    "val_size": 0.15,
    "split_seeds": [0, 1],
    "block_seed": dd.BLOCK_SEED,
}
ALPHAS = (0.25, 1.0)
SPLITS = ("train", "val", "test")
#: A fine-tune planted to conflict with ``of`` in one known block (issue: merge diagnosis). Trained, not
#: edited: ``of``'s inputs with every label swapped in pairs (0<->1, 2<->3, ..., 8<->9), through ``of``'s
#: frozen head, only ``block`` trained (so its update is confined there and opposes ``of``'s).
PLANTED: dict[str, Any] = {
    "task": "rot90_swap", "of": "rot90", "block": "fc2", "labels": "y xor 1 (0<->1, 2<->3, ..., 8<->9)",
    "finetune": {"optimizer": "Adam", "lr": 1e-3, "epochs": 5, "batch_size": 128, "seed": 200},
}
ALL_TASKS = (*TASKS, PLANTED["task"])

Evaluate = Callable[[Mapping[str, torch.Tensor], str, str], Metrics]


def check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    """Raise ``InvalidParameterError`` in the house format when ``value`` is not an option."""
    from weightlens.errors import InvalidParameterError

    if value not in options:
        raise InvalidParameterError(
            f"The {name!r} parameter must be one of {options}. Got {value!r} instead."
        )


def task_splits(y: np.ndarray) -> dict[str, np.ndarray]:
    """One image split for every task: stratified test 25%, then val 15% of the rest (seeded)."""
    s = TASK_SETTINGS
    rest, test = dd.stratified_split(y, s["test_size"], s["split_seeds"][0])
    train, val = dd.stratified_split(y[rest], s["val_size"], s["split_seeds"][1])
    return {"train": rest[train], "val": rest[val], "test": test}


class TaskData:
    """Scaled float32 inputs and int64 labels per (task, split), computed on first use.

    Inputs are ``(transform(x) - m) / s`` with ``m``, ``s`` the mean and std of all raw pixels of the
    original training images: one fixed scaling for every task, like a pretrained model's input
    normalization (so ``invert`` is a real shift of the input distribution).
    """

    def __init__(self, split: Mapping[str, np.ndarray]) -> None:
        self.split = dict(split)
        x = dd.raw_digits()[0][self.split["train"]]
        self.mean, self.std = float(x.mean()), float(x.std())
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if task == PLANTED["task"]:  # the inputs of the task it conflicts with, labels swapped in pairs
            x, y = self(PLANTED["of"], split)
            return x, y ^ 1
        if (task, split) not in self._cache:
            x, y = dd.raw_digits()
            xt = dd.transform(x, task)
            for s, idx in self.split.items():
                self._cache[(task, s)] = dd.tensors(xt[idx], y[idx], self.mean, self.std)
        return self._cache[(task, split)]


def evaluator(data: TaskData, heads: Mapping[str, torch.Tensor]) -> Evaluate:
    """The zoo's scorer: body state dict -> task transform, body, the task's frozen head -> metrics."""
    with torch.device("meta"):  # parameters come from the state dict: no init, no RNG use
        body = tr.Body(TASK_SETTINGS["width"]).requires_grad_(False)

    def evaluate(state_dict: Mapping[str, torch.Tensor], task: str, split: str) -> Metrics:
        """Accuracy and mean cross-entropy of a body state dict on ``task`` with its frozen head."""
        check_choice("task", task, ALL_TASKS)
        check_choice("split", split, SPLITS)
        params = tr.checked_params(state_dict, body, "digits-tasks evaluate")
        x, y = data(task, split)
        feats = tr.features_of(body, params, x)
        head = PLANTED["of"] if task == PLANTED["task"] else task
        logits = torch.nn.functional.linear(feats, heads[f"{head}.weight"], heads[f"{head}.bias"])
        return tr.score(logits, y)

    return evaluate


def _pretrain(data: TaskData, bar: tqdm) -> tuple[tr.Body, dict[str, Metrics]]:
    s = TASK_SETTINGS["pretrain"]
    width = TASK_SETTINGS["width"]
    body = tr.seeded(lambda: tr.Body(width), s["seed"])
    head = tr.seeded(lambda: torch.nn.Linear(width, 10), s["seed"] + 1)  # temporary, dropped
    bar.set_postfix_str("pretrain")
    tr.train(lambda x: head(body(x)), [*body.parameters(), *head.parameters()], data("orig", "train"),
             lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"], seed=s["seed"],
             on_epoch=bar.update)
    metrics = {}
    with torch.no_grad():
        for split in ("val", "test"):
            x, y = data("orig", split)
            metrics[split] = tr.score(head(body(x)), y)
    return body, metrics


def _finetune(base: Mapping[str, torch.Tensor], head: torch.nn.Linear,
              data: tuple[torch.Tensor, torch.Tensor], seed: int, bar: tqdm) -> dict[str, torch.Tensor]:
    s = TASK_SETTINGS["finetune"]
    body = tr.seeded(lambda: tr.Body(TASK_SETTINGS["width"]), seed)
    body.load_state_dict(base)
    tr.train(lambda x: head(body(x)), body.parameters(), data, lr=s["lr"], epochs=s["epochs"],
             batch_size=s["batch_size"], seed=seed, on_epoch=bar.update)
    return tr.state_dict_of(body)


def train_zoo(folder: Path, data: TaskData, progress: bool) -> dict[str, Any]:
    """Pretrain, probe and fine-tune, writing the safetensors files into ``folder`` as they come."""
    s = TASK_SETTINGS
    total = s["pretrain"]["epochs"] + len(TASKS) * s["finetune"]["epochs"]
    bar = tqdm(total=total, desc="digits-tasks", unit="epoch", disable=not progress)
    with tr.build_threads(), bar:
        body, pretrain = _pretrain(data, bar)
        base = tr.state_dict_of(body)
        save_file(base, str(folder / "base.safetensors"))
        probes = {}
        for t in TASKS:
            x, y = data(t, "train")
            probes[t] = tr.fit_head(tr.features_of(body, base, x), y, weight_decay=s["head"]["weight_decay"])
        heads = {f"{t}.{p}": getattr(h, p).detach().clone() for t, h in probes.items()
                 for p in ("weight", "bias")}
        save_file(heads, str(folder / "heads.safetensors"))
        finetuned = {}
        for i, t in enumerate(TASKS):
            bar.set_postfix_str(f"fine-tune {t}")
            finetuned[t] = _finetune(base, probes[t], data(t, "train"), s["finetune"]["seed"] + i, bar)
            save_file(finetuned[t], str(folder / f"{t}.safetensors"))
    return {"base": base, "heads": heads, "finetuned": finetuned, "pretrain": pretrain}


def train_planted(folder: Path, data: TaskData, base: Mapping[str, torch.Tensor],
                  heads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The planted conflict (:data:`PLANTED`): only its block trained from the base; written to ``folder``."""
    s, of, block = PLANTED["finetune"], PLANTED["of"], PLANTED["block"]
    head = torch.nn.Linear(TASK_SETTINGS["width"], 10, device="meta").to_empty(device="cpu")  # no RNG use
    with torch.no_grad():
        head.weight.copy_(heads[f"{of}.weight"])
        head.bias.copy_(heads[f"{of}.bias"])
    head.requires_grad_(False)
    with tr.build_threads():
        body = tr.seeded(lambda: tr.Body(TASK_SETTINGS["width"]), s["seed"])
        body.load_state_dict(base)
        tr.train(lambda x: head(body(x)), getattr(body, block).parameters(), data(PLANTED["task"], "train"),
                 lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"], seed=s["seed"])
    planted = tr.state_dict_of(body)
    save_file(planted, str(folder / f"{PLANTED['task']}.safetensors"))
    return planted


def planted_record(evaluate: Evaluate, base: Mapping, finetuned: Mapping, planted: Mapping) -> dict[str, Any]:
    """What the planted conflict does: its own metrics, and task arithmetic of the four tasks with and without
    it at alpha 0.5, with the block restored to ``of``'s own update (the cause, measured)."""
    of, block, alpha = PLANTED["of"], PLANTED["block"], 0.5
    four = task_arithmetic(base, finetuned, alpha)
    five = task_arithmetic(base, {**finetuned, PLANTED["task"]: planted}, alpha)
    restored = {k: (base[k] + finetuned[of][k] - base[k]) if k.startswith(f"{block}.") else v
                for k, v in five.items()}
    models = {"base": base, "planted": planted, "merged_without": four, "merged_with": five,
              "merged_with_block_restored": restored}
    return {
        **{k: v for k, v in PLANTED.items() if k != "finetune"}, "settings": PLANTED["finetune"],
        "file": f"{PLANTED['task']}.safetensors", "alpha": alpha,
        "metrics": {name: {t: evaluate(sd, t, "test") for t in (of, PLANTED["task"])} for name, sd in models.items()},
    }


def _means(per_task: Mapping[str, Mapping[str, Metrics]]) -> dict[str, Metrics]:
    return {s: {k: float(np.mean([per_task[t][s][k] for t in TASKS])) for k in ("accuracy", "loss")}
            for s in ("val", "test")}


def task_metrics(evaluate: Evaluate, base: Mapping, finetuned: Mapping) -> dict[str, Any]:
    """Base and fine-tuned metrics per task on val and test, and their means over tasks."""
    models = {"base": {t: base for t in TASKS}, "finetuned": finetuned}
    scored = {m: {t: {s: evaluate(models[m][t], t, s) for s in ("val", "test")} for t in TASKS}
              for m in models}
    return {
        "per_task": {t: {m: scored[m][t] for m in models} for t in TASKS},
        "mean": {m: _means(scored[m]) for m in models},
    }


def task_arithmetic(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]],
                    alpha: float) -> dict[str, torch.Tensor]:
    """Plain-torch reference merge: ``base + alpha * sum_t (finetuned_t - base)`` in float32."""
    return {k: base[k] + alpha * sum(ft[k] - base[k] for ft in finetuned.values()) for k in base}


def arithmetic_record(evaluate: Evaluate, base: Mapping, finetuned: Mapping) -> dict[str, Any]:
    """Task arithmetic over all tasks at each of ``ALPHAS``: per-task and mean metrics."""
    out: dict[str, Any] = {"alphas": list(ALPHAS), "formula": "base + alpha * sum_t (finetuned_t - base)"}
    for alpha in ALPHAS:
        merged = task_arithmetic(base, finetuned, alpha)
        per_task = {t: {s: evaluate(merged, t, s) for s in ("val", "test")} for t in TASKS}
        out[str(alpha)] = {"per_task": per_task, "mean": _means(per_task)}
    return out


class _HeadedBody(tr.Body):
    """The body with a task's frozen head as buffers: ``forward(x)`` gives logits, parameters stay ``fc1``, ``fc2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(super().forward(x), self.head_weight, self.head_bias)


def data_hook(data: TaskData, heads: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``hook(tasks, split, n, batch_size, seed) -> MergeData``: per task the headed body and its inputs."""
    from weightlens.merge.data import MergeData
    from weightlens.zoo._common import seeded_batches

    def hook(tasks: tuple[str, ...], split: str, n: int, batch_size: int, seed: int) -> MergeData:
        check_choice("split", split, SPLITS)

        def model(task: str, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
            with torch.device("meta"):
                module = _HeadedBody(TASK_SETTINGS["width"])
            params = tr.checked_params(weights, module, "digits-tasks merge_data model")
            module.load_state_dict(params, assign=True)
            head = PLANTED["of"] if task == PLANTED["task"] else task
            module.register_buffer("head_weight", heads[f"{head}.weight"])
            module.register_buffer("head_bias", heads[f"{head}.bias"])
            return module

        def batches(task: str) -> list[torch.Tensor]:
            return [b[0] for b in seeded_batches(data(task, split)[:1], n, batch_size, seed)]

        return MergeData(tasks, model, batches,
                         f"digits-tasks {split}, {n} examples per task (seed {seed}), batches of {batch_size}")

    return hook
