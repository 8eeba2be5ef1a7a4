"""``diagnose`` without data after a merge, against the merge's own time, in the same run (issue 16).

On the MiniLM task zoo (``zoo.load("minilm-tasks", size="ci")``: all-MiniLM-L6-v2 and 4 fine-tunes,
103 float keys, 40 of them matrices) it times, per method, ``--repeats`` times on a fresh decomposition
cache, keeping the medians:

* ``merge``: ``wl.merge(tv, method=...).materialize()`` on an empty cache (every decomposition computed);
* ``diagnose``: ``wl.diagnose(tv, merged)`` right after it, on the cache the merge left (the merged
  update's SVDs, the per-task SVDs a spectral merge computed), in one pass over the keys:
  ``merge.compare`` (SAR against the merge and against the task-arithmetic sum, whose SVD it adds unless
  the merge has it: task arithmetic's update SVD is that sum's), then on what it read the crowding
  projections (each task's SVD: computed here when the merge did not), the sign story, the pre-merge
  checks and the tables.

With ``--analyze-first`` each run starts with ``wl.analyze(tv)`` (untimed), as the studio does before any
merge: diagnose then reuses the tasks' SVDs the analysis cached, whatever the merge.

``ratio = diagnose / merge``: the acceptance figure is <= 2 after a merge that decomposes the tasks or their
sum (TSV, Iso-CTS, STAR), whose decompositions diagnose reuses, and TIES. Task arithmetic decomposes nothing
and costs a sum, so there diagnose pays for every SVD itself and the ratio says what a diagnosis costs on
top of a cheap merge. Each row is printed when its method is done.
Run ``python benchmarks/bench_diagnose.py`` (``--help`` for options) after
``weightlens zoo build --size ci --names minilm-tasks``. The load average is printed before and after:
other processes on the machine skew every case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from weightlens import zoo
from weightlens.analysis import analyze
from weightlens.diagnosis import diagnose
from weightlens.merge import merge
from weightlens.taskvectors import TaskVectors

from _machine import load_average, machine, timed  # noqa: E402  (benchmarks run as scripts)

METHODS = ("tsv", "iso_cts", "ties", "star", "task_arithmetic")


def once(tv: TaskVectors, method: str, device: str, analyze_first: bool = False
         ) -> tuple[float, float, int, int, float, float]:
    """A merge on an empty cache, then diagnose on the cache it left: both wall times, the cache misses
    (values diagnose computed: SVDs, compare's rows) and evictions during diagnose, and both process CPU times
    (all threads: the memory-bound merge and the compute-bound diagnose feel a busy machine differently, so
    the CPU-time ratio shows how much of a wall-time ratio's swing is the machine's)."""
    tv.cache.clear()
    if analyze_first:  # the studio's order: the dashboard's analysis (untimed) leaves each task's SVD cached
        analyze(tv, progress=False)
    cpu = time.process_time()
    t_merge, merged = timed(lambda: merge(tv, method=method, device=device).materialize(progress=False))
    cpu_merge, cpu = time.process_time() - cpu, time.process_time()
    misses, evictions = tv.cache.misses, tv.cache.evictions
    t_diag, _ = timed(lambda: diagnose(tv, merged, progress=False))
    cpu_diag = time.process_time() - cpu
    return t_merge, t_diag, tv.cache.misses - misses, tv.cache.evictions - evictions, cpu_merge, cpu_diag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="ci", help="zoo size (default: ci)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, medians kept (default: 3)")
    parser.add_argument("--device", default="auto", help="merge device (default: auto)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--analyze-first", action="store_true",
                        help="run wl.analyze(tv) (untimed) before each merge, as the studio does: diagnose then "
                             "reuses the tasks' SVDs it cached")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = zoo.load("minilm-tasks", size=args.size).task_vectors()
    load_before = load_average()
    print(f"# bench_diagnose: MiniLM zoo ({args.size}), {len(tv)} tasks, {len(tv.keys)} keys, "
          f"{len(tv.keys_of_kind('matrix'))} matrices; {machine()}; load average {load_before} before\n")
    print(f"decomposition cache bound: {tv.cache.max_bytes / 2**20:.0f} MiB"
          + ("; wl.analyze(tv) before each merge (untimed)" if args.analyze_first else "") + "\n")
    print("| method | merge s (median) | diagnose s (median) | diagnose / merge | runs (merge, diagnose) "
          "| CPU s: merge, diagnose (medians) | CPU ratio | cache misses / evictions in diagnose |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for method in args.methods:
        runs = [once(tv, method, args.device, args.analyze_first) for _ in range(args.repeats)]
        m, d = (statistics.median(r[i] for r in runs) for i in (0, 1))
        cm, cd = (statistics.median(r[i] for r in runs) for i in (4, 5))
        shown = "; ".join(f"{r[0]:.2f}, {r[1]:.2f}" for r in runs)
        cache = "; ".join(f"{r[2]} / {r[3]}" for r in runs)
        print(f"| {method} | {m:.2f} | {d:.2f} | **{d / m:.2f}x** | {shown} | {cm:.2f}, {cd:.2f} | {cd / cm:.2f}x "
              f"| {cache} |", flush=True)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
