"""Write ``notebooks/02_merging.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_02_merging.py`` after editing; the notebook runs headless in CI
(``tests/test_notebooks.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "02_merging.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 02 · Merging: seven methods, validated coefficients, and what each one removes

`wl.merge(task_vectors, method=..., **params)` returns the full merged weights (base + update) of any of
seven methods, each implemented exactly as published (`reference/algorithms.md`): task arithmetic, TIES,
DARE, TSV-M, Iso-C, Iso-CTS and STAR. `wl.sweep` scores a grid of coefficients `alpha`, **chosen on the
validation split and reported on test**, as normalized accuracy (merged / fine-tuned) and NAI.
`wl.compare` shows, before (task arithmetic) and after (the merge), how much of each task the merged update
keeps, its spectrum, and the sign conflicts it settles.

Everything below runs on the model zoo trained on this machine: `digits-tasks` (an MLP and 4 fine-tunes on
transformed digits) and `minilm-tasks` (all-MiniLM-L6-v2 and 4 text-classification fine-tunes)."""),
    ("code", """import os
import time

import pandas as pd

from weightlens import zoo
from weightlens.figures.merge import (
    figure_merge_spectrum,
    figure_retained_alignment,
    figure_merge_conflicts,
    figure_sweep,
)
from weightlens.merge import alpha_grid, compare, get_method, merge, sweep

SIZE = os.environ.get("WEIGHTLENS_ZOO_SIZE", "ci")
zoo.build(size=SIZE, names=["digits-tasks", "minilm-tasks"], progress=False)  # skipped when built
METHODS = ["task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "star"]
pd.set_option("display.precision", 3)"""),
    ("md", """## The registry
One decorator registers a method; its parameters, defaults and ranges come from its signature. Unknown
parameters and out-of-range values raise an error that lists the valid ones."""),
    ("code", """pd.DataFrame([
    {"method": m, "name": get_method(m).pretty_name, "parameters (defaults)": get_method(m).describe(),
     "reference": get_method(m).reference}
    for m in METHODS
])"""),
    ("code", """try:
    merge(zoo.load("digits-tasks", size=SIZE).task_vectors(), method="ties", density=1.5)
except ValueError as err:
    print(err)"""),
    ("md", """## Digits: every method at its validated coefficient
Each method's grid follows its reference protocol (`alpha_grid`): task arithmetic and DARE `{1/30, ..., 1}`,
TIES `{0.8, ..., 2.5}`, TSV-M and Iso `{0.1, ..., 3.0}`, STAR `{0.1, ..., 3.0} / T` around its untuned default
`1/T`. Decompositions are cached, so each further `alpha` costs a scale-and-add."""),
    ("code", """z = zoo.load("digits-tasks", size=SIZE)
tv = z.task_vectors()
sweeps = {m: sweep(tv, m, None, z.evaluate, progress=False) for m in METHODS}


def results_table(sweeps):
    rows = [sw.report() for sw in sweeps.values()]
    table = pd.DataFrame(rows).set_index("method")
    return table


digits_table = results_table(sweeps)
digits_table"""),
    ("code", """base_acc = digits_table["base_test_accuracy"].iloc[0]
ft_acc = digits_table["finetuned_test_accuracy"].iloc[0]
print(f"mean test accuracy: base {base_acc:.3f}, fine-tuned (each on its task) {ft_acc:.3f}")
beats = digits_table["test_accuracy"] > base_acc
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
the update's top singular subspace (SAR), the spectra, and the sign conflicts settled (coordinates where
tasks disagree: set to zero, won by the side with more mass, and the task mass left pointing against the
update)."""),
    ("code", """merged = {m: merge(tv, method=m, alpha=sweeps[m].best_alpha) for m in METHODS}
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
A coarser grid keeps this section to a few minutes at CI size (every third point of each method's grid).
The embeddings were frozen during fine-tuning, so their task vectors are zero: the notes say so."""),
    ("code", """zm = zoo.load("minilm-tasks", size=SIZE)
tvm = zm.task_vectors()
reference = None
minilm_sweeps = {}
for m in METHODS:
    grid = alpha_grid(m, len(tvm))[2::3]
    minilm_sweeps[m] = sweep(tvm, m, grid, zm.evaluate, reference=reference, progress=False)
    reference = minilm_sweeps[m].reference
minilm_table = results_table(minilm_sweeps)
minilm_table"""),
    ("code", "per_task(minilm_sweeps, \"normalized_accuracy\")"),
    ("code", """minilm_merged = {m: merge(tvm, method=m, alpha=minilm_sweeps[m].best_alpha) for m in ("task_arithmetic", "ties", "tsv", "iso_cts")}
minilm_cmp = {m: compare(tvm, r, keys=[k for k in tvm.keys if ".layer." in k]) for m, r in minilm_merged.items()}
figure_retained_alignment(minilm_cmp)"""),
    ("code", "figure_merge_conflicts(minilm_cmp)"),
    ("code", "minilm_merged[\"tsv\"].notes.head()"),
    ("md", """## Moving alpha is cheap
The second call below changes only `alpha`: it reuses every cached decomposition and unscaled update
(`benchmarks/bench_merge.py` measures this on every method)."""),
    ("code", """tvm.cache.clear()
t0 = time.perf_counter(); merge(tvm, method="iso_cts", alpha=1.0); first = time.perf_counter() - t0
t0 = time.perf_counter(); merge(tvm, method="iso_cts", alpha=0.5); second = time.perf_counter() - t0
print(f"iso_cts on MiniLM: first call {first:.2f} s, alpha-only call {second:.3f} s ({first / second:.0f}x)")"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook, outputs empty."""
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(build(), OUT)


if __name__ == "__main__":
    main()
