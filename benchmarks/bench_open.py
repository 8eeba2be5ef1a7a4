"""Opening a large sharded checkpoint is lazy: time and memory of ``wl.load`` vs reading every tensor.

Writes a >= 1 GB sharded safetensors checkpoint (bf16, transformer-like key names) into a temporary
folder, then in fresh subprocesses measures:

* ``wl.load(folder)`` plus a full walk of keys, shapes and dtypes (target: < 1 s, RSS growth < 50 MB);
* the baseline in the same run: every shard read into memory (what an eager loader such as
  ``torch.load`` of a ``.bin`` or ``load_state_dict`` does).

Run: ``.venv/bin/python benchmarks/bench_open.py [--gb 1.2] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r"""
import json, os, sys, time, psutil
folder, mode = sys.argv[1], sys.argv[2]
import torch, weightlens as wl
from safetensors.torch import load_file
proc = psutil.Process()
rss0 = proc.memory_info().rss
t0 = time.perf_counter()
if mode == "lazy":
    ckpt = wl.load(folder)
    n = sum(1 for k in ckpt if ckpt.shape(k) and ckpt.dtype(k))
    n_bytes = ckpt.nbytes
else:
    n, n_bytes, keep = 0, 0, []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            sd = {k: t.clone() for k, t in load_file(os.path.join(folder, f)).items()}
            keep.append(sd)
            n += len(sd); n_bytes += sum(t.numel() * t.element_size() for t in sd.values())
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rss_growth_mb": (proc.memory_info().rss - rss0) / 2**20, "keys": n, "gb": n_bytes / 1e9}))
"""


def make_checkpoint(folder: Path, gb: float, shard_gb: float = 0.25) -> None:
    """Write a bf16 sharded checkpoint of about ``gb`` gigabytes with an HF index."""
    hidden, ffn = 2048, 8192
    per_layer = (4 * hidden * hidden + 2 * hidden * ffn + 2 * hidden) * 2  # bytes in bf16
    layers = max(1, int(gb * 1e9 // per_layer) + 1)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, n_shard = 0, 0
    g = torch.Generator().manual_seed(0)

    def flush() -> None:
        nonlocal shard, size, n_shard
        if shard:
            name = f"model-{n_shard + 1:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update({k: name for k in shard})
            shard, size, n_shard = {}, 0, n_shard + 1

    for i in range(layers):
        for key, shape in (
            (f"layers.{i}.attn.q.weight", (hidden, hidden)), (f"layers.{i}.attn.k.weight", (hidden, hidden)),
            (f"layers.{i}.attn.v.weight", (hidden, hidden)), (f"layers.{i}.attn.o.weight", (hidden, hidden)),
            (f"layers.{i}.mlp.up.weight", (ffn, hidden)), (f"layers.{i}.mlp.down.weight", (hidden, ffn)),
            (f"layers.{i}.norm1.weight", (hidden,)), (f"layers.{i}.norm2.weight", (hidden,)),
        ):
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
            shard[key] = t
            size += t.numel() * 2
            if size >= shard_gb * 1e9:
                flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


def measure(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.2)
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_checkpoint(folder, args.gb)
        print(f"wrote {args.gb:.1f} GB checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        measure(folder, "lazy")  # warm the page cache for both contenders alike
        lazy, eager = measure(folder, "lazy"), measure(folder, "eager")
    print(f"checkpoint: {lazy['gb']:.2f} GB in {lazy['keys']} tensors")
    print(f"wl.load + walk all keys, shapes and dtypes: {lazy['seconds'] * 1e3:.0f} ms, "
          f"RSS +{lazy['rss_growth_mb']:.1f} MB   (targets: < 1000 ms, < 50 MB)")
    print(f"baseline: read every shard into memory:     {eager['seconds'] * 1e3:.0f} ms, "
          f"RSS +{eager['rss_growth_mb']:.1f} MB")
    print(f"ratio: lazy open is {eager['seconds'] / lazy['seconds']:.0f}x faster and uses "
          f"{eager['rss_growth_mb'] / max(lazy['rss_growth_mb'], 0.1):.0f}x less memory")


if __name__ == "__main__":
    main()
