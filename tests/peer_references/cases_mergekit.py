"""mergekit's own merge methods on small structured tensors: ``python cases_mergekit.py OUTDIR``.

Run by ``make.py`` with the peers' Python (``mergekit==0.1.5``). Each case calls the registered method
(``mergekit.merge_methods.registry.get(name)``) on one ``TensorGroup`` per key, the base as the group's
base entry, exactly as mergekit's executor does after planning. The fine-tunes' task vectors are matrices
with distinct singular values and entries with distinct magnitudes, so no tie decides a threshold.

SLERP's layer-wise ``t`` gradient: mergekit's planner gives layer ``i`` of ``L`` the position ``i / (L - 1)``
(``mergekit/plan.py``, ``plan_slice``) and the keys outside the layers position 0 (``pre_weights`` and
``post_weights`` are planned with ``t=0``); the generator takes those positions and mergekit's own
``evaluate_setting`` for the value of ``t`` there.

DARE and DELLA draw from torch's global generator (seeded here with ``torch.manual_seed``): their cases
hold one fine-tune, so the reference's keep mask is where the merge moved the base.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from _cases import distinct, geometric, peer, spectral, write_case
from mergekit.config import evaluate_setting
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

PEER = peer("mergekit")
LAYERS = {  # a tiny decoder: embeddings, two layers, a final norm
    "model.embed_tokens.weight": (20, 12),
    "model.layers.0.mlp.weight": (16, 12),
    "model.layers.0.mlp.bias": (16,),
    "model.layers.1.mlp.weight": (16, 12),
    "model.layers.1.mlp.bias": (16,),
    "model.norm.weight": (12,),
}
THREE_LAYERS = {f"model.layers.{i}.mlp.weight": (10, 8) for i in range(3)} | {"model.embed_tokens.weight": (12, 8)}


def task_vector(g: torch.Generator, shape: tuple[int, ...], scale: float, task: int) -> torch.Tensor:
    """A matrix ``scale * U diag(s) V^T`` with distinct geometric singular values, or a Gaussian vector."""
    if len(shape) == 2:
        return spectral(g, shape, geometric(min(shape), scale * (1 + 0.25 * task), 0.8))
    return scale * 0.4 * torch.randn(shape, generator=g)


def models(seed: int, n_tasks: int, scale: float = 1.0, layers: dict = LAYERS, check: bool = True,
           shared: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(base, {"t0": fine-tune, ...})``, drawn again (next sub-seed) until every fine-tune's fp32 deltas
    ``ft - base``, as every side computes them, have pairwise distinct magnitudes over the whole model
    (``check=False``: the first draw, for SLERP, which thresholds nothing). ``shared``: the weight of one
    direction common to every task vector (Model Stock's regime: fine-tunes at a clear angle below 90 degrees)."""
    for attempt in range(100):
        g = torch.Generator().manual_seed(1000 * seed + attempt)
        base = {k: torch.randn(s, generator=g) for k, s in layers.items()}
        common = {k: shared * task_vector(g, tuple(v.shape), scale, 0) for k, v in base.items()}
        tasks = {f"t{i}": {k: v + common[k] + task_vector(g, tuple(v.shape), scale, i) for k, v in base.items()}
                 for i in range(n_tasks)}
        if not check or all(distinct(torch.cat([(ft[k] - base[k]).reshape(-1) for k in base]))
                            for ft in tasks.values()):
            return base, tasks
    raise AssertionError(f"no untied draw for seed {seed}")


def near_colinear(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A fine-tune ``1.3 theta_0`` plus a perpendicular nudge of 0.5% of its norm: SLERP's linear branch
    (``|dot| > 0.9995``) with an update as large as a third of the weights, far above their fp32 rounding."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in LAYERS.items()}
    tasks = {"t0": {}}
    for k, v in base.items():
        nudge = torch.randn(v.shape, generator=g)
        nudge -= (nudge * v).sum() / (v * v).sum() * v
        tasks["t0"][k] = 1.3 * v + 0.005 * v.norm() * nudge / nudge.norm()
    return base, tasks


def run(name: str, base: dict[str, torch.Tensor] | None, tasks: dict[str, dict[str, torch.Tensor]],
        params: dict | None = None, per_key: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """mergekit's ``name`` on one group per key (``per_key``: parameters that differ by key): ``{key: merged}``."""
    method = registry.get(name)
    keys = list(base if base is not None else next(iter(tasks.values())))
    out = {}
    for key in keys:
        tensors = ([base[key]] if base is not None else []) + [ft[key] for ft in tasks.values()]
        ids = (["base"] if base is not None else []) + list(tasks)
        group = TensorGroup.from_tensors(tensors, ids=ids, base_index=0 if base is not None else None, name=key)
        (out[key],) = method([group], parameters={**(params or {}), **((per_key or {}).get(key, {}))})
    return out


def gta(outdir: Path, name: str, case: str, params: dict, *, seed: int, n_tasks: int = 3) -> None:
    """A generalized-task-arithmetic method (every fine-tune's ``weight`` 1) on ``n_tasks`` fine-tunes."""
    base, tasks = models(seed, n_tasks)
    params = {"weight": 1.0, **params}
    write_case(outdir, PEER, name, case, params=params, base=base, tasks=tasks,
               expected={"merged": run(name, base, tasks, params)}, kind="exact",
               call=f"mergekit.merge_methods.registry.get({name!r})")


def random_case(outdir: Path, name: str, case: str, params: dict, *, seed: int) -> None:
    """A random sparsification on one fine-tune of a 64 x 128 matrix (8192 draws), torch's generator seeded;
    the delta's magnitudes are distinct within each row (DELLA ranks them per row)."""
    for attempt in range(100):
        g = torch.Generator().manual_seed(1000 * seed + attempt)
        base = {"model.layers.0.mlp.weight": torch.randn(64, 128, generator=g)}
        tasks = {"t0": {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()}}
        delta = tasks["t0"]["model.layers.0.mlp.weight"] - base["model.layers.0.mlp.weight"]
        if all(distinct(row) for row in delta):
            break
    else:
        raise AssertionError(f"no untied draw for seed {seed}")
    params = {"weight": 1.0, **params}
    torch.manual_seed(seed)
    write_case(outdir, PEER, name, case, params=params, base=base, tasks=tasks,
               expected={"merged": run(name, base, tasks, params)}, kind="random", torch_seed=seed,
               call=f"mergekit.merge_methods.registry.get({name!r})")


def main(outdir: Path) -> None:
    """Every mergekit case weightlens has a method for."""
    outdir.mkdir(parents=True, exist_ok=True)
    base, tasks = models(1, 3)
    for case, normalize, weights in (("normalized", True, [0.5, 0.3, 0.2]), ("sum", False, [0.6, 0.3, 0.4])):
        params = {"weight": weights, "normalize": normalize}
        write_case(outdir, PEER, "linear", case, params=params, base=base, tasks=tasks,
                   expected={"merged": run("linear", None, tasks, params)}, kind="exact",
                   call="mergekit.merge_methods.registry.get('linear')")

    for case, t in (("spherical", 0.3), ("colinear", 0.7)):
        base, tasks = models(2, 1, check=False) if case == "spherical" else near_colinear(2)
        write_case(outdir, PEER, "slerp", case, params={"t": t}, base=base, tasks=tasks,
                   expected={"merged": run("slerp", base, tasks, {"t": t})}, kind="exact",
                   call="mergekit.merge_methods.registry.get('slerp')")
    anchors = [0.0, 0.5, 1.0]
    base, tasks = models(3, 1, layers=THREE_LAYERS)
    position = {k: (int(k.split(".")[2]) / 2 if ".layers." in k else 0.0) for k in base}
    per_key = {k: {"t": evaluate_setting(k, anchors, position[k], validate=float)} for k in base}
    write_case(outdir, PEER, "slerp", "gradient", params={"t": anchors}, base=base, tasks=tasks,
               expected={"merged": run("slerp", base, tasks, per_key=per_key)}, kind="exact",
               t_per_key={k: v["t"] for k, v in per_key.items()},
               call="mergekit.config.evaluate_setting; mergekit.merge_methods.registry.get('slerp')")

    for case, n_tasks, filter_wise in (("two", 2, False), ("three", 3, False), ("filter_wise", 3, True)):
        base, tasks = models(4, n_tasks, shared=1.0)
        params = {"filter_wise": filter_wise}
        write_case(outdir, PEER, "model_stock", case, params=params, base=base, tasks=tasks,
                   expected={"merged": run("model_stock", base, tasks, params)}, kind="exact",
                   call="mergekit.merge_methods.registry.get('model_stock')")

    gta(outdir, "task_arithmetic", "lambda", {"lambda": 0.7}, seed=5)
    gta(outdir, "ties", "mean", {"density": 0.3, "lambda": 0.9}, seed=6)
    gta(outdir, "ties", "sum", {"density": 0.3, "lambda": 0.5, "normalize": False}, seed=7)
    gta(outdir, "breadcrumbs", "plain", {"density": 0.8, "gamma": 0.05, "lambda": 0.6}, seed=8)
    gta(outdir, "breadcrumbs", "rescaled", {"density": 0.6, "gamma": 0.1, "rescale": True, "normalize": True},
        seed=9)
    gta(outdir, "breadcrumbs_ties", "plain", {"density": 0.8, "gamma": 0.05, "lambda": 0.6}, seed=10)
    gta(outdir, "breadcrumbs_ties", "normalized", {"density": 0.7, "gamma": 0.1, "normalize": True}, seed=11)

    random_case(outdir, "dare_linear", "rescaled", {"density": 0.4, "lambda": 0.8}, seed=20)
    random_case(outdir, "dare_ties", "rescaled", {"density": 0.6}, seed=21)
    random_case(outdir, "della", "rescaled", {"density": 0.5, "epsilon": 0.15}, seed=22)
    random_case(outdir, "della_linear", "rescaled", {"density": 0.4, "epsilon": 0.2, "lambda": 0.7}, seed=23)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: cases_mergekit.py OUTDIR")
    main(Path(sys.argv[1]))
