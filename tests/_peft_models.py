"""Tiny PEFT LoRA adapters for tests, trained here for a few optimizer steps: deterministic, offline, seconds.

The base models come from ``tests/_hf_models.py`` (tiny BERT, GPT-2, Llama folders built from configs).
:func:`train_adapter` wraps one with ``peft.get_peft_model``, takes a few Adam steps on random tokens
(so ``lora_B`` is no longer zero) and writes the adapter folder with ``save_pretrained``;
:func:`merged_weights` is the independent reference: peft's own ``merge_and_unload()`` of the adapter
on a fresh copy of the base, as float64. :func:`conv_adapter` does the same for a two-layer CNN (no
transformers model has a ``Conv2d`` to target). Import this module only where ``peft`` and
``transformers`` are installed (``pytest.importorskip("peft")`` first).

>>> base = tiny_llama(tmp_path)
>>> plain = train_adapter(base, tmp_path / "plain", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
>>> merged = merged_weights(base, plain)     # {key: merged weight, float64}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from safetensors.torch import save_file

__all__ = ["conv_adapter", "merged_weights", "train_adapter"]


def _model(base: Path, cls: str | None, **kwargs: Any) -> torch.nn.Module:
    """The model of ``base`` as class ``cls`` (default: the class its config names)."""
    name = cls or transformers.AutoConfig.from_pretrained(base).architectures[0]
    return getattr(transformers, name).from_pretrained(base, **kwargs)


def _steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float) -> None:
    """A few Adam steps on the model's own loss (or the mean square of its first output when it has none)."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out[0].pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def train_adapter(base: Path, out: Path, config: peft.LoraConfig, *, cls: str | None = None, steps: int = 3,
                  seed: int = 0, lr: float = 1e-2, safe: bool = True, **model_kwargs: Any) -> Path:
    """A LoRA adapter of ``base`` (an HF folder) trained ``steps`` Adam steps on random tokens, saved in
    ``out`` (``adapter_model.safetensors``, or ``.bin`` when not ``safe``). ``cls`` picks the model class
    (e.g. ``"BertForSequenceClassification"`` with ``num_labels=2`` in ``model_kwargs``)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_model(base, cls, **model_kwargs), config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (2, 8), generator=g)
    batch = {"input_ids": ids}
    if cls is not None and cls.endswith("ForSequenceClassification"):
        batch["labels"] = torch.tensor([0, 1])
    elif hasattr(model, "lm_head") or hasattr(model.get_base_model(), "lm_head"):
        batch["labels"] = ids
    _steps(model, batch, steps, lr)
    model.save_pretrained(out, safe_serialization=safe)
    return Path(out)


def merged_weights(base: Path, adapter: Path, *, cls: str | None = None, **model_kwargs: Any
                   ) -> dict[str, torch.Tensor]:
    """peft's reference: ``PeftModel.from_pretrained(base model, adapter).merge_and_unload()``'s state dict, float64."""
    model = peft.PeftModel.from_pretrained(_model(base, cls, **model_kwargs), adapter)
    merged = model.merge_and_unload()
    return {k: v.detach().to(torch.float64).clone() for k, v in merged.state_dict().items()}


class TinyCNN(torch.nn.Module):
    """A 3x3 and a 1x1 convolution: LoRA on both is reshaped (3x3) and squeezed (1x1) by peft."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.point = torch.nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point(torch.relu(self.conv(x)))


def conv_adapter(parent: Path, *, r: int = 2, seed: int = 0) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """``(base file, adapter folder, merged weights)`` of a LoRA on both convolutions of :class:`TinyCNN`."""
    torch.manual_seed(seed)
    model = TinyCNN()
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    base = parent / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=4, target_modules=["conv", "point"]))
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        pm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(parent / "cnn_lora")
    merged = pm.merge_and_unload()
    return base, parent / "cnn_lora", {k: v.detach().to(torch.float64) for k, v in merged.state_dict().items()}
