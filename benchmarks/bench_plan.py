"""How well ``wl.plan`` predicts a merge: its time and peak RSS against a measured merge + export.

Each case runs in a fresh subprocess: open the task vectors, plan (rates from a calibration kept in this
run's temporary folder, measured once by the parent), then ``wl.export(wl.merge(tv, method=...), out)``
timed, and the process' peak RSS (``ru_maxrss``) read afterwards. Cases: the digits task zoo (CI size)
and a Llama-shaped model (``transformers.LlamaConfig``, a few layers, bf16) with 3 fine-tunes written as
safetensors. The acceptance: time within 2x, peak RSS within 25%.

    WEIGHTLENS_HOME=... python benchmarks/bench_plan.py [--threads N] [--methods tsv,iso_c,ties]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's weightlens
from _machine import load_average, machine  # noqa: E402

LLAMA = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256)


def build_llama(folder: Path, n_tasks: int = 3) -> tuple[Path, dict[str, Path]]:
    """Base + ``n_tasks`` fine-tunes of a small Llama-shaped model (bf16 safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    fts = {}
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(t + 1)
        ft = {}
        for k, v in base.items():
            noise = 1e-3 * torch.randn(v.shape, generator=g)
            if v.dim() == 2:  # a low-rank direction on top, as a fine-tune has
                noise += 1e-2 * torch.randn(v.shape[0], 8, generator=g) @ torch.randn(8, v.shape[1], generator=g) / 8
            ft[k] = (v.float() + noise).to(torch.bfloat16).contiguous()
        fts[f"t{t}"] = folder / f"ft{t}.safetensors"
        save_file(ft, str(fts[f"t{t}"]))
    return folder / "base.safetensors", fts


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def child(case: str, method: str, calibration: str, llama: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import weightlens as wl

    wl.config.progress = False
    if case == "digits":
        tv = wl.zoo.load("digits-tasks", size="ci").task_vectors()
    else:
        folder = Path(llama)
        tv = wl.TaskVectors(folder / "base.safetensors",
                            {p.stem: p for p in sorted(folder.glob("ft*.safetensors"))})
    from weightlens.merge.registry import get_method

    rates = wl.planning.calibrate("cpu", path=calibration, methods=[(method, get_method(method).resolve({}, len(tv)))])
    p = wl.plan(tv, method, device="cpu", rates=rates)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        wl.export(wl.merge(tv, method=method, device="cpu"), Path(tmp) / "out")
        seconds = time.perf_counter() - t0
    rss = _peak_rss()  # VmHWM: ru_maxrss would carry the parent's peak across fork and exec
    return {"case": case, "method": method, "pred_s": p.seconds["cpu"], "meas_s": seconds,
            "pred_rss": p.peak_host_bytes, "meas_rss": rss, "keys": len(p.keys)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default="tsv,iso_c,ties")
    ap.add_argument("--cases", default="digits,llama")
    ap.add_argument("--child", nargs=5)
    args = ap.parse_args()
    if args.child:
        case, method, cal, llama, threads = args.child
        print(json.dumps(child(case, method, cal, llama, int(threads))))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"# {machine('cpu')}; merges use {threads} torch thread(s); load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="wl-bench-plan-") as tmp:
        cal = str(Path(tmp) / "calibration.json")
        import weightlens as wl

        t0 = time.perf_counter()
        rates = wl.planning.calibrate("cpu", path=cal)
        print(f"calibration: {time.perf_counter() - t0:.1f} s; {rates}")
        llama = Path(tmp) / "llama"
        if "llama" in args.cases:
            build_llama(llama)
        print("| case | method | keys | predicted s | measured s | ratio | predicted peak RSS | measured | error |")
        print("|---|---|---|---|---|---|---|---|---|")
        for case in args.cases.split(","):
            for method in args.methods.split(","):
                out = subprocess.run([sys.executable, __file__, "--child", case, method, cal, str(llama),
                                      str(threads)], capture_output=True, text=True, env=os.environ)
                if out.returncode:
                    print(f"| {case} | {method} | failed: {out.stderr.strip().splitlines()[-1]} |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                ratio = r["pred_s"] / r["meas_s"]
                err = r["pred_rss"] / r["meas_rss"] - 1
                print(f"| {case} | {method} | {r['keys']} | {r['pred_s']:.2f} | {r['meas_s']:.2f} | {ratio:.2f} | "
                      f"{r['pred_rss'] / 2**20:.0f} MiB | {r['meas_rss'] / 2**20:.0f} MiB | {err:+.0%} |", flush=True)
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    main()
