"""Batched LMC curve (``torch.vmap`` over stacked interpolated parameters) against a per-alpha loop.

Both sides score the same 25 alphas on the same data in the same run:

* ``batched``: ``wl.lmc.curve(a, b, Evaluator(module, data, loss, vectorize=True))``: every batch
  of data goes through all alphas at once (``functional_call`` under ``vmap``, chunked to
  ``max_bytes``);
* ``loop``: ``wl.lmc.curve(a, b, lambda sd: ev(sd))``: one ordinary ``functional_call`` per alpha,
  same evaluator, same data (the fallback every plain callable gets);
* on the digits pair also ``zoo loop``: the zoo's own scorer ``PairZoo.evaluate`` per alpha and split;
* where ``vectorize="auto"`` declines vmap (convolutions on the CPU), also that choice.

Cases: the digits MLP pair at width 512 (CI zoo; train and test splits), a wider synthetic MLP
784-2048-2048-10 (random weights, random data) and a small CNN (random weights, 8x8 images).
Timings are medians of ``--repeats`` round-robin rounds after one warm-up call each; the table
also shows the largest loss difference between the two paths.

Run ``python benchmarks/bench_lmc.py`` (``--help`` for options); build the zoo first with
``weightlens zoo build --size ci --names digits-pairs``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import weightlens as wl
from weightlens import lmc, zoo

from _machine import machine  # noqa: E402  (benchmarks run as scripts)




def timeit(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, one warm-up call each, round-robin rounds."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _seeded_state(factory: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in factory().state_dict().items()}


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def cases(args: argparse.Namespace) -> list[dict]:
    """(name, a, b, module, data, extra baselines) of every benchmark case."""
    out = []
    zoo.build(size="ci", names=["digits-pairs"], progress=False)
    pair = zoo.load("digits-pairs", size="ci", width=512)
    out.append({
        "name": "digits MLP 64-512-512-10 (train 1347 + test 450)", "a": pair.a, "b": pair.b,
        "module": pair.make_module(), "data": {s: pair.data(s) for s in ("train", "test")},
        "extra": {"zoo loop": lambda sd: {s: pair.evaluate(sd, s) for s in ("train", "test")}},
    })
    gen = torch.Generator().manual_seed(0)
    n = args.samples
    out.append({
        "name": f"synthetic MLP 784-2048-2048-10 ({n} samples)", "a": _seeded_state(wide_mlp, 1),
        "b": _seeded_state(wide_mlp, 2), "module": wide_mlp(),
        "data": (torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)), "extra": {},
    })
    out.append({
        "name": "small CNN 1-32-64 on 16x16 (1000 samples)", "a": _seeded_state(SmallCNN, 1),
        "b": _seeded_state(SmallCNN, 2), "module": SmallCNN(),
        "data": (torch.randn(1000, 1, 16, 16, generator=gen), torch.randint(0, 10, (1000,), generator=gen)),
        "extra": {},
    })
    return out


def run_case(case: dict, args: argparse.Namespace) -> dict:
    """Time batched vs loop (and extra baselines) on one case; check they agree."""
    ev = lmc.Evaluator(case["module"], case["data"], F.cross_entropy, max_bytes=args.max_bytes, vectorize=True)
    auto = lmc.Evaluator(case["module"], case["data"], F.cross_entropy, max_bytes=args.max_bytes)
    results: dict[str, lmc.LMCCurve] = {}

    def runner(name: str, evaluate: object) -> Callable[[], None]:
        def go() -> None:
            results[name] = lmc.curve(case["a"], case["b"], evaluate, points=args.points)
        return go

    fns = {"batched": runner("batched", ev), "loop": runner("loop", lambda sd: ev(sd))}
    if not auto.vectorize:
        fns["auto (no vmap)"] = runner("auto (no vmap)", auto)
    fns.update({name: runner(name, fn) for name, fn in case["extra"].items()})
    times = timeit(fns, args.repeats)
    diff = max(float(np.abs(results["batched"].loss[s] - results[name].loss[s]).max())
               for name in fns if name != "batched" for s in results["batched"].splits)
    chunk = ev.chunk_size(ev.prepare(wl.load(case["a"])))
    return {"times": times, "diff": diff, "chunk": min(chunk, args.points)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=25, help="alphas per curve (default 25)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (default 5)")
    parser.add_argument("--samples", type=int, default=512, help="rows of the synthetic MLP data (default 512)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="Evaluator memory budget (default: 1 GiB on CPU, 1/4 of free GPU memory)")
    args = parser.parse_args()
    print(f"# bench_lmc: {machine()}, {args.points} alphas, median of {args.repeats}\n")
    print("| case | models per pass | batched s | loop s | loop / batched | other baselines | max abs loss diff |")
    print("|---|---|---|---|---|---|---|")
    for case in cases(args):
        r = run_case(case, args)
        t = r["times"]
        other = ", ".join(f"{k} {v:.3f} s ({v / t['batched']:.2f}x)" for k, v in t.items()
                          if k not in ("batched", "loop")) or "-"
        print(f"| {case['name']} | {r['chunk']} | {t['batched']:.3f} | {t['loop']:.3f} | "
              f"**{t['loop'] / t['batched']:.2f}x** | {other} | {r['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
