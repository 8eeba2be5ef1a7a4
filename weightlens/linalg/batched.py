"""Many thin SVDs at once: matrices grouped by shape, stacked, one batched call per batch (:func:`svd_many`).

Each result equals :func:`~weightlens.linalg.svd` of that matrix alone: bitwise on the CPU, where
``torch.linalg.svd`` runs LAPACK once per matrix of a batch (so a batch gains nothing there, measured:
see :func:`batching_pays`), and to float32 rounding on CUDA, where a batch is one cuSOLVER call with the
driver :data:`~weightlens.linalg.devices.CUDA_DRIVER_TABLE` picks for the shape (``gesvda`` is verified over
the whole batch). A batch whose call is not accepted (no convergence, a failed ``gesvda`` check, non-finite
output, out of device memory) is redone matrix by matrix through :func:`~weightlens.linalg.svd`, with its
full fallback plan; so are an all-zero or non-finite matrix and one larger than the batch budget alone.

Examples
--------
>>> import torch
>>> from weightlens import linalg
>>> xs = [torch.eye(3) * 2, torch.ones(2, 4), torch.eye(3)]
>>> [tuple(r.S.shape) for r in linalg.svd_many(xs, device="cpu")]
[(3,), (2,), (3,)]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from weightlens._finite import finite
from weightlens.errors import InvalidParameterError
from weightlens.linalg.backend import _fix_signs, svd
from weightlens.linalg.devices import resolve_device
from weightlens.linalg.guard import first_attempt
from weightlens.linalg.kernels import svd_kernel
from weightlens.linalg.results import SVD

__all__ = ["CPU_BATCH_BYTES", "batching_pays", "default_batch_bytes", "svd_many", "svd_nbytes"]

#: Batch budget on the CPU (only used when batching is forced there, e.g. by tests).
CPU_BATCH_BYTES = 256 * 2**20
#: On CUDA the budget is this fraction of the device memory free when the call starts.
CUDA_BATCH_FRACTION = 1 / 4


def batching_pays(device: str | torch.device) -> bool:
    """Whether decompositions batched by shape are worth it on ``device``: on CUDA, not on the CPU.

    On the CPU ``torch.linalg.svd`` of a batch calls LAPACK once per matrix, so a batch only adds a copy
    (384x384 and 1536x384 float32, 6 matrices, 2 cores: 0.6-1.4 s either way). On CUDA one call replaces
    one launch, one transfer and one ``gesvda`` check per matrix; how much that gains per shape is what
    ``benchmarks/bench_gpu.py`` measures (no GPU has run it yet).
    """
    return resolve_device(device).type == "cuda"


def default_batch_bytes(device: str | torch.device) -> int:
    """Working bytes one batch may take: a quarter of the free memory of a CUDA device, 256 MiB on the CPU."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return CPU_BATCH_BYTES
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free * CUDA_BATCH_FRACTION)


def svd_nbytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the thin SVD of one ``(m, n)`` matrix: ``U (m, r)``, ``S (r,)``, ``Vh (r, n)``."""
    m, n = int(shape[-2]), int(shape[-1])
    r = min(m, n)
    return (m * r + r + r * n) * torch.finfo(dtype).bits // 8


def _working_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes one matrix takes in a batch: its copy in the stack plus its factors."""
    return int(shape[-2]) * int(shape[-1]) * torch.finfo(dtype).bits // 8 + svd_nbytes(shape, dtype)


def svd_many(
    matrices: Sequence[Tensor],
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    names: Sequence[str | None] | None = None,
    max_batch_bytes: int | None = None,
) -> list[SVD]:
    """Thin SVDs of ``matrices``, batched by shape: ``[svd(x) for x in matrices]`` in fewer calls.

    Parameters
    ----------
    matrices : sequence of Tensor of shape (m, n)
        Any shapes; those of one shape and dtype are stacked together.
    device, dtype
        As in :func:`~weightlens.linalg.svd`.
    names : sequence of str or None, optional
        Tensor keys, one per matrix, for error messages.
    max_batch_bytes : int, optional
        Working bytes of one batch (stacked input plus factors); default :func:`default_batch_bytes`. A
        matrix that does not fit on its own is decomposed alone.

    Returns
    -------
    list of SVD
        One per matrix, in order, each with its own storage (a slice of a batch would keep the whole batch
        alive in a cache).
    """
    dev = resolve_device(device)
    names = [None] * len(matrices) if names is None else list(names)
    if len(names) != len(matrices):
        raise InvalidParameterError(
            f"svd_many got {len(matrices)} matrices and {len(names)} names; pass one name per matrix or none."
        )
    budget = default_batch_bytes(dev) if max_batch_bytes is None else int(max_batch_bytes)
    out: list[SVD | None] = [None] * len(matrices)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, x in enumerate(matrices):
        batchable = isinstance(x, Tensor) and x.ndim == 2 and x.is_floating_point() and x.numel() > 0
        if batchable and finite(x) and bool(x.any()):
            groups[(tuple(x.shape), x.dtype, x.device)].append(i)
        else:  # svd's own checks and shortcuts: errors named as usual, zero matrices without LAPACK
            out[i] = svd(x, device=dev, dtype=dtype, name=names[i])
    for (shape, _, _), members in groups.items():
        per = max(1, budget // _working_bytes(shape, dtype))
        for start in range(0, len(members), per):
            batch = members[start:start + per]
            for i, result in zip(batch, _batch(matrices, batch, dev, dtype, names)):
                out[i] = result
    return out  # type: ignore[return-value]


def _batch(matrices: Sequence[Tensor], batch: list[int], dev: torch.device, dtype: torch.dtype,
           names: list[str | None]) -> list[SVD]:
    """The SVDs of one batch: one call when it is accepted, else one :func:`svd` per matrix."""
    if len(batch) > 1:
        stack = torch.stack([matrices[i] for i in batch])
        try:
            found = first_attempt(stack, svd_kernel, op="svd", device=dev, dtype=dtype)
        except torch.cuda.OutOfMemoryError:
            found = None
        del stack
        if found is not None:
            U, S, Vh = _fix_signs(found)
            # clone: each result its own storage, strides as a single call's
            return [SVD(U[j].clone(), S[j].clone(), Vh[j].clone()) for j in range(len(batch))]
    return [svd(matrices[i], device=dev, dtype=dtype, name=names[i]) for i in batch]
