"""Decompositions: the only part of weightlens that knows devices, dtypes and SVD drivers.

Examples
--------
>>> import torch
>>> from weightlens import linalg
>>> U, S, Vh = linalg.svd(torch.eye(3) * 2, device="cpu")
>>> S.tolist()
[2.0, 2.0, 2.0]
>>> linalg.numerical_rank(S, (3, 3))
3
"""

from weightlens.linalg.backend import left_svd, numerical_rank, polar, svd, svdvals, topk_svd
from weightlens.linalg.batched import batching_pays, default_batch_bytes, svd_many, svd_nbytes
from weightlens.linalg.cache import DecompositionCache, value_nbytes
from weightlens.linalg.factored import concat_factors, factored_svd
from weightlens.linalg.guard import recording_retries
from weightlens.linalg.reduce import count_nonzero, sum64
from weightlens.linalg.devices import (
    CUDA_DRIVER_TABLE,
    GESVDA_RTOL_FACTOR,
    available_cores,
    choose_driver,
    gesvda_tolerance,
    resolve_device,
    torch_threads,
)
from weightlens.linalg.results import SVD, DecompositionError, LeftSVD, Polar
from weightlens.linalg.topk import TopkOptions

__all__ = [
    "CUDA_DRIVER_TABLE",
    "GESVDA_RTOL_FACTOR",
    "SVD",
    "DecompositionCache",
    "DecompositionError",
    "LeftSVD",
    "Polar",
    "TopkOptions",
    "available_cores",
    "batching_pays",
    "choose_driver",
    "concat_factors",
    "count_nonzero",
    "default_batch_bytes",
    "factored_svd",
    "gesvda_tolerance",
    "left_svd",
    "numerical_rank",
    "polar",
    "recording_retries",
    "resolve_device",
    "sum64",
    "svd",
    "svd_many",
    "svd_nbytes",
    "svdvals",
    "topk_svd",
    "torch_threads",
    "value_nbytes",
]
