"""Write ``notebooks/02_merging.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_02_merging.py`` after editing; the notebook runs headless in CI
(``tests/test_notebooks.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

from _notebook import write  # scripts/_notebook.py (run as a script: its folder is on the path)

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "02_merging.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 02 · Merging: nine methods, validated coefficients, and what each one removes

`merge(task_vectors, method=..., **params)` returns the full merged weights (base + update; each key computed when read) of any of nine
methods, each implemented as published ([docs/methods.md](../docs/methods.md); where the authors' code and paper or two
reference implementations differ, both are offered and named): task arithmetic, TIES, DARE, TSV-M, Iso-C,
Iso-CTS and STAR, and two that read data: RegMean (the input Gram matrices of each linear layer) and Fisher
merging (diagonal Fishers), which take each task's model and training inputs from `data=z.merge_data()`. `sweep` scores a grid of coefficients `alpha`, **chosen on the validation split and
reported on test**, as normalized accuracy (merged / fine-tuned, mean over tasks) and NAI (share of the
fine-tuning gain kept). `compare` sets each merged update next to the task-arithmetic sum: how much of each
task it keeps, its spectrum, and the sign conflicts it settles.

Everything below runs on the model zoo trained on this machine: `digits-tasks` (an MLP and 4 fine-tunes on
transformed digits) and `minilm-tasks` (all-MiniLM-L6-v2 and 4 text-classification fine-tunes)."""),
    ("code", """import os
import time

import numpy as np
import pandas as pd

from weightlens import zoo
from weightlens.figures.merge import (
    figure_merge_conflicts,
    figure_merge_spectrum,
    figure_retained_alignment,
    figure_sweep,
)
from weightlens.merge import alpha_grid, compare, get_method, list_methods, merge, sweep

SIZE = os.environ.get("WEIGHTLENS_ZOO_SIZE", "ci")
FULL = os.environ.get("WEIGHTLENS_NOTEBOOK_FULL", "") == "1"  # every registered method (tens of minutes)
zoo.build(size=SIZE, names=["digits-tasks", "minilm-tasks"], progress=False)  # skipped when built
METHODS = list_methods() if FULL else ["task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "star",
                                       "regmean", "fisher"]
# RegMean's and Fisher's statistics take minutes on MiniLM at two cores: there only outside CI size or FULL
MINILM_METHODS = METHODS if FULL or SIZE != "ci" else [m for m in METHODS if not get_method(m).needs_data]
pd.set_option("display.precision", 3)"""),
    ("md", """## The registry
One decorator registers a method; its parameters, defaults and ranges come from its signature. Unknown
parameters and out-of-range values raise an error that lists the valid ones."""),
    ("code", """pd.DataFrame([
    {"method": m, "name": get_method(m).pretty_name, "parameters (defaults)": get_method(m).describe(),
     "reference": get_method(m).reference}
    for m in METHODS
]).set_index("method")"""),
    ("code", """z = zoo.load("digits-tasks", size=SIZE)
tv = z.task_vectors()
digits_data = z.merge_data()  # per task: the body with its frozen head, 256 training inputs (regmean, fisher)
try:
    merge(tv, method="ties", density=1.5)
except ValueError as err:
    print(err)"""),
    ("md", """## Digits: every method at its validated coefficient
Each method's grid follows its reference protocol (`alpha_grid`): task arithmetic and DARE `{1/30, ..., 1}`,
TIES `{0.8, ..., 2.5}`, TSV-M and Iso `{0.1, ..., 3.0}`, STAR `{0.1, ..., 3.0} / T` around its untuned default
`1/T`; RegMean and Fisher merging are tuning-free (`alpha` 1). Other parameters stay at their defaults (TIES keeps 20%, DARE keeps 50%, Iso-CTS gives 80% of the
directions to the common subspace, STAR keeps 40% of the nuclear norm, RegMean scales the Grams' off-diagonals
by 0.95, Fisher merging normalises each task's Fisher). Decompositions and unscaled updates
are cached, so each further `alpha` costs a scale-and-add; the test split is scored only at the chosen
`alpha`."""),
    ("code", """COLUMNS = {"alpha": "alpha (val)", "val_normalized_accuracy": "val norm. acc",
           "test_accuracy": "test acc", "base_test_accuracy": "base test acc",
           "finetuned_test_accuracy": "fine-tuned test acc", "test_normalized_accuracy": "test norm. acc",
           "test_nai": "test NAI"}


def run_sweeps(tv, evaluate, grids, reference=None, data=None, methods=METHODS):
    out = {}
    for m in methods:
        out[m] = sweep(tv, m, grids.get(m), evaluate, reference=reference, data=data, progress=False)
        reference = out[m].reference
    return out


def results_table(sweeps):
    table = pd.DataFrame([sw.report() for sw in sweeps.values()]).set_index("method")
    return table[list(COLUMNS)].rename(columns=COLUMNS)


sweeps = run_sweeps(tv, z.evaluate, {}, data=digits_data)
digits_table = results_table(sweeps)
digits_table"""),
    ("code", """base_acc = digits_table["base test acc"].iloc[0]
beats = digits_table["test acc"] > base_acc
print(f"mean test accuracy of the base model: {base_acc:.4f}; of the fine-tunes (each on its task): "
      f"{digits_table['fine-tuned test acc'].iloc[0]:.4f}")
print("every method beats the base at its validated alpha:", bool(beats.all()))
assert beats.all(), digits_table[~beats]"""),
    ("md", "Per task, side by side (test split, at each method's validated `alpha`):"),
    ("code", """def per_task(sweeps, column):
    ref = next(iter(sweeps.values())).reference.query("split == 'test'")
    out = ref.pivot(index="task", columns="model", values="accuracy") if column == "accuracy" else pd.DataFrame()
    for m, sw in sweeps.items():
        out[m] = sw.best.set_index("task")[column]
    return out


per_task(sweeps, "accuracy")"""),
    ("code", "per_task(sweeps, \"normalized_accuracy\")"),
    ("code", """figure_sweep({m: sweeps[m] for m in ("task_arithmetic", "ties", "tsv", "iso_cts")})"""),
    ("md", """## Before and after: what each merge keeps and the interference it removes
`compare(tv, merged)` sets the merged update next to the task-arithmetic sum: the share of each task inside
the update's top singular subspace (SAR, Iso Eq. 5 with the rank rule of the Iso figure script), the
coefficient of the update along each task (`kept`), the spectra, and the sign conflicts (coordinates where
tasks disagree: set to zero, won by the side with more mass, and the task mass left pointing against the
update)."""),
    ("code", """merged = {m: merge(tv, method=m, alpha=sweeps[m].best_alpha, data=digits_data) for m in METHODS}
comparisons = {m: compare(tv, merged[m]) for m in METHODS}
figure_merge_spectrum({m: comparisons[m] for m in ("tsv", "iso_c", "iso_cts", "star")}, "fc2.weight")"""),
    ("code", "figure_retained_alignment(comparisons, metric=\"sar\")"),
    ("code", "figure_merge_conflicts(comparisons)"),
    ("code", """pd.concat({m: c.per_task.set_index(["task", "which"]) for m, c in comparisons.items()}, names=["method"])"""),
    ("md", """## Degenerate cases are reported, never silent
Each merge carries per-key notes. The digits matrices are large enough for every method; here Iso-CTS with
`common_fraction=1` leaves no task-specific room, so it is Iso-C on every matrix, and says so."""),
    ("code", """merge(tv, method="iso_cts", common_fraction=1.0).notes"""),
    ("md", """## MiniLM: the same on a real transformer
At CI size each method is validated on three points of its grid (at 1/6, 1/2 and 5/6 of it) to keep this
section to about three minutes on two cores, and RegMean and Fisher merging (whose statistics take minutes here)
are left out; `WEIGHTLENS_ZOO_SIZE=demo` runs the full grids and both. The embeddings and
pooler were frozen during fine-tuning, so their task vectors are zero: the notes say so, and no
decomposition is taken there."""),
    ("code", """zm = zoo.load("minilm-tasks", size=SIZE)
tvm = zm.task_vectors()
tvm"""),
    ("md", """Moving `alpha` is cheap: the second call below changes only `alpha` and reuses every cached
decomposition and unscaled update (`merge` computes keys when they are read; `materialize()` computes them all) (`benchmarks/bench_merge.py` measures this for every method). The sweeps
below reuse them too."""),
    ("code", """t0 = time.perf_counter(); merge(tvm, method="iso_cts", alpha=1.0).materialize(); first = time.perf_counter() - t0
t0 = time.perf_counter(); merge(tvm, method="iso_cts", alpha=0.5).materialize(); second = time.perf_counter() - t0
print(f"iso_cts on MiniLM: first call {first:.2f} s, alpha-only call {second:.3f} s ({first / second:.0f}x)")"""),
    ("code", """def coarse(grid):
    return grid if SIZE != "ci" else [grid[int(q * len(grid))] for q in (1 / 6, 1 / 2, 5 / 6)]


# base and fine-tuned scores were measured by the same scorer when the zoo was built
built = zm.manifest["metrics"]
reference = pd.DataFrame([{"task": t, "split": s, "model": model, **built[model][t][s]}
                          for model in ("base", "finetuned") for t in zm.tasks for s in ("val", "test")])
minilm_data = zm.merge_data() if MINILM_METHODS != [m for m in MINILM_METHODS if not get_method(m).needs_data] else None
minilm_sweeps = run_sweeps(tvm, zm.evaluate, {m: coarse(alpha_grid(m, len(tvm))) for m in MINILM_METHODS}, reference,
                           data=minilm_data, methods=MINILM_METHODS)
minilm_table = results_table(minilm_sweeps)
minilm_table"""),
    ("code", "per_task(minilm_sweeps, \"normalized_accuracy\")"),
    ("code", """minilm_merged = {m: merge(tvm, method=m, alpha=minilm_sweeps[m].best_alpha)
                 for m in ("task_arithmetic", "ties", "tsv", "iso_cts")}
layers = [k for k in tvm.keys if k.startswith("encoder.layer.")]
minilm_cmp = {m: compare(tvm, r, keys=layers) for m, r in minilm_merged.items()}
figure_retained_alignment(minilm_cmp)"""),
    ("code", "figure_merge_conflicts(minilm_cmp)"),
    ("code", """figure_merge_spectrum({m: minilm_cmp[m] for m in ("tsv", "iso_cts")}, "encoder.layer.3.intermediate.dense.weight")"""),
    ("code", """minilm_merged["iso_cts"].notes"""),
]


if __name__ == "__main__":
    write(CELLS, OUT, "merging")
