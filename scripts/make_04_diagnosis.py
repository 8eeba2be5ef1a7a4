"""Write ``notebooks/04_diagnosis.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_04_diagnosis.py`` after editing; the notebook runs headless in CI
(``tests/test_notebooks.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

from _notebook import write  # scripts/_notebook.py (run as a script: its folder is on the path)

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "04_diagnosis.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 04 · Diagnosis: why a merge lost a task, where, because of whom, and what keeps it

`wl.diagnose(task_vectors, merged)` answers from the weights alone: per task and block, the share of the
task's update the merge keeps, which other task crowds or opposes it there, whose signs won, and one
predicted cost per block with a ranking. With the zoo's scorer (`evaluate=`) it also **measures**: restoring a
block to the task's own weights and scoring every task (restoration tests), and, with `whatif=`, scoring
other methods and coefficients to **suggest** the merge whose worst task keeps most
([docs/diagnosis.md](../docs/diagnosis.md)).

First a failure whose cause we know, because we planted it: the digits zoo's fifth fine-tune `rot90_swap`
was trained, in its last layer `fc2` only, on `rot90`'s inputs with permuted labels. Then the MiniLM zoo,
where nothing was planted."""),
    ("code", """import os
import time

import pandas as pd

import weightlens as wl
from weightlens import zoo

SIZE = os.environ.get("WEIGHTLENS_ZOO_SIZE", "ci")
FULL = os.environ.get("WEIGHTLENS_NOTEBOOK_FULL", "") == "1"
zoo.build(size=SIZE, names=["digits-tasks", "minilm-tasks"], progress=False)  # skipped when built
wl.config.progress = False
pd.set_option("display.precision", 3)

z = zoo.load("digits-tasks", size=SIZE, planted=True)
tv = z.task_vectors()
tv"""),
    ("md", """## Before any merge: the pre-merge checks

`wl.diagnose(tv, None)` needs no merge. It compares the task vectors with each other: a fine-tune of another
base (far from the base, or other keys and shapes), one task dominating the sum, low-rank updates, sign
conflicts far above chance."""),
    ("code", """checks = wl.diagnose(tv, None).checks
checks[checks.fired][["check", "task", "block", "value", "threshold", "message"]]"""),
    ("md", """## The merge that fails

Task arithmetic of all five at `alpha=0.5`, a usual untuned choice, scored on test: accuracy per task and
normalized accuracy (merged / the task's own fine-tune). `sweep` also validates task arithmetic's coefficient
on val over its grid: the baseline every suggestion below is measured against."""),
    ("code", """ta = wl.sweep(tv, "task_arithmetic", None, z.evaluate, progress=False, report_all=True)
alpha_ta = ta.best_alpha
at_half = ta.table[(ta.table.alpha.round(6) == 0.5) & (ta.table.split == "test")].set_index("task")
at_best = ta.best.set_index("task")
pd.DataFrame({"alpha=0.5": at_half["normalized_accuracy"], f"validated alpha={alpha_ta:g}": at_best["normalized_accuracy"]})"""),
    ("md", """## Diagnosis from the weights

One sentence per task, worst first; then `rot90`'s blocks ranked by predicted cost."""),
    ("md", """At `alpha=0.5` the merge loses `rot90`; validation picks a small coefficient that keeps `rot90` by giving
up `rot90_swap`. Either way one task is lost. Diagnosing the `alpha=0.5` merge:"""),
    ("code", """merged = wl.merge(tv, method="task_arithmetic", alpha=0.5)
d = wl.diagnose(tv, merged)
print(d.summary())"""),
    ("code", """d.ranking("rot90")[["block", "energy_share", "kept", "opposed_by", "opposition", "sign_lost", "sign_won_by",
                    "predicted_cost", "rank"]]"""),
    ("code", """from weightlens.figures import figure_block_costs

figure_block_costs(d, "rot90")"""),
    ("md", """## Measured: restoring the blocks, and what other merges would do

`evaluate=` runs the restoration tests (each task's top blocks and one control block restored to its own
weights; every task scored on val), and `whatif="all"` merges with every registered method at a few
coefficients each, scores them, and suggests the method and coefficient whose **worst** task keeps the largest
share of its fine-tuned accuracy on val, reported on test beside task arithmetic at its validated
coefficient."""),
    ("code", """t0 = time.perf_counter()
d = wl.diagnose(tv, merged, evaluate=z.evaluate, restore=2, controls=1, whatif="all")
print(f"{d.measured['evaluations']} restoration evaluations and the what-if: {time.perf_counter() - t0:.0f} s")
tested = d.blocks.dropna(subset=["measured_gain"]).sort_values(["task", "rank"])
tested[["task", "block", "rank", "predicted_cost", "measured_gain", "cost_to_others"]]"""),
    ("code", """w = d.whatif
chosen = w[w.chosen].groupby("method", sort=False).agg(
    alpha=("alpha", "first"), worst_kept=("kept", "min"), val_worst=("normalized_accuracy", "min"),
    val_mean=("normalized_accuracy", "mean"), test_worst=("report_normalized_accuracy", "min"),
    test_mean=("report_normalized_accuracy", "mean"))
chosen.sort_values("val_worst", ascending=False)"""),
    ("md", """`emr` gives **one model per task** (a shared vector, a mask and a scale per task; `merged.for_task(t)`), each
task scored on its own: it keeps every task because it does not produce one merged model. The suggestion
considers one-model merges only."""),
    ("code", """s = d.suggestion
print(s.sentence())
fixed = s.merge(tv)  # the suggested merge, made afresh; scored on test against each task's own fine-tune
ref = ta.reference
own = ref[(ref.model == "finetuned") & (ref.split == "test")].set_index("task")["accuracy"]
side = pd.DataFrame({
    "task arithmetic (alpha=0.5)": at_half["normalized_accuracy"],
    f"task arithmetic (validated alpha={alpha_ta:g})": at_best["normalized_accuracy"],
    f"suggested ({s.method}, alpha={s.alpha:g})": {t: z.evaluate(fixed, t, "test")["accuracy"] / own[t]
                                                    for t in tv.names},
})
side.loc["worst"] = side.min()
side.loc["mean"] = side.iloc[:-1].mean()
side"""),
    ("md", """The planted fine-tune asks for the opposite labels on `rot90`'s inputs, so no merge of all five keeps both
`rot90` and `rot90_swap`: the diagnosis names the block (`fc2`) and the task behind it (`rot90_swap`, which
opposes `rot90`'s update there and wins its signs), the restoration test measures that restoring `fc2` gives
`rot90` back, and the suggestion is the merge that shares the unavoidable damage best. The other remedy the
diagnosis points at is to leave `rot90_swap` out or give it a smaller weight; the pre-merge check
`dominant_task` already said it is several times larger than the others."""),
    ("code", """assert d.ranking("rot90").iloc[0]["block"] == "fc2"
assert d.ranking("rot90").iloc[0]["opposed_by"] == "rot90_swap"
assert s.worst >= s.baseline["worst"]  # on val, where both were chosen
print(f"worst task on test: suggested {side.loc['worst'].iloc[2]:.3f}, task arithmetic validated "
      f"{side.loc['worst'].iloc[1]:.3f}, at alpha=0.5 {side.loc['worst'].iloc[0]:.3f}")"""),
    ("md", """## The MiniLM zoo: nothing planted

all-MiniLM-L6-v2 and its four fine-tunes (frozen zero-shot heads). Task arithmetic at its validated coefficient,
diagnosed with restoration tests; the Spearman correlation per task says whether the predicted cost ranks the
blocks the way restoring them measures (1: the same order)."""),
    ("code", """zm = zoo.load("minilm-tasks", size=SIZE)
tvm = zm.task_vectors()
METHODS = "all" if FULL else ["ties"]  # CI: task arithmetic (always there) and TIES
t0 = time.perf_counter()
ref = wl.merge(tvm, method="task_arithmetic")  # its default alpha; the what-if scores its grid
# FULL: every block restored (the Spearman over all of them); CI: the top 2 and the lowest-ranked one
dm = wl.diagnose(tvm, ref, evaluate=zm.evaluate, restore=99 if FULL else 2, controls=0 if FULL else 1,
                 whatif=METHODS, whatif_points=3 if FULL else 1)
print(f"diagnosis with {dm.measured['evaluations']} restoration evaluations and the what-if of "
      f"{dm.whatif.method.nunique()} methods: {time.perf_counter() - t0:.0f} s")
print(dm.summary())"""),
    ("code", """dm.tasks[["task", "kept", "worst_block", "predicted_cost", "spearman"]]"""),
    ("code", """wm = dm.whatif
wm[wm.chosen].groupby("method", sort=False).agg(
    alpha=("alpha", "first"), val_worst=("normalized_accuracy", "min"), val_mean=("normalized_accuracy", "mean"),
    test_worst=("report_normalized_accuracy", "min"), test_mean=("report_normalized_accuracy", "mean"))"""),
    ("code", """sm = dm.suggestion
print(sm.sentence())
print(f"mean Spearman of predicted cost and measured gain: {dm.spearman:.2f} "
      f"(over {dm.blocks.measured_gain.notna().sum() // len(tvm.names)} blocks per task)")
assert sm.worst >= sm.baseline["worst"]"""),
    ("md", """With three restored blocks per task (CI) the correlation is coarse; `WEIGHTLENS_NOTEBOOK_FULL=1` restores
every block and scores every method. Measured that way on this zoo (`docs/diagnosis.md`): task arithmetic at
alpha 0.3, mean Spearman +0.88 over all 11 blocks (+0.60 over the top 3 and 2 controls); TIES +0.47 (+0.33)."""),
]


def main() -> None:
    write(CELLS, OUT, "diag")


if __name__ == "__main__":
    main()
