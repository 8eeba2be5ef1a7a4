"""``diagnose`` without data after a merge, against the merge's own time, in the same run (issue 16).

On the MiniLM task zoo (``zoo.load("minilm-tasks", size="ci")``: all-MiniLM-L6-v2 and 4 fine-tunes,
103 float keys, 40 of them matrices) it times, per method, alternating ``--repeats`` times on a fresh
decomposition cache and keeping the medians:

* ``merge``: ``wl.merge(tv, method=...).materialize()`` on an empty cache (every decomposition computed);
* ``diagnose``: ``wl.diagnose(tv, merged)`` right after it, on the cache the merge left (the merged
  update's SVDs, the per-task SVDs a spectral merge computed): ``merge.compare`` (SAR against the merge
  and against the task-arithmetic sum, whose SVD it adds), the crowding projections (each task's SVD:
  computed here when the merge did not), the sign story, the pre-merge checks and the tables.

``ratio = diagnose / merge``: the acceptance figure is <= 2 (diagnose reuses the merge's decompositions).
Run ``python benchmarks/bench_diagnose.py`` (``--help`` for options) after
``weightlens zoo build --size ci --names minilm-tasks``. The load average is printed before and after:
other processes on the machine skew every case.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from weightlens import zoo
from weightlens.diagnosis import diagnose
from weightlens.merge import merge
from weightlens.taskvectors import TaskVectors

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)

METHODS = ("tsv", "iso_cts", "ties", "task_arithmetic")


def seconds(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of one call, and its result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def once(tv: TaskVectors, method: str, device: str) -> tuple[float, float]:
    """A merge on an empty cache, then diagnose on the cache it left: both wall times."""
    tv.cache.clear()
    t_merge, merged = seconds(lambda: merge(tv, method=method, device=device).materialize(progress=False))
    t_diag, _ = seconds(lambda: diagnose(tv, merged, progress=False))
    return t_merge, t_diag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="ci", help="zoo size (default: ci)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats, medians kept (default: 3)")
    parser.add_argument("--device", default="auto", help="merge device (default: auto)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = zoo.load("minilm-tasks", size=args.size).task_vectors()
    load_before = load_average()
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            times[method].append(once(tv, method, args.device))
    print(f"# bench_diagnose: MiniLM zoo ({args.size}), {len(tv)} tasks, {len(tv.keys)} keys, "
          f"{len(tv.keys_of_kind('matrix'))} matrices; {machine()}; "
          f"load average {load_before} before, {load_average()} after\n")
    print("| method | merge s (median) | diagnose s (median) | diagnose / merge | runs (merge, diagnose) |")
    print("|---|---|---|---|---|")
    for method, runs in times.items():
        m = statistics.median(r[0] for r in runs)
        d = statistics.median(r[1] for r in runs)
        shown = "; ".join(f"{a:.2f}, {b:.2f}" for a, b in runs)
        print(f"| {method} | {m:.2f} | {d:.2f} | **{d / m:.2f}x** | {shown} |")


if __name__ == "__main__":
    main()
