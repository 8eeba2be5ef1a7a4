"""The per-key pass of :func:`weightlens.diagnosis.diagnose`: additive sums that blocks and tasks aggregate.

Each key gives, per task ``t`` (rows of ``per_task``) and per ordered pair ``(t, s)`` of tasks (rows of
``per_pair``), sums that add up over the keys of a block (or of the whole model), so every block-level
number is an exact energy- or mass-weighted ratio of sums (``docs/diagnosis.md``):

* ``energy`` ``||tau_t||_F^2`` and ``mass`` ``sum |tau_t|`` (every key); ``base_dot`` ``<tau_t, base>``
  and ``base_sq`` ``||base||_F^2`` (the pre-merge checks);
* matrix keys only: ``matrix_energy`` (``energy`` again), ``lost`` ``||L_t||_F^2`` with
  ``L_t = (I - U U^T) tau_t`` and ``U`` the merged update's top-k left singular vectors (the SAR subspace of
  ``merge.compare``, same rank rule), taken from the task's left side ``U_t S_t`` (:func:`_subspaces`); ``rank`` and
  ``min_dim`` (the task's numerical rank and the matrix's smaller side);
* ``miss`` ``||tau_t - M||_F^2`` (every key, with a merge): how far the merged update ``M`` is from the
  task's own, i.e. what restoring the key to the task's fine-tuned weights changes;
* signs (every key): ``sign_lost_mass``, the mass of ``tau_t`` on coordinates where the merged update ``M``
  has the opposite sign, ``sgn(M) = -sgn(tau_t)``;
* pairs: ``crowd`` ``||U_s^T L_t||_F^2`` with ``L_t`` the lost part above and ``U_s`` task ``s``'s own
  top-k left singular vectors (its rank rule); ``won`` the mass of ``tau_t`` on its opposed coordinates
  where ``sgn(tau_s) = sgn(M)``; ``dot`` ``<tau_t, tau_s>`` (every key): negative where ``s`` pulls against
  ``t``, as a fine-tune trained against ``t``'s labels does (sign-blind subspace figures miss such a task:
  it spans the same directions with the opposite sign).

Elementwise passes run in float32 (signs are exact there), sums in float64 (as ``merge.compare``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from weightlens import decompositions, linalg
from weightlens.analysis.alignment import leading_vectors, reference_ranks
from weightlens.analysis.signs import conflict_stats
from weightlens.taskvectors import TaskVectors

if TYPE_CHECKING:
    from weightlens.merge.compare import KeyView

__all__ = ["KeyPass", "Rows", "walk_key"]

_F64 = torch.float64


@dataclass
class Rows:
    """Rows collected over keys: ``per_task`` (task, key), ``per_pair`` (task, other, key) and, without a
    merge, ``conflicts`` (key: the sign-conflict counts ``merge.compare`` gives otherwise)."""

    per_task: list[dict[str, Any]] = field(default_factory=list)
    per_pair: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class KeyPass:
    """What one key's pass needs besides the key: inputs, rank rule, devices, blocks."""

    tv: TaskVectors
    merged: Mapping[str, torch.Tensor] | None
    criterion: str
    eps: float
    device: torch.device
    block: Callable[[str], str]


def _top_k(S: torch.Tensor, shape: tuple[int, int], eps: float, criterion: str) -> int:
    """k of the rank rule for the spectrum ``S``, capped at its numerical rank (as SAR)."""
    return min(reference_ranks(S, eps)[criterion], linalg.numerical_rank(S, shape))


def _top_span(dec: linalg.SVD | linalg.LeftSVD, shape: tuple[int, int], eps: float, criterion: str) -> torch.Tensor:
    """Top-k left singular vectors of ``dec`` by the rank rule, capped at the numerical rank (as SAR)."""
    return leading_vectors(dec, _top_k(dec.S, shape, eps, criterion))


def _signs(signs: dict[str, torch.Tensor]) -> tuple[list[float], list[float], torch.Tensor]:
    """Mass, opposed mass per task and the ``(T, T)`` matrix of opposed mass that task ``s`` won, from
    ``merge.compare``'s sign pass of the key (``KeyView.signs``: ``|tau_t|``, ``sgn(tau_t) sgn(M)``)."""
    mag, agree = signs["mag"], signs["agree"]
    opposed = mag * (agree < 0)  # |tau_t| where the merged sign is the opposite of tau_t's
    agrees = (agree > 0).to(torch.float32)  # tau_s has the merged sign (non-zero)
    won = (opposed @ agrees.mT).to(_F64)  # won[t, s]: t's opposed mass on coordinates s won
    return linalg.sum64(mag, 1).tolist(), linalg.sum64(opposed, 1).tolist(), won


def _block_sums(x: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """``(len(rows), len(cols))`` sums of ``x`` over its row and column blocks, accumulated in float64
    (``x`` itself is not copied to float64: its column sums are, which are few)."""
    r = torch.stack([linalg.sum64(part, 0) for part in torch.split(x, rows, dim=0)])
    return torch.stack([part.sum(1) for part in torch.split(r, cols, dim=1)], dim=1)


def _subspaces(run: KeyPass, key: str, shape: tuple[int, int], merged: linalg.SVD | linalg.LeftSVD,
               deltas: torch.Tensor) -> dict[str, Any]:
    """Matrix keys: lost energy per task, the tasks' numerical ranks, and the crowding matrix.

    From each task's left side ``U_t S_t`` (``tau_t = U_t S_t V_t^T``; :func:`weightlens.decompositions.left_svd`:
    a cached SVD's, its LoRA factors', else an eigensolve of its Gram matrix, no ``V_t`` needed):
    ``L_t V_t = (I - U U^T) U_t S_t`` has the norms of ``L_t`` (``V_t`` has orthonormal columns), so
    ``||U_s^T L_t||`` is taken on ``m x r`` blocks instead of the ``m x n`` deltas: exact, cheaper for wide
    matrices, and from the factors for adapters.
    ``merged``: the merged update's left side; ``deltas``: the key's task vectors (a task SVD not cached yet is
    taken of them, not of a second read).
    """
    tv = run.tv
    U = _top_span(merged, shape, run.eps, run.criterion)
    own = [decompositions.left_svd(tv, key, t, device=run.device, delta=deltas[i]) for i, t in enumerate(tv.names)]
    spans = [d.span(_top_k(d.S, shape, run.eps, run.criterion)).to(U.device) for d in own]
    scaled = torch.cat([d.US for d in own], dim=1).to(U.device)  # (m, sum r): U_t S_t side by side
    lost_part = scaled - U @ (U.mT @ scaled)
    ranks = [d.S.numel() for d in own]
    lost = _block_sums(lost_part.square(), [shape[0]], ranks)[0]
    return {
        "lost": lost.cpu().tolist(),
        "rank": [linalg.numerical_rank(d.S, shape) for d in own],
        "crowd": _crowding(spans, lost_part, ranks),
    }


def _crowding(spans: list[torch.Tensor], lost_part: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """``crowd[t, s] = ||U_s^T L_t||_F^2`` for ``s != t`` (the diagonal, a task crowding itself, stays 0 and
    is not computed: a quarter of the products at 4 tasks). ``lost_part``: the tasks' ``L_t V_t`` side by
    side, ``ranks[t]`` columns each; ``spans[s]``: ``U_s``."""
    T = len(spans)
    crowd = torch.zeros(T, T, dtype=_F64)
    ends = list(itertools.accumulate(ranks))  # each task's columns end here
    for s, span in enumerate(spans):
        others, start = [t for t in range(T) if t != s], ends[s] - ranks[s]
        parts = [p for p in (lost_part[:, :start], lost_part[:, ends[s]:]) if p.shape[1]]
        if not span.shape[1] or not parts:
            continue
        products = torch.cat([span.mT @ p for p in parts], dim=1)  # (k_s, columns of every other task)
        sums = [linalg.sum64(c.square()) for c in torch.split(products, [ranks[t] for t in others], dim=1)]
        crowd[others, s] = torch.stack(sums).cpu()
    return crowd


def walk_key(run: KeyPass, key: str, rows: Rows, view: KeyView | None = None) -> None:
    """Append the rows of one key (see the module docstring). After a merge, ``view`` is what
    ``merge.compare``'s pass read and computed at the key (its ``visit``): nothing is read twice."""
    tv, names = run.tv, run.tv.names
    T, block, matrix = len(names), run.block(key), tv.kind(key) == "matrix" and min(tv.shape(key)) > 0
    if run.merged is not None and view is None:
        raise ValueError("walk_key: a merge's keys are walked through merge.compare's visit (a KeyView).")
    deltas = tv.deltas(key) if view is None else view.deltas
    x = deltas.reshape(T, -1)
    base = tv.base_tensor(key).reshape(-1).to(_F64)
    live = bool(x.any())
    x64 = (x.to(_F64) if view is None else view.signs["x64"]) if live else None
    if view is None:
        energy = x64.square().sum(1).tolist() if live else [0.0] * T
    else:  # compare's inner products: ||tau_t||^2, <tau_t, M>, ||M||^2
        energy, tu, uu = [r["tt"] for r in view.inner], [r["tu"] for r in view.inner], view.inner[0]["uu"]
        miss = [max(energy[t] - 2.0 * tu[t] + uu, 0.0) for t in range(T)]  # ||tau_t - M||^2
    base_dot = (x64 @ base).tolist() if live else [0.0] * T
    gram = (x64 @ x64.mT).cpu() if live else torch.zeros(T, T, dtype=_F64)
    del x64
    common = {"key": key, "block": block, "numel": x.shape[1], "base_sq": float(base @ base)}
    part: dict[str, Any] = {}
    if view is not None:
        if live:
            mass, opposed, won = _signs(view.signs)
        else:
            mass, opposed, won = [0.0] * T, [0.0] * T, torch.zeros(T, T, dtype=_F64)
        part = {"mass": mass, "sign_lost_mass": opposed, "miss": miss}
        if matrix and live:
            part.update(_subspaces(run, key, tuple(deltas.shape[-2:]), view.left, deltas))
    else:  # checks only: sign-conflict counts, and the tasks' numerical ranks
        stats = conflict_stats(deltas)
        rows.conflicts.append({"key": key, "block": block, "contested": stats["n_eligible"],
                               "conflicting": stats["n_conflict"], "chance": stats["chance_T"]})
        if matrix and live:
            shape = tuple(deltas.shape[-2:])
            part["rank"] = [linalg.numerical_rank(decompositions.svdvals(tv, key, t, device=run.device), shape)
                            for t in names]
    for t, task in enumerate(names):
        row = {"task": task, **common, "energy": energy[t], "base_dot": base_dot[t], "matrix": matrix,
               "matrix_energy": energy[t] if matrix else 0.0, "min_dim": min(tv.shape(key)) if matrix else 0}
        for name in ("mass", "sign_lost_mass", "lost", "rank", "miss"):
            if name in part:
                row[name] = part[name][t]
        rows.per_task.append(row)
    if run.merged is None:
        return
    crowd = part.get("crowd")
    for t, task in enumerate(names):
        for s, other in enumerate(names):
            if s != t:
                rows.per_pair.append({"task": task, "other": other, "key": key, "block": block,
                                      "crowd": float(crowd[t, s]) if crowd is not None else 0.0,
                                      "won": float(won[t, s]), "dot": float(gram[t, s])})
