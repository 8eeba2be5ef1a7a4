"""Restoration tests on the MiniLM task zoo: does ``predicted_cost`` rank the blocks a merge costs a task (issue 16)?

Merges the CI-size ``minilm-tasks`` zoo (all-MiniLM-L6-v2, 4 fine-tunes, zero-shot heads) with task arithmetic
at alpha 0.3 (and TIES with ``--ties``), then runs ``wl.diagnose(tv, merged, evaluate=z.evaluate, restore=3,
controls=2, split="val")``: per task its 3 top-ranked blocks and its 2 lowest-ranked blocks with energy are
restored to its own fine-tuned weights, every task scored. Prints per task the Spearman correlation between
``predicted_cost`` and ``measured_gain`` (accuracy on val: 100 examples, so gains move in steps of 1 point), the
mean, and the same correlation with the gain measured as the decrease of the val loss (read from the same
evaluate calls: ``evaluate`` returns both), with wall times.

Run ``python benchmarks/diagnose_restore_minilm.py`` after ``weightlens zoo build --size ci --names minilm-tasks``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import weightlens as wl
from weightlens import zoo
from weightlens.diagnosis._restore import plan, spearman

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)


def run(z, method: str, params: dict, args) -> None:
    tv = z.task_vectors()
    calls: list[dict] = []

    def evaluate(state, task, split):
        out = z.evaluate(state, task, split)
        calls.append({"task": task, **out})
        return out

    t0 = time.perf_counter()
    merged = wl.merge(tv, method=method, **params).materialize(progress=False)
    t1 = time.perf_counter()
    d = wl.diagnose(tv, merged, evaluate=evaluate, restore=args.restore, controls=args.controls, split="val",
                    progress=False)
    t2 = time.perf_counter()
    # the same tests with the gain read as the decrease of the val loss (calls: the merge's T, then T per test)
    tasks, T = list(tv.names), len(tv.names)
    merged_loss = {c["task"]: c["loss"] for c in calls[:T]}
    loss_gain = {}
    for i, (task, block) in enumerate(plan(d.blocks, args.restore, args.controls)):
        got = {c["task"]: c["loss"] for c in calls[T * (i + 1): T * (i + 2)]}
        if got:
            loss_gain[task, block] = merged_loss[task] - got[task]
    by_loss = d.blocks.assign(measured_gain=[loss_gain.get((t, b), np.nan)
                                             for t, b in zip(d.blocks["task"], d.blocks["block"])])
    rho_loss = spearman(by_loss)
    print(f"\n== {method} {params}: merge {t1 - t0:.1f} s, diagnose with restoration tests {t2 - t1:.1f} s, "
          f"{d.measured['evaluations']} evaluations (load average {load_average()})")
    cols = ["task", "block", "rank", "predicted_cost", "measured_gain", "cost_to_others"]
    tested = d.blocks[d.blocks["measured_gain"].notna()].sort_values(["task", "rank"])
    print(tested[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print("merged val accuracy:", {t: round(v, 3) for t, v in d.measured["merged_scores"].items()})
    rho = d.tasks.set_index("task")["spearman"]
    for t in tasks:
        print(f"  {t:12s} Spearman(predicted_cost, gain in accuracy) = {rho[t]:+.3f}   "
              f"(gain in loss: {rho_loss[t]:+.3f})")
    print(f"  mean: accuracy {d.spearman:+.3f}, loss {float(rho_loss.mean()):+.3f}")
    print(d.summary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restore", type=int, default=3)
    parser.add_argument("--controls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ties", action="store_true", help="also TIES (density 0.2, alpha 1.0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), "| load average", load_average())
    z = zoo.load("minilm-tasks", size="ci")
    start = time.perf_counter()
    run(z, "task_arithmetic", {"alpha": 0.3}, args)
    if args.ties:
        run(z, "ties", {"density": 0.2, "alpha": 1.0}, args)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
