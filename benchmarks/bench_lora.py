"""LoRA updates decomposed from their factors against the dense ``B @ A``, as ratios in the same run.

For each shape (384x1536, MiniLM's MLP; 4096x11008, a Llama-7B MLP) at rank r, with synthetic factors
of a decaying spectrum (as trained adapters have), it times:

* ``dense``: form ``scale * B @ A`` and take its thin SVD with ``weightlens.linalg.svd`` (the baseline:
  what a merged-and-unloaded adapter costs);
* ``factored``: ``weightlens.linalg.factored_svd(B, A)`` (QR of both factors, SVD of the r x r core);
* ``sum of 4``: the same for the sum of four adapters (concatenated factors, rank 4r) against the dense
  sum, the task-arithmetic reference of TSV-M/Iso-CTS;

and prints each ratio with the largest relative singular-value error of the factored result against
the dense one. Run ``python benchmarks/bench_lora.py`` (``--quick`` skips the LLM shape); the issue's
target is at least 20x at r = 16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from weightlens import linalg
from weightlens.linalg.factored import concat_factors, factored_svd

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)


def _factors(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g) * 0.8 ** torch.arange(r)
    A = torch.randn(r, n, generator=g) / n**0.5
    return A, B, 2.0


def _median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(label: str, parts: list[tuple[torch.Tensor, torch.Tensor, float]], repeats: int) -> str:
    B, A = concat_factors(parts)

    def dense() -> linalg.SVD:
        return linalg.svd(B @ A, device="cpu")

    def factored() -> linalg.SVD:
        return factored_svd(B, A, device="cpu")

    t_dense, t_fact = _median(dense, repeats), _median(factored, repeats)
    k = B.shape[1]
    S_dense, S_fact = dense().S[:k].double(), factored().S.double()
    err = float(((S_fact - S_dense).abs() / S_dense[0]).max())
    return f"| {label} | {B.shape[0]}x{A.shape[1]} | {k} | {t_dense * 1e3:.1f} | {t_fact * 1e3:.2f} | " \
           f"{t_dense / t_fact:.0f}x | {err:.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only the 384x1536 shape")
    args = parser.parse_args()
    shapes = [(384, 1536)] + ([] if args.quick else [(4096, 11008)])
    print(f"{machine('cpu')}; load {load_average()}\n")
    print("| what | shape | rank | dense ms | factored ms | ratio | max sigma error / sigma_1 |")
    print("|---|---|---|---|---|---|---|")
    for m, n in shapes:
        repeats = args.repeats if m * n < 10**7 else 1
        one = [_factors(m, n, args.rank, seed=0)]
        print(_row("one adapter", one, repeats), flush=True)
        four = [_factors(m, n, args.rank, seed=s) for s in range(4)]
        print(_row("sum of 4", four, repeats), flush=True)


if __name__ == "__main__":
    main()
