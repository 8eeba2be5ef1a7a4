"""Decompositions batched by shape against one call per matrix, and spectral merges against a per-key baseline.

Two Markdown tables, for one device (``--device``, default ``cuda``; ``cpu`` runs too, smaller, to show what a
batch gains there), each cell the median of ``--repeats`` interleaved runs after one warm-up:

1. **SVDs** of ``--tasks`` random matrices of each MiniLM (384x384, 1536x384, 384x1536) and ViT-B/32 (2304x768,
   768x768, 3072x768, 768x3072) shape: ``torch.linalg.svd`` one matrix at a time with torch's default driver
   (what FusionBench's and most per-key code does), ``weightlens.linalg.svd`` one at a time (the driver table,
   its checks and sign fixing) and ``weightlens.linalg.svd_many`` (one batched call); milliseconds per matrix,
   the ratios, and the largest relative difference of the singular values between ``svd_many`` and ``svd``.
   The weightlens columns include the copy to the device (task vectors live on the host); torch's does not.
2. **Merges** on ViT-B/32 shapes (``--blocks`` blocks x the 4 shapes, ``--tasks`` task vectors, in memory;
   ``--models minilm`` for MiniLM's blocks):
   TSV-M, Iso-C, Iso-CTS and STAR with ``weightlens.config.batch`` off (per key) and on (batched ahead), and
   for TSV-M and Iso-C a FusionBench-style per-key baseline on the same device: FusionBench's own functions
   when ``fusion_bench`` is importable, else the same algorithm written out here (per key: one default-driver
   ``torch.linalg.svd`` per task, then SVDs of the stacked vectors for TSV-M; one SVD of the sum for Iso-C).
   Seconds, ratios, and the largest relative difference ``max|a - b| / max|b|`` of the merged updates against
   the per-key weightlens merge.

Run ``python benchmarks/bench_gpu.py`` on a GPU machine (``benchmarks/gpu_session.sh`` does, with the other
GPU checks) and record the tables in ``benchmarks/RESULTS.md`` with the device named; ``--json PATH`` also
writes the raw figures. ``weightlens.config.batch = "auto"`` (batched on CUDA) is the default these tables
must justify.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's weightlens

import weightlens as wl  # noqa: E402
from weightlens import config, linalg  # noqa: E402

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)

#: One block's matrices of each model: all-MiniLM-L6-v2 (q, k, v, o, then the MLP) and ViT-B/32 (CLIP).
BLOCKS = {
    "minilm": {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attn_out": (384, 384),
               "intermediate": (1536, 384), "output": (384, 1536)},
    "vit": {"in_proj": (2304, 768), "out_proj": (768, 768), "c_fc": (3072, 768), "c_proj": (768, 3072)},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device,
                repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function over ``repeats`` rounds (one call of each per round) after a warm-up,
    and each function's last result."""
    last = {name: fn() for name, fn in fns.items()}
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            last[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, last


# ---------------------------------------------------------------------------------------------- SVDs
def bench_svds(device: torch.device, models: list[str], tasks: int, repeats: int) -> tuple[list[str], list[dict]]:
    """Rows of the SVD table (each distinct shape of ``models``' blocks) and their raw figures."""
    rows, raw = [], []
    g = torch.Generator().manual_seed(0)
    shapes = {f"{model} {m}x{n}": (m, n) for model in models for (m, n) in dict.fromkeys(BLOCKS[model].values())}
    for name, shape in shapes.items():
        xs = [torch.randn(shape, generator=g) for _ in range(tasks)]
        on = [x.to(device) for x in xs]
        t, last = interleaved({
            "torch": lambda: [torch.linalg.svd(x, full_matrices=False) for x in on],
            "svd": lambda: [linalg.svd(x, device=device) for x in xs],
            "svd_many": lambda: linalg.svd_many(xs, device=device),
        }, device, repeats)
        diff = max(float(((a.S - b.S).abs().max() / b.S.abs().max()).cpu())
                   for a, b in zip(last["svd_many"], last["svd"]))  # type: ignore[call-overload]
        per = {k: v / tasks * 1e3 for k, v in t.items()}
        driver = linalg.choose_driver(shape, device) or "default"
        rows.append(f"| {name} | {tasks} | {driver} | {per['torch']:.1f} | {per['svd']:.1f} | {per['svd_many']:.1f} "
                    f"| {t['svd'] / t['svd_many']:.2f} | {t['torch'] / t['svd_many']:.2f} | {diff:.1e} |")
        raw.append({"shape": name, "tasks": tasks, "driver": driver, "ms_per_matrix": per, "max_rel_diff_S": diff})
    return rows, raw


# ---------------------------------------------------------------------------------------------- merges
def model_inputs(model: str, blocks: int, tasks: int) -> tuple[dict, dict]:
    """A base shaped as ``blocks`` blocks of ``model`` and ``tasks`` fine-tunes (fp32, CPU)."""
    g = torch.Generator().manual_seed(1)
    base = {f"blocks.{b}.{k}.weight": torch.randn(s, generator=g) * 0.02
            for b in range(blocks) for k, s in BLOCKS[model].items()}
    fts = {f"t{i}": {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(tasks)}
    return base, fts


def weightlens_merge(method: str, base: dict, fts: dict, device: torch.device, batch: bool) -> dict:
    """The unscaled-at-alpha-1 updates of one weightlens merge, computed from a fresh TaskVectors."""
    config.batch = batch
    try:
        tv = wl.TaskVectors(base, fts)
        params = {"alpha": 1.0} if method != "star" else {}
        merged = wl.merge(tv, method=method, device=device, progress=False, **params).materialize()
        return {k: merged[k] - base[k] for k in base}
    finally:
        config.batch = "auto"


def fusionbench_style(method: str, base: dict, fts: dict, device: torch.device) -> dict:
    """FusionBench's TSV-M or Iso-C on ``device`` (its own functions when installed, else the same algorithm)."""
    taus = [{k: (ft[k] - base[k]).to(device) for k in base} for ft in fts.values()]
    try:
        if method == "tsv":
            from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

            return compute_and_sum_svd_mem_reduction(taus, accelerator=str(device))
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c

        return iso_c(taus, accelerator=str(device))
    except ImportError:
        pass
    out = {}
    for key in base:
        mats = [t[key] for t in taus]
        if method == "iso_c":
            U, S, Vh = torch.linalg.svd(sum(mats), full_matrices=False)
            out[key] = S.mean() * (U @ Vh)
            continue
        k = min(mats[0].shape) // len(mats)
        parts = [torch.linalg.svd(m, full_matrices=False) for m in mats]
        U = torch.cat([u[:, :k] for u, _, _ in parts], 1)
        S = torch.cat([s[:k] for _, s, _ in parts])
        V = torch.cat([vh[:k].T for _, _, vh in parts], 1)
        pu, _, qu = torch.linalg.svd(U, full_matrices=False)
        pv, _, qv = torch.linalg.svd(V, full_matrices=False)
        out[key] = ((pu @ qu) * S) @ (pv @ qv).T
    return out


def fusionbench_source() -> str:
    try:
        import fusion_bench  # noqa: F401
    except ImportError:
        return "FusionBench's algorithm written out here (fusion_bench not installed)"
    import importlib.metadata

    return f"fusion_bench {importlib.metadata.version('fusion-bench')}"


def rel_diff(a: dict, b: dict) -> float:
    """Largest ``max|a - b| / max|b|`` over the keys."""
    return max(float(((a[k].cpu().float() - b[k].cpu().float()).abs().max() / b[k].abs().max().clamp_min(1e-30)))
               for k in b)


def bench_merges(device: torch.device, model: str, blocks: int, tasks: int,
                 repeats: int) -> tuple[list[str], list[dict]]:
    """Rows of the merge table and their raw figures."""
    base, fts = model_inputs(model, blocks, tasks)
    rows, raw = [], []
    for method in ("tsv", "iso_c", "iso_cts", "star"):
        fns = {"per key": lambda m=method: weightlens_merge(m, base, fts, device, False),
               "batched": lambda m=method: weightlens_merge(m, base, fts, device, True)}
        if method in ("tsv", "iso_c"):
            fns["fusionbench"] = lambda m=method: fusionbench_style(m, base, fts, device)
        t, last = interleaved(fns, device, repeats)
        diffs = {name: rel_diff(last[name], last["per key"]) for name in fns if name != "per key"}
        fb = t.get("fusionbench")
        rows.append(f"| {method} | {t['per key']:.2f} | {t['batched']:.2f} | {t['per key'] / t['batched']:.2f} | "
                    f"{diffs['batched']:.1e} | " + (f"{fb:.2f} | {fb / t['batched']:.2f} | {diffs['fusionbench']:.1e} |"
                                                     if fb is not None else "- | - | - |"))
        raw.append({"method": method, "seconds": t, "max_rel_diff": diffs})
    return rows, raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tasks", type=int, default=8, help="task vectors / matrices per shape (default 8)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks in the merge table (default 2; ViT-B/32 has 12)")
    parser.add_argument("--models", default="minilm,vit",
                        help="shapes of the SVD table (default minilm,vit); the merge table uses the last")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell (median; default 3)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("svd", "merge"), help="tables left out")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    device = linalg.resolve_device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(BLOCKS):
        parser.error(f"--models takes a comma-separated list of {', '.join(BLOCKS)}; got {args.models!r}")
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    print(f"device: {machine(device)}; load average {load_average()}; --tasks {args.tasks} --blocks {args.blocks} "
          f"--repeats {args.repeats} (median, interleaved)\n", flush=True)
    raw: dict[str, object] = {"device": machine(device)}
    if "svd" not in args.skip:
        rows, raw["svd"] = bench_svds(device, models, args.tasks, args.repeats)
        print("| shape | matrices | table driver | torch.linalg.svd ms/matrix | wl svd ms/matrix | svd_many ms/matrix "
              "| svd / svd_many | torch / svd_many | max rel. diff of S |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n", flush=True)
    if "merge" not in args.skip:
        rows, raw["merge"] = bench_merges(device, models[-1], args.blocks, args.tasks, args.repeats)
        print(f"Merges: {args.blocks} {models[-1]} block(s), {args.tasks} tasks, in memory; baseline: "
              f"{fusionbench_source()}\n")
        print("| method | per key s | batched s | per key / batched | batched rel. diff | FusionBench-style s "
              "| FusionBench-style / batched | FusionBench-style rel. diff |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n")
    print(f"load average at end: {load_average()}; total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
