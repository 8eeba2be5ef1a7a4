"""weightlens against its peers on the same work: FusionBench's and mergekit's own functions and mergekit-yaml.

Three parts, every peer run in a fresh process of the peers' Python (``.venv-peers``, see ``pyproject.toml``'s
``peers`` extra: ``./dev.sh test`` installs mergekit there, ``peers-bench.txt`` adds FusionBench), every weightlens run in a fresh process of this Python, interleaved
(weightlens, FusionBench, mergekit, weightlens, ...), the median of ``--repeats`` (3) runs reported with each
ratio ``peer / weightlens`` (above 1: weightlens is faster). Nothing is installed at run time.

1. **Spectral merges on ViT-B/32 shapes**: ``--blocks`` blocks (of the 12) x {2304x768, 768x768, 3072x768,
   768x3072} and ``--tasks`` (8) task vectors, written once as safetensors. TSV-M, Iso-C and Iso-CTS against
   FusionBench (``TSVM_utils.compute_and_sum_svd_mem_reduction``, ``iso_utils.iso_c`` / ``iso_cts``). Each
   process times only the merge (reading the files is outside the clock; the subtraction ``ft - base`` is
   inside for both) and writes the merged update; the max relative difference ``max|a - b| / max|b|`` (worst
   key) is printed beside each ratio.
2. **TIES and task arithmetic** on the same inputs against FusionBench (``ties_merging_utils.ties_merging``,
   ``task_arithmetic.task_arithmetic_merge``) and mergekit's in-memory API
   (``mergekit.merge_methods.api.merge_state_dicts``). weightlens runs TIES with ``scope="global"`` against
   FusionBench (one threshold per task over the model, as the TIES code) and ``scope="tensor"`` against
   mergekit (per tensor, as mergekit).
3. **Whole model from disk**: a Llama-shaped HF checkpoint (``--llama-size``; base + 3 fine-tunes, fp32
   safetensors shards, written by this script) merged by ``mergekit-yaml`` and by ``weightlens merge`` (TIES
   and task arithmetic; wall time and peak RSS from ``/usr/bin/time -v``, one run each), the merged tensors
   compared; then weightlens TSV-M and ``weightlens report`` (the ``analyze`` tables, ``--json``) on the same
   model. Beside them, the machine's limits: the sequential read rate of the inputs (a magnitude merge from disk
   should reach half of it: bytes of input over the merge's wall time).

Each spectral merge is also timed against its bare LAPACK time (``_bare_lapack``: ``torch.linalg.svd`` of the
decompositions the reference algorithm takes, in the same kind of fresh process; target: weightlens at most
1.2x that).

Run ``python benchmarks/bench_peers.py`` (``--quick`` for a smoke run, ``--help`` for options; the defaults, 1 block
and a 0.08 B Llama, took about 24 minutes on 2 cores at load average 6: ``benchmarks/RESULTS.md``)
from the repository root with ``.venv-peers`` set up (``WEIGHTLENS_PEERS`` to point elsewhere). Prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PEERS = Path(os.environ.get("WEIGHTLENS_PEERS", ROOT / ".venv-peers"))
VIT_SHAPES = {"in_proj": (2304, 768), "out_proj": (768, 768), "c_fc": (3072, 768), "c_proj": (768, 3072)}
LLAMA = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (256, 704, 4, 8, 4, 8000),  # ~6 M parameters
    "small": (512, 1408, 16, 8, 4, 32000),  # ~80 M
    "0.5b": (1024, 2816, 36, 16, 8, 32000),  # ~0.49 B
}
ALPHA_TA = 0.3
DENSITY = 0.2
ISO_CTS_FRACTION = 0.8


# ---------------------------------------------------------------------------------------------- workers
def _read(folder: Path, tasks: int) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file

    return load_file(folder / "base.safetensors"), [load_file(folder / f"ft{i}.safetensors") for i in range(tasks)]


def _worker(tool: str, method: str, folder: Path, tasks: int, out: Path) -> None:
    """One timed merge in this (fresh) process: prints ``@@{"seconds": t}``, writes the merged update to ``out``."""
    from safetensors.torch import save_file

    base, fts = _read(folder, tasks)
    torch.set_grad_enabled(False)
    _import(tool)  # the clock covers the merge, not the first import of the tool's modules
    start = time.perf_counter()
    if tool == "weightlens":
        update = _weightlens(method, base, fts)
    elif tool == "fusionbench":
        update = _fusionbench(method, base, fts)
    elif tool == "mergekit":
        update = _mergekit(method, base, fts)
    elif tool == "lapack":
        update = _bare_lapack(method, base, fts)
    else:
        raise SystemExit(f"unknown tool {tool}")
    seconds = time.perf_counter() - start
    save_file({k: v.contiguous().float() for k, v in update.items()}, out)
    print("@@" + json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}), flush=True)


def _import(tool: str) -> None:
    """Import what ``tool``'s merge functions import, before the clock starts (each side alike)."""
    if tool == "weightlens":
        import weightlens.merge  # noqa: F401
    elif tool == "fusionbench":
        import fusion_bench.method.isotropic_merging.iso_utils  # noqa: F401
        import fusion_bench.method.task_arithmetic.task_arithmetic  # noqa: F401
        import fusion_bench.method.task_singular_vector.utils.TSVM_utils  # noqa: F401
        import fusion_bench.method.ties_merging.ties_merging_utils  # noqa: F401
    elif tool == "mergekit":
        import mergekit.merge_methods.api  # noqa: F401


def _weightlens(method: str, base: dict, fts: list[dict]) -> dict:
    from weightlens import TaskVectors
    from weightlens.merge import merge

    tv = TaskVectors(base, {f"t{i}": ft for i, ft in enumerate(fts)})
    params = {
        "tsv": {"alpha": 1.0}, "iso_c": {"alpha": 1.0},
        "iso_cts": {"alpha": 1.0, "common_fraction": ISO_CTS_FRACTION},
        "ties": {"alpha": 1.0, "density": DENSITY, "merge_func": "mean", "scope": "global"},
        "ties_tensor": {"alpha": 1.0, "density": DENSITY, "merge_func": "mean", "scope": "tensor"},
        "task_arithmetic": {"alpha": ALPHA_TA},
    }[method]
    result = merge(tv, method="ties" if method == "ties_tensor" else method, device="cpu", progress=False, **params)
    return {k: result.update(k) for k in tv.keys}


def _fusionbench(method: str, base: dict, fts: list[dict]) -> dict:
    taus = [{k: ft[k] - base[k] for k in base} for ft in fts]
    if method == "tsv":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

        return compute_and_sum_svd_mem_reduction(taus, accelerator="cpu")  # alpha = 1: no scaling
    if method == "iso_c":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c

        return iso_c(taus, accelerator="cpu")
    if method == "iso_cts":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

        return iso_cts(taus, common_space_fraction=ISO_CTS_FRACTION, accelerator="cpu")
    if method == "ties":
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector, ties_merging, vector_to_state_dict)

        flat = torch.vstack([state_dict_to_vector(t) for t in taus])
        merged = ties_merging(flat, reset_thresh=DENSITY, merge_func="mean")  # lambda = 1
        return vector_to_state_dict(merged, taus[0])
    if method == "task_arithmetic":
        from fusion_bench.method.task_arithmetic.task_arithmetic import task_arithmetic_merge

        def module(sd: dict) -> torch.nn.Module:
            # buffers: with parameters, this version's state_dict_add refuses Parameter + Tensor (type check)
            m = torch.nn.Module()
            for k, v in sd.items():
                m.register_buffer(k, v.clone())
            return m

        merged = task_arithmetic_merge(module(base), [module(ft) for ft in fts], scaling_factor=ALPHA_TA)
        return {k: b - base[k] for k, b in merged.named_buffers()}
    raise SystemExit(f"FusionBench has no {method} here")


def _mergekit(method: str, base: dict, fts: list[dict]) -> dict:
    from mergekit.merge_methods.api import merge_state_dicts

    models = {"base": base, **{f"t{i}": ft for i, ft in enumerate(fts)}}
    if method == "ties_tensor":
        params = {"weight": 1.0, "density": DENSITY, "lambda": 1.0, "normalize": True}
        merged = merge_state_dicts(models, "ties", parameters=params, base="base")
    elif method == "task_arithmetic":
        merged = merge_state_dicts(models, "task_arithmetic", parameters={"weight": ALPHA_TA, "normalize": False},
                                   base="base")
    else:
        raise SystemExit(f"mergekit has no {method} here")
    return {k: merged[k].float() - base[k].float() for k in base}


def _bare_lapack(method: str, base: dict, fts: list[dict]) -> dict:
    """The machine's limit for a spectral merge: ``torch.linalg.svd`` (thin) of the decompositions the reference
    algorithm takes per key, nothing else timed but forming the task vectors: TSV-M each task's matrix and the
    two orthogonalisations (``m x r`` and ``n x r``); Iso-C the sum; Iso-CTS the sum, each task's residual after
    the common subspace, and the two orthogonalisations. Returns no update (``{}``)."""
    svd = torch.linalg.svd
    for key, b in base.items():
        taus = [ft[key] - b for ft in fts]
        m, n = b.shape
        r = min(m, n)
        if method in ("iso_c", "iso_cts"):
            U = svd(sum(taus), full_matrices=False).U
        if method == "iso_cts":
            common = U[:, : int(ISO_CTS_FRACTION * r)]
            taus = [t - common @ (common.mT @ t) for t in taus]
        if method in ("tsv", "iso_cts"):
            for t in taus:
                svd(t, full_matrices=False)
            svd(torch.randn(m, r), full_matrices=False), svd(torch.randn(n, r), full_matrices=False)
    return {}


# ---------------------------------------------------------------------------------------------- driver
def _python(tool: str) -> Path:
    return Path(sys.executable) if tool in ("weightlens", "lapack") else PEERS / "bin" / "python"


def run_once(tool: str, method: str, folder: Path, tasks: int, out: Path) -> float:
    proc = subprocess.run([str(_python(tool)), str(HERE), "--worker", tool, method, str(folder), str(tasks), str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{tool} {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[2:])["seconds"]


def _difference(pairs) -> str:
    """``max_k max|a_k - b_k| / max|b_k|`` over tensor pairs, and how many entries differ by more than 1e-4 of
    their key's ``max|b|`` (beyond rounding: e.g. TIES keeping another of several equal magnitudes at its
    threshold, which fp32 fine-tunes stored as ``base + tau`` have: their deltas are quantized)."""
    worst, differ, total = 0.0, 0, 0
    for a, b in pairs:
        a, b = a.double(), b.double()
        scale = max(float(b.abs().max()), 1e-30)
        d = (a - b).abs()
        worst = max(worst, float(d.max()) / scale)
        differ += int((d > 1e-4 * scale).sum())
        total += d.numel()
    return f"{worst:.1e} ({differ} of {total / 1e6:.1f} M entries differ)" if differ else f"{worst:.1e}"


def max_relative_difference(a_path: Path, b_path: Path) -> str:
    """:func:`_difference` over the keys of two files (the same key set, checked)."""
    from safetensors import safe_open

    with safe_open(a_path, "pt") as fa, safe_open(b_path, "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys()), (sorted(fa.keys())[:3], sorted(fb.keys())[:3])
        return _difference((fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def write_vit(folder: Path, blocks: int, tasks: int) -> int:
    """ViT-B/32-shaped base and fine-tunes (base + a task vector of a few strong directions plus noise)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"resblocks_{b}_{name}": 0.02 * torch.randn(shape, generator=g)
            for b in range(blocks) for name, shape in VIT_SHAPES.items()}
    save_file(base, folder / "base.safetensors")
    for t in range(tasks):
        ft = {}
        for k, w in base.items():
            m, n = w.shape
            low = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / 8
            ft[k] = w + 1e-3 * (low + 0.3 * torch.randn(m, n, generator=g))
        save_file(ft, folder / f"ft{t}.safetensors")
    return sum(v.numel() for v in base.values())


def bench_in_memory(folder: Path, tasks: int, repeats: int, rows: list[tuple]) -> list[str]:
    """Parts 1 and 2: (method label, weightlens method, [(peer, peer method)])."""
    out = ["| method | weightlens (s) | peer | peer (s) | ratio peer / weightlens | max rel. diff. of the update |",
           "|---|---|---|---|---|---|"]
    behind = []
    for label, wl_methods, peers in rows:
        times: dict[tuple[str, str], list[float]] = {}
        files: dict[tuple[str, str], Path] = {}
        jobs = [("weightlens", m) for m in wl_methods] + list(peers)
        for _ in range(repeats):
            for tool, method in jobs:  # interleaved: one run of each, then again
                path = folder / f"out-{tool}-{method}.safetensors"
                times.setdefault((tool, method), []).append(run_once(tool, method, folder, tasks, path))
                files[(tool, method)] = path
        for (tool, method), wl_method in zip(peers, wl_methods * len(peers) if len(wl_methods) == 1 else wl_methods):
            ours = statistics.median(times[("weightlens", wl_method)])
            theirs = statistics.median(times[(tool, method)])
            name = label if wl_method == wl_methods[0] or len(wl_methods) == 1 else f"{label} ({wl_method})"
            if tool == "lapack":  # the machine's limit, not a peer: weightlens / bare, target <= 1.2
                out.append(f"| {name} | {ours:.2f} | bare LAPACK (its SVDs alone) | {theirs:.2f} | "
                           f"weightlens / bare **{ours / theirs:.2f}** (target <= 1.2) | - |")
                print(out[-1], flush=True)
                continue
            diff = max_relative_difference(files[("weightlens", wl_method)], files[(tool, method)])
            out.append(f"| {name} | {ours:.2f} | {tool} | {theirs:.2f} | {theirs / ours:.2f} | {diff} |")
            if theirs < ours:
                behind.append(f"{name} vs {tool}: weightlens {ours:.2f} s, {tool} {theirs:.2f} s")
            print(out[-1], flush=True)
    return out + ([""] + [f"weightlens behind: {b}" for b in behind] if behind else [])


def write_llama(folder: Path, size: str, tasks: int = 3) -> tuple[Path, list[Path], int]:
    """A Llama-shaped HF folder (config.json, fp32 safetensors shards, index) and ``tasks`` fine-tunes of it."""
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv, vocab = LLAMA[size]
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(1)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu"}
    base = {k: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)) for k, s in shapes.items()}
    folders = []
    for name in ["base"] + [f"ft{t}" for t in range(tasks)]:
        target = folder / name
        target.mkdir()
        (target / "config.json").write_text(json.dumps(config, indent=1))
        sd = base if name == "base" else {k: v + 2e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        keys = list(sd)
        shard_keys = [keys[i::4] for i in range(4)]  # 4 shards
        weight_map = {}
        for i, ks in enumerate(shard_keys):
            fname = f"model-{i + 1:05d}-of-00004.safetensors"
            save_file({k: sd[k].contiguous() for k in ks}, target / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in ks})
        total = sum(v.numel() * 4 for v in sd.values())
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        folders.append(target)
        del sd
    return folders[0], folders[1:], sum(v.numel() for v in base.values())


def timed_process(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of ``cmd`` under ``/usr/bin/time -v``."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, kb / 2**20


def _wl_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from weightlens.cli import main; sys.exit(main(sys.argv[1:]))"]


def mergekit_yaml(base: Path, fts: list[Path], method: str, out: Path, cfg: Path) -> list[str]:
    if method == "ties":
        models = [{"model": str(f), "parameters": {"weight": 1.0, "density": DENSITY}} for f in fts]
        params = {"lambda": 1.0, "normalize": True}
    else:
        models = [{"model": str(f), "parameters": {"weight": ALPHA_TA}} for f in fts]
        params = {"normalize": False}
    import yaml

    cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": models,
                                   "parameters": params, "dtype": "float32"}))
    return [str(PEERS / "bin" / "mergekit-yaml"), str(cfg), str(out), "--out-shard-size", "1B"]


def weightlens_merge(base: Path, fts: list[Path], method: str, out: Path) -> list[str]:
    params = {"ties": ["alpha=1.0", f"density={DENSITY}", "scope=tensor"], "task_arithmetic": [f"alpha={ALPHA_TA}"],
              "tsv": ["alpha=1.0"]}[method]
    cmd = [*_wl_cli(), "merge", "--base", str(base), *[a for i, f in enumerate(fts) for a in ("--ft", f"t{i}={f}")],
           "--method", method, "--out", str(out), "-q"]
    return cmd + [a for p in params for a in ("--param", p)]


def checkpoint_difference(a: Path, b: Path) -> tuple[str, int]:
    """:func:`_difference` over the tensors of two HF folders, and how many tensors were compared."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        where = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                where.update({k: f for k in fh.keys()})
        return where

    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb), sorted(set(ta) ^ set(tb))[:5]
    def pairs():
        for k in ta:
            with safe_open(ta[k], "pt") as fa, safe_open(tb[k], "pt") as fb:
                yield fa.get_tensor(k), fb.get_tensor(k)

    return _difference(pairs()), len(ta)


def read_rate(folders: list[Path]) -> tuple[float, int]:
    """The machine's sequential read rate (bytes/s) over every safetensors file of ``folders``, read in 64 MiB
    chunks once to warm the page cache as the merges find it, then timed (the best of 3), and the bytes read."""
    files = [f for folder in folders for f in sorted(folder.glob("*.safetensors"))]
    buf = bytearray(64 * 2**20)
    best, total = float("inf"), 0
    for _ in range(4):
        start, total = time.perf_counter(), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while (got := fh.readinto(buf)):
                    total += got
        best = min(best, time.perf_counter() - start)
    return total / best, total


def bench_whole_model(folder: Path, size: str) -> list[str]:
    base, fts, n = write_llama(folder, size)
    rate, inputs = read_rate([base, *fts])
    speeds = [f"sequential read rate of the {inputs / 2**30:.2f} GiB of inputs (page cache warm, as the merges find "
              f"it; 64 MiB reads, best of 3): {rate / 2**30:.2f} GiB/s"]
    out = [f"Llama-shaped checkpoint '{size}': {n / 1e9:.3f} B parameters, base + {len(fts)} fine-tunes, fp32, "
           "4 safetensors shards each; one run per row",
           "", "| work | tool | wall (s) | peak RSS (GiB) | ratio mergekit / weightlens (wall) | max rel. diff. |",
           "|---|---|---|---|---|---|"]
    for method in ("ties", "task_arithmetic"):
        wl_out, mk_out = folder / f"wl-{method}", folder / f"mk-{method}"
        wl_wall, wl_rss = timed_process(weightlens_merge(base, fts, method, wl_out))
        mk_wall, mk_rss = timed_process(mergekit_yaml(base, fts, method, mk_out, folder / f"{method}.yml"))
        diff, count = checkpoint_difference(wl_out, mk_out)
        out.append(f"| {method} | weightlens merge | {wl_wall:.1f} | {wl_rss:.2f} | | |")
        out.append(f"| {method} | mergekit-yaml | {mk_wall:.1f} | {mk_rss:.2f} | {mk_wall / wl_wall:.2f} | "
                   f"{diff}; {count} tensors |")
        speeds.append(f"{method}: weightlens merge reads its {inputs / 2**30:.2f} GiB of inputs at "
                      f"{inputs / wl_wall / 2**30:.2f} GiB/s over its whole run (start-up, checks and writing "
                      f"included) = **{inputs / wl_wall / rate:.2f}** of the read rate (target >= 0.5)")
        print("\n".join(out[-2:] + speeds[-1:]), flush=True)
        shutil.rmtree(wl_out), shutil.rmtree(mk_out)
    wall, rss = timed_process(weightlens_merge(base, fts, "tsv", folder / "wl-tsv"))
    out.append(f"| tsv (TSV-M) | weightlens merge | {wall:.1f} | {rss:.2f} | | |")
    print(out[-1], flush=True)
    wall, rss = timed_process([*_wl_cli(), "report", str(base), *[f"t{i}={f}" for i, f in enumerate(fts)],
                               "--json", str(folder / "report.json"), "-q"])
    out.append(f"| analyze (report --json) | weightlens report | {wall:.1f} | {rss:.2f} | | |")
    print(out[-1], flush=True)
    return out + ["", *speeds]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tool, method, folder, tasks, out = sys.argv[2:7]
        if tool == "weightlens":
            sys.path.insert(0, str(ROOT))  # this checkout's weightlens, not an installed one
        _worker(tool, method, Path(folder), int(tasks), Path(out))
        return
    sys.path.insert(0, str(HERE.parent))
    from _machine import load_average, machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=1,
                        help="ViT-B/32 blocks of the 12 (default 1: one TSV-M run took 60-80 s per block on 2 loaded cores)")
    parser.add_argument("--tasks", type=int, default=8, help="task vectors (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per tool (median; default 3)")
    parser.add_argument("--llama-size", choices=sorted(LLAMA), default="small",
                        help="whole-model part (default small, 0.08 B; 0.5b is the issue's size)")
    parser.add_argument("--quick", action="store_true", help="--blocks 1 --tasks 4 --llama-size tiny (a smoke run)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("spectral", "ties", "model"), help="parts left out")
    parser.add_argument("--tmp", help="scratch folder (default: a new temporary one, removed after)")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.tasks, args.llama_size = 1, 4, "tiny"
    if not (PEERS / "bin" / "python").is_file():
        raise SystemExit(f"no peers' environment at {PEERS}: ./dev.sh test sets it up, then "
                         f"{PEERS}/bin/pip install -c constraints.txt -r peers-bench.txt (FusionBench)")
    versions = subprocess.run([str(PEERS / "bin" / "python"), "-c", "import importlib.metadata as m, torch; "
                               "print(m.version('fusion-bench'), m.version('mergekit'), torch.__version__)"],
                              capture_output=True, text=True).stdout.split()
    scratch = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="bench_peers_"))
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lines = [f"device: {machine('cpu')}",
             f"peers: fusion-bench {versions[0]}, mergekit {versions[1]} (torch {versions[2]}) from {PEERS}",
             f"load average at start: {load_average()}",
             f"chosen: --blocks {args.blocks} of 12 (ViT-B/32), --tasks {args.tasks}, --repeats {args.repeats} "
             f"(median, interleaved, fresh process per run), --llama-size {args.llama_size}"
             + (" (--quick)" if args.quick else "")]
    print("\n".join(lines), flush=True)
    try:
        if "spectral" not in args.skip or "ties" not in args.skip:
            vit = scratch / "vit"
            vit.mkdir(exist_ok=True)
            n = write_vit(vit, args.blocks, args.tasks)
            lines += ["", f"ViT-B/32 shapes: {args.blocks} block(s) x {{2304x768, 768x768, 3072x768, 768x3072}}, "
                      f"{args.tasks} tasks, {n / 1e6:.1f} M parameters per task", ""]
            rows = []
            if "spectral" not in args.skip:
                rows += [("TSV-M", ["tsv"], [("fusionbench", "tsv"), ("lapack", "tsv")]),
                         ("Iso-C", ["iso_c"], [("fusionbench", "iso_c"), ("lapack", "iso_c")]),
                         (f"Iso-CTS (common {ISO_CTS_FRACTION})", ["iso_cts"],
                          [("fusionbench", "iso_cts"), ("lapack", "iso_cts")])]
            if "ties" not in args.skip:
                rows += [(f"TIES (density {DENSITY})", ["ties", "ties_tensor"],
                          [("fusionbench", "ties"), ("mergekit", "ties_tensor")]),
                         (f"task arithmetic (alpha {ALPHA_TA})", ["task_arithmetic"],
                          [("fusionbench", "task_arithmetic"), ("mergekit", "task_arithmetic")])]
            lines += bench_in_memory(vit, args.tasks, args.repeats, rows)
            lines += [f"load average after: {load_average()}"]
            shutil.rmtree(vit)
        if "model" not in args.skip:
            model = scratch / "llama"
            model.mkdir(exist_ok=True)
            lines += [""] + bench_whole_model(model, args.llama_size)
            shutil.rmtree(model)
    finally:
        if not args.tmp:
            shutil.rmtree(scratch, ignore_errors=True)
    lines += ["", f"load average at end: {load_average()}; total {time.perf_counter() - start:.0f} s"]
    print("\n\n" + "\n".join(lines))  # noqa: T201 - a benchmark script reports on stdout


if __name__ == "__main__":
    main()
