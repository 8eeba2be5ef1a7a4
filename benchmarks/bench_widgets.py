"""Widget latency: kernel time of an alpha move and of a method switch in ``MergeStudio``.

On the MiniLM task zoo (all-MiniLM-L6-v2 and 4 fine-tunes; frozen embeddings and pooler left out,
as in the tour) with 2 torch threads, it times the studio's own callbacks, i.e. what the kernel
does between a control change and the last figure update leaving it (figure builders, in-place
``FigureWidget`` updates, state re-sync):

* ``alpha``: ``slider.value = a`` for several values per method (median and max); the acceptance
  figure is < 200 ms;
* ``switch``: ``method.value = m``, first visit of each method after ``analyze`` (the tour's order:
  per-task SVDs are cached, the method's own updates and comparison are not), and a second visit;
  acceptance < 5 s. A first visit returns after the merge and the shown key's spectrum
  (``kernel``); the whole-model comparison behind the other panels then runs on a background
  thread, and ``all panels`` is the time until it is drawn (debounce set to 0 here);
* the ratio of an alpha move to recomputing it from scratch: ``merge`` + ``compare`` + the same
  figures, once with the decomposition cache warm (what a widget without the rescaled comparison
  would do) and once on fresh task vectors (nothing cached).

Accuracy scoring is not included: it runs on a background thread after the controls settle.
Outside a kernel the widgets' comm is a dummy, so the JSON encoding of the outgoing messages is not
counted (plotly's serializers and the state re-sync are). Run ``python benchmarks/bench_widgets.py``
after ``weightlens zoo build --size ci --names minilm-tasks``; it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from weightlens import zoo
from weightlens.analysis import analyze
from weightlens.figures.merge import figure_merge_conflicts, figure_merge_spectrum, figure_retained_alignment
from weightlens.merge import compare, merge
from weightlens.widgets import MergeStudio

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)

METHODS = ("ties", "dare", "tsv", "iso_c", "iso_cts", "star", "task_arithmetic")
FROZEN = ["embeddings.*", "pooler.*"]


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def from_scratch(tv, method: str, alpha: float, key: str) -> None:
    """What a widget without cached comparisons would do for one alpha: merge, compare, figures."""
    merged = merge(tv, method=method, alpha=alpha, lazy=True)
    comp = compare(tv, merged)
    figure_merge_spectrum({method: comp}, key)
    figure_retained_alignment({method: comp})
    figure_merge_conflicts({method: comp})


def alpha_moves(studio: MergeStudio, method: str, n: int) -> list[float]:
    """Times of ``n`` alpha moves (the first rescale of this method included)."""
    slider = studio.params[method]["alpha"]
    values = [round(slider.max * (0.2 + 0.6 * i / max(n - 1, 1)), 2) for i in range(n)]
    out = []
    for value in values:
        if value == slider.value:
            value = round(value + slider.step, 2)
        out.append(seconds(lambda v=value: setattr(slider, "value", v)))
        assert studio.last_error is None, studio.last_error
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 cores)")
    parser.add_argument("--moves", type=int, default=9, help="alpha moves per method")
    parser.add_argument("--size", default="ci", help="zoo size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    z = zoo.load("minilm-tasks", size=args.size)
    tv = z.task_vectors(exclude=FROZEN)
    print(f"# MergeStudio latency, {z.name} ({args.size}), {len(tv)} tasks, {len(tv.keys)} keys "
          f"({sum(tv.numel(k) for k in tv.keys) / 1e6:.1f} M parameters)\n\n{machine()}, load average {load_average()}\n")
    t_analyze = seconds(lambda: analyze(tv, progress=False))
    holder: dict[str, MergeStudio] = {}
    t_build = seconds(lambda: holder.setdefault("s", MergeStudio(tv, debounce=0.0)))
    studio = holder["s"]
    print(f"analyze: {t_analyze:.1f} s; MergeStudio(tv) (task_arithmetic merge + compare + figures): "
          f"{t_build:.1f} s\n")
    print("| method | first visit: kernel (s) | first visit: all panels (s) | second visit (s) "
          "| alpha move median (ms) | alpha move max (ms) |")
    print("|---|---|---|---|---|---|")
    rows, all_moves = {}, []
    for method in METHODS:
        t0 = time.perf_counter()
        studio.method.value = method
        kernel = time.perf_counter() - t0
        assert studio.wait(1800) and not studio.state["pending"], studio.last_error
        everything = time.perf_counter() - t0
        moves = alpha_moves(studio, method, args.moves)
        all_moves += moves
        rows[method] = (kernel, everything, moves)
    for method in METHODS:  # second visits: the comparison is cached per parameters
        studio.method.value = "tsv" if method != "tsv" else "star"
        second = seconds(lambda m=method: setattr(studio.method, "value", m))
        assert not studio.state["pending"]
        kernel, everything, moves = rows[method]
        print(f"| {method} | {kernel:.2f} | {everything:.2f} | {second:.3f} | {1000 * statistics.median(moves):.0f} "
              f"| {1000 * max(moves):.0f} |")
    key = studio.key.value
    warm = statistics.median(seconds(lambda a=a: from_scratch(tv, "tsv", a, key)) for a in (0.4, 0.6, 0.8))
    cold_tv = z.task_vectors(exclude=FROZEN)
    cold = seconds(lambda: from_scratch(cold_tv, "tsv", 0.7, key))
    studio.method.value = "tsv"
    move = statistics.median(alpha_moves(studio, "tsv", args.moves))
    print("\ntask_arithmetic's first visit reuses the comparison made when the studio was built.")
    print(f"Alpha move over all methods: median {1000 * statistics.median(all_moves):.0f} ms, "
          f"max {1000 * max(all_moves):.0f} ms ({len(all_moves)} moves).")
    print(f"tsv alpha move {1000 * move:.0f} ms vs from scratch: merge + compare + figures with the cache warm "
          f"{warm:.2f} s (ratio {warm / move:.0f}x), on fresh task vectors {cold:.2f} s "
          f"(ratio {cold / move:.0f}x).")


if __name__ == "__main__":
    main()
