"""Export a merge whose update is low-rank as a PEFT LoRA adapter folder (issue 15 item 3).

``export_adapter(merged, out)`` (also ``wl.export(merged, out, as_adapter=True, rank=...)``) writes
``adapter_config.json``, ``adapter_model.safetensors`` and a card ``README.md`` that
``peft.PeftModel.from_pretrained(base_model, out)`` loads. For every matrix key the merge changes, the
merged update ``alpha * u`` (``MergeResult.update_svd``, no decomposition for TSV-M and Iso, whose updates
come as orthonormal factors) is split as ``lora_B = U_k * sqrt(S_k)``, ``lora_A = sqrt(S_k) * Vh_k`` with
``lora_alpha = r`` per module (scale 1; per-module ranks through ``rank_pattern`` / ``alpha_pattern``).
``rank=None`` keeps each key's numerical rank (singular values above ``max(m, n) * eps(fp32) * S[0]``):
the adapter is the merge, up to fp32 rounding. ``rank=k`` keeps at most ``k`` triplets per key, the best
rank-``k`` approximation (Eckart-Young); the discarded energy ``sum(S[k:]^2) / sum(S^2)`` is reported per
key and overall in the card and in ``adapter_config.json``'s neighbour ``weightlens_adapter.json``.

Orientation: peft stores ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` for ``nn.Linear``; GPT-2 style
``Conv1D`` layers (weights ``(in, out)``: as the input adapters' ``fan_in_fan_out`` says, else from the base's
``model_type``, ``gpt2`` / ``openai-gpt`` / ``imagegpt`` / ``decision_transformer``) are written with
``fan_in_fan_out=True`` from the SVD of the transposed update.

Refused (nothing written), with the keys named: a merge that changes a 1-D key (bias, norm) or a key with
more than two dimensions (a convolution), or an embedding, since a LoRA on linear layers cannot carry
that change; a merge that changes no matrix; a merge carrying a head (``with_head``); an input that is not
a merge result (an adapter is an update of a base: ``wl.merge(...)`` knows both).

Names: the base checkpoint's keys name the modules (``<module>.weight`` becomes
``base_model.model.<module>.lora_A.weight``), so the base must be saved under the model class's own names
(as ``save_pretrained`` does for a ``*ForCausalLM``). The folder is written atomically with export's path
checks; ``overwrite=True`` replaces an earlier weightlens export or adapter export.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from weightlens._options import resolve_options
from weightlens._progress import bar
from weightlens._version import __version__
from weightlens.errors import CheckpointError, InvalidParameterError, WeightlensError
from weightlens.io import _paths
from weightlens.io._atomic import atomic_folder, write_text
from weightlens.io.recipe import RECIPE, ExportRecipe, portable

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterModule", "export_adapter"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_REPORT = "adapter_config.json", "adapter_model.safetensors", \
    "weightlens_adapter.json"
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                        r"embed_positions|shared|embeddings)\.weight$")


@dataclass(frozen=True)
class AdapterModule:
    """One module of an exported adapter: its rank and what truncation discarded.

    Attributes
    ----------
    key : str
        The base model key (``<module>.weight``).
    rank : int
        Triplets kept.
    full_rank : int
        The update's numerical rank (singular values above ``max(m, n) * eps(fp32) * S[0]``).
    energy : float
        ``||update||_F^2``.
    discarded : float
        ``sum(S[rank:]^2)``: the squared Frobenius error of the kept rank-``rank`` approximation.
    """

    key: str
    rank: int
    full_rank: int
    energy: float
    discarded: float

    @property
    def discarded_fraction(self) -> float:
        return self.discarded / self.energy if self.energy > 0 else 0.0


def _check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidParameterError(f"The 'rank' parameter must be a positive int or None (each key's numerical "
                                    f"rank: exact). Got {rank!r} instead.")
    return rank


def _fan_in_fan_out(merged: Any) -> bool:
    """Whether the base's linear layers store ``(in, out)`` (GPT-2's ``Conv1D``): what the input adapters were
    trained with when any task is one (peft set it for this model), else from the base's ``model_type``."""
    from weightlens.io.sources import AdapterCheckpoint

    said = {bool(c.config.get("fan_in_fan_out", False)) for c in merged.task_vectors.finetuned.values()
            if isinstance(c, AdapterCheckpoint) and c.lora_keys}
    if len(said) == 1:
        return said.pop()
    return _model_type(merged) in _CONV1D_MODEL_TYPES


def _model_type(merged: Any) -> str | None:
    hf_dir = getattr(merged.task_vectors.base, "hf_dir", None)
    if hf_dir is None or not (Path(hf_dir) / "config.json").is_file():
        return None
    try:
        return json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _changed(merged: Any, key: str) -> bool:
    return bool((merged.update(key) != 0).any())


def _targets(merged: Any) -> list[str]:
    """The matrix keys to write; refuses a merge that changes what a LoRA on linear layers cannot carry."""
    base = merged.task_vectors.base
    matrices, bad = [], []
    for key in merged.updated_keys:
        info = base.info(key)
        shape = tuple(info.shape)
        if not info.dtype.is_floating_point or not _changed(merged, key):
            continue
        if len(shape) != 2 or _EMBEDDING.search(key) or not key.endswith(".weight"):
            bad.append(f"{key} {list(shape)}")
        else:
            matrices.append(key)
    if bad:
        raise CheckpointError(
            f"export as an adapter: the merge changes {len(bad)} key(s) that a LoRA on linear layers cannot carry "
            f"(1-D biases and norms, embeddings, convolutions): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. "
            "Merge only the keys an adapter updates (adapters that target linear layers leave the rest exactly "
            "zero; or select keys with TaskVectors(..., include=\"*_proj.weight\")), or export the full weights "
            "(as_adapter=False)."
        )
    if not matrices:
        raise CheckpointError("export as an adapter: the merge changes no matrix key, so there is nothing to write "
                              "as a LoRA; export the full weights instead.")
    return matrices


def _factors(merged: Any, key: str, rank: int | None, transpose: bool
             ) -> tuple[torch.Tensor, torch.Tensor, AdapterModule]:
    """``(lora_A (r, in), lora_B (out, r), record)`` of ``key``'s merged update."""
    U, S, Vh = merged.update_svd(key)
    U, S, Vh = U.float().cpu(), S.float().cpu(), Vh.float().cpu()
    S64 = S.double()
    energy = float((S64 ** 2).sum())
    tol = max(U.shape[0], Vh.shape[1]) * torch.finfo(torch.float32).eps * (float(S64.max()) if S64.numel() else 0.0)
    full = int((S64 > tol).sum())
    order = torch.argsort(S64, descending=True, stable=True)  # the methods' factors come sorted; be sure
    U, S, Vh, S64 = U[:, order], S[order], Vh[order], S64[order]
    k = full if rank is None else min(rank, full)
    discarded = float((S64[k:] ** 2).sum())
    root = S[:k].sqrt()
    B, A = U[:, :k] * root, root[:, None] * Vh[:k]  # update = B @ A, (out, in) in the base's orientation
    if transpose:  # Conv1D stores (in, out): peft's B @ A is the transposed update
        B, A = A.T, B.T
    return A.contiguous(), B.contiguous(), AdapterModule(key, k, full, energy, discarded)


def _config(modules: list[AdapterModule], base_dir: Any, fan_in_fan_out: bool) -> dict[str, Any]:
    names = [m.key[: -len(".weight")] for m in modules]
    r = max(m.rank for m in modules)
    pattern = {re.escape(n): m.rank for n, m in zip(names, modules) if m.rank != r}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_dir) if base_dir else None,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": names, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True, "revision": None,
    }


def _report(modules: list[AdapterModule], rank: int | None) -> dict[str, Any]:
    energy = sum(m.energy for m in modules)
    discarded = sum(m.discarded for m in modules)
    return {
        "rank": rank, "discarded_energy": discarded, "energy": energy,
        "discarded_fraction": discarded / energy if energy > 0 else 0.0,
        "modules": {m.key: {"rank": m.rank, "full_rank": m.full_rank, "energy": m.energy, "discarded": m.discarded,
                            "discarded_fraction": m.discarded_fraction} for m in modules},
    }


def _card(merged: Any, report: dict[str, Any], config: dict[str, Any], plan: ExportRecipe) -> str:
    tasks = ", ".join(f"`{t}`" for t in merged.task_vectors.names)
    asked = "each key's numerical rank (exact up to fp32 rounding)" if report["rank"] is None else \
        f"at most {report['rank']} per key"
    lines = [
        "---", "library_name: peft", "tags:", "- weightlens", "- merge", "- lora", "---", "",
        f"# {merged.method} merge of {tasks} as a LoRA adapter", "",
        f"A PEFT LoRA adapter holding the merged update (`{merged.method}`, alpha = {merged.alpha:g}) of "
        f"{len(merged.task_vectors.names)} task(s) on the base `{config['base_model_name_or_path']}`, written by "
        f"weightlens {__version__}. Load it with `peft.PeftModel.from_pretrained(base_model, this_folder)`.", "",
        f"Rank: {asked}; r = {config['r']}, lora_alpha = r per module (scale 1).", "",
        f"Truncation error: {report['discarded_fraction']:.3e} of the update's energy "
        f"(||discarded||_F^2 = {report['discarded_energy']:.4e} of {report['energy']:.4e}).", "",
        "| module | rank | numerical rank | discarded energy |", "|---|---|---|---|",
    ]
    lines += [f"| `{k}` | {m['rank']} | {m['full_rank']} | {m['discarded_fraction']:.3e} |"
              for k, m in report["modules"].items()]
    lines += ["", f"Re-make it: `weightlens merge {RECIPE} --out OUT_DIR` (bitwise on the same device)." if plan.recipe
              else f"No recipe was written: {plan.why_not}."]
    return "\n".join(lines) + "\n"


def export_adapter(merged: Any, out_dir: str | os.PathLike[str], *, rank: int | None = None,
                   overwrite: bool = False, progress: bool | None = None, options: Any = None,
                   **overrides: Any) -> Path:
    """Write a merge's update as a PEFT LoRA adapter folder, atomically, with the recipe that re-makes it.

    Parameters
    ----------
    merged : MergeResult
        ``wl.merge(...)``'s result; the merge may change only matrix keys of linear layers (biases, norms,
        embeddings and convolutions left exactly as the base has them).
    out_dir : path
        Target folder: ``adapter_config.json``, ``adapter_model.safetensors`` (fp32), ``weightlens_adapter.json``
        (rank and discarded energy per key) and ``README.md``.
    rank : int or None
        None (default): each key's numerical rank, exact. An int: at most that many triplets per key (the best
        approximation of that rank); the discarded energy is reported.
    overwrite : bool
        Replace an earlier weightlens export at ``out_dir``.
    progress : bool or None
        A bar over the keys; None follows ``weightlens.config.progress``.
    options : ExportOptions, optional
        As for :func:`weightlens.io.export` (``**overrides`` set its fields): ``recipe`` (None: derive
        ``weightlens_recipe.yaml``, with ``adapter: {rank: ...}`` and the adapter's sha256, when the merge's
        inputs are files; False: none), ``fingerprint``, ``verify``, ``overwrite_any``. No mergekit YAML is
        written: mergekit writes full weights, not adapters. ``card`` extras are not taken (refused).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    CheckpointError
        The merge changes a key a LoRA on linear layers cannot carry (named), or no matrix, or carries a head.
    InvalidParameterError
        ``merged`` is not a merge result, or ``rank`` is not a positive int or None.
    """
    from weightlens.io.export import ExportOptions, _os_failure

    opts = resolve_options(ExportOptions, options, overrides, caller="export_adapter")
    if opts.card is not None:
        raise InvalidParameterError("export as an adapter writes its own card (rank and truncation error); it takes "
                                    "no card extras. Drop card=, or export the full weights.")
    if opts.executor not in (None, "local"):
        raise InvalidParameterError(f"export as an adapter runs in this process; executor={opts.executor!r} is a "
                                    "setting of the full-weight export. Drop executor=, or export the full weights.")
    rank = _check_rank(rank)
    if not (hasattr(merged, "update_svd") and hasattr(merged, "task_vectors")):
        raise InvalidParameterError(
            f"export as an adapter needs a merge result (wl.merge(...)), which knows the base and the update; got "
            f"a {type(merged).__name__}. Export the full weights instead (as_adapter=False).")
    if getattr(merged, "head", None) is not None:
        raise CheckpointError(f"export as an adapter: the merge carries the head of {merged.head!r}, which an "
                              "adapter of the base cannot hold; use merged.with_head(None).")
    _paths.check_output_path(out_dir)
    out = Path(out_dir).expanduser()
    tv = merged.task_vectors
    inputs = [("base", tv.base.source), *((f"fine-tune {n!r}", c.source) for n, c in tv.finetuned.items())]
    _paths.check_inputs(out, inputs)
    check = functools.partial(_paths.check_replaceable, overwrite=overwrite, overwrite_any=opts.overwrite_any)
    check(out)
    plan = _recipe_plan(merged, opts.recipe, out, rank, opts.fingerprint)
    transpose = _fan_in_fan_out(merged)
    keys = _targets(merged)
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for key in bar(keys, progress=progress, desc=f"adapter {out.name}", unit="key", file=sys.stderr):
        A, B, rec = _factors(merged, key, rank, transpose)
        if rec.rank == 0:
            continue
        module = key[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
        modules.append(rec)
    config = _config(modules, getattr(tv.base, "hf_dir", None), transpose)
    report = _report(modules, rank)
    try:
        with atomic_folder(out, overwrite=overwrite or opts.overwrite_any, check=check) as tmp:
            written = {ADAPTER_WEIGHTS: _write_weights(tmp / ADAPTER_WEIGHTS, tensors)}
            if opts.verify is not None:
                opts.verify(written)
            write_text(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
            write_text(tmp / ADAPTER_REPORT, json.dumps(report, indent=2) + "\n")
            write_text(tmp / "README.md", _card(merged, report, config, plan))
            if plan.recipe is not None:
                write_text(tmp / RECIPE, replace(portable(plan, out).recipe, expect=written).to_yaml())
    except OSError as err:
        if isinstance(err, WeightlensError):
            raise
        raise _os_failure(out, err) from None
    return out


def _recipe_plan(merged: Any, recipe: Any, out: Path, rank: int | None, fingerprint: str) -> ExportRecipe:
    """The merge's recipe as an export as an adapter records it (``adapter: {rank}``, no ``like``, no mergekit
    equivalent), or none (``recipe=False``, inputs given in memory)."""
    plan = merged.export_recipe(recipe, out=out, like=False, fingerprint=fingerprint)
    if plan.recipe is None:
        return plan
    return replace(plan, recipe=replace(plan.recipe, adapter={"rank": rank}, like=False), mergekit=None)


def _write_weights(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """One safetensors file, stamped as a weightlens export (so that ``overwrite=True`` may replace it); returns
    its sha256, hashed while it was written."""
    from weightlens.io.export import _Item, _Shard

    items = [_Item(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    shard = _Shard(path, items, {"format": "pt", "weightlens_version": __version__})
    try:
        for t in tensors.values():
            shard.write(t)
    except BaseException:
        shard.abort()
        raise
    return shard.close()
