"""Fingerprint what weightlens computes on the digits zoo, to show a refactor changed no result.

Writes ``{what: sha256}`` as JSON: the merged weights of every registered method (tensor bytes in key
order, so file metadata such as the version does not count), the interference report's tables and the
``compare`` tables of a TIES and a TSV-M merge. Run it on two checkouts and diff the files::

    WEIGHTLENS_HOME=.wl-cache PYTHONPATH=/path/to/old .venv/bin/python scripts/fingerprint_results.py old.json
    WEIGHTLENS_HOME=.wl-cache .venv/bin/python scripts/fingerprint_results.py new.json
    diff old.json new.json

Needs the CI-size digits zoo (``weightlens zoo build --size ci --names digits-tasks``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping

import pandas as pd
import torch

import weightlens as wl
from weightlens import zoo
from weightlens.merge import list_methods


def tensors_sha(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 of every tensor's key, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for key in weights:
        t = weights[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def table_sha(df: pd.DataFrame) -> str:
    """sha256 of a table's CSV (floats at full precision, so any changed bit shows)."""
    return hashlib.sha256(df.to_csv(index=False, float_format="%.17g").encode()).hexdigest()


def main(out: str) -> None:
    z = zoo.load("digits-tasks", size="ci")
    tv, data = z.task_vectors(), z.merge_data()  # data: for regmean and fisher (the others ignore it)
    result: dict[str, str] = {}
    for method in list_methods():
        result[f"merge/{method}"] = tensors_sha(wl.merge(tv, method=method, data=data))
    report = wl.analyze(tv, progress=False)
    for name in ("spectra", "alignment", "signs"):
        result[f"report/{name}"] = table_sha(getattr(report, name))
    for method in ("ties", "tsv"):
        comparison = wl.compare(tv, wl.merge(tv, method=method))
        for name in ("per_task", "alignment", "spectrum", "signs", "task_signs"):
            result[f"compare/{method}/{name}"] = table_sha(getattr(comparison, name))
        result[f"compare/{method}/conflicts"] = table_sha(comparison.conflicts())
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results.json")
