"""Shared pieces of the reference generators (``cases_*.py``), run by the peers' Python, not by weightlens.

A generator writes one safetensors file per case, ``OUTDIR/<peer>_<method>_<case>.safetensors``, holding

* ``input.base.<key>`` and ``input.<task>.<key>``: the base and the fine-tunes, fp32;
* ``expected.<what>.<key>``: what the peer computed (``merged``: the merged weights; other names a
  case-specific output, e.g. one model per task);
* metadata, every value a JSON string: ``peer`` (``name==version``), ``method`` (the peer's name),
  ``params`` (the peer's own parameters), ``tasks`` (task names in order), ``keys`` and whatever the
  test needs besides (``kind``: ``exact`` or ``random``, ``outputs``, ``call``: the peer function called).

Nothing here imports weightlens: the references must come from the peers' code alone.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def peer(name: str) -> str:
    """``"name==version"`` of an installed distribution."""
    return f"{name}=={importlib.metadata.version(name)}"


def orthonormal(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """An ``n x k`` matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def spectral(g: torch.Generator, shape: tuple[int, int], values: Sequence[float]) -> torch.Tensor:
    """``U diag(values) V^T`` (fp32) of ``shape``: singular values exactly ``values`` (distinct, with gaps)."""
    m, n = shape
    k = min(m, n)
    assert len(values) == k and all(a > b for a, b in zip(values, values[1:])), "distinct, descending values"
    s = torch.tensor(values, dtype=torch.float64)
    return (orthonormal(g, m, k) * s @ orthonormal(g, n, k).T).float()


def geometric(k: int, top: float, ratio: float) -> list[float]:
    """``top, top ratio, top ratio^2, ...``: ``k`` singular values with relative gaps ``1 - ratio``."""
    return [top * ratio**i for i in range(k)]


def distinct(x: torch.Tensor) -> bool:
    """Whether the magnitudes of ``x`` are pairwise distinct (no tie can decide a threshold)."""
    flat = x.abs().reshape(-1).sort().values
    return bool((flat[1:] > flat[:-1]).all())


def relative_gap(values: torch.Tensor, cut: int) -> float:
    """``(s[cut-1] - s[cut]) / s[0]`` of descending singular values: how clearly a truncation at ``cut`` is decided."""
    return float((values[cut - 1] - values[cut]) / values[0])


def write_case(outdir: Path, peer_name: str, method: str, case: str, *, params: Mapping[str, Any],
               base: Mapping[str, torch.Tensor], tasks: Mapping[str, Mapping[str, torch.Tensor]],
               expected: Mapping[str, Mapping[str, torch.Tensor]], **meta: Any) -> Path:
    """Write ``<peer>_<method>_<case>.safetensors`` (the peer's short name before ``==``); returns its path."""
    tensors = {f"input.base.{k}": v for k, v in base.items()}
    for task, state in tasks.items():
        assert "." not in task and task != "base"
        tensors.update({f"input.{task}.{k}": v for k, v in state.items()})
    for what, state in expected.items():
        tensors.update({f"expected.{what}.{k}": v for k, v in state.items()})
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    metadata = {"peer": peer_name, "method": method, "params": params, "tasks": list(tasks),
                "keys": list(base), "outputs": list(expected), **meta}
    short = peer_name.split("==")[0].replace("-", "")
    path = Path(outdir) / f"{short}_{method}_{case}.safetensors"
    save_file(tensors, str(path), metadata={k: json.dumps(v, sort_keys=True) for k, v in metadata.items()})
    canonical(path)
    return path


def canonical(path: Path) -> None:
    """Rewrite the safetensors header with sorted keys (the writer's order varies by process): a re-run on the
    same pins writes the same bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size:])
