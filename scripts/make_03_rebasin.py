"""Write ``notebooks/03_rebasin.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_03_rebasin.py`` after editing; the notebook runs headless in CI
(``tests/test_notebooks.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

from _notebook import write  # scripts/_notebook.py (run as a script: its folder is on the path)

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "03_rebasin.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 03 · Linear mode connectivity and Git Re-Basin

Two networks trained from different random seeds reach equally good solutions, but the straight line
between their weights usually passes through a region of high loss: a **loss barrier**. Much of the barrier
comes from the fact that hidden units can be reordered without changing the function. **Git Re-Basin**
(Ainsworth, Hayase & Srinivasa, ICLR 2023) finds the reordering of model B's units that brings it closest to
model A (**weight matching**). After that the barrier mostly disappears, and it shrinks further as the models
get wider.

The data is the `digits-pairs` zoo: for each width `h`, two MLPs `64-h-h-10` trained on this machine from seeds
1 and 2 on sklearn's 8×8 digits (1797 real images, a 75/25 train/test split). Definitions follow
[docs/methods.md](../docs/methods.md#lmc-barriers) (LMC barriers, Git Re-Basin):

* **barrier** (Entezari et al.): the largest amount by which the loss rises above the straight line (chord)
  between the two endpoint losses, over 25 evenly spaced alphas.
* **midpoint barrier** (Git Re-Basin): the largest loss on the path minus the mean of the two endpoint losses."""),
    ("code", """import os
import time

import pandas as pd
import torch.nn.functional as F

import weightlens as wl
from weightlens import lmc, rebasin, zoo
from weightlens.figures.lmc import figure_lmc
from weightlens.figures.rebasin import (
    figure_barriers,
    figure_layer_distances,
    figure_permutations,
    figure_singular_alignment,
)
from weightlens.widgets.lmc import LMCExplorer

SIZE = os.environ.get("WEIGHTLENS_ZOO_SIZE", "ci")
zoo.build(size=SIZE, names=["digits-pairs"], progress=False)  # skipped when built
WIDTHS = zoo.load("digits-pairs", size=SIZE).manifest["widths"]
pairs = {w: zoo.load("digits-pairs", size=SIZE, width=w) for w in WIDTHS}
pd.set_option("display.precision", 4)


def evaluator(pair):
    \"\"\"Mean cross-entropy and accuracy on the train and test splits; all alphas in batched passes.\"\"\"
    return lmc.Evaluator(pair.make_module(), {s: pair.data(s) for s in ("train", "test")}, F.cross_entropy)


WIDTHS"""),
    ("md", """## The naive path

Interpolate `(1 − α)·θ_A + α·θ_B` between the two width-128 models as they are. An `Evaluator` scores all 25
models in batched `vmap` passes. Dashed lines are the chords."""),
    ("code", """pair = pairs[128]
a, b = wl.load(pair.a), wl.load(pair.b)
ev = evaluator(pair)
naive = lmc.curve(a, b, ev, label="naive")
naive.summary()"""),
    ("md", """## Weight matching

`mlp_spec` names one permutation per hidden layer: it acts on the layer's output rows and bias and on the next
layer's input columns. `weight_matching` maximises `Σ ⟨θ_A, π(θ_B)⟩` by coordinate descent. Each sweep visits
the permutations in a new random order and solves a linear assignment problem (LAP) for each one with the others
held fixed; it stops when a sweep changes nothing. The objective only ever increases."""),
    ("code", """spec = rebasin.mlp_spec(a)
print(spec.describe())
perms = rebasin.weight_matching(a, b, spec, seed=0)
perms, [round(v, 2) for v in perms.objective_history]"""),
    ("code", """matched_b = perms.apply({k: b[k] for k in b})
matched = lmc.curve(a, matched_b, ev, label="matched")
figure_lmc([naive, matched], title="digits MLP, width 128: naive vs matched interpolation")"""),
    ("code", """pd.DataFrame({"naive": naive.barrier, "matched": matched.barrier,
              "reduction": lmc.relative_reduction(naive, matched),
              "naive (midpoint def.)": naive.barrier_midpoint,
              "matched (midpoint def.)": matched.barrier_midpoint})"""),
    ("md", """## Barrier against width

Width helps twice: wider models are closer to linearly connected to begin with, and matching removes a larger
share of what is left. The table also lists **activation matching**, which matches units by the correlation of
their activations on the training images (one LAP per layer) rather than by their weights."""),
    ("code", """rows = []
for w, p in pairs.items():
    pa, pb = wl.load(p.a), wl.load(p.b)
    pb = {k: pb[k] for k in pb}
    e = evaluator(p)
    spec_w = rebasin.mlp_spec(pa)
    start = time.perf_counter()
    wm = rebasin.weight_matching(pa, pb, spec_w)
    seconds = time.perf_counter() - start
    am = rebasin.activation_matching(pa, pb, spec_w, p.make_module, p.data("train"))
    curves = {"naive": lmc.curve(pa, pb, e), "matched": lmc.curve(pa, wm.apply(pb), e),
              "activation matched": lmc.curve(pa, am.apply(pb), e)}
    for label, c in curves.items():
        for split in c.splits:
            rows.append({"width": w, "label": label, "split": split, "barrier": c.barrier[split],
                         "barrier_midpoint": c.barrier_midpoint[split],
                         "accuracy_barrier": c.accuracy_barrier[split],
                         "matching_s": seconds if label == "matched" else float("nan")})
barriers = pd.DataFrame(rows)
table = barriers.pivot_table(index="width", columns=["split", "label"], values="barrier")
table"""),
    ("code", """test = table["test"]
ratio = (test["matched"] / test["naive"]).rename("matched / naive (test)")
print(ratio.round(4).to_string())
for w in WIDTHS:
    if w >= 128:
        assert ratio[w] < 0.3, f"width {w}: matched barrier is {ratio[w]:.2f}x the naive one"
assert list(test["matched"]) == sorted(test["matched"], reverse=True), "matched barrier should shrink with width"
figure_barriers(barriers[barriers["label"] != "activation matched"], split="test",
                title="test-loss barrier against width (digits MLP 64-h-h-10)")"""),
    ("md", """## What the permutation did

**Distance per layer.** A permutation does not change any tensor's norm, only how it lines up with model A.
Relative distance `‖A − π(B)‖ / √(‖A‖² + ‖B‖²)` is 1 for unrelated tensors and 0 for equal ones. The last
layer's rows (the 10 classes) are never permuted; its columns follow the second hidden layer."""),
    ("code", """distances = rebasin.layer_distances(a, b, spec, perms)
figure_layer_distances(distances, title="width 128: distance between A and B per tensor")"""),
    ("md", """**The permutations.** Row `i` of a heatmap has its 1 in the column of the unit of B that moves to
position `i`. Almost every unit moves: the two trainings put equivalent features in unrelated places."""),
    ("code", """figure_permutations(perms, title="permutations found for B (width 128)")"""),
    ("md", """**Singular vectors.** Matching aligns the dominant directions of each layer. For each layer the figure
shows the cosine `|⟨u_i^A, u_i^B⟩|` of the i-th left singular vectors (those on the layer's outputs), before and
after matching. The row labels give the overlap of the top-16 subspaces, `‖U_A^T U_B‖²_F / k`. For random
subspaces the overlap would be `k/d`. Before matching the cosines are near chance; after matching the leading
directions line up. The output layer's left side is the 10 classes, which are never permuted, so it stays as
it was."""),
    ("code", """alignment = rebasin.singular_alignment(a, b, spec, perms, k=16)
alignment.layers"""),
    ("code", """figure_singular_alignment(alignment, side="left")"""),
    ("md", """## Explore

`LMCExplorer(a, b, evaluate, spec)` puts all of this in one view: the curves with a movable α, the
distances, the permutation matrices and the singular-vector alignment. Here the permutations found above are
reused, so nothing is matched again. Moving a control never recomputes anything."""),
    ("code", """explorer = LMCExplorer(pair.a, pair.b, ev, spec, permutations=perms)
explorer"""),
    ("code", """# self-check: drive the controls from code and check that the figures followed
explorer.controls["alpha"].value = float(explorer.naive_.alphas[6])
assert [s.x0 for s in explorer.figures["interpolation"].layout.shapes] == [explorer.naive_.alphas[6]] * 2
explorer.controls["view"].value = "singular vectors"
assert explorer.figures["singular vectors"].data[0].type == "heatmap" and explorer.last_error is None
explorer.controls["view"].value = "interpolation"
print("self-check ok")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT, "rebasin")
