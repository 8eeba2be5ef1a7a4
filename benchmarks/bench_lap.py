"""LAP solvers for weight matching: SciPy on the CPU against the torch auction, in the same run.

For each width ``n`` it builds a weight-matching cost matrix of two trained-like layers (``A @ B^T``
with ``A``, ``B`` of shape ``(n, 4n)`` drawn with a shared component, as the correlation of two
networks' units) and times ``weightlens.rebasin.lap.solve`` with ``solver="scipy"`` (CPU, float64)
and ``solver="auction"`` on each device given (the CPU always; ``cuda`` when available), checking
that every assignment reaches the SciPy optimum (relative gap printed). Two kinds of matrix: a strong
shared component (``signal`` 1, as late in weight matching: an easy LAP) and a weak one (0.1, as for
independently trained models at the first sweep: many near-ties). ``ratio = scipy / case``
(> 1: the case is faster). Run ``python benchmarks/bench_lap.py`` (``--help`` for options); on a
GPU machine ``python benchmarks/bench_lap.py --widths 512 2048 4096 8192``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from weightlens.rebasin.lap import solve

from _machine import machine, timed  # noqa: E402  (benchmarks run as scripts)


def cost_matrix(n: int, signal: float, seed: int = 0) -> np.ndarray:
    """``<w_a[i], w_b[j]>`` of two layers whose units share a permuted component of weight ``signal``."""
    rng = np.random.default_rng(seed)
    shared = signal * rng.standard_normal((n, 4 * n))
    a = shared + rng.standard_normal((n, 4 * n))
    b = shared[rng.permutation(n)] + rng.standard_normal((n, 4 * n))
    return a @ b.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per case")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    solve(np.eye(2), "scipy")  # import scipy.optimize outside the timings
    print(f"# bench_lap: {machine()}\n")
    print("| n | signal | scipy (s) | " + " | ".join(f"auction {d} (s) | ratio | gap" for d in devices) + " |")
    print("|---|---|---|" + "---|---|---|" * len(devices))
    for n, signal in ((n, s) for n in args.widths for s in (1.0, 0.1)):
        c = cost_matrix(n, signal)
        t_scipy, ref = timed(lambda: solve(c, "scipy"), args.repeat)
        best = float(c[np.arange(n), ref].sum())
        cells = [f"{n}", f"{signal:g}", f"{t_scipy:.3f}"]
        for dev in devices:
            tensor = torch.from_numpy(c).to(dev)
            t, col = timed(lambda: solve(tensor, "auction"), args.repeat)
            gap = (best - float(c[np.arange(n), col].sum())) / abs(best)
            cells += [f"{t:.3f}", f"{t_scipy / t:.2f}x", f"{gap:.1e}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
