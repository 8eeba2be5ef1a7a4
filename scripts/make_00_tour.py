"""Write ``notebooks/00_tour.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_00_tour.py`` after editing. The tour runs headless in CI
(``tests/test_notebooks.py``, ``weightlens tour --headless``) and in a real browser
(``tests/test_browser.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

from _notebook import write  # scripts/_notebook.py (run as a script: its folder is on the path)

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "00_tour.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# weightlens tour: see why a merge works, pick one, export it

Fine-tune one pretrained model on several tasks and you get several sets of weights. *Merging* combines
them into one model without more training. It works when the tasks' updates stay out of each other's way,
and fails when they interfere. This tour walks through the whole job on a real transformer:

1. load a base model and four fine-tunes of it;
2. see where the fine-tunes interfere (**interference dashboard**);
3. merge them interactively and watch what each task keeps and how accurate the merge is (**merge studio**);
4. export the merge as an ordinary model folder and check it.

Run the cells from top to bottom (**Run > Run All Cells**). At the CI size every cell takes seconds; at the
demo size (`weightlens zoo build --size demo`) up to a minute or two. The tour shows the full fine-tunes of
`minilm-tasks`; set `WEIGHTLENS_TOUR_ZOO=minilm-lora` before starting it to take the same tour through LoRA
adapters of the same model, on the same tasks and heads (`weightlens zoo build --names minilm-lora` first)."""),
    ("code", """import os
import tempfile
from pathlib import Path

import pandas as pd

import weightlens as wl
from weightlens import zoo
from weightlens.analysis import analyze
from weightlens.widgets import InterferenceDashboard, MergeStudio

ZOO = os.environ.get("WEIGHTLENS_TOUR_ZOO", "minilm-tasks")  # or "minilm-lora": LoRA adapters, same tasks
z = zoo.load(ZOO)  # size: $WEIGHTLENS_ZOO_SIZE if set, else "demo" when built, else "ci"
print(f"{z.name} ({z.manifest['size']}): tasks {z.tasks}")"""),
    ("md", """## 1. A base model and four fine-tunes

The model zoo trained these on this machine, from data that ships inside packages: the base is
**all-MiniLM-L6-v2** (a 6-layer sentence transformer), fine-tuned separately on four 4-way text
classification tasks: WordNet noun definitions (`wn_noun`: animal / plant / food / artifact; `wn_noun_b`:
person / location / time / group), WordNet verbs (`wn_verb`) and fortune-cookie quotes (`fortunes`).
Each task has its own small classification head, kept fixed; only the encoder was fine-tuned.

Test accuracy of the base and of each fine-tune on its own task, from the zoo's manifest:"""),
    ("code", """metrics = z.manifest["metrics"]
accuracy = pd.DataFrame({model: {t: metrics[model][t]["test"]["accuracy"] for t in z.tasks}
                         for model in ("base", "finetuned")})
accuracy"""),
    ("md", """A **task vector** is what fine-tuning changed: `fine-tuned - base`, tensor by tensor. `TaskVectors` reads
them lazily, one tensor at a time, and holds the cache of decompositions that the analysis, the merges and
the widgets share. The embeddings and the pooler were frozen during fine-tuning (their task vectors are
exactly zero), so we leave them out; a merge copies them from the base."""),
    ("code", """tv = z.task_vectors(exclude=["embeddings.*", "pooler.*"])
tv"""),
    ("md", """## 2. Where do the tasks interfere?

`analyze` measures, for every weight matrix: the **spectrum** of each task's update (how many directions
it really uses), how the tasks' top **singular subspaces align** (SAR: the share of a task inside another
update's top subspace), and how often their **signs conflict** (some tasks push a weight up, others down).
Each number has a chance baseline. One pass; the decompositions stay in `tv.cache`."""),
    ("code", """report = analyze(tv, progress=False)
report.summary()[["plain", "weighted", "chance"]].round(3)"""),
    ("md", """The dashboard draws the report. Untick tasks to re-analyse the others (cached decompositions are
reused), pick a transformer block to zoom in, and switch tabs:

* **Spectra**: singular values of each task's update and of their sum (black), log scale;
* **Alignment**: SAR of each task against the other tasks and the sum, or per layer;
* **Sign conflicts**: the conflict rate per block or layer, against the dashed chance line."""),
    ("code", """dash = InterferenceDashboard(tv, report=report)
dash"""),
    ("md", """## 3. Merge interactively

Pick a method and move its parameters; the panels update in place:

* **Spectrum of the update** for one weight matrix: the merge against plain task arithmetic (dashed);
* **What each task keeps** (`sar` by default; `kept` is the coefficient of the merge along the task's own
  update, 1 = carried in full);
* **Sign conflicts**: at coordinates where the tasks disagree, how many the merge zeroed, how often the
  side with more mass won, and how much task mass points against the merge;
* **Accuracy per task** of the merged model on the validation split (bars) against each fine-tune (marks).
  It is scored in the background once the controls have been still for half a second; the bar below the
  panels shows progress.

The methods: `task_arithmetic` (base + alpha * sum of task vectors), `ties` (trim, elect signs, disjoint
mean), `dare` (random drop and rescale), and the spectral ones, `tsv`, `iso_c`, `iso_cts` and `star`, which
rebuild each weight matrix from the tasks' singular vectors. Moving `alpha` only rescales a cached merge:
nothing is recomputed. Try `iso_cts`, then move `alpha`."""),
    ("code", """studio = MergeStudio(tv, evaluate=z.evaluate)
studio"""),
    ("md", """Everything the studio shows is also plain data. `studio.merged` is the current merge (a mapping of full
weights, computed key by key when read), `studio.comparison` its comparison with task arithmetic, and
`studio.scores` the latest accuracies. `wait()` blocks until the background scoring has finished:"""),
    ("code", """studio.wait()
print(studio.merged)
kept = studio.comparison.per_task.query("which == 'merged'").set_index("task")[["sar", "kept", "cos", "agreement"]]
kept.join(studio.scores.pivot(index="task", columns="model", values="accuracy")).round(3)"""),
    ("md", """The same merge without widgets is one call; every method and parameter of the studio is an argument:

```python
from weightlens.merge import merge, compare
merged = merge(tv, method="iso_cts", common_fraction=0.8, alpha=1.0)
compare(tv, merged).per_task
```

## 4. Export and check

**Export** in the studio (or `studio.export(path)`) writes the current merge as an ordinary Hugging Face
model folder: safetensors weights, the base's config and tokenizer, a model card (`README.md`) and
`weightlens_recipe.yaml`, which `weightlens merge` re-runs to rebuild the same weights. Change `out` to keep
the model somewhere else."""),
    ("code", """out = Path(tempfile.gettempdir()) / "weightlens-tour" / "merged-model"
studio.export(out, overwrite=True)
print(studio.merged.recipe)
sorted(p.name for p in out.iterdir())"""),
    ("md", """Load the exported folder like any checkpoint and score it on the **test** split, which nothing above
looked at:"""),
    ("code", """exported = wl.load(out)
test = {t: z.evaluate(exported, t, "test")["accuracy"] for t in tv.names}
accuracy.assign(merged=pd.Series(test)).round(3)"""),
    ("md", """## Where next

* `notebooks/01_interference.ipynb`: every interference metric, layer by layer;
* `notebooks/02_merging.ipynb`: the seven methods compared, coefficients chosen on validation;
* `notebooks/03_rebasin.ipynb`: linear mode connectivity and Git Re-Basin between independently trained models;
* `weightlens --help`: the same analyses and merges from the command line."""),
]


if __name__ == "__main__":
    write(CELLS, OUT, "tour")
