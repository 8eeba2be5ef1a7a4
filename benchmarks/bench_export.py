"""Streaming export: peak memory of merging and exporting a >= 2 GB sharded checkpoint set.

Writes a synthetic bf16 checkpoint set into a temporary folder: a base and two fine-tunes (base plus
small noise), each about ``--gb`` GB in 500 MB safetensors shards with an HF index, transformer-like
keys (2048 wide, 8192 MLP). Then, each in a fresh subprocess, it merges them with ``--method`` and
exports the result with ``--shard-size`` shards, recording wall time and peak RSS (``VmHWM``,
Linux) above the RSS after imports:

* ``documented``: the README's flow, ``merged = wl.merge(tv, method=...)`` then ``wl.export(merged, ...)``,
  on TaskVectors with the default decomposition cache (``max_bytes="auto"``: 1/8 of the available
  memory, 256 MiB to 2 GiB);
* ``materialize-export``: ``wl.merge(...).materialize()`` (every merged key computed and held at
  once), then ``wl.export`` (default cache);
* with ``--before DIR`` (a copy of an earlier ``weightlens`` package tree, e.g. from ``git archive``),
  ``documented@before``: the documented flow run on that code (its default cache);
* ``stream`` / ``stream-256``: ``merge(..., lazy=True)`` on TaskVectors with a 64 / 256 MiB
  decomposition cache, then ``wl.export`` (one merged key at a time, written as computed);
* ``stream-default-cache``: the same lazy merge with the default cache;
* ``merge-only``: the lazy merge (64 MiB cache) read key by key and discarded: the merge's own
  working set; what the export adds is the difference to ``stream``;
* baseline ``materialise``: the lazy merge (64 MiB cache) collected into a dict of every merged
  tensor, then ``safetensors.torch.save_file`` per shard (what an exporter that holds the model does).

Target (issue 7): peak below one output shard plus one tensor of each input, plus a fixed overhead.
Run: ``.venv/bin/python benchmarks/bench_export.py [--gb 2.0] [--shard-size 1GB] [--method task_arithmetic]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from _machine import machine  # noqa: E402  (benchmarks run as scripts)

HIDDEN, FFN = 2048, 8192
CHILD = r"""
import json, os, sys, time
import psutil, torch
from safetensors.torch import save_file
from weightlens.io import export
from weightlens.io.export import parse_size, shard_names
from weightlens.linalg import DecompositionCache
from weightlens.merge import merge
from weightlens.taskvectors import TaskVectors


mode, folder, out, shard_size, method = sys.argv[1:6]
proc = psutil.Process()
rss0 = proc.memory_info().rss
t0 = time.perf_counter()
mode = mode.split("@")[0]
sizes = {"stream": 64 * 2**20, "stream-256": 256 * 2**20, "merge-only": 64 * 2**20, "materialise": 64 * 2**20}
cache = DecompositionCache(sizes[mode]) if mode in sizes else DecompositionCache()  # the default
tv = TaskVectors(os.path.join(folder, "base"), {t: os.path.join(folder, t) for t in ("a", "b")}, cache=cache)
m = merge(tv, method=method, lazy=mode not in ("documented", "materialize-export"))
if mode == "materialize-export":
    m.materialize()
if mode == "merge-only":
    for k in m:
        m[k]
    os.makedirs(out)
elif mode.startswith(("stream", "documented", "materialize-")):
    export(m, out, shard_size=shard_size, progress=False, like=False, recipe=False)
else:
    held = {k: m[k] for k in m}          # the whole merged model in memory
    limit, shards, size = parse_size(shard_size), [{}], 0
    for k, t in held.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({}); size = 0
        shards[-1][k] = t; size += n
    os.makedirs(out)
    for name, part in zip(shard_names(len(shards)), shards):
        save_file(part, os.path.join(out, name), metadata={"format": "pt"})
seconds = time.perf_counter() - t0
# VmHWM: peak RSS of this process image (ru_maxrss would also count the parent's memory before exec)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "rss0": rss0, "peak": peak, "cache_bytes": cache.nbytes,
                  "cache_max": cache.max_bytes}))
"""




def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of one transformer-like layer."""
    return [(f"layers.{i}.attn.{p}.weight", (HIDDEN, HIDDEN)) for p in "qkvo"] + [
        (f"layers.{i}.mlp.up.weight", (FFN, HIDDEN)), (f"layers.{i}.mlp.down.weight", (HIDDEN, FFN)),
        (f"layers.{i}.norm1.weight", (HIDDEN,)), (f"layers.{i}.norm2.weight", (HIDDEN,))]


def make_set(folder: Path, gb: float, shard_gb: float = 0.5) -> dict[str, float]:
    """Write base, a and b (bf16, sharded with an index) of about ``gb`` GB each; returns sizes."""
    per_layer = sum(math.prod(s) for _, s in layer_shapes(0)) * 2
    layers = max(1, math.ceil(gb * 1e9 / per_layer))
    names = ("base", "a", "b")
    for n in names:
        (folder / n).mkdir(parents=True)
        (folder / n / "config.json").write_text("{}")
    shards: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    maps: dict[str, dict[str, str]] = {n: {} for n in names}
    count, size = 0, 0
    g = torch.Generator().manual_seed(0)

    def flush() -> None:
        nonlocal count, size
        if not shards["base"]:
            return
        count, size = count + 1, 0
        for n in names:
            file = f"model-{count:05d}.safetensors"
            save_file(shards[n], str(folder / n / file), metadata={"format": "pt"})
            maps[n].update({k: file for k in shards[n]})
            shards[n] = {}

    for i in range(layers):
        for key, shape in layer_shapes(i):
            base = torch.randn(shape, generator=g) * 0.02
            shards["base"][key] = base.to(torch.bfloat16)
            for n in ("a", "b"):
                shards[n][key] = (base + 0.002 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            del base
            size += math.prod(shape) * 2
            if size >= shard_gb * 1e9:
                flush()
    flush()
    for n in names:
        (folder / n / "model.safetensors.index.json").write_text(json.dumps({"weight_map": maps[n]}))
    return {"per_checkpoint_gb": layers * per_layer / 1e9, "largest_tensor_bytes": FFN * HIDDEN * 2,
            "input_shards": count}


def run(mode: str, folder: Path, out: Path, shard_size: str, method: str, code: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code)} if code is not None else None
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(out), shard_size, method],
                          capture_output=True, text=True, env=env, cwd=folder)  # not this repo's package
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["out_files"] = len(list(out.glob("*.safetensors")))
    row["out_gb"] = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of each checkpoint (default 2.0)")
    parser.add_argument("--shard-size", default="1GB", help="output shard size (default 1GB)")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--modes", default="documented,materialize-export,stream,stream-256,stream-default-cache,"
                                           "merge-only,materialise")
    parser.add_argument("--before", type=Path, help="folder holding an earlier weightlens package: adds "
                                                    "documented@before, the documented flow on that code")
    parser.add_argument("--dir", type=Path, help="parent of the temporary folder (default: system temp)")
    args = parser.parse_args()
    from weightlens.io.export import parse_size

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        info = make_set(folder / "in", args.gb)
        print(f"wrote base + 2 fine-tunes, {info['per_checkpoint_gb']:.2f} GB each (bf16, "
              f"{info['input_shards']} shards each) in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = {}
        modes = args.modes.split(",") + (["documented@before"] if args.before else [])
        for mode in modes:
            code = args.before if mode.endswith("@before") else None
            rows[mode] = run(mode, folder / "in", folder / "out", args.shard_size, args.method, code)
            print(f"{mode}: {json.dumps(rows[mode])}", flush=True)
    shard, tensor = parse_size(args.shard_size), info["largest_tensor_bytes"]
    budget = shard + 3 * tensor
    mb = 2**20
    print(f"\n{machine()}; {args.method}, output shards {args.shard_size}; target: one output shard "
          f"({shard / mb:.0f} MiB) + one tensor of each input (3 x {tensor / mb:.0f} MiB) = {budget / mb:.0f} MiB "
          "+ fixed overhead\n")
    out_bytes = max(r["out_gb"] for r in rows.values()) * 1e9 or math.nan  # nan: no mode wrote anything
    base = rows.get("materialise")
    print("| run | time | peak RSS above post-import | / output size | / baseline | / target | cache held / max |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        grow = r["peak"] - r["rss0"]
        vs = f"{grow / (base['peak'] - base['rss0']):.2f}" if base else "-"
        print(f"| {mode} | {r['seconds']:.0f} s | {grow / mb:.0f} MiB | {grow / out_bytes:.2f} | {vs} | "
              f"{grow / budget:.2f} | {r['cache_bytes'] / mb:.0f} / {r['cache_max'] / mb:.0f} MiB |")
    print(f"\noutput: {out_bytes / 1e9:.2f} GB in {next(iter(rows.values()))['out_files']} files")
    print(f"\npost-import RSS (the fixed overhead of python + torch + weightlens): "
          f"{rows[next(iter(rows))]['rss0'] / mb:.0f} MiB")


if __name__ == "__main__":
    main()
