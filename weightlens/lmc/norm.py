"""Normalisation of interpolated networks: BatchNorm statistics reset and REPAIR.

Interpolating two networks also interpolates their BatchNorm running statistics, which are not the
statistics of the interpolated network; and even without BatchNorm, interpolated hidden units lose
variance ("variance collapse", Jordan et al., ICLR 2023). Both are fixed per alpha:

* :func:`reset_batchnorm`: for every BatchNorm layer set ``momentum=None`` (cumulative average),
  reset the running statistics (mean 0, var 1, count 0), forward the given batches with only the
  BatchNorm layers in train mode under ``no_grad`` (dropout and the rest stay in eval mode), then
  read the new statistics. Running mean and var are then the average over the given batches of the
  per-batch mean and unbiased variance, exactly as PyTorch accumulates them.
* :func:`repair` (REPAIR): for each chosen Linear/Conv layer, in order, measure the per-channel
  mean and std of its output on the data and rescale the channel affinely to target statistics
  ``mu_t = sum_i w_i mu_i``, ``s_t = sum_i w_i s_i`` (for two endpoints ``(1 - alpha) mu_A + alpha
  mu_B``), the endpoints' statistics measured on the same data. The correction is fused into the
  layer: ``W' = W * s_t / s``, ``b' = (b - mu) * s_t / s + mu_t``. Layers are corrected one after
  the other, each measured in the network already corrected upstream, so after the pass every chosen
  layer has exactly the target statistics on that data.

For a network with BatchNorm after each conv, resetting BatchNorm is REPAIR's special case: use
``bn_loader`` and leave REPAIR off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from weightlens.errors import InvalidParameterError
from weightlens.lmc._data import Batches, batchnorm_modules, eval_mode

__all__ = ["ChannelStats", "Repair", "channel_stats", "mix_stats", "repair", "repair_layers", "reset_batchnorm"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Repair:
    """REPAIR settings for :func:`weightlens.lmc.curve` (a bare data argument means ``Repair(data)``).

    Parameters
    ----------
    data : data
        Inputs (or ``(inputs, targets)`` batches) on which statistics are measured.
    layers : sequence of str, optional
        Names of Linear/Conv modules whose outputs are corrected; default :func:`repair_layers`.
    batch_size : int, optional
        Rows per batch for tensor data.
    eps : float, default=1e-5
        Channels whose measured std is at most ``eps`` are only shifted, not rescaled.
    """

    data: object
    layers: Sequence[str] | None = None
    batch_size: int | None = None
    eps: float = 1e-5


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel mean and (population) std of one layer's output, float64 on the CPU."""

    mean: Tensor
    std: Tensor


def repair_layers(module: nn.Module) -> list[str]:
    """Default REPAIR layers: every Linear/Conv module except the last one (the output layer)."""
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, *_CONV))]
    return names[:-1]


def _check_layers(module: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    mods = dict(module.named_modules())
    out = {}
    for name in layers:
        if name not in mods or not isinstance(mods[name], (nn.Linear, *_CONV)):
            valid = [n for n, m in mods.items() if isinstance(m, (nn.Linear, *_CONV))]
            raise InvalidParameterError(
                f"REPAIR layer {name!r} is not a Linear or Conv module of {type(module).__name__}. "
                f"Valid layers: {valid}."
            )
        out[name] = mods[name]
    return out


def _channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, _CONV) else -1


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the measured layer has run."""


def _measure(module: nn.Module, state: Mapping[str, Tensor], batches: Batches,
             layers: Mapping[str, nn.Module], *, stop_after: str | None = None) -> dict[str, ChannelStats]:
    """Per-channel mean/std of each layer's output over all batches (float64 sums)."""
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in layers}

    def hook_for(name: str, dim: int):
        def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
            flat = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()
            acc = sums[name]
            acc[0] = acc[0] + flat.sum(0)
            acc[1] = acc[1] + (flat * flat).sum(0)
            acc[2] += flat.shape[0]
            if name == stop_after:
                raise _Stop
        return hook

    handles = [m.register_forward_hook(hook_for(n, _channel_dim(m))) for n, m in layers.items()]
    try:
        with torch.no_grad(), eval_mode(module):
            for x, _ in batches:
                try:
                    functional_call(module, dict(state), (x.to(_device_of(state)),))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s, ss, n) in sums.items():
        if n == 0:
            raise InvalidParameterError(f"Layer {name!r} never ran on {batches.what!r}; no statistics.")
        mean = s / n
        out[name] = ChannelStats(mean.cpu(), (ss / n - mean * mean).clamp_min(0).sqrt().cpu())
    return out


def _device_of(state: Mapping[str, Tensor]) -> torch.device:
    return next(iter(state.values())).device


def channel_stats(module: nn.Module, state_dict: Mapping[str, Tensor], data: object, *,
                  layers: Sequence[str] | None = None, batch_size: int | None = None) -> dict[str, ChannelStats]:
    """Per-channel mean and std of the outputs of ``layers`` for ``module`` with ``state_dict``.

    Parameters
    ----------
    module : nn.Module
        Architecture (left unmodified; its tensors are replaced by ``state_dict``).
    state_dict : mapping
        Weights to measure, on the device where the forward should run.
    data : data
        Inputs or ``(inputs, targets)`` batches (see :class:`Repair`).
    layers : sequence of str, optional
        Linear/Conv module names; default :func:`repair_layers`.
    batch_size : int, optional
        Rows per batch for tensor data.

    Returns
    -------
    dict
        ``{layer: ChannelStats}``: channels are the last dim of a Linear output and dim 1 of a
        Conv output; mean and population std over every other dim and every batch.
    """
    chosen = _check_layers(module, layers if layers is not None else repair_layers(module))
    return _measure(module, state_dict, Batches(data, batch_size=batch_size, what="data"), chosen)


def mix_stats(stats: Sequence[Mapping[str, ChannelStats]], weights: Sequence[float]) -> dict[str, ChannelStats]:
    """Target statistics ``sum_i w_i stats_i`` (mean and std mixed separately, as REPAIR does)."""
    w = [float(x) for x in np.asarray(weights, dtype=np.float64)]
    return {
        name: ChannelStats(sum(wi * s[name].mean for wi, s in zip(w, stats)),
                           sum(wi * s[name].std for wi, s in zip(w, stats)))
        for name in stats[0]
    }


def repair(module: nn.Module, state_dict: Mapping[str, Tensor], targets: Mapping[str, ChannelStats],
           data: object, *, batch_size: int | None = None, eps: float = 1e-5) -> dict[str, Tensor]:
    """REPAIR: rescale the outputs of each target layer to the target per-channel mean and std.

    Parameters
    ----------
    module : nn.Module
        Architecture (left unmodified).
    state_dict : mapping
        Interpolated weights; a corrected copy is returned (same device and dtypes).
    targets : mapping
        ``{layer: ChannelStats}``, e.g. ``mix_stats([stats_a, stats_b], [1 - alpha, alpha])``.
    data : data
        Inputs or batches to measure on (use the data the targets were measured on).
    batch_size : int, optional
        Rows per batch for tensor data.
    eps : float, default=1e-5
        Channels with measured std at most ``eps`` are shifted only.

    Returns
    -------
    dict
        The corrected state dict: ``W' = W * s_t / s``, ``b' = (b - mu) * s_t / s + mu_t``.
    """
    layers = _check_layers(module, list(targets))
    batches = Batches(data, batch_size=batch_size, what="data")
    state = dict(state_dict)
    for name, layer in layers.items():
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        if bkey not in state:
            raise InvalidParameterError(
                f"REPAIR fuses a shift into the bias of layer {name!r}, but the state dict has no "
                f"{bkey!r}. Choose layers with a bias via Repair(data, layers=[...])."
            )
        got = _measure(module, state, batches, {name: layer}, stop_after=name)[name]
        target = targets[name]
        scale = torch.where(got.std > eps, target.std / got.std.clamp_min(eps), torch.ones_like(got.std))
        shift = target.mean - got.mean * scale
        w, b = state[wkey], state[bkey]
        shape = (-1,) + (1,) * (w.ndim - 1)
        state[wkey] = (w.double() * scale.to(w.device).view(shape)).to(w.dtype)
        state[bkey] = (b.double() * scale.to(b.device) + shift.to(b.device)).to(b.dtype)
    return state


def reset_batchnorm(module: nn.Module, state_dict: Mapping[str, Tensor], data: object, *,
                    batch_size: int | None = None) -> dict[str, Tensor]:
    """Recompute every BatchNorm layer's running statistics for ``state_dict`` on ``data``.

    Parameters
    ----------
    module : nn.Module
        Architecture (left unmodified: momentum and training flags are restored).
    state_dict : mapping
        Weights whose BatchNorm statistics to recompute; a copy is returned.
    data : data
        Every batch is forwarded once (pass exactly the batches to use, e.g. N training batches).
    batch_size : int, optional
        Rows per batch for tensor data.

    Returns
    -------
    dict
        Copy of ``state_dict`` with fresh ``running_mean``, ``running_var``, ``num_batches_tracked``.
    """
    bns = batchnorm_modules(module)
    state = dict(state_dict)
    if not bns:
        return state
    for name, bn in bns.items():
        ref = state[f"{name}.running_mean"]
        state[f"{name}.running_mean"] = torch.zeros_like(ref)
        state[f"{name}.running_var"] = torch.ones_like(state[f"{name}.running_var"])
        if bn.num_batches_tracked is not None:  # always ours, so the module's buffer is never touched
            state[f"{name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=ref.device)
    momenta = {name: bn.momentum for name, bn in bns.items()}
    batches = Batches(data, batch_size=batch_size, what="bn_loader")
    seen = 0
    try:
        for bn in bns.values():
            bn.momentum = None
        with torch.no_grad(), eval_mode(module, train=bns.values()):
            for x, _ in batches:
                functional_call(module, state, (x.to(_device_of(state)),))
                seen += 1
    finally:
        for name, bn in bns.items():
            bn.momentum = momenta[name]
    if seen == 0:
        raise InvalidParameterError("The 'bn_loader' data holds no batches; BatchNorm statistics need at least one.")
    return state
