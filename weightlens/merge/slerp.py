"""SLERP: spherical linear interpolation from the base to one fine-tune (``docs/methods.md#slerp``).

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (the formula); reference
implementation mergekit ``slerp`` (``mergekit/merge_methods/slerp.py``), whose first endpoint is the base.

Per tensor, with ``a = theta_0`` and ``b = theta_1 = theta_0 + tau`` flattened (float32, float64 for
float64 inputs), exactly as mergekit:

* norms ``|a|``, ``|b|``; a norm ``<= eps = 1e-8`` is replaced by 1;
* ``dot = <a/|a|, b/|b|>`` clamped to [-1, 1];
* ``|dot| > 0.9995`` (mergekit's ``dot_threshold``: colinear or antipodal): linear interpolation
  ``(1 - t) a + t b``; else ``theta = acos(dot)`` and
  ``sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b``.

Every tensor is treated alike (matrices, vectors, embeddings), as mergekit does. The merge is
``theta_0 + alpha * update`` with ``update = slerp(t; a, b) - a``: ``alpha=1`` (the default) is
mergekit's slerp, ``t=0`` returns the base and ``t=1`` the fine-tune (exactly). A colinear key is
reported in the notes (fine-tunes close to their base usually are: their SLERP *is* linear).

**mergekit's layer-wise ``t`` gradients.** ``t_gradient="0,0.5,1"`` gives ``t`` per key as mergekit
evaluates a list-valued ``t``: layer ``i`` of ``L`` (the number after the first numeric component of the
key, e.g. ``model.layers.3.``; ``L`` counted over the keys with the same prefix) sits at
``x = i / (L - 1)`` (1 when ``L = 1``), and ``t`` is the piecewise-linear interpolation of the anchors
at ``x`` (anchor ``j`` of ``n`` at ``j / (n - 1)``); keys outside the layers (embeddings, final norm,
head) get the first anchor (mergekit plans them at ``x = 0``). It overrides ``t``.

**One fine-tune.** SLERP joins two endpoints. With several fine-tunes, ``task=`` names the one to
interpolate with; with ``task=None`` the first is used and every key says so in the notes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

import torch

from weightlens.errors import InvalidParameterError
from weightlens.io.recipe import Mergekit
from weightlens.merge.engine import MergeContext
from weightlens.merge.registry import Interval, KeyUpdate, register_merge

__all__ = ["gradient_t", "slerp", "slerp_tensors"]

DOT_THRESHOLD = 0.9995  # mergekit's dot_threshold
EPS = 1e-8  # mergekit's eps
_LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")
_GRID = tuple(round(0.1 * i, 10) for i in range(1, 11))


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """``(slerp(t; a, b) - a, dot)`` as mergekit computes it; ``dot`` is None on the spherical branch."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    if t == 0 or x.numel() == 0:
        return torch.zeros_like(a, dtype=dtype), None
    if t == 1:
        return (y - x).reshape(a.shape), None
    na, nb = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    na = torch.where(na > EPS, na, 1)
    nb = torch.where(nb > EPS, nb, 1)
    dot = float(((x / na) * (y / nb)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (t * (y - x)).reshape(a.shape), dot
    theta = torch.acos(torch.tensor(dot, dtype=dtype))
    sin_theta = torch.sin(theta)
    ca, cb = torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta
    return ((ca * x + cb * y) - x).reshape(a.shape), None


def gradient_t(anchors: list[float], x: float) -> float:
    """mergekit's value of a list-valued parameter at ``x`` in [0, 1] (``evaluate_setting``)."""
    scaled = x * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


def _anchors(t_gradient: str) -> list[float]:
    try:
        values = [float(p) for p in t_gradient.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and 0 <= v <= 1 for v in values):
        raise InvalidParameterError(
            f"The 't_gradient' parameter of slerp must be comma-separated numbers in [0, 1], the anchors of "
            f"mergekit's layer-wise t (e.g. '0,0.5,1'). Got {t_gradient!r} instead."
        )
    return values


def _blank_none(value: Any) -> Any:
    """A blank string (an empty text box in the studio) reads as None."""
    return None if isinstance(value, str) and not value.strip() else value


def _key_ts(keys: list[str], anchors: list[float]) -> dict[str, float]:
    """``t`` of every key: layer ``i`` of ``L`` at ``i / (L - 1)``, other keys at 0 (mergekit's planning)."""
    found = {k: _LAYER.match(k) for k in keys}
    layers: dict[str, set[int]] = {}
    for m in found.values():
        if m:
            layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    out = {}
    for k, m in found.items():
        if not m:
            out[k] = gradient_t(anchors, 0.0)
            continue
        n = max(layers[m.group(1)]) + 1
        out[k] = gradient_t(anchors, int(m.group(2)) / (n - 1) if n > 1 else 1.0)
    return out


def _slerp_prepare(ctx: MergeContext, *, t: float, t_gradient: str | None, task: str | None) -> dict:
    """The fine-tune to interpolate with, and ``t`` per key when ``t_gradient`` is given (blank text: None)."""
    task, t_gradient = _blank_none(task), _blank_none(t_gradient)
    note = None
    if task is None:
        task = ctx.tasks[0]
        if ctx.n_tasks > 1:
            note = (f"slerp interpolates the base with one fine-tune: used {task!r}, the first of {ctx.n_tasks} "
                    f"({', '.join(ctx.tasks)}); choose with task=")
    elif task not in ctx.tasks:
        raise InvalidParameterError(
            f"The 'task' parameter of slerp must be one of the fine-tunes {', '.join(map(repr, ctx.tasks))} "
            f"or None. Got {task!r} instead."
        )
    ts = _key_ts(list(ctx.tv.keys), _anchors(t_gradient)) if t_gradient is not None else None
    return {"task": task, "ts": ts, "note": note}


def _slerp_mergekit(p: Mapping[str, Any], merged: Any = None) -> Mergekit | None:
    """mergekit's ``slerp`` (``t``, or the anchors of ``t_gradient`` as a list): only at ``alpha=1`` and
    for a recipe of one fine-tune (mergekit's slerp takes the base and exactly one more model)."""
    if float(p.get("alpha", 1.0)) != 1.0 or (merged is not None and len(merged.task_vectors) != 1):
        return None
    if merged is None and _blank_none(p.get("task")) is not None:
        return None
    gradient = _blank_none(p.get("t_gradient"))
    try:
        t: Any = _anchors(gradient) if gradient is not None else float(p.get("t", 0.5))
    except InvalidParameterError:
        return None
    return Mergekit("slerp", {}, {"t": t})


@register_merge(
    "slerp", alpha=1.0, pretty_name="SLERP", reference="Shoemake, SIGGRAPH 1985 (mergekit slerp)",
    prepare=_slerp_prepare, alpha_grid=_GRID, mergekit=_slerp_mergekit,
)
def slerp(
    ctx: MergeContext,
    key: str,
    *,
    t: Annotated[float, Interval(0, 1)] = 0.5,
    t_gradient: str | None = None,
    task: str | None = None,
) -> KeyUpdate:
    """Spherical interpolation from the base (``t=0``) to one fine-tune (``t=1``), as mergekit ``slerp``.

    Parameters
    ----------
    t : float in [0, 1], default=0.5
        Interpolation parameter of every key (mergekit's ``t``).
    t_gradient : str or None, default=None
        Comma-separated anchors of mergekit's layer-wise ``t`` (``"0,0.5,1"``); overrides ``t``.
    task : str or None, default=None
        The fine-tune to interpolate with (None: the only one; the first, with a note, when there are several).
    alpha : float, default=1.0
        ``theta = theta_0 + alpha * (slerp - theta_0)``: 1 is mergekit's slerp.
    """
    state = ctx.state  # t_gradient and task were resolved by the prepare hook
    tk = state["ts"][key] if state["ts"] is not None else t
    base = ctx.tv.base_tensor(key)
    wide = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = base.to(wide)
    update, dot = slerp_tensors(tk, a, a + ctx.delta(state["task"], key).to(wide))
    notes = (state["note"],) if state["note"] else ()
    if dot is not None:
        notes += (f"slerp: the endpoints are colinear (cos {dot:.6f}, |cos| above mergekit's {DOT_THRESHOLD}): "
                  "linear interpolation, as mergekit",)
    return KeyUpdate(update, notes)
