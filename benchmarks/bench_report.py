"""The full interference report against a naive loop of ``torch.linalg.svd``, in the same run.

On the MiniLM task zoo (``zoo.load("minilm-tasks", size="ci")``: all-MiniLM-L6-v2 and 4 fine-tunes,
103 float keys, 40 of them matrices, the embeddings and pooler frozen) it times, alternating the
cases ``--repeats`` times and keeping the median:

* ``naive``: ``torch.linalg.svd(delta, full_matrices=False)`` of every matrix key and task (each
  delta read from the checkpoints, as the report does): singular values and vectors, nothing else.
  This thin loop is the baseline of every ratio; it is faster than the literal call (below);
* ``naive, live keys``: the same loop over the keys some task changed (36 of 40), to show how much
  of a ratio comes from not decomposing the frozen, all-zero matrices;
* ``report``: ``analyze(tv)`` on an empty decomposition cache: spectra of every task and of the
  sum, SAR against the sum with both rank rules, the task x task SAR matrix, STI, subspace
  overlaps and principal angles, cosines, sign conflicts of all 103 keys, aggregates;
* ``report, values only``: ``analyze(tv, pairwise=False)``: per-task singular values alone (no task x
  task SAR, STI or overlaps, which need per-task singular vectors);
* ``report, warm``: a second report on the same cache (another SAR rule), as after a merge or in a
  widget: no decomposition is repeated.

``ratio = naive / case`` (> 1: the case is faster). ``--with-default`` adds one run of the literal
``torch.linalg.svd(delta)`` loop (default ``full_matrices=True``: a 30522 x 30522 ``U`` for the word
embeddings, minutes) as ``naive, literal``. Run ``python benchmarks/bench_report.py`` (``--help``
for options) after ``weightlens zoo build --size ci --names minilm-tasks``. The load average is
printed before and after: other processes on the machine skew every case.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import weightlens as wl
from weightlens import zoo
from weightlens.analysis import analyze

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)




def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive(tv: wl.TaskVectors, keys: Sequence[str], *, full_matrices: bool = False) -> int:
    """SVD of every given key of every task (thin by default); returns the number of SVDs."""
    count = 0
    for key in keys:
        for task in tv.names:
            torch.linalg.svd(tv.delta(task, key), full_matrices=full_matrices)
            count += 1
    return count


def cold_report(tv: wl.TaskVectors, **options: object) -> wl.TaskVectors:
    """A report on an empty cache."""
    tv.cache.clear()
    analyze(tv, device="cpu", progress=False, **options)
    return tv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="ci", help="zoo size (default: ci)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats, median kept (default: 3)")
    parser.add_argument("--root", default=None, help="zoo root folder (default: $WEIGHTLENS_HOME/zoo)")
    parser.add_argument("--with-default", action="store_true",
                        help="also time one run of torch.linalg.svd's default full_matrices=True (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = zoo.load("minilm-tasks", size=args.size, root=args.root).task_vectors()
    matrices = tv.keys_of_kind("matrix")
    live = [k for k in matrices if bool(tv.deltas(k).any())]
    load_before = load_average()
    cases: dict[str, Callable[[], object]] = {
        "naive": lambda: naive(tv, matrices),
        "naive, live keys": lambda: naive(tv, live),
        "report": lambda: cold_report(tv),
        "report, warm": lambda: analyze(tv, device="cpu", progress=False, sar_criterion="paper"),
        "report, values only": lambda: cold_report(tv, pairwise=False),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():  # "report, warm" runs right after a cold full report
            times[name].append(seconds(fn))
    if args.with_default:
        times["naive, literal"] = [seconds(lambda: naive(tv, matrices, full_matrices=True))]
    cold_report(tv)
    decomps = tv.cache.misses
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"# bench_report: MiniLM zoo ({args.size}), {len(tv)} tasks, {len(tv.keys)} keys, "
          f"{len(matrices)} matrices ({len(live)} changed); {machine()}; "
          f"load average {load_before} before, {load_average()} after")
    print(f"naive: {len(matrices) * len(tv)} thin SVDs; report: {decomps} decompositions "
          f"(frozen all-zero keys skipped)\n")
    print("| case | seconds (median) | runs | ratio naive / case |")
    print("|---|---|---|---|")
    for name, value in median.items():
        runs = ", ".join(f"{v:.2f}" for v in times[name])
        print(f"| {name} | {value:.2f} | {runs} | {median['naive'] / value:.2f}x |")
    if "naive, literal" in median:
        ratio = median["naive, literal"] / median["report"]
        print(f"\nreport vs the literal torch.linalg.svd(delta) loop (full_matrices=True): {ratio:.1f}x faster")


if __name__ == "__main__":
    main()
