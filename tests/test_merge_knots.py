"""KnOTS (``knots_ties``, ``knots_ta``) against an independent float64 re-implementation of the reference code,
identities (task arithmetic, one task, orthogonal tasks) and the factored path against the dense one."""

from __future__ import annotations

import pytest
import torch

import weightlens as wl
from weightlens.merge import get_method, merge
from weightlens.merge.engine import MergeContext
from weightlens.merge.knots import knots_blocks

CPU = {"device": "cpu"}
SHAPES = {"w1": (6, 5), "w2": (4, 7), "conv": (3, 2, 2, 2), "b": (5,)}


def _tv(n_tasks: int = 3, seed: int = 0, shapes=SHAPES) -> wl.TaskVectors:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    fts = {f"t{i}": {k: torch.randn(s, generator=g) for k, s in shapes.items()} for i in range(n_tasks)}
    return wl.TaskVectors(base, fts)


def reference_knots(tv: wl.TaskVectors, *, density: float, alpha: float, ties: bool = True,
                    merge_func: str = "mean", keys=None) -> dict[str, torch.Tensor]:
    """The reference's algorithm in float64, written from its description: per key one SVD of the tasks'
    updates concatenated along the input axis (components with s > 1e-5 kept), task t represented by
    diag(s) V_t; every key's blocks flattened into one vector per task; the top-k magnitude mask per task
    (k-th value by kthvalue, ties kept); TIES sign election (zero sums take the sign of the sum of signs) and
    the sign mask; the first scaling coefficient times the disjoint mean (or sum); U times the merged block."""
    keys = sorted(k for k in tv.keys if len(tv.shape(k)) >= 2) if keys is None else keys
    T = len(tv)
    Us, sizes, reps = {}, {}, [[] for _ in range(T)]
    for key in keys:
        ds = [tv.delta(t, key).double().flatten(1) for t in tv.names]
        U, s, V = torch.linalg.svd(torch.cat(ds, 1), full_matrices=False)
        keep = s > 1e-5
        U, s, V = U[:, keep], s[keep], V[keep]
        n = V.shape[1] // T
        Us[key], sizes[key] = U, (U.shape[1], n)
        for t in range(T):
            reps[t].append((torch.diag(s) @ V[:, t * n:(t + 1) * n]).flatten())
    M = torch.stack([torch.cat(r) for r in reps])
    if density < 1:
        d = M.shape[1]
        kth = M.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
        mask = M.abs() >= kth
    else:
        mask = torch.ones_like(M, dtype=torch.bool)
    pruned = M * mask
    if ties:
        sign = torch.sign(pruned.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        mask = mask & torch.where(sign > 0, pruned > 0, pruned < 0)
    selected = alpha * M * mask
    if merge_func == "mean":
        merged = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    else:
        merged = selected.sum(0)
    out, start = {}, 0
    for key in keys:
        R, n = sizes[key]
        out[key] = (Us[key] @ merged[start:start + R * n].reshape(R, n)).reshape(tv.shape(key))
        start += R * n
    return out


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * scale, f"{err:.3g} > {rel} * {scale:.3g}"


# ------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("density, merge_func", [(0.2, "mean"), (0.5, "mean"), (0.35, "sum"), (1.0, "mean")])
def test_knots_ties_matches_the_reference(density, merge_func):
    tv = _tv()
    got = merge(tv, method="knots_ties", density=density, merge_func=merge_func, alpha=0.6, **CPU)
    want = reference_knots(tv, density=density, alpha=0.6, merge_func=merge_func)
    for key, ref in want.items():
        _close(got.update(key), ref)
    torch.testing.assert_close(got.update("b"), 0.6 * tv.deltas("b").mean(0))  # 1-D: the mean, as TSV/Iso


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_knots_ta_with_a_trim_matches_the_reference(density):
    tv = _tv(4, seed=1)
    got = merge(tv, method="knots_ta", density=density, alpha=0.5, **CPU)
    for key, ref in reference_knots(tv, density=density, alpha=0.5, ties=False, merge_func="sum").items():
        _close(got.update(key), ref)


def test_tensor_scope_is_the_reference_on_each_key_alone():
    tv = _tv(seed=2)
    got = merge(tv, method="knots_ties", density=0.3, scope="tensor", alpha=1.0, **CPU)
    for key in ("w1", "w2", "conv"):
        _close(got.update(key), reference_knots(tv, density=0.3, alpha=1.0, keys=[key])[key])


# ------------------------------------------------------------------------------------- identities
def test_knots_ta_is_task_arithmetic_on_every_key():
    tv = _tv(seed=3)
    got, ta = merge(tv, method="knots_ta", alpha=0.3, **CPU), merge(tv, method="task_arithmetic", alpha=0.3, **CPU)
    for key in tv.keys:
        _close(got.update(key), ta.update(key), 1e-6)
    assert get_method("knots_ta").mergekit({"alpha": 0.3, "density": 1.0}).method == "task_arithmetic"
    assert get_method("knots_ta").mergekit({"alpha": 0.3, "density": 0.5}) is None
    assert get_method("knots_ties").mergekit is None


@pytest.mark.parametrize("method", ["knots_ties", "knots_ta"])
def test_one_task_gives_its_own_update(method):
    tv = _tv(1, seed=4)
    got = merge(tv, method=method, density=1.0, alpha=1.0, **CPU)
    for key in ("w1", "w2", "conv"):
        _close(got.update(key), tv.delta("t0", key), 1e-6)


def test_orthogonal_tasks_share_no_coordinate():
    """Tasks on disjoint output rows: U splits into per-task columns and each block is zero off its own (up to
    rounding), so the disjoint sum is the plain sum and, once the trim drops the rounding noise (12 of each
    task's 36 entries are its own), so is the disjoint mean: no coordinate has two votes."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.zeros(9, 4)}
    fts = {}
    for i in range(3):
        d = torch.zeros(9, 4)
        d[3 * i:3 * i + 3] = torch.randn(3, 4, generator=g) * (i + 1)
        fts[f"t{i}"] = {"w": d}
    tv = wl.TaskVectors(base, fts)
    for density, merge_func in ((1.0, "sum"), (0.34, "mean")):
        got = merge(tv, method="knots_ties", density=density, merge_func=merge_func, alpha=1.0, **CPU)
        _close(got.update("w"), tv.deltas("w").sum(0), 1e-6)
    U, blocks = knots_blocks(MergeContext(tv, torch.device("cpu"), "knots_ties"), "w")
    assert U.shape == (9, 9) and blocks.shape == (3, 9, 4)
    own = blocks.abs() > 1e-6 * float(blocks.abs().max())
    assert int((own.any(2).sum(0) > 1).sum()) == 0  # each aligned direction belongs to one task


def test_zero_key_and_notes():
    shapes = {"w": (4, 3), "z": (3, 3)}
    tv = _tv(2, seed=6, shapes=shapes)
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    fts = {t: {"w": tv.delta(t, "w"), "z": torch.zeros(3, 3)} for t in tv.names}
    tv = wl.TaskVectors(base, fts)
    got = merge(tv, method="knots_ties", **CPU)
    assert not got.update("z").any()
    assert got.notes.note.tolist() == [
        "KnOTS-TIES: every task matrix is zero here (an untouched layer): zero update, no decomposition."]


# ------------------------------------------------------------------------------------- factors
def test_blocks_from_factors_equal_the_dense_blocks(tmp_path):
    """Random LoRA factors written as PEFT adapters: U blocks from the factors rebuild each task exactly, and
    the merges equal the merges of the same deltas given densely."""
    pytest.importorskip("safetensors")
    from test_merge_peft_modes import write_adapter  # noqa: PLC0415

    g = torch.Generator().manual_seed(7)
    base = {"lin.weight": torch.zeros(12, 10), "lin.bias": torch.zeros(12)}
    paths = {f"a{i}": write_adapter(tmp_path / f"a{i}", base, {"lin": (12, 10)}, r, 2 * r, g)
             for i, r in enumerate((2, 3, 4))}
    tv = wl.TaskVectors(base, paths)
    dense = wl.TaskVectors(base, {t: {k: tv.delta(t, k) for k in base} for t in tv.names})
    U, blocks = knots_blocks(MergeContext(tv, torch.device("cpu"), "knots_ties"), "lin.weight")
    assert U.shape == (12, 9) and blocks.shape == (3, 9, 10)
    for i, t in enumerate(tv.names):
        _close(U @ blocks[i], tv.delta(t, "lin.weight"))
    for method, params in (("knots_ties", {"density": 0.3}), ("knots_ta", {"density": 0.5}), ("knots_ta", {})):
        a, b = merge(tv, method=method, **params, **CPU), merge(dense, method=method, **params, **CPU)
        _close(a.update("lin.weight"), b.update("lin.weight"))
