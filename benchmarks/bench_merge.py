"""Re-running a merge: the cost of a second ``merge`` call that changes only ``alpha``, and of a method switch.

On the MiniLM task zoo (``zoo.load("minilm-tasks", size="ci")``: all-MiniLM-L6-v2 and its fine-tunes),
for each method it times, on a fresh decomposition cache:

* ``first``: the first ``merge(tv, method=..., alpha=1.0)`` (every SVD computed);
* ``alpha-only``: a second call with ``alpha=0.5`` (the median of ``--repeats`` calls): cached
  unscaled updates, one scale-and-add per key;
* ``ratio = first / alpha-only`` (the acceptance figure: >= 10 for tsv and iso_cts);
* ``switch``: the first call of a sibling method after this one (tsv -> star reuses the per-task
  SVDs, iso_c -> iso_cts the SVD of the sum), against that sibling's cold ``first``.

Run ``python benchmarks/bench_merge.py`` (``--help`` for options); build the zoo first with
``weightlens zoo build --size ci --names minilm-tasks``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from weightlens import zoo
from weightlens.merge import merge
from weightlens.taskvectors import TaskVectors

from _machine import machine, timed  # noqa: E402  (benchmarks run as scripts)

METHODS = ("tsv", "iso_cts", "iso_c", "star", "ties", "task_arithmetic")
SWITCH = {"tsv": "star", "iso_c": "iso_cts"}




def fresh(tv: TaskVectors) -> TaskVectors:
    """The same task vectors with an empty cache."""
    tv.cache.clear()
    return tv


def bench_method(tv: TaskVectors, method: str, repeats: int, device: str) -> dict[str, float]:
    """First call, alpha-only calls and (for tsv / iso_c) the switch to the sibling method."""
    fresh(tv)
    # merge() computes keys when they are read: materialize() times the whole merge
    first = timed(lambda: merge(tv, method=method, alpha=1.0, device=device).materialize())[0]
    again = statistics.median(
        timed(lambda: merge(tv, method=method, alpha=0.5, device=device).materialize())[0] for _ in range(repeats)
    )
    row = {"first": first, "alpha_only": again, "ratio": first / again}
    if method in SWITCH:
        row["switch"] = timed(lambda: merge(tv, method=SWITCH[method], device=device).materialize())[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="ci", help="zoo size (default: ci)")
    parser.add_argument("--repeats", type=int, default=5, help="alpha-only calls timed (median)")
    parser.add_argument("--device", default="auto", help="merge device (default: auto)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()

    z = zoo.load("minilm-tasks", size=args.size)
    tv = z.task_vectors()
    n_params = sum(tv.numel(k) for k in tv.keys)
    rows = {m: bench_method(tv, m, args.repeats, args.device) for m in args.methods}
    cold = {m: r["first"] for m, r in rows.items()}

    out = [
        f"MiniLM task zoo ({args.size}): {len(tv)} tasks, {len(tv.keys)} keys, {n_params / 1e6:.1f} M parameters",
        f"device: {machine()}",
        "",
        "| method | first call (s) | alpha-only call (s) | ratio first / alpha-only | switch from it (s) |",
        "|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        switch = ""
        if "switch" in r:
            target = SWITCH[m]
            base = f", cold {cold[target]:.2f} s" if target in cold else ""
            switch = f"{target}: {r['switch']:.2f}{base}"
        out.append(f"| {m} | {r['first']:.2f} | {r['alpha_only']:.3f} | {r['ratio']:.0f}x | {switch} |")
    print("\n".join(out))  # noqa: T201 - a benchmark script reports on stdout


if __name__ == "__main__":
    main()
