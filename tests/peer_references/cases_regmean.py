"""FusionBench's own RegMean and Fisher merging, end to end from data: ``python cases_regmean.py OUTDIR``.

Run with the peers' Python (``fusion-bench==0.2.33``; ``/work/mk-venv`` or ``make.py``'s environment). Calls
``fusion_bench.method.regmean.regmean.regmean_merging`` and
``fusion_bench.method.fisher_merging.fisher_merging.fisher_merging``, the functions FusionBench's classes wrap
(from MergeLM): each takes the fine-tuned models and, per model, a "trainer" that yields the task's batches. The
trainer here is the smallest object those functions read (``get_train_dataloader``, ``_train_batch_size``,
``_prepare_inputs``); the models are a two-layer network ``x -> l2(tanh(l1(x))) + shift`` (float64), whose
forward returns an object with ``.logits`` as HF models do. So FusionBench computes the statistics itself (its
forward hooks' input Grams; its per-batch squared gradients) and merges with them; nothing is patched.

Inputs are well conditioned: each task's inputs are ``24 x 5`` rows with distinct scales per column, so every
Gram is full rank (condition number below 1e3, checked), and the fine-tunes move every weight. ``shift`` is
not in a linear layer: RegMean averages it, Fisher weighs it by its own Fisher.

Each file ``fusionbench_<method>_<case>.safetensors`` holds ``input.base.<key>``, ``input.<task>.<key>`` (fp32),
``input.batches.<task>`` (the task's inputs, fp32, in batch order) and ``expected.merged.<key>`` (FusionBench's
merged weights); metadata (JSON strings): ``peer``, ``method``, ``params``, ``tasks``, ``keys``, ``outputs``,
``batch_size``, ``n_examples``, ``call``, ``architecture``.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import nn

from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging
from fusion_bench.method.regmean.regmean import regmean_merging

TASKS = ("t0", "t1", "t2")
N_EXAMPLES, BATCH = 24, 8
ARCHITECTURE = "logits = l2(tanh(l1(x))) + shift; l1: Linear(5, 6), l2: Linear(6, 4), shift: (4,)"


class Net(nn.Module):
    """The case's model; ``forward(x)`` returns ``.logits`` as FusionBench's functions expect."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6, dtype=torch.float64)
        self.l2 = nn.Linear(6, 4, dtype=torch.float64)
        self.shift = nn.Parameter(torch.zeros(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.l2(torch.tanh(self.l1(x))) + self.shift)


class Trainer:
    """What ``regmean_merging`` and ``fisher_merging`` read of an HF trainer: the task's batches, in order."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self._train_batch_size = x, BATCH

    def get_train_dataloader(self) -> list[dict[str, torch.Tensor]]:
        return [{"x": b} for b in self.x.split(BATCH)]

    def _prepare_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return inputs


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Rounded to float32 and back: both sides then see the same values."""
    return t.float().double()


def make_inputs(seed: int) -> tuple[dict, dict, dict]:
    """``(base, {task: fine-tune}, {task: inputs})``: state dicts and ``24 x 5`` inputs, fp32 values in float64."""
    g = torch.Generator().manual_seed(seed)
    base = {"l1.weight": torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.5,
            "l1.bias": torch.randn(6, generator=g, dtype=torch.float64) * 0.1,
            "l2.weight": torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5,
            "l2.bias": torch.randn(4, generator=g, dtype=torch.float64) * 0.1,
            "shift": torch.randn(4, generator=g, dtype=torch.float64) * 0.1}
    base = {k: _f32(v) for k, v in base.items()}
    fts, data = {}, {}
    for i, task in enumerate(TASKS):
        fts[task] = {k: _f32(v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)) for k, v in base.items()}
        scales = torch.tensor([1.0, 0.7, 1.4, 0.5, 1.1], dtype=torch.float64) * (1.0 + 0.5 * i)
        x = _f32(torch.randn(N_EXAMPLES, 5, generator=g, dtype=torch.float64) * scales + 0.2 * i)
        gram = x.T @ x
        assert torch.linalg.cond(gram) < 1e3, "well-conditioned inputs"
        data[task] = x
    return base, fts, data


def _models(fts: dict) -> list[Net]:
    out = []
    for state in fts.values():
        net = Net()
        net.load_state_dict(state)
        out.append(net)
    return out


def write(outdir: Path, method: str, case: str, params: dict, call: str, base: dict, fts: dict, data: dict,
          merged: dict) -> Path:
    """One reference file (header keys sorted, so a re-run on the same pins writes the same bytes)."""
    tensors = {f"input.base.{k}": v for k, v in base.items()}
    for task in TASKS:
        tensors.update({f"input.{task}.{k}": v for k, v in fts[task].items()})
        tensors[f"input.batches.{task}"] = data[task]
    tensors.update({f"expected.merged.{k}": v for k, v in merged.items()})
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    meta = {"peer": f"fusion-bench=={importlib.metadata.version('fusion-bench')}", "method": method,
            "params": params, "tasks": list(TASKS), "keys": list(base), "outputs": ["merged"],
            "batch_size": BATCH, "n_examples": N_EXAMPLES, "call": call, "architecture": ARCHITECTURE}
    path = Path(outdir) / f"fusionbench_{method}_{case}.safetensors"
    save_file(tensors, str(path), metadata={k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size:])
    return path


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    for case, seed, ratio in (("default", 0, 0.95), ("plain", 1, 1.0), ("ratio01", 2, 0.1)):
        base, fts, data = make_inputs(seed)
        trainers = [Trainer(data[t]) for t in TASKS]
        merged = regmean_merging(_models(fts), trainers, [], [N_EXAMPLES] * len(TASKS), ratio)
        write(outdir, "regmean", case, {"reduce_non_diagonal_ratio": ratio},
              "fusion_bench.method.regmean.regmean.regmean_merging", base, fts, data, merged)
    for case, seed, normalize, minimal in (("default", 3, True, 1e-6), ("unnormalized", 4, False, 1e-6),
                                           ("minimal", 5, True, 1e-2)):
        base, fts, data = make_inputs(seed)
        trainers = [Trainer(data[t]) for t in TASKS]
        merged = fisher_merging(_models(fts), trainers, [], [N_EXAMPLES] * len(TASKS), None, normalize, minimal)
        write(outdir, "fisher", case, {"normalize_fisher_weight": normalize, "minimal_fisher_weight": minimal},
              "fusion_bench.method.fisher_merging.fisher_merging.fisher_merging", base, fts, data,
              {k: v.detach() for k, v in merged.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
