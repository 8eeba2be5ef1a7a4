"""Shared pieces of the model zoo: where it lives on disk, manifests, and the two zoo kinds.

A *task zoo* is one base model and several fine-tunes of it (task vectors); a *pair zoo* is two
independently trained models of one architecture (linear mode connectivity, Git Re-Basin).
Both are plain folders of safetensors files plus ``manifest.json``; both expose ``evaluate``.
"""

from __future__ import annotations

import dataclasses

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightlens.io._atomic import atomic_write_text

SIZES = ("ci", "demo")

Metrics = dict[str, float]  # {"accuracy": ..., "loss": ...}


def home() -> Path:
    """Root of weightlens' cache, the one default location of the zoo (``home() / "zoo"``).

    ``$WEIGHTLENS_HOME`` when set, else ``$XDG_CACHE_HOME/weightlens`` when that is an absolute path,
    else ``~/.cache/weightlens``. Plain Python, the command line, the notebooks and ``dev.sh`` all use
    this function, so they find the same zoo.
    """
    env = os.environ.get("WEIGHTLENS_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "weightlens"
    return Path.home() / ".cache" / "weightlens"


def zoo_dir(name: str, size: str, root: Path | None = None) -> Path:
    """Folder of one zoo at one size: ``<root or home()/zoo>/<size>/<name>``."""
    base = Path(root) if root is not None else home() / "zoo"
    return base / size / name


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` last: its presence marks a complete build."""
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read a zoo's manifest; a missing one means the zoo was never built (or was interrupted)."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No zoo at {folder} (manifest.json missing). Build it with: weightlens zoo build --size "
            f"{folder.parent.name}"
        )
    return json.loads(path.read_text())


@dataclass(frozen=True)
class TaskZoo:
    """A base model and its fine-tunes, with a scorer.

    Attributes
    ----------
    name : zoo name, e.g. ``"digits-tasks"``.
    folder : where the files are.
    base : source of the base weights (a safetensors file or an HF folder).
    finetuned : ``{task: source}`` of fine-tuned weights, same keys as ``base``.
    manifest : accuracies of base and fine-tunes per task and split, and the build settings.
    evaluate : ``evaluate(state_dict, task, split) -> {"accuracy", "loss"}`` with split in
        ``{"val", "test"}``.
    data_hook : ``data_hook(tasks, split, n, batch_size, seed) -> MergeData``, what :meth:`merge_data` returns
        (None: the zoo has none).
    opened : how :func:`weightlens.zoo.load` opened it (``size`` and its options, e.g. ``planted``): what a
        recipe of a data-based merge records to open it again.
    """

    name: str
    folder: Path
    base: Path
    finetuned: dict[str, Path]
    manifest: dict[str, Any]
    evaluate: Callable[[Mapping[str, torch.Tensor], str, str], Metrics] = field(repr=False)
    data_hook: Callable[..., Any] | None = field(default=None, repr=False)
    opened: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.finetuned)

    def merge_data(self, split: str = "train", *, n: int = 256, batch_size: int = 32, seed: int = 0) -> Any:
        """The data hook of data-based merges (``wl.merge(tv, method="regmean", data=zoo.merge_data())``).

        A ``weightlens.merge.MergeData`` over this zoo's tasks: per task its model (body and frozen head) built
        from given weights, and the first ``n`` examples of ``split`` in a seeded order (``seed``), in batches
        of ``batch_size`` (FusionBench's defaults: 256 examples, batches of 32). Labels are not used.
        """
        from weightlens.errors import InvalidParameterError

        if self.data_hook is None:
            raise InvalidParameterError(f"The {self.name!r} zoo has no data hook for data-based merges.")
        for name, value in (("n", n), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"The {name!r} parameter of merge_data must be an int >= 1. "
                                            f"Got {value!r} instead.")
        data = self.data_hook(tuple(self.tasks), split, n, batch_size, seed)
        spec = {"zoo": self.name, "size": self.opened.get("size", self.manifest.get("size")),
                "options": {k: v for k, v in self.opened.items() if k != "size"},
                "split": split, "n": n, "batch_size": batch_size, "seed": seed}
        return dataclasses.replace(data, spec=spec)

    def task_vectors(self, tasks: list[str] | None = None, **kwargs: Any):
        """``TaskVectors`` of the chosen tasks (all by default)."""
        from weightlens.taskvectors import TaskVectors

        names = tasks if tasks is not None else self.tasks
        return TaskVectors(self.base, {t: self.finetuned[t] for t in names}, **kwargs)


@dataclass(frozen=True)
class PairZoo:
    """Two independently trained models of one architecture, with a scorer and the module.

    ``evaluate(state_dict, split) -> {"accuracy", "loss"}``, split in ``{"train", "test"}``;
    ``make_module()`` returns an untrained ``nn.Module`` whose ``state_dict`` keys match;
    ``data(split) -> (inputs, labels)`` tensors for batched evaluation and activation matching.
    """

    name: str
    folder: Path
    a: Path
    b: Path
    manifest: dict[str, Any]
    evaluate: Callable[[Mapping[str, torch.Tensor], str], Metrics] = field(repr=False)
    make_module: Callable[[], torch.nn.Module] = field(repr=False)
    data: Callable[[str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def seeded_batches(tensors: tuple[torch.Tensor, ...], n: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``n`` rows of ``tensors`` in the order of a permutation seeded ``seed``, in batches."""
    order = torch.randperm(len(tensors[0]), generator=torch.Generator().manual_seed(seed))[:n]
    return [tuple(t[idx] for t in tensors) for idx in order.split(batch_size)]
