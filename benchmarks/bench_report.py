"""The full interference report against a naive loop of ``torch.linalg.svd``, in the same run.

On the MiniLM task zoo (``zoo.load("minilm-tasks", size="ci")``: all-MiniLM-L6-v2 and 4 fine-tunes,
103 float keys, 40 of them matrices, the embeddings and pooler frozen) it times, alternating the
cases ``--repeats`` times and keeping the median:

* ``naive``: ``torch.linalg.svd(delta, full_matrices=False)`` of every matrix key and task (each
  delta read from the checkpoints, as the report does): singular values and vectors, nothing else.
  This thin loop is the baseline of every ratio; it is faster than the literal call (below);
* ``naive, live keys``: the same loop over the keys some task changed (36 of 40), to show how much
  of a ratio comes from not decomposing the frozen, all-zero matrices;
* ``report``: ``analyze(tv)`` on an empty decomposition cache: spectra of every task and of the
  sum, SAR against the sum with both rank rules, the task x task SAR matrix, STI, subspace
  overlaps and principal angles, cosines, sign conflicts of all 103 keys, aggregates;
* ``report, values only``: ``analyze(tv, pairwise=False)``: per-task singular values alone (no task x
  task SAR, STI or overlaps, which need per-task singular vectors);
* ``report, warm``: a second report on the same cache (another SAR rule), as after a merge or in a
  widget: no decomposition is repeated.

``ratio = naive / case`` (> 1: the case is faster). ``--with-default`` adds one run of the literal
``torch.linalg.svd(delta)`` loop (default ``full_matrices=True``: a 30522 x 30522 ``U`` for the word
embeddings, minutes) as ``naive, literal``. The thin-loop comparison is information: it is no peer's code.

``--peers`` adds the parts of the report that FusionBench 0.2.33 has code for, each timed in a fresh process
of its Python (``.venv-peers``, or ``WEIGHTLENS_PEERS``; ``peers-bench.txt`` installs it) against the same part
done by weightlens' functions in a fresh process of this Python, interleaved, median of ``--repeats``, ratio
``FusionBench / weightlens`` (> 1: weightlens is faster); reading the files is outside the clock, ``ft - base``
inside, as in ``bench_peers.py``:

* ``cosines``: the task x task cosine matrix of the whole-model task vectors. FusionBench:
  ``TaskVectorCosSimilarity``'s steps (``state_dict_sub``, ``state_dict_to_vector``, float64, its pair loop of
  ``cosine_similarity``); weightlens: the report's per-key float64 Gram matrices summed, ``cosine_matrix``;
* ``STI``: the singular task interference of every matrix key some task changed, from every task's full thin
  SVD. FusionBench: ``compute_task_singular_interference`` (``method/task_singular_vector/utils``), which in
  0.2.33 fails on every input (its vectors are concatenated along rows, a shape error for two tasks or more,
  and ``torch.linalg.norm(..., ord="1")`` is refused), so it runs with those two lines fixed (columns, the sum
  of absolute entries); weightlens: ``decompositions.svd`` per task (the report's cached SVDs, from the
  factors for LoRA) and ``analysis.sti`` with every triplet (``sti_k="r"``).

The spectra, SAR, subspace overlaps, principal angles and sign-conflict statistics have no FusionBench code.
The ``minilm-lora`` rows (``--lora``) give FusionBench the adapters merged into dense fine-tunes (what
``merge_and_unload`` writes) and weightlens the adapter folders (factored task vectors, read inside the
clock). The max relative difference of the results is printed beside each ratio.

Run ``python benchmarks/bench_report.py`` (``--help`` for options) after ``weightlens zoo build --size ci
--names minilm-tasks`` (and ``minilm-lora`` for ``--lora``). The load average is printed before and after:
other processes on the machine skew every case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)

if TYPE_CHECKING:
    from weightlens import TaskVectors

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PEERS = Path(os.environ.get("WEIGHTLENS_PEERS", ROOT / ".venv-peers"))


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive(tv: TaskVectors, keys: Sequence[str], *, full_matrices: bool = False) -> int:
    """SVD of every given key of every task (thin by default); returns the number of SVDs."""
    count = 0
    for key in keys:
        for task in tv.names:
            torch.linalg.svd(tv.delta(task, key), full_matrices=full_matrices)
            count += 1
    return count


def cold_report(tv: TaskVectors, **options: object) -> TaskVectors:
    """A report on an empty cache."""
    from weightlens.analysis import analyze

    tv.cache.clear()
    analyze(tv, device="cpu", progress=False, **options)
    return tv


# ------------------------------------------------------------------------ against FusionBench-style code
def fusionbench_sti(weight_differences: list[torch.Tensor], ranks: list[int | None]) -> torch.Tensor:
    """FusionBench 0.2.33's ``compute_task_singular_interference``, two lines fixed: the singular vectors are
    concatenated as columns (``dim=1``; its ``dim=0`` is a shape error for two tasks or more) and the norm is
    the sum of absolute entries (its ``torch.linalg.norm(x, ord="1")`` is refused by torch). One line added:
    a task of known rank (a LoRA adapter's ``r``; None: all) keeps that many triplets, since past it the thin
    SVD's vectors are an arbitrary completion that changes the value (weightlens' factored SVD has none)."""
    device, dtype = weight_differences[0].device, weight_differences[0].dtype
    U, S, V = [], [], []
    for delta_w, rank in zip(weight_differences, ranks):
        u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
        u, s, vh = (u, s, vh) if rank is None else (u[:, :rank], s[:rank], vh[:rank])
        U.append(u)
        S.append(s)
        V.append(vh.t())
    U, S, V = torch.cat(U, dim=1), torch.cat(S, dim=0), torch.cat(V, dim=1)
    interference = torch.linalg.multi_dot((
        U.t() @ U - torch.eye(U.shape[1], device=device, dtype=dtype),
        torch.diag(S),
        V.t() @ V - torch.eye(V.shape[1], device=device, dtype=dtype),
    ))
    return interference.abs().sum()


def _fusionbench_parts(base: dict, fts: list[dict], keys: list[str], ranks: dict) -> tuple[dict, dict]:
    from fusion_bench.utils.parameters import state_dict_to_vector
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub

    clock: dict[str, float] = {}
    start = time.perf_counter()
    vectors = torch.stack([state_dict_to_vector(state_dict_sub(ft, base)).float().to(torch.float64) for ft in fts])
    cos = torch.zeros(len(fts), len(fts), dtype=torch.float64)
    for i in range(len(fts)):  # TaskVectorCosSimilarity.run's loop
        for j in range(i, len(fts)):
            cos[i, j] = torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0)
            cos[j, i] = cos[i, j]
    clock["cosines"] = time.perf_counter() - start
    start = time.perf_counter()
    sti = {k: float(fusionbench_sti([ft[k] - base[k] for ft in fts], ranks[k])) for k in keys}
    clock["STI"] = time.perf_counter() - start
    return clock, {"cosines": cos.flatten().tolist(), "STI": [sti[k] for k in keys]}


def _weightlens_parts(base: dict, fts: list[dict], keys: list[str], zoo_name: str, size: str,
                      root: str | None) -> tuple[dict, dict]:
    from weightlens import TaskVectors, decompositions, zoo
    from weightlens.analysis import sti
    from weightlens.analysis.alignment import cosine_matrix, gram

    def task_vectors() -> TaskVectors:
        if zoo_name == "minilm-lora":  # the adapters themselves: factored task vectors
            return zoo.load(zoo_name, size=size, root=root).task_vectors()
        return TaskVectors(base, {f"t{i}": ft for i, ft in enumerate(fts)})

    clock: dict[str, float] = {}
    start = time.perf_counter()
    tv = task_vectors()
    g = torch.zeros(len(fts), len(fts), dtype=torch.float64)
    for key in tv.keys:
        g += gram(tv.deltas(key))
    cos = cosine_matrix(g)
    clock["cosines"] = time.perf_counter() - start
    start = time.perf_counter()
    tv = task_vectors()  # an empty cache
    values = []
    for key in keys:
        decs = [decompositions.svd(tv, key, task, device="cpu") for task in tv.names]
        values.append(sti([d.U for d in decs], [d.S for d in decs], [d.Vh.mT for d in decs]))
    clock["STI"] = time.perf_counter() - start
    return clock, {"cosines": cos.flatten().tolist(), "STI": values}


def _worker(tool: str, folder: Path, zoo_name: str, out: Path) -> None:
    """One timed run of both parts in this (fresh) process; writes ``{"seconds": ..., "values": ...}`` to ``out``."""
    from safetensors.torch import load_file

    keys = json.loads((folder / "keys.json").read_text())
    base = load_file(folder / "base.safetensors")
    fts = [load_file(folder / f"ft{i}.safetensors") for i in range(keys["tasks"])]
    torch.set_grad_enabled(False)
    if tool == "fusionbench":
        clock, values = _fusionbench_parts(base, fts, keys["sti"], keys["ranks"])
    else:
        clock, values = _weightlens_parts(base, fts, keys["sti"], zoo_name, keys["size"], keys["root"])
    out.write_text(json.dumps({"seconds": clock, "values": values, "threads": torch.get_num_threads()}))


def write_inputs(tv: TaskVectors, folder: Path, size: str, root: str | None, n_keys: int | None) -> list[str]:
    """The base and each fine-tune (``base + tau``, dense: LoRA merged) of ``tv``'s keys as safetensors in
    ``folder``, and the first ``n_keys`` (None: all) matrix keys some task changed with each task's LoRA rank
    there (None: a full fine-tune); returns those keys."""
    from safetensors.torch import save_file

    base = {k: tv.base_tensor(k).float().contiguous() for k in tv.keys}
    save_file(base, folder / "base.safetensors")
    changed: set[str] = set()
    for i, task in enumerate(tv.names):
        ft = {}
        for k in tv.keys:
            delta = tv.delta(task, k).float()
            ft[k] = (base[k] + delta).contiguous()
            if tv.kind(k) == "matrix" and bool(delta.any()):
                changed.add(k)
        save_file(ft, folder / f"ft{i}.safetensors")
    keys = [k for k in tv.keys if k in changed][:n_keys]
    ranks = {k: [None if (f := tv.factors(t, k)) is None else int(f.A.shape[0]) for t in tv.names] for k in keys}
    (folder / "keys.json").write_text(json.dumps({"tasks": len(tv), "sti": keys, "ranks": ranks, "size": size,
                                                       "root": root}))
    return keys


def _run_worker(tool: str, folder: Path, zoo_name: str, threads: int) -> dict:
    python = sys.executable if tool == "weightlens" else str(PEERS / "bin" / "python")
    out = folder / f"out-{tool}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([python, str(HERE), "--worker", tool, str(folder), zoo_name], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{tool} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _max_rel(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((x - y).abs() / y.abs().clamp(min=1e-30)).max())


def bench_peers(zoo_names: list[str], size: str, root: str | None, repeats: int, threads: int,
                n_keys: int | None) -> list[str]:
    """The ``--peers`` table: each part, weightlens and FusionBench-style code, fresh processes, interleaved."""
    if not (PEERS / "bin" / "python").exists():
        raise SystemExit(f"--peers needs FusionBench's Python at {PEERS} (WEIGHTLENS_PEERS; peers-bench.txt)")
    lines = ["| zoo | part | weightlens (s) | FusionBench-style (s) | ratio FusionBench / weightlens | runs (wl; FB) "
             "| max rel. diff. |", "|---|---|---|---|---|---|---|"]
    from weightlens import zoo

    for zoo_name in zoo_names:
        tv = zoo.load(zoo_name, size=size, root=root).task_vectors()
        with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
            folder = Path(tmp)
            keys = write_inputs(tv, folder, size, root, n_keys)
            times: dict[str, list[dict]] = {"weightlens": [], "fusionbench": []}
            values: dict[str, dict] = {}
            for r in range(repeats):
                for tool in (("weightlens", "fusionbench") if r % 2 == 0 else ("fusionbench", "weightlens")):
                    done = _run_worker(tool, folder, zoo_name, threads)
                    times[tool].append(done["seconds"])
                    values[tool] = done["values"]
        for part in ("cosines", "STI"):
            ours = [t[part] for t in times["weightlens"]]
            theirs = [t[part] for t in times["fusionbench"]]
            what = f"{part} ({len(keys)} keys x {len(tv)} tasks)" if part == "STI" else part
            runs = f"{', '.join(f'{v:.2f}' for v in ours)}; {', '.join(f'{v:.2f}' for v in theirs)}"
            lines.append(f"| {zoo_name} | {what} | {statistics.median(ours):.2f} | {statistics.median(theirs):.2f} | "
                         f"{statistics.median(theirs) / statistics.median(ours):.2f}x | {runs} | "
                         f"{_max_rel(values['weightlens'][part], values['fusionbench'][part]):.1e} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="ci", help="zoo size (default: ci)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats, median kept (default: 3)")
    parser.add_argument("--root", default=None, help="zoo root folder (default: $WEIGHTLENS_HOME/zoo)")
    parser.add_argument("--with-default", action="store_true",
                        help="also time one run of torch.linalg.svd's default full_matrices=True (minutes)")
    parser.add_argument("--peers", action="store_true",
                        help="also the parts FusionBench has code for (cosines, STI), in fresh processes")
    parser.add_argument("--lora", action="store_true", help="with --peers: also the minilm-lora zoo")
    parser.add_argument("--sti-keys", type=int, default=None,
                        help="with --peers: STI of the first N changed matrix keys only (default: all; 6 is a layer)")
    parser.add_argument("--skip-loop", action="store_true", help="only the --peers table (no thin-SVD-loop cases)")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "FOLDER", "ZOO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, folder, zoo_name = args.worker
        _worker(tool, Path(folder), zoo_name, Path(folder) / f"out-{tool}.json")
        return
    from weightlens import zoo
    from weightlens.analysis import analyze

    torch.set_num_threads(args.threads)
    if args.skip_loop:
        bench_peers_table(args)
        return
    tv = zoo.load("minilm-tasks", size=args.size, root=args.root).task_vectors()
    matrices = tv.keys_of_kind("matrix")
    live = [k for k in matrices if bool(tv.deltas(k).any())]
    load_before = load_average()
    cases: dict[str, Callable[[], object]] = {
        "naive": lambda: naive(tv, matrices),
        "naive, live keys": lambda: naive(tv, live),
        "report": lambda: cold_report(tv),
        "report, warm": lambda: analyze(tv, device="cpu", progress=False, sar_criterion="paper"),
        "report, values only": lambda: cold_report(tv, pairwise=False),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():  # "report, warm" runs right after a cold full report
            times[name].append(seconds(fn))
    if args.with_default:
        times["naive, literal"] = [seconds(lambda: naive(tv, matrices, full_matrices=True))]
    cold_report(tv)
    decomps = tv.cache.misses
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"# bench_report: MiniLM zoo ({args.size}), {len(tv)} tasks, {len(tv.keys)} keys, "
          f"{len(matrices)} matrices ({len(live)} changed); {machine()}; "
          f"load average {load_before} before, {load_average()} after")
    print(f"naive: {len(matrices) * len(tv)} thin SVDs; report: {decomps} decompositions "
          f"(frozen all-zero keys skipped)\n")
    print("| case | seconds (median) | runs | ratio naive / case |")
    print("|---|---|---|---|")
    for name, value in median.items():
        runs = ", ".join(f"{v:.2f}" for v in times[name])
        print(f"| {name} | {value:.2f} | {runs} | {median['naive'] / value:.2f}x |")
    if "naive, literal" in median:
        ratio = median["naive, literal"] / median["report"]
        print(f"\nreport vs the literal torch.linalg.svd(delta) loop (full_matrices=True): {ratio:.1f}x faster")
    if args.peers:
        print()
        bench_peers_table(args)


def bench_peers_table(args: argparse.Namespace) -> None:
    """Print the ``--peers`` table with the load average around it."""
    before = load_average()
    names = ["minilm-tasks"] + (["minilm-lora"] if args.lora else [])
    print(f"# FusionBench-style parts: {', '.join(names)} ({args.size}); {machine()}; fresh process per run, "
          f"{args.threads} threads, interleaved, median of {args.repeats}")
    bench_peers(names, args.size, args.root, args.repeats, args.threads, args.sti_keys)
    print(f"load average {before} before, {load_average()} after")


if __name__ == "__main__":
    main()
