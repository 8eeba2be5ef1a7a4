"""PEFT LoRA adapters: what an adapter folder's config and tensor names say about its base model's keys.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
Its tensors are named ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``<module>.lora_embedding_A`` / ``_B``); the update of the base key ``<module>.weight`` is
``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and
``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches (peft's
``get_pattern_key`` rule: the pattern, as a regular expression, matches the end of the module's name
at a dot). Orientation follows the base layer: ``fan_in_fan_out`` (GPT-2 ``Conv1D``, weights stored
``(in, out)``) and embeddings transpose ``B @ A``; convolutions reshape it to the kernel's shape.
Other tensors are full weights the adapter replaces (``modules_to_save`` copies, biases trained with
``bias="all"`` / ``"lora_only"``, embeddings saved beside their LoRA); peft's ``base_layer`` and
``modules_to_save`` name parts are dropped and its ``original_module`` copies (the base's values) skipped.

Everything here reads headers and the config only; :class:`weightlens.io.sources.AdapterCheckpoint`
reads the tensors. Options that make the merged update something else than ``scale * B @ A`` plus the
full tensors are refused by :func:`check_config`, one sentence each, naming the option and what to do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from weightlens.errors import CheckpointError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterLayout", "LoraFactors", "LoraModule", "adapter_weights",
           "check_config", "layout_of", "read_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_WAY_OUT = ("merge it into its base with peft (PeftModel.merge_and_unload()), save that model and pass its folder "
            "as a full fine-tune")
# Inits that change the base's weights when the adapter is made (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): an
# adapter saved without peft's conversion (path_initial_model_for_weight_conversion) is an update of that
# changed base, not of the original.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

Layout = Literal["linear", "fan_in_fan_out", "embedding", "conv"]


class LoraFactors(NamedTuple):
    """One low-rank update in the base key's orientation: ``delta = (B @ A * scale).reshape(shape)``.

    ``A`` is ``(r, n)`` and ``B`` is ``(m, r)`` (fp32, or fp64 when stored so), where ``(m, n)`` is the
    base tensor seen as a matrix: its shape for 2-D keys, ``(out, in * kernel)`` for convolutions.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def dense(self) -> torch.Tensor:
        """``B @ A * scale`` as an ``(m, n)`` matrix, in the factors' dtype."""
        return (self.B @ self.A) * self.scale


@dataclass(frozen=True)
class LoraModule:
    """What the headers and config say of one LoRA update (no tensor read).

    Attributes
    ----------
    key : the base model's key it changes, e.g. ``'model.layers.0.self_attn.q_proj.weight'``.
    a_key, b_key : the adapter file's keys of ``lora_A`` and ``lora_B``.
    shape : shape of the update: the base tensor's.
    rank, alpha, scale : ``r``, ``lora_alpha`` of this module and ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
    layout : ``"linear"`` (``B @ A`` as is), ``"fan_in_fan_out"`` and ``"embedding"`` (transposed),
        ``"conv"`` (reshaped to the kernel).
    """

    key: str
    a_key: str
    b_key: str
    shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float
    layout: Layout

    def orient(self, a: torch.Tensor, b: torch.Tensor) -> LoraFactors:
        """The stored ``lora_A``, ``lora_B`` as factors in the base key's orientation."""
        if self.layout in ("fan_in_fan_out", "embedding"):  # (B @ A).T = A.T @ B.T
            return LoraFactors(b.T, a.T, self.scale)
        if self.layout == "conv":
            return LoraFactors(a.reshape(self.rank, -1), b.reshape(b.shape[0], self.rank), self.scale)
        return LoraFactors(a, b, self.scale)


@dataclass(frozen=True)
class AdapterLayout:
    """``modules``: ``{base model key: LoraModule}``; ``full``: ``{base model key: file key}`` of the full
    tensors the adapter stores (its fine-tuned values of those keys)."""

    modules: dict[str, LoraModule]
    full: dict[str, str]


# ---------------------------------------------------------------------------------------- files
def adapter_weights(folder: Path) -> Path | None:
    """The weights file of ``folder`` when it is a PEFT adapter folder (it has ``adapter_config.json``)."""
    if not (folder / ADAPTER_CONFIG).is_file():
        return None
    for name in ADAPTER_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(
        f"{folder}: has {ADAPTER_CONFIG} but neither {' nor '.join(ADAPTER_WEIGHTS)}; copy the adapter's weights "
        "file next to its config (peft's save_pretrained writes both)."
    )


def read_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``folder`` as a dict."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the adapter config ({exc}).") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the adapter config is {type(config).__name__}, not a JSON object.")
    return config


# ---------------------------------------------------------------------------------------- config
def check_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse configs whose merged update is not ``scale * B @ A`` plus full tensors (one sentence each)."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        _refuse(where, f"peft_type is {config.get('peft_type')!r}, and weightlens reads LoRA adapters only, so "
                       f"{_WAY_OUT}.")
    init = config.get("init_lora_weights", True)
    checks = [
        ("use_dora", bool(config.get("use_dora")),
         "DoRA (use_dora=True) rescales every column by a trained magnitude vector, so its update is not the "
         "low-rank product B @ A"),
        ("lora_bias", bool(config.get("lora_bias")),
         "lora_bias=True trains a bias on lora_B that peft adds to the base layer's bias"),
        ("trainable_token_indices", config.get("trainable_token_indices") is not None,
         "trainable_token_indices stores per-token embedding deltas"),
        ("target_parameters", bool(config.get("target_parameters")),
         "target_parameters puts LoRA on bare parameters (e.g. MoE experts), whose update weightlens does not model"),
        ("layer_replication", bool(config.get("layer_replication")),
         "layer_replication changes the base model's layers"),
        ("use_qalora", bool(config.get("use_qalora")), "QA-LoRA (use_qalora=True) pools the inputs of lora_A"),
        ("alora_invocation_tokens", config.get("alora_invocation_tokens") is not None,
         "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens"),
        ("arrow_config", config.get("arrow_config") is not None, "Arrow (arrow_config) routes between adapters"),
        ("use_bdlora", bool(config.get("use_bdlora")), "block-diagonal LoRA (use_bdlora) is not B @ A"),
        ("kasa_config", config.get("kasa_config") is not None,
         "KaSA (kasa_config) truncates the base weights and scales B @ A by trained singular values"),
        ("init_lora_weights", isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS),
         f"init_lora_weights={init!r} changed the base's weights when the adapter was made, so B @ A is an "
         "update of that changed base (save it with peft's path_initial_model_for_weight_conversion to get a "
         "plain LoRA of the original base)"),
    ]
    for option, refused, why in checks:
        if refused:
            _refuse(where, f"{why}; weightlens does not model {option}: {_WAY_OUT}.")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        _refuse(where, f"bias={config.get('bias')!r} is not one of peft's 'none', 'all', 'lora_only'; fix the config.")


def _refuse(where: str, sentence: str) -> None:
    raise CheckpointError(f"PEFT adapter {where}: {sentence}")


# ---------------------------------------------------------------------------------------- keys
def layout_of(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str) -> AdapterLayout:
    """Which base model keys the adapter changes and how, from its config and tensor shapes (file keys)."""
    parts: dict[str, dict[str, str]] = {}  # module -> {"A"|"B"|"EA"|"EB": file key}
    full: dict[str, tuple[int, str]] = {}  # model key -> (priority, file key); lower priority wins
    for file_key in shapes:
        name = file_key[len(_PEFT_PREFIX):] if file_key.startswith(_PEFT_PREFIX) else file_key
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = file_key
                break
        else:
            _full_key(name, file_key, full, where)
    modules = {}
    for module, found in parts.items():
        m = _module(module, found, config, shapes, where)
        modules[m.key] = m
    return AdapterLayout(modules, {k: f for k, (_, f) in full.items()})


def _full_key(name: str, file_key: str, full: dict[str, tuple[int, str]], where: str) -> None:
    """Record a stored full tensor under its model key (peft's wrapper name parts dropped)."""
    pieces = name.split(".")
    odd = [p for p in pieces if p.startswith("lora_") or p in ("token_adapter", "trainable_tokens_delta")]
    if odd:
        _refuse(where, f"tensor {file_key!r} ({odd[0]}) is not part of a plain LoRA update (lora_A, lora_B) or a "
                       f"full weight, so weightlens cannot read its update: {_WAY_OUT}.")
    if "original_module" in pieces:  # the base's own values, kept by peft beside a modules_to_save copy
        return
    kept = [p for p in pieces if p not in ("base_layer", "modules_to_save")]
    model_key, priority = ".".join(kept), len(pieces) - len(kept)
    if model_key in full and full[model_key][0] == priority:
        _refuse(where, f"tensors {full[model_key][1]!r} and {file_key!r} both store the full weight "
                       f"{model_key!r}; keep one of them in the file.")
    if model_key not in full or priority < full[model_key][0]:
        full[model_key] = (priority, file_key)


def _module(module: str, found: Mapping[str, str], config: Mapping[str, Any],
            shapes: Mapping[str, tuple[int, ...]], where: str) -> LoraModule:
    embedding = "EA" in found or "EB" in found
    a_key, b_key = (found.get("EA"), found.get("EB")) if embedding else (found.get("A"), found.get("B"))
    if a_key is None or b_key is None or (embedding and ("A" in found or "B" in found)):
        _refuse(where, f"module {module!r} has LoRA tensors {sorted(found.values())}, not one lora_A and one "
                       "lora_B; the file is incomplete or not a plain LoRA adapter.")
    a, b = shapes[a_key], shapes[b_key]
    dims_ok = (len(a), len(b)) == (2, 2) if embedding else len(a) >= 2 and len(b) == len(a)
    if not dims_ok:
        _refuse(where, f"module {module!r}: lora_A {a} and lora_B {b} do not make a low-rank update.")
    rank = a[0]
    if b[1] != rank or any(d != 1 for d in b[2:]):
        why = "a grouped convolution (groups > 1), whose update is block-diagonal" if len(b) > 2 else "mismatched"
        _refuse(where, f"module {module!r}: lora_A {a} and lora_B {b} are {why}, not one rank-{rank} product "
                       f"B @ A; {_WAY_OUT}.")
    r_cfg = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    if int(r_cfg) != rank:
        _refuse(where, f"module {module!r} stores rank {rank} but the config gives r={r_cfg} (r, rank_pattern); "
                       "the config and the weights file do not belong together.")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if embedding:
        layout, shape = "embedding", (a[1], b[0])
    elif len(a) > 2:
        layout, shape = "conv", (b[0], *a[1:])
    elif config.get("fan_in_fan_out"):
        layout, shape = "fan_in_fan_out", (a[1], b[0])
    else:
        layout, shape = "linear", (b[0], a[1])
    return LoraModule(f"{module}.weight", a_key, b_key, tuple(shape), rank, alpha, scale, layout)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the end of ``module`` at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
