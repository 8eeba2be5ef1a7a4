"""Write ``notebooks/05_lora.ipynb`` (outputs stripped) from the cells below.

Run ``python scripts/make_05_lora.py`` after editing; the notebook runs headless in CI
(``tests/test_notebooks.py``) at the zoo size of ``$WEIGHTLENS_ZOO_SIZE`` (``ci`` there).
"""

from __future__ import annotations

from pathlib import Path

from _notebook import write  # scripts/_notebook.py (run as a script: its folder is on the path)

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "05_lora.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 05 · LoRA: task vectors that stay factored, and how they merge

A LoRA fine-tune changes each targeted matrix by a low-rank product, `Δ = scale · B @ A` (`A` is `r × n`, `B`
is `m × r`). `wl.TaskVectors` reads a PEFT adapter folder as it is and keeps that product **factored**:
spectra, alignment and the spectral merges work from `A` and `B` (an exact SVD of a rank-`r` product costs
`r × r` work, not an `m × n` one), and `Δ` is formed only where a method needs the dense matrix.

The data: the `minilm-lora` zoo, LoRA adapters (rank 8, on query, key, value, the attention output and both
FFN matrices of the 6 layers) of all-MiniLM-L6-v2 trained on this machine on the four tasks of
`minilm-tasks`, through **the same frozen heads**. So the two zoos differ only in how the encoder was
fine-tuned: every merge below is scored by the same heads on the same examples, for adapters and for full
fine-tunes."""),
    ("code", """import os
import time

import pandas as pd

import weightlens as wl
from weightlens import zoo
from weightlens.analysis import analyze
from weightlens.figures.analysis import figure_spectra
from weightlens.merge import alpha_grid, get_method, list_methods, sweep

SIZE = os.environ.get("WEIGHTLENS_ZOO_SIZE", "ci")
zoo.build(size=SIZE, names=["minilm-tasks", "minilm-lora"], progress=False)  # skipped when built
zl, zf = zoo.load("minilm-lora", size=SIZE), zoo.load("minilm-tasks", size=SIZE)
pd.set_option("display.precision", 3)
s, sf = zl.manifest["settings"], zf.manifest["settings"]
print(f"LoRA: rank {s['rank']}, lora_alpha {s['lora_alpha']}, lr {s['lr']}, {s['steps_per_task']} steps per task "
      f"(the full fine-tunes: lr {sf['lr']}, {sf['steps_per_task']} steps)")"""),
    ("md", """## Base, full fine-tunes and LoRA on each task

Accuracy of each model on its own task, from the zoos' manifests (the same scorer measured them when the
zoos were built). The base row is the same in both zoos: the heads are the same."""),
    ("code", """def accuracies(z, model, split):
    return {t: z.manifest["metrics"][model][t][split]["accuracy"] for t in z.tasks}


models = {"base": (zf, "base"), "full": (zf, "finetuned"), "LoRA": (zl, "finetuned")}
own = pd.DataFrame({(split, name): accuracies(z, model, split)
                    for split in ("val", "test") for name, (z, model) in models.items()})
own.loc["mean"] = own.mean()
own"""),
    ("md", """## Task vectors from the adapters, kept factored

`wl.TaskVectors(base, {task: adapter_folder})` reads each adapter's `A`, `B` and scale
(`lora_alpha / r`); `tv.factors(task, key)` hands them out in the base's orientation. Keys the adapter does
not touch (embeddings, LayerNorms, biases, the pooler) have a zero delta, rank 0. The embeddings and the
pooler are left out of both zoos' task vectors below, as in the tour (they were frozen in both)."""),
    ("code", """EXCLUDE = ["embeddings.*", "pooler.*"]
tv = wl.TaskVectors(zl.base, zl.finetuned, exclude=EXCLUDE)
tvf = zf.task_vectors(exclude=EXCLUDE)
key = "encoder.layer.3.intermediate.dense.weight"
f = tv.factors("wn_noun", key)
print({t: tv.is_factored(t) for t in tv.names})
print(f"{key}: A {tuple(f.A.shape)}, B {tuple(f.B.shape)}, scale {f.scale}; dense delta {tv.shape(key)}")"""),
    ("md", """## Spectra from the factors

`analyze` takes each adapter's SVD from its factors and the SVD of the task sum from the stacked factors
(rank at most `4 r`), so it never forms an `m × n` delta; the full fine-tunes' spectra need dense SVDs. A
rank-8 adapter has at most 8 non-zero singular values per matrix, and the sum of four at most 32: the
effective ranks below say how many of them each update really uses, next to the full fine-tunes'."""),
    ("code", """t0 = time.perf_counter()
report = analyze(tv, progress=False)
t_lora = time.perf_counter() - t0
t0 = time.perf_counter()
report_full = analyze(tvf, progress=False)
print(f"analyze: adapters {t_lora:.1f} s (from factors), full fine-tunes {time.perf_counter() - t0:.1f} s (dense)")
keys = [f"encoder.layer.{i}.{m}.weight" for i in (0, 5) for m in ("attention.self.query", "intermediate.dense")]
figure_spectra(report.singular_values, keys=keys, cols=2)"""),
    ("code", """def erank(report):
    spectra = report.spectra[report.spectra["task"].isin(report.tasks) & report.spectra["key"].str.endswith("weight")]
    kind = spectra["key"].str.replace(r"^encoder\\.layer\\.\\d+\\.", "", regex=True)
    return spectra.assign(matrix=kind).groupby("matrix")["erank"].mean()


pd.DataFrame({"LoRA": erank(report), "full": erank(report_full)}).round(1)"""),
    ("md", """## Every merge method, its coefficient chosen on validation

Every registered method (`list_methods()`, so a method registered later appears here too) can merge the
four adapters and, with the same grid, the four full fine-tunes; `sweep` picks `alpha` on the validation
split and reports the test split. **Normalized accuracy** divides each task's merged accuracy by its own
fine-tune's: a LoRA merge by that task's adapter, a full merge by that task's full fine-tune.

What the notebook tests run (`WEIGHTLENS_ZOO_SIZE=ci`, no other setting) is kept short: five methods, each
scored at its own default `alpha` on the validation split (every score is a forward pass over the split).
`WEIGHTLENS_NOTEBOOK_FULL=1` runs every registered method over its grid (three points of it at CI size),
chooses `alpha` on val and reports on test (the table in `docs/adapters.md` is that run at CI size)."""),
    ("code", """FULL = os.environ.get("WEIGHTLENS_NOTEBOOK_FULL", "") == "1"
METHODS = list_methods() if FULL else ["task_arithmetic", "ties", "tsv", "iso_cts", "knots_ties"]
REPORT_ON = "test" if FULL else "val"  # the split the tables below report


def grid(method, n_tasks):
    if not FULL:  # the method's own default alpha (its untuned setting)
        return [get_method(method).resolve({}, n_tasks)["alpha"]]
    full = alpha_grid(method, n_tasks)  # at CI size three points of it (1/6, 1/2, 5/6), as in 02_merging
    return full if SIZE != "ci" else sorted({full[int(q * len(full))] for q in (1 / 6, 1 / 2, 5 / 6)})


def reference(z):  # base and fine-tuned scores, measured by the same scorer when the zoo was built
    built = z.manifest["metrics"]
    return pd.DataFrame([{"task": t, "split": s, "model": model, **built[model][t][s]}
                         for model in ("base", "finetuned") for t in z.tasks for s in ("val", "test")])


def run_sweeps(tv, z):
    ref = reference(z)
    return {m: sweep(tv, m, grid(m, len(tv)), z.evaluate, reference=ref, report_on=REPORT_ON, progress=False)
            for m in METHODS}


t0 = time.perf_counter()
lora_sweeps = run_sweeps(tv, zl)
print(f"{len(METHODS)} methods on the adapters, reported on {REPORT_ON}: {time.perf_counter() - t0:.0f} s")"""),
    ("code", """t0 = time.perf_counter()
full_sweeps = run_sweeps(tvf, zf)
print(f"{len(METHODS)} methods on the full fine-tunes, reported on {REPORT_ON}: {time.perf_counter() - t0:.0f} s")"""),
    ("code", """COLUMNS = {"alpha": "alpha", f"{REPORT_ON}_accuracy": "acc",
           f"{REPORT_ON}_normalized_accuracy": "norm. acc", f"{REPORT_ON}_nai": "NAI"}


def results(sweeps):
    table = pd.DataFrame([sw.report() for sw in sweeps.values()]).set_index("method")
    return table[list(COLUMNS)].rename(columns=COLUMNS)


side = pd.concat({"LoRA": results(lora_sweeps), "full": results(full_sweeps)}, axis=1)
side"""),
    ("md", """Per task, the normalized accuracy of each method at its chosen `alpha`:"""),
    ("code", """per_task = pd.concat({family: pd.DataFrame({m: sw.best.set_index("task")["normalized_accuracy"]
                                                for m, sw in sweeps.items()})
                      for family, sweeps in (("LoRA", lora_sweeps), ("full", full_sweeps))}, axis=1)
per_task"""),
    ("md", """## Reading the table

The sentences below are computed from the table above, so they describe this build. Normalized accuracy
near 1 means the merge keeps about what each task's own fine-tune reached; above 1, the merge scores
better on a task than its fine-tune (the other tasks' updates help it, or the fine-tune over-fitted the
small training split). Keep in mind that the two families start from different fine-tunes: a family whose
fine-tunes gained little over the base has little to lose, so compare the `acc` columns too. `NAI` is the
share of the fine-tuning gain over the base that the merge keeps."""),
    ("code", """lora_n, full_n = side[("LoRA", "norm. acc")], side[("full", "norm. acc")]
ahead = lora_n[lora_n > full_n].index.tolist()
print(f"On {REPORT_ON}, LoRA merges keep more of their fine-tunes than the full merges for {len(ahead)} of "
      f"{len(side)} methods{': ' + ', '.join(ahead) if ahead else ''}.")
print(f"best for the adapters: {lora_n.idxmax()} ({lora_n.max():.3f}); "
      f"best for the full fine-tunes: {full_n.idxmax()} ({full_n.max():.3f}).")
print(f"mean over methods: LoRA {lora_n.mean():.3f}, full {full_n.mean():.3f}; mean accuracy of the merges: "
      f"LoRA {side[('LoRA', 'acc')].mean():.3f}, full {side[('full', 'acc')].mean():.3f} "
      f"(fine-tunes alone: LoRA {own.loc['mean', (REPORT_ON, 'LoRA')]:.3f}, "
      f"full {own.loc['mean', (REPORT_ON, 'full')]:.3f}).")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT, "lora")
