"""Before and after a merge: what each task keeps, the merged spectrum, the sign conflicts settled.

Every table compares two updates of the same task vectors: the merge's (``which="merged"``,
``alpha * u``) and the plain task-arithmetic sum ``sum_t tau_t`` (``which="task_arithmetic"``, the
"before"). Definitions (``docs/methods.md#sar``, ``#sign-conflicts``):

* ``sar``: ``||U_k^T tau_t||_F / ||tau_t||_F`` with ``U_k`` the top-k left singular vectors of the
  update (k capped at its numerical rank, as everywhere in weightlens) and ``k`` from ``criterion`` (``"iso_script"`` by default, as the Iso figures; ``"paper"`` is
  Iso Eq. 6) at tolerance ``eps``. Matrices only.
* ``cos``: cosine between ``tau_t`` and the update; ``kept``: ``<tau_t, update> / ||tau_t||^2``, the
  coefficient of the update along the task's own direction (1: the task is carried in full).
* Sign conflicts per key, on the untrimmed task vectors: ``contested`` coordinates have at least two
  non-zero task entries, ``conflicting`` ones have both signs; ``chance_rate = 1 - 2^(1-T)``. For each
  update: ``zeroed`` (conflicting coordinates set to 0), ``mass_side_won`` (update sign = sign of the
  task sum), ``opposing_mass`` (share of the task mass at conflicting coordinates that points against
  the update: what the merge cancels or discards there).
* ``agreement`` per task: share of the task's non-zero entries whose sign the update keeps.

Per-task summaries (``per_task``): ``sar`` is the plain mean over matrices (as the Iso code);
``kept``, ``cos`` and ``agreement`` are taken over the whole model (parameter-weighted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch

from weightlens import decompositions, linalg
from weightlens._progress import bar
from weightlens.analysis.alignment import sar_to_reference
from weightlens.analysis.signs import chance_conflict, sign_votes
from weightlens.analysis.spectra import check_criterion
from weightlens.errors import InvalidParameterError
from weightlens.merge.engine import MergeResult
from weightlens.merged import check_merged, merged_update
from weightlens.taskvectors import TaskVectors

__all__ = ["Comparison", "KeyView", "compare", "sign_outcomes"]

WHICH = ("merged", "task_arithmetic")


@dataclass(frozen=True)
class Comparison:
    """Tidy tables comparing a merged update with the task-arithmetic sum (see module docstring).

    Attributes
    ----------
    per_task : DataFrame
        ``task, which, sar, kept, cos, agreement``: the headline numbers.
    alignment : DataFrame
        ``task, key, which, sar, k, cos, kept`` per matrix key.
    spectrum : DataFrame
        ``key, which, index, sigma``: singular values of both updates per matrix key.
    signs : DataFrame
        ``key, which, coords, contested, conflicting, conflict_rate, chance_rate, zeroed,
        mass_side_won, opposing_mass``.
    task_signs : DataFrame
        ``task, key, which, nonzero, agree, agreement``.
    """

    method: str
    params: dict[str, Any]
    per_task: pd.DataFrame = field(repr=False)
    alignment: pd.DataFrame = field(repr=False)
    spectrum: pd.DataFrame = field(repr=False)
    signs: pd.DataFrame = field(repr=False)
    task_signs: pd.DataFrame = field(repr=False)
    criterion: str = "iso_script"
    eps: float = 0.05

    def conflicts(self) -> pd.DataFrame:
        """Whole-model sign outcome per ``which``: conflict rate, zeroed, mass side won, opposing mass.

        Key rates are weighted by their conflicting coordinates (opposing mass by conflict mass).
        """
        s = self.signs.assign(
            z=self.signs["zeroed"].fillna(0) * self.signs["conflicting"],
            w=self.signs["mass_side_won"].fillna(0) * self.signs["conflicting"],
            o=self.signs["opposing_mass"].fillna(0) * self.signs["conflict_mass"],
        )
        g = s.groupby("which", sort=False)[["contested", "conflicting", "conflict_mass", "z", "w", "o"]].sum()
        n = g["conflicting"].where(g["conflicting"] > 0)
        return pd.DataFrame({
            "conflict_rate": g["conflicting"] / g["contested"].where(g["contested"] > 0),
            "chance_rate": s.groupby("which", sort=False)["chance_rate"].first(),
            "zeroed": g["z"] / n,
            "mass_side_won": g["w"] / n,
            "opposing_mass": g["o"] / g["conflict_mass"].where(g["conflict_mass"] > 0),
        }).reset_index()

    @property
    def tasks(self) -> list[str]:
        """The compared tasks, in the task vectors' order."""
        return list(dict.fromkeys(self.per_task["task"]))

    def can_rescale_to(self, merged: MergeResult) -> bool:
        """True when :meth:`rescaled` gives the comparison of ``merged``: a merge of the same tasks by
        the same method with the same parameters except ``alpha``, and both alphas positive.

        The rank rule (``criterion``, ``eps``) and the compared keys are the caller's to match (a
        comparison does not record its keys); :class:`weightlens.merge.comparisons.ComparisonCache`
        keeps them apart.
        """
        if not isinstance(merged, MergeResult) or merged.method != self.method:
            return False
        alpha0 = float(self.params.get("alpha", math.nan))
        if not (alpha0 > 0 and merged.alpha > 0):
            return False
        others = {k: v for k, v in merged.params.items() if k != "alpha"}
        return others == {k: v for k, v in self.params.items() if k != "alpha"} and (
            self.tasks == list(merged.task_vectors.names))

    def rescaled(self, alpha: float) -> Comparison:
        """The comparison of the same merge at another ``alpha`` (> 0), without recomputing anything.

        A merge at ``alpha`` has update ``alpha * u``; for ``r = alpha / alpha_0 > 0`` the merged rows
        change only by scale: singular values and ``kept`` are multiplied by ``r``; SAR (the top-k
        subspace and its rank rule), ``cos`` and every sign statistic are unchanged. The
        task-arithmetic rows never depend on ``alpha``. This is what lets a slider move in milliseconds.
        """
        alpha0 = float(self.params["alpha"])
        if not (alpha > 0 and alpha0 > 0):
            raise InvalidParameterError(
                f"Comparison.rescaled needs positive alphas; got {alpha0} -> {alpha}. Call compare() on that merge."
            )
        if alpha == alpha0:
            return self
        r = alpha / alpha0

        def scaled(table: pd.DataFrame, column: str) -> pd.DataFrame:
            out = table.copy()
            mask = out["which"] == "merged"
            out.loc[mask, column] = out.loc[mask, column] * r
            return out

        return replace(
            self,
            params={**self.params, "alpha": float(alpha)},
            per_task=scaled(self.per_task, "kept"),
            alignment=scaled(self.alignment, "kept"),
            spectrum=scaled(self.spectrum, "sigma"),
        )


@dataclass(frozen=True)
class KeyView:
    """What :func:`compare`'s pass holds for one key when it is done with it, handed to ``visit`` so that a
    caller walking the same keys (``diagnose``) reads and decomposes nothing a second time.

    Attributes
    ----------
    key : str
    deltas : Tensor
        The stacked task vectors ``(T, *shape)``, fp32, CPU (read once).
    update : Tensor
        The merged update ``merged - base`` of the key, fp32.
    left : SVD, LeftSVD or None
        The merged update's singular vectors and values, or its left side ``U diag(S)``, ``S``
        (``MergeResult.update_left``), at matrix keys with a non-empty shape; else None.
    signs : dict of Tensor
        The merged side's elementwise sign pass, flattened ``(T, P)`` (empty when every task vector is zero
        there): ``"sd"`` ``sgn(tau_t)``, ``"su"`` ``sgn(update)`` ``(P,)``, ``"mag"`` ``|tau_t|``,
        ``"agree"`` ``sgn(tau_t) * sgn(update)`` (float32), and ``"x64"`` the task vectors in float64.
    inner : list of dict
        Per task (in ``tv.names``' order) the float64 inner products of the key: ``"tu"`` ``<tau_t, update>``,
        ``"tt"`` ``||tau_t||^2``, ``"uu"`` ``||update||^2`` (the rows of ``Comparison``'s per-key cosines).
    """

    key: str
    deltas: torch.Tensor
    update: torch.Tensor
    left: linalg.SVD | linalg.LeftSVD | None
    signs: dict[str, torch.Tensor]
    inner: list[dict[str, Any]]


# ------------------------------------------------------------------------------- small pieces
def sign_outcomes(deltas: torch.Tensor, update: torch.Tensor) -> dict[str, float]:
    """Sign-conflict statistics of one key for one update (see module docstring)."""
    return _outcomes(deltas, update)[0]


def _task_side(deltas: torch.Tensor) -> dict[str, Any]:
    """The half of :func:`_outcomes` that depends on the task vectors alone, computed once per key for both
    updates (the merge's and the task-arithmetic sum): signs, votes, magnitudes, conflict counts and mass,
    the float64 copy and its per-task sums."""
    x = deltas.reshape(deltas.shape[0], -1).to(torch.float32)
    if not bool(x.any()):  # frozen in every task (e.g. embeddings): nothing is contested
        return {"x": x, "live": False}
    sd, _, count, conflict = sign_votes(x)  # conflict: both signs present
    mag = x.abs()
    x64 = x.to(torch.float64)
    return {
        "x": x, "live": True, "sd": sd, "conflict": conflict, "mag": mag, "x64": x64,
        "sum_sign": torch.sign(x.sum(0)),  # the sum's sign: as task arithmetic computes it
        "n_conf": int(linalg.count_nonzero(conflict)),
        "total_mass": float((mag * conflict).sum()),
        "contested": int(linalg.count_nonzero(count >= 2)),
        "nonzero": linalg.count_nonzero(sd, 1).tolist(),
        "tt": torch.linalg.vector_norm(x64, dim=1).square().tolist(),
    }


def _outcomes(deltas: torch.Tensor, update: torch.Tensor, keep: dict[str, torch.Tensor] | None = None,
              side: dict[str, Any] | None = None) -> tuple[dict[str, float], dict[str, list]]:
    """Sign statistics of one key, and per task: non-zero and agreeing entries, inner products.

    Elementwise work stays in float32 (signs are exact there, and it is several times faster than
    float64 on the CPU) without boolean indexing; counts are exact integers (``count_nonzero``),
    inner products are float64. Vectorised over tasks. ``side``: :func:`_task_side` of ``deltas`` when
    the caller has it (computed here otherwise); ``keep``: receives the elementwise tensors
    (:class:`KeyView`'s ``signs``).
    """
    side = _task_side(deltas) if side is None else side
    x, u = side["x"], update.reshape(-1).to(torch.float32)
    if not side["live"]:
        return _frozen_outcomes(x, u)
    sd, conflict, mag, n_conf, total_mass = side["sd"], side["conflict"], side["mag"], side["n_conf"], side[
        "total_mass"]
    su = torch.sign(u)
    against = (sd == -su) & (su != 0) & conflict
    won = (su == side["sum_sign"]) & conflict
    agree = sd * su  # > 0: the update keeps the task's (non-zero) sign
    stats = {
        "coords": x.shape[1],
        "contested": side["contested"],
        "conflicting": n_conf,
        "zeroed": int(linalg.count_nonzero((su == 0) & conflict)) / n_conf if n_conf else math.nan,
        "mass_side_won": int(linalg.count_nonzero(won)) / n_conf if n_conf else math.nan,
        "opposing_mass": float((mag * against).sum()) / total_mass if total_mass > 0 else math.nan,
        "conflict_mass": total_mass,
    }
    x64, u64 = side["x64"], u.to(torch.float64)
    per_task = {
        "nonzero": side["nonzero"],
        "agree": linalg.count_nonzero(agree > 0, 1).tolist(),  # same non-zero sign
        "tu": (x64 @ u64).tolist(),
        "tt": side["tt"],
        "uu": float(u64 @ u64),
    }
    if keep is not None:
        keep.update(sd=sd, su=su, mag=mag, agree=agree, x64=x64)
    return stats, per_task


def _frozen_outcomes(x: torch.Tensor, u: torch.Tensor) -> tuple[dict[str, float], dict[str, list]]:
    """What :func:`_outcomes` gives for all-zero task matrices, without the elementwise passes."""
    T, n = x.shape
    stats = {"coords": n, "contested": 0, "conflicting": 0, "zeroed": math.nan, "mass_side_won": math.nan,
             "opposing_mass": math.nan, "conflict_mass": 0.0}
    uu = float(torch.linalg.vector_norm(u.to(torch.float64)) ** 2)
    return stats, {"nonzero": [0] * T, "agree": [0] * T, "tu": [0.0] * T, "tt": [0.0] * T, "uu": uu}


# ------------------------------------------------------------------------------- the walk
class _Rows:
    """Rows kept in ``tv.cache`` (plain values, no tensor): opaque to the cache's byte count, which would
    otherwise walk every row dict to find 0 bytes (0.3 s per compare on the MiniLM zoo)."""

    __slots__ = ("rows",)

    def __init__(self, rows: dict[str, list]) -> None:
        self.rows = rows


def _side_rows(
    tv: TaskVectors, key: str, which: str, upd: torch.Tensor, deltas: torch.Tensor,
    left: linalg.SVD | linalg.LeftSVD | None, opts: dict[str, Any], keep: dict[str, torch.Tensor] | None = None,
    side: dict[str, Any] | None = None,
) -> dict[str, list]:
    """Every row of one key for one update: alignment and spectrum (matrices), signs, per-task sums
    (``keep``, ``side``: see :func:`_outcomes`)."""
    out: dict[str, list] = {"alignment": [], "spectrum": [], "signs": [], "task_signs": [], "inner": []}
    if left is not None:
        rows = sar_to_reference(key, deltas, tv.names, which, left, opts["eps"], opts["criterion"])
        out["spectrum"] = [{"key": key, "which": which, "index": i, "sigma": float(s)}
                           for i, s in enumerate(left.S.cpu())]
        out["alignment"] = [{"task": r["task"], "key": key, "which": which, "sar": r["sar"], "k": r["k"]}
                            for r in rows]
    stats, per_task = _outcomes(deltas, upd, keep, side)
    rate = stats["conflicting"] / stats["contested"] if stats["contested"] else math.nan
    out["signs"].append({"key": key, "which": which, **stats, "conflict_rate": rate,
                         "chance_rate": chance_conflict(len(tv))})
    for t, task in enumerate(tv.names):
        nonzero, agree = per_task["nonzero"][t], per_task["agree"][t]
        out["task_signs"].append({"task": task, "key": key, "which": which, "nonzero": nonzero, "agree": agree,
                                  "agreement": agree / nonzero if nonzero else math.nan})
        out["inner"].append({"task": task, "key": key, "which": which, "tu": per_task["tu"][t],
                             "tt": per_task["tt"][t], "uu": per_task["uu"]})
    return out


def _ta_tag(tv: TaskVectors, key: str, opts: dict[str, Any]) -> tuple:
    """Where the task-arithmetic rows of ``key`` are cached in ``tv.cache``."""
    return ("compare_task_arithmetic", tuple(tv.names), key, opts["criterion"], opts["eps"], str(opts["device"]))


def _key_rows(tv: TaskVectors, merged: Mapping[str, torch.Tensor], key: str, opts: dict[str, Any]) -> dict:
    """Rows of one key for the merge and for task arithmetic.

    The task-arithmetic rows depend only on the task vectors and the rank rule, so they are cached
    in ``tv.cache``: comparing another merge of the same tasks (a method switch in the studio)
    computes only the merge's half. ``opts["visit"]``, when set, then receives the key's :class:`KeyView`.
    """
    spectral = tv.kind(key) == "matrix" and min(tv.shape(key)) > 0
    deltas = tv.deltas(key)
    update = merged_update(tv, merged, key, caller="compare()")
    left = opts["merged_left"](key, update) if spectral else None
    signs: dict[str, torch.Tensor] = {}
    side = _task_side(deltas)  # the task vectors' half of the sign pass, for both updates
    merged_rows = _side_rows(tv, key, "merged", update, deltas, left, opts, signs, side)

    def task_arithmetic() -> dict[str, list]:
        total = deltas.sum(0)
        svd = decompositions.svd(tv, key, tv.names, device=opts["device"], delta=total) if spectral else None
        return _side_rows(tv, key, "task_arithmetic", total, deltas, svd, opts, side=side)

    if opts["visit"] is not None:
        opts["visit"](KeyView(key, deltas, update, left, signs, merged_rows["inner"]))
    if not opts["task_arithmetic"]:
        return merged_rows
    ta_rows = tv.cache.get_or_compute(_ta_tag(tv, key, opts), lambda: _Rows(task_arithmetic())).rows
    return {name: rows + ta_rows[name] for name, rows in merged_rows.items()}


def _finish(rows: dict[str, list]) -> dict[str, pd.DataFrame]:
    """DataFrames from the rows, with per-key cos/kept and the per-task summary."""
    inner = pd.DataFrame(rows["inner"], columns=["task", "key", "which", "tu", "tt", "uu"])
    inner["cos"] = inner["tu"] / (inner["tt"] * inner["uu"]).pow(0.5)
    inner["kept"] = inner["tu"] / inner["tt"]
    align = pd.DataFrame(rows["alignment"], columns=["task", "key", "which", "sar", "k"])
    align = align.merge(inner[["task", "key", "which", "cos", "kept"]], on=["task", "key", "which"], how="left")
    task_signs = pd.DataFrame(rows["task_signs"], columns=["task", "key", "which", "nonzero", "agree", "agreement"])
    g = inner.groupby(["task", "which"], sort=False)[["tu", "tt", "uu"]].sum()
    per_task = pd.DataFrame({"kept": g["tu"] / g["tt"], "cos": g["tu"] / (g["tt"] * g["uu"]).pow(0.5)})
    ts = task_signs.groupby(["task", "which"], sort=False)[["agree", "nonzero"]].sum()
    per_task["agreement"] = ts["agree"] / ts["nonzero"].clip(lower=1)
    per_task["sar"] = align.groupby(["task", "which"], sort=False)["sar"].mean()
    per_task = per_task.reset_index()[["task", "which", "sar", "kept", "cos", "agreement"]]
    signs_cols = ["key", "which", "coords", "contested", "conflicting", "conflict_rate", "chance_rate",
                  "zeroed", "mass_side_won", "opposing_mass", "conflict_mass"]
    return {
        "per_task": per_task,
        "alignment": align,
        "spectrum": pd.DataFrame(rows["spectrum"], columns=["key", "which", "index", "sigma"]),
        "signs": pd.DataFrame(rows["signs"], columns=signs_cols),
        "task_signs": task_signs,
    }


def compare(
    tv: TaskVectors,
    merged: Mapping[str, torch.Tensor],
    *,
    criterion: str = "iso_script",
    eps: float = 0.05,
    keys: list[str] | None = None,
    device: str | torch.device = "auto",
    progress: bool | None = None,
    visit: Callable[[KeyView], None] | None = None,
    task_arithmetic: bool = True,
) -> Comparison:
    """Compare a merge with task arithmetic: alignment per task, spectra, sign conflicts.

    Parameters
    ----------
    tv : TaskVectors
        The task vectors that were merged.
    merged : MergeResult or Mapping[str, Tensor]
        The merge (a plain mapping of full weights works too: its update is ``merged - base``).
    criterion : {"iso_script", "paper"}, default="iso_script"
        Rank rule for the SAR subspace (docs/methods.md#sar; both are offered, the script's default
        reproduces the Iso figures).
    eps : float, default=0.05
        Tolerance of the rank rule.
    keys : list of str, optional
        Restrict to these task-vector keys (all by default).
    device : str or torch.device, default="auto"
        Where the decompositions of a plain mapping's update run. A ``MergeResult``'s update needs only its
        left side (``MergeResult.update_left``: the method's factors, the task sum's SVD, else an
        eigensolve of its Gram matrix), computed on its merge device and cached in ``tv.cache`` (a merge that differs
        only in ``alpha`` reuses it).
    progress : bool or None, default=None
        A bar over keys; None follows ``weightlens.config.progress``.
    visit : callable, optional
        ``visit(view)`` once per compared key, in order, with the :class:`KeyView` of what the pass read
        and computed there (the task vectors, the merged update, its left side, the sign pass): how
        ``diagnose`` walks the keys once for both.
    task_arithmetic : bool, default=True
        Also compare the task-arithmetic sum (rows with ``which == "task_arithmetic"``, cached per task
        set); False gives the merge's rows alone and skips the sum's SVD (``diagnose`` needs only those).

    Returns
    -------
    Comparison

    Raises
    ------
    KeyMismatchError, ShapeMismatchError
        A compared key is missing from ``merged`` or has another shape there (e.g. a merge of other
        checkpoints); checked for every key before any is compared.
    """
    criterion = check_criterion(criterion)
    chosen = list(tv.keys) if keys is None else list(keys)
    unknown = [k for k in chosen if k not in tv.keys]
    if unknown:
        raise InvalidParameterError(f"compare(): keys {unknown[:5]} are not task-vector keys of {tv!r}.")
    if isinstance(merged, MergeResult) and list(merged.task_vectors.names) != list(tv.names):
        raise InvalidParameterError(
            f"compare(): the merge was made from tasks {merged.task_vectors.names}, not {tv.names}."
        )
    check_merged(tv, merged, chosen, caller="compare()")
    dev = linalg.resolve_device(device)
    if isinstance(merged, MergeResult):
        def merged_left(key: str, update: torch.Tensor) -> linalg.SVD | linalg.LeftSVD:
            return merged.update_left(key)
    else:
        def merged_left(key: str, update: torch.Tensor) -> linalg.SVD | linalg.LeftSVD:
            return linalg.left_svd(update, device=dev, name=key)
    opts = {"criterion": criterion, "eps": eps, "device": dev, "merged_left": merged_left, "visit": visit,
            "task_arithmetic": bool(task_arithmetic)}
    rows: dict[str, list] = {"alignment": [], "spectrum": [], "signs": [], "task_signs": [], "inner": []}
    ahead = decompositions.ahead(  # the sums' SVDs batched by shape, on CUDA
        tv, chosen, lambda key: () if not task_arithmetic or _ta_tag(tv, key, opts) in tv.cache else ("sum",),
        device=dev)
    for key in bar(chosen, progress=progress, desc="compare", unit="key"):
        if ahead is not None:
            ahead(key)
        for name, part in _key_rows(tv, merged, key, opts).items():
            rows[name].extend(part)
    method = merged.method if isinstance(merged, MergeResult) else "weights"
    params = dict(merged.params) if isinstance(merged, MergeResult) else {}
    return Comparison(method, params, criterion=criterion, eps=eps, **_finish(rows))
