"""Write ``notebooks/01_interference.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_01_interference.py`` after editing; the notebook runs headless in CI
(``tests/test_notebooks.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

from _notebook import write  # scripts/_notebook.py (run as a script: its folder is on the path)

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "01_interference.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 01 · Interference: why task vectors collide, layer by layer

`analyze(task_vectors)` measures, for every weight matrix and every pair of tasks, the three things that
decide whether a merge can keep each task: the **spectrum** of each task's update, how the tasks'
**singular subspaces align**, and how often their **signs conflict**. Every metric follows
[docs/methods.md](../docs/methods.md#spectra) (spectra, SAR, STI, sign conflicts) and is tested against an
independent float64 computation.

The data: `minilm-tasks` from the model zoo, all-MiniLM-L6-v2 fine-tuned on this machine on four
text-classification tasks (WordNet nouns, a second noun split, WordNet verbs, fortunes), with the
embeddings and pooler frozen."""),
    ("code", """import os
import tempfile
from pathlib import Path

import pandas as pd

from weightlens import zoo
from weightlens.analysis import analyze
from weightlens.figures.analysis import (
    figure_conflict_matrix,
    figure_cosines,
    figure_sar_layers,
    figure_sar_matrix,
    figure_sign_conflicts,
    figure_spectra,
    figure_subspace_overlap,
)

pd.set_option("display.precision", 4)
z = zoo.load("minilm-tasks", size=os.environ.get("WEIGHTLENS_ZOO_SIZE", "ci"))
tv = z.task_vectors()
tv"""),
    ("md", """## One pass over the model

One call reads every key once, decomposes each task matrix and the task-arithmetic sum once (cached in
`tv.cache`, so merges and widgets reuse them; the frozen, all-zero layers are not decomposed) and returns
tidy tables: `spectra`, `alignment`, `pairs`, `interference`, `signs`."""),
    ("code", """report = analyze(tv, progress=False)
report"""),
    ("md", """## Summary

Model-level aggregates. **plain**: every matrix (or tensor) counts once, the way the Iso paper averages
SAR; **weighted**: by parameter count, or for rates the pooled counts over all parameters. `chance` is
what independent random task vectors would give."""),
    ("code", """report.summary()"""),
    ("md", """## Cosine similarity

The cosine of two flattened task vectors. Fine-tunes of one model on different tasks are nearly
orthogonal (0.00-0.04 here; the two WordNet-noun tasks are the closest pair), so cosines alone
do not explain interference: the structure is inside each layer. Per key (the *plain* row of the summary)
cosines are higher, mostly in biases, LayerNorm parameters and the last blocks."""),
    ("code", """figure_cosines(report.cosines)"""),
    ("md", """## Spectra

Singular values of each task matrix `Δ = θ_task − θ_base` (log scale) and of their sum. The **effective
rank** `exp(H)`, with `H` the entropy of the normalised singular values, counts the directions a task
really uses; the **stable rank** `‖Δ‖²_F / σ₁²` is its robust cousin. A 384×384 attention update uses far
fewer than 384 directions."""),
    ("code", """keys = [k for k in report.spectra["key"].unique()
        if k.endswith(("layer.0.attention.self.query.weight", "layer.5.attention.self.query.weight",
                       "layer.0.intermediate.dense.weight", "layer.5.output.dense.weight"))]
figure_spectra(report.singular_values, keys=keys, cols=2)"""),
    ("code", """att = report.spectra[report.spectra["key"].str.contains("attention.self") & report.spectra["task"].isin(report.tasks)]
att.pivot_table(index="key", columns="task", values="erank").round(1)"""),
    ("md", """## Subspace alignment (SAR)

The **subspace alignment ratio** `SAR(Δ_t, Δ_M) = ‖U_kᵀ Δ_t‖_F / ‖Δ_t‖_F` is the share of task `t`'s update
that lies in the span of the top-`k` left singular vectors of a reference `Δ_M`; `k` keeps 95% of the
reference's Frobenius norm (`sar_criterion="iso_script"`, the rule behind the Iso paper's figures;
`"paper"` is Eq. 6, which keeps more vectors). Against another task, `k` comes from the sum's spectrum (as in
the Iso paper's task x task figure). Rows are tasks, columns the reference: another task, or the sum. Each
task is better aligned with the sum than with any other single task."""),
    ("code", """report.alignment.query("reference == 'sum'").groupby("task")[["k_paper", "sar_paper", "k_iso_script", "sar_iso_script"]].mean()"""),
    ("code", """figure_sar_matrix(report.sar_matrix())"""),
    ("code", """figure_sar_layers(report.alignment, reference="sum", tasks=report.tasks)"""),
    ("md", """## Singular task interference and subspace overlap

**STI** (TSV paper) sums the cross-task overlaps of the tasks' top singular vectors, weighted by the
singular values, with the vectors concatenated as columns; `sti_normalized` divides by the total singular
mass (a weightlens extension, comparable across layers). The **overlap** of two tasks' top-`k` subspaces is
the mean squared cosine of their principal angles; random subspaces give `k/d` (dashed)."""),
    ("code", """figure_subspace_overlap(report.pairs, side="left")"""),
    ("code", """report.interference[["key", "k", "sti", "sti_normalized"]].head(12)"""),
    ("md", """## Sign conflicts

A coordinate **conflicts** when some tasks push it up and others down. With `T` tasks whose signs were fair
coins the rate would be `1 − 2^(1−T)` (0.875 for 4 tasks, dashed); the mass-weighted rate counts how much
update magnitude sits on conflicting coordinates. TIES trimming (`sign_density=0.2`, the top 20% of each
task) removes small entries first; the baseline then depends on how many tasks survive per coordinate.
The second report reuses every cached decomposition (`pairwise=False` skips the task x task tables,
which trimming does not change)."""),
    ("code", """figure_sign_conflicts(report.signs, by="block")"""),
    ("md", """Per pair of tasks, the share of coordinates both change where they disagree in sign (chance 0.5),
pooled over every parameter:"""),
    ("code", """figure_conflict_matrix(report.conflict_matrix())"""),
    ("code", """trimmed = analyze(tv, sign_density=0.2, pairwise=False, progress=False)
pd.DataFrame({"untrimmed": report.summary()["weighted"], "TIES top-20%": trimmed.summary()["weighted"]}).loc[
    ["conflict rate", "pairwise conflict rate", "mass-weighted conflict", "TIES discarded mass"]]"""),
    ("md", """## Per block, and a standalone page

Aggregates per transformer block (plain and weighted), and the whole report as one HTML file with
plotly inlined, for sharing or for headless machines."""),
    ("code", """report.by_block()"""),
    ("code", """page = report.to_html(Path(tempfile.gettempdir()) / "weightlens_interference.html")
print(page, f"{page.stat().st_size / 1e6:.1f} MB")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT, "interference")
