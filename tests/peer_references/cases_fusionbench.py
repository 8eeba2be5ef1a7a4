"""FusionBench's own merging code on small structured tensors: ``python cases_fusionbench.py OUTDIR``.

Run by ``make.py`` with the peers' Python (``fusion-bench==0.2.33``). Where an algorithm class runs without a
Lightning fabric it is run whole on a ``BaseModelPool`` of ``ParameterDictModel`` modules (task arithmetic, TIES,
Model Stock, EMR, DARE; the TALL-mask class' steps are called one by one, see ``main``); where the class needs a
fabric only for its device (TSV-M, Iso-C, Iso-CTS, WUDI) its merging function is called as the class calls it,
with ``accelerator="cpu"`` (an argument of those functions: nothing is patched; WUDI's Adam loop runs on the CPU)
and the class' final scaling done as the class does it.

Inputs: task vectors whose matrices have distinct singular values with clear gaps (every truncation TSV-M and
Iso-CTS make is decided by a gap of at least 2% of the top value, checked here) and whose entries have distinct
magnitudes over the whole model (TIES' global threshold, the TALL masks' comparisons). FusionBench 0.2.33 has
no PCB, Breadcrumbs or DELLA (no ``pcb``/``breadcrumbs``/``della`` anywhere in ``fusion_bench``): their only
references are the paper (PCB) and mergekit (``cases_mergekit.py``).

Consensus merging: FusionBench builds the TALL masks (``tall_mask.utils.generate_task_masks``) and the consensus
mask (``construct_consensus_mask``, which reads the masks from the files its ``construct_tall_mask`` step
saves: written here in its format) but leaves ``theta_0 + lambda * consensus * tau_MTL`` (and each task's
``theta_0 + mask_t * tau_MTL``) to the caller, as the TALL-masks repository's evaluation does; those products
are the only arithmetic done here. Two FusionBench 0.2.33 defects are worked around, not copied: see
``consensus`` (aliased masks) and ``main`` (the TALL-mask class' masks in the wrong space, kept as a case the
test expects to differ).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from _cases import distinct, geometric, peer, relative_gap, spectral, write_case
from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic
from fusion_bench.method.emr_merging.emr_merging import EMRMerging
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.model_stock.model_stock import ModelStock
from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as tall_task_masks
from fusion_bench.method.tall_mask.utils import construct_consensus_mask, generate_task_masks
from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm
from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, ties_merging, vector_to_state_dict
from fusion_bench.method.wudi.wudi import wudi_merging
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.parameter_dict import ParameterDictModel
from fusion_bench.utils.state_dict_arithmetic import (
    state_dict_add,
    state_dict_hadamard_product,
    state_dict_mul,
    state_dict_sub,
    state_dict_sum,
)

PEER = peer("fusion-bench")
LAYERS = {  # square, tall and wide matrices (12 singular values: 4 per task for 3 tasks; 10: 3 per task), vectors
    "blocks.0.attn.weight": (12, 12),
    "blocks.0.attn.bias": (12,),
    "blocks.0.mlp.weight": (16, 12),
    "blocks.0.mlp.bias": (16,),
    "blocks.1.mlp.weight": (12, 12),
    "blocks.1.attn.weight": (10, 16),
    "norm.weight": (12,),
}
State = dict[str, torch.Tensor]


def draw(seed: int, n_tasks: int, shared: float, layers: dict) -> tuple[State, dict[str, State]]:
    """One draw of a base and ``n_tasks`` fine-tunes: task vectors ``shared * C + own_t`` per key."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in layers.items()}

    def vector(shape: tuple[int, ...], top: float) -> torch.Tensor:
        if len(shape) == 2:
            return spectral(g, shape, geometric(min(shape), top, 0.8))
        return 0.3 * top * torch.randn(shape, generator=g)

    common = {k: shared * vector(tuple(v.shape), 1.0) for k, v in base.items()}
    tasks = {f"t{i}": {k: v + common[k] + vector(tuple(v.shape), 1.0 + 0.3 * i) for k, v in base.items()}
             for i in range(n_tasks)}
    return base, tasks


def deltas(base: State, tasks: dict[str, State]) -> list[State]:
    """The task vectors as FusionBench computes them (``state_dict_sub``)."""
    return [state_dict_sub(ft, base) for ft in tasks.values()]


def gaps_ok(base: State, tasks: dict[str, State], least: float = 0.02) -> bool:
    """Whether every cut TSV-M (``int(k / T)`` per task) and Iso-CTS (0.8 common; the rest per task) make on the
    fp32 task vectors lies in a gap of at least ``least`` of the top singular value."""
    tvs, n = deltas(base, tasks), len(tasks)
    for key, x in base.items():
        if x.dim() != 2:
            continue
        k = min(x.shape)
        for tv in tvs:  # TSV-M: each task's top int(k / T)
            cut = int(k / n)
            if cut < k and relative_gap(torch.linalg.svdvals(tv[key].double()), cut) < least:
                return False
        common = k - round((k - int(k * 0.8)) / n) * n  # Iso-CTS' common space
        total = sum(tv[key].double() for tv in tvs)
        u, s, _ = torch.linalg.svd(total)
        if relative_gap(s, common) < least:
            return False
        per_task = (k - common) // n
        for tv in tvs:
            w = tv[key].double()
            rest = torch.linalg.svdvals(w - u[:, :common] @ u[:, :common].T @ w)
            if relative_gap(rest, per_task) < least:
                return False
    return True


def models(seed: int, n_tasks: int = 3, shared: float = 0.0, layers: dict = LAYERS) -> tuple[State, dict[str, State]]:
    """The first draw (sub-seeds ``1000 seed + i``) whose task vectors have untied magnitudes and gapped spectra."""
    for attempt in range(200):
        base, tasks = draw(1000 * seed + attempt, n_tasks, shared, layers)
        tvs = deltas(base, tasks)
        if all(distinct(torch.cat([tv[k].reshape(-1) for k in base])) for tv in tvs) and gaps_ok(base, tasks):
            return base, tasks
    raise AssertionError(f"no well-conditioned draw for seed {seed}")


def module(state: State) -> ParameterDictModel:
    """A ``ParameterDictModel`` holding a copy of ``state`` (FusionBench's algorithms merge modules in place;
    trainable, as DARE only drops the parameters that require a gradient)."""
    return ParameterDictModel({k: nn.Parameter(v.clone()) for k, v in state.items()})


def pool(base: State, tasks: dict[str, State]) -> BaseModelPool:
    """A model pool: the base as ``_pretrained_`` and the fine-tunes by task name."""
    return BaseModelPool({"_pretrained_": module(base), **{t: module(s) for t, s in tasks.items()}})


def weights(model: nn.Module, keys: list[str]) -> State:
    """The module's weights at ``keys``."""
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


def case(outdir: Path, method: str, name: str, params: dict, base: State, tasks: dict[str, State],
         expected: dict[str, State], call: str, **meta) -> None:
    """Write one exact case."""
    write_case(outdir, PEER, method, name, params=params, base=base, tasks=tasks, expected=expected,
               kind="exact", call=call, **meta)


def main(outdir: Path) -> None:
    """Every FusionBench case weightlens has a method for."""
    outdir.mkdir(parents=True, exist_ok=True)
    keys = list(LAYERS)

    base, tasks = models(1)
    params = {"scaling_factor": 0.3}
    merged = TaskArithmeticAlgorithm(**params).run(pool(base, tasks))
    case(outdir, "task_arithmetic", "default", params, base, tasks, {"merged": weights(merged, keys)},
         "fusion_bench.method.TaskArithmeticAlgorithm.run")

    for name, merge_func, seed in (("sum", "sum", 2), ("mean", "mean", 3)):
        base, tasks = models(seed)
        params = {"scaling_factor": 0.5, "threshold": 20, "remove_keys": [], "merge_func": merge_func}
        merged = TiesMergingAlgorithm(**params).run(pool(base, tasks))
        case(outdir, "ties_merging", name, params, base, tasks, {"merged": weights(merged, keys)},
             "fusion_bench.method.TiesMergingAlgorithm.run")

    base, tasks = models(4)
    new = compute_and_sum_svd_mem_reduction(deltas(base, tasks), exclude_keys=[], accelerator="cpu")
    case(outdir, "task_singular_vector", "default", {"alpha": None, "exclude_keys": []}, base, tasks,
         {"merged": state_dict_add(new, base)},
         "fusion_bench.method.task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction "
         "(TaskSingularVectorMerging.run with alpha=None)")

    base, tasks = models(5)
    params = {"scaling_factor": 1.2}
    new = iso_c(deltas(base, tasks), accelerator="cpu", exclude_keys=[])
    case(outdir, "iso_c", "default", params, base, tasks, {"merged": state_dict_add(base, state_dict_mul(new, 1.2))},
         "fusion_bench.method.isotropic_merging.iso_utils.iso_c (IsotropicMergingInCommonSubspace.run)")

    base, tasks = models(6)
    params = {"scaling_factor": 1.1, "common_space_fraction": 0.8}
    new = iso_cts(deltas(base, tasks), common_space_fraction=0.8, accelerator="cpu", exclude_keys=[])
    case(outdir, "iso_cts", "default", params, base, tasks, {"merged": state_dict_add(base, state_dict_mul(new, 1.1))},
         "fusion_bench.method.isotropic_merging.iso_utils.iso_cts (IsotropicMergingInCommonAndTaskSubspace.run)")

    for name, n_tasks, seed in (("two", 2, 7), ("three", 3, 8)):
        base, tasks = models(seed, n_tasks, shared=1.0)
        merged = ModelStock().run(pool(base, tasks))
        case(outdir, "model_stock", name, {"ignore_keys": []}, base, tasks, {"merged": weights(merged, keys)},
             "fusion_bench.method.ModelStock.run")

    # TallMaskTaskArithmeticAlgorithm.run's steps on plain tensors (on modules it stops with a TypeError in 0.2.33:
    # its state_dict_add of keep_vars Parameters and plain Tensors fails FusionBench's own type check). It passes
    # the pretrained *weights* where its generate_task_masks expects theta_0 in task-vector space, so its masks
    # are |theta_0 - tau_t| > lambda |tau_MTL - tau_t| (the paper's: |tau_t| > ...): the test expects the mismatch.
    base, tasks = models(9, shared=0.5)
    params = {"tall_mask_lambda": 0.6}
    tvs = dict(zip(tasks, deltas(base, tasks)))
    multi = state_dict_sum(list(tvs.values()))
    retrieved = {t: state_dict_add(base, state_dict_hadamard_product(
        tall_task_masks(multi, tvs[t], base, tall_mask_lambda=0.6), multi)) for t in tasks}
    case(outdir, "tall_mask_task_arithmetic", "default", params, base, tasks, retrieved,
         "fusion_bench.method.tall_mask.task_arithmetic.generate_task_masks; state_dict_hadamard_product "
         "(TallMaskTaskArithmeticAlgorithm.run's steps: one model per task, theta_0 + mask_t * tau_MTL)")

    for name, use_ties, seed in (("ta", False, 10), ("ties", True, 11)):
        base, tasks = models(seed, shared=0.5)
        consensus(outdir, name, use_ties, base, tasks)

    base, tasks = models(12)
    emr = EMRMerging().run(pool(base, tasks))
    expected = {"merged": state_dict_add(weights(emr.backbone, keys), emr.unified_task_vector)}
    for task in tasks:  # a fresh run per task: set_task adds to the backbone in place, a switch subtracts again
        emr = EMRMerging().run(pool(base, tasks))
        emr.set_task(task)
        expected[task] = weights(emr.backbone, keys)
    case(outdir, "emr_merging", "default", {}, base, tasks, expected,
         "fusion_bench.method.EMRMerging.run; EMRModulatedModel.set_task (merged: backbone + unified_task_vector)")

    base, tasks = models(13)
    torch.manual_seed(0)
    new = wudi_merging(deltas(base, tasks), accelerator="cpu", iter_num=300, exclude_keys=[])
    case(outdir, "wudi_merging", "default", {"iter_num": 300, "exclude_keys": []}, base, tasks,
         {"merged": state_dict_add(base, {k: v.detach() for k, v in new.items()})},
         "fusion_bench.method.wudi.wudi.wudi_merging (WUDIMerging.run), accelerator='cpu'")

    dare(outdir)


def consensus(outdir: Path, name: str, use_ties: bool, base: State, tasks: dict[str, State]) -> None:
    """Consensus merging (``k=2``, ``lambda=0.6``): TALL masks of the TA sum or the TIES vector, the consensus mask
    from ``construct_consensus_mask`` reading them as saved by FusionBench's ``construct_tall_mask``."""
    lam, k, alpha = 0.6, 2, 0.4
    ptm = {key: v.clone() for key, v in base.items()}
    flat_ptm = state_dict_to_vector(ptm)  # ties_merging_utils' flattening: sorted keys, as fusion_bench.utils
    flat_ft = torch.vstack([state_dict_to_vector(ft) for ft in tasks.values()])
    tv_flat = flat_ft - flat_ptm
    multi = ties_merging(tv_flat, reset_thresh=20, merge_func="sum") if use_ties else tv_flat.sum(0)
    masks = generate_task_masks(tv_flat, flat_ft, flat_ptm, tv=multi, tall_mask_lambda=lam)
    with tempfile.TemporaryDirectory() as root:
        config = SimpleNamespace(model_location=os.path.join(root, "checkpoints"), model="tiny", num_tasks=len(tasks),
                                 method=SimpleNamespace(use_ties=use_ties))
        folder = Path(root) / "tall_masks" / "tiny"
        folder.mkdir(parents=True)
        # packed bits as the TALL-masks repository saves them, held in uint8 tensors: load_tall_mask reads with
        # torch.load(weights_only=True), which refuses numpy arrays under torch 2.13, and unpacks with np.unpackbits
        packed = {t: torch.from_numpy(np.packbits(m.numpy())) for t, m in zip(tasks, masks)}
        suffix = "_use_ties" if use_ties else ""
        torch.save(packed, folder / f"TALL_mask_{len(tasks)}task{suffix}.npy")
        # ptm_check as a module: given a dict, fusion_bench.utils.vector_to_state_dict shallow-copies it and rebinds
        # its tensors' data, so every task's unpacked mask aliases the last one's (and the dict is overwritten)
        mask = construct_consensus_mask(module(ptm), k, config, remove_keys=[])
    merged = flat_ptm + alpha * mask * multi  # the caller's step (the TALL-masks repository's evaluation)
    per_task = {t: vector_to_state_dict(flat_ptm + m * multi, ptm) for t, m in zip(tasks, masks)}
    params = {"prun_thre_k": k, "tall_mask_lambda": lam, "use_ties": use_ties, "scaling_factor": alpha}
    if use_ties:
        params |= {"threshold": 20, "merge_func": "sum"}
    case(outdir, "consensus", name, params, base, tasks,
         {"merged": vector_to_state_dict(merged, ptm), "mask": vector_to_state_dict(mask.float(), ptm), **per_task},
         "fusion_bench.method.tall_mask.utils.generate_task_masks, construct_consensus_mask"
         + ("; ties_merging_utils.ties_merging" if use_ties else ""))


def dare(outdir: Path) -> None:
    """DARE task arithmetic on one fine-tune of a 64 x 128 matrix: FusionBench's ``rand_like`` draws (torch's
    global generator, seeded), so the keep mask is where the merge moved the base."""
    g = torch.Generator().manual_seed(14)
    base = {"blocks.0.mlp.weight": torch.randn(64, 128, generator=g)}
    tasks = {"t0": {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()}}
    params = {"scaling_factor": 0.3, "sparsity_ratio": 0.6, "only_on_linear_weights": False, "rescale": True}
    torch.manual_seed(14)
    merged = DareTaskArithmetic(**params).run(pool(base, tasks))
    write_case(outdir, PEER, "dare_task_arithmetic", "default", params=params, base=base, tasks=tasks,
               expected={"merged": weights(merged, list(base))}, kind="random", torch_seed=14,
               call="fusion_bench.method.dare.DareTaskArithmetic.run")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: cases_fusionbench.py OUTDIR")
    main(Path(sys.argv[1]))
