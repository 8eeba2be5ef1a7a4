"""Small models and data for the data-based merges' tests (``regmean``, ``fisher``): a two-layer network, its
``MergeData``, and the FusionBench reference files (``tests/peer_references/data/fusionbench_*``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

import weightlens as wl
from weightlens.merge import MergeData

REFERENCES = Path(__file__).parent / "peer_references" / "data"


class Net(nn.Module):
    """``logits = l2(tanh(l1(x))) + shift`` (l1: 5 -> 6, l2: 6 -> 4): the references' architecture."""

    def __init__(self, n_in: int = 5, hidden: int = 6, n_out: int = 4) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)
        self.shift = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))) + self.shift


def net(weights: Mapping[str, torch.Tensor], cls: type[nn.Module] = Net, **kwargs: Any) -> nn.Module:
    """A ``cls`` module holding float32 copies of ``weights``."""
    module = cls(**kwargs)
    module.load_state_dict({k: torch.as_tensor(v).float().clone() for k, v in weights.items()})
    return module


def merge_data(inputs: Mapping[str, torch.Tensor], batch_size: int = 8, cls: type[nn.Module] = Net,
               calls: list[str] | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any) -> MergeData:
    """``MergeData`` over ``inputs`` (``{task: (N, ...)}``) in batches, models and inputs in ``dtype``;
    ``calls`` records each model built."""

    def model(task: str, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        if calls is not None:
            calls.append(task)
        return net(weights, cls, **kwargs).to(dtype)

    return MergeData(tuple(inputs), model, lambda task: list(inputs[task].to(dtype).split(batch_size)), "test inputs")


def random_case(n_tasks: int = 3, seed: int = 0, n: int = 24, scale: float = 0.3) -> tuple[wl.TaskVectors, dict]:
    """Task vectors of ``Net`` (a random base, fine-tunes base + ``scale`` noise) and ``n x 5`` inputs per task."""
    g = torch.Generator().manual_seed(seed)
    base = {k: v.detach().clone() for k, v in _seeded_net(seed).state_dict().items()}
    fts = {f"t{i}": {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n_tasks)}
    inputs = {f"t{i}": torch.randn(n, 5, generator=g) * (1 + 0.5 * i) + 0.2 * i for i in range(n_tasks)}
    return wl.TaskVectors(base, fts), inputs


def _seeded_net(seed: int) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net()


def reference_cases(method: str) -> list[Path]:
    """The committed FusionBench reference files of ``method``."""
    return sorted(REFERENCES.glob(f"fusionbench_{method}_*.safetensors"))


def load_reference(path: Path) -> tuple[wl.TaskVectors, MergeData, dict[str, torch.Tensor], dict[str, Any]]:
    """``(task vectors, data, expected merged weights, metadata)`` of one reference file."""
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    tv = wl.TaskVectors(part("input.base."), {t: part(f"input.{t}.") for t in meta["tasks"]})
    inputs = {t: tensors[f"input.batches.{t}"] for t in meta["tasks"]}
    return tv, merge_data(inputs, meta["batch_size"], dtype=torch.float64), part("expected.merged."), meta
