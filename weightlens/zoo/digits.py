"""Two zoos trained here on sklearn's 8x8 digits (1797 real images, no download).

``digits-pairs``
    Pairs of independently trained MLPs ``64-h-h-10`` (ReLU; Adam 1e-3, batch 128, 30 epochs; seeds 1
    and 2 for ``a`` and ``b``) per width ``h``, for linear mode connectivity and Git Re-Basin. Files
    ``width-<h>/a.safetensors`` and ``width-<h>/b.safetensors`` (keys ``fc1/fc2/fc3.weight`` and
    ``.bias``) and ``split.safetensors`` (train/test indices: stratified 75/25, ``random_state=0``).
    Inputs are standardized per pixel with training statistics. The manifest holds accuracy and loss of
    ``a``, ``b`` and their plain average (the naive midpoint) on train and test.
``digits-tasks``
    A body ``64-512-512`` (ReLU) pretrained 10 epochs on the original digits (with a temporary head,
    then dropped) and one fine-tune per task. Tasks are fixed transforms of the same images: ``rot90``
    (counter-clockwise), ``hflip``, ``invert`` (``16 - x``) and ``blockperm`` (the 4x4 grid of 2x2-pixel
    blocks permuted by a fixed seeded permutation, :func:`block_permutation`), applied to the raw 0..16
    pixels. Every input, pretraining included, is then scaled by one fixed ``(x - m) / s`` (``m``, ``s``:
    mean and std of all raw pixels of the original training images), as a pretrained model's input
    normalization would be (so ``invert`` is a real distribution shift). Per task a linear head is
    fitted on frozen base features (L2 logistic regression by L-BFGS, weight decay 3e-2; this gives the
    base accuracy) and frozen; then the body is fine-tuned (Adam 3e-4, batch 128, 5 epochs).
    ``base.safetensors`` and ``<task>.safetensors`` hold only the body (``fc1``, ``fc2``);
    ``heads.safetensors`` holds ``<task>.weight`` and ``<task>.bias``. One image split serves every task
    (stratified test 25%, then val 15% of the rest), so no val or test image is seen in any form while
    training. The manifest also records task arithmetic over all four tasks at alpha 0.25 and 1.0.
    A fifth fine-tune, ``rot90_swap``, is a planted conflict (``load_tasks(planted=True)``; not among the
    tasks by default): ``rot90``'s inputs with labels swapped in pairs, through ``rot90``'s frozen head, only
    ``fc2`` trained (Adam 1e-3, 5 epochs), so its update opposes ``rot90``'s in ``fc2`` alone; the manifest's
    ``planted`` records what a merge with it does to ``rot90`` and what restoring ``fc2`` gives back.

Sizes: ``"ci"`` and ``"demo"`` train identically, except that ``digits-pairs`` at ``"demo"`` adds width
2048. Builds use one torch thread and seeded generators (the global RNG is left alone): rebuilding gives
bitwise identical files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from weightlens.errors import InvalidParameterError
from weightlens.zoo import _digits_data as dd
from weightlens.zoo import _digits_tasks as dt
from weightlens.zoo import _digits_train as tr
from weightlens.zoo._common import Metrics, PairZoo, TaskZoo, read_manifest
from weightlens.zoo._digits_data import TASKS, block_permutation
from weightlens.zoo._digits_tasks import ALPHAS, TASK_SETTINGS, task_arithmetic
from weightlens.zoo._digits_train import MLP, Body

#: Bumped per zoo when a change to its recipe changes the files or the scorer (see weightlens.zoo.build).
RECIPE_VERSION = {"digits-pairs": 1, "digits-tasks": 2}

__all__ = [
    "ALPHAS", "MLP", "PAIR_SETTINGS", "PAIR_WIDTHS", "TASKS", "TASK_SETTINGS", "Body",
    "block_permutation", "build_pairs", "build_tasks", "load_pairs", "load_tasks", "task_arithmetic",
]

PAIR_WIDTHS: dict[str, tuple[int, ...]] = {"ci": (16, 128, 512), "demo": (16, 128, 512, 2048)}
PAIR_SETTINGS: dict[str, Any] = {
    "architecture": "64-h-h-10 MLP, ReLU",
    "inputs": "per-pixel standardization with training statistics (std 0 -> 1)",
    "optimizer": "Adam",
    "lr": 1e-3,
    "batch_size": 128,
    "epochs": 30,
    "seeds": {"a": 1, "b": 2},
    "test_size": 0.25,
    "split_seed": 0,
}
PAIR_SPLITS = ("train", "test")

PairData = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _check_size(size: str) -> None:
    if size not in PAIR_WIDTHS:
        raise InvalidParameterError(
            f"The 'size' parameter must be one of {tuple(PAIR_WIDTHS)}. Got {size!r} instead."
        )


# ------------------------------------------------------------------------------------ pairs


def _pair_data(split: Mapping[str, np.ndarray]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = dd.raw_digits()
    mean, std = dd.standardizer(x[split["train"]])
    return {s: dd.tensors(x[split[s]], y[split[s]], mean, std) for s in PAIR_SPLITS}


def _pair_evaluator(width: int, data: PairData) -> Callable[[Mapping[str, torch.Tensor], str], Metrics]:
    with torch.device("meta"):  # parameters come from the state dict: no init, no RNG use
        module = MLP(width).requires_grad_(False)

    def evaluate(state_dict: Mapping[str, torch.Tensor], split: str) -> Metrics:
        """Accuracy and mean cross-entropy of an ``MLP`` state dict on ``"train"`` or ``"test"``."""
        dt.check_choice("split", split, PAIR_SPLITS)
        params = tr.checked_params(state_dict, module, f"digits-pairs (width {width}) evaluate")
        x, y = data[split]
        return tr.score(tr.features_of(module, params, x), y)

    return evaluate


def _train_mlp(width: int, seed: int, data: tuple[torch.Tensor, torch.Tensor], bar: tqdm) -> dict:
    s = PAIR_SETTINGS
    model = tr.seeded(lambda: MLP(width), seed)
    tr.train(model, model.parameters(), data, lr=s["lr"], epochs=s["epochs"],
             batch_size=s["batch_size"], seed=seed, on_epoch=bar.update)
    return tr.state_dict_of(model)


def _build_width(folder: Path, width: int, data: PairData, bar: tqdm) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    evaluate = _pair_evaluator(width, data)
    models = {}
    for name, seed in PAIR_SETTINGS["seeds"].items():
        bar.set_postfix_str(f"width {width}, model {name}")
        models[name] = _train_mlp(width, seed, data["train"], bar)
        save_file(models[name], str(folder / f"{name}.safetensors"))
    models["midpoint"] = {k: 0.5 * (models["a"][k] + models["b"][k]) for k in models["a"]}
    out: dict[str, Any] = {m: {s: evaluate(sd, s) for s in PAIR_SPLITS} for m, sd in models.items()}
    out["midpoint_loss_above_chord"] = {  # the naive barrier at alpha = 0.5
        s: out["midpoint"][s]["loss"] - 0.5 * (out["a"][s]["loss"] + out["b"][s]["loss"])
        for s in PAIR_SPLITS
    }
    return out


def _pair_summary(pairs: Mapping[str, Any]) -> str:
    parts = []
    for w, p in pairs.items():
        acc = [p[m]["test"]["accuracy"] for m in ("a", "b", "midpoint")]
        parts.append(f"h={w}: test acc {acc[0]:.3f}/{acc[1]:.3f}, naive midpoint {acc[2]:.3f}")
    return "; ".join(parts)


def build_pairs(folder: Path, *, size: str, progress: bool) -> dict[str, Any]:
    """Train the ``digits-pairs`` zoo into ``folder``; return the manifest content.

    Parameters
    ----------
    folder : Path
        Empty folder to write into (``weightlens.zoo.build`` makes the build atomic).
    size : {"ci", "demo"}
        ``"ci"``: widths 16, 128, 512; ``"demo"`` adds 2048.
    progress : bool
        Show a tqdm bar over training epochs.
    """
    _check_size(size)
    folder, widths, s = Path(folder), PAIR_WIDTHS[size], PAIR_SETTINGS
    train_idx, test_idx = dd.stratified_split(dd.raw_digits()[1], s["test_size"], s["split_seed"])
    split = {"train": train_idx, "test": test_idx}
    dd.save_split(folder / "split.safetensors", split)
    data = _pair_data(split)
    total = len(widths) * len(s["seeds"]) * s["epochs"]
    pairs = {}
    bar = tqdm(total=total, desc="digits-pairs", unit="epoch", disable=not progress)
    with tr.build_threads(), bar:
        for width in widths:
            pairs[str(width)] = _build_width(folder / f"width-{width}", width, data, bar)
    return {
        "kind": "pairs",
        "widths": list(widths),
        "settings": s,
        "split": {"file": "split.safetensors", "train": len(train_idx), "test": len(test_idx)},
        "pairs": pairs,
        "summary": _pair_summary(pairs),
    }


def load_pairs(folder: Path, *, width: int = 128) -> PairZoo:
    """Open one width of a built ``digits-pairs`` zoo.

    Returns a :class:`PairZoo` whose ``manifest`` is the whole zoo's manifest plus ``"width"``;
    ``manifest["pairs"][str(width)]`` holds this width's numbers.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    widths = tuple(manifest["widths"])
    if width not in widths:
        raise InvalidParameterError(
            f"The 'width' parameter must be one of {widths} (built in {folder}). Got {width!r} instead."
        )
    data = _pair_data(dd.load_split(folder / "split.safetensors"))
    sub = folder / f"width-{width}"

    def get_data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardized float32 inputs and int64 labels of ``"train"`` or ``"test"`` (copies)."""
        dt.check_choice("split", split, PAIR_SPLITS)
        return data[split][0].clone(), data[split][1].clone()

    return PairZoo(
        name="digits-pairs", folder=folder, a=sub / "a.safetensors", b=sub / "b.safetensors",
        manifest={**manifest, "width": width}, evaluate=_pair_evaluator(width, data),
        make_module=lambda: MLP(width), data=get_data,
    )


# ------------------------------------------------------------------------------------ tasks


def build_tasks(folder: Path, *, size: str, progress: bool) -> dict[str, Any]:
    """Train the ``digits-tasks`` zoo into ``folder``; return the manifest content.

    Parameters
    ----------
    folder : Path
        Empty folder to write into (``weightlens.zoo.build`` makes the build atomic).
    size : {"ci", "demo"}
        Both train identically (the whole build takes seconds).
    progress : bool
        Show a tqdm bar over training epochs.
    """
    _check_size(size)
    folder = Path(folder)
    split = dt.task_splits(dd.raw_digits()[1])
    dd.save_split(folder / "split.safetensors", split)
    data = dt.TaskData(split)
    trained = dt.train_zoo(folder, data, progress)
    base, finetuned = trained["base"], trained["finetuned"]
    planted = dt.train_planted(folder, data, base, trained["heads"])
    with tr.build_threads():
        evaluate = dt.evaluator(data, trained["heads"])
        metrics = dt.task_metrics(evaluate, base, finetuned)
        arithmetic = dt.arithmetic_record(evaluate, base, finetuned)
        planted_record = dt.planted_record(evaluate, base, finetuned, planted)
    acc = {m: metrics["mean"][m]["test"]["accuracy"] for m in ("base", "finetuned")}
    merged = arithmetic[str(ALPHAS[0])]["mean"]["test"]["accuracy"]
    return {
        "kind": "tasks",
        "tasks": list(TASKS),
        "settings": TASK_SETTINGS,
        "block_permutation": block_permutation().tolist(),
        "files": {"base": "base.safetensors", "heads": "heads.safetensors", "split": "split.safetensors",
                  "finetuned": {t: f"{t}.safetensors" for t in TASKS}},
        "split": {k: len(v) for k, v in split.items()},
        "pretrain_on_original": trained["pretrain"],
        **metrics,
        "task_arithmetic": arithmetic,
        "planted": planted_record,
        "summary": f"test acc, mean of {len(TASKS)} tasks: base {acc['base']:.3f}, fine-tuned "
        f"{acc['finetuned']:.3f}, task arithmetic (alpha {ALPHAS[0]}) {merged:.3f}",
    }


def load_tasks(folder: Path, *, planted: bool = False) -> TaskZoo:
    """Open a built ``digits-tasks`` zoo; its ``evaluate`` takes splits ``train``, ``val``, ``test``.

    ``planted=True`` adds the planted conflict ``rot90_swap`` as a fifth task (``manifest["planted"]`` says
    what it is and what it does to a merge): a fine-tune whose update lies in ``fc2`` only and opposes
    ``rot90``'s there, so that a merge of all five loses ``rot90`` through ``fc2``.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    data = dt.TaskData(dd.load_split(folder / "split.safetensors"))
    heads = load_file(str(folder / "heads.safetensors"))
    tasks = [*manifest["tasks"], *([manifest["planted"]["task"]] if planted else [])]
    return TaskZoo(
        name="digits-tasks", folder=folder, base=folder / "base.safetensors",
        finetuned={t: folder / f"{t}.safetensors" for t in tasks},
        manifest=manifest, evaluate=dt.evaluator(data, heads), data_hook=dt.data_hook(data, heads),
    )
