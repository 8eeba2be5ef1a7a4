"""LoRA updates decomposed from their factors against the dense ``B @ A``, as ratios in the same run.

For each shape (384x1536, MiniLM's MLP; 4096x11008, a Llama-7B MLP) at rank r, with synthetic factors
of a decaying spectrum (as trained adapters have), it times:

* ``dense``: form ``scale * B @ A`` and take its thin SVD with ``weightlens.linalg.svd`` (the baseline:
  what a merged-and-unloaded adapter costs);
* ``factored``: ``weightlens.linalg.factored_svd(B, A)`` (QR of both factors, SVD of the r x r core);
* ``sum of 4``: the same for the sum of four adapters (concatenated factors, rank 4r) against the dense
  sum, the task-arithmetic reference of TSV-M/Iso-CTS;

and prints each ratio with the largest relative singular-value error of the factored result against
the dense one. A second table times weightlens itself on one key of four adapters (PEFT folders written
here from the same synthetic factors), each call on an empty decomposition cache, against the same key
given densely (full fine-tunes ``base + B @ A``, the product materialised):

* ``spectra``: ``decompositions.svdvals`` of each adapter and of their sum, then
  ``analysis.spectrum_rows`` (from factors the spectra are completed with zeros, ``complete_spectrum``);
* ``TSV-M`` and ``Iso-CTS``: ``wl.merge(tv, method=...).key_update(key)`` (the unscaled update of the key,
  the dense ``m x n`` update formed in both).

The merges' error column is ``-``: with ``floor(r/T)`` above the adapters' rank (TSV-M) and a rank-deficient
sum (Iso-CTS), the dense results depend on the arbitrary completion a dense SVD returns past the rank
(``weightlens/merge/spectral.py``), so the two are not expected to agree bit for bit there.
Run ``python benchmarks/bench_lora.py`` (``--quick`` skips the LLM shape, whose dense side is timed once, with
no warm-up call; the factored side is always the best of at least 5 warm calls); the issue's target is at
least 20x at r = 16.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import weightlens as wl
from weightlens import decompositions, linalg
from weightlens.analysis.spectra import complete_spectrum, spectrum_rows
from weightlens.linalg.factored import concat_factors, factored_svd

from _machine import load_average, machine  # noqa: E402  (benchmarks run as scripts)


def _factors(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g) * 0.8 ** torch.arange(r)
    A = torch.randn(r, n, generator=g) / n**0.5
    return A, B, 2.0


def _best(fn: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up call (none when ``repeats == 1``: one call). The best,
    not the median: on a shared 2-core machine another process makes small LAPACK calls spin for a while."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _row(label: str, parts: list[tuple[torch.Tensor, torch.Tensor, float]], repeats: int) -> str:
    B, A = concat_factors(parts)

    def dense() -> linalg.SVD:
        return linalg.svd(B @ A, device="cpu")

    def factored() -> linalg.SVD:
        return factored_svd(B, A, device="cpu")

    t_dense, t_fact = _best(dense, repeats), _best(factored, max(repeats, 5))  # factored: cheap, always warm
    k = B.shape[1]
    S_dense, S_fact = dense().S[:k].double(), factored().S.double()
    err = float(((S_fact - S_dense).abs() / S_dense[0]).max())
    return f"| {label} | {B.shape[0]}x{A.shape[1]} | {k} | {t_dense * 1e3:.1f} | {t_fact * 1e3:.2f} | " \
           f"{t_dense / t_fact:.0f}x | {err:.1e} |"


KEY = "mlp.weight"


def _adapter(folder: Path, A: torch.Tensor, B: torch.Tensor, scale: float) -> Path:
    """A PEFT LoRA adapter folder with one module ``mlp`` (``lora_alpha = scale * r``), written without peft."""
    folder.mkdir(parents=True)
    r = A.shape[0]
    config = {"peft_type": "LORA", "r": r, "lora_alpha": scale * r, "target_modules": ["mlp"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {"base_model.model.mlp.lora_A.weight": A, "base_model.model.mlp.lora_B.weight": B}
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def _twins(parts: list[tuple[torch.Tensor, torch.Tensor, float]], root: Path) -> tuple[wl.TaskVectors, wl.TaskVectors]:
    """The adapters as task vectors (factored) and the same deltas as full fine-tunes (dense)."""
    m, n = parts[0][1].shape[0], parts[0][0].shape[1]
    base = {KEY: torch.zeros(m, n)}
    adapters = {f"a{i}": _adapter(root / f"a{i}", A, B, scale) for i, (A, B, scale) in enumerate(parts)}
    factored = wl.TaskVectors(base, adapters)
    dense = wl.TaskVectors(base, {name: {KEY: factored.delta(name, KEY)} for name in factored.names})
    assert all(factored.is_factored(t) for t in factored.names) and not dense.is_factored("a0")
    return factored, dense


def _spectra(tv: wl.TaskVectors) -> list[dict]:
    shape = tv.shape(KEY)
    values = {}
    for name, of in [*((t, t) for t in tv.names), ("sum", tuple(tv.names))]:
        S = decompositions.svdvals(tv, KEY, of, device="cpu")
        values[name] = (complete_spectrum(S, shape), None)
    return spectrum_rows(KEY, shape, values)


def _merge(method: str) -> Callable[[wl.TaskVectors], torch.Tensor]:
    return lambda tv: wl.merge(tv, method=method, device="cpu").key_update(KEY).update


def _tv_rows(parts: list[tuple[torch.Tensor, torch.Tensor, float]], repeats: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        factored, dense = _twins(parts, Path(tmp))
        m, n = factored.shape(KEY)
        for label, fn in (("spectra (4 adapters + sum)", _spectra), ("TSV-M", _merge("tsv")),
                          ("Iso-CTS", _merge("iso_cts"))):
            def run(tv: wl.TaskVectors, fn=fn) -> object:
                tv.cache.clear()  # every call decomposes from scratch
                return fn(tv)

            t_dense, t_fact = _best(lambda: run(dense), repeats), _best(lambda: run(factored), max(repeats, 5))
            err = "-"
            if label.startswith("spectra"):
                got, want = run(factored), run(dense)
                err = f"{max(abs(g['sigma_max'] - w['sigma_max']) / w['sigma_max'] for g, w in zip(got, want)):.1e}"
            rows.append(f"| {label} | {m}x{n} | {len(parts)} x {parts[0][0].shape[0]} | {t_dense * 1e3:.1f} | "
                        f"{t_fact * 1e3:.2f} | {t_dense / t_fact:.0f}x | {err} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only the 384x1536 shape")
    args = parser.parse_args()
    shapes = [(384, 1536)] + ([] if args.quick else [(4096, 11008)])
    print(f"{machine('cpu')}; load {load_average()}\n")
    print("| what | shape | rank | dense ms | factored ms | ratio | max sigma error / sigma_1 |")
    print("|---|---|---|---|---|---|---|")
    for m, n in shapes:
        repeats = args.repeats if m * n < 10**7 else 1
        one = [_factors(m, n, args.rank, seed=0)]
        print(_row("one adapter", one, repeats), flush=True)
        four = [_factors(m, n, args.rank, seed=s) for s in range(4)]
        print(_row("sum of 4", four, repeats), flush=True)
    print("\nweightlens on one key of 4 adapters (TaskVectors of PEFT folders) vs the same deltas given densely\n")
    print("| what | shape | adapters x rank | dense ms | factored ms | ratio | max sigma_1 error |")
    print("|---|---|---|---|---|---|---|")
    for m, n in shapes:
        repeats = args.repeats if m * n < 10**7 else 1
        _tv_rows([_factors(m, n, args.rank, seed=s) for s in range(4)], repeats)


if __name__ == "__main__":
    main()
