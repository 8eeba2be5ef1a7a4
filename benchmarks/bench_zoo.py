"""Time the CI-size zoo build from scratch (target: at most 3 minutes on 2 cores).

Builds every zoo into a fresh temporary root, one after another, and prints each build's wall time
and the total. There is no baseline to compare with: the target is an absolute budget for CI.

Run: ``.venv/bin/python benchmarks/bench_zoo.py [--size ci]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from weightlens import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="ci", choices=zoo.SIZES)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    total = 0.0
    with tempfile.TemporaryDirectory() as root:
        for name in zoo.NAMES:
            t0 = time.perf_counter()
            zoo.build(args.size, names=[name], root=root, progress=False)
            dt = time.perf_counter() - t0
            total += dt
            print(f"{name:14s} {dt:7.1f} s")
    verdict = "within" if total <= 180 or args.size != "ci" else "OVER"
    print(f"{'total':14s} {total:7.1f} s  ({verdict} the 180 s CI budget)")


if __name__ == "__main__":
    main()
